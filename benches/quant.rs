//! quant_gemv/{gate_up,down}: the v1 grouped GEMV over compressed experts, per format, on
//! Mixtral-8x7B and Qwen3-30B-A3B decode shapes at T = 1 and 16, beside the bf16 grouped GEMV
//! on the same routing (id `bf16/...`) and the card's copy bandwidth (`ceiling/copy` in the
//! activation bench).
//!
//! Throughput is the compressed bytes of the experts a routing activates (codes, scales, zero
//! points, row offsets; the shared ternary dictionary left out), the bound of decode. Each
//! format's experts are built from random codes (one expert drawn, its copies for the others;
//! ternary rows repeat a compressed block of 256 rows of a ternarised Gaussian with 90% zeros):
//! decode time does not depend on the values, except the ternary stream's, whose statistics the
//! repeated block keeps. Iterations rotate through eight routings, so the weights read span more
//! than the L2.

mod common;

use std::sync::Arc;

use criterion::{Criterion, Throughput};
use half::{bf16, f16};
use moe_kernels::activation::{GateLayout, GatedAct};
use moe_kernels::gemm::{self, Epilogue, GemmOptions};
use moe_kernels::permute::Plan;
use moe_kernels::quant::{
    self, Dictionary, Fp8Matrix, IntMatrix, Mxfp4Matrix, QuantLayer, QuantMatrix, TernaryMatrix,
    ternarize,
};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Tensor};

const FORMATS: [&str; 6] = [
    "int4-g128",
    "int8-g128",
    "int4-g128-zp",
    "mxfp4",
    "fp8",
    "ternary",
];

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One expert `[n, kd]` in `format`, from random codes.
fn expert(rng: &mut Rng, format: &str, n: usize, kd: usize) -> QuantMatrix {
    let small_scales = |rng: &mut Rng, len| -> Vec<f16> {
        (0..len)
            .map(|_| f16::from_f64(rng.uniform(1e-3, 2e-3)))
            .collect()
    };
    match format {
        "int4-g128" | "int8-g128" | "int4-g128-zp" => {
            let bits = if format.starts_with("int8") { 8 } else { 4 };
            let q: Vec<u32> = (0..n * kd * bits / 32)
                .map(|_| rng.next_u64() as u32)
                .collect();
            let zeros = format.ends_with("zp").then(|| vec![8u8; n * kd / 128]);
            let scales = small_scales(rng, n * kd / 128);
            let m = IntMatrix::new(bits as u32, 128, n, kd, q, scales, zeros, None);
            QuantMatrix::Int(m.unwrap())
        }
        "mxfp4" => {
            // Scales near 2^-8 keep the products finite.
            let scales = (0..n * kd / 32).map(|_| 117 + rng.below(4) as u8).collect();
            QuantMatrix::Mxfp4(
                Mxfp4Matrix::new(n, kd, random_bytes(rng, n * kd / 2), scales).unwrap(),
            )
        }
        "fp8" => {
            // Exponent bit 0 cleared: the exponent stays below 15, so no code is NaN.
            let codes = random_bytes(rng, n * kd)
                .into_iter()
                .map(|b| b & 0xf7)
                .collect();
            let scales = vec![1e-3f32; n.div_ceil(128) * kd.div_ceil(128)];
            QuantMatrix::Fp8(Fp8Matrix::new(n, kd, codes, scales).unwrap())
        }
        _ => {
            let rows = n.min(256);
            let w: Vec<f32> = (0..rows * kd)
                .map(|_| (rng.normal() * 0.02) as f32)
                .collect();
            let t = ternarize(&w, rows, kd, 0.9).unwrap();
            let sample: Vec<Vec<u8>> = (0..rows.min(64)).map(|r| t.symbols(r)).collect();
            let block =
                TernaryMatrix::compress(&t, Arc::new(Dictionary::build(&sample, 1 << 16).unwrap()))
                    .unwrap();
            let (mut codes, mut offsets, mut lohi) = (Vec::new(), vec![0u32], Vec::new());
            for r in 0..n {
                let b = r % rows;
                let (o0, o1) = (
                    block.row_offsets()[b] as usize,
                    block.row_offsets()[b + 1] as usize,
                );
                codes.extend_from_slice(&block.codes()[o0..o1]);
                offsets.push(codes.len() as u32);
                lohi.extend_from_slice(&block.lohi()[2 * b..2 * b + 2]);
            }
            QuantMatrix::Ternary(
                TernaryMatrix::new(n, kd, lohi, offsets, codes, block.dict().clone()).unwrap(),
            )
        }
    }
}

