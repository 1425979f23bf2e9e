//! routing/route: fused top-k routing from logits, beside the card's copy bandwidth
//! (ceiling/copy in the activation bench) and the DeepSeek-V3 target of 8 us at 4096 tokens.
//!
//! Throughput counts the fewest bytes the op must move: the logits read once, ids and weights
//! written once.

mod common;

use criterion::{Criterion, Throughput};
use half::bf16;
use moe_kernels::rng::Rng;
use moe_kernels::routing::{self, RouterConfig};
use moe_kernels::{Device, Float, Tensor};

fn bench_route<T: Float>(
    c: &mut Criterion,
    dev: &Device,
    label: &str,
    e: usize,
    cfg: RouterConfig,
) {
    let mut g = c.benchmark_group("routing/route");
    let mut rng = Rng::new(7);
    let bias_h: Vec<f32> = (0..e).map(|_| rng.uniform(-0.05, 0.05) as f32).collect();
    let bias = dev.upload(&bias_h, &[e]).unwrap();
    let bias = cfg.needs_bias().then_some(&bias);
    for t in common::sizes(dev, &[1usize, 64, 4096, 16384], |&t| t <= 64) {
        let bytes = t * e * std::mem::size_of::<T>() + t * cfg.k * 8;
        let copies = common::rotation(dev, bytes);
        let xs: Vec<Tensor<T>> = (0..copies)
            .map(|_| {
                dev.upload(&rng.normal_vec::<T>(t * e, 1.0), &[t, e])
                    .unwrap()
            })
            .collect();
        let mut ids: Vec<Tensor<i32>> = (0..copies)
            .map(|_| dev.zeros(&[t, cfg.k]).unwrap())
            .collect();
        let mut ws: Vec<Tensor<f32>> = (0..copies)
            .map(|_| dev.zeros(&[t, cfg.k]).unwrap())
            .collect();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(format!("{}/{label}/T{t}", T::DTYPE), |b| {
            b.iter_custom(|iters| {
                common::time_iters(dev, iters, |i| {
                    let j = i % copies;
                    routing::route_into(dev, &mut ids[j], &mut ws[j], None, &xs[j], &cfg, bias)
                })
            })
        });
    }
    g.finish();
}

fn main() {
    let Some(dev) = common::gpu("routing") else {
        return;
    };
    let mut c = common::criterion(&dev);
    bench_route::<bf16>(&mut c, &dev, "mixtral-E8-K2", 8, RouterConfig::mixtral(2));
    bench_route::<bf16>(
        &mut c,
        &dev,
        "qwen3-E128-K8",
        128,
        RouterConfig::qwen(8, true),
    );
    let v3 = RouterConfig::deepseek_v3(8, 8, 4, true, 2.5);
    bench_route::<f32>(&mut c, &dev, "deepseek-v3-E256-K8", 256, v3);
    c.final_summary();
}
