// Activation functions shared by the activation kernels and the GEMM epilogues. All in f32.
#pragma once

#include <math.h>

#include "params.cuh"

namespace moe {

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.f + tanhf(k0 * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }

__device__ __forceinline__ float gated(int act, float g, float u, float alpha, float limit) {
    switch (act) {
        case kSiluMul: return silu(g) * u;
        case kGeluTanhMul: return gelu_tanh(g) * u;
        case kGeluErfMul: return gelu_erf(g) * u;
        default: {  // kGptOssSwiglu
            // Comparisons, not fminf/fmaxf, so a NaN stays NaN as torch.clamp keeps it.
            g = g > limit ? limit : g;
            u = u > limit ? limit : (u < -limit ? -limit : u);
            return (u + 1.f) * (g / (1.f + expf(-alpha * g)));
        }
    }
}

__device__ __forceinline__ float act1(int act, float x) {
    switch (act) {
        case kRelu: return x > 0.f ? x : (x == x ? 0.f : x);  // NaN stays NaN
        case kGeluTanh: return gelu_tanh(x);
        case kGeluErf: return gelu_erf(x);
        default: return silu(x);  // kSilu
    }
}

}  // namespace moe
