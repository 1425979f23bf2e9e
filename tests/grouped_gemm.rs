//! Grouped expert GEMM: the reference against hand-worked cases, and the v1 kernel against the
//! reference over ragged routings, every epilogue and real model shapes.

mod common;

use half::{bf16, f16};
use moe_kernels::activation::{Act, GateLayout, GatedAct, reference as act_ref};
use moe_kernels::check::{self, Tolerance};
use moe_kernels::gemm::reference::{GroupedGemmRef, grouped_gemm};
use moe_kernels::gemm::{self, Epilogue, GemmOptions, ScaleAt};
use moe_kernels::permute::{self, Layout, Plan, reference as plan_ref};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Error, Float};

#[test]
fn reference_by_hand() {
    // One expert, a = [1, 2], w = identity: z = [1, 2] (+ bias [0.5, -1] when given).
    let a = [1.0, 2.0];
    let w = [1.0, 0.0, 0.0, 1.0];
    let base = GroupedGemmRef {
        a: &a,
        w: &w,
        bias: None,
        n: 2,
        kdim: 2,
        row_experts: &[0],
        row_scale: None,
        epilogue: Epilogue::None,
    };
    assert_eq!(grouped_gemm(&base), [Some(vec![1.0, 2.0])]);
    let bias = [0.5, -1.0];
    let with_bias = GroupedGemmRef {
        bias: Some(&bias),
        epilogue: Epilogue::Act(Act::Relu),
        ..base
    };
    assert_eq!(grouped_gemm(&with_bias), [Some(vec![1.5, 1.0])]);
    let silu = |layout| GroupedGemmRef {
        epilogue: Epilogue::Gated {
            act: GatedAct::Silu,
            layout,
        },
        ..base
    };
    assert_eq!(
        grouped_gemm(&silu(GateLayout::GateFirst)),
        [Some(vec![act_ref::silu(1.0) * 2.0])]
    );
    assert_eq!(
        grouped_gemm(&silu(GateLayout::UpFirst)),
        [Some(vec![act_ref::silu(2.0)])]
    );
    assert_eq!(
        grouped_gemm(&silu(GateLayout::Interleaved)),
        [Some(vec![act_ref::silu(1.0) * 2.0])]
    );
    // The routing weight 0.5 on the input scales before the activation, on the output after.
    let s = [0.5];
    let input = GroupedGemmRef {
        row_scale: Some((&s, ScaleAt::Input)),
        ..silu(GateLayout::GateFirst)
    };
    assert_eq!(grouped_gemm(&input), [Some(vec![act_ref::silu(0.5) * 1.0])]);
    let output = GroupedGemmRef {
        row_scale: Some((&s, ScaleAt::Output)),
        ..silu(GateLayout::GateFirst)
    };
    assert_eq!(
        grouped_gemm(&output),
        [Some(vec![0.5 * act_ref::silu(1.0) * 2.0])]
    );
    let skipped = GroupedGemmRef {
        row_experts: &[-1],
        ..base
    };
    assert_eq!(grouped_gemm(&skipped), [None]);
}

struct Case {
    t: usize,
    k: usize,
    e: usize,
    kd: usize,
    n: usize,
    block_m: usize,
    epilogue: Epilogue,
    bias: bool,
    scale: Option<ScaleAt>,
    /// All slots on this expert (the others get no rows).
    one_expert: Option<i32>,
    /// The decode GEMV over sorted rows instead of the GEMM over padded rows.
    gemv: bool,
}

