//! A mixture of LoRA experts on one dense gated FFN (LLaVA-MoLE): a router over L adapters
//! picks K per token, and the token's output is the routing-weighted sum of the FFN with each
//! chosen adapter's deltas on its gate, up and down products:
//! `y = Σ_k w_k · (W_d + Δd_k) act((W_g + Δg_k) x, (W_u + Δu_k) x)`.
//!
//! The GPU forward routes, sorts the token slots by adapter (a routing plan over L "experts"),
//! runs the base FFN once per slot over the sorted rows as one dense expert (once per token at
//! K = 1, LLaVA-MoLE's setting), adds each segment's adapter deltas with the grouped LoRA
//! kernels and combines. Launches only: it can be captured in a CUDA graph.

use super::{DeviceLora, LoraAdapters, LoraDims, LoraRows, Proj};
use crate::activation::{self, GateLayout, GatedAct};
use crate::device::{Device, Tensor};
use crate::dtype::{Float, to_model};
use crate::error::{Error, Result};
use crate::gemm::{self, Epilogue, GemmOptions};
use crate::permute::{self, CombineInputs, Layout, Plan, reference::padded_capacity};
use crate::rng::Rng;
use crate::routing::reference::{self as route_ref, Routing};
use crate::routing::{self, RouterConfig};

/// What a MoLE FFN computes.
#[derive(Clone, Debug, PartialEq)]
pub struct MoleConfig {
    pub hidden: usize,
    pub intermediate: usize,
    /// The router over the L LoRA experts; its `k` is how many each token takes.
    pub router: RouterConfig,
    pub act: GatedAct,
    /// Where gate and up sit among the 2I rows of `gate_up` (and of the adapters' B).
    pub gate_layout: GateLayout,
}

/// A MoLE FFN's weights on the host, in storage dtype `S`.
#[derive(Clone, Debug)]
pub struct MoleWeights<S> {
    /// `[L, H]`, f32 on the host (rounded to the compute dtype on the device).
    pub router: Vec<f32>,
    /// `[2I, H]`, rows in the gate layout.
    pub gate_up: Vec<S>,
    /// `[H, I]`.
    pub down: Vec<S>,
    /// The L LoRA experts, on one expert (`[L, 1, ..]`).
    pub experts: LoraAdapters<S>,
}

impl MoleConfig {
    fn dims(&self) -> LoraDims {
        LoraDims {
            experts: 1,
            hidden: self.hidden,
            inter: self.intermediate,
        }
    }
}

impl<S: Float> MoleWeights<S> {
    /// Seeded random weights: the base FFN at a 1/sqrt(fan-in) scale, a router whose logits
    /// spread over a few units, and [`LoraAdapters::random`] experts of rank `rank`.
    pub fn random(cfg: &MoleConfig, adapters: usize, rank: usize, seed: u64) -> Self {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let mut rng = Rng::new(seed);
        MoleWeights {
            router: rng
                .normal_vec::<S>(adapters * h, 2.0 / (h as f64).sqrt())
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            gate_up: rng.normal_vec(2 * i * h, 1.0 / (h as f64).sqrt()),
            down: rng.normal_vec(h * i, 1.0 / (i as f64).sqrt()),
            experts: LoraAdapters::random(1, h, i, adapters, rank, seed + 1),
        }
    }

    /// H, I, L and K.
    fn sizes(&self, cfg: &MoleConfig) -> [usize; 4] {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        [h, i, self.experts.adapters, cfg.router.k]
    }

    /// Checks every length, the router against the adapters, and the adapters.
    pub fn check(&self, op: &'static str, cfg: &MoleConfig) -> Result<()> {
        let (h, i, l) = (cfg.hidden, cfg.intermediate, self.experts.adapters);
        if h == 0 || i == 0 {
            return Err(Error::shape(
                op,
                "config",
                "hidden and intermediate >= 1",
                format!("hidden {h}, intermediate {i}"),
            ));
        }
        self.experts.check(op, cfg.dims())?;
        cfg.router.validate(op, l, None)?;
        for (arg, got, want) in [
            ("router", self.router.len(), l * h),
            ("gate_up", self.gate_up.len(), 2 * i * h),
            ("down", self.down.len(), h * i),
        ] {
            if got != want {
                return Err(Error::shape(
                    op,
                    arg,
                    format!("{want} values"),
                    format!("{got} values"),
                ));
            }
        }
        cfg.act.check(op)
    }
}

