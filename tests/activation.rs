//! Row softmax: the CPU reference against hand-worked cases, and the kernels against the
//! reference on random and adversarial rows.

mod common;

use approx::assert_relative_eq;
use half::{bf16, f16};
use moe_kernels::activation::{self, reference};
use moe_kernels::check::{self, Tolerance};
use moe_kernels::rng::Rng;
use moe_kernels::{Device, Error, Float};

const NINF: f64 = f64::NEG_INFINITY;

#[test]
fn reference_matches_hand_worked_rows() {
    let y = reference::softmax(&[0.0, 2f64.ln(), 3f64.ln()], 3);
    for (got, want) in y.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
        assert_relative_eq!(*got, want, max_relative = 1e-15);
    }
    // Large equal logits: stable, no overflow.
    assert_eq!(reference::softmax(&[1000.0, 1000.0], 2), vec![0.5, 0.5]);
    // -inf contributes nothing.
    assert_eq!(
        reference::softmax(&[NINF, 0.0, NINF], 3),
        vec![0.0, 1.0, 0.0]
    );
    // Two rows are independent.
    assert_eq!(reference::softmax(&[5.0, -3.0], 1), vec![1.0, 1.0]);
}

#[test]
fn reference_non_finite_rows_follow_torch() {
    let nan_row = reference::softmax(&[1.0, f64::NAN, 2.0], 3);
    assert!(nan_row.iter().all(|v| v.is_nan()), "{nan_row:?}");
    let inf_row = reference::softmax(&[1.0, f64::INFINITY, 2.0], 3);
    assert!(inf_row.iter().all(|v| v.is_nan()), "{inf_row:?}");
    let ninf_row = reference::softmax(&[NINF, NINF], 2);
    assert!(ninf_row.iter().all(|v| v.is_nan()), "{ninf_row:?}");
}

