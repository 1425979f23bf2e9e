//! A layer of compressed experts on the device, and the ops that decode it.

use std::sync::Arc;

use cudarc::driver::LaunchConfig;

use super::params::{QuantDequantParams, QuantExpert, QuantGemvParams, format};
use super::{Dictionary, QuantMatrix};
use crate::device::{Device, Tensor};
use crate::dtype::{DType, Float};
use crate::error::{Error, Result};
use crate::gemm::{self, GemmOptions};
use crate::kernels::Module;
use crate::permute::{Layout, Plan};

/// Warps per block of the dequantise and GEMV kernels, as `kQuantWarps` in quant.cu.
const WARPS: usize = 8;

/// The kernels of [`quant_gemv_into`] (kernels/quant.cu); every version stays selectable
/// ([`QuantLayer::set_gemv_version`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantGemvVersion {
    /// One warp per output column, 8 weights per lane per step through the per-8-weight decoder
    /// (a scale lookup per weight), up to 8 rows' activations read from L1 for each step.
    V1,
    /// The default: an expert's rows up to 8 at a time (passes of 1, 2, 4 or 8), their activations
    /// staged in shared memory 1024 columns at a time; each lane decodes a 16-byte chunk of
    /// codes once for all of them with the decode path's chunk decoders
    /// (kernels/common/qdot.cuh). Experts those decoders do not cover (act-order, group sizes
    /// that are not a power of two of at least a chunk, ternary) run v1's loop.
    #[default]
    V2,
}

/// Every expert of one layer (all `[N, Kd]`, each in its own format) in one device blob, with
/// the per-expert table the kernels read (`QuantExpert` in quant_params.cuh).
#[derive(Debug)]
pub struct QuantLayer {
    blob: Tensor<u8>,
    table: Tensor<u8>,
    /// `[1]` entries the kernels skipped (see [`QuantLayer::check`]).
    status: Tensor<i32>,
    n: usize,
    kdim: usize,
    names: Vec<String>,
    bytes: Vec<usize>,
    gemv: QuantGemvVersion,
    /// The v2 decoder every expert takes (`fast_kind` in qdot.cuh), where they all take one.
    fast: Option<&'static str>,
    /// The tensor-core decoder every expert takes (decode v5), where they all take one, in any
    /// model dtype.
    mma: Option<&'static str>,
    /// The smallest and largest e8m0 scale code of an all-MXFP4 layer: v5's exact range
    /// depends on the model dtype ([`QuantLayer::tensor_core_decoder`]).
    mxfp4_scales: Option<(u8, u8)>,
    /// Whether some expert is act-order laid out again in group order (`act_order_layout`).
    reordered: bool,
}

/// The blob under construction: each part starts on a 16-byte boundary.
struct Blob(Vec<u8>);

impl Blob {
    fn push(&mut self, bytes: &[u8]) -> i64 {
        self.0.resize(self.0.len().next_multiple_of(16), 0);
        let at = self.0.len();
        self.0.extend_from_slice(bytes);
        i64::try_from(at).expect("a host buffer is below 2^63 bytes")
    }
}

