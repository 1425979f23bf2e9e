//! `moe-kernels forward`: one MoE block of a Hugging Face checkpoint on an input file.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use moe_kernels::layer::{ForwardOptions, MoeLayer, reference};
use moe_kernels::model::{Model, OwnedTensor, TensorFile, write_tensors};
use moe_kernels::routing::{self, reference as route_ref};
use moe_kernels::{DType, Device, Error, Float, kernels};

/// Where the block runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    Cuda,
    Cpu,
}

/// The compute dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F16,
    F32,
}

impl DtypeArg {
    fn dtype(self) -> DType {
        match self {
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
            DtypeArg::F32 => DType::F32,
        }
    }
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// The model folder: config.json and model.safetensors (or shards with their index).
    #[arg(long)]
    pub model: PathBuf,
    /// The decoder layer whose MoE block runs.
    #[arg(long)]
    pub layer: usize,
    /// A safetensors file holding `input` [T, H] in f32, bf16 or f16.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write `output` [T, H] f32, `topk_ids` [T, K] i64 and `topk_weights` [T, K] f32.
    #[arg(long)]
    pub output: PathBuf,
    /// cuda when a usable GPU and the kernels are present, else cpu.
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// The checkpoint's dtype unless given.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Also run the CPU forward (f64 over the exact weights) and compare: the experts must
    /// agree except at near-ties, and the output within 3% of its scale. Runs on cuda.
    #[arg(long)]
    pub check: bool,
    /// Expert ids (comma-separated, in [0, E_total)) removed from every token's routing; the
    /// router's rule runs on the experts that remain.
    #[arg(long, value_delimiter = ',', conflicts_with = "topk_ids")]
    pub mask_experts: Vec<usize>,
    /// A safetensors file with `topk_ids [T, K]` (i64 or i32; -1 for an unused slot) and
    /// `topk_weights [T, K]` f32: the routing to run instead of the layer's router.
    #[arg(long)]
    pub topk_ids: Option<PathBuf>,
}

/// The block's result on the host.
struct Outcome {
    y: Vec<f32>,
    ids: Vec<i32>,
    weights: Vec<f32>,
}

pub fn run(args: &ForwardArgs) -> Result<(), Error> {
    let model = Model::open(&args.model)?;
    let cfg = model.layer_config(args.layer)?;
    let (x, tokens) = read_input(&args.input, cfg.hidden)?;
    let et = cfg.experts_total();
    // Checked here, so that a bad mask or routing file is refused before anything runs.
    routing::mask_words("forward", "--mask-experts", et, &args.mask_experts)?;
    let controls = reference::Controls {
        given: args
            .topk_ids
            .as_deref()
            .map(|p| read_routing(p, tokens, cfg.k(), et))
            .transpose()?,
        removed: (!args.mask_experts.is_empty()).then(|| {
            (0..tokens)
                .flat_map(|_| (0..et).map(|e| args.mask_experts.contains(&e)))
                .collect()
        }),
    };
    let dtype = args.dtype.map_or(model.dtype, DtypeArg::dtype);

    // --check compares the cuda path with the cpu one, so it needs cuda.
    let want = if args.check {
        args.device.or(Some(DeviceArg::Cuda))
    } else {
        args.device
    };
    let device = match want {
        Some(DeviceArg::Cpu) if args.check => {
            return Err(Error::Unsupported {
                op: "forward",
                what: "--check compares the cuda path with the cpu one; drop --device cpu".into(),
            });
        }
        Some(DeviceArg::Cpu) => None,
        Some(DeviceArg::Cuda) => {
            if dtype == DType::F32 {
                return Err(Error::Unsupported {
                    op: "forward",
                    what: "--device cuda computes in bf16 or f16; use --dtype bf16|f16, or \
                           --device cpu for f32"
                        .into(),
                });
            }
            Some(cuda()?)
        }
        None if dtype == DType::F32 => {
            eprintln!("forward: running on cpu: the GPU path computes in bf16 or f16, not f32");
            None
        }
        None => match cuda() {
            Ok(dev) => Some(dev),
            Err(e) => {
                eprintln!("forward: running on cpu: cuda is not usable: {e}");
                None
            }
        },
    };
    let run = Run {
        model: &model,
        layer: args.layer,
        x: &x,
        tokens,
        controls: &controls,
        mask: &args.mask_experts,
    };
    let r = match (&device, dtype) {
        (None, DType::F32) => run.on_cpu::<f32>()?,
        (None, DType::BF16) => run.on_cpu::<bf16>()?,
        (None, _) => run.on_cpu::<f16>()?,
        (Some(dev), DType::F16) => run.on_gpu::<f16>(dev)?,
        (Some(dev), _) => run.on_gpu::<bf16>(dev)?,
    };
    if args.check {
        run.check_against_cpu(dtype, &r)?;
    }

    // Each row's ids ascending, the weights in the same order.
    let k = cfg.k();
    let mut ids = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    for t in 0..tokens {
        let mut row: Vec<(i32, f32)> = (t * k..(t + 1) * k)
            .map(|s| (r.ids[s], r.weights[s]))
            .collect();
        row.sort_by_key(|&(id, _)| id);
        ids.extend(row.iter().map(|&(id, _)| i64::from(id)));
        weights.extend(row.iter().map(|&(_, w)| w));
    }
    write_tensors(
        &args.output,
        &[
            ("output", OwnedTensor::f32(&[tokens, cfg.hidden], &r.y)),
            ("topk_ids", OwnedTensor::i64(&[tokens, k], &ids)),
            ("topk_weights", OwnedTensor::f32(&[tokens, k], &weights)),
        ],
    )?;
    println!(
        "{} layer {} ({}), {tokens} tokens on {} in {} -> {}",
        model.model_type,
        args.layer,
        family_line(&cfg),
        if device.is_some() { "cuda" } else { "cpu" },
        dtype,
        args.output.display()
    );
    Ok(())
}