#[test]
fn reference_is_shift_invariant_and_sums_to_one() {
    let mut rng = Rng::new(11);
    let x: Vec<f64> = (0..97).map(|_| rng.normal() * 10.0).collect();
    let shifted: Vec<f64> = x.iter().map(|v| v + 123.25).collect();
    let (a, b) = (reference::softmax(&x, 97), reference::softmax(&shifted, 97));
    assert!((a.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    for (p, q) in a.iter().zip(&b) {
        assert_relative_eq!(p, q, max_relative = 1e-12);
    }
}

#[test]
fn compare_fails_just_outside_its_tolerance() {
    let tol = Tolerance::new(0.0, 1e-3);
    let reference = [1.0, -2.0, f64::NAN, f64::INFINITY];
    let ok = [1.0009f32, -2.0019, f32::NAN, f32::INFINITY];
    assert!(check::compare(&ok, &reference, tol).passed());
    let bad = [1.0011f32, -2.0019, f32::NAN, f32::INFINITY];
    let r = check::compare(&bad, &reference, tol);
    assert_eq!((r.failures, r.first_failure.map(|f| f.0)), (1, Some(0)));
    let nan_for_number = [1.0f32, -2.0, 0.0, f32::INFINITY];
    assert!(!check::compare(&nan_for_number, &reference, tol).passed());
    assert!(!check::compare(&ok[..3], &reference, tol).passed());
}

/// Runs the kernel on `x` ([rows, cols]) into a poisoned output and checks it against the
/// reference; returns the output for further checks.
fn run_case<T: Float>(dev: &Device, x: &[T], rows: usize, cols: usize, label: &str) -> Vec<T> {
    let xd = dev.upload(x, &[rows, cols]).unwrap();
    let mut out = dev.filled_bytes::<T>(&[rows, cols], 0xff).unwrap();
    activation::softmax_into(dev, &mut out, &xd).unwrap();
    let got = dev.download(&out).unwrap();
    let x64: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let want = reference::softmax(&x64, cols);
    let report = check::compare(&got, &want, activation::softmax_tolerance::<T>(cols));
    println!("softmax {label} [{rows}, {cols}] {}: {report}", T::DTYPE);
    assert!(
        report.passed(),
        "softmax {label} [{rows}, {cols}] {}: {report}",
        T::DTYPE
    );
    got
}

fn random_shapes<T: Float>(dev: &Device) {
    // 1 and 7 columns never take the vector path; 60, 1000 and 100_003 are not multiples of any
    // vector width; 8 and 4096 are; 100_003 needs 1024-thread blocks and several passes.
    let shapes = [
        (1, 1),
        (3, 7),
        (5, 60),
        (16, 8),
        (33, 1000),
        (64, 4096),
        (2, 100_003),
    ];
    for (i, &(rows, cols)) in shapes.iter().enumerate() {
        let mut rng = Rng::new(0x50f7 + i as u64);
        let x: Vec<T> = rng.normal_vec(rows * cols, 3.0);
        run_case(dev, &x, rows, cols, "random");
    }
}

fn adversarial<T: Float>(dev: &Device) {
    let cols = 24;
    let big = if T::DTYPE == moe_kernels::DType::F16 {
        6.0e4
    } else {
        1.0e30
    };
    let rows: Vec<Vec<f64>> = vec![
        vec![0.0; cols], // all equal
        (0..cols)
            .map(|i| if i % 5 == 0 { 3.0 } else { -1.0 })
            .collect(), // ties at the max
        (0..cols)
            .map(|i| if i % 2 == 0 { big } else { -big })
            .collect(), // huge magnitudes
        (0..cols)
            .map(|i| if i == 17 { 0.5 } else { NINF })
            .collect(), // one finite value
        (0..cols)
            .map(|i| if i == 3 { f64::NAN } else { i as f64 })
            .collect(),
        (0..cols)
            .map(|i| if i == 9 { f64::INFINITY } else { 0.0 })
            .collect(),
        vec![NINF; cols],
        (0..cols).map(|i| -(i as f64) * 7.0).collect(), // a wide dynamic range
    ];
    let x: Vec<T> = rows.iter().flatten().map(|&v| T::from_f64(v)).collect();
    let got = run_case(dev, &x, rows.len(), cols, "adversarial");
    // Rows without NaN or inf sum to one (within the dtype), and every row is NaN-free or all NaN.
    for (r, row) in got.chunks(cols).enumerate() {
        let nans = row.iter().filter(|v| v.to_f64().is_nan()).count();
        assert!(nans == 0 || nans == cols, "row {r} partly NaN");
        if nans == 0 {
            let s: f64 = row.iter().map(|v| v.to_f64()).sum();
            assert!((s - 1.0).abs() < 64.0 * T::EPSILON, "row {r} sums to {s}");
        }
    }
}

#[test]
fn gpu_softmax_matches_reference() {
    let Some(dev) = common::gpu("gpu_softmax_matches_reference") else {
        return;
    };
    random_shapes::<f32>(&dev);
    random_shapes::<bf16>(&dev);
    random_shapes::<f16>(&dev);
    adversarial::<f32>(&dev);
    adversarial::<bf16>(&dev);
    adversarial::<f16>(&dev);
}

#[test]
fn gpu_softmax_is_deterministic_and_handles_empty_input() {
    let Some(dev) = common::gpu("gpu_softmax_is_deterministic_and_handles_empty_input") else {
        return;
    };
    let mut rng = Rng::new(5);
    let x: Vec<bf16> = rng.normal_vec(128 * 3000, 2.0);
    let xd = dev.upload(&x, &[128, 3000]).unwrap();
    let a = dev
        .download(&activation::softmax(&dev, &xd).unwrap())
        .unwrap();
    let b = dev
        .download(&activation::softmax(&dev, &xd).unwrap())
        .unwrap();
    assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));

    for shape in [[0usize, 16], [4, 0]] {
        let e = dev.zeros::<f32>(&shape).unwrap();
        assert_eq!(activation::softmax(&dev, &e).unwrap().shape(), &shape);
    }
}

