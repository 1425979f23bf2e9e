// The emulator's tests of Hopper's asynchronous instructions (kernels/common/ptx_sm90.cuh):
// mbarrier phases and transaction counts, the bulk copy engine with tensor maps and their
// swizzles, elect.sync and setmaxnreg, and the planted bugs the emulator must catch
// (emu/tests/hopper.rs). CI also compiles this file with nvcc for sm_90a, which checks the
// inline PTX of ptx_sm90.cuh.

#include <stdint.h>

#include "ptx_sm90.cuh"

struct TmaParams {
    CUtensorMap map;     // 2-D tile map made by cuTensorMapEncodeTiled
    uint8_t* out;        // [2][bytes]: the box as the block sees it (mode 1: before, after)
    const uint8_t* src;  // mode 5: the bytes of a plain bulk copy
    uint32_t* lanes;     // mode 6: [64] elect.sync's answer per thread
    int32_t c0, c1;      // the box's coordinates, innermost first
    int32_t bytes;       // the box's (or the bulk copy's) size in bytes
    int32_t mode;
};

// Modes: 0 a tiled load and a wait; 1 the destination read before and after the wait; 2 a wait
// on a phase nobody completes (planted); 3 expect_tx of 16 bytes too many (planted); 4 no wait
// at all (planted); 5 a plain bulk copy; 6 elect.sync over a partial mask; 7 setmaxnreg of 20
// (planted).
extern "C" __global__ void __launch_bounds__(128) emu_test_tma(const __grid_constant__ TmaParams p) {
    extern __shared__ __align__(1024) uint8_t smem[];
    __shared__ __align__(8) uint64_t bar;
    const int t = threadIdx.x, n = blockDim.x;
    const int bytes = p.bytes;
    if (p.mode == 6) {
        const uint32_t mask = 0xf0f0f0f0u;
        if (t < 64 && (mask >> (t % 32) & 1)) p.lanes[t] = moe::ptx::elect_one(mask) ? 1u : 0u;
        return;
    }
    if (p.mode == 7) {
#if defined(MOE_EMU)
        ::moe_emu::setmaxnreg(true, 20);
#endif
        return;
    }
    for (int i = t; i < bytes; i += n) smem[i] = 0xa5;  // the old bytes
    if (t == 0) moe::ptx::mbarrier_init(&bar, 1);
    __syncthreads();
    if (t == 0) {
        const uint32_t tx = uint32_t(bytes) + (p.mode == 3 ? 16u : 0u);
        moe::ptx::mbarrier_arrive_expect_tx(&bar, tx);
        if (p.mode == 5)
            moe::ptx::bulk_load(smem, p.src, uint32_t(bytes), &bar);
        else
            moe::ptx::tma_load_2d(smem, &p.map, &bar, p.c0, p.c1);
        if (p.mode == 1)
            for (int i = 0; i < bytes; ++i) p.out[i] = smem[i];
    }
    if (p.mode == 4) return;
    moe::ptx::mbarrier_wait(&bar, 0);
    uint8_t* out = p.mode == 1 ? p.out + bytes : p.out;
    for (int i = t; i < bytes; i += n) out[i] = smem[i];
    if (p.mode == 2) moe::ptx::mbarrier_wait(&bar, 1);  // phase 1: nobody arrives
}

struct WgmmaParams {
    const uint16_t* a;  // [64][64] bf16 bits, row-major (K contiguous)
    const uint16_t* b;  // [64][64] bf16 bits: B's 64 rows (N) of 64 (K)
    float* d;           // [64][64] f32 out: A . B^T
    int32_t swizzle;    // the descriptor's: 0 none, 1 128 B, 2 64 B, 3 32 B
    int32_t mode;       // 0 right; planted: 1 no wgmma.fence, 2 no wait_group, 3 no fence.proxy.async,
                        // 4 accumulators written in flight
};

