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

}  // namespace moe_emu
