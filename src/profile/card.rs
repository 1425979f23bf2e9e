//! The cards the model knows, and every constant it uses, each with where it comes from.
//!
//! This file is the model's one place for numbers: docs/MODEL.md repeats them with the same
//! sources, and a test holds the two together. Floors use the datasheet figures; the model uses
//! the measured (or, where nothing was measured, assumed) rates. A rate changes only with a
//! calibration run on the named card (docs/MODEL.md, "Calibration").

use crate::error::{Error, Result};

/// Where a figure comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Source {
    /// A vendor datasheet, whitepaper or programming guide.
    Datasheet(&'static str),
    /// A measurement on the hardware (whose and how is in the text).
    Measured(&'static str),
    /// Nobody measured it: a stated assumption, to be replaced by a calibration.
    Assumed(&'static str),
    /// Computed from other figures of this file (the text says how).
    Derived(&'static str),
}

impl Source {
    /// `datasheet`, `measured`, `assumed` or `derived`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Datasheet(_) => "datasheet",
            Source::Measured(_) => "measured",
            Source::Assumed(_) => "assumed",
            Source::Derived(_) => "derived",
        }
    }

    pub fn text(&self) -> &'static str {
        match self {
            Source::Datasheet(s)
            | Source::Measured(s)
            | Source::Assumed(s)
            | Source::Derived(s) => s,
        }
    }
}

/// A number and its source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Figure {
    pub value: f64,
    pub source: Source,
}

const fn datasheet(value: f64, why: &'static str) -> Figure {
    Figure {
        value,
        source: Source::Datasheet(why),
    }
}

const fn measured(value: f64, why: &'static str) -> Figure {
    Figure {
        value,
        source: Source::Measured(why),
    }
}

const fn assumed(value: f64, why: &'static str) -> Figure {
    Figure {
        value,
        source: Source::Assumed(why),
    }
}

const fn derived(value: f64, why: &'static str) -> Figure {
    Figure {
        value,
        source: Source::Derived(why),
    }
}

// ---------------------------------------------------------------------------------------------
// Constants shared by every card.

/// Shared memory serves one wavefront (32 banks x 4 bytes) per clock per SM.
pub const SHARED_BYTES_PER_CLOCK_PER_SM: Figure = datasheet(
    128.0,
    "CUDA C++ Programming Guide, shared memory: 32 banks of 4 bytes, one wavefront per clock",
);

/// The bytes of one shared-memory wavefront: 32 banks x 4 bytes (a definition, not a rate).
pub const WAVEFRONT_BYTES: f64 = 128.0;

/// The bytes of one global-memory sector (a definition, not a rate).
pub const SECTOR_BYTES: f64 = 32.0;

/// `mma.sync` (HMMA.16816) on Hopper issues at about 2/3 of the `wgmma` rate.
pub const MMA_SYNC_FRACTION_ON_HOPPER: Figure = measured(
    2.0 / 3.0,
    "FlashAttention-3 (Shah et al., arXiv 2407.08608) and Luo et al., arXiv 2501.12084: \
     mma.sync reaches about 2/3 of the wgmma throughput on H100",
);

/// FP8 matrix rate over the bf16 rate, where no FP8 rate was measured.
pub const FP8_OVER_BF16: Figure = assumed(
    2.0,
    "the datasheets' FP8 : bf16 ratio, until a calibration measures FP8",
);

/// TF32 matrix rate over the bf16 rate.
pub const TF32_OVER_BF16: Figure = datasheet(0.5, "the datasheets' TF32 : bf16 ratio");

/// Global loads a warp keeps in flight, for Little's law.
pub const OUTSTANDING_LOADS_PER_WARP: Figure = assumed(
    4.0,
    "nvcc unrolls the crate's streaming loops 4x (decode kernels' PTX): 4 LDG.128 per lane, \
     2 KB per warp",
);

/// DRAM latency under load, for Little's law.
pub const DRAM_LATENCY_S: Figure = assumed(
    0.8e-6,
    "HBM latency under load of about 0.7-0.9 us; GDDR taken the same",
);

/// The fixed cost of one launch: the grid's start and its drain, on top of the busiest term.
pub const LAUNCH_OVERHEAD_S: Figure = assumed(
    1.0e-6,
    "half of the ~2 us a kernel costs in a CUDA-graph chain",
);