/// The CPU forward on `x [T, H]` (f64): the router (or the `given` ids and weights `[T, K]`),
/// then each chosen adapter's FFN, weighted. Returns `y [T, H]` and the routing.
pub fn mole_reference<S: Float>(
    cfg: &MoleConfig,
    w: &MoleWeights<S>,
    x: &[f64],
    given: Option<(&[i32], &[f32])>,
) -> Result<(Vec<f64>, Routing)> {
    const OP: &str = "MoLE reference";
    w.check(OP, cfg)?;
    let [h, i, l, k] = w.sizes(cfg);
    if !x.len().is_multiple_of(h) {
        return Err(Error::shape(
            OP,
            "x",
            format!("[T, {h}]"),
            format!("{} values", x.len()),
        ));
    }
    let t = x.len() / h;
    let routing = match given {
        Some((ids, weights)) => route_ref::given(ids, weights, k, l).0,
        None => {
            let router: Vec<f64> = w.router.iter().map(|&v| f64::from(v)).collect();
            let logits = route_ref::router_logits(x, &router, None, (t, l, h));
            route_ref::route_masked(&logits, l, &cfg.router, None, None)?
        }
    };
    let mut y = vec![0.0; t * h];
    for tok in 0..t {
        let xt = &x[tok * h..(tok + 1) * h];
        for slot in tok * k..(tok + 1) * k {
            let id = routing.ids[slot];
            let Some(pair) = w.experts.pair(id, 0, 1, h, i) else {
                continue;
            };
            let o = crate::layer::reference::gated_mlp::<S, S>(
                xt,
                &w.gate_up,
                None,
                &w.down,
                None,
                cfg.gate_layout,
                cfg.act,
                1.0,
                Some(pair),
            );
            let wt = routing.weights[slot];
            for (a, b) in y[tok * h..(tok + 1) * h].iter_mut().zip(o) {
                *a += wt * b;
            }
        }
    }
    Ok((y, routing))
}

/// A MoLE FFN on the device, in compute dtype `T`, with a workspace for up to `max_tokens`.
pub struct MoleFfn<T> {
    cfg: MoleConfig,
    max_tokens: usize,
    router: Tensor<T>,
    gate_up: Tensor<T>,
    down: Tensor<T>,
    lora: DeviceLora<T>,
    logits: Tensor<T>,
    ids: Tensor<i32>,
    weights: Tensor<f32>,
    /// Token slots sorted by adapter.
    plan: Plan,
    /// One expert over the sorted rows: the base FFN's GEMMs.
    dense: Plan,
    a: Tensor<T>,
    hpre: Tensor<T>,
    hmid: Tensor<T>,
    out: Tensor<T>,
}

impl<T: Float> MoleFfn<T> {
    /// Up to this many tokens the base FFN runs as a GEMV, above as the GEMM.
    pub const GEMV_TOKENS: usize = 16;

    /// Uploads `w` (rounded to `T`) and sizes the workspace for `max_tokens`.
    pub fn new<S: Float>(
        dev: &Device,
        cfg: &MoleConfig,
        w: &MoleWeights<S>,
        max_tokens: usize,
    ) -> Result<Self> {
        const OP: &str = "MoleFfn::new";
        w.check(OP, cfg)?;
        let [h, i, l, k] = w.sizes(cfg);
        if max_tokens == 0 || !h.is_multiple_of(8) || !i.is_multiple_of(8) {
            return Err(Error::shape(
                OP,
                "config",
                "max_tokens >= 1, hidden and intermediate multiples of 8",
                format!("max_tokens {max_tokens}, hidden {h}, intermediate {i}"),
            ));
        }
        let slots = max_tokens * k;
        let block_m = gemm::BLOCK_M;
        let rows = padded_capacity(slots, 1, block_m).max(slots);
        let up = |v: &[S], shape: &[usize]| dev.upload(&to_model::<S, T>(v), shape);
        dev.preload(
            OP,
            &[
                crate::kernels::Module::Routing,
                crate::kernels::Module::Permute,
                crate::kernels::Module::GroupedGemm,
                crate::kernels::Module::Activation,
                crate::kernels::Module::Lora,
            ],
        )?;
        Ok(MoleFfn {
            cfg: cfg.clone(),
            max_tokens,
            router: dev.upload(&to_model::<f32, T>(&w.router), &[l, h])?,
            gate_up: up(&w.gate_up, &[1, 2 * i, h])?,
            down: up(&w.down, &[1, h, i])?,
            lora: DeviceLora::new(dev, OP, &w.experts, cfg.dims(), rows)?,
            logits: dev.zeros(&[max_tokens, l])?,
            ids: dev.zeros(&[max_tokens, k])?,
            weights: dev.zeros(&[max_tokens, k])?,
            plan: Plan::new(dev, max_tokens, k, l, l, block_m)?,
            dense: Plan::new(dev, slots, 1, 1, 1, block_m)?,
            a: dev.zeros(&[rows, h])?,
            hpre: dev.zeros(&[rows, 2 * i])?,
            hmid: dev.zeros(&[rows, i])?,
            out: dev.zeros(&[rows, h])?,
        })
    }

