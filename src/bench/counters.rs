//! `moe-kernels bench` on the CPU emulator: one forward per token count with the emulator's
//! counters on, each launch's counters through the crate's model (docs/MODEL.md), and per
//! stage the modelled time on a card beside its floor. Every time here is *modelled*, never
//! measured; the counters (bytes, sectors, wavefronts, tensor-core work) are exact.

use half::bf16;
use moe_kernels::layer::{MoeLayer, Stage};
use moe_kernels::profile::{self, Card, Emulator, LaunchRecord, Limiter, Modelled};
use moe_kernels::{Device, Error, Tensor};

use super::{stage_name, stage_work};

/// One stage's launches, what they added up to, and what the stage had to do.
pub(super) struct CountedStage {
    pub stage: Stage,
    pub launches: Vec<(LaunchRecord, Modelled)>,
    /// Modelled time: the launches' and the gap before each but the forward's first.
    pub us: f64,
    /// The launch that took longest, and what bound it.
    pub limiter: Limiter,
    /// Useful FLOPs and the fewest bytes the stage must move (its floor's inputs).
    pub flops: f64,
    pub bytes: f64,
    pub floor: profile::Floor,
}

impl CountedStage {
    fn sum(&self, f: impl Fn(&LaunchRecord) -> f64) -> f64 {
        self.launches.iter().map(|(r, _)| f(r)).sum()
    }
    /// Bytes the lanes asked of global memory, and the asynchronous copies' bytes.
    pub fn requested(&self) -> f64 {
        self.sum(|r| {
            let g = &r.global;
            g.ld.bytes
                + g.st.bytes
                + g.atom.bytes
                + g.ldgsts.bytes
                + r.async_copies.bulk_bytes
                + r.async_copies.tensor_bytes
        })
    }
    pub fn unique(&self) -> f64 {
        self.sum(|r| r.dram.unique_read_bytes + r.dram.unique_write_bytes)
    }
    pub fn l2_model(&self) -> f64 {
        self.sum(|r| r.dram.l2_read_bytes + r.dram.l2_write_bytes)
    }
    /// Load/store-unit bytes over the bytes of the sectors they touched.
    pub fn sector_efficiency(&self) -> Option<f64> {
        let (bytes, sectors) = self.launches.iter().fold((0.0, 0.0), |(b, s), (r, _)| {
            let g = &r.global;
            (
                b + g.ld.bytes + g.st.bytes + g.atom.bytes + g.ldgsts.bytes,
                s + g.ld.sectors + g.st.sectors + g.atom.sectors + g.ldgsts.sectors,
            )
        });
        (sectors > 0.0).then(|| bytes / (sectors * profile::SECTOR_BYTES))
    }
    /// Shared-memory wavefronts beyond the ideal (bank conflicts), and all wavefronts.
    pub fn conflicts(&self) -> (f64, f64) {
        let s = |r: &LaunchRecord| {
            let h = &r.shared;
            [h.ld, h.st, h.atom, h.ldmatrix, h.cp_async]
        };
        let wf = self.sum(|r| s(r).iter().map(|c| c.wavefronts).sum());
        let ideal = self.sum(|r| s(r).iter().map(|c| c.ideal).sum());
        (wf - ideal, wf)
    }
    /// Whether any launch of the stage ran a sample of its blocks. Its distinct sectors are
    /// then the sample's scaled to the grid, which overstates the grid's where blocks share
    /// data (the same weight tile read by many row blocks): not reported.
    pub fn sampled(&self) -> bool {
        self.launches.iter().any(|(r, _)| r.sampled < 1.0)
    }
    pub fn executed_flops(&self) -> f64 {
        self.sum(LaunchRecord::tensor_flops)
    }
    pub fn percent_of_floor(&self) -> f64 {
        if self.us > 0.0 {
            100.0 * self.floor.us / self.us
        } else {
            0.0
        }
    }
}

/// One token count's counted forward.
pub(super) struct CountedRun {
    pub tokens: usize,
    pub stages: Vec<CountedStage>,
    pub sampled: bool,
}

impl CountedRun {
    pub fn us(&self) -> f64 {
        self.stages.iter().map(|s| s.us).sum()
    }
    pub fn floor_us(&self) -> f64 {
        self.stages.iter().map(|s| s.floor.us).sum()
    }
}

