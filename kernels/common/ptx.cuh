// Every inline-PTX instruction the kernels use, behind one small vocabulary of device helpers:
// warp-level matrix multiply-accumulate, shared-memory matrix loads, asynchronous copies, the
// byte permute, the three-input logic op, the paired 16-bit fma and the FP8 conversion.
//
// This header is the single switch point for the CPU emulator (emu/): built with MOE_EMU
// defined, each helper is the emulator's host twin of the instruction, implemented from the PTX
// ISA's own definition; otherwise it is the instruction itself. A kernel never writes `asm`
// itself, so an instruction the emulator does not know is a build error there, never a silent
// fallback.
//
// Names follow ThunderKittens: the destination comes first. Fragment layouts are the PTX ISA's
// (section "Matrix Fragments for mma.m16n8k16 with floating point type"): with g = lane / 4 and
// t = lane % 4,
//   A 16 x 16, row-major, 4 x b32: a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 8+2t..),
//     a[3] (g+8, 8+2t..); the lower column in the low 16 bits
//   B 16 x 8 (k x n), "col": b0 (k = 2t..2t+1, n = g), b1 (k = 8+2t.., n = g)
//   C, D 16 x 8 f32: c[0], c[1] (g, 2t), (g, 2t+1); c[2], c[3] (g+8, 2t), (g+8, 2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(MOE_EMU)
#include <moe_emu/ptx.h>
#endif

namespace moe {
namespace ptx {

// acc = A . B + acc over one m16n8k16 tile, bf16 or f16 in, f32 accumulation.
template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(MOE_EMU)
        ::moe_emu::mma_m16n8k16(::moe_emu::kMmaBf16, acc, a, b0, b1);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(MOE_EMU)
        ::moe_emu::mma_m16n8k16(::moe_emu::kMmaF16, acc, a, b0, b1);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
    }
};

// The 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix .m8n8 .b16: N (1, 2 or 4) 8 x 8 matrices of 16-bit elements from shared memory.
// Lanes 8i .. 8i + 7 give the 16-byte-aligned addresses of the rows of matrix i (lanes past 8N
// are ignored); lane l receives in r[i] row l / 4, columns 2(l % 4) and 2(l % 4) + 1 of matrix i
// (TRANS: the transpose, i.e. rows 2(l % 4) and 2(l % 4) + 1 of column l / 4), the first in the
// low 16 bits. Every lane of the warp must execute it.
template <int N, bool TRANS = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* smem) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const uint32_t addr = smem_addr(smem);
#if defined(MOE_EMU)
    ::moe_emu::ldmatrix(N, TRANS, r, addr);
#else
    if constexpr (N == 1 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
    else if constexpr (N == 1)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(addr));
    else if constexpr (N == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
    else if constexpr (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
    else if constexpr (!TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
#endif
}

// cp.async.cg: 16 bytes global -> shared, bypassing L1, completing at a later cp_async_wait.
// src_bytes < 16 reads that many bytes and zero-fills the rest (0: reads nothing). Both addresses
// 16-byte aligned.
__device__ __forceinline__ void cp_async_cg16(void* smem, const void* gmem, uint32_t src_bytes) {
    const uint32_t dst = smem_addr(smem);
#if defined(MOE_EMU)
    ::moe_emu::cp_async(dst, gmem, 16, src_bytes, true);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
#endif
}

// cp.async.ca: BYTES (4, 8 or 16) global -> shared through L1; src_bytes as above; both
// addresses BYTES-aligned.
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem, uint32_t src_bytes) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    const uint32_t dst = smem_addr(smem);
#if defined(MOE_EMU)
    ::moe_emu::cp_async(dst, gmem, BYTES, src_bytes, false);
#else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(BYTES), "r"(src_bytes));
#endif
}

// Closes this thread's open cp.async operations into one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(MOE_EMU)
    ::moe_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's most recent groups are pending: every earlier group's
// bytes have landed (for this thread; other threads see them after a barrier).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(MOE_EMU)
    ::moe_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Commits the open operations and waits for all of this thread's groups.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(MOE_EMU)
    ::moe_emu::cp_async_wait_all();
#else
    asm volatile("cp.async.wait_all;\n" ::);
#endif
}

// prmt.b32 in its generic mode ("Data Movement and Conversion Instructions: prmt"): byte n of
// the result is the byte of the 8-byte value {b, a} (a bytes 0..3, b bytes 4..7) that the low 3
// bits of selector nibble n name; where bit 3 of that nibble is set, the byte's top bit is
// replicated over all 8 bits instead. Only the low 16 bits of sel are read.
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(MOE_EMU)
    return ::moe_emu::prmt(a, b, sel);
#else
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
#endif
}

// lop3.b32 d, a, b, c, LUT ("Logic and Shift Instructions: lop3"): bit i of d is bit
// (a_i << 2 | b_i << 1 | c_i) of LUT; e.g. (a & b) | c is 0xea. Written out where the compiler
// would otherwise split a mask and an OR with two constants into two instructions.
template <uint32_t LUT>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
    static_assert(LUT < 256, "an 8-bit truth table");
#if defined(MOE_EMU)
    return ::moe_emu::lop3(a, b, c, LUT);
#else
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(LUT));
    return d;
#endif
}

// fma.rn.{bf16x2,f16x2} d, a, b, c ("Half Precision Floating Point Instructions: fma"): in each
// 16-bit half, a * b + c of T rounded once to nearest even (sm_80 and later for bf16x2).
template <typename T>
constexpr bool kIsBf16 = false;
template <>
constexpr bool kIsBf16<__nv_bfloat16> = true;

template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    constexpr bool kBf16 = kIsBf16<T>;
    uint32_t d;
#if defined(MOE_EMU)
    d = ::moe_emu::fma_x2(kBf16 ? ::moe_emu::kMmaBf16 : ::moe_emu::kMmaF16, a, b, c);
#else
    if constexpr (kBf16) asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    else asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#endif
    return d;
}

// The four e4m3fn values of v (byte i is value i) as f32, exactly (0x7f and 0xff are NaN). From
// sm_89 two cvt.rn.f16x2.e4m3x2 ("cvt", the f16x2 from e4m3x2 form: the value of the low byte
// in the low half) and four f16-to-f32 conversions; before it, bit arithmetic per byte.
__device__ __forceinline__ void e4m3x4_to_f32(uint32_t v, float (&out)[4]) {
#if defined(MOE_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890)
    uint32_t h[2];
#if defined(MOE_EMU)
    h[0] = ::moe_emu::cvt_f16x2_e4m3x2(uint16_t(v));
    h[1] = ::moe_emu::cvt_f16x2_e4m3x2(uint16_t(v >> 16));
#else
    asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.rn.f16x2.e4m3x2 %0, lo;\ncvt.rn.f16x2.e4m3x2 %1, hi;\n}\n"
        : "=r"(h[0]), "=r"(h[1])
        : "r"(v));
#endif
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(h[i] & 0xffffu)));
        out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(h[i] >> 16)));
    }
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t b = (v >> (8 * i)) & 0xffu;
        const uint32_t sign = (b & 0x80u) << 24, e = (b >> 3) & 15, m = b & 7;
        float f;
        if (e == 15 && m == 7) f = __int_as_float(0x7fffffff);
        else if (e == 0) f = __int_as_float(int(__float_as_uint(float(m) * 0.001953125f) | sign));
        else f = __int_as_float(int(sign | ((e + 120) << 23) | (m << 20)));
        out[i] = f;
    }
#endif
}

}  // namespace ptx
}  // namespace moe
