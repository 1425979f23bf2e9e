//! The profiler on a real forward: the DRAM bytes the emulator's counters give for a bf16 decode
//! step against the arithmetic of what it must read, and every launch modelled. Needs the CPU
//! emulator (its counters); on a GPU it prints SKIPPED.

mod common;

use half::bf16;
use moe_kernels::layer::{ForwardOptions, MoeConfig, MoeLayer};
use moe_kernels::lora::LoraAdapters;
use moe_kernels::profile::{self, Card, Emulator, LaunchRecord};
use moe_kernels::routing::{self, RouterConfig, RouterLogitsVersion};

/// The emulator records every launch of the process: the tests here take turns.
static RECORDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn emulator(test: &str) -> Option<(moe_kernels::Device, Emulator)> {
    let dev = common::gpu(test)?;
    match Emulator::find() {
        Some(emu) => Some((dev, emu)),
        None => {
            eprintln!("SKIPPED: {test}: the counters come from the CPU emulator, not a GPU");
            None
        }
    }
}

/// At T = 1 a decode forward must read the router, the chosen experts' weights once and a few
/// activations: the counted DRAM bytes (distinct sectors, and the L2 model's) are that sum to
/// within 2%, and the requested bytes within 25% of it (x staged once per block).
#[test]
fn gpu_decode_dram_bytes_are_the_active_experts_bytes() {
    let Some((dev, emu)) = emulator("gpu_decode_dram_bytes_are_the_active_experts_bytes") else {
        return;
    };
    let _turn = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    emu.register_resources().unwrap();
    // Qwen3-30B-A3B's expert shapes, 16 experts, top-4.
    let cfg = MoeConfig::new(2048, 768, 16, RouterConfig::qwen(4, true));
    let mut layer = MoeLayer::<bf16>::random(&dev, &cfg, 1, 7).unwrap();
    let mut x = dev.zeros::<bf16>(&[1, cfg.hidden]).unwrap();
    dev.fill_uniform(&mut x, 11, -1.0, 1.0).unwrap();
    let mut y = dev.zeros::<bf16>(&[1, cfg.hidden]).unwrap();
    dev.synchronize().unwrap();

    let records = counted(
        &dev,
        &emu,
        &mut layer,
        &mut y,
        &x,
        ForwardOptions::default(),
    );
    let own = chosen(&dev, &layer);
    check_decode_bytes(&layer, &cfg, &records, &own, true);

    // Masks add no weight traffic: with half the experts removed, the step reads the four it
    // chooses among the rest, the router and the mask's words.
    let removed: Vec<usize> = (0..cfg.experts).step_by(2).collect();
    layer.set_expert_masks(&dev, &[&removed]).unwrap();
    let records = counted(
        &dev,
        &emu,
        &mut layer,
        &mut y,
        &x,
        ForwardOptions::default(),
    );
    let masked = chosen(&dev, &layer);
    assert!(masked.iter().all(|&e| e % 2 == 1), "{masked:?}");
    check_decode_bytes(&layer, &cfg, &records, &masked, true);
    layer.set_expert_masks(&dev, &[]).unwrap();

    // Given routing replaces the router: the step reads the given experts' bytes alone (and
    // the routing itself).
    let ids = dev.upload(&[3i32, 9, 14, 0], &[1, 4]).unwrap();
    let weights = dev.upload(&[0.4f32, 0.3, 0.2, 0.1], &[1, 4]).unwrap();
    let opts = ForwardOptions {
        routing: Some((&ids, &weights)),
        ..Default::default()
    };
    let records = counted(&dev, &emu, &mut layer, &mut y, &x, opts);
    check_decode_bytes(&layer, &cfg, &records, &[0, 3, 9, 14], false);
}

