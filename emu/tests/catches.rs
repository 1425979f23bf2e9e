//! Planted bugs the emulator must catch, and launches it must refuse as the hardware does. Each
//! failure reaches the caller as a driver error whose message names the kernel; none crashes
//! the test process.

mod common;

use common::{Gpu, assert_fails};
use cudarc::driver::sys::cudaError_enum as E;
use moe_emu::{Order, with_order};

#[repr(C)]
struct ExchangeParams {
    out: u64,
    barrier: i32,
    pad: i32,
}

fn exchange(gpu: &Gpu, barrier: bool, order: Order) -> Vec<i32> {
    let out = gpu.alloc::<i32>(256);
    let p = ExchangeParams {
        out,
        barrier: barrier as i32,
        pad: 0,
    };
    with_order(order, || {
        gpu.run("emu_test_exchange", [1, 1, 1], [256, 1, 1], 0, &p)
    });
    let got = gpu.download(out, 256);
    gpu.free(out);
    got
}

#[test]
fn a_missing_syncthreads_reads_unwritten_shared_memory_in_every_order() {
    let gpu = Gpu::new();
    let right: Vec<i32> = (0..256).map(|t| 1000 + 255 - t).collect();
    for order in [
        Order::Forward,
        Order::Reverse,
        Order::Shuffle(1),
        Order::Shuffle(2),
    ] {
        assert_eq!(
            exchange(&gpu, true, order),
            right,
            "{order:?} with the barrier"
        );
        let got = exchange(&gpu, false, order);
        let wrong = got.iter().zip(&right).filter(|(g, r)| g != r).count();
        // Every wrong value is the shared-memory poison, never a plausible number.
        assert!(
            got.iter()
                .zip(&right)
                .all(|(&g, &r)| g == r || g as u32 == 0x7fff_7fff)
        );
        println!("{order:?}: {wrong} of 256 threads read an unwritten slot without the barrier");
        assert!(
            wrong >= 64,
            "{order:?}: the missing barrier went unnoticed ({wrong} wrong)"
        );
    }
}

#[repr(C)]
struct OrderParams {
    out: u64,
    counter: u64,
}

#[test]
fn thread_orders_are_forward_reverse_and_seeded_shuffles() {
    let gpu = Gpu::new();
    let run = |order| {
        let out = gpu.alloc::<i32>(128);
        let counter = gpu.upload(&[0i32]);
        with_order(order, || {
            gpu.run(
                "emu_test_order",
                [1, 1, 1],
                [128, 1, 1],
                0,
                &OrderParams { out, counter },
            )
        });
        let got: Vec<i32> = gpu.download(out, 128);
        gpu.free(out);
        gpu.free(counter);
        got
    };
    assert_eq!(run(Order::Forward), (0..128).collect::<Vec<i32>>());
    assert_eq!(run(Order::Reverse), (0..128).rev().collect::<Vec<i32>>());
    let s1 = run(Order::Shuffle(1));
    let mut sorted = s1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..128).collect::<Vec<i32>>(), "a permutation");
    assert_eq!(s1, run(Order::Shuffle(1)), "the same seed, the same order");
    assert_ne!(s1, run(Order::Shuffle(2)));
    assert_ne!(s1, run(Order::Forward));
}

#[repr(C)]
struct BufferParams {
    out: u64,
    input: u64,
    n: i32,
    mode: i32,
}

fn memory(gpu: &Gpu, mode: i32) -> Result<(), common::Failure> {
    let n = 1000; // not a multiple of any page or alignment: the bounds are exact
    let input = gpu.upload(&vec![1.5f32; n]);
    let out = gpu.alloc::<f32>(n);
    let p = BufferParams {
        out,
        input,
        n: n as i32,
        mode,
    };
    let r = gpu.launch("emu_test_memory", [4, 1, 1], [256, 1, 1], 0, &p);
    if r.is_ok() && mode == 0 {
        assert!(gpu.download::<f32>(out, n).iter().all(|&v| v == 2.5));
    }
    gpu.free(input);
    gpu.free(out);
    r
}

#[test]
fn out_of_bounds_and_misaligned_accesses_fail_the_launch_and_name_the_kernel() {
    let gpu = Gpu::new();
    memory(&gpu, 0).unwrap();
    assert_fails(
        memory(&gpu, 1),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &[
            "emu_test_memory",
            "out-of-bounds write of 4 bytes",
            "0 bytes past the end of the allocation of 4000 bytes",
        ],
    );
    assert_fails(
        memory(&gpu, 2),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &[
            "emu_test_memory",
            "out-of-bounds read of 4 bytes",
            "4 bytes before",
        ],
    );
    assert_fails(
        memory(&gpu, 3),
        E::CUDA_ERROR_MISALIGNED_ADDRESS,
        &[
            "emu_test_memory",
            "misaligned address",
            "uint4",
            "16-byte alignment",
            "selftest.cu",
        ],
    );
    assert_fails(
        memory(&gpu, 4),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["emu_test_memory", "0x1000"],
    );
    assert_fails(
        memory(&gpu, 5),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["emu_test_memory", "shared-memory write", "thread (64,0,0)"],
    );
    // The process goes on: the next launch runs normally.
    memory(&gpu, 0).unwrap();
}

