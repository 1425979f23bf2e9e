//! How many blocks of a kernel an SM holds at once, by the rules of NVIDIA's occupancy
//! calculator (the CUDA C++ Programming Guide's compute capability table and the toolkit's
//! `cuda_occupancy.h`, which `cudaOccupancyMaxActiveBlocksPerMultiprocessor` implements):
//!
//! - warps: a block takes ceil(threads / 32) warps of the SM's `max_warps_per_sm`;
//! - block slots: at most `max_blocks_per_sm` blocks;
//! - registers: a warp takes regs x 32 registers rounded up to the 256-register allocation unit;
//!   the register file is split evenly among 4 sub-partitions and a warp lives in one, so an SM
//!   holds floor(regs_per_sm / 4 / per_warp) x 4 warps, and floor(that / warps per block)
//!   blocks. A block whose warps, rounded up to a multiple of 4, need more than the 64K
//!   registers a block may have does not launch;
//! - shared memory: a block takes static + dynamic + the 1 KB the driver reserves per block,
//!   rounded up to 128 bytes, out of the SM's 228 KB (the default carve-out is the largest);
//!   static + dynamic may be at most 227 KB.
//!
//! The smallest of the four is the occupancy; ties name the first of blocks, threads, registers,
//! shared memory (as the emulator's record does).

use super::card::{Card, SmLimits};
use super::ptxas::Resources;
use crate::error::{Error, Result};

/// The resource that bounds the resident blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OccupancyLimiter {
    /// The SM's block slots.
    Blocks,
    /// The SM's resident warps (threads).
    Threads,
    Registers,
    SharedMemory,
}

impl OccupancyLimiter {
    /// The name the emulator's records use: `blocks`, `threads`, `registers`, `shared memory`.
    pub fn name(self) -> &'static str {
        match self {
            OccupancyLimiter::Blocks => "blocks",
            OccupancyLimiter::Threads => "threads",
            OccupancyLimiter::Registers => "registers",
            OccupancyLimiter::SharedMemory => "shared memory",
        }
    }
}

impl std::fmt::Display for OccupancyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Resident blocks and warps per SM, and what bounds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub blocks_per_sm: u32,
    pub warps_per_sm: u32,
    pub limiter: OccupancyLimiter,
}

const OP: &str = "profile::occupancy";

/// The occupancy of a kernel with `res` launched with `block_threads` threads per block and
/// `dyn_smem` bytes of dynamic shared memory, on `card`'s SMs. Errors when such a block could
/// not launch at all.
pub fn occupancy(
    res: &Resources,
    block_threads: u32,
    dyn_smem: u32,
    card: &Card,
) -> Result<Occupancy> {
    sm_occupancy(res, block_threads, dyn_smem, &card.limits)
}