#[test]
fn gpu_softmax_refuses_bad_shapes() {
    let Some(dev) = common::gpu("gpu_softmax_refuses_bad_shapes") else {
        return;
    };
    let x = dev.zeros::<f16>(&[4, 8]).unwrap();
    let mut out = dev.zeros::<f16>(&[4, 9]).unwrap();
    let e = activation::softmax_into(&dev, &mut out, &x).unwrap_err();
    assert_eq!(
        e.to_string(),
        "softmax: argument `out`: expected shape [4, 8] (as x), got [4, 9]"
    );
    let scalar = dev.upload(&[f16::ONE], &[]).unwrap();
    let e = activation::softmax(&dev, &scalar).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                op: "softmax",
                arg: "x",
                ..
            }
        ),
        "{e}"
    );
}

use moe_kernels::activation::{Act, GateLayout, GatedAct};

#[test]
fn activation_references_by_hand() {
    let e = std::f64::consts::E;
    assert_eq!(reference::silu(0.0), 0.0);
    assert_relative_eq!(
        reference::silu(1.0),
        1.0 / (1.0 + 1.0 / e),
        max_relative = 1e-15
    );
    // Phi(1) = 0.8413447460685429 (standard normal CDF).
    assert_relative_eq!(
        reference::gelu_erf(1.0),
        0.8413447460685429,
        max_relative = 1e-14
    );
    assert_relative_eq!(
        reference::gelu_tanh(1.0),
        0.8411919906082768,
        max_relative = 1e-14
    );
    // gpt-oss clamps the gate above at 7 and the up projection to [-7, 7].
    let s = reference::sigmoid(1.702 * 7.0);
    assert_relative_eq!(
        reference::gpt_oss_swiglu(10.0, -10.0, 1.702, 7.0),
        -6.0 * 7.0 * s,
        max_relative = 1e-15
    );
    assert_relative_eq!(
        reference::gpt_oss_swiglu(-2.0, 0.5, 1.702, 7.0),
        1.5 * -2.0 * reference::sigmoid(-3.404),
        max_relative = 1e-15
    );
    assert!(reference::gpt_oss_swiglu(f64::NAN, 1.0, 1.702, 7.0).is_nan());
    assert!(reference::gpt_oss_swiglu(1.0, f64::NAN, 1.702, 7.0).is_nan());
    assert_eq!(reference::relu(-1.0), 0.0);
    assert!(reference::relu(f64::NAN).is_nan());
    assert_eq!(GatedAct::Silu.eval(1.0, 3.0), 3.0 * reference::silu(1.0));
}

/// The gated activation's expected value. Where the up value is infinite and the gate's factor
/// act(g) is exactly 0 in f32 (1 + tanh or 1 + erf cancels to 0 once tanhf or erff rounds to -1,
/// for gates below about -4.6), every f32 evaluation of the formula gives 0 * inf = NaN, while
/// the f64 reference gives a tiny number times infinity: expect NaN there.
fn gated_want(act: GatedAct, g: f64, u: f64) -> f64 {
    let gate_is_zero_in_f32 = || {
        let g = g as f32;
        match act {
            GatedAct::GeluTanh => 1.0 + (0.797_884_6 * (g + 0.044715 * g * g * g)).tanh() == 0.0,
            GatedAct::GeluErf => 1.0 + libm::erff(g * std::f32::consts::FRAC_1_SQRT_2) == 0.0,
            GatedAct::Silu => g / (1.0 + (-g).exp()) == 0.0,
            GatedAct::GptOss { .. } => false, // the up value is clamped to a finite range
        }
    };
    if u.is_infinite() && !g.is_nan() && gate_is_zero_in_f32() {
        f64::NAN
    } else {
        act.eval(g, u)
    }
}