/// LoRA at decode sizes: the adapter kernels read each chosen (expert, adapter)'s A and B once,
/// however many tokens share the pair; what else they read is the rows they work on.
#[test]
fn gpu_lora_reads_each_chosen_pair_once() {
    let Some((dev, emu)) = emulator("gpu_lora_reads_each_chosen_pair_once") else {
        return;
    };
    let _turn = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    emu.register_resources().unwrap();
    // Qwen3-30B-A3B's expert shapes, 16 experts, top-4, adapters of rank 16.
    let cfg = MoeConfig::new(2048, 768, 16, RouterConfig::qwen(4, true));
    let (h, i, r, t) = (cfg.hidden, cfg.intermediate, 16, 4);
    let mut layer = MoeLayer::<bf16>::random(&dev, &cfg, t, 3).unwrap();
    let lora = LoraAdapters::<bf16>::random(cfg.experts, h, i, 2, r, 5);
    layer.set_lora(&dev, Some(&lora)).unwrap();
    let mut x = dev.zeros::<bf16>(&[t, h]).unwrap();
    dev.fill_uniform(&mut x, 11, -1.0, 1.0).unwrap();
    let mut y = dev.zeros::<bf16>(&[t, h]).unwrap();
    // Ten pairs: adapter 0 on experts 0..=5 (1 and 2 shared by two tokens), adapter 1 on 0, 1,
    // 6, 7; the last token has no adapter.
    let ids = dev
        .upload(
            &[0i32, 1, 2, 3, 1, 2, 4, 5, 0, 1, 6, 7, 8, 9, 10, 11],
            &[t, 4],
        )
        .unwrap();
    let weights = dev.upload(&[0.25f32; 16], &[t, 4]).unwrap();
    let adapters = dev.upload(&[0i32, 0, 1, -1], &[t]).unwrap();
    let pairs = 10;
    dev.synchronize().unwrap();
    let opts = ForwardOptions {
        routing: Some((&ids, &weights)),
        adapter_ids: Some(&adapters),
        ..Default::default()
    };
    let records = counted(&dev, &emu, &mut layer, &mut y, &x, opts);
    // The same step without adapters, and with them on the planned GEMV path.
    let base_opts = ForwardOptions {
        routing: Some((&ids, &weights)),
        ..Default::default()
    };
    let base = counted(&dev, &emu, &mut layer, &mut y, &x, base_opts);
    layer.set_path(moe_kernels::layer::Path::Gemv);
    let planned = counted(&dev, &emu, &mut layer, &mut y, &x, opts);
    layer.set_path(moe_kernels::layer::Path::Auto);
    let names =
        |recs: &[LaunchRecord]| -> Vec<String> { recs.iter().map(|r| r.kernel.clone()).collect() };
    // The decode path: the shrinks are the only launches added; the expands run inside the
    // decode kernels.
    let lora_records: Vec<&LaunchRecord> = records
        .iter()
        .filter(|r| r.kernel.starts_with("lora_"))
        .collect();
    assert_eq!(
        lora_records.len(),
        2,
        "a shrink for gate/up and one for down: {:?}",
        names(&records)
    );
    assert_eq!(records.len(), base.len() + 2, "{:?}", names(&records));
    let pair = layer.lora_pair_bytes().unwrap();
    assert_eq!(pair, (2 * r * h + 2 * i * r + r * i + h * r) * 2);
    // A: what the shrinks read, with the rows (x, h) of the 12 slots with an adapter and s.
    let (a_pair, b_pair) = ((2 * r * h + r * i) * 2, (2 * i * r + h * r) * 2);
    let rows = 12;
    let a_rows = rows * (h + i) * 2;
    let read = |recs: &[&LaunchRecord], f: fn(&LaunchRecord) -> f64| {
        recs.iter().map(|r| f(r)).sum::<f64>()
    };
    // B: what the decode kernels read beyond the same kernels without adapters, with s (f32).
    let decode_of = |recs: &[LaunchRecord]| -> Vec<LaunchRecord> {
        recs.iter()
            .filter(|r| r.kernel.starts_with("decode_"))
            .cloned()
            .collect()
    };
    let (with, without) = (decode_of(&records), decode_of(&base));
    let with_refs: Vec<&LaunchRecord> = with.iter().collect();
    let without_refs: Vec<&LaunchRecord> = without.iter().collect();
    let b_rows = rows * 3 * r * 4;
    for (what, f) in [
        (
            "unique",
            (|r: &LaunchRecord| r.dram.unique_read_bytes) as fn(&LaunchRecord) -> f64,
        ),
        ("L2 model", |r: &LaunchRecord| r.dram.l2_read_bytes),
    ] {
        let a = read(&lora_records, f);
        let b = read(&with_refs, f) - read(&without_refs, f);
        println!(
            "LoRA {pairs} pairs: A {} B + rows {a_rows} B, read {a:.0} ({what}); B {} B + s \
             {b_rows} B, read {b:.0} beyond the decode kernels without adapters",
            pairs * a_pair,
            pairs * b_pair
        );
        assert!(
            a >= (pairs * a_pair) as f64 && a <= (pairs * a_pair + a_rows + 4096) as f64,
            "shrink reads {a} ({what}) against {} B of A and {a_rows} B of rows",
            pairs * a_pair
        );
        assert!(
            b >= (pairs * b_pair) as f64 && b <= (pairs * b_pair + b_rows + 4096) as f64,
            "decode kernels read {b} more ({what}) against {} B of B and {b_rows} B of s",
            pairs * b_pair
        );
    }
    for card in ["h100", "h200"] {
        let card = Card::parse(card).unwrap();
        let chain = |recs: &[LaunchRecord]| {
            let ms: Vec<_> = recs
                .iter()
                .map(|r| profile::model(r, &card).unwrap())
                .collect();
            profile::chain_us(&ms)
        };
        for (what, recs) in [
            ("decode path with adapters", &records),
            ("decode path without", &base),
            ("planned GEMV with adapters", &planned),
        ] {
            let each: Vec<String> = recs
                .iter()
                .map(|r| {
                    let m = profile::model(r, &card).unwrap();
                    format!("{} {:.1}", r.kernel, m.us)
                })
                .collect();
            println!(
                "{} {what}: {} launches, {:.1} us modelled: {}",
                card.name,
                recs.len(),
                chain(recs),
                each.join(", ")
            );
        }
        assert!(
            chain(&records) < chain(&planned),
            "{}: the fused decode path models slower than the planned GEMV with adapters",
            card.name
        );
    }
}

