//! Routing family: gating logits `[T, E]` to top-k expert ids `[T, K]` (i32) and weights
//! `[T, K]` (f32), by the rule of each model's transformers implementation ([`RouterConfig`]).
//!
//! Ties break toward the lower expert index. NaN logits count as -inf (before the softcap, which
//! then maps them to -cap): they are chosen only after every other expert, so ids are always in
//! `[0, E)`, or -1 in the unused slots of the top-p rule. A row whose logits are all -inf or NaN
//! gets the first K ids, and weights that follow the rule's arithmetic: NaN (0/0) for the
//! softmax rules, as torch.softmax gives, 0 for the sigmoid rules.
//!
//! [`ExpertMasks`] remove experts before selection ([`route_masked_into`]); a token left with
//! fewer than K gets unused slots (-1, weight 0). [`route_given_into`] checks routing computed by
//! the caller. Both count what they refuse in a status that [`check_status`] turns into an `Err`.

mod capacity;
pub mod config;
mod projection;
pub mod reference;
mod stats;

pub use capacity::{apply_capacity_into, capacity_for};
pub use config::{MAX_EXPERTS, MAX_GROUPS, MAX_K, RouterConfig, RouterRule};
pub use projection::{
    ROUTER_V3_MIN_BLOCKS, RouterLogitsVersion, route_hidden_into, router_logits_into,
    router_logits_version_for, router_logits_version_into,
};
pub use stats::{RouterStats, router_stats_into};

use cudarc::driver::LaunchConfig;

use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::{RouteGivenParams, RouteParams, route_rule, route_status};

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
    route_inner(dev, ids, weights, counts, logits, cfg, bias, None)
}

/// Expert masks on the device: `masks [M, ceil(E / 32)]` u32, bit `e % 32` of word `e / 32`
/// removing expert `e` ([`mask_words`] builds one), and each token's mask: `index [T]` (i32, -1
/// for none), or mask 0 for every token where `index` is `None` (one layer-wide mask). Masked
/// experts are removed before selection, and the rule (softmax, renormalisation, groups) runs on
/// those that remain, as [`reference::route_masked`] does; a token left with fewer than K
/// experts gets unused slots (id -1, weight 0). Both are read by the kernels, so a captured graph
/// replays with whatever the device holds at launch.
#[derive(Clone, Copy)]
pub struct ExpertMasks<'a> {
    pub masks: &'a Tensor<u32>,
    pub index: Option<&'a Tensor<i32>>,
}

/// `removed` as one mask of [`ExpertMasks`] over `experts` experts; an id out of range is an
/// `Err` naming `op` and `arg`.
pub fn mask_words(
    op: &'static str,
    arg: &'static str,
    experts: usize,
    removed: &[usize],
) -> Result<Vec<u32>> {
    let mut words = vec![0u32; experts.div_ceil(32)];
    for &e in removed {
        if e >= experts {
            return Err(Error::shape(
                op,
                arg,
                format!("expert ids in [0, {experts})"),
                format!("{e}"),
            ));
        }
        words[e / 32] |= 1 << (e % 32);
    }
    Ok(words)
}

/// [`route_into`] with expert masks. `status [4]` (i32) accumulates, in entry 3, the tokens
/// whose mask index is outside [-1, M), which are routed to no expert; [`check_status`] turns it
/// into an `Err`.
#[allow(clippy::too_many_arguments)] // route_into's operands, the masks and their status
pub fn route_masked_into<T: Float>(
    dev: &Device,
    ids: &mut Tensor<i32>,
    weights: &mut Tensor<f32>,
    counts: Option<&mut Tensor<i32>>,
    logits: &Tensor<T>,
    cfg: &RouterConfig,
    bias: Option<&Tensor<f32>>,
    masks: ExpertMasks<'_>,
    status: &mut Tensor<i32>,
) -> Result<()> {
    route_inner(
        dev,
        ids,
        weights,
        counts,
        logits,
        cfg,
        bias,
        Some((masks, status)),
    )
}

/// The masks' fields of [`RouteParams`] (see params.cuh); all zero without masks.
#[derive(Clone, Copy, Default)]
pub(crate) struct MaskFields {
    pub masks: u64,
    pub mask_index: u64,
    pub status: u64,
    pub mask_words: i32,
    pub mask_count: i32,
}

impl MaskFields {
    /// `p` with these fields.
    pub(crate) fn apply(self, p: RouteParams) -> RouteParams {
        RouteParams {
            masks: self.masks,
            mask_index: self.mask_index,
            status: self.status,
            mask_words: self.mask_words,
            mask_count: self.mask_count,
            ..p
        }
    }
}

