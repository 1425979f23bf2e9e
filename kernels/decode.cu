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
// Where two tokens choose one expert, v1 and v2 read its weights once per token (Mixtral at
// T = 16: about 4 times its unique bytes). v3 and v4 below read them once per 8 tokens.
//
// decode_gate_up_v2_* / decode_down_v2_* (the default; MoeLayer::set_decode_version): the same
//   contracts. x[t] (gate/up) or the token's h rows (down) staged in shared memory as f32 with
//   kernels/common/qdot.cuh, compressed rows decoded a 16-byte chunk per lane; dynamic shared
//   memory as src/layer/decode.rs's v2_smem sizes it; down takes two columns per warp on the
//   narrower grid (ceil(H / 16) blocks), which the host picks at T >= 4.
//
// decode_gate_up_v3_{t}(DecodeParams p), after route_{l}_e{N} wrote p.route.ids / weights [T, K]
//   h as decode_gate_up_v2 writes it, by expert: block (x, y) owns output columns 8x .. 8x + 8 of
//   the y-th smallest distinct id in [0, E) among the ids (grid.y = min(T K, E) + 1; rows past the
//   number chosen exit at once), or in the last row the shared expert, and computes them for
//   every (token, slot) that chose it: passes of up to 8 tokens, their x rows staged 1024 columns
//   at a time (qdot.cuh's gemv_pass_tiled, quant_gemv_v2's mainloop), each weight chunk decoded
//   once per pass. Per lane the chunks and their order are v2's, so h is v2's bit for bit. The
//   last row's column-0 block also does every token's block-wide extras.
// decode_down_v3_{t}(DecodeParams p), after decode_gate_up_v3
//   The down GEMV the same way, over the slots' h rows: partial[t * S + s, c] = h[t * S + s] .
//   W_e[c], raw f32 dots (no bias, no weight).
// decode_combine_{t}(DecodeParams p)
//   Thread c of block (x, t): y[t, c] from token t's partial rows in slot order, as decode_down_v1
//   sums them (w_k * epilogue(dot), copy and constant experts, the gated shared expert, the
//   residual): f32, one rounding, no atomics.
// The host runs v3 (route, gate/up v3, down v2) or v4 (route, gate/up v3, down v3, combine) at
// T >= 2; at T = 1 each chosen expert has one token and both run v2.
//
// LoRA adapters on the routed experts (p.lora, DecodeLora in params.cuh; null gate_up_b: none),
// in v2 to v5: the host routes first and runs lora_shrink in decode mode (kernels/lora.cu) on x
// before gate/up and on h before down; each kernel adds a slot's expand term, scale * B[row] . s,
// to the dot of weight row `row` before its epilogue (decode_lora): gate/up before the bias and
// the activation, down before the routing weight (v2) or into the raw partial dot (v3 to v5,
// which decode_combine weights). v2 and v3 split the rank over the warp's lanes ahead of the
// warp's reduction; v5 sums it on the lane that holds the output. v1 takes none (the host runs
// the planned path there).
//
// History
//   v1: one warp per output column, 16-byte loads, x[t] re-read from L1/L2 by every warp.
//   v2: the staged activation and the chunk decoders (SASS per int4 weight 137 -> 4.0), gate and
//       up rows together, one reduction per down column; the down kernel's routed slots of one
//       decoder kind stream together, 8 (4 with two columns) rows' loads in flight per lane
//       before any is reduced. The decoders first subtracted the
//       magic offset as C * sum(x) after the products, which cancels (up to 15 bits lost for
//       int8); they now subtract it, with the zero point, from each decoded float, exactly
//       (one FADD per weight: 4.0 -> 4.9 for int4).
//   v3: the gate/up GEMV by expert (each chosen expert's rows once per 8 tokens, not once per
//       token), the tokens routed once by the routing kernel; v4: the down GEMV likewise, with
//       the slots summed by a combine launch.

#include "chosen.cuh"
#include "dtype.cuh"
#include "epilogue.cuh"
#include "params.cuh"
#include "qdecode.cuh"
#include "qdot.cuh"
#include "reduce.cuh"
#include "route.cuh"

