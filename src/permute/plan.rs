//! The routing plan on the device.

use cudarc::driver::LaunchConfig;

use super::{Layout, MAX_PLAN_EXPERTS, reference};
use crate::device::{Device, Tensor};
use crate::error::{Error, Result};
use crate::kernels::Module;
use crate::params::{MaskedParams, PlanIdentityParams, PlanParams};

/// Slots per block of plan_count and plan_scatter, as `kPlanChunk` in permute.cu.
const PLAN_CHUNK: usize = 256;
const SCAN_THREADS: u32 = 1024;

/// The masked layout `[E, M, H]`: expert e's j-th slot at row `e*M + j` for
/// `j < masked_counts[e] = min(counts[e], M)`. Slots past M are left out and counted in the plan's
/// status (an error from [`Plan::check`]).
pub struct Masked {
    /// M, the rows each expert has.
    pub max_rows: usize,
    /// `[E*M]` slot per row; -1 past the expert's count.
    pub masked_slots: Tensor<i32>,
    /// `[S_max]` masked row of each slot; -1 outside.
    pub slot_masked_rows: Tensor<i32>,
    /// `[E]` rows in use per expert.
    pub masked_counts: Tensor<i32>,
}

/// A routing plan with buffers sized once for `max_tokens`; [`Plan::build`] refills it for any
/// T up to that, so a runtime can capture it in a CUDA graph.
pub struct Plan {
    /// `[E]` slots per GEMM expert.
    pub counts: Tensor<i32>,
    /// `[E+1]` row offsets of the sorted layout; `offsets[E]` is the number of GEMM rows.
    pub offsets: Tensor<i32>,
    /// `[E+1]` row offsets of the padded layout.
    pub padded_offsets: Tensor<i32>,
    /// `[S_max]` slot of each sorted row; -1 past `offsets[E]`.
    pub sorted_slots: Tensor<i32>,
    /// `[S_max]` sorted row of each slot; -1 outside the GEMM.
    pub slot_rows: Tensor<i32>,
    /// `[P_max]` slot of each padded row; -1 for padding.
    pub padded_slots: Tensor<i32>,
    /// `[S_max]` padded row of each slot; -1 outside the GEMM.
    pub slot_padded_rows: Tensor<i32>,
    /// `[P_max / block_m]` expert of each padded block; -1 past the end.
    pub block_experts: Tensor<i32>,
    /// `[1]` entries skipped because they were out of range: ids outside `[-1, E_total)` in the
    /// plan, masked-layout overflow, and rows, ids or ranks out of range in gather, combine and
    /// ep_send. Every op that skips an entry counts it, so one bad id read by the plan and the
    /// combine counts twice. Reset by [`Plan::build`].
    pub status: Tensor<i32>,
    /// The masked layout, when [`Plan::with_masked`] asked for it.
    pub masked: Option<Masked>,
    chunk_base: Tensor<i32>,
    max_tokens: usize,
    tokens: usize,
    k: usize,
    experts: usize,
    experts_total: usize,
    block_m: usize,
}

