// The block scheduler: a pool of worker threads takes the blocks of a launch one by one; a
// worker runs a block's threads as fibers, each until it reaches a barrier, a warp collective
// or its end, in the launch's thread order (forward, reverse or a seeded shuffle, fixed per
// block). A pass in which no thread can run while some still live is a deadlock, reported with
// who waits for whom.

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include <sys/mman.h>

#include "internal.h"

namespace moe_emu {

thread_local Builtins builtins __attribute__((tls_model("initial-exec")));
thread_local Worker* tls_worker __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

size_t stack_bytes() {
    static const size_t n = [] {
        const char* s = getenv("MOE_EMU_STACK_KB");
        const long kb = s ? atol(s) : 0;
        return size_t(kb >= 16 ? kb : 128) * 1024;
    }();
    return n;
}

uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void record(Launch& l, Status s, const std::string& msg) {
    std::lock_guard<std::mutex> g(l.mu);
    if (l.status == kOk) {
        l.status = s;
        l.msg = msg;
    }
    l.abort.store(true, std::memory_order_relaxed);
}

const char* coll_name(const Coll& c) {
    switch (c.op) {
        case kCollShfl: {
            static const char* n[] = {"__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__shfl_sync"};
            return n[c.sub & 3];
        }
        case kCollVote: {
            static const char* n[] = {"__ballot_sync", "__any_sync", "__all_sync"};
            return n[c.sub % 3];
        }
        case kCollMatchAny: return "__match_any_sync";
        case kCollMatchAll: return "__match_all_sync";
        case kCollSyncWarp: return "__syncwarp";
        case kCollMma: return "mma.sync";
        case kCollElect: return "elect.sync";
        default: return "ldmatrix";
    }
}

std::string lanes(uint32_t m) {
    std::string s;
    for (int i = 0; i < 32;) {
        if (!(m >> i & 1)) { ++i; continue; }
        int j = i;
        while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
        if (!s.empty()) s += ",";
        s += j == i ? strf("%d", i) : strf("%d-%d", i, j);
        i = j + 1;
    }
    return s.empty() ? "none" : s;
}

void release_barrier(Worker& w) {
    for (uint32_t t = 0; t < w.nthreads; ++t)
        if (w.fibers[t].state == kWaitBarrier) w.fibers[t].state = kReady;
    w.at_barrier = 0;
    ++w.barriers;
}

// Why nothing can run: the barrier count and each waiting collective with its missing lanes.
std::string deadlock_report(Worker& w) {
    std::string s = "deadlock: no thread of the block can proceed.";
    if (w.at_barrier > 0) s += strf(" %u of the %u live threads wait at __syncthreads.", w.at_barrier, w.live);
    int shown = 0;
    for (uint32_t wi = 0; wi < w.warps.size() && shown < 4; ++wi) {
        const Warp& wp = w.warps[wi];
        uint32_t seen = 0;
        for (uint32_t l = 0; l < 32 && shown < 4; ++l) {
            if (!(wp.waiting >> l & 1) || (seen >> l & 1)) continue;
            const Coll& c = w.fibers[wi * 32 + l].coll;
            uint32_t same = 0;
            for (uint32_t k = 0; k < 32; ++k) {
                if (!(wp.waiting >> k & 1)) continue;
                const Coll& o = w.fibers[wi * 32 + k].coll;
                if (o.op == c.op && o.sub == c.sub && o.mask == c.mask) same |= 1u << k;
            }
            seen |= same;
            const uint32_t missing = c.mask & ~same;
            uint32_t at_bar = 0, elsewhere = 0, gone = 0;
            for (uint32_t k = 0; k < 32; ++k) {
                if (!(missing >> k & 1)) continue;
                const Fiber& o = w.fibers[wi * 32 + k];
                if (wp.exited >> k & 1) gone |= 1u << k;
                else if (o.state == kWaitBarrier) at_bar |= 1u << k;
                else elsewhere |= 1u << k;
            }
            s += strf(" Warp %u: lanes %s wait at %s (mask 0x%08x)", wi, lanes(same).c_str(), coll_name(c), c.mask);
            if (at_bar) s += strf("; lanes %s wait at __syncthreads instead", lanes(at_bar).c_str());
            if (elsewhere) s += strf("; lanes %s wait at another warp collective or with another mask",
                                     lanes(elsewhere).c_str());
            if (gone) s += strf("; lanes %s have exited", lanes(gone).c_str());
            s += ".";
            ++shown;
        }
    }
    s += mbarrier_report(w);
    return s;
}

Stack* take_stack(Worker& w) {
    if (!w.free_stacks.empty()) {
        Stack* s = w.free_stacks.back();
        w.free_stacks.pop_back();
        return s;
    }
    Stack* s = stack_new(stack_bytes());
    if (s == nullptr) {
        fprintf(stderr, "moe-emu: out of memory for thread stacks\n");
        abort();
    }
    w.all_stacks.push_back(s);
    return s;
}

// The order position of the next thread that can run, at or after `from`; nthreads if none.
uint32_t next_runnable(const Worker& w, uint32_t from) {
    for (uint32_t k = from; k < w.nthreads; ++k) {
        const FiberState s = w.fibers[w.order[k]].state;
        if (s == kFresh || s == kReady) return k;
    }
    return w.nthreads;
}

// Makes the thread at order position k the running one and returns it.
Fiber& enter(Worker& w, uint32_t k) {
    Fiber& f = w.fibers[w.order[k]];
    if (f.state == kFresh) fiber_prepare(f, take_stack(w));
    f.state = kReady;
    w.pos = k;
    w.current = &f;
    builtins.thread_idx = f.idx;
    return f;
}

// Runs threads from order position k on: each one that blocks hands the OS thread straight to
// the next runnable one; control comes back here when a thread exits, when the pass reaches its
// end, or when a check fails.
void run_from(Worker& w, uint32_t k) {
    Fiber& f = enter(w, k);
    fiber_switch(&w.sched_sp, f.sp);
    Fiber* last = w.current;
    w.current = nullptr;
    if (last != nullptr && last->state == kExited && last->stack != nullptr) {
        w.free_stacks.push_back(last->stack);
        last->stack = nullptr;
    }
}

void make_order(Worker& w, const Launch& l) {
    const uint32_t n = w.nthreads;
    w.order.resize(n);
    for (uint32_t i = 0; i < n; ++i) w.order[i] = l.order == kReverse ? n - 1 - i : i;
    if (l.order == kShuffle) {
        uint64_t s = splitmix64(l.seed ^ splitmix64(w.block_linear));
        for (uint32_t i = n; i > 1; --i) {
            s = splitmix64(s);
            const uint32_t j = uint32_t(s % i);
            std::swap(w.order[i - 1], w.order[j]);
        }
    }
}

void run_block(Worker& w, Launch& l, uint64_t b) {
    w.launch = &l;
    w.block_linear = b;
    const dim3 g = l.grid, bd = l.block;
    builtins.block_idx = uint3{unsigned(b % g.x), unsigned((b / g.x) % g.y), unsigned(b / (uint64_t(g.x) * g.y))};
    builtins.block_dim = uint3{bd.x, bd.y, bd.z};
    builtins.grid_dim = uint3{g.x, g.y, g.z};
    const uint32_t n = bd.x * bd.y * bd.z;
    w.nthreads = n;
    w.live = n;
    w.at_barrier = 0;
    w.barriers = 0;
    for (uint32_t t = 0; t < n; ++t) {
        Fiber& f = w.fibers[t];
        f.state = kFresh;
        f.tid = t;
        f.idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
        f.lane = t & 31;
        f.warp = t >> 5;
        f.stack = nullptr;
#if !defined(__x86_64__)
        // the ucontext fallback keeps its context object in sp
#else
        f.sp = nullptr;
#endif
        f.async.clear();
        f.groups = f.landed = 0;
        f.wg_commits = 0;
        f.wg_fenced = false;
        f.clock = 0;
    }
    const uint32_t nw = (n + 31) / 32;
    w.warps.assign(nw, Warp{});
    for (uint32_t i = 0; i < nw; ++i) {
        const uint32_t k = n - i * 32 >= 32 ? 32 : n - i * 32;
        w.warps[i].present = k == 32 ? 0xffffffffu : (1u << k) - 1u;
    }
    // Shared memory: statics are placed as they are first reached; the dynamic part ends at the
    // window's trailing guard page.
    w.static_used = 0;
    w.statics.clear();
    w.dyn_bytes = l.dyn_smem;
    w.dyn_base = w.sh_hi - ((l.dyn_smem + 1023) / 1024 * 1024);
    poison(w.dyn_base, w.dyn_bytes);
    w.free_stacks = w.all_stacks;
    hopper_block_begin(w);
    counters_block_begin(w);
    make_order(w, l);

    for (;;) {
        bool progress = false;
        for (uint32_t k = next_runnable(w, 0); k < n; k = next_runnable(w, w.pos + 1)) {
            run_from(w, k);
            progress = true;
            if (l.abort.load(std::memory_order_relaxed)) return;
        }
        if (w.live == 0) {
            std::string why;
            if (!hopper_block_end(w, &why))
                record(l, kLaunchFailed,
                       strf("%s (kernel %s, block (%u,%u,%u))", why.c_str(), l.kernel->name, builtins.block_idx.x,
                            builtins.block_idx.y, builtins.block_idx.z));
            else
                counters_block_end(w, l);
            return;
        }
        if (!progress) {
            record(l, kLaunchFailed,
                   strf("%s (kernel %s, block (%u,%u,%u))", deadlock_report(w).c_str(), l.kernel->name,
                        builtins.block_idx.x, builtins.block_idx.y, builtins.block_idx.z));
            return;
        }
    }
}

Worker* worker_new(int index) {
    Worker* w = new Worker;
    w->index = index;
    w->fibers.resize(1024);
    for (Fiber& f : w->fibers) f.async.reserve(16);
    // The shared window: a guard page, 256 KiB, a guard page.
    const size_t len = kSharedWindow + 2 * kPage;
    uint8_t* p = static_cast<uint8_t*>(mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (p == MAP_FAILED) {
        fprintf(stderr, "moe-emu: could not map a shared-memory window\n");
        abort();
    }
    mprotect(p + kPage, kSharedWindow, PROT_READ | PROT_WRITE);
    w->sh_lo = p + kPage;
    w->sh_hi = w->sh_lo + kSharedWindow;
    w->generic_mark.assign(kSharedWindow / 16, 0);
    return w;
}

void work(Worker& w, Launch& l) {
    tls_worker = &w;
    worker_enter_kernel(&w);
    for (;;) {
        if (l.abort.load(std::memory_order_relaxed)) break;
        const uint64_t b = l.next.fetch_add(1, std::memory_order_relaxed);
        if (b >= l.run_blocks) break;
        run_block(w, l, b);
    }
    w.launch = nullptr;
}

// The pool: workers sleep until a launch is posted, run its blocks, and report back.
struct Pool {
    std::mutex mu;
    std::condition_variable wake, done;
    std::vector<Worker*> workers;
    Launch* launch = nullptr;
    uint64_t generation = 0;
    size_t busy = 0;
    size_t wanted = 0;

    void start(size_t n) {
        while (workers.size() < n) {
            Worker* w = worker_new(int(workers.size()));
            workers.push_back(w);
            std::thread([this, w] { loop(*w); }).detach();
        }
    }

    void loop(Worker& w) {
        uint64_t seen = 0;
        for (;;) {
            Launch* l;
            {
                std::unique_lock<std::mutex> g(mu);
                wake.wait(g, [&] { return generation != seen && size_t(w.index) < wanted; });
                seen = generation;
                l = launch;
            }
            work(w, *l);
            {
                std::lock_guard<std::mutex> g(mu);
                if (--busy == 0) done.notify_all();
            }
        }
    }

    void run(Launch& l, size_t n) {
        std::unique_lock<std::mutex> g(mu);
        launch = &l;
        wanted = n;
        busy = n;
        ++generation;
        wake.notify_all();
        done.wait(g, [&] { return busy == 0; });
        launch = nullptr;
    }
};

Pool& pool() {
    static Pool* p = new Pool;  // never destroyed: its threads outlive main's statics
    return *p;
}

size_t worker_count() {
    static const size_t n = [] {
        const char* s = getenv("MOE_EMU_THREADS");
        long v = s ? atol(s) : 0;
        if (v <= 0) v = long(std::thread::hardware_concurrency());
        return size_t(v < 1 ? 1 : (v > 64 ? 64 : v));
    }();
    return n;
}

}  // namespace

Status run_launch(Launch& l) {
    install_fault_handlers();
    const size_t n = l.run_blocks < worker_count() ? size_t(l.run_blocks) : worker_count();
    Pool& p = pool();
    {
        std::lock_guard<std::mutex> g(p.mu);
        p.start(n);
    }
    p.run(l, n);
    return l.status;
}

std::string where() {
    const Worker* w = tls_worker;
    if (w == nullptr || w->launch == nullptr) return "outside any kernel";
    const uint3 b = builtins.block_idx, t = builtins.thread_idx;
    return strf("kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", w->launch->kernel->name, b.x, b.y, b.z, t.x, t.y,
                t.z);
}

void fail(Status s, const std::string& what) {
    Worker* w = tls_worker;
    if (w == nullptr || w->current == nullptr) {
        fprintf(stderr, "moe-emu: a kernel check fired outside a kernel thread: %s\n", what.c_str());
        abort();
    }
    record(*w->launch, s, what + " (" + where() + ")");
    Fiber* f = w->current;
    f->state = kExited;  // never resumed; its stack is reclaimed with the block
    void* dummy = nullptr;
    fiber_switch(&dummy, w->sched_sp);
    __builtin_trap();
}

void outside_kernel() {
    fprintf(stderr, "moe-emu: a device intrinsic was called outside a kernel thread\n");
    abort();
}

void yield_to_scheduler() {
    Worker& w = *tls_worker;
    Fiber& f = *w.current;
    const uint32_t k = next_runnable(w, w.pos + 1);
    if (k < w.nthreads) {
        Fiber& g = enter(w, k);
        fiber_switch(&f.sp, g.sp);
    } else {
        fiber_switch(&f.sp, w.sched_sp);
    }
    // Resumed: whoever switched here made this thread the running one again.
}

void syncthreads() {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    f.state = kWaitBarrier;
    if (++w.at_barrier == w.live) {
        release_barrier(w);  // the last to arrive goes on at once
        return;
    }
    yield_to_scheduler();
}

// A collective that could not complete while `lane` was alive may complete once it has exited
// (vote, match and __syncwarp wait only for live lanes); a shuffle that reads it, or an mma or
// ldmatrix of its warp, fails.
void thread_exit(Worker& w, Fiber& f) {
    f.state = kExited;
    --w.live;
    Warp& wp = w.warps[f.warp];
    const uint32_t bit = 1u << f.lane;
    wp.exited |= bit;
    for (uint32_t l = 0; l < 32 && wp.waiting; ++l) {
        if (!(wp.waiting >> l & 1)) continue;
        const Coll& c = w.fibers[f.warp * 32 + l].coll;
        if (!(c.mask & bit)) continue;
        if (c.op == kCollMma || c.op == kCollLdmatrix)
            fail(kLaunchFailed, strf("lane %u exited while lanes of its warp wait for it at %s, which every lane "
                                     "of the warp must execute", f.lane, coll_name(c)));
        complete_collective(w, f.warp, c.mask);  // completes it if every live lane is there
    }
    if (w.at_barrier > 0 && w.at_barrier == w.live) release_barrier(w);
}

uint32_t shared_offset(const void* p) {
    const Worker& w = *tls_worker;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(w.sh_lo);
    if (a - lo > kSharedWindow)
        fail(kIllegalAddress, strf("__cvta_generic_to_shared(0x%lx): not a pointer into shared memory", (unsigned long)a));
    return uint32_t(a - lo);
}

void* shared_static(const void* key, size_t size, size_t align) {
    Worker& w = *tls_worker;
    current_fiber();
    for (const auto& s : w.statics)
        if (s.first == key) return s.second;
    const size_t a = align < 16 ? 16 : align;
    const size_t off = (w.static_used + a - 1) / a * a;
    if (off + size > kMaxStaticShared)
        fail(kOutOfResources, strf("static shared memory of %zu bytes, past the 48 KB a block may declare", off + size));
    if (off + size + w.dyn_bytes > kMaxSharedPerBlock)
        fail(kOutOfResources, strf("%zu bytes of static and %zu of dynamic shared memory, past the 227 KB of a block",
                                   off + size, w.dyn_bytes));
    uint8_t* p = w.sh_lo + off;
    w.static_used = off + size;
    poison(p, size);
    w.statics.emplace_back(key, p);
    return p;
}

void* shared_dynamic(size_t align) {
    const Worker& w = *tls_worker;
    current_fiber();
    if (reinterpret_cast<uintptr_t>(w.dyn_base) % (align ? align : 1) != 0)
        fail(kMisaligned, strf("extern __shared__ asks for %zu-byte alignment", align));
    return w.dyn_base;
}

long long clock64() { return ++current_fiber().clock; }

}  // namespace moe_emu

extern "C" void moe_emu_fiber_main(moe_emu::Fiber* f) {
    using namespace moe_emu;
    Worker& w = *tls_worker;
    w.launch->kernel->entry(w.launch->args);
    thread_exit(w, *f);
    fiber_switch(&f->sp, w.sched_sp);
    __builtin_trap();
}
