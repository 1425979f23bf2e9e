//! The MoE block on the GPU: weights on the device, a workspace sized once, and a forward made
//! only of kernel launches and memsets on the device's stream.

use super::decode::DecodeWs;
use super::{Experts, LayerWeights, MoeConfig, ZeroExpert};
use crate::device::{Device, Tensor};
use crate::dtype::{DType, Float, to_model};
use crate::error::{Error, Result};
use crate::gemm::{self, GemmOptions, GemmRows, GemmVersion};
use crate::lora::{DeviceLora, LoraAdapters, LoraDims};
use crate::permute::{Plan, reference::padded_capacity};
use crate::quant::{self, QuantGemvVersion, QuantLayer};
use crate::routing;

/// The most dynamic shared memory decode v5's gate/up kernel takes for act-order experts' rows
/// of x (8 rows of H): beside its 19 KB of static shared memory, within every sm_80+ SM's
/// 227 KB (H up to 10,240 in bf16).
const ACT_ORDER_ROWS_BUDGET: usize = 160 * 1024;

/// Which forward a layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// [`Path::Decode`] up to [`MoeLayer::DECODE_TOKENS`] tokens, [`Path::Gemm`] above.
    Auto,
    /// The decode path (src/layer/decode.rs): three launches, routing fused into the gate/up
    /// GEMV and the combine into the down GEMV; above [`MoeLayer::DECODE_TOKENS`] tokens it
    /// falls back to [`Path::Gemm`]. A forward with LoRA adapter ids adds two shrink launches
    /// (and a route launch for v2); where the decode kernels take no adapters
    /// ([`MoeLayer::decode_takes_lora`]: v1) it takes [`Path::Gemv`] instead, with this path
    /// or [`Path::Auto`].
    Decode,
    /// Through the routing plan with the grouped GEMV over the sorted layout, any T.
    Gemv,
    /// Through the routing plan with the tensor-core GEMM over the padded layout.
    Gemm,
}

/// The kernels of [`Path::Decode`] (kernels/decode.cu); every version stays selectable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeVersion {
    /// One warp per output column, 8 weights per lane per step, `x` read from L1 by every warp,
    /// compressed weights through the per-8-weight decoder (a scale lookup per weight).
    V1,
    /// The activation staged once per block in shared memory as f32; compressed
    /// rows read 16 bytes per lane with the scale once per chunk and bit-level decoders
    /// (kernels/common/qdot.cuh); the gate and up rows streamed together; `decode_down` stages
    /// the token's rows, streams the routed slots that share a decoder together and reduces once
    /// per column. Layers whose rows exceed the shared-memory
    /// budget take v1.
    V2,
    /// v2 with the gate/up GEMV by expert: the tokens are routed once (`route_{l}_e{N}`, one more
    /// launch) and each block takes one chosen expert's columns for every token that chose it,
    /// staging up to 8 tokens' activations, so that each chosen expert's gate/up rows are read
    /// once per forward (per 8 tokens), not once per token; the shared expert likewise.
    /// `decode_down` is v2's. At T = 1 (one token per chosen expert) it runs v2's kernels. Layers
    /// whose rows exceed v2's shared-memory budget take v1.
    V3,
    /// v3 with the down GEMV by expert as well (`decode_down_v3`, raw dots per slot into an f32
    /// workspace), then `decode_combine`, which sums each token's slots in order as v1's down
    /// kernel does: five launches, each chosen expert's down rows read once per 8 tokens. At
    /// T = 1 it runs v2's kernels; the same fallback to v1.
    V4,
    /// v4 with both by-expert GEMVs on tensor cores (`decode_{gate_up,down}_v5_{kind}`,
    /// mma.sync m16n8k16: 16 weight rows against the pass's 8 tokens per instruction), for rows
    /// of multiples of 32 columns (H, I and the shared expert's) and plain experts, int4 ones in
    /// groups of a multiple of 128 columns or of 32 or 64, MXFP4 ones with scales in the range
    /// the dtype holds exactly, or FP8 ones with rows of a multiple of 64 columns and no NaN
    /// code (else v4; [`MoeLayer::tensor_core_decoders`]). Staged x is read once per
    /// 16 weight rows instead of once per row, so the GEMVs stay bound by HBM at 8 tokens per
    /// pass; packed codes are converted exactly into the A fragments and each group's scale is
    /// applied once per row to its block's sum, or, for groups of 32 or 64 columns, to the
    /// decoded weights (exact for MXFP4's powers of two; int4's rounded once to the dtype).
    /// int4 experts with GPTQ's act-order are taken on their upload layout (columns in group
    /// order, [`QuantLayer::upload`]): x staged in each expert's column order from a copy of
    /// the pass's rows in dynamic shared memory (8 rows of H, at most 160 KB), h written in
    /// the down expert's column order. Within the CPU's tolerance (a different summation
    /// order). Unlike v3 and v4 it also runs at T = 1 on act-order layers.
    V5,
    /// The default: v5 (v4 where v5 does not take the layer) for plain (bf16/f16) experts where
    /// the tokens' slots are at least a quarter of the routed experts (T K >= E / 4, T >= 2),
    /// and for the packed experts v5 takes (int4, MXFP4, FP8) where the slots are at least as
    /// many as the routed experts (T K >= E), or half as many where one expert's packed weights
    /// pass 8 MiB; v2 below that and for the other packed experts. int4 experts with GPTQ's
    /// act-order that v5 takes run v5 at every T, T = 1 included: every other version decodes
    /// them weight by weight through the per-8 decoder (Qwen3-30B-A3B at T = 16: 4.1 ms
    /// against v5's 0.08 ms, modelled). Under uniform routing
    /// T K = E / 4 slots fall on about 0.88 T K distinct experts, so by expert reads about an
    /// eighth fewer expert rows there, and more above; in the model that is where it starts to
    /// pay for the two extra launches (Qwen3-30B-A3B bf16 at T = 4). v5 models as fast as v4
    /// where both are bound by HBM and faster where v4 is bound by shared memory
    /// (Mixtral-8x7B at T = 16). On packed experts v5 models faster than v2 from T K = E
    /// (Mixtral-8x7B int4 at T = 4 and 16, Qwen3-30B-A3B at T = 16), slower at Qwen3's T = 4
    /// and 8 (int4; FP8 even at T = 8), whose small experts v2 reads again from the L2, and
    /// faster for gpt-oss-120b MXFP4 at T = 16 (64 slots on 128 experts of 13 MB, which v2
    /// reads again from HBM); the other packed kinds' by-expert kernels multiply on CUDA
    /// cores, where the model has them slower than v2 (BENCHMARKS.md).
    /// [`MoeLayer::decode_kernels_for`] says which runs at a given T.
    Auto,
}

