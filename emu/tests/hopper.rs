//! Hopper's asynchronous instructions on the emulator (emu/tests/kernels/hopper.cu): tiled tensor
//! copies against images of the box built here from the swizzle's definition, mbarrier phases,
//! elect.sync, cuTensorMapEncodeTiled's refusals, and planted bugs: a wait on a phase nobody
//! completes, a transaction count that never completes, copies nobody waits for, a bad
//! setmaxnreg.

mod common;

use std::ffi::c_void;

use common::{Gpu, assert_fails};
use cudarc::driver::sys::cudaError_enum as E;
use moe_emu::tmap::cuTensorMapEncodeTiled;

/// emu_test_tma's parameters.
#[repr(C, align(64))]
struct TmaParams {
    map: Map,
    out: u64,
    src: u64,
    lanes: u64,
    c0: i32,
    c1: i32,
    bytes: i32,
    mode: i32,
}

/// A CUtensorMap's 128 bytes, 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Map([u64; 16]);

/// The tensor: ROWS x COLS u16, element (r, c) = r * COLS + c + 1 (never 0, so a zero fill shows).
const ROWS: usize = 100;
const COLS: usize = 72;
const BF16: u32 = 9;

fn value(r: i64, c: i64) -> u16 {
    if r < 0 || c < 0 || r >= ROWS as i64 || c >= COLS as i64 {
        0
    } else {
        (r as usize * COLS + c as usize + 1) as u16
    }
}

/// A 2-D tiled map over the tensor at `addr`; the driver's result code.
fn encode(map: &mut Map, addr: u64, boxes: [u32; 2], swizzle: u32) -> i32 {
    let dims = [COLS as u64, ROWS as u64];
    let strides = [(COLS * 2) as u64];
    let es = [1u32, 1];
    // SAFETY: every pointer holds `rank` (strides rank - 1) entries; map is 128 aligned bytes.
    unsafe {
        cuTensorMapEncodeTiled(
            map.0.as_mut_ptr().cast(),
            BF16,
            2,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            es.as_ptr(),
            0,
            swizzle,
            0,
            0,
        ) as i32
    }
}

/// The box at (c0, c1) as shared memory holds it: rows of `b0` elements, each 16-byte chunk at
/// byte offset o moved to o ^ (((o >> 7) & (span / 16 - 1)) << 4) for a swizzle span of 32, 64
/// or 128 bytes (the destination is 1024-byte aligned, so its offset is its address).
fn expected(b: [u32; 2], c0: i32, c1: i32, swizzle: u32) -> Vec<u8> {
    let (b0, b1) = (b[0] as i64, b[1] as i64);
    let mut plain = Vec::new();
    for i1 in 0..b1 {
        for i0 in 0..b0 {
            plain.extend_from_slice(&value(c1 as i64 + i1, c0 as i64 + i0).to_le_bytes());
        }
    }
    let rows_in_repeat = [1usize, 2, 4, 8][swizzle as usize];
    let mut placed = vec![0u8; plain.len()];
    for o in (0..plain.len()).step_by(16) {
        let to = o ^ (((o >> 7) & (rows_in_repeat - 1)) << 4);
        placed[to..to + 16].copy_from_slice(&plain[o..o + 16]);
    }
    placed
}

struct Tensor {
    gpu: Gpu,
    addr: u64,
}

fn tensor() -> Tensor {
    let gpu = Gpu::new();
    let data: Vec<u16> = (0..ROWS * COLS).map(|i| (i + 1) as u16).collect();
    let addr = gpu.upload(&data);
    Tensor { gpu, addr }
}

fn params(map: Map, out: u64, bytes: usize, c: (i32, i32), mode: i32) -> TmaParams {
    TmaParams {
        map,
        out,
        src: 0,
        lanes: 0,
        c0: c.0,
        c1: c.1,
        bytes: bytes as i32,
        mode,
    }
}

