// Kernel parameter structs, one per op. Each kernel takes its struct by value as its single
// argument. src/params.rs mirrors every struct with #[repr(C)]; the sizes and offsets below are
// asserted on both sides, so host and device can never disagree.
//
// Pointers are typed `void*` and cast by the kernel template to the dtype its name carries.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace moe {

// Row softmax: out[r, c] = exp(in[r, c] - max_r) / sum_c' exp(in[r, c'] - max_r).
struct SoftmaxParams {
    void* out;           // [rows, cols], row stride out_stride elements
    const void* in;      // [rows, cols], row stride in_stride elements
    int64_t out_stride;  // elements between rows of out
    int64_t in_stride;   // elements between rows of in
    int32_t rows;        // = gridDim.x
    int32_t cols;        // >= 1
    int32_t vec;         // 1: scalar access; 16 / sizeof(T): both rows are 16-byte aligned
    int32_t pad_;
};
static_assert(sizeof(SoftmaxParams) == 48, "mirror in src/params.rs");
static_assert(offsetof(SoftmaxParams, out_stride) == 16, "mirror in src/params.rs");
static_assert(offsetof(SoftmaxParams, rows) == 32, "mirror in src/params.rs");
static_assert(offsetof(SoftmaxParams, vec) == 40, "mirror in src/params.rs");


// Fused top-k routing of one token per warp. See kernels/routing.cu for the rules.
struct RouteParams {
    int32_t* ids;          // [T, K] expert ids, descending key; -1 in unused top-p slots
    float* weights;        // [T, K]
    int32_t* counts;       // [E] tokens per expert, accumulated (zeroed by the host); may be null
    const void* logits;    // [T, E] in the kernel's dtype
    const float* bias;     // [E] selection bias of the grouped sigmoid rule; null otherwise
    int32_t tokens;        // T
    int32_t experts;       // E, <= 32 * the kernel's values per lane
    int32_t k;             // K <= 32 (the maximum for top-p)
    int32_t rule;          // RouteRule
    int32_t n_group;       // groups for the grouped rules (<= 32), else 1
    int32_t topk_group;    // groups kept
    int32_t renormalize;   // 0 or 1
    float scale;           // multiplies every weight last
    float softcap;         // > 0: l = softcap * tanh(l / softcap); 0: off
    float top_p;           // the top-p rule's threshold
};
static_assert(sizeof(RouteParams) == 80, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, tokens) == 40, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, scale) == 68, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, top_p) == 76, "mirror in src/params.rs");

enum RouteRule : int32_t {
    kSoftmaxTopK = 0,
    kTopKSoftmax = 1,
    kTopKSigmoid = 2,
    kSigmoidGroupTopK = 3,
    kSoftmaxGroupTopK = 4,
    kTopP = 5,
};

// Capacity limit: slot (t, k) keeps its expert e when fewer than `capacity` earlier slots (in
// flat token-major order) chose e; otherwise it is dropped. One block per expert.
struct CapacityParams {
    int32_t* ids_out;          // [T*K]
    float* weights_out;        // [T*K]
    int32_t* dropped_ids;      // [T*K] the expert a dropped slot wanted, -1 elsewhere (host sets -1)
    const int32_t* ids;        // [T*K]
    const float* weights;      // [T*K]
    int32_t slots;             // T*K
    int32_t experts;           // E = gridDim.x
    int32_t capacity;          // C >= 0
    int32_t pad_;
};
static_assert(sizeof(CapacityParams) == 56, "mirror in src/params.rs");
static_assert(offsetof(CapacityParams, slots) == 40, "mirror in src/params.rs");

// Router statistics: the fraction of tokens per expert, the mean router probability per expert,
// and the z-loss mean(lse^2).
struct RouterStatsParams {
    float* fraction;           // [E] counts[e] / T
    float* mean_prob;          // [E]
    float* lse;                // [T] workspace: logsumexp of each token's logits
    float* z_loss;             // [1]
    const void* logits;        // [T, E]
    const int32_t* counts;     // [E] tokens per expert (from the routing kernel)
    int32_t tokens;            // T >= 1
    int32_t experts;           // E
};
static_assert(sizeof(RouterStatsParams) == 56, "mirror in src/params.rs");
static_assert(offsetof(RouterStatsParams, tokens) == 48, "mirror in src/params.rs");

// Router projection: out[t, e] = sum_h x[t, h] * w[e, h] (+ bias[e]), f32 accumulation, one
// rounding to the output dtype (that of w).
struct RouterLogitsParams {
    void* out;                 // [T, E] in w's dtype
    const void* x;             // [T, H]
    const void* w;             // [E, H]
    const void* bias;          // [E] in w's dtype, or null
    int32_t tokens;            // T
    int32_t experts;           // E
    int32_t hidden;            // H
    int32_t vec;               // 1: 8-element 16-byte-aligned vector loads (H % 8 == 0); 0: scalar
};
static_assert(sizeof(RouterLogitsParams) == 48, "mirror in src/params.rs");
static_assert(offsetof(RouterLogitsParams, tokens) == 32, "mirror in src/params.rs");

}  // namespace moe
