// The profiler's counters (counters.cpp): what every memory access, tensor-core instruction and
// asynchronous copy of a launch adds up to, by the hardware's rules, when counting is on.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace moe_emu {

// Where an access goes and how: global memory by the load/store unit (ld, st, atomics), global
// memory read by cp.async (LDGSTS) or by the bulk-copy engine (TMA), shared memory by the
// load/store unit, and shared memory written by cp.async.
enum AccessKind : uint8_t { kGLoad, kGStore, kGAtomic, kGCpAsync, kGBulk, kSLoad, kSStore, kSAtomic, kSCpAsync };

// One lane's access: its call site, the lane's count of executions of that site so far (the
// request it belongs to is (warp, site, count)), its address and size, and the lane's count of
// all its accesses so far (the order in which the warp's requests issue).
struct Access {
    uint64_t site;
    uint64_t addr;
    uint32_t count;
    uint32_t seq;
    uint32_t size;
    uint16_t warp;
    uint8_t kind;
    uint8_t lane;
};

struct MemTally {
    uint64_t requests = 0, sectors = 0, bytes = 0;
};
struct SharedTally {
    uint64_t requests = 0, wavefronts = 0, ideal = 0;
};

// A block's or a launch's sums.
struct Tally {
    MemTally g_ld, g_st, g_atom, g_ldgsts;
    SharedTally s_ld, s_st, s_atom, s_ldmatrix, s_cp_async;
    uint64_t cp_async_bytes = 0, bulk_bytes = 0, tensor_bytes = 0;
    // (op, dtype) -> (count, flops)
    std::map<std::pair<std::string, std::string>, std::pair<uint64_t, uint64_t>> tensor;
    void add(const Tally& o);
};

// A launch's counting state: the tallies, and each block's global sectors in issue order for
// the L2 model (sector index << 3 | flags, kTraceRead/kTraceWrite/kTraceStart).
constexpr uint64_t kTraceRead = 1, kTraceWrite = 2, kTraceStart = 4;
struct LaunchCounters {
    std::mutex mu;
    Tally total;
    uint64_t executed = 0;
    std::vector<std::vector<uint64_t>> traces;
};

// Whether counting is on for the launches that start from now (set by the driver).
extern bool g_counting;

}  // namespace moe_emu
