//! `moe-kernels bench`: every stage of one MoE block of a real model's shapes, timed on the GPU
//! with CUDA events, beside the card's measured copy bandwidth and its matrix rate. On the CPU
//! emulator it reports, instead of times, each stage's exact counters and its *modelled* time
//! on a card (bench/counters.rs, docs/MODEL.md).

mod counters;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaEvent, sys::CUevent_flags};
use half::bf16;
use moe_kernels::device::WorkCounts;
use moe_kernels::gemm::GemmVersion;
use moe_kernels::layer::{DecodeVersion, ExpertWeights, MoeConfig, MoeLayer, Path, Stage, presets};
use moe_kernels::model::Model;
use moe_kernels::profile::{Card, Emulator};
use moe_kernels::quant::{
    Dictionary, Fp8Matrix, IntMatrix, Mxfp4Matrix, QuantGemvVersion, QuantLayer, QuantMatrix,
    TernaryMatrix,
};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Error, Tensor, kernels};

#[derive(clap::Args, Clone)]
pub struct BenchArgs {
    /// mixtral-8x7b, qwen3-30b-a3b, qwen2-moe, deepseek-v3, gpt-oss-120b, olmoe, llama4-scout.
    #[arg(long, default_value = "qwen3-30b-a3b")]
    pub preset: String,
    /// A model folder to take the block from instead of a preset's random weights.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: the decoder layer (default: its first MoE layer).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Token counts, comma-separated (default 1,16,128,1024,4096; on the CPU emulator 1,16).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<usize>>,
    /// Expert weight format: bf16, int4, int4-act (GPTQ's act-order), int8, mxfp4, fp8 or
    /// ternary (random codes of that format).
    #[arg(long, default_value = "bf16")]
    pub format: String,
    /// The prefill GEMM: v2 (the layer's default: cp.async pipeline, gate/up rows read through
    /// the plan), v1 (no pipeline) or v3 (Hopper: TMA and wgmma).
    #[arg(long, default_value = "v2")]
    pub gemm: String,
    /// The forward: auto (the decode path up to 16 tokens, the GEMM above), decode, gemv (the
    /// plan and the grouped GEMV) or gemm.
    #[arg(long, default_value = "auto")]
    pub path: String,
    /// The decode path's kernels: auto (default: v5 for plain experts where T K >= E / 4 and
    /// for int4, MXFP4 and FP8 ones where T K >= E, or E / 2 where an expert's packed weights
    /// pass 8 MiB, and at every T for int4 with act-order; v4 where v5 does not take the
    /// layer, else v2), v2 (x staged in shared
    /// memory, 16-byte compressed chunks), v3 (v2 with the gate/up GEMV by expert after one
    /// routing launch), v4 (v3 with the down GEMV by expert and a combine), v5 (v4 on tensor
    /// cores: plain, int4, MXFP4, FP8) or v1 (one warp per column, 8 weights per lane per
    /// step).
    #[arg(long, default_value = "auto")]
    pub decode: String,
    /// The compressed-expert GEMV of --path gemv: v2 (default: a chunk decoded once for up to 8
    /// rows) or v1 (the per-8-weight decoder).
    #[arg(long, default_value = "v2")]
    pub quant_gemv: String,
    /// Timed iterations per token count, the median reported (default 20; on the CPU
    /// emulator 2).
    #[arg(long)]
    pub iters: Option<usize>,
    /// The card's dense bf16 matrix rate in TFLOP/s, as measured elsewhere (for example by
    /// benches/peers); default: the datasheet figure for H100/H200 SXM, else none.
    #[arg(long)]
    pub matrix_tflops: Option<f64>,
    /// Seed of the random weights (see MoeLayer::random for how each tensor is drawn).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// On the CPU emulator: the card whose modelled times are reported (h100, h200, rtx4090,
    /// rtx5090).
    #[arg(long, default_value = "h100")]
    pub card: String,
    /// On the CPU emulator: run this fraction (0, 1] of the GEMM stages' blocks, the counters
    /// scaled to the whole grid (for prefill sizes; outputs are then not checked).
    #[arg(long)]
    pub sample: Option<f64>,
    /// On the CPU emulator: also append every launch's counters and model to this file, one
    /// JSON line each (what gpu-check's profile step compares Nsight Compute against).
    #[arg(long)]
    pub records: Option<PathBuf>,
    /// On the CPU emulator, bf16 presets only: leave the routed experts zero instead of drawing
    /// them, so that a model larger than this machine can be profiled (with MOE_EMU_LAZY set,
    /// untouched expert pages cost no memory). Counters do not depend on the weights' values.
    #[arg(long)]
    pub zero_experts: bool,
}

