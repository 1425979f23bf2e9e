//! LoRA adapters on experts: grouped low-rank products gathered by (expert, adapter) on the rows
//! of a routing plan.
//!
//! - Adapters on the routed experts of a [`crate::MoeLayer`] ([`crate::MoeLayer::set_lora`]):
//!   per adapter and expert, A and B for gate, up and down, with an adapter id per token
//!   (vLLM's fused MoE-LoRA, per-request adapters).
//! - A mixture of LoRA experts on one dense FFN (LLaVA-MoLE, [`MoleFfn`]): the router picks
//!   adapters and the base FFN runs for every token.
//!
//! A LoRA projection adds `scale · B (A v)` to `W v`. The gate and up deltas go in before the
//! activation, so the forward runs the gate/up GEMM without its fused activation, adds the
//! deltas to the pre-activation rows and runs the gated activation after; the down delta is
//! added to the down GEMM's rows before the combine weighs them.
//!
//! Kernels (kernels/lora.cu): `lora_shrink` (`s = A v`, f32) and `lora_expand`
//! (`out += scale · B s`). A block takes one chunk of up to 64 of an expert's rows and reads
//! each (expert, adapter)'s B tile once and its A rows once per 16 rows of the chunk that use
//! them; at decode sizes (T <= 16) the chunk is the whole expert, so each chosen pair's A and B
//! bytes are read once per forward.

mod mole;
pub mod reference;

pub use mole::{MoleConfig, MoleFfn, MoleWeights, mole_reference};

use cudarc::driver::LaunchConfig;

use crate::activation::GateLayout;
use crate::device::{Device, Tensor};
use crate::dtype::{Float, to_model};
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::LoraParams;
use crate::rng::Rng;

/// The largest rank the kernels take.
pub const MAX_RANK: usize = 256;
/// Rows of one expert a block takes at once (`kLoraRows`).
const CHUNK_ROWS: usize = 64;
/// Rank rows or columns per block (`kLoraTile`).
const TILE: usize = 32;

/// LoRA adapters for `experts` experts of one block, on the host in storage dtype `S`.
#[derive(Clone, Debug)]
pub struct LoraAdapters<S> {
    /// L, the adapters; a token's adapter id is in `[-1, L)`, -1 for none.
    pub adapters: usize,
    /// r, every adapter's rank (pad smaller ones with zero rows and columns), 1..=[`MAX_RANK`].
    pub rank: usize,
    /// `[L, E, 2r, H]`: the gate's A (r rows), then the up's.
    pub gate_up_a: Vec<S>,
    /// `[L, E, 2I, r]`: the gate's and the up's B, their rows in the block's gate layout, as
    /// the rows of `gate_up`.
    pub gate_up_b: Vec<S>,
    /// `[L, E, r, I]`.
    pub down_a: Vec<S>,
    /// `[L, E, H, r]`.
    pub down_b: Vec<S>,
    /// `[L]`: each adapter's scale (`lora_alpha / r` in PEFT).
    pub scales: Vec<f32>,
}

/// The sizes adapters must have: experts, hidden size H and intermediate size I.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LoraDims {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

impl<S: Float> LoraAdapters<S> {
    /// Seeded random adapters (A of std 1/sqrt(in), B of std 0.5/sqrt(r), scales in [0.5, 2]),
    /// large enough that a wrong delta shows in the block's output.
    pub fn random(
        experts: usize,
        hidden: usize,
        inter: usize,
        adapters: usize,
        rank: usize,
        seed: u64,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let n = adapters * experts * rank;
        let gate_up_a = rng.normal_vec(n * 2 * hidden, 1.0 / (hidden as f64).sqrt());
        let gate_up_b = rng.normal_vec(n * 2 * inter, 0.5 / (rank as f64).sqrt());
        let down_a = rng.normal_vec(n * inter, 1.0 / (inter as f64).sqrt());
        let down_b = rng.normal_vec(n * hidden, 0.5 / (rank as f64).sqrt());
        let scales = (0..adapters)
            .map(|_| rng.uniform(0.5, 2.0) as f32)
            .collect();
        LoraAdapters {
            adapters,
            rank,
            gate_up_a,
            gate_up_b,
            down_a,
            down_b,
            scales,
        }
    }

