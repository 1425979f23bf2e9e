//! The main job's layer check: a Qwen3-30B-A3B-shaped MoE block with seeded random bf16 weights,
//! run through the crate's kernels (router projection, routing, plan, gather, the two expert
//! GEMMs, combine) and checked on sampled tokens against an f64 evaluation of the same block.

use half::bf16;
use moe_kernels::activation::{GateLayout, GatedAct, reference as act_ref};
use moe_kernels::gemm::{self, Epilogue, GemmOptions, ScaleAt};
use moe_kernels::permute::{self, CombineInputs, Layout, Plan};
use moe_kernels::rng::Rng;
use moe_kernels::routing::{self, RouterConfig, reference as route_ref};
use moe_kernels::{Device, Error, Tensor};

/// Qwen3-30B-A3B: hidden 2048, 128 experts of intermediate 768, top-8, renormalised.
pub const H: usize = 2048;
pub const I: usize = 768;
pub const E: usize = 128;
pub const K: usize = 8;

/// One layer's weights, on the host (for the reference) and on the device.
pub struct Layer {
    pub router: Vec<bf16>,  // [E, H]
    pub gate_up: Vec<bf16>, // [E, 2I, H], gate rows first
    pub down: Vec<bf16>,    // [E, H, I]
}

impl Layer {
    /// Uniform weights with the variance of a 1/sqrt(fan-in) init; uniform because drawing
    /// 400 M normals on the host takes long.
    pub fn random(seed: u64, h: usize, i: usize, e: usize) -> Self {
        let mut rng = Rng::new(seed);
        let mut draw = |n: usize, fan_in: usize| -> Vec<bf16> {
            let a = (3.0 / fan_in as f64).sqrt();
            (0..n).map(|_| bf16::from_f64(rng.uniform(-a, a))).collect()
        };
        Layer {
            router: draw(e * h, h),
            gate_up: draw(e * 2 * i * h, h),
            down: draw(e * h * i, i),
        }
    }
}

/// The f64 MoE block for token row `x` given its routing: sum_k w_k down_e(silu(gate_e x) * up_e x).
pub fn reference_token(
    l: &Layer,
    x: &[f64],
    ids: &[i32],
    weights: &[f64],
    h: usize,
    i: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; h];
    for (&e, &w) in ids.iter().zip(weights) {
        let e = e as usize;
        let row = |m: &[bf16], r: usize, len: usize| -> f64 {
            m[r * len..(r + 1) * len]
                .iter()
                .zip(x)
                .map(|(a, b)| a.to_f64() * b)
                .sum()
        };
        let hidden: Vec<f64> = (0..i)
            .map(|j| {
                act_ref::silu(row(&l.gate_up, e * 2 * i + j, h))
                    * row(&l.gate_up, e * 2 * i + i + j, h)
            })
            .collect();
        for (c, yc) in y.iter_mut().enumerate() {
            let d = &l.down[(e * h + c) * i..(e * h + c + 1) * i];
            *yc += w * d
                .iter()
                .zip(&hidden)
                .map(|(a, b)| a.to_f64() * b)
                .sum::<f64>();
        }
    }
    y
}

pub struct Outcome {
    pub tokens: usize,
    pub path: &'static str,
    pub micros: f64,
    pub max_err: f64,
    pub scale: f64,
    pub passed: bool,
}

