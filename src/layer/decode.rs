//! The decode path: the block for `T <= MoeLayer::DECODE_TOKENS` in three launches and no
//! memset (kernels/decode.cu): the router logits; `decode_gate_up`, which routes each token in
//! its prologue (the routing kernels' own code, so the same ids and weights bit for bit) and
//! writes every slot's gate/up row, the shared expert's as one more slot; `decode_down`, which
//! sums each token's slots back in its epilogue, with the zero-computation experts, the shared
//! expert's gate and the routing weights. No plan, no gather, no sorted ids.
//!
//! [`DecodeVersion::V3`] routes every token once first (`route_{l}_e{N}`, a fourth launch) and
//! runs the gate/up GEMV by expert (`decode_gate_up_v3`): each chosen expert's rows are read once
//! for all the tokens that chose it (in passes of 8), not once per token. [`DecodeVersion::V4`]
//! runs the down GEMV by expert too (`decode_down_v3`, raw dots per slot), then
//! `decode_combine`: five launches.
//!
//! Routing given by the caller ([`ForwardOptions::routing`]) is checked into the layer's ids and
//! weights by `route_given` in place of the router logits; the gate/up kernels then read it
//! (null logits) instead of routing, and v3 to v5 skip their route launch.
//!
//! LoRA adapters ([`MoeLayer::set_lora`], [`ForwardOptions::adapter_ids`]) add two launches, the
//! gate/up and the down shrink (`lora_shrink` in decode mode, a block per chosen expert), and
//! the route launch where the version has none; the expand products run inside the gate/up
//! and down kernels (`DecodeLora`), so the pre-activations and the slots' down dots are never
//! written twice ([`MoeLayer::decode_takes_lora`] says where).

use super::gpu::{
    DecodeVersion, ExpertWeights, ForwardOptions, Logits, MoeLayer, RouterWeights, Stage,
};
use super::{MoeConfig, ZeroExpert};
use crate::activation::{GateLayout, GatedAct};
use crate::device::{Device, Tensor};
use crate::dtype::Float;
use crate::error::{DriverResultExt, Error, Result};
use crate::gemm::ScaleAt;
use crate::kernels::Module;
use crate::params::{DecodeLora, DecodeParams, DecodeProj, GroupedGemmParams};
use crate::routing;

use cudarc::driver::LaunchConfig;
use cudarc::driver::sys::CUfunction_attribute;

/// Output columns per block of both kernels, one per warp.
const WARPS: usize = 8;

/// Shared memory of a vector of `n` elements staged by the v2 kernels (kernels/common/qdot.cuh:
/// f32 values in rows of 32 padded to 36), a multiple of 16 bytes.
pub(super) fn staged_bytes(n: usize) -> usize {
    n.div_ceil(32) * 144
}

/// The most dynamic shared memory a v2 decode block asks for: two blocks (what the kernels'
/// launch bounds ask for) fit on every sm_80+ SM.
const V2_SMEM_BUDGET: usize = 72 * 1024;

/// The v2 kernels' dynamic shared memory for hidden `h`, row length `ld_h` and `slots` down
/// slots: (gate/up bytes, down bytes, slots staged per down pass), or None where one staged row
/// exceeds the budget (the layer takes v1).
pub(super) fn v2_smem(h: usize, ld_h: usize, slots: usize) -> Option<(usize, usize, usize)> {
    let up = staged_bytes(h);
    let region = staged_bytes(ld_h);
    if up > V2_SMEM_BUDGET || region > V2_SMEM_BUDGET {
        return None;
    }
    let pass = (V2_SMEM_BUDGET / region).clamp(1, slots.max(1));
    Some((up, pass * region, pass))
}

