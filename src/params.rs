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
    pub masks: u64,
    pub mask_index: u64,
    pub status: u64,
    pub mask_words: i32,
    pub mask_count: i32,
}
const _: () = assert!(size_of::<RouteParams>() == 112);
const _: () = assert!(offset_of!(RouteParams, tokens) == 40);
const _: () = assert!(offset_of!(RouteParams, scale) == 68);
const _: () = assert!(offset_of!(RouteParams, top_p) == 76);
const _: () = assert!(offset_of!(RouteParams, masks) == 80);
const _: () = assert!(offset_of!(RouteParams, mask_words) == 104);

// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for RouteParams {}

/// `RouteStatus` in params.cuh: what each entry of a routing status counts.
pub(crate) mod route_status {
    pub const GIVEN_ID_OUT_OF_RANGE: usize = 0;
    pub const GIVEN_ID_REPEATED: usize = 1;
    pub const GIVEN_WEIGHT_BAD: usize = 2;
    pub const MASK_INDEX_BAD: usize = 3;
    pub const LEN: usize = 4;
}

/// See `RouteGivenParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouteGivenParams {
    pub ids: u64,
    pub weights: u64,
    pub ids_in: u64,
    pub weights_in: u64,
    pub status: u64,
    pub tokens: i32,
    pub k: i32,
    pub experts: i32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<RouteGivenParams>() == 56);
const _: () = assert!(offset_of!(RouteGivenParams, tokens) == 40);

// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for RouteGivenParams {}

/// `RouteRule` in params.cuh.
pub(crate) mod route_rule {
    pub const SOFTMAX_TOPK: i32 = 0;
    pub const TOPK_SOFTMAX: i32 = 1;
    pub const TOPK_SIGMOID: i32 = 2;
    pub const SIGMOID_GROUP_TOPK: i32 = 3;
    pub const SOFTMAX_GROUP_TOPK: i32 = 4;
    pub const TOP_P: i32 = 5;
}

/// See `CapacityParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CapacityParams {
    pub ids_out: u64,
    pub weights_out: u64,
    pub dropped_ids: u64,
    pub ids: u64,
    pub weights: u64,
    pub slots: i32,
    pub experts: i32,
    pub capacity: i32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<CapacityParams>() == 56);
const _: () = assert!(offset_of!(CapacityParams, slots) == 40);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for CapacityParams {}

/// See `RouterStatsParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouterStatsParams {
    pub fraction: u64,
    pub mean_prob: u64,
    pub lse: u64,
    pub z_loss: u64,
    pub logits: u64,
    pub counts: u64,
    pub tokens: i32,
    pub experts: i32,
}
const _: () = assert!(size_of::<RouterStatsParams>() == 56);
const _: () = assert!(offset_of!(RouterStatsParams, tokens) == 48);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for RouterStatsParams {}

/// See `RouterLogitsParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouterLogitsParams {
    pub out: u64,
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub tokens: i32,
    pub experts: i32,
    pub hidden: i32,
    pub vec: i32,
}
const _: () = assert!(size_of::<RouterLogitsParams>() == 48);
const _: () = assert!(offset_of!(RouterLogitsParams, tokens) == 32);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for RouterLogitsParams {}

/// See `PlanParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanParams {
    pub counts: u64,
    pub offsets: u64,
    pub padded_offsets: u64,
    pub sorted_slots: u64,
    pub slot_rows: u64,
    pub padded_slots: u64,
    pub slot_padded_rows: u64,
    pub block_experts: u64,
    pub chunk_base: u64,
    pub status: u64,
    pub ids: u64,
    pub slots: i32,
    pub experts: i32,
    pub experts_total: i32,
    pub block_m: i32,
    pub padded_capacity: i32,
    pub chunks: i32,
}
const _: () = assert!(size_of::<PlanParams>() == 112);
const _: () = assert!(offset_of!(PlanParams, slots) == 88);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for PlanParams {}

/// See `GatherParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GatherParams {
    pub out: u64,
    pub x: u64,
    pub row_slots: u64,
    pub total_rows: u64,
    pub status: u64,
    pub rows: i32,
    pub hidden: i32,
    pub k: i32,
    pub tokens: i32,
    pub zero_unmapped: i32,
    pub vec: i32,
}
const _: () = assert!(size_of::<GatherParams>() == 64);
const _: () = assert!(offset_of!(GatherParams, rows) == 40);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for GatherParams {}

