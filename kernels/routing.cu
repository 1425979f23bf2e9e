// Routing family: gating logits [T, E] -> top-k expert ids [T, K] (i32) and weights [T, K] (f32).
//
// route_{f32,bf16,f16}_e{32,64,128,256,512,1024}(RouteParams p)
//   One warp per token; the suffix is the largest E the instance holds (E <= 32 * VPT values per
//   lane, lane l holding experts l, l + 32, ...). The rules, as src/routing/config.rs documents:
//     kSoftmaxTopK       p = softmax(l) over E; top-k of p; optional w /= sum(w)
//     kTopKSoftmax       top-k of l; w = softmax over the k chosen logits
//     kTopKSigmoid       top-k of l; w = sigmoid(l)
//     kSigmoidGroupTopK  s = sigmoid(l), key = s + bias; groups by top-2 key sum; w = s, renorm +1e-20
//     kSoftmaxGroupTopK  p = softmax(l); groups by max p; w = p
//     kTopP              p = softmax(l); descending p until the sum reaches top_p, at most k
//   then w *= scale. Every computation is f32.
//   Selection ranks the raw logit wherever the key is a strictly increasing function of it
//   (softmax, softcap), so ties are exact and break toward the lower expert index. NaN logits
//   count as -inf (before the softcap), as do NaN keys and group scores (a NaN bias, -inf + inf).
//   Ids are always in [0, E) or -1.
//
//   Expert masks (RouteParams.masks): a token's mask removes experts before any of this, so the
//   rule runs on the experts that remain, exactly; a token left with fewer than k gets -1 slots
//   with weight 0. A mask index outside [-1, M) removes every expert and is counted in status.
//
// route_given(RouteGivenParams p)
//   Routing the caller computed, checked and copied: slots with ids outside [-1, E_total),
//   repeated within a row, or with a NaN or infinite weight become id -1, weight 0 and are
//   counted in status; the layer turns the counts into an Err.
//
// route_capacity(CapacityParams p)
//   Capacity factor with token dropping (Switch Transformer, GShard): slot (t, k) keeps expert e
//   while fewer than C earlier slots, in flat order t * K + k, chose e; later ones get id -1 and
//   weight 0, and dropped_ids records the expert they wanted. One block per expert scans the
//   ids with warp ballots, so the result is deterministic.
//
// router_lse_{dtype}, router_prob_mean_{dtype}(RouterStatsParams p)
//   The statistics training code monitors: lse[t] = log sum_e exp(l[t, e]); mean_prob[e] =
//   mean_t exp(l[t, e] - lse[t]); fraction[e] = counts[e] / T (sums to K); z_loss =
//   mean_t lse[t]^2. Fixed summation order, no float atomics.
//
// router_logits_{x}_{w}(RouterLogitsParams p)
//   The router projection out[t, e] = x[t, :] . w[e, :] (+ bias[e]), f32 accumulation, rounded
//   once to w's dtype (bf16 logits for Mixtral-style routers, f32 for DeepSeek's fp32 router).
//   One warp per (token, expert), 16-byte loads when rows allow.
// router_logits_v2_{x}_{w}(RouterLogitsParams p)
//   The same, one block of 8 warps per (token, expert) splitting H, the warps' sums added in a
//   fixed order (at small T it spreads over E blocks instead of E / 8).
// router_logits_v3_{x}_{w}(RouterLogitsParams p)
//   The same bits as v2, one block per tile of 8 tokens x 8 experts, so w is read T / 8 times
//   instead of T times (the layer's choice above small T).
//
// History
//   v1: one warp per token, K rounds of a warp arg-max over register-resident keys; the group
//       stage keeps one group score per lane. Loads are 2- or 4-byte and coalesced per warp.

#include "dtype.cuh"
#include "params.cuh"
#include "reduce.cuh"
#include "route.cuh"

