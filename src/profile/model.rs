//! The model: a launch's time on a card from the emulator's exact counters, and the floors.
//!
//! Every figure it gives is *modelled*, never measured. docs/MODEL.md derives each formula and
//! lists what the model cannot see; the constants are in `card.rs`.
//!
//! Four resources, each a time if it were the only limit:
//! - DRAM: the L2 model's DRAM bytes (reads + writes) over the measured copy bandwidth, and the
//!   synchronous reads over what Little's law lets the resident warps keep in flight;
//! - tensor: each instruction class's FLOPs over the card's measured matrix rate for it;
//! - shared: shared-memory wavefronts at one per clock per SM;
//! - L2: sectors the global requests touch (x 32 bytes) and the asynchronous copies' bytes over
//!   the L2 -> SM bandwidth.
//!
//! Memory terms (DRAM, L2) are shared by all SMs: a grid that leaves SMs idle gets the busy
//! SMs' share. Compute terms (tensor, shared) are per SM: their time is the busiest SM's, so a
//! grid that leaves SMs idle, or whose last wave is partial, pays for it. The launch's time is
//! the largest term plus a fixed launch cost.

use super::card::{
    Card, DEPENDENT_LAUNCH_GAP_S, DRAM_LATENCY_S, LAUNCH_OVERHEAD_S, OUTSTANDING_LOADS_PER_WARP,
    SECTOR_BYTES, SHARED_BYTES_PER_CLOCK_PER_SM, TF32_OVER_BF16, WAVEFRONT_BYTES,
};
use super::occupancy::{Occupancy, occupancy};
use super::ptxas;
use super::record::LaunchRecord;
use crate::error::{Error, Result};

/// What bounds a modelled launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// DRAM bandwidth.
    Dram,
    /// DRAM latency: too few bytes in flight for the bandwidth (Little's law).
    DramLatency,
    Tensor,
    /// Shared-memory wavefronts.
    Shared,
    /// L2 -> SM bandwidth.
    L2,
    /// Nothing above the fixed launch cost.
    Launch,
}

impl Limiter {
    pub fn name(self) -> &'static str {
        match self {
            Limiter::Dram => "dram",
            Limiter::DramLatency => "dram latency",
            Limiter::Tensor => "tensor",
            Limiter::Shared => "shared",
            Limiter::L2 => "l2",
            Limiter::Launch => "launch",
        }
    }
}

impl std::fmt::Display for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Each resource's time in microseconds, after the coverage, wave and Little's-law corrections.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Terms {
    pub dram_us: f64,
    pub tensor_us: f64,
    pub shared_us: f64,
    pub l2_us: f64,
    /// The fixed launch cost (LAUNCH_OVERHEAD_S).
    pub launch_us: f64,
}

/// A launch's modelled time and how the model got there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Modelled {
    /// The largest term plus the launch cost.
    pub us: f64,
    pub limiter: Limiter,
    pub terms: Terms,
    pub occupancy: Occupancy,
    pub blocks: u64,
    pub waves: f64,
    /// SMs with at least one block.
    pub active_sms: u32,
    /// The DRAM rate the model grants: the active SMs' share of the measured bandwidth, or less
    /// where Little's law binds (bytes per second).
    pub dram_bytes_per_s: f64,
}

/// The time a launch cannot beat on `card`: its bytes at the datasheet bandwidth or its FLOPs at
/// the datasheet dense bf16 rate, whichever is longer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Floor {
    pub us: f64,
    pub bytes_us: f64,
    pub flops_us: f64,
    /// [`Limiter::Dram`] or [`Limiter::Tensor`].
    pub limiter: Limiter,
}

