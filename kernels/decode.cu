// Decode family: the MoE block for T <= 16 tokens in three launches, the router logits
// (router_logits_*, kernels/routing.cu) and the two below. No plan, no gather, no sorted ids,
// no memset: the weights of the chosen experts are the whole traffic.
//
// decode_gate_up_{t}_{l}_e{32..1024}(DecodeParams p), t = bf16 | f16 (compute), l = the logits'
//   dtype (t, or f32 for routers that route in f32), e the largest E_total the instance routes
//   block (x, y): token y / S, slot y % S (S = K, plus the shared expert in slot K), output
//   columns 8x .. 8x + 8 of that slot's expert, one per warp.
//   prologue: warp 0 routes the token with route_token (kernels/common/route.cuh), the body of
//     route_{l}_e{N}, so the ids and weights are theirs bit for bit; the column-0 blocks of
//     slot 0 write them to p.route.ids / weights [T, K]. Every block of the token repeats the
//     routing (a few KB of logits, from L2).
//   h[t * S + s, j] = epilogue(x[t] . W_e[gate row of j], x[t] . W_e[up row of j]): bias, the
//     gated activation of the expert's layout, and for Llama 4 the routing weight on the input;
//     one rounding to t. Packed experts decode in registers (kernels/common/qdecode.cuh).
//   The column-0 block of a slot also does the slot's block-wide extras: a constant expert's
//   (a1, a2) = softmax(W_z x[t]) into p.alpha, the shared expert's gate logit x[t] . g into
//   p.shared_gate_logit. Unused top-p slots (id -1) and zero-computation experts do no GEMV.
//
// decode_down_{t}(DecodeParams p)
//   block (x, t): output columns 8x .. 8x + 8 of token t, one per warp:
//   y[t, c] = sum over slots k, in order, of w_k * (h[t * S + k] . W_down[e_k][c] + bias)
//             (w_k = 1 for Llama 4, whose weight went into the input), a copy expert's w_k x[t, c],
//             a constant expert's w_k (a1 x[t, c] + a2 v[c]), then + sigmoid(gate) * (shared
//             expert's h . W[c]) + residual[t, c]: f32, one rounding, no atomics, the same bits
//             every run.
//
// Where two tokens choose one expert, its weights are read once per token: at T <= 16 and K = 8
// over E = 128 that is rare enough to leave for a by-expert variant to measure against.
//
// History
//   v1: one warp per output column, 16-byte loads, x[t] re-read from L1/L2 by every warp.

#include "dtype.cuh"
#include "epilogue.cuh"
#include "params.cuh"
#include "qdecode.cuh"
#include "reduce.cuh"
#include "route.cuh"