namespace moe {

constexpr int kRouteWarps = 4;  // tokens per block

template <typename T, int VPT>
__device__ __forceinline__ void route_v1(const RouteParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t token = int64_t(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
    if (token >= p.tokens) return;  // whole warps leave together; no block barrier follows
    const RouteChoice c = route_token<T, VPT>(p, token);
    if (lane == 0) route_count_mask(p, token);
    if (lane < p.k) {
        p.ids[token * p.k + lane] = c.id;
        p.weights[token * p.k + lane] = c.weight;
        if (c.id >= 0 && p.counts != nullptr) atomicAdd(&p.counts[c.id], 1);
    }
}

}  // namespace moe

// minBlocks = 1 leaves ptxas the whole register file (up to 255 per thread): with the default
// heuristics the e512 instances spilled on sm_80.
#define MOE_ROUTE(NAME, T, VPT) \
    extern "C" __global__ void __launch_bounds__(32 * moe::kRouteWarps, 1) NAME(const moe::RouteParams p) { \
        moe::route_v1<T, VPT>(p); \
    }
#define MOE_ROUTE_ALL(SUFFIX, T) \
    MOE_ROUTE(route_##SUFFIX##_e32, T, 1) \
    MOE_ROUTE(route_##SUFFIX##_e64, T, 2) \
    MOE_ROUTE(route_##SUFFIX##_e128, T, 4) \
    MOE_ROUTE(route_##SUFFIX##_e256, T, 8) \
    MOE_ROUTE(route_##SUFFIX##_e512, T, 16) \
    MOE_ROUTE(route_##SUFFIX##_e1024, T, 32)

MOE_ROUTE_ALL(f32, float)
MOE_ROUTE_ALL(bf16, __nv_bfloat16)
MOE_ROUTE_ALL(f16, __half)

namespace moe {

constexpr int kCapacityThreads = 256;

__device__ __forceinline__ void route_capacity_v1(const CapacityParams& p) {
    __shared__ int warp_counts[kCapacityThreads / 32];
    const int e = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    int running = 0;  // slots of expert e in earlier chunks; the same in every thread
    for (int64_t base = 0; base < p.slots; base += kCapacityThreads) {
        const int64_t i = base + threadIdx.x;
        const int id = i < p.slots ? p.ids[i] : -1;
        const bool mine = id == e;
        const unsigned ballot = __ballot_sync(kFullMask, mine);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int before = running + __popc(ballot & ((1u << lane) - 1u));
        int total = 0;
#pragma unroll
        for (int w = 0; w < kCapacityThreads / 32; ++w) {
            before += w < warp ? warp_counts[w] : 0;
            total += warp_counts[w];
        }
        if (mine) {
            const bool keep = before < p.capacity;
            p.ids_out[i] = keep ? e : -1;
            p.weights_out[i] = keep ? p.weights[i] : 0.f;
            if (!keep) p.dropped_ids[i] = e;
        } else if (e == 0 && i < p.slots && (id < 0 || id >= p.experts)) {
            // No expert block owns this slot (-1, or an id the caller will be told about
            // elsewhere): block 0 passes it through.
            p.ids_out[i] = id;
            p.weights_out[i] = p.weights[i];
        }
        running += total;
        __syncthreads();  // warp_counts is rewritten by the next chunk
    }
}

// Caller-given routing, checked (RouteGivenParams in params.cuh): lane k < K of warp w handles
// slot k of token 4b + w. A repeat is a valid id that an earlier slot of the row also holds.
__device__ __forceinline__ void route_given_v1(const RouteGivenParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t token = int64_t(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
    if (token >= p.tokens) return;  // whole warps leave together
    const int64_t i = token * p.k + lane;
    const bool live = lane < p.k;
    int id = live ? p.ids_in[i] : -1;
    const float w = live ? p.weights_in[i] : 0.f;
    const bool in_range = id >= -1 && id < p.experts;
    if (!in_range) id = -1;
    bool repeat = false;
    for (int j = 0; j < p.k; ++j) {
        const int other = __shfl_sync(kFullMask, id, j);
        repeat |= j < lane && id >= 0 && other == id;
    }
    const bool weight_ok = id < 0 || isfinite(w);
    if (live) {
        if (!in_range) atomicAdd(&p.status[kGivenIdOutOfRange], 1);
        if (repeat) atomicAdd(&p.status[kGivenIdRepeated], 1);
        if (!weight_ok && !repeat) atomicAdd(&p.status[kGivenWeightBad], 1);
        const bool keep = id >= 0 && !repeat && weight_ok;
        p.ids[i] = keep ? id : -1;
        p.weights[i] = keep ? w : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ void router_lse_v1(const RouterStatsParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t token = int64_t(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
    if (token >= p.tokens) return;
    const T* row = static_cast<const T*>(p.logits) + token * p.experts;
    OnlineSoftmax st;
    for (int e = lane; e < p.experts; e += 32) st.add(Float<T>::to_f32(row[e]));
    warp_merge(st);
    // An all -inf row: st.s = 0 and lse = -inf + log(0) = -inf, as torch.logsumexp.
    if (lane == 0) p.lse[token] = st.m + logf(st.s);
}

constexpr int kStatsWarps = 8;

template <typename T>
__device__ __forceinline__ void router_prob_mean_v1(const RouterStatsParams& p) {
    __shared__ float part[kStatsWarps][32];
    __shared__ float zpart[kStatsWarps * 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int e = blockIdx.x * 32 + lane;
    const T* logits = static_cast<const T*>(p.logits);
    float acc = 0.f;
    if (e < p.experts) {
        for (int64_t t = warp; t < p.tokens; t += kStatsWarps)
            acc += expf(Float<T>::to_f32(logits[t * p.experts + e]) - p.lse[t]);
    }
    part[warp][lane] = acc;
    float z = 0.f;
    if (blockIdx.x == 0) {
        for (int64_t t = threadIdx.x; t < p.tokens; t += kStatsWarps * 32) z += p.lse[t] * p.lse[t];
    }
    zpart[threadIdx.x] = z;
    __syncthreads();
    if (warp == 0 && e < p.experts) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kStatsWarps; ++w) s += part[w][lane];
        p.mean_prob[e] = s / float(p.tokens);
        p.fraction[e] = float(p.counts[e]) / float(p.tokens);
    }
    if (blockIdx.x == 0) {
        for (int stride = kStatsWarps * 16; stride > 0; stride >>= 1) {
            if (threadIdx.x < stride) zpart[threadIdx.x] += zpart[threadIdx.x + stride];
            __syncthreads();
        }
        if (threadIdx.x == 0) p.z_loss[0] = zpart[0] / float(p.tokens);
    }
}

constexpr int kLogitsWarps = 8;

// Thread i of n's share of x[t] . w[e]: elements 8i .. 8i + 8 in strides of 8n (vector loads),
// or element i in strides of n, in order, f32.
template <typename TX, typename TW>
__device__ __forceinline__ float router_dot_part(const RouterLogitsParams& p, int64_t t, int e, int i, int n) {
    const TX* x = static_cast<const TX*>(p.x) + t * p.hidden;
    const TW* w = static_cast<const TW*>(p.w) + int64_t(e) * p.hidden;
    float acc = 0.f;
    if (p.vec) {
        for (int c = i * 8; c < p.hidden; c += n * 8) {
            float a[8], b[8];
            load8(x + c, a);
            load8(w + c, b);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc = fmaf(a[j], b[j], acc);
        }
    } else {
        for (int c = i; c < p.hidden; c += n) acc = fmaf(Float<TX>::to_f32(x[c]), Float<TW>::to_f32(w[c]), acc);
    }
    return acc;
}

template <typename TX, typename TW>
__device__ __forceinline__ void router_logits_v1(const RouterLogitsParams& p) {
    const int lane = threadIdx.x & 31;
    const int64_t pair = int64_t(blockIdx.x) * kLogitsWarps + (threadIdx.x >> 5);
    if (pair >= int64_t(p.tokens) * p.experts) return;
    const int64_t t = pair / p.experts;
    const int e = int(pair % p.experts);
    float acc = router_dot_part<TX, TW>(p, t, e, lane, 32);
    acc = warp_sum(acc);
    if (lane == 0) {
        if (p.bias != nullptr) acc += Float<TW>::to_f32(static_cast<const TW*>(p.bias)[e]);
        static_cast<TW*>(p.out)[t * p.experts + e] = Float<TW>::from_f32(acc);
    }
}

// v2: block b computes pair b (row t = b / E of x against row e = b % E of w), its kLogitsWarps
// warps splitting H: thread i sums columns 8i .. 8i + 8 in strides of 8 * blockDim (vector) or
// column i in strides of blockDim, each warp reduces its lanes, and thread 0 adds the warps' sums
// in warp order. The order does not depend on T, so a token's logits are the same bits in every
// batch and on every path; at T = 1 the E pairs spread over E blocks (SMs), not E / 8.
template <typename TX, typename TW>
__device__ __forceinline__ void router_logits_v2(const RouterLogitsParams& p) {
    __shared__ float s_part[kLogitsWarps];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t t = blockIdx.x / p.experts;
    const int e = int(blockIdx.x % p.experts);
    float acc = router_dot_part<TX, TW>(p, t, e, threadIdx.x, kLogitsWarps * 32);
    acc = warp_sum(acc);
    if (lane == 0) s_part[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kLogitsWarps; ++i) sum += s_part[i];
        if (p.bias != nullptr) sum += Float<TW>::to_f32(static_cast<const TW*>(p.bias)[e]);
        static_cast<TW*>(p.out)[t * p.experts + e] = Float<TW>::from_f32(sum);
    }
}

// v3, tiled: block b computes a tile of kLogitsTileT tokens x kLogitsTileE experts (experts
// fastest over b, so the blocks in flight share their tokens' rows), reading each row of x and of
// w once per tile instead of once per pair: the router weight is read T / 8 times, not T times.
// Thread i keeps, for every pair of the tile, exactly v2's partial sum (the same columns in the
// same order), so a token's logits are the same bits as v2's and v3 may serve any T. The warp's
// 64 partials per lane are reduced by halving exchanges (each step a lane keeps half of its
// values and adds its partner's copy of that half): the same pairwise tree as warp_sum, since
// a + b and b + a are the same float, in 62 shuffles instead of 320. Lane l ends with pairs 2l
// and 2l + 1 (bit b of l chose the upper half at offset 2^b, worth 2^(b+1) pairs); thread o < 64
// then adds the warps' sums in warp order, as v2 does.
constexpr int kLogitsTileT = 8, kLogitsTileE = 8;
constexpr int kLogitsTile = kLogitsTileT * kLogitsTileE;
static_assert(kLogitsTile == 64, "the halving reduction below leaves 2 pairs per lane");

// One step of the halving exchange over the first N values: the lane keeps the upper half if
// (lane & S), else the lower, and adds the partner's copy of the half it keeps.
template <int S, int N>
__device__ __forceinline__ void halve_exchange(float (&acc)[kLogitsTile], int lane) {
    const bool upper = (lane & S) != 0;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const float keep = upper ? acc[i + N / 2] : acc[i];
        const float send = upper ? acc[i] : acc[i + N / 2];
        acc[i] = keep + __shfl_xor_sync(kFullMask, send, S);
    }
}

// V elements of a row from ptr, as f32: one 16-byte load for V = 8, else scalar loads.
template <int V, typename T>
__device__ __forceinline__ void load_run(const T* ptr, float (&out)[V]) {
    if constexpr (V == 8) {
        load8(ptr, out);
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = Float<T>::to_f32(ptr[j]);
    }
}

// Thread i's partial sums of the tile, v2's columns in v2's order: runs of V columns from V i in
// strides of V * blockDim (V = 8 where 16-byte loads hold, else 1). Rows past nt and ne are not
// loaded and leave their partials at 0.
template <int V, typename TX, typename TW>
__device__ __forceinline__ void router_tile_dot(const RouterLogitsParams& p, const TX* x, const TW* w, int nt, int ne,
                                                float (&acc)[kLogitsTile]) {
    for (int c = threadIdx.x * V; c < p.hidden; c += kLogitsWarps * 32 * V) {
        float b[kLogitsTileE][V];
#pragma unroll
        for (int ee = 0; ee < kLogitsTileE; ++ee) {
            if (ee < ne) {
                load_run<V>(w + int64_t(ee) * p.hidden + c, b[ee]);
            } else {
#pragma unroll
                for (int j = 0; j < V; ++j) b[ee][j] = 0.f;
            }
        }
#pragma unroll
        for (int tt = 0; tt < kLogitsTileT; ++tt) {
            if (tt < nt) {
                float a[V];
                load_run<V>(x + int64_t(tt) * p.hidden + c, a);
#pragma unroll
                for (int ee = 0; ee < kLogitsTileE; ++ee)
#pragma unroll
                    for (int j = 0; j < V; ++j)
                        acc[tt * kLogitsTileE + ee] = fmaf(a[j], b[ee][j], acc[tt * kLogitsTileE + ee]);
            }
        }
    }
}

template <typename TX, typename TW>
__device__ __forceinline__ void router_logits_v3(const RouterLogitsParams& p) {
    __shared__ float s_part[kLogitsWarps][kLogitsTile];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int etiles = (p.experts + kLogitsTileE - 1) / kLogitsTileE;
    const int64_t t0 = int64_t(blockIdx.x / etiles) * kLogitsTileT;
    const int e0 = int(blockIdx.x % etiles) * kLogitsTileE;
    // Rows past T or E are never loaded (router_tile_dot) nor stored.
    const int nt = int(min(int64_t(kLogitsTileT), int64_t(p.tokens) - t0));
    const int ne = min(kLogitsTileE, p.experts - e0);
    const TX* x = static_cast<const TX*>(p.x) + t0 * p.hidden;
    const TW* w = static_cast<const TW*>(p.w) + int64_t(e0) * p.hidden;
    float acc[kLogitsTile];
#pragma unroll
    for (int o = 0; o < kLogitsTile; ++o) acc[o] = 0.f;
    if (p.vec) {
        router_tile_dot<8>(p, x, w, nt, ne, acc);
    } else {
        router_tile_dot<1>(p, x, w, nt, ne, acc);
    }
    // Spelled out step by step: as one loop, nvcc kept acc in local memory.
    halve_exchange<16, 64>(acc, lane);
    halve_exchange<8, 32>(acc, lane);
    halve_exchange<4, 16>(acc, lane);
    halve_exchange<2, 8>(acc, lane);
    halve_exchange<1, 4>(acc, lane);
    s_part[warp][2 * lane] = acc[0];
    s_part[warp][2 * lane + 1] = acc[1];
    __syncthreads();
    const int o = threadIdx.x;
    if (o < kLogitsTile) {
        const int tt = o / kLogitsTileE, ee = o % kLogitsTileE;
        if (tt < nt && ee < ne) {
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < kLogitsWarps; ++i) sum += s_part[i][o];
            if (p.bias != nullptr) sum += Float<TW>::to_f32(static_cast<const TW*>(p.bias)[e0 + ee]);
            static_cast<TW*>(p.out)[(t0 + tt) * p.experts + e0 + ee] = Float<TW>::from_f32(sum);
        }
    }
}

}  // namespace moe

extern "C" __global__ void __launch_bounds__(32 * moe::kRouteWarps) route_given(const moe::RouteGivenParams p) {
    moe::route_given_v1(p);
}

extern "C" __global__ void __launch_bounds__(moe::kCapacityThreads) route_capacity(const moe::CapacityParams p) {
    moe::route_capacity_v1(p);
}

#define MOE_STATS(SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(32 * moe::kRouteWarps) router_lse_##SUFFIX(const moe::RouterStatsParams p) { \
        moe::router_lse_v1<T>(p); \
    } \
    extern "C" __global__ void __launch_bounds__(32 * moe::kStatsWarps) router_prob_mean_##SUFFIX(const moe::RouterStatsParams p) { \
        moe::router_prob_mean_v1<T>(p); \
    }
MOE_STATS(f32, float)
MOE_STATS(bf16, __nv_bfloat16)
MOE_STATS(f16, __half)

#define MOE_ROUTER_LOGITS(SX, SW, TX, TW) \
    extern "C" __global__ void __launch_bounds__(32 * moe::kLogitsWarps) router_logits_##SX##_##SW(const moe::RouterLogitsParams p) { \
        moe::router_logits_v1<TX, TW>(p); \
    } \
    extern "C" __global__ void __launch_bounds__(32 * moe::kLogitsWarps) router_logits_v2_##SX##_##SW(const moe::RouterLogitsParams p) { \
        moe::router_logits_v2<TX, TW>(p); \
    } \
    extern "C" __global__ void __launch_bounds__(32 * moe::kLogitsWarps) router_logits_v3_##SX##_##SW(const moe::RouterLogitsParams p) { \
        moe::router_logits_v3<TX, TW>(p); \
    }
MOE_ROUTER_LOGITS(f32, f32, float, float)
MOE_ROUTER_LOGITS(bf16, bf16, __nv_bfloat16, __nv_bfloat16)
MOE_ROUTER_LOGITS(f16, f16, __half, __half)
MOE_ROUTER_LOGITS(bf16, f32, __nv_bfloat16, float)
MOE_ROUTER_LOGITS(f16, f32, __half, float)