/// The router's weights: in the model dtype, or f32 when the model routes in f32.
pub enum RouterWeights<T> {
    Model {
        w: Tensor<T>,
        bias: Option<Tensor<T>>,
    },
    F32 {
        w: Tensor<f32>,
        bias: Option<Tensor<f32>>,
    },
}

/// One projection of the routed experts on the device.
pub enum ExpertWeights<T> {
    /// `[E, N, Kd]` in the compute dtype.
    Plain(Tensor<T>),
    /// Compressed, each expert in its own format, decoded inside the GEMV; the prefill path
    /// (v1) decodes into the layer's scratch buffer and runs the plain GEMM.
    Packed(Box<QuantLayer>),
}

impl<T: Float> ExpertWeights<T> {
    /// `[E, N, Kd]`.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            ExpertWeights::Plain(t) => [t.shape()[0], t.shape()[1], t.shape()[2]],
            ExpertWeights::Packed(q) => [q.experts(), q.n(), q.kdim()],
        }
    }

    /// Runs the projection for the plan's rows: GEMV (sorted layout, `rows` gathered) or the
    /// GEMM `version` (padded layout; v2 may read the layer input through the plan).
    #[allow(clippy::too_many_arguments)] // the GEMM's operands, plus the path and scratch
    pub(super) fn run<TO: Float>(
        &mut self,
        dev: &Device,
        gemv: bool,
        version: GemmVersion,
        out: &mut Tensor<TO>,
        rows: GemmRows<'_, T>,
        plan: &Plan,
        opts: GemmOptions<'_, T>,
        scratch: Option<&mut Tensor<T>>,
    ) -> Result<()> {
        let a = match rows {
            GemmRows::Gathered(a) => Some(a),
            GemmRows::Indexed(_) => None,
        };
        let gathered = || {
            a.ok_or_else(|| Error::Unsupported {
                op: "MoeLayer::forward",
                what: "rows read through the plan outside the v2 GEMM".into(),
            })
        };
        match (self, gemv) {
            (ExpertWeights::Plain(w), true) => {
                gemm::grouped_gemv_into(dev, out, gathered()?, w, plan, opts)
            }
            (ExpertWeights::Plain(w), false) => {
                gemm::grouped_gemm_version_into(dev, out, rows, w, plan, opts, version)
            }
            (ExpertWeights::Packed(q), true) => {
                quant::quant_gemv_into(dev, out, gathered()?, q, plan, opts)
            }
            (ExpertWeights::Packed(q), false) => {
                let scratch = scratch.expect("allocated for packed experts");
                scratch.set_shape(&[q.experts(), q.n(), q.kdim()])?;
                quant::quant_gemm_into(dev, out, gathered()?, q, plan, opts, scratch)
            }
        }
    }
}

/// A block's weights on the device, in the layout of the module documentation (shared-expert
/// tensors carry a leading expert dimension of 1, as the grouped kernels take them).
pub struct DeviceWeights<T> {
    pub router: RouterWeights<T>,
    pub correction_bias: Option<Tensor<f32>>,
    /// `[E, 2I, H]`.
    pub gate_up: ExpertWeights<T>,
    pub gate_up_bias: Option<Tensor<T>>,
    /// `[E, H, I]`.
    pub down: ExpertWeights<T>,
    pub down_bias: Option<Tensor<T>>,
    /// `[1, 2Is, H]`.
    pub shared_gate_up: Option<Tensor<T>>,
    /// `[1, H, Is]`.
    pub shared_down: Option<Tensor<T>>,
    /// `[1, H]`.
    pub shared_gate: Option<Tensor<T>>,
    pub const_w: Option<Tensor<T>>,
    pub const_v: Option<Tensor<T>>,
}

/// The tensors [`MoeLayer::random`] draws, in the order that numbers their seeds.
pub const RANDOM_TENSORS: [&str; 10] = [
    "router",
    "gate_up",
    "down",
    "gate_up_bias",
    "down_bias",
    "shared_gate_up",
    "shared_down",
    "shared_gate",
    "const_w",
    "const_v",
];

/// The stages of a forward, in order; [`MoeLayer::forward_marked`] reports the end of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Router projection and top-k.
    Route,
    /// The routing plan.
    Plan,
    /// Gather and the gate/up GEMM with the fused activation.
    Gemm1,
    /// The down GEMM (routing weights folded in where possible).
    Gemm2,
    /// The shared expert's two GEMMs and gate (models that have one).
    Shared,
    /// Weighted sum back into token order.
    Combine,
}

/// Router logits in the model dtype or, for an f32 router, in f32.
pub(super) enum Logits<T> {
    Model(Tensor<T>),
    F32(Tensor<f32>),
}

/// The shared expert's buffers: its own one-expert plan (built in one launch by
/// [`Plan::build_identity`]) puts the tokens in order.
pub(super) struct SharedWs<T> {
    pub(super) plan: Plan,
    pub(super) a: Tensor<T>,
    pub(super) h: Tensor<T>,
    pub(super) out: Tensor<T>,
    pub(super) gate_logits: Tensor<T>,
}

impl<T: Float> SharedWs<T> {
    /// For up to `max_tokens` tokens of width `h`, intermediate `is`, in blocks of `block_m`
    /// rows (the layer's GEMM's).
    fn new(dev: &Device, max_tokens: usize, h: usize, is: usize, block_m: usize) -> Result<Self> {
        let rows = padded_capacity(max_tokens, 1, block_m);
        Ok(SharedWs {
            plan: Plan::new(dev, max_tokens, 1, 1, 1, block_m)?,
            a: dev.zeros(&[rows, h])?,
            h: dev.zeros(&[rows, is])?,
            out: dev.zeros(&[rows, h])?,
            gate_logits: dev.zeros(&[max_tokens, 1])?,
        })
    }
}