namespace moe {

constexpr int kDecodeWarps = 8;  // output columns per block, one per warp
constexpr int kDecodeThreads = 32 * kDecodeWarps;

// This lane's share of x[0, Kd) . W_e[row, :] (plain or packed); the caller sums the warp.
template <typename T>
__device__ __forceinline__ float dot_row(const DecodeProj& w, int e, int row, const T* x, int32_t* status) {
    const int kd = w.g.kdim;
    const int lane = threadIdx.x & 31;
    float acc = 0.f;
    if (w.blob != nullptr) {
        const QuantExpert q = w.experts[e];
        if (q.format == kQTernary) {
            ternary_row(w.blob, q, kd, row, status, [&](int s, float w0, float w1) {
                acc = fmaf(Float<T>::to_f32(x[2 * s]), w0, acc);
                acc = fmaf(Float<T>::to_f32(x[2 * s + 1]), w1, acc);
            });
            return acc;
        }
        for (int k = lane * 8; k < kd; k += 32 * 8) {
            float wv[8], xv[8];
            decode8(w.blob, q, kd, row, k, status, wv);
            load8(x + k, xv);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc = fmaf(xv[i], wv[i], acc);
        }
        return acc;
    }
    const T* wr = static_cast<const T*>(w.g.w) + (int64_t(e) * w.g.n + row) * kd;
    for (int k = lane * 8; k < kd; k += 32 * 8) {
        float wv[8], xv[8];
        load8(wr + k, wv);
        load8(x + k, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(xv[i], wv[i], acc);
    }
    return acc;
}

// x . v over the block (every thread must call it), in the combine kernel's order: thread i sums
// elements i, i + 256, ..., then block_sum.
template <typename T>
__device__ __forceinline__ float block_dot(const T* x, const T* v, int n) {
    float d = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) d = fmaf(Float<T>::to_f32(x[c]), Float<T>::to_f32(v[c]), d);
    return block_sum(d);
}

// The kind of zero-computation expert `id` (E <= id < E_total): 1 copy, 2 constant, 0 zero
// (also a copy or constant expert whose inputs were not given), as combine_* reads them.
__device__ __forceinline__ int decode_zc_kind(const DecodeParams& p, int id) {
    const int kind = p.zc_kinds != nullptr ? p.zc_kinds[id - p.experts] : 0;
    if (kind == 2 && (p.const_w == nullptr || p.const_v == nullptr)) return 0;
    return kind == 1 || kind == 2 ? kind : 0;
}

template <typename T, typename TL, int VPT>
__device__ __forceinline__ void decode_gate_up_v1(const DecodeParams& p) {
    __shared__ int32_t s_ids[32];
    __shared__ float s_w[32];
    const int K = p.route.k, S = p.slots;
    const int64_t t = blockIdx.y / S;
    const int s = int(blockIdx.y % S);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp == 0) {
        const RouteChoice c = route_token<TL, VPT>(p.route, t);
        if (lane < K) {
            s_ids[lane] = c.id;
            s_w[lane] = c.weight;
            if (blockIdx.x == 0 && s == 0) {
                p.route.ids[t * K + lane] = c.id;
                p.route.weights[t * K + lane] = c.weight;
            }
        }
    }
    __syncthreads();
    const bool shared = s == K;
    const int id = shared ? 0 : s_ids[s];
    const T* x = static_cast<const T*>(p.x) + t * p.hidden;

    // The slot's block-wide extras, before any warp leaves (uniform per block).
    if (blockIdx.x == 0) {
        if (shared && p.shared_gate != nullptr) {
            const float d = block_dot(x, static_cast<const T*>(p.shared_gate), p.hidden);
            // Rounded to the dtype, as the model's gate Linear rounds its output.
            if (threadIdx.x == 0) p.shared_gate_logit[t] = Float<T>::to_f32(Float<T>::from_f32(d));
        }
        if (!shared && id >= p.experts && id < p.route.experts && decode_zc_kind(p, id) == 2) {
            const T* wz = static_cast<const T*>(p.const_w) + int64_t(id - p.experts) * 2 * p.hidden;
            const float d0 = block_dot(x, wz, p.hidden);
            const float d1 = block_dot(x, wz + p.hidden, p.hidden);
            const float m = fmaxf(d0, d1);
            const float e0 = expf(d0 - m), e1 = expf(d1 - m);
            if (threadIdx.x == 0) {
                p.alpha[2 * (t * K + s)] = e0 / (e0 + e1);
                p.alpha[2 * (t * K + s) + 1] = e1 / (e0 + e1);
            }
        }
    }
    if (!shared && (id < 0 || id >= p.experts)) return;  // no GEMV: an unused or a zero expert

    const DecodeProj& up = shared ? p.shared_up : p.up;
    const int n_out = up.g.n / 2;
    const int j = blockIdx.x * kDecodeWarps + warp;
    if (j >= n_out) return;  // no barrier follows
    const float g = warp_sum(dot_row<T>(up, id, weight_row(up.g, j, 0), x, p.status));
    const float u = warp_sum(dot_row<T>(up, id, weight_row(up.g, j, 1), x, p.status));
    if (lane == 0) {
        // scale_input is set for the routed experts of Llama 4 only; otherwise the weight waits
        // for the down projection.
        const float scale = !shared && up.g.scale_input ? s_w[s] : 1.f;
        T* h = static_cast<T*>(p.h) + (t * S + s) * int64_t(p.ld_h);
        h[j] = Float<T>::from_f32(epilogue<T>(up.g, id, j, g, u, scale));
    }
}

