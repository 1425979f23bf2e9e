// Device memory of the emulator: one reserved address range, an allocation per guarded region,
// poison on allocation, and the lookups behind every checked access.

#include <sys/mman.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "internal.h"

namespace moe_emu {

Heap heap;

namespace {

constexpr size_t kReserve = size_t(1) << 40;  // 1 TiB of address space, reserved only
constexpr size_t kMaxAllocs = size_t(1) << 24;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

size_t parse_size(const char* s, size_t dflt) {
    if (s == nullptr || *s == 0) return dflt;
    char* end = nullptr;
    const double v = strtod(s, &end);
    if (end == s || v <= 0) return dflt;
    double mult = 1;
    switch (*end) {
        case 'k': case 'K': mult = 1024.0; break;
        case 'm': case 'M': mult = 1024.0 * 1024; break;
        case 'g': case 'G': mult = 1024.0 * 1024 * 1024; break;
        default: break;
    }
    return size_t(v * mult);
}

}  // namespace

std::string strf(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

void poison(void* p, size_t n) {
    uint8_t* b = static_cast<uint8_t*>(p);
    // Little-endian bytes ff 7f ff 7f ...: the pattern is aligned to the address, so a u16 at an
    // even address reads 0x7fff wherever the buffer starts.
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    size_t i = 0;
    for (; i < n && ((a + i) & 3); ++i) b[i] = ((a + i) & 1) ? 0x7f : 0xff;
    uint32_t* w = reinterpret_cast<uint32_t*>(b + i);
    const size_t words = (n - i) / 4;
    for (size_t k = 0; k < words; ++k) w[k] = kPoison32;
    for (i += words * 4; i < n; ++i) b[i] = ((a + i) & 1) ? 0x7f : 0xff;
}

bool heap_init() {
    std::lock_guard<std::mutex> g(heap.mu);
    if (heap.lo != 0) return true;
    void* r = mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) return false;
    const size_t nslots = kReserve >> kSlotShift;
    void* s = mmap(nullptr, nslots * sizeof(uint32_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    void* a = mmap(nullptr, kMaxAllocs * sizeof(Alloc), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED || a == MAP_FAILED) return false;
    heap.lo = reinterpret_cast<uintptr_t>(r);
    heap.span = kReserve;
    heap.bump = heap.lo;
    heap.slots = static_cast<uint32_t*>(s);
    heap.allocs = static_cast<Alloc*>(a);
    heap.max_allocs = kMaxAllocs;
    heap.limit = parse_size(getenv("MOE_EMU_MEMORY"), size_t(16) << 30);
    // MOE_EMU_LAZY=SIZE: allocations of at least SIZE are not poisoned, so that their pages cost
    // host memory only once written (reads of untouched pages see zeros). For the profiler's
    // runs of models larger than this machine, whose weights it leaves zero.
    heap.lazy = parse_size(getenv("MOE_EMU_LAZY"), 0);
    return true;
}

Status heap_alloc(size_t n, uintptr_t* out, std::string* msg) {
    std::lock_guard<std::mutex> g(heap.mu);
    if (n > heap.limit || heap.used + n > heap.limit) {
        *msg = strf("cuMemAlloc: %zu bytes requested, %zu of the emulated device's %zu bytes in use "
                    "(MOE_EMU_MEMORY sets the size)", n, heap.used, heap.limit);
        return kOutOfMemory;
    }
    if (heap.nallocs == heap.max_allocs) {
        *msg = "cuMemAlloc: the emulator's allocation table is full";
        return kOutOfMemory;
    }
    const size_t data = round_up(n, kPage);
    const size_t len = round_up(data + 2 * kPage, size_t(1) << kSlotShift);
    uintptr_t region = 0;
    if (heap.bump + len <= heap.lo + heap.span) {
        region = heap.bump;
        heap.bump += len;
    } else {
        for (auto it = heap.free_regions.begin(); it != heap.free_regions.end(); ++it) {
            if (it->second >= len) {
                region = it->first;
                if (it->second == len) heap.free_regions.erase(it);
                else { it->first += len; it->second -= len; }
                break;
            }
        }
        if (region == 0) {
            *msg = "cuMemAlloc: the emulator's address range is exhausted";
            return kOutOfMemory;
        }
    }
    uint8_t* pages = reinterpret_cast<uint8_t*>(region + kPage);
    if (data > 0 && mprotect(pages, data, PROT_READ | PROT_WRITE) != 0) {
        *msg = strf("cuMemAlloc: could not commit %zu bytes", data);
        return kOutOfMemory;
    }
    const uintptr_t base = region + kPage + data - round_up(n, 256);
    const size_t id = heap.nallocs++;
    heap.allocs[id] = Alloc{base, n, region, len, true};
    for (size_t s = (region - heap.lo) >> kSlotShift, e = (region + len - heap.lo) >> kSlotShift; s < e; ++s)
        heap.slots[s] = uint32_t(id + 1);
    if (heap.lazy == 0 || n < heap.lazy) poison(reinterpret_cast<void*>(base), n);
    heap.used += n;
    *out = base;
    return kOk;
}

Status heap_free(uintptr_t p, std::string* msg) {
    std::lock_guard<std::mutex> g(heap.mu);
    const Alloc* c = region_of(p);
    if (c == nullptr || c->base != p) {
        *msg = strf("cuMemFree: 0x%lx is not the start of an allocation (%s)", (unsigned long)p,
                    describe_address(p, 1).c_str());
        return kInvalidValue;
    }
    if (!c->live) {
        *msg = strf("cuMemFree: the allocation at 0x%lx was already freed", (unsigned long)p);
        return kInvalidValue;
    }
    Alloc& al = heap.allocs[c - heap.allocs];
    const size_t data = round_up(al.size, kPage);
    uint8_t* pages = reinterpret_cast<uint8_t*>(al.region + kPage);
    if (data > 0) {
        mprotect(pages, data, PROT_NONE);
        madvise(pages, data, MADV_DONTNEED);
    }
    al.live = false;
    heap.used -= al.size;
    heap.free_regions.emplace_back(al.region, al.region_len);
    return kOk;
}

bool heap_contains(uintptr_t p, size_t n, std::string* msg) {
    const Alloc* a = region_of(p);
    if (a != nullptr && a->live && p >= a->base && n <= a->size && p - a->base <= a->size - n) return true;
    if (msg) *msg = describe_address(p, n);
    return false;
}

std::string describe_address(uintptr_t p, size_t n) {
    const Alloc* a = region_of(p);
    if (a == nullptr) {
        if (p == 0) return "a null pointer";
        return strf("0x%lx is not device memory", (unsigned long)p);
    }
    const char* state = a->live ? "" : "freed ";
    if (p < a->base)
        return strf("0x%lx is %lu bytes before the %sallocation of %zu bytes at 0x%lx", (unsigned long)p,
                    (unsigned long)(a->base - p), state, a->size, (unsigned long)a->base);
    if (!a->live)
        return strf("0x%lx is inside the freed allocation of %zu bytes at 0x%lx", (unsigned long)p, a->size,
                    (unsigned long)a->base);
    const uintptr_t end = a->base + a->size;
    if (p >= end)
        return strf("0x%lx is %lu bytes past the end of the allocation of %zu bytes at 0x%lx", (unsigned long)p,
                    (unsigned long)(p - end), a->size, (unsigned long)a->base);
    return strf("the %zu bytes at 0x%lx run %lu bytes past the end of the allocation of %zu bytes at 0x%lx", n,
                (unsigned long)p, (unsigned long)(p + n - end), a->size, (unsigned long)a->base);
}

}  // namespace moe_emu

// Sets [p, p + n) to zero: the whole pages inside by handing them back to the kernel (a private
// anonymous page reads as zeros until written again), the edges by memset. Same contents as a
// memset, without touching pages that were never written.
extern "C" void moe_emu_zero(void* p, size_t n) {
    uint8_t* a = static_cast<uint8_t*>(p);
    const uintptr_t page = moe_emu::kPage;
    uint8_t* lo = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(a) + page - 1) / page * page);
    uint8_t* hi = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(a) + n) / page * page);
    if (n < (size_t(1) << 20) || hi <= lo || madvise(lo, size_t(hi - lo), MADV_DONTNEED) != 0) {
        memset(a, 0, n);
        return;
    }
    memset(a, 0, size_t(lo - a));
    memset(hi, 0, size_t(a + n - hi));
}
