// The C interface the Rust driver (emu/src/lib.rs) calls: device memory and launches.

#include <cstring>

#include "internal.h"

using namespace moe_emu;

namespace {

int report(Status s, const std::string& msg, char* out, size_t cap) {
    if (out != nullptr && cap > 0) {
        const size_t n = msg.size() < cap - 1 ? msg.size() : cap - 1;
        memcpy(out, msg.data(), n);
        out[n] = 0;
    }
    return int(s);
}

}  // namespace

extern "C" {

int moe_emu_init() { return heap_init() ? 0 : 1; }

size_t moe_emu_memory_limit() { return heap.limit; }
size_t moe_emu_memory_used() { return heap.used; }

int moe_emu_alloc(size_t n, uint64_t* out, char* msg, size_t cap) {
    uintptr_t p = 0;
    std::string why;
    const Status s = heap_alloc(n, &p, &why);
    *out = p;
    return report(s, why, msg, cap);
}

int moe_emu_free(uint64_t p, char* msg, size_t cap) {
    std::string why;
    return report(heap_free(uintptr_t(p), &why), why, msg, cap);
}

// 0 when [p, p + n) lies inside one live allocation; else kIllegalAddress and why.
int moe_emu_contains(uint64_t p, size_t n, char* msg, size_t cap) {
    std::string why;
    if (heap_contains(uintptr_t(p), n, &why)) return 0;
    return report(kIllegalAddress, why, msg, cap);
}

// 0 and the allocation's base and size when p lies inside a live allocation.
int moe_emu_range(uint64_t p, uint64_t* base, size_t* size) {
    const Alloc* a = region_of(uintptr_t(p));
    if (a == nullptr || !a->live || p < a->base || p - a->base >= (a->size ? a->size : 1)) return 1;
    *base = a->base;
    *size = a->size;
    return 0;
}

int moe_emu_launch(const KernelDef* k, const uint32_t* grid, const uint32_t* block, uint32_t dyn_smem,
                   void* const* args, int order, uint64_t seed, char* msg, size_t cap) {
    Launch l;
    l.kernel = k;
    l.grid = dim3(grid[0], grid[1], grid[2]);
    l.block = dim3(block[0], block[1], block[2]);
    l.dyn_smem = dyn_smem;
    l.args = args;
    l.order = Order(order);
    l.seed = seed;
    l.nblocks = uint64_t(l.grid.x) * l.grid.y * l.grid.z;
    LaunchCounters lc;
    counters_launch_begin(l, g_counting ? &lc : nullptr);
    const Status s = run_launch(l);
    counters_launch_end(l);
    return report(s, l.msg, msg, cap);
}

}  // extern "C"
