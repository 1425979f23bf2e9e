// Warp and block reductions.
#pragma once

#include <math.h>

namespace moe {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    return warp_reduce(v, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ float warp_max(float v) {
    return warp_reduce(v, [](float a, float b) { return fmaxf(a, b); });
}

// Running softmax state over a set of values: the maximum `m` and the sum of exp(x - m).
//
// NaN and infinity follow torch.softmax: a NaN anywhere, or a +inf, makes `s` NaN (so the whole
// row comes out NaN); -inf values contribute nothing; an all -inf row leaves s = 0 and the row
// comes out NaN (0/0).
struct OnlineSoftmax {
    float m = -INFINITY;
    float s = 0.f;

    __device__ __forceinline__ void add(float v) {
        if (v > m) {
            // exp(m - v) is 0 when m = -inf; s * 0 keeps a NaN already in s.
            s = s * expf(m - v) + (isinf(v) ? NAN : 1.f);
            m = v;
        } else if (v != -INFINITY) {
            s += expf(v - m);  // NaN v lands here and poisons s
        }
    }

    __device__ __forceinline__ void merge(float om, float os) {
        const float nm = fmaxf(m, om);
        // Equal maxima (both -inf included) need no rescale; exp(-inf - finite) = 0 and 0 * NaN
        // keeps NaN.
        const float a = (m == nm) ? s : s * expf(m - nm);
        const float b = (om == nm) ? os : os * expf(om - nm);
        m = nm;
        s = a + b;
    }
};

__device__ __forceinline__ void warp_merge(OnlineSoftmax& st) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float om = __shfl_xor_sync(kFullMask, st.m, offset);
        const float os = __shfl_xor_sync(kFullMask, st.s, offset);
        st.merge(om, os);
    }
}

// Merges the state of every thread of the block; all threads get the result. blockDim.x must be
// a multiple of 32 and at most 1024, and every thread of the block must call it.
__device__ __forceinline__ void block_merge(OnlineSoftmax& st) {
    __shared__ float sm_m[32];
    __shared__ float sm_s[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    warp_merge(st);
    if (nwarps == 1) return;
    if (lane == 0) {
        sm_m[warp] = st.m;
        sm_s[warp] = st.s;
    }
    __syncthreads();
    OnlineSoftmax all;
    if (lane < nwarps) {
        all.m = sm_m[lane];
        all.s = sm_s[lane];
    }
    warp_merge(all);
    st = all;
    __syncthreads();  // sm_m / sm_s may be reused by a second call
}

// Sum over the block; every thread gets the result. blockDim.x a multiple of 32, at most 1024;
// every thread of the block must call it. Fixed order, so the result is reproducible.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float sm[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_reduce(v, [](float a, float b) { return a + b; });
    if (lane == 0) sm[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < int(blockDim.x >> 5); ++w) total += sm[w];
    __syncthreads();  // sm may be reused by the next call
    return total;
}

}  // namespace moe