impl QuantLayer {
    /// Uploads `experts` (at least one, all of the same `[N, Kd]`, Kd a positive multiple of 8).
    /// Ternary experts that share one [`Dictionary`] (the same `Arc`) share its upload. Each
    /// part keeps its format's layout (quant_params.cuh) but two:
    /// - an MXFP4 expert's scale rows are padded with zeros to a multiple of 16 bytes (at most
    ///   15 bytes a row; gpt-oss: 6 on 1,530), so that decode v5 reads four blocks' scales of a
    ///   row with one aligned 16-byte load;
    /// - an integer expert with GPTQ's act-order whose groups each hold `group` columns (the
    ///   groups of a column permutation, as GPTQ makes them) has its columns reordered so that
    ///   each group is contiguous, and a permutation and its inverse (8 bytes per column) take
    ///   the place of its g_idx (4). Decode v5 stages the activation in that order and streams
    ///   the codes as plain groups; every other kernel maps each column to its stored place.
    ///   Any other g_idx is kept as it is.
    pub fn upload(dev: &Device, experts: &[QuantMatrix]) -> Result<Self> {
        const OP: &str = "QuantLayer::upload";
        let Some(first) = experts.first() else {
            return Err(Error::shape(OP, "experts", "at least one expert", "none"));
        };
        let (n, kdim) = first.shape();
        if kdim == 0
            || !kdim.is_multiple_of(8)
            || i32::try_from(n).is_err()
            || i32::try_from(kdim).is_err()
        {
            return Err(Error::shape(
                OP,
                "experts",
                "N below 2^31 and Kd a positive multiple of 8 below 2^31",
                format!("[{n}, {kdim}]"),
            ));
        }
        if let Some((e, m)) = experts
            .iter()
            .enumerate()
            .find(|(_, m)| m.shape() != (n, kdim))
        {
            return Err(Error::shape(
                OP,
                "experts",
                format!("every expert [{n}, {kdim}] as expert 0"),
                format!("expert {e} {:?}", m.shape()),
            ));
        }
        let mut blob = Blob(Vec::new());
        let mut dicts: Vec<(Arc<Dictionary>, i64)> = Vec::new();
        let mut table = Vec::with_capacity(experts.len());
        for m in experts {
            let none = QuantExpert {
                zeros: -1,
                g_idx: -1,
                row_offsets: -1,
                dict: -1,
                perm: -1,
                ..Default::default()
            };
            let x = match m {
                // The variant's fields are public: its length is checked here, not trusted.
                QuantMatrix::Bf16 { w, .. } if w.len() != n * kdim => {
                    return Err(Error::shape(
                        OP,
                        "experts",
                        format!("a bf16 expert of {} values ([{n}, {kdim}])", n * kdim),
                        format!("{} values", w.len()),
                    ));
                }
                QuantMatrix::Bf16 { w, .. } => QuantExpert {
                    format: format::BF16,
                    codes: blob.push(bytemuck::cast_slice(w)),
                    ..none
                },
                QuantMatrix::Int(m) => {
                    let (codes, g_idx, perm) = match act_order_layout(m) {
                        Some((codes, perm)) => (
                            blob.push(bytemuck::cast_slice(&codes)),
                            -1,
                            blob.push(bytemuck::cast_slice(&perm)),
                        ),
                        None => (
                            blob.push(bytemuck::cast_slice(m.qweight())),
                            m.g_idx().map_or(-1, |g| blob.push(bytemuck::cast_slice(g))),
                            -1,
                        ),
                    };
                    QuantExpert {
                        format: format::INT,
                        bits: m.bits() as i32,
                        group: i32::try_from(m.group()).expect("the group divides Kd < 2^31"),
                        codes,
                        scales: blob.push(bytemuck::cast_slice(m.scales())),
                        zeros: m.zeros().map_or(-1, |z| blob.push(z)),
                        g_idx,
                        perm,
                        ..none
                    }
                }
                QuantMatrix::Mxfp4(m) => QuantExpert {
                    format: format::MXFP4,
                    codes: blob.push(m.blocks()),
                    scales: blob.push(&mxfp4_padded_scales(m.scales(), kdim)),
                    ..none
                },
                QuantMatrix::Fp8(m) => QuantExpert {
                    format: format::FP8,
                    codes: blob.push(m.weight()),
                    scales: blob.push(bytemuck::cast_slice(m.scale_inv())),
                    ..none
                },
                QuantMatrix::Ternary(m) => {
                    let dict = match dicts.iter().find(|(d, _)| Arc::ptr_eq(d, m.dict())) {
                        Some(&(_, at)) => at,
                        None => {
                            let at = blob.push(bytemuck::cast_slice(m.dict().entries()));
                            dicts.push((m.dict().clone(), at));
                            at
                        }
                    };
                    QuantExpert {
                        format: format::TERNARY,
                        dict_len: i32::try_from(m.dict().len()).expect("at most 65536 entries"),
                        codes: blob.push(bytemuck::cast_slice(m.codes())),
                        scales: blob.push(bytemuck::cast_slice(m.lohi())),
                        row_offsets: blob.push(bytemuck::cast_slice(m.row_offsets())),
                        dict,
                        ..none
                    }
                }
            };
            table.push(x);
        }
        let common = |kinds: Vec<Option<&'static str>>| {
            kinds
                .iter()
                .all(|k| *k == kinds[0])
                .then_some(kinds[0])
                .flatten()
        };
        let fast = common(table.iter().map(|x| fast_kind(x, kdim, false)).collect());
        // Decode v5 takes int4 experts whose groups hold whole 128-column blocks ("int4") or
        // whose groups are 32 or 64 columns ("int4s", the scale on the decoded weights), and FP8
        // experts of rows of whole 64-column blocks without NaN codes (its bit-level conversion
        // would turn them into 480). It stages the activation in an act-order expert's stored
        // column order, so it takes those as the plain int4 layout they were made into.
        let fp8_nan = experts.iter().any(|m| match m {
            QuantMatrix::Fp8(m) => m.weight().iter().any(|&c| c & 0x7f == 0x7f),
            _ => false,
        });
        let mma = match common(table.iter().map(|x| fast_kind(x, kdim, true)).collect()) {
            Some("int4") if table.iter().all(|x| x.group % 128 == 0) => Some("int4"),
            Some("int4") if table.iter().all(|x| x.group < 128) => Some("int4s"),
            Some("fp8") if kdim.is_multiple_of(64) && !fp8_nan => Some("fp8"),
            _ => None,
        };
        // MXFP4: v5 puts each 32-column group's power-of-two scale into the decoded weights,
        // exact where the dtype holds them (the scale range).
        let mxfp4_scales = (fast == Some("mxfp4")).then(|| {
            experts
                .iter()
                .fold((u8::MAX, u8::MIN), |(lo, hi), m| match m {
                    QuantMatrix::Mxfp4(m) => m
                        .scales()
                        .iter()
                        .fold((lo, hi), |(lo, hi), &c| (lo.min(c), hi.max(c))),
                    _ => (lo, hi),
                })
        });
        // A zero-length upload is refused by the driver; a layer always has its table.
        blob.0.resize(blob.0.len().max(16), 0);
        let bytes = blob.0.len();
        Ok(QuantLayer {
            blob: dev.upload(&blob.0, &[bytes])?,
            table: dev.upload(
                bytemuck::cast_slice(&table),
                &[table.len() * size_of::<QuantExpert>()],
            )?,
            status: dev.zeros(&[1])?,
            n,
            kdim,
            names: experts.iter().map(QuantMatrix::name).collect(),
            bytes: experts.iter().map(QuantMatrix::bytes).collect(),
            gemv: QuantGemvVersion::default(),
            fast,
            mma,
            mxfp4_scales,
            reordered: table.iter().any(|x| x.perm >= 0),
        })
    }

    /// The one 16-byte-chunk decoder every expert of the layer takes, as the by-expert decode
    /// kernels name their instances ("int4", "int8", "mxfp4", "fp8"); `None` where the experts
    /// mix decoders, or some take the per-8 one (act-order, other groups, ternary) or are bf16.
    pub fn fast_decoder(&self) -> Option<&'static str> {
        self.fast
    }

    /// The decoder of the tensor-core by-expert decode kernels (decode v5) that every expert
    /// takes in a model of `dtype` (bf16 or f16):
    /// - "int4" where all are int4 ([`QuantLayer::fast_decoder`]) with groups of a multiple of
    ///   128 columns (each 128-column block of a row in one group, whose scale the kernel
    ///   applies to the block's sum); act-order experts laid out in group order at upload count
    ///   as int4 here (the kernel stages x in their order), though not for `fast_decoder`;
    /// - "int4s" where all are int4 in groups of 32 or 64 (each weight's code minus zero point
    ///   times its group's scale, rounded once to the dtype; in bf16 the f16 scale is rounded
    ///   to bf16 first);
    /// - "mxfp4" where all are MXFP4 with every e8m0 scale code at most 128 (scales up to 2),
    ///   and in f16 at least 104 (from 2^-23): the kernel decodes e2m1 times the scale into the
    ///   dtype, exact in that range;
    /// - "fp8" where all are FP8 with rows of a multiple of 64 columns and no NaN code (0x7f,
    ///   0xff) in any expert;
    ///
    /// `None` otherwise (v5 then runs as v4).
    pub fn tensor_core_decoder(&self, dtype: DType) -> Option<&'static str> {
        match self.mxfp4_scales {
            Some((lo, hi)) => (hi <= 128 && (dtype != DType::F16 || lo >= 104)).then_some("mxfp4"),
            None => self.mma,
        }
    }

    /// Whether some expert has GPTQ's act-order and was laid out again in group order at upload
    /// ([`QuantLayer::upload`]): decode v5 then gathers the activation in its column order.
    pub fn act_order_reordered(&self) -> bool {
        self.reordered
    }

    /// The kernel [`quant_gemv_into`] runs on this layer (default [`QuantGemvVersion::V2`]).
    pub fn set_gemv_version(&mut self, version: QuantGemvVersion) {
        self.gemv = version;
    }
    pub fn gemv_version(&self) -> QuantGemvVersion {
        self.gemv
    }

    pub fn experts(&self) -> usize {
        self.bytes.len()
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn kdim(&self) -> usize {
        self.kdim
    }
    /// Each expert's format, as [`QuantMatrix::name`].
    pub fn formats(&self) -> &[String] {
        &self.names
    }
    /// The bytes a kernel reads for expert e (codes, scales, zeros, offsets; not a shared
    /// dictionary).
    pub fn expert_bytes(&self, e: usize) -> usize {
        self.bytes[e]
    }

    /// Waits for the stream and reports entries the kernels skipped (codewords outside the
    /// dictionary, ternary runs past a row's end, act-order groups out of range) since the last
    /// check, then resets the count. Validation on the host makes these impossible for a layer
    /// built through this crate; the check stays for the kernels' sake.
    pub fn check(&mut self, dev: &Device) -> Result<()> {
        let skipped = dev.download(&self.status)?[0];
        dev.fill_bytes(&mut self.status, 0)?;
        if skipped != 0 {
            return Err(Error::DeviceCheck {
                op: "QuantLayer::check",
                what: format!("{skipped} compressed-weight entries out of range were skipped"),
            });
        }
        Ok(())
    }

    fn check_device(&self, op: &'static str, dev: &Device) -> Result<()> {
        self.blob.check_device(op, "layer", dev)
    }

    /// The blob's and the table's device addresses, for a kernel that decodes the experts
    /// itself (the decode path); refuses a layer of another device.
    pub(crate) fn device_parts(&self, op: &'static str, dev: &Device) -> Result<(u64, u64)> {
        self.check_device(op, dev)?;
        Ok((self.blob.device_ptr(dev), self.table.device_ptr(dev)))
    }
}

