//! The whole MoE block: the CPU forward against transformers' own outputs (tests/fixtures), and
//! the GPU layer against the CPU forward, including workspace reuse and CUDA-graph replay.

mod common;

use std::path::PathBuf;

use half::bf16;
use moe_kernels::activation::{GateLayout, GatedAct};
use moe_kernels::gemm::{GemmVersion, ScaleAt};
use moe_kernels::layer::{
    Experts, ForwardOptions, LayerWeights, MoeConfig, MoeLayer, Path as GemmPath, SharedExpert,
    ZeroExpert, reference,
};
use moe_kernels::lora::{LoraAdapters, MoleConfig, MoleFfn, MoleWeights, mole_reference};
use moe_kernels::model::{Model, TensorFile};
use moe_kernels::rng::Rng;
use moe_kernels::routing::{RouterConfig, RouterRule, reference as route_ref};
use moe_kernels::{Device, Float};

/// One fixture: its folder, layer, input and transformers' outputs.
struct Fixture {
    name: String,
    dir: PathBuf,
    layer: usize,
    tokens: usize,
    input: Vec<f32>,
    output: Vec<f32>,
    output_bf16: Vec<f32>,
    ids: Vec<i64>,
    weights: Vec<f32>,
}

fn fixtures() -> Vec<Fixture> {
    let root = common::fixtures_dir();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("io.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "fixtures missing under {}",
        root.display()
    );
    dirs.into_iter()
        .map(|dir| {
            let io = TensorFile::open(&dir.join("io.safetensors")).expect("io.safetensors");
            let layer = io.metadata().expect("metadata")["layer"]
                .parse()
                .expect("layer");
            let f32s = |n: &str| io.raw(n).expect(n).to_vec::<f32>().expect(n);
            let input = io.raw("input").expect("input");
            Fixture {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                layer,
                tokens: input.shape[0],
                input: f32s("input"),
                output: f32s("output"),
                output_bf16: f32s("output_bf16"),
                ids: io.raw("topk_ids").unwrap().to_i64().unwrap(),
                weights: f32s("topk_weights"),
                dir,
            }
        })
        .collect()
}

/// `(id, weight)` of each token's slots, ids ascending, as the fixtures store them.
fn sorted_routing(ids: &[i32], weights: &[f64], k: usize) -> (Vec<i64>, Vec<f64>) {
    let (mut si, mut sw) = (Vec::new(), Vec::new());
    for t in 0..ids.len() / k {
        let mut row: Vec<(i32, f64)> = (t * k..(t + 1) * k).map(|s| (ids[s], weights[s])).collect();
        row.sort_by_key(|&(id, _)| id);
        si.extend(row.iter().map(|&(i, _)| i64::from(i)));
        sw.extend(row.iter().map(|&(_, w)| w));
    }
    (si, sw)
}

/// max |got - want| over max |want|.
fn rel_max_err(got: &[f64], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g - f64::from(w)).abs()));
    err / scale
}

fn cpu_forward<S: Float>(model: &Model, f: &Fixture) -> (reference::Forward, usize) {
    let (cfg, w) = model.load_layer::<S>(f.layer).expect("load_layer");
    let x: Vec<f64> = f.input.iter().map(|&v| S::from_f32(v).to_f64()).collect();
    (reference::forward(&cfg, &w, &x).expect("forward"), cfg.k())
}

#[test]
fn cpu_forward_matches_transformers_on_every_fixture() {
    let mut checked = 0;
    for f in fixtures() {
        let model = Model::open(&f.dir).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        // f32 storage holds every checkpoint's weights exactly (bf16, f16, f32, and FP8 codes
        // times their f32 block scales), as transformers' float32 run does.
        let (out, k) = cpu_forward::<f32>(&model, &f);
        let (ids, weights) = sorted_routing(&out.routing.ids, &out.routing.weights, k);
        assert_eq!(ids, f.ids, "{}: chosen experts", f.name);
        for (g, w) in weights.iter().zip(&f.weights) {
            assert!(
                (g - f64::from(*w)).abs() <= 1e-6,
                "{}: weight {g} vs {w}",
                f.name
            );
        }
        // transformers ran in float32: agreement to f32 accumulation error.
        let e = rel_max_err(&out.y, &f.output);
        assert!(e <= 1e-5, "{}: output off by {e:.2e} of its scale", f.name);
        // Its bfloat16 run rounds at every step: within bf16 tolerance of the exact block.
        let e16 = rel_max_err(&out.y, &f.output_bf16);
        assert!(e16 <= 0.03, "{}: bf16 output off by {e16:.2e}", f.name);
        checked += 1;
    }
    assert!(checked >= 19, "only {checked} fixtures checked");
}

#[test]
fn gpt_oss_mxfp4_experts_load_packed() {
    let f = common::fixtures_dir().join("gpt_oss_mxfp4");
    let (cfg, w) = Model::open(&f).unwrap().load_layer::<bf16>(1).unwrap();
    let Experts::Packed { gate_up, down } = &w.experts else {
        panic!("MXFP4 experts were decoded at load time");
    };
    assert_eq!((gate_up.len(), down.len()), (cfg.experts, cfg.experts));
    assert!(gate_up.iter().chain(down).all(|m| m.name() == "mxfp4"));
    // 4.25 bits per weight: a quarter of bf16's bytes plus the scales.
    let plain = 2 * cfg.experts * 3 * cfg.hidden * cfg.intermediate;
    assert_eq!(w.experts.bytes() * 64, plain * 17);
}

#[test]
fn deepseek_v3_fp8_experts_load_packed() {
    let f = common::fixtures_dir().join("deepseek_v3_fp8");
    let (cfg, w) = Model::open(&f).unwrap().load_layer::<bf16>(1).unwrap();
    let Experts::Packed { gate_up, down } = &w.experts else {
        panic!("FP8 experts were decoded at load time");
    };
    assert!(
        gate_up
            .iter()
            .chain(down)
            .all(|m| m.name() == "fp8-e4m3-b128")
    );
    assert_eq!(gate_up[0].shape(), (2 * cfg.intermediate, cfg.hidden));
    // The shared expert (FP8 on disk too) was decoded into the plain weights.
    assert!(w.shared_gate_up.is_some());
}

#[test]
fn gpu_layer_matches_transformers_on_every_fixture() {
    let Some(dev) = common::gpu("gpu_layer_matches_transformers_on_every_fixture") else {
        return;
    };
    for f in fixtures() {
        let model = Model::open(&f.dir).unwrap();
        let (cfg, w) = model.load_layer::<bf16>(f.layer).unwrap();
        for path in [GemmPath::Decode, GemmPath::Gemv, GemmPath::Gemm] {
            let mut layer = MoeLayer::<bf16>::new(&dev, &cfg, &w, f.tokens).unwrap();
            layer.set_path(path);
            let x: Vec<bf16> = f.input.iter().map(|&v| bf16::from_f32(v)).collect();
            let xd = dev.upload(&x, &[f.tokens, cfg.hidden]).unwrap();
            let mut y = dev
                .filled_bytes::<bf16>(&[f.tokens, cfg.hidden], 0xff)
                .unwrap();
            layer.forward_into(&dev, &mut y, &xd).unwrap();
            layer.check(&dev).unwrap();
            let got: Vec<f64> = dev
                .download(&y)
                .unwrap()
                .iter()
                .map(|v| v.to_f64())
                .collect();
            let (ids, wts) = layer.routing();
            let ids = dev.download(ids).unwrap();
            let wts: Vec<f64> = dev
                .download(wts)
                .unwrap()
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let (ids, _) = sorted_routing(&ids, &wts, cfg.k());
            assert_eq!(ids, f.ids, "{} {path:?}: chosen experts", f.name);
            let e = rel_max_err(&got, &f.output_bf16);
            assert!(e <= 0.03, "{} {path:?}: off by {e:.2e} of scale", f.name);
            let e32 = rel_max_err(&got, &f.output);
            assert!(e32 <= 0.03, "{} {path:?}: off f32 by {e32:.2e}", f.name);
        }
    }
}

/// A random block of `cfg` with router weights scaled so routing margins are wide, on the
/// host.
fn random_weights(cfg: &MoeConfig, seed: u64) -> LayerWeights<bf16> {
    let mut rng = Rng::new(seed);
    let (h, i, e, et) = (
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.experts_total(),
    );
    let z = cfg.zero_experts.len();
    let mut draw = |n: usize, a: f64| -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f64(rng.uniform(-a, a))).collect()
    };
    let is = cfg.shared.map_or(0, |s| s.intermediate);
    let router: Vec<f32> = draw(et * h, 4.0 / (h as f64).sqrt())
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let sh = 1.0 / (h as f64).sqrt();
    let si = 1.0 / (i as f64).sqrt();
    LayerWeights {
        router_bias: cfg
            .router_bias
            .then(|| draw(et, 0.5).iter().map(|v| v.to_f32()).collect()),
        correction_bias: cfg
            .correction_bias
            .then(|| draw(et, 0.05).iter().map(|v| v.to_f32()).collect()),
        router,
        experts: Experts::Plain {
            gate_up: draw(e * 2 * i * h, 2.0 * sh),
            down: draw(e * h * i, 2.0 * si),
        },
        gate_up_bias: cfg.expert_bias.then(|| draw(e * 2 * i, 0.5)),
        down_bias: cfg.expert_bias.then(|| draw(e * h, 0.5)),
        shared_gate_up: cfg.shared.map(|_| draw(2 * is * h, 2.0 * sh)),
        shared_down: cfg
            .shared
            .map(|s| draw(h * s.intermediate, 2.0 / (is as f64).sqrt())),
        shared_gate: cfg.shared.filter(|s| s.gated).map(|_| draw(h, sh)),
        const_w: cfg
            .zero_experts
            .contains(&ZeroExpert::Constant)
            .then(|| draw(z * 2 * h, sh)),
        const_v: cfg
            .zero_experts
            .contains(&ZeroExpert::Constant)
            .then(|| draw(z * h, 1.0)),
    }
}

/// The configurations the GPU layer is checked on: each model's special parts, plus
/// zero-computation experts and dynamic top-p.
fn configs() -> Vec<(&'static str, MoeConfig)> {
    let base = MoeConfig::new;
    vec![
        ("mixtral-like", base(64, 32, 8, RouterConfig::mixtral(2))),
        (
            "qwen2-like shared gated, E=60",
            MoeConfig {
                shared: Some(SharedExpert {
                    intermediate: 48,
                    gated: true,
                }),
                ..base(64, 16, 60, RouterConfig::qwen(4, false))
            },
        ),
        (
            "deepseek-v3-like",
            MoeConfig {
                router_f32: true,
                correction_bias: true,
                shared: Some(SharedExpert {
                    intermediate: 32,
                    gated: false,
                }),
                ..base(64, 16, 32, RouterConfig::deepseek_v3(4, 4, 2, true, 2.5))
            },
        ),
        (
            "gpt-oss-like",
            MoeConfig {
                router_bias: true,
                expert_bias: true,
                gate_layout: GateLayout::Interleaved,
                act: GatedAct::GPT_OSS,
                ..base(64, 32, 16, RouterConfig::gpt_oss(4))
            },
        ),
        (
            "llama4-like",
            MoeConfig {
                weight_at: ScaleAt::Input,
                shared: Some(SharedExpert {
                    intermediate: 32,
                    gated: false,
                }),
                ..base(64, 32, 16, RouterConfig::llama4(1))
            },
        ),
        (
            "moe++ zero/copy/constant, top-p",
            MoeConfig {
                zero_experts: vec![ZeroExpert::Zero, ZeroExpert::Copy, ZeroExpert::Constant],
                ..base(
                    64,
                    32,
                    8,
                    RouterConfig::new(
                        RouterRule::TopP {
                            p: 0.6,
                            renormalize: true,
                        },
                        4,
                    ),
                )
            },
        ),
    ]
}

