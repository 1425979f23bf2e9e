//! Shared by the benches: device selection, event timing for criterion, and rotation of inputs
//! so that no iteration reads from a warm L2.
#![allow(dead_code)] // each bench uses its own subset

use std::time::Duration;

use criterion::Criterion;
use moe_kernels::{Device, Result, kernels};

/// The device, or `None` after printing one `SKIPPED: <reason>` line; with `MOE_REQUIRE_GPU=1`
/// a missing device exits with an error instead. On the CPU emulator it says so first.
pub fn gpu(bench: &str) -> Option<Device> {
    let reason = match Device::new(0) {
        Ok(dev) if kernels::built() => {
            if dev.info().emulated {
                println!(
                    "NOTE: {bench}: the device is the CPU emulator: the kernels run on the host, at \
                     the smallest shapes only, and every time below is the emulator's, not a GPU \
                     figure"
                );
            }
            return Some(dev);
        }
        Ok(_) => "kernels were not compiled into this build".to_string(),
        Err(e) => e.to_string(),
    };
    if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        eprintln!("{bench}: MOE_REQUIRE_GPU=1 but {reason}");
        std::process::exit(1);
    }
    println!("SKIPPED: {bench}: {reason}");
    None
}

/// How many copies of an input set of `bytes` to rotate through so that together they exceed
/// four times the L2 (50 MB on an H100, 60 MB on an H200), at least one.
pub fn rotation(dev: &Device, bytes: usize) -> usize {
    let l2 = usize::try_from(dev.info().l2_bytes).unwrap_or(64 << 20);
    (4 * l2).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// Device time of `iters` calls of `launch(i)`, for criterion's `iter_custom`.
pub fn time_iters(
    dev: &Device,
    iters: u64,
    mut launch: impl FnMut(usize) -> Result<()>,
) -> Duration {
    let timer = dev.timer().expect("timer events");
    timer
        .time(dev, || {
            for i in 0..iters {
                launch(i as usize)?;
            }
            Ok(())
        })
        .expect("timed launches")
}

/// An MoE block's shape, from the model's published config.json.
pub struct Model {
    pub name: &'static str,
    pub h: usize,
    pub i: usize,
    pub e: usize,
    pub k: usize,
}

/// Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3.
pub const MODELS: [Model; 3] = [
    Model {
        name: "mixtral-8x7b",
        h: 4096,
        i: 14336,
        e: 8,
        k: 2,
    },
    Model {
        name: "qwen3-30b-a3b",
        h: 2048,
        i: 768,
        e: 128,
        k: 8,
    },
    Model {
        name: "deepseek-v3",
        h: 7168,
        i: 2048,
        e: 256,
        k: 8,
    },
];

/// A block the CPU emulator runs in moments, with Qwen3-30B-A3B's routing and shape ratios. The
/// three real models (`MODELS`) are for hardware only.
pub const EMULATED_MODELS: [Model; 1] = [Model {
    name: "small",
    h: 512,
    i: 192,
    e: 32,
    k: 4,
}];

/// The models to bench on this device.
pub fn models(dev: &Device) -> &'static [Model] {
    if dev.info().emulated {
        &EMULATED_MODELS
    } else {
        &MODELS
    }
}

/// The sizes to bench on this device: all of them on hardware, those `small` keeps on the
/// emulator.
pub fn sizes<T: Copy>(dev: &Device, all: &[T], small: impl Fn(&T) -> bool) -> Vec<T> {
    all.iter()
        .copied()
        .filter(|v| !dev.info().emulated || small(v))
        .collect()
}

/// Criterion as the command line sets it; on the emulator, a few short samples.
pub fn criterion(dev: &Device) -> Criterion {
    let c = Criterion::default();
    let c = if dev.info().emulated {
        c.sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(500))
    } else {
        c
    };
    c.configure_from_args()
}
