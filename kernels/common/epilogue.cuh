// The grouped GEMM's epilogue, shared by every kernel that ends in it (grouped_gemm.cu, and the
// compressed-weight GEMV in quant.cu): which weight row feeds an output column, the routing
// weight of a row, and bias -> activation -> row scaling in the order grouped_gemm.cu's header
// gives.
#pragma once

#include "act.cuh"
#include "dtype.cuh"
#include "params.cuh"

namespace moe {

// The weight row that output column j of matrix `mat` (0: gate or the plain output, 1: up) reads.
__device__ __forceinline__ int weight_row(const GroupedGemmParams& p, int j, int mat) {
    if (!p.gated) return j;
    const int I = p.n / 2;
    switch (p.layout) {
        case kGateFirst: return mat == 0 ? j : I + j;
        case kUpFirst: return mat == 0 ? I + j : j;
        default: return 2 * j + mat;  // kInterleaved
    }
}

// The routing weight of row r (0 for padding), or 1 without row scaling.
__device__ __forceinline__ float row_scale(const GroupedGemmParams& p, int64_t r) {
    if (p.slot_weights == nullptr) return 1.f;
    const int slot = p.row_slots[r];
    return slot >= 0 ? p.slot_weights[slot] : 0.f;
}

// The epilogue of output column j of expert e from its accumulators: v (gate or plain) and u
// (up, gated only), in the order grouped_gemm.cu's header gives.
template <typename T>
__device__ __forceinline__ float epilogue(const GroupedGemmParams& p, int e, int j, float v, float u, float scale) {
    if (p.scale_input) {
        v *= scale;
        u *= scale;
    }
    if (p.bias != nullptr) {
        const T* bias = static_cast<const T*>(p.bias) + int64_t(e) * p.n;
        v += Float<T>::to_f32(bias[weight_row(p, j, 0)]);
        if (p.gated) u += Float<T>::to_f32(bias[weight_row(p, j, 1)]);
    }
    if (p.gated) v = gated(p.act, v, u, p.alpha, p.limit);
    else if (p.act >= 0) v = act1(p.act, v);
    return p.scale_input ? v : v * scale;
}

}  // namespace moe