#[test]
fn gpu_layer_matches_cpu_forward() {
    let Some(dev) = common::gpu("gpu_layer_matches_cpu_forward") else {
        return;
    };
    for (name, cfg) in configs() {
        let w = random_weights(&cfg, 11);
        let max_t = 130;
        let mut layer = MoeLayer::<bf16>::new(&dev, &cfg, &w, max_t).unwrap();
        let (mut compared, mut total) = (0, 0);
        for (t, path) in [
            (1, GemmPath::Auto),
            (5, GemmPath::Gemm),
            (16, GemmPath::Auto),
            (17, GemmPath::Gemv),
            (130, GemmPath::Auto),
        ] {
            layer.set_path(path);
            compared += check_against_cpu(&dev, &mut layer, &cfg, &w, t, name);
            total += t;
        }
        // Above: the default prefill GEMM, v2, reading gate/up rows through the plan. Then v1,
        // and v3 where the device runs it (Hopper, or the emulator).
        let mut versions = vec![GemmVersion::V1];
        if GemmVersion::V3.check_device("test", &dev).is_ok() {
            versions.push(GemmVersion::V3);
        }
        for version in versions {
            layer.set_gemm_version(&dev, version).unwrap();
            for (t, path) in [
                (5, GemmPath::Gemm),
                (130, GemmPath::Auto),
                (3, GemmPath::Auto),
            ] {
                layer.set_path(path);
                compared += check_against_cpu(&dev, &mut layer, &cfg, &w, t, name);
                total += t;
            }
        }
        assert!(
            4 * compared >= 3 * total,
            "{name}: only {compared} of {total} tokens routed as the CPU forward routes them"
        );
    }
}

/// Runs the GPU layer on `t` random tokens and compares every token that both route to the
/// same experts with the CPU forward; a token routed differently must be a near-tie. Returns
/// how many tokens were compared.
/// A layer of up to `t` tokens on the decode path with `version`'s kernels.
fn decode_layer<T: Float>(
    dev: &Device,
    cfg: &MoeConfig,
    w: &LayerWeights<T>,
    t: usize,
    version: moe_kernels::layer::DecodeVersion,
) -> MoeLayer<T> {
    let mut layer = MoeLayer::<T>::new(dev, cfg, w, t).unwrap();
    layer.set_path(GemmPath::Decode);
    layer.set_decode_version(version);
    layer
}

/// n activations drawn uniformly from [-1, 1), rounded to bf16.
fn uniform_x(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
        .collect()
}

fn check_against_cpu<T: Float>(
    dev: &Device,
    layer: &mut MoeLayer<T>,
    cfg: &MoeConfig,
    w: &LayerWeights<T>,
    t: usize,
    name: &str,
) -> usize {
    check_masked_against_cpu(dev, layer, cfg, w, t, name, None)
}

/// Expert masks as a test sets them: `removed[m]` lists mask m's experts, `index` each token's
/// mask (-1 for none; `None`: mask 0 for every token).
struct TestMasks {
    removed: Vec<Vec<usize>>,
    index: Option<Vec<i32>>,
}

impl TestMasks {
    /// A third of the E_total experts drawn at random; all but one; and, per token of `t`,
    /// one of them or none.
    fn draw(rng: &mut Rng, et: usize, t: usize) -> Self {
        let third: Vec<usize> = (0..et).filter(|_| rng.below(3) == 0).collect();
        let left = rng.below(et as u64) as usize;
        TestMasks {
            removed: vec![third, (0..et).filter(|&e| e != left).collect()],
            index: Some((0..t).map(|_| rng.below(3) as i32 - 1).collect()),
        }
    }

    /// `[T, E_total]`: whether token t's mask removes expert e.
    fn per_token(&self, t: usize, et: usize) -> Vec<bool> {
        (0..t)
            .flat_map(|tok| {
                let m = self.index.as_ref().map_or(0, |i| i[tok]);
                (0..et).map(move |e| m >= 0 && self.removed[m as usize].contains(&e))
            })
            .collect()
    }
}

/// [`check_against_cpu`] with expert masks: set on the layer, and removed in the CPU forward.
fn check_masked_against_cpu<T: Float>(
    dev: &Device,
    layer: &mut MoeLayer<T>,
    cfg: &MoeConfig,
    w: &LayerWeights<T>,
    t: usize,
    name: &str,
    masks: Option<&TestMasks>,
) -> usize {
    let h = cfg.hidden;
    let mut rng = Rng::new(t as u64 + 3);
    let x: Vec<T> = uniform_x(&mut rng, t * h)
        .into_iter()
        .map(|v| T::from_f64(v.to_f64()))
        .collect();
    let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let controls = reference::Controls {
        removed: masks.map(|m| m.per_token(t, cfg.experts_total())),
        ..Default::default()
    };
    let want = reference::forward_with(cfg, w, &xf, &controls).unwrap();
    let xd = dev.upload(&x, &[t, h]).unwrap();
    let mut y = dev.filled_bytes::<T>(&[t, h], 0xff).unwrap();
    let index = masks.and_then(|m| m.index.as_ref().map(|i| dev.upload(i, &[t]).unwrap()));
    if let Some(m) = masks {
        let lists: Vec<&[usize]> = m.removed.iter().map(Vec::as_slice).collect();
        layer.set_expert_masks(dev, &lists).unwrap();
    }
    let opts = ForwardOptions {
        mask_index: index.as_ref(),
        ..Default::default()
    };
    layer.forward_with(dev, &mut y, &xd, opts).unwrap();
    layer.check(dev).unwrap();
    if masks.is_some() {
        layer.set_expert_masks(dev, &[]).unwrap();
    }
    let got = dev.download(&y).unwrap();
    let ids = dev.download(layer.routing().0).unwrap();
    let k = cfg.k();
    let scale = want.y.iter().fold(0f64, |m, v| m.max(v.abs()));
    let mut compared = 0;
    for tok in 0..t {
        if !route_ref::same_experts(
            &ids[tok * k..(tok + 1) * k],
            &want.routing.ids[tok * k..(tok + 1) * k],
        ) {
            // Only a near-tie may route differently: the GPU rounds bf16 routers' logits to
            // bf16, and f32 routers differ from f64 by accumulation order alone.
            let bound = if cfg.router_f32 {
                1e-4
            } else {
                route_ref::BF16_LOGIT_TIE
            };
            let margin = want.routing.margin[tok];
            assert!(
                margin < bound,
                "{name} T={t}: token {tok} routed to {:?}, the CPU to {:?}, with margin {margin}",
                &ids[tok * k..(tok + 1) * k],
                &want.routing.ids[tok * k..(tok + 1) * k]
            );
            continue;
        }
        compared += 1;
        for c in 0..h {
            let (g, r) = (got[tok * h + c].to_f64(), want.y[tok * h + c]);
            assert!(
                (g - r).abs() <= 0.02 * scale + 0.02 * r.abs(),
                "{name} T={t}: token {tok} col {c}: got {g}, want {r} (scale {scale})"
            );
        }
    }
    compared
}

#[test]
fn gpu_layer_workspace_serves_every_smaller_batch() {
    let Some(dev) = common::gpu("gpu_layer_workspace_serves_every_smaller_batch") else {
        return;
    };
    let (_, cfg) = &configs()[1];
    let w = random_weights(cfg, 5);
    let mut big = MoeLayer::<bf16>::new(&dev, cfg, &w, 200).unwrap();
    // Every T through one layer, large after small and back, equals a layer sized for T.
    for t in [200, 3, 77, 1, 200, 16, 64] {
        let mut rng = Rng::new(t as u64);
        let x = uniform_x(&mut rng, t * cfg.hidden);
        let xd = dev.upload(&x, &[t, cfg.hidden]).unwrap();
        let run = |layer: &mut MoeLayer<bf16>| {
            let mut y = dev.filled_bytes::<bf16>(&[t, cfg.hidden], 0xff).unwrap();
            layer.forward_into(&dev, &mut y, &xd).unwrap();
            dev.download(&y).unwrap()
        };
        let mut fresh = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
        let (a, b) = (run(&mut big), run(&mut fresh));
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "T={t}: reused workspace differs from a fresh one"
        );
    }
}

/// What `forward` enqueues on the device's stream, captured into a CUDA graph.
fn capture(dev: &Device, forward: impl FnOnce()) -> cudarc::driver::CudaGraph {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    dev.stream()
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    forward();
    dev.stream()
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
        .unwrap()
        .expect("a captured graph")
}

/// Launches `graph` over a poisoned `y` and says whether it wrote `want`, bit for bit.
fn replay_gives(
    dev: &Device,
    graph: &cudarc::driver::CudaGraph,
    y: &mut moe_kernels::Tensor<bf16>,
    want: &[bf16],
) -> bool {
    dev.fill_bytes(y, 0xff).unwrap();
    graph.launch().unwrap();
    let got = dev.download(y).unwrap();
    got.iter()
        .zip(want)
        .all(|(p, q)| p.to_bits() == q.to_bits())
}

#[test]
fn gpu_layer_replays_from_a_cuda_graph() {
    let Some(dev) = common::gpu("gpu_layer_replays_from_a_cuda_graph") else {
        return;
    };
    for (name, cfg) in [&configs()[1], &configs()[2]] {
        let w = random_weights(cfg, 9);
        // The decode path and the planned GEMV at decode sizes, the GEMM v2 at prefill.
        for (t, path) in [
            (4, GemmPath::Decode),
            (4, GemmPath::Gemv),
            (100, GemmPath::Auto),
        ] {
            let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
            layer.set_path(path);
            if t == 100 {
                layer.set_gemm_version(&dev, GemmVersion::V2).unwrap();
            }
            let mut rng = Rng::new(t as u64);
            let mut draw = || uniform_x(&mut rng, t * cfg.hidden);
            let (x1, x2) = (draw(), draw());
            let mut xd = dev.upload(&x1, &[t, cfg.hidden]).unwrap();
            let mut y = dev.zeros::<bf16>(&[t, cfg.hidden]).unwrap();
            // Eager results for both inputs; the first run also loads the modules.
            layer.forward_into(&dev, &mut y, &xd).unwrap();
            let eager1 = dev.download(&y).unwrap();
            dev.upload_into(&mut xd, &x2).unwrap();
            layer.forward_into(&dev, &mut y, &xd).unwrap();
            let eager2 = dev.download(&y).unwrap();

            let graph = capture(&dev, || layer.forward_into(&dev, &mut y, &xd).unwrap());
            for (x, want) in [(&x1, &eager1), (&x2, &eager2), (&x1, &eager1)] {
                dev.upload_into(&mut xd, x).unwrap();
                assert!(
                    replay_gives(&dev, &graph, &mut y, want),
                    "{name} T={t} {path:?}: graph replay differs from the eager forward"
                );
            }
        }
    }
}

