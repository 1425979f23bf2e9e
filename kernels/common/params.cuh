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
    // Expert masks: bit e of a mask (word e / 32, bit e % 32) removes expert e before selection.
    const uint32_t* masks;      // [mask_count, mask_words]; null: no masks
    const int32_t* mask_index;  // [T] each token's mask, -1 for none; null: mask 0 for every token
    int32_t* status;            // [kRouteStatusLen] counts (RouteStatus), accumulated; may be null
    int32_t mask_words;         // ceil(E / 32)
    int32_t mask_count;         // M >= 1 where masks is set
};
static_assert(sizeof(RouteParams) == 112, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, tokens) == 40, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, scale) == 68, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, top_p) == 76, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, masks) == 80, "mirror in src/params.rs");
static_assert(offsetof(RouteParams, mask_words) == 104, "mirror in src/params.rs");

// What the routing status counts, by index (src/routing/mod.rs reads them into an Err).
enum RouteStatus : int32_t {
    kGivenIdOutOfRange = 0,  // caller-given ids outside [-1, E_total)
    kGivenIdRepeated = 1,    // caller-given ids repeated within a token's row
    kGivenWeightBad = 2,     // caller-given weights that are NaN or infinite
    kMaskIndexBad = 3,       // tokens whose mask index is outside [-1, M)
    kRouteStatusLen = 4,
};

// Routing given by the caller, checked and copied into the layer's ids / weights: a slot whose
// id is outside [-1, E_total), repeats an earlier slot's id, or has a NaN or infinite weight
// becomes id -1, weight 0, and is counted in status; an id -1 keeps weight 0. One warp per token.
struct RouteGivenParams {
    int32_t* ids;              // [T, K] out
    float* weights;            // [T, K] out
    const int32_t* ids_in;     // [T, K]
    const float* weights_in;   // [T, K]
    int32_t* status;           // [kRouteStatusLen]
    int32_t tokens;            // T
    int32_t k;                 // K <= 32
    int32_t experts;           // E_total
    int32_t pad_;
};
static_assert(sizeof(RouteGivenParams) == 56, "mirror in src/params.rs");
static_assert(offsetof(RouteGivenParams, tokens) == 40, "mirror in src/params.rs");

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

// The routing plan: expert-major order of the T*K (token, slot) pairs, stable in token order,
// over the GEMM experts [0, E); slots with id -1 or a zero-computation expert ([E, E_total))
// stay out of it. See kernels/permute.cu.
struct PlanParams {
    int32_t* counts;            // [E] slots per GEMM expert
    int32_t* offsets;           // [E+1] exclusive prefix of counts; offsets[E] = GEMM rows
    int32_t* padded_offsets;    // [E+1] the same with each segment rounded up to block_m
    int32_t* sorted_slots;      // [S] slot t*K+k of each GEMM row; -1 past offsets[E] (host fills)
    int32_t* slot_rows;         // [S] GEMM row of each slot, -1 for slots outside the GEMM
    int32_t* padded_slots;      // [P] slot of each padded row, -1 for padding (host fills)
    int32_t* slot_padded_rows;  // [S] padded row of each slot, -1 outside
    int32_t* block_experts;     // [P / block_m] expert of each padded block, -1 past the end
    int32_t* chunk_base;        // [C, E] workspace: per-chunk counts, then per-chunk bases
    int32_t* status;            // [1] slots whose id is outside [-1, E_total), accumulated
    const int32_t* ids;         // [S] = topk_ids [T, K]
    int32_t slots;              // S = T*K
    int32_t experts;            // E <= 1024
    int32_t experts_total;      // E_total >= E
    int32_t block_m;            // segment alignment, >= 1
    int32_t padded_capacity;    // P, a multiple of block_m, >= S + E*(block_m-1)
    int32_t chunks;             // C = ceil(S / kPlanChunk)
};
static_assert(sizeof(PlanParams) == 112, "mirror in src/params.rs");
static_assert(offsetof(PlanParams, slots) == 88, "mirror in src/params.rs");

