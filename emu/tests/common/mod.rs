//! A small host side for the emulator's own tests: the driver functions called directly, with
//! typed buffers and one launch helper. No cudarc here: the tests link the emulator itself.
#![allow(dead_code)] // each test file uses its own subset

use std::ffi::{CString, c_void};

use cudarc::driver::sys::{CUresult, cudaError_enum as E};
use moe_emu as emu;

pub type Failure = (CUresult, String);

pub struct Gpu {
    module: *mut c_void,
}

fn check(rc: CUresult, what: &str) {
    assert_eq!(rc, E::CUDA_SUCCESS, "{what}: {}", emu::error_string(rc));
}

impl Gpu {
    pub fn new() -> Gpu {
        // SAFETY: plain driver calls with valid out-pointers.
        unsafe {
            check(emu::cuInit(0), "cuInit");
            let mut ctx = std::ptr::null_mut();
            check(emu::cuDevicePrimaryCtxRetain(&mut ctx, 0), "retain");
            check(emu::cuCtxSetCurrent(ctx), "set current");
            let mut module = std::ptr::null_mut();
            check(
                emu::cuModuleLoadData(&mut module, c"image".as_ptr().cast()),
                "load",
            );
            Gpu { module }
        }
    }

    pub fn alloc<T>(&self, n: usize) -> u64 {
        let mut p = 0u64;
        // SAFETY: p receives the address.
        check(
            unsafe { emu::cuMemAlloc_v2(&mut p, n * size_of::<T>()) },
            "alloc",
        );
        p
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> u64 {
        let p = self.alloc::<T>(data.len());
        self.write(p, data);
        p
    }

    pub fn write<T: Copy>(&self, p: u64, data: &[T]) {
        // SAFETY: data is size_of_val(data) readable bytes.
        check(
            unsafe { emu::cuMemcpyHtoD_v2(p, data.as_ptr().cast(), size_of_val(data)) },
            "upload",
        );
    }

    pub fn download<T: Copy + Default>(&self, p: u64, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        // SAFETY: v holds n elements.
        check(
            unsafe { emu::cuMemcpyDtoH_v2(v.as_mut_ptr().cast(), p, n * size_of::<T>()) },
            "download",
        );
        v
    }

    pub fn free(&self, p: u64) {
        // SAFETY: p came from alloc.
        check(unsafe { emu::cuMemFree_v2(p) }, "free");
    }

    pub fn function(&self, name: &str) -> *mut c_void {
        let mut f = std::ptr::null_mut();
        let c = CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name and a live module.
        check(
            unsafe { emu::cuModuleGetFunction(&mut f, self.module, c.as_ptr()) },
            name,
        );
        f
    }

    /// Launches `name` with `params` as its one argument; a failure comes back with its message.
    pub fn launch<P>(
        &self,
        name: &str,
        grid: [u32; 3],
        block: [u32; 3],
        smem: u32,
        params: &P,
    ) -> Result<(), Failure> {
        let f = self.function(name);
        let mut args = [params as *const P as *mut c_void];
        // SAFETY: one parameter, as every self-test kernel takes; P mirrors its struct.
        let rc = unsafe {
            emu::cuLaunchKernel(
                f,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                smem,
                std::ptr::null_mut(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        if rc == E::CUDA_SUCCESS {
            Ok(())
        } else {
            Err((rc, emu::error_string(rc)))
        }
    }

    /// The same, for a launch that must succeed.
    pub fn run<P>(&self, name: &str, grid: [u32; 3], block: [u32; 3], smem: u32, params: &P) {
        if let Err((rc, msg)) = self.launch(name, grid, block, smem, params) {
            panic!("{name}: {rc:?}: {msg}");
        }
    }
}

/// Asserts that a launch failed with `code` and a message containing every one of `words`.
pub fn assert_fails(r: Result<(), Failure>, code: CUresult, words: &[&str]) {
    match r {
        Ok(()) => panic!("expected {code:?}, the launch succeeded"),
        Err((rc, msg)) => {
            assert_eq!(rc, code, "{msg}");
            for w in words {
                assert!(msg.contains(w), "`{w}` not in: {msg}");
            }
            println!("caught as expected: {msg}");
        }
    }
}