/// The floor of `bytes` moved and `flops` of dense bf16 (or f16) matrix work, from the
/// datasheet peaks (floors never use the measured rates).
pub fn floor(bytes: f64, flops: f64, card: &Card) -> Floor {
    let bytes_us = bytes.max(0.0) / card.datasheet.dram_bytes_per_s.value * 1e6;
    let flops_us = flops.max(0.0) / card.datasheet.bf16_flops.value * 1e6;
    let (us, limiter) = if flops_us > bytes_us {
        (flops_us, Limiter::Tensor)
    } else {
        (bytes_us, Limiter::Dram)
    };
    Floor {
        us,
        bytes_us,
        flops_us,
        limiter,
    }
}

const OP: &str = "profile::model";

/// The matrix rate the model grants one tensor instruction class on `card`, FLOP/s.
fn tensor_rate(op: &str, dtype: &str, card: &Card) -> Result<f64> {
    let rates = &card.rates;
    let by_dtype = match dtype {
        "bf16" | "f16" => rates.bf16_flops.value,
        "e4m3" | "e5m2" | "fp8" => rates.fp8_flops.value,
        "tf32" => rates.bf16_flops.value * TF32_OVER_BF16.value,
        other => {
            return Err(Error::shape(
                OP,
                "tensor.dtype",
                "bf16, f16, e4m3, e5m2, fp8 or tf32",
                format!("{other:?} ({op})"),
            ));
        }
    };
    if op.starts_with("wgmma.") {
        if !card.wgmma {
            return Err(Error::Unsupported {
                op: OP,
                what: format!("{op} on {} (wgmma is Hopper's)", card.name),
            });
        }
        Ok(by_dtype)
    } else if op.starts_with("mma.") {
        Ok(by_dtype * rates.mma_sync_fraction.value)
    } else {
        Err(Error::shape(
            OP,
            "tensor.op",
            "an mma.* or wgmma.* instruction",
            format!("{op:?}"),
        ))
    }
}

/// A hand-made card needs SMs and positive, finite rates.
fn check_card(card: &Card) -> Result<()> {
    if card.sms == 0 {
        return Err(Error::shape(OP, "card.sms", "at least 1 SM", "0"));
    }
    for (name, f) in card.figures() {
        if !(f.value.is_finite() && f.value > 0.0) {
            return Err(Error::shape(
                OP,
                "card",
                format!("a positive, finite {name}"),
                f.value.to_string(),
            ));
        }
    }
    Ok(())
}

/// The kernel's resources: the record's, else the crate's ptxas report's.
fn record_resources(rec: &LaunchRecord) -> Result<ptxas::Resources> {
    if let Some(r) = &rec.resources {
        return Ok(r.resources());
    }
    ptxas::resources(&rec.kernel).ok_or_else(|| {
        Error::shape(
            OP,
            "record.resources",
            format!(
                "the registers and shared memory of `{}` (in the record, or in the crate's \
                 ptxas report for sm_90)",
                rec.kernel
            ),
            "neither",
        )
    })
}

