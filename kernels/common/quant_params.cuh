// Parameter structs of the compressed-weight kernels (kernels/quant.cu), mirrored in
// src/quant/params.rs with the same size and offset asserts on both sides.
//
// A layer's experts live in one byte blob; a table of QuantExpert (one per expert) says each
// expert's format and where its parts start. Every offset is a multiple of 16 bytes from the
// blob's base, which is 256-byte aligned.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "params.cuh"

namespace moe {

enum QuantFormat : int32_t { kQBf16 = 0, kQInt = 1, kQMxfp4 = 2, kQFp8 = 3, kQTernary = 4 };

// One expert's weight W [N, Kd] (N and Kd are the layer's). Byte offsets into the blob; -1 where
// a part is absent. Per format:
//   kQBf16:    codes bf16 [N, Kd].
//   kQInt:     codes u32 [N, Kd*bits/32] (low bits first along Kd); scales f16 [N, Kd/group];
//              zeros u8 [N, Kd/group] or -1 (symmetric: 2^(bits-1)); g_idx u32 [Kd] or -1.
//              Act-order whose groups all hold `group` columns is laid out again at upload
//              (perm >= 0, g_idx -1): codes, scales and zeros are those of W with its columns
//              permuted so that each group is contiguous, stored column j being column perm[j]
//              of W, in group j / group; perm u32 [Kd] is followed by its inverse u32 [Kd]
//              (column k of W is stored column inv[k]).
//   kQMxfp4:   codes u8 [N, Kd/2] (even column in the low nibble); scales u8 e8m0 [N, Kd/32],
//              each row padded to mxfp4_scale_row(Kd) bytes (a multiple of 16, so that a row's
//              scales start 16-byte aligned and 16-byte loads stay inside the row).
//   kQFp8:     codes u8 e4m3fn [N, Kd]; scales f32 [ceil(N/128), ceil(Kd/128)].
//   kQTernary: codes u16 codewords; scales f16 [N, 2] (lo, hi); row_offsets u32 [N+1];
//              dict u64 [dict_len] (bits 0..4 run length, then 4-bit symbols t0 + 3 t1).
struct QuantExpert {
    int32_t format;       // QuantFormat
    int32_t bits;         // kQInt: 4 or 8
    int32_t group;        // kQInt: a multiple of 8 dividing Kd
    int32_t dict_len;     // kQTernary: dictionary entries, <= 65536
    int64_t codes;
    int64_t scales;
    int64_t zeros;
    int64_t g_idx;
    int64_t row_offsets;
    int64_t dict;
    int64_t perm;
};

// Bytes per row of an MXFP4 expert's scales in the blob: Kd / 32 rounded up to 16
// (QuantLayer::upload pads them).
__host__ __device__ constexpr int64_t mxfp4_scale_row(int64_t kd) { return (kd / 32 + 15) / 16 * 16; }

static_assert(sizeof(QuantExpert) == 72, "mirror in src/quant/params.rs");
static_assert(offsetof(QuantExpert, codes) == 16, "mirror in src/quant/params.rs");
static_assert(offsetof(QuantExpert, dict) == 56, "mirror in src/quant/params.rs");
static_assert(offsetof(QuantExpert, perm) == 64, "mirror in src/quant/params.rs");

// Dequantise: out[e, r, k] = the decoded W_e[r, k], rounded once to the output dtype.
struct QuantDequantParams {
    void* out;                    // [E, N, Kd]
    const uint8_t* blob;
    const QuantExpert* experts;   // [E]
    int32_t* status;              // [1] ternary codewords outside the dictionary or runs past Kd
    int32_t num_experts;          // E = gridDim.y
    int32_t n;                    // N
    int32_t kdim;                 // Kd, a multiple of 8
    int32_t pad_;
};
static_assert(sizeof(QuantDequantParams) == 48, "mirror in src/quant/params.rs");
static_assert(offsetof(QuantDequantParams, num_experts) == 32, "mirror in src/quant/params.rs");

// The grouped GEMV over compressed weights: GroupedGemmParams's product and epilogue over the
// plan's sorted rows (g.w unused), each expert's weight decoded from the blob.
struct QuantGemvParams {
    GroupedGemmParams g;
    const uint8_t* blob;
    const QuantExpert* experts;   // [E]
    int32_t* status;              // as QuantDequantParams
};
static_assert(sizeof(QuantGemvParams) == 136, "mirror in src/quant/params.rs");
static_assert(offsetof(QuantGemvParams, blob) == 112, "mirror in src/quant/params.rs");

}  // namespace moe