/// What a forward takes beside `x`: routing from the caller, and each token's expert mask.
#[derive(Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// `topk_ids [T, K]` (i32) and `topk_weights [T, K]` (f32) on the device, used instead of
    /// the layer's router (which does not run; masks do not apply). Checked on the device by
    /// `route_given` (kernels/routing.cu): a slot whose id is outside [-1, E_total) (ids from E
    /// on name the zero-computation experts), repeats an earlier id of its row, or has a NaN or
    /// infinite weight runs as unused (-1, weight 0) and is counted; [`MoeLayer::check`] returns
    /// the `Err`. The weights are the final ones: they multiply the expert outputs (the inputs
    /// for Llama 4) as the router's would.
    pub routing: Option<(&'a Tensor<i32>, &'a Tensor<f32>)>,
    /// `[T]` (i32): each token's mask among [`MoeLayer::set_expert_masks`]'s, -1 for none. Without
    /// it every token takes mask 0 where the layer has masks. An index outside [-1, M) routes
    /// the token to no expert and is counted; [`MoeLayer::check`] returns the `Err`.
    pub mask_index: Option<&'a Tensor<i32>>,
    /// `[T]` (i32): each token's LoRA adapter among [`MoeLayer::set_lora`]'s, -1 for none. An id
    /// outside [-1, L) runs the token without an adapter and is counted; [`MoeLayer::check`]
    /// returns the `Err`.
    pub adapter_ids: Option<&'a Tensor<i32>>,
}

/// One MoE block on the device, in compute dtype `T` (bf16 or f16).
pub struct MoeLayer<T: Float> {
    pub(super) cfg: MoeConfig,
    pub(super) max_tokens: usize,
    pub(super) path: Path,
    pub(super) decode_version: DecodeVersion,
    /// The prefill GEMM; the plan's block height is its tile height.
    pub(super) version: GemmVersion,
    pub(super) w: DeviceWeights<T>,
    pub(super) zc_kinds: Option<Tensor<i32>>,
    // Workspace, sized for max_tokens.
    /// `[max_tokens, E_total]` router logits, in the router's dtype.
    pub(super) logits: Logits<T>,
    pub(super) ids: Tensor<i32>,
    pub(super) weights: Tensor<f32>,
    pub(super) plan: Plan,
    pub(super) a: Tensor<T>,
    pub(super) hmid: Tensor<T>,
    pub(super) out: Tensor<T>,
    /// Packed experts' prefill scratch: the largest projection decoded, `[E, N, Kd]`.
    pub(super) scratch: Option<Tensor<T>>,
    pub(super) shared: Option<SharedWs<T>>,
    /// The decode path's scratch, sized for DECODE_TOKENS.
    pub(super) decode: DecodeWs<T>,
    /// `[M, ceil(E_total / 32)]` expert masks ([`MoeLayer::set_expert_masks`]), if any.
    pub(super) masks: Option<Tensor<u32>>,
    /// `[4]` what the routing kernels found in given routing and mask indices
    /// ([`routing::check_status`]).
    pub(super) route_status: Tensor<i32>,
    /// LoRA adapters on the routed experts ([`MoeLayer::set_lora`]), if any.
    pub(super) lora: Option<LoraWs<T>>,
}

/// The adapters and the gate/up rows before the activation, `[rows, 2I]`, where their deltas go.
pub(super) struct LoraWs<T> {
    pub(super) adapters: DeviceLora<T>,
    pub(super) hpre: Tensor<T>,
}

impl<T: Float> MoeLayer<T> {
    /// Up to this many tokens, [`Path::Auto`] takes the GEMV.
    pub const DECODE_TOKENS: usize = 16;
    /// The plan's block height: the GEMM's tile rows.
    const BLOCK_M: usize = gemm::BLOCK_M;

    /// Uploads `w` (rounded to `T`) and allocates the workspace for up to `max_tokens` tokens.
    pub fn new<S: Float>(
        dev: &Device,
        cfg: &MoeConfig,
        w: &LayerWeights<S>,
        max_tokens: usize,
    ) -> Result<Self> {
        w.check("MoeLayer::new", cfg)?;
        let (h, i, e, et) = (
            cfg.hidden,
            cfg.intermediate,
            cfg.experts,
            cfg.experts_total(),
        );
        let z = cfg.zero_experts.len();
        let is = cfg.shared.map_or(0, |s| s.intermediate);
        let up = |v: &[S], shape: &[usize]| dev.upload(&to_model::<S, T>(v), shape);
        let opt =
            |v: &Option<Vec<S>>, shape: &[usize]| v.as_deref().map(|v| up(v, shape)).transpose();
        let router = if cfg.router_f32 {
            RouterWeights::F32 {
                w: dev.upload(&w.router, &[et, h])?,
                bias: w
                    .router_bias
                    .as_deref()
                    .map(|b| dev.upload(b, &[et]))
                    .transpose()?,
            }
        } else {
            RouterWeights::Model {
                w: dev.upload(&to_model::<f32, T>(&w.router), &[et, h])?,
                bias: w
                    .router_bias
                    .as_deref()
                    .map(|b| dev.upload(&to_model::<f32, T>(b), &[et]))
                    .transpose()?,
            }
        };
        let weights = DeviceWeights {
            router,
            correction_bias: w
                .correction_bias
                .as_deref()
                .map(|b| dev.upload(b, &[et]))
                .transpose()?,
            gate_up: match &w.experts {
                Experts::Plain { gate_up, .. } => {
                    ExpertWeights::Plain(up(gate_up, &[e, 2 * i, h])?)
                }
                Experts::Packed { gate_up, .. } => {
                    ExpertWeights::Packed(Box::new(QuantLayer::upload(dev, gate_up)?))
                }
            },
            gate_up_bias: opt(&w.gate_up_bias, &[e, 2 * i])?,
            down: match &w.experts {
                Experts::Plain { down, .. } => ExpertWeights::Plain(up(down, &[e, h, i])?),
                Experts::Packed { down, .. } => {
                    ExpertWeights::Packed(Box::new(QuantLayer::upload(dev, down)?))
                }
            },
            down_bias: opt(&w.down_bias, &[e, h])?,
            shared_gate_up: opt(&w.shared_gate_up, &[1, 2 * is, h])?,
            shared_down: opt(&w.shared_down, &[1, h, is])?,
            shared_gate: opt(&w.shared_gate, &[1, h])?,
            const_w: opt(&w.const_w, &[z, 2, h])?,
            const_v: opt(&w.const_v, &[z, h])?,
        };
        Self::from_device(dev, cfg, weights, max_tokens)
    }

