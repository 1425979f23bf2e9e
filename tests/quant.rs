//! Compressed expert weights. On the CPU: packers, decoders and checkpoint readers against
//! hand-worked and independently computed values, quantisation error bounds, and refusal of
//! malformed input. On the GPU: the dequantise kernels against the CPU decoders bit for bit, and
//! the fused GEMV (and the prefill path) against the f64 reference of the decoded weights.

mod common;

use std::sync::Arc;

use half::{bf16, f16};
use moe_kernels::activation::{Act, GateLayout, GatedAct};
use moe_kernels::check::{self, Tolerance};
use moe_kernels::gemm::reference::{GroupedGemmRef, grouped_gemm};
use moe_kernels::gemm::{Epilogue, GemmOptions, ScaleAt};
use moe_kernels::permute::{self, Layout, Plan, reference as plan_ref};
use moe_kernels::quant::{
    self, Dictionary, Fp8Matrix, GptqVersion, HostTensor, IntMatrix, Mxfp4Matrix, QuantGemvVersion,
    QuantLayer, QuantMatrix, TernaryMatrix, e2m1_from_f64, e2m1_to_f32, e4m3_from_f32, e4m3_to_f32,
    e8m0_to_f32, import_awq, import_gptq, ternarize,
};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Error, Float};

/// Gaussian weights with a few large outliers, as trained Linear weights have.
fn weights(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = rng.normal() * 0.02;
            (if i % 997 == 5 { x * 10.0 } else { x }) as f32
        })
        .collect()
}

fn shape_err<T: std::fmt::Debug>(r: Result<T, Error>, arg: &str) -> String {
    match r {
        Err(e @ Error::Shape { arg: a, .. }) if a == arg => e.to_string(),
        other => panic!("expected a shape error on `{arg}`, got {other:?}"),
    }
}

// ---------------------------------------------------------------- group-wise integers

#[test]
fn int_codes_round_trip_and_decode_by_formula() {
    // Random codes packed here, independently of the crate: the container must give the same
    // codes back, and decode to (q - z) * s with the right group.
    let mut rng = Rng::new(11);
    for (bits, group, zp, act_order) in [
        (4, 32, true, false),
        (4, 64, false, false),
        (8, 128, true, false),
        (8, 32, false, true),
        (4, 128, true, true),
    ] {
        let (n, kd) = (5, 256);
        let groups = kd / group;
        let q: Vec<u32> = (0..n * kd).map(|_| rng.below(1 << bits) as u32).collect();
        let per = 32 / bits as usize;
        let mut packed = vec![0u32; n * kd / per];
        for (i, &v) in q.iter().enumerate() {
            packed[i / per] |= v << ((i % per) * bits as usize);
        }
        let scales: Vec<f16> = (0..n * groups)
            .map(|_| f16::from_f64(rng.uniform(1e-3, 2e-2)))
            .collect();
        let zeros: Vec<u8> = (0..n * groups)
            .map(|_| rng.below(1 << bits) as u8)
            .collect();
        let g_idx: Vec<u32> = (0..kd).map(|_| rng.below(groups as u64) as u32).collect();
        let m = IntMatrix::new(
            bits,
            group,
            n,
            kd,
            packed,
            scales.clone(),
            zp.then(|| zeros.clone()),
            act_order.then(|| g_idx.clone()),
        )
        .unwrap();
        let decoded = m.decode();
        for r in 0..n {
            for k in 0..kd {
                assert_eq!(m.code(r, k), q[r * kd + k]);
                let g = if act_order {
                    g_idx[k] as usize
                } else {
                    k / group
                };
                let z = if zp {
                    i32::from(zeros[r * groups + g])
                } else {
                    1 << (bits - 1)
                };
                let want = (q[r * kd + k] as i32 - z) as f32 * scales[r * groups + g].to_f32();
                assert_eq!(
                    decoded[r * kd + k].to_bits(),
                    want.to_bits(),
                    "b{bits} g{group} ({r},{k})"
                );
            }
        }
    }
}

#[test]
fn int_quantisation_error_is_at_most_half_a_step() {
    let mut rng = Rng::new(12);
    let (n, kd) = (7, 384);
    for bits in [4, 8] {
        for group in [32, 64, 128] {
            for zp in [false, true] {
                let w = weights(&mut rng, n * kd);
                let m = IntMatrix::quantize(&w, n, kd, bits, group, zp).unwrap();
                let d = m.decode();
                let (mut worst, mut rms) = (0f64, 0f64);
                for r in 0..n {
                    for k in 0..kd {
                        let s = f64::from(m.scales()[r * (kd / group) + k / group].to_f32());
                        let err = (f64::from(d[r * kd + k]) - f64::from(w[r * kd + k])).abs();
                        worst = worst.max(err / s);
                        rms += err * err;
                    }
                }
                let rms = (rms / (n * kd) as f64).sqrt();
                println!("int{bits} g{group} zp={zp}: max error {worst:.4} steps, rms {rms:.3e}");
                assert!(
                    worst <= 0.5 + 1e-6,
                    "int{bits} g{group} zp={zp}: {worst} steps"
                );
            }
        }
    }
    // Zero stays exact with zero points (the range always includes it); an all-zero group too.
    let mut w = weights(&mut rng, 2 * 64);
    w[3] = 0.0;
    w[64..].iter_mut().for_each(|v| *v = 0.0);
    let d = IntMatrix::quantize(&w, 2, 64, 4, 32, true)
        .unwrap()
        .decode();
    assert_eq!(d[3], 0.0);
    assert!(d[64..].iter().all(|&v| v == 0.0));
}

#[test]
fn int_refuses_malformed_input() {
    let q = vec![0u32; 4 * 64 / 8];
    let s = vec![f16::ONE; 4 * 2];
    let ok = |q: Vec<u32>, s: Vec<f16>, z, g| IntMatrix::new(4, 32, 4, 64, q, s, z, g);
    assert!(ok(q.clone(), s.clone(), None, None).is_ok());
    shape_err(ok(q[1..].to_vec(), s.clone(), None, None), "qweight");
    shape_err(ok(q.clone(), s[1..].to_vec(), None, None), "scales");
    shape_err(ok(q.clone(), s.clone(), Some(vec![0; 7]), None), "zeros");
    shape_err(ok(q.clone(), s.clone(), Some(vec![17; 8]), None), "zeros");
    shape_err(ok(q.clone(), s.clone(), None, Some(vec![0; 63])), "g_idx");
    let e = shape_err(ok(q.clone(), s.clone(), None, Some(vec![2; 64])), "g_idx");
    assert!(e.contains("[0, 2)"), "{e}");
    // A group size that does not divide Kd, one that is not a multiple of 8, bits 3.
    shape_err(
        IntMatrix::new(4, 48, 4, 64, q.clone(), s.clone(), None, None),
        "group",
    );
    shape_err(
        IntMatrix::new(4, 4, 4, 64, q.clone(), s.clone(), None, None),
        "group",
    );
    shape_err(IntMatrix::new(3, 32, 4, 64, q, s, None, None), "bits");
    let w = vec![1.0f32; 4 * 96];
    shape_err(IntMatrix::quantize(&w, 4, 96, 4, 64, true), "group");
    let mut bad = w.clone();
    bad[7] = f32::NAN;
    shape_err(IntMatrix::quantize(&bad, 4, 96, 4, 32, true), "w");
    shape_err(IntMatrix::quantize(&[1e9; 64], 1, 64, 8, 32, false), "w");
}