namespace moe {

constexpr int kDecodeWarps = 8;  // output columns per block, one per warp
constexpr int kDecodeThreads = 32 * kDecodeWarps;

// Part `part` of `parts` of the dot b[0, rank) . s[0, rank) (f32), over chunks of 8, chunk c in
// part c % parts. Not inlined: the by-expert kernels sit at their register bound, and inlined
// into their epilogues the LoRA term spilled (v3 plain and v5 int4 gate/up, 4 to 8 bytes).
template <typename T>
static __device__ __noinline__ float lora_row_dot(const T* b, const float* s, int rank, int part, int parts) {
    float acc = 0.f;
    if (rank % 8 == 0) {
        // 16-byte loads of b, 32-byte of s: both rows start at multiples of 8 elements.
        for (int q = part * 8; q < rank; q += parts * 8) {
            float w[8];
            load8(b + q, w);
            const float4 s0 = *reinterpret_cast<const float4*>(s + q);
            const float4 s1 = *reinterpret_cast<const float4*>(s + q + 4);
            const float v[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
            for (int u = 0; u < 8; ++u) acc = fmaf(w[u], v[u], acc);
        }
    } else {
        for (int q = part * 8; q < rank; q += parts * 8)
            for (int u = q; u < min(q + 8, rank); ++u) acc = fmaf(Float<T>::to_f32(b[u]), s[u], acc);
    }
    return acc;
}

// The LoRA term of weight row `row` of routed expert e for slot `slot` (token slot / K), or
// part `part` of `parts` of it (lora_row_dot; parts = 32: the warp's lanes, summed by the
// caller's reduction; 1: the whole term on one thread): scale[a] * B[a, e, row, :] . s[slot,
// half * rank ..][0, rank), a the token's adapter. Gate/up (down false): B rows in the layer's
// gate layout, half 0 for the gate's row, 1 for the up's; down: half 0. 0 without adapters or
// for an id outside [0, L) (the shrink launch counted it).
template <typename T>
__device__ __forceinline__ float decode_lora(const DecodeParams& p, bool down, int e, int row, int slot, int half,
                                             int part, int parts) {
    const DecodeLora& l = p.lora;
    if (l.gate_up_b == nullptr) return 0.f;
    const int a = l.adapter_ids[slot / p.route.k];
    if (a < 0 || a >= l.adapters) return 0.f;
    const int rank = l.rank;
    const int64_t rows = down ? p.hidden : p.up.g.n;
    const T* b = static_cast<const T*>(down ? l.down_b : l.gate_up_b) + ((int64_t(a) * p.experts + e) * rows + row) * rank;
    const float* sv = l.s + int64_t(slot) * (down ? rank : 2 * rank) + half * rank;
    return lora_row_dot(b, sv, rank, part, parts) * l.scales[a];
}

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

// acc plus w times zero-computation expert id's output at column c of token t, slot s: a copy
// expert's x[t, c], a constant expert's a1 x[t, c] + a2 v[c] (its alpha from gate/up); a zero
// expert adds nothing.
template <typename T>
__device__ __forceinline__ float zc_accumulate(const DecodeParams& p, int64_t t, int s, int id, float w, int c,
                                               float acc) {
    const int K = p.route.k;
    const int kind = decode_zc_kind(p, id);
    const float xv = Float<T>::to_f32(static_cast<const T*>(p.x)[t * p.hidden + c]);
    if (kind == 1) return fmaf(w, xv, acc);
    if (kind == 2) {
        const float a1 = w * p.alpha[2 * (t * K + s)], a2 = w * p.alpha[2 * (t * K + s) + 1];
        const T* v = static_cast<const T*>(p.const_v) + int64_t(id - p.experts) * p.hidden;
        return acc + (a1 * xv + a2 * Float<T>::to_f32(v[c]));
    }
    return acc;
}

// Warp 0's prologue: token t's routing (route_token, the routing kernels' own code) into s_ids /
// s_w, and into p.route.ids / weights from the column-0 block of slot 0. Lane k returns slot k's.
// With no logits (p.route.logits null) the routing was given and checked by route_given, which
// wrote p.route.ids / weights before this launch: they are read instead.
template <typename TL, int VPT>
__device__ __forceinline__ RouteChoice decode_route(const DecodeParams& p, int64_t t, int s, int32_t* s_ids,
                                                    float* s_w) {
    const int K = p.route.k, lane = threadIdx.x & 31;
    const bool given = p.route.logits == nullptr;
    RouteChoice c{-1, 0.f};
    if (!given) {
        c = route_token<TL, VPT>(p.route, t);
    } else if (lane < K) {
        c = RouteChoice{p.route.ids[t * K + lane], p.route.weights[t * K + lane]};
    }
    if (lane < K) {
        s_ids[lane] = c.id;
        s_w[lane] = c.weight;
        if (!given && blockIdx.x == 0 && s == 0) {
            if (lane == 0) route_count_mask(p.route, t);
            p.route.ids[t * K + lane] = c.id;
            p.route.weights[t * K + lane] = c.weight;
        }
    }
    return c;
}

// Slot s's block-wide extras for token t (every thread of a column-0 block calls it): the shared
// expert's gate logit x[t] . g, a constant expert's (a1, a2) = softmax(W_z x[t]).
template <typename T>
__device__ __forceinline__ void decode_slot_extras(const DecodeParams& p, const T* x, int64_t t, int s, int id) {
    const int K = p.route.k;
    const bool shared = s == K;
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

template <typename T, typename TL, int VPT>
__device__ __forceinline__ void decode_gate_up_v1(const DecodeParams& p) {
    __shared__ int32_t s_ids[32];
    __shared__ float s_w[32];
    const int K = p.route.k, S = p.slots;
    const int64_t t = blockIdx.y / S;
    const int s = int(blockIdx.y % S);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp == 0) {
        decode_route<TL, VPT>(p, t, s, s_ids, s_w);
    }
    __syncthreads();
    const bool shared = s == K;
    const int id = shared ? 0 : s_ids[s];
    const T* x = static_cast<const T*>(p.x) + t * p.hidden;

    // The slot's block-wide extras, before any warp leaves (uniform per block).
    if (blockIdx.x == 0) decode_slot_extras(p, x, t, s, id);
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
    const T* h = static_cast<const T*>(p.h);
    float acc = 0.f;
    for (int s = 0; s < K; ++s) {
        const int id = p.route.ids[t * K + s];
        const float w = p.route.weights[t * K + s];
        if (id >= 0 && id < E) {
            const float v = warp_sum(dot_row<T>(p.down, id, c, h + (t * S + s) * int64_t(p.ld_h), p.status));
            acc = fmaf(p.weight_at_input ? 1.f : w, epilogue<T>(p.down.g, id, c, v, 0.f, 1.f), acc);
        } else if (id >= E && id < p.route.experts) {
            acc = zc_accumulate<T>(p, t, s, id, w, c, acc);
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

// ---- v2: the activation staged once per block, compressed rows decoded 16 bytes per lane ----

// This lane's share of x . W_e[row[i]] for R rows of expert e (plain or packed), x staged in xs
// (and at xg in global memory for the experts fast_kind leaves to the per-8 decoder).
// qs: the expert's table entry, copied to shared memory by the caller (every lane reads it; from
// global memory that would be 64 bytes requested per lane), read into registers once here.
template <typename T, int R>
__device__ __forceinline__ void dot_rows_v2(const DecodeProj& w, int e, const QuantExpert& qs, const int (&row)[R],
                                            const StagedX& xs, const T* xg, int32_t* status, float (&acc)[R]) {
    const int kd = w.g.kdim;
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = 0.f;
    if (w.blob == nullptr) {
        const uint8_t* codes = static_cast<const uint8_t*>(w.g.w) + int64_t(e) * w.g.n * kd * int64_t(sizeof(T));
        stream_rows<kFastPlain, T, R>(nullptr, QuantExpert{}, codes, int64_t(kd) * sizeof(T), kd, row, xs, acc);
        return;
    }
    const QuantExpert q = qs;
    const uint8_t* codes = w.blob + q.codes;
    switch (fast_kind(q, kd)) {
        case kFastInt4: stream_rows<kFastInt4, T, R>(w.blob, q, codes, kd / 2, kd, row, xs, acc); break;
        case kFastMxfp4: stream_rows<kFastMxfp4, T, R>(w.blob, q, codes, kd / 2, kd, row, xs, acc); break;
        case kFastInt8: stream_rows<kFastInt8, T, R>(w.blob, q, codes, kd, kd, row, xs, acc); break;
        case kFastFp8: stream_rows<kFastFp8, T, R>(w.blob, q, codes, kd, kd, row, xs, acc); break;
        case kFastBf16: stream_rows<kFastBf16, T, R>(w.blob, q, codes, int64_t(kd) * 2, kd, row, xs, acc); break;
        default:
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i] = dot_row<T>(w, e, row[i], xg, status);
    }
}

// As decode_gate_up_v1, with x[t] staged in shared memory by warps 1..7 while warp 0 routes, and
// the gate and up rows streamed together.
template <typename T, typename TL, int VPT>
__device__ __forceinline__ void decode_gate_up_v2(const DecodeParams& p) {
    extern __shared__ __align__(16) unsigned char dyn_smem[];
    __shared__ int32_t s_ids[32];
    __shared__ float s_w[32];
    __shared__ QuantExpert s_q;
    const int K = p.route.k, S = p.slots;
    const int64_t t = blockIdx.y / S;
    const int s = int(blockIdx.y % S);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const T* x = static_cast<const T*>(p.x) + t * p.hidden;
    const StagedX xs = staged_x_at(dyn_smem);
    const bool shared = s == K;
    if (warp == 0) {
        const RouteChoice c = decode_route<TL, VPT>(p, t, s, s_ids, s_w);
        // The slot's table entry (packed layers), one lane.
        const int e = shared ? 0 : __shfl_sync(kFullMask, c.id, s);
        const DecodeProj& dp = shared ? p.shared_up : p.up;
        if (lane == 0 && dp.blob != nullptr && e >= 0 && e < p.experts) s_q = dp.experts[e];
    } else {
        stage_x(x, p.hidden, xs, threadIdx.x - 32, blockDim.x - 32);
    }
    __syncthreads();
    const int id = shared ? 0 : s_ids[s];

    if (blockIdx.x == 0) decode_slot_extras(p, x, t, s, id);
    if (!shared && (id < 0 || id >= p.experts)) return;

    const DecodeProj& up = shared ? p.shared_up : p.up;
    const int n_out = up.g.n / 2;
    const int j = blockIdx.x * kDecodeWarps + warp;
    if (j >= n_out) return;  // no barrier follows
    const int rows[2] = {weight_row(up.g, j, 0), weight_row(up.g, j, 1)};
    float a[2];
    dot_rows_v2<T, 2>(up, id, s_q, rows, xs, x, p.status, a);
    if (!shared) {
        const int slot = int(t) * K + s;
        a[0] += decode_lora<T>(p, false, id, rows[0], slot, 0, lane, 32);
        a[1] += decode_lora<T>(p, false, id, rows[1], slot, 1, lane, 32);
    }
    const float g = warp_sum(a[0]);
    const float u = warp_sum(a[1]);
    if (lane == 0) {
        const float scale = !shared && up.g.scale_input ? s_w[s] : 1.f;
        T* h = static_cast<T*>(p.h) + (t * S + s) * int64_t(p.ld_h);
        h[j] = Float<T>::from_f32(epilogue<T>(up.g, id, j, g, u, scale));
    }
}

// The decoder kind that every routed slot in [s0, s_end) with a GEMV (an id in [0, E)) shares, or
// kFastNone where they differ, one has no fast decoder, or there is none. s_id, s_q: the pass's
// ids and table entries, from slot s0.
__device__ __forceinline__ int down_batch_kind(const DecodeParams& p, int s0, int s_end, const int32_t* s_id,
                                               const QuantExpert* s_q) {
    int kind = kFastNone;
    for (int s = s0; s < s_end; ++s) {
        const int id = s_id[s - s0];
        if (id < 0 || id >= p.experts) continue;
        const int k = p.down.blob == nullptr ? kFastPlain : fast_kind(s_q[s - s0], p.down.g.kdim);
        if (k == kFastNone || (kind != kFastNone && k != kind)) return kFastNone;
        kind = k;
    }
    return kind;
}

// acc[c] += sum over the routed GEMV slots s in [s0, s_end) of w_s * (h_s . W_{e_s}[col[c]]), P slots
// at a time: each lane issues the 16-byte loads of all P slots' rows before it reduces any, so
// a token's slots wait for DRAM once per step, not once each. h_s staged at region (s - s0);
// s_id, s_w, s_q: the pass's ids, routing weights and table entries, from slot s0.
template <int KIND, typename T, int NC, int P>
__device__ __forceinline__ void down_slots_batched(const DecodeParams& p, int s0, int s_end, const int32_t* s_id,
                                                   const float* s_w, const QuantExpert* s_q, unsigned char* dyn_smem,
                                                   int64_t region, const int (&col)[NC], float (&acc)[NC]) {
    const DecodeProj& dp = p.down;
    const int kd = dp.g.kdim;
    constexpr int kCols = kChunkCols<KIND>;
    const int nch = kd / kCols;
    const int64_t row_bytes = row_bytes_of<KIND, T>(kd);
    for (int b0 = s0; b0 < s_end; b0 += P) {
        const uint8_t* rows[P][NC];  // nullptr: no GEMV in this place
        float w[P];
#pragma unroll
        for (int i = 0; i < P; ++i) {
            const int s = b0 + i;
            const int id = s < s_end ? s_id[s - s0] : -1;
            const bool ok = id >= 0 && id < p.experts;
            w[i] = ok && !p.weight_at_input ? s_w[s - s0] : 1.f;
            const uint8_t* base = nullptr;
            if (ok) {
                base = KIND == kFastPlain ? static_cast<const uint8_t*>(dp.g.w) + int64_t(id) * dp.g.n * row_bytes
                                          : dp.blob + s_q[s - s0].codes;
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) rows[i][c] = ok ? base + col[c] * row_bytes : nullptr;
        }
        for (int ch = threadIdx.x & 31; ch < nch; ch += 32) {
            uint4 v[P][NC];
#pragma unroll
            for (int i = 0; i < P; ++i)
#pragma unroll
                for (int c = 0; c < NC; ++c)
                    v[i][c] = rows[i][c] != nullptr ? __ldg(reinterpret_cast<const uint4*>(rows[i][c]) + ch)
                                                    : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int i = 0; i < P; ++i) {
                if (rows[i][0] == nullptr) continue;
                const int r = b0 + i - s0;
                const XChunk<kCols / 4> x = load_xchunk<kCols / 4>(staged_x_at(dyn_smem + r * region), ch * kCols);
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    const float d = chunk_dot<KIND>(decode_chunk<KIND, T>(dp.blob, s_q[r], kd, col[c], ch * kCols, v[i][c]), x);
                    acc[c] = fmaf(w[i], d, acc[c]);
                }
            }
        }
    }
}

// down_slots_batched for the kind down_batch_kind found: 8 slots per step with one column per
// warp, 4 with two.
template <typename T, int NC>
__device__ __forceinline__ void down_slots_kind(int kind, const DecodeParams& p, int s0, int s_end,
                                                const int32_t* s_id, const float* s_w, const QuantExpert* s_q,
                                                unsigned char* dyn_smem, int64_t region, const int (&col)[NC],
                                                float (&acc)[NC]) {
    constexpr int P = NC == 1 ? 8 : 4;
    switch (kind) {
        case kFastInt4: down_slots_batched<kFastInt4, T, NC, P>(p, s0, s_end, s_id, s_w, s_q, dyn_smem, region, col, acc); break;
        case kFastInt8: down_slots_batched<kFastInt8, T, NC, P>(p, s0, s_end, s_id, s_w, s_q, dyn_smem, region, col, acc); break;
        case kFastMxfp4: down_slots_batched<kFastMxfp4, T, NC, P>(p, s0, s_end, s_id, s_w, s_q, dyn_smem, region, col, acc); break;
        case kFastFp8: down_slots_batched<kFastFp8, T, NC, P>(p, s0, s_end, s_id, s_w, s_q, dyn_smem, region, col, acc); break;
        case kFastBf16: down_slots_batched<kFastBf16, T, NC, P>(p, s0, s_end, s_id, s_w, s_q, dyn_smem, region, col, acc); break;
        case kFastPlain: down_slots_batched<kFastPlain, T, NC, P>(p, s0, s_end, s_id, s_w, s_q, dyn_smem, region, col, acc); break;
        default: break;
    }
}

// As decode_down_v1, with the token's h rows staged in shared memory, p.down_pass slots at a time
// (one barrier per pass), every lane summing w_k times its share of each slot's dot, one warp
// reduction at the end; lane 0 adds the per-slot biases and the zero-computation experts. A warp
// owns one output column, or two (c and c + 8, where the grid has ceil(H / 16) column blocks:
// the host's choice at T >= 4), which then share every staged x load. The routed slots of a pass
// that share a decoder kind stream together (down_slots_batched); the shared expert and passes
// of mixed kinds stream slot by slot.
template <typename T, int NC>
__device__ __forceinline__ void decode_down_v2_cols(const DecodeParams& p, unsigned char* dyn_smem, QuantExpert* s_q,
                                                   int32_t* s_id, float* s_w) {
    const int K = p.route.k, S = p.slots, H = p.hidden, E = p.experts;
    const int64_t t = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int col[NC];
#pragma unroll
    for (int i = 0; i < NC; ++i) col[i] = blockIdx.x * kDecodeWarps * NC + i * kDecodeWarps + warp;
    const bool live = col[0] < H;              // warps past H stay for the barriers
    const bool both = NC == 2 && col[NC - 1] < H;  // the second column exists (uniform per warp)
    const bool has_shared = p.shared_down.g.w != nullptr || p.shared_down.blob != nullptr;
    const int slots = K + int(has_shared);
    const int64_t region = (staged_x_bytes(p.ld_h) + 15) / 16 * 16;
    const T* h = static_cast<const T*>(p.h);
    float acc[NC], extra[NC];  // this lane's share of the GEMV terms; lane 0: biases, zc experts
#pragma unroll
    for (int i = 0; i < NC; ++i) acc[i] = extra[i] = 0.f;
    for (int s0 = 0; s0 < slots; s0 += p.down_pass) {
        const int s1 = min(slots, s0 + p.down_pass);
        if (s0 > 0) __syncthreads();
        // The pass's ids and weights, read from global memory once per block.
        if (threadIdx.x < s1 - s0) {
            const int s = s0 + threadIdx.x;
            s_id[threadIdx.x] = s == K ? 0 : p.route.ids[t * K + s];
            s_w[threadIdx.x] = s == K ? 0.f : p.route.weights[t * K + s];
        }
        __syncthreads();
        for (int s = s0; s < s1; ++s) {
            const bool sh = s == K;
            const int id = s_id[s - s0];
            if (sh || (id >= 0 && id < E)) {
                const DecodeProj& dp = sh ? p.shared_down : p.down;
                stage_x(h + (t * S + s) * int64_t(p.ld_h), dp.g.kdim,
                        staged_x_at(dyn_smem + (s - s0) * region), threadIdx.x, blockDim.x);
                if (threadIdx.x == 0 && dp.blob != nullptr) s_q[s - s0] = dp.experts[id];
            }
        }
        __syncthreads();
        if (!live) continue;
        const int batch = down_batch_kind(p, s0, min(s1, K), s_id, s_q);
        for (int s = s0; s < s1; ++s) {
            const bool sh = s == K;
            const DecodeProj& dp = sh ? p.shared_down : p.down;
            const int id = s_id[s - s0];
            float w;
            if (sh) {
                w = p.shared_gate != nullptr ? 1.f / (1.f + expf(-p.shared_gate_logit[t])) : 1.f;
            } else {
                w = s_w[s - s0];
                if (id >= E && id < p.route.experts) {
#pragma unroll
                    for (int i = 0; i < NC; ++i) {
                        if (i > 0 && !both) break;
                        extra[i] = zc_accumulate<T>(p, t, s, id, w, col[i], extra[i]);
                    }
                    continue;
                }
                if (id < 0 || id >= E) {
                    if (id != -1 && lane == 0 && blockIdx.x == 0 && warp == 0) atomicAdd(p.status, 1);
                    continue;
                }
                if (p.weight_at_input) w = 1.f;
#pragma unroll
                for (int i = 0; i < NC; ++i)
                    if (i == 0 || both) extra[i] = fmaf(w, epilogue<T>(p.down.g, id, col[i], 0.f, 0.f, 1.f), extra[i]);
                if (batch != kFastNone) continue;  // streamed with the pass's other routed slots below
            }
            const StagedX xs = staged_x_at(dyn_smem + (s - s0) * region);
            const T* hg = h + (t * S + s) * int64_t(p.ld_h);
            if (both) {
                float a[NC];
                dot_rows_v2<T, NC>(dp, id, s_q[s - s0], col, xs, hg, p.status, a);
#pragma unroll
                for (int i = 0; i < NC; ++i) acc[i] = fmaf(w, a[i], acc[i]);
            } else {
                const int one[1] = {col[0]};
                float a[1];
                dot_rows_v2<T, 1>(dp, id, s_q[s - s0], one, xs, hg, p.status, a);
                acc[0] = fmaf(w, a[0], acc[0]);
            }
        }
        if (batch != kFastNone) {
            if (both) {
                down_slots_kind<T, NC>(batch, p, s0, min(s1, K), s_id, s_w, s_q, dyn_smem, region, col, acc);
            } else {
                const int one[1] = {col[0]};
                float a[1] = {acc[0]};
                down_slots_kind<T, 1>(batch, p, s0, min(s1, K), s_id, s_w, s_q, dyn_smem, region, one, a);
                acc[0] = a[0];
            }
        }
    }
    if (!live) return;
    if (p.lora.gate_up_b != nullptr) {
        // The routed slots' LoRA terms, weighted as their dots (ids and weights from L1).
        for (int s = 0; s < K; ++s) {
            const int id = p.route.ids[t * K + s];
            if (id < 0 || id >= E) continue;
            const float w = p.weight_at_input ? 1.f : p.route.weights[t * K + s];
#pragma unroll
            for (int i = 0; i < NC; ++i)
                if (i == 0 || both) acc[i] = fmaf(w, decode_lora<T>(p, true, id, col[i], int(t) * K + s, 0, lane, 32), acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < NC; ++i) {
        if (i > 0 && !both) break;
        const float v = warp_sum(acc[i]);
        if (lane == 0) {
            float y = v + extra[i];
            if (p.residual != nullptr) y += Float<T>::to_f32(static_cast<const T*>(p.residual)[t * H + col[i]]);
            static_cast<T*>(p.y)[t * H + col[i]] = Float<T>::from_f32(y);
        }
    }
}

template <typename T>
__device__ __forceinline__ void decode_down_v2(const DecodeParams& p) {
    extern __shared__ __align__(16) unsigned char dyn_smem[];
    __shared__ QuantExpert s_q[33];  // the pass's slots' table entries (packed layers)
    __shared__ int32_t s_id[33];     // the pass's expert ids and routing weights
    __shared__ float s_w[33];
    if (int64_t(gridDim.x) * kDecodeWarps >= p.hidden) decode_down_v2_cols<T, 1>(p, dyn_smem, s_q, s_id, s_w);
    else decode_down_v2_cols<T, 2>(p, dyn_smem, s_q, s_id, s_w);
}

// ---- v3: the gate/up GEMV by expert, after one routing launch ----

constexpr int kV3MaxEntries = 16 * 32;  // T * K: DECODE_TOKENS tokens of at most 32 slots

// An entry of a v3 block's list: token t, slot s (K for the shared expert) as t * 64 + s.
__device__ __forceinline__ int v3_entry(int t, int s) { return (t << 6) | s; }
__device__ __forceinline__ int v3_token(int ent) { return ent >> 6; }
__device__ __forceinline__ int v3_slot(int ent) { return ent & 63; }

// The block's expert and the (token, slot) entries (v3_entry) that chose it, ascending, into
// s_list / *s_n: the y-th smallest distinct id in [0, E) of ids [T, K] for y < gridDim.y - 1,
// and for the last row the shared expert (every token, at slot K; none without one). *s_e: the
// expert, or -1 where fewer than y + 1 experts were chosen. Warp 0 calls it.
__device__ __forceinline__ void v3_block_expert(const DecodeParams& p, bool has_shared, uint32_t* s_bits,
                                                int32_t* s_list, int* s_n, int* s_e) {
    const int lane = threadIdx.x & 31;
    const int n = p.route.tokens * p.route.k;
    const int y = blockIdx.y;
    if (y == int(gridDim.y) - 1) {
        for (int t = lane; t < p.route.tokens; t += 32) s_list[t] = v3_entry(t, p.route.k);
        if (lane == 0) {
            *s_n = has_shared ? p.route.tokens : 0;
            *s_e = has_shared ? 0 : -1;
        }
        return;
    }
    const int e = nth_chosen_expert(p.route.ids, n, p.experts, y, s_bits);
    // The entries that chose e, in order.
    int found = 0;
    if (e >= 0) {
        found = slots_of_expert(p.route.ids, n, e, s_list, kV3MaxEntries);
        __syncwarp();
        for (int m = lane; m < found; m += 32) s_list[m] = v3_entry(s_list[m] / p.route.k, s_list[m] % p.route.k);
        __syncwarp();
    }
    if (lane == 0) {
        *s_n = found;
        *s_e = e;
    }
}

// One pass over NT >= nrows entries ent[0, nrows) of the block's expert e, column j of projection
// dp. Gate/up (DOWN false): x[t] against the gate and up rows of j, lane 0 of each live warp
// writes h[t * S + s, j] through the epilogue. Down (DOWN true): h[t * S + s] against row j,
// partial[t * S + s, j] = the raw dot (decode_combine adds bias, weights and the rest).
template <typename T, int KIND, int NT, bool DOWN>
__device__ __forceinline__ void v3_pass(const DecodeParams& p, const DecodeProj& dp, const uint8_t* blob,
                                        const QuantExpert& q, const uint8_t* codes, int e, bool shared,
                                        const int32_t* ent, int nrows, int j, bool live, unsigned char* smem) {
    constexpr int R = DOWN ? 1 : 2;
    const int K = p.route.k, S = p.slots, kd = dp.g.kdim;
    const T* X = static_cast<const T*>(p.x);
    const T* Hr = static_cast<const T*>(p.h);
    int rows[R];
#pragma unroll
    for (int i = 0; i < R; ++i) rows[i] = live ? weight_row(dp.g, j, i) : 0;
    const auto src = [&](int n) {
        const int t = v3_token(ent[n]);
        return DOWN ? Hr + (int64_t(t) * S + v3_slot(ent[n])) * int64_t(p.ld_h) : X + int64_t(t) * p.hidden;
    };
    float acc[R][NT];
    gemv_pass_tiled<KIND, T, R, NT>(blob, q, codes, kd, rows, live, src, nrows, smem, acc);
    if (!live) return;  // no barrier follows in this pass; the next pass's first barrier waits for all
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        if (n >= nrows) break;
        if (!shared) {
            const int slot = v3_token(ent[n]) * K + v3_slot(ent[n]);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i][n] += decode_lora<T>(p, DOWN, e, rows[i], slot, i, threadIdx.x & 31, 32);
        }
        const float g = warp_sum(acc[0][n]);
        const float u = DOWN ? 0.f : warp_sum(acc[R - 1][n]);
        if ((threadIdx.x & 31) == 0) {
            const int t = v3_token(ent[n]), s = v3_slot(ent[n]);
            const int64_t row = int64_t(t) * S + s;
            if (DOWN) {
                p.partial[row * p.hidden + j] = g;
            } else {
                const float scale = !shared && dp.g.scale_input ? p.route.weights[t * K + s] : 1.f;
                static_cast<T*>(p.h)[row * int64_t(p.ld_h) + j] = Float<T>::from_f32(epilogue<T>(dp.g, e, j, g, u, scale));
            }
        }
    }
}

// The block's entries in passes of up to kGemvTokens, each taking the smallest instance of 1, 2,
// 4 or 8 that holds it.
template <typename T, int KIND, bool DOWN>
__device__ __forceinline__ void v3_entries(const DecodeParams& p, const DecodeProj& dp, const uint8_t* blob,
                                           const QuantExpert& q, const uint8_t* codes, int e, bool shared,
                                           const int32_t* list, int count, int j, bool live, unsigned char* smem) {
    for (int c0 = 0; c0 < count; c0 += kGemvTokens) {
        const int nrows = min(kGemvTokens, count - c0);
        const int32_t* ent = list + c0;
        if (nrows == 1) v3_pass<T, KIND, 1, DOWN>(p, dp, blob, q, codes, e, shared, ent, nrows, j, live, smem);
        else if (nrows == 2) v3_pass<T, KIND, 2, DOWN>(p, dp, blob, q, codes, e, shared, ent, nrows, j, live, smem);
        else if (nrows <= 4) v3_pass<T, KIND, 4, DOWN>(p, dp, blob, q, codes, e, shared, ent, nrows, j, live, smem);
        else v3_pass<T, KIND, kGemvTokens, DOWN>(p, dp, blob, q, codes, e, shared, ent, nrows, j, live, smem);
    }
}

// The by-expert kernels' block state in shared memory.
struct V3Block {
    uint32_t bits[32];            // the chosen ids, a bit each
    int32_t list[kV3MaxEntries];  // the block's entries (v3_entry)
    int n;                        // how many
    int e;                        // the block's expert, or -1
    QuantExpert q;                // its table entry (packed projections)
};

// The by-expert kernels' prologue: the block-wide extras (the last row's column-0 block of the
// gate/up kernel), then the block's expert and entries (v3_block_expert) and, for a packed
// projection, the expert's table entry; ends with a barrier. Returns the block's projection.
template <typename T, bool DOWN>
__device__ __forceinline__ const DecodeProj& v3_prologue(const DecodeParams& p, V3Block& b) {
    const bool last = blockIdx.y == gridDim.y - 1;
    const DecodeProj& dp = DOWN ? (last ? p.shared_down : p.down) : (last ? p.shared_up : p.up);
    if (!DOWN && last && blockIdx.x == 0) {
        // Every token's block-wide extras: the shared expert's gate logit, constant experts' alpha.
        const int K = p.route.k;
        for (int t = 0; t < p.route.tokens; ++t) {
            const T* x = static_cast<const T*>(p.x) + int64_t(t) * p.hidden;
            if (p.slots > K) decode_slot_extras(p, x, t, K, 0);
            for (int s = 0; s < K; ++s) decode_slot_extras(p, x, t, s, p.route.ids[t * K + s]);
        }
    }
    if (threadIdx.x < 32) {
        v3_block_expert(p, p.slots > p.route.k, b.bits, b.list, &b.n, &b.e);
        if (threadIdx.x == 0 && dp.blob != nullptr && b.e >= 0) b.q = dp.experts[b.e];
    }
    __syncthreads();
    return dp;
}

// The by-expert GEMV of one projection (gate/up, or down where DOWN): block (x, y) owns output
// columns 8x .. 8x + 8 (one per warp) of the y-th distinct expert that the tokens chose
// (v3_block_expert; rows past the number chosen exit), or in the last row of the grid the shared
// expert, for every entry that chose it, so that each chosen expert's rows are read once per
// forward (once per 8 tokens), not once per token. The routing ran before (route_{l}_e{N} into
// p.route.ids / weights).
// KIND: the one decoder of the instance, kFastPlain for plain weights (dp.blob null) or the
// fast_kind every routed expert of a packed projection has (the host chooses the instance); an
// expert of another kind is counted in p.status and skipped, never decoded wrongly. The shared
// expert is plain in every instance.
template <typename T, bool DOWN, int KIND>
__device__ __forceinline__ void decode_by_expert(const DecodeParams& p) {
    __shared__ __align__(16) unsigned char smem[kGemvTokens * kGemvStaged];
    __shared__ V3Block b;
    const bool last = blockIdx.y == gridDim.y - 1;
    const int warp = threadIdx.x >> 5;
    const DecodeProj& dp = v3_prologue<T, DOWN>(p, b);
    const int e = b.e, count = b.n;
    const int32_t* s_list = b.list;
    if (e < 0 || count == 0) return;  // uniform per block: before any other barrier
    const int kd = dp.g.kdim;
    const int n_out = DOWN ? dp.g.n : dp.g.n / 2;
    const int j = blockIdx.x * kDecodeWarps + warp;
    const bool live = j < n_out;
    if (dp.blob == nullptr) {
        const uint8_t* codes = static_cast<const uint8_t*>(dp.g.w) + int64_t(e) * dp.g.n * kd * int64_t(sizeof(T));
        v3_entries<T, kFastPlain, DOWN>(p, dp, nullptr, QuantExpert{}, codes, e, last, s_list, count, j, live, smem);
        return;
    }
    if constexpr (KIND == kFastPlain) {
        if (threadIdx.x == 0) atomicAdd(p.status, 1);  // a packed projection: not this instance's
    } else {
        const QuantExpert q = b.q;
        if (fast_kind(q, kd) != KIND) {
            if (threadIdx.x == 0) atomicAdd(p.status, 1);  // uniform per block (b.q)
            return;
        }
        v3_entries<T, KIND, DOWN>(p, dp, dp.blob, q, dp.blob + q.codes, e, last, s_list, count, j, live, smem);
    }
}

// ---- v5: the by-expert GEMVs on tensor cores (plain weights) ----
//
// One mma.sync m16n8k16 per 16 weight rows and 16 columns, the pass's up to 8 tokens as its N:
// a warp owns 16 weight rows (gate/up: the gate and the up row of 8 output columns; down: 16
// output columns), each lane loads 16 bytes of its rows g = lane / 4 and g + 8 at columns
// 32u + 8q .. + 8 (q = lane % 4), and the 16 bytes of token g's staged x at the same columns.
// The dot product runs over a permutation of k that both operands share: in block u of 32
// columns, the k-step s (0, 1) takes the lane's columns 32u + 8q + 4s .. + 4 as the fragment's
// k = 2q, 2q + 1, 2q + 8, 2q + 9 (PTX ISA, mma.m16n8k16 fragment layouts), so the loaded words
// are the A and B registers as they come: no shuffles and no conversions. Products of two
// bf16 (f16) values are exact in f32, accumulated in f32 by the tensor core.

constexpr int kMmaTile = 1024;                   // columns staged per tile
constexpr int kMmaRow = 2 * kMmaTile + 64;       // bytes per staged token row: 64 bytes of pad put
                                                 // the 8 lanes of a quarter warp (tokens g, g + 1,
                                                 // 16 bytes at 16q) on distinct banks
constexpr int kMmaStaged = kGemvTokens * kMmaRow;  // 16,896 bytes
constexpr int kMmaWarpRows = 16;

// Whether the lane has columns in block b of a tile's `blocks`: every block but the last, and
// the last where last_ok (a partial last block: the lane's columns may lie past the row).
__device__ __forceinline__ bool v5_lane_in(int b, int blocks, bool last_ok) {
    return b < blocks - 1 || (b == blocks - 1 && last_ok);
}

// The lane's 16 bytes of its two rows (w0, w1 at the tile's first column) in blocks u .. u + 3
// of `blocks` (64 bytes of a row per block) where v5_lane_in (elsewhere they are left as they
// are): all loads issued before any is used.
__device__ __forceinline__ void v5_load_rows(const uint8_t* w0, const uint8_t* w1, int u, int blocks, uint4 (&a0)[4],
                                             uint4 (&a1)[4], bool last_ok = true) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (v5_lane_in(u + i, blocks, last_ok)) {
            a0[i] = __ldg(reinterpret_cast<const uint4*>(w0 + 64 * (u + i)));
            a1[i] = __ldg(reinterpret_cast<const uint4*>(w1 + 64 * (u + i)));
        }
    }
}