    /// `y [T, H] = MoLE(x [T, H])`, `1 <= T <= max_tokens` (T = 0 does nothing).
    pub fn forward_into(&mut self, dev: &Device, y: &mut Tensor<T>, x: &Tensor<T>) -> Result<()> {
        const OP: &str = "MoleFfn::forward";
        let (h, i, k) = (self.cfg.hidden, self.cfg.intermediate, self.cfg.router.k);
        let (t, xh) = x.dims2(OP, "x", "[T, H]")?;
        if xh != h || t > self.max_tokens || y.shape() != [t, h] {
            return Err(Error::shape(
                OP,
                "x",
                format!("x and y [T, {h}] with T <= {}", self.max_tokens),
                format!("x {:?}, y {:?}", x.shape(), y.shape()),
            ));
        }
        x.check_device(OP, "x", dev)?;
        y.check_device(OP, "y", dev)?;
        if t == 0 {
            return Ok(());
        }
        let l = self.lora.adapters;
        self.logits.set_shape(&[t, l])?;
        routing::router_logits_into(dev, &mut self.logits, x, &self.router, None)?;
        self.ids.set_shape(&[t, k])?;
        self.weights.set_shape(&[t, k])?;
        routing::route_into(
            dev,
            &mut self.ids,
            &mut self.weights,
            None,
            &self.logits,
            &self.cfg.router,
            None,
        )?;
        self.plan.build(dev, &self.ids)?;

        // The sorted rows, then the base FFN over them as one expert.
        let rows = t * k;
        self.a.set_shape(&[rows, h])?;
        permute::gather_into(dev, &mut self.a, x, &mut self.plan, Layout::Sorted)?;
        self.dense.build_identity(dev, rows)?;
        let gemv = t <= Self::GEMV_TOKENS;
        let layout = if gemv { Layout::Sorted } else { Layout::Padded };
        let dense_rows = self.dense.rows(layout);
        let gemm = |dev: &Device, out: &mut Tensor<T>, a: &Tensor<T>, w: &Tensor<T>, p: &Plan| {
            let o = GemmOptions {
                epilogue: Epilogue::None,
                ..Default::default()
            };
            if gemv {
                gemm::grouped_gemv_into(dev, out, a, w, p, o)
            } else {
                gemm::grouped_gemm_into(dev, out, a, w, p, o)
            }
        };
        self.a.set_shape(&[dense_rows, h])?;
        self.hpre.set_shape(&[dense_rows, 2 * i])?;
        gemm(dev, &mut self.hpre, &self.a, &self.gate_up, &self.dense)?;
        self.a.set_shape(&[rows, h])?;
        self.hpre.set_shape(&[rows, 2 * i])?;
        let on = LoraRows {
            counts: &self.plan.counts,
            offsets: &self.plan.offsets,
            row_slots: &self.plan.sorted_slots,
            tokens: t,
            k,
            adapter_ids: None,
            row_weights: None,
        };
        let proj = Proj::GateUp(self.cfg.gate_layout);
        self.lora
            .apply(dev, proj, &on, &self.a, false, &mut self.hpre)?;
        self.hmid.set_shape(&[rows, i])?;
        let (act, gl) = (self.cfg.act, self.cfg.gate_layout);
        activation::gated_act_into(dev, &mut self.hmid, &self.hpre, act, gl)?;
        self.hmid.set_shape(&[dense_rows, i])?;
        self.out.set_shape(&[dense_rows, h])?;
        gemm(dev, &mut self.out, &self.hmid, &self.down, &self.dense)?;
        self.hmid.set_shape(&[rows, i])?;
        self.out.set_shape(&[rows, h])?;
        self.lora
            .apply(dev, Proj::Down, &on, &self.hmid, false, &mut self.out)?;
        let inputs = CombineInputs {
            weights: Some(&self.weights),
            ..Default::default()
        };
        permute::combine_into(
            dev,
            y,
            &self.out,
            &mut self.plan,
            Layout::Sorted,
            &self.ids,
            inputs,
        )
    }

    /// The routing of the last forward: adapter ids and weights `[T, K]`.
    pub fn routing(&self) -> (&Tensor<i32>, &Tensor<f32>) {
        (&self.ids, &self.weights)
    }

    /// Reads and resets what the last forwards found on the device (ids out of range in the
    /// plans). Waits for the stream.
    pub fn check(&mut self, dev: &Device) -> Result<()> {
        [self.plan.check(dev), self.dense.check(dev)]
            .into_iter()
            .collect()
    }
}
