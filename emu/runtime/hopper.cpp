// Hopper's asynchronous machinery, each from the PTX ISA's definition: mbarriers with phases
// and transaction counts, the bulk copy engine (cp.async.bulk and cp.async.bulk.tensor with the
// tensor maps of emu/src/tmap.rs), elect.sync and setmaxnreg.
//
// When bytes land. A bulk copy reads global memory at issue and keeps its bytes in flight on
// its mbarrier. They land, and their count comes off the barrier's tx-count, at the latest
// moment the hardware allows: when a thread waits on that barrier and could not go on without
// them. A kernel that reads a destination before its barrier's phase completes reads the old
// bytes; a block that ends with a copy in flight fails.
//
// Waiting. mbarrier.try_wait.parity(p) is true once the phase of parity p has completed, that
// is while the barrier's current phase has the other parity (so a fresh barrier, in phase 0,
// answers true at once for p = 1). A wait that cannot be answered yet blocks the thread until a
// phase completes; a block whose threads all wait so is a deadlock, reported with each
// barrier's pending arrivals and tx-count.

#include <algorithm>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "internal.h"
#include "moe_emu/tensor_map.h"

namespace moe_emu {

namespace {

constexpr uint32_t kMaxCount = (1u << 20) - 1;  // arrival counts and tx-counts

uintptr_t shared_ptr(const Worker& w, uint32_t off) { return reinterpret_cast<uintptr_t>(w.sh_lo) + off; }

void check_bar_address(const Worker& w, const char* op, uint32_t bar) {
    if (bar % 8 != 0) fail(kMisaligned, strf("%s: the mbarrier at shared 0x%x is not 8-byte aligned", op, bar));
    if (!shared_ok(w, shared_ptr(w, bar), 8))
        fail(kIllegalAddress, strf("%s: the mbarrier: %s", op, describe_shared(w, shared_ptr(w, bar), 8).c_str()));
}

Mbarrier& barrier(Worker& w, const char* op, uint32_t bar) {
    check_bar_address(w, op, bar);
    auto it = w.mbarriers.find(bar);
    if (it == w.mbarriers.end())
        fail(kLaunchFailed, strf("%s on the mbarrier at shared 0x%x before its mbarrier.init (undefined)", op, bar));
    return it->second;
}

// Completes the current phase when nothing is pending: the next phase starts with the expected
// count, and every thread waiting on this barrier looks again.
void maybe_complete(Worker& w, uint32_t bar, Mbarrier& b) {
    if (b.pending != 0 || b.tx != 0) return;
    ++b.phase;
    b.pending = b.expected;
    for (uint32_t t = 0; t < w.nthreads; ++t) {
        Fiber& f = w.fibers[t];
        if (f.state == kWaitMbarrier && f.mbar == bar) f.state = kReady;
    }
}

void land(Worker& w, uint32_t bar, Mbarrier& b) {
    if (b.inflight.empty()) return;
    int64_t bytes = 0;
    for (const BulkCopy& c : b.inflight) {
        memcpy(c.dst, c.bytes.data(), c.bytes.size());
        bytes += int64_t(c.bytes.size());
    }
    b.inflight.clear();
    b.tx -= bytes;
    if (b.tx < -int64_t(kMaxCount))
        fail(kLaunchFailed, strf("mbarrier at shared 0x%x: copies completed %lld bytes more than expect_tx announced",
                                 bar, (long long)-b.tx));
    maybe_complete(w, bar, b);
}

void expect(Mbarrier& b, uint32_t bar, uint32_t tx, const char* op) {
    if (tx > kMaxCount || b.tx + int64_t(tx) > int64_t(kMaxCount))
        fail(kLaunchFailed, strf("%s: tx-count of the mbarrier at shared 0x%x would reach %lld, past 2^20 - 1", op, bar,
                                 (long long)(b.tx + int64_t(tx))));
    b.tx += tx;
}

uint64_t arrive_on(Worker& w, uint32_t bar, Mbarrier& b, uint32_t count, const char* op) {
    if (count == 0 || count > b.pending)
        fail(kLaunchFailed, strf("%s with count %u on the mbarrier at shared 0x%x, which has %u arrivals pending in "
                                 "its phase (undefined)",
                                 op, count, bar, b.pending));
    const uint64_t state = b.phase;
    b.pending -= count;
    maybe_complete(w, bar, b);
    return state;
}

// 16-byte chunk swizzles of TMA and wgmma on a shared-memory offset: the 16-byte chunk index
// inside each span-sized row is XORed with the row's index in its repeat of 8 rows, both taken
// from the address bits (CuTe's Swizzle<3,4,3>, <2,4,3>, <1,4,3> for 128, 64, 32 bytes).
uint32_t swizzle(uint32_t mode, uint32_t a) {
    switch (mode) {
        case 1: return a ^ (((a >> 7) & 1u) << 4);
        case 2: return a ^ (((a >> 7) & 3u) << 4);
        case 3: return a ^ (((a >> 7) & 7u) << 4);
        default: return a;
    }
}

// A copy goes in flight on the barrier at `bar`. Threads already blocked on that barrier look
// again: their wait is the one that lands it.
void push(Worker& w, uint32_t bar, Mbarrier& b, uint32_t dst, std::vector<uint8_t>&& bytes) {
    BulkCopy c;
    c.dst = reinterpret_cast<uint8_t*>(shared_ptr(w, dst));
    c.bytes = std::move(bytes);
    b.inflight.push_back(std::move(c));
    for (uint32_t t = 0; t < w.nthreads; ++t) {
        Fiber& f = w.fibers[t];
        if (f.state == kWaitMbarrier && f.mbar == bar) f.state = kReady;
    }
}

}  // namespace

void hopper_block_begin(Worker& w) {
    w.mbarriers.clear();
    ++w.proxy_epoch;  // no shared byte is written yet in this block
    const size_t groups = (w.nthreads + 127) / 128;
    if (w.warpgroups.size() < groups) w.warpgroups.resize(groups);
    for (size_t g = 0; g < groups; ++g) {
        w.warpgroups[g].arrived = 0;
        w.warpgroups[g].ops.clear();
    }
}

bool hopper_block_end(Worker& w, std::string* why) {
    for (size_t g = 0; g < (w.nthreads + 127) / 128; ++g) {
        if (w.warpgroups[g].ops.empty()) continue;
        *why = strf("the block ended with %zu wgmma.mma_async of warpgroup %zu in flight: no wgmma.wait_group "
                    "covered them",
                    w.warpgroups[g].ops.size(), g);
        return false;
    }
    for (const auto& [bar, b] : w.mbarriers) {
        if (b.inflight.empty()) continue;
        size_t bytes = 0;
        for (const BulkCopy& c : b.inflight) bytes += c.bytes.size();
        *why = strf("the block ended with %zu bulk copies (%zu bytes) into shared memory still in flight on the "
                    "mbarrier at shared 0x%x: nothing waited for them",
                    b.inflight.size(), bytes, bar);
        return false;
    }
    return true;
}

std::string mbarrier_report(const Worker& w) {
    std::string s;
    for (const auto& [bar, b] : w.mbarriers) {
        uint32_t n = 0, first = 0, parity = 0;
        for (uint32_t t = 0; t < w.nthreads; ++t) {
            const Fiber& f = w.fibers[t];
            if (f.state != kWaitMbarrier || f.mbar != bar) continue;
            if (n++ == 0) first = t, parity = f.mbar_parity;
        }
        if (n == 0) continue;
        s += strf(" %u threads (thread %u first) wait on the mbarrier at shared 0x%x for the phase of parity %u; it "
                  "is in phase %u with %u of %u arrivals pending and tx-count %lld.",
                  n, first, bar, parity, b.phase, b.pending, b.expected, (long long)b.tx);
    }
    for (size_t g = 0; g < (w.nthreads + 127) / 128; ++g) {
        const Warpgroup& wg = w.warpgroups[g];
        if (wg.arrived == 0) continue;
        s += strf(" %u of the 128 threads of warpgroup %zu wait at wgmma.mma_async for the others.", wg.arrived, g);
    }
    return s;
}

void mbarrier_init(uint32_t bar, uint32_t count) {
    Worker& w = *tls_worker;
    check_bar_address(w, "mbarrier.init", bar);
    if (count == 0 || count > kMaxCount)
        fail(kLaunchFailed, strf("mbarrier.init with count %u (1 to 2^20 - 1)", count));
    auto it = w.mbarriers.find(bar);
    if (it != w.mbarriers.end() && !it->second.inflight.empty())
        fail(kLaunchFailed, strf("mbarrier.init on the mbarrier at shared 0x%x with bulk copies in flight (undefined)",
                                 bar));
    Mbarrier b;
    b.expected = b.pending = count;
    w.mbarriers[bar] = std::move(b);
}

void mbarrier_inval(uint32_t bar) {
    Worker& w = *tls_worker;
    Mbarrier& b = barrier(w, "mbarrier.inval", bar);
    if (!b.inflight.empty())
        fail(kLaunchFailed, strf("mbarrier.inval on the mbarrier at shared 0x%x with bulk copies in flight", bar));
    w.mbarriers.erase(bar);
}

uint64_t mbarrier_arrive(uint32_t bar, uint32_t count) {
    Worker& w = *tls_worker;
    return arrive_on(w, bar, barrier(w, "mbarrier.arrive", bar), count, "mbarrier.arrive");
}

void mbarrier_expect_tx(uint32_t bar, uint32_t tx) {
    Worker& w = *tls_worker;
    expect(barrier(w, "mbarrier.expect_tx", bar), bar, tx, "mbarrier.expect_tx");
}

uint64_t mbarrier_arrive_expect_tx(uint32_t bar, uint32_t tx) {
    Worker& w = *tls_worker;
    Mbarrier& b = barrier(w, "mbarrier.arrive.expect_tx", bar);
    expect(b, bar, tx, "mbarrier.arrive.expect_tx");  // expect-tx first, then the arrive
    return arrive_on(w, bar, b, 1, "mbarrier.arrive.expect_tx");
}

bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity) {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    parity &= 1;
    for (;;) {
        // Looked up again after each wait: the map may have grown meanwhile.
        Mbarrier& b = barrier(w, "mbarrier.try_wait.parity", bar);
        if ((b.phase & 1u) != parity) return true;
        land(w, bar, b);
        if ((b.phase & 1u) != parity) return true;
        f.state = kWaitMbarrier;
        f.mbar = bar;
        f.mbar_parity = parity;
        yield_to_scheduler();
    }
}

