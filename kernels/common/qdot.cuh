// Dot products against compressed weight rows at memory speed: the v2 inner loop of the decode
// kernels (kernels/decode.cu). qdecode.cuh decodes 8 weights at a time with a scale lookup per
// weight; here each lane takes 16 bytes of one row's codes per step, loads the scale (and zero
// point) once for them, turns the codes into floats with a few bit operations and multiplies
// them with the activation, which the block has staged once in shared memory as f32.
//
// The staged activation (StagedX): x[0, n) as f32 in rows of 32 elements padded to 36 (144
// bytes), so that the lanes of a warp, each reading its chunk's 16-byte units, hit distinct
// banks; and per 16 elements the sums of the even and of the odd elements, which the offset
// decoders below subtract.
//
// The decoders never round a weight: each code becomes an exact float of the form
// C + q * 2^-m (a magic exponent ORed over the code's bits), the lane sums x * that, and the chunk
// removes C * sum(x) with the staged sums before it applies the scale. So the product differs from
// the f64 one on the CPU decoders' weights only by f32 rounding of the sums.
//   int4   even columns' nibbles at bits 16..19 (0.5 + q/256), odd ones' at 12..15 (0.5 + q/4096),
//          moved there with 0.5f's exponent byte by four byte permutes per 8 codes:
//          1/2 PRMT + 1 LOP3 + 1 FFMA per weight
//   int8   each byte at bits 8..15 of 1.0 (1 + q/32768) by one PRMT: 1 PRMT + 1 FFMA per weight
//   mxfp4  a byte table lookup (PRMT) per 4 codes gives 12 + 2 * e2m1 in [0, 24], placed at bits
//          16..23 of 0.5 (0.5 + u/256)
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
__host__ __device__ constexpr int64_t staged_x_bytes(int64_t n) { return (n + 31) / 32 * 144 + (n + 15) / 16 * 8; }

struct StagedX {
    float* v;      // [n], swizzled
    float2* sums;  // [ceil(n / 16)] (even, odd) element sums of each 16
};

__device__ __forceinline__ StagedX staged_x_at(unsigned char* smem, int n) {
    return StagedX{reinterpret_cast<float*>(smem), reinterpret_cast<float2*>(smem + (n + 31) / 32 * 144)};
}

// Where x[k] sits in StagedX::v: rows of 32 elements padded to 36, so that lanes reading 16
// bytes at the same offset of rows (or half or quarter rows) c, c + 1, ... land 9 (4.5, 2.25)
// 16-byte units apart, on distinct banks in every quarter warp; and a chunk's units sit at
// constant offsets from its first (no per-load address arithmetic).
__device__ __forceinline__ int staged_index(int k) { return (k >> 5) * 36 + (k & 31); }

// The 16-byte unit at column offset o (a multiple of 4, o + 4 <= 32 - (k0 % 32)) from the chunk
// whose first column is k0, given xr = v + staged_index(k0): a constant offset, no arithmetic.
__device__ __forceinline__ float4 staged4(const float* xr, int o) { return *reinterpret_cast<const float4*>(xr + o); }

