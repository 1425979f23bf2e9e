//! Expert parallelism, the local half: what each rank is sent, in what order.

use cudarc::driver::LaunchConfig;

use super::Plan;
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::EpSendParams;

/// Threads of `ep_send`, as `kEpThreads` in permute.cu.
const EP_THREADS: u32 = 1024;
/// The most ranks one block handles.
pub const MAX_RANKS: usize = 1024;

/// With expert e placed on rank `expert_rank[e]`, writes `send_counts [R]` (GEMM slots bound for
/// each rank) and `send_slots [S_max]` (the slots rank-major, then by expert, then in token
/// order; -1 past the total). An expert whose rank is outside `[0, R)` is counted in the plan's
/// status and sends nothing. One launch, after [`Plan::build`].
pub fn ep_send_into(
    dev: &Device,
    send_counts: &mut Tensor<i32>,
    send_slots: &mut Tensor<i32>,
    plan: &mut Plan,
    expert_rank: &Tensor<i32>,
) -> Result<()> {
    const OP: &str = "ep_send";
    let (e, ranks) = (plan.experts(), send_counts.numel());
    if expert_rank.shape() != [e] {
        return Err(Error::shape(
            OP,
            "expert_rank",
            format!("[E] = [{e}]"),
            format!("{:?}", expert_rank.shape()),
        ));
    }
    if send_counts.rank() != 1 || ranks == 0 || ranks > MAX_RANKS {
        return Err(Error::shape(
            OP,
            "send_counts",
            format!("[R] with 1 <= R <= {MAX_RANKS}"),
            format!("{:?}", send_counts.shape()),
        ));
    }
    if send_slots.shape() != plan.sorted_slots.shape() {
        return Err(Error::shape(
            OP,
            "send_slots",
            format!("{:?} (the plan's slots)", plan.sorted_slots.shape()),
            format!("{:?}", send_slots.shape()),
        ));
    }
    send_counts.check_device(OP, "send_counts", dev)?;
    send_slots.check_device(OP, "send_slots", dev)?;
    expert_rank.check_device(OP, "expert_rank", dev)?;
    dev.fill_bytes(send_slots, 0xff)?;
    let params = EpSendParams {
        send_counts: send_counts.device_ptr_mut(dev),
        send_slots: send_slots.device_ptr_mut(dev),
        status: plan.status.device_ptr_mut(dev),
        expert_rank: expert_rank.device_ptr(dev),
        counts: plan.counts.device_ptr(dev),
        offsets: plan.offsets.device_ptr(dev),
        sorted_slots: plan.sorted_slots.device_ptr(dev),
        experts: i32::try_from(e).expect("bounded by Plan::new"),
        ranks: i32::try_from(ranks).expect("bounded above"),
    };
    let func = dev.function(OP, Module::Permute, "ep_send")?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (EP_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `ep_send` takes one EpSendParams (mirrored in src/params.rs). E <= 1024 fits its
    // shared arrays; it reads expert_rank/counts [E], offsets [E+1] and sorted_slots rows
    // offsets[e] .. offsets[e] + counts[e] (inside the plan's S rows), and writes
    // send_counts[r] for r < R and send_slots at positions below the sum of the counts of
    // experts with a valid rank, which is <= S <= S_max. One block of 1024 threads.
    unsafe { dev.launch(OP, &func, cfg, &params) }?;
    Ok(())
}
