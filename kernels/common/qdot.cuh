// Dot products against compressed weight rows at memory speed: the v2 inner loop of the decode
// kernels (kernels/decode.cu) and of quant_gemv_v2 (kernels/quant.cu), which takes up to 8
// tokens' activations per pass and decodes each chunk once for all of them. qdecode.cuh decodes 8 weights at a time with a scale lookup per
// weight; here each lane takes 16 bytes of one row's codes per step, loads the scale (and zero
// point) once for them, turns the codes into floats with a few bit operations and multiplies
// them with the activation, which the block has staged once in shared memory as f32.
//
// The staged activation (StagedX): x[0, n) as f32 in rows of 32 elements padded to 36 (144
// bytes), so that the lanes of a warp, each reading its chunk's 16-byte units, hit distinct
// banks.
//
// The decoders never round a weight: each code becomes an exact float C + q * 2^-m (a magic
// exponent placed over the code's bits), and subtracting the float C + z * 2^-m (z the zero point
// or the format's bias; both in [C, 2C), so the difference is exact) leaves (q - z) * 2^-m
// exactly. The lane multiplies that with x and the chunk applies 2^m and the scale once. So the
// product differs from the f64 one on the CPU decoders' weights only by f32 rounding of the sums.
// (Subtracting C * sum(x) after the products instead saves the subtraction but cancels: up to
// 15 bits lost for int8.)
//   int4   even columns' nibbles at bits 16..19 (0.5 + q/256), odd ones' at 12..15 (0.5 + q/4096),
//          moved there with 0.5f's exponent byte by four byte permutes per 8 codes:
//          1/2 PRMT + 1 LOP3 + 1 FADD + 1 FFMA per weight
//   int8   each byte at bits 8..15 of 1.0 (1 + q/32768) by one PRMT: 1 PRMT + 1 FADD + 1 FFMA
//   mxfp4  a byte table lookup (PRMT) per 4 codes gives 12 + 2 * e2m1 in [0, 24], placed at bits
//          16..23 of 0.5 (0.5 + u/256), less 0.5 + 12/256
//   fp8    cvt.rn.f16x2.e4m3x2 (sm_89 and later; bit arithmetic before), the 128 x 128 block scale
//          once per chunk
// Which experts take this path: fast_kind(); the rest (act-order, a group that is not a power of
// two of at least one chunk, rows whose chunks would not be 16-byte aligned, ternary) keep the
// per-8-weight decoder.
#pragma once

#include "dtype.cuh"
#include "ptx.cuh"
#include "qdecode.cuh"
#include "quant_params.cuh"

