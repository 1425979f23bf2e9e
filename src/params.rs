//! `#[repr(C)]` mirrors of `kernels/common/params.cuh`.
//!
//! Each struct is asserted here to have the size and field offsets that the header asserts with
//! `static_assert`, so a field added on one side only fails the build on that side.

use std::mem::{offset_of, size_of};

use cudarc::driver::DeviceRepr;

/// See `SoftmaxParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct SoftmaxParams {
    pub out: u64,
    pub inp: u64,
    pub out_stride: i64,
    pub in_stride: i64,
    pub rows: i32,
    pub cols: i32,
    pub vec: i32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<SoftmaxParams>() == 48);
const _: () = assert!(offset_of!(SoftmaxParams, out_stride) == 16);
const _: () = assert!(offset_of!(SoftmaxParams, rows) == 32);
const _: () = assert!(offset_of!(SoftmaxParams, vec) == 40);

// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for SoftmaxParams {}