// One pass of the block's expert over entries ent[0, nrows) (nrows <= 8): stage their rows
// (x, or h for DOWN) kMmaTile columns at a time as T, zeros for tokens past nrows; each warp
// multiplies its 16 weight rows (r0: rows of fragment rows g; r1: g + 8) into acc.
template <typename T, bool DOWN, typename Src>
__device__ __forceinline__ void v5_pass(const uint8_t* codes, int64_t row_bytes, int kd, int64_t r0, int64_t r1,
                                        const Src& src, int nrows, unsigned char* smem, float (&acc)[4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = 0.f;
    const uint8_t* w0 = codes + r0 * row_bytes + 16 * q;
    const uint8_t* w1 = codes + r1 * row_bytes + 16 * q;
    const unsigned char* xs = smem + g * kMmaRow + 16 * q;
    for (int k0 = 0; k0 < kd; k0 += kMmaTile) {
        const int width = min(kMmaTile, kd - k0);  // a multiple of 32
        __syncthreads();                            // the previous tile (or pass) has been read
        if (warp < kGemvTokens) {
            const bool valid = warp < nrows;
            const T* row = src(valid ? warp : 0) + k0;
            for (int c = 8 * lane; c < width; c += 256) {
                const uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(row + c)) : make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(smem + warp * kMmaRow + 2 * c) = v;
            }
        }
        __syncthreads();
        const int blocks = width / 32;
        const int64_t at = 2 * int64_t(k0);
        for (int u = 0; u < blocks; u += 4) {
            uint4 a0[4], a1[4];
            v5_load_rows(w0 + at, w1 + at, u, blocks, a0, a1);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                if (u + i < blocks) {
                    const uint4 x = *reinterpret_cast<const uint4*>(xs + 64 * (u + i));
                    const uint32_t s0[4] = {a0[i].x, a1[i].x, a0[i].y, a1[i].y};
                    ptx::Mma<T>::run(acc, s0, x.x, x.y);
                    const uint32_t s1[4] = {a0[i].z, a1[i].z, a0[i].w, a1[i].w};
                    ptx::Mma<T>::run(acc, s1, x.z, x.w);
                }
            }
        }
    }
}

