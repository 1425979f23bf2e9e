//! Routing family: gating logits `[T, E]` to top-k expert ids `[T, K]` (i32) and weights
//! `[T, K]` (f32), by the rule of each model's transformers implementation ([`RouterConfig`]).
//!
//! Ties break toward the lower expert index. NaN logits count as -inf (before the softcap, which
//! then maps them to -cap): they are chosen only after every other expert, so ids are always in
//! `[0, E)`, or -1 in the unused slots of the top-p rule. A row whose logits are all -inf or NaN
//! gets the first K ids, and weights that follow the rule's arithmetic: NaN (0/0) for the
//! softmax rules, as torch.softmax gives, 0 for the sigmoid rules.

mod capacity;
pub mod config;
mod projection;
pub mod reference;
mod stats;

pub use capacity::{apply_capacity_into, capacity_for};
pub use config::{MAX_EXPERTS, MAX_GROUPS, MAX_K, RouterConfig, RouterRule};
pub use projection::{
    RouterLogitsVersion, route_hidden_into, router_logits_into, router_logits_version_into,
};
pub use stats::{RouterStats, router_stats_into};

use cudarc::driver::LaunchConfig;

use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::{RouteParams, route_rule};

/// Tokens per block of the routing kernel (one warp each), as `kRouteWarps` in routing.cu.
const ROUTE_WARPS: usize = 4;

/// Routes `logits [T, E]`; `bias [E]` is the correction bias the grouped sigmoid rule
/// (DeepSeek-V3) needs, and no other rule takes. Returns `(ids [T, K], weights [T, K])`.
pub fn route<T: Float>(
    dev: &Device,
    logits: &Tensor<T>,
    cfg: &RouterConfig,
    bias: Option<&Tensor<f32>>,
) -> Result<(Tensor<i32>, Tensor<f32>)> {
    let (tokens, _) = logits.rows_cols("route", "logits")?;
    let mut ids = dev.zeros::<i32>(&[tokens, cfg.k])?;
    let mut weights = dev.zeros::<f32>(&[tokens, cfg.k])?;
    route_into(dev, &mut ids, &mut weights, None, logits, cfg, bias)?;
    Ok((ids, weights))
}