/// See `CombineParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CombineParams {
    pub y: u64,
    pub expert_out: u64,
    pub slot_rows: u64,
    pub ids: u64,
    pub weights: u64,
    pub x: u64,
    pub zc_kinds: u64,
    pub const_w: u64,
    pub const_v: u64,
    pub shared_out: u64,
    pub shared_gate: u64,
    pub residual: u64,
    pub status: u64,
    pub tokens: i32,
    pub hidden: i32,
    pub k: i32,
    pub rows: i32,
    pub experts: i32,
    pub experts_total: i32,
    pub vec: i32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<CombineParams>() == 136);
const _: () = assert!(offset_of!(CombineParams, tokens) == 104);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for CombineParams {}

/// See `MaskedParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct MaskedParams {
    pub masked_slots: u64,
    pub slot_masked_rows: u64,
    pub masked_counts: u64,
    pub status: u64,
    pub counts: u64,
    pub offsets: u64,
    pub sorted_slots: u64,
    pub experts: i32,
    pub max_rows: i32,
}
const _: () = assert!(size_of::<MaskedParams>() == 64);
const _: () = assert!(offset_of!(MaskedParams, experts) == 56);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for MaskedParams {}

/// See `EpSendParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct EpSendParams {
    pub send_counts: u64,
    pub send_slots: u64,
    pub status: u64,
    pub expert_rank: u64,
    pub counts: u64,
    pub offsets: u64,
    pub sorted_slots: u64,
    pub experts: i32,
    pub ranks: i32,
}
const _: () = assert!(size_of::<EpSendParams>() == 64);
const _: () = assert!(offset_of!(EpSendParams, experts) == 56);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for EpSendParams {}

/// See `GatedActParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GatedActParams {
    pub out: u64,
    pub inp: u64,
    pub rows: i32,
    pub inter: i32,
    pub layout: i32,
    pub act: i32,
    pub vec: i32,
    pub alpha: f32,
    pub limit: f32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<GatedActParams>() == 48);
const _: () = assert!(offset_of!(GatedActParams, rows) == 16);
const _: () = assert!(offset_of!(GatedActParams, alpha) == 36);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for GatedActParams {}

/// See `ActParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ActParams {
    pub out: u64,
    pub inp: u64,
    pub n: i64,
    pub act: i32,
    pub vec: i32,
}
const _: () = assert!(size_of::<ActParams>() == 32);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for ActParams {}

/// See `GroupedGemmParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupedGemmParams {
    pub out: u64,
    pub a: u64,
    pub w: u64,
    pub bias: u64,
    pub block_experts: u64,
    pub offsets: u64,
    pub row_slots: u64,
    pub slot_weights: u64,
    pub rows: i32,
    pub n: i32,
    pub kdim: i32,
    pub experts: i32,
    pub plan_block_m: i32,
    pub gated: i32,
    pub layout: i32,
    pub act: i32,
    pub alpha: f32,
    pub limit: f32,
    pub scale_input: i32,
    pub pad_: i32,
}
const _: () = assert!(size_of::<GroupedGemmParams>() == 112);
const _: () = assert!(offset_of!(GroupedGemmParams, rows) == 64);
const _: () = assert!(offset_of!(GroupedGemmParams, alpha) == 96);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for GroupedGemmParams {}

/// See `GroupedGemmV2Params` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupedGemmV2Params {
    pub g: GroupedGemmParams,
    pub x: u64,
    pub tokens: i32,
    pub top_k: i32,
}
const _: () = assert!(size_of::<GroupedGemmV2Params>() == 128);
const _: () = assert!(offset_of!(GroupedGemmV2Params, x) == 112);
const _: () = assert!(offset_of!(GroupedGemmV2Params, tokens) == 120);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for GroupedGemmV2Params {}

/// See `GroupedGemmV3Params` in kernels/grouped_gemm_sm90a.cu: two CUtensorMaps (128 bytes,
/// 64-byte aligned) and the parameters the epilogue takes.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupedGemmV3Params {
    pub a_map: [u64; 16],
    pub b_map: [u64; 16],
    pub g: GroupedGemmParams,
}
const _: () = assert!(size_of::<GroupedGemmV3Params>() == 384);
const _: () = assert!(offset_of!(GroupedGemmV3Params, g) == 256);
// SAFETY: plain old data with the C layout the kernel declares; passed by value.
unsafe impl DeviceRepr for GroupedGemmV3Params {}