// ---- v5 over packed codes: int4, MXFP4 and FP8 decoded into the A operand ----
//
// A lane loads 16 bytes of each of its two rows per block u of columns: 32 int4 or e2m1 codes
// (blocks of 128 columns) or 16 FP8 codes (blocks of 64), at column u * BW + q * BW / 4. The codes
// become the fragment's 16-bit floats exactly, two per register, paired so that a mask or a
// shift lines them up:
//   int4  word j (columns 8j .. 8j + 7 of the lane's 32) gives pairs (i, i + 4), i = 0..3: a
//         mask and an OR (one lop3) make M + code in each half (M = 128 in bf16, 7 mantissa
//         bits; 1024 in f16), one fma subtracts M + z (z the group's zero point, 8 where
//         symmetric), leaving code - z. Two k-steps per word: fragment k = 2q, 2q + 1 from pair
//         2t and k = 2q + 8, 2q + 9 from pair 2t + 1.
//   mxfp4 the same pairs and order as int4: the pair's two nibbles isolated, one integer
//         multiply-add copies each twice (sign to the top of its half, the 3 magnitude bits
//         under the exponent: e2m1's 2 exponent bits as the low exponent bits, its mantissa bit
//         as the top mantissa bit), a mask keeps the sign and magnitude (f16: a multiply-add moves
//         the sign up instead). That is the value * 2^-126 (f16: 2^-14), subnormals included, and
//         one fma by 2^(s - 1) (f16: 2^(s - 113)) makes it value * 2^(s - 127), s the lane's
//         e8m0 scale: its 32 columns are one MXFP4 group. Exact where the product and the
//         multiplier are representable: e8m0 codes up to 128 (bf16) or 104 ..= 128 (f16); the
//         host runs this only on layers whose scales all are.
//   fp8   word j (columns 4j .. 4j + 3 of the lane's 16) gives pairs (0, 2) and (1, 3): the 7
//         magnitude bits shifted under the 16-bit format's exponent and mantissa (bf16: value *
//         2^-120, subnormals included; f16: value * 2^-8) with the sign bit, then one fma by
//         2^120 (2^8) restores the value exactly. One k-step per word, pair (0, 2) as k = 2q,
//         2q + 1 and (1, 3) as 2q + 8, 2q + 9. (0x7f and 0xff, NaN in e4m3, would become 480:
//         the host runs this only on layers without them.)
// The activation is staged in the same order: each 8 columns of the lane's block (part p) as
// x0 x4 x1 x5 x2 x6 x3 x7 (int4) or x0 x2 x1 x3 x4 x6 x5 x7 (fp8), at byte 2 BW u + 16(4p + q)
// of the token's row, so a lane's 16-byte read is the B registers of two k-steps and the 8
// lanes of a quarter warp (tokens g, g + 1; q = 0..3) read 128 contiguous bytes.
// int4 and FP8: a block's columns lie in one scale group (int4 groups of a multiple of 128
// columns; FP8's 128 x 128 blocks): the tensor core sums the block into a fresh accumulator,
// which one fma per row scales into the total. MXFP4's scales and those of int4 in groups of
// 32 or 64 (kMmaInt4Small) go onto the decoded weights instead (LaneScale).
// int4 with GPTQ's act-order runs on the layout QuantLayer::upload gives it (columns in group
// order, quant_params.cuh): the same loop over the stored columns, the activation staged in
// the same order (decode_by_expert_mma: gate/up gathers x from a copy of its rows in shared
// memory; down reads h, which gate/up wrote in that order).

