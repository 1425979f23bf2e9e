// The emulator's runtime: device memory, the block scheduler, warp collectives and the
// instruction twins. Compiled without sanitizers; the kernels it runs are compiled with them
// (emu/build.rs) and call into it through moe_emu/cuda.h and moe_emu/ptx.h.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "counters.h"
#include "moe_emu/cuda.h"
#include "moe_emu/ptx.h"

namespace moe_emu {

// Launch outcomes, mapped to CUDA driver error codes by the Rust driver (emu/src/lib.rs).
enum Status : int {
    kOk = 0,
    kIllegalAddress = 1,     // an access outside every allocation, or outside the shared window
    kMisaligned = 2,         // an access not aligned to its size
    kLaunchFailed = 3,       // undefined behaviour, a misused collective, a deadlock
    kInvalidValue = 4,       // a launch or call the hardware refuses
    kOutOfResources = 5,     // shared memory past the block's limit
    kOutOfMemory = 6,
};

// Device memory is host memory inside one reserved range: every allocation sits in its own
// region of 64 KiB slots, between an inaccessible leading and trailing guard page, its end
// 256-byte aligned up against the trailing guard. Fresh allocations are poisoned. Freed regions
// stay inaccessible (a use after free faults) until the range is exhausted.
struct Alloc {
    uintptr_t base;
    size_t size;
    uintptr_t region;
    size_t region_len;
    bool live;
};

constexpr uint32_t kPoison32 = 0x7fff7fffu;  // NaN as f32, bf16 and f16; an absurd int
constexpr size_t kSlotShift = 16;
constexpr size_t kPage = 4096;

struct Heap {
    uintptr_t lo = 0;
    size_t span = 0;
    uint32_t* slots = nullptr;  // slot -> alloc index + 1, 0 for none
    Alloc* allocs = nullptr;
    size_t nallocs = 0, max_allocs = 0;
    uintptr_t bump = 0;
    size_t used = 0, limit = 0;
    size_t lazy = 0;  // allocations of at least this size stay unpoisoned zero pages (0: none)
    std::vector<std::pair<uintptr_t, size_t>> free_regions;
    std::mutex mu;
};
extern Heap heap;

// The allocation whose region holds `a`, or null.
inline const Alloc* region_of(uintptr_t a) {
    const uintptr_t off = a - heap.lo;
    if (off >= heap.span) return nullptr;
    const uint32_t id = heap.slots[off >> kSlotShift];
    return id ? &heap.allocs[id - 1] : nullptr;
}

bool heap_init();
Status heap_alloc(size_t n, uintptr_t* out, std::string* msg);
Status heap_free(uintptr_t p, std::string* msg);
// True when [p, p + n) lies inside one live allocation; else explains why not in *msg.
bool heap_contains(uintptr_t p, size_t n, std::string* msg);
void poison(void* p, size_t n);
std::string describe_address(uintptr_t a, size_t n);

// ---- threads, warps, blocks ----------------------------------------------------------------

enum FiberState : uint8_t { kFresh, kReady, kWaitWarp, kWaitBarrier, kWaitMbarrier, kWaitWarpgroup, kExited };
enum CollOp : uint8_t {
    kCollShfl, kCollVote, kCollMatchAny, kCollMatchAll, kCollSyncWarp, kCollMma, kCollLdmatrix, kCollElect
};

// What one lane brings to a warp collective, and what it gets back.
struct Coll {
    uint8_t op;
    uint8_t sub;     // shfl mode, vote mode, mma kind, ldmatrix count | trans << 4
    uint32_t mask;
    uint32_t in[10]; // operands (mma: a[4], b[2], c[4] as bits)
    uint64_t wide;   // match: the 64-bit value
    uint32_t out[4];
};

struct AsyncCopy {
    uint8_t* dst;
    uint8_t bytes[16];
    uint8_t size;
    uint32_t group;  // 0: not committed yet
};

struct Stack;

struct Fiber {
    void* sp = nullptr;
    Stack* stack = nullptr;
    uint3 idx{};
    uint32_t tid = 0;
    uint32_t lane = 0, warp = 0;
    FiberState state = kExited;
    Coll coll{};
    std::vector<AsyncCopy> async;
    uint32_t groups = 0;   // groups committed so far
    uint32_t landed = 0;   // groups landed so far
    long long clock = 0;
    // kWaitMbarrier: the mbarrier (shared offset) and the parity of the phase awaited.
    uint32_t mbar = 0, mbar_parity = 0;
    // wgmma: groups committed so far, and whether a wgmma.fence has run (hopper.cpp).
    uint32_t wg_commits = 0;
    bool wg_fenced = false;
    // Counting (counters.cpp): executions so far of each access site, and of all sites.
    std::unordered_map<uint64_t, uint32_t> site_count;
    uint32_t accesses = 0;
};

// One wgmma.mma_async as a thread brings it to its warpgroup's rendezvous.
struct WgmmaIssue {
    float* d;
    uint64_t desc_a, desc_b;
    uint32_t n;
    uint8_t kind, scale_d;
};

// One wgmma.mma_async of a warpgroup in flight: every thread's accumulators, the descriptors,
// its group, and the accumulators as they were at issue (for the check that nothing writes them
// before the wait).
struct WgmmaOp {
    uint32_t group;
    float* d[128];
    uint64_t desc_a, desc_b;
    uint32_t n;
    uint8_t kind, scale_d;
    bool check_snapshot;
    std::vector<float> snapshot;
};

struct Warpgroup {
    uint32_t arrived = 0;  // threads at the wgmma.mma_async rendezvous
    WgmmaIssue issue[128];
    std::vector<WgmmaOp> ops;
};

// A bulk copy into shared memory in flight: its bytes, read from global memory at issue, land
// and count against their mbarrier's tx-count when the transaction completes (hopper.cpp).
struct BulkCopy {
    uint8_t* dst;
    std::vector<uint8_t> bytes;
};

// An mbarrier object (PTX ISA "Parallel Synchronization and Communication Instructions:
// mbarrier"), kept beside shared memory by its offset: the phase (its parity is bit 0), the
// arrivals still pending in it and expected in each, the tx-count, and the copies in flight.
struct Mbarrier {
    uint32_t phase = 0;
    uint32_t expected = 0, pending = 0;
    int64_t tx = 0;
    std::vector<BulkCopy> inflight;
};

struct Warp {
    uint32_t present = 0;  // lanes that exist
    uint32_t exited = 0;
    uint32_t waiting = 0;  // lanes blocked in a collective
};

struct Launch;

enum Order : int { kForward = 0, kReverse = 1, kShuffle = 2 };

struct Worker {
    int index = 0;
    void* sched_sp = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Stack*> free_stacks;
    std::vector<Stack*> all_stacks;
    std::vector<uint32_t> order;
    std::vector<Warp> warps;
    // The block now running.
    Launch* launch = nullptr;
    uint64_t block_linear = 0;
    uint32_t nthreads = 0, live = 0, at_barrier = 0;
    uint64_t barriers = 0;
    Fiber* current = nullptr;
    uint32_t pos = 0;  // the running thread's position in `order`
    // Shared memory: statics from the window's start, the dynamic part against its end.
    uint8_t* sh_lo = nullptr;   // window start (after a guard page)
    uint8_t* sh_hi = nullptr;   // window end (a guard page follows)
    size_t static_used = 0;
    uint8_t* dyn_base = nullptr;
    size_t dyn_bytes = 0;
    std::vector<std::pair<const void*, uint8_t*>> statics;
    // The block's mbarriers, by shared offset, and its warpgroups' wgmma state (hopper.cpp).
    std::unordered_map<uint32_t, Mbarrier> mbarriers;
    std::vector<Warpgroup> warpgroups;
    // Shared memory written through the generic proxy since the last fence.proxy.async: a
    // 16-byte granule is so when its mark equals proxy_epoch (a new block or a fence moves the
    // epoch on, so nothing needs clearing).
    std::vector<uint32_t> generic_mark;
    uint32_t proxy_epoch = 0;
    // Where a fault inside a kernel thread lands: a stack of its own.
    uint8_t* fault_stack = nullptr;
    size_t fault_stack_size = 0;
    std::string fault_msg;
    Status fault_status = kOk;
    // Counting (counters.cpp): the block's accesses so far, and its other sums.
    std::vector<Access> log;
    Tally tally;
};
extern thread_local Worker* tls_worker __attribute__((tls_model("initial-exec")));

constexpr size_t kSharedWindow = 256 * 1024;  // > 227 KB, the sm_90 opt-in maximum
constexpr size_t kMaxSharedPerBlock = 232448;   // 227 KB
constexpr size_t kMaxStaticShared = 48 * 1024;

struct KernelDef;

struct Launch {
    const KernelDef* kernel;
    dim3 grid, block;
    uint32_t dyn_smem;
    void* const* args;
    Order order;
    uint64_t seed;
    uint64_t nblocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> abort{false};
    std::mutex mu;
    Status status = kOk;
    std::string msg;
    // Counting: null when off. Blocks [0, run_blocks) run; the rest are skipped (sampling).
    LaunchCounters* counters = nullptr;
    uint64_t run_blocks = 0;
};

// Fails the launch from inside a kernel thread: records the first failure with where it
// happened, then abandons the block. Never returns.
[[noreturn]] void fail(Status s, const std::string& what);
// printf into a std::string.
std::string strf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// "thread (x,y,z) of block (x,y,z) of kernel NAME"
std::string where();

[[noreturn]] void outside_kernel();
inline Fiber& current_fiber() {
    Worker* w = tls_worker;
    if (__builtin_expect(w == nullptr || w->current == nullptr, 0)) outside_kernel();
    return *w->current;
}
// Blocks the running thread (at a barrier or collective) and runs the next one in order.
void yield_to_scheduler();

// Fibers (fiber.cpp).
struct Stack {
    uint8_t* base;  // lowest usable byte (a guard page lies below)
    size_t size;
};
Stack* stack_new(size_t size);
void fiber_prepare(Fiber& f, Stack* s);
void fiber_switch(void** save_sp, void* load_sp);
void install_fault_handlers();
void worker_enter_kernel(Worker* w);  // sigaltstack and the fault landing for this thread

// Counting (counters.cpp): an access of kernel code from `site`, a tensor-core instruction of a
// warp or warpgroup, a block's start and end.
void count_access(uint64_t site, uintptr_t addr, uint32_t size, AccessKind kind);
void count_tensor(const char* op, const char* dtype, uint64_t flops);
void count_ldmatrix(const uint32_t* row_offsets, int matrices);
enum AsyncKind : int { kAsyncCpAsync = 0, kAsyncBulk = 1, kAsyncTensor = 2 };
void count_async(AsyncKind kind, uint64_t bytes);
inline bool counting(const Worker& w) { return w.launch != nullptr && w.launch->counters != nullptr; }
void counters_block_begin(Worker& w);
void counters_block_end(Worker& w, Launch& l);
// A launch's counting: null `lc` when off; the record goes to the driver's list at the end.
void counters_launch_begin(Launch& l, LaunchCounters* lc);
void counters_launch_end(Launch& l);

// Run one launch (sched.cpp).
Status run_launch(Launch& l);

// Shared memory of the running block: whether [a, a + n) lies in it, and why not.
bool shared_ok(const Worker& w, uintptr_t a, size_t n);
std::string describe_shared(const Worker& w, uintptr_t a, size_t n);

// Completes a warp collective once every lane of `mask` has arrived at it (warp.cpp).
void complete_collective(Worker& w, uint32_t warp, uint32_t mask);
void land_async(Fiber& f, uint32_t through_group);

// Hopper's asynchronous state of a block (hopper.cpp): cleared as a block starts; at its end a
// copy still in flight fails it (false, with why).
void hopper_block_begin(Worker& w);
bool hopper_block_end(Worker& w, std::string* why);
// The mbarrier and wgmma waits of a deadlocked block, for its report.
std::string mbarrier_report(const Worker& w);
// A generic-proxy write of n bytes at shared offset `off` (stores and cp.async landings).
inline void mark_generic(Worker& w, uintptr_t off, size_t n) {
    for (uintptr_t g = off >> 4; g <= (off + n - 1) >> 4; ++g) w.generic_mark[g] = w.proxy_epoch;
}

}  // namespace moe_emu