    /// A block of `cfg`'s shapes with weights drawn on the device: for benches of real model
    /// sizes, where drawing billions of values on the host would dominate.
    ///
    /// Tensor j of [`RANDOM_TENSORS`] is `fill_uniform` with seed `seed + (j + 1) * 2^32` over
    /// `[-a, a]`, `a = sqrt(3 / fan_in)` (the variance of a 1/sqrt(fan-in) init), in the layout
    /// of the module documentation (gpt-oss's gate/up rows interleaved); the router is f32 when
    /// `cfg.router_f32`, biases of the router and the correction bias are zero. Another program
    /// can rebuild the same weights from [`crate::device::uniform_at`].
    pub fn random(dev: &Device, cfg: &MoeConfig, max_tokens: usize, seed: u64) -> Result<Self> {
        Self::random_drawn(dev, cfg, max_tokens, seed, true)
    }

    /// [`MoeLayer::random`] with the routed experts' weights left zero instead of drawn (the
    /// router, biases and shared expert are drawn the same): for the profiler, whose counters
    /// do not depend on the weights' values, on models larger than the host. On the CPU
    /// emulator with `MOE_EMU_LAZY` such weights cost no memory until written. Refused on a GPU,
    /// where a zero layer would only mislead.
    pub fn random_zero_experts(
        dev: &Device,
        cfg: &MoeConfig,
        max_tokens: usize,
        seed: u64,
    ) -> Result<Self> {
        if !dev.info().emulated {
            return Err(Error::Unsupported {
                op: "MoeLayer::random_zero_experts",
                what: format!(
                    "zero experts on {} (only on the CPU emulator, for counters)",
                    dev.info().name
                ),
            });
        }
        Self::random_drawn(dev, cfg, max_tokens, seed, false)
    }

    fn random_drawn(
        dev: &Device,
        cfg: &MoeConfig,
        max_tokens: usize,
        seed: u64,
        draw_experts: bool,
    ) -> Result<Self> {
        cfg.validate("MoeLayer::random")?;
        let (h, i, e, et) = (
            cfg.hidden,
            cfg.intermediate,
            cfg.experts,
            cfg.experts_total(),
        );
        let z = cfg.zero_experts.len();
        let tensor_seed = |name: &str| {
            let j = RANDOM_TENSORS
                .iter()
                .position(|n| *n == name)
                .expect("listed") as u64;
            seed.wrapping_add((j + 1) << 32)
        };
        let bound = |fan_in: usize| (3.0 / fan_in as f64).sqrt() as f32;
        let draw = |name: &str, shape: &[usize], fan_in: usize| -> Result<Tensor<T>> {
            let mut t = dev.zeros::<T>(shape)?;
            let a = bound(fan_in);
            dev.fill_uniform(&mut t, tensor_seed(name), -a, a)?;
            Ok(t)
        };
        let router = if cfg.router_f32 {
            let mut w = dev.zeros::<f32>(&[et, h])?;
            dev.fill_uniform(&mut w, tensor_seed("router"), -bound(h), bound(h))?;
            RouterWeights::F32 {
                w,
                bias: cfg.router_bias.then(|| dev.zeros(&[et])).transpose()?,
            }
        } else {
            RouterWeights::Model {
                w: draw("router", &[et, h], h)?,
                bias: cfg.router_bias.then(|| dev.zeros(&[et])).transpose()?,
            }
        };
        let expert = |name: &str, shape: &[usize], fan_in: usize| -> Result<Tensor<T>> {
            if draw_experts {
                draw(name, shape, fan_in)
            } else {
                dev.zeros::<T>(shape)
            }
        };
        let gate_up = ExpertWeights::Plain(expert("gate_up", &[e, 2 * i, h], h)?);
        let down = ExpertWeights::Plain(expert("down", &[e, h, i], i)?);
        let gate_up_bias = cfg
            .expert_bias
            .then(|| draw("gate_up_bias", &[e, 2 * i], h))
            .transpose()?;
        let down_bias = cfg
            .expert_bias
            .then(|| draw("down_bias", &[e, h], i))
            .transpose()?;
        let (shared_gate_up, shared_down, shared_gate) = match cfg.shared {
            Some(s) => (
                Some(draw("shared_gate_up", &[1, 2 * s.intermediate, h], h)?),
                Some(draw(
                    "shared_down",
                    &[1, h, s.intermediate],
                    s.intermediate,
                )?),
                s.gated
                    .then(|| draw("shared_gate", &[1, h], h))
                    .transpose()?,
            ),
            None => (None, None, None),
        };
        let constants = cfg.zero_experts.contains(&ZeroExpert::Constant);
        let const_w = constants
            .then(|| draw("const_w", &[z, 2, h], h))
            .transpose()?;
        let const_v = constants.then(|| draw("const_v", &[z, h], 1)).transpose()?;
        let correction_bias = cfg.correction_bias.then(|| dev.zeros(&[et])).transpose()?;
        let weights = DeviceWeights {
            router,
            correction_bias,
            gate_up,
            gate_up_bias,
            down,
            down_bias,
            shared_gate_up,
            shared_down,
            shared_gate,
            const_w,
            const_v,
        };
        Self::from_device(dev, cfg, weights, max_tokens)
    }

