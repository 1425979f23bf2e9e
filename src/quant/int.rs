//! Group-wise integer weights: 4 or 8 bits, one f16 scale (and optionally one zero point) per
//! group of `g` consecutive input columns of a row, as GPTQ and AWQ quantise.

use half::f16;

use super::check_len;
use crate::error::{Error, Result};

/// `W [N, Kd]` as b-bit codes q with `w[r, k] = (q[r, k] - z[r, G(k)]) * s[r, G(k)]`, computed in
/// f32 (exact: an integer of at most 9 bits times an 11-bit f16 significand).
///
/// Layout (the kernels' own; the importers repack checkpoints into it):
/// - `qweight [N, Kd*b/32]` u32: code (r, k) in word `(r*Kd + k) / (32/b)` at bit
///   `(k % (32/b)) * b`, so one row's codes are contiguous along Kd, low bits first (GPTQ's
///   qweight, transposed);
/// - `scales [N, G]` f16, G = Kd / g;
/// - `zeros [N, G]` u8, or none: symmetric, z = 2^(b-1);
/// - `g_idx [Kd]`, or none: G(k) = k / g. With GPTQ's act-order the group of column k is
///   `g_idx[k]` instead.
///
/// b is 4 or 8; g is a multiple of 8 that divides Kd (32, 64, 128 and Kd itself for
/// per-channel scales are the usual ones).
#[derive(Clone, Debug)]
pub struct IntMatrix {
    bits: u32,
    group: usize,
    n: usize,
    kdim: usize,
    qweight: Vec<u32>,
    scales: Vec<f16>,
    zeros: Option<Vec<u8>>,
    g_idx: Option<Vec<u32>>,
}

impl IntMatrix {
    /// Validates and wraps the parts (see the type's doc for the layout).
    #[allow(clippy::too_many_arguments)] // the layout's parts, each named in the errors
    pub fn new(
        bits: u32,
        group: usize,
        n: usize,
        kdim: usize,
        qweight: Vec<u32>,
        scales: Vec<f16>,
        zeros: Option<Vec<u8>>,
        g_idx: Option<Vec<u32>>,
    ) -> Result<Self> {
        const OP: &str = "IntMatrix::new";
        check_shape(OP, bits, group, kdim)?;
        let groups = kdim / group;
        check_len(
            OP,
            "qweight",
            qweight.len(),
            n,
            kdim,
            (32 / bits) as usize,
            8,
        )?;
        check_len(OP, "scales", scales.len(), n, groups, 1, 1)?;
        if let Some(z) = &zeros {
            check_len(OP, "zeros", z.len(), n, groups, 1, 1)?;
            let max = (1u32 << bits) - 1;
            // A 4-bit GPTQ v1 checkpoint may carry zero point 16 (its stored 15, plus one).
            let limit = if bits == 4 { max + 1 } else { max };
            if let Some(&bad) = z.iter().find(|&&v| u32::from(v) > limit) {
                return Err(Error::shape(
                    OP,
                    "zeros",
                    format!("zero points at most {limit} for {bits}-bit codes"),
                    format!("{bad}"),
                ));
            }
        }
        if let Some(g) = &g_idx {
            if g.len() != kdim {
                return Err(Error::shape(
                    OP,
                    "g_idx",
                    format!("[Kd] = [{kdim}]"),
                    format!("[{}]", g.len()),
                ));
            }
            if let Some(&bad) = g.iter().find(|&&v| v as usize >= groups) {
                return Err(Error::shape(
                    OP,
                    "g_idx",
                    format!("groups in [0, {groups})"),
                    format!("{bad}"),
                ));
            }
        }
        Ok(IntMatrix {
            bits,
            group,
            n,
            kdim,
            qweight,
            scales,
            zeros,
            g_idx,
        })
    }

