//! Gather into plan order and combine back into token order.

use cudarc::driver::LaunchConfig;

use super::{Layout, Plan};
use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::{CombineParams, GatherParams};

const GATHER_THREADS: u32 = 128;
/// Threads per block of combine, as `kCombineThreads` in permute.cu.
const COMBINE_THREADS: u32 = 256;

fn as_i32(op: &'static str, arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(op, arg, "a size below 2^31", format!("{v}")))
}

/// `out[r] = x[slot(r) / K]` for the rows of `layout` (`out` is `[plan.rows(layout), H]`).
/// Rows past the device's row count are not touched; padding rows inside the padded layout are
/// zeroed, so the GEMM reads finite values there. In the masked layout, rows past an expert's
/// count are not touched (a masked GEMM reads `masked_counts`).
pub fn gather_into<T: Float>(
    dev: &Device,
    out: &mut Tensor<T>,
    x: &Tensor<T>,
    plan: &mut Plan,
    layout: Layout,
) -> Result<()> {
    const OP: &str = "gather";
    if x.rank() != 2 || x.shape()[0] != plan.tokens() {
        return Err(Error::shape(
            OP,
            "x",
            format!("[T, H] with T = {} (the plan's)", plan.tokens()),
            format!("{:?}", x.shape()),
        ));
    }
    let hidden = x.shape()[1];
    let rows = plan.rows(layout);
    if out.shape() != [rows, hidden] {
        return Err(Error::shape(
            OP,
            "out",
            format!("[{rows}, {hidden}] ({layout:?} rows, H)"),
            format!("{:?}", out.shape()),
        ));
    }
    x.check_device(OP, "x", dev)?;
    out.check_device(OP, "out", dev)?;
    if rows == 0 || hidden == 0 {
        return Ok(());
    }
    let (row_slots, _) = plan.maps(OP, layout)?;
    // offsets[E]: the rows in use, read on the device; the masked layout uses all E*M rows.
    let total_rows = match layout {
        Layout::Sorted => plan.offsets.device_ptr(dev) + (plan.experts() * 4) as u64,
        Layout::Padded => plan.padded_offsets.device_ptr(dev) + (plan.experts() * 4) as u64,
        Layout::Masked => 0,
    };
    let elem = std::mem::size_of::<T>();
    let (out_ptr, x_ptr) = (out.device_ptr_mut(dev), x.device_ptr(dev));
    let vec = (hidden * elem).is_multiple_of(16)
        && out_ptr.is_multiple_of(16)
        && x_ptr.is_multiple_of(16);
    let params = GatherParams {
        out: out_ptr,
        x: x_ptr,
        row_slots: row_slots.device_ptr(dev),
        total_rows,
        status: plan.status.device_ptr_mut(dev),
        rows: as_i32(OP, "out", rows)?,
        hidden: as_i32(OP, "x", hidden)?,
        k: as_i32(OP, "plan", plan.k())?,
        tokens: as_i32(OP, "x", plan.tokens())?,
        zero_unmapped: i32::from(layout == Layout::Padded),
        vec: i32::from(vec),
    };
    let func = dev.function(OP, Module::Permute, &format!("gather_{}", T::DTYPE))?;
    let cfg = LaunchConfig {
        grid_dim: (as_i32(OP, "out", rows)? as u32, 1, 1),
        block_dim: (GATHER_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `gather_{dtype}` takes one GatherParams (mirrored in src/params.rs). out is
    // [rows, H] and x [T, H] of T (checked); row_slots holds >= rows entries (the plan sized it
    // for its maximum) and total_rows is null or points at offsets[E] inside the plan's [E+1]
    // tensor. Block
    // r writes only row r < rows, and reads x row slot / K only for 0 <= slot < T*K (others
    // are counted in status). Vector copies only when H*size and both bases are 16-byte
    // aligned.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// What a combine reads besides the expert outputs and the plan. Each part is optional.
#[derive(Clone, Copy, Default)]
pub struct CombineInputs<'a, T> {
    /// `[T, K]` routing weights; `None` when the GEMM already scaled its rows by them.
    pub weights: Option<&'a Tensor<f32>>,
    /// `[T, H]` the layer input, read by copy experts.
    pub x: Option<&'a Tensor<T>>,
    /// `[E_total - E]` kind of each zero-computation expert: 0 zero, 1 copy, 2 constant. A copy
    /// or constant expert whose inputs are not given acts as a zero expert.
    pub zc_kinds: Option<&'a Tensor<i32>>,
    /// `[E_total - E, 2, H]` each constant expert's mixing weights W_z: (a1, a2) =
    /// `softmax(W_z x[t])` (MoE++).
    pub const_w: Option<&'a Tensor<T>>,
    /// `[E_total - E, H]` each constant expert's vector v_z; it contributes `a1 x[t] + a2 v_z`.
    pub const_v: Option<&'a Tensor<T>>,
    /// `[T, H]` shared-expert output, added after the routed experts.
    pub shared_out: Option<&'a Tensor<T>>,
    /// `[T]` shared-expert gate logits (Qwen2-MoE); the combine applies the sigmoid.
    pub shared_gate: Option<&'a Tensor<T>>,
    /// `[T, H]` added last.
    pub residual: Option<&'a Tensor<T>>,
}

/// `y[t] = Σ_k w[t,k] · c(t,k) (+ σ(gate[t]) · shared[t]) (+ residual[t])`, where c is the
/// expert's output row for a GEMM slot, `x[t]` for a copy expert, `a1 x[t] + a2 v_z` for a
/// constant expert z, and 0 otherwise. Summed in f32
/// in slot order and rounded once: repeated runs are bit-identical.
pub fn combine_into<T: Float>(
    dev: &Device,
    y: &mut Tensor<T>,
    expert_out: &Tensor<T>,
    plan: &mut Plan,
    layout: Layout,
    ids: &Tensor<i32>,
    inputs: CombineInputs<'_, T>,
) -> Result<()> {
    const OP: &str = "combine";
    let (t, k) = (plan.tokens(), plan.k());
    let (rows, hidden) = expert_out.dims2(OP, "expert_out", "[rows, H]")?;
    let want = |arg: &'static str, got: &[usize], want: &[usize]| {
        if got == want {
            Ok(())
        } else {
            Err(Error::shape(
                OP,
                arg,
                format!("{want:?}"),
                format!("{got:?}"),
            ))
        }
    };
    want("y", y.shape(), &[t, hidden])?;
    want("ids", ids.shape(), &[t, k])?;
    if rows < plan.rows(layout) {
        return Err(Error::shape(
            OP,
            "expert_out",
            format!("at least {} rows ({layout:?})", plan.rows(layout)),
            format!("{rows}"),
        ));
    }
    if let Some(w) = inputs.weights {
        want("weights", w.shape(), &[t, k])?;
    }
    for (arg, v) in [
        ("x", inputs.x),
        ("shared_out", inputs.shared_out),
        ("residual", inputs.residual),
    ] {
        if let Some(v) = v {
            want(arg, v.shape(), &[t, hidden])?;
        }
    }
    if let Some(g) = inputs.shared_gate {
        want("shared_gate", g.shape(), &[t])?;
        if inputs.shared_out.is_none() {
            return Err(Error::shape(
                OP,
                "shared_gate",
                "a shared_out to gate",
                "no shared_out",
            ));
        }
    }
    let zc = plan.experts_total() - plan.experts();
    if let Some(z) = inputs.zc_kinds {
        want("zc_kinds", z.shape(), &[zc])?;
    }
    if let Some(w) = inputs.const_w {
        want("const_w", w.shape(), &[zc, 2, hidden])?;
    }
    if let Some(v) = inputs.const_v {
        want("const_v", v.shape(), &[zc, hidden])?;
    }
    y.check_device(OP, "y", dev)?;
    expert_out.check_device(OP, "expert_out", dev)?;
    ids.check_device(OP, "ids", dev)?;
    if t == 0 || hidden == 0 {
        return Ok(());
    }
    let ptr = |v: Option<&Tensor<T>>| v.map_or(0, |v| v.device_ptr(dev));
    let y_ptr = y.device_ptr_mut(dev);
    let ptrs = [
        y_ptr,
        expert_out.device_ptr(dev),
        ptr(inputs.x),
        ptr(inputs.shared_out),
        ptr(inputs.residual),
    ];
    let vec = (hidden * std::mem::size_of::<T>()).is_multiple_of(16)
        && ptrs.iter().all(|p| p.is_multiple_of(16));
    let (_, slot_rows) = plan.maps(OP, layout)?;
    let params = CombineParams {
        y: y_ptr,
        expert_out: ptrs[1],
        slot_rows: slot_rows.device_ptr(dev),
        ids: ids.device_ptr(dev),
        weights: inputs.weights.map_or(0, |w| w.device_ptr(dev)),
        x: ptrs[2],
        zc_kinds: inputs.zc_kinds.map_or(0, |z| z.device_ptr(dev)),
        const_w: ptr(inputs.const_w),
        const_v: ptr(inputs.const_v),
        shared_out: ptrs[3],
        shared_gate: ptr(inputs.shared_gate),
        residual: ptrs[4],
        status: plan.status.device_ptr_mut(dev),
        tokens: as_i32(OP, "y", t)?,
        hidden: as_i32(OP, "y", hidden)?,
        k: as_i32(OP, "ids", k)?,
        rows: as_i32(OP, "expert_out", rows)?,
        experts: as_i32(OP, "plan", plan.experts())?,
        experts_total: as_i32(OP, "plan", plan.experts_total())?,
        vec: i32::from(vec),
        pad_: 0,
    };
    let func = dev.function(OP, Module::Permute, &format!("combine_{}", T::DTYPE))?;
    let cfg = LaunchConfig {
        grid_dim: (as_i32(OP, "y", t)? as u32, 1, 1),
        block_dim: (COMBINE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `combine_{dtype}` takes one CombineParams (mirrored in src/params.rs). y, x,
    // shared_out and residual are [T, H], ids and weights [T, K], shared_gate [T], zc_kinds
    // [Z = E_total - E], const_w [Z, 2, H], const_v [Z, H], expert_out [rows, H] (all checked
    // above); slot_rows covers T*K slots; K <= 32 (Plan::new), the size of the kernel's
    // per-slot shared array.
    // Block t reads only token t's slots and rows; a row >= rows or an id outside [-1, E_total)
    // is counted in status and skipped. Vector access only when H*size and every base are
    // 16-byte aligned.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}