    /// A block over weights already on the device; checks their shapes against `cfg` and
    /// allocates the workspace for up to `max_tokens` tokens.
    pub fn from_device(
        dev: &Device,
        cfg: &MoeConfig,
        w: DeviceWeights<T>,
        max_tokens: usize,
    ) -> Result<Self> {
        const OP: &str = "MoeLayer::from_device";
        if !matches!(T::DTYPE, DType::BF16 | DType::F16) {
            return Err(Error::Unsupported {
                op: OP,
                what: format!("compute dtype {} (bf16 or f16)", T::DTYPE),
            });
        }
        cfg.validate(OP)?;
        check_weights(OP, cfg, &w)?;
        if max_tokens == 0 {
            return Err(Error::shape(OP, "max_tokens", ">= 1", "0"));
        }
        let is = cfg.shared.map_or(8, |s| s.intermediate);
        for (arg, d) in [
            ("hidden", cfg.hidden),
            ("intermediate", cfg.intermediate),
            ("shared", is),
        ] {
            if !d.is_multiple_of(8) {
                return Err(Error::shape(
                    OP,
                    arg,
                    "a multiple of 8 (the expert GEMMs read 16-byte rows)",
                    format!("{d}"),
                ));
            }
        }
        // Every module a forward launches from, loaded now so that a capture never loads one.
        dev.preload(
            OP,
            &[
                crate::kernels::Module::Routing,
                crate::kernels::Module::Permute,
                crate::kernels::Module::GroupedGemm,
                crate::kernels::Module::Quant,
                crate::kernels::Module::Decode,
            ],
        )?;
        let (h, i, e, et, k) = (
            cfg.hidden,
            cfg.intermediate,
            cfg.experts,
            cfg.experts_total(),
            cfg.k(),
        );
        let codes: Vec<i32> = cfg.zero_experts.iter().map(|z| z.code()).collect();
        let version = GemmVersion::default();
        let block_m = version.block_m().max(Self::BLOCK_M);
        let shared = cfg
            .shared
            .map(|s| SharedWs::new(dev, max_tokens, h, s.intermediate, block_m))
            .transpose()?;
        let slots = max_tokens.checked_mul(k).ok_or_else(|| {
            Error::shape(
                OP,
                "max_tokens",
                "T*K within usize",
                format!("{max_tokens}"),
            )
        })?;
        let plan = Plan::new(dev, max_tokens, k, e, et, block_m)?;
        let rows = slots.max(padded_capacity(slots, e, block_m));
        let f32_router = matches!(w.router, RouterWeights::F32 { .. });
        let packed: Vec<usize> = [&w.gate_up, &w.down]
            .iter()
            .filter(|p| matches!(p, ExpertWeights::Packed(_)))
            .map(|p| p.shape().iter().product())
            .collect();
        let scratch = packed
            .iter()
            .max()
            .map(|&n| dev.zeros::<T>(&[n]))
            .transpose()?;
        Ok(MoeLayer {
            cfg: cfg.clone(),
            max_tokens,
            path: Path::Auto,
            decode_version: DecodeVersion::Auto,
            version,
            w,
            zc_kinds: (!codes.is_empty())
                .then(|| dev.upload(&codes, &[codes.len()]))
                .transpose()?,
            logits: if f32_router {
                Logits::F32(dev.zeros(&[max_tokens, et])?)
            } else {
                Logits::Model(dev.zeros(&[max_tokens, et])?)
            },
            ids: dev.zeros(&[max_tokens, k])?,
            weights: dev.zeros(&[max_tokens, k])?,
            plan,
            a: dev.zeros(&[rows, h])?,
            hmid: dev.zeros(&[rows, i])?,
            out: dev.zeros(&[rows, h])?,
            scratch,
            shared,
            decode: DecodeWs::new(dev, cfg, max_tokens.min(Self::DECODE_TOKENS))?,
            masks: None,
            route_status: dev.zeros(&[4])?,
            lora: None,
        })
    }

    /// Attaches LoRA adapters to the routed experts ([`crate::lora`]), rounded to `T`, or
    /// removes them (`None`). A forward given [`ForwardOptions::adapter_ids`] adds each token's
    /// adapter's deltas to its experts' gate, up and down products. On the decode path the
    /// expand products run inside the decode kernels, after a shrink launch each for gate/up
    /// and down (every decode version but v1; [`MoeLayer::decode_takes_lora`]); elsewhere,
    /// and where the decode path would run v1, the planned path runs with grouped shrink and
    /// expand launches (the GEMV up to [`MoeLayer::DECODE_TOKENS`] tokens, else the layer's
    /// GEMM). Adapter ids are read on the device, so a captured graph replays with new ones;
    /// new adapters reallocate and need a new capture.
    pub fn set_lora<S: Float>(
        &mut self,
        dev: &Device,
        adapters: Option<&LoraAdapters<S>>,
    ) -> Result<()> {
        const OP: &str = "MoeLayer::set_lora";
        let Some(adapters) = adapters else {
            self.lora = None;
            return Ok(());
        };
        let cfg = &self.cfg;
        let dims = LoraDims {
            experts: cfg.experts,
            hidden: cfg.hidden,
            inter: cfg.intermediate,
        };
        let rows = self.a.capacity() / cfg.hidden;
        dev.preload(
            OP,
            &[
                crate::kernels::Module::Lora,
                crate::kernels::Module::Activation,
            ],
        )?;
        self.lora = Some(LoraWs {
            adapters: DeviceLora::new(dev, OP, adapters, dims, rows)?,
            hpre: dev.zeros(&[rows, 2 * cfg.intermediate])?,
        });
        Ok(())
    }

    /// The adapters' count and rank, if the layer has LoRA adapters.
    pub fn lora(&self) -> Option<(usize, usize)> {
        self.lora
            .as_ref()
            .map(|l| (l.adapters.adapters, l.adapters.rank))
    }

    /// Bytes of one (expert, adapter)'s A and B over gate, up and down, if the layer has LoRA
    /// adapters: what a forward reads once for each pair its tokens choose.
    pub fn lora_pair_bytes(&self) -> Option<usize> {
        self.lora.as_ref().map(|l| l.adapters.pair_bytes())
    }

    /// Sets the layer's expert masks: `masks[m]` lists the experts (ids in [0, E_total)) that
    /// mask m removes from routing; [`ForwardOptions::mask_index`] picks one per token, mask 0
    /// by default. No masks (an empty slice) turns masking off. Writes the device buffer, and
    /// allocates it only when the number of masks changes: with the same number a CUDA graph
    /// captured earlier replays with the new masks, while a change of number (or to none)
    /// frees the buffer such a graph reads, so capture it again. Call it outside a capture;
    /// inside one, or
    /// from device code, write [`MoeLayer::expert_masks_mut`] instead (bit e % 32 of word e / 32
    /// of row m removes expert e).
    pub fn set_expert_masks(&mut self, dev: &Device, masks: &[&[usize]]) -> Result<()> {
        const OP: &str = "MoeLayer::set_expert_masks";
        let et = self.cfg.experts_total();
        if masks.is_empty() {
            self.masks = None;
            return Ok(());
        }
        let mut words = Vec::with_capacity(masks.len() * et.div_ceil(32));
        for m in masks {
            words.extend(routing::mask_words(OP, "masks", et, m)?);
        }
        match &mut self.masks {
            Some(t) if t.shape()[0] == masks.len() => dev.upload_into(t, &words),
            _ => {
                self.masks = Some(dev.upload(&words, &[masks.len(), et.div_ceil(32)])?);
                Ok(())
            }
        }
    }

    /// The expert masks on the device, `[M, ceil(E_total / 32)]` u32, if set.
    pub fn expert_masks(&self) -> Option<&Tensor<u32>> {
        self.masks.as_ref()
    }

    /// The expert masks' device buffer, for a runtime that writes masks on its stream.
    pub fn expert_masks_mut(&mut self) -> Option<&mut Tensor<u32>> {
        self.masks.as_mut()
    }

    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Chooses the expert GEMM of later forwards.
    pub fn set_path(&mut self, path: Path) {
        self.path = path;
    }

    /// Chooses the decode path's kernels ([`DecodeVersion::Auto`] by default).
    pub fn set_decode_version(&mut self, version: DecodeVersion) {
        self.decode_version = version;
    }

