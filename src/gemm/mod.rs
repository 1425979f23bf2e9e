//! Grouped expert GEMM: every expert multiplies its own rows by its weight, `C_e = A_e · W_eᵀ`,
//! with the epilogue fused (bias, gated or plain activation, routing-weight row scaling).
//!
//! Which rows belong to which expert is read from the plan on the device, never by the host, so
//! the calls can be captured in a CUDA graph: the GEMM takes the padded layout
//! ([`crate::permute::Layout::Padded`]), where every block of `block_m` rows belongs to one
//! expert; the GEMV takes the sorted layout and each expert's row range. Blocks past the
//! device's row count, and experts without rows, cost nothing.
//!
//! Two regimes, two kernels:
//! - prefill, [`grouped_gemm_into`] over the padded layout: v1 (`grouped_gemm_*`) is the plain
//!   tensor-core kernel, mma.sync m16n8k16 on sm_80 and later, no pipelining. v2
//!   (`grouped_gemm_v2_*`, through [`grouped_gemm_version_into`]) adds a four-stage cp.async
//!   pipeline, 128 x 128 tiles and swizzled shared tiles, and can read the layer input `x`
//!   directly through the plan ([`GemmRows::Indexed`]), so the gather and its `[P, Kd]` buffer
//!   go away. v3 (`grouped_gemm_v3_*`, kernels/grouped_gemm_sm90a.cu, Hopper only) copies
//!   rows and weights with the tensor copy engine and multiplies with wgmma in a warp-
//!   specialised, persistent kernel. v1 stays the default until the others have been checked on
//!   hardware;
//! - decode, [`grouped_gemv_into`] over the sorted layout: v1 (`grouped_gemv_*`) streams each
//!   weight row once per 8 rows of its expert, gate and up in one pass.
//!
//! Faster versions (split-K decode, a v3 with overlapped wgmma and multicast) will sit beside
//! these and be selectable, v1 staying the reference they are checked against.

pub mod reference;

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUfunction_attribute;

use crate::activation::{Act, GateLayout, GatedAct};
use crate::device::{Device, Tensor};
use crate::dtype::{DType, Float};
use crate::error::{DriverResultExt, Error, Result};
use crate::kernels::Module;
use crate::params::{GroupedGemmParams, GroupedGemmV2Params, GroupedGemmV3Params};
use crate::permute::{Layout, Plan};

/// Output rows and columns per block of v1, as `kGemmBM` / `kGemmBN` in grouped_gemm.cu.
pub const BLOCK_M: usize = 64;
const BLOCK_N: usize = 64;
const THREADS: u32 = 128;

/// v2's rows per block and weight rows per block (`kV2BM`, `kV2BN`): 128 output columns plain,
/// 64 gated (their gate and up rows make the 128).
const V2_BLOCK_M: usize = 128;
const V2_BLOCK_N: usize = 128;
const V2_THREADS: u32 = 256;
/// Four stages of a 128 x 32 A tile and a 128 x 32 weight tile, 2-byte elements
/// (`kV2SmemBytes`): above the 48 KB a kernel gets without opting in.
const V2_SMEM_BYTES: u32 = 65_536;

/// v3's tile (`kV3BM`, `kV3BN`), threads (a producer and two consumer warpgroups) and dynamic
/// shared memory: four 32 KB stages and 1 KB to align them (`kV3SmemBytes`).
const V3_BLOCK_M: usize = 128;
const V3_BLOCK_N: usize = 128;
const V3_THREADS: u32 = 384;
const V3_SMEM_BYTES: u32 = 132_096;

