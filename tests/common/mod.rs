//! Shared by the integration tests: the GPU-or-skip policy.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;

use moe_kernels::{Device, kernels};

/// The device for a GPU test, or `None` after printing one `SKIPPED: <reason>` line.
/// With `MOE_REQUIRE_GPU=1` a missing device or missing kernels fail the test instead.
pub fn gpu(test: &str) -> Option<Device> {
    let reason = match Device::new(0) {
        Ok(dev) if kernels::built() => return Some(dev),
        Ok(_) => "kernels were not compiled into this build".to_string(),
        Err(e) => e.to_string(),
    };
    if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("{test}: MOE_REQUIRE_GPU=1 but {reason}");
    }
    // Straight to the file descriptor: the test harness captures print! but not this, so the
    // line shows in an ordinary `cargo test` run.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {reason}");
    None
}

/// The fixtures made by transformers: `MOE_FIXTURES` when set (the GPU bundle carries its own
/// copy), else tests/fixtures of this checkout.
pub fn fixtures_dir() -> std::path::PathBuf {
    match std::env::var_os("MOE_FIXTURES") {
        Some(p) => p.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}