fn family_line(cfg: &moe_kernels::layer::MoeConfig) -> String {
    format!(
        "H={} I={} E={} K={}{}",
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.k(),
        cfg.shared
            .map_or(String::new(), |s| format!(", shared Is={}", s.intermediate))
    )
}

fn cuda() -> Result<Device, Error> {
    let dev = Device::new(0)?;
    if !kernels::built() {
        return Err(Error::KernelsNotBuilt {
            op: "forward",
            module: "all",
        });
    }
    Ok(dev)
}

/// Reads `input [T, H]` and refuses a wrong width or a non-finite value.
fn read_input(path: &Path, hidden: usize) -> Result<(Vec<f32>, usize), Error> {
    let file = TensorFile::open(path)?;
    let raw = file.raw("input")?;
    let bad = |expected: String, got: String| Error::Checkpoint {
        file: path.display().to_string(),
        what: "tensor `input`".into(),
        expected,
        got,
    };
    let tokens = match *raw.shape.as_slice() {
        [t, h] if h == hidden && t > 0 => t,
        _ => {
            return Err(bad(
                format!("shape [T, {hidden}] with T >= 1 (H is the layer's hidden size)"),
                format!("{:?}", raw.shape),
            ));
        }
    };
    let x: Vec<f32> = raw.to_vec()?;
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        return Err(bad(
            "finite values".into(),
            format!("{} at [{}, {}]", x[p], p / hidden, p % hidden),
        ));
    }
    Ok((x, tokens))
}

/// Reads `topk_ids` and `topk_weights` `[T, K]` from `path` and refuses what the layer would
/// not run: another shape, ids outside [-1, E_total) or repeated within a row, weights that are
/// not finite.
fn read_routing(
    path: &Path,
    tokens: usize,
    k: usize,
    experts: usize,
) -> Result<(Vec<i32>, Vec<f32>), Error> {
    let file = TensorFile::open(path)?;
    let bad = |what: &str, expected: String, got: String| Error::Checkpoint {
        file: path.display().to_string(),
        what: what.into(),
        expected,
        got,
    };
    let ids_raw = file.raw("topk_ids")?;
    ids_raw.expect_shape(&[tokens, k])?;
    let weights_raw = file.raw("topk_weights")?;
    weights_raw.expect_shape(&[tokens, k])?;
    if weights_raw.dtype != safetensors::Dtype::F32 {
        return Err(bad(
            "tensor `topk_weights` dtype",
            "F32".into(),
            format!("{:?}", weights_raw.dtype),
        ));
    }
    let weights: Vec<f32> = weights_raw.to_vec()?;
    let mut ids = Vec::with_capacity(tokens * k);
    for (i, id) in ids_raw.to_i64()?.into_iter().enumerate() {
        let (t, slot) = (i / k, i % k);
        let id = i32::try_from(id)
            .ok()
            .filter(|&v| v >= -1 && usize::try_from(v).map_or(true, |e| e < experts))
            .ok_or_else(|| {
                bad(
                    "tensor `topk_ids`",
                    format!("ids in [-1, {experts}) (-1: an unused slot)"),
                    format!("{id} at [{t}, {slot}]"),
                )
            })?;
        if id >= 0 && ids[t * k..].contains(&id) {
            return Err(bad(
                "tensor `topk_ids`",
                "each expert at most once per token".into(),
                format!("{id} again at [{t}, {slot}]"),
            ));
        }
        ids.push(id);
    }
    if let Some(p) = weights.iter().position(|w| !w.is_finite()) {
        return Err(bad(
            "tensor `topk_weights`",
            "finite values".into(),
            format!("{} at [{}, {}]", weights[p], p / k, p % k),
        ));
    }
    Ok((ids, weights))
}

