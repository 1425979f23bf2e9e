// Activation family: row softmax (this file grows the gated activations next).
//
// softmax_{f32,bf16,f16}(SoftmaxParams p)
//   out[r, c] = exp(in[r, c] - m_r) / s_r,  m_r = max_c in[r, c],  s_r = sum_c exp(in[r, c] - m_r)
//   in, out: [rows, cols] row-major with row strides; computed in f32, stored in the dtype.
//   NaN or +inf in a row makes the whole row NaN, an all -inf row is NaN, as torch.softmax.
//
// History
//   v1: one block per row; pass 1 folds an online (max, sum) per thread over 16-byte vectors and
//       merges it across the block; pass 2 re-reads the row (from L2 for rows up to a few MB) and
//       writes. Blocks of 32..1024 threads sized to the row. Rows far narrower than 32 vectors
//       leave lanes idle: a warp-per-row version is the next step for tiny widths.

#include "dtype.cuh"
#include "params.cuh"
#include "reduce.cuh"

namespace moe {

template <typename T>
__device__ __forceinline__ void softmax_v1(const SoftmaxParams& p) {
    using F = Float<T>;
    constexpr int VEC = kVec16<T>;
    const int64_t row = blockIdx.x;
    const T* x = static_cast<const T*>(p.in) + row * p.in_stride;
    T* y = static_cast<T*>(p.out) + row * p.out_stride;
    const int cols = p.cols;
    // With p.vec == 1 every element goes through the scalar tail loop.
    const int nvec = p.vec == VEC ? cols / VEC : 0;
    const int tail = nvec * VEC;

    OnlineSoftmax st;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec16<T> v = load_vec16(x + i * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) st.add(F::to_f32(v.v[j]));
    }
    for (int c = tail + threadIdx.x; c < cols; c += blockDim.x) st.add(F::to_f32(x[c]));
    block_merge(st);

    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec16<T> v = load_vec16(x + i * VEC);
        Vec16<T> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = F::from_f32(expf(F::to_f32(v.v[j]) - st.m) / st.s);
        store_vec16(y + i * VEC, o);
    }
    for (int c = tail + threadIdx.x; c < cols; c += blockDim.x)
        y[c] = F::from_f32(expf(F::to_f32(x[c]) - st.m) / st.s);
}

}  // namespace moe

extern "C" __global__ void softmax_f32(const moe::SoftmaxParams p) { moe::softmax_v1<float>(p); }
extern "C" __global__ void softmax_bf16(const moe::SoftmaxParams p) { moe::softmax_v1<__nv_bfloat16>(p); }
extern "C" __global__ void softmax_f16(const moe::SoftmaxParams p) { moe::softmax_v1<__half>(p); }
