//! Gated activations on a gate/up pair, and elementwise activations.

use cudarc::driver::LaunchConfig;

use super::reference;
use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::{ActParams, GatedActParams};

/// Where the gate and the up projection sit in a row of 2I values. Libraries disagree (vLLM's
/// `silu_and_mul` takes the gate first; others take the up projection first), so every gated op
/// names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateLayout {
    /// `[gate (I) | up (I)]`: Mixtral (w1 then w3), Qwen, DeepSeek, transformers' fused
    /// `gate_up_proj`.
    GateFirst,
    /// `[up (I) | gate (I)]`.
    UpFirst,
    /// `[g0, u0, g1, u1, ...]`: gpt-oss.
    Interleaved,
}

/// The activation applied to the gate, times the up projection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GatedAct {
    /// SwiGLU: silu(g) * u.
    Silu,
    /// GeGLU with the tanh approximation of GELU.
    GeluTanh,
    /// GeGLU with the exact (erf) GELU.
    GeluErf,
    /// gpt-oss: (clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha g'), g' = min(g, limit);
    /// the checkpoints use alpha = 1.702, limit = 7.
    GptOss { alpha: f32, limit: f32 },
}

impl GateLayout {
    /// `GateLayout` in params.cuh.
    pub(crate) fn code(self) -> i32 {
        match self {
            GateLayout::GateFirst => 0,
            GateLayout::UpFirst => 1,
            GateLayout::Interleaved => 2,
        }
    }
}

impl GatedAct {
    /// `GatedAct` in params.cuh, with alpha and limit (0 where unused).
    pub(crate) fn code(self) -> (i32, f32, f32) {
        match self {
            GatedAct::Silu => (0, 0.0, 0.0),
            GatedAct::GeluTanh => (1, 0.0, 0.0),
            GatedAct::GeluErf => (2, 0.0, 0.0),
            GatedAct::GptOss { alpha, limit } => (3, alpha, limit),
        }
    }

    /// gpt-oss's alpha and limit must be finite, the limit positive.
    pub(crate) fn check(self, op: &'static str) -> Result<()> {
        match self {
            GatedAct::GptOss { alpha, limit }
                if !(alpha.is_finite() && limit.is_finite() && limit > 0.0) =>
            {
                Err(Error::shape(
                    op,
                    "act",
                    "finite alpha and limit > 0",
                    format!("{self:?}"),
                ))
            }
            _ => Ok(()),
        }
    }

    pub const GPT_OSS: GatedAct = GatedAct::GptOss {
        alpha: 1.702,
        limit: 7.0,
    };

    /// The activation in f64, for references.
    pub fn eval(self, g: f64, u: f64) -> f64 {
        match self {
            GatedAct::Silu => reference::silu(g) * u,
            GatedAct::GeluTanh => reference::gelu_tanh(g) * u,
            GatedAct::GeluErf => reference::gelu_erf(g) * u,
            GatedAct::GptOss { alpha, limit } => {
                reference::gpt_oss_swiglu(g, u, f64::from(alpha), f64::from(limit))
            }
        }
    }
}

/// A non-gated activation (Switch-style experts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Relu,
    GeluTanh,
    GeluErf,
    Silu,
}

impl Act {
    /// `Act` in params.cuh.
    pub(crate) fn code(self) -> i32 {
        match self {
            Act::Relu => 0,
            Act::GeluTanh => 1,
            Act::GeluErf => 2,
            Act::Silu => 3,
        }
    }

    pub fn eval(self, x: f64) -> f64 {
        match self {
            Act::Relu => reference::relu(x),
            Act::GeluTanh => reference::gelu_tanh(x),
            Act::GeluErf => reference::gelu_erf(x),
            Act::Silu => reference::silu(x),
        }
    }
}

