// The CPU emulator's twins of the PTX instructions in kernels/common/ptx.cuh, each implemented
// in emu/runtime from the PTX ISA's definition (the section named beside each).
#pragma once

#include <stdint.h>

namespace moe_emu {

enum MmaKind : int { kMmaBf16 = 0, kMmaF16 = 1 };

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ("Matrix Fragments for
// mma.m16n8k16 with floating point type"): acc = A . B + acc. A warp collective of all 32 lanes.
void mma_m16n8k16(int kind, float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 ("Warp-level matrix load
// instruction: ldmatrix"). A warp collective of all 32 lanes; r holds n registers.
void ldmatrix(int n, bool trans, uint32_t* r, uint32_t smem_addr);

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size ("Data Movement and Conversion
// Instructions: cp.async"): the bytes land at the cp.async.wait_group that covers their group.
void cp_async(uint32_t dst, const void* src, int cp_size, uint32_t src_size, bool cg);
void cp_async_commit();
void cp_async_wait(int n);
void cp_async_wait_all();

// prmt.b32, generic mode ("Data Movement and Conversion Instructions: prmt"): the 8 bytes
// {b, a} are numbered 0..7 from a's low byte; result byte n is byte (sel >> 4n) & 7, or, where
// bit 3 of that nibble is set, the top bit of that byte replicated over the 8 bits.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    const uint64_t bytes = (uint64_t(b) << 32) | a;
    uint32_t d = 0;
    for (int n = 0; n < 4; ++n) {
        const uint32_t s = (sel >> (4 * n)) & 15u;
        uint32_t v = uint32_t(bytes >> (8 * (s & 7u))) & 0xffu;
        if (s & 8u) v = (v & 0x80u) ? 0xffu : 0u;
        d |= v << (8 * n);
    }
    return d;
}

// cvt.rn.f16x2.e4m3x2 d, a ("cvt", conversions from e4m3x2): the e4m3fn value in a's low byte
// to d's low half, the high byte's to the high half. Every e4m3fn value is exact in f16:
// +-0, subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e - 7) up to 448; S.1111.111 is NaN
// (0x7fff here: the canonical NaN, sign dropped).
inline uint16_t e4m3_to_f16_bits(uint32_t b) {
    const uint32_t sign = (b & 0x80u) << 8, e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15u && m == 7u) return 0x7fffu;
    if (e != 0u) return uint16_t(sign | ((e + 8u) << 10) | (m << 7));  // f16 exponent e - 7 + 15
    if (m == 0u) return uint16_t(sign);
    // m * 2^-9 with m's top bit p: 2^(p - 9) * (1 + (m - 2^p) / 2^p), a normal f16.
    const uint32_t p = m >= 4u ? 2u : (m >= 2u ? 1u : 0u);
    return uint16_t(sign | ((p + 6u) << 10) | ((m - (1u << p)) << (10u - p)));
}

inline uint32_t cvt_f16x2_e4m3x2(uint16_t a) {
    return uint32_t(e4m3_to_f16_bits(a & 0xffu)) | (uint32_t(e4m3_to_f16_bits(uint32_t(a) >> 8)) << 16);
}

// ---- Hopper (sm_90a), kernels/common/ptx_sm90.cuh; implemented in emu/runtime/hopper.cpp ----

// mbarrier.init / inval / arrive / expect_tx / try_wait.parity on the shared::cta object at
// shared offset `bar` ("Parallel Synchronization and Communication Instructions: mbarrier").
void mbarrier_init(uint32_t bar, uint32_t count);
void mbarrier_inval(uint32_t bar);
uint64_t mbarrier_arrive(uint32_t bar, uint32_t count);
void mbarrier_expect_tx(uint32_t bar, uint32_t tx);
uint64_t mbarrier_arrive_expect_tx(uint32_t bar, uint32_t tx);
bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity);

// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], size, [bar]
// ("Data Movement and Conversion Instructions: cp.async.bulk").
void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar);

// cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes
// [dst], [map, {coords}], [bar] ("cp.async.bulk.tensor"): coords innermost first.
void bulk_tensor_g2s(uint32_t dst, const void* map, int rank, const int32_t* coords, uint32_t bar);

// elect.sync _|p, membermask ("elect.sync"): a warp collective; true in one lane of the mask.
bool elect_sync(uint32_t mask);

// setmaxnreg.{inc,dec}.sync.aligned.u32 n ("setmaxnreg"): checked, otherwise nothing.
void setmaxnreg(bool inc, uint32_t n);

// wgmma.fence / commit_group / wait_group and wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}
// with both operands from shared memory, K-major ("Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate Instructions"): d holds the thread's N / 2 accumulators. Warpgroup collectives.
void wgmma_fence();
void wgmma_mma_async(int kind, uint32_t n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d);
void wgmma_commit();
void wgmma_wait(int n);

// fence.proxy.async.shared::cta ("membar / fence"): orders this block's generic-proxy writes to
// shared memory before the async proxy's later reads of them (wgmma, bulk stores).
void fence_proxy_async();

}  // namespace moe_emu