// Gather: out[r, :] = x[slot / K, :] for each row r whose slot row_slots[r] >= 0.
struct GatherParams {
    void* out;                  // [R, H]
    const void* x;              // [T, H]
    const int32_t* row_slots;   // [R] slot per row, or -1
    const int32_t* total_rows;  // [1] rows in use (device), or null for all R
    int32_t* status;            // [1] rows whose slot is >= T*K, accumulated
    int32_t rows;               // R
    int32_t hidden;             // H
    int32_t k;                  // K
    int32_t tokens;             // T
    int32_t zero_unmapped;      // 1: rows with slot -1 (below total_rows) are zeroed
    int32_t vec;                // 1: 16-byte vectors (H * sizeof(T) % 16 == 0, aligned bases)
};
static_assert(sizeof(GatherParams) == 64, "mirror in src/params.rs");
static_assert(offsetof(GatherParams, rows) == 40, "mirror in src/params.rs");

// Combine: y[t] = sum_k w[t,k] * contribution(t, k) (+ gate(t) * shared[t]) (+ residual[t]),
// in f32, in slot order, rounded once. contribution is the expert's output row for GEMM slots,
// x[t] for copy experts, a1 x[t] + a2 v_z for constant expert z ((a1, a2) = softmax(W_z x[t]),
// MoE++), 0 for zero experts and -1 slots.
struct CombineParams {
    void* y;                    // [T, H]
    const void* expert_out;     // [R, H] expert output rows
    const int32_t* slot_rows;   // [T*K] row of each slot in expert_out, -1 if none
    const int32_t* ids;         // [T*K] expert ids (to find copy experts)
    const float* weights;       // [T*K], or null: weights already folded into expert_out
    const void* x;              // [T, H] layer input, for copy experts; null if none
    const int32_t* zc_kinds;    // [E_total - E]: 0 zero, 1 copy, 2 constant; null: all zero
    const void* const_w;        // [E_total - E, 2, H] constant experts' mixing weights, or null
    const void* const_v;        // [E_total - E, H] constant experts' vectors, or null
    const void* shared_out;     // [T, H] shared-expert output, or null
    const void* shared_gate;    // [T] shared-expert gate logits (sigmoid applied), or null
    const void* residual;       // [T, H], or null
    int32_t* status;            // [1] slots with a row >= R or an id >= E_total, accumulated
    int32_t tokens;             // T
    int32_t hidden;             // H
    int32_t k;                  // K
    int32_t rows;               // R
    int32_t experts;            // E
    int32_t experts_total;      // E_total
    int32_t vec;                // 1: 16-byte vectors
    int32_t pad_;
};
static_assert(sizeof(CombineParams) == 136, "mirror in src/params.rs");
static_assert(offsetof(CombineParams, tokens) == 104, "mirror in src/params.rs");

// The masked layout [E, M, H] (decode, expert parallelism): expert e's j-th slot sits at row
// e*M + j for j < min(counts[e], M); slots past M overflow, are left out and counted.
struct MaskedParams {
    int32_t* masked_slots;      // [E*M] slot per row, -1 past the expert's count
    int32_t* slot_masked_rows;  // [S] row of each slot, -1 outside (host fills -1 first)
    int32_t* masked_counts;     // [E] min(counts[e], M)
    int32_t* status;            // [1] overflowing slots, accumulated
    const int32_t* counts;      // [E] from the plan
    const int32_t* offsets;     // [E+1] from the plan
    const int32_t* sorted_slots;  // [S] from the plan
    int32_t experts;            // E = gridDim.x
    int32_t max_rows;           // M
};
static_assert(sizeof(MaskedParams) == 64, "mirror in src/params.rs");
static_assert(offsetof(MaskedParams, experts) == 56, "mirror in src/params.rs");