// ---------------------------------------------------------------- GPTQ and AWQ readers

/// A GPTQ Linear built by hand: codes `q [Kd, N]`, zeros `z [G, N]`, scales `s [G, N]`, packed
/// the way AutoGPTQ packs them (qweight along Kd, qzeros along N, low bits first).
struct Gptq {
    bits: u32,
    kd: usize,
    n: usize,
    q: Vec<u32>,
    z: Vec<u32>,
    s: Vec<f16>,
    g_idx: Vec<i32>,
}

impl Gptq {
    fn pack(&self, version: GptqVersion) -> (Vec<i32>, Vec<i32>) {
        let per = 32 / self.bits as usize;
        let mut qweight = vec![0u32; self.kd / per * self.n];
        for k in 0..self.kd {
            for c in 0..self.n {
                qweight[(k / per) * self.n + c] |=
                    self.q[k * self.n + c] << ((k % per) * self.bits as usize);
            }
        }
        let groups = self.z.len() / self.n;
        let mut qzeros = vec![0u32; groups * self.n / per];
        for g in 0..groups {
            for c in 0..self.n {
                let stored = match version {
                    GptqVersion::V1 => self.z[g * self.n + c] - 1,
                    GptqVersion::V2 => self.z[g * self.n + c],
                };
                qzeros[g * self.n / per + c / per] |= stored << ((c % per) * self.bits as usize);
            }
        }
        let i = |v: Vec<u32>| v.into_iter().map(|x| x as i32).collect();
        (i(qweight), i(qzeros))
    }

    /// w[n, k] = (q - z) * s with the group of input k, computed from the unpacked parts.
    fn expected(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.kd];
        for c in 0..self.n {
            for k in 0..self.kd {
                let g = self.g_idx[k] as usize;
                let q = self.q[k * self.n + c] as i32 - self.z[g * self.n + c] as i32;
                w[c * self.kd + k] = q as f32 * self.s[g * self.n + c].to_f32();
            }
        }
        w
    }
}

fn gptq(rng: &mut Rng, bits: u32, kd: usize, n: usize, group: usize, act_order: bool) -> Gptq {
    let groups = kd / group;
    let max = 1u64 << bits;
    let mut g_idx: Vec<i32> = (0..kd).map(|k| (k / group) as i32).collect();
    if act_order {
        // Act-order: the groups follow a permutation of the inputs.
        rng.shuffle(&mut g_idx);
    }
    Gptq {
        bits,
        kd,
        n,
        q: (0..kd * n).map(|_| rng.below(max) as u32).collect(),
        // v1 stores z - 1, so z starts at 1 here; 1 << bits - 1 for 4 bits reaches 15.
        z: (0..groups * n)
            .map(|_| 1 + rng.below(max - 1) as u32)
            .collect(),
        s: (0..groups * n)
            .map(|_| f16::from_f64(rng.uniform(1e-3, 1e-2)))
            .collect(),
        g_idx,
    }
}

#[test]
fn gptq_by_hand() {
    // Kd = 8, N = 8, one group of 8, 4 bits, v1. qweight row 0, column 0 = 0x76543210: inputs
    // 0..8 of output 0 have codes 0..7. qzeros 0x00000007 (v1): output 0 has zero 8, the
    // others 1. Scale 0.5 for output 0.
    let mut qweight = vec![0i32; 8];
    qweight[0] = 0x7654_3210;
    let qzeros = [0x0000_0007i32];
    let mut scales = vec![f16::ONE; 8];
    scales[0] = f16::from_f32(0.5);
    let m = import_gptq(
        4,
        8,
        8,
        8,
        HostTensor::new(&qweight, &[1, 8]),
        HostTensor::new(&qzeros, &[1, 1]),
        HostTensor::new(&scales, &[1, 8]),
        None,
        GptqVersion::V1,
    )
    .unwrap();
    let w = m.decode();
    assert_eq!(&w[..8], &[-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5]);
    // Output 1: codes 0, zero 1, scale 1.
    assert_eq!(&w[8..16], &[-1.0; 8]);
}

#[test]
fn gptq_import_matches_independent_dequantisation() {
    let mut rng = Rng::new(21);
    for (bits, group, act_order, version) in [
        (4, 32, false, GptqVersion::V1),
        (4, 64, true, GptqVersion::V1),
        (8, 32, false, GptqVersion::V2),
        (8, 128, true, GptqVersion::V1),
        (4, 128, false, GptqVersion::V2),
    ] {
        let (kd, n) = (256, 16);
        let g = gptq(&mut rng, bits, kd, n, group, act_order);
        let (qweight, qzeros) = g.pack(version);
        let per = 32 / bits as usize;
        let groups = kd / group;
        let m = import_gptq(
            bits,
            group,
            kd,
            n,
            HostTensor::new(&qweight, &[kd / per, n]),
            HostTensor::new(&qzeros, &[groups, n / per]),
            HostTensor::new(&g.s, &[groups, n]),
            Some(HostTensor::new(&g.g_idx, &[kd])),
            version,
        )
        .unwrap();
        assert_eq!(m.g_idx().is_some(), act_order, "a trivial g_idx is dropped");
        let want = g.expected();
        let got = m.decode();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "gptq b{bits} g{group} act_order={act_order} {version:?}"
        );
    }
}

#[test]
fn gptq_zero_point_conventions() {
    // v1 stores z - 1: a stored 15 means 16 for 4 bits, kept as is; a stored 255 for 8 bits
    // would mean 256 and is refused. A symmetric checkpoint (every z = 8) loses its zeros.
    let qweight = [0i32; 16];
    let scales = vec![f16::ONE; 8];
    let run = |bits: u32, qzeros: &[i32], version| {
        let per = 32 / bits as usize;
        import_gptq(
            bits,
            8,
            8,
            8,
            HostTensor::new(&qweight[..8 * bits as usize / 4], &[8 / per, 8]),
            HostTensor::new(qzeros, &[1, 8 / per]),
            HostTensor::new(&scales, &[1, 8]),
            None,
            version,
        )
    };
    let m = run(4, &[0xf], GptqVersion::V1).unwrap();
    assert_eq!(m.zero(0, 0), 16);
    assert_eq!(m.decode()[0], -16.0);
    let sym = run(4, &[0x7777_7777], GptqVersion::V1).unwrap();
    assert!(sym.zeros().is_none());
    assert_eq!(sym.decode()[0], -8.0);
    let same = run(4, &[0x8888_8888u32 as i32], GptqVersion::V2).unwrap();
    assert!(same.zeros().is_none());
    let e = shape_err(run(8, &[0xff, 0], GptqVersion::V1), "qzeros");
    assert!(e.contains("stored 255"), "{e}");
}

