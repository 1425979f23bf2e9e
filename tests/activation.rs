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