/// An act-order matrix laid out again so that each group's columns are contiguous (see
/// `QuantExpert` in quant_params.cuh): its codes with the columns in stored order, and `perm`
/// (stored column j is column perm[j]) followed by its inverse. `None` for a matrix without
/// act-order, or one whose g_idx gives some group other than `group` columns (it keeps its
/// g_idx: the per-8 decoder looks each column's group up).
fn act_order_layout(m: &super::IntMatrix) -> Option<(Vec<u32>, Vec<u32>)> {
    let g_idx = m.g_idx()?;
    let (n, kd) = (m.n(), m.kdim());
    let mut sizes = vec![0usize; kd / m.group()];
    for &g in g_idx {
        sizes[g as usize] += 1;
    }
    if sizes.iter().any(|&s| s != m.group()) {
        return None;
    }
    let mut perm: Vec<u32> = (0..kd as u32).collect();
    perm.sort_by_key(|&k| g_idx[k as usize]); // stable: a group's columns keep their order
    let mut inv = vec![0u32; kd];
    for (j, &k) in perm.iter().enumerate() {
        inv[k as usize] = j as u32;
    }
    let (bits, per) = (m.bits() as usize, 32 / m.bits() as usize);
    let mut codes = vec![0u32; m.qweight().len()];
    for r in 0..n {
        for (j, &k) in perm.iter().enumerate() {
            let to = r * kd + j;
            codes[to / per] |= m.code(r, k as usize) << (to % per * bits);
        }
    }
    perm.extend_from_slice(&inv);
    Some((codes, perm))
}

