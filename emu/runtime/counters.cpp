// The profiler: exact counters of what a launch asks of the memory system and the tensor cores,
// by the hardware's rules, and a model of the DRAM traffic behind them. Off unless the driver
// turns it on (MOE_EMU_COUNTERS, or moe_emu_counters_enable from the crate); when off, an
// access costs one untaken branch.
//
// Requests. Every load and store of kernel code reaches checks.cpp with its call site (the
// return address of the compiler's check). A lane's n-th execution of a site and the other
// lanes' n-th executions of it, in one warp, are one request: the warp-wide instruction the
// hardware would issue. (Lanes that diverge and run a site a different number of times make
// separate requests, as they would on the hardware.)
//
// Global memory: per request, the distinct 32-byte sectors its lanes touch (ncu's
// l1tex__t_sectors_pipe_lsu_mem_global_op_{ld,st,atom}) and the bytes the lanes asked for.
// Shared memory: per request, wavefronts by the bank rule: the warp is split into phases by
// access width (all 32 lanes for 1-4 bytes, half-warps for 8, quarter-warps for 16: the CUDA C++
// Programming Guide's "Shared Memory" sections for compute capability 5.x and later), and a
// phase costs as many wavefronts as the largest number of distinct 4-byte words that fall in one
// of the 32 banks (lanes reading one word share it). The ideal is, per phase, the distinct words
// over 32. ldmatrix is four (x4), two or one phase of eight 16-byte rows.
//
// DRAM. Two figures per launch:
// - unique: the distinct sectors the launch reads and writes, each once;
// - the L2 model: the launch's sectors replayed in the hardware's dispatch order through one
//   fully associative LRU of 50 MiB of 32-byte sectors, cold at the launch's start. Blocks start
//   in linear order; blocks_per_sm x 132 of them are resident at once, and the resident blocks
//   take turns, one warp request each, in the order their requests issued (a lane's access count
//   orders them). A block that ends hands its place to the next. A read that misses reads its
//   sector from DRAM; a write allocates its sector dirty without reading it; an atomic reads and
//   dirties; a dirty sector is written to DRAM when evicted or when the launch ends.
//   (docs/MODEL.md gives the blind spots.)
//
// Sampling: with a fraction f < 1, only the first ceil(f x blocks) blocks run and every count
// is scaled to the whole grid; outputs are then incomplete and not to be checked.

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "internal.h"