/// The decode path's scratch, sized once for [`MoeLayer::DECODE_TOKENS`] tokens.
pub(super) struct DecodeWs<T> {
    /// `[DECODE_TOKENS * S, ld_h]` gate/up rows, S = K (+ 1 with a shared expert).
    h: Tensor<T>,
    /// `[DECODE_TOKENS]` the shared expert's gate logit per token.
    gate_logit: Tensor<f32>,
    /// `[DECODE_TOKENS * K, 2]` constant experts' mixing weights per slot.
    alpha: Tensor<f32>,
    /// `[DECODE_TOKENS * S, H]` v4's raw down dots per slot.
    partial: Tensor<f32>,
    /// `[1]` decode issues (ternary codewords, ids no routing gives), accumulated.
    status: Tensor<i32>,
    slots: usize,
    ld_h: usize,
}

impl<T: Float> DecodeWs<T> {
    pub(super) fn new(dev: &Device, cfg: &MoeConfig, tokens: usize) -> Result<Self> {
        let slots = cfg.k() + usize::from(cfg.shared.is_some());
        let ld_h = cfg
            .intermediate
            .max(cfg.shared.map_or(0, |s| s.intermediate));
        Ok(DecodeWs {
            h: dev.zeros(&[tokens * slots, ld_h])?,
            gate_logit: dev.zeros(&[tokens])?,
            alpha: dev.zeros(&[tokens * cfg.k(), 2])?,
            partial: dev.zeros(&[tokens * slots, cfg.hidden])?,
            status: dev.zeros(&[1])?,
            slots,
            ld_h,
        })
    }

    pub(super) fn ld_h(&self) -> usize {
        self.ld_h
    }

    pub(super) fn slots(&self) -> usize {
        self.slots
    }

    /// An error if the last forwards found ids or codewords no routing and no packer gives;
    /// resets the count. Waits for the stream.
    pub(super) fn check(&mut self, dev: &Device) -> Result<()> {
        let bad = dev.download(&self.status)?[0];
        dev.fill_bytes(&mut self.status, 0)?;
        if bad != 0 {
            return Err(Error::DeviceCheck {
                op: "MoeLayer::forward (decode)",
                what: format!(
                    "{bad} expert ids or compressed-weight codes out of range, or experts of \
                     another decoder than the by-expert kernel's"
                ),
            });
        }
        Ok(())
    }
}

/// Where a projection's weights are: `[E, N, Kd]` plain (`w`) or packed (`blob`, `table`).
struct Source {
    w: u64,
    blob: u64,
    table: u64,
    shape: [usize; 3],
}

fn routed<T: Float>(op: &'static str, dev: &Device, w: &ExpertWeights<T>) -> Result<Source> {
    Ok(match w {
        ExpertWeights::Plain(t) => plain(op, dev, t)?,
        ExpertWeights::Packed(q) => {
            let (blob, table) = q.device_parts(op, dev)?;
            Source {
                w: 0,
                blob,
                table,
                shape: w.shape(),
            }
        }
    })
}

/// Plain weights `[E, N, Kd]` (the shared expert's, E = 1).
fn plain<T: Float>(op: &'static str, dev: &Device, t: &Tensor<T>) -> Result<Source> {
    t.check_device(op, "weights", dev)?;
    let d = t.shape();
    Ok(Source {
        w: t.device_ptr(dev),
        blob: 0,
        table: 0,
        shape: [d[0], d[1], d[2]],
    })
}

