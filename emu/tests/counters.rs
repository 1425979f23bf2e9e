//! The profiler's counters (emu/runtime/counters.cpp) on kernels whose answers are worked out
//! by hand here (emu/tests/kernels/counters.cu). Each test states the hardware rule it checks;
//! changing that rule in the runtime fails it.
//!
//! Counting is process-wide, so the tests take turns (one lock) and read only their own
//! launch's record.

mod common;

use std::sync::Mutex;

use common::Gpu;
use moe_emu::counters;
use serde_json::Value;

static TURN: Mutex<()> = Mutex::new(());

#[repr(C)]
struct CountParams {
    src: u64,
    dst: u64,
    word: u64,
    n: i32,
    mode: i32,
}

/// Runs one launch with counting on and returns its record.
fn counted(gpu: &Gpu, name: &str, grid: u32, block: u32, smem: u32, p: &CountParams) -> Value {
    counters::moe_emu_counters_enable(1);
    let _ = take();
    gpu.run(name, [grid, 1, 1], [block, 1, 1], smem, p);
    let records = take();
    counters::moe_emu_counters_enable(0);
    assert_eq!(records.len(), 1, "one record per launch: {records:?}");
    let r = records.into_iter().next().unwrap();
    assert_eq!(r["kernel"], name);
    println!("{name} mode {}: {r}", p.mode);
    r
}

fn take() -> Vec<Value> {
    let p = counters::moe_emu_counters_take();
    // SAFETY: the string comes from moe_emu_counters_take and is released once.
    let text = unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned();
    unsafe { counters::moe_emu_counters_free(p) };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn n(v: &Value, path: &str) -> u64 {
    let mut x = v;
    for k in path.split('.') {
        x = &x[k];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count in {v}"))
}

fn params(gpu: &Gpu, src_bytes: usize, dst_bytes: usize, count: i32, mode: i32) -> CountParams {
    let src: Vec<u8> = (0..src_bytes).map(|i| (i * 7 + 3) as u8).collect();
    CountParams {
        src: gpu.upload(&src),
        dst: gpu.alloc::<u8>(dst_bytes),
        word: gpu.upload(&[0u32]),
        n: count,
        mode,
    }
}

fn release(gpu: &Gpu, p: CountParams) {
    for x in [p.src, p.dst, p.word] {
        gpu.free(x);
    }
}

/// A coalesced 16-byte copy of 1024 elements: 32 warps, each one request of 16 sectors for its
/// 512 bytes (100% sector efficiency); DRAM reads and writes the 16 KiB once each.
#[test]
fn coalesced_copy_is_one_request_per_warp_and_every_sector_full() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 16384, 16384, 1024, 0);
    let r = counted(&gpu, "emu_count_copy", 4, 256, 0, &p);
    for op in ["ld", "st"] {
        assert_eq!(n(&r, &format!("global.{op}.requests")), 32, "{op}");
        assert_eq!(n(&r, &format!("global.{op}.sectors")), 512, "{op}");
        assert_eq!(n(&r, &format!("global.{op}.bytes")), 16384, "{op}");
    }
    assert_eq!(n(&r, "dram.unique_read_bytes"), 16384);
    assert_eq!(n(&r, "dram.unique_write_bytes"), 16384);
    assert_eq!(n(&r, "dram.l2_read_bytes"), 16384);
    assert_eq!(n(&r, "dram.l2_write_bytes"), 16384);
    assert_eq!(n(&r, "global.atom.requests"), 0);
    release(&gpu, p);
}

/// The host compiler must not split the kernels' vector accesses: per warp, each 16-byte
/// access (uint4, float4, Vec16) and each 8-byte one (uint2) is one request of full sectors.
#[test]
fn vector_accesses_keep_their_width() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 4 * 4096, 3 * 4096, 256, 1);
    let r = counted(&gpu, "emu_count_copy", 1, 256, 0, &p);
    // Loads: uint4, uint2, float4, Vec16 = 4 requests per warp of 8 warps; bytes 16+8+16+16.
    assert_eq!(n(&r, "global.ld.requests"), 4 * 8);
    assert_eq!(n(&r, "global.ld.bytes"), 256 * (16 + 8 + 16 + 16));
    // A uint2 at a 16-byte stride touches one sector of every two lanes' 32 bytes: 16 per warp.
    assert_eq!(n(&r, "global.ld.sectors"), 8 * (16 + 16 + 16 + 16));
    // Stores: uint4, uint2, Vec16.
    assert_eq!(n(&r, "global.st.requests"), 3 * 8);
    assert_eq!(n(&r, "global.st.bytes"), 256 * (16 + 8 + 16));
    release(&gpu, p);
}