namespace moe_emu {

bool g_counting = false;

namespace {

// sm_90 (H100/H200 SXM): SMs, and the per-SM limits behind occupancy (CUDA C++ Programming
// Guide, "Features and Technical Specifications", compute capability 9.0).
constexpr uint32_t kSms = 132;
constexpr uint32_t kMaxWarpsPerSm = 64;
constexpr uint32_t kMaxBlocksPerSm = 32;
constexpr uint32_t kRegsPerSm = 65536;
constexpr uint32_t kRegAllocUnit = 256;      // registers are allocated per warp in these units
constexpr uint32_t kWarpAllocGranularity = 4;  // warps are allotted to the 4 SM sub-partitions
constexpr uint32_t kSmemPerSm = 233472;      // 228 KB
constexpr uint32_t kSmemReservedPerBlock = 1024;
constexpr uint32_t kSmemAllocUnit = 128;
constexpr uint64_t kL2Bytes = uint64_t(50) << 20;
constexpr uint64_t kSector = 32;

struct Resources {
    uint32_t regs, static_smem, local;
};

std::mutex g_mu;  // guards the three below
std::unordered_map<std::string, Resources> g_resources;
std::string g_records;
double g_sample = 1.0;

uint32_t ceil_to(uint32_t v, uint32_t unit) { return (v + unit - 1) / unit * unit; }

struct Occupancy {
    uint32_t blocks_per_sm;
    const char* limiter;
};

// Resident blocks per SM. Without registered resources the register limit is unknown and left
// out (the record's resources are then null).
Occupancy occupancy(const Resources* r, uint32_t threads, uint32_t dyn_smem) {
    const uint32_t warps = (threads + 31) / 32;
    Occupancy o{kMaxBlocksPerSm, "blocks"};
    auto limit = [&](uint32_t n, const char* why) {
        if (n < o.blocks_per_sm) o = Occupancy{n, why};
    };
    limit(kMaxWarpsPerSm / warps, "threads");
    if (r != nullptr && r->regs > 0) {
        const uint32_t per_warp = ceil_to(r->regs * 32, kRegAllocUnit);
        const uint32_t warps_by_regs = kRegsPerSm / per_warp / kWarpAllocGranularity * kWarpAllocGranularity;
        limit(warps_by_regs / warps, "registers");
    }
    const uint32_t smem = ceil_to((r ? r->static_smem : 0) + dyn_smem, kSmemAllocUnit) + kSmemReservedPerBlock;
    limit(kSmemPerSm / smem, "shared memory");
    return o;
}

// The phase of a lane's shared-memory access by its width.
uint32_t phase_of(uint32_t lane, uint32_t size) {
    if (size <= 4) return 0;
    if (size <= 8) return lane / 16;
    return lane / 8;
}

// Wavefronts of one phase: its distinct 4-byte words, the most that share a bank.
void phase_cost(std::vector<uint64_t>& words, uint64_t* wavefronts, uint64_t* ideal) {
    if (words.empty()) return;
    std::sort(words.begin(), words.end());
    words.erase(std::unique(words.begin(), words.end()), words.end());
    uint32_t bank[32] = {};
    uint32_t most = 0;
    for (uint64_t wd : words) most = std::max(most, ++bank[wd & 31]);
    *wavefronts += most;
    *ideal += (words.size() + 31) / 32;
}

void shared_request(const Access* a, size_t n, SharedTally& t) {
    std::vector<uint64_t> words[4];
    for (size_t i = 0; i < n; ++i) {
        const uint32_t size = a[i].size > 16 ? 16 : a[i].size;
        std::vector<uint64_t>& v = words[phase_of(a[i].lane, a[i].size)];
        for (uint64_t wd = a[i].addr >> 2; wd <= (a[i].addr + size - 1) >> 2; ++wd) v.push_back(wd);
    }
    ++t.requests;
    for (auto& v : words) phase_cost(v, &t.wavefronts, &t.ideal);
}

MemTally* global_tally(Tally& t, uint8_t kind) {
    switch (kind) {
        case kGLoad: return &t.g_ld;
        case kGStore: return &t.g_st;
        case kGAtomic: return &t.g_atom;
        case kGCpAsync: return &t.g_ldgsts;
        default: return nullptr;  // bulk copies are not load/store-unit requests
    }
}

SharedTally* shared_tally(Tally& t, uint8_t kind) {
    switch (kind) {
        case kSLoad: return &t.s_ld;
        case kSStore: return &t.s_st;
        case kSAtomic: return &t.s_atom;
        default: return &t.s_cp_async;
    }
}

uint64_t trace_flags(uint8_t kind) {
    switch (kind) {
        case kGStore: return kTraceWrite;
        case kGAtomic: return kTraceRead | kTraceWrite;
        default: return kTraceRead;
    }
}

bool is_global(uint8_t kind) { return kind <= kGBulk; }

// ---- the L2 model -------------------------------------------------------------------------------

// A fully associative LRU of sectors, with a dirty bit each.
class Lru {
  public:
    explicit Lru(size_t capacity) : cap_(capacity) {
        index_.reserve(capacity * 2);
        node_.reserve(capacity);
    }
    // Touches a sector; returns whether it was present.
    bool touch(uint64_t sector, bool write) {
        auto it = index_.find(sector);
        if (it != index_.end()) {
            Node& nd = node_[it->second];
            nd.dirty |= write;
            unlink(it->second);
            push_front(it->second);
            return true;
        }
        uint32_t id;
        if (node_.size() < cap_) {
            id = uint32_t(node_.size());
            node_.push_back(Node{});
        } else {
            id = tail_;
            unlink(id);
            if (node_[id].dirty) written_ += kSector;
            index_.erase(node_[id].sector);
        }
        node_[id] = Node{sector, kNil, kNil, write};
        index_.emplace(sector, id);
        push_front(id);
        return false;
    }
    // Bytes written back so far, and at the launch's end every dirty sector left.
    uint64_t written_at_end() const {
        uint64_t n = written_;
        for (const Node& nd : node_) n += nd.dirty ? kSector : 0;
        return n;
    }