/// [`route`] into caller-owned `ids [T, K]` and `weights [T, K]`. When `counts [E]` is given it
/// is overwritten with the number of tokens routed to each expert (zeroed on the stream, then
/// counted by the kernel; deterministic).
pub fn route_into<T: Float>(
    dev: &Device,
    ids: &mut Tensor<i32>,
    weights: &mut Tensor<f32>,
    counts: Option<&mut Tensor<i32>>,
    logits: &Tensor<T>,
    cfg: &RouterConfig,
    bias: Option<&Tensor<f32>>,
) -> Result<()> {
    const OP: &str = "route";
    let (tokens, experts) = logits.dims2(OP, "logits", "[T, E]")?;
    cfg.validate(OP, experts, bias.map(|b| b.numel()))?;
    let k = cfg.k;
    for (arg, shape) in [("ids", ids.shape()), ("weights", weights.shape())] {
        if shape != [tokens, k] {
            return Err(Error::shape(
                OP,
                arg,
                format!("[T, K] = [{tokens}, {k}]"),
                format!("{shape:?}"),
            ));
        }
    }
    if let Some(b) = bias
        && b.rank() != 1
    {
        return Err(Error::shape(
            OP,
            "bias",
            format!("[E] = [{experts}]"),
            format!("{:?}", b.shape()),
        ));
    }
    logits.check_device(OP, "logits", dev)?;
    ids.check_device(OP, "ids", dev)?;
    weights.check_device(OP, "weights", dev)?;
    let tokens_i32: i32 = tokens.try_into().map_err(|_| {
        Error::shape(
            OP,
            "logits",
            format!("at most {} tokens", i32::MAX),
            format!("{tokens}"),
        )
    })?;
    let counts_ptr = match counts {
        Some(c) => {
            if c.shape() != [experts] {
                return Err(Error::shape(
                    OP,
                    "counts",
                    format!("[E] = [{experts}]"),
                    format!("{:?}", c.shape()),
                ));
            }
            c.check_device(OP, "counts", dev)?;
            dev.fill_bytes(c, 0)?;
            c.device_ptr_mut(dev)
        }
        None => 0,
    };
    let bias_ptr = match bias {
        Some(b) => {
            b.check_device(OP, "bias", dev)?;
            b.device_ptr(dev)
        }
        None => 0,
    };
    if tokens == 0 {
        return Ok(());
    }

    let params = RouteParams {
        ids: ids.device_ptr_mut(dev),
        weights: weights.device_ptr_mut(dev),
        counts: counts_ptr,
        logits: logits.device_ptr(dev),
        bias: bias_ptr,
        ..route_params(cfg, tokens_i32, experts)
    };
    let name = format!("route_{}_e{}", T::DTYPE.name(), route_capacity(experts));
    let func = dev.function(OP, Module::Routing, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(tokens.div_ceil(ROUTE_WARPS)).expect("T <= i32::MAX, checked above"),
            1,
            1,
        ),
        block_dim: (32 * ROUTE_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `route_{dtype}_e{capacity}` takes one RouteParams by value (mirrored in
    // src/params.rs) and holds up to `capacity` >= E experts per token. logits is [T, E] of the
    // kernel's dtype; ids and weights are [T, K]; counts, when set, is [E]; bias, when set, is
    // [E] (validate() checked its length) and is set exactly for the rule that reads it. Warp w
    // of block b routes token 4b + w and returns when that is >= T; it reads logits[t, 0..E) and
    // writes ids/weights[t, 0..K); ids it counts are in [0, E). All tensors are on this device.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// The route kernels' parameters for `cfg` over `experts` logits per token and `tokens` tokens,
/// with every pointer null: the caller sets the ones its kernel reads. `cfg` was validated for
/// `experts` (E <= 1024, K <= 32, groups <= 32).
pub(crate) fn route_params(cfg: &RouterConfig, tokens: i32, experts: usize) -> RouteParams {
    let (rule, renormalize, top_p) = match cfg.rule {
        RouterRule::SoftmaxTopK { renormalize } => (route_rule::SOFTMAX_TOPK, renormalize, 1.0),
        RouterRule::TopKSoftmax => (route_rule::TOPK_SOFTMAX, false, 1.0),
        RouterRule::TopKSigmoid => (route_rule::TOPK_SIGMOID, false, 1.0),
        RouterRule::SigmoidGroupTopK { renormalize, .. } => {
            (route_rule::SIGMOID_GROUP_TOPK, renormalize, 1.0)
        }
        RouterRule::SoftmaxGroupTopK { .. } => (route_rule::SOFTMAX_GROUP_TOPK, false, 1.0),
        RouterRule::TopP { p, renormalize } => (route_rule::TOP_P, renormalize, p),
    };
    let (n_group, topk_group) = cfg.rule.groups().unwrap_or((1, 1));
    let small = |v: usize| i32::try_from(v).expect("bounded by RouterConfig::validate");
    RouteParams {
        ids: 0,
        weights: 0,
        counts: 0,
        logits: 0,
        bias: 0,
        tokens,
        experts: small(experts),
        k: small(cfg.k),
        rule,
        n_group: small(n_group),
        topk_group: small(topk_group),
        renormalize: i32::from(renormalize),
        scale: cfg.scale,
        softcap: cfg.softcap.unwrap_or(0.0),
        top_p,
    }
}

/// The route instance that holds `experts` per token: `..._e{route_capacity}`.
pub(crate) fn route_capacity(experts: usize) -> usize {
    experts.next_power_of_two().max(32)
}