/// Runs the block on T random tokens on the GPU (the GEMV path for T <= 16, the GEMM path above)
/// and checks 4 sampled tokens.
pub fn gpu_case(dev: &Device, l: &Layer, w: &DeviceLayer, t: usize) -> Result<Outcome, Error> {
    let mut rng = Rng::new(t as u64);
    let x: Vec<bf16> = (0..t * H)
        .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
        .collect();
    let xd = dev.upload(&x, &[t, H])?;
    let decode = t <= 16;
    let layout = if decode {
        Layout::Sorted
    } else {
        Layout::Padded
    };
    let mut plan = Plan::new(dev, t, K, E, E, 64)?;
    let cfg = RouterConfig::qwen(K, true);
    let mut logits: Tensor<bf16> = dev.zeros(&[t, E])?;
    let mut ids: Tensor<i32> = dev.zeros(&[t, K])?;
    let mut weights: Tensor<f32> = dev.zeros(&[t, K])?;
    let mut y: Tensor<bf16> = dev.zeros(&[t, H])?;

    // Buffers sized once; the forward allocates nothing and never waits for the host.
    let rows = match layout {
        Layout::Sorted => t * K,
        _ => permute::reference::padded_capacity(t * K, E, 64),
    };
    let mut a: Tensor<bf16> = dev.zeros(&[rows, H])?;
    let mut hmid: Tensor<bf16> = dev.zeros(&[rows, I])?;
    let mut out: Tensor<bf16> = dev.zeros(&[rows, H])?;
    let swiglu = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };

    let mut forward = |plan: &mut Plan| -> Result<(), Error> {
        routing::route_hidden_into(
            dev,
            &mut ids,
            &mut weights,
            &mut logits,
            &xd,
            &w.router,
            None,
            &cfg,
            None,
        )?;
        plan.build(dev, &ids)?;
        permute::gather_into(dev, &mut a, &xd, plan, layout)?;
        let up = GemmOptions {
            epilogue: swiglu,
            ..Default::default()
        };
        let down = GemmOptions {
            row_weights: Some((&weights, ScaleAt::Output)),
            ..Default::default()
        };
        if decode {
            gemm::grouped_gemv_into(dev, &mut hmid, &a, &w.gate_up, plan, up)?;
            gemm::grouped_gemv_into(dev, &mut out, &hmid, &w.down, plan, down)?;
        } else {
            gemm::grouped_gemm_into(dev, &mut hmid, &a, &w.gate_up, plan, up)?;
            gemm::grouped_gemm_into(dev, &mut out, &hmid, &w.down, plan, down)?;
        }
        permute::combine_into(
            dev,
            &mut y,
            &out,
            plan,
            layout,
            &ids,
            CombineInputs::default(),
        )
    };
    forward(&mut plan)?; // warm-up: module loads
    let timer = dev.timer()?;
    let elapsed = timer.time(dev, || forward(&mut plan))?;
    plan.check(dev)?;

    let (got, logits_h, ids_h, w_h) = (
        dev.download(&y)?,
        dev.download(&logits)?,
        dev.download(&ids)?,
        dev.download(&weights)?,
    );
    let mut max_err: f64 = 0.0;
    let mut scale: f64 = 0.0;
    let mut passed = true;
    for s in 0..4.min(t) {
        let tok = s * (t - 1) / 3; // first, a third, two thirds, last

        // Routing is checked on the logits the kernel produced (exact for this rule).
        let lrow: Vec<f64> = logits_h[tok * E..(tok + 1) * E]
            .iter()
            .map(|v| v.to_f64())
            .collect();
        let r = route_ref::route(&lrow, E, &cfg, None)?;
        passed &= r.ids == ids_h[tok * K..(tok + 1) * K];
        let xt: Vec<f64> = x[tok * H..(tok + 1) * H]
            .iter()
            .map(|v| v.to_f64())
            .collect();
        let wt: Vec<f64> = w_h[tok * K..(tok + 1) * K]
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let want = reference_token(l, &xt, &ids_h[tok * K..(tok + 1) * K], &wt, H, I);
        let rms = (want.iter().map(|v| v * v).sum::<f64>() / H as f64).sqrt();
        scale = scale.max(rms);
        for (g, r) in got[tok * H..(tok + 1) * H].iter().zip(&want) {
            max_err = max_err.max((g.to_f64() - r).abs());
        }
    }
    // bf16 rounds the input, the SwiGLU output and y: a few parts in 2^8 of the output's scale.
    passed &= max_err <= 0.05 * scale;
    Ok(Outcome {
        tokens: t,
        path: if decode { "gemv" } else { "gemm" },
        micros: elapsed.as_secs_f64() * 1e6,
        max_err,
        scale,
        passed,
    })
}

/// The layer's weights on the device.
pub struct DeviceLayer {
    pub router: Tensor<bf16>,
    pub gate_up: Tensor<bf16>,
    pub down: Tensor<bf16>,
}

impl DeviceLayer {
    pub fn upload(dev: &Device, l: &Layer) -> Result<Self, Error> {
        Ok(DeviceLayer {
            router: dev.upload(&l.router, &[E, H])?,
            gate_up: dev.upload(&l.gate_up, &[E, 2 * I, H])?,
            down: dev.upload(&l.down, &[E, H, I])?,
        })
    }
}
