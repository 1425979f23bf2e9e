//! Comparison of kernel outputs against a CPU reference, with dtype-aware tolerances.
//!
//! The reference is rounded to the output dtype first; an element passes when
//! `|got - ref| <= atol + rtol * |ref|`. NaN matches NaN and an infinity matches the same
//! infinity; anything else against a non-finite reference fails.

use crate::dtype::Float;

#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub fn new(atol: f64, rtol: f64) -> Self {
        Tolerance { atol, rtol }
    }

    /// `ulps` units of the dtype's relative precision, with an absolute floor at the smallest
    /// value the kernels keep with full precision (f32 normals; f16's subnormal step).
    pub fn ulps<T: Float>(ulps: f64) -> Self {
        let atol = if T::DTYPE == crate::dtype::DType::F16 {
            2f64.powi(-24)
        } else {
            f32::MIN_POSITIVE as f64
        };
        Tolerance {
            atol,
            rtol: ulps * T::EPSILON,
        }
    }
}

/// The outcome of one comparison.
#[derive(Clone, Debug)]
pub struct Report {
    pub n: usize,
    pub max_abs: f64,
    pub max_rel: f64,
    /// max over elements of |got - ref| / (atol + rtol |ref|): above 1.0 means failure.
    pub worst: f64,
    pub failures: usize,
    /// The first failing element: (index, got, reference rounded to the dtype).
    pub first_failure: Option<(usize, f64, f64)>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} max_abs={:.3e} max_rel={:.3e} tolerance used {:.1}%",
            self.n,
            self.max_abs,
            self.max_rel,
            100.0 * self.worst
        )?;
        if let Some((i, g, r)) = self.first_failure {
            write!(
                f,
                "; {} failures, first at {i}: got {g:e}, want {r:e}",
                self.failures
            )?;
        }
        Ok(())
    }
}

pub fn compare<T: Float>(got: &[T], reference: &[f64], tol: Tolerance) -> Report {
    let mut r = Report {
        n: got.len(),
        max_abs: 0.0,
        max_rel: 0.0,
        worst: 0.0,
        failures: 0,
        first_failure: None,
    };
    if got.len() != reference.len() {
        r.failures = got.len().abs_diff(reference.len()).max(1);
        r.first_failure = Some((got.len().min(reference.len()), f64::NAN, f64::NAN));
        r.worst = f64::INFINITY;
        return r;
    }
    for (i, (&g, &want)) in got.iter().zip(reference).enumerate() {
        let g = g.to_f64();
        let want = T::from_f64(want).to_f64();
        let ok = if !want.is_finite() || !g.is_finite() {
            (want.is_nan() && g.is_nan()) || want == g
        } else {
            let d = (g - want).abs();
            let bound = tol.atol + tol.rtol * want.abs();
            r.max_abs = r.max_abs.max(d);
            if want != 0.0 {
                r.max_rel = r.max_rel.max(d / want.abs());
            }
            r.worst = r.worst.max(d / bound);
            d <= bound
        };
        if !ok {
            r.failures += 1;
            r.first_failure.get_or_insert((i, g, want));
            r.worst = f64::INFINITY;
        }
    }
    r
}