/// The modelled time of one launch on `card`. Pure: the same record and card give the same
/// answer. Errors when the launch could not run on the card (a block that does not fit, a
/// Hopper-only instruction elsewhere) or names an instruction the model has no rate for.
pub fn model(rec: &LaunchRecord, card: &Card) -> Result<Modelled> {
    check_card(card)?;
    let blocks = rec.blocks();
    if blocks == 0 {
        return Err(Error::shape(
            OP,
            "record.grid",
            "at least one block",
            format!("{:?}", rec.grid),
        ));
    }
    let threads = u32::try_from(rec.block_threads()).map_err(|_| {
        Error::shape(
            OP,
            "record.block",
            "at most 1024 threads",
            format!("{:?}", rec.block),
        )
    })?;
    let occ = occupancy(&record_resources(rec)?, threads, rec.dyn_smem, card)?;

    let sms = u64::from(card.sms);
    let per_sm = u64::from(occ.blocks_per_sm);
    let resident = per_sm * sms;
    let active_sms = blocks.min(sms);
    let waves = blocks as f64 / resident as f64;

    // Compute terms: the busiest SM's blocks over the average SM's. Each wave deals its blocks
    // round robin, one per SM at a time: a full wave puts blocks_per_sm on every SM, a partial
    // one ceil(rest / SMs) on the busiest.
    let busiest = blocks / resident * per_sm + (blocks % resident).div_ceil(sms);
    let compute_stretch = busiest as f64 * sms as f64 / blocks as f64;
    // Memory terms: the active SMs' share of the card's bandwidth.
    let share = active_sms as f64 / sms as f64;

    // DRAM. Little's law on the synchronous loads: the resident warps of each active SM, each
    // with OUTSTANDING_LOADS_PER_WARP requests of the launch's mean size in flight.
    let warps_per_block = f64::from(threads.div_ceil(32));
    let blocks_per_active_sm = if blocks >= resident {
        per_sm as f64
    } else {
        blocks as f64 / active_sms as f64
    };
    let ld = rec.global.ld;
    let bytes_per_request = if ld.requests > 0.0 {
        ld.bytes / ld.requests
    } else {
        0.0
    };
    let in_flight_per_sm = blocks_per_active_sm
        * warps_per_block
        * bytes_per_request
        * OUTSTANDING_LOADS_PER_WARP.value;
    let little_rate = in_flight_per_sm * active_sms as f64 / DRAM_LATENCY_S.value;
    let bandwidth = card.rates.dram_bytes_per_s.value * share;
    let async_bytes = rec.async_copies.total();
    let sync_share = if ld.bytes + async_bytes > 0.0 {
        ld.bytes / (ld.bytes + async_bytes)
    } else {
        0.0
    };
    let dram_bytes = rec.dram.l2_read_bytes + rec.dram.l2_write_bytes;
    let sync_reads = rec.dram.l2_read_bytes * sync_share;
    let bandwidth_s = dram_bytes / bandwidth;
    let latency_s = if sync_reads > 0.0 {
        sync_reads / little_rate
    } else {
        0.0
    };
    let latency_bound = latency_s > bandwidth_s;
    let dram_s = bandwidth_s.max(latency_s);
    let dram_bytes_per_s = if latency_bound {
        // The rate that moves the launch's DRAM bytes in the latency-bound time.
        dram_bytes / latency_s
    } else {
        bandwidth
    };

    // Tensor cores: each instruction class at its rate, one after another on the same pipes.
    let mut tensor_s = 0.0;
    for t in &rec.tensor {
        tensor_s += t.flops / tensor_rate(&t.op, &t.dtype, card)?;
    }
    tensor_s *= compute_stretch;

    // Shared memory: a wavefront moves WAVEFRONT_BYTES; an SM moves
    // SHARED_BYTES_PER_CLOCK_PER_SM per clock, i.e. one wavefront per clock.
    let shared_bytes_per_s =
        SHARED_BYTES_PER_CLOCK_PER_SM.value * card.rates.clock_hz.value * sms as f64;
    let shared_s = rec.shared.wavefronts() * WAVEFRONT_BYTES / shared_bytes_per_s * compute_stretch;

    // L2: the sectors global requests touch, and the asynchronous copies. cp.async's global side
    // counts by its sectors when the record has them, else by its bytes.
    let g = &rec.global;
    let cp_async_l2 = if g.ldgsts.requests > 0.0 {
        g.ldgsts.sectors * SECTOR_BYTES
    } else {
        rec.async_copies.cp_async_bytes
    };
    let l2_bytes = (g.ld.sectors + g.st.sectors + g.atom.sectors) * SECTOR_BYTES
        + cp_async_l2
        + rec.async_copies.bulk_bytes
        + rec.async_copies.tensor_bytes;
    let l2_s = l2_bytes / (card.rates.l2_bytes_per_s.value * share);

    let terms = Terms {
        dram_us: dram_s * 1e6,
        tensor_us: tensor_s * 1e6,
        shared_us: shared_s * 1e6,
        l2_us: l2_s * 1e6,
        launch_us: LAUNCH_OVERHEAD_S.value * 1e6,
    };
    let dram_limiter = if latency_bound {
        Limiter::DramLatency
    } else {
        Limiter::Dram
    };
    let (busiest_us, limiter) = [
        (terms.dram_us, dram_limiter),
        (terms.tensor_us, Limiter::Tensor),
        (terms.shared_us, Limiter::Shared),
        (terms.l2_us, Limiter::L2),
    ]
    .into_iter()
    .fold(
        (0.0, Limiter::Launch),
        |best, t| {
            if t.0 > best.0 { t } else { best }
        },
    );
    let limiter = if busiest_us < terms.launch_us {
        Limiter::Launch
    } else {
        limiter
    };
    Ok(Modelled {
        us: busiest_us + terms.launch_us,
        limiter,
        terms,
        occupancy: occ,
        blocks,
        waves,
        active_sms: u32::try_from(active_sms).unwrap_or(card.sms),
        dram_bytes_per_s,
    })
}

