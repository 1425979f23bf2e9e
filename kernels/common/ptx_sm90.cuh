// Hopper-only (sm_90a) instructions, as ptx.cuh does it for the rest: the instruction itself
// for nvcc, the CPU emulator's twin with MOE_EMU (emu/runtime/hopper.cpp). For *_sm90a.cu files
// only: mbarriers with transaction counts, the bulk copy engine with tensor maps, elect.sync,
// setmaxnreg, the async-proxy fence and wgmma with both operands in shared memory.
//
// An mbarrier (a uint64_t in shared memory) counts arrivals and transaction bytes per phase;
// a phase completes when both reach zero, and its parity flips. mbarrier_wait(bar, p) returns
// once the phase of parity p has completed: on a fresh barrier (phase 0), p = 0 waits for the
// first completion and p = 1 returns at once.
#pragma once

#include "ptx.cuh"

#if !defined(MOE_EMU)
#include <cuda.h>  // CUtensorMap
#endif

namespace moe {
namespace ptx {

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if defined(MOE_EMU)
    ::moe_emu::mbarrier_init(smem_addr(bar), count);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}

// One arrival.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if defined(MOE_EMU)
    ::moe_emu::mbarrier_arrive(smem_addr(bar), 1);
#else
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// Raises the phase's expected transaction bytes by `tx`, then arrives once.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx) {
#if defined(MOE_EMU)
    ::moe_emu::mbarrier_arrive_expect_tx(smem_addr(bar), tx);
#else
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(tx)
                 : "memory");
#endif
}

// Raises the phase's expected transaction bytes by `tx`, without arriving.
__device__ __forceinline__ void mbarrier_expect_tx(uint64_t* bar, uint32_t tx) {
#if defined(MOE_EMU)
    ::moe_emu::mbarrier_expect_tx(smem_addr(bar), tx);
#else
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(tx)
                 : "memory");
#endif
}

// True once the phase of parity `parity` has completed (may also return false early on the GPU).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
#if defined(MOE_EMU)
    return ::moe_emu::mbarrier_try_wait_parity(smem_addr(bar), parity);
#else
    uint32_t ok;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return ok != 0;
#endif
}

__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
    while (!mbarrier_try_wait_parity(bar, parity)) {
    }
}

// The 2-D tile of `map` at (c0 innermost, c1) into shared `dst` (128-byte aligned; laid out as
// the map's box, swizzled as the map says), its bytes counted on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int32_t c0, int32_t c1) {
#if defined(MOE_EMU)
    const int32_t c[2] = {c0, c1};
    ::moe_emu::bulk_tensor_g2s(smem_addr(dst), map, 2, c, smem_addr(bar));
#else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
        "[%2];\n" ::"r"(smem_addr(dst)),
        "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
        : "memory");
#endif
}

// `bytes` (a multiple of 16) from global `src` to shared `dst`, both 16-byte aligned, counted on
// `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(MOE_EMU)
    ::moe_emu::bulk_copy_g2s(smem_addr(dst), src, bytes, smem_addr(bar));
#else
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
#endif
}

// True in one lane of `mask`, the same one for the same mask (which one, the PTX ISA does not
// say: the emulator elects the highest); every lane of the mask must execute it.
__device__ __forceinline__ bool elect_one(uint32_t mask = 0xffffffffu) {
#if defined(MOE_EMU)
    return ::moe_emu::elect_sync(mask);
#else
    uint32_t pred;
    asm volatile("{\n .reg .b32 rx;\n .reg .pred px;\n elect.sync rx|px, %1;\n selp.u32 %0, 1, 0, px;\n}\n"
                 : "=r"(pred)
                 : "r"(mask));
    return pred != 0;
#endif
}

// Registers per thread of this warpgroup raised (INC) or lowered to N: 24 to 256, a multiple of 8.
template <uint32_t N, bool INC>
__device__ __forceinline__ void setmaxnreg() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24 to 256, a multiple of 8");
#if defined(MOE_EMU)
    ::moe_emu::setmaxnreg(INC, N);
#else
    if constexpr (INC)
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
    else
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

