// Compressed expert weights: decoding on the device, to plain weights or inside the grouped GEMV.
//
// A layer's experts sit in one byte blob, described by a table of QuantExpert (one per expert,
// see quant_params.cuh for every format's parts). Each expert has its own format, so a layer
// that mixes formats (MC-MoE, EdgeMoE) still runs in one launch; a single-format layer is the
// case where every entry of the table has the same format.
//
// Decoded values are exactly those of the CPU decoders in src/quant (the references), in f32:
//   bf16      w
//   int       (q - z) * s                    q, z integers, s f16: exact
//   mxfp4     e2m1(q) * 2^(e - 127)          exact (e = 255: NaN)
//   fp8       e4m3(q) * scale_inv[r/128, k/128], one f32 product, __fmul_rn so it is never fused
//   ternary   0, lo[r] or hi[r]              f16: exact
// then rounded once (nearest even) to the output dtype, so GPU and CPU agree bit for bit on
// every number (a NaN is a NaN: CUDA writes 0x7fff where the host writes its own payload).
//
// dequant_{out}(QuantDequantParams p), out = bf16 | f16
//   out [E, N, Kd] = every expert's decoded weight. Block (x, e): rows 8x .. 8x + 8 of expert e,
//   one warp per row.
// quant_gemv_{in}_{out}(QuantGemvParams p), in = bf16 | f16, out = in | f32
//   grouped_gemv_v1's contract (kernels/grouped_gemm.cu): out [S, N_out] = epilogue(a [S, Kd] .
//   W_e^T) over the plan's sorted rows, the epilogue shared through epilogue.cuh, f32
//   accumulation. Block (x, e): output columns 8x .. 8x + 8 of expert e, one per warp; each warp
//   decodes its weight row (and the up row, gated) once per chunk of 8 rows of the expert.
//
// Ternary rows are variable-length codeword streams: a warp reads 32 codewords at a time, each
// lane one, finds where each run starts with a warp prefix sum of the run lengths, and expands
// its own run. Codewords outside the dictionary and runs past the row's end are skipped and
// counted in status (the host validates both before upload, so this is a second line).
//
// History
//   v1: the simplest correct kernels: one warp per weight row, 8 columns per lane per step with
//       per-column scale lookups, no shared memory, no vectorised activation reuse across gate
//       and up.
//   v2 (quant_gemv_v2_*, the default GEMV; QuantLayer::set_gemv_version): v1's grid and
//       contract; an expert's rows 8 per pass (1, 2 or 4 where fewer remain), warp w staging
//       row w's activations 1024 columns at a time in shared memory as f32 (zeros past the
//       expert's rows), each lane decoding a 16-byte chunk of its column's gate and up rows once
//       for the 8 rows with kernels/common/qdot.cuh's decoders. Experts those decoders do not
//       cover (act-order, other group sizes, ternary) run v1's loop. sm_90 static SASS per
//       int4 weight for 8 rows' products: 15.8 (v1: 137 per weight per row).

#include "dtype.cuh"
#include "epilogue.cuh"
#include "qdecode.cuh"
#include "qdot.cuh"
#include "quant_params.cuh"
#include "reduce.cuh"

namespace moe {

constexpr int kQuantWarps = 8;  // rows (dequant) or output columns (GEMV) per block
constexpr int kQuantRows = 8;   // rows of an expert's activations held in registers at once

template <typename TO>
__device__ __forceinline__ void dequant_v1(const QuantDequantParams& p) {
    const int e = blockIdx.y;
    const int r = blockIdx.x * kQuantWarps + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= p.n) return;  // no barrier in this kernel: warps may leave alone
    const QuantExpert x = p.experts[e];
    TO* out = static_cast<TO*>(p.out) + (int64_t(e) * p.n + r) * p.kdim;
    if (x.format == kQTernary) {
        ternary_row(p.blob, x, p.kdim, r, p.status, [&](int s, float w0, float w1) {
            out[2 * s] = Float<TO>::from_f32(w0);
            out[2 * s + 1] = Float<TO>::from_f32(w1);
        });
        return;
    }
    for (int k = lane * 8; k < p.kdim; k += 32 * 8) {
        float w[8];
        decode8(p.blob, x, p.kdim, r, k, p.status, w);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[k + i] = Float<TO>::from_f32(w[i]);
    }
}

