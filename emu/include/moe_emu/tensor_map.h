// The emulator's own encoding of a CUtensorMap (128 bytes, 64-byte aligned, opaque to
// programs): what the emulator's cuTensorMapEncodeTiled (emu/src/tmap.rs, whose `TensorMap`
// mirrors this struct field for field) writes and its cp.async.bulk.tensor twin reads.
#pragma once

#include <stdint.h>

namespace moe_emu {

constexpr uint32_t kTensorMapMagic = 0x544d4150u;  // "TMAP"

struct alignas(64) TensorMap {
    uint32_t magic;
    uint32_t dtype;       // CUtensorMapDataType
    uint32_t rank;        // 1..5
    uint32_t elem_bytes;
    uint32_t interleave;  // CUtensorMapInterleave (only NONE is encoded)
    uint32_t swizzle;     // CUtensorMapSwizzle: 0 none, 1 32B, 2 64B, 3 128B
    uint32_t l2_promotion;
    uint32_t oob_fill;    // CUtensorMapFloatOOBfill: 0 zeros, 1 NaN
    uint64_t addr;        // globalAddress
    uint64_t dims[5];     // globalDim, innermost first
    uint64_t strides[4];  // globalStrides in bytes: dimension i + 1's, i < rank - 1
    uint16_t box[5];      // boxDim
    uint8_t elem_strides[5];
    uint8_t pad[1];
};
static_assert(sizeof(TensorMap) == 128, "a CUtensorMap is 128 bytes");

}  // namespace moe_emu