void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    Worker& w = *tls_worker;
    Mbarrier& b = barrier(w, "cp.async.bulk", bar);
    const uintptr_t s = reinterpret_cast<uintptr_t>(src);
    if (bytes == 0 || bytes % 16 != 0)
        fail(kLaunchFailed, strf("cp.async.bulk of %u bytes (a positive multiple of 16)", bytes));
    if (dst % 16 != 0 || s % 16 != 0)
        fail(kMisaligned, strf("cp.async.bulk: destination 0x%x and source 0x%lx must be 16-byte aligned", dst,
                               (unsigned long)s));
    if (!shared_ok(w, shared_ptr(w, dst), bytes))
        fail(kIllegalAddress,
             strf("cp.async.bulk destination: %s", describe_shared(w, shared_ptr(w, dst), bytes).c_str()));
    std::string why;
    if (!heap_contains(s, bytes, &why))
        fail(kIllegalAddress, strf("cp.async.bulk reads %u bytes from global memory: %s", bytes, why.c_str()));
    std::vector<uint8_t> v(bytes);
    memcpy(v.data(), src, bytes);
    if (counting(w)) {
        count_access(uint64_t(__builtin_return_address(0)), s, bytes, kGBulk);
        count_async(kAsyncBulk, bytes);
    }
    push(w, bar, b, dst, std::move(v));
}

