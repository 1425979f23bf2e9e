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
    // The architectures were chosen when the kernels were built (the GPU bundle builds sm_90
    // only), so ask the build's environment, not the test run's.
    if option_env!("MOE_KERNELS_ARCHS").is_none() {
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

#[test]
fn gpu_fill_uniform_matches_its_host_twin() {
    let Some(dev) = common::gpu("gpu_fill_uniform_matches_its_host_twin") else {
        return;
    };
    // An odd length past one grid's stride, in two dtypes; every element bit for bit.
    let n = 65_535 * 16 * 256 + 12_345;
    let mut t = dev.zeros::<half::bf16>(&[n]).unwrap();
    dev.fill_uniform(&mut t, 42, -0.5, 2.0).unwrap();
    let got = dev.download(&t).unwrap();
    for (i, g) in got
        .iter()
        .enumerate()
        .step_by(997)
        .chain(got.iter().enumerate().rev().take(300))
    {
        let want = half::bf16::from_f32(moe_kernels::device::uniform_at(42, i as u64, -0.5, 2.0));
        assert_eq!(g.to_bits(), want.to_bits(), "element {i}");
    }
    let mut f = dev.zeros::<f32>(&[1001]).unwrap();
    dev.fill_uniform(&mut f, 7, -1.0, 1.0).unwrap();
    let got = dev.download(&f).unwrap();
    let want: Vec<f32> = (0..1001)
        .map(|i| moe_kernels::device::uniform_at(7, i, -1.0, 1.0))
        .collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|v| (-1.0..1.0).contains(v)));
    assert!(got.windows(2).any(|w| w[0] != w[1]));
    assert!(dev.fill_uniform(&mut f, 7, 1.0, -1.0).is_err());
    // f16, and a seed above 2^32 as MoeLayer::random uses.
    let seed = (3u64 << 32) + 1;
    let mut h = dev.zeros::<half::f16>(&[4099]).unwrap();
    dev.fill_uniform(&mut h, seed, -0.25, 0.25).unwrap();
    let got = dev.download(&h).unwrap();
    for (i, g) in got.iter().enumerate() {
        let want =
            half::f16::from_f32(moe_kernels::device::uniform_at(seed, i as u64, -0.25, 0.25));
        assert_eq!(g.to_bits(), want.to_bits(), "f16 element {i}");
    }
}

#[test]
fn gpu_set_shape_covers_the_leading_elements_only() {
    let Some(dev) = common::gpu("gpu_set_shape_covers_the_leading_elements_only") else {
        return;
    };
    let data: Vec<i32> = (0..100).collect();
    let mut t = dev.upload(&data, &[10, 10]).unwrap();
    assert_eq!(t.capacity(), 100);
    t.set_shape(&[3, 5]).unwrap();
    assert_eq!(t.numel(), 15);
    assert_eq!(dev.download(&t).unwrap(), (0..15).collect::<Vec<_>>());
    dev.upload_into(&mut t, &[-1; 15]).unwrap();
    assert!(dev.upload_into(&mut t, &[-1; 16]).is_err());
    dev.fill_bytes(&mut t, 0).unwrap();
    t.set_shape(&[100]).unwrap();
    let back = dev.download(&t).unwrap();
    assert!(back[..15].iter().all(|&v| v == 0));
    assert_eq!(back[15..], data[15..]);
    let e = t.set_shape(&[101]).unwrap_err().to_string();
    assert!(e.contains("capacity"), "{e}");
}