/// [`occupancy`] for one set of per-SM limits.
pub fn sm_occupancy(
    res: &Resources,
    block_threads: u32,
    dyn_smem: u32,
    l: &SmLimits,
) -> Result<Occupancy> {
    let units = [
        l.max_threads_per_block,
        l.max_warps_per_sm,
        l.max_blocks_per_sm,
        l.reg_alloc_unit,
        l.sub_partitions,
        l.smem_alloc_unit,
    ];
    if units.contains(&0) {
        return Err(Error::shape(
            OP,
            "limits",
            "per-SM limits and allocation units of at least 1",
            format!("{l:?}"),
        ));
    }
    if block_threads == 0 || block_threads > l.max_threads_per_block {
        return Err(Error::shape(
            OP,
            "block_threads",
            format!("1..={} threads per block", l.max_threads_per_block),
            block_threads.to_string(),
        ));
    }
    if res.regs > l.max_regs_per_thread {
        return Err(Error::shape(
            OP,
            "regs",
            format!("at most {} registers per thread", l.max_regs_per_thread),
            res.regs.to_string(),
        ));
    }
    let smem = u64::from(res.static_smem) + u64::from(dyn_smem);
    if smem > u64::from(l.max_smem_per_block) {
        return Err(Error::shape(
            OP,
            "dyn_smem",
            format!(
                "static ({}) + dynamic shared memory of at most {} bytes per block on {}",
                res.static_smem, l.max_smem_per_block, l.arch
            ),
            format!("{smem} bytes ({dyn_smem} dynamic)"),
        ));
    }
    let warps = block_threads.div_ceil(32);
    let per_warp = (res.regs * 32).div_ceil(l.reg_alloc_unit) * l.reg_alloc_unit;
    let per_block_checked =
        u64::from(per_warp) * u64::from(warps.div_ceil(l.sub_partitions) * l.sub_partitions);
    if per_block_checked > u64::from(l.max_regs_per_block) {
        return Err(Error::shape(
            OP,
            "regs",
            format!(
                "a block's registers within {} ({} registers x {} threads, warps rounded up to \
                 a multiple of {})",
                l.max_regs_per_block, res.regs, block_threads, l.sub_partitions
            ),
            format!("{per_block_checked} registers"),
        ));
    }

    let mut occ = (l.max_blocks_per_sm, OccupancyLimiter::Blocks);
    let mut limit = |n: u32, why: OccupancyLimiter| {
        if n < occ.0 {
            occ = (n, why);
        }
    };
    limit(l.max_warps_per_sm / warps, OccupancyLimiter::Threads);
    // No registers reported (0 per warp): registers do not limit.
    if let Some(per_sub_partition) = (l.regs_per_sm / l.sub_partitions).checked_div(per_warp) {
        limit(
            per_sub_partition * l.sub_partitions / warps,
            OccupancyLimiter::Registers,
        );
    }
    let need = (smem + u64::from(l.smem_reserved_per_block)).div_ceil(u64::from(l.smem_alloc_unit))
        * u64::from(l.smem_alloc_unit);
    // A block that takes no shared memory at all (no reservation either) is not limited by it.
    if let Some(by_smem) = u64::from(l.smem_per_sm).checked_div(need) {
        limit(
            u32::try_from(by_smem).unwrap_or(u32::MAX),
            OccupancyLimiter::SharedMemory,
        );
    }
    let (blocks_per_sm, limiter) = occ;
    if blocks_per_sm == 0 {
        // Every check above passed, so this cannot happen with the cards' limits; a hand-made
        // SmLimits could still get here.
        return Err(Error::shape(
            OP,
            "block",
            format!("a block that fits one {} SM", l.arch),
            format!("0 blocks per SM ({limiter} limit)"),
        ));
    }
    Ok(Occupancy {
        blocks_per_sm,
        warps_per_sm: blocks_per_sm * warps,
        limiter,
    })
}

/// Waves of a grid of `nblocks`: blocks over the blocks all SMs hold at once.
pub fn waves(nblocks: u64, occ: &Occupancy, card: &Card) -> f64 {
    nblocks as f64 / (f64::from(occ.blocks_per_sm) * f64::from(card.sms))
}

#[cfg(test)]
mod tests {
    use super::super::card::{H100, H200, RTX4090, RTX5090, SM90, SmLimits};
    use super::*;

    fn res(regs: u32, static_smem: u32) -> Resources {
        Resources {
            regs,
            static_smem,
            ..Resources::default()
        }
    }

    fn occ(regs: u32, smem: u32, threads: u32, dyn_smem: u32) -> (u32, u32, &'static str) {
        let o = sm_occupancy(&res(regs, smem), threads, dyn_smem, &SM90).unwrap();
        (o.blocks_per_sm, o.warps_per_sm, o.limiter.name())
    }