#[test]
fn gptq_refuses_malformed_checkpoints() {
    let mut rng = Rng::new(22);
    let g = gptq(&mut rng, 4, 64, 16, 32, true);
    let (qw, qz) = g.pack(GptqVersion::V1);
    let try_import = |qw: HostTensor<i32>, qz: HostTensor<i32>, s: HostTensor<f16>, gi, group| {
        import_gptq(4, group, 64, 16, qw, qz, s, gi, GptqVersion::V1)
    };
    let (qws, qzs, ss, gs) = ([8, 16], [2, 2], [2, 16], [64]);
    let good = (
        HostTensor::new(&qw[..], &qws),
        HostTensor::new(&qz[..], &qzs),
        HostTensor::new(&g.s[..], &ss),
        Some(HostTensor::new(&g.g_idx[..], &gs)),
    );
    assert!(try_import(good.0, good.1, good.2, good.3, 32).is_ok());
    // Truncated qweight; qzeros of the wrong shape; scales transposed; a short g_idx.
    let e = shape_err(
        try_import(
            HostTensor::new(&qw[..100], &qws),
            good.1,
            good.2,
            good.3,
            32,
        ),
        "qweight",
    );
    assert!(e.contains("truncated"), "{e}");
    shape_err(
        try_import(
            good.0,
            HostTensor::new(&qz[..], &[4, 1]),
            good.2,
            good.3,
            32,
        ),
        "qzeros",
    );
    shape_err(
        try_import(
            good.0,
            good.1,
            HostTensor::new(&g.s[..], &[16, 2]),
            good.3,
            32,
        ),
        "scales",
    );
    shape_err(
        try_import(
            good.0,
            good.1,
            good.2,
            Some(HostTensor::new(&g.g_idx[..63], &[63])),
            32,
        ),
        "g_idx",
    );
    // g_idx naming a group past G, or negative.
    let (mut past, mut negative) = (g.g_idx.clone(), g.g_idx.clone());
    past[5] = 2;
    negative[5] = -1;
    for gi in [&past, &negative] {
        shape_err(
            try_import(good.0, good.1, good.2, Some(HostTensor::new(gi, &gs)), 32),
            "g_idx",
        );
    }
    // A group size that does not divide in_features.
    shape_err(try_import(good.0, good.1, good.2, good.3, 48), "group");
}

#[test]
fn awq_by_hand_and_against_independent_dequantisation() {
    // AWQ packs along N with nibble order 0, 2, 4, 6, 1, 3, 5, 7: outputs 0..8 with codes
    // 0..8 give 0x75316420.
    let qweight = vec![0x7531_6420i32; 8]; // Kd = 8 rows, N = 8
    let qzeros = [0x0000_0003i32]; // output 0 zero 3, the others 0
    let scales = vec![f16::from_f32(0.25); 8];
    let m = import_awq(
        8,
        8,
        8,
        HostTensor::new(&qweight, &[8, 1]),
        HostTensor::new(&qzeros, &[1, 1]),
        HostTensor::new(&scales, &[1, 8]),
    )
    .unwrap();
    let w = m.decode();
    for r in 0..8 {
        let z = if r == 0 { 3.0 } else { 0.0 };
        assert!(
            w[r * 8..(r + 1) * 8]
                .iter()
                .all(|&v| v == (r as f32 - z) * 0.25),
            "output {r}"
        );
    }

    let mut rng = Rng::new(23);
    let (kd, n, group) = (128, 24, 32);
    let groups = kd / group;
    let q: Vec<u32> = (0..kd * n).map(|_| rng.below(16) as u32).collect();
    let z: Vec<u32> = (0..groups * n).map(|_| rng.below(16) as u32).collect();
    let s: Vec<f16> = (0..groups * n)
        .map(|_| f16::from_f64(rng.uniform(1e-3, 1e-2)))
        .collect();
    let order = [0, 2, 4, 6, 1, 3, 5, 7];
    let pack = |vals: &[u32], rows: usize| -> Vec<i32> {
        (0..rows * n / 8)
            .map(|i| {
                let (row, c) = (i / (n / 8), i % (n / 8));
                (0..8).fold(0u32, |acc, j| {
                    acc | vals[row * n + 8 * c + order[j]] << (4 * j)
                }) as i32
            })
            .collect()
    };
    let m = import_awq(
        group,
        kd,
        n,
        HostTensor::new(&pack(&q, kd), &[kd, n / 8]),
        HostTensor::new(&pack(&z, groups), &[groups, n / 8]),
        HostTensor::new(&s, &[groups, n]),
    )
    .unwrap();
    let got = m.decode();
    for c in 0..n {
        for k in 0..kd {
            let g = k / group;
            let want = (q[k * n + c] as i32 - z[g * n + c] as i32) as f32 * s[g * n + c].to_f32();
            assert_eq!(got[c * kd + k].to_bits(), want.to_bits(), "({c}, {k})");
        }
    }
    // Truncated qweight, scales of the wrong shape, a group that does not divide Kd.
    let qw = pack(&q, kd);
    let (qz, sh) = (pack(&z, groups), [kd, n / 8]);
    let t = |qw: &[i32], s: &[f16], s_shape: &[usize], group| {
        import_awq(
            group,
            kd,
            n,
            HostTensor::new(qw, &sh),
            HostTensor::new(&qz, &[groups, n / 8]),
            HostTensor::new(s, s_shape),
        )
    };
    shape_err(t(&qw[1..], &s, &[groups, n], group), "qweight");
    shape_err(t(&qw, &s, &[n, groups], group), "scales");
    shape_err(t(&qw, &s, &[groups, n], 48), "group");
}

// ---------------------------------------------------------------- MXFP4

#[test]
fn mxfp4_values_rounding_and_scales() {
    let mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    for c in 0..16u8 {
        let want = if c >= 8 {
            -mags[usize::from(c - 8)]
        } else {
            mags[usize::from(c)]
        };
        assert_eq!(e2m1_to_f32(c), want);
        assert_eq!(e2m1_from_f64(f64::from(want)), if c == 8 { 8 } else { c });
    }
    // Ties go to the even code (mantissa 0): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2,
    // 2.5 -> 2, 3.5 -> 4, 5 -> 4; past 6 saturates.
    for (x, want) in [
        (0.25, 0.0),
        (0.75, 1.0),
        (1.25, 1.0),
        (1.75, 2.0),
        (2.5, 2.0),
        (3.5, 4.0),
        (5.0, 4.0),
        (7.0, 6.0),
        (1e9, 6.0),
        (-0.75, -1.0),
        (-5.1, -6.0),
        (0.26, 0.5),
    ] {
        assert_eq!(e2m1_to_f32(e2m1_from_f64(x)), want, "{x}");
    }
    assert_eq!(e8m0_to_f32(127), 1.0);
    assert_eq!(e8m0_to_f32(128), 2.0);
    assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
    assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
    assert!(e8m0_to_f32(255).is_nan());
}

#[test]
fn mxfp4_gpt_oss_layout_by_hand() {
    // Two experts, N = 1, Kd = 32. Expert 0: byte 0 = 0x21 (column 0 code 1 = 0.5, column 1
    // code 2 = 1.0), scale 128 (x2). Expert 1: byte 0 = 0xf0 (column 1 = -6), scale 255 (NaN).
    let mut blocks = vec![0u8; 2 * 16];
    blocks[0] = 0x21;
    blocks[16] = 0xf0;
    let scales = [128u8, 255];
    let ms = Mxfp4Matrix::from_gpt_oss(&blocks, &[2, 1, 1, 16], &scales, &[2, 1, 1]).unwrap();
    let d0 = ms[0].decode();
    assert_eq!(&d0[..3], &[1.0, 2.0, 0.0]);
    assert!(ms[1].decode().iter().all(|v| v.is_nan()));
    shape_err(
        Mxfp4Matrix::from_gpt_oss(&blocks, &[2, 1, 1, 16], &scales, &[2, 1, 2]),
        "scales",
    );
    shape_err(
        Mxfp4Matrix::from_gpt_oss(&blocks[1..], &[2, 1, 1, 16], &scales, &[2, 1, 1]),
        "blocks, scales",
    );
    shape_err(
        Mxfp4Matrix::from_gpt_oss(&blocks, &[2, 1, 16], &scales, &[2, 1, 1]),
        "blocks",
    );
    shape_err(Mxfp4Matrix::new(1, 32, vec![0; 16], vec![]), "scales");
    shape_err(Mxfp4Matrix::new(1, 48, vec![0; 24], vec![0; 1]), "blocks");
}

