//! grouped_gemm/{gate_up,down}: the grouped GEMM on three models' expert shapes, v1 beside v2
//! (and, for gate/up, v2 reading x through the plan instead of a gathered copy), beside the
//! card's dense bf16 rate (measured by the peer script) and its copy bandwidth (ceiling/copy).
//! Ids are `{version}/bf16/{model}/T{t}`; v1 runs on a plan of 64-row blocks, v2 on 128-row
//! blocks (its tile height), so v2 also pays for more padding on sparse routings.
//!
//! Throughput is in elements = FLOPs (2 * rows * N * Kd over the rows the routing fills), so
//! criterion's "elem/s" reads as FLOP/s. The decode groups (grouped_gemv/*, T = 1 and 16) count
//! bytes instead: the weights of the experts the routing activates, the bound of decode. Weights are filled on the device with a constant
//! pattern: tensor-core time does not depend on the values, and random weights of DeepSeek-V3's
//! size would take minutes to draw on the host. Weight sets of every model exceed the L2.

mod common;

use criterion::{Criterion, Throughput};
use half::bf16;
use moe_kernels::activation::{GateLayout, GatedAct};
use moe_kernels::gemm::{self, Epilogue, GemmOptions, GemmRows, GemmVersion};
use moe_kernels::permute::{Layout, Plan};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Tensor};

/// A plan of one block height and the buffers of one forward over it.
struct Padded {
    plan: Plan,
    /// `[P, H]` gathered rows.
    a1: Tensor<bf16>,
    /// `[P, I]` gate/up output.
    h1: Tensor<bf16>,
    /// `[P, H]` down output.
    out: Tensor<bf16>,
}

fn padded(dev: &Device, m: &common::Model, ids: &Tensor<i32>, t: usize, block_m: usize) -> Padded {
    let mut plan = Plan::new(dev, t, m.k, m.e, m.e, block_m).unwrap();
    plan.build(dev, ids).unwrap();
    let rows = plan.rows(Layout::Padded);
    Padded {
        a1: dev.filled_bytes(&[rows, m.h], 0x3c).unwrap(),
        h1: dev.zeros(&[rows, m.i]).unwrap(),
        out: dev.zeros(&[rows, m.h]).unwrap(),
        plan,
    }
}

/// (id, version, gather-free) of every GEMM timed.
const VARIANTS: [(&str, GemmVersion, bool); 3] = [
    ("v1", GemmVersion::V1, false),
    ("v2", GemmVersion::V2, false),
    ("v2-gather-free", GemmVersion::V2, true),
];

fn bench_model(c: &mut Criterion, dev: &Device, m: &common::Model) {
    // 0x3c3c is bf16 0.0115: finite, and the same for every element.
    let w1: Tensor<bf16> = dev.filled_bytes(&[m.e, 2 * m.i, m.h], 0x3c).unwrap();
    let w2: Tensor<bf16> = dev.filled_bytes(&[m.e, m.h, m.i], 0x3c).unwrap();
    let mut rng = Rng::new(3);
    for t in common::sizes(dev, &[1usize, 16, 128, 1024, 4096, 16384], |&t| t <= 128) {
        let ids: Vec<i32> = (0..t * m.k).map(|_| rng.below(m.e as u64) as i32).collect();
        let idd = dev.upload(&ids, &[t, m.k]).unwrap();
        let mut p64 = padded(dev, m, &idd, t, GemmVersion::V1.block_m());
        let mut p128 = padded(dev, m, &idd, t, GemmVersion::V2.block_m());
        let x: Tensor<bf16> = dev.filled_bytes(&[t, m.h], 0x3c).unwrap();
        let used = t * m.k; // rows the routing fills; padding is overhead, not work
        let swiglu = Epilogue::Gated {
            act: GatedAct::Silu,
            layout: GateLayout::GateFirst,
        };
        let up = GemmOptions {
            epilogue: swiglu,
            ..Default::default()
        };

        let mut g = c.benchmark_group("grouped_gemm/gate_up");
        g.throughput(Throughput::Elements((2 * used * 2 * m.i * m.h) as u64));
        for (name, version, indexed) in VARIANTS {
            let p = if version == GemmVersion::V1 {
                &mut p64
            } else {
                &mut p128
            };
            let rows = if indexed {
                GemmRows::Indexed(&x)
            } else {
                GemmRows::Gathered(&p.a1)
            };
            g.bench_function(format!("{name}/bf16/{}/T{t}", m.name), |b| {
                b.iter_custom(|iters| {
                    common::time_iters(dev, iters, |_| {
                        let h1 = &mut p.h1;
                        gemm::grouped_gemm_version_into(dev, h1, rows, &w1, &p.plan, up, version)
                    })
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group("grouped_gemm/down");
        g.throughput(Throughput::Elements((2 * used * m.h * m.i) as u64));
        // The down GEMM reads the gate/up output, already in padded order: no gather to save.
        for (name, version, p) in [
            ("v1", GemmVersion::V1, &mut p64),
            ("v2", GemmVersion::V2, &mut p128),
        ] {
            g.bench_function(format!("{name}/bf16/{}/T{t}", m.name), |b| {
                b.iter_custom(|iters| {
                    common::time_iters(dev, iters, |_| {
                        let (out, rows) = (&mut p.out, GemmRows::Gathered(&p.h1));
                        let opts = GemmOptions::default();
                        gemm::grouped_gemm_version_into(dev, out, rows, &w2, &p.plan, opts, version)
                    })
                })
            });
        }
        g.finish();

        if t <= 16 {
            let mut active: Vec<i32> = ids.clone();
            active.sort_unstable();
            active.dedup();
            let expert_bytes = |n: usize, kd: usize| (active.len() * n * kd * 2) as u64;
            let a1s: Tensor<bf16> = dev.filled_bytes(&[t * m.k, m.h], 0x3c).unwrap();
            let mut h1s: Tensor<bf16> = dev.zeros(&[t * m.k, m.i]).unwrap();
            let mut outs: Tensor<bf16> = dev.zeros(&[t * m.k, m.h]).unwrap();
            let mut g = c.benchmark_group("grouped_gemv/gate_up");
            g.throughput(Throughput::Bytes(expert_bytes(2 * m.i, m.h)));
            g.bench_function(format!("bf16/{}/T{t}", m.name), |b| {
                b.iter_custom(|iters| {
                    common::time_iters(dev, iters, |_| {
                        gemm::grouped_gemv_into(dev, &mut h1s, &a1s, &w1, &p64.plan, up)
                    })
                })
            });
            g.finish();
            let mut g = c.benchmark_group("grouped_gemv/down");
            g.throughput(Throughput::Bytes(expert_bytes(m.h, m.i)));
            g.bench_function(format!("bf16/{}/T{t}", m.name), |b| {
                b.iter_custom(|iters| {
                    common::time_iters(dev, iters, |_| {
                        gemm::grouped_gemv_into(
                            dev,
                            &mut outs,
                            &h1s,
                            &w2,
                            &p64.plan,
                            GemmOptions::default(),
                        )
                    })
                })
            });
            g.finish();
        }
    }
}

fn main() {
    let Some(dev) = common::gpu("grouped_gemm") else {
        return;
    };
    let mut c = common::criterion(&dev);
    for m in common::models(&dev) {
        bench_model(&mut c, &dev, m);
    }
    c.final_summary();
}