    #[test]
    fn hand_worked_sm90_cases() {
        // 72 x 32 = 2304 registers per warp (a multiple of 256); 16384 / 2304 = 7 warps per
        // sub-partition, 28 per SM, 3 blocks of 8 warps.
        assert_eq!(occ(72, 384, 256, 0), (3, 24, "registers"));
        // 168 x 32 = 5376 per warp: 3 per sub-partition, 12 per SM, one block of 12 warps. Its
        // 129 KB dynamic + 1 KB static + 1 KB reserved also fits only once: the tie names
        // registers.
        assert_eq!(occ(168, 1024, 384, 129 * 1024), (1, 12, "registers"));
        // 46 x 32 = 1472 -> 1536 per warp: 10 per sub-partition, 40 per SM, 5 blocks.
        assert_eq!(occ(46, 0, 256, 0), (5, 40, "registers"));
        // 34 -> 1280 per warp: 12 per sub-partition, 48 per SM, 6 blocks.
        assert_eq!(occ(34, 0, 256, 0), (6, 48, "registers"));
        // 40 -> 1280 per warp as well; 64 threads: 48 warps / 2 = 24 blocks. (Dividing the
        // whole file, 65536 / 1280 = 51 warps, would say 25: the sub-partitions matter.)
        assert_eq!(occ(40, 0, 64, 0), (24, 48, "registers"));
        // 64 -> 2048 per warp: 32 warps, 4 blocks of 8.
        assert_eq!(occ(64, 0, 256, 0), (4, 32, "registers"));
        // v1 GEMM: 128 regs x 128 threads, 15 KB static: 4 by registers, 14 by shared memory.
        assert_eq!(occ(128, 15 * 1024, 128, 0), (4, 16, "registers"));
        // v2 GEMM: 126 -> 4096 per warp: 2 blocks of 8 warps; 64 KB + 1 KB fits 3 times.
        assert_eq!(occ(126, 0, 256, 64 * 1024), (2, 16, "registers"));
        // 1024 threads: 64 / 32 = 2 blocks by warps; 32 regs also give 2: the tie names threads.
        assert_eq!(occ(32, 0, 1024, 0), (2, 64, "threads"));
        // One warp of 16 registers: 64 by warps, the 32 block slots bind.
        assert_eq!(occ(16, 0, 32, 0), (32, 32, "blocks"));
        // 100 KB dynamic + 1 KB reserved = 103424 bytes: 233472 / 103424 = 2 blocks.
        assert_eq!(occ(16, 0, 128, 100 * 1024), (2, 8, "shared memory"));
        // Rounding to 128 bytes: 1 byte of static shared memory costs 1024 + 128.
        assert_eq!(occ(16, 1, 32, 200 * 1024).0, 1);
        assert_eq!(occ(16, 0, 32, 0).0, 32);
        // No registers reported: only warps, slots and shared memory bound.
        assert_eq!(occ(0, 0, 256, 0), (8, 64, "threads"));
        // Limits without a shared-memory reservation: a block without shared memory is not
        // bounded by it.
        let l = SmLimits {
            smem_reserved_per_block: 0,
            ..SM90
        };
        let o = sm_occupancy(&res(16, 0), 32, 0, &l).unwrap();
        assert_eq!((o.blocks_per_sm, o.limiter), (32, OccupancyLimiter::Blocks));
        // Hand-made limits with a zero unit are an error, not a division by zero.
        let l = SmLimits {
            sub_partitions: 0,
            ..SM90
        };
        let e = sm_occupancy(&res(16, 0), 32, 0, &l)
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument `limits`"), "{e}");
    }

    #[test]
    fn geforce_limits() {
        // 48 warps and 24 block slots per SM; 100 KB of shared memory.
        let o = occupancy(&res(32, 0), 256, 0, &RTX4090).unwrap();
        assert_eq!((o.blocks_per_sm, o.limiter), (6, OccupancyLimiter::Threads));
        let o = occupancy(&res(16, 0), 32, 0, &RTX5090).unwrap();
        assert_eq!((o.blocks_per_sm, o.limiter), (24, OccupancyLimiter::Blocks));
        let o = occupancy(&res(16, 0), 128, 48 * 1024, &RTX4090).unwrap();
        assert_eq!(
            (o.blocks_per_sm, o.limiter),
            (2, OccupancyLimiter::SharedMemory)
        );
        // The Hopper GEMM's 129 KB does not fit an Ada block.
        let e = occupancy(&res(168, 1024), 384, 129 * 1024, &RTX4090).unwrap_err();
        assert!(
            e.to_string().contains("101376 bytes per block on sm_89"),
            "{e}"
        );
    }

    #[test]
    fn launches_that_cannot_fit_are_errors() {
        let r = res(32, 0);
        for (threads, dyn_smem, regs, needle) in [
            (0, 0, 32, "block_threads"),
            (1025, 0, 32, "1..=1024"),
            (256, 227 * 1024 + 1, 32, "dyn_smem"),
            (256, 0, 256, "at most 255 registers"),
            (1024, 0, 255, "a block's registers within 65536"),
            (1024, 0, 65, "a block's registers within 65536"),
        ] {
            let e = occupancy(&Resources { regs, ..r }, threads, dyn_smem, &H100)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("profile::occupancy"), "{e}");
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // 64 x 1024 is exactly the file: it launches, one block.
        assert_eq!(occ(64, 0, 1024, 0), (1, 32, "registers"));
    }

    #[test]
    fn waves_count_blocks_over_what_all_sms_hold() {
        let o = occupancy(&res(72, 384), 256, 0, &H200).unwrap();
        assert!((waves(768, &o, &H200) - 768.0 / 396.0).abs() < 1e-12);
        assert_eq!(waves(0, &o, &H200), 0.0);
    }
}