// Expert parallelism, the local half: with experts placed on ranks, the per-rank send counts and
// the slots in the order an all-to-all sends them (rank-major, then expert, then token).
struct EpSendParams {
    int32_t* send_counts;       // [R] slots for each rank
    int32_t* send_slots;        // [S] slots rank-major; -1 past the total (host fills -1 first)
    int32_t* status;            // [1] experts whose rank is outside [0, R), accumulated
    const int32_t* expert_rank; // [E]
    const int32_t* counts;      // [E] from the plan
    const int32_t* offsets;     // [E+1] from the plan
    const int32_t* sorted_slots;  // [S] from the plan
    int32_t experts;            // E <= 1024
    int32_t ranks;              // R <= 1024
};
static_assert(sizeof(EpSendParams) == 64, "mirror in src/params.rs");
static_assert(offsetof(EpSendParams, experts) == 56, "mirror in src/params.rs");

// Gated activation: out[r, i] = act(gate[r, i]) * up[r, i], the gate/up pair read from one row of
// 2I values in the layout the checkpoint uses.
struct GatedActParams {
    void* out;                  // [rows, I]
    const void* in;             // [rows, 2I]
    int32_t rows;               // = gridDim.x
    int32_t inter;              // I
    int32_t layout;             // GateLayout
    int32_t act;                // GatedAct
    int32_t vec;                // 1: 16-byte vectors (split layouts, I * size % 16 == 0)
    float alpha;                // gpt-oss swiglu: sigmoid(alpha * g)
    float limit;                // gpt-oss swiglu: gate <= limit, |up| <= limit
    int32_t pad_;
};
static_assert(sizeof(GatedActParams) == 48, "mirror in src/params.rs");
static_assert(offsetof(GatedActParams, rows) == 16, "mirror in src/params.rs");
static_assert(offsetof(GatedActParams, alpha) == 36, "mirror in src/params.rs");

enum GateLayout : int32_t { kGateFirst = 0, kUpFirst = 1, kInterleaved = 2 };
enum GatedAct : int32_t { kSiluMul = 0, kGeluTanhMul = 1, kGeluErfMul = 2, kGptOssSwiglu = 3 };

// Elementwise activation: out[i] = act(in[i]).
struct ActParams {
    void* out;                  // [n]
    const void* in;             // [n]
    int64_t n;
    int32_t act;                // Act
    int32_t vec;                // 1: 16-byte vectors
};
static_assert(sizeof(ActParams) == 32, "mirror in src/params.rs");

enum Act : int32_t { kRelu = 0, kGeluTanh = 1, kGeluErf = 2, kSilu = 3 };

// Grouped expert GEMM over the padded ("contiguous") layout: for every block of rows that
// belongs to expert e (block_experts), out[r, :] = epilogue(a[r, :] . w[e]^T). The decode GEMV
// takes the same struct over the sorted layout, finding each expert's rows from offsets.
struct GroupedGemmParams {
    void* out;                    // [P, N_out], N_out = N (plain) or N / 2 (gated)
    const void* a;                // [P, Kd] rows in the plan's padded order
    const void* w;                // [E, N, Kd] out x in, as checkpoints store Linear weights
    const void* bias;             // [E, N] in the input dtype, or null
    const int32_t* block_experts; // GEMM: [P / plan_block_m] expert of each plan block, -1 skips
    const int32_t* offsets;       // GEMV: [E+1] row range of each expert (sorted layout)
    const int32_t* row_slots;     // [P] slot of each row (-1 padding), for row scaling, or null
    const float* slot_weights;    // [S] routing weight of each slot, or null: no row scaling
    int32_t rows;                 // P, a multiple of plan_block_m
    int32_t n;                    // N, rows of each expert's weight
    int32_t kdim;                 // Kd, a multiple of 8 (16-byte rows)
    int32_t experts;              // E
    int32_t plan_block_m;         // the plan's segment alignment, a multiple of the kernel's BM
    int32_t gated;                // 1: the gate/up pair of `layout` -> act(gate) * up
    int32_t layout;               // GateLayout (gated)
    int32_t act;                  // GatedAct (gated) or Act, or -1 for none (plain)
    float alpha;                  // gpt-oss swiglu
    float limit;                  // gpt-oss swiglu
    int32_t scale_input;          // 1: the row weight scales the input (before bias and act)
    int32_t pad_;
};
static_assert(sizeof(GroupedGemmParams) == 112, "mirror in src/params.rs");
static_assert(offsetof(GroupedGemmParams, rows) == 64, "mirror in src/params.rs");
static_assert(offsetof(GroupedGemmParams, alpha) == 96, "mirror in src/params.rs");

