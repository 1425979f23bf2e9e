//! One whole MoE block: router, routed experts, shared experts, zero-computation experts, expert
//! biases and input scaling, as real models configure them.
//!
//! - [`MoeConfig`] says what the block computes; [`LayerWeights`] holds its weights on the host
//!   in one storage dtype `S` (bf16, f16 or f32), in the crate's layout (below).
//! - [`reference::forward`] is the CPU forward: f64 arithmetic over the stored weights, slow and
//!   exact. The checks compare everything else with it.
//! - [`MoeLayer`] is the GPU forward: the weights on the device and a workspace sized once for
//!   a maximum token count, so [`MoeLayer::forward_into`] allocates nothing, never waits for the
//!   host, and can be captured in a CUDA graph.
//!
//! Weight layout (row-major, Linear's out × in):
//! - `router [E_total, H]` (f32 on the host: exact for every stored dtype), `router_bias [E_total]`
//!   (gpt-oss), `correction_bias [E_total]` (DeepSeek-V3's `e_score_correction_bias`);
//! - `gate_up [E, 2I, H]`, rows in `cfg.gate_layout` (gate rows first for most models,
//!   interleaved for gpt-oss), `gate_up_bias [E, 2I]`;
//! - `down [E, H, I]`, `down_bias [E, H]`;
//! - or, for compressed checkpoints, the two projections as one [`QuantMatrix`] per expert
//!   (`[2I, H]` and `[H, I]`, each expert in its own format: [`Experts::Packed`]);
//! - shared expert: `shared_gate_up [2Is, H]` (gate rows first), `shared_down [H, Is]`,
//!   `shared_gate [H]` (the Qwen2-MoE sigmoid gate's weight);
//! - constant experts (MoE++): `const_w [Z, 2, H]`, `const_v [Z, H]` over the zero-computation
//!   experts, indexed from E.

mod decode;
mod gpu;
mod planned;
pub mod presets;
pub mod reference;

pub use gpu::{
    DecodeVersion, DeviceWeights, ExpertWeights, ForwardOptions, MoeLayer, Path, RANDOM_TENSORS,
    RouterWeights, Stage,
};

use crate::activation::{GateLayout, GatedAct};
use crate::error::{Error, Result};
use crate::gemm::ScaleAt;
use crate::quant::QuantMatrix;
use crate::routing::RouterConfig;

/// A zero-computation expert (MoE++): ids `E..E_total` name them. It costs no GEMM FLOPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroExpert {
    /// Contributes nothing.
    Zero,
    /// Contributes `w · x`.
    Copy,
    /// Contributes `w · (a1 x + a2 v)`, `(a1, a2) = softmax(W_z x)`.
    Constant,
}

impl ZeroExpert {
    /// The kind codes the combine kernel reads.
    pub(crate) fn code(self) -> i32 {
        match self {
            ZeroExpert::Zero => 0,
            ZeroExpert::Copy => 1,
            ZeroExpert::Constant => 2,
        }
    }
}

/// The shared expert: one gated MLP every token goes through.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedExpert {
    /// Its intermediate size Is (DeepSeek: `n_shared_experts · moe_intermediate_size`).
    pub intermediate: usize,
    /// Whether a sigmoid gate `σ(x · g)` scales its output (Qwen2-MoE).
    pub gated: bool,
}

/// What one MoE block computes.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub hidden: usize,
    /// I, each routed expert's intermediate size.
    pub intermediate: usize,
    /// E, routed experts with weights.
    pub experts: usize,
    pub router: RouterConfig,
    /// The router projection has a bias (gpt-oss).
    pub router_bias: bool,
    /// The router computes its logits in f32 from f32 weights, whatever the model dtype
    /// (DeepSeek-V3, GLM-4.5); otherwise in the model dtype, rounded once.
    pub router_f32: bool,
    /// The rule needs a per-expert correction bias (DeepSeek-V3's `e_score_correction_bias`).
    pub correction_bias: bool,
    pub act: GatedAct,
    /// Where gate and up sit among the 2I rows of `gate_up`.
    pub gate_layout: GateLayout,
    /// Experts have biases on both projections (gpt-oss).
    pub expert_bias: bool,
    /// Where the routing weight applies: to the output (most models) or to the expert's input
    /// (Llama 4).
    pub weight_at: ScaleAt,
    pub shared: Option<SharedExpert>,
    /// Zero-computation experts after the E routed ones; the router scores `E + len` experts.
    pub zero_experts: Vec<ZeroExpert>,
}