namespace moe {

// ---- the staged activation ----

// Bytes of shared memory for a staged vector of n elements (a multiple of 8).
__host__ __device__ constexpr int64_t staged_x_bytes(int64_t n) { return (n + 31) / 32 * 144; }

struct StagedX {
    float* v;  // [n], swizzled
};

__device__ __forceinline__ StagedX staged_x_at(unsigned char* smem) { return StagedX{reinterpret_cast<float*>(smem)}; }

// Where x[k] sits in StagedX::v: rows of 32 elements padded to 36, so that lanes reading 16
// bytes at the same offset of rows (or half or quarter rows) c, c + 1, ... land 9 (4.5, 2.25)
// 16-byte units apart, on distinct banks in every quarter warp; and a chunk's units sit at
// constant offsets from its first (no per-load address arithmetic).
__device__ __forceinline__ int staged_index(int k) { return (k >> 5) * 36 + (k & 31); }

// The 16-byte unit at column offset o (a multiple of 4, o + 4 <= 32 - (k0 % 32)) from the chunk
// whose first column is k0, given xr = v + staged_index(k0): a constant offset, no arithmetic.
__device__ __forceinline__ float4 staged4(const float* xr, int o) { return *reinterpret_cast<const float4*>(xr + o); }

// Threads tid = 0, step, 2 step, ... of the caller's set stage x[0, n), n % 8 == 0, 16 elements
// each (zeros where !valid: a padding row the caller computes with but never writes); the
// caller puts a barrier between this and the first read.
template <typename T>
__device__ __forceinline__ void stage_x(const T* x, int n, StagedX s, int tid, int step, bool valid = true) {
    for (int g = tid; g * 16 < n; g += step) {
        float v[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = 0.f;
        if (valid) {
            load8(x + 16 * g, reinterpret_cast<float(&)[8]>(v[0]));
            if (16 * g + 8 < n) load8(x + 16 * g + 8, reinterpret_cast<float(&)[8]>(v[8]));
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            if (u < 2 || 16 * g + 8 < n) {
                *reinterpret_cast<float4*>(s.v + staged_index(16 * g + 4 * u)) =
                    make_float4(v[4 * u], v[4 * u + 1], v[4 * u + 2], v[4 * u + 3]);
            }
        }
    }
}

// ---- one chunk's activation, loaded once for every row that uses it ----

// The staged x of a chunk's N 16-byte units (N = 8 for 32 columns, 4 for 16, 2 for 8).
template <int N>
struct XChunk {
    float4 u[N];
};

template <int N>
__device__ __forceinline__ XChunk<N> load_xchunk(const StagedX& x, int k0) {
    XChunk<N> r;
    const float* xr = x.v + staged_index(k0);
#pragma unroll
    for (int i = 0; i < N; ++i) r.u[i] = staged4(xr, 4 * i);
    return r;
}

// ---- the per-chunk decoders: 16 bytes of codes at column k0 of a row ----

// A chunk's N weights, decoded exactly: weight of column k0 + i = w[i] * (i even ? m : m_odd).
template <int N>
struct WChunk {
    float w[N];
    float m, m_odd;
};

// The codes' floats: byte 3 of a word from prmt is 0x3f (0.5f's exponent, from kHalf), so one AND
// leaves 0.5 + q/256 (a nibble at bits 16..19) or 0.5 + q/4096 (at bits 12..15), exactly.
constexpr uint32_t kHalf = 0x3f000000u;
__device__ __forceinline__ float nib16(uint32_t p) { return __uint_as_float(p & 0xff0f0000u); }
__device__ __forceinline__ float nib12(uint32_t p) { return __uint_as_float(p & 0xff00f000u); }

// 32 int4 codes (8 per word, low nibble first), zero point z an integer in [0, 16): even columns
// (q - z)/256, odd ones (q - z)/4096, before the scale.
__device__ __forceinline__ void decode_int4(const uint4 c, float z, float (&w)[32]) {
    const uint32_t v[4] = {c.x, c.y, c.z, c.w};
    const uint32_t half = kHalf;
    const float ze = fmaf(z, 1.f / 256.f, 0.5f), zo = fmaf(z, 1.f / 4096.f, 0.5f);  // exact
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        // Nibble i of the word is column 8j + i; byte b holds nibbles 2b (low) and 2b + 1. Each
        // permute puts one byte at 1 (its high nibble at 12..15) and one at 2 (its low nibble at
        // 16..19), and 0x3f at 3.
        const uint32_t p0 = __byte_perm(v[j], half, 0x7210);  // nibbles 3 @12, 4 @16
        const uint32_t p1 = __byte_perm(v[j], half, 0x7100);  // nibbles 1 @12, 2 @16
        const uint32_t p2 = __byte_perm(v[j], half, 0x7320);  // nibbles 5 @12, 6 @16
        const uint32_t p3 = __byte_perm(v[j], half, 0x7030);  // nibbles 7 @12, 0 @16
        w[8 * j + 0] = nib16(p3) - ze;
        w[8 * j + 1] = nib12(p1) - zo;
        w[8 * j + 2] = nib16(p1) - ze;
        w[8 * j + 3] = nib12(p0) - zo;
        w[8 * j + 4] = nib16(p0) - ze;
        w[8 * j + 5] = nib12(p2) - zo;
        w[8 * j + 6] = nib16(p2) - ze;
        w[8 * j + 7] = nib12(p3) - zo;
    }
}

// 16 int8 codes (4 per word), zero point z an integer in [0, 256): (q - z)/32768.
__device__ __forceinline__ void decode_int8(const uint4 c, float z, float (&w)[16]) {
    const uint32_t v[4] = {c.x, c.y, c.z, c.w};
    const float zc = fmaf(z, 1.f / 32768.f, 1.f);  // exact
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        // Bytes 4..7 are 1.0f's: result 0x3f80 qq 00 with byte i of the word at bits 8..15.
        w[4 * j + 0] = __uint_as_float(__byte_perm(v[j], 0x3f800000u, 0x7604)) - zc;
        w[4 * j + 1] = __uint_as_float(__byte_perm(v[j], 0x3f800000u, 0x7614)) - zc;
        w[4 * j + 2] = __uint_as_float(__byte_perm(v[j], 0x3f800000u, 0x7624)) - zc;
        w[4 * j + 3] = __uint_as_float(__byte_perm(v[j], 0x3f800000u, 0x7634)) - zc;
    }
}