// Threads tid = 0, step, 2 step, ... of the caller's set stage x[0, n), n % 8 == 0, 16 elements
// each; the caller puts a barrier between this and the first read.
template <typename T>
__device__ __forceinline__ void stage_x(const T* x, int n, StagedX s, int tid, int step) {
    for (int g = tid; g * 16 < n; g += step) {
        float v[16];
        load8(x + 16 * g, reinterpret_cast<float(&)[8]>(v[0]));
        if (16 * g + 8 < n) {
            load8(x + 16 * g + 8, reinterpret_cast<float(&)[8]>(v[8]));
        } else {
#pragma unroll
            for (int i = 8; i < 16; ++i) v[i] = 0.f;
        }
        float even = 0.f, odd = 0.f;
#pragma unroll
        for (int i = 0; i < 16; i += 2) {
            even += v[i];
            odd += v[i + 1];
        }
        s.sums[g] = make_float2(even, odd);
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

// The staged x of a chunk's N 16-byte units (N = 8 for 32 columns, 4 for 16, 2 for 8) and the
// chunk's sums: (even, odd) of each 16 columns, the second pair zero for a 16-column chunk.
template <int N>
struct XChunk {
    float4 u[N];
    float4 s;
};

template <int N>
__device__ __forceinline__ XChunk<N> load_xchunk(const StagedX& x, int k0) {
    XChunk<N> r;
    const float* xr = x.v + staged_index(k0);
#pragma unroll
    for (int i = 0; i < N; ++i) r.u[i] = staged4(xr, 4 * i);
    if constexpr (N == 8) {
        r.s = *reinterpret_cast<const float4*>(x.sums + (k0 >> 4));
    } else if constexpr (N == 4) {
        const float2 v = x.sums[k0 >> 4];
        r.s = make_float4(v.x, v.y, 0.f, 0.f);
    } else {
        r.s = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    return r;
}

// ---- the per-chunk decoders: 16 bytes of codes at column k0 of a row ----

// The codes' floats: byte 3 of a word from prmt is 0x3f (0.5f's exponent, from kHalf), so one AND
// leaves 0.5 + q/256 (a nibble at bits 16..19) or 0.5 + q/4096 (at bits 12..15), exactly.
constexpr uint32_t kHalf = 0x3f000000u;
__device__ __forceinline__ float nib16(uint32_t p) { return __uint_as_float(p & 0xff0f0000u); }
__device__ __forceinline__ float nib12(uint32_t p) { return __uint_as_float(p & 0xff00f000u); }

// 32 int4 codes (columns k0 .. k0 + 32, 8 per word, low nibble first) against their staged x:
// sum of x * (q - z).
__device__ __forceinline__ float chunk_int4(const uint4 c, const XChunk<8>& x, float z) {
    const uint32_t w[4] = {c.x, c.y, c.z, c.w};
    const uint32_t half = kHalf;
    float a16 = 0.f, a12 = 0.f;  // even columns: sum x (0.5 + q/256); odd: sum x (0.5 + q/4096)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float4 xa = x.u[2 * j], xb = x.u[2 * j + 1];
        // Nibble i of the word is column 8j + i; byte b holds nibbles 2b (low) and 2b + 1. Each
        // permute puts one byte at 1 (its high nibble at 12..15) and one at 2 (its low nibble at
        // 16..19), and 0x3f at 3.
        const uint32_t p0 = __byte_perm(w[j], half, 0x7210);  // nibbles 3 @12, 4 @16
        const uint32_t p1 = __byte_perm(w[j], half, 0x7100);  // nibbles 1 @12, 2 @16
        const uint32_t p2 = __byte_perm(w[j], half, 0x7320);  // nibbles 5 @12, 6 @16
        const uint32_t p3 = __byte_perm(w[j], half, 0x7030);  // nibbles 7 @12, 0 @16
        a16 = fmaf(xa.x, nib16(p3), a16);
        a12 = fmaf(xa.y, nib12(p1), a12);
        a16 = fmaf(xa.z, nib16(p1), a16);
        a12 = fmaf(xa.w, nib12(p0), a12);
        a16 = fmaf(xb.x, nib16(p0), a16);
        a12 = fmaf(xb.y, nib12(p2), a12);
        a16 = fmaf(xb.z, nib16(p2), a16);
        a12 = fmaf(xb.w, nib12(p3), a12);
    }
    const float xe = x.s.x + x.s.z, xo = x.s.y + x.s.w;  // two 16s: even, odd, even, odd
    const float xq = fmaf(256.f, fmaf(-0.5f, xe, a16), 4096.f * fmaf(-0.5f, xo, a12));  // sum x q
    return fmaf(-z, xe + xo, xq);
}

// 16 int8 codes (columns k0 .. k0 + 16, 4 per word): sum of x * (q - z).
__device__ __forceinline__ float chunk_int8(const uint4 c, const XChunk<4>& x, float z) {
    const uint32_t w[4] = {c.x, c.y, c.z, c.w};
    float a = 0.f;  // sum x (1 + q / 32768)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float4 xv = x.u[j];
        // Bytes 4..7 are 1.0f's: result 0x3f80 qq 00 with byte i of the word at bits 8..15.
        a = fmaf(xv.x, __uint_as_float(__byte_perm(w[j], 0x3f800000u, 0x7604)), a);
        a = fmaf(xv.y, __uint_as_float(__byte_perm(w[j], 0x3f800000u, 0x7614)), a);
        a = fmaf(xv.z, __uint_as_float(__byte_perm(w[j], 0x3f800000u, 0x7624)), a);
        a = fmaf(xv.w, __uint_as_float(__byte_perm(w[j], 0x3f800000u, 0x7634)), a);
    }
    const float xs = x.s.x + x.s.y;
    return fmaf(-z, xs, 32768.f * (a - xs));
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

// 32 e2m1 codes (columns k0 .. k0 + 32, low nibble first): sum of x * v.
__device__ __forceinline__ float chunk_mxfp4(const uint4 c, const XChunk<8>& x) {
    const uint32_t w[4] = {c.x, c.y, c.z, c.w};
    float a = 0.f;  // sum x (0.5 + u / 256), u = 12 + 2 v
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t lo = e2m1x4_offset(w[j]), hi = e2m1x4_offset(w[j] >> 16);
        const float4 xa = x.u[2 * j], xb = x.u[2 * j + 1];
        // Bytes 4..7 are 0.5f's (0x3f000000): result 0x3f uu 00 00, u < 128 leaves the exponent.
        a = fmaf(xa.x, __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7044)), a);
        a = fmaf(xa.y, __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7144)), a);
        a = fmaf(xa.z, __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7244)), a);
        a = fmaf(xa.w, __uint_as_float(__byte_perm(lo, 0x3f000000u, 0x7344)), a);
        a = fmaf(xb.x, __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7044)), a);
        a = fmaf(xb.y, __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7144)), a);
        a = fmaf(xb.z, __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7244)), a);
        a = fmaf(xb.w, __uint_as_float(__byte_perm(hi, 0x3f000000u, 0x7344)), a);
    }
    const float xs = (x.s.x + x.s.y) + (x.s.z + x.s.w);
    // sum x u = 256 (a - xs / 2); sum x v = (sum x u - 12 xs) / 2.
    return fmaf(128.f, a - 0.5f * xs, -6.f * xs);
}