fn gated_case<T: Float>(
    dev: &Device,
    rows: usize,
    inter: usize,
    act: GatedAct,
    layout: GateLayout,
) {
    let mut rng = Rng::new((rows * 131 + inter) as u64);
    let mut x: Vec<T> = rng.normal_vec(rows * 2 * inter, 3.0);
    // Non-finite and clamped values in the first row.
    for (i, v) in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 9.0, -9.0, 50.0]
        .iter()
        .enumerate()
    {
        if i < x.len() {
            x[i] = T::from_f64(*v);
        }
    }
    let xd = dev.upload(&x, &[rows, 2 * inter]).unwrap();
    let mut out = dev.filled_bytes::<T>(&[rows, inter], 0xff).unwrap();
    activation::gated_act_into(dev, &mut out, &xd, act, layout).unwrap();
    let got = dev.download(&out).unwrap();
    let mut want = Vec::with_capacity(rows * inter);
    for r in x.chunks(2 * inter) {
        for i in 0..inter {
            let (g, u) = match layout {
                GateLayout::GateFirst => (r[i], r[inter + i]),
                GateLayout::UpFirst => (r[inter + i], r[i]),
                GateLayout::Interleaved => (r[2 * i], r[2 * i + 1]),
            };
            want.push(gated_want(act, g.to_f64(), u.to_f64()));
        }
    }
    // One rounding to T plus a few f32 ulps of exp/tanh/erf. Where 1 + tanh or 1 + erf cancels
    // (gates around -2 to -5), tanhf's and erff's absolute error of up to 2 ulps of 1 passes
    // through 0.5 g u with |g u| up to ~60: about 4e-6, hence the absolute term.
    let tol = Tolerance::new(2e-5, 2.0 * T::EPSILON + 1e-6);
    let report = check::compare(&got, &want, tol);
    println!(
        "gated {act:?} {layout:?} {} [{rows}, {inter}]: {report}",
        T::DTYPE
    );
    assert!(
        report.passed(),
        "gated {act:?} {layout:?} {} [{rows}, {inter}]: {report}",
        T::DTYPE
    );
}

fn act_case<T: Float>(dev: &Device, n: usize, act: Act) {
    let mut rng = Rng::new(n as u64);
    let mut x: Vec<T> = rng.normal_vec(n, 3.0);
    x[0] = T::from_f64(f64::NAN);
    x[1] = T::from_f64(f64::INFINITY);
    let xd = dev.upload(&x, &[n]).unwrap();
    let mut out = dev.filled_bytes::<T>(&[n], 0xff).unwrap();
    activation::act_into(dev, &mut out, &xd, act).unwrap();
    let want: Vec<f64> = x.iter().map(|v| act.eval(v.to_f64())).collect();
    let report = check::compare(
        &dev.download(&out).unwrap(),
        &want,
        Tolerance::new(1e-6, 2.0 * T::EPSILON + 1e-6),
    );
    println!("act {act:?} {} [{n}]: {report}", T::DTYPE);
    assert!(report.passed(), "act {act:?} {} [{n}]: {report}", T::DTYPE);
}

fn activations<T: Float>(dev: &Device) {
    let acts = [
        GatedAct::Silu,
        GatedAct::GeluTanh,
        GatedAct::GeluErf,
        GatedAct::GPT_OSS,
    ];
    let layouts = [
        GateLayout::GateFirst,
        GateLayout::UpFirst,
        GateLayout::Interleaved,
    ];
    for act in acts {
        for layout in layouts {
            // 7 is not a multiple of any vector width; 768 (Qwen3) and 2880 (gpt-oss) are.
            for (rows, inter) in [(1, 7), (3, 768), (17, 2880)] {
                gated_case::<T>(dev, rows, inter, act, layout);
            }
        }
    }
    for act in [Act::Relu, Act::GeluTanh, Act::GeluErf, Act::Silu] {
        for n in [2, 1001, 65536] {
            act_case::<T>(dev, n, act);
        }
    }
}

#[test]
fn gpu_activations_match_reference() {
    let Some(dev) = common::gpu("gpu_activations_match_reference") else {
        return;
    };
    activations::<f32>(&dev);
    activations::<bf16>(&dev);
    activations::<f16>(&dev);
    let x = dev.zeros::<bf16>(&[2, 7]).unwrap();
    let mut out = dev.zeros::<bf16>(&[2, 3]).unwrap();
    let e = activation::gated_act_into(&dev, &mut out, &x, GatedAct::Silu, GateLayout::GateFirst)
        .unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
}