impl MoeConfig {
    /// The plain block: SwiGLU experts with gate rows first, weights applied to the outputs,
    /// no biases, shared or zero-computation experts. Models set the fields that differ.
    pub fn new(hidden: usize, intermediate: usize, experts: usize, router: RouterConfig) -> Self {
        MoeConfig {
            hidden,
            intermediate,
            experts,
            router,
            router_bias: false,
            router_f32: false,
            correction_bias: false,
            act: GatedAct::Silu,
            gate_layout: GateLayout::GateFirst,
            expert_bias: false,
            weight_at: ScaleAt::Output,
            shared: None,
            zero_experts: Vec::new(),
        }
    }

    /// E_total: routed plus zero-computation experts, the router's width.
    pub fn experts_total(&self) -> usize {
        self.experts + self.zero_experts.len()
    }

    pub fn k(&self) -> usize {
        self.router.k
    }

    /// Refuses a configuration no forward can run.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let bad = |arg, expected: &str, got: String| Err(Error::shape(op, arg, expected, got));
        if self.hidden == 0 || self.intermediate == 0 || self.experts == 0 {
            return bad(
                "config",
                "hidden, intermediate and experts all >= 1",
                format!(
                    "hidden {}, intermediate {}, experts {}",
                    self.hidden, self.intermediate, self.experts
                ),
            );
        }
        if let Some(s) = self.shared
            && s.intermediate == 0
        {
            return bad("shared", "intermediate >= 1", "0".into());
        }
        // Every weight's element count must fit in memory arithmetic (and the kernels' i32
        // row and column indices): E * 2I * H and the shared expert's 2Is * H.
        let count = |dims: &[usize]| dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let is = self.shared.map_or(1, |s| s.intermediate);
        let fits = [self.hidden, self.intermediate, self.experts_total(), is]
            .iter()
            .all(|&d| d.checked_mul(2).is_some_and(|v| i32::try_from(v).is_ok()))
            && count(&[self.experts_total(), 2, self.intermediate, self.hidden]).is_some()
            && count(&[2, is, self.hidden]).is_some();
        if !fits {
            return bad(
                "config",
                "sizes whose weights fit in memory (each dimension below 2^30)",
                format!(
                    "hidden {}, intermediate {}, experts {}, shared {is}",
                    self.hidden,
                    self.intermediate,
                    self.experts_total()
                ),
            );
        }
        if self.weight_at == ScaleAt::Input && !self.zero_experts.is_empty() {
            return bad(
                "zero_experts",
                "none when the routing weight scales the expert input",
                format!("{}", self.zero_experts.len()),
            );
        }
        if self.correction_bias != self.router.needs_bias() {
            return bad(
                "correction_bias",
                "present exactly when the rule needs it (grouped sigmoid)",
                format!("{} with rule {:?}", self.correction_bias, self.router.rule),
            );
        }
        self.act.check(op)?;
        let bias_len = self.correction_bias.then_some(self.experts_total());
        self.router.validate(op, self.experts_total(), bias_len)
    }
}

/// The routed experts' two projections.
#[derive(Clone, Debug)]
pub enum Experts<S> {
    /// `gate_up [E, 2I, H]` and `down [E, H, I]` in the storage dtype.
    Plain { gate_up: Vec<S>, down: Vec<S> },
    /// One compressed matrix per expert and projection, `[2I, H]` and `[H, I]`, each expert in
    /// its own format (MXFP4 for gpt-oss, FP8 blocks for DeepSeek-V3, GPTQ/AWQ integers, ...).
    Packed {
        gate_up: Vec<QuantMatrix>,
        down: Vec<QuantMatrix>,
    },
}

impl<S> Experts<S> {
    /// Bytes the expert weights hold (what decode reads for every expert once).
    pub fn bytes(&self) -> usize {
        match self {
            Experts::Plain { gate_up, down } => {
                (gate_up.len() + down.len()) * std::mem::size_of::<S>()
            }
            Experts::Packed { gate_up, down } => {
                gate_up.iter().chain(down).map(QuantMatrix::bytes).sum()
            }
        }
    }
}