/// The gap between a kernel's end and the start of the next kernel that depends on it.
pub const DEPENDENT_LAUNCH_GAP_S: Figure = assumed(
    1.0e-6,
    "the other half of the ~2 us per kernel in a CUDA-graph chain (no programmatic dependent \
     launch)",
);

/// Hopper's L2 -> SM bandwidth.
pub const HOPPER_L2_BYTES_PER_S: Figure = assumed(
    7.0e12,
    "the low end of an assumed 7-10 TB/s; chips and cheese measured ~5.5 TB/s on the 114-SM \
     H100 PCIe",
);

/// The same L2 bandwidth per SM per clock on every card (Hopper's assumption at 1.755 GHz).
const L2_BYTES_PER_CLOCK_PER_SM: f64 = HOPPER_L2_BYTES_PER_S.value / (132.0 * HOPPER_CLOCK.value);

// ---------------------------------------------------------------------------------------------
// Per-SM limits behind occupancy.

/// The per-SM resources that bound how many blocks are resident (compute capability table of
/// the CUDA C++ Programming Guide, and the rules of the toolkit's `cuda_occupancy.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmLimits {
    /// `sm_90`, `sm_89`, `sm_120`.
    pub arch: &'static str,
    pub max_threads_per_block: u32,
    pub max_warps_per_sm: u32,
    pub max_blocks_per_sm: u32,
    pub regs_per_sm: u32,
    pub max_regs_per_block: u32,
    pub max_regs_per_thread: u32,
    /// Registers are allotted per warp in units of this many.
    pub reg_alloc_unit: u32,
    /// The register file is split evenly among this many sub-partitions; a warp lives in one.
    pub sub_partitions: u32,
    /// Shared memory of an SM at the default (largest) carve-out.
    pub smem_per_sm: u32,
    /// The most static + dynamic shared memory one block may ask for (with the opt-in).
    pub max_smem_per_block: u32,
    /// Shared memory the driver reserves per block (compute capability 8.0 and later).
    pub smem_reserved_per_block: u32,
    /// Shared memory is allotted in units of this many bytes.
    pub smem_alloc_unit: u32,
}

/// Compute capability 9.0 (H100, H200).
pub const SM90: SmLimits = SmLimits {
    arch: "sm_90",
    max_threads_per_block: 1024,
    max_warps_per_sm: 64,
    max_blocks_per_sm: 32,
    regs_per_sm: 65536,
    max_regs_per_block: 65536,
    max_regs_per_thread: 255,
    reg_alloc_unit: 256,
    sub_partitions: 4,
    smem_per_sm: 228 * 1024,
    max_smem_per_block: 227 * 1024,
    smem_reserved_per_block: 1024,
    smem_alloc_unit: 128,
};

/// Compute capability 8.9 (RTX 4090).
pub const SM89: SmLimits = SmLimits {
    arch: "sm_89",
    max_warps_per_sm: 48,
    max_blocks_per_sm: 24,
    smem_per_sm: 100 * 1024,
    max_smem_per_block: 99 * 1024,
    ..SM90
};

/// Compute capability 12.0 (RTX 5090): Ada's per-SM limits.
pub const SM120: SmLimits = SmLimits {
    arch: "sm_120",
    ..SM89
};

// ---------------------------------------------------------------------------------------------
// Cards.

/// A card's figures from its datasheet: what floors use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Datasheet {
    pub dram_bytes_per_s: Figure,
    /// Dense bf16 (and f16) with f32 accumulation.
    pub bf16_flops: Figure,
    /// Dense FP8 with f32 accumulation.
    pub fp8_flops: Figure,
    /// Host link, each direction.
    pub host_link_bytes_per_s: Figure,
    pub boost_clock_hz: Figure,
}

/// The rates the model divides by: measured where someone measured them, else assumed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Device-to-device copy bandwidth.
    pub dram_bytes_per_s: Figure,
    /// Dense bf16 matrix rate of the card's best instruction (`wgmma` on Hopper).
    pub bf16_flops: Figure,
    pub fp8_flops: Figure,
    /// The SM clock under load: shared-memory wavefronts issue at one per clock.
    pub clock_hz: Figure,
    /// L2 -> SM bandwidth, all SMs together.
    pub l2_bytes_per_s: Figure,
    /// `mma.sync`'s rate over the best instruction's (1 where `mma.sync` is the best).
    pub mma_sync_fraction: Figure,
}

