//! `#[repr(C)]` mirrors of `kernels/common/quant_params.cuh`, with the header's size and offset
//! asserts repeated here.

use std::mem::{offset_of, size_of};

use cudarc::driver::DeviceRepr;

use crate::params::GroupedGemmParams;

/// `QuantFormat` in quant_params.cuh.
pub(crate) mod format {
    pub const BF16: i32 = 0;
    pub const INT: i32 = 1;
    pub const MXFP4: i32 = 2;
    pub const FP8: i32 = 3;
    pub const TERNARY: i32 = 4;
}

/// See `QuantExpert` in quant_params.cuh. Uploaded as bytes, so it is `Pod`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct QuantExpert {
    pub format: i32,
    pub bits: i32,
    pub group: i32,
    pub dict_len: i32,
    pub codes: i64,
    pub scales: i64,
    pub zeros: i64,
    pub g_idx: i64,
    pub row_offsets: i64,
    pub dict: i64,
    pub perm: i64,
}
const _: () = assert!(size_of::<QuantExpert>() == 72);
const _: () = assert!(offset_of!(QuantExpert, codes) == 16);
const _: () = assert!(offset_of!(QuantExpert, dict) == 56);
const _: () = assert!(offset_of!(QuantExpert, perm) == 64);

/// See `QuantDequantParams` in quant_params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuantDequantParams {
    pub out: u64,
    pub blob: u64,
    pub experts: u64,
    pub status: u64,
    pub num_experts: i32,
    pub n: i32,
    pub kdim: i32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<QuantDequantParams>() == 48);
const _: () = assert!(offset_of!(QuantDequantParams, num_experts) == 32);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for QuantDequantParams {}

/// See `QuantGemvParams` in quant_params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuantGemvParams {
    pub g: GroupedGemmParams,
    pub blob: u64,
    pub experts: u64,
    pub status: u64,
}
const _: () = assert!(size_of::<QuantGemvParams>() == 136);
const _: () = assert!(offset_of!(QuantGemvParams, blob) == 112);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for QuantGemvParams {}