/// A chain of dependent launches (a CUDA graph without programmatic dependent launch): each
/// launch's time plus DEPENDENT_LAUNCH_GAP_S between consecutive ones, in microseconds.
pub fn chain_us(launches: &[Modelled]) -> f64 {
    let gaps = launches.len().saturating_sub(1) as f64;
    launches.iter().map(|m| m.us).sum::<f64>() + gaps * DEPENDENT_LAUNCH_GAP_S.value * 1e6
}

#[cfg(test)]
mod tests {
    use super::super::card::{H100, H200, RTX4090};
    use super::super::record::{
        AsyncCounters, DramCounters, GlobalCount, GlobalCounters, RecordResources, SharedCounters,
        TensorCount,
    };
    use super::*;

    /// A launch of `grid` blocks of `threads` with `regs` registers and `dyn_smem`, no traffic.
    fn launch(grid: u32, threads: u32, regs: u32, dyn_smem: u32) -> LaunchRecord {
        LaunchRecord {
            kernel: "test_kernel".into(),
            grid: [grid, 1, 1],
            block: [threads, 1, 1],
            dyn_smem,
            sampled: 1.0,
            resources: Some(RecordResources {
                regs,
                static_smem: 0,
                local: 0,
                blocks_per_sm: 0,
                limiter: String::new(),
            }),
            global: GlobalCounters::default(),
            dram: DramCounters::default(),
            shared: SharedCounters::default(),
            async_copies: AsyncCounters::default(),
            tensor: Vec::new(),
        }
    }