// The prefill GEMM v2's argument: GroupedGemmParams (so the epilogue helpers take it unchanged),
// plus the gather-free input. Kept apart so that v1, and QuantGemvParams which embeds
// GroupedGemmParams, keep their layouts.
struct GroupedGemmV2Params {
    GroupedGemmParams g;          // g.a is read when x is null
    const void* x;                // [T, Kd] layer input, or null: padded row r reads
                                  // x[g.row_slots[r] / top_k]; slots outside [0, T*K) read zeros
    int32_t tokens;               // T (x set)
    int32_t top_k;                // K >= 1 (x set)
};
static_assert(sizeof(GroupedGemmV2Params) == 128, "mirror in src/params.rs");
static_assert(offsetof(GroupedGemmV2Params, x) == 112, "mirror in src/params.rs");
static_assert(offsetof(GroupedGemmV2Params, tokens) == 120, "mirror in src/params.rs");

// The plan of one expert and one slot per token (a shared expert's): every row is its token.
// One launch writes what plan_count/scan/scatter would for ids all zero, over whole buffers.
struct PlanIdentityParams {
    int32_t* counts;            // [1] = T
    int32_t* offsets;           // [2] = 0, T
    int32_t* padded_offsets;    // [2] = 0, T rounded up to block_m
    int32_t* sorted_slots;      // [max_slots] r for r < T, else -1
    int32_t* slot_rows;         // [max_slots] the same
    int32_t* padded_slots;      // [max_padded] r for r < T, else -1
    int32_t* slot_padded_rows;  // [max_slots] the same as sorted_slots
    int32_t* block_experts;     // [max_padded / block_m] 0 for blocks holding a token, else -1
    int32_t* status;            // [1] = 0
    int32_t tokens;             // T <= max_slots
    int32_t max_slots;          // S_max, the allocated slots
    int32_t max_padded;         // P_max, the allocated padded rows, a multiple of block_m
    int32_t block_m;
};
static_assert(sizeof(PlanIdentityParams) == 88, "mirror in src/params.rs");
static_assert(offsetof(PlanIdentityParams, tokens) == 72, "mirror in src/params.rs");

// ---- the decode path (kernels/decode.cu) ------------------------------------------------------

struct QuantExpert;  // quant_params.cuh

// One projection of the routed experts (or of the shared expert, E = 1) as the decode kernels
// read it: plain weights through g.w, or compressed ones through a blob and its table.
struct DecodeProj {
    GroupedGemmParams g;          // w [E, N, Kd] (plain) or null (packed), bias [E, N] or null,
                                  // n = N, kdim = Kd, gated, layout, act, alpha, limit,
                                  // scale_input; the row and plan fields are unused
    const uint8_t* blob;          // packed: the experts' blob (quant_params.cuh); null: plain
    const QuantExpert* experts;   // packed: [E] the table
};
static_assert(sizeof(DecodeProj) == 128, "mirror in src/params.rs");
static_assert(offsetof(DecodeProj, blob) == 112, "mirror in src/params.rs");