#[test]
fn gpu_graph_replays_with_new_masks() {
    let Some(dev) = common::gpu("gpu_graph_replays_with_new_masks") else {
        return;
    };
    let (name, cfg) = &configs()[1];
    let w = random_weights(cfg, 9);
    let (h, et) = (cfg.hidden, cfg.experts_total());
    let a: Vec<usize> = (0..et).step_by(3).collect();
    let b: Vec<usize> = (0..et).filter(|e| e % 4 != 1).collect();
    for (t, path) in [
        (4, GemmPath::Decode),
        (4, GemmPath::Gemv),
        (40, GemmPath::Gemm),
    ] {
        let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
        layer.set_path(path);
        let mut rng = Rng::new(t as u64);
        let xd = dev.upload(&uniform_x(&mut rng, t * h), &[t, h]).unwrap();
        let first: Vec<i32> = (0..t as i32).map(|i| i % 2).collect();
        let second: Vec<i32> = (0..t as i32).map(|i| 1 - i % 3).collect();
        let mut index = dev.upload(&first, &[t]).unwrap();
        let mut y = dev.zeros::<bf16>(&[t, h]).unwrap();
        let mut run = |layer: &mut MoeLayer<bf16>, index: &moe_kernels::Tensor<i32>| {
            let opts = ForwardOptions {
                mask_index: Some(index),
                ..Default::default()
            };
            layer.forward_with(&dev, &mut y, &xd, opts).unwrap();
            dev.download(&y).unwrap()
        };
        // Eager results for masks (a, b) with the first index, then (b, a) with the second.
        layer.set_expert_masks(&dev, &[&a, &b]).unwrap();
        let eager1 = run(&mut layer, &index);
        layer.set_expert_masks(&dev, &[&b, &a]).unwrap();
        dev.upload_into(&mut index, &second).unwrap();
        let eager2 = run(&mut layer, &index);
        assert!(eager1 != eager2, "{name} T={t}: the masks changed nothing");

        layer.set_expert_masks(&dev, &[&a, &b]).unwrap();
        dev.upload_into(&mut index, &first).unwrap();
        let mut yg = dev.zeros::<bf16>(&[t, h]).unwrap();
        let opts = ForwardOptions {
            mask_index: Some(&index),
            ..Default::default()
        };
        let graph = capture(&dev, || {
            layer.forward_with(&dev, &mut yg, &xd, opts).unwrap()
        });
        for (masks, idx, want) in [
            ([&a, &b], &first, &eager1),
            ([&b, &a], &second, &eager2),
            ([&a, &b], &first, &eager1),
        ] {
            layer.set_expert_masks(&dev, &[masks[0], masks[1]]).unwrap();
            dev.upload_into(&mut index, idx).unwrap();
            assert!(
                replay_gives(&dev, &graph, &mut yg, want),
                "{name} T={t} {path:?}: replay with new masks differs from the eager forward"
            );
        }
        layer.check(&dev).unwrap();
    }
}

#[test]
fn layer_refuses_bad_configurations_and_weights() {
    let cfg = MoeConfig::new(64, 32, 8, RouterConfig::mixtral(2));
    let w = random_weights(&cfg, 1);
    let x = vec![0.25; 64];
    assert!(reference::forward(&cfg, &w, &x).is_ok());

    let msg = |r: Result<reference::Forward, moe_kernels::Error>| r.unwrap_err().to_string();
    let mut short = w.clone();
    if let Experts::Plain { down, .. } = &mut short.experts {
        down.pop();
    }
    assert!(msg(reference::forward(&cfg, &short, &x)).contains("`down`"));
    let mut extra = w.clone();
    extra.gate_up_bias = Some(vec![bf16::ZERO; 8 * 64]);
    assert!(msg(reference::forward(&cfg, &extra, &x)).contains("gate_up_bias"));
    assert!(msg(reference::forward(&cfg, &w, &x[..63])).contains("`x`"));
    let mut nan = x.clone();
    nan[10] = f64::NAN;
    assert!(msg(reference::forward(&cfg, &w, &nan)).contains("finite"));
    let k_too_big = MoeConfig::new(64, 32, 8, RouterConfig::mixtral(9));
    assert!(reference::forward(&k_too_big, &w, &x).is_err());
    let input_scaled_with_zc = MoeConfig {
        weight_at: ScaleAt::Input,
        zero_experts: vec![ZeroExpert::Copy],
        ..cfg.clone()
    };
    assert!(input_scaled_with_zc.validate("test").is_err());
    let bias_without_rule = MoeConfig {
        correction_bias: true,
        ..cfg
    };
    assert!(bias_without_rule.validate("test").is_err());
}