/// The masks' fields for `tokens` tokens over `experts` experts, after checking their shapes
/// and devices.
pub(crate) fn mask_params(
    op: &'static str,
    dev: &Device,
    masks: Option<(ExpertMasks<'_>, &mut Tensor<i32>)>,
    tokens: usize,
    experts: usize,
) -> Result<MaskFields> {
    let Some((m, status)) = masks else {
        return Ok(MaskFields::default());
    };
    let words = experts.div_ceil(32);
    let (count, w) = m.masks.dims2(op, "masks", "[M, ceil(E / 32)]")?;
    if count == 0 || w != words {
        return Err(Error::shape(
            op,
            "masks",
            format!("[M >= 1, {words}] (E = {experts})"),
            format!("{:?}", m.masks.shape()),
        ));
    }
    if let Some(index) = m.index
        && index.shape() != [tokens]
    {
        return Err(Error::shape(
            op,
            "mask_index",
            format!("[T] = [{tokens}]"),
            format!("{:?}", index.shape()),
        ));
    }
    check_status_shape(op, status)?;
    m.masks.check_device(op, "masks", dev)?;
    if let Some(index) = m.index {
        index.check_device(op, "mask_index", dev)?;
    }
    status.check_device(op, "status", dev)?;
    Ok(MaskFields {
        masks: m.masks.device_ptr(dev),
        mask_index: m.index.map_or(0, |i| i.device_ptr(dev)),
        status: status.device_ptr_mut(dev),
        mask_words: i32::try_from(words).expect("E <= 1024"),
        mask_count: i32::try_from(count)
            .map_err(|_| Error::shape(op, "masks", "at most 2^31 - 1 masks", format!("{count}")))?,
    })
}

fn check_status_shape(op: &'static str, status: &Tensor<i32>) -> Result<()> {
    if status.shape() != [route_status::LEN] {
        return Err(Error::shape(
            op,
            "status",
            format!("[{}]", route_status::LEN),
            format!("{:?}", status.shape()),
        ));
    }
    Ok(())
}

/// Reads a routing status ([`route_masked_into`], [`route_given_into`]) and zeroes it: an `Err`
/// naming what the kernels found (given ids out of range or repeated, given weights not finite,
/// mask indices out of range), or `Ok`. Waits for the stream.
pub fn check_status(dev: &Device, op: &'static str, status: &mut Tensor<i32>) -> Result<()> {
    check_status_shape(op, status)?;
    let counts = dev.download(status)?;
    if counts.iter().all(|&c| c == 0) {
        return Ok(());
    }
    dev.fill_bytes(status, 0)?;
    let mut found = Vec::new();
    for (i, what) in [
        (
            route_status::GIVEN_ID_OUT_OF_RANGE,
            "topk_ids: ids outside [-1, E_total)",
        ),
        (
            route_status::GIVEN_ID_REPEATED,
            "topk_ids: ids repeated within a token's row",
        ),
        (
            route_status::GIVEN_WEIGHT_BAD,
            "topk_weights: NaN or infinite weights",
        ),
        (
            route_status::MASK_INDEX_BAD,
            "mask_index: tokens whose mask index is outside [-1, M) (routed to no expert)",
        ),
    ] {
        if counts[i] != 0 {
            found.push(format!("{} {what}", counts[i]));
        }
    }
    Err(Error::DeviceCheck {
        op,
        what: format!("{} (those slots ran as unused)", found.join("; ")),
    })
}

/// Routing given by the caller (`ids_in`, `weights_in`, `[T, K]` i32 and f32, on the device),
/// checked on the device and copied into `ids` and `weights` (`[T, K]`): a slot whose id is
/// outside [-1, `experts`), repeats an earlier slot's id in its row, or has a NaN or infinite
/// weight becomes id -1 with weight 0 and is counted in `status [4]` (entries 0, 1, 2), which
/// [`check_status`] turns into an `Err`. Id -1 is an unused slot; its weight is ignored.
#[allow(clippy::too_many_arguments)] // destination, source, width, status
pub fn route_given_into(
    dev: &Device,
    ids: &mut Tensor<i32>,
    weights: &mut Tensor<f32>,
    ids_in: &Tensor<i32>,
    weights_in: &Tensor<f32>,
    experts: usize,
    status: &mut Tensor<i32>,
) -> Result<()> {
    const OP: &str = "route_given";
    let (tokens, k) = ids_in.dims2(OP, "topk_ids", "[T, K]")?;
    if k == 0 || k > MAX_K {
        return Err(Error::shape(
            OP,
            "topk_ids",
            format!("[T, K] with 1 <= K <= {MAX_K}"),
            format!("{:?}", ids_in.shape()),
        ));
    }
    for (arg, shape) in [
        ("topk_weights", weights_in.shape()),
        ("ids", ids.shape()),
        ("weights", weights.shape()),
    ] {
        if shape != [tokens, k] {
            return Err(Error::shape(
                OP,
                arg,
                format!("[T, K] = [{tokens}, {k}] (as topk_ids)"),
                format!("{shape:?}"),
            ));
        }
    }
    check_status_shape(OP, status)?;
    let experts_i32 = i32::try_from(experts)
        .ok()
        .filter(|&e| e >= 1)
        .ok_or_else(|| Error::shape(OP, "experts", "1..2^31", format!("{experts}")))?;
    let tokens_i32 = i32::try_from(tokens).map_err(|_| {
        Error::shape(
            OP,
            "topk_ids",
            format!("at most {} tokens", i32::MAX),
            format!("{tokens}"),
        )
    })?;
    ids_in.check_device(OP, "topk_ids", dev)?;
    weights_in.check_device(OP, "topk_weights", dev)?;
    ids.check_device(OP, "ids", dev)?;
    weights.check_device(OP, "weights", dev)?;
    status.check_device(OP, "status", dev)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = RouteGivenParams {
        ids: ids.device_ptr_mut(dev),
        weights: weights.device_ptr_mut(dev),
        ids_in: ids_in.device_ptr(dev),
        weights_in: weights_in.device_ptr(dev),
        status: status.device_ptr_mut(dev),
        tokens: tokens_i32,
        k: i32::try_from(k).expect("K <= 32"),
        experts: experts_i32,
        pad_: 0,
    };
    let func = dev.function(OP, Module::Routing, "route_given")?;
    let cfg = route_launch(tokens);
    // SAFETY: `route_given` takes one RouteGivenParams (mirrored in src/params.rs). ids_in,
    // weights_in, ids and weights are [T, K] with K <= 32 and status is [4] (all checked above,
    // on this device). Warp w of block b handles token 4b + w and returns when that is >= T;
    // lane k < K reads and writes slot k of its token's row, and adds to status entries 0..3.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// [`route_into`], with [`route_masked_into`]'s masks and status where given.
#[allow(clippy::too_many_arguments)] // route_into's operands and the optional masks
pub(crate) fn route_inner<T: Float>(
    dev: &Device,
    ids: &mut Tensor<i32>,
    weights: &mut Tensor<f32>,
    counts: Option<&mut Tensor<i32>>,
    logits: &Tensor<T>,
    cfg: &RouterConfig,
    bias: Option<&Tensor<f32>>,
    masks: Option<(ExpertMasks<'_>, &mut Tensor<i32>)>,
) -> Result<()> {
    const OP: &str = "route";
    let (tokens, experts) = logits.dims2(OP, "logits", "[T, E]")?;
    cfg.validate(OP, experts, bias.map(|b| b.numel()))?;
    let mask = mask_params(OP, dev, masks, tokens, experts)?;
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

    let params = mask.apply(RouteParams {
        ids: ids.device_ptr_mut(dev),
        weights: weights.device_ptr_mut(dev),
        counts: counts_ptr,
        logits: logits.device_ptr(dev),
        bias: bias_ptr,
        ..route_params(cfg, tokens_i32, experts)
    });
    let name = format!("route_{}_e{}", T::DTYPE.name(), route_capacity(experts));
    let func = dev.function(OP, Module::Routing, &name)?;
    let cfg = route_launch(tokens);
    // SAFETY: `route_{dtype}_e{capacity}` takes one RouteParams by value (mirrored in
    // src/params.rs) and holds up to `capacity` >= E experts per token. logits is [T, E] of the
    // kernel's dtype; ids and weights are [T, K]; counts, when set, is [E]; bias, when set, is
    // [E] (validate() checked its length) and is set exactly for the rule that reads it. Warp w
    // of block b routes token 4b + w and returns when that is >= T; it reads logits[t, 0..E) and
    // writes ids/weights[t, 0..K); ids it counts are in [0, E). Where masks are set (checked
    // by mask_params) they are [M, ceil(E / 32)] u32 with mask_count = M, mask_index is [T] or
    // null, and status is [4]: the kernel reads a mask row only for an index it found in [0, M).
    // All tensors are on this device.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}

/// The launch of a one-warp-per-token routing kernel (`route_*`, `route_given`) over `tokens`
/// tokens, `tokens <= i32::MAX` (checked by the callers).
pub(crate) fn route_launch(tokens: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            u32::try_from(tokens.div_ceil(ROUTE_WARPS)).expect("T <= i32::MAX, checked"),
            1,
            1,
        ),
        block_dim: (32 * ROUTE_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
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
        masks: 0,
        mask_index: 0,
        status: 0,
        mask_words: 0,
        mask_count: 0,
    }
}

/// The route instance that holds `experts` per token: `..._e{route_capacity}`.
pub(crate) fn route_capacity(experts: usize) -> usize {
    experts.next_power_of_two().max(32)
}