// acc[i] += a[r0 + i, :] . W_x[wr, :] for the rows i < rows, each lane a share of Kd.
template <typename T>
__device__ __forceinline__ void dot_rows(const QuantGemvParams& p, const QuantExpert& x, int wr, int64_t r0, int rows,
                                         float (&acc)[kQuantRows]) {
    const T* A = static_cast<const T*>(p.g.a);
    const int kdim = p.g.kdim;
    if (x.format == kQTernary) {
        ternary_row(p.blob, x, kdim, wr, p.status, [&](int s, float w0, float w1) {
#pragma unroll
            for (int i = 0; i < kQuantRows; ++i) {
                if (i >= rows) break;
                const T* a = A + (r0 + i) * kdim + 2 * s;
                acc[i] = fmaf(Float<T>::to_f32(a[0]), w0, acc[i]);
                acc[i] = fmaf(Float<T>::to_f32(a[1]), w1, acc[i]);
            }
        });
        return;
    }
    for (int k = (threadIdx.x & 31) * 8; k < kdim; k += 32 * 8) {
        float w[8];
        decode8(p.blob, x, kdim, wr, k, p.status, w);
#pragma unroll
        for (int i = 0; i < kQuantRows; ++i) {
            if (i >= rows) break;
            float fa[8];
            load8(A + (r0 + i) * kdim + k, fa);
#pragma unroll
            for (int q = 0; q < 8; ++q) acc[i] = fmaf(fa[q], w[q], acc[i]);
        }
    }
}

template <typename T, typename TO>
__device__ __forceinline__ void quant_gemv_v1(const QuantGemvParams& p) {
    const GroupedGemmParams& g = p.g;
    const int e = blockIdx.y;
    const int r0 = g.offsets[e];
    const int count = g.offsets[e + 1] - r0;
    const int n_out = g.gated ? g.n / 2 : g.n;
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * kQuantWarps + (threadIdx.x >> 5);
    if (count <= 0 || j >= n_out) return;  // no barrier in this kernel: warps may leave alone
    const QuantExpert x = p.experts[e];
    TO* out = static_cast<TO*>(g.out);
    for (int c0 = 0; c0 < count; c0 += kQuantRows) {
        const int rows = min(kQuantRows, count - c0);
        float accg[kQuantRows], accu[kQuantRows];
#pragma unroll
        for (int i = 0; i < kQuantRows; ++i) accg[i] = accu[i] = 0.f;
        dot_rows<T>(p, x, weight_row(g, j, 0), r0 + c0, rows, accg);
        if (g.gated) dot_rows<T>(p, x, weight_row(g, j, 1), r0 + c0, rows, accu);
#pragma unroll
        for (int i = 0; i < kQuantRows; ++i) {
            if (i >= rows) break;
            const float gv = warp_sum(accg[i]);
            const float uv = g.gated ? warp_sum(accu[i]) : 0.f;
            if (lane == 0) {
                const int64_t r = r0 + c0 + i;
                out[r * n_out + j] = Float<TO>::from_f32(epilogue<T>(g, e, j, gv, uv, row_scale(g, r)));
            }
        }
    }
}

// ---- v2: chunks decoded once for up to 8 tokens, the activations staged in shared memory ----

template <typename TO>
__device__ __forceinline__ void out_store(const GroupedGemmParams& g, int64_t r, int n_out, int j, float v) {
    static_cast<TO*>(g.out)[r * n_out + j] = Float<TO>::from_f32(v);
}

// One pass: expert e's rows r0 .. r0 + nrows (nrows <= NT) against output column j (its gate and
// up rows where R = 2), through qdot.cuh's gemv_pass_tiled. Every warp of the block calls it (the
// staging barriers); `live` warps own a column below N_out.
template <typename T, typename TO, int KIND, int R, int NT>
__device__ __forceinline__ void quant_gemv_v2_pass(const QuantGemvParams& p, const QuantExpert& q, int e, int64_t r0,
                                                   int nrows, int j, bool live, unsigned char* smem) {
    const GroupedGemmParams& g = p.g;
    const int kd = g.kdim, n_out = R == 2 ? g.n / 2 : g.n;
    const int lane = threadIdx.x & 31;
    int rows[R];
#pragma unroll
    for (int i = 0; i < R; ++i) rows[i] = live ? weight_row(g, j, i) : 0;
    const T* A = static_cast<const T*>(g.a) + r0 * kd;
    const auto src = [&](int n) { return A + int64_t(n) * kd; };
    float acc[R][NT];
    gemv_pass_tiled<KIND, T, R, NT>(p.blob, q, p.blob + q.codes, kd, rows, live, src, nrows, smem, acc);
    if (!live) return;  // no barrier follows in this pass; the next pass's first barrier waits for all
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        if (n >= nrows) break;
        const float gv = warp_sum(acc[0][n]);
        const float uv = R == 2 ? warp_sum(acc[R - 1][n]) : 0.f;
        if (lane == 0) {
            out_store<TO>(g, r0 + n, n_out, j, epilogue<T>(g, e, j, gv, uv, row_scale(g, r0 + n)));
        }
    }
}

