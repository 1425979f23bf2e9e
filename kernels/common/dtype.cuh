// Per-dtype device helpers: conversion to and from f32, and 16-byte vector access.
//
// Every kernel computes in f32. `Float<T>` names the storage type's conversions so a kernel
// template reads the same for f32, bf16 and f16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace moe {

template <typename T> struct Float;

template <> struct Float<float> {
    static __device__ __forceinline__ float to_f32(float v) { return v; }
    static __device__ __forceinline__ float from_f32(float v) { return v; }
};

template <> struct Float<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
    // Round to nearest even, as torch's `.to(torch.bfloat16)` does.
    static __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};

template <> struct Float<__half> {
    static __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }
};

// Elements per 16-byte vector.
template <typename T> constexpr int kVec16 = 16 / sizeof(T);

// VEC elements of T loaded or stored with one 16-byte access. The pointer must be 16-byte
// aligned; callers check that on the host and fall back to scalar access otherwise.
template <typename T> struct alignas(16) Vec16 {
    T v[kVec16<T>];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
    Vec16<T> r;
    *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
    return r;
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& r) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// Eight elements of T from a 16-byte-aligned address, as f32.
template <typename T>
__device__ __forceinline__ void load8(const T* ptr, float (&out)[8]) {
    constexpr int V = kVec16<T>;
#pragma unroll
    for (int h = 0; h < 8 / V; ++h) {
        const Vec16<T> v = load_vec16(ptr + h * V);
#pragma unroll
        for (int j = 0; j < V; ++j) out[h * V + j] = Float<T>::to_f32(v.v[j]);
    }
}

}  // namespace moe