fn bench_model(c: &mut Criterion, dev: &Device, m: &common::Model) {
    let mut rng = Rng::new(5);
    let swiglu = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };
    let w1: Tensor<bf16> = dev.filled_bytes(&[m.e, 2 * m.i, m.h], 0x3c).unwrap();
    let w2: Tensor<bf16> = dev.filled_bytes(&[m.e, m.h, m.i], 0x3c).unwrap();
    let mut layers: Vec<(&str, QuantLayer, QuantLayer)> = FORMATS
        .iter()
        .map(|&f| {
            let (up, down) = (
                expert(&mut rng, f, 2 * m.i, m.h),
                expert(&mut rng, f, m.h, m.i),
            );
            let up = QuantLayer::upload(dev, &vec![up; m.e]).unwrap();
            let down = QuantLayer::upload(dev, &vec![down; m.e]).unwrap();
            (f, up, down)
        })
        .collect();
    for t in [1usize, 16] {
        let plans: Vec<(Plan, Vec<usize>)> = (0..8)
            .map(|_| {
                let ids: Vec<i32> = (0..t * m.k).map(|_| rng.below(m.e as u64) as i32).collect();
                let mut plan = Plan::new(dev, t, m.k, m.e, m.e, 64).unwrap();
                plan.build(dev, &dev.upload(&ids, &[t, m.k]).unwrap())
                    .unwrap();
                let mut active: Vec<usize> = ids.iter().map(|&e| e as usize).collect();
                active.sort_unstable();
                active.dedup();
                (plan, active)
            })
            .collect();
        let a1: Tensor<bf16> = dev.filled_bytes(&[t * m.k, m.h], 0x3c).unwrap();
        let a2: Tensor<bf16> = dev.filled_bytes(&[t * m.k, m.i], 0x3c).unwrap();
        let mut h1: Tensor<bf16> = dev.zeros(&[t * m.k, m.i]).unwrap();
        let mut out: Tensor<bf16> = dev.zeros(&[t * m.k, m.h]).unwrap();
        // Mean bytes over the rotation of the experts each routing activates.
        let mean_bytes = |per_expert: &dyn Fn(usize) -> usize| -> u64 {
            let total: usize = plans
                .iter()
                .map(|(_, act)| act.iter().map(|&e| per_expert(e)).sum::<usize>())
                .sum();
            (total / plans.len()) as u64
        };
        let gate_up_opts = GemmOptions {
            epilogue: swiglu,
            ..Default::default()
        };

        let mut g = c.benchmark_group("quant_gemv/gate_up");
        g.throughput(Throughput::Bytes(mean_bytes(&|_| 2 * 2 * m.i * m.h)));
        g.bench_function(format!("bf16/{}/T{t}", m.name), |b| {
            b.iter_custom(|iters| {
                common::time_iters(dev, iters, |it| {
                    gemm::grouped_gemv_into(dev, &mut h1, &a1, &w1, &plans[it % 8].0, gate_up_opts)
                })
            })
        });
        for (f, up, _) in layers.iter_mut() {
            g.throughput(Throughput::Bytes(mean_bytes(&|e| up.expert_bytes(e))));
            g.bench_function(format!("{f}/{}/T{t}", m.name), |b| {
                b.iter_custom(|iters| {
                    common::time_iters(dev, iters, |it| {
                        quant::quant_gemv_into(
                            dev,
                            &mut h1,
                            &a1,
                            &mut *up,
                            &plans[it % 8].0,
                            gate_up_opts,
                        )
                    })
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group("quant_gemv/down");
        g.throughput(Throughput::Bytes(mean_bytes(&|_| 2 * m.h * m.i)));
        g.bench_function(format!("bf16/{}/T{t}", m.name), |b| {
            b.iter_custom(|iters| {
                common::time_iters(dev, iters, |it| {
                    gemm::grouped_gemv_into(
                        dev,
                        &mut out,
                        &a2,
                        &w2,
                        &plans[it % 8].0,
                        GemmOptions::default(),
                    )
                })
            })
        });
        for (f, _, down) in layers.iter_mut() {
            g.throughput(Throughput::Bytes(mean_bytes(&|e| down.expert_bytes(e))));
            g.bench_function(format!("{f}/{}/T{t}", m.name), |b| {
                b.iter_custom(|iters| {
                    common::time_iters(dev, iters, |it| {
                        quant::quant_gemv_into(
                            dev,
                            &mut out,
                            &a2,
                            &mut *down,
                            &plans[it % 8].0,
                            GemmOptions::default(),
                        )
                    })
                })
            });
        }
        g.finish();
    }
    for (_, up, down) in layers.iter_mut() {
        up.check(dev).unwrap();
        down.check(dev).unwrap();
    }
}

fn main() {
    let Some(dev) = common::gpu("quant") else {
        return;
    };
    let mut c = common::criterion(&dev);
    // Mixtral-8x7B and Qwen3-30B-A3B, the decode targets' shapes (on the emulator, its small one).
    let models = if dev.info().emulated {
        &common::EMULATED_MODELS[..]
    } else {
        &common::MODELS[..2]
    };
    for m in models {
        bench_model(&mut c, &dev, m);
    }
    c.final_summary();
}