// The MoE block for T <= 16 tokens in two launches after the router logits: the gate/up GEMV
// routes each token in its prologue and writes the intermediate rows; the down GEMV sums them
// back per token in its epilogue (the combine). S = K + 1 slots per token with a shared
// expert (slot K), else K.
// LoRA on the decode path: the expand products fused into the decode kernels, after a
// lora_shrink launch in decode mode (LoraParams.ids) wrote s. Slot (t, k) of routed expert e
// with adapter a = adapter_ids[t] in [0, L) adds scale[a] * B[a, e, row, :] . s[t * K + k, half
// * rank ..][0, rank) to the dot of weight row `row` (gate/up: before the epilogue, half 0 for
// the gate's row, 1 for the up's; down: before the routing weight, half 0). The shared expert
// and other adapter ids take none.
struct DecodeLora {
    const void* gate_up_b;        // [L, E, 2I, rank], rows in the layer's gate layout; or null
    const void* down_b;           // [L, E, H, rank]
    const float* s;               // [T * K, 2 * rank] for gate/up, then [T * K, rank] for down
    const int32_t* adapter_ids;   // [T]
    const float* scales;          // [L]
    int32_t rank;                 // 1..=kLoraMaxRank
    int32_t adapters;             // L
};

struct DecodeParams {
    RouteParams route;            // logits [T, E_total] in the kernel's logits dtype, bias, the
                                  // rule; ids/weights [T, K] are written by gate/up's column-0
                                  // blocks and read by down; counts unused
    DecodeProj up;                // routed gate/up [E, 2I, H]
    DecodeProj down;              // routed down [E, H, I]
    DecodeProj shared_up;         // [1, 2Is, H], gate rows first; g.w and blob null: no shared
    DecodeProj shared_down;       // [1, H, Is]
    const void* x;                // [T, H]
    void* h;                      // [T * S, ld_h] gate/up output rows, row t * S + s
    void* y;                      // [T, H]
    const void* residual;         // [T, H] or null
    const void* shared_gate;      // [H] Qwen2-MoE's sigmoid gate weight, or null
    float* shared_gate_logit;     // [T] x . shared_gate rounded to the dtype (gate/up writes)
    const int32_t* zc_kinds;      // [E_total - E] 0 zero, 1 copy, 2 constant; null: all zero
    const void* const_w;          // [Z, 2, H] constant experts' mixing weights, or null
    const void* const_v;          // [Z, H] constant experts' vectors, or null
    float* alpha;                 // [T * K, 2] a constant expert slot's softmax(W_z x)
    int32_t* status;              // [1] compressed-weight decode issues and bad ids, accumulated
    float* partial;               // [T * S, H] decode_down_v3's raw dots, row t * S + s (v4 only)
    int32_t hidden;               // H
    int32_t experts;              // E, the routed experts with weights (< route.experts with
                                  // zero-computation experts)
    int32_t slots;                // S
    int32_t ld_h;                 // elements between rows of h: max(I, Is)
    int32_t weight_at_input;      // 1: the routing weight scales the expert input (Llama 4)
    int32_t down_pass;            // decode_down_v2: slots whose h rows are staged at once (>= 1)
    DecodeLora lora;              // adapters on the routed experts; lora.gate_up_b null: none
};
static_assert(sizeof(DecodeParams) == 792, "mirror in src/params.rs");
static_assert(offsetof(DecodeParams, lora) == 744, "mirror in src/params.rs");
static_assert(offsetof(DecodeParams, up) == 112, "mirror in src/params.rs");
static_assert(offsetof(DecodeParams, x) == 624, "mirror in src/params.rs");
static_assert(offsetof(DecodeParams, hidden) == 720, "mirror in src/params.rs");