/// Lanes 32 bytes apart: each 4-byte read has a sector of its own (12.5% efficiency).
#[test]
fn strided_reads_use_one_eighth_of_each_sector() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 256 * 32, 1024, 256, 0);
    let r = counted(&gpu, "emu_count_read", 1, 256, 0, &p);
    assert_eq!(n(&r, "global.ld.requests"), 8);
    assert_eq!(n(&r, "global.ld.sectors"), 256);
    assert_eq!(n(&r, "global.ld.bytes"), 1024);
    assert_eq!(n(&r, "dram.unique_read_bytes"), 256 * 32);
    release(&gpu, p);
}

/// Every lane reads one word: one sector per request, and one sector of DRAM.
#[test]
fn a_broadcast_read_is_one_sector() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 64, 1024, 256, 1);
    let r = counted(&gpu, "emu_count_read", 1, 256, 0, &p);
    assert_eq!(n(&r, "global.ld.requests"), 8);
    assert_eq!(n(&r, "global.ld.sectors"), 8);
    assert_eq!(n(&r, "dram.unique_read_bytes"), 32);
    assert_eq!(n(&r, "dram.l2_read_bytes"), 32);
    release(&gpu, p);
}

/// A buffer read four times: requested 4x, unique and L2-model DRAM 1x.
#[test]
fn rereads_show_as_requested_bytes_not_dram_bytes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 1024, 1024, 256, 2);
    let r = counted(&gpu, "emu_count_read", 1, 256, 0, &p);
    assert_eq!(n(&r, "global.ld.requests"), 4 * 8);
    assert_eq!(n(&r, "global.ld.bytes"), 4 * 1024);
    assert_eq!(n(&r, "dram.unique_read_bytes"), 1024);
    assert_eq!(n(&r, "dram.l2_read_bytes"), 1024);
    release(&gpu, p);
}

/// 56 MiB read twice: in the bad order (all, then all again) the second pass misses the
/// 50 MiB LRU entirely; chunk by chunk it hits. Unique bytes are the same for both.
#[test]
fn the_l2_model_sees_the_order_of_rereads() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let bytes = 56usize << 20;
    let mut p = params(&gpu, 16, 4096, bytes as i32, 0);
    gpu.free(p.src);
    p.src = gpu.alloc::<u8>(bytes);
    gpu.write(p.src, &vec![1u8; bytes]);
    let bad = counted(&gpu, "emu_count_reread", 1, 1024, 0, &p);
    p.mode = 1;
    let good = counted(&gpu, "emu_count_reread", 1, 1024, 0, &p);
    for r in [&bad, &good] {
        assert_eq!(n(r, "global.ld.bytes"), 2 * bytes as u64);
        assert_eq!(n(r, "dram.unique_read_bytes"), bytes as u64);
    }
    assert_eq!(n(&bad, "dram.l2_read_bytes"), 2 * bytes as u64);
    assert_eq!(n(&good, "dram.l2_read_bytes"), bytes as u64);
    release(&gpu, p);
}

/// Bank conflicts: a warp's 4-byte accesses at strides 1, 2, 4 and 32 words cost 1, 2, 4 and
/// 32 wavefronts against an ideal of 1; a broadcast costs 1; 16-byte accesses go by
/// quarter-warps: 4 wavefronts when contiguous, 4 x 8 at a 128-byte stride; 8-byte accesses go
/// by half-warps: two halves reading the same 128 bytes cost 1 each.
#[test]
fn shared_wavefronts_follow_the_bank_rule() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let cases = [
        (0, 1, 1),
        (1, 2, 1),
        (2, 4, 1),
        (3, 32, 1),
        (4, 1, 1),
        (5, 4, 4),
        (6, 32, 4),
        (7, 2, 2),
    ];
    for (mode, wavefronts, ideal) in cases {
        let p = params(&gpu, 64, 128, 32, mode);
        let r = counted(&gpu, "emu_count_shared", 1, 32, 0, &p);
        assert_eq!(n(&r, "shared.ld.requests"), 1, "mode {mode}");
        assert_eq!(n(&r, "shared.ld.wavefronts"), wavefronts, "mode {mode}");
        assert_eq!(n(&r, "shared.ld.ideal"), ideal, "mode {mode}");
        if mode < 4 || mode == 5 || mode == 6 {
            assert_eq!(n(&r, "shared.st.wavefronts"), wavefronts, "mode {mode}");
            assert_eq!(n(&r, "shared.st.ideal"), ideal, "mode {mode}");
        }
        release(&gpu, p);
    }
}