    /// Chooses the compressed-expert GEMV of [`Path::Gemv`] for the packed projections
    /// ([`QuantGemvVersion::V2`] by default); plain experts are unaffected.
    pub fn set_quant_gemv_version(&mut self, version: QuantGemvVersion) {
        for w in [&mut self.w.gate_up, &mut self.w.down] {
            if let ExpertWeights::Packed(q) = w {
                q.set_gemv_version(version);
            }
        }
    }

    /// The decode path's kernels as chosen.
    pub fn decode_version(&self) -> DecodeVersion {
        self.decode_version
    }

    /// The decode path's kernels that run: the chosen version, or v1 where v2's staged rows
    /// exceed its shared-memory budget (hidden or intermediate sizes above about 16,000).
    /// [`DecodeVersion::Auto`] stays `Auto` here; [`MoeLayer::decode_kernels_for`] resolves it.
    pub fn decode_kernels(&self) -> DecodeVersion {
        match self.decode_version {
            DecodeVersion::V1 => DecodeVersion::V1,
            v if super::decode::v2_smem(
                self.cfg.hidden,
                self.decode.ld_h(),
                self.decode.slots(),
            )
            .is_some() =>
            {
                v
            }
            _ => DecodeVersion::V1,
        }
    }

    /// The decode path's kernels that a forward of `t` tokens runs: [`MoeLayer::decode_kernels`]
    /// with [`DecodeVersion::Auto`] resolved to v5, v4 or v2 by its rule, v3 to v5 as v2 at
    /// T = 1 (one token per chosen expert: no routing launch) and where a projection has no
    /// by-expert instance ([`MoeLayer::by_expert_decoders`]), but v5 at every T on act-order
    /// layers it takes, and v5 as v4 where its row lengths do not allow it.
    pub fn decode_kernels_for(&self, t: usize) -> DecodeVersion {
        let kinds = self.by_expert_decoders();
        // GPTQ act-order experts (int4 laid out again at upload) that v5 takes: every other
        // version decodes them through the per-8 decoder, a lookup per weight, and v5 is the
        // only one that streams their codes, at every T.
        let act_order = kinds.is_none() && self.tensor_core_decode();
        match self.decode_kernels() {
            DecodeVersion::V5 | DecodeVersion::Auto if act_order => DecodeVersion::V5,
            DecodeVersion::V3 | DecodeVersion::V4 | DecodeVersion::V5
                if t < 2 || kinds.is_none() =>
            {
                DecodeVersion::V2
            }
            DecodeVersion::V5 if !self.tensor_core_decode() => DecodeVersion::V4,
            DecodeVersion::Auto
                if t >= 2
                    && 4 * t * self.cfg.k() >= self.cfg.experts
                    && kinds == Some(("plain", "plain")) =>
            {
                if self.tensor_core_decode() {
                    DecodeVersion::V5
                } else {
                    DecodeVersion::V4
                }
            }
            // Packed experts: v5 where they average a slot per expert, or half a slot where one
            // expert's weights pass 8 MiB (v2 reads an expert again for each token that chose
            // it, and an expert that large has left the L2 by then: gpt-oss-120b MXFP4 at
            // T = 16, where smaller experts such as Qwen3's at T = 8 are read again from the
            // L2 and v2 stays faster); v2 below, and for the packed kinds v5 does not take,
            // whose by-expert kernels (CUDA cores) model slower than v2 (BENCHMARKS.md).
            DecodeVersion::Auto
                if t >= 2
                    && self.tensor_core_decode()
                    && (t * self.cfg.k() >= self.cfg.experts
                        || (2 * t * self.cfg.k() >= self.cfg.experts
                            && self.packed_expert_bytes() >= 8 << 20)) =>
            {
                DecodeVersion::V5
            }
            DecodeVersion::Auto => DecodeVersion::V2,
            v => v,
        }
    }

    /// The bytes of expert 0's packed gate/up and down weights (codes, scales, zero points; 0
    /// for a plain projection).
    fn packed_expert_bytes(&self) -> usize {
        let bytes = |w: &ExpertWeights<T>| match w {
            ExpertWeights::Plain(_) => 0,
            ExpertWeights::Packed(q) => q.expert_bytes(0),
        };
        bytes(&self.w.gate_up) + bytes(&self.w.down)
    }

    /// Whether decode v5 (the by-expert GEMVs on tensor cores) takes this layer: rows of H, I and
    /// Is columns multiples of 32, so that every 16-byte row chunk and staged row is aligned, and
    /// each projection plain or of packed experts that v5 decodes
    /// ([`MoeLayer::tensor_core_decoders`]).
    fn tensor_core_decode(&self) -> bool {
        let c = &self.cfg;
        self.tensor_core_decoders().is_some()
            && self.act_order_rows_bytes() <= ACT_ORDER_ROWS_BUDGET
            && c.hidden.is_multiple_of(32)
            && c.intermediate.is_multiple_of(32)
            && c.shared.is_none_or(|s| s.intermediate.is_multiple_of(32))
    }

    /// Decode v5's dynamic shared memory for its gate/up kernel: where the gate/up experts have
    /// GPTQ's act-order (laid out in group order at upload), the pass's 8 rows of x whole, from
    /// which it stages them in each expert's column order; else 0.
    pub(super) fn act_order_rows_bytes(&self) -> usize {
        match &self.w.gate_up {
            ExpertWeights::Packed(q) if q.act_order_reordered() => {
                8 * self.cfg.hidden * size_of::<T>()
            }
            _ => 0,
        }
    }

    /// Decode v5's instances for the gate/up and the down projection: "plain" for plain experts
    /// (the shared expert always is), "int4", "int4s", "mxfp4" or "fp8" for packed ones that v5
    /// decodes ([`QuantLayer::tensor_core_decoder`]: int4 in groups of a multiple of 128
    /// columns, int4 in groups of 32 or 64, MXFP4 with scales the dtype holds, FP8 without NaN
    /// codes); `None` where a projection has none.
    pub fn tensor_core_decoders(&self) -> Option<(&'static str, &'static str)> {
        let kind = |w: &ExpertWeights<T>| match w {
            ExpertWeights::Plain(_) => Some("plain"),
            ExpertWeights::Packed(q) => q.tensor_core_decoder(T::DTYPE),
        };
        Some((kind(&self.w.gate_up)?, kind(&self.w.down)?))
    }

