// The experts a decode batch chose, for kernels that give a block to each chosen expert (the
// by-expert decode GEMVs, the LoRA shrink in decode mode): block y takes the y-th smallest
// distinct id in [0, experts) of ids [T, K], and the slots that chose it, in order.
#pragma once

#include <stdint.h>

#include "reduce.cuh"

namespace moe {

constexpr int kChosenMaxExperts = 1024;  // the routing kernels' largest instance

// Warp-wide (all 32 lanes call it): the y-th smallest distinct id in [0, experts) among ids[0, n)
// (experts <= kChosenMaxExperts), or -1 where fewer than y + 1 were chosen. `bits`: 32 words of
// shared memory.
__device__ __forceinline__ int nth_chosen_expert(const int32_t* ids, int n, int experts, int y, uint32_t* bits) {
    const int lane = threadIdx.x & 31;
    bits[lane] = 0u;
    __syncwarp();
    for (int i = lane; i < n; i += 32) {
        const int id = ids[i];
        if (id >= 0 && id < experts) atomicOr(&bits[id >> 5], 1u << (id & 31));
    }
    __syncwarp();
    // The y-th set bit of the 1024-bit set: a prefix sum of the words' counts over the warp.
    const uint32_t word = bits[lane];
    const int count = __popc(word);
    int incl = count;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += v;
    }
    const int before = incl - count;
    const uint32_t owner = __ballot_sync(kFullMask, y >= before && y < incl);
    if (owner == 0u) return -1;
    const int src = __ffs(owner) - 1;
    int e = -1;
    if (lane == src) {
        uint32_t w = word;
        for (int r = y - before; r > 0; --r) w &= w - 1u;  // drop the lower set bits
        e = 32 * lane + __ffs(w) - 1;
    }
    return __shfl_sync(kFullMask, e, src);
}

// Warp-wide: the indices i < n with ids[i] == e, ascending, into list (a ballot per 32; the
// first `cap`); returns how many there are (every lane).
__device__ __forceinline__ int slots_of_expert(const int32_t* ids, int n, int e, int32_t* list, int cap) {
    const int lane = threadIdx.x & 31;
    int found = 0;
    for (int base = 0; base < n; base += 32) {
        const int i = base + lane;
        const bool hit = i < n && ids[i] == e;
        const uint32_t m = __ballot_sync(kFullMask, hit);
        const int at = found + __popc(m & ((1u << lane) - 1u));
        if (hit && at < cap) list[at] = i;
        found += __popc(m);
    }
    return found;
}

}  // namespace moe