/// One card: its SMs, its per-SM limits, its datasheet and the rates the model uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Card {
    /// The name [`Card::parse`] takes: `h100`, `h200`, `rtx4090`, `rtx5090`.
    pub name: &'static str,
    pub product: &'static str,
    pub sms: u32,
    pub l2_bytes: u64,
    /// True when the card has Hopper's warpgroup MMA (`wgmma`).
    pub wgmma: bool,
    pub limits: SmLimits,
    pub datasheet: Datasheet,
    pub rates: Rates,
}

const HOPPER_DATASHEET_BF16: Figure = datasheet(
    989.4e12,
    "NVIDIA H100/H200 datasheets: 989 TFLOP/s dense bf16 (4096 FLOP/clk/SM x 132 SMs x \
     1.83 GHz, H100 whitepaper)",
);
const HOPPER_DATASHEET_FP8: Figure = datasheet(1978.9e12, "NVIDIA H100/H200 datasheets, dense");
const HOPPER_HOST_LINK: Figure = datasheet(
    64.0e9,
    "PCIe Gen5 x16: 128 GB/s both directions together (H100/H200 datasheets)",
);
const HOPPER_BOOST: Figure = datasheet(
    1.83e9,
    "the clock of the 989.4 TFLOP/s figure (H100 whitepaper); 1.98 GHz is the top boost",
);
const HOPPER_CLOCK: Figure = assumed(
    1.755e9,
    "a sustained clock under load, between the 1.46 GHz that 790 TFLOP/s implies and the \
     1.98 GHz top boost",
);
const HOPPER_MMA_SYNC: Figure = MMA_SYNC_FRACTION_ON_HOPPER;
const ONLY_MMA_SYNC: Figure = datasheet(1.0, "mma.sync is the card's matrix instruction");

const H100_BF16: Figure = measured(
    780.0e12,
    "cuBLAS bf16 GEMM at large square shapes: 769-798 TFLOP/s reported; the middle",
);
const H200_BF16: Figure = measured(
    790.0e12,
    "dense bf16 GEMM at large shapes: ~790 TFLOP/s (published runs; not yet reproduced by this \
     crate)",
);

/// H100 SXM5 80 GB.
pub const H100: Card = Card {
    name: "h100",
    product: "NVIDIA H100 SXM5 80 GB",
    sms: 132,
    l2_bytes: 50 << 20,
    wgmma: true,
    limits: SM90,
    datasheet: Datasheet {
        dram_bytes_per_s: datasheet(3.35e12, "NVIDIA H100 datasheet: HBM3, 3.35 TB/s"),
        bf16_flops: HOPPER_DATASHEET_BF16,
        fp8_flops: HOPPER_DATASHEET_FP8,
        host_link_bytes_per_s: HOPPER_HOST_LINK,
        boost_clock_hz: HOPPER_BOOST,
    },
    rates: Rates {
        dram_bytes_per_s: measured(
            3.0e12,
            "device-to-device copy of 1 GB buffers timed with CUDA events: ~3.0 TB/s \
             (published runs; not yet reproduced by this crate)",
        ),
        bf16_flops: H100_BF16,
        fp8_flops: derived(
            FP8_OVER_BF16.value * H100_BF16.value,
            "FP8_OVER_BF16 x the measured bf16 rate",
        ),
        clock_hz: HOPPER_CLOCK,
        l2_bytes_per_s: HOPPER_L2_BYTES_PER_S,
        mma_sync_fraction: HOPPER_MMA_SYNC,
    },
};

/// H200 SXM 141 GB.
pub const H200: Card = Card {
    name: "h200",
    product: "NVIDIA H200 SXM 141 GB",
    datasheet: Datasheet {
        dram_bytes_per_s: datasheet(4.8e12, "NVIDIA H200 datasheet: HBM3e, 4.8 TB/s"),
        ..H100.datasheet
    },
    rates: Rates {
        dram_bytes_per_s: measured(
            4.3e12,
            "device-to-device copy of large buffers: ~4.3 TB/s (published runs; not yet \
             reproduced by this crate)",
        ),
        bf16_flops: H200_BF16,
        fp8_flops: derived(
            FP8_OVER_BF16.value * H200_BF16.value,
            "FP8_OVER_BF16 x the measured bf16 rate",
        ),
        ..H100.rates
    },
    ..H100
};