/// See `FillParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FillParams {
    pub out: u64,
    pub n: i64,
    pub seed: u64,
    pub lo: f32,
    pub hi: f32,
}
const _: () = assert!(size_of::<FillParams>() == 32);
const _: () = assert!(offset_of!(FillParams, lo) == 24);

// SAFETY: plain old data with the C layout the kernel declares; passed by value.
unsafe impl DeviceRepr for FillParams {}

/// See `PlanIdentityParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanIdentityParams {
    pub counts: u64,
    pub offsets: u64,
    pub padded_offsets: u64,
    pub sorted_slots: u64,
    pub slot_rows: u64,
    pub padded_slots: u64,
    pub slot_padded_rows: u64,
    pub block_experts: u64,
    pub status: u64,
    pub tokens: i32,
    pub max_slots: i32,
    pub max_padded: i32,
    pub block_m: i32,
}
const _: () = assert!(size_of::<PlanIdentityParams>() == 88);
const _: () = assert!(offset_of!(PlanIdentityParams, tokens) == 72);

// SAFETY: plain old data with the C layout the kernel declares; passed by value.
unsafe impl DeviceRepr for PlanIdentityParams {}

/// See `DecodeProj` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeProj {
    pub g: GroupedGemmParams,
    pub blob: u64,
    pub experts: u64,
}
const _: () = assert!(size_of::<DecodeProj>() == 128);
const _: () = assert!(offset_of!(DecodeProj, blob) == 112);

/// See `DecodeLora` in params.cuh; all zero: no adapters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DecodeLora {
    pub gate_up_b: u64,
    pub down_b: u64,
    pub s: u64,
    pub adapter_ids: u64,
    pub scales: u64,
    pub rank: i32,
    pub adapters: i32,
}
const _: () = assert!(size_of::<DecodeLora>() == 48);

/// See `DecodeParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeParams {
    pub route: RouteParams,
    pub up: DecodeProj,
    pub down: DecodeProj,
    pub shared_up: DecodeProj,
    pub shared_down: DecodeProj,
    pub x: u64,
    pub h: u64,
    pub y: u64,
    pub residual: u64,
    pub shared_gate: u64,
    pub shared_gate_logit: u64,
    pub zc_kinds: u64,
    pub const_w: u64,
    pub const_v: u64,
    pub alpha: u64,
    pub status: u64,
    pub partial: u64,
    pub hidden: i32,
    pub experts: i32,
    pub slots: i32,
    pub ld_h: i32,
    pub weight_at_input: i32,
    /// decode_down_v2: the slots whose `h` rows are staged in shared memory at once (>= 1).
    pub down_pass: i32,
    pub lora: DecodeLora,
}
const _: () = assert!(size_of::<DecodeParams>() == 792);
const _: () = assert!(offset_of!(DecodeParams, lora) == 744);
const _: () = assert!(offset_of!(DecodeParams, up) == 112);
const _: () = assert!(offset_of!(DecodeParams, x) == 624);
const _: () = assert!(offset_of!(DecodeParams, hidden) == 720);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for DecodeParams {}

/// See `LoraParams` in params.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LoraParams {
    pub inp: u64,
    pub out: u64,
    pub s: u64,
    pub a: u64,
    pub b: u64,
    pub scales: u64,
    pub adapter_ids: u64,
    pub counts: u64,
    pub seg_offsets: u64,
    pub row_slots: u64,
    pub row_weights: u64,
    pub status: u64,
    pub ids: u64,
    pub tokens: i32,
    pub k: i32,
    pub segments: i32,
    pub a_experts: i32,
    pub adapters: i32,
    pub rank: i32,
    pub r_total: i32,
    pub d_in: i32,
    pub d_out: i32,
    pub split: i32,
    pub rows_per_block: i32,
    pub by_token: i32,
    pub vec: i32,
    pub count_status: i32,
    pub in_slots: i32,
    pub ld_in: i32,
}
const _: () = assert!(size_of::<LoraParams>() == 168);
const _: () = assert!(offset_of!(LoraParams, tokens) == 104);
const _: () = assert!(offset_of!(LoraParams, ld_in) == 164);
// SAFETY: plain old data with the C layout the kernels declare; passed by value.
unsafe impl DeviceRepr for LoraParams {}