/// One projection as the decode kernels read it, with its bias and epilogue: a gated pair of
/// `layout` through `act`, or plain (`None`).
fn projection<T: Float>(
    dev: &Device,
    src: Source,
    bias: Option<&Tensor<T>>,
    gated: Option<(GateLayout, GatedAct)>,
    scale_input: bool,
) -> DecodeProj {
    let [e, n, kd] = src.shape;
    let (layout, (act, alpha, limit)) = match gated {
        Some((layout, act)) => (layout.code(), act.code()),
        None => (0, (-1, 0.0, 0.0)),
    };
    // MoeConfig::validate bounded every dimension below 2^30.
    let small = |v: usize| i32::try_from(v).expect("bounded by MoeConfig::validate");
    DecodeProj {
        g: GroupedGemmParams {
            out: 0,
            a: 0,
            w: src.w,
            bias: bias.map_or(0, |b| b.device_ptr(dev)),
            block_experts: 0,
            offsets: 0,
            row_slots: 0,
            slot_weights: 0,
            rows: 0,
            n: small(n),
            kdim: small(kd),
            experts: small(e),
            plan_block_m: 0,
            gated: i32::from(gated.is_some()),
            layout,
            act,
            alpha,
            limit,
            scale_input: i32::from(scale_input),
            pad_: 0,
        },
        blob: src.blob,
        experts: src.table,
    }
}

impl<T: Float> MoeLayer<T> {
    /// Whether the decode path runs this layer's LoRA adapters at `t` tokens, the expand
    /// products inside its kernels (`DecodeLora` in kernels/common/params.cuh): true where the
    /// layer has adapters and [`MoeLayer::decode_kernels_for`] picks v2 to v5, except for
    /// layers whose rows exceed v2's shared memory (they run v1's kernels) and for v5 over GPTQ
    /// act-order down experts (its gate/up kernel writes `h` in their stored column order,
    /// which the down shrink does not read). Elsewhere a forward with adapter ids takes the
    /// planned path.
    pub fn decode_takes_lora(&self, t: usize) -> bool {
        let version = self.decode_kernels_for(t);
        let act_order_down =
            matches!(&self.w.down, ExpertWeights::Packed(q) if q.act_order_reordered());
        self.lora.is_some()
            && version != DecodeVersion::V1
            && v2_smem(self.cfg.hidden, self.decode.ld_h, self.decode.slots).is_some()
            && !(version == DecodeVersion::V5 && act_order_down)
    }