#[test]
fn a_freed_buffer_is_not_device_memory_any_more() {
    let gpu = Gpu::new();
    let input = gpu.upload(&[1.0f32; 64]);
    let out = gpu.alloc::<f32>(64);
    gpu.free(input);
    let p = BufferParams {
        out,
        input,
        n: 64,
        mode: 0,
    };
    assert_fails(
        gpu.launch("emu_test_memory", [1, 1, 1], [64, 1, 1], 0, &p),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["freed allocation"],
    );
    gpu.free(out);
}

#[repr(C)]
struct WarpParams {
    out: u64,
    mode: i32,
    pad: i32,
}

#[test]
fn misused_warp_collectives_and_deadlocks_fail_the_launch() {
    let gpu = Gpu::new();
    let run = |mode| {
        let out = gpu.alloc::<i32>(64);
        let r = gpu.launch(
            "emu_test_warp",
            [1, 1, 1],
            [64, 1, 1],
            0,
            &WarpParams { out, mode, pad: 0 },
        );
        gpu.free(out);
        r
    };
    assert_fails(
        run(1),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["shuffle", "has exited", "emu_test_warp"],
    );
    assert_fails(
        run(3),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["does not name the calling lane 0"],
    );
    assert_fails(
        run(4),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &[
            "deadlock",
            "48 of the 64 live threads wait at __syncthreads",
            "__syncwarp",
            "wait at __syncthreads instead",
        ],
    );
    assert_fails(run(5), E::CUDA_ERROR_LAUNCH_FAILED, &["does not name"]);
}

#[repr(C)]
struct UbParams {
    out: u64,
    a: i32,
    mode: i32,
}

#[test]
fn undefined_behaviour_in_kernel_code_fails_the_launch_with_its_line() {
    let gpu = Gpu::new();
    let out = gpu.alloc::<i32>(1);
    let run = |mode| {
        gpu.launch(
            "emu_test_ub",
            [1, 1, 1],
            [32, 1, 1],
            0,
            &UbParams { out, a: 1, mode },
        )
    };
    assert_fails(
        run(0),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["signed integer overflow", "selftest.cu:"],
    );
    assert_fails(
        run(1),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["shift", "selftest.cu:"],
    );
    assert_fails(
        run(2),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["division", "selftest.cu:"],
    );
    assert_fails(
        run(3),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["index 4 out of bounds", "int [4]"],
    );
    gpu.free(out);
}

#[repr(C)]
struct SmemParams {
    out: u64,
    n: i32,
    pad: i32,
}

#[test]
fn launches_are_refused_as_the_hardware_refuses_them() {
    let gpu = Gpu::new();
    let out = gpu.alloc::<i32>(2048);
    // emu_test_dynamic_smem on one block of `threads`, with `bytes` of dynamic shared memory
    // holding n words.
    let smem = |threads: u32, bytes: u32, n: i32| {
        let p = SmemParams { out, n, pad: 0 };
        gpu.launch(
            "emu_test_dynamic_smem",
            [1, 1, 1],
            [threads, 1, 1],
            bytes,
            &p,
        )
    };
    // Past the kernel's __launch_bounds__(32); past 1024 threads; an empty grid.
    assert_fails(
        gpu.launch(
            "emu_test_ub",
            [1, 1, 1],
            [64, 1, 1],
            0,
            &UbParams { out, a: 1, mode: 0 },
        ),
        E::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES,
        &["emu_test_ub", "__launch_bounds__ of 32"],
    );
    assert_fails(
        smem(2048, 4096, 256),
        E::CUDA_ERROR_INVALID_VALUE,
        &["past the limits"],
    );
    let p = SmemParams {
        out,
        n: 256,
        pad: 0,
    };
    assert_fails(
        gpu.launch("emu_test_dynamic_smem", [0, 1, 1], [32, 1, 1], 4096, &p),
        E::CUDA_ERROR_INVALID_VALUE,
        &["must not be empty"],
    );
    // Dynamic shared memory: within the default 48 KB; past it only after the opt-in, and never
    // past 227 KB.
    smem(256, 1024, 256).unwrap();
    let got: Vec<i32> = gpu.download(out, 256);
    assert!(
        got.iter()
            .enumerate()
            .all(|(t, &v)| v == 3 * ((t as i32 + 1) % 256) + 1)
    );
    assert_fails(
        smem(1024, 100 * 1024, 1024),
        E::CUDA_ERROR_INVALID_VALUE,
        &["102400 bytes of dynamic shared memory", "limit of 49152"],
    );
    let f = gpu.function("emu_test_dynamic_smem");
    // SAFETY: a live function handle.
    unsafe {
        assert_eq!(
            moe_emu::cuFuncSetAttribute(f, 8, 100 * 1024),
            E::CUDA_SUCCESS
        );
        assert_eq!(
            moe_emu::cuFuncSetAttribute(f, 8, 228 * 1024),
            E::CUDA_ERROR_INVALID_VALUE
        );
    }
    smem(1024, 100 * 1024, 1024).unwrap();
    // A word past the launch's dynamic shared memory.
    assert_fails(
        smem(256, 255 * 4, 255),
        E::CUDA_ERROR_ILLEGAL_ADDRESS,
        &["shared-memory write", "the dynamic part"],
    );
    gpu.free(out);
}