template <typename T>
struct MmaCodes;
template <>
struct MmaCodes<__nv_bfloat16> {
    static constexpr uint32_t kMagic = 0x43004300u;    // int4: 128.0 in each half
    static constexpr uint32_t kNegMagic = 0xc300u;      // -128.0
    static constexpr uint32_t kOne = 0x3f803f80u;       // 1.0
    static constexpr uint32_t kFp8Bits = 0x07f007f0u;   // e4m3's 7 bits under bf16's exponent
    static constexpr int kFp8Lo = 4, kFp8Hi = 4;        // shifts of bytes 0, 2 (left), 1, 3 (right)
    static constexpr uint32_t kFp8Scale = 0x7b807b80u;  // 2^120
    static constexpr uint32_t kFp4Unit = 0x00800080u;   // e8m0 code s -> 2^(s - 1): (s + 126) << 7
    static constexpr uint32_t kFp4Bias = 126u;
};
template <>
struct MmaCodes<__half> {
    static constexpr uint32_t kMagic = 0x64006400u;    // 1024.0: 10 mantissa bits
    static constexpr uint32_t kNegMagic = 0xe400u;      // -1024.0
    static constexpr uint32_t kOne = 0x3c003c00u;
    static constexpr uint32_t kFp8Bits = 0x3f803f80u;
    static constexpr int kFp8Lo = 7, kFp8Hi = 1;
    static constexpr uint32_t kFp8Scale = 0x5c005c00u;  // 2^8
    static constexpr uint32_t kFp4Unit = 0x04000400u;   // s -> 2^(s - 113): (s - 98) << 10
    static constexpr uint32_t kFp4Bias = 0u - 98u;
};

// Pair h (0..3) of int4 word v (nibbles h and h + 4) as code - z in each half; nz = -(M + z)
// in both halves.
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t v, int h, uint32_t nz) {
    const uint32_t m = ptx::lop3<0xea>(v >> (4 * h), 0x000f000fu, MmaCodes<T>::kMagic);  // (a & b) | c
    return ptx::fma2<T>(m, MmaCodes<T>::kOne, nz);
}

// FP8 word v's pairs (bytes 0, 2) and (bytes 1, 3), exactly.
template <typename T>
__device__ __forceinline__ void fp8_pairs(uint32_t v, uint32_t& lo, uint32_t& hi) {
    using C = MmaCodes<T>;
    const uint32_t l = ptx::lop3<0xea>(v << C::kFp8Lo, C::kFp8Bits, (v << 8) & 0x80008000u);
    const uint32_t h = ptx::lop3<0xea>(v >> C::kFp8Hi, C::kFp8Bits, v & 0x80008000u);
    lo = ptx::fma2<T>(l, C::kFp8Scale, 0x80008000u);  // + (-0): a * b exactly
    hi = ptx::fma2<T>(h, C::kFp8Scale, 0x80008000u);
}

// Pair h (0, 1) of e2m1 word v (nibbles h and h + 4; v >> 8 gives nibbles 2, 3, 6, 7 as h = 0,
// 1) times mult (the multiplier of the lane's scale, in both halves), exactly.
template <typename T>
__device__ __forceinline__ uint32_t fp4_pair(uint32_t v, int h, uint32_t mult) {
    const uint32_t p = v & (0x000f000fu << (4 * h));
    uint32_t b;
    if constexpr (ptx::kIsBf16<T>) {
        // p << (12 - 4h): sign at bit 15; p << (6 - 4h): magnitude at bits 6..8. The two copies
        // do not overlap, so the sum is their OR.
        b = (p * ((0x1000u + 0x40u) >> (4 * h))) & 0x81c081c0u;
    } else {
        const uint32_t m = p << (9 - 4 * h);  // magnitude at bits 9..11, sign at 12
        b = m + 7u * (m & 0x10001000u);       // sign 2^12 -> 2^15 (bits 12..14 clear)
    }
    return ptx::fma2<T>(b, mult, 0x80008000u);  // + (-0): b * mult exactly
}