impl Plan {
    /// Buffers for up to `max_tokens` tokens of `k` slots over `experts` GEMM experts (ids in
    /// `[0, experts)`), `experts_total >= experts` counting zero-computation experts, with
    /// segments padded to `block_m` rows.
    pub fn new(
        dev: &Device,
        max_tokens: usize,
        k: usize,
        experts: usize,
        experts_total: usize,
        block_m: usize,
    ) -> Result<Self> {
        const OP: &str = "Plan::new";
        if experts == 0 || experts > MAX_PLAN_EXPERTS {
            return Err(Error::shape(
                OP,
                "experts",
                format!("1..={MAX_PLAN_EXPERTS}"),
                format!("{experts}"),
            ));
        }
        if experts_total < experts || i32::try_from(experts_total).is_err() {
            return Err(Error::shape(
                OP,
                "experts_total",
                format!(">= experts ({experts}), below 2^31"),
                format!("{experts_total}"),
            ));
        }
        if k == 0 || k > crate::routing::MAX_K {
            let want = format!("1..={}", crate::routing::MAX_K);
            return Err(Error::shape(OP, "k", want, format!("{k}")));
        }
        if block_m == 0 || block_m > 4096 {
            return Err(Error::shape(
                OP,
                "block_m",
                "1..=4096",
                format!("{block_m}"),
            ));
        }
        let slots = max_tokens
            .checked_mul(k)
            .filter(|&s| reference::padded_capacity(s, experts, block_m) < i32::MAX as usize)
            .ok_or_else(|| {
                Error::shape(
                    OP,
                    "max_tokens",
                    "T*K + E*block_m below 2^31",
                    format!("{max_tokens} x {k}"),
                )
            })?;
        let p = reference::padded_capacity(slots, experts, block_m);
        let chunks = slots.div_ceil(PLAN_CHUNK).max(1);
        Ok(Plan {
            counts: dev.zeros(&[experts])?,
            offsets: dev.zeros(&[experts + 1])?,
            padded_offsets: dev.zeros(&[experts + 1])?,
            sorted_slots: dev.zeros(&[slots])?,
            slot_rows: dev.zeros(&[slots])?,
            padded_slots: dev.zeros(&[p])?,
            slot_padded_rows: dev.zeros(&[slots])?,
            block_experts: dev.zeros(&[p / block_m])?,
            status: dev.zeros(&[1])?,
            masked: None,
            chunk_base: dev.zeros(&[chunks * experts])?,
            max_tokens,
            tokens: 0,
            k,
            experts,
            experts_total,
            block_m,
        })
    }