namespace {

// Byte offset of K-major element (r, k) of a 64 x 64 bf16 tile in the canonical layout of each
// swizzle (PTX ISA, "Shared Memory Matrix Layout"), and the descriptor of its 16-column slice kk.
__device__ uint32_t tile_offset(int sw, uint32_t r, uint32_t k) {
    uint32_t o;
    switch (sw) {
        case 0: return (r / 8) * 1024 + (k / 8) * 128 + (r % 8) * 16 + (k % 8) * 2;  // SBO 1024, LBO 128
        case 1: o = r * 128 + k * 2; return o ^ (((o >> 7) & 7u) << 4);
        case 2: o = (k / 32) * (64 * 64) + r * 64 + (k % 32) * 2; return o ^ (((o >> 7) & 3u) << 4);
        default: o = (k / 16) * (64 * 32) + r * 32 + (k % 16) * 2; return o ^ (((o >> 7) & 1u) << 4);
    }
}

__device__ uint64_t slice_desc(int sw, const uint8_t* tile, int kk) {
    using moe::ptx::DescSwizzle;
    switch (sw) {
        case 0: return moe::ptx::smem_desc(tile + kk * 256, 128, 1024, DescSwizzle::None);
        case 1: return moe::ptx::smem_desc(tile + kk * 32, 0, 1024, DescSwizzle::B128);
        case 2: return moe::ptx::smem_desc(tile + (kk / 2) * 4096 + (kk % 2) * 32, 0, 512, DescSwizzle::B64);
        default: return moe::ptx::smem_desc(tile + kk * 2048, 0, 256, DescSwizzle::B32);
    }
}

}  // namespace

// One warpgroup: A and B stored by the threads into their swizzled layout, four chained
// m64n64k16 (K = 64), one commit, one wait, D written out by the accumulator layout.
extern "C" __global__ void __launch_bounds__(128) emu_test_wgmma(const WgmmaParams p) {
    extern __shared__ __align__(1024) uint8_t smem[];
    uint8_t* ta = smem;
    uint8_t* tb = smem + 8192;
    const int t = threadIdx.x;
    for (int i = t; i < 64 * 64; i += 128) {
        const uint32_t r = uint32_t(i / 64), k = uint32_t(i % 64);
        *reinterpret_cast<uint16_t*>(ta + tile_offset(p.swizzle, r, k)) = p.a[i];
        *reinterpret_cast<uint16_t*>(tb + tile_offset(p.swizzle, r, k)) = p.b[i];
    }
    if (p.mode != 3) moe::ptx::fence_proxy_async();
    __syncthreads();
    float d[32];
    for (int v = 0; v < 32; ++v) d[v] = 0.f;
    if (p.mode != 1) moe::ptx::wgmma_fence();
    for (int kk = 0; kk < 4; ++kk) {
        moe::ptx::Wgmma<__nv_bfloat16, 64>::run(d, slice_desc(p.swizzle, ta, kk), slice_desc(p.swizzle, tb, kk),
                                                 kk > 0);
        if (p.mode == 4 && kk == 1) d[0] = 1.f;
    }
    moe::ptx::wgmma_commit();
    if (p.mode != 2) moe::ptx::wgmma_wait<0>();
    for (int v = 0; v < 32; ++v) {
        const int row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((v >> 1) & 1);
        const int col = 8 * (v >> 2) + 2 * (t % 4) + (v & 1);
        p.d[row * 64 + col] = d[v];
    }
}

// Never launched: makes nvcc and ptxas check every wgmma shape ptx_sm90.cuh offers.
extern "C" __global__ void __launch_bounds__(128) emu_test_wgmma_shapes(const WgmmaParams p) {
    float d64[32] = {}, d128[64] = {};
    const uint64_t da = uint64_t(p.swizzle), db = uint64_t(p.mode);
    moe::ptx::wgmma_fence();
    moe::ptx::Wgmma<__nv_bfloat16, 128>::run(d128, da, db, false);
    moe::ptx::Wgmma<__half, 64>::run(d64, da, db, false);
    moe::ptx::Wgmma<__half, 128>::run(d128, da, db, true);
    moe::ptx::wgmma_commit();
    moe::ptx::wgmma_wait<0>();
    p.d[threadIdx.x] = d64[threadIdx.x % 32] + d128[threadIdx.x % 64];
}

struct DescParams {
    uint64_t* out;  // [4]: smem_desc of shared offset 0x1230 + 16 with LBO 128, SBO 1024 per swizzle
};

// The matrix descriptors ptx_sm90.cuh builds, for emu/tests/hopper.rs to read field by field.
extern "C" __global__ void __launch_bounds__(32) emu_test_desc(const DescParams p) {
    extern __shared__ __align__(1024) uint8_t smem[];
    using moe::ptx::DescSwizzle;
    const DescSwizzle sw[4] = {DescSwizzle::None, DescSwizzle::B128, DescSwizzle::B64, DescSwizzle::B32};
    if (threadIdx.x < 4) p.out[threadIdx.x] = moe::ptx::smem_desc(smem + 0x40, 128, 1024, sw[threadIdx.x]);
}
