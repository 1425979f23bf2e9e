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
// History
//   v1: one warp per token, K rounds of a warp arg-max over register-resident keys; the group
//       stage keeps one group score per lane. Loads are 2- or 4-byte and coalesced per warp.

#include "dtype.cuh"
#include "params.cuh"
#include "reduce.cuh"

namespace moe {

constexpr int kRouteWarps = 4;  // tokens per block

// A candidate in an arg-max: higher key wins, then the lower index. idx = INT_MAX is "none".
struct Cand {
    float key;
    int idx;
    __device__ __forceinline__ bool beats(const Cand& o) const {
        return key > o.key || (key == o.key && idx < o.idx);
    }
};

__device__ __forceinline__ Cand warp_argmax(Cand c) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        Cand o{__shfl_xor_sync(kFullMask, c.key, off), __shfl_xor_sync(kFullMask, c.idx, off)};
        if (o.beats(c)) c = o;
    }
    return c;
}

__device__ __forceinline__ float warp_sum(float v) {
    return warp_reduce(v, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ float warp_max(float v) {
    return warp_reduce(v, [](float a, float b) { return fmaxf(a, b); });
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T, int VPT>
__device__ __forceinline__ void route_v1(const RouteParams& p) {
    static_assert(VPT >= 1 && VPT <= 32, "avail is a 32-bit mask");
    const int lane = threadIdx.x & 31;
    const int64_t token = int64_t(blockIdx.x) * kRouteWarps + (threadIdx.x >> 5);
    if (token >= p.tokens) return;  // whole warps leave together; no block barrier follows
    const int E = p.experts;
    const T* row = static_cast<const T*>(p.logits) + token * E;

    float raw[VPT];    // logits with NaN -> -inf, before the softcap: the rank of the logit rules
    float score[VPT];  // what weights come from
    float key[VPT];    // what selection ranks
    uint32_t avail = 0;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int e = lane + 32 * j;
        float v = -INFINITY;
        if (e < E) {
            v = Float<T>::to_f32(row[e]);
            if (isnan(v)) v = -INFINITY;
            avail |= 1u << j;
        }
        raw[j] = v;
        score[j] = p.softcap > 0.f ? p.softcap * tanhf(v / p.softcap) : v;
    }

    const int rule = p.rule;
    if (rule == kSoftmaxTopK || rule == kSoftmaxGroupTopK || rule == kTopP) {
        float m = -INFINITY;
#pragma unroll
        for (int j = 0; j < VPT; ++j) m = fmaxf(m, score[j]);
        m = warp_max(m);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            score[j] = (avail >> j & 1) ? expf(score[j] - m) : 0.f;
            s += score[j];
        }
        s = warp_sum(s);
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            score[j] /= s;
            key[j] = raw[j];
        }
    } else if (rule == kSigmoidGroupTopK) {
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int e = lane + 32 * j;
            score[j] = sigmoidf(score[j]);
            const float k = (avail >> j & 1) ? score[j] + p.bias[e] : -INFINITY;
            key[j] = isnan(k) ? -INFINITY : k;  // a NaN bias ranks last
        }
    } else {  // kTopKSoftmax, kTopKSigmoid: rank the logits, weights from the (capped) logits
#pragma unroll
        for (int j = 0; j < VPT; ++j) key[j] = raw[j];
    }

    if (rule == kSigmoidGroupTopK || rule == kSoftmaxGroupTopK) {
        const int gsize = E / p.n_group;
        float my_group_score = -INFINITY;  // lane g keeps group g's score
        for (int g = 0; g < p.n_group; ++g) {
            // This lane's best two keys in group g, then the warp's.
            Cand a{-INFINITY, INT_MAX}, b{-INFINITY, INT_MAX};
#pragma unroll
            for (int j = 0; j < VPT; ++j) {
                const int e = lane + 32 * j;
                if ((avail >> j & 1) && e / gsize == g) {
                    const Cand c{key[j], e};
                    if (c.beats(a)) { b = a; a = c; } else if (c.beats(b)) { b = c; }
                }
            }
            const Cand first = warp_argmax(a);
            float gs = first.key;
            if (rule == kSigmoidGroupTopK) {
                // The runner-up is the best of everything but the winner: the winner's lane
                // offers its second, every other lane its first.
                const Cand second = warp_argmax(a.idx == first.idx ? b : a);
                gs += second.key;
            }
            if (lane == g) my_group_score = isnan(gs) ? -INFINITY : gs;  // -inf + inf
        }
        uint32_t keep = 0;  // bit g: group g kept
        for (int i = 0; i < p.topk_group; ++i) {
            const Cand c{lane < p.n_group && !(keep >> lane & 1) ? my_group_score : -INFINITY,
                         lane < p.n_group && !(keep >> lane & 1) ? lane : INT_MAX};
            const Cand best = warp_argmax(c);
            if (best.idx != INT_MAX) keep |= 1u << best.idx;
        }
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const int e = lane + 32 * j;
            if ((avail >> j & 1) && !(keep >> (e / gsize) & 1)) avail &= ~(1u << j);
        }
    }

    // K rounds of arg-max; lane i keeps the i-th choice.
    int my_id = -1;
    float my_score = 0.f;
    int chosen = 0;
    float cum = 0.f;
    for (int i = 0; i < p.k; ++i) {
        Cand c{-INFINITY, INT_MAX};
        float c_score = 0.f;
#pragma unroll
        for (int j = 0; j < VPT; ++j) {
            const Cand o{key[j], lane + 32 * j};
            if ((avail >> j & 1) && o.beats(c)) { c = o; c_score = score[j]; }
        }
        const Cand best = warp_argmax(c);
        if (best.idx == INT_MAX) break;  // fewer candidates than k: refused on the host
        const int owner = best.idx & 31;
        const float best_score = __shfl_sync(kFullMask, c_score, owner);
        if (lane == owner) avail &= ~(1u << (best.idx >> 5));
        if (lane == i) { my_id = best.idx; my_score = best_score; }
        ++chosen;
        if (rule == kTopP) {
            cum += best_score;
            if (cum >= p.top_p) break;
        }
    }

    const bool active = lane < chosen;
    float w = 0.f;
    if (rule == kTopKSoftmax) {
        const float m = warp_max(active ? my_score : -INFINITY);
        const float e = active ? expf(my_score - m) : 0.f;
        w = e / warp_sum(e);
    } else if (rule == kTopKSigmoid) {
        w = sigmoidf(my_score);
    } else {
        w = my_score;
    }
    if (p.renormalize) {
        const float eps = rule == kSigmoidGroupTopK ? 1e-20f : 0.f;
        w = w / (warp_sum(active ? w : 0.f) + eps);
    }
    w *= p.scale;

    if (lane < p.k) {
        p.ids[token * p.k + lane] = active ? my_id : -1;
        p.weights[token * p.k + lane] = active ? w : 0.f;
        if (active && p.counts != nullptr) atomicAdd(&p.counts[my_id], 1);
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
