//! The CPU forward of one MoE block: f64 arithmetic over the stored weights, token by token,
//! written from the math of [`MoeConfig`]. Slow and exact; every other path is checked against
//! it.

use std::collections::HashMap;

use super::{Experts, LayerWeights, MoeConfig, ZeroExpert};
use crate::activation::{GateLayout, GatedAct};
use crate::dtype::Float;
use crate::error::{Error, Result};
use crate::gemm::ScaleAt;
use crate::lora::reference::Pair;
use crate::lora::{LoraAdapters, LoraDims};
use crate::routing::reference::{self as route_ref, Routing};

/// The block's output and the routing that produced it.
#[derive(Clone, Debug)]
pub struct Forward {
    /// `[T, H]`.
    pub y: Vec<f64>,
    /// The router's choice: ids and weights `[T, K]` in selection order, and each token's margin.
    pub routing: Routing,
}

/// One gated MLP on `x`: `down · act(gate · s x + b_g, up · s x + b_u) + b_d`, where
/// `gate_up [2I, H]` holds gate and up rows in `layout` and `s` scales the input; a LoRA pair
/// adds its deltas to the three products (the gate/up ones scaled by `s` with them).
#[allow(clippy::too_many_arguments)] // the MLP's parts, one for one
pub(crate) fn gated_mlp<W: Float, S: Float>(
    x: &[f64],
    gate_up: &[W],
    gate_up_bias: Option<&[S]>,
    down: &[W],
    down_bias: Option<&[S]>,
    layout: GateLayout,
    act: GatedAct,
    scale_in: f64,
    lora: Option<Pair<'_, S>>,
) -> Vec<f64> {
    let h = x.len();
    let i = gate_up.len() / (2 * h);
    let gate_up_delta = lora.map(|p| p.gate_up(x, layout));
    let z = |row: usize| -> f64 {
        let w = &gate_up[row * h..(row + 1) * h];
        let dot: f64 = w.iter().zip(x).map(|(a, b)| a.to_f64() * b).sum();
        let delta = gate_up_delta.as_ref().map_or(0.0, |d| d[row]);
        scale_in * (dot + delta) + gate_up_bias.map_or(0.0, |b| b[row].to_f64())
    };
    let hidden: Vec<f64> = (0..i)
        .map(|j| {
            let (g, u) = match layout {
                GateLayout::GateFirst => (j, i + j),
                GateLayout::UpFirst => (i + j, j),
                GateLayout::Interleaved => (2 * j, 2 * j + 1),
            };
            act.eval(z(g), z(u))
        })
        .collect();
    let down_delta = lora.map(|p| p.down(&hidden));
    (0..h)
        .map(|c| {
            let w = &down[c * i..(c + 1) * i];
            let dot: f64 = w.iter().zip(&hidden).map(|(a, b)| a.to_f64() * b).sum();
            let delta = down_delta.as_ref().map_or(0.0, |d| d[c]);
            dot + delta + down_bias.map_or(0.0, |b| b[c].to_f64())
        })
        .collect()
}

/// The routing controls of [`forward_with`], as the GPU layer's [`super::ForwardOptions`] gives
/// them.
#[derive(Clone, Debug, Default)]
pub struct Controls {
    /// Routing given by the caller: ids and weights `[T, K]` as [`route_ref::given`] takes them;
    /// the router is not run.
    pub given: Option<(Vec<i32>, Vec<f32>)>,
    /// `[T, E_total]`, true where the token's mask removes the expert before selection
    /// ([`route_ref::route_masked`]). Ignored with given routing.
    pub removed: Option<Vec<bool>>,
}

/// The block on `x [T, H]` (f64 values, usually the model-dtype input widened).
pub fn forward<S: Float>(cfg: &MoeConfig, w: &LayerWeights<S>, x: &[f64]) -> Result<Forward> {
    forward_with(cfg, w, x, &Controls::default())
}

/// [`forward`] with routing given by the caller or experts masked.
pub fn forward_with<S: Float>(
    cfg: &MoeConfig,
    w: &LayerWeights<S>,
    x: &[f64],
    controls: &Controls,
) -> Result<Forward> {
    forward_lora(cfg, w, x, controls, None)
}

