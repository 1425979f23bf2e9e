//! Compressed expert weights: the formats, their CPU packers and decoders, and the GPU kernels
//! that decode them (to bf16/f16, or on the fly inside the grouped GEMV).
//!
//! Every format describes one expert's weight `W [N, Kd]` (out × in, as a Linear stores it) and
//! is one variant of [`QuantMatrix`]. A layer is one `QuantMatrix` per expert; the experts of a
//! layer may use different formats (MC-MoE, EdgeMoE), and the device kernels read a per-expert
//! table, so a mixed layer still runs in one launch.
//!
//! | format | codes | scales | bits / weight |
//! |--------|-------|--------|---------------|
//! | [`IntMatrix`] | 4- or 8-bit unsigned, packed along Kd in u32 words, low bits first | f16 per (row, group of `g` columns), u8 zero point (or the symmetric 2^(b-1)); optional act-order `g_idx` | b + 16/g (+ 8/g) |
//! | [`Mxfp4Matrix`] | e2m1, two per byte, the even column in the low nibble | e8m0 per 32 columns | 4.25 |
//! | [`Fp8Matrix`] | e4m3fn, one per byte | f32 `scale_inv` per 128 × 128 block | 8 + 32/16384 |
//! | [`TernaryMatrix`] | 16-bit codewords of a shared dictionary of symbol runs | f16 (lo, hi) per row | about 0.6–0.9 on ternarised Gaussians |
//! | `Bf16` | plain bf16 | none | 16 |
//!
//! The CPU decoders ([`QuantMatrix::decode`]) are the references: each gives the f32 value the
//! GPU computes, and both round that f32 once to the output dtype, so GPU and CPU agree bit for
//! bit on every number (NaN payloads differ: any NaN matches any NaN). Every value is either exact in f32 (integer codes times f16 scales, e2m1 times powers of
//! two, ternary lo/hi) or one f32 product (e4m3 times its f32 block scale), which IEEE rounds
//! the same way on both sides.
//!
//! Constructors validate everything a kernel will index with: buffer lengths against the shape,
//! group sizes that divide Kd, scales of the right shape, act-order groups in range, ternary
//! codewords inside the dictionary and row lengths that add up. Malformed input is refused with
//! [`Error::Shape`](crate::Error) naming the argument; a container that exists is well formed.
//!
//! Checkpoint layouts are read by [`import_gptq`], [`import_awq`] and
//! [`Mxfp4Matrix::from_gpt_oss`]; DeepSeek-V3's fp8 `weight` / `weight_scale_inv` pair is
//! already the [`Fp8Matrix`] layout.

mod fp8;
mod import;
mod int;
mod layer;
mod mxfp4;
mod params;
mod ternary;

pub use fp8::{Fp8Matrix, e4m3_from_f32, e4m3_to_f32};
pub use import::{GptqVersion, HostTensor, import_awq, import_gptq};
pub use int::IntMatrix;
pub use layer::{QuantGemvVersion, QuantLayer, dequantize_into, quant_gemm_into, quant_gemv_into};
pub use mxfp4::{Mxfp4Matrix, e2m1_from_f64, e2m1_to_f32, e8m0_to_f32};
pub use ternary::{Dictionary, Ternarized, TernaryMatrix, ternarize};

use half::bf16;

use crate::dtype::Float;
use crate::error::{Error, Result};

/// One expert's weight `[N, Kd]` in one of the formats.
#[derive(Clone, Debug)]
pub enum QuantMatrix {
    /// Uncompressed, for experts a mixed layer keeps at full precision.
    Bf16 {
        n: usize,
        kdim: usize,
        w: Vec<bf16>,
    },
    Int(IntMatrix),
    Mxfp4(Mxfp4Matrix),
    Fp8(Fp8Matrix),
    Ternary(TernaryMatrix),
}

impl QuantMatrix {
    /// A plain bf16 weight `[N, Kd]`.
    pub fn bf16(w: Vec<bf16>, n: usize, kdim: usize) -> Result<Self> {
        check_len("QuantMatrix::bf16", "w", w.len(), n, kdim, 1, 1)?;
        Ok(QuantMatrix::Bf16 { n, kdim, w })
    }