#[test]
fn compressed_layer_error_against_bf16_is_reported() {
    use moe_kernels::quant::{
        Dictionary, Fp8Matrix, IntMatrix, Mxfp4Matrix, QuantMatrix, TernaryMatrix, ternarize,
    };
    use std::sync::Arc;
    // A Qwen3-style block (softmax top-4 of 16, renormalised) with Gaussian 1/sqrt(fan-in)
    // weights, its experts compressed by plain round-to-nearest (no calibration), against the
    // same block in bf16, on 32 tokens: the relative RMS error of the layer output.
    let cfg = MoeConfig::new(256, 128, 16, RouterConfig::qwen(4, true));
    let (h, i, e) = (cfg.hidden, cfg.intermediate, cfg.experts);
    let mut rng = Rng::new(2024);
    let mut gauss = |n: usize, fan_in: usize| -> Vec<f32> {
        let std = 1.0 / (fan_in as f64).sqrt();
        (0..n).map(|_| (rng.normal() * std) as f32).collect()
    };
    let gate_up: Vec<Vec<f32>> = (0..e).map(|_| gauss(2 * i * h, h)).collect();
    let down: Vec<Vec<f32>> = (0..e).map(|_| gauss(h * i, i)).collect();
    let router: Vec<f32> = gauss(e * h, h).iter().map(|v| 4.0 * v).collect();
    let x: Vec<f64> = gauss(32 * h, 1).iter().map(|&v| f64::from(v)).collect();
    let plain = LayerWeights::<bf16> {
        router: router.clone(),
        router_bias: None,
        correction_bias: None,
        experts: Experts::Plain {
            gate_up: gate_up
                .iter()
                .flatten()
                .map(|&v| bf16::from_f32(v))
                .collect(),
            down: down.iter().flatten().map(|&v| bf16::from_f32(v)).collect(),
        },
        gate_up_bias: None,
        down_bias: None,
        shared_gate_up: None,
        shared_down: None,
        shared_gate: None,
        const_w: None,
        const_v: None,
    };
    let want = reference::forward(&cfg, &plain, &x).unwrap();
    let norm = want.y.iter().map(|v| v * v).sum::<f64>().sqrt();
    type Pack = dyn Fn(&[f32], usize, usize) -> QuantMatrix;
    let ternary = |w: &[f32], n: usize, kd: usize| {
        let t = ternarize(w, n, kd, 0.9).unwrap();
        let sample: Vec<Vec<u8>> = (0..n.min(32)).map(|r| t.symbols(r)).collect();
        let dict = Arc::new(Dictionary::build(&sample, 4096).unwrap());
        QuantMatrix::Ternary(TernaryMatrix::compress(&t, dict).unwrap())
    };
    let formats: [(&str, Box<Pack>, f64); 5] = [
        (
            "int8-g128",
            Box::new(|w, n, kd| {
                QuantMatrix::Int(IntMatrix::quantize(w, n, kd, 8, 128, false).unwrap())
            }),
            0.03,
        ),
        (
            "fp8-b128",
            Box::new(|w, n, kd| QuantMatrix::Fp8(Fp8Matrix::quantize(w, n, kd).unwrap())),
            0.10,
        ),
        (
            "int4-g128-zp",
            Box::new(|w, n, kd| {
                QuantMatrix::Int(IntMatrix::quantize(w, n, kd, 4, 128, true).unwrap())
            }),
            0.35,
        ),
        (
            "mxfp4",
            Box::new(|w, n, kd| QuantMatrix::Mxfp4(Mxfp4Matrix::quantize(w, n, kd).unwrap())),
            0.40,
        ),
        ("ternary-90%", Box::new(ternary), 1.5),
    ];
    let mut errors = Vec::new();
    for (name, pack, bound) in &formats {
        let packed = LayerWeights::<bf16> {
            experts: Experts::Packed {
                gate_up: gate_up.iter().map(|w| pack(w, 2 * i, h)).collect(),
                down: down.iter().map(|w| pack(w, h, i)).collect(),
            },
            ..plain.clone()
        };
        let got = reference::forward(&cfg, &packed, &x).unwrap();
        assert_eq!(
            got.routing.ids, want.routing.ids,
            "{name}: the router is not compressed"
        );
        let err = got
            .y
            .iter()
            .zip(&want.y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt()
            / norm;
        eprintln!(
            "layer output error against bf16, {name}: {:.2}%",
            100.0 * err
        );
        assert!(err > 0.0 && err < *bound, "{name}: {err}");
        errors.push(err);
    }
    // More bits, less error.
    assert!(errors[0] < errors[1] && errors[1] < errors[2] && errors[2] < errors[4]);
}

// ---- the decode path ----

/// `w` with its routed experts packed in `format` (`mixed`: a different format per expert).
fn packed(cfg: &MoeConfig, w: &LayerWeights<bf16>, format: &str) -> LayerWeights<bf16> {
    use moe_kernels::quant::{
        Dictionary, Fp8Matrix, IntMatrix, Mxfp4Matrix, QuantMatrix, TernaryMatrix, ternarize,
    };
    use std::sync::Arc;
    let (h, i, e) = (cfg.hidden, cfg.intermediate, cfg.experts);
    let Experts::Plain { gate_up, down } = &w.experts else {
        panic!("plain experts expected");
    };
    let pack = |f: &str, v: &[bf16], n: usize, kd: usize| -> QuantMatrix {
        let v: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        // "int{4,8}-g{G}[-sym][-act]": a group of G, symmetric, GPTQ's act-order (the groups
        // of a column permutation, g_idx[k] = ((k * 7 + 3) mod Kd) / G).
        if let Some(rest) = f.strip_prefix("int").filter(|r| r.contains("-g")) {
            let bits: u32 = rest[..1].parse().unwrap();
            let mut parts = rest.split('-').skip(1);
            let group: usize = parts.next().unwrap()[1..].parse().unwrap();
            let flags: Vec<&str> = parts.collect();
            let m = IntMatrix::quantize(&v, n, kd, bits, group, !flags.contains(&"sym")).unwrap();
            if !flags.contains(&"act") {
                return QuantMatrix::Int(m);
            }
            let g_idx = (0..kd)
                .map(|k| (((k * 7 + 3) % kd) / group) as u32)
                .collect();
            return QuantMatrix::Int(
                IntMatrix::new(
                    bits,
                    group,
                    n,
                    kd,
                    m.qweight().to_vec(),
                    m.scales().to_vec(),
                    m.zeros().map(<[u8]>::to_vec),
                    Some(g_idx),
                )
                .unwrap(),
            );
        }
        match f {
            "int4" => QuantMatrix::Int(IntMatrix::quantize(&v, n, kd, 4, 32, true).unwrap()),
            "int8" => QuantMatrix::Int(IntMatrix::quantize(&v, n, kd, 8, 32, false).unwrap()),
            "mxfp4" => QuantMatrix::Mxfp4(Mxfp4Matrix::quantize(&v, n, kd).unwrap()),
            "fp8" => QuantMatrix::Fp8(Fp8Matrix::quantize(&v, n, kd).unwrap()),
            _ => {
                let t = ternarize(&v, n, kd, 0.6).unwrap();
                let sample: Vec<Vec<u8>> = (0..n).map(|r| t.symbols(r)).collect();
                let dict = Arc::new(Dictionary::build(&sample, 4096).unwrap());
                QuantMatrix::Ternary(TernaryMatrix::compress(&t, dict).unwrap())
            }
        }
    };
    const MIXED: [&str; 5] = ["int4", "mxfp4", "fp8", "int8", "ternary"];
    let of = |x: usize| {
        if format == "mixed" {
            MIXED[x % 5]
        } else {
            format
        }
    };
    LayerWeights {
        experts: Experts::Packed {
            gate_up: (0..e)
                .map(|x| pack(of(x), &gate_up[x * 2 * i * h..][..2 * i * h], 2 * i, h))
                .collect(),
            down: (0..e)
                .map(|x| pack(of(x), &down[x * h * i..][..h * i], h, i))
                .collect(),
        },
        ..w.clone()
    }
}

/// One forward of `x [T, H]` into an output first filled with NaN bits: the ids, and the bits of
/// the weights and of y.
fn forward_bits(
    dev: &Device,
    layer: &mut MoeLayer<bf16>,
    x: &moe_kernels::Tensor<bf16>,
) -> (Vec<i32>, Vec<u32>, Vec<u16>) {
    let mut y = dev.filled_bytes::<bf16>(x.shape(), 0xff).unwrap();
    layer.forward_into(dev, &mut y, x).unwrap();
    layer.check(dev).unwrap();
    let (ids, wts) = layer.routing();
    let wts = dev
        .download(wts)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let y = dev
        .download(&y)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    (dev.download(ids).unwrap(), wts, y)
}

/// The decode path on `t` tokens: against the CPU forward (check_against_cpu), its ids and
/// weights bit for bit those of the routing kernel (the planned GEMV path's), and the same bits
/// on a second run. Returns the tokens compared.
fn check_decode(
    dev: &Device,
    cfg: &MoeConfig,
    w: &LayerWeights<bf16>,
    t: usize,
    name: &str,
) -> usize {
    let mut layer = MoeLayer::<bf16>::new(dev, cfg, w, t).unwrap();
    layer.set_path(GemmPath::Decode);
    let compared = check_against_cpu(dev, &mut layer, cfg, w, t, name);
    let h = cfg.hidden;
    let mut rng = Rng::new(t as u64 + 3);
    let x = uniform_x(&mut rng, t * h);
    let xd = dev.upload(&x, &[t, h]).unwrap();
    let run = |layer: &mut MoeLayer<bf16>| forward_bits(dev, layer, &xd);
    let first = run(&mut layer);
    assert!(
        first == run(&mut layer),
        "{name} T={t}: two decode runs differ"
    );
    let mut planned = MoeLayer::<bf16>::new(dev, cfg, w, t).unwrap();
    planned.set_path(GemmPath::Gemv);
    let other = run(&mut planned);
    assert_eq!(
        first.0, other.0,
        "{name} T={t}: ids differ from the routing kernel's"
    );
    assert_eq!(
        first.1, other.1,
        "{name} T={t}: weights differ from the routing kernel's"
    );
    compared
}

/// The presets' blocks at a width the emulator runs in moments (hidden 384, intermediate 96: a
/// partial step of the 256-column loop), every expert, rule and feature kept.
fn narrow_presets() -> Vec<(String, MoeConfig)> {
    use moe_kernels::layer::presets;
    presets::NAMES
        .iter()
        .map(|n| {
            (
                format!("{n} at H=384"),
                presets::narrowed(n, 384, 96).unwrap(),
            )
        })
        .collect()
}

#[test]
fn gpu_decode_path_matches_the_cpu_forward_in_every_format() {
    let Some(dev) = common::gpu("gpu_decode_path_matches_the_cpu_forward_in_every_format") else {
        return;
    };
    let mut cases: Vec<(String, MoeConfig)> = configs()
        .into_iter()
        .map(|(n, c)| (n.to_string(), c))
        .collect();
    cases.extend(narrow_presets());
    let (mut compared, mut total) = (0, 0);
    for (name, cfg) in &cases {
        let w = random_weights(cfg, 21);
        for t in [1, 2, 7, 16] {
            compared += check_decode(&dev, cfg, &w, t, name);
            total += t;
        }
    }
    // Every compressed format on two blocks (gpt-oss's biases and interleaved clamped SwiGLU,
    // Qwen3's plain one), and formats mixed per expert.
    let narrow = narrow_presets();
    for (name, cfg) in narrow
        .iter()
        .filter(|(n, _)| n.starts_with("gpt-oss") || n.starts_with("qwen3"))
    {
        let w = random_weights(cfg, 22);
        for format in ["int4", "int8", "mxfp4", "fp8", "ternary", "mixed"] {
            let wp = packed(cfg, &w, format);
            for t in [1, 16] {
                compared += check_decode(&dev, cfg, &wp, t, &format!("{name} {format}"));
                total += t;
            }
        }
    }
    assert!(
        4 * compared >= 3 * total,
        "only {compared} of {total} tokens compared"
    );
    // Hardware only: a real width (the emulator would spend minutes drawing the weights).
    if !dev.info().emulated {
        let cfg = moe_kernels::layer::presets::preset("qwen3-30b-a3b").unwrap();
        let w = random_weights(&cfg, 23);
        for t in [1, 16] {
            check_decode(&dev, &cfg, &w, t, "qwen3-30b-a3b");
        }
    }
}

/// The decode kernels' versions on the cases that choose between v2's bit-level
/// decoders and the per-8-weight fallback: int4 and int8 at groups 32, 64 and 128, symmetric and
/// with zero points; a group below one chunk (16 for int4), act-order, and row lengths that are
/// not a multiple of a chunk (264 and 104, where fp8 falls back) take the fallback.
#[test]
fn gpu_decode_versions_match_the_cpu_forward_at_every_group_size() {
    let Some(dev) = common::gpu("gpu_decode_versions_match_the_cpu_forward_at_every_group_size")
    else {
        return;
    };
    use moe_kernels::layer::{DecodeVersion, presets};
    let mut cases = Vec::new();
    let cfg = presets::narrowed("qwen3-30b-a3b", 256, 128).unwrap();
    for f in [
        "int4-g32",
        "int4-g32-sym",
        "int4-g128",
        "int8-g64",
        "int8-g128-sym",
        "int4-g16",
        "int4-g128-act",
        "mxfp4",
        "fp8",
    ] {
        cases.push((cfg.clone(), f));
    }
    let odd = presets::narrowed("gpt-oss-120b", 264, 104).unwrap();
    for f in ["fp8", "int8-g8", "int4-g8"] {
        cases.push((odd.clone(), f));
    }
    let (mut compared, mut total) = (0, 0);
    for (cfg, format) in &cases {
        let w = packed(cfg, &random_weights(cfg, 31), format);
        for version in [
            DecodeVersion::V1,
            DecodeVersion::V2,
            DecodeVersion::V3,
            DecodeVersion::V4,
        ] {
            for t in [1, 7] {
                if matches!(version, DecodeVersion::V3 | DecodeVersion::V4) && t == 1 {
                    continue; // v2's kernels at T = 1
                }
                let mut layer = decode_layer(&dev, cfg, &w, t, version);
                let name = format!("H={} {format} {version:?}", cfg.hidden);
                compared += check_against_cpu(&dev, &mut layer, cfg, &w, t, &name);
                total += t;
            }
        }
    }
    assert!(
        4 * compared >= 3 * total,
        "only {compared} of {total} tokens compared"
    );
}

/// Decode v3 (the gate/up GEMV by expert, after one routing launch) against v2, bit for bit: the
/// same chunks in the same order per lane, so the same y, ids and weights; v3 and v4 (the down
/// GEMV by expert too) against the CPU.
/// T = 3 and 11 give passes of 4 (one zero row) and of 8 + 4; the shared experts (Qwen2,
/// DeepSeek-V3, Llama 4) take every token, and the narrow presets bring constant and copy
/// experts, and the routing weight on the input.
#[test]
fn gpu_decode_v3_matches_v2_bit_for_bit() {
    let Some(dev) = common::gpu("gpu_decode_v3_matches_v2_bit_for_bit") else {
        return;
    };
    use moe_kernels::layer::DecodeVersion;
    let mut cases: Vec<(String, MoeConfig, LayerWeights<bf16>)> = configs()
        .into_iter()
        .chain(
            narrow_presets()
                .iter()
                .map(|(n, c)| (n.as_str(), c.clone()))
                .collect::<Vec<_>>(),
        )
        .map(|(n, c)| {
            let w = random_weights(&c, 51);
            (n.to_string(), c, w)
        })
        .collect();
    // Two tiles of staged columns (1024 + 128), eight experts for 22 slots at T = 11.
    let wide = MoeConfig::new(1152, 32, 8, RouterConfig::mixtral(2));
    cases.push((
        "mixtral-like at H=1152".into(),
        wide.clone(),
        random_weights(&wide, 54),
    ));
    let narrow = narrow_presets();
    let (name, cfg) = narrow.iter().find(|(n, _)| n.starts_with("qwen3")).unwrap();
    // Each by-expert instance (one decoder each, zero points or not); act-order and a layer of
    // mixed decoders have none and run v2.
    for format in [
        "int4",
        "int4-g32-sym",
        "int8",
        "mxfp4",
        "fp8",
        "int4-g32-act",
        "mixed",
    ] {
        let w = packed(cfg, &random_weights(cfg, 52), format);
        cases.push((format!("{name} {format}"), cfg.clone(), w));
    }
    let (mut compared, mut total, mut tensor_core_cases) = (0, 0, 0);
    for (name, cfg, w) in &cases {
        for t in [3, 11] {
            let h = cfg.hidden;
            let mut rng = Rng::new(t as u64 + 9);
            let x = uniform_x(&mut rng, t * h);
            let xd = dev.upload(&x, &[t, h]).unwrap();
            let mut outs = Vec::new();
            for version in [DecodeVersion::V2, DecodeVersion::V3] {
                let mut layer = decode_layer(&dev, cfg, w, t, version);
                assert_eq!(layer.decode_kernels(), version, "{name}");
                let instances = !(name.ends_with("mixed") || name.ends_with("act"));
                assert_eq!(layer.by_expert_decoders().is_some(), instances, "{name}");
                let runs = if instances {
                    version
                } else {
                    DecodeVersion::V2
                };
                assert_eq!(layer.decode_kernels_for(t), runs, "{name} T={t}");
                outs.push(forward_bits(&dev, &mut layer, &xd));
            }
            assert_eq!(outs[0].0, outs[1].0, "{name} T={t}: ids");
            assert_eq!(outs[0].1, outs[1].1, "{name} T={t}: weights");
            assert!(outs[0].2 == outs[1].2, "{name} T={t}: y differs from v2's");
            // v4 (the down GEMV by expert too, then the combine) sums in another order: against
            // the CPU forward.
            let mut layer = decode_layer(&dev, cfg, w, t, DecodeVersion::V4);
            compared += check_against_cpu(&dev, &mut layer, cfg, w, t, &format!("{name} v4"));
            total += t;
            // v5 (the same on tensor cores) where it takes the layer: plain, rows of multiples
            // of 32 columns; v4 elsewhere. A new layer: nothing left in its workspace by v4.
            let mut layer = decode_layer(&dev, cfg, w, t, DecodeVersion::V5);
            if layer.decode_kernels_for(t) == DecodeVersion::V5 {
                compared += check_against_cpu(&dev, &mut layer, cfg, w, t, &format!("{name} v5"));
                total += t;
                tensor_core_cases += 1;
            } else {
                // Packed: v4's instances, or v2 where there are none.
                let v4 = !(name.ends_with("mixed") || name.ends_with("act"));
                let runs = if v4 {
                    DecodeVersion::V4
                } else {
                    DecodeVersion::V2
                };
                assert_eq!(layer.decode_kernels_for(t), runs, "{name}");
            }
        }
    }
    assert!(
        4 * compared >= 3 * total,
        "v4, v5: only {compared} of {total} tokens compared"
    );
    assert!(tensor_core_cases >= 10, "v5 ran {tensor_core_cases} cases");
    // v5 with more than one pass of 8 tokens per expert: 32 slots on 4 experts.
    let few = MoeConfig::new(1152, 64, 4, RouterConfig::mixtral(2));
    let w = random_weights(&few, 55);
    let mut layer = decode_layer(&dev, &few, &w, 16, DecodeVersion::V5);
    assert_eq!(layer.decode_kernels_for(16), DecodeVersion::V5);
    let compared = check_against_cpu(&dev, &mut layer, &few, &w, 16, "4 experts v5");
    assert!(4 * compared >= 3 * 16, "v5: only {compared} of 16 tokens");
    // And v3 against the CPU forward on its own.
    for (name, cfg) in configs() {
        let w = random_weights(&cfg, 53);
        let mut layer = decode_layer(&dev, &cfg, &w, 16, DecodeVersion::V3);
        let compared = check_against_cpu(&dev, &mut layer, &cfg, &w, 16, &format!("{name} v3"));
        assert!(
            4 * compared >= 3 * 16,
            "{name}: only {compared} of 16 tokens compared"
        );
    }
}

/// `w` with each expert row's 128-column groups scaled by factors from 1/4 to 16 that vary by
/// row, by group and by 128 x 128 block, so that every row and group gets its own scale and
/// zero point and every FP8 block its own scale: a kernel applying one row's, group's or
/// block's scale to another's sum is caught.
fn uneven_groups(cfg: &MoeConfig, mut w: LayerWeights<bf16>) -> LayerWeights<bf16> {
    let Experts::Plain { gate_up, down } = &mut w.experts else {
        panic!("plain experts expected");
    };
    let vary = |m: &mut [bf16], kd: usize| {
        for (r, row) in m.chunks_mut(kd).enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                let row = (r * 7 + (k / 128) * 3) % 5;
                let block = (r / 128 + 2 * (k / 128)) % 3;
                // MXFP4's groups of 32 (a lane's columns in v5's blocks of 128).
                let group = (r + k / 32) % 3;
                let f = 0.25 * f64::from(1u32 << (row + block + group));
                *v = bf16::from_f64(v.to_f64() * f);
            }
        }
    };
    vary(gate_up, cfg.hidden);
    vary(down, cfg.intermediate);
    w
}

