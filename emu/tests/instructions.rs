//! Each instruction twin against an independent statement of the PTX ISA.
//!
//! The fragment layouts are restated here as CuTe states them (cute/atom/mma_traits_sm80.hpp,
//! SM80_16x8x16_F32BF16BF16F32_TN, and cute/atom/copy_traits_sm75.hpp, SM75_U32x4_LDSM_N and
//! SM75_U16x8_LDSM_T): a layout `shape : stride` maps (thread, value) to an offset, each
//! coordinate split first-mode-fastest. This is a second reading, written apart from
//! emu/runtime/warp.cpp's, which follows the PTX ISA's tables; a few worked examples from those
//! tables are asserted too. Where the two readings agree but both are wrong, hardware is the
//! judge: the crate's GEMM tests on a GPU.

// Matrices are indexed by (row, column) as the PTX ISA's tables state them.
#![allow(clippy::needless_range_loop)]

mod common;

use common::Gpu;

/// A CuTe layout of two modes (thread, value), each a list of (extent, stride).
struct Layout {
    thread: &'static [(usize, usize)],
    value: &'static [(usize, usize)],
}

impl Layout {
    fn offset(&self, t: usize, v: usize) -> usize {
        let part = |mut i: usize, modes: &[(usize, usize)]| {
            let mut off = 0;
            for &(extent, stride) in modes {
                off += (i % extent) * stride;
                i /= extent;
            }
            off
        };
        part(t, self.thread) + part(v, self.value)
    }
}

// SM80_16x8x16 (all of its float variants share them): A -> m + 16 k, B -> n + 8 k, C -> m + 16 n.
const MMA_A: Layout = Layout {
    thread: &[(4, 32), (8, 1)],
    value: &[(2, 16), (2, 8), (2, 128)],
};
const MMA_B: Layout = Layout {
    thread: &[(4, 16), (8, 1)],
    value: &[(2, 8), (2, 64)],
};
const MMA_C: Layout = Layout {
    thread: &[(4, 32), (8, 1)],
    value: &[(2, 16), (2, 8)],
};

fn a_pos(lane: usize, v: usize) -> (usize, usize) {
    let o = MMA_A.offset(lane, v);
    (o % 16, o / 16) // (m, k)
}
fn b_pos(lane: usize, v: usize) -> (usize, usize) {
    let o = MMA_B.offset(lane, v);
    (o / 8, o % 8) // (k, n)
}
fn c_pos(lane: usize, v: usize) -> (usize, usize) {
    let o = MMA_C.offset(lane, v);
    (o % 16, o / 16) // (m, n)
}