    /// The forward of [`super::Path::Decode`] on checked `x [T, H]`, `y [T, H]`,
    /// `1 <= T <= DECODE_TOKENS`.
    pub(super) fn forward_decode(
        &mut self,
        dev: &Device,
        y: &mut Tensor<T>,
        x: &Tensor<T>,
        opts: ForwardOptions<'_>,
        mark: &mut dyn FnMut(Stage) -> Result<()>,
    ) -> Result<()> {
        const OP: &str = "MoeLayer::forward (decode)";
        let t = x.shape()[0];
        let (h, e, et, k) = (
            self.cfg.hidden,
            self.cfg.experts,
            self.cfg.experts_total(),
            self.cfg.k(),
        );
        self.ids.set_shape(&[t, k])?;
        self.weights.set_shape(&[t, k])?;
        let masks = self.mask_fields(dev, &opts, t)?;
        let given = opts.routing.is_some();
        // The caller dispatched here with adapter ids only where decode_takes_lora.
        let adapters = opts.adapter_ids.filter(|_| self.lora.is_some());
        if let Some(given) = opts.routing {
            // Into the layer's ids and weights, which every kernel below reads (null logits
            // tell the gate/up kernel not to route).
            self.take_routing(dev, given)?;
        }
        let cfg = &self.cfg;
        let (s, ld_h) = (self.decode.slots, self.decode.ld_h);
        let w = &self.w;

        // 1. The router logits, as the planned path computes them.
        let (logits_ptr, logits_dtype) = match (&w.router, &mut self.logits) {
            _ if given => (0, T::DTYPE.name()),
            (RouterWeights::Model { w: rw, bias }, Logits::Model(logits)) => {
                logits.set_shape(&[t, et])?;
                routing::router_logits_into(dev, logits, x, rw, bias.as_ref())?;
                (logits.device_ptr(dev), T::DTYPE.name())
            }
            (RouterWeights::F32 { w: rw, bias }, Logits::F32(logits)) => {
                logits.set_shape(&[t, et])?;
                routing::router_logits_into(dev, logits, x, rw, bias.as_ref())?;
                (logits.device_ptr(dev), "f32")
            }
            _ => unreachable!("from_device sizes the logits for the router's dtype"),
        };

        let scale_input = cfg.weight_at == ScaleAt::Input;
        let act = Some((cfg.gate_layout, cfg.act));
        let up = projection(
            dev,
            routed(OP, dev, &w.gate_up)?,
            w.gate_up_bias.as_ref(),
            act,
            scale_input,
        );
        let down = projection(
            dev,
            routed(OP, dev, &w.down)?,
            w.down_bias.as_ref(),
            None,
            false,
        );
        let (shared_up, shared_down) = match (&w.shared_gate_up, &w.shared_down) {
            (Some(su), Some(sd)) => (
                // The shared expert's gate rows come first, whatever the routed layout.
                projection::<T>(
                    dev,
                    plain(OP, dev, su)?,
                    None,
                    Some((GateLayout::GateFirst, cfg.act)),
                    false,
                ),
                projection::<T>(dev, plain(OP, dev, sd)?, None, None, false),
            ),
            // Null weights: no shared expert.
            _ => {
                let none = DecodeProj {
                    g: GroupedGemmParams { w: 0, ..up.g },
                    blob: 0,
                    experts: 0,
                };
                (none, none)
            }
        };
        let constants = cfg.zero_experts.contains(&ZeroExpert::Constant);
        let route = routing::route_params(
            &cfg.router,
            i32::try_from(t).expect("T <= DECODE_TOKENS"),
            et,
        );
        let ptr = |o: Option<&Tensor<T>>| o.map_or(0, |t| t.device_ptr(dev));
        let ws = &mut self.decode;
        let params = DecodeParams {
            route: masks.apply(crate::params::RouteParams {
                ids: self.ids.device_ptr_mut(dev),
                weights: self.weights.device_ptr_mut(dev),
                counts: 0,
                logits: logits_ptr,
                bias: w.correction_bias.as_ref().map_or(0, |b| b.device_ptr(dev)),
                ..route
            }),
            up,
            down,
            shared_up,
            shared_down,
            x: x.device_ptr(dev),
            h: ws.h.device_ptr_mut(dev),
            y: y.device_ptr_mut(dev),
            residual: 0,
            shared_gate: ptr(w.shared_gate.as_ref()),
            shared_gate_logit: ws.gate_logit.device_ptr_mut(dev),
            zc_kinds: self.zc_kinds.as_ref().map_or(0, |z| z.device_ptr(dev)),
            const_w: if constants {
                ptr(w.const_w.as_ref())
            } else {
                0
            },
            const_v: if constants {
                ptr(w.const_v.as_ref())
            } else {
                0
            },
            alpha: ws.alpha.device_ptr_mut(dev),
            status: ws.status.device_ptr_mut(dev),
            partial: ws.partial.device_ptr_mut(dev),
            hidden: i32::try_from(h).expect("bounded by MoeConfig::validate"),
            experts: i32::try_from(e).expect("bounded by MoeConfig::validate"),
            slots: i32::try_from(s).expect("K <= 32"),
            ld_h: i32::try_from(ld_h).expect("bounded by MoeConfig::validate"),
            weight_at_input: i32::from(scale_input),
            down_pass: 1,
            lora: DecodeLora::default(),
        };
        let version = self.decode_kernels_for(t);
        let smem = match version {
            DecodeVersion::V1 => None,
            _ => v2_smem(h, ld_h, s),
        };
        let by_expert = matches!(
            version,
            DecodeVersion::V3 | DecodeVersion::V4 | DecodeVersion::V5
        );
        let down_by_expert = matches!(version, DecodeVersion::V4 | DecodeVersion::V5);
        let mma = version == DecodeVersion::V5;
        let params = DecodeParams {
            down_pass: smem.map_or(1, |(_, _, pass)| {
                i32::try_from(pass).expect("at most K + 1 <= 33")
            }),
            ..params
        };
        let v = if smem.is_some() { "v2_" } else { "" };
        let dtype = T::DTYPE.name();
        if (by_expert || adapters.is_some()) && !given {
            // v3 routes every token once, before the gate/up kernel reads the ids; so does any
            // version with adapters, whose shrink reads them.
            let func = dev.function(
                OP,
                Module::Routing,
                &format!("route_{logits_dtype}_e{}", routing::route_capacity(et)),
            )?;
            let cfg = routing::route_launch(t);
            // SAFETY: `route_{l}_e{N}` takes one RouteParams (params.route, as route_into fills
            // it: the rule validated with the layer's config, N >= E_total); logits [T, E_total]
            // of dtype l, ids and weights [T, K] of this layer (shaped above), the correction
            // bias [E_total] where the rule reads it, counts null, and the masks, their index
            // and the status as mask_fields checked them (or null). Warp w of block b routes
            // token 4b + w < T. All on this device.
            unsafe { dev.launch(OP, &func, cfg, &params.route) }?;
        }
        mark(Stage::Route)?;
        let mut params = params;
        if let (Some(ids), Some(lora)) = (adapters, self.lora.as_mut()) {
            let lora = &mut lora.adapters;
            lora.shrink_decode(
                dev,
                crate::lora::Proj::GateUp(cfg.gate_layout),
                &self.ids,
                ids,
                x,
                0,
            )?;
            // Every decode kernel below reads, for the slots of ids in [0, E) whose token's
            // adapter id is in [0, L): B [L, E, 2I] or [L, E, H] rows of r, s [T * K, 2r] or
            // [T * K, r] (shrink_decode checked T * K against its rows), adapter_ids [T]
            // (checked by forward) and the scales [L]; all uploaded to this device.
            params.lora = lora.decode_params(dev, ids);
            // The ids are written: the gate/up kernel reads them instead of routing.
            params.route.logits = 0;
        }
        // The by-expert instances take one decoder each (the shared expert is plain in all).
        // (v5 runs act-order experts, which have no CUDA-core by-expert instance.)
        let (up_kind, down_kind) = match self.by_expert_decoders() {
            Some(kinds) => kinds,
            None if by_expert && !mma => {
                unreachable!("decode_kernels_for runs v3 and v4 with instances")
            }
            None => ("", ""),
        };
        let (up_mma, down_mma) = if mma {
            self.tensor_core_decoders()
                .expect("decode_kernels_for runs v5 with instances")
        } else {
            ("", "")
        };
        let name = if mma {
            format!("decode_gate_up_v5_{up_mma}_{dtype}")
        } else if by_expert {
            format!("decode_gate_up_v3_{up_kind}_{dtype}")
        } else {
            format!(
                "decode_gate_up_{v}{dtype}_{logits_dtype}_e{}",
                routing::route_capacity(et)
            )
        };
        let func = dev.function(OP, Module::Decode, &name)?;
        let (up_smem, down_smem) = smem.map_or((0, 0), |(u, d, _)| (u, d));
        // v3's staging is static (kGemvTokens rows of kGemvTile columns); v5 takes act-order
        // experts' rows of x whole in dynamic shared memory, beside its static 19 KB.
        let up_smem = match by_expert {
            true if mma => self.act_order_rows_bytes(),
            true => 0,
            false => up_smem,
        };
        let allow = |func: &cudarc::driver::CudaFunction, bytes: usize| -> Result<()> {
            if bytes > 48 * 1024 || (mma && bytes > 0) {
                // A property of the function (allowed inside a capture), set in the current
                // context, which need not be this device's on this thread yet.
                dev.context().bind_to_thread().op(OP)?;
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    i32::try_from(bytes).expect("within the shared-memory budgets"),
                )
                .op(OP)?;
            }
            Ok(())
        };
        allow(&func, up_smem)?;
        let cols =
            |n: usize| u32::try_from(n.div_ceil(WARPS)).expect("bounded by MoeConfig::validate");
        // v3: a row of blocks per distinct expert the tokens can have chosen, and one for the
        // shared expert and the block-wide extras.
        let rows = if by_expert { (t * k).min(e) + 1 } else { t * s };
        // v5: a warp per 8 output columns (gate/up) or 16 (down), 8 warps per block.
        let mma_cols = |n: usize, per_warp: usize| {
            u32::try_from(n.div_ceil(WARPS * per_warp)).expect("bounded by MoeConfig::validate")
        };
        let up_cols = if mma { mma_cols(ld_h, 8) } else { cols(ld_h) };
        let up_cfg = LaunchConfig {
            grid_dim: (up_cols, u32::try_from(rows).expect("at most 16 * 33"), 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: u32::try_from(up_smem).expect("within the shared-memory budgets"),
        };
        // SAFETY: `decode_gate_up_{v2_}{t}_{l}_e{N}` takes one DecodeParams (mirrored in
        // src/params.rs) and routes up to N >= E_total experts per token from logits [T,
        // E_total] of dtype l, as route_{l}_e{N} does (the rule validated with the layer's
        // config, the masks as for the route launch), or with null logits reads ids/weights
        // [T, K] that route_given checked above (ids in [-1, E_total)). Block (x, y) handles
        // token y / S < T and slot y % S: it writes ids/weights [T, K] at row y / S (column-0
        // blocks of slot 0, when it routes), reads x [T, H], the slot's expert
        // (an id the routing gave, in [0, E) for a GEMV; the shared expert is expert 0 of its
        // [1, 2Is, H]) through plain [E, 2I, H] weights or a packed layer's validated table and
        // blob, its bias [E, 2I], and writes h[y, j] for j < I (Is) < ld_h in the workspace of
        // DECODE_TOKENS * S rows; alpha [T*K, 2] and gate_logit [T] likewise. Everything was
        // allocated on this device by from_device or checked above. v2 gets the dynamic shared
        // memory v2_smem computed for this H and ld_h (x [H] staged; down: down_pass slots of
        // ld_h), allowed above 48 KB just before. `decode_gate_up_v3_{kind}_{t}` takes the same
        // DecodeParams with ids/weights [T, K] written by the route launch above: block (x, y)
        // reads them, takes the y-th distinct id in [0, E) (y < min(T K, E); rows past the
        // number chosen exit) or, in the last row, the shared expert, and writes h[t * S + s, j]
        // for the slots that chose it, j < I (Is); its last row's column-0 block writes alpha
        // and gate_logit. Its shared memory is static. `decode_gate_up_v5_{kind}_{t}` (chosen
        // only for H, I and Is multiples of 32, so that its 16-byte loads of weight and x rows
        // stay aligned and inside them, and for plain projections or, for "int4", "int4s",
        // "mxfp4" and "fp8", a packed layer whose validated experts are all int4 with groups of
        // a multiple of 128 columns, which divide the row, all int4 in groups of 32 or 64 or
        // all MXFP4 (rows of whole 32-column groups; lanes past a row's end load nothing), or
        // all FP8 with rows of a multiple of 64) takes the same entries, warp w of block x
        // writing columns 64x + 8w .. + 8 below I (Is). For int4 experts with act-order, laid
        // out again at upload, it gets act_order_rows_bytes of dynamic shared memory (8 rows
        // of H, allowed just before; tensor_core_decode keeps it within the budget) and reads
        // the expert's permutation of H columns from the blob; where the down experts are,
        // it writes column j of h at the down expert's inverse permutation of j, also below I.
        unsafe { dev.launch(OP, &func, up_cfg, &params) }?;
        mark(Stage::Gemm1)?;
        if let (Some(ids), Some(lora)) = (adapters, self.lora.as_mut()) {
            // The down shrink on the slots' h rows (row t * S + k), the gate/up kernel's output.
            lora.adapters.shrink_decode(
                dev,
                crate::lora::Proj::Down,
                &self.ids,
                ids,
                &self.decode.h,
                s,
            )?;
        }

        if down_by_expert {
            let (name, down_cols) = if mma {
                (
                    format!("decode_down_v5_{down_mma}_{dtype}"),
                    mma_cols(h, 16),
                )
            } else {
                (format!("decode_down_v3_{down_kind}_{dtype}"), cols(h))
            };
            let func = dev.function(OP, Module::Decode, &name)?;
            let cfg = LaunchConfig {
                grid_dim: (down_cols, u32::try_from(rows).expect("at most 16 * 33"), 1),
                block_dim: (32 * WARPS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `decode_down_v3_{kind}_{t}` and `decode_down_v5_{kind}_{t}` take the same
            // DecodeParams (an instance decodes one kind, the one by_expert_decoders found for
            // every routed expert; it counts any other in status and skips it; v5 as for its
            // gate/up kernel, warp w of block x writing columns 128x + 16w .. + 16 below H).
            // Block (x, y) finds its expert as decode_gate_up_v3 does (the ids the route launch
            // wrote), reads the h rows [T * S, ld_h] of the slots that chose it, the down
            // weights [E, H, I] (or the packed layer) of that id in [0, E) or the shared
            // expert's [1, H, Is], and writes partial[t * S + s, c] for c < H: partial is
            // [DECODE_TOKENS * S, H] in the workspace. Its shared memory is static.
            unsafe { dev.launch(OP, &func, cfg, &params) }?;
            let func = dev.function(OP, Module::Decode, &format!("decode_combine_{dtype}"))?;
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(h.div_ceil(256)).expect("bounded by MoeConfig::validate"),
                    u32::try_from(t).expect("T <= DECODE_TOKENS"),
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: `decode_combine_{t}` takes the same DecodeParams. Thread c < H of block
            // (x, t) reads ids/weights [T, K], partial [T * S, H] (row t * S + s), alpha [T * K,
            // 2], gate_logit [T], the down bias [E, H] of ids in [0, E), x [T, H] and the
            // constant experts' vectors for zero-computation ids, and writes y[t, c]: y is
            // [T, H], checked by forward.
            unsafe { dev.launch(OP, &func, cfg, &params) }?;
            return mark(Stage::Gemm2);
        }
        let func = dev.function(OP, Module::Decode, &format!("decode_down_{v}{dtype}"))?;
        allow(&func, down_smem)?;
        // v2 at T >= 4: two output columns per warp (they share each staged x load); at smaller
        // T one, for more blocks in flight. The kernel reads which from the grid's width.
        let down_cols = if smem.is_some() && t >= 4 && h >= 16 {
            u32::try_from(h.div_ceil(2 * WARPS)).expect("bounded by MoeConfig::validate")
        } else {
            cols(h)
        };
        let down_cfg = LaunchConfig {
            grid_dim: (down_cols, u32::try_from(t).expect("T <= DECODE_TOKENS"), 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: u32::try_from(down_smem).expect("below V2_SMEM_BUDGET"),
        };
        // SAFETY: `decode_down_{v2_}{t}` takes the same DecodeParams. Block (x, t) reads ids/weights
        // [T, K] as gate/up wrote them (in [-1, E_total)), the h rows of its token's slots,
        // the down weights [E, H, I] (or the packed layer) of ids in [0, E) and the shared
        // expert's [1, H, Is], and writes y[t, c] for c < H: y is [T, H], checked by forward.
        // v2 owns columns 8x .. 8x + 8 (16x .. 16x + 16 on the narrower grid) and checks c < H.
        unsafe { dev.launch(OP, &func, down_cfg, &params) }?;
        mark(Stage::Gemm2)
    }
}