/// Decode v5 on packed experts (the codes decoded into the tensor cores' A operand, a group's
/// scale on its blocks' sums): int4 in groups of 128 with zero points and of 256 symmetric, FP8
/// with 128 x 128 block scales, and MXFP4 and int4 in groups of 32 and 64 (their scales,
/// varied per 32 columns, in the decoded weights; also on rows that end inside a block); H = 1536 stages two tiles (int4: 8 + 4 blocks of 128
/// columns, a tile of eight groups, a partial tile, a partial unrolled step; FP8: 16 + 8 blocks
/// of 64), I = 256 one; the shared expert (plain, in the packed instances) and gpt-oss's
/// interleaved gate/up rows with biases; T = 16 puts more than 8 entries on an expert (passes
/// of 8 + n).
#[test]
fn gpu_decode_v5_packed_matches_the_cpu_forward() {
    let Some(dev) = common::gpu("gpu_decode_v5_packed_matches_the_cpu_forward") else {
        return;
    };
    use moe_kernels::layer::DecodeVersion;
    use moe_kernels::quant::{Fp8Matrix, Mxfp4Matrix, QuantMatrix};
    let base = MoeConfig::new;
    let shared = MoeConfig {
        shared: Some(SharedExpert {
            intermediate: 128,
            gated: true,
        }),
        ..base(1536, 256, 4, RouterConfig::qwen(2, false))
    };
    let gpt_oss = |h, i| MoeConfig {
        router_bias: true,
        expert_bias: true,
        gate_layout: GateLayout::Interleaved,
        act: GatedAct::GPT_OSS,
        ..base(h, i, 8, RouterConfig::gpt_oss(2))
    };
    let interleaved = gpt_oss(1536, 256);
    // Rows that end inside a block of 128 columns (gpt-oss's 2880 = 22 blocks + 64): H = 1472
    // ends 64 columns into the second tile's fourth block, I = 224 96 into its second.
    let tails = gpt_oss(1472, 224);
    let (mut compared, mut total) = (0, 0);
    for (name, cfg, format, ts) in [
        ("shared gated", &shared, "int4-g128", &[2, 16][..]),
        ("gpt-oss-like", &interleaved, "int4-g256-sym", &[7][..]),
        ("shared gated", &shared, "fp8", &[16][..]),
        ("gpt-oss-like", &interleaved, "fp8", &[2][..]),
        ("gpt-oss-like", &interleaved, "mxfp4", &[7][..]),
        ("gpt-oss tails", &tails, "mxfp4", &[16][..]),
        ("shared gated", &shared, "mxfp4", &[2][..]),
        ("gpt-oss tails", &tails, "int4-g32", &[7][..]),
        ("shared gated", &shared, "int4-g64-sym", &[16][..]),
        // GPTQ's act-order, laid out in group order at upload: x staged in that order; v5 runs
        // it at T = 1 too.
        ("shared gated", &shared, "int4-g128-act", &[1, 16][..]),
        ("gpt-oss-like", &interleaved, "int4-g32-act", &[7][..]),
    ] {
        let kind = match format {
            f if f.starts_with("int4-g32") || f.starts_with("int4-g64") => "int4s",
            f => f.split('-').next().unwrap(),
        };
        let w = packed(cfg, &uneven_groups(cfg, random_weights(cfg, 61)), format);
        for &t in ts {
            let mut layer = decode_layer(&dev, cfg, &w, t, DecodeVersion::V5);
            assert_eq!(
                layer.tensor_core_decoders(),
                Some((kind, kind)),
                "{name} {format}"
            );
            assert_eq!(layer.decode_kernels_for(t), DecodeVersion::V5, "{name}");
            if format.ends_with("act") {
                // Only v5 streams act-order codes: auto takes it at every T.
                let auto = decode_layer(&dev, cfg, &w, t, DecodeVersion::Auto);
                assert_eq!(auto.decode_kernels_for(t), DecodeVersion::V5, "{name}");
            }
            compared +=
                check_against_cpu(&dev, &mut layer, cfg, &w, t, &format!("{name} {format} v5"));
            total += t;
        }
    }
    assert!(
        4 * compared >= 3 * total,
        "only {compared} of {total} tokens compared"
    );
    // Int4 groups of 64 and 128 in one layer leave v5 to v4 (each instance takes one kind), and
    // so do one NaN code (0x7f) in an FP8 expert (v5's FP8 conversion would make it 480, v4's
    // gives NaN as the CPU decoder does) and an MXFP4 scale above 2 (e8m0 129: v5's multiplier
    // 2^(s - 1) leaves bf16).
    let cfg = &interleaved;
    let edited =
        |format: &str, seed: u64, up: bool, x: usize, f: &dyn Fn(&QuantMatrix) -> QuantMatrix| {
            let mut w = packed(cfg, &random_weights(cfg, seed), format);
            let Experts::Packed { gate_up, down } = &mut w.experts else {
                unreachable!("packed")
            };
            let m = if up { &mut gate_up[x] } else { &mut down[x] };
            *m = f(m);
            let layer = decode_layer(&dev, cfg, &w, 7, DecodeVersion::V5);
            assert_eq!(layer.tensor_core_decoders(), None, "{format}");
            assert_eq!(layer.decode_kernels_for(7), DecodeVersion::V4, "{format}");
        };
    let g128 = packed(cfg, &random_weights(cfg, 62), "int4-g128");
    let Experts::Packed { down: d128, .. } = &g128.experts else {
        unreachable!("packed")
    };
    edited("int4-g64", 62, false, 2, &|_| d128[2].clone());
    edited("fp8", 63, false, 3, &|m| {
        let QuantMatrix::Fp8(m) = m else {
            unreachable!("fp8")
        };
        let mut codes = m.weight().to_vec();
        codes[5] = 0x7f;
        QuantMatrix::Fp8(Fp8Matrix::new(m.n(), m.kdim(), codes, m.scale_inv().to_vec()).unwrap())
    });
    edited("mxfp4", 64, true, 5, &|m| {
        let QuantMatrix::Mxfp4(m) = m else {
            unreachable!("mxfp4")
        };
        let mut scales = m.scales().to_vec();
        scales[9] = 129;
        QuantMatrix::Mxfp4(Mxfp4Matrix::new(m.n(), m.kdim(), m.blocks().to_vec(), scales).unwrap())
    });
}

/// `w` in f16: the routed experts' packed matrices as they are, every other weight converted
/// (the test weights lie well inside f16's range).
fn to_f16(w: &LayerWeights<bf16>) -> LayerWeights<half::f16> {
    let c = |v: &Vec<bf16>| -> Vec<half::f16> {
        v.iter().map(|x| half::f16::from_f32(x.to_f32())).collect()
    };
    let o = |v: &Option<Vec<bf16>>| v.as_ref().map(c);
    LayerWeights {
        router: w.router.clone(),
        router_bias: w.router_bias.clone(),
        correction_bias: w.correction_bias.clone(),
        experts: match &w.experts {
            Experts::Plain { gate_up, down } => Experts::Plain {
                gate_up: c(gate_up),
                down: c(down),
            },
            Experts::Packed { gate_up, down } => Experts::Packed {
                gate_up: gate_up.clone(),
                down: down.clone(),
            },
        },
        gate_up_bias: o(&w.gate_up_bias),
        down_bias: o(&w.down_bias),
        shared_gate_up: o(&w.shared_gate_up),
        shared_down: o(&w.shared_down),
        shared_gate: o(&w.shared_gate),
        const_w: o(&w.const_w),
        const_v: o(&w.const_v),
    }
}

/// Decode v5's f16 instances (their own magic constants and multipliers: int4 under 1024, FP8
/// times 2^8, MXFP4 times 2^(s - 113), int4s' f16 scale taken as it is) against the CPU forward
/// on f16 weights, plain and in each packed kind, act-order included.
#[test]
fn gpu_decode_v5_f16_matches_the_cpu_forward() {
    let Some(dev) = common::gpu("gpu_decode_v5_f16_matches_the_cpu_forward") else {
        return;
    };
    use moe_kernels::layer::DecodeVersion;
    let shared = MoeConfig {
        shared: Some(SharedExpert {
            intermediate: 128,
            gated: true,
        }),
        ..MoeConfig::new(1536, 256, 4, RouterConfig::qwen(2, false))
    };
    let (mut compared, mut total) = (0, 0);
    for (format, t) in [
        ("plain", 7),
        ("int4-g128", 16),
        ("int4-g32", 7),
        ("mxfp4", 16),
        ("fp8", 7),
        ("int4-g128-act", 2),
    ] {
        let plain = uneven_groups(&shared, random_weights(&shared, 65));
        let w = to_f16(&if format == "plain" {
            plain
        } else {
            packed(&shared, &plain, format)
        });
        let kind = match format {
            "int4-g32" => "int4s",
            f => f.split('-').next().unwrap(),
        };
        let mut layer = decode_layer(&dev, &shared, &w, t, DecodeVersion::V5);
        assert_eq!(layer.tensor_core_decoders(), Some((kind, kind)), "{format}");
        assert_eq!(layer.decode_kernels_for(t), DecodeVersion::V5, "{format}");
        compared += check_against_cpu(&dev, &mut layer, &shared, &w, t, &format!("f16 {format}"));
        total += t;
    }
    assert!(
        4 * compared >= 3 * total,
        "only {compared} of {total} tokens compared"
    );
}