#[repr(C)]
struct PoisonParams {
    out: u64,
    input: u64,
}

#[test]
fn fresh_device_and_shared_memory_hold_poison_not_zeros() {
    let gpu = Gpu::new();
    let input = gpu.alloc::<u32>(16);
    let out = gpu.alloc::<u32>(2);
    gpu.run(
        "emu_test_poison",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &PoisonParams { out, input },
    );
    assert_eq!(gpu.download::<u32>(out, 2), [0x7fff_7fff, 0x7fff_7fff]);
    // As f32, bf16 and f16 the pattern is NaN.
    assert!(f32::from_bits(0x7fff_7fff).is_nan());
    assert!(half::bf16::from_bits(0x7fff).is_nan() && half::f16::from_bits(0x7fff).is_nan());
    gpu.free(input);
    gpu.free(out);
}

#[test]
fn a_stack_overflow_in_a_kernel_thread_fails_the_launch() {
    let gpu = Gpu::new();
    let out = gpu.upload(&[0i32; 4]);
    assert_fails(
        gpu.launch(
            "emu_test_stack",
            [1, 1, 1],
            [32, 1, 1],
            0,
            &SmemParams {
                out,
                n: 100_000,
                pad: 0,
            },
        ),
        E::CUDA_ERROR_LAUNCH_FAILED,
        &["stack overflow", "emu_test_stack"],
    );
    gpu.run(
        "emu_test_stack",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &SmemParams { out, n: 10, pad: 0 },
    );
    gpu.free(out);
}

#[test]
fn calls_the_emulator_lacks_return_an_error_naming_them() {
    let _gpu = Gpu::new();
    let rc = moe_emu::stubs::cuMemAllocManaged();
    assert_eq!(rc, E::CUDA_ERROR_NOT_SUPPORTED);
    let msg = moe_emu::error_string(rc);
    assert!(
        msg.contains("cuMemAllocManaged is not implemented"),
        "{msg}"
    );
}

#[test]
fn a_capture_records_launches_and_replays_them_on_current_contents() {
    use std::ptr::null_mut;
    let gpu = Gpu::new();
    let n = 256;
    let input = gpu.upload(&vec![1.0f32; n]);
    let out = gpu.alloc::<f32>(n);
    let f = gpu.function("emu_test_memory");
    let p = BufferParams {
        out,
        input,
        n: n as i32,
        mode: 0,
    };
    let mut args = [&p as *const BufferParams as *mut std::ffi::c_void];
    // SAFETY: driver calls on live handles; the parameter outlives the launch that copies it.
    unsafe {
        let mut s = null_mut();
        assert_eq!(moe_emu::cuStreamCreate(&mut s, 0), E::CUDA_SUCCESS);
        assert_eq!(moe_emu::cuStreamBeginCapture_v2(s, 1), E::CUDA_SUCCESS);
        let rc =
            moe_emu::cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, s, args.as_mut_ptr(), null_mut());
        assert_eq!(rc, E::CUDA_SUCCESS);
        let mut g = null_mut();
        assert_eq!(moe_emu::cuStreamEndCapture(s, &mut g), E::CUDA_SUCCESS);
        // Nothing ran during the capture.
        assert!(
            gpu.download::<u32>(out, n)
                .iter()
                .all(|&v| v == 0x7fff_7fff)
        );
        let mut e = null_mut();
        assert_eq!(
            moe_emu::cuGraphInstantiateWithFlags(&mut e, g, 0),
            E::CUDA_SUCCESS
        );
        for value in [2.0f32, -4.0] {
            gpu.write(input, &vec![value; n]);
            assert_eq!(moe_emu::cuGraphLaunch(e, s), E::CUDA_SUCCESS);
            assert!(
                gpu.download::<f32>(out, n)
                    .iter()
                    .all(|&v| v == value + 1.0)
            );
        }
        // A host wait inside a capture invalidates it.
        assert_eq!(moe_emu::cuStreamBeginCapture_v2(s, 1), E::CUDA_SUCCESS);
        assert_eq!(
            moe_emu::cuStreamSynchronize(s),
            E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
        );
        let mut g2 = null_mut();
        assert_eq!(
            moe_emu::cuStreamEndCapture(s, &mut g2),
            E::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
        );
        assert_eq!(moe_emu::cuGraphExecDestroy(e), E::CUDA_SUCCESS);
        assert_eq!(moe_emu::cuGraphDestroy(g), E::CUDA_SUCCESS);
        assert_eq!(moe_emu::cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
    }
    gpu.free(input);
    gpu.free(out);
}
