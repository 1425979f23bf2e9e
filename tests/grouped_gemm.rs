//! Grouped expert GEMM: the reference against hand-worked cases, and the kernels (GEMM v1, v2 and
//! v2 reading x through the plan; the decode GEMV) against the reference over ragged routings,
//! every epilogue, shapes that leave partial tiles and stages, and real model shapes.

mod common;

use half::{bf16, f16};
use moe_kernels::activation::{Act, GateLayout, GatedAct, reference as act_ref};
use moe_kernels::check::{self, Tolerance};
use moe_kernels::gemm::reference::{GroupedGemmRef, grouped_gemm};
use moe_kernels::gemm::{self, Epilogue, GemmOptions, GemmRows, GemmVersion, ScaleAt};
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

const SWIGLU: Epilogue = Epilogue::Gated {
    act: GatedAct::Silu,
    layout: GateLayout::GateFirst,
};
const GPT_OSS: Epilogue = Epilogue::Gated {
    act: GatedAct::GPT_OSS,
    layout: GateLayout::Interleaved,
};
const GEGLU_UP_FIRST: Epilogue = Epilogue::Gated {
    act: GatedAct::GeluTanh,
    layout: GateLayout::UpFirst,
};

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

/// One kernel a case runs on.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    /// The GEMM of this version over gathered rows, or (`indexed`) over x read through the plan.
    Gemm {
        version: GemmVersion,
        indexed: bool,
    },
    Gemv,
}