/// One token count's stages, and the launches and memsets of one forward.
struct Run {
    tokens: usize,
    rows: Vec<StageRow>,
    work: WorkCounts,
}

/// One stage's median time and the work it must do.
struct StageRow {
    stage: Stage,
    micros: f64,
    flops: f64,
    bytes: f64,
}

/// Expert formats the bench draws random codes for.
const FORMATS: &str = "bf16, int4 (g128, symmetric), int4-act (int4 with GPTQ's act-order: \
                       each group a random set of 128 columns), int8 (g128), mxfp4, fp8 (e4m3, \
                       128x128 blocks)";

/// One expert's `[n, kd]` weight in `format` with random codes and scales of a realistic size:
/// the timing depends on the bytes and the decode work, not on the values.
fn random_matrix(format: &str, n: usize, kd: usize, rng: &mut Rng) -> Result<QuantMatrix, Error> {
    let mut bytes = |len: usize| -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    };
    let scale = (3.0 / kd as f64).sqrt();
    Ok(match format {
        "int4" | "int4-act" | "int8" => {
            let bits: u32 = if format == "int8" { 8 } else { 4 };
            let group = if kd.is_multiple_of(128) { 128 } else { kd };
            let words: Vec<u32> = bytes(n * kd * bits as usize / 8)
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            // Act-order: column k in group place[k] / g, place a random permutation.
            let g_idx = (format == "int4-act").then(|| {
                let mut place: Vec<u32> = (0..kd as u32).collect();
                rng.shuffle(&mut place);
                place.iter().map(|&p| p / group as u32).collect()
            });
            let step = half::f16::from_f64(2.0 * scale / f64::from((1u32 << bits) - 1));
            QuantMatrix::Int(IntMatrix::new(
                bits,
                group,
                n,
                kd,
                words,
                vec![step; n * (kd / group)],
                None,
                g_idx,
            )?)
        }
        "mxfp4" => {
            // e8m0 codes 2^-7 ..= 2^-5: with e2m1's rms of about 3, values of a 1/sqrt(fan-in)
            // init at the presets' widths.
            let scales: Vec<u8> = bytes(n * kd / 32).iter().map(|b| 120 + b % 3).collect();
            QuantMatrix::Mxfp4(Mxfp4Matrix::new(n, kd, bytes(n * kd / 2), scales)?)
        }
        "fp8" => {
            // 0x7f and 0xff are NaN in e4m3fn: step off them.
            let w: Vec<u8> = bytes(n * kd)
                .into_iter()
                .map(|b| if b & 0x7f == 0x7f { b - 1 } else { b })
                .collect();
            let blocks = n.div_ceil(128) * kd.div_ceil(128);
            QuantMatrix::Fp8(Fp8Matrix::new(
                n,
                kd,
                w,
                vec![scale as f32 / 448.0; blocks],
            )?)
        }
        "ternary" => {
            // Every codeword a run of eight symbols (16 weights): 1 bit per weight, near QMoE's
            // 0.8; rows of Kd/2 symbols need Kd a multiple of 16.
            if !kd.is_multiple_of(16) {
                return Err(Error::Unsupported {
                    op: "bench",
                    what: format!("random ternary experts with Kd = {kd} (a multiple of 16)"),
                });
            }
            let per_row = kd / 16;
            let codes: Vec<u16> = (0..n * per_row).map(|_| rng.next_u64() as u16).collect();
            let offsets: Vec<u32> = (0..=n).map(|r| (r * per_row) as u32).collect();
            let a = half::f16::from_f64(2.0 * scale);
            QuantMatrix::Ternary(TernaryMatrix::new(
                n,
                kd,
                [-a, a].repeat(n),
                offsets,
                codes,
                ternary_dictionary(),
            )?)
        }
        other => {
            return Err(Error::Unsupported {
                op: "bench",
                what: format!("format {other:?} (one of {FORMATS})"),
            });
        }
    })
}