/// The tiled router projection (v3) reads each row of x and of the router weight once per tile
/// of 8 tokens x 8 experts, where v2 reads both once per (token, expert): the requested bytes
/// are exactly that arithmetic, and the version the layer picks by T and E models no slower
/// than the other, on both sides of the switch.
#[test]
fn gpu_router_v3_reads_the_weight_once_per_tile() {
    let Some((dev, emu)) = emulator("gpu_router_v3_reads_the_weight_once_per_tile") else {
        return;
    };
    let _turn = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
    emu.register_resources().unwrap();
    let cards = [Card::parse("h100").unwrap(), Card::parse("h200").unwrap()];
    // Qwen3-30B-A3B's router (H = 2048, E = 128) and Mixtral's (H = 4096, E = 8), bf16.
    for (h, e, t) in [
        (2048, 128, 1),
        (2048, 128, 8),
        (2048, 128, 16),
        (2048, 128, 64),
        (4096, 8, 128),
        (4096, 8, 256),
    ] {
        let w = dev.zeros::<bf16>(&[e, h]).unwrap();
        let x = dev.zeros::<bf16>(&[t, h]).unwrap();
        let mut out = dev.zeros::<bf16>(&[t, e]).unwrap();
        dev.synchronize().unwrap();
        let mut run = |version| {
            let mut recs = recorded(&dev, &emu, || {
                routing::router_logits_version_into(&dev, version, &mut out, &x, &w, None)
            });
            assert_eq!(recs.len(), 1);
            recs.pop().unwrap()
        };
        let (v2, v3) = (run(RouterLogitsVersion::V2), run(RouterLogitsVersion::V3));
        let row = (h * 2) as f64;
        assert_eq!(
            v2.global.ld.bytes,
            (t * e) as f64 * 2.0 * row,
            "v2 at T={t}"
        );
        // Each x row once per column of 8 experts, each w row once per row of 8 tokens.
        let rows = (e.div_ceil(8) * t + t.div_ceil(8) * e) as f64;
        assert_eq!(v3.global.ld.bytes, rows * row, "v3 at T={t}");
        // Both read x and w once from DRAM.
        let unique = ((t + e) * h * 2) as f64;
        for r in [&v2, &v3] {
            assert!(
                (r.dram.unique_read_bytes - unique).abs() < 0.01 * unique,
                "{} at T={t}: {} distinct bytes read, want {unique}",
                r.kernel,
                r.dram.unique_read_bytes
            );
        }
        for card in &cards {
            let (m2, m3) = (
                profile::model(&v2, card).unwrap(),
                profile::model(&v3, card).unwrap(),
            );
            println!(
                "{} router E={e} T={t}: v2 {:.2} us ({:?}, {} blocks), v3 {:.2} us ({:?}, {} \
                 blocks), requested {:.1} / {:.1} MB",
                card.name,
                m2.us,
                m2.limiter,
                m2.blocks,
                m3.us,
                m3.limiter,
                m3.blocks,
                v2.global.ld.bytes / 1e6,
                v3.global.ld.bytes / 1e6
            );
            let (picked, other) = match routing::router_logits_version_for(t, e) {
                RouterLogitsVersion::V3 => (m3.us, m2.us),
                _ => (m2.us, m3.us),
            };
            assert!(
                picked <= other,
                "{} E={e} T={t}: the version picked models slower",
                card.name
            );
        }
    }
}