    /// The by-expert decode kernels' instances for the gate/up and the down projection: "plain"
    /// for plain experts, or the one decoder every packed expert takes
    /// ([`QuantLayer::fast_decoder`]). `None` where a packed projection mixes decoders or needs
    /// the per-8 one (act-order, other group sizes, ternary, bf16 in a blob): v3 to v5 then run
    /// as v2.
    pub fn by_expert_decoders(&self) -> Option<(&'static str, &'static str)> {
        let kind = |w: &ExpertWeights<T>| match w {
            ExpertWeights::Plain(_) => Some("plain"),
            ExpertWeights::Packed(q) => q.fast_decoder(),
        };
        Some((kind(&self.w.gate_up)?, kind(&self.w.down)?))
    }

    /// Chooses the prefill GEMM version of the routed and the shared experts (v2 by default:
    /// [`GemmVersion`] says why). v2 and v3 plan in blocks of 128 rows, v1 in 64; v2 reads the
    /// gate/up rows straight from the layer input (no gather), so the plans and the row buffers
    /// are made again here, outside any forward. Packed experts keep their own prefill path.
    pub fn set_gemm_version(&mut self, dev: &Device, version: GemmVersion) -> Result<()> {
        version.check_device("MoeLayer::set_gemm_version", dev)?;
        if version == self.version {
            return Ok(());
        }
        let (h, i, e, et, k) = (
            self.cfg.hidden,
            self.cfg.intermediate,
            self.cfg.experts,
            self.cfg.experts_total(),
            self.cfg.k(),
        );
        let block_m = version.block_m().max(Self::BLOCK_M);
        let slots = self.max_tokens * k;
        let rows = slots.max(padded_capacity(slots, e, block_m));
        self.plan = Plan::new(dev, self.max_tokens, k, e, et, block_m)?;
        self.a = dev.zeros(&[rows, h])?;
        self.hmid = dev.zeros(&[rows, i])?;
        self.out = dev.zeros(&[rows, h])?;
        if let Some(l) = &mut self.lora {
            l.adapters.set_rows(dev, rows)?;
            l.hpre = dev.zeros(&[rows, 2 * i])?;
        }
        if let Some(s) = self.cfg.shared {
            self.shared = Some(SharedWs::new(
                dev,
                self.max_tokens,
                h,
                s.intermediate,
                block_m,
            )?);
        }
        self.version = version;
        Ok(())
    }

    /// The routing of the last forward: ids and weights `[T, K]` in selection order.
    pub fn routing(&self) -> (&Tensor<i32>, &Tensor<f32>) {
        (&self.ids, &self.weights)
    }

    /// The routing plan of the last forward (its `status` counts ids out of range).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// `y [T, H] = block(x [T, H])` for `T <= max_tokens`: router projection, routing, plan,
    /// gather, the two expert GEMMs with their fused epilogues, the shared expert, and the
    /// combine. Launches and memsets only: no allocation, no host synchronisation.
    pub fn forward_into(&mut self, dev: &Device, y: &mut Tensor<T>, x: &Tensor<T>) -> Result<()> {
        self.forward_marked(dev, y, x, &mut |_| Ok(()))
    }

    /// [`MoeLayer::forward_into`], calling `mark(stage)` after each stage is enqueued: a bench
    /// records an event there to time the stages.
    pub fn forward_marked(
        &mut self,
        dev: &Device,
        y: &mut Tensor<T>,
        x: &Tensor<T>,
        mark: &mut dyn FnMut(Stage) -> Result<()>,
    ) -> Result<()> {
        self.forward_with_marked(dev, y, x, ForwardOptions::default(), mark)
    }

    /// [`MoeLayer::forward_into`] with routing from the caller or per-token expert masks
    /// ([`ForwardOptions`]). Given routing equal to the layer's own gives the same `y`, bit for
    /// bit, on every path.
    pub fn forward_with(
        &mut self,
        dev: &Device,
        y: &mut Tensor<T>,
        x: &Tensor<T>,
        opts: ForwardOptions<'_>,
    ) -> Result<()> {
        self.forward_with_marked(dev, y, x, opts, &mut |_| Ok(()))
    }

    /// [`MoeLayer::forward_with`], calling `mark` as [`MoeLayer::forward_marked`] does.
    pub fn forward_with_marked(
        &mut self,
        dev: &Device,
        y: &mut Tensor<T>,
        x: &Tensor<T>,
        opts: ForwardOptions<'_>,
        mark: &mut dyn FnMut(Stage) -> Result<()>,
    ) -> Result<()> {
        const OP: &str = "MoeLayer::forward";
        let h = self.cfg.hidden;
        let (t, xh) = x.dims2(OP, "x", "[T, H]")?;
        if xh != h || t > self.max_tokens {
            return Err(Error::shape(
                OP,
                "x",
                format!("[T, {h}] with T <= {}", self.max_tokens),
                format!("{:?}", x.shape()),
            ));
        }
        if y.shape() != [t, h] {
            return Err(Error::shape(
                OP,
                "y",
                format!("[{t}, {h}]"),
                format!("{:?}", y.shape()),
            ));
        }
        x.check_device(OP, "x", dev)?;
        y.check_device(OP, "y", dev)?;
        let k = self.cfg.k();
        if let Some((ids, weights)) = opts.routing {
            for (arg, shape) in [("topk_ids", ids.shape()), ("topk_weights", weights.shape())] {
                if shape != [t, k] {
                    return Err(Error::shape(
                        OP,
                        arg,
                        format!("[T, K] = [{t}, {k}]"),
                        format!("{shape:?}"),
                    ));
                }
            }
            ids.check_device(OP, "topk_ids", dev)?;
            weights.check_device(OP, "topk_weights", dev)?;
        }
        // Per-token `[T]` controls, each refused where the layer lacks what it selects.
        for (arg, given, have, missing) in [
            (
                "mask_index",
                opts.mask_index,
                self.masks.is_some(),
                "none (the layer has no expert masks: set_expert_masks)",
            ),
            (
                "adapter_ids",
                opts.adapter_ids,
                self.lora.is_some(),
                "none (the layer has no LoRA adapters: set_lora)",
            ),
        ] {
            let Some(v) = given else { continue };
            if !have {
                return Err(Error::shape(OP, arg, missing, format!("{:?}", v.shape())));
            }
            if v.shape() != [t] {
                return Err(Error::shape(
                    OP,
                    arg,
                    format!("[T] = [{t}]"),
                    format!("{:?}", v.shape()),
                ));
            }
            v.check_device(OP, arg, dev)?;
        }
        if t == 0 {
            return Ok(());
        }
        let decode = matches!(self.path, Path::Auto | Path::Decode) && t <= Self::DECODE_TOKENS;
        if opts.adapter_ids.is_some() && !(decode && self.decode_takes_lora(t)) {
            // LoRA on the planned path: where the decode kernels do not take it (v1's).
            let gemv = match self.path {
                Path::Gemv => true,
                Path::Gemm => false,
                Path::Auto | Path::Decode => t <= Self::DECODE_TOKENS,
            };
            return self.forward_planned(dev, y, x, gemv, opts, mark);
        }
        match self.path {
            Path::Auto | Path::Decode if t <= Self::DECODE_TOKENS => {
                self.forward_decode(dev, y, x, opts, mark)
            }
            Path::Gemv => self.forward_planned(dev, y, x, true, opts, mark),
            _ => self.forward_planned(dev, y, x, false, opts, mark),
        }
    }