/// A GEMV case runs the GEMV; a GEMM case runs v1, v2, v2 gather-free and v3 (where the device
/// runs it), each on a plan whose block_m is the case's rounded up to the version's rows per block.
fn run_case<T: Float, TO: Float>(dev: &Device, c: &Case) {
    let kernels: Vec<Kernel> = if c.gemv {
        vec![Kernel::Gemv]
    } else {
        let mut v = vec![
            Kernel::Gemm {
                version: GemmVersion::V1,
                indexed: false,
            },
            Kernel::Gemm {
                version: GemmVersion::V2,
                indexed: false,
            },
            Kernel::Gemm {
                version: GemmVersion::V2,
                indexed: true,
            },
        ];
        // v3 where the device runs it (Hopper, or the emulator, which models its instructions).
        if GemmVersion::V3.check_device("test", dev).is_ok() {
            v.push(Kernel::Gemm {
                version: GemmVersion::V3,
                indexed: false,
            });
        }
        v
    };
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

    // The reference, once per case and independent of the layout: the output of every slot
    // (its token's row of x through its expert), then of one zero row per expert, which is what
    // a padding row of that expert's blocks must come out as (routing weight 0).
    let s = c.t * c.k;
    let f = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
    let (x64, w64, b64) = (f(&x), f(&w), f(&bias));
    let mut a64: Vec<f64> = (0..s)
        .flat_map(|slot| &x64[slot / c.k * c.kd..][..c.kd])
        .copied()
        .collect();
    a64.resize((s + c.e) * c.kd, 0.0);
    let row_experts: Vec<i32> = ids.iter().copied().chain(0..c.e as i32).collect();
    let row_scale: Vec<f64> = (0..s + c.e)
        .map(|r| weights.get(r).map_or(0.0, |&w| f64::from(w)))
        .collect();
    let want: Vec<Vec<f64>> = grouped_gemm(&GroupedGemmRef {
        a: &a64,
        w: &w64,
        bias: c.bias.then_some(&b64[..]),
        n: c.n,
        kdim: c.kd,
        row_experts: &row_experts,
        row_scale: c.scale.map(|at| (&row_scale[..], at)),
        epilogue: c.epilogue,
    })
    .into_iter()
    .map(|row| row.expect("every reference row has an expert"))
    .collect();
    let (want_slot, want_pad) = want.split_at(s);

    let xd = dev.upload(&x, &[c.t, c.kd]).unwrap();
    let wd = dev.upload(&w, &[c.e, c.n, c.kd]).unwrap();
    let bd = dev.upload(&bias, &[c.e, c.n]).unwrap();
    let rw = dev.upload(&weights, &[c.t, c.k]).unwrap();
    let idd = dev.upload(&ids, &[c.t, c.k]).unwrap();
    let n_out = if matches!(c.epilogue, Epilogue::Gated { .. }) {
        c.n / 2
    } else {
        c.n
    };
    for &kernel in &kernels {
        let (layout, block_m) = match kernel {
            Kernel::Gemv => (Layout::Sorted, c.block_m),
            Kernel::Gemm { version, .. } => (
                Layout::Padded,
                c.block_m.next_multiple_of(version.block_m()),
            ),
        };
        let label = format!(
            "{kernel:?} {}->{} T={} K={} E={} Kd={} N={} block_m={block_m} {:?} bias={} \
             scale={:?}",
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
        let mut plan = Plan::new(dev, c.t, c.k, c.e, c.e, block_m).unwrap();
        plan.build(dev, &idd).unwrap();
        let rows = plan.rows(layout);
        let mut out = dev.filled_bytes::<TO>(&[rows, n_out], 0xff).unwrap();
        let opts = GemmOptions {
            bias: c.bias.then_some(&bd),
            epilogue: c.epilogue,
            row_weights: c.scale.map(|at| (&rw, at)),
        };
        match kernel {
            Kernel::Gemm {
                version,
                indexed: true,
            } => {
                let input = GemmRows::Indexed(&xd);
                gemm::grouped_gemm_version_into(dev, &mut out, input, &wd, &plan, opts, version)
                    .unwrap();
            }
            _ => {
                // Sorted rows past the routed count are never read; keep them finite all the
                // same. Padding rows of the padded layout are zeroed by the gather.
                let mut a = dev.zeros::<T>(&[rows, c.kd]).unwrap();
                permute::gather_into(dev, &mut a, &xd, &mut plan, layout).unwrap();
                match kernel {
                    Kernel::Gemv => gemm::grouped_gemv_into(dev, &mut out, &a, &wd, &plan, opts),
                    Kernel::Gemm { version, .. } => gemm::grouped_gemm_version_into(
                        dev,
                        &mut out,
                        GemmRows::Gathered(&a),
                        &wd,
                        &plan,
                        opts,
                        version,
                    ),
                }
                .unwrap();
                if let Kernel::Gemm {
                    version: GemmVersion::V3,
                    ..
                } = kernel
                {
                    // The persistent kernel's result does not depend on the run: bit for bit.
                    let mut again = dev.filled_bytes::<TO>(out.shape(), 0xff).unwrap();
                    let input = GemmRows::Gathered(&a);
                    gemm::grouped_gemm_version_into(
                        dev,
                        &mut again,
                        input,
                        &wd,
                        &plan,
                        opts,
                        GemmVersion::V3,
                    )
                    .unwrap();
                    let (x, y) = (dev.download(&out).unwrap(), dev.download(&again).unwrap());
                    assert!(
                        x.iter()
                            .zip(&y)
                            .all(|(p, q)| p.to_f64().to_bits() == q.to_f64().to_bits()),
                        "{label}: two runs differ"
                    );
                }
            }
        }
        let got = dev.download(&out).unwrap();
        plan.check(dev).unwrap();

        // Each row's expected output: its slot's, or for a padding row inside an expert's
        // blocks, that expert's zero row; rows outside every expert are not compared.
        let p = plan_ref::plan(&ids, c.e, c.e, block_m);
        let row_slots = match layout {
            Layout::Padded => &p.padded_slots,
            _ => &p.sorted_slots,
        };
        let (mut g, mut r) = (Vec::new(), Vec::new());
        for (i, &slot) in row_slots.iter().enumerate().take(rows) {
            let expected = match (usize::try_from(slot), layout) {
                (Ok(slot), _) => &want_slot[slot],
                (Err(_), Layout::Padded) => match usize::try_from(p.block_experts[i / block_m]) {
                    Ok(e) => &want_pad[e],
                    Err(_) => {
                        // A block of no expert is never written: the poison stays.
                        assert!(
                            got[i * n_out..(i + 1) * n_out]
                                .iter()
                                .all(|v| v.to_f64().is_nan()),
                            "row {i} of a block with no expert was written"
                        );
                        continue;
                    }
                },
                _ => continue,
            };
            g.extend_from_slice(&got[i * n_out..(i + 1) * n_out]);
            r.extend_from_slice(expected);
        }
        let compared = match layout {
            Layout::Padded => p.padded_offsets[c.e] as usize,
            _ => s,
        };
        assert_eq!(r.len(), compared * n_out, "{label}: rows compared");
        // Values are O(1); f32 accumulation over Kd terms, then one rounding to the output dtype.
        let tol = Tolerance::new(1e-4, 2.0 * TO::EPSILON);
        let report = check::compare(&g, &r, tol);
        println!("grouped_gemm {label}: {report}");
        assert!(report.passed(), "grouped_gemm {label}: {report}");
    }
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
    // Ragged SwiGLU, bf16 out; Qwen3-30B-A3B's gate/up shape with f32 out and 128-row blocks.
    run_case::<bf16, bf16>(&dev, &case(37, 2, 8, 256, 2 * 96, SWIGLU));
    run_case::<bf16, f32>(
        &dev,
        &Case {
            block_m: 128,
            ..case(64, 8, 128, 2048, 2 * 768, SWIGLU)
        },
    );
    // gpt-oss: interleaved, clamped, with bias; Kd = 40 and N_out = 100 are not multiples of
    // the 32 x 64 tiles.
    run_case::<f16, f16>(
        &dev,
        &Case {
            bias: true,
            ..case(50, 4, 16, 40, 2 * 100, GPT_OSS)
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
            ..case(20, 1, 16, 128, 2 * 64, GEGLU_UP_FIRST)
        },
    );
    // All rows on one expert (the others have none); a single expert; a single token.
    run_case::<bf16, bf16>(
        &dev,
        &Case {
            one_expert: Some(5),
            ..case(300, 2, 8, 128, 2 * 64, SWIGLU)
        },
    );
    run_case::<bf16, bf16>(&dev, &case(9, 1, 1, 64, 2 * 64, SWIGLU));
    run_case::<bf16, bf16>(&dev, &case(1, 8, 256, 7168 / 4, 2 * 256, SWIGLU));
}

#[test]
fn gpu_grouped_gemm_pipeline_edges() {
    let Some(dev) = common::gpu("gpu_grouped_gemm_pipeline_edges") else {
        return;
    };
    // Kd against v2's 32-wide, four-stage pipeline: one partial k-tile (8), fewer tiles than
    // stages (40: two), ten tiles with a partial last one (296); N_out 72, 100, 200 and 136 leave
    // partial column tiles of both the gated (64) and plain (128) widths.
    run_case::<bf16, bf16>(&dev, &case(40, 2, 8, 8, 2 * 72, SWIGLU));
    run_case::<f16, f32>(
        &dev,
        &Case {
            bias: true,
            ..case(30, 4, 16, 40, 200, Epilogue::Act(Act::Silu))
        },
    );
    run_case::<bf16, f32>(
        &dev,
        &Case {
            bias: true,
            scale: Some(ScaleAt::Output),
            ..case(100, 2, 8, 296, 2 * 100, GPT_OSS)
        },
    );
    run_case::<f16, f16>(
        &dev,
        &Case {
            scale: Some(ScaleAt::Output),
            ..case(60, 2, 6, 296, 200, Epilogue::None)
        },
    );
    // The padded layout is exactly one block (one row, one expert), and one expert holds every
    // row over many blocks while the other seven are empty.
    run_case::<bf16, bf16>(&dev, &case(1, 1, 1, 296, 136, Epilogue::Act(Act::GeluTanh)));
    run_case::<bf16, bf16>(
        &dev,
        &Case {
            one_expert: Some(7),
            scale: Some(ScaleAt::Input),
            ..case(700, 1, 8, 96, 2 * 136, SWIGLU)
        },
    );
    // Many blocks: 4096 ragged rows over 8 experts (over 32 v2 row blocks), 256-row plan
    // blocks (two v2 tiles per plan block).
    run_case::<bf16, bf16>(&dev, &case(1024, 4, 8, 512, 2 * 192, SWIGLU));
    run_case::<f16, f16>(
        &dev,
        &Case {
            block_m: 256,
            ..case(200, 2, 4, 136, 264, Epilogue::Act(Act::Relu))
        },
    );
}

#[test]
fn gpu_grouped_gemv_matches_reference() {
    let Some(dev) = common::gpu("gpu_grouped_gemv_matches_reference") else {
        return;
    };
    let gemv = |c: Case| Case { gemv: true, ..c };
    // Decode shapes: Mixtral's gate/up at T = 1 and 16 (more than 8 rows per expert, so the
    // row chunks loop), Qwen3's down projection with the routing weight on the output.
    run_case::<bf16, bf16>(&dev, &gemv(case(1, 2, 8, 4096, 2 * 512, SWIGLU)));
    run_case::<bf16, f32>(&dev, &gemv(case(16, 2, 8, 1024, 2 * 256, SWIGLU)));
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
            ..case(3, 4, 16, 40, 2 * 100, GPT_OSS)
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

    // v2 needs 128-row plan blocks; gather-free rows are v2's alone and must be x [T, Kd].
    let a = dev.zeros::<bf16>(&[rows, 16]).unwrap();
    let w = dev.zeros::<bf16>(&[2, 64, 16]).unwrap();
    let v2 = |out: &mut _, rows, plan: &Plan, version| {
        gemm::grouped_gemm_version_into(&dev, out, rows, &w, plan, GemmOptions::default(), version)
    };
    let e = v2(&mut out, GemmRows::Gathered(&a), &plan, GemmVersion::V2).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "plan", .. }), "{e}");
    let mut plan128 = Plan::new(&dev, 4, 1, 2, 2, 128).unwrap();
    plan128
        .build(&dev, &dev.upload(&[0, 1, 1, 0], &[4, 1]).unwrap())
        .unwrap();
    let mut out128 = dev
        .zeros::<bf16>(&[plan128.rows(Layout::Padded), 64])
        .unwrap();
    let x = dev.zeros::<bf16>(&[4, 16]).unwrap();
    let e = v2(
        &mut out128,
        GemmRows::Indexed(&x),
        &plan128,
        GemmVersion::V1,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    let x5 = dev.zeros::<bf16>(&[5, 16]).unwrap();
    let e = v2(
        &mut out128,
        GemmRows::Indexed(&x5),
        &plan128,
        GemmVersion::V2,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    v2(
        &mut out128,
        GemmRows::Indexed(&x),
        &plan128,
        GemmVersion::V2,
    )
    .unwrap();

    // v3: Hopper only, gathered rows only, and tensor maps need 16-byte aligned bases.
    match GemmVersion::V3.check_device("test", &dev) {
        Err(e) => assert!(e.to_string().contains("V1 and V2 run"), "{e}"),
        Ok(()) => {
            let e = v2(
                &mut out128,
                GemmRows::Indexed(&x),
                &plan128,
                GemmVersion::V3,
            )
            .unwrap_err();
            assert!(e.to_string().contains("V2 does"), "{e}");
            let rows128 = plan128.rows(Layout::Padded);
            let a128 = dev.zeros::<bf16>(&[rows128 * 16 + 8]).unwrap();
            use cudarc::driver::DevicePtr;
            let base = a128.buf().device_ptr(dev.stream()).0;
            // SAFETY: rows128 * 16 elements from element 4 lie inside a128, which outlives the view.
            let shifted = unsafe {
                moe_kernels::device::TensorView::<bf16>::from_raw(
                    &dev,
                    base + 8,
                    rows128 * 16,
                    &[rows128, 16],
                )
            }
            .unwrap();
            let e = v2(
                &mut out128,
                GemmRows::Gathered(&shifted),
                &plan128,
                GemmVersion::V3,
            )
            .unwrap_err();
            assert!(
                e.to_string().contains("16-byte aligned") && e.to_string().contains("V1 and V2"),
                "{e}"
            );
            let a_ok = dev.zeros::<bf16>(&[rows128, 16]).unwrap();
            v2(
                &mut out128,
                GemmRows::Gathered(&a_ok),
                &plan128,
                GemmVersion::V3,
            )
            .unwrap();
        }
    }
}