/// ldmatrix.x4 is four phases of eight 16-byte rows: unswizzled rows 128 bytes apart share 4
/// banks (8 wavefronts a phase); XOR-swizzled chunks spread them (1 a phase).
#[test]
fn ldmatrix_wavefronts_on_swizzled_and_plain_tiles() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    for (mode, wavefronts) in [(0, 32), (1, 4)] {
        let p = params(&gpu, 64, 128, 32, mode);
        let r = counted(&gpu, "emu_count_ldmatrix", 1, 32, 0, &p);
        assert_eq!(n(&r, "shared.ldmatrix.requests"), 1);
        assert_eq!(
            n(&r, "shared.ldmatrix.wavefronts"),
            wavefronts,
            "mode {mode}"
        );
        assert_eq!(n(&r, "shared.ldmatrix.ideal"), 4);
        release(&gpu, p);
    }
}

fn tensor(r: &Value, op: &str) -> (u64, u64) {
    let list = r["tensor"].as_array().expect("a tensor list");
    let e = list
        .iter()
        .find(|e| e["op"] == op && e["dtype"] == "bf16")
        .unwrap_or_else(|| panic!("no {op} bf16 in {r}"));
    (e["count"].as_u64().unwrap(), e["flops"].as_u64().unwrap())
}

/// One mma.sync m16n8k16 per warp (4 warps) is 4 x 4096 FLOPs; a warpgroup's four wgmma
/// m64n64k16 are 4 x 131072.
#[test]
fn tensor_core_instructions_and_their_flops() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 64, 1024, 128, 0);
    let r = counted(&gpu, "emu_count_units", 1, 128, 16384, &p);
    assert_eq!(tensor(&r, "mma.m16n8k16"), (4, 4 * 2 * 16 * 8 * 16));
    release(&gpu, p);
    let p = params(&gpu, 64, 1024, 128, 1);
    let r = counted(&gpu, "emu_count_units", 1, 128, 16384, &p);
    assert_eq!(tensor(&r, "wgmma.m64n64k16"), (4, 4 * 2 * 64 * 64 * 16));
    release(&gpu, p);
}

/// cp.async: 128 threads x 16 bytes are 4 LDGSTS requests of 16 full sectors, 2048 async
/// bytes, and shared writes of 4 wavefronts per warp; atomics on one word are one request of
/// one sector per warp, read and written once in DRAM.
#[test]
fn cp_async_and_atomics() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 2048, 1024, 128, 2);
    let r = counted(&gpu, "emu_count_units", 1, 128, 4096, &p);
    assert_eq!(n(&r, "global.ldgsts.requests"), 4);
    assert_eq!(n(&r, "global.ldgsts.sectors"), 64);
    assert_eq!(n(&r, "async.cp_async_bytes"), 2048);
    assert_eq!(n(&r, "shared.cp_async.requests"), 4);
    assert_eq!(n(&r, "shared.cp_async.wavefronts"), 16);
    assert_eq!(n(&r, "global.ld.requests"), 0);
    release(&gpu, p);
    let p = params(&gpu, 64, 1024, 128, 3);
    let r = counted(&gpu, "emu_count_units", 1, 128, 0, &p);
    assert_eq!(n(&r, "global.atom.requests"), 4);
    assert_eq!(n(&r, "global.atom.sectors"), 4);
    assert_eq!(
        n(&r, "global.ld.requests"),
        0,
        "an atomic is not also a load"
    );
    assert_eq!(n(&r, "dram.unique_read_bytes"), 32);
    assert_eq!(n(&r, "dram.l2_write_bytes"), 32);
    assert_eq!(gpu.download::<u32>(p.word, 1), vec![128]);
    release(&gpu, p);
}

/// Sampling runs a prefix of the blocks and scales the counts to the grid; fractions outside
/// (0, 1] are refused.
#[test]
fn sampling_scales_to_the_whole_grid() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 16384, 16384, 1024, 0);
    assert_eq!(counters::moe_emu_set_sample(0.25), 0);
    let r = counted(&gpu, "emu_count_copy", 4, 256, 0, &p);
    assert_eq!(counters::moe_emu_set_sample(1.0), 0);
    assert_eq!(r["sampled"].as_f64(), Some(0.25));
    assert_eq!(n(&r, "global.ld.requests"), 32);
    assert_eq!(n(&r, "dram.unique_read_bytes"), 16384);
    for bad in [0.0, -1.0, 1.5, f64::NAN] {
        assert_eq!(counters::moe_emu_set_sample(bad), 1, "{bad}");
    }
    release(&gpu, p);
}

/// Counting off: no record, and the launch still runs.
#[test]
fn no_records_when_counting_is_off() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let gpu = Gpu::new();
    let p = params(&gpu, 16384, 16384, 1024, 0);
    counters::moe_emu_counters_enable(0);
    gpu.run("emu_count_copy", [4, 1, 1], [256, 1, 1], 0, &p);
    assert!(take().is_empty());
    release(&gpu, p);
}
