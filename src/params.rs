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

/// See `RouteParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouteParams {
    pub ids: u64,
    pub weights: u64,
    pub counts: u64,
    pub logits: u64,
    pub bias: u64,
    pub tokens: i32,
    pub experts: i32,
    pub k: i32,
    pub rule: i32,
    pub n_group: i32,
    pub topk_group: i32,
    pub renormalize: i32,
    pub scale: f32,
    pub softcap: f32,
    pub top_p: f32,
}
const _: () = assert!(size_of::<RouteParams>() == 80);
const _: () = assert!(offset_of!(RouteParams, tokens) == 40);
const _: () = assert!(offset_of!(RouteParams, scale) == 68);
const _: () = assert!(offset_of!(RouteParams, top_p) == 76);

// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for RouteParams {}

/// `RouteRule` in params.cuh.
pub(crate) mod route_rule {
    pub const SOFTMAX_TOPK: i32 = 0;
    pub const TOPK_SOFTMAX: i32 = 1;
    pub const TOPK_SIGMOID: i32 = 2;
    pub const SIGMOID_GROUP_TOPK: i32 = 3;
    pub const SOFTMAX_GROUP_TOPK: i32 = 4;
    pub const TOP_P: i32 = 5;
}