#[test]
fn gpu_views_borrow_memory_the_crate_does_not_own() {
    use moe_kernels::activation;
    use moe_kernels::device::{TensorView, TensorViewMut};
    let Some(dev) = common::gpu("gpu_views_borrow_memory_the_crate_does_not_own") else {
        return;
    };
    let data: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
    let owned = dev.upload(&data, &[4, 6]).unwrap();
    let want = dev
        .download(&activation::softmax(&dev, &owned).unwrap())
        .unwrap();

    // A runtime's own buffers, through cudarc views: the op reads and writes them in place, and
    // gives the owned tensor's bits.
    let src = dev.stream().clone_htod(&data).unwrap();
    let mut dst = dev.stream().alloc_zeros::<f32>(24).unwrap();
    {
        let (sv, mut dv) = (src.as_view(), dst.as_view_mut());
        let x = TensorView::from_cuda(&dev, &sv, &[4, 6]).unwrap();
        let mut y = TensorViewMut::from_cuda(&dev, &mut dv, &[4, 6]).unwrap();
        let before = dev.work_counts();
        activation::softmax_into(&dev, &mut y, &x).unwrap();
        let n = dev.work_counts() - before;
        assert_eq!(
            (n.launches, n.memsets, n.copies, n.allocations),
            (1, 0, 0, 0),
            "{n:?}"
        );
        // The owned tensor's own views take the same path.
        let mut out2 = dev.zeros::<f32>(&[4, 6]).unwrap();
        activation::softmax_into(&dev, &mut out2.view_mut(), &owned.view()).unwrap();
        assert_eq!(dev.download(&out2).unwrap(), want);
    }
    assert_eq!(dev.stream().clone_dtoh(&dst).unwrap(), want);
    // Dropping the views freed nothing: both buffers are still whole.
    assert_eq!(dev.stream().clone_dtoh(&src).unwrap(), data);

    // Raw pointers, with their element count.
    use cudarc::driver::DevicePtr;
    let ptr = src.device_ptr(dev.stream()).0;
    // SAFETY: src holds 24 f32 of this device's context and outlives the view.
    let x = unsafe { TensorView::<f32>::from_raw(&dev, ptr, 24, &[4, 6]) }.unwrap();
    assert_eq!(dev.download(&x).unwrap(), data);
    drop(x);
    let refused = |r: moe_kernels::Result<TensorView<'_, f32>>, words: &[&str]| {
        let e = r.unwrap_err().to_string();
        for w in words {
            assert!(e.contains(w), "`{w}` not in: {e}");
        }
    };
    // SAFETY (each): the calls are refused before any memory is used.
    refused(
        unsafe { TensorView::from_raw(&dev, ptr, 23, &[4, 6]) },
        &["ptr", "at least 24 elements", "got 23"],
    );
    refused(
        unsafe { TensorView::from_raw(&dev, ptr + 2, 20, &[4, 5]) },
        &["aligned to 4 bytes"],
    );
    refused(unsafe { TensorView::from_raw(&dev, 0, 4, &[4]) }, &["ptr"]);
    let host = data.as_ptr() as u64;
    refused(
        unsafe { TensorView::from_raw(&dev, host, 24, &[24]) },
        &["device memory"],
    );
    refused(
        TensorView::from_cuda(&dev, &src.as_view(), &[5, 6]),
        &["view", "at least 30", "got 24"],
    );
    // A length the allocation does not hold, from its start or from inside it, is refused by
    // the driver's record of the allocation; a view inside it is taken. (A GPU's pool may round
    // an allocation up, so the far claim is far; the emulator's sizes are exact.)
    let far = 1usize << 26;
    refused(
        unsafe { TensorView::from_raw(&dev, ptr, far, &[far]) },
        &["ptr", "bytes of device memory", "an allocation ending"],
    );
    if dev.info().emulated {
        refused(
            unsafe { TensorView::from_raw(&dev, ptr, 32, &[32]) },
            &["128 bytes", "an allocation ending 96 bytes after it"],
        );
        refused(
            unsafe { TensorView::from_raw(&dev, ptr + 64, 9, &[9]) },
            &["36 bytes", "an allocation ending 32 bytes after it"],
        );
    }
    // SAFETY: elements 16..24 of src, inside its allocation.
    let tail = unsafe { TensorView::<f32>::from_raw(&dev, ptr + 64, 8, &[8]) }.unwrap();
    assert_eq!(dev.download(&tail).unwrap(), data[16..]);
    drop(tail);

    // A device-to-device copy is counted as a copy; element counts must agree.
    let mut twin = dev.zeros::<f32>(&[4, 6]).unwrap();
    let before = dev.work_counts();
    dev.copy_into(&mut twin, &owned).unwrap();
    assert_eq!((dev.work_counts() - before).copies, 1);
    assert_eq!(dev.download(&twin).unwrap(), data);
    let e = dev
        .copy_into(&mut dev.zeros::<f32>(&[5]).unwrap(), &owned)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Device::copy_into") && e.contains("dst"), "{e}");

    // Memory and tensors of another device's context are refused (the emulator has two
    // devices; a one-GPU machine skips this part).
    if let Ok(other) = Device::new(1) {
        let far = other.stream().clone_htod(&data).unwrap();
        let fp = far.device_ptr(other.stream()).0;
        refused(
            unsafe { TensorView::from_raw(&dev, fp, 24, &[24]) },
            &["another context"],
        );
        refused(
            TensorView::from_cuda(&dev, &far.as_view(), &[24]),
            &["view of device 0"],
        );
        let t = other.upload(&data, &[4, 6]).unwrap();
        let e = activation::softmax(&dev, &t).unwrap_err().to_string();
        assert!(e.contains("a tensor on device 1"), "{e}");
    }
}

#[test]
fn gpu_a_device_on_the_runtimes_stream_orders_with_it() {
    use cudarc::driver::CudaContext;
    use moe_kernels::activation;
    let Some(dev) = common::gpu("gpu_a_device_on_the_runtimes_stream_orders_with_it") else {
        return;
    };
    // A runtime's context and stream; the crate's work goes on that stream.
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let shared = Device::from_stream(stream.clone()).unwrap();
    let data: Vec<f32> = (0..64).map(|i| i as f32 / 9.0).collect();
    let x = shared.upload(&data, &[8, 8]).unwrap();
    let y = activation::softmax(&shared, &x).unwrap();
    let mine = activation::softmax(&dev, &dev.upload(&data, &[8, 8]).unwrap()).unwrap();
    assert_eq!(
        stream.clone_dtoh(y.buf()).unwrap(),
        dev.download(&mine).unwrap()
    );
    // The same through its raw handle; a stream of another context is refused.
    // SAFETY: the stream outlives `raw`.
    let raw = unsafe { Device::from_raw_stream(&ctx, stream.cu_stream()) }.unwrap();
    assert_eq!(raw.download(&y).unwrap(), dev.download(&mine).unwrap());
    if let Ok(other) = CudaContext::new(1) {
        let far = other.new_stream().unwrap();
        // SAFETY: refused before the stream is used.
        let e = unsafe { Device::from_raw_stream(&ctx, far.cu_stream()) }
            .unwrap_err()
            .to_string();
        assert!(e.contains("a stream of another context"), "{e}");
    }
}