// Four e2m1 codes in the low 16 bits of m (code i in nibble i: sign, 2 exponent bits, 1 mantissa
// bit) as bytes 12 + 2 v, v in {0, +-0.5, ..., +-6}: table lookups of 2|v| by the 3 low bits of
// each nibble, the sign bit of the nibble selecting a zero byte (prmt's sign replication of a
// table byte below 0x80), once for the positive and once for the flipped signs.
__device__ __forceinline__ uint32_t e2m1x4_offset(uint32_t m) {
    constexpr uint32_t kLo = 0x03020100u, kHi = 0x0c080604u;  // 2|v| for codes 0..7
    const uint32_t pos = ptx::prmt(kLo, kHi, m);            // 2|v| where the sign is clear, else 0
    const uint32_t neg = ptx::prmt(kLo, kHi, m ^ 0x8888u);  // 2|v| where the sign is set, else 0
    return pos + 0x0c0c0c0cu - neg;                          // no byte carries or borrows
}

// 32 e2m1 codes (low nibble first): v/128, before the block scale.
__device__ __forceinline__ void decode_mxfp4(const uint4 c, float (&w)[32]) {
    const uint32_t v[4] = {c.x, c.y, c.z, c.w};
    constexpr float kBias = 0.5f + 12.f / 256.f;  // u = 12 + 2 v: (0.5 + u/256) - kBias = v/128
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t lo = e2m1x4_offset(v[j]), hi = e2m1x4_offset(v[j] >> 16);
        // Bytes 4..7 are 0.5f's (0x3f000000): result 0x3f uu 00 00, u < 128 leaves the exponent.
        w[8 * j + 0] = __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7044)) - kBias;
        w[8 * j + 1] = __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7144)) - kBias;
        w[8 * j + 2] = __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7244)) - kBias;
        w[8 * j + 3] = __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7344)) - kBias;
        w[8 * j + 4] = __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7044)) - kBias;
        w[8 * j + 5] = __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7144)) - kBias;
        w[8 * j + 6] = __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7244)) - kBias;
        w[8 * j + 7] = __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7344)) - kBias;
    }
}

// 16 e4m3fn codes: their values, before the block scale.
__device__ __forceinline__ void decode_fp8(const uint4 c, float (&w)[16]) {
    const uint32_t v[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) ptx::e4m3x4_to_f32(v[j], reinterpret_cast<float(&)[4]>(w[4 * j]));
}

// 8 plain weights of T.
template <typename T>
__device__ __forceinline__ void decode_plain(const uint4 c, float (&w)[8]) {
    Vec16<T> v;
    *reinterpret_cast<uint4*>(&v) = c;
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = Float<T>::to_f32(v.v[i]);
}

// ---- the formats' policies: one row's chunk, scale and zero point included ----