#[test]
fn mxfp4_quantisation_error_bound() {
    let mut rng = Rng::new(31);
    let (n, kd) = (9, 320);
    let mut w = weights(&mut rng, n * kd);
    // A block of tiny values and one at f32's top binades.
    w[..32].iter_mut().for_each(|v| *v *= 1e-30);
    w[32..64].iter_mut().for_each(|v| *v *= 1e30);
    let m = Mxfp4Matrix::quantize(&w, n, kd).unwrap();
    let d = m.decode();
    let mut worst = 0f64;
    for (i, (&x, &y)) in w.iter().zip(&d).enumerate() {
        let s = f64::from(e8m0_to_f32(m.scales()[i / 32]));
        let bound = f64::from(x).abs().max(s) / 4.0;
        let err = (f64::from(x) - f64::from(y)).abs();
        worst = worst.max(err / bound);
        assert!(err <= bound, "{i}: {x} -> {y} (scale {s:e})");
    }
    println!(
        "mxfp4: max error {:.3} of the bound max(|x|, scale) / 4",
        worst
    );
    let mut bad = w.clone();
    bad[0] = f32::INFINITY;
    shape_err(Mxfp4Matrix::quantize(&bad, n, kd), "w");
}

// ---------------------------------------------------------------- FP8

#[test]
fn e4m3_values_rounding_saturation_and_nan() {
    assert_eq!(e4m3_to_f32(0x00), 0.0);
    assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
    assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
    assert_eq!(e4m3_to_f32(0x38), 1.0);
    assert_eq!(e4m3_to_f32(0x3c), 1.5);
    assert_eq!(e4m3_to_f32(0x7e), 448.0);
    assert_eq!(e4m3_to_f32(0xfe), -448.0);
    assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    assert!(e4m3_to_f32(0x80) == 0.0 && e4m3_to_f32(0x80).is_sign_negative());
    // Every finite code encodes back to itself, -0 included.
    for c in 0..=255u8 {
        if c & 0x7f != 0x7f {
            assert_eq!(e4m3_from_f32(e4m3_to_f32(c)), c, "{c:#x}");
        }
    }
    // Ties to even: 1.0625 between 1 (0x38) and 1.125 (0x39); 1.1875 between 0x39 and 0x3a.
    assert_eq!(e4m3_from_f32(1.0625), 0x38);
    assert_eq!(e4m3_from_f32(1.1875), 0x3a);
    assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0x00);
    assert_eq!(e4m3_from_f32(1.5 * 2f32.powi(-9)), 0x02);
    // Saturation past 448 (and of infinities); NaN keeps its sign.
    for (x, c) in [
        (464.0, 0x7e),
        (500.0, 0x7e),
        (f32::INFINITY, 0x7e),
        (-1e30, 0xfe),
        (f32::NEG_INFINITY, 0xfe),
    ] {
        assert_eq!(e4m3_from_f32(x), c, "{x}");
    }
    assert_eq!(e4m3_from_f32(f32::NAN), 0x7f);
    assert_eq!(e4m3_from_f32(-f32::NAN), 0xff);
}

#[test]
fn fp8_block_quantisation_error_and_shapes() {
    let mut rng = Rng::new(41);
    // N and Kd not multiples of 128: the last blocks are partial.
    let (n, kd) = (130, 136);
    let mut w = weights(&mut rng, n * kd);
    // Row 0 a thousand times larger: its blocks' scales dwarf the other rows' values.
    w[..kd].iter_mut().for_each(|v| *v *= 1e3);
    let m = Fp8Matrix::quantize(&w, n, kd).unwrap();
    assert_eq!(m.scale_inv().len(), 2 * 2);
    let d = m.decode();
    let mut worst = 0f64;
    for r in 0..n {
        for k in 0..kd {
            let s = f64::from(m.scale_inv()[(r / 128) * 2 + k / 128]);
            let x = f64::from(w[r * kd + k]);
            let bound = (x.abs() / 16.0).max(s * 2f64.powi(-10)) * (1.0 + 1e-6);
            let err = (x - f64::from(d[r * kd + k])).abs();
            worst = worst.max(err / bound);
            assert!(err <= bound, "({r}, {k}): {x} -> {}", d[r * kd + k]);
        }
    }
    println!("fp8: max error {worst:.3} of the bound max(|x| / 16, scale_inv / 1024)");
    // DeepSeek's layout: the decoded value is e4m3 * scale_inv, one f32 product.
    let m = Fp8Matrix::new(
        2,
        8,
        vec![
            0x38, 0x40, 0xb8, 0x7f, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x7e,
        ],
        vec![0.5],
    )
    .unwrap();
    let d = m.decode();
    assert_eq!(&d[..3], &[0.5, 1.0, -0.5]);
    assert!(d[3].is_nan());
    assert_eq!(d[7], 2f32.powi(-10));
    assert_eq!(d[15], 224.0);
    shape_err(Fp8Matrix::new(2, 8, vec![0; 15], vec![1.0]), "weight");
    shape_err(
        Fp8Matrix::new(130, 8, vec![0; 130 * 8], vec![1.0]),
        "scale_inv",
    );
    shape_err(Fp8Matrix::new(2, 12, vec![0; 24], vec![1.0]), "weight");
}

// ---------------------------------------------------------------- ternary

fn ternary_layer(
    rng: &mut Rng,
    n: usize,
    kd: usize,
    zero_fraction: f64,
    capacity: usize,
) -> (Vec<f32>, moe_kernels::quant::Ternarized, TernaryMatrix) {
    let w: Vec<f32> = (0..n * kd).map(|_| (rng.normal() * 0.02) as f32).collect();
    let t = ternarize(&w, n, kd, zero_fraction).unwrap();
    let sample: Vec<Vec<u8>> = (0..n.min(64)).map(|r| t.symbols(r)).collect();
    let dict = Arc::new(Dictionary::build(&sample, capacity).unwrap());
    let m = TernaryMatrix::compress(&t, dict).unwrap();
    (w, t, m)
}

#[test]
fn ternary_compression_is_lossless_on_the_ternaries() {
    let mut rng = Rng::new(51);
    for (n, kd, zf, cap) in [
        (3, 2, 0.5, 9),
        (17, 96, 0.9, 300),
        (40, 1000, 0.7, 4096),
        (8, 64, 0.0, 9),
    ] {
        let (w, t, m) = ternary_layer(&mut rng, n, kd, zf, cap);
        let d = m.decode();
        for r in 0..n {
            let vals = [0.0, t.lohi[2 * r].to_f32(), t.lohi[2 * r + 1].to_f32()];
            for k in 0..kd {
                let want = vals[usize::from(t.t[r * kd + k])];
                assert_eq!(d[r * kd + k].to_bits(), want.to_bits(), "({r}, {k})");
                // The ternary keeps the sign of what it replaces.
                let x = w[r * kd + k];
                assert!(
                    want == 0.0 || (want > 0.0) == (x > 0.0),
                    "({r}, {k}): {x} -> {want}"
                );
            }
        }
        let zeros = t.t.iter().filter(|&&v| v == 0).count() as f64 / (n * kd) as f64;
        assert!(
            (zeros - zf).abs() <= 1.0 / kd as f64 + 1e-9,
            "zero fraction {zeros} for {zf}"
        );
    }
}