/// One forward's inputs and routing controls.
struct Run<'a> {
    model: &'a Model,
    layer: usize,
    x: &'a [f32],
    tokens: usize,
    controls: &'a reference::Controls,
    /// The experts removed from every token (`--mask-experts`).
    mask: &'a [usize],
}

impl Run<'_> {
    fn on_cpu<S: Float>(&self) -> Result<Outcome, Error> {
        let (cfg, w) = self.model.load_layer::<S>(self.layer)?;
        // The input in the compute dtype, as the GPU path sees it.
        let xs: Vec<f64> = self.x.iter().map(|&v| S::from_f32(v).to_f64()).collect();
        let f = reference::forward_with(&cfg, &w, &xs, self.controls)?;
        Ok(Outcome {
            y: f.y.iter().map(|&v| v as f32).collect(),
            ids: f.routing.ids,
            weights: f.routing.weights.iter().map(|&v| v as f32).collect(),
        })
    }

    fn on_gpu<T: Float>(&self, dev: &Device) -> Result<Outcome, Error> {
        let (cfg, w) = self.model.load_layer::<T>(self.layer)?;
        let tokens = self.tokens;
        let mut moe = MoeLayer::<T>::new(dev, &cfg, &w, tokens)?;
        if !self.mask.is_empty() {
            moe.set_expert_masks(dev, &[self.mask])?;
        }
        let xs: Vec<T> = self.x.iter().map(|&v| T::from_f32(v)).collect();
        let xd = dev.upload(&xs, &[tokens, cfg.hidden])?;
        let mut y = dev.zeros::<T>(&[tokens, cfg.hidden])?;
        let given = match &self.controls.given {
            Some((ids, weights)) => Some((
                dev.upload(ids, &[tokens, cfg.k()])?,
                dev.upload(weights, &[tokens, cfg.k()])?,
            )),
            None => None,
        };
        let opts = ForwardOptions {
            routing: given.as_ref().map(|(i, w)| (i, w)),
            mask_index: None,
            adapter_ids: None,
        };
        moe.forward_with(dev, &mut y, &xd, opts)?;
        moe.check(dev)?;
        let (ids, weights) = moe.routing();
        Ok(Outcome {
            y: dev.download(&y)?.iter().map(|v| v.to_f32()).collect(),
            ids: dev.download(ids)?,
            weights: dev.download(weights)?,
        })
    }

    /// Compares the GPU result with the CPU forward on the same input, rounded to the compute
    /// dtype as the GPU saw it, over weights held exactly in f32.
    fn check_against_cpu(&self, dtype: DType, gpu: &Outcome) -> Result<(), Error> {
        check_against_cpu(self.model, self.layer, self.x, dtype, self.controls, gpu)
    }
}

fn check_against_cpu(
    model: &Model,
    layer: usize,
    x: &[f32],
    dtype: DType,
    controls: &reference::Controls,
    gpu: &Outcome,
) -> Result<(), Error> {
    let (cfg, w) = model.load_layer::<f32>(layer)?;
    let xs: Vec<f64> = x
        .iter()
        .map(|&v| match dtype {
            DType::F16 => f16::from_f32(v).to_f64(),
            _ => bf16::from_f32(v).to_f64(),
        })
        .collect();
    let f = reference::forward_with(&cfg, &w, &xs, controls)?;
    let (h, k) = (cfg.hidden, cfg.k());
    let scale = f.y.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (mut max_err, mut compared, mut ties) = (0f64, 0, 0);
    let mut differ = Vec::new();
    for t in 0..xs.len() / h {
        if !route_ref::same_experts(
            &gpu.ids[t * k..(t + 1) * k],
            &f.routing.ids[t * k..(t + 1) * k],
        ) {
            // bf16 logits may flip a choice decided by less than a few of their roundings.
            if f.routing.margin[t] < route_ref::BF16_LOGIT_TIE {
                ties += 1;
            } else {
                differ.push(t);
            }
            continue;
        }
        compared += 1;
        for c in 0..h {
            max_err = max_err.max((f64::from(gpu.y[t * h + c]) - f.y[t * h + c]).abs());
        }
    }
    let rel = if scale > 0.0 {
        max_err / scale
    } else {
        max_err
    };
    println!(
        "check: {compared} tokens compared with the cpu forward, max |err| {max_err:.3e} \
         ({:.2}% of the output's scale {scale:.3e}); {ties} near-tie(s) routed differently",
        100.0 * rel
    );
    if !differ.is_empty() || rel > 0.03 {
        return Err(Error::DeviceCheck {
            op: "forward --check",
            what: format!(
                "the cuda path disagrees with the cpu forward: tokens {differ:?} routed \
                 differently with a clear margin; output error {:.2}% of its scale (limit 3%)",
                100.0 * rel
            ),
        });
    }
    Ok(())
}
