//! The `moe-kernels` command: `info`, and with no arguments a short demo that runs every built
//! kernel against its CPU reference.

use std::process::ExitCode;

mod bench;
mod demo;
mod forward;

use clap::{Parser, Subcommand};
use half::{bf16, f16};
use moe_kernels::check;
use moe_kernels::layer::MoeLayer;
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Error, Float, activation, device, kernels};

#[derive(Parser)]
#[command(
    name = "moe-kernels",
    version,
    about = "CUDA kernels for Mixture-of-Experts layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the crate version, how the kernels were built, and the CUDA device, if any.
    Info {
        /// Also print ptxas's register, shared-memory and spill report for every kernel.
        #[arg(long)]
        ptxas: bool,
    },
    /// Run every built kernel on the GPU against its CPU reference (the default command).
    Demo,
    /// Run one MoE block of a Hugging Face checkpoint on an input file.
    Forward(forward::ForwardArgs),
    /// Time every stage of an MoE block of a real model's shapes on the GPU.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Info { ptxas }) => {
            info(ptxas);
            Ok(())
        }
        Some(Command::Demo) | None => demo(),
        Some(Command::Forward(args)) => forward::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info(ptxas: bool) {
    println!("moe-kernels {}", env!("CARGO_PKG_VERSION"));
    match kernels::NVCC_VERSION {
        Some(v) if kernels::built() => {
            println!("kernels: compiled by nvcc ({v})");
            println!("  architectures: {}", kernels::ARCHS.join(", "));
            let names: Vec<&str> = kernels::Module::ALL.iter().map(|m| m.name()).collect();
            println!("  modules: {}", names.join(", "));
        }
        _ => println!(
            "kernels: not compiled (nvcc was not found at build time; see \
             scripts/install-cuda-toolchain.sh)"
        ),
    }
    println!(
        "defaults: decode path auto: v5 for plain experts where T K >= E / 4 and for int4, MXFP4 \
         and FP8 experts where T K >= E, or T K >= E / 2 where an expert's packed weights pass \
         8 MiB, and at every T for int4 experts with act-order (by expert on tensor cores: the tokens routed once, each chosen expert's rows read \
         once per 8 tokens, packed codes converted in registers, then a combine; v4, the same on \
         CUDA cores, where H or I is not a multiple of 32; within tolerance of the CPU on the \
         emulator, modelled faster there), v2 below and for the other packed experts (x staged \
         in shared memory, \
         compressed rows decoded 16 bytes per lane; \
         exact on the emulator, fewer requests and fewer instructions per weight than v1); \
         neither yet run on a GPU; compressed-expert GEMV v2 (the same \
         decoders, a chunk decoded once for up to 8 rows; exact on the emulator, fewer \
         instructions than v1; not yet run on a GPU), prefill GEMM v2 for the routed and the \
         shared experts (exact on the emulator, faster than v1 in its counters and the model from \
         T = 256, within 1% either way at T = 32; not yet run on a GPU; v1 and v3 selectable, v3 the default on Hopper \
         only once it has run there), router projection v2 below 32 tiles of 8 tokens x 8 experts, v3 (tiled, \
         the router weight read once per 8 tokens) from there, the crossing the model gives \
         (the same bits at every T and on every path; emulated, modelled, not yet run on a \
         GPU)"
    );
    match Device::new(0) {
        Ok(dev) => {
            let i = dev.info();
            println!("device 0: {}", i.name);
            println!(
                "  compute capability {}.{}, {} SMs, {:.1} GiB, L2 {:.0} MiB, driver CUDA {}.{}",
                i.compute_capability.0,
                i.compute_capability.1,
                i.sm_count,
                i.total_mem_bytes as f64 / (1u64 << 30) as f64,
                i.l2_bytes as f64 / (1u64 << 20) as f64,
                i.driver_version / 1000,
                (i.driver_version % 1000) / 10
            );
            if i.emulated {
                println!(
                    "  the CPU emulator (emu/, through scripts/emulate): kernels/*.cu run on the \
                     host; results are checked, times are not GPU figures"
                );
            }
        }
        Err(e) => println!(
            "device: none ({}; driver library {})",
            e,
            if device::driver_present() {
                "present"
            } else {
                "absent"
            }
        ),
    }
    if ptxas {
        println!("\nptxas report:\n{}", kernels::PTXAS_REPORT);
    }
}