    /// Also builds the masked layout with `max_rows` (M) rows per expert.
    pub fn with_masked(mut self, dev: &Device, max_rows: usize) -> Result<Self> {
        let rows = self
            .experts
            .checked_mul(max_rows)
            .filter(|&r| r < i32::MAX as usize && max_rows >= 1)
            .ok_or_else(|| {
                Error::shape(
                    "Plan::with_masked",
                    "max_rows",
                    "1.. with E*M below 2^31",
                    format!("{max_rows}"),
                )
            })?;
        self.masked = Some(Masked {
            max_rows,
            masked_slots: dev.zeros(&[rows])?,
            slot_masked_rows: dev.zeros(&[self.sorted_slots.numel()])?,
            masked_counts: dev.zeros(&[self.experts])?,
        });
        Ok(self)
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn experts(&self) -> usize {
        self.experts
    }
    pub fn experts_total(&self) -> usize {
        self.experts_total
    }
    pub fn block_m(&self) -> usize {
        self.block_m
    }
    /// Slots of the current build, S = T·K.
    pub fn slots(&self) -> usize {
        self.tokens * self.k
    }
    /// Rows a buffer of `layout` needs for the current build (an upper bound of what is used;
    /// the device holds the exact count in `offsets[E]` / `padded_offsets[E]`).
    pub fn rows(&self, layout: Layout) -> usize {
        match layout {
            Layout::Sorted => self.slots(),
            Layout::Padded => reference::padded_capacity(self.slots(), self.experts, self.block_m),
            Layout::Masked => self
                .masked
                .as_ref()
                .map_or(0, |m| self.experts * m.max_rows),
        }
    }
    /// The row maps of `layout`: (slot of each row, row of each slot).
    pub(crate) fn maps(
        &self,
        op: &'static str,
        layout: Layout,
    ) -> Result<(&Tensor<i32>, &Tensor<i32>)> {
        Ok(match layout {
            Layout::Sorted => (&self.sorted_slots, &self.slot_rows),
            Layout::Padded => (&self.padded_slots, &self.slot_padded_rows),
            Layout::Masked => {
                let m = self.masked.as_ref().ok_or_else(|| {
                    Error::shape(
                        op,
                        "layout",
                        "a plan made with Plan::with_masked",
                        "a plan without the masked layout",
                    )
                })?;
                (&m.masked_slots, &m.slot_masked_rows)
            }
        })
    }

    /// Builds the plan of `ids [T, K]` on the stream: three launches and four memsets, no host
    /// synchronisation. Resets `status`.
    pub fn build(&mut self, dev: &Device, ids: &Tensor<i32>) -> Result<()> {
        const OP: &str = "Plan::build";
        if ids.rank() != 2 || ids.shape()[1] != self.k || ids.shape()[0] > self.max_tokens {
            return Err(Error::shape(
                OP,
                "ids",
                format!("[T, {}] with T <= {}", self.k, self.max_tokens),
                format!("{:?}", ids.shape()),
            ));
        }
        ids.check_device(OP, "ids", dev)?;
        self.counts.check_device(OP, "plan", dev)?;
        self.tokens = ids.shape()[0];
        let slots = self.slots();
        let p = reference::padded_capacity(slots, self.experts, self.block_m);
        let chunks = slots.div_ceil(PLAN_CHUNK);
        dev.fill_bytes(&mut self.status, 0)?;
        dev.fill_bytes(&mut self.sorted_slots, 0xff)?;
        dev.fill_bytes(&mut self.padded_slots, 0xff)?;
        // All sizes below were bounded by Plan::new (P_max < 2^31).
        let small = |v: usize| i32::try_from(v).expect("bounded by Plan::new");
        let params = PlanParams {
            counts: self.counts.device_ptr_mut(dev),
            offsets: self.offsets.device_ptr_mut(dev),
            padded_offsets: self.padded_offsets.device_ptr_mut(dev),
            sorted_slots: self.sorted_slots.device_ptr_mut(dev),
            slot_rows: self.slot_rows.device_ptr_mut(dev),
            padded_slots: self.padded_slots.device_ptr_mut(dev),
            slot_padded_rows: self.slot_padded_rows.device_ptr_mut(dev),
            block_experts: self.block_experts.device_ptr_mut(dev),
            chunk_base: self.chunk_base.device_ptr_mut(dev),
            status: self.status.device_ptr_mut(dev),
            ids: ids.device_ptr(dev),
            slots: small(slots),
            experts: small(self.experts),
            experts_total: small(self.experts_total),
            block_m: small(self.block_m),
            padded_capacity: small(p),
            chunks: small(chunks),
        };
        let count = dev.function(OP, Module::Permute, "plan_count")?;
        let scan = dev.function(OP, Module::Permute, "plan_scan")?;
        let scatter = dev.function(OP, Module::Permute, "plan_scatter")?;
        let chunk_cfg = LaunchConfig {
            grid_dim: (small(chunks) as u32, 1, 1),
            block_dim: (PLAN_CHUNK as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scan_cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (SCAN_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the three kernels take one PlanParams (mirrored in src/params.rs). Every buffer
        // was sized by Plan::new for S_max >= S slots, P_max >= P padded rows and
        // C_max >= C chunks over E <= 1024 experts (the shared arrays' size). plan_count: block
        // c reads ids[256c + i] < S and writes chunk_base[c, 0..E). plan_scan: one block of 1024
        // threads, thread e < E scans column e over C chunks; it writes offsets[0..=E] and
        // block_experts[0..P/block_m). plan_scatter: block c writes rows offsets[e] + rank with
        // rank < counts[e] (so < S) and padded rows < padded_offsets[e+1] <= P. The grids are
        // C <= 2^31 / 256 blocks and one block. With S = 0 only the scan runs.
        unsafe {
            if chunks > 0 {
                dev.launch(OP, &count, chunk_cfg, &params)?;
            }
            dev.launch(OP, &scan, scan_cfg, &params)?;
            if chunks > 0 {
                dev.launch(OP, &scatter, chunk_cfg, &params)?;
            }
        }
        self.build_masked(dev)
    }

    /// The plan of a one-expert, one-slot plan (`Plan::new(dev, max_tokens, 1, 1, 1, block_m)`,
    /// a shared expert's) for `tokens` tokens: row r is token r. Equal to [`Plan::build`] of ids
    /// all zero, in one launch and no memset; no ids are read. Resets `status`.
    pub fn build_identity(&mut self, dev: &Device, tokens: usize) -> Result<()> {
        const OP: &str = "Plan::build_identity";
        if self.experts != 1 || self.experts_total != 1 || self.k != 1 || self.masked.is_some() {
            return Err(Error::shape(
                OP,
                "plan",
                "a plan of one expert, one slot per token and no masked layout",
                format!(
                    "E = {}, E_total = {}, K = {}{}",
                    self.experts,
                    self.experts_total,
                    self.k,
                    if self.masked.is_some() {
                        ", masked"
                    } else {
                        ""
                    }
                ),
            ));
        }
        if tokens > self.max_tokens {
            return Err(Error::shape(
                OP,
                "tokens",
                format!("at most {}", self.max_tokens),
                format!("{tokens}"),
            ));
        }
        self.counts.check_device(OP, "plan", dev)?;
        self.tokens = tokens;
        // Sizes bounded by Plan::new (P_max < 2^31).
        let small = |v: usize| i32::try_from(v).expect("bounded by Plan::new");
        let (max_slots, max_padded) = (self.sorted_slots.capacity(), self.padded_slots.capacity());
        let params = PlanIdentityParams {
            counts: self.counts.device_ptr_mut(dev),
            offsets: self.offsets.device_ptr_mut(dev),
            padded_offsets: self.padded_offsets.device_ptr_mut(dev),
            sorted_slots: self.sorted_slots.device_ptr_mut(dev),
            slot_rows: self.slot_rows.device_ptr_mut(dev),
            padded_slots: self.padded_slots.device_ptr_mut(dev),
            slot_padded_rows: self.slot_padded_rows.device_ptr_mut(dev),
            block_experts: self.block_experts.device_ptr_mut(dev),
            status: self.status.device_ptr_mut(dev),
            tokens: small(tokens),
            max_slots: small(max_slots),
            max_padded: small(max_padded),
            block_m: small(self.block_m),
        };
        let func = dev.function(OP, Module::Permute, "plan_identity")?;
        let blocks = max_slots.max(max_padded).div_ceil(256).clamp(1, 4096) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `plan_identity` takes one PlanIdentityParams (mirrored in src/params.rs). Plan::new
        // with E = K = 1 made counts [1], offsets and padded_offsets [2], sorted_slots, slot_rows
        // and slot_padded_rows [S_max], padded_slots [P_max] and block_experts
        // [P_max / block_m], P_max a multiple of block_m; the kernel writes index i of each only
        // below those lengths (grid-stride loop), and element 0/1 of the small arrays.
        unsafe { dev.launch(OP, &func, cfg, &params) }?;
        Ok(())
    }

    fn build_masked(&mut self, dev: &Device) -> Result<()> {
        const OP: &str = "Plan::build";
        let Some(m) = self.masked.as_mut() else {
            return Ok(());
        };
        dev.fill_bytes(&mut m.slot_masked_rows, 0xff)?;
        let params = MaskedParams {
            masked_slots: m.masked_slots.device_ptr_mut(dev),
            slot_masked_rows: m.slot_masked_rows.device_ptr_mut(dev),
            masked_counts: m.masked_counts.device_ptr_mut(dev),
            status: self.status.device_ptr_mut(dev),
            counts: self.counts.device_ptr(dev),
            offsets: self.offsets.device_ptr(dev),
            sorted_slots: self.sorted_slots.device_ptr(dev),
            experts: i32::try_from(self.experts).expect("bounded by Plan::new"),
            max_rows: i32::try_from(m.max_rows).expect("bounded by Plan::with_masked"),
        };
        let func = dev.function(OP, Module::Permute, "plan_masked")?;
        let cfg = LaunchConfig {
            grid_dim: (params.experts as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `plan_masked` takes one MaskedParams (mirrored in src/params.rs). Block e < E
        // writes rows e*M .. e*M + M of masked_slots ([E*M]) and masked_counts[e]; it reads
        // sorted_slots[offsets[e] + j] for j < min(counts[e], M), inside the plan's rows, and
        // writes slot_masked_rows[slot] for those slots s < S <= S_max. It runs after the plan's
        // kernels on the same stream.
        unsafe { dev.launch(OP, &func, cfg, &params) }?;
        Ok(())
    }

    /// Waits for the stream and turns the device-side count of bad ids or rows into an error.
    /// Meant for tests and debugging; a forward pass does not call it.
    pub fn check(&self, dev: &Device) -> Result<()> {
        let bad = dev.download(&self.status)?[0];
        if bad != 0 {
            return Err(Error::DeviceCheck {
                op: "Plan::build",
                what: format!(
                    "{bad} slot(s) had an expert id outside [-1, {}) or a row out of range; they \
                     were skipped",
                    self.experts_total
                ),
            });
        }
        Ok(())
    }
}