void bulk_tensor_g2s(uint32_t dst, const void* map, int rank, const int32_t* coords, uint32_t bar) {
    Worker& w = *tls_worker;
    const char* op = "cp.async.bulk.tensor";
    Mbarrier& b = barrier(w, op, bar);
    const uintptr_t mp = reinterpret_cast<uintptr_t>(map);
    if (mp % 64 != 0) fail(kMisaligned, strf("%s: the tensor map at 0x%lx is not 64-byte aligned", op, (unsigned long)mp));
    TensorMap m;
    memcpy(&m, map, sizeof m);
    if (m.magic != kTensorMapMagic)
        fail(kLaunchFailed, strf("%s: the tensor-map operand was not written by cuTensorMapEncodeTiled", op));
    if (int(m.rank) != rank)
        fail(kLaunchFailed, strf("%s.%dd with a tensor map of rank %u", op, rank, m.rank));
    if (dst % 128 != 0)
        fail(kMisaligned, strf("%s: the shared destination 0x%x is not 128-byte aligned", op, dst));
    const uint32_t e = m.elem_bytes;
    uint32_t box[5] = {1, 1, 1, 1, 1};
    size_t total = e;
    for (uint32_t d = 0; d < m.rank; ++d) {
        box[d] = m.box[d];
        total *= box[d];
    }
    if (!shared_ok(w, shared_ptr(w, dst), total))
        fail(kIllegalAddress, strf("%s destination (%zu bytes): %s", op, total,
                                   describe_shared(w, shared_ptr(w, dst), total).c_str()));
    const uint64_t site = uint64_t(__builtin_return_address(0));
    count_async(kAsyncTensor, total);
    // The box in the destination's order, innermost dimension contiguous; elements outside the
    // tensor are zeros (the tensor map's fill).
    std::vector<uint8_t> image(total, 0);
    const size_t row = size_t(box[0]) * e;
    size_t o = 0;
    for (uint32_t i4 = 0; i4 < box[4]; ++i4)
        for (uint32_t i3 = 0; i3 < box[3]; ++i3)
            for (uint32_t i2 = 0; i2 < box[2]; ++i2)
                for (uint32_t i1 = 0; i1 < box[1]; ++i1, o += row) {
                    const uint32_t idx[5] = {0, i1, i2, i3, i4};
                    int64_t off = 0;
                    bool inside = true;
                    for (uint32_t d = 1; d < m.rank; ++d) {
                        const int64_t c = int64_t(coords[d]) + idx[d];
                        if (c < 0 || c >= int64_t(m.dims[d])) inside = false;
                        off += c * int64_t(m.strides[d - 1]);
                    }
                    if (!inside) continue;
                    if (counting(w)) {
                        // The row's bytes inside the tensor, as one read of the copy engine.
                        const int64_t c0 = std::max<int64_t>(coords[0], 0);
                        const int64_t c1 = std::min<int64_t>(int64_t(coords[0]) + box[0], int64_t(m.dims[0]));
                        if (c1 > c0)
                            count_access(site, uintptr_t(int64_t(m.addr) + off + c0 * int64_t(e)),
                                         uint32_t((c1 - c0) * int64_t(e)), kGBulk);
                    }
                    for (uint32_t i0 = 0; i0 < box[0]; ++i0) {
                        const int64_t c = int64_t(coords[0]) + i0;
                        if (c < 0 || c >= int64_t(m.dims[0])) continue;
                        const uintptr_t g = uintptr_t(int64_t(m.addr) + off + c * int64_t(e));
                        std::string why;
                        if (!heap_contains(g, e, &why))
                            fail(kIllegalAddress, strf("%s reads global memory at 0x%lx: %s", op, (unsigned long)g,
                                                       why.c_str()));
                        memcpy(&image[o + size_t(i0) * e], reinterpret_cast<const void*>(g), e);
                    }
                }
    std::vector<uint8_t> placed(total);
    for (size_t c = 0; c < total; c += 16) {
        const uint32_t to = swizzle(m.swizzle, dst + uint32_t(c)) - dst;
        if (to + 16 > total)
            fail(kLaunchFailed, strf("%s: swizzle mode %u moves bytes %zu..%zu of a %zu-byte box outside it", op,
                                     m.swizzle, c, c + 16, total));
        memcpy(&placed[to], &image[c], 16);
    }
    push(w, bar, b, dst, std::move(placed));
}