    /// Streaming loads: LDG.128 by every lane (512 bytes per request, 16 sectors).
    fn stream(rec: &mut LaunchRecord, read: f64, write: f64) {
        rec.global.ld = GlobalCount {
            requests: read / 512.0,
            sectors: read / 32.0,
            bytes: read,
        };
        rec.dram.l2_read_bytes = read;
        rec.dram.l2_write_bytes = write;
    }

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= 1e-9 * want.abs().max(1e-9)
    }

    #[track_caller]
    fn assert_close(got: f64, want: f64) {
        assert!(close(got, want), "got {got}, want {want}");
    }

    #[test]
    fn dram_bound_decode() {
        // Qwen3's gate/up GEMV at T = 1: 768 blocks of 256 threads, 72 registers: 3 per SM,
        // 1.94 waves. 43 MB read + 0 written at H200's measured 4.3 TB/s: 10 us, +1 us launch.
        let mut r = launch(768, 256, 72, 0);
        stream(&mut r, 43.0e6, 0.0);
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.occupancy.blocks_per_sm, 3);
        assert_eq!((m.blocks, m.active_sms), (768, 132));
        assert_close(m.waves, 768.0 / 396.0);
        assert_close(m.terms.dram_us, 10.0);
        assert_close(m.us, 11.0);
        assert_eq!(m.limiter, Limiter::Dram);
        assert_close(m.dram_bytes_per_s, 4.3e12);
        // 24 warps x 512 B x 4 = 48 KB per SM in flight: 7.9 TB/s by Little's law, not binding.
        // L2: 43e6 / 32 sectors x 32 bytes at 7 TB/s = 6.14 us.
        assert_close(m.terms.l2_us, 43.0e6 / 7.0e12 * 1e6);
        // The same launch on H100 at 3.0 TB/s.
        assert_close(
            model(&r, &H100).unwrap().terms.dram_us,
            43.0e6 / 3.0e12 * 1e6,
        );
        // Writes count at the same rate.
        stream(&mut r, 43.0e6, 4.3e6);
        assert_close(model(&r, &H200).unwrap().terms.dram_us, 11.0);
    }

    #[test]
    fn tensor_bound_gemm() {
        // v3-like: 132 persistent blocks of 384 threads, 168 registers, 129 KB dynamic: one per
        // SM, one full wave. 1e12 FLOPs of wgmma bf16 at 790 TFLOP/s = 1265.82 us.
        let mut r = launch(132, 384, 168, 129 * 1024);
        r.tensor.push(TensorCount {
            op: "wgmma.m64n128k16".into(),
            dtype: "bf16".into(),
            count: 1e12 / (2.0 * 64.0 * 128.0 * 16.0),
            flops: 1e12,
        });
        stream(&mut r, 1.0e9, 0.0);
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.occupancy.blocks_per_sm, 1);
        assert_close(m.terms.tensor_us, 1e12 / 790e12 * 1e6);
        assert_eq!(m.limiter, Limiter::Tensor);
        assert_close(m.us, 1e12 / 790e12 * 1e6 + 1.0);
        // mma.sync runs at 2/3 of that on Hopper; FP8 at twice the bf16 rate.
        r.tensor[0].op = "mma.m16n8k16".into();
        assert_close(
            model(&r, &H200).unwrap().terms.tensor_us,
            1e12 / (790e12 * 2.0 / 3.0) * 1e6,
        );
        r.tensor[0].dtype = "e4m3".into();
        assert_close(
            model(&r, &H200).unwrap().terms.tensor_us,
            1e12 / (1580e12 * 2.0 / 3.0) * 1e6,
        );
        // Two classes add up.
        r.tensor.push(TensorCount {
            op: "wgmma.m64n128k16".into(),
            dtype: "f16".into(),
            count: 0.0,
            flops: 1e12,
        });
        let want = 1e12 / (1580e12 * 2.0 / 3.0) + 1e12 / 790e12;
        assert_close(model(&r, &H200).unwrap().terms.tensor_us, want * 1e6);
    }

    #[test]
    fn shared_bound() {
        // 264 blocks, 2 per SM (126 registers, 64 KB): one wave. 132 SMs x 1.755 GHz x 10 us
        // of wavefronts = 10 us.
        let mut r = launch(264, 256, 126, 64 * 1024);
        r.shared.ldmatrix.wavefronts = 132.0 * 1.755e9 * 10e-6 / 2.0;
        r.shared.st.wavefronts = 132.0 * 1.755e9 * 10e-6 / 2.0;
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.occupancy.blocks_per_sm, 2);
        assert_close(m.terms.shared_us, 10.0);
        assert_eq!(m.limiter, Limiter::Shared);
        assert_close(m.us, 11.0);
    }

    #[test]
    fn tiny_grid_is_latency_bound() {
        // One block of 8 warps streaming 1 MB: one SM's share of 4.3 TB/s is 32.6 GB/s, but
        // 8 warps x 512 B x 4 = 16 KB in flight over 0.8 us is 20.48 GB/s: 48.83 us.
        let mut r = launch(1, 256, 34, 0);
        stream(&mut r, 1.0e6, 0.0);
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.active_sms, 1);
        assert_eq!(m.limiter, Limiter::DramLatency);
        assert_close(m.dram_bytes_per_s, 16384.0 / 0.8e-6);
        assert_close(m.terms.dram_us, 1.0e6 / (16384.0 / 0.8e-6) * 1e6);
        // L2 sees the same single SM's share: 1 MB at 7 TB/s / 132.
        assert_close(m.terms.l2_us, 1.0e6 / (7.0e12 / 132.0) * 1e6);
        // 32 such blocks: 32 SMs, 32 x 20.48 GB/s.
        let mut r = launch(32, 256, 34, 0);
        stream(&mut r, 32.0e6, 0.0);
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.active_sms, 32);
        assert_close(m.terms.dram_us, 32.0e6 / (32.0 * 16384.0 / 0.8e-6) * 1e6);
        // Asynchronous copies do not wait on Little's law: the same bytes by TMA are bandwidth
        // bound at the 32 SMs' share.
        r.global.ld = GlobalCount::default();
        r.async_copies.tensor_bytes = 32.0e6;
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.limiter, Limiter::Dram);
        assert_close(m.terms.dram_us, 32.0e6 / (4.3e12 * 32.0 / 132.0) * 1e6);
    }

    #[test]
    fn partial_waves_and_idle_sms_cost_compute_terms() {
        let gemm = |blocks: u32, threads: u32, regs: u32, dyn_smem: u32| {
            let mut r = launch(blocks, threads, regs, dyn_smem);
            r.tensor.push(TensorCount {
                op: "wgmma.m64n128k16".into(),
                dtype: "bf16".into(),
                count: 0.0,
                flops: 1e9 * f64::from(blocks),
            });
            model(&r, &H200).unwrap()
        };
        let per_block_us = 1e9 / 790e12 * 1e6;
        // One block per SM: 133 blocks take two full waves, as long as 264.
        let m = gemm(133, 384, 168, 129 * 1024);
        assert_close(m.terms.tensor_us, 2.0 * 132.0 * per_block_us);
        assert_close(
            gemm(264, 384, 168, 129 * 1024).terms.tensor_us,
            2.0 * 132.0 * per_block_us,
        );
        // 3 per SM: 397 blocks put 4 on the busiest SM (3 + 1): 4/3 of a wave.
        let m = gemm(397, 256, 72, 0);
        assert_eq!(m.occupancy.blocks_per_sm, 3);
        assert_close(m.terms.tensor_us, 4.0 * 132.0 * per_block_us);
        // A partial wave that puts 3 on some SM costs the full wave: 2 x 3 per SM.
        assert_close(
            gemm(768, 256, 72, 0).terms.tensor_us,
            6.0 * 132.0 * per_block_us,
        );
        // Fewer blocks than SMs: each block alone on its SM at the SM's share of the rate.
        let m = gemm(10, 256, 72, 0);
        assert_eq!(m.active_sms, 10);
        assert_close(m.terms.tensor_us, 132.0 * per_block_us);
        // Memory terms do not pay the tail: 397 blocks at 3 per SM stream at the full rate.
        let mut r = launch(397, 256, 72, 0);
        stream(&mut r, 397.0e6, 0.0);
        assert_close(
            model(&r, &H200).unwrap().terms.dram_us,
            397.0e6 / 4.3e12 * 1e6,
        );
        // One block of 12 warps per SM keeps 24 KB in flight: below the 26.9 KB that 4.3 TB/s
        // x 0.8 us / 132 SMs needs, so Little's law binds.
        let mut r = launch(133, 384, 168, 129 * 1024);
        stream(&mut r, 133.0e6, 0.0);
        let m = model(&r, &H200).unwrap();
        assert_eq!(m.limiter, Limiter::DramLatency);
        assert_close(m.terms.dram_us, 133.0e6 / (24576.0 * 132.0 / 0.8e-6) * 1e6);
    }

    #[test]
    fn nothing_to_do_is_launch_bound() {
        let m = model(&launch(1, 32, 16, 0), &H200).unwrap();
        assert_eq!(m.limiter, Limiter::Launch);
        assert_close(m.us, 1.0);
        // Three dependent launches: 3 x their time + 2 gaps of 1 us.
        assert_close(chain_us(&[m, m, m]), 5.0);
        assert_eq!(chain_us(&[]), 0.0);
    }

    #[test]
    fn the_model_is_deterministic() {
        let mut r = launch(768, 256, 72, 0);
        stream(&mut r, 43.0e6, 1.0e6);
        r.shared.ld.wavefronts = 1e6;
        assert_eq!(model(&r, &H200).unwrap(), model(&r, &H200).unwrap());
    }

    #[test]
    fn launches_the_model_cannot_price_are_errors() {
        let mut r = launch(0, 256, 72, 0);
        assert!(
            model(&r, &H200)
                .unwrap_err()
                .to_string()
                .contains("record.grid")
        );
        r = launch(1, 2048, 32, 0);
        assert!(
            model(&r, &H200)
                .unwrap_err()
                .to_string()
                .contains("block_threads")
        );
        r = launch(1, 256, 32, 0);
        r.tensor.push(TensorCount {
            op: "wgmma.m64n128k16".into(),
            dtype: "bf16".into(),
            count: 1.0,
            flops: 1.0,
        });
        let e = model(&r, &RTX4090).unwrap_err().to_string();
        assert!(
            e.contains("wgmma is Hopper's") && e.contains("rtx4090"),
            "{e}"
        );
        r.tensor[0].op = "mma.m16n8k16".into();
        assert!(model(&r, &RTX4090).is_ok());
        r.tensor[0].dtype = "f64".into();
        let e = model(&r, &H200).unwrap_err().to_string();
        assert!(e.contains("tensor.dtype") && e.contains("\"f64\""), "{e}");
        r.tensor[0].dtype = "bf16".into();
        r.tensor[0].op = "hmma".into();
        assert!(
            model(&r, &H200)
                .unwrap_err()
                .to_string()
                .contains("tensor.op")
        );
        // A hand-made card without SMs, or with a zero rate.
        r = launch(1, 256, 32, 0);
        let no_sms = Card { sms: 0, ..H200 };
        assert!(
            model(&r, &no_sms)
                .unwrap_err()
                .to_string()
                .contains("card.sms")
        );
        let mut no_dram = H200;
        no_dram.rates.dram_bytes_per_s.value = 0.0;
        let e = model(&r, &no_dram).unwrap_err().to_string();
        assert!(e.contains("rates.dram_bytes_per_s"), "{e}");
        // A grid too large for any card saturates instead of overflowing.
        r.grid = [u32::MAX; 3];
        assert_eq!(r.blocks(), u64::MAX);
        assert!(model(&r, &H200).is_ok());
        // Without resources in the record or in the report.
        r = launch(1, 256, 32, 0);
        r.resources = None;
        let e = model(&r, &H200).unwrap_err().to_string();
        assert!(
            e.contains("record.resources") && e.contains("test_kernel"),
            "{e}"
        );
    }

    #[test]
    fn floors_use_datasheet_peaks() {
        let f = floor(4.8e6, 1e8, &H200);
        assert_close(f.bytes_us, 1.0);
        assert_close(f.flops_us, 1e8 / 989.4e12 * 1e6);
        assert_eq!(f.limiter, Limiter::Dram);
        assert_close(f.us, 1.0);
        let f = floor(3.35e6, 989.4e9, &H100);
        assert_close(f.flops_us, 1000.0);
        assert_eq!((f.limiter, f.us), (Limiter::Tensor, f.flops_us));
        assert_eq!(floor(0.0, 0.0, &H100).us, 0.0);
    }
}