/// MXFP4 scales `[N, Kd/32]` as the blob holds them: each row padded with zeros to
/// `mxfp4_scale_row(Kd)` bytes (quant_params.cuh), a multiple of 16, so that decode v5 reads a
/// row's scales of four 128-column blocks with one aligned 16-byte load.
fn mxfp4_padded_scales(scales: &[u8], kdim: usize) -> Vec<u8> {
    let (row, padded) = (kdim / 32, (kdim / 32).next_multiple_of(16));
    scales
        .chunks(row)
        .flat_map(|r| {
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(0, padded - row))
        })
        .collect()
}

/// `fast_kind` of kernels/common/qdot.cuh on the host, for the decoders that have by-expert
/// instances: the one an expert of `kd` columns takes, or `None` for the rest. A kernel given an
/// expert of another kind counts it in its status (an `Err`), so a divergence cannot pass
/// unnoticed. `stored_order` as on the device: an act-order expert laid out in group order
/// counts as its codes' kind for decode v5, which stages x in that order, and as `None` else.
fn fast_kind(x: &QuantExpert, kd: usize, stored_order: bool) -> Option<&'static str> {
    let pow2 = x.group > 0 && (x.group & (x.group - 1)) == 0;
    match x.format {
        format::INT if x.g_idx >= 0 || (x.perm >= 0 && !stored_order) || !pow2 => None,
        format::INT if x.bits == 4 && x.group >= 32 && kd.is_multiple_of(32) => Some("int4"),
        format::INT if x.bits == 8 && x.group >= 16 && kd.is_multiple_of(16) => Some("int8"),
        format::MXFP4 if kd.is_multiple_of(32) => Some("mxfp4"),
        format::FP8 if kd.is_multiple_of(16) => Some("fp8"),
        _ => None,
    }
}