/// One dictionary for every random ternary expert (a layer shares its dictionary): 65536 runs
/// of eight symbols, each pair zero with probability 0.8 as in a ternarised expert.
fn ternary_dictionary() -> Arc<Dictionary> {
    static DICT: OnceLock<Arc<Dictionary>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut rng = Rng::new(0x7e27);
        let entries: Vec<u64> = (0..1 << 16)
            .map(|_| {
                (0..8).fold(8u64, |e, j| {
                    let sym = if rng.below(10) < 8 {
                        0
                    } else {
                        1 + rng.below(8)
                    };
                    e | sym << (4 + 4 * j)
                })
            })
            .collect();
        Arc::new(Dictionary::new(entries).expect("runs of eight symbols below 9"))
    })
    .clone()
}

/// Replaces the routed experts of `layer` by random ones in `format`.
fn pack_experts(
    dev: &Device,
    layer: MoeLayer<bf16>,
    format: &str,
    max_t: usize,
    seed: u64,
) -> Result<MoeLayer<bf16>, Error> {
    let cfg = layer.config().clone();
    let (h, i, e) = (cfg.hidden, cfg.intermediate, cfg.experts);
    let mut rng = Rng::new(seed);
    let mut layer_of = |n: usize, kd: usize| -> Result<ExpertWeights<bf16>, Error> {
        let m: Vec<QuantMatrix> = (0..e)
            .map(|_| random_matrix(format, n, kd, &mut rng))
            .collect::<Result<_, _>>()?;
        Ok(ExpertWeights::Packed(Box::new(QuantLayer::upload(
            dev, &m,
        )?)))
    };
    let mut w = layer.into_weights();
    w.gate_up = layer_of(2 * i, h)?;
    w.down = layer_of(h, i)?;
    MoeLayer::from_device(dev, &cfg, w, max_t)
}

