//! Capacity factor with token dropping (Switch Transformer, GShard).

use cudarc::driver::LaunchConfig;

use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::CapacityParams;

/// Threads per block of `route_capacity`, as `kCapacityThreads` in routing.cu.
const CAPACITY_THREADS: u32 = 256;

/// C = ceil(factor * T * K / E), the slots each expert accepts.
pub fn capacity_for(factor: f64, tokens: usize, k: usize, experts: usize) -> Result<usize> {
    const OP: &str = "capacity_for";
    if !(factor.is_finite() && factor > 0.0) {
        return Err(Error::shape(
            OP,
            "factor",
            "a finite value > 0",
            format!("{factor}"),
        ));
    }
    if experts == 0 {
        return Err(Error::shape(OP, "experts", ">= 1", "0"));
    }
    let c = (factor * tokens as f64 * k as f64 / experts as f64).ceil();
    if c >= i32::MAX as f64 {
        return Err(Error::shape(
            OP,
            "factor",
            "a capacity below 2^31",
            format!("{c}"),
        ));
    }
    Ok(c as usize)
}

/// Applies capacity `capacity` to a routing: slot (t, k) keeps expert e while fewer than
/// `capacity` earlier slots (token-major) chose e. Writes the kept routing to `ids_out` and
/// `weights_out` (-1 and 0 where dropped) and, in `dropped_ids`, the expert each dropped slot
/// wanted (-1 elsewhere). All five tensors are `[T, K]`. Deterministic; no host round trip.
#[allow(clippy::too_many_arguments)] // destination first, then inputs, then sizes, as every op
pub fn apply_capacity_into(
    dev: &Device,
    ids_out: &mut Tensor<i32>,
    weights_out: &mut Tensor<f32>,
    dropped_ids: &mut Tensor<i32>,
    ids: &Tensor<i32>,
    weights: &Tensor<f32>,
    experts: usize,
    capacity: usize,
) -> Result<()> {
    const OP: &str = "apply_capacity";
    ids.dims2(OP, "ids", "[T, K]")?;
    for (arg, shape) in [
        ("weights", weights.shape()),
        ("ids_out", ids_out.shape()),
        ("weights_out", weights_out.shape()),
        ("dropped_ids", dropped_ids.shape()),
    ] {
        if shape != ids.shape() {
            return Err(Error::shape(
                OP,
                arg,
                format!("{:?} (as ids)", ids.shape()),
                format!("{shape:?}"),
            ));
        }
    }
    ids.check_device(OP, "ids", dev)?;
    weights.check_device(OP, "weights", dev)?;
    ids_out.check_device(OP, "ids_out", dev)?;
    weights_out.check_device(OP, "weights_out", dev)?;
    dropped_ids.check_device(OP, "dropped_ids", dev)?;
    let experts_i32: i32 = experts
        .try_into()
        .ok()
        .filter(|&e| e >= 1)
        .ok_or_else(|| Error::shape(OP, "experts", "1..2^31", format!("{experts}")))?;
    let capacity: i32 = capacity
        .try_into()
        .map_err(|_| Error::shape(OP, "capacity", "below 2^31", format!("{capacity}")))?;
    let slots: i32 = ids.numel().try_into().map_err(|_| {
        Error::shape(
            OP,
            "ids",
            "fewer than 2^31 slots",
            format!("{}", ids.numel()),
        )
    })?;
    dev.fill_bytes(dropped_ids, 0xff)?;
    if slots == 0 {
        return Ok(());
    }
    let params = CapacityParams {
        ids_out: ids_out.device_ptr_mut(dev),
        weights_out: weights_out.device_ptr_mut(dev),
        dropped_ids: dropped_ids.device_ptr_mut(dev),
        ids: ids.device_ptr(dev),
        weights: weights.device_ptr(dev),
        slots,
        experts: experts_i32,
        capacity,
        pad_: 0,
    };
    let func = dev.function(OP, Module::Routing, "route_capacity")?;
    let cfg = LaunchConfig {
        grid_dim: (experts_i32 as u32, 1, 1),
        block_dim: (CAPACITY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `route_capacity` takes one CapacityParams (mirrored in src/params.rs). All five
    // buffers hold `slots` elements (shapes checked equal); block e only reads slot i < slots
    // and writes slot i where ids[i] == e, or (block 0) where ids[i] is outside [0, E); no two
    // blocks write one slot. grid = E >= 1 blocks of 256 threads.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}