/// Which prefill kernel [`grouped_gemm_version_into`] runs.
///
/// The layer's default is v2 on every card, for the routed and the shared experts: exact on the
/// CPU emulator (whose sm_80-level instructions a second, independent emulator has also run),
/// and faster than v1 in its counters and the model on every layer measured from T = 256, and
/// on Qwen3 at T = 32; gpt-oss at T = 32 models 0.6% slower, its down GEMM v2's weak stage
/// (BENCHMARKS.md, "Prefill plumbing"). v3 rests on readings of wgmma, TMA and mbarriers that
/// the kernel and the emulator share, so it becomes a default only once it has run on
/// hardware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmVersion {
    /// `grouped_gemm_*`: 64 x 64 tiles, no pipelining. The reference the others are checked
    /// against; [`grouped_gemm_into`] and the packed experts' prefill run it.
    V1,
    /// `grouped_gemm_v2_*`: 128 x 128 tiles, a four-stage cp.async pipeline; reads gathered
    /// rows or the layer input itself ([`GemmRows::Indexed`]). The layer's default.
    #[default]
    V2,
    /// `grouped_gemm_v3_*` (Hopper, sm_90a): the bulk tensor copy engine and wgmma, a producer
    /// warpgroup and two consumers, persistent; gathered rows only. Emulated, not yet run on
    /// hardware.
    V3,
}

impl GemmVersion {
    /// Rows per block: the plan's `block_m` must be a multiple of this.
    pub const fn block_m(self) -> usize {
        match self {
            GemmVersion::V1 => BLOCK_M,
            GemmVersion::V2 => V2_BLOCK_M,
            GemmVersion::V3 => V3_BLOCK_M,
        }
    }

    /// Whether `dev` runs this version: v3 needs a Hopper GPU (compute capability 9.0, whose
    /// sm_90a code it is built as); the CPU emulator models its instructions.
    pub fn check_device(self, op: &'static str, dev: &Device) -> Result<()> {
        let (major, minor) = dev.info().compute_capability;
        if self == GemmVersion::V3 && (major, minor) != (9, 0) {
            return Err(Error::Unsupported {
                op,
                what: format!(
                    "GemmVersion::V3 needs a Hopper GPU (sm_90a: wgmma and the tensor copy \
                     engine); device {} is sm_{major}{minor}, where V1 and V2 run",
                    dev.info().ordinal
                ),
            });
        }
        Ok(())
    }
}

/// The rows a prefill GEMM multiplies.
#[derive(Clone, Copy, Debug)]
pub enum GemmRows<'a, T> {
    /// `a [P, Kd]`: the plan's padded rows, gathered beforehand
    /// ([`crate::permute::gather_into`] with [`Layout::Padded`]; padding rows zero).
    Gathered(&'a Tensor<T>),
    /// `x [T, Kd]`: the layer input itself. Padded row r reads `x[padded_slots[r] / K]`, and
    /// padding rows read zeros; no gather and no `[P, Kd]` buffer. v2 only.
    Indexed(&'a Tensor<T>),
}

/// What happens to each output element after the product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// The product (plus bias), as is.
    None,
    /// A non-gated activation (Switch-style experts).
    Act(Act),
    /// `act(gate) * up` over the gate/up pair of `layout`; the output has N / 2 columns.
    Gated { act: GatedAct, layout: GateLayout },
}

/// Where the routing weight of a row is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleAt {
    /// To the expert's input (Llama 4): the product is scaled before bias and activation.
    Input,
    /// To the output, folding the combine's multiply into this GEMM.
    Output,
}

/// Everything besides the operands.
#[derive(Clone, Copy, Debug)]
pub struct GemmOptions<'a, T> {
    /// `[E, N]` per-expert bias (gpt-oss), in the input dtype.
    pub bias: Option<&'a Tensor<T>>,
    pub epilogue: Epilogue,
    /// `[T, K]` routing weights, applied per row at the given place.
    pub row_weights: Option<(&'a Tensor<f32>, ScaleAt)>,
}

impl<T> Default for GemmOptions<'_, T> {
    fn default() -> Self {
        GemmOptions {
            bias: None,
            epilogue: Epilogue::None,
            row_weights: None,
        }
    }
}

