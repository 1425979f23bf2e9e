//! FP8 e4m3fn weights with one f32 scale per 128 × 128 block, as DeepSeek-V3 and R1 ship their
//! experts (`weight` in float8_e4m3fn, `weight_scale_inv [ceil(N/128), ceil(Kd/128)]` f32).

use super::check_len;
use crate::error::{Error, Result};

/// The block edge of the scales.
pub const FP8_BLOCK: usize = 128;

/// The value of an e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities;
/// S.1111.111 is NaN, so the largest finite magnitude is 448; exponent 0 is subnormal
/// (m/8 · 2^-6).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 0xf), f32::from(b & 7));
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m * 2f32.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    };
    sign * mag
}

/// The e4m3fn byte nearest to `x`, ties to the even code. Finite values past ±448 and ±inf
/// saturate to ±448 (the "satfinite" conversion CUDA offers; a plain torch cast would give NaN);
/// NaN becomes the NaN code with x's sign.
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return 0x7f | sign;
    }
    let a = x.abs();
    // Codes 0..=0x7e are the finite magnitudes in increasing order: find the first >= a.
    let (mut lo, mut hi) = (0u8, 0x7e);
    if a >= e4m3_to_f32(0x7e) {
        return 0x7e | sign;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if e4m3_to_f32(mid) < a {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // lo is the first code with value >= a; its predecessor is below a.
    let code = if lo == 0 {
        0
    } else {
        let (below, above) = (e4m3_to_f32(lo - 1), e4m3_to_f32(lo));
        let (db, da) = (a - below, above - a);
        if db < da || (db == da && (lo - 1) % 2 == 0) {
            lo - 1
        } else {
            lo
        }
    };
    code | sign
}

/// `W [N, Kd]` in fp8: `w[r, k] = e4m3(weight[r, k]) * scale_inv[r / 128, k / 128]`, one f32
/// product. Layout: `weight [N, Kd]` u8, `scale_inv [ceil(N/128), ceil(Kd/128)]` f32, exactly
/// DeepSeek-V3's tensors. N and Kd need not be multiples of 128; Kd must be one of 8.
#[derive(Clone, Debug)]
pub struct Fp8Matrix {
    n: usize,
    kdim: usize,
    weight: Vec<u8>,
    scale_inv: Vec<f32>,
}

impl Fp8Matrix {
    pub fn new(n: usize, kdim: usize, weight: Vec<u8>, scale_inv: Vec<f32>) -> Result<Self> {
        const OP: &str = "Fp8Matrix::new";
        check_len(OP, "weight", weight.len(), n, kdim, 1, 8)?;
        let (bn, bk) = (n.div_ceil(FP8_BLOCK), kdim.div_ceil(FP8_BLOCK));
        if scale_inv.len() != bn * bk {
            return Err(Error::shape(
                OP,
                "scale_inv",
                format!(
                    "[ceil(N/128), ceil(Kd/128)] = [{bn}, {bk}] ({} values)",
                    bn * bk
                ),
                format!("{} values", scale_inv.len()),
            ));
        }
        Ok(Fp8Matrix {
            n,
            kdim,
            weight,
            scale_inv,
        })
    }

    /// Quantises `w [N, Kd]` (finite): each 128 × 128 block gets `scale_inv = max|x| / 448`
    /// (1 for an all-zero block) and each value `e4m3(x / scale_inv)`, as DeepSeek's
    /// block-wise recipe does. The error is at most 2^-4 |x| (3 mantissa bits) or, below the
    /// normal range, 2^-10 · scale_inv.
    pub fn quantize(w: &[f32], n: usize, kdim: usize) -> Result<Self> {
        const OP: &str = "Fp8Matrix::quantize";
        check_len(OP, "w", w.len(), n, kdim, 1, 8)?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(Error::shape(OP, "w", "finite weights", format!("{bad}")));
        }
        let (bn, bk) = (n.div_ceil(FP8_BLOCK), kdim.div_ceil(FP8_BLOCK));
        let mut scale_inv = vec![0f32; bn * bk];
        for r in 0..n {
            for k in 0..kdim {
                let s = &mut scale_inv[(r / FP8_BLOCK) * bk + k / FP8_BLOCK];
                *s = s.max(w[r * kdim + k].abs());
            }
        }
        for s in &mut scale_inv {
            *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
        }
        let weight = (0..n * kdim)
            .map(|i| {
                let (r, k) = (i / kdim, i % kdim);
                e4m3_from_f32(w[i] / scale_inv[(r / FP8_BLOCK) * bk + k / FP8_BLOCK])
            })
            .collect();
        Fp8Matrix::new(n, kdim, weight, scale_inv)
    }

    pub fn n(&self) -> usize {
        self.n
    }
    pub fn kdim(&self) -> usize {
        self.kdim
    }
    pub fn weight(&self) -> &[u8] {
        &self.weight
    }
    pub fn scale_inv(&self) -> &[f32] {
        &self.scale_inv
    }
    pub fn bytes(&self) -> usize {
        self.weight.len() + 4 * self.scale_inv.len()
    }

    /// The reference decoder: `[N, Kd]` in f32.
    pub fn decode(&self) -> Vec<f32> {
        let bk = self.kdim.div_ceil(FP8_BLOCK);
        (0..self.n * self.kdim)
            .map(|i| {
                let (r, k) = (i / self.kdim, i % self.kdim);
                e4m3_to_f32(self.weight[i]) * self.scale_inv[(r / FP8_BLOCK) * bk + k / FP8_BLOCK]
            })
            .collect()
    }
}