pub fn run(args: &BenchArgs) -> Result<(), Error> {
    if ![
        "bf16", "int4", "int4-act", "int8", "mxfp4", "fp8", "ternary",
    ]
    .contains(&args.format.as_str())
    {
        return Err(Error::Unsupported {
            op: "bench",
            what: format!("format {:?} (one of {FORMATS})", args.format),
        });
    }
    let version = match args.gemm.as_str() {
        "v1" => GemmVersion::V1,
        "v2" => GemmVersion::V2,
        "v3" => GemmVersion::V3,
        other => {
            return Err(Error::Unsupported {
                op: "bench",
                what: format!("--gemm {other:?} (v1, v2 or v3)"),
            });
        }
    };
    let path = match args.path.as_str() {
        "auto" => Path::Auto,
        "decode" => Path::Decode,
        "gemv" => Path::Gemv,
        "gemm" => Path::Gemm,
        other => {
            return Err(Error::Unsupported {
                op: "bench",
                what: format!("--path {other:?} (auto, decode, gemv or gemm)"),
            });
        }
    };
    let decode = match args.decode.as_str() {
        "v1" => DecodeVersion::V1,
        "v2" => DecodeVersion::V2,
        "v3" => DecodeVersion::V3,
        "v4" => DecodeVersion::V4,
        "v5" => DecodeVersion::V5,
        "auto" => DecodeVersion::Auto,
        other => {
            return Err(Error::Unsupported {
                op: "bench",
                what: format!("--decode {other:?} (auto, v1, v2, v3, v4 or v5)"),
            });
        }
    };
    let quant_gemv = match args.quant_gemv.as_str() {
        "v1" => QuantGemvVersion::V1,
        "v2" => QuantGemvVersion::V2,
        other => {
            return Err(Error::Unsupported {
                op: "bench",
                what: format!("--quant-gemv {other:?} (v1 or v2)"),
            });
        }
    };
    let card = Card::parse(&args.card)?;
    let sample = args.sample.unwrap_or(1.0);
    if !(sample > 0.0 && sample <= 1.0) {
        return Err(Error::Unsupported {
            op: "bench",
            what: format!("--sample {sample} (a fraction in (0, 1])"),
        });
    }
    let dev = Device::new(0)?;
    if !kernels::built() {
        return Err(Error::KernelsNotBuilt {
            op: "bench",
            module: "all",
        });
    }
    // The CPU emulator runs every kernel thread by thread: the defaults stay at decode sizes.
    let emulated = dev.info().emulated;
    let tokens = args.tokens.clone().unwrap_or_else(|| {
        if emulated {
            vec![1, 16]
        } else {
            vec![1, 16, 128, 1024, 4096]
        }
    });
    let iters = args.iters.unwrap_or(if emulated { 2 } else { 20 });
    let max_t = tokens.iter().copied().max().unwrap_or(0);
    if max_t == 0 || iters == 0 {
        return Err(Error::Unsupported {
            op: "bench",
            what: "--tokens needs a count >= 1 and --iters >= 1".into(),
        });
    }
    // On the emulator: its counters and the model, not times.
    let emu = if emulated {
        let emu = Emulator::find().ok_or_else(|| Error::Unsupported {
            op: "bench",
            what: "an emulator without its counter functions (moe_emu_counters_*): rebuild it \
                   with scripts/emulate"
                .into(),
        })?;
        emu.register_resources()?;
        Some(emu)
    } else {
        None
    };
    if emu.is_none() && (args.sample.is_some() || args.records.is_some() || args.zero_experts) {
        return Err(Error::Unsupported {
            op: "bench",
            what: "--sample, --records and --zero-experts on a GPU (they are for the CPU \
                   emulator's counters)"
                .into(),
        });
    }
    if args.zero_experts && (args.model.is_some() || args.format != "bf16") {
        return Err(Error::Unsupported {
            op: "bench",
            what: "--zero-experts with --model or a packed --format (bf16 presets only)".into(),
        });
    }
    let (name, mut layer) = match &args.model {
        Some(dir) => {
            let model = Model::open(dir)?;
            let layer = match args.layer {
                Some(l) => l,
                None => *model
                    .moe_layers()?
                    .first()
                    .ok_or_else(|| Error::Unsupported {
                        op: "bench",
                        what: format!("{} has no MoE layer", dir.display()),
                    })?,
            };
            let (cfg, w) = model.load_layer::<bf16>(layer)?;
            (
                format!("{} layer {layer}", model.model_type),
                MoeLayer::<bf16>::new(&dev, &cfg, &w, max_t)?,
            )
        }
        None => {
            let cfg = presets::preset(&args.preset).ok_or_else(|| Error::Unsupported {
                op: "bench",
                what: format!(
                    "preset {:?} (one of {})",
                    args.preset,
                    presets::NAMES.join(", ")
                ),
            })?;
            let layer = if args.zero_experts {
                MoeLayer::<bf16>::random_zero_experts(&dev, &cfg, max_t, args.seed)?
            } else {
                MoeLayer::<bf16>::random(&dev, &cfg, max_t, args.seed)?
            };
            (args.preset.clone(), layer)
        }
    };
    if args.format != "bf16" {
        layer = pack_experts(&dev, layer, &args.format, max_t, args.seed)?;
    }
    layer.set_gemm_version(&dev, version)?;
    layer.set_path(path);
    layer.set_decode_version(decode);
    layer.set_quant_gemv_version(quant_gemv);
    let cfg = layer.config().clone();
    if let Some(emu) = &emu {
        let mut runs = Vec::new();
        for &t in &tokens {
            runs.push(counters::count_stages(
                &dev, &mut layer, t, emu, &card, sample,
            )?);
        }
        if let Some(path) = &args.records {
            write_records(path, &card, &runs)?;
        }
        if args.json {
            let mut v = counters::runs_json(&card, &runs);
            v["name"] = name.clone().into();
            v["device"] = dev.info().name.clone().into();
            v["format"] = args.format.clone().into();
            v["gemm"] = args.gemm.clone().into();
            v["path"] = args.path.clone().into();
            v["decode"] = format!("{:?}", layer.decode_kernels())
                .to_lowercase()
                .into();
            // The kernels each token count ran (auto resolves per T).
            v["decode_kernels"] = tokens
                .iter()
                .map(|&t| format!("{:?}", layer.decode_kernels_for(t)).to_lowercase())
                .collect::<Vec<_>>()
                .into();
            v["quant_gemv"] = args.quant_gemv.clone().into();
            v["seed"] = args.seed.into();
            v["zero_experts"] = args.zero_experts.into();
            println!("{v}");
        } else {
            header(&dev, &name, &cfg, None, None);
            println!(
                "format {}, gemm {}, path {}, decode {:?}, quant gemv {}{}",
                args.format,
                args.gemm,
                args.path,
                layer.decode_kernels(),
                args.quant_gemv,
                if args.zero_experts {
                    ", routed experts zero (--zero-experts)"
                } else {
                    ""
                }
            );
            counters::print_table(&card, &runs);
        }
        return Ok(());
    }
    let copy_gbs = copy_bandwidth(&dev)?;
    let matrix = args.matrix_tflops.or_else(|| {
        let n = &dev.info().name;
        (n.contains("H100") || n.contains("H200")).then_some(989.4)
    });
    let mut results = Vec::new();
    for &t in &tokens {
        results.push(time_stages(&dev, &mut layer, t, iters)?);
    }
    let args = &BenchArgs {
        tokens: Some(tokens),
        iters: Some(iters),
        ..args.clone()
    };
    if args.json {
        print_json(&dev, &name, &cfg, copy_gbs, matrix, args, &results);
    } else {
        print_table(&dev, &name, &cfg, copy_gbs, matrix, args, &results);
    }
    Ok(())
}