template <typename T>
__device__ __forceinline__ void decode_down_v1(const DecodeParams& p) {
    const int K = p.route.k, S = p.slots, H = p.hidden, E = p.experts;
    const int64_t t = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c = blockIdx.x * kDecodeWarps + warp;
    if (c >= H) return;  // no barrier in this kernel: warps may leave alone
    const T* x = static_cast<const T*>(p.x) + t * H;
    const T* h = static_cast<const T*>(p.h);
    float acc = 0.f;
    for (int s = 0; s < K; ++s) {
        const int id = p.route.ids[t * K + s];
        const float w = p.route.weights[t * K + s];
        if (id >= 0 && id < E) {
            const float v = warp_sum(dot_row<T>(p.down, id, c, h + (t * S + s) * int64_t(p.ld_h), p.status));
            acc = fmaf(p.weight_at_input ? 1.f : w, epilogue<T>(p.down.g, id, c, v, 0.f, 1.f), acc);
        } else if (id >= E && id < p.route.experts) {
            const int kind = decode_zc_kind(p, id);
            const float xv = Float<T>::to_f32(x[c]);
            if (kind == 1) {
                acc = fmaf(w, xv, acc);
            } else if (kind == 2) {
                const float a1 = w * p.alpha[2 * (t * K + s)], a2 = w * p.alpha[2 * (t * K + s) + 1];
                const T* v = static_cast<const T*>(p.const_v) + int64_t(id - E) * H;
                acc += a1 * xv + a2 * Float<T>::to_f32(v[c]);
            }
        } else if (id != -1 && lane == 0 && blockIdx.x == 0 && warp == 0) {
            atomicAdd(p.status, 1);  // not an id the routing gives: counted once per slot
        }
    }
    if (p.shared_down.g.w != nullptr || p.shared_down.blob != nullptr) {
        const float v = warp_sum(dot_row<T>(p.shared_down, 0, c, h + (t * S + K) * int64_t(p.ld_h), p.status));
        const float gate = p.shared_gate != nullptr ? 1.f / (1.f + expf(-p.shared_gate_logit[t])) : 1.f;
        acc = fmaf(gate, v, acc);
    }
    if (p.residual != nullptr) acc += Float<T>::to_f32(static_cast<const T*>(p.residual)[t * H + c]);
    if (lane == 0) static_cast<T*>(p.y)[t * H + c] = Float<T>::from_f32(acc);
}

}  // namespace moe

#define MOE_DECODE_UP(NAME, T, TL, VPT) \
    extern "C" __global__ void __launch_bounds__(moe::kDecodeThreads, 1) NAME(const moe::DecodeParams p) { \
        moe::decode_gate_up_v1<T, TL, VPT>(p); \
    }
#define MOE_DECODE_UP_ALL(SUFFIX, T, TL) \
    MOE_DECODE_UP(decode_gate_up_##SUFFIX##_e32, T, TL, 1) \
    MOE_DECODE_UP(decode_gate_up_##SUFFIX##_e64, T, TL, 2) \
    MOE_DECODE_UP(decode_gate_up_##SUFFIX##_e128, T, TL, 4) \
    MOE_DECODE_UP(decode_gate_up_##SUFFIX##_e256, T, TL, 8) \
    MOE_DECODE_UP(decode_gate_up_##SUFFIX##_e512, T, TL, 16) \
    MOE_DECODE_UP(decode_gate_up_##SUFFIX##_e1024, T, TL, 32)
MOE_DECODE_UP_ALL(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
MOE_DECODE_UP_ALL(bf16_f32, __nv_bfloat16, float)
MOE_DECODE_UP_ALL(f16_f16, __half, __half)
MOE_DECODE_UP_ALL(f16_f32, __half, float)

#define MOE_DECODE_DOWN(SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(moe::kDecodeThreads) decode_down_##SUFFIX(const moe::DecodeParams p) { \
        moe::decode_down_v1<T>(p); \
    }
MOE_DECODE_DOWN(bf16, __nv_bfloat16)
MOE_DECODE_DOWN(f16, __half)