/// Where nothing was measured on the GeForce cards: Hopper's measured-to-datasheet ratios.
const GEFORCE_DRAM_RATIO: f64 = 0.9;
const GEFORCE_MATRIX_RATIO: f64 = 0.8;

/// GeForce RTX 4090 (AD102, 128 SMs).
pub const RTX4090: Card = Card {
    name: "rtx4090",
    product: "NVIDIA GeForce RTX 4090",
    sms: 128,
    l2_bytes: 72 << 20,
    wgmma: false,
    limits: SM89,
    datasheet: Datasheet {
        dram_bytes_per_s: datasheet(1.008e12, "RTX 4090 specifications: GDDR6X, 1008 GB/s"),
        bf16_flops: datasheet(
            165.2e12,
            "Ada whitepaper: 165.2 TFLOP/s dense bf16 with f32 accumulation",
        ),
        fp8_flops: datasheet(
            330.3e12,
            "Ada whitepaper: 330.3 TFLOP/s dense FP8 with f32 accumulation",
        ),
        host_link_bytes_per_s: datasheet(31.5e9, "PCIe 4.0 x16, each direction"),
        boost_clock_hz: datasheet(2.52e9, "RTX 4090 specifications: 2.52 GHz boost"),
    },
    rates: Rates {
        dram_bytes_per_s: assumed(
            1.008e12 * GEFORCE_DRAM_RATIO,
            "0.9 x datasheet: the H100/H200 measured-to-datasheet copy ratio",
        ),
        bf16_flops: assumed(
            165.2e12 * GEFORCE_MATRIX_RATIO,
            "0.8 x datasheet: the H200 measured-to-datasheet bf16 ratio",
        ),
        fp8_flops: assumed(
            330.3e12 * GEFORCE_MATRIX_RATIO,
            "0.8 x datasheet: the H200 measured-to-datasheet bf16 ratio",
        ),
        clock_hz: assumed(2.52e9, "the datasheet boost clock"),
        l2_bytes_per_s: assumed(
            L2_BYTES_PER_CLOCK_PER_SM * 128.0 * 2.52e9,
            "Hopper's assumed L2 bytes per SM per clock x 128 SMs x 2.52 GHz",
        ),
        mma_sync_fraction: ONLY_MMA_SYNC,
    },
};

/// GeForce RTX 5090 (GB202, 170 SMs).
pub const RTX5090: Card = Card {
    name: "rtx5090",
    product: "NVIDIA GeForce RTX 5090",
    sms: 170,
    l2_bytes: 96 << 20,
    wgmma: false,
    limits: SM120,
    datasheet: Datasheet {
        dram_bytes_per_s: datasheet(1.792e12, "RTX 5090 specifications: GDDR7, 1792 GB/s"),
        bf16_flops: datasheet(
            209.5e12,
            "RTX Blackwell whitepaper: 209.5 TFLOP/s dense bf16 with f32 accumulation",
        ),
        fp8_flops: datasheet(
            419.0e12,
            "RTX Blackwell whitepaper: 419 TFLOP/s dense FP8 with f32 accumulation",
        ),
        host_link_bytes_per_s: datasheet(63.0e9, "PCIe 5.0 x16, each direction"),
        boost_clock_hz: datasheet(2.407e9, "RTX 5090 specifications: 2.41 GHz boost"),
    },
    rates: Rates {
        dram_bytes_per_s: assumed(
            1.792e12 * GEFORCE_DRAM_RATIO,
            "0.9 x datasheet: the H100/H200 measured-to-datasheet copy ratio",
        ),
        bf16_flops: assumed(
            209.5e12 * GEFORCE_MATRIX_RATIO,
            "0.8 x datasheet: the H200 measured-to-datasheet bf16 ratio",
        ),
        fp8_flops: assumed(
            419.0e12 * GEFORCE_MATRIX_RATIO,
            "0.8 x datasheet: the H200 measured-to-datasheet bf16 ratio",
        ),
        clock_hz: assumed(2.407e9, "the datasheet boost clock"),
        l2_bytes_per_s: assumed(
            L2_BYTES_PER_CLOCK_PER_SM * 170.0 * 2.407e9,
            "Hopper's assumed L2 bytes per SM per clock x 170 SMs x 2.41 GHz",
        ),
        mma_sync_fraction: ONLY_MMA_SYNC,
    },
};