#[test]
fn tiled_copies_land_as_the_swizzle_places_them_with_zeros_outside() {
    let t = tensor();
    // Inner box bytes within each swizzle's span; the rows are enough for several repeats.
    for (swizzle, b0) in [(0u32, 40u32), (1, 16), (2, 32), (3, 64)] {
        let boxes = [b0, 24];
        let mut map = Map([0; 16]);
        assert_eq!(encode(&mut map, t.addr, boxes, swizzle), 0);
        let bytes = (b0 * 24 * 2) as usize;
        for c in [
            (0, 0),
            (8, 37),
            (COLS as i32 - 10, ROWS as i32 - 5),
            (-8, -3),
        ] {
            let out = t.gpu.alloc::<u8>(bytes);
            let p = params(map, out, bytes, c, 0);
            t.gpu
                .run("emu_test_tma", [1, 1, 1], [128, 1, 1], bytes as u32, &p);
            let got: Vec<u8> = t.gpu.download(out, bytes);
            assert!(
                got == expected(boxes, c.0, c.1, swizzle),
                "swizzle {swizzle}, box {boxes:?} at {c:?}"
            );
            t.gpu.free(out);
        }
    }
}

#[test]
fn a_destination_read_before_its_barrier_completes_holds_the_old_bytes() {
    let t = tensor();
    let boxes = [64, 16];
    let mut map = Map([0; 16]);
    assert_eq!(encode(&mut map, t.addr, boxes, 3), 0);
    let bytes = 64 * 16 * 2;
    let out = t.gpu.alloc::<u8>(2 * bytes);
    t.gpu.run(
        "emu_test_tma",
        [1, 1, 1],
        [128, 1, 1],
        bytes as u32,
        &params(map, out, bytes, (4, 9), 1),
    );
    let got: Vec<u8> = t.gpu.download(out, 2 * bytes);
    assert!(
        got[..bytes].iter().all(|&b| b == 0xa5),
        "read before the wait"
    );
    assert!(
        got[bytes..] == expected(boxes, 4, 9, 3),
        "read after the wait"
    );
    t.gpu.free(out);
}

#[test]
fn a_plain_bulk_copy_lands_at_its_wait() {
    let t = tensor();
    let src: Vec<u8> = (0..256).map(|i| (i * 7 + 3) as u8).collect();
    let s = t.gpu.upload(&src);
    let out = t.gpu.alloc::<u8>(256);
    let mut p = params(Map([0; 16]), out, 256, (0, 0), 5);
    p.src = s;
    t.gpu.run("emu_test_tma", [1, 1, 1], [128, 1, 1], 256, &p);
    assert_eq!(t.gpu.download::<u8>(out, 256), src);
}

#[test]
fn elect_sync_chooses_one_lane_of_the_mask_the_highest_here() {
    let t = tensor();
    let lanes = t.gpu.upload(&[7u32; 64]);
    let mut p = params(Map([0; 16]), 0, 0, (0, 0), 6);
    p.lanes = lanes;
    t.gpu.run("emu_test_tma", [1, 1, 1], [128, 1, 1], 0, &p);
    let got: Vec<u32> = t.gpu.download(lanes, 64);
    for (i, &g) in got.iter().enumerate() {
        let in_mask = (0xf0f0_f0f0u32 >> (i % 32)) & 1 == 1;
        let want = if !in_mask {
            7
        } else if i % 32 == 31 {
            1
        } else {
            0
        };
        assert_eq!(g, want, "thread {i}");
    }
}

/// emu_test_tma in a planted `mode` on a 64 x 8 box under the 128-byte swizzle.
fn planted_tma(mode: i32) -> Result<(), common::Failure> {
    let t = tensor();
    let mut map = Map([0; 16]);
    assert_eq!(encode(&mut map, t.addr, [64, 8], 3), 0);
    let bytes = 64 * 8 * 2;
    let out = t.gpu.alloc::<u8>(bytes);
    let r = t.gpu.launch(
        "emu_test_tma",
        [1, 1, 1],
        [128, 1, 1],
        bytes as u32,
        &params(map, out, bytes, (0, 0), mode),
    );
    t.gpu.free(out);
    r
}