fn run_case<T: Float, TO: Float>(dev: &Device, c: &Case) {
    let layout = if c.gemv {
        Layout::Sorted
    } else {
        Layout::Padded
    };
    let label = format!(
        "{} {}->{} T={} K={} E={} Kd={} N={} {:?} bias={} scale={:?}",
        if c.gemv { "gemv" } else { "gemm" },
        T::DTYPE,
        TO::DTYPE,
        c.t,
        c.k,
        c.e,
        c.kd,
        c.n,
        c.epilogue,
        c.bias,
        c.scale
    );
    let mut rng = Rng::new((c.t * 1009 + c.kd * 31 + c.n) as u64);
    // Ragged routing: a skewed draw leaves experts with anywhere from 0 to many rows.
    let ids: Vec<i32> = (0..c.t * c.k)
        .map(|i| match c.one_expert {
            Some(e) => e,
            None => {
                let r = rng.unit();
                ((r * r * c.e as f64) as i32 + (i % c.k) as i32) % c.e as i32
            }
        })
        .collect();
    // Distinct experts per token are not needed by the GEMM; keep the draw simple.
    let x: Vec<T> = rng.normal_vec(c.t * c.kd, 1.0);
    let w: Vec<T> = rng.normal_vec(c.e * c.n * c.kd, 1.0 / (c.kd as f64).sqrt());
    let bias: Vec<T> = rng.normal_vec(c.e * c.n, 0.1);
    let weights: Vec<f32> = (0..c.t * c.k)
        .map(|_| rng.uniform(0.1, 1.0) as f32)
        .collect();

    let mut plan = Plan::new(dev, c.t, c.k, c.e, c.e, c.block_m).unwrap();
    let idd = dev.upload(&ids, &[c.t, c.k]).unwrap();
    plan.build(dev, &idd).unwrap();
    let rows = plan.rows(layout);
    let xd = dev.upload(&x, &[c.t, c.kd]).unwrap();
    // Sorted rows past the routed count are never read; keep them finite all the same.
    let mut a = dev.zeros::<T>(&[rows, c.kd]).unwrap();
    permute::gather_into(dev, &mut a, &xd, &mut plan, layout).unwrap();
    let wd = dev.upload(&w, &[c.e, c.n, c.kd]).unwrap();
    let bd = dev.upload(&bias, &[c.e, c.n]).unwrap();
    let rw = dev.upload(&weights, &[c.t, c.k]).unwrap();
    let n_out = if matches!(c.epilogue, Epilogue::Gated { .. }) {
        c.n / 2
    } else {
        c.n
    };
    let mut out = dev.filled_bytes::<TO>(&[rows, n_out], 0xff).unwrap();
    let opts = GemmOptions {
        bias: c.bias.then_some(&bd),
        epilogue: c.epilogue,
        row_weights: c.scale.map(|at| (&rw, at)),
    };
    if c.gemv {
        gemm::grouped_gemv_into(dev, &mut out, &a, &wd, &plan, opts).unwrap();
    } else {
        gemm::grouped_gemm_into(dev, &mut out, &a, &wd, &plan, opts).unwrap();
    }
    let got = dev.download(&out).unwrap();
    plan.check(dev).unwrap();

    // The reference reads the same gathered rows the kernel read (padding rows are zero).
    let p = plan_ref::plan(&ids, c.e, c.e, c.block_m);
    let a64: Vec<f64> = dev
        .download(&a)
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect();
    // The expert of each row: from the padded blocks, or from the sorted offsets.
    let row_experts: Vec<i32> = (0..rows)
        .map(|r| match layout {
            Layout::Padded => p.block_experts[r / c.block_m],
            _ => (0..c.e)
                .find(|&e| (p.offsets[e]..p.offsets[e + 1]).contains(&(r as i32)))
                .map_or(-1, |e| e as i32),
        })
        .collect();
    let row_slots = if c.gemv {
        &p.sorted_slots
    } else {
        &p.padded_slots
    };
    let row_scale: Vec<f64> = row_slots
        .iter()
        .map(|&s| usize::try_from(s).map_or(0.0, |s| f64::from(weights[s])))
        .collect();
    let f = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
    let (w64, b64) = (f(&w), f(&bias));
    let want = grouped_gemm(&GroupedGemmRef {
        a: &a64,
        w: &w64,
        bias: c.bias.then_some(&b64[..]),
        n: c.n,
        kdim: c.kd,
        row_experts: &row_experts,
        row_scale: c.scale.map(|at| (&row_scale[..], at)),
        epilogue: c.epilogue,
    });
    let (mut g, mut r) = (Vec::new(), Vec::new());
    for (i, row) in want.iter().enumerate() {
        if let Some(row) = row {
            g.extend_from_slice(&got[i * n_out..(i + 1) * n_out]);
            r.extend_from_slice(row);
        }
    }
    assert_eq!(
        r.len(),
        p.padded_offsets[c.e] as usize * n_out,
        "{label}: rows compared"
    );
    // Values are O(1); f32 accumulation over Kd terms, then one rounding to the output dtype.
    let tol = Tolerance::new(1e-4, 2.0 * TO::EPSILON);
    let report = check::compare(&g, &r, tol);
    println!("grouped_gemm {label}: {report}");
    assert!(report.passed(), "grouped_gemm {label}: {report}");
}

fn case(t: usize, k: usize, e: usize, kd: usize, n: usize, epilogue: Epilogue) -> Case {
    Case {
        t,
        k,
        e,
        kd,
        n,
        block_m: 64,
        epilogue,
        bias: false,
        scale: None,
        one_expert: None,
        gemv: false,
    }
}