fn demo() -> Result<(), Error> {
    info(false);
    println!();
    let dev = match Device::new(0) {
        Ok(dev) if kernels::built() => dev,
        Ok(_) => {
            println!("GPU path skipped: the kernels were not compiled into this build.");
            return cpu_demo();
        }
        Err(e) => {
            println!("GPU path skipped: {e}.");
            return cpu_demo();
        }
    };
    let emulated = dev.info().emulated;
    if emulated {
        println!(
            "This is the CPU emulator (scripts/emulate): every kernel below is the real \
             kernels/*.cu,\ncompiled for the host and run thread by thread with bounds, alignment \
             and barrier checks.\nIts results are checked against the CPU references; its times \
             are the emulator's, not GPU figures.\n"
        );
    }
    println!("{:<28} {:>8}  result", "op", "dtype");
    let mut failed = 0;
    for (rows, cols) in [(1, 1), (7, 60), (64, 4096), (3, 151_937)] {
        failed += softmax_case::<f32>(&dev, rows, cols)?;
        failed += softmax_case::<bf16>(&dev, rows, cols)?;
        failed += softmax_case::<f16>(&dev, rows, cols)?;
    }
    println!();
    // The emulator runs a Qwen3-style block at a small shape (and the GEMM path at 256 tokens,
    // not 4096): minutes of emulation buy nothing that this does not check.
    let (cfg, shape, tokens): (_, _, &[usize]) = if emulated {
        (
            demo::small_qwen3_style(),
            "a small Qwen3-style",
            &[1, 16, 256],
        )
    } else {
        (
            demo::qwen3_30b_a3b(),
            "the Qwen3-30B-A3B",
            &[1, 16, 256, 4096],
        )
    };
    println!(
        "MoE layer, {shape} shape (H={}, I={}, E={}, K={}), seeded random bf16 weights:",
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.k()
    );
    let w = demo::random_weights(&cfg, 1);
    let max_t = tokens.iter().copied().max().unwrap_or(1);
    let mut layer = MoeLayer::<bf16>::new(&dev, &cfg, &w, max_t)?;
    println!(
        "{:>6} {:>5} {:>12} {:>12} {:>10}  result",
        "T",
        "path",
        if emulated { "emulator us" } else { "device us" },
        "max |err|",
        "rms(y)"
    );
    for &t in tokens {
        let o = demo::gpu_case(&dev, &cfg, &w, &mut layer, t)?;
        let ties = if o.near_ties > 0 {
            format!(", {} near-tie(s) skipped", o.near_ties)
        } else {
            String::new()
        };
        println!(
            "{:>6} {:>5} {:>12.1} {:>12.3e} {:>10.3e}  {}",
            o.tokens,
            o.path,
            o.micros,
            o.max_err,
            o.scale,
            if o.passed {
                format!(
                    "ok ({} sampled tokens vs the CPU forward{ties})",
                    o.compared
                )
            } else {
                format!("FAIL ({} sampled tokens{ties})", o.compared)
            }
        );
        failed += usize::from(!o.passed);
    }
    if failed > 0 {
        return Err(Error::DeviceCheck {
            op: "demo",
            what: format!("{failed} case(s) disagree with the CPU reference"),
        });
    }
    Ok(())
}

fn softmax_case<T: Float>(dev: &Device, rows: usize, cols: usize) -> Result<usize, Error> {
    let mut rng = Rng::new((rows * 1_000_003 + cols) as u64);
    let x: Vec<T> = rng.normal_vec(rows * cols, 4.0);
    let xd = dev.upload(&x, &[rows, cols])?;
    let y = dev.download(&activation::softmax(dev, &xd)?)?;
    let want =
        activation::reference::softmax(&x.iter().map(|v| v.to_f64()).collect::<Vec<_>>(), cols);
    let report = check::compare(&y, &want, activation::softmax_tolerance::<T>(cols));
    println!(
        "{:<28} {:>8}  {} {}",
        format!("softmax [{rows}, {cols}]"),
        T::DTYPE.name(),
        if report.passed() { "ok  " } else { "FAIL" },
        report
    );
    Ok(usize::from(!report.passed()))
}

fn cpu_demo() -> Result<(), Error> {
    let mut rng = Rng::new(7);
    let x: Vec<f64> = (0..8).map(|_| rng.normal() * 2.0).collect();
    let y = activation::reference::softmax(&x, 8);
    println!("CPU reference, softmax of one row of 8:");
    println!(
        "  x = {:?}",
        x.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>()
    );
    println!(
        "  y = {:?}",
        y.iter().map(|v| format!("{v:.4}")).collect::<Vec<_>>()
    );
    println!("  sum(y) = {:.15}", y.iter().sum::<f64>());

    // The demo's Qwen3-30B-A3B-shaped block through the CPU forward, on a few tokens.
    let cfg = demo::qwen3_30b_a3b();
    let (t, k, h) = (2, cfg.k(), cfg.hidden);
    println!(
        "\nCPU forward of the Qwen3-30B-A3B-shaped block (H={h}, I={}, E={}, K={k}), T={t}:",
        cfg.intermediate, cfg.experts
    );
    let started = std::time::Instant::now();
    let w = demo::random_weights(&cfg, 1);
    let x: Vec<f64> = (0..t * h).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let f = moe_kernels::layer::reference::forward(&cfg, &w, &x)?;
    for tok in 0..t {
        let y = &f.y[tok * h..(tok + 1) * h];
        let rms = (y.iter().map(|v| v * v).sum::<f64>() / h as f64).sqrt();
        println!(
            "  token {tok}: experts {:?} weights {:.3?} rms(y) {rms:.4e}",
            &f.routing.ids[tok * k..(tok + 1) * k],
            &f.routing.weights[tok * k..(tok + 1) * k]
        );
    }
    println!(
        "  ({:.1} s, most of it drawing the 604 M random weights)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