// v5's instance for int4 experts in groups of 32 or 64 columns (kMmaInt4Small; fast_kind int4):
// each lane's 32 columns of a block lie in one group, whose scale goes onto the lane's decoded
// weights. code - z is exact; times the scale it is rounded once to T (bf16: the f16 scale is
// rounded to bf16 first), as the weights of a dequantised bf16/f16 checkpoint would be.

// The decoded pairs of a lane's row in one block where its scale is in the weights: from the
// scale word e (lane_scale in v5_pass_packed), pair h (0..3) of code word v as int4_pair or
// fp4_pair order it.
template <int KIND, typename T>
struct LaneScale {
    uint32_t mult, nz;
    __device__ __forceinline__ explicit LaneScale(uint32_t e) {
        if constexpr (KIND == kFastMxfp4) {
            mult = (e + MmaCodes<T>::kFp4Bias) * MmaCodes<T>::kFp4Unit;
            nz = 0u;
        } else {
            const T s = Float<T>::from_f32(__half2float(__ushort_as_half(static_cast<unsigned short>(e & 0xffffu))));
            uint16_t b;
            memcpy(&b, &s, sizeof b);
            mult = b * 0x00010001u;
            nz = (MmaCodes<T>::kNegMagic + (e >> 16)) * 0x00010001u;
        }
    }
    __device__ __forceinline__ uint32_t pair(uint32_t v, int h) const {
        if constexpr (KIND == kFastMxfp4) return fp4_pair<T>(h < 2 ? v : v >> 8, h & 1, mult);
        else return ptx::fma2<T>(int4_pair<T>(v, h, nz), mult, 0x80008000u);  // (code - z) * s, rounded
    }
};

// Columns per block u of the packed v5 loop.
template <int KIND>
constexpr int kMmaBlock = KIND == kFastFp8 ? 64 : 128;

// Stage entries' rows [k0, k0 + width) (width a multiple of 32) in KIND's order above, as T,
// zeros for entries past nrows and for the columns past width in its last block of kMmaBlock:
// warp w < kGemvTokens stages entry w, 8 columns per lane and step.
// perm: an act-order expert's column order (stored column j is column perm[j]), gathered here
// from rows that src gives in shared memory, so that the codes stream as stored; nullptr for
// the natural order, src's rows then in global memory.
template <int KIND, typename T, typename Src>
__device__ __forceinline__ void v5_stage_packed(const Src& src, const uint32_t* perm, int nrows, int k0, int width,
                                                unsigned char* smem) {
    constexpr int BW = kMmaBlock<KIND>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp >= kGemvTokens) return;
    const bool valid = warp < nrows;
    const T* row = src(valid ? warp : 0);
    const int staged = (width + BW - 1) / BW * BW;
    for (int c = 8 * lane; c < staged; c += 256) {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (valid && c < width && perm == nullptr) {
            v = __ldg(reinterpret_cast<const uint4*>(row + k0 + c));
        } else if (valid && c < width) {
            const uint4 i0 = __ldg(reinterpret_cast<const uint4*>(perm + k0 + c));
            const uint4 i1 = __ldg(reinterpret_cast<const uint4*>(perm + k0 + c + 4));
            const uint32_t at[8] = {i0.x, i0.y, i0.z, i0.w, i1.x, i1.y, i1.z, i1.w};
            const unsigned short* r16 = reinterpret_cast<const unsigned short*>(row);
            uint32_t h[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = r16[at[i]];
            v = make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
        }
        uint4 o;
        if constexpr (BW == 128) {  // int4, e2m1: (x0 x1) (x2 x3) (x4 x5) (x6 x7) -> (x0 x4) (x1 x5) (x2 x6) (x3 x7)
            o = make_uint4(ptx::prmt(v.x, v.z, 0x5410), ptx::prmt(v.x, v.z, 0x7632), ptx::prmt(v.y, v.w, 0x5410),
                           ptx::prmt(v.y, v.w, 0x7632));
        } else {  // -> (x0 x2) (x1 x3) (x4 x6) (x5 x7)
            o = make_uint4(ptx::prmt(v.x, v.y, 0x5410), ptx::prmt(v.x, v.y, 0x7632), ptx::prmt(v.z, v.w, 0x5410),
                           ptx::prmt(v.z, v.w, 0x7632));
        }
        const int u = c / BW, q = (c % BW) / (BW / 4), part = (c % (BW / 4)) / 8;
        *reinterpret_cast<uint4*>(smem + warp * kMmaRow + 2 * BW * u + 16 * (4 * part + q)) = o;
    }
}

// v5_pass over the packed codes of expert q (KIND kFastInt4: fast_kind int4, group a multiple
// of 128; kMmaInt4Small: fast_kind int4, group 32 or 64; kFastMxfp4: e8m0 codes in the range
// above; kFastFp8: kd a multiple of 64): rows r0 (fragment rows g) and r1 (g + 8).
template <int KIND, typename T, typename Src>
__device__ __forceinline__ void v5_pass_packed(const uint8_t* blob, const QuantExpert& q, int kd, int64_t r0,
                                               int64_t r1, const Src& src, bool gather, int nrows,
                                               unsigned char* smem, float (&acc)[4]) {
    constexpr bool kInt4 = KIND == kFastInt4 || KIND == kMmaInt4Small, kFp4 = KIND == kFastMxfp4;
    constexpr bool kLaneScale = kFp4 || KIND == kMmaInt4Small;  // scales in the decoded weights
    constexpr int BW = kMmaBlock<KIND>;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, qd = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] = 0.f;
    const int64_t row_bytes = BW == 128 ? kd / 2 : kd;
    const uint8_t* w0 = blob + q.codes + r0 * row_bytes + 16 * qd;
    const uint8_t* w1 = blob + q.codes + r1 * row_bytes + 16 * qd;
    // Scale groups: int4 f16 [N, kd / group] (and zeros u8, or 8); MXFP4 e8m0 [N, kd / 32] in
    // rows of mxfp4_scale_row(kd) bytes; fp8 f32 [ceil(N/128), ceil(kd/128)] of 128-column
    // groups.
    const int gshift = kInt4 ? 31 - __clz(q.group) : (kFp4 ? 5 : 7);
    const int64_t per_row = kFp4 ? mxfp4_scale_row(kd) : (kd + (1 << gshift) - 1) >> gshift;
    const int64_t s_r0 = (KIND == kFastFp8 ? r0 >> 7 : r0) * per_row;
    const int64_t s_r1 = (KIND == kFastFp8 ? r1 >> 7 : r1) * per_row;
    const uint8_t* zeros = kInt4 && q.zeros >= 0 ? blob + q.zeros : nullptr;
    const auto scale_at = [&](int64_t i) {
        return kInt4 ? __half2float(reinterpret_cast<const __half*>(blob + q.scales)[i])
                     : reinterpret_cast<const float*>(blob + q.scales)[i];
    };
    const auto lane_scale = [&](int64_t i) -> uint32_t {  // int4s: f16 bits | zero point << 16
        return reinterpret_cast<const uint16_t*>(blob + q.scales)[i] | (zeros != nullptr ? zeros[i] : 8u) << 16;
    };
    const unsigned char* xs = smem + g * kMmaRow + 16 * qd;
    for (int k0 = 0; k0 < kd; k0 += kMmaTile) {
        const int width = min(kMmaTile, kd - k0);  // a multiple of BW (of 32 where kLaneScale)
        __syncthreads();                            // the previous tile (or pass) has been read
        // gather: src's rows are an act-order expert's, in shared memory, staged in its
        // column order (the permutation read from q, in shared memory, at each tile).
        v5_stage_packed<KIND, T>(src, gather ? reinterpret_cast<const uint32_t*>(blob + q.perm) : nullptr, nrows,
                                 k0, width, smem);
        // int4, FP8: the tile's groups (at most 8, a group at least 128 columns): lane q holds
        // groups first + q and first + 4 + q of rows r0 and r1, its quad's other lanes' by
        // shuffle. (Where the scales go onto the weights, they load with each block's codes.)
        const int first = k0 >> gshift;
        float s0[2] = {0.f, 0.f}, s1[2] = {0.f, 0.f};
        uint32_t z0[2] = {8u, 8u}, z1[2] = {8u, 8u};
        if constexpr (!kLaneScale) {
            const int count = ((k0 + width - 1) >> gshift) - first + 1;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int gi = first + qd + 4 * i;
                const bool in = qd + 4 * i < count;
                s0[i] = in ? scale_at(s_r0 + gi) : 0.f;
                s1[i] = in ? scale_at(s_r1 + gi) : 0.f;
                z0[i] = zeros != nullptr && in ? zeros[s_r0 + gi] : 8u;
                z1[i] = zeros != nullptr && in ? zeros[s_r1 + gi] : 8u;
            }
        }
        __syncthreads();
        // MXFP4 rows and int4 rows in groups of 32 or 64 are whole 32-column groups: the tile's
        // last block may be partial, its lanes past the row leaving their codes 0 (x is staged
        // as 0 there too).
        const int blocks = (width + BW - 1) / BW;
        const bool last_ok = !kLaneScale || BW * (blocks - 1) + BW / 4 * qd < width;  // the lane's columns
        const int64_t at = BW == 128 ? k0 / 2 : k0;
        for (int u = 0; u < blocks; u += 4) {
            uint4 a0[4], a1[4];
            if constexpr (kLaneScale) {
#pragma unroll
                for (int i = 0; i < 4; ++i) a0[i] = a1[i] = make_uint4(0u, 0u, 0u, 0u);
            }
            v5_load_rows(w0 + at, w1 + at, u, blocks, a0, a1, last_ok);
            if constexpr (kLaneScale) {
                // The scale of the lane's group (its 32 columns lie in one) in each block, both
                // rows: MXFP4's e8m0 code; int4's f16 bits | zero point << 16.
                uint32_t e0[4], e1[4];
                if constexpr (kFp4) {
                    // A row's 16 scale bytes of blocks u .. u + 3 in one load (4 per block, byte
                    // q the lane's; rows padded to 16 bytes, so past the row's end it reads the
                    // padding's zeros).
                    const int64_t at_s = (k0 >> 5) + 4 * u;
                    const uint4 v0 = __ldg(reinterpret_cast<const uint4*>(blob + q.scales + s_r0 + at_s));
                    const uint4 v1 = __ldg(reinterpret_cast<const uint4*>(blob + q.scales + s_r1 + at_s));
                    const uint32_t b0[4] = {v0.x, v0.y, v0.z, v0.w}, b1[4] = {v1.x, v1.y, v1.z, v1.w};
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        e0[i] = (b0[i] >> (8 * qd)) & 0xffu;
                        e1[i] = (b1[i] >> (8 * qd)) & 0xffu;
                    }
                } else {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const int64_t gi = (k0 + BW * (u + i) + 32 * qd) >> gshift;
                        const bool in = v5_lane_in(u + i, blocks, last_ok);
                        e0[i] = in ? lane_scale(s_r0 + gi) : 0u;
                        e1[i] = in ? lane_scale(s_r1 + gi) : 0u;
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    if (u + i < blocks) {
                        const LaneScale<KIND, T> l0(e0[i]), l1(e1[i]);
                        const uint32_t c0[4] = {a0[i].x, a0[i].y, a0[i].z, a0[i].w};
                        const uint32_t c1[4] = {a1[i].x, a1[i].y, a1[i].z, a1[i].w};
                        const unsigned char* xb = xs + 2 * BW * (u + i);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const uint4 x = *reinterpret_cast<const uint4*>(xb + 64 * j);
                            const uint32_t f0[4] = {l0.pair(c0[j], 0), l1.pair(c1[j], 0), l0.pair(c0[j], 1),
                                                    l1.pair(c1[j], 1)};
                            ptx::Mma<T>::run(acc, f0, x.x, x.y);
                            const uint32_t f1[4] = {l0.pair(c0[j], 2), l1.pair(c1[j], 2), l0.pair(c0[j], 3),
                                                    l1.pair(c1[j], 3)};
                            ptx::Mma<T>::run(acc, f1, x.z, x.w);
                        }
                    }
                }
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    if (u + i < blocks) {
                        const int grp = ((k0 + BW * (u + i)) >> gshift) - first;  // uniform, < 8
                        const int from = (lane & ~3) | (grp & 3);
                        const bool hi = grp >= 4;
                        const float sc0 = __shfl_sync(kFullMask, hi ? s0[1] : s0[0], from);
                        const float sc1 = __shfl_sync(kFullMask, hi ? s1[1] : s1[0], from);
                        const uint32_t c0[4] = {a0[i].x, a0[i].y, a0[i].z, a0[i].w};
                        const uint32_t c1[4] = {a1[i].x, a1[i].y, a1[i].z, a1[i].w};
                        const unsigned char* xb = xs + 2 * BW * (u + i);
                        float part[4] = {0.f, 0.f, 0.f, 0.f};
                        if constexpr (kInt4) {
                            const uint32_t zr0 = __shfl_sync(kFullMask, hi ? z0[1] : z0[0], from);
                            const uint32_t zr1 = __shfl_sync(kFullMask, hi ? z1[1] : z1[0], from);
                            const uint32_t nz0 = (MmaCodes<T>::kNegMagic + zr0) * 0x00010001u;
                            const uint32_t nz1 = (MmaCodes<T>::kNegMagic + zr1) * 0x00010001u;
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                const uint4 x = *reinterpret_cast<const uint4*>(xb + 64 * j);
                                const uint32_t f0[4] = {int4_pair<T>(c0[j], 0, nz0), int4_pair<T>(c1[j], 0, nz1),
                                                        int4_pair<T>(c0[j], 1, nz0), int4_pair<T>(c1[j], 1, nz1)};
                                ptx::Mma<T>::run(part, f0, x.x, x.y);
                                const uint32_t f1[4] = {int4_pair<T>(c0[j], 2, nz0), int4_pair<T>(c1[j], 2, nz1),
                                                        int4_pair<T>(c0[j], 3, nz0), int4_pair<T>(c1[j], 3, nz1)};
                                ptx::Mma<T>::run(part, f1, x.z, x.w);
                            }
                        } else {
#pragma unroll
                            for (int p = 0; p < 2; ++p) {
                                const uint4 x = *reinterpret_cast<const uint4*>(xb + 64 * p);
#pragma unroll
                                for (int t = 0; t < 2; ++t) {
                                    uint32_t f[4];
                                    fp8_pairs<T>(c0[2 * p + t], f[0], f[2]);
                                    fp8_pairs<T>(c1[2 * p + t], f[1], f[3]);
                                    ptx::Mma<T>::run(part, f, t == 0 ? x.x : x.z, t == 0 ? x.y : x.w);
                                }
                            }
                        }
                        acc[0] = fmaf(sc0, part[0], acc[0]);
                        acc[1] = fmaf(sc0, part[1], acc[1]);
                        acc[2] = fmaf(sc1, part[2], acc[2]);
                        acc[3] = fmaf(sc1, part[3], acc[3]);
                    }
                }
            }
        }
    }
}