/// The launch records of one forward of `layer` with `opts`, checked.
fn counted(
    dev: &moe_kernels::Device,
    emu: &Emulator,
    layer: &mut MoeLayer<bf16>,
    y: &mut moe_kernels::Tensor<bf16>,
    x: &moe_kernels::Tensor<bf16>,
    opts: ForwardOptions<'_>,
) -> Vec<LaunchRecord> {
    let records = recorded(dev, emu, || layer.forward_with(dev, y, x, opts));
    layer.check(dev).unwrap();
    records
}

/// The launch records of `work`, run with the emulator's counters on and synchronised; the
/// counters are off again before `work`'s result is checked.
fn recorded(
    dev: &moe_kernels::Device,
    emu: &Emulator,
    work: impl FnOnce() -> moe_kernels::Result<()>,
) -> Vec<LaunchRecord> {
    emu.enable(true).unwrap();
    emu.take().unwrap();
    let run = work();
    let sync = dev.synchronize();
    let records = emu.take().unwrap();
    emu.enable(false).unwrap();
    run.unwrap();
    sync.unwrap();
    records
}

/// The distinct experts of the last forward's routing.
fn chosen(dev: &moe_kernels::Device, layer: &MoeLayer<bf16>) -> Vec<i32> {
    let mut chosen: Vec<i32> = dev.download(layer.routing().0).unwrap();
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}

/// A decode step's counted DRAM bytes against the `chosen` experts' bytes and, when `router`,
/// the router's: within 2% (distinct sectors and the L2 model's), the requested bytes within
/// 25%, and every launch modelled.
fn check_decode_bytes(
    layer: &MoeLayer<bf16>,
    cfg: &MoeConfig,
    records: &[LaunchRecord],
    chosen: &[i32],
    router: bool,
) {
    assert_eq!(records.len(), 3, "the decode path is three launches");
    assert_eq!(chosen.len(), 4);
    let experts: usize = chosen
        .iter()
        .map(|&e| {
            let (gu, d) = layer.expert_bytes(usize::try_from(e).unwrap());
            gu + d
        })
        .sum();
    let router = if router {
        cfg.experts * cfg.hidden * 2
    } else {
        0
    };
    let expected = (experts + router) as f64;
    let sum = |f: fn(&LaunchRecord) -> f64| records.iter().map(f).sum::<f64>();
    let unique = sum(|r| r.dram.unique_read_bytes + r.dram.unique_write_bytes);
    let l2 = sum(|r| r.dram.l2_read_bytes + r.dram.l2_write_bytes);
    let requested = sum(|r| r.global.ld.bytes + r.global.st.bytes + r.global.atom.bytes);
    println!(
        "expected {expected:.0} B (experts {experts}, router {router}); unique {unique:.0}, L2 model \
         {l2:.0}, requested {requested:.0}"
    );
    for got in [unique, l2] {
        assert!(
            got >= expected && got <= expected * 1.02,
            "DRAM {got} against {expected}"
        );
    }
    // The decode kernels v2 stage x once per block (v1 re-read it from every warp: over 1.5x):
    // what is requested beyond the weights is each block's staging of x and of h.
    assert!(
        requested < 1.25 * expected,
        "requested {requested} against {expected}: x re-read by every warp?"
    );

    for card in ["h100", "h200"] {
        let card = Card::parse(card).unwrap();
        let ms: Vec<_> = records
            .iter()
            .map(|r| profile::model(r, &card).unwrap())
            .collect();
        let gate_up = ms[1];
        let floor = profile::floor(experts as f64, 0.0, &card);
        println!(
            "{}: gate_up {:.1} us modelled ({}), chain {:.1} us, floor of all expert bytes {:.1} us",
            card.name,
            gate_up.us,
            gate_up.limiter,
            profile::chain_us(&ms),
            floor.us
        );
        assert!(profile::chain_us(&ms) > floor.us);
    }
}
