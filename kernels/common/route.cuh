// The routing rules for one token, run by one warp: the body of route_v1 (kernels/routing.cu),
// shared with every kernel that routes in its prologue (kernels/decode.cu), so that both choose
// the same experts with the same weights, bit for bit. The rules are documented in routing.cu.
#pragma once

#include <limits.h>
#include <math.h>

#include "dtype.cuh"
#include "params.cuh"
#include "reduce.cuh"

namespace moe {

// Lane i's share of a token's routing: its i-th choice (id -1 and weight 0 past the chosen).
struct RouteChoice {
    int id;
    float weight;
};

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

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// Token `token`'s mask index: -1 for none (no masks, or the token asks for none), m in [0, M),
// or -2 for an index outside [-1, M), which removes every expert (the callers count it once per
// token in p.status).
__device__ __forceinline__ int route_mask_of(const RouteParams& p, int64_t token) {
    if (p.masks == nullptr) return -1;
    const int m = p.mask_index != nullptr ? p.mask_index[token] : 0;
    return m >= -1 && m < p.mask_count ? m : -2;
}

// Counts a bad mask index of `token` in p.status; one thread per token calls it.
__device__ __forceinline__ void route_count_mask(const RouteParams& p, int64_t token) {
    if (p.status != nullptr && route_mask_of(p, token) == -2) atomicAdd(&p.status[kMaskIndexBad], 1);
}

template <typename T, int VPT>
__device__ __forceinline__ RouteChoice route_token(const RouteParams& p, int64_t token) {
    static_assert(VPT >= 1 && VPT <= 32, "avail is a 32-bit mask");
    const int lane = threadIdx.x & 31;
    const int E = p.experts;
    const T* row = static_cast<const T*>(p.logits) + token * E;
    // Lane l holds experts l + 32 j: bit l of mask word j. A removed expert is never a
    // candidate, and its logit counts as absent (-inf) in every sum and maximum.
    const int mask = route_mask_of(p, token);
    const uint32_t* mrow = mask >= 0 ? p.masks + int64_t(mask) * p.mask_words : nullptr;

    float raw[VPT];    // logits with NaN -> -inf, before the softcap: the rank of the logit rules
    float score[VPT];  // what weights come from
    float key[VPT];    // what selection ranks
    uint32_t avail = 0;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
        const int e = lane + 32 * j;
        float v = -INFINITY;
        const bool removed = mask == -2 || (mrow != nullptr && e < E && (mrow[j] >> lane & 1u));
        if (e < E && !removed) {
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
        if (best.idx == INT_MAX) break;  // fewer candidates than k: masks removed the rest
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
    return RouteChoice{active ? my_id : -1, active ? w : 0.f};
}


}  // namespace moe