  private:
    static constexpr uint32_t kNil = 0xffffffffu;
    struct Node {
        uint64_t sector = 0;
        uint32_t prev = kNil, next = kNil;
        bool dirty = false;
    };
    void unlink(uint32_t id) {
        Node& nd = node_[id];
        if (nd.prev != kNil) node_[nd.prev].next = nd.next; else head_ = nd.next;
        if (nd.next != kNil) node_[nd.next].prev = nd.prev; else tail_ = nd.prev;
        nd.prev = nd.next = kNil;
    }
    void push_front(uint32_t id) {
        node_[id].next = head_;
        node_[id].prev = kNil;
        if (head_ != kNil) node_[head_].prev = id;
        head_ = id;
        if (tail_ == kNil) tail_ = id;
    }
    size_t cap_;
    std::vector<Node> node_;
    std::unordered_map<uint64_t, uint32_t> index_;
    uint32_t head_ = kNil, tail_ = kNil;
    uint64_t written_ = 0;
};

struct Dram {
    uint64_t unique_read = 0, unique_write = 0, l2_read = 0, l2_write = 0;
};

Dram replay(const std::vector<std::vector<uint64_t>>& traces, uint64_t resident) {
    Dram d;
    // Unique sectors.
    std::vector<uint64_t> all;
    size_t total = 0;
    for (const auto& t : traces) total += t.size();
    all.reserve(total);
    for (const auto& t : traces)
        for (uint64_t e : t) all.push_back(e & ~kTraceStart);
    std::sort(all.begin(), all.end());
    for (size_t i = 0; i < all.size();) {
        const uint64_t s = all[i] >> 3;
        uint64_t flags = 0;
        for (; i < all.size() && all[i] >> 3 == s; ++i) flags |= all[i] & 7;
        d.unique_read += flags & kTraceRead ? kSector : 0;
        d.unique_write += flags & kTraceWrite ? kSector : 0;
    }
    std::vector<uint64_t>().swap(all);

    // Dispatch order: resident blocks in turn, one request each. Blocks without global traffic
    // hold no place.
    Lru lru(kL2Bytes / kSector);
    std::vector<size_t> order;
    for (size_t b = 0; b < traces.size(); ++b)
        if (!traces[b].empty()) order.push_back(b);
    struct Slot {
        size_t block, pos;
    };
    std::vector<Slot> slots;
    size_t next = 0;
    while (slots.size() < resident && next < order.size()) slots.push_back(Slot{order[next++], 0});
    while (!slots.empty()) {
        for (size_t i = 0; i < slots.size();) {
            Slot& s = slots[i];
            const auto& t = traces[s.block];
            size_t p = s.pos;
            do {
                const uint64_t e = t[p];
                const bool hit = lru.touch(e >> 3, e & kTraceWrite);
                if (!hit && (e & kTraceRead)) d.l2_read += kSector;
                ++p;
            } while (p < t.size() && !(t[p] & kTraceStart));
            s.pos = p;
            if (p < t.size()) {
                ++i;
            } else if (next < order.size()) {
                s = Slot{order[next++], 0};  // the block ends; the next takes its place
                ++i;
            } else {
                slots.erase(slots.begin() + long(i));
            }
        }
    }
    d.l2_write = lru.written_at_end();
    return d;
}

void json_mem(std::string& s, const char* name, const MemTally& m, double k) {
    s += strf("\"%s\":{\"requests\":%.0f,\"sectors\":%.0f,\"bytes\":%.0f}", name, std::round(m.requests * k),
              std::round(m.sectors * k), std::round(m.bytes * k));
}

void json_shared(std::string& s, const char* name, const SharedTally& m, double k) {
    s += strf("\"%s\":{\"requests\":%.0f,\"wavefronts\":%.0f,\"ideal\":%.0f}", name, std::round(m.requests * k),
              std::round(m.wavefronts * k), std::round(m.ideal * k));
}

std::string json_string(const char* p) {
    std::string s = "\"";
    for (; *p; ++p) {
        if (*p == '"' || *p == '\\') s += '\\';
        if (uint8_t(*p) >= 0x20) s += *p;
    }
    return s + "\"";
}

}  // namespace

void Tally::add(const Tally& o) {
    auto mem = [](MemTally& a, const MemTally& b) {
        a.requests += b.requests;
        a.sectors += b.sectors;
        a.bytes += b.bytes;
    };
    auto sh = [](SharedTally& a, const SharedTally& b) {
        a.requests += b.requests;
        a.wavefronts += b.wavefronts;
        a.ideal += b.ideal;
    };
    mem(g_ld, o.g_ld);
    mem(g_st, o.g_st);
    mem(g_atom, o.g_atom);
    mem(g_ldgsts, o.g_ldgsts);
    sh(s_ld, o.s_ld);
    sh(s_st, o.s_st);
    sh(s_atom, o.s_atom);
    sh(s_ldmatrix, o.s_ldmatrix);
    sh(s_cp_async, o.s_cp_async);
    cp_async_bytes += o.cp_async_bytes;
    bulk_bytes += o.bulk_bytes;
    tensor_bytes += o.tensor_bytes;
    for (const auto& kv : o.tensor) {
        auto& v = tensor[kv.first];
        v.first += kv.second.first;
        v.second += kv.second.second;
    }
}

void count_access(uint64_t site, uintptr_t addr, uint32_t size, AccessKind kind) {
    Worker* w = tls_worker;
    if (w == nullptr || w->current == nullptr || !counting(*w)) return;
    Fiber& f = *w->current;
    uint32_t& c = f.site_count[site];
    w->log.push_back(Access{site, addr, c++, f.accesses++, size, uint16_t(f.warp), uint8_t(kind), uint8_t(f.lane)});
}

void count_tensor(const char* op, const char* dtype, uint64_t flops) {
    Worker& w = *tls_worker;
    if (!counting(w)) return;
    auto& v = w.tally.tensor[{op, dtype}];
    ++v.first;
    v.second += flops;
}

void count_ldmatrix(const uint32_t* rows, int matrices) {
    Worker& w = *tls_worker;
    if (!counting(w)) return;
    SharedTally& t = w.tally.s_ldmatrix;
    ++t.requests;
    std::vector<uint64_t> words;
    for (int i = 0; i < matrices; ++i) {
        words.clear();
        for (int r = 0; r < 8; ++r)
            for (uint64_t k = 0; k < 4; ++k) words.push_back((uint64_t(rows[8 * i + r]) >> 2) + k);
        phase_cost(words, &t.wavefronts, &t.ideal);
    }
}

void count_async(AsyncKind kind, uint64_t bytes) {
    Worker& w = *tls_worker;
    if (!counting(w)) return;
    (kind == kAsyncCpAsync ? w.tally.cp_async_bytes : kind == kAsyncBulk ? w.tally.bulk_bytes : w.tally.tensor_bytes) +=
        bytes;
}

void counters_block_begin(Worker& w) {
    if (!counting(w)) return;
    w.log.clear();
    w.tally = Tally{};
    for (uint32_t t = 0; t < w.nthreads; ++t) {
        w.fibers[t].site_count.clear();
        w.fibers[t].accesses = 0;
    }
}

// Groups the block's accesses into requests, counts them, and keeps its global sectors in
// issue order for the L2 model.
void counters_block_end(Worker& w, Launch& l) {
    if (!counting(w)) return;
    std::vector<Access>& log = w.log;
    std::sort(log.begin(), log.end(), [](const Access& a, const Access& b) {
        if (a.kind != b.kind) return a.kind < b.kind;
        if (a.warp != b.warp) return a.warp < b.warp;
        if (a.site != b.site) return a.site < b.site;
        if (a.count != b.count) return a.count < b.count;
        return a.lane < b.lane;
    });
    struct Group {
        uint32_t seq;
        uint16_t warp;
        size_t first, last;  // into `sectors`
    };
    std::vector<Group> groups;
    std::vector<uint64_t> sectors;
    std::vector<uint64_t> mine;
    Tally& t = w.tally;
    for (size_t i = 0; i < log.size();) {
        size_t j = i + 1;
        while (j < log.size() && log[j].kind == log[i].kind && log[j].warp == log[i].warp &&
               log[j].site == log[i].site && log[j].count == log[i].count)
            ++j;
        const uint8_t kind = log[i].kind;
        if (is_global(kind)) {
            mine.clear();
            uint64_t bytes = 0;
            uint32_t seq = log[i].seq;
            for (size_t k = i; k < j; ++k) {
                const uint64_t lo = (log[k].addr - heap.lo) / kSector, hi = (log[k].addr + log[k].size - 1 - heap.lo) / kSector;
                for (uint64_t s = lo; s <= hi; ++s) mine.push_back(s);
                bytes += log[k].size;
                seq = std::min(seq, log[k].seq);
            }
            std::sort(mine.begin(), mine.end());
            mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
            if (MemTally* m = global_tally(t, kind)) {
                ++m->requests;
                m->sectors += mine.size();
                m->bytes += bytes;
            }
            const uint64_t flags = trace_flags(kind);
            groups.push_back(Group{seq, log[i].warp, sectors.size(), sectors.size() + mine.size()});
            for (uint64_t s : mine) sectors.push_back(s << 3 | flags);
        } else {
            shared_request(&log[i], j - i, *shared_tally(t, kind));
        }
        i = j;
    }
    std::sort(groups.begin(), groups.end(), [](const Group& a, const Group& b) {
        return a.seq != b.seq ? a.seq < b.seq : a.warp < b.warp;
    });
    std::vector<uint64_t> trace;
    trace.reserve(sectors.size());
    for (const Group& g : groups)
        for (size_t k = g.first; k < g.last; ++k) trace.push_back(sectors[k] | (k == g.first ? kTraceStart : 0));
    LaunchCounters& lc = *l.counters;
    lc.traces[w.block_linear] = std::move(trace);
    std::lock_guard<std::mutex> g(lc.mu);
    lc.total.add(t);
    ++lc.executed;
    log.clear();
}

// The launch's record, as one JSON object (docs/MODEL.md names every field).
std::string counters_record(Launch& l) {
    LaunchCounters& lc = *l.counters;
    const double k = lc.executed ? double(l.nblocks) / double(lc.executed) : 0.0;
    const uint32_t threads = l.block.x * l.block.y * l.block.z;
    const Resources* r = nullptr;
    Resources res{};
    {
        std::lock_guard<std::mutex> g(g_mu);
        auto it = g_resources.find(l.kernel->name);
        if (it != g_resources.end()) {
            res = it->second;
            r = &res;
        }
    }
    const Occupancy occ = occupancy(r, threads, l.dyn_smem);
    const Dram d = replay(lc.traces, uint64_t(occ.blocks_per_sm) * kSms);
    const Tally& t = lc.total;
    std::string s = "{\"kernel\":" + json_string(l.kernel->name);
    s += strf(",\"grid\":[%u,%u,%u],\"block\":[%u,%u,%u],\"dyn_smem\":%u,\"sampled\":%.6g", l.grid.x, l.grid.y,
              l.grid.z, l.block.x, l.block.y, l.block.z, l.dyn_smem,
              l.nblocks ? double(lc.executed) / double(l.nblocks) : 1.0);
    if (r != nullptr)
        s += strf(",\"resources\":{\"regs\":%u,\"static_smem\":%u,\"local\":%u,\"blocks_per_sm\":%u,\"limiter\":\"%s\"}",
                  r->regs, r->static_smem, r->local, occ.blocks_per_sm, occ.limiter);
    else
        s += ",\"resources\":null";
    s += strf(",\"resident_blocks\":%llu", (unsigned long long)(uint64_t(occ.blocks_per_sm) * kSms));
    s += ",\"global\":{";
    json_mem(s, "ld", t.g_ld, k);
    s += ",";
    json_mem(s, "st", t.g_st, k);
    s += ",";
    json_mem(s, "atom", t.g_atom, k);
    s += ",";
    json_mem(s, "ldgsts", t.g_ldgsts, k);
    s += strf("},\"dram\":{\"unique_read_bytes\":%.0f,\"unique_write_bytes\":%.0f,\"l2_read_bytes\":%.0f,"
              "\"l2_write_bytes\":%.0f}",
              std::round(d.unique_read * k), std::round(d.unique_write * k), std::round(d.l2_read * k),
              std::round(d.l2_write * k));
    s += ",\"shared\":{";
    json_shared(s, "ld", t.s_ld, k);
    s += ",";
    json_shared(s, "st", t.s_st, k);
    s += ",";
    json_shared(s, "atom", t.s_atom, k);
    s += ",";
    json_shared(s, "ldmatrix", t.s_ldmatrix, k);
    s += ",";
    json_shared(s, "cp_async", t.s_cp_async, k);
    s += strf("},\"async\":{\"cp_async_bytes\":%.0f,\"bulk_bytes\":%.0f,\"tensor_bytes\":%.0f}",
              std::round(t.cp_async_bytes * k), std::round(t.bulk_bytes * k), std::round(t.tensor_bytes * k));
    s += ",\"tensor\":[";
    bool first = true;
    for (const auto& kv : t.tensor) {
        s += strf("%s{\"op\":\"%s\",\"dtype\":\"%s\",\"count\":%.0f,\"flops\":%.0f}", first ? "" : ",",
                  kv.first.first.c_str(), kv.first.second.c_str(), std::round(kv.second.first * k),
                  std::round(kv.second.second * k));
        first = false;
    }
    s += "]}\n";
    return s;
}

void counters_launch_begin(Launch& l, LaunchCounters* lc) {
    l.counters = lc;
    const uint64_t n = l.nblocks;
    uint64_t run = n;
    if (lc != nullptr) {
        lc->traces.assign(n, {});
        double f;
        {
            std::lock_guard<std::mutex> g(g_mu);
            f = g_sample;
        }
        if (f < 1.0) run = std::min<uint64_t>(n, std::max<uint64_t>(1, uint64_t(std::ceil(f * double(n)))));
    }
    l.run_blocks = run;
}

void counters_launch_end(Launch& l) {
    if (l.counters == nullptr || l.status != kOk) return;
    std::string rec = counters_record(l);
    std::lock_guard<std::mutex> g(g_mu);
    g_records += rec;
}

}  // namespace moe_emu

using namespace moe_emu;

extern "C" {

void moe_emu_rt_counting(int on) { g_counting = on != 0; }

int moe_emu_rt_sample(double f) {
    if (!(f > 0.0 && f <= 1.0)) return 1;
    std::lock_guard<std::mutex> g(g_mu);
    g_sample = f;
    return 0;
}

void moe_emu_rt_set_resources(const char* kernel, uint32_t regs, uint32_t static_smem, uint32_t local) {
    std::lock_guard<std::mutex> g(g_mu);
    g_resources[kernel] = Resources{regs, static_smem, local};
}

// The records since the last call, as JSON lines; the caller frees the copy with free().
char* moe_emu_rt_take() {
    std::lock_guard<std::mutex> g(g_mu);
    char* p = static_cast<char*>(malloc(g_records.size() + 1));
    if (p == nullptr) return nullptr;
    memcpy(p, g_records.data(), g_records.size());
    p[g_records.size()] = 0;
    g_records.clear();
    return p;
}

}  // extern "C"