fn grid(op: &'static str, rows: usize, experts: usize) -> Result<(u32, u32, u32)> {
    let x = u32::try_from(rows.div_ceil(WARPS))
        .map_err(|_| Error::shape(op, "layer", "N below 2^31", format!("{rows}")))?;
    let y = u32::try_from(experts)
        .ok()
        .filter(|&e| e <= 65_535)
        .ok_or_else(|| {
            Error::shape(
                op,
                "layer",
                "at most 65535 experts (grid.y)",
                format!("{experts}"),
            )
        })?;
    Ok((x, y, 1))
}

/// `out [E, N, Kd]` = every expert's weight decoded and rounded to `T` (bf16 or f16), bit for bit
/// what [`QuantMatrix::decode_to`] gives (NaN payloads aside).
pub fn dequantize_into<T: Float>(
    dev: &Device,
    out: &mut Tensor<T>,
    layer: &mut QuantLayer,
) -> Result<()> {
    const OP: &str = "dequantize";
    if !matches!(T::DTYPE, DType::BF16 | DType::F16) {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("output in {} (bf16 or f16)", T::DTYPE),
        });
    }
    let (e, n, kd) = (layer.experts(), layer.n, layer.kdim);
    if out.shape() != [e, n, kd] {
        return Err(Error::shape(
            OP,
            "out",
            format!("[E, N, Kd] = [{e}, {n}, {kd}]"),
            format!("{:?}", out.shape()),
        ));
    }
    out.check_device(OP, "out", dev)?;
    layer.check_device(OP, dev)?;
    if n == 0 {
        return Ok(());
    }
    let params = QuantDequantParams {
        out: out.device_ptr_mut(dev),
        blob: layer.blob.device_ptr(dev),
        experts: layer.table.device_ptr(dev),
        status: layer.status.device_ptr_mut(dev),
        num_experts: i32::try_from(e).expect("grid() bounds E"),
        n: i32::try_from(n).expect("checked at upload"),
        kdim: i32::try_from(kd).expect("checked at upload"),
        pad_: 0,
    };
    let cfg = LaunchConfig {
        grid_dim: grid(OP, n, e)?,
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let func = dev.function(OP, Module::Quant, &format!("dequant_{}", T::DTYPE))?;
    // SAFETY: `dequant_{bf16,f16}` takes one QuantDequantParams (mirrored in
    // src/quant/params.rs). out is [E, N, Kd] of T (checked). The blob and its [E] table were
    // built together by QuantLayer::upload from validated containers of [N, Kd] each, so every
    // offset the table holds addresses a part of the size its format needs (codes, scales,
    // zeros, g_idx with groups in range, ternary offsets and codewords inside the dictionary),
    // 16-byte aligned from a 256-byte-aligned base. Block (x, e) handles rows 8x + w < N of
    // expert e < E = grid.y; lanes step through Kd in 8-column chunks (Kd % 8 == 0); the
    // kernel skips and counts any ternary codeword or run that would leave its row.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// The decode path over compressed weights: [`gemm::grouped_gemv_into`]'s product, epilogue and
/// contract (sorted rows `a [S, Kd]`, `out [S, N_out]`), each expert's weight decoded in
/// registers from `layer`, whatever its format, by the layer's [`QuantGemvVersion`].
pub fn quant_gemv_into<T: Float, TO: Float>(
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    layer: &mut QuantLayer,
    plan: &Plan,
    opts: GemmOptions<'_, T>,
) -> Result<()> {
    const OP: &str = "quant_gemv";
    layer.check_device(OP, dev)?;
    let w_shape = [layer.experts(), layer.n, layer.kdim];
    let Some((g, n_out)) =
        gemm::prepare_params(OP, dev, out, a, &w_shape, plan, Layout::Sorted, opts)?
    else {
        return Ok(());
    };
    let params = QuantGemvParams {
        g,
        blob: layer.blob.device_ptr(dev),
        experts: layer.table.device_ptr(dev),
        status: layer.status.device_ptr_mut(dev),
    };
    let cfg = LaunchConfig {
        grid_dim: grid(OP, n_out, plan.experts())?,
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let v = match layer.gemv {
        QuantGemvVersion::V1 => "",
        QuantGemvVersion::V2 => "v2_",
    };
    let name = format!("quant_gemv_{v}{}_{}", T::DTYPE, TO::DTYPE);
    let func = dev.function(OP, Module::Quant, &name)?;
    // SAFETY: `quant_gemv_{v2_}{in}_{out}` takes one QuantGemvParams (mirrored in
    // src/quant/params.rs) for the dtype pairs prepare_params lets through. Its GroupedGemmParams
    // part was checked as for grouped_gemv_into: a [S, Kd], out [S, N_out], bias [E, N], the
    // plan's [E+1] offsets and [S] sorted slots, with E = layer.experts() = plan.experts(); the
    // weight pointer is unused. Block (x, e) reads expert e's table entry (e < E = grid.y) and
    // decodes weight rows below N (weight_row of a column below N_out) through offsets that
    // QuantLayer::upload built from validated containers (see dequantize_into); ternary
    // codewords and runs that would leave their row are skipped and counted. v2 reads rows of a
    // only below the expert's count (16-byte loads, as v1's: Kd % 8 == 0) and
    // its 36 KB of shared memory is static.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// The prefill path, v1: decodes every expert into `scratch [E, N, Kd]` (in the activations'
/// dtype) with [`dequantize_into`], then runs the bf16/f16 [`gemm::grouped_gemm_into`] on it,
/// with the same contract (padded rows, `block_m` a multiple of 64). Two launches and a
/// round trip of the plain weights through memory; a fused tile decoder is the next version.
pub fn quant_gemm_into<T: Float, TO: Float>(
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    layer: &mut QuantLayer,
    plan: &Plan,
    opts: GemmOptions<'_, T>,
    scratch: &mut Tensor<T>,
) -> Result<()> {
    dequantize_into(dev, scratch, layer)?;
    gemm::grouped_gemm_into(dev, out, a, scratch, plan, opts)
}