// kFastPlain: the model dtype's plain weights (not in a blob). kMmaInt4Small is no decoder of
// fast_kind's: decode v5's instance for int4 in groups of 32 or 64 columns (kernels/decode.cu).
enum FastKind : int { kFastNone = 0, kFastInt4, kFastInt8, kFastMxfp4, kFastFp8, kFastBf16, kFastPlain, kMmaInt4Small };

// The v2 decoder that takes expert q's rows of kd columns, or kFastNone (the per-8 decoder).
// stored_order: the decoder of the codes as stored, for a kernel that reads the activation in
// an act-order expert's stored column order (decode v5); otherwise such an expert takes the
// per-8 decoder, which maps each column to its stored place.
__device__ __forceinline__ int fast_kind(const QuantExpert& q, int kd, bool stored_order = false) {
    const bool pow2 = q.group > 0 && (q.group & (q.group - 1)) == 0;
    switch (q.format) {
        case kQInt:
            if (q.g_idx >= 0 || (q.perm >= 0 && !stored_order) || !pow2) return kFastNone;
            if (q.bits == 4 && q.group >= 32 && kd % 32 == 0) return kFastInt4;
            if (q.bits == 8 && q.group >= 16 && kd % 16 == 0) return kFastInt8;
            return kFastNone;
        case kQMxfp4: return kd % 32 == 0 ? kFastMxfp4 : kFastNone;
        case kQFp8: return kd % 16 == 0 ? kFastFp8 : kFastNone;
        case kQBf16: return kFastBf16;
        default: return kFastNone;
    }
}

// Chunk widths: 16 bytes of codes hold this many columns.
template <int KIND>
constexpr int kChunkCols = KIND == kFastInt4 || KIND == kFastMxfp4 ? 32 : (KIND == kFastInt8 || KIND == kFastFp8 ? 16 : 8);

// Row r's chunk c at column k0 of expert q (KIND = fast_kind(q, kd), or kFastPlain with T the
// weights' dtype), decoded with its scale as the multipliers.
template <int KIND, typename T>
__device__ __forceinline__ WChunk<kChunkCols<KIND>> decode_chunk(const uint8_t* blob, const QuantExpert& q, int kd,
                                                                 int r, int k0, const uint4 c) {
    WChunk<kChunkCols<KIND>> d;
    if constexpr (KIND == kFastInt4 || KIND == kFastInt8) {
        const int groups = kd / q.group;
        const int64_t rg = int64_t(r) * groups + (k0 >> (31 - __clz(q.group)));
        const float s = __half2float(reinterpret_cast<const __half*>(blob + q.scales)[rg]);
        const float z = q.zeros >= 0 ? float(blob[q.zeros + rg]) : float(1 << (q.bits - 1));
        if constexpr (KIND == kFastInt4) {
            decode_int4(c, z, d.w);
            d.m = 256.f * s;  // powers of two: exact
            d.m_odd = 4096.f * s;
        } else {
            decode_int8(c, z, d.w);
            d.m = d.m_odd = 32768.f * s;
        }
    } else if constexpr (KIND == kFastMxfp4) {
        decode_mxfp4(c, d.w);
        d.m = d.m_odd = 128.f * e8m0_to_f32(blob[q.scales + int64_t(r) * mxfp4_scale_row(kd) + k0 / 32]);
    } else if constexpr (KIND == kFastFp8) {
        decode_fp8(c, d.w);
        const int kb = (kd + 127) / 128;
        d.m = d.m_odd = reinterpret_cast<const float*>(blob + q.scales)[(r / 128) * kb + k0 / 128];
    } else if constexpr (KIND == kFastBf16) {
        decode_plain<__nv_bfloat16>(c, d.w);
        d.m = d.m_odd = 1.f;
    } else {
        decode_plain<T>(c, d.w);
        d.m = d.m_odd = 1.f;
    }
    return d;
}