#[test]
fn gpu_decode_path_is_three_launches_and_no_memset() {
    let Some(dev) = common::gpu("gpu_decode_path_is_three_launches_and_no_memset") else {
        return;
    };
    use moe_kernels::layer::DecodeVersion;
    for (name, cfg) in narrow_presets() {
        let w = random_weights(&cfg, 31);
        let mut layer = MoeLayer::<bf16>::new(&dev, &cfg, &w, 17).unwrap();
        for (t, path) in [
            (1, GemmPath::Auto),
            (16, GemmPath::Auto),
            (17, GemmPath::Decode),
            (16, GemmPath::Gemv),
        ] {
            layer.set_path(path);
            let x = dev.filled_bytes::<bf16>(&[t, cfg.hidden], 0x3c).unwrap();
            let mut y = dev.zeros::<bf16>(&[t, cfg.hidden]).unwrap();
            layer.forward_into(&dev, &mut y, &x).unwrap();
            let before = dev.work_counts();
            layer.forward_into(&dev, &mut y, &x).unwrap();
            let n = dev.work_counts() - before;
            println!(
                "{name} T={t} {path:?}: {} launches, {} memsets",
                n.launches, n.memsets
            );
            if t <= MoeLayer::<bf16>::DECODE_TOKENS && path != GemmPath::Gemv {
                // v3 routes once before its gate/up GEMV at T >= 2: a fourth launch; v4 adds
                // the combine after its down GEMV: a fifth.
                let v = layer.decode_kernels_for(t);
                let by_expert =
                    matches!(v, DecodeVersion::V3 | DecodeVersion::V4 | DecodeVersion::V5);
                let combine = matches!(v, DecodeVersion::V4 | DecodeVersion::V5);
                let most = 3 + u64::from(by_expert) + u64::from(combine);
                assert!(n.launches <= most && n.memsets == 0, "{name} T={t}: {n:?}");
            } else {
                // Above the threshold the decode path falls back to the planned GEMM.
                assert!(
                    n.launches > 3 && n.memsets > 0,
                    "{name} T={t} {path:?}: {n:?}"
                );
            }
            layer.check(&dev).unwrap();
        }
    }
}

#[test]
fn gpu_decode_path_on_every_fixture_family_at_decode_sizes() {
    let Some(dev) = common::gpu("gpu_decode_path_on_every_fixture_family_at_decode_sizes") else {
        return;
    };
    // Each fixture's block as transformers configured it (the MXFP4 and FP8 ones packed), on
    // fresh inputs of 1, 2 and 16 tokens.
    let (mut compared, mut total) = (0, 0);
    for f in fixtures() {
        let model = Model::open(&f.dir).unwrap();
        let (cfg, w) = model.load_layer::<bf16>(f.layer).unwrap();
        for t in [1, 2, 16] {
            compared += check_decode(&dev, &cfg, &w, t, &f.name);
            total += t;
        }
    }
    assert!(
        4 * compared >= 3 * total,
        "only {compared} of {total} tokens compared"
    );
}

#[test]
fn gpu_masked_layer_matches_the_cpu_forward_on_every_fixture_family() {
    let Some(dev) = common::gpu("gpu_masked_layer_matches_the_cpu_forward_on_every_fixture_family")
    else {
        return;
    };
    // Each fixture's block with two masks (a random third of the experts; all but one) and a
    // mask or none per token: the decode path at T = 1 and 16, the planned GEMM at T = 20.
    let mut rng = Rng::new(0x3a5c);
    let (mut compared, mut total) = (0, 0);
    for f in fixtures() {
        let (cfg, w) = Model::open(&f.dir)
            .unwrap()
            .load_layer::<bf16>(f.layer)
            .unwrap();
        for (t, path) in [
            (1, GemmPath::Auto),
            (16, GemmPath::Auto),
            (20, GemmPath::Gemm),
        ] {
            let mut layer = MoeLayer::<bf16>::new(&dev, &cfg, &w, t).unwrap();
            layer.set_path(path);
            let masks = TestMasks::draw(&mut rng, cfg.experts_total(), t);
            let name = format!("{} masked", f.name);
            compared +=
                check_masked_against_cpu(&dev, &mut layer, &cfg, &w, t, &name, Some(&masks));
            total += t;
        }
    }
    assert!(
        4 * compared >= 3 * total,
        "only {compared} of {total} tokens compared"
    );
}

#[test]
fn gpu_given_routing_equals_the_layers_own_bit_for_bit() {
    let Some(dev) = common::gpu("gpu_given_routing_equals_the_layers_own_bit_for_bit") else {
        return;
    };
    use moe_kernels::layer::DecodeVersion as V;
    for (name, cfg) in configs() {
        let w = random_weights(&cfg, 21);
        let (h, k) = (cfg.hidden, cfg.k());
        for (t, path, version) in [
            (1, GemmPath::Decode, V::V1),
            (1, GemmPath::Decode, V::Auto),
            (5, GemmPath::Decode, V::V2),
            (5, GemmPath::Decode, V::V4),
            (5, GemmPath::Decode, V::V5),
            (5, GemmPath::Gemv, V::Auto),
            (20, GemmPath::Gemm, V::Auto),
        ] {
            let mut layer = MoeLayer::<bf16>::new(&dev, &cfg, &w, t).unwrap();
            layer.set_path(path);
            layer.set_decode_version(version);
            let mut rng = Rng::new(t as u64);
            let xd = dev.upload(&uniform_x(&mut rng, t * h), &[t, h]).unwrap();
            let (ids, wts, y) = forward_bits(&dev, &mut layer, &xd);
            let gi = dev.upload(&ids, &[t, k]).unwrap();
            let weights: Vec<f32> = wts.iter().map(|&b| f32::from_bits(b)).collect();
            let gw = dev.upload(&weights, &[t, k]).unwrap();
            let mut yg = dev.filled_bytes::<bf16>(&[t, h], 0xff).unwrap();
            let opts = ForwardOptions {
                routing: Some((&gi, &gw)),
                ..Default::default()
            };
            layer.forward_with(&dev, &mut yg, &xd, opts).unwrap();
            layer.check(&dev).unwrap();
            let got: Vec<u16> = dev
                .download(&yg)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert!(
                got == y,
                "{name} T={t} {path:?} {version:?}: given routing differs from the layer's own"
            );
            let (li, lw) = layer.routing();
            assert_eq!(dev.download(li).unwrap(), ids, "{name} T={t}: ids kept");
            assert_eq!(
                dev.download(lw).unwrap(),
                weights,
                "{name} T={t}: weights kept"
            );
        }
    }
}

#[test]
fn gpu_given_routing_is_checked_and_reported() {
    let Some(dev) = common::gpu("gpu_given_routing_is_checked_and_reported") else {
        return;
    };
    // MoE++ (ids from E name the zero, copy and constant experts) with bad slots: out of range,
    // repeated, a NaN weight. They run as unused slots, as the CPU forward takes them, and the
    // check names them.
    let (name, cfg) = &configs()[5];
    let w = random_weights(cfg, 3);
    let (h, k, et) = (cfg.hidden, cfg.k(), cfg.experts_total());
    for (t, path) in [
        (3, GemmPath::Decode),
        (3, GemmPath::Gemv),
        (20, GemmPath::Gemm),
    ] {
        let mut rng = Rng::new(t as u64 + 3);
        let x = uniform_x(&mut rng, t * h);
        let mut ids: Vec<i32> = (0..t * k).map(|i| ((i * 5 + 1) % et) as i32).collect();
        let mut weights: Vec<f32> = (0..t * k).map(|i| 0.2 + 0.05 * (i % 7) as f32).collect();
        ids[1] = et as i32; // out of range
        ids[k + 2] = ids[k]; // repeated
        weights[2 * k + 1] = f32::NAN;
        ids[2 * k + 3] = -1; // unused: its weight is ignored
        let (_, bad) = route_ref::given(&ids, &weights, k, et);
        let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
        let controls = reference::Controls {
            given: Some((ids.clone(), weights.clone())),
            ..Default::default()
        };
        let want = reference::forward_with(cfg, &w, &xf, &controls).unwrap();
        let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
        layer.set_path(path);
        let xd = dev.upload(&x, &[t, h]).unwrap();
        let (gi, gw) = (
            dev.upload(&ids, &[t, k]).unwrap(),
            dev.upload(&weights, &[t, k]).unwrap(),
        );
        let mut y = dev.filled_bytes::<bf16>(&[t, h], 0xff).unwrap();
        let opts = ForwardOptions {
            routing: Some((&gi, &gw)),
            ..Default::default()
        };
        layer.forward_with(&dev, &mut y, &xd, opts).unwrap();
        let err = layer.check(&dev).unwrap_err().to_string();
        assert_eq!(bad, [1, 1, 1], "{name}");
        for what in [
            "1 topk_ids: ids outside",
            "1 topk_ids: ids repeated",
            "1 topk_weights",
        ] {
            assert!(err.contains(what), "{name} {path:?}: {err}");
        }
        layer.check(&dev).expect("the check resets");
        let got = dev.download(&y).unwrap();
        let scale = want.y.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (g, r)) in got.iter().zip(&want.y).enumerate() {
            let g = g.to_f64();
            assert!(
                (g - r).abs() <= 0.02 * scale + 0.02 * r.abs(),
                "{name} T={t} {path:?}: y[{i}] = {g}, want {r}"
            );
        }
        // Shapes: ids of another K, weights of another T; a mask index without masks.
        let bad_ids = dev.zeros::<i32>(&[t, k + 1]).unwrap();
        let opts = ForwardOptions {
            routing: Some((&bad_ids, &gw)),
            ..Default::default()
        };
        let e = layer.forward_with(&dev, &mut y, &xd, opts).unwrap_err();
        assert!(
            matches!(
                e,
                moe_kernels::Error::Shape {
                    arg: "topk_ids",
                    ..
                }
            ),
            "{e}"
        );
        let bad_w = dev.zeros::<f32>(&[t + 1, k]).unwrap();
        let opts = ForwardOptions {
            routing: Some((&gi, &bad_w)),
            ..Default::default()
        };
        let e = layer.forward_with(&dev, &mut y, &xd, opts).unwrap_err();
        assert!(
            matches!(
                e,
                moe_kernels::Error::Shape {
                    arg: "topk_weights",
                    ..
                }
            ),
            "{e}"
        );
        let index = dev.zeros::<i32>(&[t]).unwrap();
        let opts = ForwardOptions {
            mask_index: Some(&index),
            ..Default::default()
        };
        let e = layer.forward_with(&dev, &mut y, &xd, opts).unwrap_err();
        assert!(
            matches!(
                e,
                moe_kernels::Error::Shape {
                    arg: "mask_index",
                    ..
                }
            ),
            "{e}"
        );
        assert!(layer.set_expert_masks(&dev, &[&[et]]).is_err());
    }
}

#[test]
fn gpu_decode_path_routes_nan_rows_as_the_routing_kernel() {
    let Some(dev) = common::gpu("gpu_decode_path_routes_nan_rows_as_the_routing_kernel") else {
        return;
    };
    // A NaN in a token's hidden state makes its router logits NaN: both paths then route it as
    // the routing kernels do (NaN ranks as -inf: the first K ids; softmax weights NaN), and its
    // output is NaN; the other tokens are untouched.
    for (name, cfg) in [&configs()[0], &configs()[2]] {
        let w = random_weights(cfg, 41);
        let (t, h, k) = (3, cfg.hidden, cfg.k());
        let mut rng = Rng::new(5);
        let mut x = uniform_x(&mut rng, t * h);
        x[h + 7] = bf16::NAN;
        let xd = dev.upload(&x, &[t, h]).unwrap();
        let mut outs = Vec::new();
        for path in [GemmPath::Decode, GemmPath::Gemv] {
            let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
            layer.set_path(path);
            let mut y = dev.filled_bytes::<bf16>(&[t, h], 0xff).unwrap();
            layer.forward_into(&dev, &mut y, &xd).unwrap();
            let (ids, wts) = layer.routing();
            let wts: Vec<u32> = dev
                .download(wts)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect();
            let y = dev.download(&y).unwrap();
            outs.push((dev.download(ids).unwrap(), wts, y));
        }
        let (decode, planned) = (&outs[0], &outs[1]);
        assert_eq!(decode.0, planned.0, "{name}: ids");
        assert_eq!(decode.1, planned.1, "{name}: weights");
        if cfg.router.rule == configs()[0].1.router.rule {
            // Softmax over logits that all count as -inf: NaN, as torch.softmax gives.
            assert!(
                f32::from_bits(decode.1[k]).is_nan(),
                "{name}: token 1's weights are NaN"
            );
        }
        assert!(
            decode.2[h..2 * h].iter().all(|v| v.is_nan()),
            "{name}: token 1's output"
        );
        assert!(
            decode.2[..h]
                .iter()
                .chain(&decode.2[2 * h..])
                .all(|v| v.is_finite())
        );
    }
}