// 16 e4m3fn codes (columns k0 .. k0 + 16): sum of x * e4m3(q).
__device__ __forceinline__ float chunk_fp8(const uint4 c, const XChunk<4>& x) {
    const uint32_t w[4] = {c.x, c.y, c.z, c.w};
    float a = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float4 xv = x.u[j];
        float f[4];
        ptx::e4m3x4_to_f32(w[j], f);
        a = fmaf(xv.x, f[0], a);
        a = fmaf(xv.y, f[1], a);
        a = fmaf(xv.z, f[2], a);
        a = fmaf(xv.w, f[3], a);
    }
    return a;
}

// 8 plain weights of T (columns k0 .. k0 + 8): sum of x * w.
template <typename T>
__device__ __forceinline__ float chunk_plain(const uint4 c, const XChunk<2>& x) {
    float w[8];
    Vec16<T> v;
    *reinterpret_cast<uint4*>(&v) = c;
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = Float<T>::to_f32(v.v[i]);
    const float4 xa = x.u[0], xb = x.u[1];
    float a = xa.x * w[0];
    a = fmaf(xa.y, w[1], a);
    a = fmaf(xa.z, w[2], a);
    a = fmaf(xa.w, w[3], a);
    a = fmaf(xb.x, w[4], a);
    a = fmaf(xb.y, w[5], a);
    a = fmaf(xb.z, w[6], a);
    return fmaf(xb.w, w[7], a);
}

// ---- the formats' policies: one row's chunk, scale and zero point included ----

// kFastPlain: the model dtype's plain weights (not in a blob).
enum FastKind : int { kFastNone = 0, kFastInt4, kFastInt8, kFastMxfp4, kFastFp8, kFastBf16, kFastPlain };