#[test]
fn ternary_bits_per_weight_on_a_realistic_distribution() {
    // QMoE's ternary experts are about 90% zeros. Gaussian weights ternarised at the 0.9
    // quantile; one dictionary of 2^16 entries for the layer, built from 64 rows.
    let mut rng = Rng::new(52);
    let (n, kd) = (512, 2048);
    for (zf, max_bits) in [(0.9, 1.0), (0.95, 0.8), (0.8, 1.5)] {
        let (_, _, m) = ternary_layer(&mut rng, n, kd, zf, 1 << 16);
        let bits = m.bits_per_weight();
        let dict_bits = 64.0 * m.dict().len() as f64 / (n * kd) as f64;
        println!(
            "ternary zero fraction {zf}: {bits:.3} bits/weight ({} codewords, {:.1} symbols each); \
             dictionary {} entries = {dict_bits:.3} bits/weight at this size, {:.4} over Mixtral's 8 x 3 experts",
            m.codes().len(),
            (n * kd / 2) as f64 / m.codes().len() as f64,
            m.dict().len(),
            64.0 * m.dict().len() as f64 / (8.0 * 3.0 * 4096.0 * 14336.0),
        );
        assert!(bits < max_bits, "zero fraction {zf}: {bits} bits/weight");
    }
}

#[test]
fn ternary_refuses_malformed_streams() {
    let dict = Arc::new(Dictionary::build(&[vec![0, 0, 0, 0, 4, 0]], 12).unwrap());
    let lohi = vec![f16::from_f32(-1.0), f16::ONE];
    // Kd = 8: 4 symbols; codeword 0 is the run [0].
    let ok = TernaryMatrix::new(
        1,
        8,
        lohi.clone(),
        vec![0, 4],
        vec![0, 0, 0, 4],
        dict.clone(),
    )
    .unwrap();
    assert_eq!(ok.decode(), [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0]);
    let t = |offsets: Vec<u32>, codes: Vec<u16>| {
        TernaryMatrix::new(1, 8, lohi.clone(), offsets, codes, dict.clone())
    };
    let e = shape_err(t(vec![0, 4], vec![0, 0, 0, 12]), "codes");
    assert!(e.contains("codeword 12"), "{e}");
    let e = shape_err(t(vec![0, 3], vec![0, 0, 0]), "codes");
    assert!(e.contains("3 symbols"), "{e}");
    shape_err(t(vec![0, 5], vec![0, 0, 0, 4]), "row_offsets");
    shape_err(t(vec![1, 4], vec![0, 0, 0, 4]), "row_offsets");
    shape_err(t(vec![0], vec![]), "row_offsets");
    shape_err(
        TernaryMatrix::new(
            1,
            8,
            vec![f16::ONE],
            vec![0, 4],
            vec![0, 0, 0, 4],
            dict.clone(),
        ),
        "lohi",
    );
    shape_err(
        TernaryMatrix::new(
            1,
            7,
            lohi.clone(),
            vec![0, 4],
            vec![0, 0, 0, 4],
            dict.clone(),
        ),
        "kdim",
    );
    // Dictionary entries: length 0, a symbol 9, bits past the run.
    shape_err(Dictionary::new(vec![0]), "entries");
    shape_err(Dictionary::new(vec![1 | 9 << 4]), "entries");
    shape_err(Dictionary::new(vec![1 | 1 << 8]), "entries");
    shape_err(Dictionary::new(vec![]), "entries");
    shape_err(Dictionary::build(&[vec![1]], 8), "capacity");
    shape_err(ternarize(&[1.0; 6], 2, 3, 0.5), "w");
    shape_err(ternarize(&[1.0; 6], 3, 2, 1.0), "zero_fraction");
}

// ---------------------------------------------------------------- a layer's error against bf16