// decode_gate_up_v5 / decode_down_v5: decode_by_expert's grid and contract (same entries, same
// outputs: h through the epilogue, or raw dots into p.partial), the GEMVs on tensor cores.
// Block (x, y): warp w owns 8 output columns 64x + 8w .. (gate/up) or 16 columns 128x + 16w ..
// (down). KIND: kFastPlain for plain projections, kFastInt4 for a packed projection whose
// routed experts are all int4 with groups of a multiple of 128 columns, kMmaInt4Small for one
// of int4 experts in groups of 32 or 64, kFastMxfp4 for one of MXFP4 experts with e8m0 codes
// in fp4_pair's range, kFastFp8 for one of FP8 experts with rows of a multiple of 64 columns
// and no NaN codes (the shared expert is plain in every instance). The host runs it only where
// every row it stages or streams is a multiple of 32 columns and 16-byte aligned (H, I, Is %
// 32 == 0; ld_h % 8 == 0); an expert the instance does not take is counted in p.status and
// skipped. The int4 instances take act-order experts in their stored column order; for those
// the host gives the gate/up kernel kGemvTokens * H elements of dynamic shared memory, and
// the h it writes is in the down experts' stored order, which only the v5 down kernel reads.
template <typename T, bool DOWN, int KIND>
__device__ __forceinline__ void decode_by_expert_mma(const DecodeParams& p) {
    __shared__ __align__(16) unsigned char smem[kMmaStaged];
    extern __shared__ __align__(16) unsigned char x_rows[];  // act-order gate/up only (below)
    __shared__ V3Block b;
    const bool last = blockIdx.y == gridDim.y - 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, q = lane & 3;
    const DecodeProj& dp = v3_prologue<T, DOWN>(p, b);
    const int e = b.e, count = b.n;
    if (e < 0 || count == 0) return;  // uniform per block: before any other barrier
    const int K = p.route.k, S = p.slots, kd = dp.g.kdim;
    if (dp.blob != nullptr) {
        // Uniform per block (b.q): an expert this instance does not decode.
        // (int4 act-order experts in their stored column order: v5 stages x in that order.)
        const bool takes = KIND == kFastInt4   ? fast_kind(b.q, kd, true) == kFastInt4 && b.q.group % 128 == 0
                           : KIND == kMmaInt4Small ? fast_kind(b.q, kd, true) == kFastInt4 && b.q.group < 128
                           : KIND == kFastFp8 ? fast_kind(b.q, kd) == kFastFp8 && kd % 64 == 0
                           : KIND == kFastMxfp4 ? fast_kind(b.q, kd) == kFastMxfp4
                                                : false;
        if (!takes) {
            if (threadIdx.x == 0) atomicAdd(p.status, 1);
            return;
        }
    }
    const int n_out = DOWN ? dp.g.n : dp.g.n / 2;
    const int64_t row_bytes = int64_t(kd) * int64_t(sizeof(T));
    const uint8_t* codes =
        dp.blob == nullptr ? static_cast<const uint8_t*>(dp.g.w) + int64_t(e) * dp.g.n * row_bytes : nullptr;
    // The lane's two weight rows (clamped into the matrix; their results are not stored).
    int j0, j1;
    int64_t r0, r1;
    if (DOWN) {
        j0 = (blockIdx.x * kDecodeWarps + warp) * kMmaWarpRows + g;
        j1 = j0 + 8;
        r0 = min(j0, n_out - 1);
        r1 = min(j1, n_out - 1);
    } else {
        j0 = j1 = (blockIdx.x * kDecodeWarps + warp) * 8 + g;
        r0 = weight_row(dp.g, min(j0, n_out - 1), 0);
        r1 = weight_row(dp.g, min(j0, n_out - 1), 1);
    }
    const T* X = static_cast<const T*>(p.x);
    const T* Hr = static_cast<const T*>(p.h);
    // GPTQ act-order experts, laid out in group order at upload (quant_params.cuh). Gate/up:
    // the pass's x rows are copied whole into dynamic shared memory (kGemvTokens * H of T, which
    // the host gives these layers) and staged from there in the expert's stored column order.
    // Down: the gate/up kernel wrote each h row in its down expert's stored order already
    // (hinv), so the down kernel streams h as it is.
    const bool gather = !DOWN && (KIND == kFastInt4 || KIND == kMmaInt4Small) && dp.blob != nullptr && b.q.perm >= 0;
    for (int c0 = 0; c0 < count; c0 += kGemvTokens) {
        const int nrows = min(kGemvTokens, count - c0);
        const int32_t* ent = b.list + c0;
        if (gather && warp < nrows) {
            // The previous pass's staging read these rows before its last barrier.
            const T* row = X + int64_t(v3_token(ent[warp])) * p.hidden;
            for (int c = 8 * lane; c < kd; c += 256) {
                *reinterpret_cast<uint4*>(x_rows + (int64_t(warp) * kd + c) * int64_t(sizeof(T))) =
                    __ldg(reinterpret_cast<const uint4*>(row + c));
            }
        }
        const auto src = [&](int n) {
            const int t = v3_token(ent[n]);
            if (gather) return reinterpret_cast<const T*>(x_rows) + int64_t(n) * kd;
            return DOWN ? Hr + (int64_t(t) * S + v3_slot(ent[n])) * int64_t(p.ld_h) : X + int64_t(t) * p.hidden;
        };
        float acc[4];
        if constexpr (KIND != kFastPlain) {
            if (dp.blob != nullptr) v5_pass_packed<KIND, T>(dp.blob, b.q, kd, r0, r1, src, gather, nrows, smem, acc);
            else v5_pass<T, DOWN>(codes, row_bytes, kd, r0, r1, src, nrows, smem, acc);
        } else {
            v5_pass<T, DOWN>(codes, row_bytes, kd, r0, r1, src, nrows, smem, acc);
        }
        // acc[i]: row g, token 2q + i; acc[2 + i]: row g + 8, token 2q + i.
        const uint32_t* hinv = nullptr;  // gate/up: the down expert's inverse permutation, if any
        if (!DOWN && !last && p.down.blob != nullptr) {
            const int64_t at = p.down.experts[e].perm;  // uniform per block
            if (at >= 0) hinv = reinterpret_cast<const uint32_t*>(p.down.blob + at) + p.down.g.kdim;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int n = 2 * q + i;
            if (n >= nrows) continue;
            const int t = v3_token(ent[n]), s = v3_slot(ent[n]);
            const int64_t row = int64_t(t) * S + s;
            if (!last && j0 < n_out) {
                // The LoRA terms, whole on this lane (its rows and tokens are its own).
                acc[i] += decode_lora<T>(p, DOWN, e, int(r0), t * K + s, 0, 0, 1);
                if (!DOWN || j1 < n_out) acc[2 + i] += decode_lora<T>(p, DOWN, e, int(r1), t * K + s, DOWN ? 0 : 1, 0, 1);
            }
            if (DOWN) {
                if (j0 < n_out) p.partial[row * p.hidden + j0] = acc[i];
                if (j1 < n_out) p.partial[row * p.hidden + j1] = acc[2 + i];
            } else if (j0 < n_out) {
                const float scale = !last && dp.g.scale_input ? p.route.weights[t * K + s] : 1.f;
                static_cast<T*>(p.h)[row * int64_t(p.ld_h) + (hinv != nullptr ? hinv[j0] : j0)] =
                    Float<T>::from_f32(epilogue<T>(dp.g, e, j0, acc[i], acc[2 + i], scale));
            }
        }
    }
}

