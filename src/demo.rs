//! The main job's layer check: a Qwen3-30B-A3B-shaped MoE block with seeded random bf16 weights,
//! run by [`MoeLayer`] (router projection, routing, plan, gather, the two expert GEMMs, combine)
//! and checked on sampled tokens against the CPU forward.

use half::bf16;
use moe_kernels::layer::{DecodeVersion, Experts, LayerWeights, MoeConfig, MoeLayer, reference};
use moe_kernels::rng::Rng;
use moe_kernels::routing::{RouterConfig, reference as route_ref};
use moe_kernels::{Device, Error};

/// Qwen3-30B-A3B: hidden 2048, 128 experts of intermediate 768, top-8, renormalised.
pub fn qwen3_30b_a3b() -> MoeConfig {
    MoeConfig::new(2048, 768, 128, RouterConfig::qwen(8, true))
}

/// The same routing rule and shape ratios at a size the CPU emulator runs in seconds: hidden
/// 512, 32 experts of intermediate 192, top-4, renormalised.
pub fn small_qwen3_style() -> MoeConfig {
    MoeConfig::new(512, 192, 32, RouterConfig::qwen(4, true))
}

/// Uniform weights with the variance of a 1/sqrt(fan-in) init (uniform because drawing 600 M
/// normals on the host takes long); the router 4x wider, so routing margins are realistic.
pub fn random_weights(cfg: &MoeConfig, seed: u64) -> LayerWeights<bf16> {
    let mut rng = Rng::new(seed);
    let (h, i, e) = (cfg.hidden, cfg.intermediate, cfg.experts);
    let mut draw = |n: usize, fan_in: usize, gain: f64| -> Vec<bf16> {
        let a = gain * (3.0 / fan_in as f64).sqrt();
        (0..n).map(|_| bf16::from_f64(rng.uniform(-a, a))).collect()
    };
    LayerWeights {
        router: draw(e * h, h, 4.0).iter().map(|v| v.to_f32()).collect(),
        router_bias: None,
        correction_bias: None,
        experts: Experts::Plain {
            gate_up: draw(e * 2 * i * h, h, 1.0),
            down: draw(e * h * i, i, 1.0),
        },
        gate_up_bias: None,
        down_bias: None,
        shared_gate_up: None,
        shared_down: None,
        shared_gate: None,
        const_w: None,
        const_v: None,
    }
}

pub struct Outcome {
    pub tokens: usize,
    pub path: &'static str,
    pub micros: f64,
    pub max_err: f64,
    pub scale: f64,
    /// Sampled tokens compared, and those skipped as routing near-ties.
    pub compared: usize,
    pub near_ties: usize,
    pub passed: bool,
}

/// Runs the block on T random tokens (the decode path up to 16 tokens, the GEMM path above),
/// times one forward, and checks 4 sampled tokens against the CPU forward.
pub fn gpu_case(
    dev: &Device,
    cfg: &MoeConfig,
    w: &LayerWeights<bf16>,
    layer: &mut MoeLayer<bf16>,
    t: usize,
) -> Result<Outcome, Error> {
    let h = cfg.hidden;
    let mut rng = Rng::new(t as u64);
    let x: Vec<bf16> = (0..t * h)
        .map(|_| bf16::from_f64(rng.uniform(-1.0, 1.0)))
        .collect();
    let xd = dev.upload(&x, &[t, h])?;
    let mut y = dev.zeros::<bf16>(&[t, h])?;
    layer.forward_into(dev, &mut y, &xd)?; // warm-up: module loads
    let timer = dev.timer()?;
    let elapsed = timer.time(dev, || layer.forward_into(dev, &mut y, &xd))?;
    layer.check(dev)?;
    let got = dev.download(&y)?;
    let ids = dev.download(layer.routing().0)?;

    let k = cfg.k();
    let sampled: Vec<usize> = (0..4.min(t)).map(|s| s * (t - 1) / 3).collect();
    let xs: Vec<f64> = sampled
        .iter()
        .flat_map(|&tok| x[tok * h..(tok + 1) * h].iter().map(|v| v.to_f64()))
        .collect();
    let want = reference::forward(cfg, w, &xs)?;
    let (mut max_err, mut scale, mut compared, mut near_ties) = (0f64, 0f64, 0, 0);
    let mut passed = true;
    for (s, &tok) in sampled.iter().enumerate() {
        if !route_ref::same_experts(
            &ids[tok * k..(tok + 1) * k],
            &want.routing.ids[s * k..(s + 1) * k],
        ) {
            // The GPU rounds the router's logits to bf16, as the model does: a choice decided
            // by less than a few of those roundings may go the other way. Any other difference
            // is a failure.
            if want.routing.margin[s] < route_ref::BF16_LOGIT_TIE {
                near_ties += 1;
            } else {
                passed = false;
            }
            continue;
        }
        compared += 1;
        let r = &want.y[s * h..(s + 1) * h];
        scale = scale.max((r.iter().map(|v| v * v).sum::<f64>() / h as f64).sqrt());
        for (g, r) in got[tok * h..(tok + 1) * h].iter().zip(r) {
            max_err = max_err.max((g.to_f64() - r).abs());
        }
    }
    // bf16 rounds the input, the logits, the SwiGLU output and y: a few parts in 2^8 of the
    // output's scale.
    passed &= max_err <= 0.05 * scale;
    Ok(Outcome {
        tokens: t,
        path: if t > MoeLayer::<bf16>::DECODE_TOKENS {
            "gemm"
        } else {
            match layer.decode_kernels_for(t) {
                DecodeVersion::V1 => "decode v1",
                DecodeVersion::V2 => "decode v2",
                DecodeVersion::V3 => "decode v3",
                DecodeVersion::V4 | DecodeVersion::Auto => "decode v4",
                DecodeVersion::V5 => "decode v5",
            }
        },
        micros: elapsed.as_secs_f64() * 1e6,
        max_err,
        scale,
        compared,
        near_ties,
        passed,
    })
}