    /// Quantises `w [N, Kd]` (finite) with round-to-nearest per group.
    ///
    /// Symmetric: `s = max|x| / (2^(b-1) - 1)`, `q = round(x / s) + 2^(b-1)`. With zero points:
    /// the group's range is widened to include 0 (so 0 is exact, as GPTQ does),
    /// `s = (max - min) / (2^b - 1)`, `z = round(-min / s)`, `q = round(x / s) + z`. Each scale
    /// is rounded up to f16, never down, so every x lands inside the code range and the error
    /// is at most s / 2. An all-zero group gets s = 1.
    pub fn quantize(
        w: &[f32],
        n: usize,
        kdim: usize,
        bits: u32,
        group: usize,
        zero_points: bool,
    ) -> Result<Self> {
        const OP: &str = "IntMatrix::quantize";
        check_shape(OP, bits, group, kdim)?;
        check_len(OP, "w", w.len(), n, kdim, 1, 8)?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(Error::shape(OP, "w", "finite weights", format!("{bad}")));
        }
        let groups = kdim / group;
        let per = (32 / bits) as usize;
        let maxq = f64::from((1u32 << bits) - 1);
        let half = f64::from(1u32 << (bits - 1));
        let mut qweight = vec![0u32; n * kdim / per];
        let mut scales = Vec::with_capacity(n * groups);
        let mut zeros = zero_points.then(|| Vec::with_capacity(n * groups));
        for r in 0..n {
            for g in 0..groups {
                let xs = &w[r * kdim + g * group..r * kdim + (g + 1) * group];
                let lo = xs.iter().fold(0f64, |m, &x| m.min(f64::from(x)));
                let hi = xs.iter().fold(0f64, |m, &x| m.max(f64::from(x)));
                let exact = if zero_points {
                    (hi - lo) / maxq
                } else {
                    hi.max(-lo) / (half - 1.0)
                };
                let s = f16_at_least(OP, if exact > 0.0 { exact } else { 1.0 })?;
                let sf = f64::from(s.to_f32());
                let z = if zero_points {
                    (-lo / sf).round().clamp(0.0, maxq)
                } else {
                    half
                };
                scales.push(s);
                if let Some(zs) = zeros.as_mut() {
                    zs.push(z as u8);
                }
                for (i, &x) in xs.iter().enumerate() {
                    let q = ((f64::from(x) / sf).round() + z).clamp(0.0, maxq) as u32;
                    let k = g * group + i;
                    qweight[(r * kdim + k) / per] |= q << ((k % per) as u32 * bits);
                }
            }
        }
        IntMatrix::new(bits, group, n, kdim, qweight, scales, zeros, None)
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }
    pub fn group(&self) -> usize {
        self.group
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn kdim(&self) -> usize {
        self.kdim
    }
    pub fn qweight(&self) -> &[u32] {
        &self.qweight
    }
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }
    pub fn zeros(&self) -> Option<&[u8]> {
        self.zeros.as_deref()
    }
    pub fn g_idx(&self) -> Option<&[u32]> {
        self.g_idx.as_deref()
    }

    /// Bytes of codes, scales, zero points and g_idx.
    pub fn bytes(&self) -> usize {
        4 * self.qweight.len()
            + 2 * self.scales.len()
            + self.zeros.as_ref().map_or(0, Vec::len)
            + 4 * self.g_idx.as_ref().map_or(0, Vec::len)
    }

    /// The code of (r, k).
    pub fn code(&self, r: usize, k: usize) -> u32 {
        let per = (32 / self.bits) as usize;
        let word = self.qweight[(r * self.kdim + k) / per];
        (word >> ((k % per) as u32 * self.bits)) & ((1 << self.bits) - 1)
    }

    /// The group column k belongs to.
    pub fn group_of(&self, k: usize) -> usize {
        self.g_idx
            .as_ref()
            .map_or(k / self.group, |g| g[k] as usize)
    }

    /// The zero point of (r, group g).
    pub fn zero(&self, r: usize, g: usize) -> u32 {
        let groups = self.kdim / self.group;
        self.zeros
            .as_ref()
            .map_or(1 << (self.bits - 1), |z| u32::from(z[r * groups + g]))
    }

    /// The reference decoder: `[N, Kd]` in f32.
    pub fn decode(&self) -> Vec<f32> {
        let groups = self.kdim / self.group;
        let mut out = Vec::with_capacity(self.n * self.kdim);
        for r in 0..self.n {
            for k in 0..self.kdim {
                let g = self.group_of(k);
                let q = self.code(r, k) as i32 - self.zero(r, g) as i32;
                out.push(q as f32 * self.scales[r * groups + g].to_f32());
            }
        }
        out
    }
}

fn check_shape(op: &'static str, bits: u32, group: usize, kdim: usize) -> Result<()> {
    if bits != 4 && bits != 8 {
        return Err(Error::shape(op, "bits", "4 or 8", format!("{bits}")));
    }
    if group == 0 || !group.is_multiple_of(8) || !kdim.is_multiple_of(group) {
        return Err(Error::shape(
            op,
            "group",
            format!("a multiple of 8 that divides Kd = {kdim}"),
            format!("{group}"),
        ));
    }
    Ok(())
}

/// The smallest f16 at or above `v` (> 0), refusing one past f16's range.
pub(crate) fn f16_at_least(op: &'static str, v: f64) -> Result<f16> {
    let mut s = f16::from_f64(v);
    if f64::from(s.to_f32()) < v {
        s = f16::from_bits(s.to_bits() + 1);
    }
    if !s.is_finite() {
        return Err(Error::shape(
            op,
            "w",
            "weights whose scales fit in f16 (below 65504)",
            format!("a scale of {v:e}"),
        ));
    }
    Ok(s)
}
