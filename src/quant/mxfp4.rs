//! MXFP4, the OCP microscaling format: e2m1 values with one e8m0 scale per 32 along Kd.

use super::check_len;
use crate::error::{Error, Result};

/// The eight e2m1 magnitudes, by code (sign in bit 3): 1 sign, 2 exponent (bias 1), 1 mantissa
/// bit, no infinities or NaN.
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of a 4-bit e2m1 code.
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1[usize::from(code & 7)];
    if code & 8 != 0 { -v } else { v }
}

/// The e2m1 code nearest to `x`, ties to the even code (round to nearest even), saturating at
/// ±6. NaN is not representable; it encodes as +0 (the quantiser refuses NaN before this).
pub fn e2m1_from_f64(x: f64) -> u8 {
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    let mut best = 0u8;
    for c in 1..8u8 {
        let (d, db) = (
            (f64::from(E2M1[c as usize]) - a).abs(),
            (f64::from(E2M1[best as usize]) - a).abs(),
        );
        if d < db || (d == db && c % 2 == 0) {
            best = c;
        }
    }
    if a.is_nan() { 0 } else { best | sign }
}

/// The value of an e8m0 scale: 2^(code - 127); code 255 is NaN.
pub fn e8m0_to_f32(code: u8) -> f32 {
    match code {
        255 => f32::NAN,
        // 2^-127 is an f32 subnormal, still exact.
        0 => f32::from_bits(0x0040_0000),
        c => f32::from_bits(u32::from(c) << 23),
    }
}

/// `W [N, Kd]` in MXFP4: `w[r, k] = e2m1(code(r, k)) * 2^(scale[r, k/32] - 127)`, an exact f32
/// product (it overflows to ±inf only for scales past 2^125, and a scale code of 255 makes its
/// 32 values NaN, as the OCP spec says).
///
/// Layout, as gpt-oss ships `*_blocks [E, N, Kd/32, 16]` and `*_scales [E, N, Kd/32]`:
/// `blocks [N, Kd/2]` u8 with column 2i in the low nibble and 2i + 1 in the high nibble;
/// `scales [N, Kd/32]` u8 e8m0. Kd is a multiple of 32.
#[derive(Clone, Debug)]
pub struct Mxfp4Matrix {
    n: usize,
    kdim: usize,
    blocks: Vec<u8>,
    scales: Vec<u8>,
}

impl Mxfp4Matrix {
    pub fn new(n: usize, kdim: usize, blocks: Vec<u8>, scales: Vec<u8>) -> Result<Self> {
        const OP: &str = "Mxfp4Matrix::new";
        check_len(OP, "blocks", blocks.len(), n, kdim, 2, 32)?;
        check_len(OP, "scales", scales.len(), n, kdim, 32, 32)?;
        Ok(Mxfp4Matrix {
            n,
            kdim,
            blocks,
            scales,
        })
    }

    /// Splits gpt-oss's `*_blocks [E, N, Kd/32, 16]` and `*_scales [E, N, Kd/32]` into one
    /// matrix per expert.
    pub fn from_gpt_oss(
        blocks: &[u8],
        blocks_shape: &[usize],
        scales: &[u8],
        scales_shape: &[usize],
    ) -> Result<Vec<Self>> {
        const OP: &str = "Mxfp4Matrix::from_gpt_oss";
        let &[e, n, nb, 16] = blocks_shape else {
            return Err(Error::shape(
                OP,
                "blocks",
                "shape [E, N, Kd/32, 16]",
                format!("{blocks_shape:?}"),
            ));
        };
        if scales_shape != [e, n, nb] {
            return Err(Error::shape(
                OP,
                "scales",
                format!("shape [E, N, Kd/32] = {:?}", [e, n, nb]),
                format!("{scales_shape:?}"),
            ));
        }
        let per = n * nb;
        if blocks.len() != e * per * 16 || scales.len() != e * per {
            return Err(Error::shape(
                OP,
                "blocks, scales",
                format!("{} and {} bytes", e * per * 16, e * per),
                format!("{} and {} bytes", blocks.len(), scales.len()),
            ));
        }
        (0..e)
            .map(|x| {
                Mxfp4Matrix::new(
                    n,
                    32 * nb,
                    blocks[x * per * 16..(x + 1) * per * 16].to_vec(),
                    scales[x * per..(x + 1) * per].to_vec(),
                )
            })
            .collect()
    }

    /// Quantises `w [N, Kd]` (finite). Scale choice: the smallest power of two 2^e with
    /// `max|x| / 2^e <= 6` (e clamped to [-127, 127]), so no value of the block is clipped;
    /// then each x / 2^e rounds to the nearest e2m1, ties to even. The error of each value is at
    /// most max(|x|, 2^e) / 4. (The OCP spec's example rule, `floor(log2 max) - 2`, is one
    /// binade finer but clips values above 6 · 2^e.) An all-zero block gets 2^-127.
    pub fn quantize(w: &[f32], n: usize, kdim: usize) -> Result<Self> {
        const OP: &str = "Mxfp4Matrix::quantize";
        check_len(OP, "w", w.len(), n, kdim, 1, 32)?;
        if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
            return Err(Error::shape(OP, "w", "finite weights", format!("{bad}")));
        }
        let mut blocks = vec![0u8; n * kdim / 2];
        let mut scales = Vec::with_capacity(n * kdim / 32);
        for (b, xs) in w.chunks(32).enumerate() {
            let amax = xs.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
            let mut e = -127i32;
            while e < 127 && amax > 6.0 * 2f64.powi(e) {
                e += 1;
            }
            scales.push((e + 127) as u8);
            for (i, &x) in xs.iter().enumerate() {
                let code = e2m1_from_f64(f64::from(x) / 2f64.powi(e));
                blocks[b * 16 + i / 2] |= code << (4 * (i % 2));
            }
        }
        Mxfp4Matrix::new(n, kdim, blocks, scales)
    }

    pub fn n(&self) -> usize {
        self.n
    }
    pub fn kdim(&self) -> usize {
        self.kdim
    }
    pub fn blocks(&self) -> &[u8] {
        &self.blocks
    }
    pub fn scales(&self) -> &[u8] {
        &self.scales
    }
    pub fn bytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }

    /// The reference decoder: `[N, Kd]` in f32.
    pub fn decode(&self) -> Vec<f32> {
        (0..self.n * self.kdim)
            .map(|i| {
                let code = (self.blocks[i / 2] >> (4 * (i % 2))) & 0xf;
                e2m1_to_f32(code) * e8m0_to_f32(self.scales[i / 32])
            })
            .collect()
    }
}