// decode_down's contract after decode_down_v3 (the by-expert down GEMV into p.partial): thread c
// of block (x, t) sums column c of token t's slots in order, as decode_down_v1 does, from the
// partial dots: w_k * epilogue(partial + bias), copy and constant experts, the gated shared
// expert, the residual; f32, one rounding, no atomics.
template <typename T>
__device__ __forceinline__ void decode_combine(const DecodeParams& p) {
    const int K = p.route.k, S = p.slots, H = p.hidden, E = p.experts;
    const int64_t t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H) return;
    const float* part = p.partial + t * S * int64_t(H) + c;
    float acc = 0.f;
    for (int s = 0; s < K; ++s) {
        const int id = p.route.ids[t * K + s];
        const float w = p.route.weights[t * K + s];
        if (id >= 0 && id < E) {
            acc = fmaf(p.weight_at_input ? 1.f : w, epilogue<T>(p.down.g, id, c, part[int64_t(s) * H], 0.f, 1.f), acc);
        } else if (id >= E && id < p.route.experts) {
            acc = zc_accumulate<T>(p, t, s, id, w, c, acc);
        } else if (id != -1 && c == 0) {
            atomicAdd(p.status, 1);  // not an id the routing gives: counted once per slot
        }
    }
    if (S > K) {
        const float gate = p.shared_gate != nullptr ? 1.f / (1.f + expf(-p.shared_gate_logit[t])) : 1.f;
        acc = fmaf(gate, part[int64_t(K) * H], acc);
    }
    if (p.residual != nullptr) acc += Float<T>::to_f32(static_cast<const T*>(p.residual)[t * H + c]);
    static_cast<T*>(p.y)[t * H + c] = Float<T>::from_f32(acc);
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
// Two blocks per SM: the gate and up rows' two chunks in flight per lane need about 120
// registers; the e1024 routing prologue needs more still and takes one.
#define MOE_DECODE_UP2(NAME, T, TL, VPT, MINB) \
    extern "C" __global__ void __launch_bounds__(moe::kDecodeThreads, MINB) NAME(const moe::DecodeParams p) { \
        moe::decode_gate_up_v2<T, TL, VPT>(p); \
    }
#define MOE_DECODE_UP2_ALL(SUFFIX, T, TL) \
    MOE_DECODE_UP2(decode_gate_up_v2_##SUFFIX##_e32, T, TL, 1, 2) \
    MOE_DECODE_UP2(decode_gate_up_v2_##SUFFIX##_e64, T, TL, 2, 2) \
    MOE_DECODE_UP2(decode_gate_up_v2_##SUFFIX##_e128, T, TL, 4, 2) \
    MOE_DECODE_UP2(decode_gate_up_v2_##SUFFIX##_e256, T, TL, 8, 2) \
    MOE_DECODE_UP2(decode_gate_up_v2_##SUFFIX##_e512, T, TL, 16, 2) \
    MOE_DECODE_UP2(decode_gate_up_v2_##SUFFIX##_e1024, T, TL, 32, 1)
MOE_DECODE_UP2_ALL(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
MOE_DECODE_UP2_ALL(bf16_f32, __nv_bfloat16, float)
MOE_DECODE_UP2_ALL(f16_f16, __half, __half)
MOE_DECODE_UP2_ALL(f16_f32, __half, float)
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

// Two blocks per SM (128 registers): ptxas spills 20 bytes on sm_80 at that cap (none on
// sm_90, the target of the figures); kept for the second block's loads in flight, not measured.
#define MOE_DECODE_DOWN2(SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(moe::kDecodeThreads, 2) decode_down_v2_##SUFFIX(const moe::DecodeParams p) { \
        moe::decode_down_v2<T>(p); \
    }
MOE_DECODE_DOWN2(bf16, __nv_bfloat16)
MOE_DECODE_DOWN2(f16, __half)

// decode_{gate_up,down}_v3_{kind}_{t}: one instance per decoder (plain weights, or a packed
// projection whose routed experts all have one fast_kind). Two blocks per SM where ptxas fits the
// instance in 128 registers without spilling (the by-expert kernels are bound by the loads in
// flight: one block of 8 warps per SM leaves half of them unissued); one where it does not: the
// packed gate/up instances (two rows' decoded chunks for eight tokens) and MXFP4's down. A
// projection of mixed kinds, or of experts only the per-8 decoder takes, runs v2.
#define MOE_DECODE_V3_ONE(NAME, T, DOWN, KIND, MINB) \
    extern "C" __global__ void __launch_bounds__(moe::kDecodeThreads, MINB) NAME(const moe::DecodeParams p) { \
        moe::decode_by_expert<T, DOWN, KIND>(p); \
    }
#define MOE_DECODE_V3_KIND(KNAME, SUFFIX, T, KIND, UP_MINB, DOWN_MINB) \
    MOE_DECODE_V3_ONE(decode_gate_up_v3_##KNAME##_##SUFFIX, T, false, KIND, UP_MINB) \
    MOE_DECODE_V3_ONE(decode_down_v3_##KNAME##_##SUFFIX, T, true, KIND, DOWN_MINB)
// decode_{gate_up,down}_v5_{kind}_{t}: the by-expert GEMVs on tensor cores, plain, int4 (groups
// of a multiple of 128), int4s (groups of 32, 64), MXFP4 or FP8 (two blocks per SM).
#define MOE_DECODE_V5_ONE(NAME, T, DOWN, KIND) \
    extern "C" __global__ void __launch_bounds__(moe::kDecodeThreads, 2) NAME(const moe::DecodeParams p) { \
        moe::decode_by_expert_mma<T, DOWN, KIND>(p); \
    }
#define MOE_DECODE_V5_KIND(KNAME, SUFFIX, T, KIND) \
    MOE_DECODE_V5_ONE(decode_gate_up_v5_##KNAME##_##SUFFIX, T, false, KIND) \
    MOE_DECODE_V5_ONE(decode_down_v5_##KNAME##_##SUFFIX, T, true, KIND)
#define MOE_DECODE_V3(SUFFIX, T) \
    MOE_DECODE_V3_KIND(plain, SUFFIX, T, moe::kFastPlain, 2, 2) \
    MOE_DECODE_V3_KIND(int4, SUFFIX, T, moe::kFastInt4, 1, 2) \
    MOE_DECODE_V3_KIND(int8, SUFFIX, T, moe::kFastInt8, 1, 2) \
    MOE_DECODE_V3_KIND(mxfp4, SUFFIX, T, moe::kFastMxfp4, 1, 1) \
    MOE_DECODE_V3_KIND(fp8, SUFFIX, T, moe::kFastFp8, 1, 2) \
    extern "C" __global__ void __launch_bounds__(256) decode_combine_##SUFFIX(const moe::DecodeParams p) { \
        moe::decode_combine<T>(p); \
    } \
    MOE_DECODE_V5_KIND(plain, SUFFIX, T, moe::kFastPlain) \
    MOE_DECODE_V5_KIND(int4, SUFFIX, T, moe::kFastInt4) \
    MOE_DECODE_V5_KIND(int4s, SUFFIX, T, moe::kMmaInt4Small) \
    MOE_DECODE_V5_KIND(mxfp4, SUFFIX, T, moe::kFastMxfp4) \
    MOE_DECODE_V5_KIND(fp8, SUFFIX, T, moe::kFastFp8)
MOE_DECODE_V3(bf16, __nv_bfloat16)
MOE_DECODE_V3(f16, __half)
