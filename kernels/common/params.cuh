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

}  // namespace moe