void setmaxnreg(bool inc, uint32_t n) {
    if (n < 24 || n > 256 || n % 8 != 0)
        fail(kLaunchFailed, strf("setmaxnreg.%s with %u registers (24 to 256, a multiple of 8)", inc ? "inc" : "dec", n));
    current_fiber();  // inside a kernel thread; the register allocation itself has no host meaning
}

// ---- wgmma (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions") ----
//
// A warpgroup is 128 consecutive threads from a multiple of 128. wgmma.mma_async is a rendezvous
// of all 128: the last to arrive checks that they agree and puts the operation in flight, in the
// group the next commit_group closes. The product is computed when a thread's wgmma.wait_group
// covers the group: from shared memory as it is then, into every thread's accumulators. So
// accumulators read before the wait hold their old values, and a stage overwritten before the
// wait gives a wrong product. Products of bf16/f16 are exact in f64; each output is the
// accumulator plus its 16 products summed in f64 and rounded once to f32 (the tensor cores' order
// and rounding are not modelled). Only K-major operands from shared memory, imm-scale 1 and no
// transpose are modelled (the twin takes no others).

namespace {

// The shared offset of element (row r, column k) of a K-major operand of 16-bit elements under
// the shared-memory matrix descriptor `desc`: bits 13-0 start address >> 4, 29-16 leading byte
// offset >> 4, 45-32 stride byte offset >> 4, 51-49 base offset, 63-62 swizzle (0 none, 1 128 B,
// 2 64 B, 3 32 B). Canonical K-major layouts: with no swizzle, 8 x 16-byte core matrices, the
// next 8 rows SBO on and the next 8 columns LBO on; swizzled, rows of the swizzle's width, 8-row
// groups SBO apart (LBO unused), then the swizzle's XOR on the address.
uint32_t operand_offset(uint64_t desc, uint32_t r, uint32_t k) {
    const uint32_t start = uint32_t(desc & 0x3fff) << 4;
    const uint32_t lbo = uint32_t((desc >> 16) & 0x3fff) << 4;
    const uint32_t sbo = uint32_t((desc >> 32) & 0x3fff) << 4;
    switch (desc >> 62) {
        case 0: return start + (r / 8) * sbo + (k / 8) * lbo + (r % 8) * 16 + (k % 8) * 2;
        case 1: return swizzle(3, start + (r / 8) * sbo + (r % 8) * 128 + k * 2);
        case 2: return swizzle(2, start + (r / 8) * sbo + (r % 8) * 64 + k * 2);
        default: return swizzle(1, start + (r / 8) * sbo + (r % 8) * 32 + k * 2);
    }
}

void check_descriptor(const Worker& w, uint64_t desc, uint32_t rows, const char* which) {
    if ((desc >> 49) & 7)
        fail(kLaunchFailed, strf("wgmma.mma_async: the %s descriptor has base offset %u: the CPU emulator models "
                                 "only 0 (pattern-aligned tiles)",
                                 which, unsigned((desc >> 49) & 7)));
    for (uint32_t r = 0; r < rows; ++r)
        for (uint32_t k = 0; k < 16; k += 8) {
            const uint32_t off = operand_offset(desc, r, k);
            if (off % 16 != 0 || !shared_ok(w, shared_ptr(w, off), 16))
                fail(kIllegalAddress, strf("wgmma.mma_async: %s row %u, columns %u..%u, at shared 0x%x: %s", which, r,
                                           k, k + 7, off,
                                           off % 16 ? "not 16-byte aligned"
                                                    : describe_shared(w, shared_ptr(w, off), 16).c_str()));
            const uint32_t g = off >> 4;
            if (w.generic_mark[g] == w.proxy_epoch)
                fail(kLaunchFailed, strf("wgmma.mma_async reads %s row %u at shared 0x%x, written through the generic "
                                         "proxy with no fence.proxy.async since (undefined)",
                                         which, r, off));
        }
}

float element(const Worker& w, uint64_t desc, uint32_t r, uint32_t k, int kind) {
    uint16_t h;
    memcpy(&h, reinterpret_cast<const void*>(shared_ptr(w, operand_offset(desc, r, k))), 2);
    return kind == kMmaBf16 ? __bfloat162float(__nv_bfloat16{h}) : __half2float(__half{h});
}

// Thread t of the warpgroup holds D's register v at row 16 (t / 32) + (t % 32) / 4 + 8 ((v / 2) % 2)
// and column 8 (v / 4) + 2 (t % 4) + v % 2: mma.m16n8's C layout per warp and per 8 columns.
uint32_t d_row(uint32_t t, uint32_t v) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((v >> 1) & 1); }
uint32_t d_col(uint32_t t, uint32_t v) { return 8 * (v >> 2) + 2 * (t % 4) + (v & 1); }