/// Runs one forward of `t` tokens with counting on and models it on `card`. With `sample` < 1
/// the GEMM stages (gate/up, down, shared expert) run that fraction of their blocks, the counts
/// scaled to the whole grid; their outputs are then incomplete and nothing is checked.
pub(super) fn count_stages(
    dev: &Device,
    layer: &mut MoeLayer<bf16>,
    t: usize,
    emu: &Emulator,
    card: &Card,
    sample: f64,
) -> Result<CountedRun, Error> {
    let h = layer.config().hidden;
    let has_shared = layer.config().shared.is_some();
    let mut x: Tensor<bf16> = dev.zeros(&[t, h])?;
    dev.fill_uniform(&mut x, (1 << 40) + t as u64, -1.0, 1.0)?;
    let mut y: Tensor<bf16> = dev.zeros(&[t, h])?;
    dev.synchronize()?;
    emu.enable(true)?;
    emu.take()?;
    let mut marks: Vec<(Stage, Vec<LaunchRecord>)> = Vec::new();
    let run = layer.forward_marked(dev, &mut y, &x, &mut |stage| {
        // The emulator runs a launch when it is enqueued: the stage's records are all there.
        dev.synchronize()?;
        marks.push((stage, emu.take()?));
        if sample < 1.0 {
            // Sample the GEMM stages only: routing and the plan must be whole for the GEMMs to
            // read valid rows.
            let next_sampled = match stage {
                Stage::Plan | Stage::Gemm1 => true,
                Stage::Gemm2 => has_shared,
                _ => false,
            };
            emu.set_sample(if next_sampled { sample } else { 1.0 })?;
        }
        Ok(())
    });
    let off = emu.set_sample(1.0).and_then(|()| emu.enable(false));
    run?;
    off?;
    dev.synchronize()?;
    if sample >= 1.0 {
        layer.check(dev)?;
    }
    let fused = !marks.iter().any(|(s, _)| *s == Stage::Plan);
    let work_of = stage_work(dev, layer, t, fused)?;
    let mut stages = Vec::new();
    let mut first = true;
    for (stage, records) in marks {
        let mut launches = Vec::with_capacity(records.len());
        let mut us = 0.0;
        for rec in records {
            let m = profile::model(&rec, card)?;
            us += m.us;
            if !first {
                us += profile::DEPENDENT_LAUNCH_GAP_S.value * 1e6;
            }
            first = false;
            launches.push((rec, m));
        }
        let limiter = launches
            .iter()
            .map(|(_, m)| m)
            .max_by(|a, b| a.us.total_cmp(&b.us))
            .map_or(Limiter::Launch, |m| m.limiter);
        let (flops, bytes) = work_of(stage);
        stages.push(CountedStage {
            stage,
            launches,
            us,
            limiter,
            flops,
            bytes,
            floor: profile::floor(bytes, flops, card),
        });
    }
    Ok(CountedRun {
        tokens: t,
        stages,
        sampled: sample < 1.0,
    })
}

fn mb(b: f64) -> String {
    format!("{:.1}", b / 1e6)
}

pub(super) fn print_table(card: &Card, runs: &[CountedRun]) {
    println!(
        "MODELLED on {} (docs/MODEL.md) from the emulator's exact counters: not measured. \
         floor = max(ideal bytes / {:.2} TB/s, useful FLOPs / {:.0} TFLOP/s), datasheet.",
        card.name,
        card.datasheet.dram_bytes_per_s.value / 1e12,
        card.datasheet.bf16_flops.value / 1e12,
    );
    println!(
        "{:>6} {:<8} {:>3} {:>10} {:>10} {:>6} {:<12} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>6}",
        "T",
        "stage",
        "n",
        "model us",
        "floor us",
        "%floor",
        "limiter",
        "req MB",
        "uniq MB",
        "L2mdl MB",
        "ideal MB",
        "sector",
        "conflict",
        "useful"
    );
    for run in runs {
        for s in &run.stages {
            let (conf, wf) = s.conflicts();
            let exec = s.executed_flops();
            println!(
                "{:>6} {:<8} {:>3} {:>10.1} {:>10.1} {:>5.0}% {:<12} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>6}",
                run.tokens,
                stage_name(s.stage),
                s.launches.len(),
                s.us,
                s.floor.us,
                s.percent_of_floor(),
                s.limiter.name(),
                mb(s.requested()),
                if run.sampled && s.sampled() {
                    "n/a".into()
                } else {
                    mb(s.unique())
                },
                mb(s.l2_model()),
                mb(s.bytes),
                s.sector_efficiency()
                    .map_or("-".into(), |e| format!("{:.0}%", 100.0 * e)),
                if wf > 0.0 {
                    format!("{:.0}%", 100.0 * conf / wf)
                } else {
                    "-".into()
                },
                if exec > 0.0 {
                    format!("{:.2}", s.flops / exec)
                } else {
                    "-".into()
                },
            );
        }
        println!(
            "{:>6} {:<8} {:>3} {:>10.1} {:>10.1} {:>5.0}%{}",
            run.tokens,
            "total",
            run.stages.iter().map(|s| s.launches.len()).sum::<usize>(),
            run.us(),
            run.floor_us(),
            100.0 * run.floor_us() / run.us().max(f64::MIN_POSITIVE),
            if run.sampled {
                "   (GEMM stages sampled: outputs not checked)"
            } else {
                ""
            }
        );
    }
    println!(
        "columns: req = bytes the lanes requested; uniq = distinct 32-byte sectors; L2mdl = DRAM \
         bytes of the L2 model; ideal = fewest bytes the stage must move; sector = requested \
         over sector bytes; conflict = shared wavefronts beyond the ideal; useful = useful over \
         executed tensor FLOPs"
    );
}

