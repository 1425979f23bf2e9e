// Decoding compressed expert weights in registers, shared by the kernels that read them
// (kernels/quant.cu, kernels/decode.cu). The formats and their exactness are documented in
// quant.cu and quant_params.cuh.
#pragma once

#include "dtype.cuh"
#include "quant_params.cuh"
#include "reduce.cuh"

namespace moe {

__device__ __forceinline__ float e2m1_to_f32(uint32_t c) {
    const uint32_t e = (c >> 1) & 3, m = c & 1;
    // Exponent 0 is subnormal (0 or 0.5); otherwise (1 + m/2) * 2^(e-1).
    const float mag = e == 0 ? 0.5f * float(m) : (1.f + 0.5f * float(m)) * float(1u << (e - 1));
    return (c & 8) ? -mag : mag;
}

__device__ __forceinline__ float e8m0_to_f32(uint32_t c) {
    if (c == 255) return __int_as_float(0x7fffffff);
    return c == 0 ? __int_as_float(0x00400000) : __int_as_float(int(c << 23));  // 2^-127 is subnormal
}

__device__ __forceinline__ float e4m3_to_f32(uint32_t b) {
    const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) return __int_as_float(0x7fffffff);
    if (e == 0) return __int_as_float(int(__float_as_uint(float(m) * 0.001953125f) | sign));  // m/8 * 2^-6
    return __int_as_float(int(sign | ((e + 120) << 23) | (m << 20)));
}

// decode8 for an integer expert laid out again in group order (act-order, quant_params.cuh):
// column k + i is stored column inv[k + i], in group inv[k + i] / group (always in range). A
// call, not inlined: it keeps the register budget of the kernels that inline decode8 as it was.
static __device__ __noinline__ void decode8_stored_order(const uint8_t* blob, const QuantExpert& x, int kdim,
                                                            int r, int k, float (&w)[8]) {
    const uint32_t* inv = reinterpret_cast<const uint32_t*>(blob + x.perm) + kdim;
    const uint32_t* row = reinterpret_cast<const uint32_t*>(blob + x.codes) + int64_t(r) * kdim * x.bits / 32;
    const int64_t rg = int64_t(r) * (kdim / x.group);
    const int per = 32 / x.bits;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int j = int(inv[k + i]), g = j / x.group;
        const uint32_t code = (row[j / per] >> (x.bits * (j % per))) & ((1u << x.bits) - 1u);
        const int zero = x.zeros >= 0 ? int(blob[x.zeros + rg + g]) : (1 << (x.bits - 1));
        w[i] = __fmul_rn(float(int(code) - zero), __half2float(reinterpret_cast<const __half*>(blob + x.scales)[rg + g]));
    }
}