// The v2 decoder that takes expert q's rows of kd columns, or kFastNone (the per-8 decoder).
__device__ __forceinline__ int fast_kind(const QuantExpert& q, int kd) {
    const bool pow2 = q.group > 0 && (q.group & (q.group - 1)) == 0;
    switch (q.format) {
        case kQInt:
            if (q.g_idx >= 0 || !pow2) return kFastNone;
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

// Row r's chunk at column k0 of expert q (KIND = fast_kind(q, kd), not kFastPlain), scaled.
template <int KIND>
__device__ __forceinline__ float chunk_packed(const uint8_t* blob, const QuantExpert& q, int kd, int r, int k0,
                                              const uint4 c, const XChunk<kChunkCols<KIND> / 4>& x) {
    if constexpr (KIND == kFastInt4 || KIND == kFastInt8) {
        const int groups = kd / q.group;
        const int64_t rg = int64_t(r) * groups + (k0 >> (31 - __clz(q.group)));
        const float s = __half2float(reinterpret_cast<const __half*>(blob + q.scales)[rg]);
        const float z = q.zeros >= 0 ? float(blob[q.zeros + rg]) : float(1 << (q.bits - 1));
        if constexpr (KIND == kFastInt4) return s * chunk_int4(c, x, z);
        else return s * chunk_int8(c, x, z);
    } else if constexpr (KIND == kFastMxfp4) {
        return e8m0_to_f32(blob[q.scales + (int64_t(r) * kd + k0) / 32]) * chunk_mxfp4(c, x);
    } else if constexpr (KIND == kFastFp8) {
        const int kb = (kd + 127) / 128;
        return reinterpret_cast<const float*>(blob + q.scales)[(r / 128) * kb + k0 / 128] * chunk_fp8(c, x);
    } else {
        return chunk_plain<__nv_bfloat16>(c, x);  // kFastBf16
    }
}

// ---- the mainloop ----

// One lane's loop over R rows of one expert for one decoder kind: two 16-byte chunks per row in
// flight per step, the chunk at column 32 * cols * step + cols * lane; each chunk's x loaded
// once for the R rows.
template <int KIND, typename T, int R>
__device__ __forceinline__ void stream_rows(const uint8_t* blob, const QuantExpert& q, const uint8_t* codes,
                                            int64_t row_bytes, int kd, const int (&row)[R], const StagedX& xs,
                                            float (&acc)[R]) {
    constexpr int kCols = kChunkCols<KIND>;
    const int nch = kd / kCols;
    auto chunk = [&](int r, int k0, const uint4 c, const XChunk<kCols / 4>& x) {
        if constexpr (KIND == kFastPlain) return chunk_plain<T>(c, x);
        else return chunk_packed<KIND>(blob, q, kd, r, k0, c, x);
    };
    int c = threadIdx.x & 31;
    for (; c + 32 < nch; c += 64) {
        uint4 v0[R], v1[R];
#pragma unroll
        for (int i = 0; i < R; ++i) {
            v0[i] = __ldg(reinterpret_cast<const uint4*>(codes + row[i] * row_bytes) + c);
            v1[i] = __ldg(reinterpret_cast<const uint4*>(codes + row[i] * row_bytes) + c + 32);
        }
        {
            const XChunk<kCols / 4> x = load_xchunk<kCols / 4>(xs, c * kCols);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i] += chunk(row[i], c * kCols, v0[i], x);
        }
        {
            const XChunk<kCols / 4> x = load_xchunk<kCols / 4>(xs, (c + 32) * kCols);
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i] += chunk(row[i], (c + 32) * kCols, v1[i], x);
        }
    }
    if (c < nch) {
        uint4 v0[R];
#pragma unroll
        for (int i = 0; i < R; ++i) v0[i] = __ldg(reinterpret_cast<const uint4*>(codes + row[i] * row_bytes) + c);
        const XChunk<kCols / 4> x = load_xchunk<kCols / 4>(xs, c * kCols);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[i] += chunk(row[i], c * kCols, v0[i], x);
    }
}

}  // namespace moe