/// A block's weights on the host, in the layout of the module documentation.
#[derive(Clone, Debug)]
pub struct LayerWeights<S> {
    pub router: Vec<f32>,
    pub router_bias: Option<Vec<f32>>,
    pub correction_bias: Option<Vec<f32>>,
    pub experts: Experts<S>,
    pub gate_up_bias: Option<Vec<S>>,
    pub down_bias: Option<Vec<S>>,
    pub shared_gate_up: Option<Vec<S>>,
    pub shared_down: Option<Vec<S>>,
    pub shared_gate: Option<Vec<S>>,
    pub const_w: Option<Vec<S>>,
    pub const_v: Option<Vec<S>>,
}

impl<S> LayerWeights<S> {
    /// Checks every weight's presence and length against `cfg`.
    pub fn check(&self, op: &'static str, cfg: &MoeConfig) -> Result<()> {
        cfg.validate(op)?;
        let (h, i, e, et) = (
            cfg.hidden,
            cfg.intermediate,
            cfg.experts,
            cfg.experts_total(),
        );
        let constants = cfg
            .zero_experts
            .iter()
            .filter(|z| **z == ZeroExpert::Constant)
            .count();
        let z = cfg.zero_experts.len();
        let is = cfg.shared.map_or(0, |s| s.intermediate);
        let gated_shared = cfg.shared.is_some_and(|s| s.gated);
        let want: [(&'static str, Option<usize>, Option<usize>); 10] = [
            ("router", Some(self.router.len()), Some(et * h)),
            (
                "router_bias",
                self.router_bias.as_ref().map(Vec::len),
                cfg.router_bias.then_some(et),
            ),
            (
                "correction_bias",
                self.correction_bias.as_ref().map(Vec::len),
                cfg.correction_bias.then_some(et),
            ),
            (
                "gate_up_bias",
                self.gate_up_bias.as_ref().map(Vec::len),
                cfg.expert_bias.then_some(e * 2 * i),
            ),
            (
                "down_bias",
                self.down_bias.as_ref().map(Vec::len),
                cfg.expert_bias.then_some(e * h),
            ),
            (
                "shared_gate_up",
                self.shared_gate_up.as_ref().map(Vec::len),
                cfg.shared.map(|_| 2 * is * h),
            ),
            (
                "shared_down",
                self.shared_down.as_ref().map(Vec::len),
                cfg.shared.map(|_| h * is),
            ),
            (
                "shared_gate",
                self.shared_gate.as_ref().map(Vec::len),
                gated_shared.then_some(h),
            ),
            (
                "const_w",
                self.const_w.as_ref().map(Vec::len),
                (constants > 0).then_some(z * 2 * h),
            ),
            (
                "const_v",
                self.const_v.as_ref().map(Vec::len),
                (constants > 0).then_some(z * h),
            ),
        ];
        match &self.experts {
            Experts::Plain { gate_up, down } => {
                for (arg, got, expected) in [
                    ("gate_up", gate_up.len(), e * 2 * i * h),
                    ("down", down.len(), e * h * i),
                ] {
                    if got != expected {
                        return Err(Error::shape(
                            op,
                            arg,
                            format!("{expected} values"),
                            format!("{got} values"),
                        ));
                    }
                }
            }
            Experts::Packed { gate_up, down } => {
                for (arg, m, shape) in [("gate_up", gate_up, (2 * i, h)), ("down", down, (h, i))] {
                    if m.len() != e || m.iter().any(|q| q.shape() != shape) {
                        return Err(Error::shape(
                            op,
                            arg,
                            format!("{e} compressed experts of [{}, {}]", shape.0, shape.1),
                            format!(
                                "{} of shapes {:?}",
                                m.len(),
                                m.iter().map(QuantMatrix::shape).collect::<Vec<_>>()
                            ),
                        ));
                    }
                }
            }
        }
        for (arg, got, expected) in want {
            if got != expected {
                let show =
                    |v: Option<usize>| v.map_or("absent".to_string(), |n| format!("{n} values"));
                return Err(Error::shape(op, arg, show(expected), show(got)));
            }
        }
        Ok(())
    }
}