#[test]
fn gpu_grouped_gemm_matches_reference() {
    let Some(dev) = common::gpu("gpu_grouped_gemm_matches_reference") else {
        return;
    };
    let swiglu = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };
    let gpt_oss = Epilogue::Gated {
        act: GatedAct::GPT_OSS,
        layout: GateLayout::Interleaved,
    };
    let geglu_up_first = Epilogue::Gated {
        act: GatedAct::GeluTanh,
        layout: GateLayout::UpFirst,
    };
    // Ragged SwiGLU, bf16 out; Qwen3-30B-A3B's gate/up shape with f32 out and 128-row blocks.
    run_case::<bf16, bf16>(&dev, &case(37, 2, 8, 256, 2 * 96, swiglu));
    run_case::<bf16, f32>(
        &dev,
        &Case {
            block_m: 128,
            ..case(64, 8, 128, 2048, 2 * 768, swiglu)
        },
    );
    // gpt-oss: interleaved, clamped, with bias; Kd = 40 and N_out = 100 are not multiples of
    // the 32 x 64 tiles.
    run_case::<f16, f16>(
        &dev,
        &Case {
            bias: true,
            ..case(50, 4, 16, 40, 2 * 100, gpt_oss)
        },
    );
    // The down projection: plain, routing weight folded into the output.
    run_case::<bf16, bf16>(
        &dev,
        &Case {
            scale: Some(ScaleAt::Output),
            ..case(40, 2, 8, 96, 256, Epilogue::None)
        },
    );
    // Switch-style ReLU expert; Llama 4's input scaling before a GeGLU (up first).
    run_case::<f16, f32>(
        &dev,
        &Case {
            bias: true,
            ..case(33, 1, 4, 64, 72, Epilogue::Act(Act::Relu))
        },
    );
    run_case::<bf16, bf16>(
        &dev,
        &Case {
            scale: Some(ScaleAt::Input),
            ..case(20, 1, 16, 128, 2 * 64, geglu_up_first)
        },
    );
    // All rows on one expert (the others have none); a single expert; a single token.
    run_case::<bf16, bf16>(
        &dev,
        &Case {
            one_expert: Some(5),
            ..case(300, 2, 8, 128, 2 * 64, swiglu)
        },
    );
    run_case::<bf16, bf16>(&dev, &case(9, 1, 1, 64, 2 * 64, swiglu));
    run_case::<bf16, bf16>(&dev, &case(1, 8, 256, 7168 / 4, 2 * 256, swiglu));
}

#[test]
fn gpu_grouped_gemv_matches_reference() {
    let Some(dev) = common::gpu("gpu_grouped_gemv_matches_reference") else {
        return;
    };
    let swiglu = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };
    let gpt_oss = Epilogue::Gated {
        act: GatedAct::GPT_OSS,
        layout: GateLayout::Interleaved,
    };
    let gemv = |c: Case| Case { gemv: true, ..c };
    // Decode shapes: Mixtral's gate/up at T = 1 and 16 (more than 8 rows per expert, so the
    // row chunks loop), Qwen3's down projection with the routing weight on the output.
    run_case::<bf16, bf16>(&dev, &gemv(case(1, 2, 8, 4096, 2 * 512, swiglu)));
    run_case::<bf16, f32>(&dev, &gemv(case(16, 2, 8, 1024, 2 * 256, swiglu)));
    run_case::<bf16, bf16>(
        &dev,
        &gemv(Case {
            scale: Some(ScaleAt::Output),
            ..case(4, 8, 128, 768, 2048, Epilogue::None)
        }),
    );
    run_case::<f16, f16>(
        &dev,
        &gemv(Case {
            bias: true,
            ..case(3, 4, 16, 40, 2 * 100, gpt_oss)
        }),
    );
    run_case::<bf16, bf16>(
        &dev,
        &gemv(Case {
            one_expert: Some(2),
            ..case(20, 1, 4, 64, 72, Epilogue::Act(Act::GeluErf))
        }),
    );
}

#[test]
fn gpu_grouped_gemm_refuses_what_it_cannot_do() {
    let Some(dev) = common::gpu("gpu_grouped_gemm_refuses_what_it_cannot_do") else {
        return;
    };
    let mut plan = Plan::new(&dev, 4, 1, 2, 2, 64).unwrap();
    plan.build(&dev, &dev.upload(&[0, 1, 1, 0], &[4, 1]).unwrap())
        .unwrap();
    let rows = plan.rows(Layout::Padded);
    let a = dev.zeros::<bf16>(&[rows, 20]).unwrap();
    let w = dev.zeros::<bf16>(&[2, 64, 20]).unwrap();
    let mut out = dev.zeros::<bf16>(&[rows, 64]).unwrap();
    let e =
        gemm::grouped_gemm_into(&dev, &mut out, &a, &w, &plan, GemmOptions::default()).unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
    let (a32, w32) = (
        dev.zeros::<f32>(&[rows, 16]).unwrap(),
        dev.zeros::<f32>(&[2, 64, 16]).unwrap(),
    );
    let mut o32 = dev.zeros::<f32>(&[rows, 64]).unwrap();
    let e = gemm::grouped_gemm_into(&dev, &mut o32, &a32, &w32, &plan, GemmOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let mut small = Plan::new(&dev, 4, 1, 2, 2, 32).unwrap();
    small
        .build(&dev, &dev.upload(&[0, 1, 1, 0], &[4, 1]).unwrap())
        .unwrap();
    let e = gemm::grouped_gemm_into(&dev, &mut out, &a, &w, &small, GemmOptions::default())
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "plan", .. }), "{e}");
}