    /// Checks the rank, the adapter count, every length against `dims`, and the scales.
    pub(crate) fn check(&self, op: &'static str, dims: LoraDims) -> Result<()> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(Error::shape(
                op,
                "rank",
                format!("1..={MAX_RANK}"),
                format!("{}", self.rank),
            ));
        }
        if self.adapters == 0 || i32::try_from(self.adapters).is_err() {
            return Err(Error::shape(
                op,
                "adapters",
                "at least 1, below 2^31",
                format!("{}", self.adapters),
            ));
        }
        let (l, e, r, h, i) = (
            self.adapters,
            dims.experts,
            self.rank,
            dims.hidden,
            dims.inter,
        );
        for (arg, got, shape) in [
            ("gate_up_a", self.gate_up_a.len(), [l, e, 2 * r, h]),
            ("gate_up_b", self.gate_up_b.len(), [l, e, 2 * i, r]),
            ("down_a", self.down_a.len(), [l, e, r, i]),
            ("down_b", self.down_b.len(), [l, e, h, r]),
        ] {
            let want = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if want != Some(got) {
                return Err(Error::shape(
                    op,
                    arg,
                    format!("{shape:?} = {want:?} values (L, E, rows, cols)"),
                    format!("{got} values"),
                ));
            }
        }
        if self.scales.len() != l {
            return Err(Error::shape(
                op,
                "scales",
                format!("[L] = [{l}]"),
                format!("{} values", self.scales.len()),
            ));
        }
        if let Some(p) = self.scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::shape(
                op,
                "scales",
                "finite values",
                format!("{} at {p}", self.scales[p]),
            ));
        }
        Ok(())
    }
}

/// Adapters on the device with the workspace of the two products.
pub(crate) struct DeviceLora<T> {
    pub adapters: usize,
    pub rank: usize,
    experts: usize,
    gate_up_a: Tensor<T>,
    gate_up_b: Tensor<T>,
    down_a: Tensor<T>,
    down_b: Tensor<T>,
    scales: Tensor<f32>,
    /// `[rows, 2r]` the shrink's output.
    s: Tensor<f32>,
    /// `[1]` tokens whose adapter id was outside [-1, L).
    status: Tensor<i32>,
}

/// The projection a LoRA pair applies to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Proj {
    /// `in [.., H]`, `out [.., 2I]` with the gate and up columns in this layout.
    GateUp(GateLayout),
    /// `in [.., I]`, `out [.., H]`.
    Down,
}

/// The rows the products run on: a plan's segments in one layout.
pub(crate) struct LoraRows<'a> {
    /// `[G]` rows per segment, each at most T.
    pub counts: &'a Tensor<i32>,
    /// `[G + 1]` first row of each segment in the layout.
    pub offsets: &'a Tensor<i32>,
    /// `[R]` slot of each row, -1 for padding.
    pub row_slots: &'a Tensor<i32>,
    pub tokens: usize,
    pub k: usize,
    /// `[T]` each token's adapter, or `None` where segment g is adapter g (MoLE).
    pub adapter_ids: Option<&'a Tensor<i32>>,
    /// `[T, K]` weights that scale the gate/up deltas (the routing weight at the expert input).
    pub row_weights: Option<&'a Tensor<f32>>,
}

impl<T: Float> DeviceLora<T> {
    /// Uploads checked adapters and sizes the workspace for `rows` plan rows.
    pub(crate) fn new<S: Float>(
        dev: &Device,
        op: &'static str,
        lora: &LoraAdapters<S>,
        dims: LoraDims,
        rows: usize,
    ) -> Result<Self> {
        lora.check(op, dims)?;
        let (l, e, r, h, i) = (
            lora.adapters,
            dims.experts,
            lora.rank,
            dims.hidden,
            dims.inter,
        );
        let up = |v: &[S], shape: &[usize]| dev.upload(&to_model::<S, T>(v), shape);
        Ok(DeviceLora {
            adapters: l,
            rank: r,
            experts: e,
            gate_up_a: up(&lora.gate_up_a, &[l, e, 2 * r, h])?,
            gate_up_b: up(&lora.gate_up_b, &[l, e, 2 * i, r])?,
            down_a: up(&lora.down_a, &[l, e, r, i])?,
            down_b: up(&lora.down_b, &[l, e, h, r])?,
            scales: dev.upload(&lora.scales, &[l])?,
            s: dev.zeros(&[rows.max(1), 2 * r])?,
            status: dev.zeros(&[1])?,
        })
    }

    /// Sizes the workspace for `rows` plan rows.
    pub(crate) fn set_rows(&mut self, dev: &Device, rows: usize) -> Result<()> {
        self.s = dev.zeros(&[rows.max(1), 2 * self.rank])?;
        Ok(())
    }