/// Every card the model knows.
pub const CARDS: &[Card] = &[H100, H200, RTX4090, RTX5090];

impl Card {
    /// The card named `name` (case and surrounding blanks ignored).
    pub fn parse(name: &str) -> Result<Card> {
        let want = name.trim().to_ascii_lowercase();
        CARDS
            .iter()
            .find(|c| c.name == want)
            .copied()
            .ok_or_else(|| {
                let known: Vec<&str> = CARDS.iter().map(|c| c.name).collect();
                Error::shape(
                    "Card::parse",
                    "name",
                    format!("one of {}", known.join(", ")),
                    format!("{name:?}"),
                )
            })
    }

    /// Every figure of the card, named, for reports and for the docs check.
    pub fn figures(&self) -> Vec<(&'static str, Figure)> {
        let d = &self.datasheet;
        let r = &self.rates;
        vec![
            ("datasheet.dram_bytes_per_s", d.dram_bytes_per_s),
            ("datasheet.bf16_flops", d.bf16_flops),
            ("datasheet.fp8_flops", d.fp8_flops),
            ("datasheet.host_link_bytes_per_s", d.host_link_bytes_per_s),
            ("datasheet.boost_clock_hz", d.boost_clock_hz),
            ("rates.dram_bytes_per_s", r.dram_bytes_per_s),
            ("rates.bf16_flops", r.bf16_flops),
            ("rates.fp8_flops", r.fp8_flops),
            ("rates.clock_hz", r.clock_hz),
            ("rates.l2_bytes_per_s", r.l2_bytes_per_s),
            ("rates.mma_sync_fraction", r.mma_sync_fraction),
        ]
    }
}

