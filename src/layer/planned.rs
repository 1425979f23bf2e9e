//! Today's forward, through a routing plan: route, plan, gather, the grouped GEMV (sorted
//! layout) or GEMM (padded layout) for gate/up and down, the shared expert, then the combine.
//! Nine to thirteen launches and three memsets; every T. Routing given by the caller replaces
//! the router's two launches by one that checks it (`route_given`).

use super::gpu::{ExpertWeights, ForwardOptions, Logits, MoeLayer, RouterWeights, Stage};
use crate::activation::{self, GateLayout};
use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::Result;
use crate::gemm::{self, Epilogue, GemmOptions, GemmRows, GemmVersion, ScaleAt};
use crate::lora::{LoraRows, Proj};
use crate::permute::{self, CombineInputs, Layout, Plan};
use crate::routing;

impl<T: Float> MoeLayer<T> {
    /// The forward of [`super::Path::Gemv`] (`gemv`) or [`super::Path::Gemm`] on checked
    /// `x [T, H]`, `y [T, H]`, `T >= 1`.
    pub(super) fn forward_planned(
        &mut self,
        dev: &Device,
        y: &mut Tensor<T>,
        x: &Tensor<T>,
        gemv: bool,
        opts: ForwardOptions<'_>,
        mark: &mut dyn FnMut(Stage) -> Result<()>,
    ) -> Result<()> {
        let (h, et, k) = (self.cfg.hidden, self.cfg.experts_total(), self.cfg.k());
        let t = x.shape()[0];
        let layout = if gemv { Layout::Sorted } else { Layout::Padded };

        // Route: the router, with the layer's masks, or the caller's routing, checked.
        self.ids.set_shape(&[t, k])?;
        self.weights.set_shape(&[t, k])?;
        if let Some(given) = opts.routing {
            self.take_routing(dev, given)?;
        } else {
            let masks = self.masks.as_ref().map(|masks| {
                (
                    routing::ExpertMasks {
                        masks,
                        index: opts.mask_index,
                    },
                    &mut self.route_status,
                )
            });
            let w = &self.w;
            let corr = w.correction_bias.as_ref();
            // The two arms differ only in the logits' dtype.
            macro_rules! route {
                ($rw:expr, $bias:expr, $logits:expr) => {{
                    $logits.set_shape(&[t, et])?;
                    routing::router_logits_into(dev, $logits, x, $rw, $bias.as_ref())?;
                    routing::route_inner(
                        dev,
                        &mut self.ids,
                        &mut self.weights,
                        None,
                        $logits,
                        &self.cfg.router,
                        corr,
                        masks,
                    )?;
                }};
            }
            match (&w.router, &mut self.logits) {
                (RouterWeights::Model { w: rw, bias }, Logits::Model(logits)) => {
                    route!(rw, bias, logits)
                }
                (RouterWeights::F32 { w: rw, bias }, Logits::F32(logits)) => {
                    route!(rw, bias, logits)
                }
                _ => unreachable!("from_device sizes the logits for the router's dtype"),
            }
        }
        mark(Stage::Route)?;
        let cfg = &self.cfg;
        let w = &mut self.w;

        self.plan.build(dev, &self.ids)?;
        mark(Stage::Plan)?;

        // The shared expert's GEMMs: the GEMV, or the layer's GEMM version.
        let version = self.version;
        let gemm =
            |out: &mut Tensor<T>, rows: GemmRows<'_, T>, wt: &Tensor<T>, plan: &Plan, o| match (
                gemv, rows,
            ) {
                (true, GemmRows::Gathered(a) | GemmRows::Indexed(a)) => {
                    gemm::grouped_gemv_into(dev, out, a, wt, plan, o)
                }
                (false, rows) => {
                    gemm::grouped_gemm_version_into(dev, out, rows, wt, plan, o, version)
                }
            };
        let rows = self.plan.rows(layout);
        self.hmid.set_shape(&[rows, cfg.intermediate])?;
        self.out.set_shape(&[rows, h])?;
        // LoRA: the gate/up GEMM writes the rows before the activation, the deltas go in, then
        // the activation; the down delta goes into the down GEMM's rows.
        let mut lora = opts.adapter_ids.and(self.lora.as_mut());
        // v2 reads the plain experts' gate/up rows through the plan; the others gather them.
        let indexed = !gemv
            && self.version == GemmVersion::V2
            && matches!(w.gate_up, ExpertWeights::Plain(_));
        if !indexed {
            self.a.set_shape(&[rows, h])?;
            permute::gather_into(dev, &mut self.a, x, &mut self.plan, layout)?;
        }
        let input_weights =
            (cfg.weight_at == ScaleAt::Input).then_some((&self.weights, ScaleAt::Input));
        let gated = Epilogue::Gated {
            act: cfg.act,
            layout: cfg.gate_layout,
        };
        let up = GemmOptions {
            bias: w.gate_up_bias.as_ref(),
            epilogue: if lora.is_some() {
                Epilogue::None
            } else {
                gated
            },
            row_weights: input_weights,
        };
        let gate_up_out = match &mut lora {
            Some(l) => {
                l.hpre.set_shape(&[rows, 2 * cfg.intermediate])?;
                &mut l.hpre
            }
            None => &mut self.hmid,
        };
        w.gate_up.run(
            dev,
            gemv,
            self.version,
            gate_up_out,
            if indexed {
                GemmRows::Indexed(x)
            } else {
                GemmRows::Gathered(&self.a)
            },
            &self.plan,
            up,
            self.scratch.as_mut(),
        )?;
        let lora_rows = |row_weights| -> Result<LoraRows<'_>> {
            Ok(LoraRows {
                counts: &self.plan.counts,
                offsets: match layout {
                    Layout::Padded => &self.plan.padded_offsets,
                    _ => &self.plan.offsets,
                },
                row_slots: self.plan.maps("MoeLayer::forward", layout)?.0,
                tokens: t,
                k,
                adapter_ids: opts.adapter_ids,
                row_weights,
            })
        };
        if let Some(l) = &mut lora {
            let (input, by_token) = if indexed { (x, true) } else { (&self.a, false) };
            let on = lora_rows(input_weights.map(|(w, _)| w))?;
            let proj = Proj::GateUp(cfg.gate_layout);
            l.adapters
                .apply(dev, proj, &on, input, by_token, &mut l.hpre)?;
            activation::gated_act_into(dev, &mut self.hmid, &l.hpre, cfg.act, cfg.gate_layout)?;
        }
        mark(Stage::Gemm1)?;

        // The routing weight goes into the down GEMM's epilogue unless zero-computation experts
        // need it in the combine, or a LoRA delta still has to be added to the rows.
        let fold_weights =
            cfg.weight_at == ScaleAt::Output && cfg.zero_experts.is_empty() && lora.is_none();
        let down = GemmOptions {
            bias: w.down_bias.as_ref(),
            epilogue: Epilogue::None,
            row_weights: fold_weights.then_some((&self.weights, ScaleAt::Output)),
        };
        w.down.run(
            dev,
            gemv,
            self.version,
            &mut self.out,
            GemmRows::Gathered(&self.hmid),
            &self.plan,
            down,
            self.scratch.as_mut(),
        )?;
        if let Some(l) = &mut lora {
            let on = lora_rows(None)?;
            l.adapters
                .apply(dev, Proj::Down, &on, &self.hmid, false, &mut self.out)?;
        }
        mark(Stage::Gemm2)?;

        if let (Some(s), Some(gate_up), Some(sdown)) =
            (&mut self.shared, &w.shared_gate_up, &w.shared_down)
        {
            s.plan.build_identity(dev, t)?;
            let srows = s.plan.rows(layout);
            s.h.set_shape(&[srows, sdown.shape()[2]])?;
            s.out.set_shape(&[srows, h])?;
            let swiglu = GemmOptions {
                epilogue: Epilogue::Gated {
                    act: cfg.act,
                    layout: GateLayout::GateFirst,
                },
                ..Default::default()
            };
            // With one expert and one slot per token, the sorted rows are the tokens in order:
            // the GEMV reads x itself, and so does v2 through the plan. v1 and v3 need the copy
            // into whole blocks of the padded layout.
            let rows = if gemv || version == GemmVersion::V2 {
                GemmRows::Indexed(x)
            } else {
                s.a.set_shape(&[srows, h])?;
                permute::gather_into(dev, &mut s.a, x, &mut s.plan, layout)?;
                GemmRows::Gathered(&s.a)
            };
            gemm(&mut s.h, rows, gate_up, &s.plan, swiglu)?;
            gemm(
                &mut s.out,
                GemmRows::Gathered(&s.h),
                sdown,
                &s.plan,
                GemmOptions::default(),
            )?;
            s.out.set_shape(&[t, h])?;
            if let Some(g) = &w.shared_gate {
                s.gate_logits.set_shape(&[t, 1])?;
                routing::router_logits_into(dev, &mut s.gate_logits, x, g, None)?;
                s.gate_logits.set_shape(&[t])?;
            }
            mark(Stage::Shared)?;
        }

        let shared = self.shared.as_ref();
        let zc = !cfg.zero_experts.is_empty();
        let inputs = CombineInputs {
            weights: (cfg.weight_at == ScaleAt::Output && !fold_weights).then_some(&self.weights),
            x: zc.then_some(x),
            zc_kinds: self.zc_kinds.as_ref(),
            const_w: w.const_w.as_ref(),
            const_v: w.const_v.as_ref(),
            shared_out: shared.map(|s| &s.out),
            shared_gate: shared
                .filter(|_| w.shared_gate.is_some())
                .map(|s| &s.gate_logits),
            residual: None,
        };
        permute::combine_into(dev, y, &self.out, &mut self.plan, layout, &self.ids, inputs)?;
        mark(Stage::Combine)
    }
}