    /// Bytes of one (expert, adapter)'s A and B over the three projections.
    pub(crate) fn pair_bytes(&self) -> usize {
        let per = |t: &Tensor<T>| t.numel() / (self.adapters * self.experts);
        (per(&self.gate_up_a) + per(&self.gate_up_b) + per(&self.down_a) + per(&self.down_b))
            * std::mem::size_of::<T>()
    }

    /// A and B of `proj`, the width of its s rows (2r for gate/up: the gate's r, then the
    /// up's) and the expand's split (the gate layout of out's columns + 1, or kLoraOne).
    fn operands(&self, proj: Proj) -> (&Tensor<T>, &Tensor<T>, usize, i32) {
        match proj {
            Proj::GateUp(layout) => (
                &self.gate_up_a,
                &self.gate_up_b,
                2 * self.rank,
                layout.code() + 1,
            ),
            Proj::Down => (&self.down_a, &self.down_b, self.rank, 0),
        }
    }

    /// The shrink's row length and the expand's for `proj`.
    fn dims(&self, proj: Proj) -> (usize, usize) {
        let (a, b, _, _) = self.operands(proj);
        (a.shape()[3], b.shape()[2])
    }

    /// The fields of a launch on `proj` that do not depend on its rows, for input rows at
    /// `inp`, `ld_in` elements apart: A, B, s, the scales, the status, the sizes, and whether
    /// 16-byte loads hold; the rows' fields zero, for the caller to fill.
    fn params(&mut self, dev: &Device, proj: Proj, inp: u64, ld_in: usize) -> LoraParams {
        let i32_of = |v: usize| i32::try_from(v).expect("sizes checked at upload");
        let (a, b, r_total, split) = self.operands(proj);
        let (d_in, d_out) = (a.shape()[3], b.shape()[2]);
        let (a, b) = (a.device_ptr(dev), b.device_ptr(dev));
        let vec = d_in.is_multiple_of(8)
            && ld_in.is_multiple_of(8)
            && inp.is_multiple_of(16)
            && a.is_multiple_of(16);
        LoraParams {
            inp,
            out: 0,
            s: self.s.device_ptr_mut(dev),
            a,
            b,
            scales: self.scales.device_ptr(dev),
            adapter_ids: 0,
            counts: 0,
            seg_offsets: 0,
            row_slots: 0,
            row_weights: 0,
            status: self.status.device_ptr_mut(dev),
            ids: 0,
            tokens: 0,
            k: 0,
            segments: 0,
            a_experts: i32_of(self.experts),
            adapters: i32_of(self.adapters),
            rank: i32_of(self.rank),
            r_total: i32_of(r_total),
            d_in: i32_of(d_in),
            d_out: i32_of(d_out),
            split,
            rows_per_block: 0,
            by_token: 0,
            vec: i32::from(vec),
            count_status: 0,
            in_slots: 0,
            ld_in: i32_of(ld_in),
        }
    }