// The decoded columns k .. k + 8 (k a multiple of 8) of row r of expert x; not for ternary.
__device__ __forceinline__ void decode8(const uint8_t* blob, const QuantExpert& x, int kdim, int r, int k,
                                        int32_t* status, float (&w)[8]) {
    const int64_t rk = int64_t(r) * kdim + k;
    switch (x.format) {
        case kQBf16: {
            load8(reinterpret_cast<const __nv_bfloat16*>(blob + x.codes) + rk, w);
            break;
        }
        case kQInt: {
            if (x.perm >= 0) {
                decode8_stored_order(blob, x, kdim, r, k, w);
                break;
            }
            const uint32_t* q = reinterpret_cast<const uint32_t*>(blob + x.codes) + rk * x.bits / 32;
            const __half* s = reinterpret_cast<const __half*>(blob + x.scales);
            const uint8_t* z = x.zeros >= 0 ? blob + x.zeros : nullptr;
            const uint32_t* g_idx = x.g_idx >= 0 ? reinterpret_cast<const uint32_t*>(blob + x.g_idx) : nullptr;
            const int groups = kdim / x.group;
            const uint32_t q0 = q[0], q1 = x.bits == 8 ? q[1] : 0u;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint32_t code = x.bits == 4 ? (q0 >> (4 * i)) & 15u : ((i < 4 ? q0 : q1) >> (8 * (i & 3))) & 255u;
                const int g = g_idx != nullptr ? int(g_idx[k + i]) : (k + i) / x.group;
                if (g < 0 || g >= groups) {
                    atomicAdd(status, 1);
                    w[i] = 0.f;
                    continue;
                }
                const int64_t rg = int64_t(r) * groups + g;
                const int zero = z != nullptr ? int(z[rg]) : (1 << (x.bits - 1));
                w[i] = __fmul_rn(float(int(code) - zero), __half2float(s[rg]));
            }
            break;
        }
        case kQMxfp4: {
            const uint32_t q = *reinterpret_cast<const uint32_t*>(blob + x.codes + rk / 2);
            const float s = e8m0_to_f32(blob[x.scales + int64_t(r) * mxfp4_scale_row(kdim) + k / 32]);
#pragma unroll
            for (int i = 0; i < 8; ++i) w[i] = __fmul_rn(e2m1_to_f32((q >> (4 * i)) & 15u), s);
            break;
        }
        default: {  // kQFp8
            const uint2 q = *reinterpret_cast<const uint2*>(blob + x.codes + rk);
            const int kb = (kdim + 127) / 128;
            const float s = reinterpret_cast<const float*>(blob + x.scales)[(r / 128) * kb + k / 128];
#pragma unroll
            for (int i = 0; i < 8; ++i) w[i] = __fmul_rn(e4m3_to_f32(((i < 4 ? q.x : q.y) >> (8 * (i & 3))) & 255u), s);
            break;
        }
    }
}

// Walks row r of ternary expert x, 32 codewords per step, and calls emit(p, w0, w1) for every
// symbol p of the row (columns 2p and 2p + 1, decoded). Every lane of the warp must call it.
template <typename Emit>
__device__ __forceinline__ void ternary_row(const uint8_t* blob, const QuantExpert& x, int kdim, int r,
                                            int32_t* status, Emit emit) {
    const int lane = threadIdx.x & 31;
    const uint16_t* codes = reinterpret_cast<const uint16_t*>(blob + x.codes);
    const uint32_t* offsets = reinterpret_cast<const uint32_t*>(blob + x.row_offsets);
    const uint64_t* dict = reinterpret_cast<const uint64_t*>(blob + x.dict);
    const __half* lohi = reinterpret_cast<const __half*>(blob + x.scales);
    const float lo = __half2float(lohi[2 * r]), hi = __half2float(lohi[2 * r + 1]);
    const int symbols = kdim / 2;
    const int64_t end = offsets[r + 1];
    int pos = 0;  // symbols of the row before this step's codewords
    for (int64_t c0 = offsets[r]; c0 < end; c0 += 32) {
        uint64_t entry = 0;
        int len = 0;
        if (c0 + lane < end) {
            const uint32_t code = codes[c0 + lane];
            if (code < uint32_t(x.dict_len)) {
                entry = dict[code];
                len = int(entry & 15);
            } else {
                atomicAdd(status, 1);
            }
        }
        int incl = len;  // inclusive prefix sum of the run lengths over the warp
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int y = __shfl_up_sync(kFullMask, incl, off);
            if (lane >= off) incl += y;
        }
        const int start = pos + incl - len;
        pos += __shfl_sync(kFullMask, incl, 31);
        for (int s = 0; s < len; ++s) {
            const int p = start + s;
            if (p >= symbols) {
                atomicAdd(status, 1);
                break;
            }
            const uint32_t sym = uint32_t(entry >> (4 + 4 * s)) & 15u;
            const uint32_t t0 = sym % 3, t1 = sym / 3;
            emit(p, t0 == 1 ? lo : (t0 == 2 ? hi : 0.f), t1 == 1 ? lo : (t1 == 2 ? hi : 0.f));
        }
    }
}

}  // namespace moe