/// [`forward_with`] with LoRA adapters on the routed experts and each token's adapter id
/// (`[T]`, -1 or out of range for none).
pub fn forward_lora<S: Float>(
    cfg: &MoeConfig,
    w: &LayerWeights<S>,
    x: &[f64],
    controls: &Controls,
    lora: Option<(&LoraAdapters<S>, &[i32])>,
) -> Result<Forward> {
    const OP: &str = "MoE layer reference";
    w.check(OP, cfg)?;
    let (h, i, e, et, k) = (
        cfg.hidden,
        cfg.intermediate,
        cfg.experts,
        cfg.experts_total(),
        cfg.k(),
    );
    if !x.len().is_multiple_of(h) {
        return Err(Error::shape(
            OP,
            "x",
            format!("[T, H] with H = {h}"),
            format!("{} values", x.len()),
        ));
    }
    if let Some(p) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::shape(
            OP,
            "x",
            "finite values",
            format!("{} at [{}, {}]", x[p], p / h, p % h),
        ));
    }
    let tokens = x.len() / h;
    if let Some((adapters, ids)) = lora {
        adapters.check(
            OP,
            LoraDims {
                experts: e,
                hidden: h,
                inter: i,
            },
        )?;
        if ids.len() != tokens {
            return Err(Error::shape(
                OP,
                "adapter_ids",
                format!("[T] = [{tokens}]"),
                format!("{} values", ids.len()),
            ));
        }
    }
    let widen = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f64::from(a)).collect() };
    let router = widen(&w.router);
    let router_bias = w.router_bias.as_deref().map(widen);
    let correction = w.correction_bias.as_deref().map(widen);
    let routing = match &controls.given {
        Some((ids, weights)) => {
            if ids.len() != tokens * k || weights.len() != tokens * k {
                return Err(Error::shape(
                    OP,
                    "given",
                    format!("ids and weights of [T, K] = [{tokens}, {k}]"),
                    format!("{} ids, {} weights", ids.len(), weights.len()),
                ));
            }
            route_ref::given(ids, weights, k, et).0
        }
        None => {
            let logits =
                route_ref::router_logits(x, &router, router_bias.as_deref(), (tokens, et, h));
            route_ref::route_masked(
                &logits,
                et,
                &cfg.router,
                correction.as_deref(),
                controls.removed.as_deref(),
            )?
        }
    };

    let mut y = vec![0.0; tokens * h];
    let mut decoded: HashMap<usize, (Vec<f32>, Vec<f32>)> = HashMap::new();
    for t in 0..tokens {
        let xt = &x[t * h..(t + 1) * h];
        let yt = &mut y[t * h..(t + 1) * h];
        for slot in t * k..(t + 1) * k {
            let (id, weight) = (routing.ids[slot], routing.weights[slot]);
            let Ok(id) = usize::try_from(id) else {
                continue; // an unused top-p slot
            };
            let contrib: Vec<f64> = if id < e {
                let scale_in = if cfg.weight_at == ScaleAt::Input {
                    weight
                } else {
                    1.0
                };
                let bias = w
                    .gate_up_bias
                    .as_deref()
                    .map(|b| &b[id * 2 * i..(id + 1) * 2 * i]);
                let down_bias = w.down_bias.as_deref().map(|b| &b[id * h..(id + 1) * h]);
                let pair = lora.and_then(|(l, ids)| l.pair(ids[t], id, e, h, i));
                let o = match &w.experts {
                    Experts::Plain { gate_up, down } => gated_mlp(
                        xt,
                        &gate_up[id * 2 * i * h..(id + 1) * 2 * i * h],
                        bias,
                        &down[id * h * i..(id + 1) * h * i],
                        down_bias,
                        cfg.gate_layout,
                        cfg.act,
                        scale_in,
                        pair,
                    ),
                    Experts::Packed { gate_up, down } => {
                        // Each chosen expert decoded once, by the formats' reference decoders.
                        let (g, d) = decoded
                            .entry(id)
                            .or_insert_with(|| (gate_up[id].decode(), down[id].decode()));
                        gated_mlp(
                            xt,
                            g,
                            bias,
                            d,
                            down_bias,
                            cfg.gate_layout,
                            cfg.act,
                            scale_in,
                            pair,
                        )
                    }
                };
                let out_w = if cfg.weight_at == ScaleAt::Input {
                    1.0
                } else {
                    weight
                };
                o.into_iter().map(|v| out_w * v).collect()
            } else {
                let z = id - e;
                match cfg.zero_experts[z] {
                    ZeroExpert::Zero => continue,
                    ZeroExpert::Copy => xt.iter().map(|v| weight * v).collect(),
                    ZeroExpert::Constant => {
                        let (cw, cv) = (
                            w.const_w.as_deref().expect("checked"),
                            w.const_v.as_deref().expect("checked"),
                        );
                        let dot = |r: usize| -> f64 {
                            let row = &cw[(2 * z + r) * h..(2 * z + r + 1) * h];
                            row.iter().zip(xt).map(|(a, b)| a.to_f64() * b).sum()
                        };
                        let (d0, d1) = (dot(0), dot(1));
                        let m = d0.max(d1);
                        let (e0, e1) = ((d0 - m).exp(), (d1 - m).exp());
                        let (a1, a2) = (e0 / (e0 + e1), e1 / (e0 + e1));
                        let v = &cv[z * h..(z + 1) * h];
                        xt.iter()
                            .zip(v)
                            .map(|(xv, vv)| weight * (a1 * xv + a2 * vv.to_f64()))
                            .collect()
                    }
                }
            };
            yt.iter_mut().zip(&contrib).for_each(|(a, b)| *a += b);
        }
        if let Some(shared) = cfg.shared {
            let o = gated_mlp::<S, S>(
                xt,
                w.shared_gate_up.as_deref().expect("checked"),
                None,
                w.shared_down.as_deref().expect("checked"),
                None,
                GateLayout::GateFirst,
                cfg.act,
                1.0,
                None,
            );
            let g = if shared.gated {
                let gw = w.shared_gate.as_deref().expect("checked");
                let dot: f64 = gw.iter().zip(xt).map(|(a, b)| a.to_f64() * b).sum();
                1.0 / (1.0 + (-dot).exp())
            } else {
                1.0
            };
            yt.iter_mut().zip(&o).for_each(|(a, b)| *a += g * b);
        }
    }
    Ok(Forward { y, routing })
}