    /// `out += scale · B (A in)` on `rows`, for the projection `proj`. `in` is `[R, d_in]`, or
    /// `[T, d_in]` read through each row's slot when `by_token`; `out` is `[R, d_out]`.
    /// The gate/up call counts the tokens whose adapter id is out of range.
    pub(crate) fn apply(
        &mut self,
        dev: &Device,
        proj: Proj,
        rows: &LoraRows<'_>,
        input: &Tensor<T>,
        by_token: bool,
        out: &mut Tensor<T>,
    ) -> Result<()> {
        const OP: &str = "lora";
        let (d_in, d_out) = self.dims(proj);
        let (in_rows, in_cols) = input.rows_cols(OP, "in")?;
        let (out_rows, out_cols) = out.rows_cols(OP, "out")?;
        let want_in = if by_token { rows.tokens } else { out_rows };
        if in_cols != d_in || in_rows < want_in || out_cols != d_out {
            return Err(Error::shape(
                OP,
                "in",
                format!("[{want_in}, {d_in}] rows into [R, {d_out}]"),
                format!("{:?} into {:?}", input.shape(), out.shape()),
            ));
        }
        let segments = rows.counts.numel();
        if out_rows > self.s.shape()[0] || rows.row_slots.capacity() < out_rows {
            return Err(Error::shape(
                OP,
                "out",
                format!("at most {} rows with a slot each", self.s.shape()[0]),
                format!("{out_rows} rows, {} slots", rows.row_slots.capacity()),
            ));
        }
        if rows.offsets.numel() <= segments
            || rows.adapter_ids.is_some_and(|a| a.numel() < rows.tokens)
            || rows
                .row_weights
                .is_some_and(|w| w.numel() < rows.tokens * rows.k)
        {
            return Err(Error::shape(
                OP,
                "rows",
                format!(
                    "{} offsets, [T] = [{}] adapter ids, [T, K] row weights",
                    segments + 1,
                    rows.tokens
                ),
                format!(
                    "{} offsets, {:?} adapter ids, {:?} row weights",
                    rows.offsets.numel(),
                    rows.adapter_ids.map(Tensor::shape),
                    rows.row_weights.map(Tensor::shape)
                ),
            ));
        }
        let chunk = rows.tokens.clamp(1, CHUNK_ROWS);
        // One block per chunk a segment can have: sum_g ceil(count_g / chunk) <= T*K / chunk + G.
        let chunks = (rows.tokens * rows.k) / chunk + segments;
        if chunks > 65_535 {
            return Err(Error::shape(
                OP,
                "rows",
                "at most 65535 chunks of rows (T*K / 64 + experts)",
                format!("{chunks}"),
            ));
        }
        let i32_of = |v: usize| i32::try_from(v).expect("sizes checked at upload");
        let base = self.params(dev, proj, input.device_ptr(dev), d_in);
        let r_total = self.operands(proj).2;
        let mut p = LoraParams {
            out: out.device_ptr_mut(dev),
            adapter_ids: rows.adapter_ids.map_or(0, |t| t.device_ptr(dev)),
            counts: rows.counts.device_ptr(dev),
            seg_offsets: rows.offsets.device_ptr(dev),
            row_slots: rows.row_slots.device_ptr(dev),
            row_weights: rows.row_weights.map_or(0, |t| t.device_ptr(dev)),
            tokens: i32_of(rows.tokens),
            k: i32_of(rows.k),
            segments: i32_of(segments),
            rows_per_block: i32_of(chunk),
            by_token: i32::from(by_token),
            count_status: i32::from(matches!(proj, Proj::GateUp(_))),
            in_slots: i32_of(rows.k),
            ..base
        };
        let grid = |tiles: usize| LaunchConfig {
            grid_dim: (tiles as u32, chunks as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let shrink = dev.function(OP, Module::Lora, &format!("lora_shrink_{}", T::DTYPE))?;
        // SAFETY: `lora_shrink_{dtype}` takes one LoraParams (mirrored in src/params.rs).
        // The callers pass this forward's plan (built from [T, K] ids with no id twice in a
        // row): G segments whose rows lie below R, out's rows, each at most T of them, so the
        // grid's chunks cover every row. R is checked against s and row_slots, the offsets,
        // adapter ids and row weights against G, T and T*K; `in` has the rows the slots or rows
        // name (checked), A is [L, E, r_total, d_in] and s [>= R, 2r]. Adapter ids outside
        // [0, L) and slots outside [0, T*K) are skipped in the kernel.
        unsafe { dev.launch(OP, &shrink, grid(r_total.div_ceil(TILE)), &p) }?;
        p.count_status = 0;
        let expand = dev.function(OP, Module::Lora, &format!("lora_expand_{}", T::DTYPE))?;
        // SAFETY: as above; B is [L, E, d_out, r] and out [R, d_out]; row weights, where given,
        // are [T, K] and indexed by slots below T*K.
        unsafe { dev.launch(OP, &expand, grid(d_out.div_ceil(TILE)), &p) }?;
        Ok(())
    }

    /// The shrink of the decode path, which has no plan (`lora_shrink` in decode mode): for each
    /// slot (t, k) of `ids [T, K]` whose expert is in [0, E) and whose token has an adapter,
    /// `s[t * K + k] = A[a_t, e] . in`, where `in` is `x[t]` for gate/up (`input [T, H]`) and
    /// `h[t * in_slots + k]` for down (`input [>= T * in_slots, >= I]`). A block per distinct
    /// chosen expert, so each (expert, adapter)'s A is read once. The decode kernels then add
    /// the expand products ([`DeviceLora::decode_params`]); the gate/up launch counts adapter
    /// ids outside [-1, L) for [`DeviceLora::check`].
    pub(crate) fn shrink_decode(
        &mut self,
        dev: &Device,
        proj: Proj,
        ids: &Tensor<i32>,
        adapter_ids: &Tensor<i32>,
        input: &Tensor<T>,
        in_slots: usize,
    ) -> Result<()> {
        const OP: &str = "lora (decode)";
        let by_token = matches!(proj, Proj::GateUp(_));
        let (d_in, _) = self.dims(proj);
        let (tokens, k) = ids.rows_cols(OP, "ids")?;
        let (in_rows, ld_in) = input.rows_cols(OP, "in")?;
        let want_rows = if by_token { tokens } else { tokens * in_slots };
        if in_rows < want_rows
            || ld_in < d_in
            || (by_token && ld_in != d_in)
            || (!by_token && in_slots < k)
        {
            return Err(Error::shape(
                OP,
                "in",
                format!(
                    "at least [{want_rows}, {d_in}] rows, K = {k} <= {in_slots} slots per token"
                ),
                format!("{:?}", input.shape()),
            ));
        }
        if self.experts > 1024 {
            return Err(Error::shape(
                OP,
                "experts",
                "at most 1024 (the decode path's routing bound)",
                format!("{}", self.experts),
            ));
        }
        if tokens * k > self.s.shape()[0] || adapter_ids.numel() < tokens {
            return Err(Error::shape(
                OP,
                "ids",
                format!(
                    "at most {} slots, [T] = [{tokens}] adapter ids",
                    self.s.shape()[0]
                ),
                format!(
                    "{tokens} x {k} slots, {:?} adapter ids",
                    adapter_ids.shape()
                ),
            ));
        }
        let i32_of = |v: usize| i32::try_from(v).expect("sizes checked at upload");
        let base = self.params(dev, proj, input.device_ptr(dev), ld_in);
        let r_total = self.operands(proj).2;
        let p = LoraParams {
            adapter_ids: adapter_ids.device_ptr(dev),
            ids: ids.device_ptr(dev),
            tokens: i32_of(tokens),
            k: i32_of(k),
            segments: i32_of(self.experts),
            rows_per_block: i32_of(tokens.clamp(1, CHUNK_ROWS)),
            by_token: i32::from(by_token),
            count_status: i32::from(by_token),
            in_slots: i32_of(in_slots),
            ..base
        };
        let cfg = LaunchConfig {
            // A rank row per warp in decode mode: 8 per block.
            grid_dim: (
                r_total.div_ceil(8) as u32,
                (tokens * k).min(self.experts).max(1) as u32,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let shrink = dev.function(OP, Module::Lora, &format!("lora_shrink_{}", T::DTYPE))?;
        // SAFETY: `lora_shrink_{t}` takes one LoraParams (mirrored in src/params.rs). In decode
        // mode (ids non-null) block (x, y) takes the y-th distinct id in [0, E) of ids [T, K]
        // (E = segments = a_experts <= 1024, the decode path's bound), reads adapter_ids [T]
        // (checked above) and skips ids outside [0, L), A [L, E, r_total, d_in] of this
        // adapter set, the input rows checked above (x [T, d_in], or h rows t * in_slots + k
        // of ld_in >= d_in elements), and writes s rows t * K + k < T * K <= s's rows, columns
        // 8x .. 8x + 8 below r_total = s's width (2r) or r. Block (0, 0) counts bad adapter
        // ids into status [1]. All on this device.
        unsafe { dev.launch(OP, &shrink, cfg, &p) }
    }

    /// The decode kernels' LoRA fields for `adapter_ids [T]`, after
    /// [`DeviceLora::shrink_decode`]: B of gate/up and down, the shrink's s and the scales.
    /// The two shrinks share s (2r wide, then r): each is read by the decode kernel that
    /// follows it on the stream, before the next shrink writes it.
    pub(crate) fn decode_params(
        &mut self,
        dev: &Device,
        adapter_ids: &Tensor<i32>,
    ) -> crate::params::DecodeLora {
        crate::params::DecodeLora {
            gate_up_b: self.gate_up_b.device_ptr(dev),
            down_b: self.down_b.device_ptr(dev),
            s: self.s.device_ptr_mut(dev),
            adapter_ids: adapter_ids.device_ptr(dev),
            scales: self.scales.device_ptr(dev),
            rank: i32::try_from(self.rank).expect("at most MAX_RANK"),
            adapters: i32::try_from(self.adapters).expect("checked at upload"),
        }
    }

    /// Reads and resets the count of adapter ids out of range: an `Err` naming `adapter_ids`.
    pub(crate) fn check(&mut self, dev: &Device, op: &'static str) -> Result<()> {
        let bad = dev.download(&self.status)?[0];
        if bad == 0 {
            return Ok(());
        }
        dev.fill_bytes(&mut self.status, 0)?;
        Err(Error::DeviceCheck {
            op,
            what: format!(
                "adapter_ids: {bad} tokens with an id outside [-1, {}) (they ran without an adapter)",
                self.adapters
            ),
        })
    }
}
