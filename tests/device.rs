//! The device layer: errors instead of panics, build facts, and host/device transfers.

mod common;

use moe_kernels::kernels::{self, Module};
use moe_kernels::{Device, Error, device};

#[test]
fn device_new_returns_an_error_not_a_panic() {
    match Device::new(0) {
        Ok(dev) => assert!(dev.info().sm_count > 0),
        Err(Error::NoDriver) => assert!(!device::driver_present()),
        Err(Error::NoDevice(msg)) => assert!(!msg.is_empty()),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

#[test]
fn a_missing_ordinal_is_no_device() {
    match Device::new(4096) {
        Err(Error::NoDevice(msg)) => assert!(msg.contains("4096"), "{msg}"),
        Err(Error::NoDriver) => assert!(!device::driver_present()),
        other => panic!("expected NoDevice or NoDriver, got {other:?}"),
    }
}

#[test]
fn the_three_unavailability_errors_say_different_things() {
    let no_driver = Error::NoDriver.to_string();
    let no_device = Error::NoDevice("device ordinal 3 requested, 1 present".into()).to_string();
    let not_built = Error::KernelsNotBuilt {
        op: "softmax",
        module: "activation",
    }
    .to_string();
    assert!(no_driver.contains("driver"), "{no_driver}");
    assert!(no_device.contains("no CUDA device") && no_device.contains("ordinal 3"));
    assert!(not_built.starts_with("softmax:") && not_built.contains("install-cuda-toolchain"));
    assert!(no_driver != no_device && no_device != not_built);
}

#[test]
fn build_facts_agree_with_the_embedded_images() {
    let any = Module::ALL.iter().any(|m| m.image().is_some());
    assert_eq!(any, kernels::built(), "some but not all modules were built");
    assert_eq!(kernels::built(), kernels::NVCC_VERSION.is_some());
    if !kernels::built() {
        assert!(kernels::ARCHS.is_empty());
        return;
    }
    // A fatbin starts with the fatbin wrapper magic 0xBA55ED50, little-endian.
    for m in Module::ALL {
        let image = m.image().unwrap();
        assert_eq!(
            &image[..4],
            &[0x50, 0xed, 0x55, 0xba],
            "{}: not a fatbin",
            m.name()
        );
        assert_eq!(
            image.as_ptr() as usize % 16,
            0,
            "{}: image not 16-byte aligned",
            m.name()
        );
    }
    if std::env::var_os("MOE_KERNELS_ARCHS").is_none() {
        assert_eq!(kernels::ARCHS, ["sm_80", "sm_90", "compute_90"]);
    }
    assert!(kernels::PTXAS_REPORT.contains("Used"));
}

#[test]
fn gpu_upload_download_round_trip() {
    let Some(dev) = common::gpu("gpu_upload_download_round_trip") else {
        return;
    };
    let data: Vec<i32> = (0..1000).map(|i| i * 7 - 3000).collect();
    let t = dev.upload(&data, &[10, 100]).unwrap();
    assert_eq!(t.shape(), &[10, 100]);
    assert_eq!(dev.download(&t).unwrap(), data);

    let empty = dev.upload::<f32>(&[], &[0, 64]).unwrap();
    assert_eq!(dev.download(&empty).unwrap(), Vec::<f32>::new());

    let poisoned = dev.filled_bytes::<i32>(&[3], 0xff).unwrap();
    assert_eq!(dev.download(&poisoned).unwrap(), vec![-1, -1, -1]);
    let nan = dev.filled_bytes::<f32>(&[2], 0xff).unwrap();
    assert!(dev.download(&nan).unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn gpu_shape_errors_name_the_op_and_argument() {
    let Some(dev) = common::gpu("gpu_shape_errors_name_the_op_and_argument") else {
        return;
    };
    let e = dev.upload(&[1.0f32; 5], &[2, 3]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Device::upload: argument `data`: expected 6 elements for shape [2, 3], got 5 elements"
    );
    let t = dev.upload(&[1.0f32; 6], &[2, 3]).unwrap();
    let e = t.reshape(&[4, 2]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                op: "Tensor::reshape",
                arg: "shape",
                ..
            }
        ),
        "{e}"
    );
    let e = dev.zeros::<f32>(&[usize::MAX, 2]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                op: "Device::zeros",
                ..
            }
        ),
        "{e}"
    );
}