// LoRA on a plan's rows (kernels/lora.cu). Segment g holds the rows [seg_offsets[g],
// seg_offsets[g] + counts[g]) of one layout; row r is slot row_slots[r] (token slot / K), -1 for
// none. With per-token adapter ids, segment g is expert g and a row takes its token's adapter;
// without (LLaVA-MoLE), segment g is adapter g on the one dense expert (a_experts = 1).
//   lora_shrink: s[r, j] = sum_d A[a, e, j, d] * in[r, d] for j < r_total (2 * rank for gate/up)
//   lora_expand: out[r, c] += scale[a] * w(slot) * sum_j< rank B[a, e, c, j] * s[r, half(c) * rank + j]
// A row whose adapter is -1 or out of range is left alone; the gate/up shrink's block (0, 0)
// counts the tokens whose id is outside [-1, L) in status.
struct LoraParams {
    const void* in;               // shrink: [R, d_in] rows, or [T, d_in] read at slot / K (by_token)
    void* out;                    // expand: [R, d_out], added to in place
    float* s;                     // [R, r_total] shrink out, expand in
    const void* a;                // [L, a_experts, r_total, d_in]
    const void* b;                // [L, a_experts, d_out, rank]
    const float* scales;          // [L]
    const int32_t* adapter_ids;   // [T] per token, -1 for none; null: the segment is the adapter
    const int32_t* counts;        // [segments] rows per segment (each <= T)
    const int32_t* seg_offsets;   // [segments + 1] first row of each segment
    const int32_t* row_slots;     // [R] slot of each row, -1 for padding
    const float* row_weights;     // [T * K] expand: scales each slot's delta (Llama 4's input
                                  // weights), or null
    int32_t* status;              // [1] tokens with an adapter id outside [-1, L)
    const int32_t* ids;           // decode mode, or null: [T, K] expert ids; block y takes the
                                  // y-th distinct id in [0, segments) and its slots as rows
                                  // (row = slot; counts, seg_offsets, row_slots unused)
    int32_t tokens;               // T
    int32_t k;                    // K
    int32_t segments;             // G
    int32_t a_experts;            // experts in A and B: E, or 1 for a dense FFN
    int32_t adapters;             // L
    int32_t rank;                 // 1..=256
    int32_t r_total;              // columns of s: rank, or 2 * rank for gate/up
    int32_t d_in;                 // shrink's row length
    int32_t d_out;                // expand's row length
    int32_t split;                // expand: kLoraOne, or the GateLayout of out's columns + 1
    int32_t rows_per_block;       // rows of a segment per block (a chunk), 1..=kLoraRows
    int32_t by_token;             // shrink: in is [T, d_in], read through the slot
    int32_t vec;                  // 16-byte loads: d_in, ld_in % 8 == 0 and in, a 16-byte aligned
    int32_t count_status;         // 1 in the launch that counts bad adapter ids
    int32_t in_slots;             // decode mode: in is [T * in_slots, ld_in], slot (t, k) at row
                                  // t * in_slots + k (by_token: [T, ld_in]); else in_slots = K
    int32_t ld_in;                // elements between rows of in
};
static_assert(sizeof(LoraParams) == 168, "mirror in src/params.rs");
static_assert(offsetof(LoraParams, tokens) == 104, "mirror in src/params.rs");
static_assert(offsetof(LoraParams, ld_in) == 164, "mirror in src/params.rs");

constexpr int kLoraOne = 0;       // expand: every column reads s[r, 0 .. rank)
constexpr int kLoraRows = 64;     // the most rows of a segment one block takes
constexpr int kLoraMaxRank = 256;

// Seeded uniform fill: out[i] = lo + (hi - lo) * u(seed, i), u a hash of the index in [0, 1),
// rounded once to the dtype. Benches and the bench command fill weights of real shapes this way.
struct FillParams {
    void* out;                    // [n]
    int64_t n;
    uint64_t seed;
    float lo;
    float hi;
};
static_assert(sizeof(FillParams) == 32, "mirror in src/params.rs");
static_assert(offsetof(FillParams, lo) == 24, "mirror in src/params.rs");

}  // namespace moe