fn event(dev: &Device) -> Result<CudaEvent, Error> {
    dev.context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|source| Error::Driver {
            op: "bench",
            source,
        })
}

fn driver<T>(r: Result<T, cudarc::driver::DriverError>) -> Result<T, Error> {
    r.map_err(|source| Error::Driver {
        op: "bench",
        source,
    })
}

/// Device-to-device copy of 1 GiB, counting bytes read plus written, median of 10: GB/s.
fn copy_bandwidth(dev: &Device) -> Result<f64, Error> {
    let bytes = 1usize << 30;
    let src = dev.zeros::<u8>(&[bytes])?;
    let mut dst = dev.zeros::<u8>(&[bytes])?;
    let timer = dev.timer()?;
    let mut ms: Vec<f64> = (0..11)
        .map(|_| {
            timer
                .time(dev, || {
                    driver(dev.stream().memcpy_dtod(src.buf(), dst.buf_mut()))
                })
                .map(|d| d.as_secs_f64())
        })
        .collect::<Result<_, _>>()?;
    ms.remove(0); // warm-up
    Ok(2.0 * bytes as f64 / median(&mut ms) / 1e9)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times each stage of `iters` forwards on `t` random tokens, flushing the L2 before each so
/// that no weight is read from cache, and returns each stage's median with its work.
fn time_stages(
    dev: &Device,
    layer: &mut MoeLayer<bf16>,
    t: usize,
    iters: usize,
) -> Result<Run, Error> {
    let cfg = layer.config().clone();
    let h = cfg.hidden;
    // The input: uniform in [-1, 1) with seed 2^40 + T.
    let mut x: Tensor<bf16> = dev.zeros(&[t, h])?;
    dev.fill_uniform(&mut x, (1 << 40) + t as u64, -1.0, 1.0)?;
    let mut y: Tensor<bf16> = dev.zeros(&[t, h])?;
    // The flush evicts the L2 and, at 512 MiB (about 0.2 ms), gives the host time to enqueue the
    // whole forward before the device reaches it, so small-T stages time the device, not the
    // launch calls.
    let l2 = usize::try_from(dev.info().l2_bytes).unwrap_or(64 << 20);
    let mut flush: Tensor<u8> = dev.zeros(&[(4 * l2).max(512 << 20)])?;
    for _ in 0..3 {
        layer.forward_into(dev, &mut y, &x)?;
    }
    let before = dev.work_counts();
    layer.forward_into(dev, &mut y, &x)?;
    let work = dev.work_counts() - before;
    layer.check(dev)?;
    let start = event(dev)?;
    let mut marks: Vec<(Stage, CudaEvent)> = Vec::new();
    let mut samples: Vec<Vec<f64>> = Vec::new();
    for _ in 0..iters {
        dev.fill_bytes(&mut flush, 0)?;
        driver(start.record(dev.stream()))?;
        let mut n = 0;
        layer.forward_marked(dev, &mut y, &x, &mut |stage| {
            if marks.len() <= n {
                marks.push((stage, event(dev)?));
            }
            driver(marks[n].1.record(dev.stream()))?;
            n += 1;
            Ok(())
        })?;
        dev.synchronize()?;
        let mut prev = &start;
        let mut row = Vec::with_capacity(n);
        for (_, ev) in &marks[..n] {
            row.push(f64::from(driver(prev.elapsed_ms(ev))?) * 1e3);
            prev = ev;
        }
        samples.push(row);
    }
    layer.check(dev)?;

    // The decode path has no Plan, Shared or Combine stage: its Gemm1 holds the shared
    // expert's gate/up and its Gemm2 the shared down projection and the combine.
    let fused = !marks.iter().any(|(s, _)| *s == Stage::Plan);
    let work_of = stage_work(dev, layer, t, fused)?;
    let rows = marks
        .iter()
        .enumerate()
        .map(|(j, (stage, _))| {
            let mut v: Vec<f64> = samples.iter().map(|s| s[j]).collect();
            let (flops, bytes) = work_of(*stage);
            StageRow {
                stage: *stage,
                micros: median(&mut v),
                flops,
                bytes,
            }
        })
        .collect();
    Ok(Run {
        tokens: t,
        rows,
        work,
    })
}

/// What each stage of the last forward on `t` tokens had to do, as (useful FLOPs, fewest bytes
/// it must move): from that forward's routing (the experts with tokens and their rows), the
/// weights as stored (compressed for packed formats) and bf16 activations. `fused`: the decode
/// path, whose Gemm1 holds the shared expert's gate/up and whose Gemm2 its down projection and
/// the combine.
fn stage_work(
    dev: &Device,
    layer: &MoeLayer<bf16>,
    t: usize,
    fused: bool,
) -> Result<impl Fn(Stage) -> (f64, f64) + use<>, Error> {
    let cfg = layer.config().clone();
    let h = cfg.hidden;
    // The work: GEMM rows and experts with tokens, from the routing (the decode path builds no
    // plan).
    let mut counts = vec![0u32; cfg.experts];
    for id in dev.download(layer.routing().0)? {
        if let Some(c) = usize::try_from(id).ok().and_then(|e| counts.get_mut(e)) {
            *c += 1;
        }
    }
    let rows: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    // Weight bytes of the experts with tokens, as stored (compressed for packed formats).
    let (mut w1, mut w2) = (0.0, 0.0);
    for (e, _) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let (a, b) = layer.expert_bytes(e);
        w1 += a as f64;
        w2 += b as f64;
    }
    let (hf, i, et, k, tf) = (
        h as f64,
        cfg.intermediate as f64,
        cfg.experts_total() as f64,
        cfg.k() as f64,
        t as f64,
    );
    let is = cfg.shared.map_or(0.0, |s| s.intermediate as f64);
    let b = 2.0; // bf16
    let router_b = if cfg.router_f32 { 4.0 } else { 2.0 };
    let work = move |stage: Stage| -> (f64, f64) {
        match stage {
            Stage::Route => (
                2.0 * tf * et * hf,
                tf * hf * b + et * hf * router_b + tf * et * router_b + tf * k * 8.0,
            ),
            Stage::Plan => (0.0, tf * k * 4.0 * 4.0),
            Stage::Gemm1 => (
                2.0 * rows * 2.0 * i * hf,
                w1 + tf * hf * b + 2.0 * rows * hf * b + rows * i * b,
            ),
            Stage::Gemm2 => (2.0 * rows * hf * i, w2 + rows * i * b + rows * hf * b),
            Stage::Shared => (
                2.0 * tf * 3.0 * is * hf,
                3.0 * is * hf * b + 2.0 * tf * hf * b + tf * is * b,
            ),
            Stage::Combine => (0.0, rows * hf * b + tf * k * 8.0 + tf * hf * b),
        }
    };
    let work_of = move |stage: Stage| -> (f64, f64) {
        let (flops, bytes) = work(stage);
        if !fused {
            return (flops, bytes);
        }
        let shared_flops = work(Stage::Shared).0;
        let shared_weights = 3.0 * is * hf * b; // two thirds gate/up, one third down
        match stage {
            Stage::Gemm1 => (
                flops + shared_flops * 2.0 / 3.0,
                bytes + shared_weights * 2.0 / 3.0,
            ),
            Stage::Gemm2 => (
                flops + shared_flops / 3.0,
                bytes + shared_weights / 3.0 + work(Stage::Combine).1,
            ),
            _ => (flops, bytes),
        }
    };
    Ok(work_of)
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Route => "route",
        Stage::Plan => "plan",
        Stage::Gemm1 => "gemm1",
        Stage::Gemm2 => "gemm2",
        Stage::Shared => "shared",
        Stage::Combine => "combine",
    }
}