    /// Given routing, checked on the device into the layer's ids and weights (`route_given`).
    pub(super) fn take_routing(
        &mut self,
        dev: &Device,
        (ids, weights): (&Tensor<i32>, &Tensor<f32>),
    ) -> Result<()> {
        routing::route_given_into(
            dev,
            &mut self.ids,
            &mut self.weights,
            ids,
            weights,
            self.cfg.experts_total(),
            &mut self.route_status,
        )
    }

    /// The routing controls' fields of the route kernels' parameters for `t` tokens: the masks
    /// (checked) and the status, or zeros where the layer has no masks.
    pub(super) fn mask_fields(
        &mut self,
        dev: &Device,
        opts: &ForwardOptions<'_>,
        t: usize,
    ) -> Result<routing::MaskFields> {
        let masks = self.masks.as_ref().map(|masks| {
            (
                routing::ExpertMasks {
                    masks,
                    index: opts.mask_index,
                },
                &mut self.route_status,
            )
        });
        routing::mask_params("MoeLayer::forward", dev, masks, t, self.cfg.experts_total())
    }

    /// Reads what the forwards since the last check found on the device, and resets it: an error
    /// for given routing with ids out of range or repeated or weights not finite, mask indices
    /// out of range ([`ForwardOptions`]), ids out of range in a plan, or compressed codes no
    /// packer gives. Waits for the stream; call it outside a captured forward.
    pub fn check(&mut self, dev: &Device) -> Result<()> {
        let mut found = vec![
            routing::check_status(dev, "MoeLayer::forward", &mut self.route_status),
            self.plan.check(dev),
            self.decode.check(dev),
        ];
        for p in [&mut self.w.gate_up, &mut self.w.down] {
            if let ExpertWeights::Packed(q) = p {
                found.push(q.check(dev));
            }
        }
        if let Some(s) = &mut self.shared {
            found.push(s.plan.check(dev));
        }
        if let Some(l) = &mut self.lora {
            found.push(l.adapters.check(dev, "MoeLayer::forward"));
        }
        found.into_iter().collect()
    }

    /// The weights.
    pub fn weights(&self) -> &DeviceWeights<T> {
        &self.w
    }

    /// Bytes of expert `e`'s gate/up and down weights as stored (compressed size for packed
    /// experts): what a decode step reads for each expert it uses.
    pub fn expert_bytes(&self, e: usize) -> (usize, usize) {
        let of = |w: &ExpertWeights<T>| match w {
            ExpertWeights::Plain(t) => t.numel() / t.shape()[0] * std::mem::size_of::<T>(),
            ExpertWeights::Packed(q) => q.expert_bytes(e),
        };
        (of(&self.w.gate_up), of(&self.w.down))
    }

    /// The weights, giving up the workspace (to swap a projection for another format).
    pub fn into_weights(self) -> DeviceWeights<T> {
        self.w
    }
}

/// Checks each device weight's shape (and presence) against `cfg`.
fn check_weights<T: Float>(op: &'static str, cfg: &MoeConfig, w: &DeviceWeights<T>) -> Result<()> {
    let (h, i, e, et) = (
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.experts_total(),
    );
    let z = cfg.zero_experts.len();
    let is = cfg.shared.map(|s| s.intermediate);
    let constants = cfg.zero_experts.contains(&ZeroExpert::Constant);
    let (router, router_bias) = match &w.router {
        RouterWeights::Model { w, bias } => (w.shape(), bias.as_ref().map(Tensor::shape)),
        RouterWeights::F32 { w, bias } => (w.shape(), bias.as_ref().map(Tensor::shape)),
    };
    let shape = |t: &Option<Tensor<T>>| t.as_ref().map(|t| t.shape().to_vec());
    type Check = (&'static str, Option<Vec<usize>>, Option<Vec<usize>>);
    let checks: [Check; 12] = [
        ("router", Some(router.to_vec()), Some(vec![et, h])),
        (
            "router_bias",
            router_bias.map(<[usize]>::to_vec),
            cfg.router_bias.then(|| vec![et]),
        ),
        (
            "correction_bias",
            w.correction_bias.as_ref().map(|t| t.shape().to_vec()),
            cfg.correction_bias.then(|| vec![et]),
        ),
        (
            "gate_up",
            Some(w.gate_up.shape().to_vec()),
            Some(vec![e, 2 * i, h]),
        ),
        (
            "gate_up_bias",
            shape(&w.gate_up_bias),
            cfg.expert_bias.then(|| vec![e, 2 * i]),
        ),
        ("down", Some(w.down.shape().to_vec()), Some(vec![e, h, i])),
        (
            "down_bias",
            shape(&w.down_bias),
            cfg.expert_bias.then(|| vec![e, h]),
        ),
        (
            "shared_gate_up",
            shape(&w.shared_gate_up),
            is.map(|s| vec![1, 2 * s, h]),
        ),
        (
            "shared_down",
            shape(&w.shared_down),
            is.map(|s| vec![1, h, s]),
        ),
        (
            "shared_gate",
            shape(&w.shared_gate),
            cfg.shared.filter(|s| s.gated).map(|_| vec![1, h]),
        ),
        (
            "const_w",
            shape(&w.const_w),
            constants.then(|| vec![z, 2, h]),
        ),
        ("const_v", shape(&w.const_v), constants.then(|| vec![z, h])),
    ];
    for (arg, got, want) in checks {
        if got != want {
            let show =
                |v: &Option<Vec<usize>>| v.as_ref().map_or("absent".into(), |s| format!("{s:?}"));
            return Err(Error::shape(op, arg, show(&want), show(&got)));
        }
    }
    Ok(())
}