void land_wgmma(Worker& w, size_t g, WgmmaOp& op) {
    const uint32_t n = op.n;
    if (op.check_snapshot)
        for (uint32_t t = 0; t < 128; ++t)
            if (memcmp(op.d[t], &op.snapshot[size_t(t) * (n / 2)], sizeof(float) * (n / 2)) != 0)
                fail(kLaunchFailed, strf("thread %u of warpgroup %zu wrote its accumulators while a wgmma.mma_async on "
                                         "them was in flight (undefined)",
                                         t, g));
    std::vector<float> a(64 * 16), b(size_t(n) * 16);
    for (uint32_t m = 0; m < 64; ++m)
        for (uint32_t k = 0; k < 16; ++k) a[m * 16 + k] = element(w, op.desc_a, m, k, op.kind);
    for (uint32_t c = 0; c < n; ++c)
        for (uint32_t k = 0; k < 16; ++k) b[c * 16 + k] = element(w, op.desc_b, c, k, op.kind);
    for (uint32_t t = 0; t < 128; ++t)
        for (uint32_t v = 0; v < n / 2; ++v) {
            const uint32_t m = d_row(t, v), c = d_col(t, v);
            double acc = op.scale_d ? double(op.d[t][v]) : 0.0;
            for (uint32_t k = 0; k < 16; ++k) acc += double(a[m * 16 + k]) * double(b[c * 16 + k]);
            op.d[t][v] = float(acc);
        }
}

