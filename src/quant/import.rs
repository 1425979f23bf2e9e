//! Readers of the GPTQ and AWQ checkpoint layouts, repacking into [`IntMatrix`].
//!
//! Both store a Linear of `in_features = Kd`, `out_features = N` with int32 tensors:
//!
//! | tensor | GPTQ (AutoGPTQ, gptqmodel) | AWQ (llm-awq / AutoAWQ "GEMM") |
//! |--------|----------------------------|--------------------------------|
//! | qweight | `[Kd*b/32, N]`, packed along Kd: word (i, n) holds column n of inputs `i*(32/b) + j` at bit `j*b` | `[Kd, N/8]`, packed along N with the nibble order 0, 2, 4, 6, 1, 3, 5, 7: nibble j of word (k, c) holds output `8c + ORDER[j]` |
//! | qzeros | `[G, N*b/32]`, packed along N, low bits first; v1 stores z - 1 | `[G, N/8]`, same interleave as qweight; z as is |
//! | scales | `[G, N]` f16 | `[G, N]` f16 |
//! | g_idx | `[Kd]` int32 group of each input (act-order), optional | none |
//!
//! and dequantise `w[n, k] = (q - z) * s` with the group of input k. AWQ is 4-bit only.

use half::f16;

use super::IntMatrix;
use crate::error::{Error, Result};

/// Which zero-point convention a GPTQ checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptqVersion {
    /// AutoGPTQ and most published checkpoints (`checkpoint_format: gptq`): qzeros holds z - 1,
    /// so the zero point is the stored value plus one. A stored 15 (4-bit) gives 16, which the
    /// v1 kernels use as is; a stored 255 (8-bit) would give 256 and is refused.
    V1,
    /// gptqmodel's `gptq_v2`: qzeros holds z.
    V2,
}

/// A borrowed host tensor as a checkpoint holds it: data and shape.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a, T> {
    pub data: &'a [T],
    pub shape: &'a [usize],
}

impl<'a, T> HostTensor<'a, T> {
    pub fn new(data: &'a [T], shape: &'a [usize]) -> Self {
        HostTensor { data, shape }
    }

    /// Refuses a tensor whose shape is not `want` or whose data does not fill it.
    fn expect(&self, op: &'static str, arg: &'static str, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(Error::shape(
                op,
                arg,
                format!("shape {want:?}"),
                format!("{:?}", self.shape),
            ));
        }
        let numel: usize = want.iter().product();
        if self.data.len() != numel {
            return Err(Error::shape(
                op,
                arg,
                format!("{numel} elements for shape {want:?}"),
                format!("{} elements (truncated or inconsistent)", self.data.len()),
            ));
        }
        Ok(())
    }
}