/// One launch's record and model as JSON.
pub(super) fn launch_json(r: &LaunchRecord, m: &Modelled, card: &Card) -> serde_json::Value {
    let g = |c: &profile::GlobalCount| serde_json::json!({"requests": c.requests, "sectors": c.sectors, "bytes": c.bytes});
    let s = |c: &profile::SharedCount| serde_json::json!({"requests": c.requests, "wavefronts": c.wavefronts, "ideal": c.ideal});
    serde_json::json!({
        "kernel": r.kernel,
        "grid": r.grid,
        "block": r.block,
        "dyn_smem": r.dyn_smem,
        "sampled": r.sampled,
        "resources": r.resources.as_ref().map(|x| serde_json::json!({
            "regs": x.regs, "static_smem": x.static_smem, "local": x.local,
            "blocks_per_sm": x.blocks_per_sm, "limiter": x.limiter,
        })),
        "global": {"ld": g(&r.global.ld), "st": g(&r.global.st), "atom": g(&r.global.atom),
                   "ldgsts": g(&r.global.ldgsts)},
        "dram": {"unique_read_bytes": r.dram.unique_read_bytes,
                 "unique_write_bytes": r.dram.unique_write_bytes,
                 "l2_read_bytes": r.dram.l2_read_bytes, "l2_write_bytes": r.dram.l2_write_bytes},
        "shared": {"ld": s(&r.shared.ld), "st": s(&r.shared.st), "atom": s(&r.shared.atom),
                   "ldmatrix": s(&r.shared.ldmatrix), "cp_async": s(&r.shared.cp_async)},
        "async": {"cp_async_bytes": r.async_copies.cp_async_bytes,
                  "bulk_bytes": r.async_copies.bulk_bytes,
                  "tensor_bytes": r.async_copies.tensor_bytes},
        "tensor": r.tensor.iter().map(|t| serde_json::json!({
            "op": t.op, "dtype": t.dtype, "count": t.count, "flops": t.flops,
        })).collect::<Vec<_>>(),
        "model": {
            "card": card.name,
            "us": m.us,
            "limiter": m.limiter.name(),
            "terms_us": {"dram": m.terms.dram_us, "tensor": m.terms.tensor_us,
                         "shared": m.terms.shared_us, "l2": m.terms.l2_us,
                         "launch": m.terms.launch_us},
            "blocks_per_sm": m.occupancy.blocks_per_sm,
            "waves": m.waves,
            "active_sms": m.active_sms,
        },
    })
}

pub(super) fn runs_json(card: &Card, runs: &[CountedRun]) -> serde_json::Value {
    let runs: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| {
            serde_json::json!({
                "tokens": run.tokens,
                "sampled": run.sampled,
                "modelled_us": run.us(),
                "floor_us": run.floor_us(),
                "stages": run.stages.iter().map(|s| {
                    let (conflicts, wavefronts) = s.conflicts();
                    serde_json::json!({
                        "stage": stage_name(s.stage),
                        "modelled_us": s.us,
                        "floor_us": s.floor.us,
                        "floor_limiter": s.floor.limiter.name(),
                        "percent_of_floor": s.percent_of_floor(),
                        "limiter": s.limiter.name(),
                        "useful_flops": s.flops,
                        "executed_flops": s.executed_flops(),
                        "ideal_bytes": s.bytes,
                        "requested_bytes": s.requested(),
                        "unique_bytes": (!s.sampled()).then(|| s.unique()),
                        "l2_model_bytes": s.l2_model(),
                        "sector_efficiency": s.sector_efficiency(),
                        "shared_wavefronts": wavefronts,
                        "bank_conflict_wavefronts": conflicts,
                        "launches": s.launches.iter()
                            .map(|(r, m)| launch_json(r, m, card)).collect::<Vec<_>>(),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "modelled": true,
        "card": card.name,
        "model": "docs/MODEL.md",
        "runs": runs,
    })
}
