//! permute/{plan,gather,combine}, beside the card's copy bandwidth (ceiling/copy in the
//! activation bench). Targets: the plan in 10 us at T=4096, E=256, K=8; gather and combine at
//! 80% of copy bandwidth for T >= 4096.
//!
//! Throughput counts the fewest bytes each op must move: the plan reads ids and writes its maps;
//! gather reads x once and writes T*K rows; combine reads T*K rows and writes T rows.

mod common;

use criterion::{Criterion, Throughput};
use half::bf16;
use moe_kernels::permute::{self, CombineInputs, Layout, Plan};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Tensor};

const E: usize = 256;
const TOKENS: [usize; 5] = [1, 16, 512, 4096, 16384];

fn random_ids(rng: &mut Rng, n: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(E as u64) as i32).collect()
}

fn bench_plan(c: &mut Criterion, dev: &Device) {
    let mut g = c.benchmark_group("permute/plan");
    let mut rng = Rng::new(1);
    for k in [2usize, 8] {
        for t in common::sizes(dev, &TOKENS, |&t| t <= 512) {
            let ids = dev.upload(&random_ids(&mut rng, t * k), &[t, k]).unwrap();
            let mut plan = Plan::new(dev, t, k, E, E, 128).unwrap();
            // ids read; sorted, inverse, padded maps written.
            g.throughput(Throughput::Bytes((t * k * 4 * 6) as u64));
            g.bench_function(format!("i32/T{t}-K{k}-E{E}"), |b| {
                b.iter_custom(|iters| common::time_iters(dev, iters, |_| plan.build(dev, &ids)))
            });
        }
    }
    g.finish();
}

fn bench_gather_combine(c: &mut Criterion, dev: &Device) {
    let mut rng = Rng::new(2);
    for k in [2usize, 8] {
        for h in common::sizes(dev, &[2048usize, 4096, 7168], |&h| h == 2048) {
            for t in common::sizes(dev, &TOKENS, |&t| t <= 512) {
                let s = t * k;
                let ids_h = random_ids(&mut rng, s);
                let ids = dev.upload(&ids_h, &[t, k]).unwrap();
                let mut plan = Plan::new(dev, t, k, E, E, 128).unwrap();
                plan.build(dev, &ids).unwrap();
                let row_bytes = h * 2;
                let copies = common::rotation(dev, (t + s) * row_bytes);
                let xs: Vec<Tensor<bf16>> = (0..copies)
                    .map(|_| dev.upload(&rng.normal_vec(t * h, 1.0), &[t, h]).unwrap())
                    .collect();
                let mut rows: Vec<Tensor<bf16>> =
                    (0..copies).map(|_| dev.zeros(&[s, h]).unwrap()).collect();
                let mut ys: Vec<Tensor<bf16>> =
                    (0..copies).map(|_| dev.zeros(&[t, h]).unwrap()).collect();
                let w = dev.upload(&vec![0.5f32; s], &[t, k]).unwrap();
                let id = format!("bf16/T{t}-H{h}-K{k}");

                let mut g = c.benchmark_group("permute/gather");
                g.throughput(Throughput::Bytes(((t + s) * row_bytes) as u64));
                g.bench_function(&id, |b| {
                    b.iter_custom(|iters| {
                        common::time_iters(dev, iters, |i| {
                            let j = i % copies;
                            permute::gather_into(
                                dev,
                                &mut rows[j],
                                &xs[j],
                                &mut plan,
                                Layout::Sorted,
                            )
                        })
                    })
                });
                g.finish();

                let mut g = c.benchmark_group("permute/combine");
                g.throughput(Throughput::Bytes(((t + s) * row_bytes + s * 4) as u64));
                g.bench_function(&id, |b| {
                    b.iter_custom(|iters| {
                        common::time_iters(dev, iters, |i| {
                            let j = i % copies;
                            let inputs = CombineInputs {
                                weights: Some(&w),
                                ..Default::default()
                            };
                            permute::combine_into(
                                dev,
                                &mut ys[j],
                                &rows[j],
                                &mut plan,
                                Layout::Sorted,
                                &ids,
                                inputs,
                            )
                        })
                    })
                });
                g.finish();
            }
        }
    }
}

fn main() {
    let Some(dev) = common::gpu("permute") else {
        return;
    };
    let mut c = common::criterion(&dev);
    bench_plan(&mut c, &dev);
    bench_gather_combine(&mut c, &dev);
    c.final_summary();
}