#[test]
fn expert_error_against_bf16_per_format() {
    // One SwiGLU expert of Qwen3-30B-A3B's width (H = 2048, I = 768) with weights drawn as
    // trained ones roughly are; the output of each format's decoded weights against the bf16
    // weights, as relative RMS error over 4 tokens. Reported, and bounded loosely per format.
    let mut rng = Rng::new(61);
    let (h, i) = (2048, 768);
    let w13 = weights(&mut rng, 2 * i * h);
    let w2 = weights(&mut rng, h * i);
    let x: Vec<f64> = (0..4 * h).map(|_| rng.normal()).collect();
    let bf = |w: &[f32]| -> Vec<f32> {
        w.iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect()
    };
    let expert = |w13: &[f32], w2: &[f32]| -> Vec<f64> {
        let mut y = Vec::new();
        for t in 0..4 {
            let xt = &x[t * h..(t + 1) * h];
            let dot = |w: &[f32], row: usize, v: &[f64]| -> f64 {
                w[row * v.len()..(row + 1) * v.len()]
                    .iter()
                    .zip(v)
                    .map(|(&a, b)| f64::from(a) * b)
                    .sum()
            };
            let act: Vec<f64> = (0..i)
                .map(|j| {
                    let (g, u) = (dot(w13, j, xt), dot(w13, i + j, xt));
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            y.extend((0..h).map(|r| dot(w2, r, &act)));
        }
        y
    };
    let base = expert(&bf(&w13), &bf(&w2));
    let norm = base.iter().map(|v| v * v).sum::<f64>().sqrt();
    let ternary = |w: &[f32], n, kd| {
        let t = ternarize(w, n, kd, 0.9).unwrap();
        let sample: Vec<Vec<u8>> = (0..64).map(|r| t.symbols(r)).collect();
        QuantMatrix::Ternary(
            TernaryMatrix::compress(&t, Arc::new(Dictionary::build(&sample, 1 << 12).unwrap()))
                .unwrap(),
        )
    };
    type Make = Box<dyn Fn(&[f32], usize, usize) -> QuantMatrix>;
    let formats: Vec<(&str, f64, Make)> = vec![
        (
            "int8-g128",
            0.03,
            Box::new(|w, n, kd| {
                QuantMatrix::Int(IntMatrix::quantize(w, n, kd, 8, 128, false).unwrap())
            }),
        ),
        (
            "int4-g128-zp",
            0.3,
            Box::new(|w, n, kd| {
                QuantMatrix::Int(IntMatrix::quantize(w, n, kd, 4, 128, true).unwrap())
            }),
        ),
        (
            "int4-g32",
            0.3,
            Box::new(|w, n, kd| {
                QuantMatrix::Int(IntMatrix::quantize(w, n, kd, 4, 32, false).unwrap())
            }),
        ),
        (
            "mxfp4",
            0.35,
            Box::new(|w, n, kd| QuantMatrix::Mxfp4(Mxfp4Matrix::quantize(w, n, kd).unwrap())),
        ),
        (
            "fp8-b128",
            0.08,
            Box::new(|w, n, kd| QuantMatrix::Fp8(Fp8Matrix::quantize(w, n, kd).unwrap())),
        ),
        ("ternary-0.9", 1.2, Box::new(ternary)),
    ];
    for (name, bound, make) in formats {
        let (a, b) = (make(&w13, 2 * i, h), make(&w2, h, i));
        let y = expert(&a.decode(), &b.decode());
        let err = y
            .iter()
            .zip(&base)
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f64>()
            .sqrt()
            / norm;
        let bits = 8.0 * (a.bytes() + b.bytes()) as f64 / (3 * h * i) as f64;
        println!(
            "expert SwiGLU H={h} I={i}: {name}: {bits:.3} bits/weight, relative RMS error against bf16 {err:.4}"
        );
        assert!(err < bound, "{name}: {err}");
    }
}

// ---------------------------------------------------------------- on the device

/// One expert `[n, kd]` in each format, from fresh seeded weights of std 1/sqrt(kd):
/// bf16, int4 g32 with zero points, int8 symmetric with a group of kd/3 or kd, int4 act-order
/// with groups of any size, int8 act-order with the groups of a permutation (GPTQ's), MXFP4 (one block with the NaN scale when `nan`), FP8 (one NaN code when `nan`), and two
/// ternary experts sharing one dictionary. kd must be a multiple of 32.
fn every_format(rng: &mut Rng, n: usize, kd: usize, nan: bool) -> Vec<QuantMatrix> {
    let w = |rng: &mut Rng| -> Vec<f32> {
        let std = 1.0 / (kd as f64).sqrt();
        (0..n * kd).map(|_| (rng.normal() * std) as f32).collect()
    };
    let int8_group = if kd.is_multiple_of(24) { kd / 3 } else { kd };
    let act_order = {
        let m = IntMatrix::quantize(&w(rng), n, kd, 4, 32, true).unwrap();
        let g_idx: Vec<u32> = (0..kd)
            .map(|_| rng.below((kd / 32) as u64) as u32)
            .collect();
        let (q, s, z) = (
            m.qweight().to_vec(),
            m.scales().to_vec(),
            m.zeros().map(<[u8]>::to_vec),
        );
        IntMatrix::new(4, 32, n, kd, q, s, z, Some(g_idx)).unwrap()
    };
    // GPTQ's act-order proper: the groups of a column permutation, each 32 columns (the
    // upload lays such a matrix out again in group order; the one above keeps its g_idx).
    let gptq_order = {
        let m = IntMatrix::quantize(&w(rng), n, kd, 8, 32, false).unwrap();
        let mut place: Vec<u32> = (0..kd as u32).collect();
        rng.shuffle(&mut place);
        let g_idx = place.iter().map(|&p| p / 32).collect();
        let (q, s) = (m.qweight().to_vec(), m.scales().to_vec());
        IntMatrix::new(8, 32, n, kd, q, s, None, Some(g_idx)).unwrap()
    };
    let mut mx = Mxfp4Matrix::quantize(&w(rng), n, kd).unwrap();
    let mut fp8 = Fp8Matrix::quantize(&w(rng), n, kd).unwrap();
    if nan {
        // NaN: one MXFP4 block's scale and one FP8 code. f32 subnormals: a block scaled by
        // 2^-126 and the last FP8 block scaled by 1e-39, so a flush-to-zero build would differ.
        let mut scales = mx.scales().to_vec();
        scales[1] = 255;
        scales[2] = 1;
        mx = Mxfp4Matrix::new(n, kd, mx.blocks().to_vec(), scales).unwrap();
        let mut codes = fp8.weight().to_vec();
        codes[3] = 0xff;
        let mut scale_inv = fp8.scale_inv().to_vec();
        *scale_inv.last_mut().unwrap() = 1e-39;
        fp8 = Fp8Matrix::new(n, kd, codes, scale_inv).unwrap();
    }
    let t1 = ternarize(&w(rng), n, kd, 0.9).unwrap();
    let t2 = ternarize(&w(rng), n, kd, 0.6).unwrap();
    let sample: Vec<Vec<u8>> = (0..n.min(16)).map(|r| t1.symbols(r)).collect();
    let dict = Arc::new(Dictionary::build(&sample, 2000).unwrap());
    let bf: Vec<bf16> = w(rng).into_iter().map(bf16::from_f32).collect();
    vec![
        QuantMatrix::bf16(bf, n, kd).unwrap(),
        QuantMatrix::Int(IntMatrix::quantize(&w(rng), n, kd, 4, 32, true).unwrap()),
        QuantMatrix::Int(IntMatrix::quantize(&w(rng), n, kd, 8, int8_group, false).unwrap()),
        QuantMatrix::Int(act_order),
        QuantMatrix::Int(gptq_order),
        QuantMatrix::Mxfp4(mx),
        QuantMatrix::Fp8(fp8),
        QuantMatrix::Ternary(TernaryMatrix::compress(&t1, dict.clone()).unwrap()),
        QuantMatrix::Ternary(TernaryMatrix::compress(&t2, dict).unwrap()),
    ]
}

#[test]
fn the_device_tests_layers_hold_what_they_claim() {
    // The GPU tests' mixed layer: eight experts, NaN exactly where it was planted (one MXFP4
    // block of 32 and one FP8 code), every other value finite, and no expert all zeros.
    let mut rng = Rng::new(71);
    let mixed = every_format(&mut rng, 72, 288, true);
    let names: Vec<String> = mixed.iter().map(QuantMatrix::name).collect();
    assert_eq!(
        names,
        [
            "bf16",
            "int4-g32-zp",
            "int8-g96",
            "int4-g32-zp-actorder",
            "int8-g32-actorder",
            "mxfp4",
            "fp8-e4m3-b128",
            "ternary",
            "ternary"
        ]
    );
    for m in &mixed {
        let d = m.decode();
        let nans = d.iter().filter(|v| v.is_nan()).count();
        let want = match m {
            QuantMatrix::Mxfp4(_) => 32,
            QuantMatrix::Fp8(_) => 1,
            _ => 0,
        };
        assert_eq!(nans, want, "{}", m.name());
        assert!(d.iter().any(|&v| v != 0.0 && v.is_finite()), "{}", m.name());
    }
}

/// Bit-for-bit equality of 16-bit floats, any NaN matching any NaN.
fn same_bits<T: Float>(got: &[T], want: &[T]) -> Option<usize> {
    got.iter().zip(want).position(|(g, w)| {
        let (g, w) = (g.to_f64(), w.to_f64());
        !(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()))
    })
}

fn check_dequant<T: Float>(dev: &Device, experts: &[QuantMatrix], label: &str) {
    let mut layer = QuantLayer::upload(dev, experts).unwrap();
    let (n, kd) = experts[0].shape();
    let mut out = dev
        .filled_bytes::<T>(&[experts.len(), n, kd], 0xff)
        .unwrap();
    quant::dequantize_into(dev, &mut out, &mut layer).unwrap();
    let got = dev.download(&out).unwrap();
    layer.check(dev).unwrap();
    for (e, m) in experts.iter().enumerate() {
        let want = m.decode_to::<T>();
        let mine = &got[e * n * kd..(e + 1) * n * kd];
        if let Some(i) = same_bits(mine, &want) {
            panic!(
                "dequant {label} {} expert {e} ({}): element ({}, {}) got {:?}, want {:?}",
                T::DTYPE,
                m.name(),
                i / kd,
                i % kd,
                mine[i],
                want[i]
            );
        }
    }
    println!(
        "dequant {label} {}: {} experts of [{n}, {kd}] bit for bit",
        T::DTYPE,
        experts.len()
    );
}

#[test]
fn gpu_dequantize_matches_the_cpu_decoders_bit_for_bit() {
    let Some(dev) = common::gpu("gpu_dequantize_matches_the_cpu_decoders_bit_for_bit") else {
        return;
    };
    let mut rng = Rng::new(71);
    // A mixed layer of every format, NaN scales and codes included; N = 72 and Kd = 288 leave
    // partial 128 x 128 fp8 blocks and a Kd that is not a multiple of 256 (a warp's step).
    let mixed = every_format(&mut rng, 72, 288, true);
    check_dequant::<bf16>(&dev, &mixed, "mixed");
    check_dequant::<f16>(&dev, &mixed, "mixed");
    // N = 136 > 128 with Kd = 288: FP8 scale rows are ceil(Kd / 128) = 3 blocks apart.
    let tall = every_format(&mut rng, 136, 288, true);
    check_dequant::<bf16>(&dev, &tall, "mixed, N = 136");
    // Each format alone, over three experts; one row; Kd = 32.
    for i in 0..mixed.len() {
        let layer: Vec<QuantMatrix> = (0..3)
            .map(|_| every_format(&mut rng, 40, 96, false)[i].clone())
            .collect();
        check_dequant::<bf16>(&dev, &layer, &layer[0].name());
    }
    check_dequant::<bf16>(&dev, &every_format(&mut rng, 1, 32, false), "one row");
}

struct GemvCase {
    t: usize,
    k: usize,
    n: usize,
    kd: usize,
    epilogue: Epilogue,
    bias: bool,
    scale: Option<ScaleAt>,
    /// All slots on this expert.
    one_expert: Option<i32>,
    /// The prefill path (dequantise + grouped GEMM over padded rows) instead of the GEMV.
    prefill: bool,
}

fn gemv_case(t: usize, k: usize, n: usize, kd: usize, epilogue: Epilogue) -> GemvCase {
    GemvCase {
        t,
        k,
        n,
        kd,
        epilogue,
        bias: false,
        scale: None,
        one_expert: None,
        prefill: false,
    }
}

/// The fused GEMV (or the prefill path) over `experts` against the f64 reference of the
/// CPU-decoded weights with the same epilogue.
fn run_gemv<T: Float, TO: Float>(dev: &Device, experts: &[QuantMatrix], c: &GemvCase, label: &str) {
    let e = experts.len();
    let layout = if c.prefill {
        Layout::Padded
    } else {
        Layout::Sorted
    };
    let label = format!(
        "{label} {} {}->{} T={} K={} E={e} N={} Kd={} {:?} bias={} scale={:?}",
        if c.prefill { "prefill" } else { "gemv" },
        T::DTYPE,
        TO::DTYPE,
        c.t,
        c.k,
        c.n,
        c.kd,
        c.epilogue,
        c.bias,
        c.scale
    );
    let mut rng = Rng::new((c.t * 7919 + c.kd * 13 + c.n + e) as u64);
    let ids: Vec<i32> = (0..c.t * c.k)
        .map(|i| match c.one_expert {
            Some(x) => x,
            None => {
                let r = rng.unit();
                ((r * r * e as f64) as i32 + (i % c.k) as i32) % e as i32
            }
        })
        .collect();
    let x: Vec<T> = rng.normal_vec(c.t * c.kd, 1.0);
    let bias: Vec<T> = rng.normal_vec(e * c.n, 0.1);
    let weights: Vec<f32> = (0..c.t * c.k)
        .map(|_| rng.uniform(0.1, 1.0) as f32)
        .collect();

    let mut plan = Plan::new(dev, c.t, c.k, e, e, 64).unwrap();
    plan.build(dev, &dev.upload(&ids, &[c.t, c.k]).unwrap())
        .unwrap();
    let rows = plan.rows(layout);
    let xd = dev.upload(&x, &[c.t, c.kd]).unwrap();
    let mut a = dev.zeros::<T>(&[rows, c.kd]).unwrap();
    permute::gather_into(dev, &mut a, &xd, &mut plan, layout).unwrap();
    let bd = dev.upload(&bias, &[e, c.n]).unwrap();
    let rw = dev.upload(&weights, &[c.t, c.k]).unwrap();
    let n_out = if matches!(c.epilogue, Epilogue::Gated { .. }) {
        c.n / 2
    } else {
        c.n
    };
    let mut out = dev.filled_bytes::<TO>(&[rows, n_out], 0xff).unwrap();
    let opts = GemmOptions {
        bias: c.bias.then_some(&bd),
        epilogue: c.epilogue,
        row_weights: c.scale.map(|at| (&rw, at)),
    };
    let mut layer = QuantLayer::upload(dev, experts).unwrap();
    // Each GEMV version's output, or the prefill path's.
    let mut runs = Vec::new();
    if c.prefill {
        let mut scratch = dev.filled_bytes::<T>(&[e, c.n, c.kd], 0xff).unwrap();
        quant::quant_gemm_into(dev, &mut out, &a, &mut layer, &plan, opts, &mut scratch).unwrap();
        runs.push(("", dev.download(&out).unwrap()));
    } else {
        for (v, name) in [(QuantGemvVersion::V1, " v1"), (QuantGemvVersion::V2, " v2")] {
            dev.fill_bytes(&mut out, 0xff).unwrap();
            layer.set_gemv_version(v);
            quant::quant_gemv_into(dev, &mut out, &a, &mut layer, &plan, opts).unwrap();
            runs.push((name, dev.download(&out).unwrap()));
        }
    }
    plan.check(dev).unwrap();
    layer.check(dev).unwrap();

    let p = plan_ref::plan(&ids, e, e, 64);
    let a64: Vec<f64> = dev
        .download(&a)
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect();
    let row_experts: Vec<i32> = (0..rows)
        .map(|r| match layout {
            Layout::Padded => p.block_experts[r / 64],
            _ => (0..e)
                .find(|&x| (p.offsets[x]..p.offsets[x + 1]).contains(&(r as i32)))
                .map_or(-1, |x| x as i32),
        })
        .collect();
    let row_slots = if c.prefill {
        &p.padded_slots
    } else {
        &p.sorted_slots
    };
    let row_scale: Vec<f64> = row_slots
        .iter()
        .map(|&s| usize::try_from(s).map_or(0.0, |s| f64::from(weights[s])))
        .collect();
    // The weights the kernels multiply: the CPU decoders' f32 values (rounded to T first on the
    // prefill path, which multiplies plain weights).
    let w64: Vec<f64> = experts
        .iter()
        .flat_map(|m| {
            if c.prefill {
                m.decode_to::<T>()
                    .iter()
                    .map(|v| v.to_f64())
                    .collect::<Vec<_>>()
            } else {
                m.decode().iter().map(|&v| f64::from(v)).collect()
            }
        })
        .collect();
    let b64: Vec<f64> = bias.iter().map(|v| v.to_f64()).collect();
    let want = grouped_gemm(&GroupedGemmRef {
        a: &a64,
        w: &w64,
        bias: c.bias.then_some(&b64[..]),
        n: c.n,
        kdim: c.kd,
        row_experts: &row_experts,
        row_scale: c.scale.map(|at| (&row_scale[..], at)),
        epilogue: c.epilogue,
    });
    for (version, got) in &runs {
        let (mut g, mut r) = (Vec::new(), Vec::new());
        for (i, row) in want.iter().enumerate() {
            if let Some(row) = row {
                g.extend_from_slice(&got[i * n_out..(i + 1) * n_out]);
                r.extend_from_slice(row);
            }
        }
        assert!(!r.is_empty() || c.t == 0, "{label}: no rows compared");
        // As the bf16 grouped GEMM: f32 accumulation over Kd terms, one rounding to the output.
        let tol = Tolerance::new(1e-4, 2.0 * TO::EPSILON);
        let report = check::compare(&g, &r, tol);
        println!("quant {label}{version}: {report}");
        assert!(report.passed(), "quant {label}{version}: {report}");
    }
}

#[test]
fn gpu_quant_gemv_matches_reference_per_format_and_mixed() {
    let Some(dev) = common::gpu("gpu_quant_gemv_matches_reference_per_format_and_mixed") else {
        return;
    };
    let swiglu = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };
    let gpt_oss = Epilogue::Gated {
        act: GatedAct::GPT_OSS,
        layout: GateLayout::Interleaved,
    };
    let mut rng = Rng::new(81);
    // Every format alone (four experts of it), gate/up with SwiGLU at T = 1 and 16 (more than 8
    // rows per expert, so the row chunks loop).
    for i in 0..9 {
        let (n, kd) = (2 * 96, 512);
        let layer: Vec<QuantMatrix> = (0..4)
            .map(|_| every_format(&mut rng, n, kd, false)[i].clone())
            .collect();
        let name = layer[0].name();
        run_gemv::<bf16, bf16>(&dev, &layer, &gemv_case(1, 2, n, kd, swiglu), &name);
        run_gemv::<bf16, f32>(&dev, &layer, &gemv_case(16, 2, n, kd, swiglu), &name);
    }
    // Kd = 1152: v2 stages 1024 columns per pass, so a second, partial pass; beside every
    // format, symmetric int4 with groups of 128 and int8 with groups of 64 (both on v2's
    // decoders; every_format's int8 groups of 384 fall back to v1's loop). T = 9, K = 2 over 10
    // experts: some experts get one row (v2's one-row instance), others several (padded passes).
    let mut wide = every_format(&mut rng, 16, 1152, false);
    for (bits, group) in [(4, 128), (8, 64)] {
        let w: Vec<f32> = (0..16 * 1152).map(|_| rng.normal() as f32 / 34.0).collect();
        wide.push(QuantMatrix::Int(
            IntMatrix::quantize(&w, 16, 1152, bits, group, false).unwrap(),
        ));
    }
    run_gemv::<bf16, f32>(
        &dev,
        &wide,
        &gemv_case(9, 2, 16, 1152, swiglu),
        "mixed, Kd = 1152",
    );
    // Mixed layers: one expert of each format in one launch; Kd = 288 is not a multiple of a
    // warp's 256-column step; the down projection with the routing weight on the output; f16
    // activations with gpt-oss's clamped SwiGLU and a bias; everything on one expert.
    let mixed = every_format(&mut rng, 2 * 40, 288, false);
    run_gemv::<bf16, bf16>(&dev, &mixed, &gemv_case(5, 4, 80, 288, swiglu), "mixed");
    // N = 136 rows (FP8 scale rows past one block), N_out = 68: a partial last block of 8.
    let tall = every_format(&mut rng, 136, 288, false);
    run_gemv::<bf16, bf16>(
        &dev,
        &tall,
        &gemv_case(5, 4, 136, 288, swiglu),
        "mixed, N = 136",
    );
    run_gemv::<f16, f16>(
        &dev,
        &mixed,
        &GemvCase {
            bias: true,
            ..gemv_case(3, 4, 80, 288, gpt_oss)
        },
        "mixed",
    );
    run_gemv::<bf16, bf16>(
        &dev,
        &mixed,
        &GemvCase {
            scale: Some(ScaleAt::Output),
            ..gemv_case(16, 8, 80, 288, Epilogue::None)
        },
        "mixed",
    );
    run_gemv::<bf16, f32>(
        &dev,
        &mixed,
        &GemvCase {
            one_expert: Some(6),
            ..gemv_case(20, 1, 80, 288, Epilogue::Act(Act::GeluErf))
        },
        "mixed",
    );
    run_gemv::<bf16, bf16>(
        &dev,
        &mixed,
        &GemvCase {
            scale: Some(ScaleAt::Input),
            ..gemv_case(9, 2, 80, 288, swiglu)
        },
        "mixed",
    );
}

