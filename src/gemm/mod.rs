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
//!   tensor-core kernel, mma.sync m16n8k16 on sm_80 and later, no pipelining;
//! - decode, [`grouped_gemv_into`] over the sorted layout: v1 (`grouped_gemv_*`) streams each
//!   weight row once per 8 rows of its expert, gate and up in one pass.
//!
//! Faster versions (cp.async stages, Hopper wgmma + TMA, split-K decode) will sit beside these
//! and be selectable, v1 staying the reference they are checked against.

pub mod reference;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::activation::{Act, GateLayout, GatedAct};
use crate::device::{Device, Tensor};
use crate::dtype::{DType, Float};
use crate::error::{DriverResultExt, Error, Result};
use crate::kernels::Module;
use crate::params::GroupedGemmParams;
use crate::permute::{Layout, Plan};

/// Output rows and columns per block of v1, as `kGemmBM` / `kGemmBN` in grouped_gemm.cu.
pub const BLOCK_M: usize = 64;
const BLOCK_N: usize = 64;
const THREADS: u32 = 128;

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
/// `block_m` a multiple of 64. The prefill path.
pub fn grouped_gemm_into<T: Float, TO: Float>(
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    w: &Tensor<T>,
    plan: &Plan,
    opts: GemmOptions<'_, T>,
) -> Result<()> {
    const OP: &str = "grouped_gemm";
    if !plan.block_m().is_multiple_of(BLOCK_M) {
        return Err(Error::shape(
            OP,
            "plan",
            format!("block_m a multiple of {BLOCK_M}"),
            format!("block_m = {}", plan.block_m()),
        ));
    }
    let Some((params, n_out)) = prepare(OP, dev, out, a, w, plan, Layout::Padded, opts)? else {
        return Ok(());
    };
    let rows = plan.rows(Layout::Padded);
    let m_blocks = u32::try_from(rows / BLOCK_M)
        .ok()
        .filter(|&b| b <= 65_535)
        .ok_or_else(|| {
            Error::shape(
                OP,
                "a",
                format!("at most {} padded rows (grid.y)", 65_535 * BLOCK_M),
                format!("{rows}"),
            )
        })?;
    let name = format!("grouped_gemm_{}_{}", T::DTYPE, TO::DTYPE);
    let func = dev.function(OP, Module::GroupedGemm, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x(OP, n_out, BLOCK_N)?, m_blocks, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `grouped_gemm_{in}_{out}` takes one GroupedGemmParams (mirrored in src/params.rs),
    // instantiated for exactly the dtype pairs prepare() lets through. a is [P, Kd], w
    // [E, N, Kd], out [P, N_out], bias [E, N] (all checked); P is a multiple of block_m, itself a
    // multiple of 64, so block (x, y) reads rows 64y .. 64y + 64 < P and block_experts[64y /
    // block_m] inside the plan's [P / block_m]; it skips ids outside [0, E). Weight rows it reads
    // are below N (columns past N_out are zero-filled, not read); Kd % 8 == 0 with
    // whole-allocation (256-byte-aligned) bases keeps every 16-byte load aligned and in its row.
    // row_slots is the plan's [P] map and the slot weights hold T*K entries, indexed by slots in
    // [0, T*K). grid.y <= 65535 was checked.
    unsafe { dev.stream().launch_builder(&func).arg(&params).launch(cfg) }.op(OP)?;
    Ok(())
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
    let Some((params, n_out)) = prepare(OP, dev, out, a, w, plan, Layout::Sorted, opts)? else {
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
    unsafe { dev.stream().launch_builder(&func).arg(&params).launch(cfg) }.op(OP)?;
    Ok(())
}

/// Output columns per block of the GEMV (one per warp), as `kGemvWarps` in grouped_gemm.cu.
const GEMV_WARPS: usize = 8;

fn grid_x(op: &'static str, n_out: usize, per_block: usize) -> Result<u32> {
    u32::try_from(n_out.div_ceil(per_block))
        .map_err(|_| Error::shape(op, "w", "N below 2^31", format!("N_out = {n_out}")))
}

/// Checks every operand of a grouped GEMM or GEMV over `layout` and builds the kernel's
/// parameters, with N_out; `None` when there is nothing to compute.
#[allow(clippy::too_many_arguments)] // the entry points' arguments, plus the op and layout
fn prepare<T: Float, TO: Float>(
    op: &'static str,
    dev: &Device,
    out: &mut Tensor<TO>,
    a: &Tensor<T>,
    w: &Tensor<T>,
    plan: &Plan,
    layout: Layout,
    opts: GemmOptions<'_, T>,
) -> Result<Option<(GroupedGemmParams, usize)>> {
    w.check_device(op, "w", dev)?;
    let prepared = prepare_params(op, dev, out, a, w.shape(), plan, layout, opts)?;
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
    if a.shape() != [rows, kd] {
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
    a.check_device(op, "a", dev)?;
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