#[test]
fn planted_a_wait_on_a_phase_nobody_completes_is_a_deadlock() {
    assert_fails(
        planted_tma(2),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &[
            "deadlock",
            "emu_test_tma",
            "128 threads",
            "phase of parity 1",
            "in phase 1",
        ],
    );
}

#[test]
fn planted_a_transaction_count_that_never_completes_is_a_deadlock() {
    assert_fails(
        planted_tma(3),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["deadlock", "phase of parity 0", "tx-count 16"],
    );
}

#[test]
fn planted_copies_nobody_waits_for_fail_the_block() {
    assert_fails(
        planted_tma(4),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["still in flight", "1024 bytes"],
    );
}

#[test]
fn planted_setmaxnreg_outside_its_range_fails() {
    let t = tensor();
    let r = t.gpu.launch(
        "emu_test_tma",
        [1, 1, 1],
        [128, 1, 1],
        0,
        &params(Map([0; 16]), 0, 0, (0, 0), 7),
    );
    assert_fails(r, E::CUDA_ERROR_LAUNCH_FAILED, &["setmaxnreg.inc with 20"]);
}

#[test]
fn tensor_maps_the_driver_refuses() {
    let t = tensor();
    let mut map = Map([0; 16]);
    // 128 inner bytes past the 64-byte swizzle span; a box dimension past 256; inner bytes not
    // a multiple of 16.
    for (boxes, swizzle, words) in [
        ([64u32, 8u32], 2u32, "past the 64-byte swizzle span"),
        ([64, 257], 3, "boxDim[1] = 257"),
        ([12, 8], 0, "not a multiple of 16"),
    ] {
        assert_eq!(
            encode(&mut map, t.addr, boxes, swizzle),
            E::CUDA_ERROR_INVALID_VALUE as i32
        );
        let msg = moe_emu::error_string(E::CUDA_ERROR_INVALID_VALUE);
        assert!(msg.contains(words), "`{words}` not in: {msg}");
    }
    assert_eq!(
        encode(&mut map, t.addr, [32, 8], 3),
        E::CUDA_ERROR_NOT_SUPPORTED as i32,
        "a 64-byte row under the 128-byte swizzle"
    );
    assert_eq!(
        encode(&mut map, t.addr + 8, [64, 8], 3),
        E::CUDA_ERROR_INVALID_VALUE as i32
    );
    assert!(moe_emu::error_string(E::CUDA_ERROR_INVALID_VALUE).contains("16-byte aligned"));
}

/// emu_test_wgmma's parameters.
#[repr(C)]
struct WgmmaParams {
    a: u64,
    b: u64,
    d: u64,
    swizzle: i32,
    mode: i32,
}

/// Small integers in bf16 (exact, and so is every sum here in f32), seeded.
fn small_ints(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 9) as f32 - 4.0
        })
        .collect()
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| (x.to_bits() >> 16) as u16).collect()
}

fn wgmma(
    gpu: &Gpu,
    a: &[f32],
    b: &[f32],
    swizzle: i32,
    mode: i32,
) -> Result<Vec<f32>, common::Failure> {
    let (ad, bd) = (gpu.upload(&bf16_bits(a)), gpu.upload(&bf16_bits(b)));
    let d = gpu.alloc::<f32>(64 * 64);
    let p = WgmmaParams {
        a: ad,
        b: bd,
        d,
        swizzle,
        mode,
    };
    let r = gpu.launch("emu_test_wgmma", [1, 1, 1], [128, 1, 1], 16384, &p);
    let out = gpu.download(d, 64 * 64);
    for x in [ad, bd, d] {
        gpu.free(x);
    }
    r.map(|()| out)
}