#[test]
fn gpu_layer_runs_on_borrowed_buffers_and_the_runtimes_stream() {
    use cudarc::driver::{CudaContext, DevicePtr};
    use moe_kernels::device::{TensorView, TensorViewMut};
    let Some(dev) = common::gpu("gpu_layer_runs_on_borrowed_buffers_and_the_runtimes_stream")
    else {
        return;
    };
    // A runtime's stream and its own activation buffers: the layer reads x and writes y where
    // they are, on that stream, and gives the owned-tensor forward's bits.
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let shared = Device::from_stream(stream.clone()).unwrap();
    for (name, cfg) in [&configs()[1], &configs()[3]] {
        let w = random_weights(cfg, 51);
        for t in [3, 40] {
            let h = cfg.hidden;
            let mut rng = Rng::new(t as u64);
            let x = uniform_x(&mut rng, t * h);
            let mut owned = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
            let xd = dev.upload(&x, &[t, h]).unwrap();
            let mut yd = dev.zeros::<bf16>(&[t, h]).unwrap();
            owned.forward_into(&dev, &mut yd, &xd).unwrap();
            let want = dev.download(&yd).unwrap();

            let mut layer = MoeLayer::<bf16>::new(&shared, cfg, &w, t).unwrap();
            let xs = stream.clone_htod(&x).unwrap();
            let ys = stream.alloc_zeros::<bf16>(t * h).unwrap();
            let before = shared.work_counts();
            {
                // SAFETY: xs and ys hold t * h bf16 of this context and outlive the views.
                let xv = unsafe {
                    TensorView::from_raw(&shared, xs.device_ptr(&stream).0, t * h, &[t, h])
                }
                .unwrap();
                let mut yv = unsafe {
                    TensorViewMut::from_raw(&shared, ys.device_ptr(&stream).0, t * h, &[t, h])
                }
                .unwrap();
                layer.forward_into(&shared, &mut yv, &xv).unwrap();
            }
            let n = shared.work_counts() - before;
            assert_eq!((n.copies, n.allocations), (0, 0), "{name} T={t}: {n:?}");
            let got = stream.clone_dtoh(&ys).unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} T={t}: borrowed buffers on the runtime's stream differ from owned ones"
            );
        }
    }
}

/// Runs `layer` (with adapters set) on `t` random tokens with per-token adapter `ids` and
/// compares every token with the CPU forward given the GPU's own routing, so near-ties in the
/// router do not matter.
fn check_lora_against_cpu<T: Float>(
    dev: &Device,
    layer: &mut MoeLayer<T>,
    cfg: &MoeConfig,
    w: &LayerWeights<T>,
    lora: &LoraAdapters<T>,
    ids: &[i32],
    name: &str,
) {
    let (h, k, t) = (cfg.hidden, cfg.k(), ids.len());
    let mut rng = Rng::new(t as u64 + 7);
    let x: Vec<T> = uniform_x(&mut rng, t * h)
        .into_iter()
        .map(|v| T::from_f64(v.to_f64()))
        .collect();
    let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let xd = dev.upload(&x, &[t, h]).unwrap();
    let idd = dev.upload(ids, &[t]).unwrap();
    let mut y = dev.filled_bytes::<T>(&[t, h], 0xff).unwrap();
    let opts = ForwardOptions {
        adapter_ids: Some(&idd),
        ..Default::default()
    };
    layer.forward_with(dev, &mut y, &xd, opts).unwrap();
    layer.check(dev).unwrap();
    let got = dev.download(&y).unwrap();
    let (gids, gweights) = layer.routing();
    let controls = reference::Controls {
        given: Some((dev.download(gids).unwrap(), dev.download(gweights).unwrap())),
        ..Default::default()
    };
    assert_eq!(controls.given.as_ref().unwrap().0.len(), t * k);
    let want = reference::forward_lora(cfg, w, &xf, &controls, Some((lora, ids))).unwrap();
    let base = reference::forward_with(cfg, w, &xf, &controls).unwrap();
    let scale = want.y.iter().fold(0f64, |m, v| m.max(v.abs()));
    // The deltas must matter: well beyond the tolerance somewhere.
    let moved = want
        .y
        .iter()
        .zip(&base.y)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        ids.iter().all(|&a| a < 0) || moved > 0.1 * scale,
        "{name} T={t}: the adapters move the output by only {moved} (scale {scale})"
    );
    for (i, (g, r)) in got.iter().zip(&want.y).enumerate() {
        let g = g.to_f64();
        assert!(
            (g - r).abs() <= 0.02 * scale + 0.02 * r.abs(),
            "{name} T={t}: token {} col {}: got {g}, want {r} (scale {scale}, without LoRA {})",
            i / h,
            i % h,
            base.y[i]
        );
    }
}

/// Per-token adapter ids over `adapters`, with some tokens on none (-1).
fn adapter_ids(rng: &mut Rng, t: usize, adapters: usize) -> Vec<i32> {
    (0..t)
        .map(|_| rng.below(adapters as u64 + 1) as i32 - 1)
        .collect()
}

#[test]
fn gpu_lora_experts_match_the_cpu_forward() {
    let Some(dev) = common::gpu("gpu_lora_experts_match_the_cpu_forward") else {
        return;
    };
    let all = configs();
    // Gate layouts (first, interleaved), expert biases, input weights (Llama 4), shared and
    // zero-computation experts with top-p's unused slots; ranks from 1 (odd) to the limit.
    for (c, rank, cases) in [
        (
            0,
            8,
            vec![
                (1, GemmPath::Auto),
                (16, GemmPath::Auto),
                (256, GemmPath::Auto),
            ],
        ),
        (3, 3, vec![(1, GemmPath::Auto), (16, GemmPath::Gemm)]),
        (4, 16, vec![(5, GemmPath::Auto), (40, GemmPath::Gemm)]),
        (5, 1, vec![(16, GemmPath::Gemv), (33, GemmPath::Auto)]),
        (1, 256, vec![(2, GemmPath::Decode)]),
    ] {
        let (name, cfg) = &all[c];
        let w = random_weights(cfg, 21);
        let lora = LoraAdapters::<bf16>::random(
            cfg.experts,
            cfg.hidden,
            cfg.intermediate,
            3,
            rank,
            c as u64,
        );
        let max_t = cases.iter().map(|c| c.0).max().unwrap();
        let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, max_t).unwrap();
        layer.set_lora(&dev, Some(&lora)).unwrap();
        assert_eq!(layer.lora(), Some((3, rank)));
        let mut rng = Rng::new(c as u64 + 40);
        for (t, path) in cases {
            layer.set_path(path);
            let ids = adapter_ids(&mut rng, t, 3);
            check_lora_against_cpu(&dev, &mut layer, cfg, &w, &lora, &ids, name);
        }
    }
    // More experts than a block has threads: each thread of the chunk list's scan sums two.
    let wide = MoeConfig::new(64, 32, 300, RouterConfig::mixtral(2));
    let w = random_weights(&wide, 23);
    let lora = LoraAdapters::<bf16>::random(300, 64, 32, 3, 4, 7);
    let mut layer = MoeLayer::<bf16>::new(&dev, &wide, &w, 256).unwrap();
    layer.set_lora(&dev, Some(&lora)).unwrap();
    let mut rng = Rng::new(5);
    for t in [16, 256] {
        let ids = adapter_ids(&mut rng, t, 3);
        check_lora_against_cpu(&dev, &mut layer, &wide, &w, &lora, &ids, "E=300");
    }
    // Above, the default GEMM (v2) read x through the plan, and the gate/up shrink did too;
    // v1 gathers the rows first. And packed experts.
    let (name, cfg) = &all[0];
    let w = random_weights(cfg, 22);
    let lora = LoraAdapters::<bf16>::random(cfg.experts, cfg.hidden, cfg.intermediate, 2, 8, 5);
    let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, 64).unwrap();
    layer.set_lora(&dev, Some(&lora)).unwrap();
    layer.set_gemm_version(&dev, GemmVersion::V1).unwrap();
    layer.set_path(GemmPath::Gemm);
    let mut rng = Rng::new(3);
    let ids = adapter_ids(&mut rng, 64, 2);
    check_lora_against_cpu(&dev, &mut layer, cfg, &w, &lora, &ids, name);
    // f16 layer and adapters.
    let (wh, lh) = (
        to_f16(&w),
        LoraAdapters::<half::f16>::random(cfg.experts, cfg.hidden, cfg.intermediate, 2, 8, 6),
    );
    let mut layer = MoeLayer::<half::f16>::new(&dev, cfg, &wh, 16).unwrap();
    layer.set_lora(&dev, Some(&lh)).unwrap();
    for t in [1, 16] {
        let ids = adapter_ids(&mut rng, t, 2);
        check_lora_against_cpu(&dev, &mut layer, cfg, &wh, &lh, &ids, "mixtral-like f16");
    }
    let wq = packed(cfg, &w, "int4-g32");
    let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &wq, 20).unwrap();
    layer.set_lora(&dev, Some(&lora)).unwrap();
    for t in [3, 20] {
        let ids = adapter_ids(&mut rng, t, 2);
        check_lora_against_cpu(&dev, &mut layer, cfg, &wq, &lora, &ids, "int4-g32");
    }
}

#[test]
fn gpu_lora_runs_inside_every_decode_version() {
    use moe_kernels::layer::DecodeVersion;
    let Some(dev) = common::gpu("gpu_lora_runs_inside_every_decode_version") else {
        return;
    };
    let all = configs();
    // Gate layouts, expert biases, input weights (Llama 4), shared and zero-computation experts
    // with top-p's unused slots; ranks odd (the scalar loop), multiples of 8 (16-byte loads), and
    // 256 (v5's whole term on one lane). qwen2-like's I = 16 takes v4 where v5 is asked for.
    for (c, rank, ts) in [
        (0, 8, &[1, 5, 16][..]),
        (1, 3, &[2, 16]),
        (3, 16, &[1, 16]),
        (4, 40, &[3, 16]),
        (5, 1, &[16]),
        (0, 256, &[4]),
    ] {
        let (name, cfg) = &all[c];
        let w = random_weights(cfg, 31);
        let lora = LoraAdapters::<bf16>::random(
            cfg.experts,
            cfg.hidden,
            cfg.intermediate,
            3,
            rank,
            c as u64 + 9,
        );
        let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, 16).unwrap();
        layer.set_lora(&dev, Some(&lora)).unwrap();
        let mut rng = Rng::new(c as u64 + rank as u64);
        for version in [
            DecodeVersion::V2,
            DecodeVersion::V3,
            DecodeVersion::V4,
            DecodeVersion::V5,
        ] {
            layer.set_decode_version(version);
            for &t in ts {
                assert!(layer.decode_takes_lora(t), "{name} {version:?} T={t}");
                let ids = adapter_ids(&mut rng, t, 3);
                let label = format!("{name} r={rank} {:?}", layer.decode_kernels_for(t));
                check_lora_against_cpu(&dev, &mut layer, cfg, &w, &lora, &ids, &label);
            }
        }
        // v1 takes no adapters: the planned GEMV runs them.
        layer.set_decode_version(DecodeVersion::V1);
        assert!(!layer.decode_takes_lora(2));
        let ids = adapter_ids(&mut rng, 2, 3);
        check_lora_against_cpu(&dev, &mut layer, cfg, &w, &lora, &ids, name);
    }
    // Packed experts: the by-expert CUDA-core instance (v3, v4) and the tensor-core one (v5).
    let (name, cfg) = &all[0];
    let wq = packed(cfg, &random_weights(cfg, 32), "int4-g32");
    let lora = LoraAdapters::<bf16>::random(cfg.experts, cfg.hidden, cfg.intermediate, 2, 8, 3);
    let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &wq, 16).unwrap();
    layer.set_lora(&dev, Some(&lora)).unwrap();
    let mut rng = Rng::new(8);
    for version in [DecodeVersion::V2, DecodeVersion::V4, DecodeVersion::V5] {
        layer.set_decode_version(version);
        assert!(layer.decode_takes_lora(16));
        let ids = adapter_ids(&mut rng, 16, 2);
        let label = format!("{name} int4-g32 {:?}", layer.decode_kernels_for(16));
        check_lora_against_cpu(&dev, &mut layer, cfg, &wq, &lora, &ids, &label);
    }
}