fn header(dev: &Device, name: &str, cfg: &MoeConfig, copy: Option<f64>, matrix: Option<f64>) {
    println!(
        "{name}: H={} I={} E={} K={}{} bf16, on {}",
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.k(),
        cfg.shared
            .map_or(String::new(), |s| format!(" shared Is={}", s.intermediate)),
        dev.info().name
    );
    let Some(copy) = copy else {
        return;
    };
    println!(
        "ceilings: copy {copy:.0} GB/s (measured, read+write); matrix {}",
        matrix.map_or("unknown (pass --matrix-tflops)".into(), |m| format!(
            "{m:.0} TFLOP/s dense bf16"
        ))
    );
}

/// Appends every launch's counters and model to `path`, one JSON line each.
fn write_records(
    path: &std::path::Path,
    card: &Card,
    runs: &[counters::CountedRun],
) -> Result<(), Error> {
    use std::io::Write as _;
    let mut text = String::new();
    for run in runs {
        for s in &run.stages {
            for (r, m) in &s.launches {
                text.push_str(&counters::launch_json(r, m, card).to_string());
                text.push('\n');
            }
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| Error::Unsupported {
            op: "bench",
            what: format!("--records {}: cannot write it ({e})", path.display()),
        })
}

fn print_table(
    dev: &Device,
    name: &str,
    cfg: &MoeConfig,
    copy: f64,
    matrix: Option<f64>,
    args: &BenchArgs,
    results: &[Run],
) {
    header(dev, name, cfg, Some(copy), matrix);
    if args.matrix_tflops.is_none() && matrix.is_some() {
        println!("  (matrix rate: datasheet figure, not measured here)");
    }
    println!(
        "{:>6} {:<8} {:>10} {:>9} {:>9} {:>7} {:>7}",
        "T", "stage", "us", "TFLOP/s", "GB/s", "%copy", "%mma"
    );
    for run in results {
        let (t, rows) = (run.tokens, &run.rows);
        let mut total = 0.0;
        for r in rows {
            total += r.micros;
            let tflops = r.flops / (r.micros * 1e-6) / 1e12;
            let gbs = r.bytes / (r.micros * 1e-6) / 1e9;
            println!(
                "{:>6} {:<8} {:>10.1} {:>9.1} {:>9.0} {:>6.0}% {:>7}",
                t,
                stage_name(r.stage),
                r.micros,
                tflops,
                gbs,
                100.0 * gbs / copy,
                matrix.map_or("-".into(), |m| format!("{:.0}%", 100.0 * tflops / m))
            );
        }
        println!(
            "{:>6} {:<8} {:>10.1}   {} launches, {} memsets per forward",
            t, "total", total, run.work.launches, run.work.memsets
        );
    }
}

fn print_json(
    dev: &Device,
    name: &str,
    cfg: &MoeConfig,
    copy: f64,
    matrix: Option<f64>,
    args: &BenchArgs,
    results: &[Run],
) {
    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|run| {
            serde_json::json!({
                "tokens": run.tokens,
                "launches": run.work.launches,
                "memsets": run.work.memsets,
                "total_us": run.rows.iter().map(|r| r.micros).sum::<f64>(),
                "stages": run.rows.iter().map(|r| serde_json::json!({
                    "stage": stage_name(r.stage),
                    "us": r.micros,
                    "flops": r.flops,
                    "bytes": r.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let v = serde_json::json!({
        "name": name,
        "device": dev.info().name,
        "emulated": dev.info().emulated,
        "driver": dev.info().driver_version,
        "format": args.format,
        "gemm": args.gemm,
        "path": args.path,
        "hidden": cfg.hidden,
        "intermediate": cfg.intermediate,
        "experts": cfg.experts,
        "k": cfg.k(),
        "shared_intermediate": cfg.shared.map(|s| s.intermediate),
        "copy_gbs": copy,
        "matrix_tflops": matrix,
        "matrix_tflops_measured": args.matrix_tflops.is_some(),
        "iters": args.iters,
        "seed": args.seed,
        "runs": runs,
    });
    println!("{v}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The random experts are valid containers with finite values of an init's size.
    #[test]
    fn random_experts_are_finite_and_init_sized() {
        let mut rng = Rng::new(3);
        for format in ["int4", "int4-act", "int8", "mxfp4", "fp8", "ternary"] {
            let (n, kd) = (256, 384);
            let m = random_matrix(format, n, kd, &mut rng).unwrap();
            assert_eq!(m.shape(), (n, kd));
            let v = m.decode();
            assert!(v.iter().all(|x| x.is_finite()), "{format}");
            let rms =
                (v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let init = 1.0 / (kd as f64).sqrt();
            assert!(
                rms > init / 4.0 && rms < init * 4.0,
                "{format}: rms {rms} vs {init}"
            );
        }
        assert!(random_matrix("int3", 8, 8, &mut rng).is_err());
    }
}