// A decoded chunk against its staged x: int4 sums its even and odd columns apart (their
// multipliers differ), the others in one chain.
template <int KIND, int N>
__device__ __forceinline__ float chunk_dot(const WChunk<N>& d, const XChunk<N / 4>& x) {
    if constexpr (KIND == kFastInt4) {
        float ae = 0.f, ao = 0.f;
#pragma unroll
        for (int u = 0; u < N / 4; ++u) {
            ae = fmaf(x.u[u].x, d.w[4 * u], ae);
            ao = fmaf(x.u[u].y, d.w[4 * u + 1], ao);
            ae = fmaf(x.u[u].z, d.w[4 * u + 2], ae);
            ao = fmaf(x.u[u].w, d.w[4 * u + 3], ao);
        }
        return fmaf(d.m, ae, d.m_odd * ao);
    } else {
        float a = 0.f;
#pragma unroll
        for (int u = 0; u < N / 4; ++u) {
            a = fmaf(x.u[u].x, d.w[4 * u], a);
            a = fmaf(x.u[u].y, d.w[4 * u + 1], a);
            a = fmaf(x.u[u].z, d.w[4 * u + 2], a);
            a = fmaf(x.u[u].w, d.w[4 * u + 3], a);
        }
        return KIND == kFastPlain || KIND == kFastBf16 ? a : d.m * a;
    }
}

// Bytes of one row of Kd weights as KIND stores them (T: a plain row's element type).
template <int KIND, typename T>
__device__ __forceinline__ int64_t row_bytes_of(int kd) {
    return KIND == kFastInt4 || KIND == kFastMxfp4 ? kd / 2
           : KIND == kFastInt8 || KIND == kFastFp8 ? kd
           : KIND == kFastPlain                    ? int64_t(kd) * int64_t(sizeof(T))
                                                   : int64_t(kd) * 2;
}

// ---- the mainloop ----

// One lane's loop over R rows of one expert and NT staged activations (tokens), for one decoder
// kind: the chunks c_begin .. c_end of each row (column c * cols), two 16-byte chunks per row in
// flight per step, chunk c_begin + 32 * step + lane; each row's chunk decoded once for the NT
// tokens, each token's x loaded once for the R rows. xs[n] holds columns k_base .. of token n (k_base a
// multiple of 32, so the staged rows of 32 keep their alignment); acc[i][n] += row i . x_n.
template <int KIND, typename T, int R, int NT>
__device__ __forceinline__ void stream_rows_tile(const uint8_t* blob, const QuantExpert& q, const uint8_t* codes,
                                                 int64_t row_bytes, int kd, const int (&row)[R], int c_begin,
                                                 int c_end, int k_base, const StagedX (&xs)[NT],
                                                 float (&acc)[R][NT]) {
    constexpr int kCols = kChunkCols<KIND>;
    auto step = [&](int c, const uint4 (&v)[R]) {
        const int k0 = c * kCols;
        if constexpr (NT == 1) {
            // One token: each row's chunk decoded just before its use, so that only one is live.
            const XChunk<kCols / 4> x = load_xchunk<kCols / 4>(xs[0], k0 - k_base);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i][0] += chunk_dot<KIND>(decode_chunk<KIND, T>(blob, q, kd, row[i], k0, v[i]), x);
        } else if constexpr (kCols == 8) {
            // 8-column chunks (bf16, plain): row by row, each token's x chunk read from shared
            // memory once per row; this order keeps the by-expert decode kernels' plain instances
            // within two blocks' registers without spilling (the token-major order below spills).
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const WChunk<kCols> d = decode_chunk<KIND, T>(blob, q, kd, row[i], k0, v[i]);
#pragma unroll
                for (int n = 0; n < NT; ++n) acc[i][n] += chunk_dot<KIND>(d, load_xchunk<kCols / 4>(xs[n], k0 - k_base));
            }
        } else {
            WChunk<kCols> d[R];
#pragma unroll
            for (int i = 0; i < R; ++i) d[i] = decode_chunk<KIND, T>(blob, q, kd, row[i], k0, v[i]);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const XChunk<kCols / 4> x = load_xchunk<kCols / 4>(xs[n], k0 - k_base);
#pragma unroll
                for (int i = 0; i < R; ++i) acc[i][n] += chunk_dot<KIND>(d[i], x);
            }
        }
    };
    int c = c_begin + (threadIdx.x & 31);
    for (; c + 32 < c_end; c += 64) {
        uint4 v0[R], v1[R];
#pragma unroll
        for (int i = 0; i < R; ++i) {
            v0[i] = __ldg(reinterpret_cast<const uint4*>(codes + row[i] * row_bytes) + c);
            v1[i] = __ldg(reinterpret_cast<const uint4*>(codes + row[i] * row_bytes) + c + 32);
        }
        step(c, v0);
        step(c + 32, v1);
    }
    if (c < c_end) {
        uint4 v0[R];
#pragma unroll
        for (int i = 0; i < R; ++i) v0[i] = __ldg(reinterpret_cast<const uint4*>(codes + row[i] * row_bytes) + c);
        step(c, v0);
    }
}