/// Reads one GPTQ Linear (`bits` 4 or 8, `group` its group size, or Kd for `group_size: -1`)
/// into the kernels' layout. A `g_idx` equal to `k / group` is dropped (it is the default);
/// zero points all equal to 2^(b-1) (symmetric quantisation) are dropped too.
#[allow(clippy::too_many_arguments)] // the checkpoint's tensors and its config
pub fn import_gptq(
    bits: u32,
    group: usize,
    in_features: usize,
    out_features: usize,
    qweight: HostTensor<'_, i32>,
    qzeros: HostTensor<'_, i32>,
    scales: HostTensor<'_, f16>,
    g_idx: Option<HostTensor<'_, i32>>,
    version: GptqVersion,
) -> Result<IntMatrix> {
    const OP: &str = "import_gptq";
    let (kd, n) = (in_features, out_features);
    if bits != 4 && bits != 8 {
        return Err(Error::shape(OP, "bits", "4 or 8", format!("{bits}")));
    }
    let per = (32 / bits) as usize;
    check_linear(OP, group, kd, n, per)?;
    let groups = kd / group;
    qweight.expect(OP, "qweight", &[kd / per, n])?;
    qzeros.expect(OP, "qzeros", &[groups, n / per])?;
    scales.expect(OP, "scales", &[groups, n])?;
    if let Some(g) = &g_idx {
        g.expect(OP, "g_idx", &[kd])?;
    }
    let mask = (1u32 << bits) - 1;
    let field = |word: i32, j: usize| (word as u32 >> (j as u32 * bits)) & mask;
    // Codes, transposed from [Kd, N] to [N, Kd]; the packing order along Kd stays the same.
    let mut codes = vec![0u32; n * kd / per];
    for r in 0..n {
        for k in 0..kd {
            let q = field(qweight.data[(k / per) * n + r], k % per);
            codes[(r * kd + k) / per] |= q << ((k % per) as u32 * bits);
        }
    }
    let mut zeros = Vec::with_capacity(n * groups);
    let mut out_scales = Vec::with_capacity(n * groups);
    for r in 0..n {
        for g in 0..groups {
            let stored = field(qzeros.data[g * (n / per) + r / per], r % per);
            let z = match version {
                GptqVersion::V1 => stored + 1,
                GptqVersion::V2 => stored,
            };
            let z = u8::try_from(z).map_err(|_| {
                Error::shape(
                    OP,
                    "qzeros",
                    "8-bit v1 zero points below 256 (stored value below 255)",
                    format!("stored {stored} at group {g}, output {r}"),
                )
            })?;
            zeros.push(z);
            out_scales.push(scales.data[g * n + r]);
        }
    }
    let g_idx = match g_idx {
        None => None,
        Some(t) => {
            let mut v = Vec::with_capacity(kd);
            for (k, &g) in t.data.iter().enumerate() {
                match u32::try_from(g) {
                    Ok(g) if (g as usize) < groups => v.push(g),
                    _ => {
                        return Err(Error::shape(
                            OP,
                            "g_idx",
                            format!("groups in [0, {groups})"),
                            format!("{g} at input {k}"),
                        ));
                    }
                }
            }
            let trivial = v.iter().enumerate().all(|(k, &g)| g as usize == k / group);
            (!trivial).then_some(v)
        }
    };
    let symmetric = zeros.iter().all(|&z| u32::from(z) == 1 << (bits - 1));
    let zeros = (!symmetric).then_some(zeros);
    IntMatrix::new(bits, group, n, kd, codes, out_scales, zeros, g_idx)
}

/// AWQ's nibble order: nibble j of a packed word holds column `AWQ_ORDER[j]` of its eight.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Reads one AWQ ("GEMM" layout, 4-bit) Linear into the kernels' layout.
pub fn import_awq(
    group: usize,
    in_features: usize,
    out_features: usize,
    qweight: HostTensor<'_, i32>,
    qzeros: HostTensor<'_, i32>,
    scales: HostTensor<'_, f16>,
) -> Result<IntMatrix> {
    const OP: &str = "import_awq";
    let (kd, n) = (in_features, out_features);
    check_linear(OP, group, kd, n, 8)?;
    let groups = kd / group;
    qweight.expect(OP, "qweight", &[kd, n / 8])?;
    qzeros.expect(OP, "qzeros", &[groups, n / 8])?;
    scales.expect(OP, "scales", &[groups, n])?;
    // Output column r of a row of packed words: word r / 8, nibble j with AWQ_ORDER[j] = r % 8.
    let nibble = |words: &[i32], r: usize| {
        let j = AWQ_ORDER.iter().position(|&o| o == r % 8).unwrap();
        (words[r / 8] as u32 >> (4 * j)) & 0xf
    };
    let mut codes = vec![0u32; n * kd / 8];
    for k in 0..kd {
        let row = &qweight.data[k * (n / 8)..(k + 1) * (n / 8)];
        for r in 0..n {
            codes[(r * kd + k) / 8] |= nibble(row, r) << (4 * (k % 8));
        }
    }
    let mut zeros = Vec::with_capacity(n * groups);
    let mut out_scales = Vec::with_capacity(n * groups);
    for r in 0..n {
        for g in 0..groups {
            let row = &qzeros.data[g * (n / 8)..(g + 1) * (n / 8)];
            zeros.push(nibble(row, r) as u8);
            out_scales.push(scales.data[g * n + r]);
        }
    }
    IntMatrix::new(4, group, n, kd, codes, out_scales, Some(zeros), None)
}

/// A group size dividing Kd, Kd a multiple of 8 and N of the codes packed per word along N.
fn check_linear(op: &'static str, group: usize, kd: usize, n: usize, per: usize) -> Result<()> {
    if group == 0 || !kd.is_multiple_of(group) {
        return Err(Error::shape(
            op,
            "group",
            format!("a group size that divides in_features = {kd}"),
            format!("{group}"),
        ));
    }
    if !kd.is_multiple_of(8) || !n.is_multiple_of(per) {
        return Err(Error::shape(
            op,
            "in_features, out_features",
            format!("in_features a multiple of 8, out_features a multiple of {per}"),
            format!("{kd}, {n}"),
        ));
    }
    Ok(())
}