// Expert e's rows in passes of up to 8, each pass taking the smallest instance of 1, 2, 4 or 8
// rows that holds it, so that an expert with few rows computes few padding rows.
template <typename T, typename TO, int KIND, int R>
__device__ __forceinline__ void quant_gemv_v2_rows(const QuantGemvParams& p, const QuantExpert& q, int e, int r0,
                                                   int count, int j, bool live, unsigned char* smem) {
    for (int c0 = 0; c0 < count; c0 += kGemvTokens) {
        const int nrows = min(kGemvTokens, count - c0);
        const int64_t r = int64_t(r0) + c0;
        if (nrows == 1) quant_gemv_v2_pass<T, TO, KIND, R, 1>(p, q, e, r, nrows, j, live, smem);
        else if (nrows == 2) quant_gemv_v2_pass<T, TO, KIND, R, 2>(p, q, e, r, nrows, j, live, smem);
        else if (nrows <= 4) quant_gemv_v2_pass<T, TO, KIND, R, 4>(p, q, e, r, nrows, j, live, smem);
        else quant_gemv_v2_pass<T, TO, KIND, R, kGemvTokens>(p, q, e, r, nrows, j, live, smem);
    }
}

template <typename T, typename TO, int KIND>
__device__ __forceinline__ void quant_gemv_v2_kind(const QuantGemvParams& p, const QuantExpert& q, int e, int r0,
                                                   int count, int j, bool live, unsigned char* smem) {
    if (p.g.gated) quant_gemv_v2_rows<T, TO, KIND, 2>(p, q, e, r0, count, j, live, smem);
    else quant_gemv_v2_rows<T, TO, KIND, 1>(p, q, e, r0, count, j, live, smem);
}

// quant_gemv_v1's contract and grid. Experts that fast_kind leaves to the per-8 decoder
// (act-order, other group sizes, ternary) run v1's loop.
template <typename T, typename TO>
__device__ __forceinline__ void quant_gemv_v2(const QuantGemvParams& p) {
    __shared__ __align__(16) unsigned char smem[kGemvTokens * kGemvStaged];
    const GroupedGemmParams& g = p.g;
    const int e = blockIdx.y;
    const int r0 = g.offsets[e];
    const int count = g.offsets[e + 1] - r0;
    if (count <= 0) return;  // uniform per block: before any barrier
    const QuantExpert q = p.experts[e];
    const int n_out = g.gated ? g.n / 2 : g.n;
    const int j = blockIdx.x * kQuantWarps + (threadIdx.x >> 5);
    const bool live = j < n_out;
    switch (fast_kind(q, g.kdim)) {
        case kFastInt4: quant_gemv_v2_kind<T, TO, kFastInt4>(p, q, e, r0, count, j, live, smem); break;
        case kFastInt8: quant_gemv_v2_kind<T, TO, kFastInt8>(p, q, e, r0, count, j, live, smem); break;
        case kFastMxfp4: quant_gemv_v2_kind<T, TO, kFastMxfp4>(p, q, e, r0, count, j, live, smem); break;
        case kFastFp8: quant_gemv_v2_kind<T, TO, kFastFp8>(p, q, e, r0, count, j, live, smem); break;
        case kFastBf16: quant_gemv_v2_kind<T, TO, kFastBf16>(p, q, e, r0, count, j, live, smem); break;
        default: quant_gemv_v1<T, TO>(p);  // no barrier in v1
    }
}

}  // namespace moe

// Four blocks per SM as a hint: without it ptxas caps dequant at 32 registers on sm_80 and spills.
#define MOE_DEQUANT(SOUT, TOUT) \
    extern "C" __global__ void __launch_bounds__(32 * moe::kQuantWarps, 4) dequant_##SOUT(const moe::QuantDequantParams p) { \
        moe::dequant_v1<TOUT>(p); \
    }
MOE_DEQUANT(bf16, __nv_bfloat16)
MOE_DEQUANT(f16, __half)

#define MOE_QUANT_GEMV(SIN, SOUT, TIN, TOUT) \
    extern "C" __global__ void __launch_bounds__(32 * moe::kQuantWarps) quant_gemv_##SIN##_##SOUT(const moe::QuantGemvParams p) { \
        moe::quant_gemv_v1<TIN, TOUT>(p); \
    }
MOE_QUANT_GEMV(bf16, bf16, __nv_bfloat16, __nv_bfloat16)
MOE_QUANT_GEMV(bf16, f32, __nv_bfloat16, float)
MOE_QUANT_GEMV(f16, f16, __half, __half)
MOE_QUANT_GEMV(f16, f32, __half, float)

#define MOE_QUANT_GEMV2(SIN, SOUT, TIN, TOUT) \
    extern "C" __global__ void __launch_bounds__(32 * moe::kQuantWarps) quant_gemv_v2_##SIN##_##SOUT(const moe::QuantGemvParams p) { \
        moe::quant_gemv_v2<TIN, TOUT>(p); \
    }
MOE_QUANT_GEMV2(bf16, bf16, __nv_bfloat16, __nv_bfloat16)
MOE_QUANT_GEMV2(bf16, f32, __nv_bfloat16, float)
MOE_QUANT_GEMV2(f16, f16, __half, __half)
MOE_QUANT_GEMV2(f16, f32, __half, float)
