// Fill family: seeded uniform values on the device, so benches of real model shapes (billions of
// weights) neither draw them on the host nor copy them over.
//
// fill_uniform_{f32,bf16,f16}(FillParams p)
//   out[i] = fma(hi - lo, u_i, lo), u_i = (splitmix64(seed + i * golden) >> 40) * 2^-24 in [0, 1),
//   computed in f32 and rounded once to the dtype. The same (seed, i) always gives the same value,
//   whatever the launch shape.
//
// History
//   v1: grid-stride loop, one element per thread per step.

#include "dtype.cuh"
#include "params.cuh"

namespace moe {

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ __forceinline__ void fill_uniform_v1(const FillParams& p) {
    T* out = static_cast<T*>(p.out);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint64_t h = splitmix64(p.seed + static_cast<uint64_t>(i) * 0x9e3779b97f4a7c15ull);
        const float u = static_cast<float>(h >> 40) * 0x1p-24f;
        out[i] = Float<T>::from_f32(fmaf(p.hi - p.lo, u, p.lo));
    }
}

}  // namespace moe

#define MOE_FILL(name, T) \
    extern "C" __global__ void __launch_bounds__(256) name(moe::FillParams p) { moe::fill_uniform_v1<T>(p); }

MOE_FILL(fill_uniform_f32, float)
MOE_FILL(fill_uniform_bf16, __nv_bfloat16)
MOE_FILL(fill_uniform_f16, __half)