    /// `(N, Kd)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantMatrix::Bf16 { n, kdim, .. } => (*n, *kdim),
            QuantMatrix::Int(m) => (m.n(), m.kdim()),
            QuantMatrix::Mxfp4(m) => (m.n(), m.kdim()),
            QuantMatrix::Fp8(m) => (m.n(), m.kdim()),
            QuantMatrix::Ternary(m) => (m.n(), m.kdim()),
        }
    }

    /// The format's name, e.g. `int4-g128`, `mxfp4`.
    pub fn name(&self) -> String {
        match self {
            QuantMatrix::Bf16 { .. } => "bf16".into(),
            QuantMatrix::Int(m) => format!(
                "int{}-g{}{}{}",
                m.bits(),
                m.group(),
                if m.zeros().is_some() { "-zp" } else { "" },
                if m.g_idx().is_some() { "-actorder" } else { "" }
            ),
            QuantMatrix::Mxfp4(_) => "mxfp4".into(),
            QuantMatrix::Fp8(_) => "fp8-e4m3-b128".into(),
            QuantMatrix::Ternary(_) => "ternary".into(),
        }
    }

    /// The bytes a kernel reads for this expert: codes, scales, zero points, row offsets
    /// (the ternary dictionary is per layer and not counted).
    pub fn bytes(&self) -> usize {
        match self {
            QuantMatrix::Bf16 { w, .. } => 2 * w.len(),
            QuantMatrix::Int(m) => m.bytes(),
            QuantMatrix::Mxfp4(m) => m.bytes(),
            QuantMatrix::Fp8(m) => m.bytes(),
            QuantMatrix::Ternary(m) => m.bytes(),
        }
    }

    /// The reference decoder: `[N, Kd]` in f32, the exact values the GPU computes before its
    /// one rounding to the output dtype.
    pub fn decode(&self) -> Vec<f32> {
        match self {
            QuantMatrix::Bf16 { w, .. } => w.iter().map(|v| v.to_f32()).collect(),
            QuantMatrix::Int(m) => m.decode(),
            QuantMatrix::Mxfp4(m) => m.decode(),
            QuantMatrix::Fp8(m) => m.decode(),
            QuantMatrix::Ternary(m) => m.decode(),
        }
    }

    /// [`decode`](Self::decode) rounded to `T` (nearest even), as the dequantise kernels write.
    pub fn decode_to<T: Float>(&self) -> Vec<T> {
        self.decode().into_iter().map(T::from_f32).collect()
    }

    /// `[self; other]`: the rows of `other` under those of `self`, in the same format, as a
    /// layer stacks an expert's gate and up projections into one `[2I, H]` weight. Refused when
    /// the two cannot share one container: other formats or Kd, integer matrices of other bits,
    /// groups or act-order, FP8 rows not a whole number of 128-row blocks, ternary matrices
    /// (their row streams are stacked by recompressing instead).
    pub fn stack_rows(&self, other: &QuantMatrix) -> Result<QuantMatrix> {
        const OP: &str = "QuantMatrix::stack_rows";
        let ((n1, kd1), (n2, kd2)) = (self.shape(), other.shape());
        let refuse = |why: &str| {
            Err(Error::shape(
                OP,
                "other",
                why.to_string(),
                format!(
                    "{} [{n1}, {kd1}] over {} [{n2}, {kd2}]",
                    self.name(),
                    other.name()
                ),
            ))
        };
        if kd1 != kd2 {
            return refuse("the same Kd");
        }
        let cat = |a: &[u8], b: &[u8]| [a, b].concat();
        match (self, other) {
            (QuantMatrix::Bf16 { w: a, .. }, QuantMatrix::Bf16 { w: b, .. }) => {
                QuantMatrix::bf16([a.as_slice(), b].concat(), n1 + n2, kd1)
            }
            (QuantMatrix::Int(a), QuantMatrix::Int(b)) => {
                if a.bits() != b.bits() || a.group() != b.group() || a.g_idx() != b.g_idx() {
                    return refuse("integer matrices of the same bits, group and act-order");
                }
                // A symmetric matrix has no zero points: spell out its 2^(b-1) to stack.
                let zeros = |m: &IntMatrix| -> Vec<u8> {
                    m.zeros().map(<[u8]>::to_vec).unwrap_or_else(|| {
                        vec![1u8 << (m.bits() - 1); m.n() * (m.kdim() / m.group())]
                    })
                };
                let zeros = match (a.zeros(), b.zeros()) {
                    (None, None) => None,
                    _ => Some([zeros(a), zeros(b)].concat()),
                };
                Ok(QuantMatrix::Int(IntMatrix::new(
                    a.bits(),
                    a.group(),
                    n1 + n2,
                    kd1,
                    [a.qweight(), b.qweight()].concat(),
                    [a.scales(), b.scales()].concat(),
                    zeros,
                    a.g_idx().map(<[u32]>::to_vec),
                )?))
            }
            (QuantMatrix::Mxfp4(a), QuantMatrix::Mxfp4(b)) => {
                Ok(QuantMatrix::Mxfp4(Mxfp4Matrix::new(
                    n1 + n2,
                    kd1,
                    cat(a.blocks(), b.blocks()),
                    cat(a.scales(), b.scales()),
                )?))
            }
            (QuantMatrix::Fp8(a), QuantMatrix::Fp8(b)) => {
                if !n1.is_multiple_of(fp8::FP8_BLOCK) {
                    return refuse("FP8 rows in whole 128-row blocks");
                }
                Ok(QuantMatrix::Fp8(Fp8Matrix::new(
                    n1 + n2,
                    kd1,
                    cat(a.weight(), b.weight()),
                    [a.scale_inv(), b.scale_inv()].concat(),
                )?))
            }
            _ => refuse("two matrices of one stackable format"),
        }
    }
}

/// Refuses a buffer whose length is not `rows * cols / per` (`per` values packed in each
/// element, e.g. 8 nibbles per u32) for `[rows, cols]` values, `cols` a multiple of `multiple`.
pub(crate) fn check_len(
    op: &'static str,
    arg: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    per: usize,
    multiple: usize,
) -> Result<()> {
    if !cols.is_multiple_of(multiple) {
        return Err(Error::shape(
            op,
            arg,
            format!("Kd a multiple of {multiple}"),
            format!("Kd = {cols}"),
        ));
    }
    let want = rows.checked_mul(cols).map(|v| v / per).ok_or_else(|| {
        Error::shape(
            op,
            arg,
            "a size that fits in usize",
            format!("{rows} x {cols}"),
        )
    })?;
    if len != want {
        return Err(Error::shape(
            op,
            arg,
            if per == 1 {
                format!("{want} elements for [{rows}, {cols}]")
            } else {
                format!("{want} elements for [{rows}, {cols}] values packed {per} per element")
            },
            format!("{len} elements"),
        ));
    }
    Ok(())
}
