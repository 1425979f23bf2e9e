// Activation family: row softmax, gated activations on a gate/up pair, elementwise activations.
//
// softmax_{f32,bf16,f16}(SoftmaxParams p)
//   out[r, c] = exp(in[r, c] - m_r) / s_r,  m_r = max_c in[r, c],  s_r = sum_c exp(in[r, c] - m_r)
//   in, out: [rows, cols] row-major with row strides; computed in f32, stored in the dtype.
//   NaN or +inf in a row makes the whole row NaN, an all -inf row is NaN, as torch.softmax.
//
// gated_act_{dtype}(GatedActParams p)
//   out[r, i] = act(g) * u with (g, u) = (in[r, i], in[r, I + i]) for kGateFirst (vLLM's
//   silu_and_mul), (in[r, I + i], in[r, i]) for kUpFirst, (in[r, 2i], in[r, 2i + 1]) for
//   kInterleaved (gpt-oss). act: silu(g) = g sigmoid(g); gelu tanh / erf forms; gpt-oss's
//   clamped swiglu is (clamp(u, -limit, limit) + 1) * g' sigmoid(alpha g'), g' = min(g, limit).
//   Computed in f32, one rounding.
//
// act_{dtype}(ActParams p): out = relu / gelu (tanh, erf) / silu of in, elementwise.
//
// History (softmax)
//   v1: one block per row; pass 1 folds an online (max, sum) per thread over 16-byte vectors and
//       merges it across the block; pass 2 re-reads the row (from L2 for rows up to a few MB) and
//       writes. Blocks of 32..1024 threads sized to the row. Rows far narrower than 32 vectors
//       leave lanes idle: a warp-per-row version is the next step for tiny widths.

#include "act.cuh"
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

// History (gated_act, act)
//   v1: one block per row (gated) or a grid-stride loop (act), 16-byte vectors where aligned.
template <typename T>
__device__ __forceinline__ void gated_act_v1(const GatedActParams& p) {
    using F = Float<T>;
    constexpr int VEC = kVec16<T>;
    const int64_t r = blockIdx.x;
    const int I = p.inter;
    const T* in = static_cast<const T*>(p.in) + r * 2 * int64_t(I);
    T* out = static_cast<T*>(p.out) + r * int64_t(I);
    if (p.layout == kInterleaved) {
        for (int i = threadIdx.x; i < I; i += blockDim.x)
            out[i] = F::from_f32(gated(p.act, F::to_f32(in[2 * i]), F::to_f32(in[2 * i + 1]), p.alpha, p.limit));
        return;
    }
    const T* gate = in + (p.layout == kGateFirst ? 0 : I);
    const T* up = in + (p.layout == kGateFirst ? I : 0);
    const int nvec = p.vec ? I / VEC : 0;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        const Vec16<T> g = load_vec16(gate + v * VEC), u = load_vec16(up + v * VEC);
        Vec16<T> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = F::from_f32(gated(p.act, F::to_f32(g.v[j]), F::to_f32(u.v[j]), p.alpha, p.limit));
        store_vec16(out + v * VEC, o);
    }
    for (int i = nvec * VEC + threadIdx.x; i < I; i += blockDim.x)
        out[i] = F::from_f32(gated(p.act, F::to_f32(gate[i]), F::to_f32(up[i]), p.alpha, p.limit));
}

template <typename T>
__device__ __forceinline__ void act_v1(const ActParams& p) {
    using F = Float<T>;
    constexpr int VEC = kVec16<T>;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const T* in = static_cast<const T*>(p.in);
    T* out = static_cast<T*>(p.out);
    const int64_t nvec = p.vec ? p.n / VEC : 0;
    for (int64_t v = first; v < nvec; v += stride) {
        const Vec16<T> x = load_vec16(in + v * VEC);
        Vec16<T> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = F::from_f32(act1(p.act, F::to_f32(x.v[j])));
        store_vec16(out + v * VEC, o);
    }
    for (int64_t i = nvec * VEC + first; i < p.n; i += stride) out[i] = F::from_f32(act1(p.act, F::to_f32(in[i])));
}

}  // namespace moe

#define MOE_ACT(SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(256) gated_act_##SUFFIX(const moe::GatedActParams p) { moe::gated_act_v1<T>(p); } \
    extern "C" __global__ void __launch_bounds__(256) act_##SUFFIX(const moe::ActParams p) { moe::act_v1<T>(p); }
MOE_ACT(f32, float)
MOE_ACT(bf16, __nv_bfloat16)
MOE_ACT(f16, __half)

extern "C" __global__ void softmax_f32(const moe::SoftmaxParams p) { moe::softmax_v1<float>(p); }
extern "C" __global__ void softmax_bf16(const moe::SoftmaxParams p) { moe::softmax_v1<__nv_bfloat16>(p); }
extern "C" __global__ void softmax_f16(const moe::SoftmaxParams p) { moe::softmax_v1<__half>(p); }
