//! Hand-written CUDA kernels for Mixture-of-Experts layers, behind safe Rust wrappers.
//!
//! Every kernel is compiled at build time by `build.rs` (see the README), launched through a
//! checked wrapper that returns [`Error`] rather than panicking, and tested against a plain CPU
//! reference in the same family's `reference` module.
//!
//! # Glossary of dimensions
//! | name | meaning |
//! |------|---------|
//! | `T`  | tokens in the batch |
//! | `E`  | experts (routed) |
//! | `K`  | experts chosen per token (top-k) |
//! | `H`  | hidden size |
//! | `I`  | an expert's intermediate size |
//!
//! # Ops
//! Status "emulated": the kernel passes its GPU tests on the crate's CPU emulator (emu/); none
//! has run on a GPU yet (GPU_LOG.md has each kernel's level).
//!
//! | family | op | kernel | status |
//! |--------|----|--------|--------|
//! | activation | [`activation::softmax`] | `softmax_{f32,bf16,f16}` (v1) | emulated |
//! | activation | [`activation::gated_act_into`] (SwiGLU, GeGLU tanh/erf, gpt-oss) | `gated_act_{dtype}` (v1) | emulated |
//! | activation | [`activation::act_into`] (ReLU, GELU, SiLU) | `act_{dtype}` (v1) | emulated |
//! | routing | [`routing::route`], [`routing::route_into`] | `route_{dtype}_e{32..1024}` (v1) | emulated |
//! | routing | [`routing::apply_capacity_into`] | `route_capacity` (v1) | emulated |
//! | routing | [`routing::route_masked_into`] (expert masks), [`routing::route_given_into`] (caller routing, checked) | `route_{dtype}_e{32..1024}`, `route_given` (v1) | emulated |
//! | routing | [`routing::router_stats_into`] | `router_lse_{dtype}`, `router_prob_mean_{dtype}` (v1) | emulated |
//! | routing | [`routing::router_logits_into`], [`routing::route_hidden_into`] | `router_logits_v2_{x}_{w}`, `router_logits_v3_{x}_{w}` (the same bits; v3 tiled above small T), `router_logits_{x}_{w}` (v1) | emulated, modelled |
//! | permute | [`permute::Plan::build`], [`permute::Plan::build_identity`] | `plan_count`, `plan_scan`, `plan_scatter`, `plan_masked`, `plan_identity` (v1) | emulated |
//! | permute | [`permute::gather_into`] | `gather_{dtype}` (v1) | emulated |
//! | permute | [`permute::combine_into`] | `combine_{dtype}` (v1) | emulated |
//! | permute | [`permute::ep_send_into`] | `ep_send` (v1) | emulated |
//! | gemm | [`gemm::grouped_gemm_into`] (prefill) | `grouped_gemm_{bf16,f16}_{same,f32}` (v1) | emulated |
//! | gemm | [`gemm::grouped_gemm_version_into`] (prefill, v2: cp.async pipeline, gather-free rows; the layer's default) | `grouped_gemm_v2_{bf16,f16}_{same,f32}` | emulated, modelled |
//! | gemm | [`gemm::grouped_gemv_into`] (decode) | `grouped_gemv_{bf16,f16}_{same,f32}` (v1) | emulated |
//! | layer | [`layer::MoeLayer::forward_into`] through the plan ([`layer::Path::Gemv`], [`layer::Path::Gemm`]), CPU: [`layer::reference::forward`] | all of the above | emulated |
//! | layer | the decode path, T <= 16 ([`layer::Path::Decode`], the default there): routing fused into the gate/up GEMV, the combine into the down GEMV, three launches | `router_logits_*`, `decode_gate_up_{t}_{l}_e{32..1024}`, `decode_down_{t}` (v1) | emulated |
//! | lora | [`layer::MoeLayer::set_lora`] with [`layer::ForwardOptions::adapter_ids`] (LoRA adapters on the routed experts), [`lora::MoleFfn`] (a mixture of LoRA experts on a dense FFN); CPU: [`layer::reference::forward_lora`], [`lora::mole_reference`] | `lora_shrink_{bf16,f16}`, `lora_expand_{bf16,f16}` (v1; on the decode path the shrink in decode mode and the expand inside decode v2 to v5) | emulated |
//! | device | [`Device::fill_uniform`] | `fill_uniform_{f32,bf16,f16}` (v1) | emulated |
//! | quant | [`quant::dequantize_into`]: int4/int8 (GPTQ, AWQ), MXFP4, FP8 block, ternary, bf16, mixed per expert | `dequant_{bf16,f16}` (v1) | emulated |
//! | quant | [`quant::quant_gemv_into`] (decode, weights decoded in registers) | `quant_gemv_{bf16,f16}_{same,f32}` (v1) | emulated |
//! | quant | [`quant::quant_gemm_into`] (prefill: dequantise, then the grouped GEMM) | `dequant_*` + `grouped_gemm_*` | emulated |
//!
//! [`model::Model`] loads one MoE block of a Hugging Face checkpoint into a
//! [`layer::LayerWeights`]: plain bf16/f16/f32 weights, or packed experts from FP8 (128 × 128
//! blocks), GPTQ, AWQ and gpt-oss's MXFP4 checkpoints.

pub mod activation;
#[cfg(feature = "candle")]
pub mod candle;
pub mod check;
pub mod device;
pub mod dtype;
pub mod error;
pub mod gemm;
pub mod kernels;
pub mod layer;
pub mod lora;
pub mod model;
mod params;
pub mod permute;
pub mod profile;
pub mod quant;
pub mod rng;
pub mod routing;

pub use device::{Device, DeviceInfo, Tensor};
pub use dtype::{DType, Elem, Float};
pub use error::{Error, Result};
