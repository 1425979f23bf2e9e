//! The statistics training code monitors: tokens per expert, mean router probability, z-loss.

use cudarc::driver::LaunchConfig;

use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::RouterStatsParams;

/// Warps per block of `router_prob_mean_*`, as `kStatsWarps` in routing.cu.
const STATS_WARPS: u32 = 8;

/// Router statistics, on the device.
pub struct RouterStats {
    /// `[E]` tokens routed to each expert / T (sums to K).
    pub fraction: Tensor<f32>,
    /// `[E]` mean over tokens of `softmax(logits)[e]`.
    pub mean_prob: Tensor<f32>,
    /// `[1]` mean over tokens of logsumexp(logits)^2 (ST-MoE's router z-loss).
    pub z_loss: Tensor<f32>,
}

/// Statistics of `logits [T, E]` with the per-expert `counts [E]` that [`super::route_into`]
/// produced. `lse [T]` is workspace. Two launches, deterministic, no host round trip.
pub fn router_stats_into<T: Float>(
    dev: &Device,
    stats: &mut RouterStats,
    lse: &mut Tensor<f32>,
    logits: &Tensor<T>,
    counts: &Tensor<i32>,
) -> Result<()> {
    const OP: &str = "router_stats";
    let (tokens, experts) = logits.dims2(OP, "logits", "[T, E]")?;
    if tokens == 0 || experts == 0 {
        return Err(Error::shape(
            OP,
            "logits",
            "T >= 1 and E >= 1",
            format!("{:?}", logits.shape()),
        ));
    }
    for (arg, shape, want) in [
        ("counts", counts.shape(), vec![experts]),
        ("fraction", stats.fraction.shape(), vec![experts]),
        ("mean_prob", stats.mean_prob.shape(), vec![experts]),
        ("z_loss", stats.z_loss.shape(), vec![1]),
        ("lse", lse.shape(), vec![tokens]),
    ] {
        if shape != want.as_slice() {
            return Err(Error::shape(
                OP,
                arg,
                format!("{want:?}"),
                format!("{shape:?}"),
            ));
        }
    }
    logits.check_device(OP, "logits", dev)?;
    counts.check_device(OP, "counts", dev)?;
    lse.check_device(OP, "lse", dev)?;
    stats.fraction.check_device(OP, "fraction", dev)?;
    stats.mean_prob.check_device(OP, "mean_prob", dev)?;
    stats.z_loss.check_device(OP, "z_loss", dev)?;
    let as_i32 = |v: usize| {
        i32::try_from(v).map_err(|_| {
            Error::shape(
                OP,
                "logits",
                "dims below 2^31",
                format!("{:?}", logits.shape()),
            )
        })
    };
    let params = RouterStatsParams {
        fraction: stats.fraction.device_ptr_mut(dev),
        mean_prob: stats.mean_prob.device_ptr_mut(dev),
        lse: lse.device_ptr_mut(dev),
        z_loss: stats.z_loss.device_ptr_mut(dev),
        logits: logits.device_ptr(dev),
        counts: counts.device_ptr(dev),
        tokens: as_i32(tokens)?,
        experts: as_i32(experts)?,
    };
    let dtype = T::DTYPE.name();
    let lse_fn = dev.function(OP, Module::Routing, &format!("router_lse_{dtype}"))?;
    let mean_fn = dev.function(OP, Module::Routing, &format!("router_prob_mean_{dtype}"))?;
    let lse_cfg = LaunchConfig {
        grid_dim: (as_i32(tokens.div_ceil(super::ROUTE_WARPS))? as u32, 1, 1),
        block_dim: (32 * super::ROUTE_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mean_cfg = LaunchConfig {
        grid_dim: (as_i32(experts.div_ceil(32))? as u32, 1, 1),
        block_dim: (32 * STATS_WARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: both kernels take one RouterStatsParams (mirrored in src/params.rs). logits is
    // [T, E] of the kernels' dtype, counts/fraction/mean_prob are [E], lse is [T], z_loss is [1]
    // (all checked above). router_lse: warp w of block b handles token 4b + w < T, writing lse[t].
    // router_prob_mean: block b, lane l handles expert 32b + l < E over all tokens t < T, and
    // block 0 writes z_loss[0]; it runs after router_lse on the same stream.
    unsafe {
        dev.launch(OP, &lse_fn, lse_cfg, &params)?;
        dev.launch(OP, &mean_fn, mean_cfg, &params)?;
    }
    Ok(())
}

impl RouterStats {
    /// Zeroed statistics for E experts.
    pub fn new(dev: &Device, experts: usize) -> Result<Self> {
        Ok(RouterStats {
            fraction: dev.zeros(&[experts])?,
            mean_prob: dev.zeros(&[experts])?,
            z_loss: dev.zeros(&[1])?,
        })
    }
}