/// `out [.., I] = act(gate) * up` for `x [.., 2I]` in `layout`; f32 arithmetic, one rounding.
pub fn gated_act_into<T: Float>(
    dev: &Device,
    out: &mut Tensor<T>,
    x: &Tensor<T>,
    act: GatedAct,
    layout: GateLayout,
) -> Result<()> {
    const OP: &str = "gated_act";
    let (rows, two_i) = x.rows_cols(OP, "x")?;
    if !two_i.is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            "x",
            "an even last dimension (gate and up, I each)",
            format!("{:?}", x.shape()),
        ));
    }
    let inter = two_i / 2;
    let mut want = x.shape().to_vec();
    *want.last_mut().expect("rank >= 1") = inter;
    if out.shape() != want.as_slice() {
        return Err(Error::shape(
            OP,
            "out",
            format!("{want:?}"),
            format!("{:?}", out.shape()),
        ));
    }
    act.check(OP)?;
    x.check_device(OP, "x", dev)?;
    out.check_device(OP, "out", dev)?;
    if rows == 0 || inter == 0 {
        return Ok(());
    }
    let size = |v: usize, arg| {
        i32::try_from(v)
            .ok()
            .filter(|&v| v <= super::MAX_COLS)
            .ok_or_else(|| {
                Error::shape(
                    OP,
                    arg,
                    format!("at most {}", super::MAX_COLS),
                    format!("{v}"),
                )
            })
    };
    let (out_ptr, in_ptr) = (out.device_ptr_mut(dev), x.device_ptr(dev));
    let vec = layout != GateLayout::Interleaved
        && (inter * std::mem::size_of::<T>()).is_multiple_of(16)
        && out_ptr.is_multiple_of(16)
        && in_ptr.is_multiple_of(16);
    let (act_id, alpha, limit) = act.code();
    let params = GatedActParams {
        out: out_ptr,
        inp: in_ptr,
        rows: i32::try_from(rows)
            .map_err(|_| Error::shape(OP, "x", "fewer than 2^31 rows", format!("{rows}")))?,
        inter: size(inter, "x")?,
        layout: layout.code(),
        act: act_id,
        vec: i32::from(vec),
        alpha,
        limit,
        pad_: 0,
    };
    let func = dev.function(OP, Module::Activation, &format!("gated_act_{}", T::DTYPE))?;
    let cfg = LaunchConfig {
        grid_dim: (params.rows as u32, 1, 1),
        block_dim: (
            inter.div_ceil(8).next_multiple_of(32).clamp(32, 256) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    };
    // SAFETY: `gated_act_{dtype}` takes one GatedActParams (mirrored in src/params.rs). x is
    // [rows, 2I] and out [rows, I] (checked). Block r reads row r of x and writes row r of out,
    // columns below 2I and I; vectors only for split layouts with I*size and both bases 16-byte
    // aligned, so gate and up rows start aligned too. I <= 2^30 keeps the column counters in
    // range; rows < 2^31 blocks of 32..256 threads.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// `out = act(x)`, elementwise, any shape.
pub fn act_into<T: Float>(
    dev: &Device,
    out: &mut Tensor<T>,
    x: &Tensor<T>,
    act: Act,
) -> Result<()> {
    const OP: &str = "act";
    if out.shape() != x.shape() {
        return Err(Error::shape(
            OP,
            "out",
            format!("{:?} (as x)", x.shape()),
            format!("{:?}", out.shape()),
        ));
    }
    x.check_device(OP, "x", dev)?;
    out.check_device(OP, "out", dev)?;
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let (out_ptr, in_ptr) = (out.device_ptr_mut(dev), x.device_ptr(dev));
    let params = ActParams {
        out: out_ptr,
        inp: in_ptr,
        n: i64::try_from(n)
            .map_err(|_| Error::shape(OP, "x", "fewer than 2^63 elements", format!("{n}")))?,
        act: act.code(),
        vec: i32::from(out_ptr.is_multiple_of(16) && in_ptr.is_multiple_of(16)),
    };
    let func = dev.function(OP, Module::Activation, &format!("act_{}", T::DTYPE))?;
    // A grid-stride loop: enough blocks to fill any current GPU, no more than the work needs.
    let blocks = n.div_ceil(256 * 8).clamp(1, 4096) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `act_{dtype}` takes one ActParams (mirrored in src/params.rs). in and out hold n
    // elements (same shape, checked); the grid-stride loop touches indices below n only, 16-byte
    // vectors only when both bases are aligned (the tail is scalar).
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}