/// `out [P, N_out] = epilogue(a [P, Kd] · w[e]ᵀ)` for every padded block of the plan, `w` being
/// `[E, N, Kd]`; N_out is N, or N / 2 for a gated epilogue. Inputs bf16 or f16, accumulation in
/// f32, output in the input dtype or f32. Needs Kd a multiple of 8 (16-byte rows) and the plan's
/// `block_m` a multiple of 64. The prefill path, v1; [`grouped_gemm_version_into`] chooses.
pub fn grouped_gemm_into<T: Float, TO: Float>(
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    w: &Tensor<T>,
    plan: &Plan,
    opts: GemmOptions<'_, T>,
) -> Result<()> {
    grouped_gemm_version_into(
        dev,
        out,
        GemmRows::Gathered(a),
        w,
        plan,
        opts,
        GemmVersion::V1,
    )
}

/// [`grouped_gemm_into`] with the kernel chosen: the same product, epilogue, dtypes and Kd rule,
/// over gathered rows or (v2) the layer input read through the plan. The plan's `block_m` must be
/// a multiple of [`GemmVersion::block_m`] (64 for v1, 128 for v2 and v3).
pub fn grouped_gemm_version_into<T: Float, TO: Float>(
    dev: &Device,
    out: &mut Tensor<TO>,
    rows: GemmRows<'_, T>,
    w: &Tensor<T>,
    plan: &Plan,
    opts: GemmOptions<'_, T>,
    version: GemmVersion,
) -> Result<()> {
    const OP: &str = "grouped_gemm";
    version.check_device(OP, dev)?;
    let bm = version.block_m();
    if !plan.block_m().is_multiple_of(bm) {
        return Err(Error::shape(
            OP,
            "plan",
            format!("block_m a multiple of {bm} ({version:?})"),
            format!("block_m = {}", plan.block_m()),
        ));
    }
    let (a, indexed) = match rows {
        GemmRows::Gathered(a) => (a, false),
        GemmRows::Indexed(_) if version != GemmVersion::V2 => {
            return Err(Error::Unsupported {
                op: OP,
                what: format!(
                    "reading x through the plan (GemmRows::Indexed) with {version:?}; V2 does"
                ),
            });
        }
        GemmRows::Indexed(x) => (x, true),
    };
    let Some((params, n_out)) = prepare(OP, dev, out, a, indexed, w, plan, Layout::Padded, opts)?
    else {
        return Ok(());
    };
    let p = plan.rows(Layout::Padded);
    // v1 and v2 put row blocks on grid.y; v3's grid is 1-D (persistent).
    let m_blocks = u32::try_from(p / bm)
        .ok()
        .filter(|&b| b <= 65_535 || version == GemmVersion::V3)
        .ok_or_else(|| {
            Error::shape(
                OP,
                "plan",
                format!("at most {} padded rows (grid.y)", 65_535 * bm),
                format!("{p}"),
            )
        })?;
    match version {
        GemmVersion::V1 => {
            let name = format!("grouped_gemm_{}_{}", T::DTYPE, TO::DTYPE);
            let func = dev.function(OP, Module::GroupedGemm, &name)?;
            let cfg = LaunchConfig {
                grid_dim: (grid_x(OP, n_out, BLOCK_N)?, m_blocks, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `grouped_gemm_{in}_{out}` takes one GroupedGemmParams (mirrored in
            // src/params.rs), instantiated for exactly the dtype pairs prepare() lets through. a
            // is [P, Kd], w [E, N, Kd], out [P, N_out], bias [E, N] (all checked); P is a
            // multiple of block_m, itself a multiple of 64, so block (x, y) reads rows 64y ..
            // 64y + 64 < P and block_experts[64y / block_m] inside the plan's [P / block_m]; it
            // skips ids outside [0, E). Weight rows it reads are below N (columns past N_out are
            // zero-filled, not read); Kd % 8 == 0 with whole-allocation (256-byte-aligned) bases
            // keeps every 16-byte load aligned and in its row. row_slots is the plan's [P] map
            // and the slot weights hold T*K entries, indexed by slots in [0, T*K). grid.y <=
            // 65535 was checked.
            unsafe { dev.launch(OP, &func, cfg, &params) }?;
        }
        GemmVersion::V2 => {
            let too_big = |v: usize| Error::shape(OP, "x", "a size below 2^31", format!("{v}"));
            let (a_ptr, x, tokens, top_k) = if indexed {
                let (t, k) = (plan.tokens(), plan.k());
                let t = i32::try_from(t).map_err(|_| too_big(t))?;
                let k = i32::try_from(k).map_err(|_| too_big(k))?;
                (0, params.a, t, k)
            } else {
                (params.a, 0, 0, 0)
            };
            let params = GroupedGemmV2Params {
                g: GroupedGemmParams { a: a_ptr, ..params },
                x,
                tokens,
                top_k,
            };
            let name = format!("grouped_gemm_v2_{}_{}", T::DTYPE, TO::DTYPE);
            let func = dev.function(OP, Module::GroupedGemm, &name)?;
            // The opt-in above 48 KB is a property of the function, not a stream operation (so
            // it is allowed inside a capture); cuFuncSetAttribute acts in the current context,
            // which need not be this device's on this thread yet.
            dev.context().bind_to_thread().op(OP)?;
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                V2_SMEM_BYTES.cast_signed(),
            )
            .op(OP)?;
            let per_block = if params.g.gated != 0 {
                V2_BLOCK_N / 2
            } else {
                V2_BLOCK_N
            };
            let cfg = LaunchConfig {
                grid_dim: (grid_x(OP, n_out, per_block)?, m_blocks, 1),
                block_dim: (V2_THREADS, 1, 1),
                shared_mem_bytes: V2_SMEM_BYTES,
            };
            // SAFETY: `grouped_gemm_v2_{in}_{out}` takes one GroupedGemmV2Params (mirrored in
            // src/params.rs) for the dtype pairs prepare() lets through, and the 64 KB of dynamic
            // shared memory it was just allowed. Operands as for v1: w [E, N, Kd], out
            // [P, N_out], bias [E, N] checked; P is a multiple of block_m, itself a multiple of
            // 128, so block (x, y) reads rows 128y .. 128y + 128 < P of a (or of the plan's [P]
            // padded_slots) and block_experts[128y / block_m] inside [P / block_m]; it skips ids
            // outside [0, E). Gathered, a is [P, Kd]; indexed, x is [T, Kd] with T = plan.tokens()
            // (checked) and the kernel reads row slot / K only for slots in [0, T*K), zero-filling
            // the rest. Weight rows read are below N; columns past N_out, chunks past Kd and
            // skipped rows are copied with src-size 0 from a valid base, so read nothing.
            // Kd % 8 == 0 with whole-allocation bases keeps every 16-byte copy aligned and inside
            // its row. grid.y <= 65535 was checked.
            unsafe { dev.launch(OP, &func, cfg, &params) }?;
        }
        GemmVersion::V3 => {
            let [e, n, kd] = [w.shape()[0], w.shape()[1], w.shape()[2]];
            // The weight map's row coordinates are signed 32-bit.
            if e * n > i32::MAX as usize || p > i32::MAX as usize {
                return Err(Error::shape(
                    OP,
                    "w",
                    "E * N and P below 2^31 rows for V3's tensor maps (V1 and V2 take more)",
                    format!("E * N = {}, P = {p}", e * n),
                ));
            }
            let a_map = tensor_map::<T>(OP, "a", params.a, kd, p, 128)?;
            let b_map = tensor_map::<T>(OP, "w", params.w, kd, e * n, 64)?;
            let per_tile = if params.gated != 0 {
                V3_BLOCK_N / 2
            } else {
                V3_BLOCK_N
            };
            let items = (p / V3_BLOCK_M) * n_out.div_ceil(per_tile);
            if items == 0 {
                return Ok(());
            }
            let name = format!("grouped_gemm_v3_{}_{}", T::DTYPE, TO::DTYPE);
            let func = dev.function(OP, Module::GroupedGemmSm90a, &name)?;
            dev.context().bind_to_thread().op(OP)?;
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                V3_SMEM_BYTES.cast_signed(),
            )
            .op(OP)?;
            let sms = usize::try_from(dev.info().sm_count.max(1)).unwrap_or(1);
            let cfg = LaunchConfig {
                grid_dim: (items.min(sms) as u32, 1, 1),
                block_dim: (V3_THREADS, 1, 1),
                shared_mem_bytes: V3_SMEM_BYTES,
            };
            let params = GroupedGemmV3Params {
                a_map,
                b_map,
                g: params,
            };
            // SAFETY: `grouped_gemm_v3_{in}_{out}` takes one GroupedGemmV3Params (mirrored in
            // src/params.rs) for the dtype pairs prepare() lets through, and the dynamic shared
            // memory it was just allowed. The tensor maps cover a [P, Kd] and w [E*N, Kd]
            // exactly (the copy engine fills zeros past them, and never reads outside); the
            // kernel walks items below (P / 128) * column tiles, reads block_experts[m0 /
            // block_m] inside the plan's [P / block_m] and skips ids outside [0, E). It writes
            // out [P, N_out] at rows below P and columns below N_out; bias [E, N] and the slot
            // weights are indexed as in v1 (checked by prepare()).
            unsafe { dev.launch(OP, &func, cfg, &params) }?;
        }
    }
    Ok(())
}

/// A 2-D tiled tensor map over `rows` rows of `kd` 16-bit elements at `ptr` (row stride kd),
/// boxes of 64 elements (128 bytes, the 128-byte swizzle's span) by `box_rows`: what v3 copies
/// through.
fn tensor_map<T: Float>(
    op: &'static str,
    arg: &'static str,
    ptr: u64,
    kd: usize,
    rows: usize,
    box_rows: u32,
) -> Result<[u64; 16]> {
    use cudarc::driver::sys;
    if !ptr.is_multiple_of(16) {
        return Err(Error::shape(
            op,
            arg,
            "a 16-byte aligned base for V3's tensor maps (V1 and V2 take any)",
            format!("0x{ptr:x}"),
        ));
    }
    let dtype = match T::DTYPE {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let dims = [kd as u64, rows.max(1) as u64];
    let strides = [(kd * 2) as u64];
    let boxes = [64u32, box_rows];
    let elem = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array holds the rank's (strides rank - 1) entries; map is a CUtensorMap.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|source| Error::Driver { op, source })?;
    // SAFETY: initialised by the driver (zeroed before).
    Ok(unsafe { map.assume_init() }.opaque)
}

/// The decode path: the same product and epilogue over the plan's sorted rows
/// (`a [S, Kd]` from a [`Layout::Sorted`] gather, `out [S, N_out]`), streaming each weight row
/// once per 8 rows of its expert. Same dtypes and Kd rule as [`grouped_gemm_into`].
pub fn grouped_gemv_into<T: Float, TO: Float>(
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    w: &Tensor<T>,
    plan: &Plan,
    opts: GemmOptions<'_, T>,
) -> Result<()> {
    const OP: &str = "grouped_gemv";
    let Some((params, n_out)) = prepare(OP, dev, out, a, false, w, plan, Layout::Sorted, opts)?
    else {
        return Ok(());
    };
    let name = format!("grouped_gemv_{}_{}", T::DTYPE, TO::DTYPE);
    let func = dev.function(OP, Module::GroupedGemm, &name)?;
    let experts = u32::try_from(plan.experts())
        .ok()
        .filter(|&e| e <= 65_535)
        .ok_or_else(|| {
            Error::shape(
                OP,
                "w",
                "at most 65535 experts (grid.y)",
                format!("{}", plan.experts()),
            )
        })?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x(OP, n_out, GEMV_WARPS)?, experts, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `grouped_gemv_{in}_{out}` takes one GroupedGemmParams (mirrored in src/params.rs)
    // for the dtype pairs prepare() lets through. a is [S, Kd], out [S, N_out], w [E, N, Kd],
    // bias [E, N] (checked). Block (x, e) reads offsets[e], offsets[e+1] of the plan's [E+1]
    // offsets, whose rows lie in [0, S); warp w handles column 8x + w < N_out, reading weight
    // rows below N and 16-byte chunks of rows that Kd % 8 == 0 keeps aligned and inside.
    // row_slots is the plan's sorted map ([S]); slot weights hold T*K entries.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// Output columns per block of the GEMV (one per warp), as `kGemvWarps` in grouped_gemm.cu.
const GEMV_WARPS: usize = 8;

fn grid_x(op: &'static str, n_out: usize, per_block: usize) -> Result<u32> {
    u32::try_from(n_out.div_ceil(per_block))
        .map_err(|_| Error::shape(op, "w", "N below 2^31", format!("N_out = {n_out}")))
}

/// Checks every operand of a grouped GEMM or GEMV over `layout` and builds the kernel's
/// parameters, with N_out; `None` when there is nothing to compute. `indexed`: `a` is the layer
/// input `x [T, Kd]`, read through the plan's row map, rather than the rows of `layout`.
#[allow(clippy::too_many_arguments)] // the entry points' arguments, plus the op and layout
fn prepare<T: Float, TO: Float>(
    op: &'static str,
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    indexed: bool,
    w: &Tensor<T>,
    plan: &Plan,
    layout: Layout,
    opts: GemmOptions<'_, T>,
) -> Result<Option<(GroupedGemmParams, usize)>> {
    w.check_device(op, "w", dev)?;
    let prepared = check_and_build(op, dev, out, a, indexed, w.shape(), plan, layout, opts)?;
    Ok(prepared.map(|(params, n_out)| {
        let w = w.device_ptr(dev);
        (GroupedGemmParams { w, ..params }, n_out)
    }))
}

/// [`prepare`] for a weight of shape `w_shape` `[E, N, Kd]` held elsewhere (compressed weights
/// read through their own pointers): every check but the weight's device, and `w` left null.
#[allow(clippy::too_many_arguments)] // prepare's arguments
pub(crate) fn prepare_params<T: Float, TO: Float>(
    op: &'static str,
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    w_shape: &[usize],
    plan: &Plan,
    layout: Layout,
    opts: GemmOptions<'_, T>,
) -> Result<Option<(GroupedGemmParams, usize)>> {
    check_and_build(op, dev, out, a, false, w_shape, plan, layout, opts)
}

/// The checks and parameters behind [`prepare`] and [`prepare_params`].
#[allow(clippy::too_many_arguments)] // prepare's arguments
fn check_and_build<T: Float, TO: Float>(
    op: &'static str,
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    indexed: bool,
    w_shape: &[usize],
    plan: &Plan,
    layout: Layout,
    opts: GemmOptions<'_, T>,
) -> Result<Option<(GroupedGemmParams, usize)>> {
    if !matches!(T::DTYPE, DType::BF16 | DType::F16)
        || !(TO::DTYPE == T::DTYPE || TO::DTYPE == DType::F32)
    {
        return Err(Error::Unsupported {
            op,
            what: format!(
                "inputs in {} with output in {} (inputs bf16 or f16; output the same or f32)",
                T::DTYPE,
                TO::DTYPE
            ),
        });
    }
    let rows = plan.rows(layout);
    if w_shape.len() != 3 || w_shape[0] != plan.experts() {
        return Err(Error::shape(
            op,
            "w",
            format!("[E, N, Kd] with E = {}", plan.experts()),
            format!("{w_shape:?}"),
        ));
    }
    let (n, kd) = (w_shape[1], w_shape[2]);
    if indexed && a.shape() != [plan.tokens(), kd] {
        return Err(Error::shape(
            op,
            "x",
            format!("[{}, {kd}] (the plan's tokens, Kd)", plan.tokens()),
            format!("{:?}", a.shape()),
        ));
    }
    if !indexed && a.shape() != [rows, kd] {
        return Err(Error::shape(
            op,
            "a",
            format!("[{rows}, {kd}] (the plan's {layout:?} rows, Kd)"),
            format!("{:?}", a.shape()),
        ));
    }
    if !kd.is_multiple_of(8) || kd == 0 {
        return Err(Error::shape(
            op,
            "w",
            "Kd a positive multiple of 8 (16-byte rows)",
            format!("Kd = {kd}"),
        ));
    }
    let gated = matches!(opts.epilogue, Epilogue::Gated { .. });
    if gated && !n.is_multiple_of(2) {
        return Err(Error::shape(
            op,
            "w",
            "an even N (gate and up) for a gated epilogue",
            format!("N = {n}"),
        ));
    }
    let n_out = if gated { n / 2 } else { n };
    if out.shape() != [rows, n_out] {
        return Err(Error::shape(
            op,
            "out",
            format!("[{rows}, {n_out}]"),
            format!("{:?}", out.shape()),
        ));
    }
    if let Some(b) = opts.bias
        && b.shape() != [plan.experts(), n]
    {
        return Err(Error::shape(
            op,
            "bias",
            format!("[E, N] = [{}, {n}]", plan.experts()),
            format!("{:?}", b.shape()),
        ));
    }
    if let Some((rw, _)) = opts.row_weights
        && rw.shape() != [plan.tokens(), plan.k()]
    {
        return Err(Error::shape(
            op,
            "row_weights",
            format!("[T, K] = [{}, {}]", plan.tokens(), plan.k()),
            format!("{:?}", rw.shape()),
        ));
    }
    if let Epilogue::Gated { act, .. } = opts.epilogue {
        act.check(op)?;
    }
    out.check_device(op, "out", dev)?;
    a.check_device(op, if indexed { "x" } else { "a" }, dev)?;
    if let Some(b) = opts.bias {
        b.check_device(op, "bias", dev)?;
    }
    if let Some((rw, _)) = opts.row_weights {
        rw.check_device(op, "row_weights", dev)?;
    }
    if rows == 0 || n_out == 0 {
        return Ok(None);
    }
    let too_big = |arg, v: usize| Error::shape(op, arg, "a size below 2^31", format!("{v}"));
    // (layout, act, alpha, limit) as params.cuh codes them; act -1 is none.
    let (gate_layout, act, alpha, limit) = match opts.epilogue {
        Epilogue::None => (0, -1, 0.0, 0.0),
        Epilogue::Act(a) => (0, a.code(), 0.0, 0.0),
        Epilogue::Gated { act, layout } => {
            let (code, alpha, limit) = act.code();
            (layout.code(), code, alpha, limit)
        }
    };
    let row_slots = match layout {
        Layout::Padded => &plan.padded_slots,
        _ => &plan.sorted_slots,
    };
    let params = GroupedGemmParams {
        out: out.device_ptr_mut(dev),
        a: a.device_ptr(dev),
        w: 0,
        bias: opts.bias.map_or(0, |b| b.device_ptr(dev)),
        block_experts: plan.block_experts.device_ptr(dev),
        offsets: plan.offsets.device_ptr(dev),
        row_slots: row_slots.device_ptr(dev),
        slot_weights: opts.row_weights.map_or(0, |(rw, _)| rw.device_ptr(dev)),
        rows: i32::try_from(rows).map_err(|_| too_big("a", rows))?,
        n: i32::try_from(n).map_err(|_| too_big("w", n))?,
        kdim: i32::try_from(kd).map_err(|_| too_big("w", kd))?,
        experts: i32::try_from(plan.experts()).map_err(|_| too_big("w", plan.experts()))?,
        plan_block_m: i32::try_from(plan.block_m()).map_err(|_| too_big("plan", plan.block_m()))?,
        gated: i32::from(gated),
        layout: gate_layout,
        act,
        alpha,
        limit,
        scale_input: i32::from(matches!(opts.row_weights, Some((_, ScaleAt::Input)))),
        pad_: 0,
    };
    Ok(Some((params, n_out)))
}