Warpgroup& warpgroup_of(Worker& w, const Fiber& f, const char* op) {
    const size_t g = f.tid / 128;
    if ((g + 1) * 128 > w.nthreads)
        fail(kLaunchFailed, strf("%s by thread %u, whose warpgroup is incomplete in a block of %u threads", op, f.tid,
                                 w.nthreads));
    return w.warpgroups[g];
}

}  // namespace

void wgmma_fence() {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    warpgroup_of(w, f, "wgmma.fence");
    f.wg_fenced = true;
}

void wgmma_mma_async(int kind, uint32_t n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d) {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    Warpgroup& wg = warpgroup_of(w, f, "wgmma.mma_async");
    if (n < 8 || n > 256 || n % 8 != 0) fail(kLaunchFailed, strf("wgmma.mma_async with N = %u (8 to 256 by 8)", n));
    if (!f.wg_fenced)
        fail(kLaunchFailed, strf("wgmma.mma_async by thread %u with no wgmma.fence before it (undefined)", f.tid));
    const uint32_t t = f.tid % 128;
    wg.issue[t] = WgmmaIssue{d, desc_a, desc_b, n, uint8_t(kind), uint8_t(scale_d != 0)};
    f.state = kWaitWarpgroup;
    if (++wg.arrived < 128) {
        yield_to_scheduler();
        return;
    }
    // The last of the 128: the operation goes in flight for all of them.
    const WgmmaIssue& i0 = wg.issue[0];
    const uint32_t base = uint32_t(f.tid / 128 * 128);
    for (uint32_t k = 0; k < 128; ++k) {
        const WgmmaIssue& ik = wg.issue[k];
        if (ik.desc_a != i0.desc_a || ik.desc_b != i0.desc_b || ik.n != n || ik.kind != kind ||
            ik.scale_d != i0.scale_d)
            fail(kLaunchFailed, strf("wgmma.mma_async: thread %u of the warpgroup brings other descriptors, shape or "
                                     "scale-d than thread 0 (undefined)",
                                     k));
        if (w.fibers[base + k].wg_commits != w.fibers[base].wg_commits)
            fail(kLaunchFailed, strf("wgmma.mma_async: the threads of the warpgroup have committed different numbers "
                                     "of wgmma groups (undefined)"));
    }
    check_descriptor(w, desc_a, 64, "A");
    check_descriptor(w, desc_b, n, "B");
    WgmmaOp op;
    op.group = w.fibers[base].wg_commits + 1;
    for (uint32_t k = 0; k < 128; ++k) op.d[k] = wg.issue[k].d;
    op.desc_a = desc_a;
    op.desc_b = desc_b;
    op.n = n;
    op.kind = uint8_t(kind);
    op.scale_d = i0.scale_d;
    // Accumulators already in flight are the chain's own: only the first of a chain is checked.
    op.check_snapshot = true;
    for (const WgmmaOp& o : wg.ops)
        if (o.d[0] == op.d[0]) op.check_snapshot = false;
    if (op.check_snapshot) {
        op.snapshot.resize(size_t(128) * (n / 2));
        for (uint32_t k = 0; k < 128; ++k) memcpy(&op.snapshot[size_t(k) * (n / 2)], op.d[k], sizeof(float) * (n / 2));
    }
    wg.ops.push_back(std::move(op));
    wg.arrived = 0;
    if (counting(w)) {
        const std::string shape = strf("wgmma.m64n%uk16", n);
        count_tensor(shape.c_str(), kind == kMmaBf16 ? "bf16" : "f16", uint64_t(2) * 64 * n * 16);
    }
    for (uint32_t k = 0; k < 128; ++k) w.fibers[base + k].state = kReady;
}

void wgmma_commit() {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    warpgroup_of(w, f, "wgmma.commit_group");
    ++f.wg_commits;
}

void wgmma_wait(int n) {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    Warpgroup& wg = warpgroup_of(w, f, "wgmma.wait_group");
    if (n < 0) fail(kLaunchFailed, strf("wgmma.wait_group %d", n));
    if (f.wg_commits <= uint32_t(n)) return;
    const uint32_t through = f.wg_commits - uint32_t(n);
    size_t keep = 0;
    for (size_t i = 0; i < wg.ops.size(); ++i) {
        if (wg.ops[i].group <= through) land_wgmma(w, f.tid / 128, wg.ops[i]);
        else wg.ops[keep++] = std::move(wg.ops[i]);
    }
    wg.ops.resize(keep);
}

void fence_proxy_async() {
    Worker& w = *tls_worker;
    current_fiber();
    ++w.proxy_epoch;  // every generic write so far is ordered before what the async proxy does next
}

}  // namespace moe_emu
