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