// One token's whole rows (the decode kernels): stream_rows_tile over every chunk, acc[i] += row i . x.
template <int KIND, typename T, int R>
__device__ __forceinline__ void stream_rows(const uint8_t* blob, const QuantExpert& q, const uint8_t* codes,
                                            int64_t row_bytes, int kd, const int (&row)[R], const StagedX& xs,
                                            float (&acc)[R]) {
    const StagedX x1[1] = {xs};
    float a[R][1];
#pragma unroll
    for (int i = 0; i < R; ++i) a[i][0] = acc[i];
    stream_rows_tile<KIND, T, R, 1>(blob, q, codes, row_bytes, kd, row, 0, kd / kChunkCols<KIND>, 0, x1, a);
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = a[i][0];
}

}  // namespace moe

namespace moe {

// ---- the by-expert GEMV pass (quant_gemv_v2, decode_gate_up_v3) ----

constexpr int kGemvTokens = 8;   // activation rows per pass, one staged by each warp
constexpr int kGemvTile = 1024;  // columns of those rows staged at a time (one int4 chunk per lane)
constexpr int kGemvStaged = int(staged_x_bytes(kGemvTile));  // 4608 bytes, a multiple of 16

// One pass of an expert's GEMV over NT <= kGemvTokens activation rows: src(n) is row n's start in
// global memory (n < nrows; rows nrows .. NT are staged as zeros), staged kGemvTile columns at a
// time into smem (NT regions of kGemvStaged bytes) by warp n; warps with `live` set stream their R
// weight rows `row` of the expert (codes, row_bytes_of<KIND, T>(kd) bytes each) against them:
// acc[i][n] = this lane's share of W[row[i]] . x_n, for the caller to sum over the warp. Every
// warp of the block calls it (two barriers per tile); the block has at least NT warps.
template <int KIND, typename T, int R, int NT, typename Src>
__device__ __forceinline__ void gemv_pass_tiled(const uint8_t* blob, const QuantExpert& q, const uint8_t* codes, int kd,
                                                const int (&row)[R], bool live, const Src& src, int nrows,
                                                unsigned char* smem, float (&acc)[R][NT]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int kCols = kChunkCols<KIND>;
    StagedX xs[NT];
#pragma unroll
    for (int n = 0; n < NT; ++n) xs[n] = staged_x_at(smem + n * kGemvStaged);
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[i][n] = 0.f;
    for (int k0 = 0; k0 < kd; k0 += kGemvTile) {
        const int width = min(kGemvTile, kd - k0);
        __syncthreads();  // the previous tile (or pass) has read what this one overwrites
        if (warp < NT) {
            const bool valid = warp < nrows;
            stage_x(valid ? src(warp) + k0 : src(0), width, staged_x_at(smem + warp * kGemvStaged), lane, 32, valid);
        }
        __syncthreads();
        if (live) {
            stream_rows_tile<KIND, T, R, NT>(blob, q, codes, row_bytes_of<KIND, T>(kd), kd, row, k0 / kCols,
                                             (k0 + width) / kCols, k0, xs, acc);
        }
    }
}

}  // namespace moe