#[test]
fn gpu_quant_prefill_matches_reference() {
    let Some(dev) = common::gpu("gpu_quant_prefill_matches_reference") else {
        return;
    };
    let swiglu = Epilogue::Gated {
        act: GatedAct::Silu,
        layout: GateLayout::GateFirst,
    };
    let mut rng = Rng::new(91);
    let mixed = every_format(&mut rng, 2 * 64, 256, false);
    run_gemv::<bf16, bf16>(
        &dev,
        &mixed,
        &GemvCase {
            prefill: true,
            ..gemv_case(100, 2, 128, 256, swiglu)
        },
        "mixed",
    );
    run_gemv::<f16, f32>(
        &dev,
        &mixed,
        &GemvCase {
            prefill: true,
            scale: Some(ScaleAt::Output),
            ..gemv_case(70, 4, 128, 256, Epilogue::None)
        },
        "mixed",
    );
}

#[test]
fn gpu_quant_refuses_what_it_cannot_do() {
    let Some(dev) = common::gpu("gpu_quant_refuses_what_it_cannot_do") else {
        return;
    };
    let mut rng = Rng::new(95);
    let experts = every_format(&mut rng, 16, 64, false);
    // Experts of different shapes; no experts.
    let mut uneven = experts.clone();
    uneven.push(every_format(&mut rng, 16, 96, false).remove(0));
    shape_err(QuantLayer::upload(&dev, &uneven), "experts");
    shape_err(QuantLayer::upload(&dev, &[]), "experts");
    let mut layer = QuantLayer::upload(&dev, &experts).unwrap();
    // Dequantise into the wrong shape, or into f32.
    let mut small = dev.zeros::<bf16>(&[experts.len(), 16, 32]).unwrap();
    shape_err(quant::dequantize_into(&dev, &mut small, &mut layer), "out");
    let mut f = dev.zeros::<f32>(&[experts.len(), 16, 64]).unwrap();
    let e = quant::dequantize_into(&dev, &mut f, &mut layer).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // A plan over another number of experts; activations of another Kd.
    let mut plan = Plan::new(&dev, 2, 1, 3, 3, 64).unwrap();
    plan.build(&dev, &dev.upload(&[0, 2], &[2, 1]).unwrap())
        .unwrap();
    let a = dev.zeros::<bf16>(&[2, 64]).unwrap();
    let mut out = dev.zeros::<bf16>(&[2, 16]).unwrap();
    let e = quant::quant_gemv_into(
        &dev,
        &mut out,
        &a,
        &mut layer,
        &plan,
        GemmOptions::default(),
    );
    shape_err(e, "w");
    let mut plan = Plan::new(&dev, 2, 1, experts.len(), experts.len(), 64).unwrap();
    plan.build(&dev, &dev.upload(&[0, 2], &[2, 1]).unwrap())
        .unwrap();
    let a = dev.zeros::<bf16>(&[2, 32]).unwrap();
    let e = quant::quant_gemv_into(
        &dev,
        &mut out,
        &a,
        &mut layer,
        &plan,
        GemmOptions::default(),
    );
    shape_err(e, "a");
}