#[test]
fn gpu_graph_replays_with_new_adapter_ids() {
    let Some(dev) = common::gpu("gpu_graph_replays_with_new_adapter_ids") else {
        return;
    };
    let (name, cfg) = &configs()[3];
    let w = random_weights(cfg, 9);
    let lora = LoraAdapters::<bf16>::random(cfg.experts, cfg.hidden, cfg.intermediate, 4, 8, 1);
    let h = cfg.hidden;
    for (t, path) in [(4, GemmPath::Auto), (40, GemmPath::Gemm)] {
        let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
        layer.set_lora(&dev, Some(&lora)).unwrap();
        layer.set_path(path);
        let mut rng = Rng::new(t as u64);
        let xd = dev.upload(&uniform_x(&mut rng, t * h), &[t, h]).unwrap();
        let first = adapter_ids(&mut rng, t, 4);
        let second: Vec<i32> = first.iter().map(|&a| (a + 2) % 4).collect();
        let mut ids = dev.upload(&first, &[t]).unwrap();
        let mut y = dev.zeros::<bf16>(&[t, h]).unwrap();
        let mut eager = Vec::new();
        for v in [&first, &second] {
            dev.upload_into(&mut ids, v).unwrap();
            let opts = ForwardOptions {
                adapter_ids: Some(&ids),
                ..Default::default()
            };
            layer.forward_with(&dev, &mut y, &xd, opts).unwrap();
            eager.push(dev.download(&y).unwrap());
        }
        assert!(
            eager[0] != eager[1],
            "{name} T={t}: the adapters changed nothing"
        );

        dev.upload_into(&mut ids, &first).unwrap();
        let mut yg = dev.zeros::<bf16>(&[t, h]).unwrap();
        let opts = ForwardOptions {
            adapter_ids: Some(&ids),
            ..Default::default()
        };
        let graph = capture(&dev, || {
            layer.forward_with(&dev, &mut yg, &xd, opts).unwrap()
        });
        for (v, want) in [(&second, &eager[1]), (&first, &eager[0])] {
            dev.upload_into(&mut ids, v).unwrap();
            assert!(
                replay_gives(&dev, &graph, &mut yg, want),
                "{name} T={t} {path:?}: replay with new adapter ids differs from the eager forward"
            );
        }
        layer.check(&dev).unwrap();
    }
}

#[test]
fn lora_refuses_bad_adapters_and_ids() {
    let (_, cfg) = &configs()[0];
    let (e, h, i) = (cfg.experts, cfg.hidden, cfg.intermediate);
    let w = random_weights(cfg, 4);
    let good = LoraAdapters::<bf16>::random(e, h, i, 2, 4, 1);
    fn text<T>(r: moe_kernels::Result<T>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }
    // Host checks first: they need no device (the CPU forward takes the same adapters).
    let x = vec![0.25; 2 * h];
    let ids = [0, 1];
    let cpu = |l: &LoraAdapters<bf16>, ids: &[i32]| {
        let c = reference::Controls::default();
        reference::forward_lora(cfg, &w, &x, &c, Some((l, ids))).map(|_| ())
    };
    for (rank, what) in [(0, "rank"), (257, "rank")] {
        let bad = LoraAdapters {
            rank,
            ..good.clone()
        };
        let msg = text(cpu(&bad, &ids));
        assert!(msg.contains(what) && msg.contains("1..=256"), "{msg}");
    }
    let mut bad = good.clone();
    bad.gate_up_b.pop();
    assert!(text(cpu(&bad, &ids)).contains("gate_up_b"));
    let bad = LoraAdapters {
        down_a: LoraAdapters::<bf16>::random(e, h, i + 8, 2, 4, 1).down_a,
        ..good.clone()
    };
    assert!(text(cpu(&bad, &ids)).contains("down_a"));
    let bad = LoraAdapters {
        scales: vec![1.0, f32::NAN],
        ..good.clone()
    };
    assert!(text(cpu(&bad, &ids)).contains("scales"));
    assert!(text(cpu(&good, &[0])).contains("adapter_ids"));
    // MoLE: the router must score the L adapters, and its k must fit them.
    let mole = MoleConfig {
        hidden: h,
        intermediate: i,
        router: RouterConfig::mixtral(1),
        act: GatedAct::Silu,
        gate_layout: GateLayout::GateFirst,
    };
    let mw = MoleWeights::<bf16>::random(&mole, 3, 4, 2);
    mw.check("test", &mole).unwrap();
    let mut bad = mw.clone();
    bad.router.truncate(2 * h);
    assert!(text(bad.check("test", &mole)).contains("router"));
    let wide = MoleConfig {
        router: RouterConfig::mixtral(4),
        ..mole.clone()
    };
    assert!(text(mw.check("test", &wide)).contains("`k`"));
    let bad = MoleWeights {
        experts: LoraAdapters {
            rank: 300,
            ..mw.experts.clone()
        },
        ..mw.clone()
    };
    assert!(text(mole_reference(&mole, &bad, &x, None)).contains("rank"));

    let Some(dev) = common::gpu("lora_refuses_bad_adapters_and_ids") else {
        return;
    };
    let t = 4;
    let mut layer = MoeLayer::<bf16>::new(&dev, cfg, &w, t).unwrap();
    let xd = dev
        .upload(&uniform_x(&mut Rng::new(1), t * h), &[t, h])
        .unwrap();
    let mut y = dev.zeros::<bf16>(&[t, h]).unwrap();
    let idd = dev.upload(&[0, 1, -1, 0], &[t]).unwrap();
    let mut run = |layer: &mut MoeLayer<bf16>, ids: &moe_kernels::Tensor<i32>| {
        let opts = ForwardOptions {
            adapter_ids: Some(ids),
            ..Default::default()
        };
        layer
            .forward_with(&dev, &mut y, &xd, opts)
            .map(|_| dev.download(&y).unwrap())
    };
    let msg = text(run(&mut layer, &idd));
    assert!(
        msg.contains("adapter_ids") && msg.contains("set_lora"),
        "{msg}"
    );
    let bad = LoraAdapters {
        rank: 0,
        ..good.clone()
    };
    let msg = text(layer.set_lora(&dev, Some(&bad)));
    assert!(msg.contains("rank"), "{msg}");
    layer.set_lora(&dev, Some(&good)).unwrap();
    let short = dev.upload(&[0, 1, -1], &[3]).unwrap();
    let msg = text(run(&mut layer, &short));
    assert!(
        msg.contains("adapter_ids") && msg.contains("[T] = [4]"),
        "{msg}"
    );
    // Ids out of range run as no adapter, and check() names them.
    let want = run(&mut layer, &dev.upload(&[0, -1, -1, 0], &[t]).unwrap()).unwrap();
    let got = run(&mut layer, &dev.upload(&[0, 2, -7, 0], &[t]).unwrap()).unwrap();
    let msg = text(layer.check(&dev));
    assert!(msg.contains("adapter_ids: 2 tokens"), "{msg}");
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    layer.check(&dev).unwrap();
}

#[test]
fn gpu_mole_matches_the_cpu_forward() {
    let Some(dev) = common::gpu("gpu_mole_matches_the_cpu_forward") else {
        return;
    };
    // LLaVA-MoLE's top-1, and top-2 without renormalisation; SwiGLU and gpt-oss's interleaved
    // activation.
    for (name, router, act, gate_layout, rank) in [
        (
            "mole top-1",
            RouterConfig::mixtral(1),
            GatedAct::Silu,
            GateLayout::GateFirst,
            8,
        ),
        (
            "mole top-2 interleaved",
            RouterConfig::qwen(2, false),
            GatedAct::GPT_OSS,
            GateLayout::Interleaved,
            4,
        ),
    ] {
        let cfg = MoleConfig {
            hidden: 64,
            intermediate: 32,
            router,
            act,
            gate_layout,
        };
        let w = MoleWeights::<bf16>::random(&cfg, 6, rank, 17);
        let mut ffn = MoleFfn::<bf16>::new(&dev, &cfg, &w, 256).unwrap();
        for t in [1, 16, 256] {
            let mut rng = Rng::new(t as u64);
            let x = uniform_x(&mut rng, t * cfg.hidden);
            let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
            let xd = dev.upload(&x, &[t, cfg.hidden]).unwrap();
            let mut y = dev.filled_bytes::<bf16>(&[t, cfg.hidden], 0xff).unwrap();
            ffn.forward_into(&dev, &mut y, &xd).unwrap();
            ffn.check(&dev).unwrap();
            let got = dev.download(&y).unwrap();
            let (ids, weights) = ffn.routing();
            let (ids, weights) = (dev.download(ids).unwrap(), dev.download(weights).unwrap());
            let (want, routing) = mole_reference(&cfg, &w, &xf, Some((&ids, &weights))).unwrap();
            // The adapters matter: without their deltas the output moves well past the
            // tolerance.
            let mut plain = w.clone();
            plain.experts.scales.iter_mut().for_each(|s| *s = 0.0);
            let (base, _) = mole_reference(&cfg, &plain, &xf, Some((&ids, &weights))).unwrap();
            let moved = want
                .iter()
                .zip(&base)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            let used: std::collections::BTreeSet<i32> = routing.ids.iter().copied().collect();
            assert!(
                t < 16 || used.len() >= 3,
                "{name} T={t}: adapters used {used:?}"
            );
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(
                moved > 0.1 * scale,
                "{name} T={t}: adapters move y by {moved} only"
            );
            // A captured forward replays on new input as the eager one ran.
            if t == 16 {
                let other = uniform_x(&mut rng, t * cfg.hidden);
                let mut xg = dev.upload(&other, &[t, cfg.hidden]).unwrap();
                let mut yg = dev.zeros::<bf16>(&[t, cfg.hidden]).unwrap();
                let graph = capture(&dev, || ffn.forward_into(&dev, &mut yg, &xg).unwrap());
                dev.upload_into(&mut xg, &x).unwrap();
                assert!(
                    replay_gives(&dev, &graph, &mut yg, &got),
                    "{name}: graph replay differs from the eager forward"
                );
            }
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                let g = g.to_f64();
                assert!(
                    (g - r).abs() <= 0.02 * scale + 0.02 * r.abs(),
                    "{name} T={t}: token {} col {}: got {g}, want {r} (scale {scale})",
                    i / cfg.hidden,
                    i % cfg.hidden
                );
            }
        }
    }
}