// Orders this thread's earlier generic-proxy writes to shared memory (plain stores, cp.async)
// before the async proxy's later reads of them: needed before a wgmma reads a tile written so.
// (Bytes a bulk copy wrote are async-proxy already, and visible after their mbarrier's wait.)
__device__ __forceinline__ void fence_proxy_async() {
#if defined(MOE_EMU)
    ::moe_emu::fence_proxy_async();
#else
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---- wgmma ----------------------------------------------------------------------------------
//
// D (64 x N, f32) += A (64 x 16) . B^T, B being N x 16, both K-major in shared memory, named by
// descriptors. All 128 threads of a warpgroup (threads 128g .. 128g + 127) execute each of these
// together. Thread t holds D's register v at row 16 (t / 32) + (t % 32) / 4 + 8 ((v / 2) % 2),
// column 8 (v / 4) + 2 (t % 4) + v % 2. The accumulators may be read or written again only after
// a wgmma_wait that covers the operation's group; wgmma_fence must come before the first one.

// The swizzle field of a shared-memory matrix descriptor (not the tensor map's numbering).
enum class DescSwizzle : uint32_t { None = 0, B128 = 1, B64 = 2, B32 = 3 };

// The descriptor of a K-major operand at `smem`: bits 13-0 the start address >> 4, 29-16 the
// leading byte offset >> 4 (between the two 8-column core matrices, unswizzled; unused when
// swizzled), 45-32 the stride byte offset >> 4 (between 8-row groups), 51-49 base offset 0 (the
// tile is aligned to its swizzle's repeat), 63-62 the swizzle.
__device__ __forceinline__ uint64_t smem_desc(const void* smem, uint32_t lbo, uint32_t sbo, DescSwizzle sw) {
    const uint64_t a = smem_addr(smem);
    return ((a & 0x3ffffu) >> 4) | (uint64_t((lbo & 0x3ffffu) >> 4) << 16) | (uint64_t((sbo & 0x3ffffu) >> 4) << 32) |
           (uint64_t(sw) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(MOE_EMU)
    ::moe_emu::wgmma_fence();
#else
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(MOE_EMU)
    ::moe_emu::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Tells the compiler that the accumulators are read and written here, so that it neither moves
// their uses across the wgmma instructions nor copies them while one is in flight (an empty asm
// on each register, as CUTLASS's warpgroup_fence_operand does). Nothing for the emulator, whose
// accumulators live in memory the twins reach through a pointer.
template <int N>
__device__ __forceinline__ void fence_operand(float (&d)[N]) {
#if !defined(MOE_EMU)
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d;
#endif
}

// Waits until at most N of this warpgroup's most recent wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group N, 0 to 7");
#if defined(MOE_EMU)
    ::moe_emu::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// d = A . B^T + (accumulate ? d : 0), m64nNk16, f32 accumulators; N = 64 or 128.
template <typename T, int N> struct Wgmma;

// The asm of m64nNk16 for input type TY ("bf16" or "f16"): N / 2 accumulator registers, the two
// descriptors, scale-d from a predicate, imm-scale-a/b 1, no transpose.
#define MOE_WGMMA_REGS32 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MOE_WGMMA_REGS64 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, " \
    "%39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, " \
    "%58, %59, %60, %61, %62, %63}"
#define MOE_WGMMA_OUT32 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define MOE_WGMMA_OUT64 \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), \
    "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), \
    "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), \
    "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), \
    "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define MOE_WGMMA_ASM(N, TY, REGS, OUTS, A, B, S)                                                          \
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %" S ", 0;\n"                                       \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " REGS ", %" A ", %" B  \
                 ", p, 1, 1, 0, 0;\n}\n"                                                                   \
                 : OUTS                                                                                  \
                 : "l"(desc_a), "l"(desc_b), "r"(uint32_t(accumulate)))

template <> struct Wgmma<__nv_bfloat16, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if defined(MOE_EMU)
        ::moe_emu::wgmma_mma_async(::moe_emu::kMmaBf16, 64, d, desc_a, desc_b, accumulate);
#else
        MOE_WGMMA_ASM(64, "bf16", MOE_WGMMA_REGS32, MOE_WGMMA_OUT32, "32", "33", "34");
#endif
    }
};

template <> struct Wgmma<__nv_bfloat16, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if defined(MOE_EMU)
        ::moe_emu::wgmma_mma_async(::moe_emu::kMmaBf16, 128, d, desc_a, desc_b, accumulate);
#else
        MOE_WGMMA_ASM(128, "bf16", MOE_WGMMA_REGS64, MOE_WGMMA_OUT64, "64", "65", "66");
#endif
    }
};

template <> struct Wgmma<__half, 64> {
    static __device__ __forceinline__ void run(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if defined(MOE_EMU)
        ::moe_emu::wgmma_mma_async(::moe_emu::kMmaF16, 64, d, desc_a, desc_b, accumulate);
#else
        MOE_WGMMA_ASM(64, "f16", MOE_WGMMA_REGS32, MOE_WGMMA_OUT32, "32", "33", "34");
#endif
    }
};

template <> struct Wgmma<__half, 128> {
    static __device__ __forceinline__ void run(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if defined(MOE_EMU)
        ::moe_emu::wgmma_mma_async(::moe_emu::kMmaF16, 128, d, desc_a, desc_b, accumulate);
#else
        MOE_WGMMA_ASM(128, "f16", MOE_WGMMA_REGS64, MOE_WGMMA_OUT64, "64", "65", "66");
#endif
    }
};

#undef MOE_WGMMA_ASM
#undef MOE_WGMMA_OUT64
#undef MOE_WGMMA_OUT32
#undef MOE_WGMMA_REGS64
#undef MOE_WGMMA_REGS32

}  // namespace ptx
}  // namespace moe