#[test]
fn wgmma_computes_a_times_b_transposed_in_every_canonical_layout() {
    let gpu = Gpu::new();
    let a = small_ints(1, 64 * 64);
    let b = small_ints(2, 64 * 64);
    // D[m][n] = sum over k of A[m][k] B[n][k], both K-major: exact in f32 for these values.
    let mut want = vec![0f32; 64 * 64];
    for m in 0..64 {
        for n in 0..64 {
            want[m * 64 + n] = (0..64).map(|k| a[m * 64 + k] * b[n * 64 + k]).sum();
        }
    }
    for swizzle in 0..4 {
        let got = wgmma(&gpu, &a, &b, swizzle, 0).unwrap();
        let bad = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(
            bad, 0,
            "descriptor swizzle {swizzle}: {bad} of 4096 outputs differ"
        );
    }
}

#[test]
fn planted_wgmma_misuses_are_caught() {
    let gpu = Gpu::new();
    let (a, b) = (small_ints(3, 64 * 64), small_ints(4, 64 * 64));
    for (mode, words) in [
        (1, &["no wgmma.fence before it"][..]),
        (2, &["in flight", "no wgmma.wait_group"][..]),
        (3, &["generic proxy", "fence.proxy.async"][..]),
        (4, &["wrote its accumulators", "in flight"][..]),
    ] {
        assert_fails(
            wgmma(&gpu, &a, &b, 1, mode).map(|_| ()),
            E::CUDA_ERROR_LAUNCH_FAILED,
            words,
        );
    }
}

#[test]
fn matrix_descriptors_carry_each_field_where_the_isa_puts_it() {
    let gpu = Gpu::new();
    let out = gpu.alloc::<u64>(4);
    #[repr(C)]
    struct DescParams {
        out: u64,
    }
    // 1 KB of dynamic shared memory: it ends the window, so its offset is 256 KiB - 1 KiB.
    gpu.run(
        "emu_test_desc",
        [1, 1, 1],
        [32, 1, 1],
        1024,
        &DescParams { out },
    );
    let got: Vec<u64> = gpu.download(out, 4);
    let start = (256 * 1024 - 1024 + 0x40) as u64;
    for (i, &d) in got.iter().enumerate() {
        // PTX ISA, "Matrix Descriptor Format": bits 13-0 start address >> 4, 29-16 leading byte
        // offset >> 4, 45-32 stride byte offset >> 4, 51-49 base offset, 63-62 swizzle (0 none,
        // 1 128 B, 2 64 B, 3 32 B); the rest zero.
        assert_eq!(d & 0x3fff, (start & 0x3ffff) >> 4, "start, swizzle {i}");
        assert_eq!((d >> 16) & 0x3fff, 128 >> 4, "LBO, swizzle {i}");
        assert_eq!((d >> 32) & 0x3fff, 1024 >> 4, "SBO, swizzle {i}");
        assert_eq!((d >> 49) & 7, 0, "base offset, swizzle {i}");
        assert_eq!(d >> 62, i as u64, "swizzle field");
        let fields = 0x3fff | (0x3fff << 16) | (0x3fff << 32) | (7 << 49) | (3 << 62);
        assert_eq!(d & !fields, 0, "bits outside the fields, swizzle {i}");
    }
    gpu.free(out);
}

#[test]
fn copies_land_in_every_thread_order() {
    use moe_emu::{Order, with_order};
    // In reverse order the waiting threads block before thread 0 issues the copy: its issue
    // must wake them, and their wait lands it.
    let t = tensor();
    let mut map = Map([0; 16]);
    assert_eq!(encode(&mut map, t.addr, [64, 24], 3), 0);
    let bytes = 64 * 24 * 2;
    for order in [Order::Forward, Order::Reverse, Order::Shuffle(3)] {
        let out = t.gpu.alloc::<u8>(bytes);
        let p = params(map, out, bytes, (8, 37), 0);
        with_order(order, || {
            t.gpu
                .run("emu_test_tma", [1, 1, 1], [128, 1, 1], bytes as u32, &p)
        });
        let got: Vec<u8> = t.gpu.download(out, bytes);
        assert!(got == expected([64, 24], 8, 37, 3), "{order:?}");
        t.gpu.free(out);
    }
}