#[test]
fn layouts_agree_with_the_ptx_isa_worked_examples() {
    // PTX ISA 9.7.14.5.8, read for these tests: lane 5 (g 1, t 1) holds a0 = A[1][2],
    // a2 = A[9][2], a4 = A[1][10], a6 = A[9][10]; b0 = B[2][1], b2 = B[10][1]; c0 = D[1][2],
    // c3 = D[9][3]. Lane 31: a7 = A[15][15], b3 = B[15][7], c3 = D[15][7].
    assert_eq!(a_pos(5, 0), (1, 2));
    assert_eq!(a_pos(5, 2), (9, 2));
    assert_eq!(a_pos(5, 4), (1, 10));
    assert_eq!(a_pos(5, 6), (9, 10));
    assert_eq!(b_pos(5, 0), (2, 1));
    assert_eq!(b_pos(5, 2), (10, 1));
    assert_eq!(c_pos(5, 0), (1, 2));
    assert_eq!(c_pos(5, 3), (9, 3));
    assert_eq!(a_pos(31, 7), (15, 15));
    assert_eq!(b_pos(31, 3), (15, 7));
    assert_eq!(c_pos(31, 3), (15, 7));
    // Every element of A, B and C is held by exactly one (lane, value).
    for (layout, n) in [(&MMA_A, 256), (&MMA_B, 128), (&MMA_C, 128)] {
        let mut seen = vec![0; n];
        for lane in 0..32 {
            for v in 0..n / 32 {
                seen[layout.offset(lane, v)] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
    }
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}
fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

#[repr(C)]
struct RegsParams {
    out: u64,
    a: u64,
    b: u64,
    c: u64,
    kind: i32,
    pad: i32,
}

/// Runs one emulated mma over A [16][16], B [16][8] (k, n), C [16][8] laid out in registers by
/// the CuTe layouts (value 2r in the low half of register r), and reads D back the same way.
fn mma(
    gpu: &Gpu,
    kind: i32,
    a: &[[f32; 16]; 16],
    b: &[[f32; 8]; 16],
    c: &[[f32; 8]; 16],
) -> [[f32; 8]; 16] {
    let bits = |x: f32| u32::from(if kind == 0 { bf16_bits(x) } else { f16_bits(x) });
    let mut ra = vec![0u32; 32 * 4];
    let mut rb = vec![0u32; 32 * 2];
    let mut rc = vec![0f32; 32 * 4];
    for lane in 0..32 {
        for v in 0..8 {
            let (m, k) = a_pos(lane, v);
            ra[lane * 4 + v / 2] |= bits(a[m][k]) << (16 * (v % 2));
        }
        for v in 0..4 {
            let (k, n) = b_pos(lane, v);
            rb[lane * 2 + v / 2] |= bits(b[k][n]) << (16 * (v % 2));
        }
        for v in 0..4 {
            let (m, n) = c_pos(lane, v);
            rc[lane * 4 + v] = c[m][n];
        }
    }
    let (da, db, dc) = (gpu.upload(&ra), gpu.upload(&rb), gpu.upload(&rc));
    let out = gpu.alloc::<u32>(128);
    let p = RegsParams {
        out,
        a: da,
        b: db,
        c: dc,
        kind,
        pad: 0,
    };
    gpu.run("emu_test_mma", [1, 1, 1], [32, 1, 1], 0, &p);
    let got: Vec<u32> = gpu.download(out, 128);
    let mut d = [[0f32; 8]; 16];
    for lane in 0..32 {
        for v in 0..4 {
            let (m, n) = c_pos(lane, v);
            d[m][n] = f32::from_bits(got[lane * 4 + v]);
        }
    }
    for p in [da, db, dc, out] {
        gpu.free(p);
    }
    d
}

/// D = C + sum_k A B in k order, in f64, rounded once: the emulator's stated arithmetic.
fn mma_ref(a: &[[f32; 16]; 16], b: &[[f32; 8]; 16], c: &[[f32; 8]; 16]) -> [[f32; 8]; 16] {
    let mut d = [[0f32; 8]; 16];
    for m in 0..16 {
        for n in 0..8 {
            let mut acc = f64::from(c[m][n]);
            for k in 0..16 {
                acc += f64::from(a[m][k]) * f64::from(b[k][n]);
            }
            d[m][n] = acc as f32;
        }
    }
    d
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// An integer in [-r, r] as f32.
    fn int(&mut self, r: i64) -> f32 {
        (self.next() as i64 % (2 * r + 1) - r) as f32
    }
    fn unit(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1 << 24) as f32 * 2.0 - 1.0
    }
}

#[test]
fn mma_m16n8k16_places_every_element_as_cute_does() {
    let gpu = Gpu::new();
    let mut rng = Lcg(7);
    for kind in [0, 1] {
        // Small integers: every product and sum is exact, so D must match exactly whatever
        // the order of the sum; a misplaced element changes the result.
        let mut a = [[0f32; 16]; 16];
        let mut b = [[0f32; 8]; 16];
        let mut c = [[0f32; 8]; 16];
        a.iter_mut().flatten().for_each(|x| *x = rng.int(8));
        b.iter_mut().flatten().for_each(|x| *x = rng.int(8));
        c.iter_mut().flatten().for_each(|x| *x = rng.int(100));
        assert_eq!(
            mma(&gpu, kind, &a, &b, &c),
            mma_ref(&a, &b, &c),
            "kind {kind}"
        );
        // One non-zero element at a time in A and in B: D shows where it went.
        for (m, k) in [(0, 0), (1, 2), (9, 3), (7, 8), (15, 15), (8, 9)] {
            let mut a1 = [[0f32; 16]; 16];
            a1[m][k] = 1.0;
            let d = mma(&gpu, kind, &a1, &b, &[[0.0; 8]; 16]);
            for (mm, row) in d.iter().enumerate() {
                for (n, &v) in row.iter().enumerate() {
                    assert_eq!(
                        v,
                        if mm == m { b[k][n] } else { 0.0 },
                        "A[{m}][{k}], D[{mm}][{n}]"
                    );
                }
            }
        }
        // Random values: one rounding of the f64 sum.
        a.iter_mut()
            .flatten()
            .for_each(|x| *x = half::bf16::from_f32(rng.unit()).to_f32());
        b.iter_mut()
            .flatten()
            .for_each(|x| *x = half::bf16::from_f32(rng.unit()).to_f32());
        c.iter_mut().flatten().for_each(|x| *x = rng.unit() * 4.0);
        assert_eq!(mma(&gpu, kind, &a, &b, &c), mma_ref(&a, &b, &c));
    }
}

#[test]
fn mma_of_zero_rows_keeps_ieee_signed_zeros_and_nan() {
    let gpu = Gpu::new();
    let mut a = [[0f32; 16]; 16];
    let mut b = [[0f32; 8]; 16];
    let mut c = [[0f32; 8]; 16];
    let mut rng = Lcg(3);
    b.iter_mut().flatten().for_each(|x| *x = rng.int(4));
    // Row 0: +0 everywhere, C = -0 -> +0. Row 1: -0 in A, C = -0, B all positive -> -0.
    // Row 2: a real row. Row 3: zeros against an infinity in B -> NaN.
    for n in 0..8 {
        c[0][n] = -0.0;
        c[1][n] = -0.0;
        c[3][n] = 1.0;
    }
    for k in 0..16 {
        a[1][k] = -0.0;
        a[2][k] = rng.int(3);
    }
    b.iter_mut().flatten().for_each(|x| *x = x.abs() + 1.0);
    let d = mma(&gpu, 0, &a, &b, &c);
    let want = mma_ref(&a, &b, &c);
    for m in 0..16 {
        for n in 0..8 {
            assert_eq!(d[m][n].to_bits(), want[m][n].to_bits(), "D[{m}][{n}]");
        }
    }
    assert!(d[0][0].to_bits() == 0 && d[1][0].to_bits() == (-0.0f32).to_bits());
    // An infinity in B: zero rows give 0 * inf = NaN in its column, as the full sum does.
    b[4][2] = f32::INFINITY;
    let d = mma(&gpu, 0, &a, &b, &c);
    let want = mma_ref(&a, &b, &c);
    for m in 0..16 {
        for n in 0..8 {
            let same = d[m][n].to_bits() == want[m][n].to_bits()
                || (d[m][n].is_nan() && want[m][n].is_nan());
            assert!(same, "D[{m}][{n}] = {} against {}", d[m][n], want[m][n]);
        }
    }
    assert!(d[0][2].is_nan() && d[3][2].is_nan() && !d[3][1].is_nan());
}

#[repr(C)]
struct LdmatrixParams {
    out: u64,
    src: u64,
    rows: u64,
    count: i32,
    trans: i32,
}

#[test]
fn ldmatrix_gives_each_lane_its_fragment() {
    // CuTe's destination layouts, as (lane, bit) -> bit offset into the matrices, 16 bits an
    // element: non-trans (32,(32,4)):(32,(1,1024)); trans ((4,8),(16,2)):((256,16),(1,128)) per
    // register, the next register 1024 bits on.
    let element = |lane: usize, reg: usize, half: usize, trans: bool| -> usize {
        let bit = if trans {
            256 * (lane % 4) + 16 * (lane / 4) + 128 * half + 1024 * reg
        } else {
            32 * lane + 16 * half + 1024 * reg
        };
        bit / 16 // (matrix, row, column) = (e / 64, e / 8 % 8, e % 8)
    };
    let gpu = Gpu::new();
    let src: Vec<u16> = (0..256u16).map(|e| 0x4000 | e).collect();
    let dsrc = gpu.upload(&src);
    for (count, trans) in [
        (1, false),
        (2, false),
        (4, false),
        (1, true),
        (2, true),
        (4, true),
    ] {
        for scramble in [false, true] {
            // rows[l]: the source row (8 * matrix + row) whose address lane l gives. Lanes past
            // 8 * count give rows nothing reads.
            let rows: Vec<i32> = (0..32)
                .map(|l| if scramble { (l * 7 + 3) % 32 } else { l })
                .collect();
            let drows = gpu.upload(&rows);
            let out = gpu.alloc::<u32>(128);
            let p = LdmatrixParams {
                out,
                src: dsrc,
                rows: drows,
                count,
                trans: trans as i32,
            };
            gpu.run("emu_test_ldmatrix", [1, 1, 1], [32, 1, 1], 0, &p);
            let got: Vec<u32> = gpu.download(out, 128);
            for lane in 0..32 {
                for reg in 0..count as usize {
                    for half in 0..2 {
                        let e = element(lane, reg, half, trans);
                        let (m, r, col) = (e / 64, e / 8 % 8, e % 8);
                        // Row r of matrix m is the source row whose address lane 8 m + r gave.
                        let want = src[rows[8 * m + r] as usize * 8 + col];
                        let have = (got[lane * 4 + reg] >> (16 * half)) as u16;
                        assert_eq!(
                            have, want,
                            "x{count} trans={trans} lane {lane} reg {reg} half {half}"
                        );
                    }
                }
                for reg in count as usize..4 {
                    assert_eq!(
                        got[lane * 4 + reg],
                        0,
                        "register {reg} written by ldmatrix.x{count}"
                    );
                }
            }
            gpu.free(drows);
            gpu.free(out);
        }
    }
    // Worked examples of the PTX ISA's figure, as read for these tests: lane 5 of .x4 gets in
    // register 2 matrix 2, row 1, columns 2 (low) and 3; with .trans, rows 2 and 3 of column 1.
    assert_eq!(element(5, 2, 0, false), 2 * 64 + 8 + 2);
    assert_eq!(element(5, 2, 1, false), 2 * 64 + 8 + 3);
    assert_eq!(element(5, 2, 0, true), 2 * 64 + 2 * 8 + 1);
    assert_eq!(element(5, 2, 1, true), 2 * 64 + 3 * 8 + 1);
    gpu.free(dsrc);
}

#[repr(C)]
struct CopyParams {
    out: u64,
    src: u64,
    mode: i32,
    src_bytes: i32,
}

const THREADS: usize = 64;
const OLD: u32 = 0xdead_0000;

fn cp_async(gpu: &Gpu, mode: i32, src_bytes: i32) -> (Vec<u32>, Vec<u32>) {
    // Two groups' sources: word w of thread t is 0x1000 t + w, then 0x2000 t + w + 0x100000.
    let src: Vec<u32> = (0..2 * THREADS * 4)
        .map(|i| {
            let (g, t, w) = (i / (THREADS * 4), i / 4 % THREADS, i % 4);
            (g as u32 * 0x100000) + 0x1000 * t as u32 + w as u32
        })
        .collect();
    let dsrc = gpu.upload(&src);
    let out = gpu.upload(&vec![0u32; THREADS * 16]);
    let p = CopyParams {
        out,
        src: dsrc,
        mode,
        src_bytes,
    };
    gpu.run(
        "emu_test_cp_async",
        [1, 1, 1],
        [THREADS as u32, 1, 1],
        0,
        &p,
    );
    let got = gpu.download(out, THREADS * 16);
    gpu.free(dsrc);
    gpu.free(out);
    (got, src)
}

#[test]
fn cp_async_bytes_land_at_the_wait_that_covers_their_group() {
    let gpu = Gpu::new();
    let old = |t: usize| OLD + t as u32;
    // A copy, a commit and wait_group 0: the data.
    let (got, src) = cp_async(&gpu, 0, 16);
    for t in 0..THREADS {
        assert_eq!(got[16 * t..16 * t + 4], src[4 * t..4 * t + 4], "thread {t}");
    }
    // The planted missing wait: the read before it sees the old bytes, the one after the data.
    let (got, src) = cp_async(&gpu, 1, 16);
    for t in 0..THREADS {
        assert_eq!(
            got[16 * t..16 * t + 4],
            [old(t); 4],
            "thread {t} read before its wait"
        );
        assert_eq!(got[16 * t + 4..16 * t + 8], src[4 * t..4 * t + 4]);
    }
    // src-size: that many bytes, then zeros.
    for bytes in [0, 4, 12] {
        let (got, src) = cp_async(&gpu, 2, bytes);
        for t in 0..THREADS {
            for w in 0..4 {
                let want = if 4 * w < bytes as usize {
                    src[4 * t + w]
                } else {
                    0
                };
                assert_eq!(
                    got[16 * t + w],
                    want,
                    "src-size {bytes}, thread {t}, word {w}"
                );
            }
        }
    }
    // Two groups, wait_group 1: the first has landed, the second not yet; wait_group 0: both.
    let (got, src) = cp_async(&gpu, 3, 16);
    let second = |t: usize| &src[4 * THREADS + 4 * t..4 * THREADS + 4 * t + 4];
    for t in 0..THREADS {
        assert_eq!(got[16 * t..16 * t + 4], src[4 * t..4 * t + 4]);
        assert_eq!(&got[16 * t + 4..16 * t + 8], second(t));
    }
    // A copy not committed yet is not covered by wait_group 0; wait_all commits it first.
    let (got, src) = cp_async(&gpu, 4, 16);
    for t in 0..THREADS {
        assert_eq!(got[16 * t..16 * t + 4], src[4 * t..4 * t + 4]);
        assert_eq!(&got[16 * t + 4..16 * t + 8], second(t));
    }
    // The wait is per thread: a neighbour's slot, read after a barrier but before the
    // neighbour's wait, still holds the old bytes.
    let (got, _) = cp_async(&gpu, 5, 16);
    for t in 0..THREADS {
        assert_eq!(
            got[16 * t..16 * t + 4],
            [old((t + 1) % THREADS); 4],
            "thread {t}"
        );
    }
}

#[repr(C)]
struct WarpParams {
    out: u64,
    mode: i32,
    pad: i32,
}

fn warp(gpu: &Gpu, mode: i32) -> Result<Vec<i32>, common::Failure> {
    let out = gpu.upload(&vec![-7i32; 64]);
    let r = gpu.launch(
        "emu_test_warp",
        [1, 1, 1],
        [64, 1, 1],
        0,
        &WarpParams { out, mode, pad: 0 },
    );
    let got = gpu.download(out, 64);
    gpu.free(out);
    r.map(|()| got)
}

#[test]
fn warp_collectives_follow_the_ptx_isa() {
    let gpu = Gpu::new();
    let got = warp(&gpu, 0).unwrap();
    assert_eq!(got, (0..64).map(|t| t ^ 1).collect::<Vec<i32>>());
    // Exited lanes vote 0 (the CUDA programming guide: exited threads are inactive).
    let got = warp(&gpu, 2).unwrap();
    for t in 0..64 {
        assert_eq!(
            got[t],
            if t % 32 < 16 { 0x0000ffff } else { -7 },
            "thread {t}"
        );
    }
    let got = warp(&gpu, 6).unwrap();
    for (t, &v) in got.iter().enumerate() {
        assert_eq!(v as u32, 0x1111_1111u32 << (t % 4), "thread {t}");
    }
    // shfl.up: lane 0 is out of range and keeps its own value.
    let got = warp(&gpu, 7).unwrap();
    for (t, &v) in got.iter().enumerate() {
        assert_eq!(
            v,
            if t % 32 == 0 { t as i32 } else { t as i32 - 1 },
            "thread {t}"
        );
    }
}