/// The constants shared by every card, named.
pub fn constants() -> [(&'static str, Figure); 8] {
    [
        (
            "SHARED_BYTES_PER_CLOCK_PER_SM",
            SHARED_BYTES_PER_CLOCK_PER_SM,
        ),
        ("MMA_SYNC_FRACTION_ON_HOPPER", MMA_SYNC_FRACTION_ON_HOPPER),
        ("FP8_OVER_BF16", FP8_OVER_BF16),
        ("TF32_OVER_BF16", TF32_OVER_BF16),
        ("OUTSTANDING_LOADS_PER_WARP", OUTSTANDING_LOADS_PER_WARP),
        ("DRAM_LATENCY_S", DRAM_LATENCY_S),
        ("LAUNCH_OVERHEAD_S", LAUNCH_OVERHEAD_S),
        ("DEPENDENT_LAUNCH_GAP_S", DEPENDENT_LAUNCH_GAP_S),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_finds_every_card_and_names_the_known_ones_otherwise() {
        for c in CARDS {
            assert_eq!(Card::parse(c.name).unwrap().name, c.name);
        }
        assert_eq!(Card::parse(" H200 ").unwrap().name, "h200");
        let e = Card::parse("a100").unwrap_err().to_string();
        assert!(e.contains("Card::parse"), "{e}");
        assert!(e.contains("h100, h200, rtx4090, rtx5090"), "{e}");
        assert!(e.contains("\"a100\""), "{e}");
    }

    #[test]
    fn floors_use_datasheets_and_the_model_does_not() {
        for c in CARDS {
            for (name, f) in c.figures() {
                if name.starts_with("datasheet.") {
                    assert_eq!(f.source.kind(), "datasheet", "{} {name}", c.name);
                } else if name != "rates.mma_sync_fraction" {
                    assert_ne!(f.source.kind(), "datasheet", "{} {name}", c.name);
                }
                assert!(f.value.is_finite() && f.value > 0.0, "{} {name}", c.name);
                assert!(!f.source.text().is_empty());
            }
            // The model's rates never beat the datasheet.
            assert!(c.rates.dram_bytes_per_s.value <= c.datasheet.dram_bytes_per_s.value);
            assert!(c.rates.bf16_flops.value <= c.datasheet.bf16_flops.value);
            assert!(c.rates.fp8_flops.value <= c.datasheet.fp8_flops.value);
        }
    }

    #[test]
    fn the_datasheet_matrix_rates_follow_from_sms_and_clock() {
        // Hopper: 4096 dense bf16 FLOP per clock per SM; Ada and GeForce Blackwell: 512 with
        // f32 accumulation.
        let per_clk = |c: &Card| {
            c.datasheet.bf16_flops.value / (c.sms as f64 * c.datasheet.boost_clock_hz.value)
        };
        assert!((per_clk(&H100) - 4096.0).abs() < 2.0);
        assert!((per_clk(&RTX4090) - 512.0).abs() < 1.0);
        assert!((per_clk(&RTX5090) - 512.0).abs() < 1.0);
        // The L2 rule reproduces Hopper's assumption.
        let hopper = L2_BYTES_PER_CLOCK_PER_SM * 132.0 * H100.rates.clock_hz.value;
        assert!((hopper - H100.rates.l2_bytes_per_s.value).abs() < 1.0);
    }

    /// `x` to 4 significant digits, trailing zeros dropped.
    fn sig(x: f64) -> String {
        let decimals = (3 - x.abs().log10().floor() as i32).max(0) as usize;
        let s = format!("{x:.decimals$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }

    fn human(name: &str, v: f64) -> String {
        if name.ends_with("bytes_per_s") || name.ends_with("BYTES_PER_S") {
            if v >= 1e12 {
                format!("{} TB/s", sig(v / 1e12))
            } else {
                format!("{} GB/s", sig(v / 1e9))
            }
        } else if name.ends_with("flops") {
            format!("{} TFLOP/s", sig(v / 1e12))
        } else if name.ends_with("clock_hz") {
            format!("{} GHz", sig(v / 1e9))
        } else if name.ends_with("_S") {
            format!("{} us", sig(v * 1e6))
        } else {
            sig(v)
        }
    }

    fn row(name: &str, f: &Figure) -> String {
        format!(
            "| `{name}` | {} | {} | {} |\n",
            human(name, f.value),
            f.source.kind(),
            f.source.text()
        )
    }

    /// The tables docs/MODEL.md must hold, made from this file.
    fn doc_tables() -> Vec<String> {
        const HEAD: &str = "| figure | value | source | why |\n|---|---|---|---|\n";
        let mut tables = Vec::new();
        let mut t = HEAD.to_string();
        for (name, f) in constants() {
            t += &row(name, &f);
        }
        t += &row("HOPPER_L2_BYTES_PER_S", &HOPPER_L2_BYTES_PER_S);
        tables.push(t);
        for c in CARDS {
            let mut t = format!(
                "**{}** ({}): {} SMs, {} MiB L2, {}\n\n{HEAD}",
                c.name,
                c.product,
                c.sms,
                c.l2_bytes >> 20,
                if c.wgmma { "wgmma" } else { "no wgmma" }
            );
            for (name, f) in c.figures() {
                t += &row(name, &f);
            }
            tables.push(t);
        }
        let mut t = "| limit | sm_90 | sm_89 | sm_120 |\n|---|---|---|---|\n".to_string();
        let l = [SM90, SM89, SM120];
        let mut lim = |name: &str, get: fn(&SmLimits) -> u32| {
            t += &format!(
                "| {name} | {} | {} | {} |\n",
                get(&l[0]),
                get(&l[1]),
                get(&l[2])
            );
        };
        lim("threads per block", |l| l.max_threads_per_block);
        lim("warps per SM", |l| l.max_warps_per_sm);
        lim("blocks per SM", |l| l.max_blocks_per_sm);
        lim("registers per SM", |l| l.regs_per_sm);
        lim("registers per block", |l| l.max_regs_per_block);
        lim("registers per thread", |l| l.max_regs_per_thread);
        lim("register allocation unit (per warp)", |l| l.reg_alloc_unit);
        lim("register sub-partitions", |l| l.sub_partitions);
        lim("shared memory per SM (bytes)", |l| l.smem_per_sm);
        lim("shared memory per block (bytes)", |l| l.max_smem_per_block);
        lim("shared memory reserved per block (bytes)", |l| {
            l.smem_reserved_per_block
        });
        lim("shared memory allocation unit (bytes)", |l| {
            l.smem_alloc_unit
        });
        tables.push(t);
        tables
    }

    #[test]
    fn docs_model_md_holds_every_figure_of_this_file() {
        let doc = include_str!("../../docs/MODEL.md");
        let missing: Vec<String> = doc_tables()
            .into_iter()
            .filter(|t| !doc.contains(t.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/MODEL.md lacks these tables (or has old ones):\n\n{}",
            missing.join("\n")
        );
    }
}
