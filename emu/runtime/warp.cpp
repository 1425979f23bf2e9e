// Warp collectives and the PTX twins, each from the PTX ISA's definition (section names in
// moe_emu/ptx.h and below).
//
// A lane that reaches a collective leaves its operands in its Coll and waits; the lane whose
// arrival completes the set (every live lane the mask names, at the same collective with the
// same mask) computes every lane's result and goes on, the others resume with theirs.
//
// Stricter than the hardware where the hardware is undefined: a shuffle whose source lane is
// outside the mask or has exited, an mma or ldmatrix of a warp with a missing lane, a lane that
// calls a collective with a mask that does not name it, and a mask naming lanes past the end of
// the block all fail the launch. Vote, match and __syncwarp wait only for live lanes, as the
// CUDA programming guide says (exited lanes vote 0).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "internal.h"

namespace moe_emu {

namespace {

const char* op_name(CollOp op) {
    switch (op) {
        case kCollShfl: return "__shfl_*_sync";
        case kCollVote: return "a vote (__ballot_sync, __any_sync, __all_sync)";
        case kCollMatchAny: return "__match_any_sync";
        case kCollMatchAll: return "__match_all_sync";
        case kCollSyncWarp: return "__syncwarp";
        case kCollMma: return "mma.sync";
        case kCollElect: return "elect.sync";
        default: return "ldmatrix";
    }
}

bool aligned_op(CollOp op) { return op == kCollMma || op == kCollLdmatrix; }

bool ready(const Worker& w, uint32_t warp, const Coll& c) {
    const Warp& wp = w.warps[warp];
    const uint32_t live = c.mask & ~wp.exited;
    if ((wp.waiting & live) != live) return false;
    for (uint32_t l = 0; l < 32; ++l) {
        if (!(live >> l & 1)) continue;
        const Coll& o = w.fibers[warp * 32 + l].coll;
        if (o.op != c.op || o.sub != c.sub || o.mask != c.mask) return false;
    }
    return true;
}

// A bf16 or f16 element as f32 (exact for both), by the host build's own conversions.
float unpack16(int kind, uint32_t h) {
    const unsigned short bits = static_cast<unsigned short>(h & 0xffffu);
    return kind == kMmaBf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

// "Matrix Fragments for mma.m16n8k16 with floating point type" (PTX ISA 9.7.14.5.8); g = lane/4,
// t = lane%4. Each output is the accumulator plus the 16 products in k order, summed in f64
// (the products of bf16/f16 values are exact there) and rounded once to f32; the tensor cores'
// own summation order and rounding are not modelled. A row of A that is all zeros (the padding
// rows of the contiguous layout) against finite B adds only signed zeros: its result is the
// accumulator, with IEEE's rule for the sign of a zero sum, without the multiplications.
void mma(Worker& w, uint32_t warp, int kind) {
    float A[16][16], B[16][8], C[16][8];
    for (uint32_t l = 0; l < 32; ++l) {
        const Coll& c = w.fibers[warp * 32 + l].coll;
        const uint32_t g = l >> 2, t = l & 3;
        for (uint32_t r = 0; r < 4; ++r) {
            const uint32_t row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
            A[row][col] = unpack16(kind, c.in[r]);
            A[row][col + 1] = unpack16(kind, c.in[r] >> 16);
        }
        for (uint32_t r = 0; r < 2; ++r) {
            const uint32_t k = 2 * t + 8 * r;
            B[k][g] = unpack16(kind, c.in[4 + r]);
            B[k + 1][g] = unpack16(kind, c.in[4 + r] >> 16);
        }
        for (uint32_t i = 0; i < 4; ++i) memcpy(&C[g + 8 * (i >> 1)][2 * t + (i & 1)], &c.in[6 + i], 4);
    }
    bool b_finite = true;
    for (uint32_t k = 0; k < 16; ++k)
        for (uint32_t n = 0; n < 8; ++n) b_finite = b_finite && std::isfinite(B[k][n]);
    float D[16][8];
    for (uint32_t m = 0; m < 16; ++m) {
        bool zero_row = b_finite;
        for (uint32_t k = 0; k < 16 && zero_row; ++k) zero_row = A[m][k] == 0.f;
        if (zero_row) {
            for (uint32_t n = 0; n < 8; ++n) {
                float d = C[m][n];
                if (d == 0.f && std::signbit(d)) {
                    // A sum of zeros is -0 only when every term is -0; a product is -0 when its
                    // factors' signs differ.
                    uint32_t k = 0;
                    while (k < 16 && std::signbit(A[m][k]) != std::signbit(B[k][n])) ++k;
                    if (k < 16) d = 0.f;
                }
                D[m][n] = d;
            }
            continue;
        }
        double acc[8];
        for (uint32_t n = 0; n < 8; ++n) acc[n] = C[m][n];
        for (uint32_t k = 0; k < 16; ++k) {
            const double a = A[m][k];
            for (uint32_t n = 0; n < 8; ++n) acc[n] += a * double(B[k][n]);
        }
        for (uint32_t n = 0; n < 8; ++n) D[m][n] = float(acc[n]);
    }
    for (uint32_t l = 0; l < 32; ++l) {
        Coll& c = w.fibers[warp * 32 + l].coll;
        const uint32_t g = l >> 2, t = l & 3;
        for (uint32_t i = 0; i < 4; ++i) memcpy(&c.out[i], &D[g + 8 * (i >> 1)][2 * t + (i & 1)], 4);
    }
}

// ldmatrix (PTX ISA 9.7.14.5.15): lane 8i + r gives the address of row r of matrix i; lane l
// gets row l/4, columns 2(l%4), 2(l%4)+1 of each matrix (.trans: rows 2(l%4), 2(l%4)+1 of
// column l/4), the first in the low half.
void ldmatrix_all(Worker& w, uint32_t warp, int n, bool trans) {
    uint16_t M[4][8][8];
    for (int i = 0; i < n; ++i) {
        for (int r = 0; r < 8; ++r) {
            const uint32_t lane = uint32_t(8 * i + r);
            const uint32_t off = w.fibers[warp * 32 + lane].coll.in[0];
            const uintptr_t a = reinterpret_cast<uintptr_t>(w.sh_lo) + off;
            if (off % 16 != 0)
                fail(kMisaligned, strf("ldmatrix: lane %u gives row address 0x%x, not 16-byte aligned", lane, off));
            if (!shared_ok(w, a, 16))
                fail(kIllegalAddress, strf("ldmatrix: the row of lane %u: %s", lane, describe_shared(w, a, 16).c_str()));
            memcpy(M[i][r], reinterpret_cast<const void*>(a), 16);
        }
    }
    for (uint32_t l = 0; l < 32; ++l) {
        Coll& c = w.fibers[warp * 32 + l].coll;
        const uint32_t q = l >> 2, p = 2 * (l & 3);
        for (int i = 0; i < n; ++i) {
            const uint16_t lo = trans ? M[i][p][q] : M[i][q][p];
            const uint16_t hi = trans ? M[i][p + 1][q] : M[i][q][p + 1];
            c.out[i] = uint32_t(lo) | (uint32_t(hi) << 16);
        }
    }
}

// shfl.sync (PTX ISA 9.7.9.6), per lane: its own b and c give the source lane j; out of range,
// the lane keeps its value.
void shuffle(Worker& w, uint32_t warp, const Coll& c0) {
    const Warp& wp = w.warps[warp];
    const uint32_t live = c0.mask & ~wp.exited;
    for (uint32_t i = 0; i < 32; ++i) {
        if (!(live >> i & 1)) continue;
        Coll& c = w.fibers[warp * 32 + i].coll;
        const uint32_t b = c.in[1] & 31, cval = c.in[2] & 31, seg = (c.in[2] >> 8) & 31;
        const int max_lane = int((i & seg) | (cval & ~seg)), min_lane = int(i & seg);
        int j = 0;
        bool in_range = false;
        switch (c.sub) {
            case kShflUp: j = int(i) - int(b); in_range = j >= max_lane; break;
            case kShflDown: j = int(i + b); in_range = j <= max_lane; break;
            case kShflBfly: j = int(i ^ b); in_range = j <= max_lane; break;
            default: j = min_lane | int(b & ~seg); in_range = j <= max_lane; break;
        }
        if (!in_range) j = int(i);
        if (!(c0.mask >> j & 1))
            fail(kLaunchFailed, strf("%s: lane %u reads lane %d, which the mask 0x%08x does not name (undefined)",
                                     "shuffle", i, j, c0.mask));
        if (wp.exited >> j & 1)
            fail(kLaunchFailed, strf("shuffle: lane %u reads lane %d, which has exited (undefined)", i, j));
        c.out[0] = w.fibers[warp * 32 + uint32_t(j)].coll.in[0];
    }
}

}  // namespace

void complete_collective(Worker& w, uint32_t warp, uint32_t mask) {
    Warp& wp = w.warps[warp];
    // The collective of `mask`: any waiting lane that named it.
    const Coll* c0 = nullptr;
    for (uint32_t l = 0; l < 32; ++l) {
        if ((wp.waiting >> l & 1) && w.fibers[warp * 32 + l].coll.mask == mask) {
            c0 = &w.fibers[warp * 32 + l].coll;
            break;
        }
    }
    if (c0 == nullptr || !ready(w, warp, *c0)) return;
    const uint32_t live = mask & ~wp.exited;
    switch (c0->op) {
        case kCollShfl: shuffle(w, warp, *c0); break;
        case kCollVote: {
            uint32_t ballot = 0;
            for (uint32_t l = 0; l < 32; ++l)
                if ((live >> l & 1) && w.fibers[warp * 32 + l].coll.in[0]) ballot |= 1u << l;
            const uint32_t r = c0->sub == kVoteBallot ? ballot : c0->sub == kVoteAny ? uint32_t(ballot != 0)
                                                                                      : uint32_t(ballot == live);
            for (uint32_t l = 0; l < 32; ++l)
                if (live >> l & 1) w.fibers[warp * 32 + l].coll.out[0] = r;
            break;
        }
        case kCollMatchAny: {
            for (uint32_t l = 0; l < 32; ++l) {
                if (!(live >> l & 1)) continue;
                uint32_t same = 0;
                for (uint32_t k = 0; k < 32; ++k)
                    if ((live >> k & 1) && w.fibers[warp * 32 + k].coll.wide == w.fibers[warp * 32 + l].coll.wide)
                        same |= 1u << k;
                w.fibers[warp * 32 + l].coll.out[0] = same;
            }
            break;
        }
        case kCollMatchAll: {
            bool all = true;
            for (uint32_t l = 0; l < 32; ++l)
                if ((live >> l & 1) && w.fibers[warp * 32 + l].coll.wide != c0->wide) all = false;
            for (uint32_t l = 0; l < 32; ++l) {
                if (!(live >> l & 1)) continue;
                w.fibers[warp * 32 + l].coll.out[0] = all ? live : 0;
                w.fibers[warp * 32 + l].coll.out[1] = all ? 1 : 0;
            }
            break;
        }
        case kCollSyncWarp: break;
        case kCollElect: {
            // elect.sync: the PTX ISA says only that the same mask elects the same leader. The
            // emulator elects the highest live lane, so code that assumes lane 0 fails here.
            const uint32_t leader = 31u - uint32_t(__builtin_clz(live));
            for (uint32_t l = 0; l < 32; ++l)
                if (live >> l & 1) w.fibers[warp * 32 + l].coll.out[0] = leader;
            break;
        }
        case kCollMma:
            mma(w, warp, c0->sub);
            count_tensor("mma.m16n8k16", c0->sub == kMmaBf16 ? "bf16" : "f16", 2 * 16 * 8 * 16);
            break;
        default: {
            const int n = c0->sub & 7;
            ldmatrix_all(w, warp, n, (c0->sub >> 4) & 1);
            if (counting(w)) {
                uint32_t rows[32];
                for (int l = 0; l < 8 * n; ++l) rows[l] = w.fibers[warp * 32 + uint32_t(l)].coll.in[0];
                count_ldmatrix(rows, n);
            }
            break;
        }
    }
    wp.waiting &= ~live;
    for (uint32_t l = 0; l < 32; ++l)
        if (live >> l & 1) w.fibers[warp * 32 + l].state = kReady;
}

namespace {

Coll& arrive(CollOp op, uint8_t sub, uint32_t mask) {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    Warp& wp = w.warps[f.warp];
    const uint32_t bit = 1u << f.lane;
    if (!(mask & bit))
        fail(kLaunchFailed, strf("%s with mask 0x%08x, which does not name the calling lane %u", op_name(op), mask, f.lane));
    if (mask & ~wp.present)
        fail(kLaunchFailed, strf("%s with mask 0x%08x names lanes past the block's last thread (a block of %u threads)",
                                 op_name(op), mask, w.nthreads));
    if (aligned_op(op) && (mask != 0xffffffffu || wp.exited != 0))
        fail(kLaunchFailed, strf("%s must be executed by all 32 lanes of the warp; lanes 0x%08x have exited", op_name(op),
                                 wp.exited));
    f.coll.op = op;
    f.coll.sub = sub;
    f.coll.mask = mask;
    f.state = kWaitWarp;
    wp.waiting |= bit;
    complete_collective(w, f.warp, mask);
    if (f.state == kWaitWarp) yield_to_scheduler();
    return f.coll;
}

}  // namespace

uint32_t shfl(uint32_t mask, uint32_t value, ShflMode mode, uint32_t b, uint32_t c) {
    Fiber& f = current_fiber();
    f.coll.in[0] = value;
    f.coll.in[1] = b;
    f.coll.in[2] = c;
    return arrive(kCollShfl, uint8_t(mode), mask).out[0];
}

uint32_t vote(uint32_t mask, VoteMode mode, bool pred) {
    current_fiber().coll.in[0] = pred ? 1 : 0;
    return arrive(kCollVote, uint8_t(mode), mask).out[0];
}

uint32_t match_any(uint32_t mask, uint64_t value) {
    current_fiber().coll.wide = value;
    return arrive(kCollMatchAny, 0, mask).out[0];
}

uint32_t match_all(uint32_t mask, uint64_t value, int* pred) {
    current_fiber().coll.wide = value;
    const Coll& c = arrive(kCollMatchAll, 0, mask);
    *pred = int(c.out[1]);
    return c.out[0];
}

void syncwarp(uint32_t mask) { arrive(kCollSyncWarp, 0, mask); }

bool elect_sync(uint32_t mask) { return arrive(kCollElect, 0, mask).out[0] == current_fiber().lane; }

void mma_m16n8k16(int kind, float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    Fiber& f = current_fiber();
    for (int i = 0; i < 4; ++i) f.coll.in[i] = a[i];
    f.coll.in[4] = b0;
    f.coll.in[5] = b1;
    for (int i = 0; i < 4; ++i) memcpy(&f.coll.in[6 + i], &acc[i], 4);
    const Coll& c = arrive(kCollMma, uint8_t(kind), 0xffffffffu);
    for (int i = 0; i < 4; ++i) memcpy(&acc[i], &c.out[i], 4);
}

void ldmatrix(int n, bool trans, uint32_t* r, uint32_t smem_addr) {
    current_fiber().coll.in[0] = smem_addr;
    const Coll& c = arrive(kCollLdmatrix, uint8_t(n | (trans ? 16 : 0)), 0xffffffffu);
    for (int i = 0; i < n; ++i) r[i] = c.out[i];
}

// ---- cp.async (PTX ISA 9.7.9.25.3) -------------------------------------------------------------

void cp_async(uint32_t dst, const void* src, int cp_size, uint32_t src_size, bool cg) {
    Worker& w = *tls_worker;
    Fiber& f = current_fiber();
    if (cg ? cp_size != 16 : (cp_size != 4 && cp_size != 8 && cp_size != 16))
        fail(kLaunchFailed, strf("cp.async.%s with cp-size %d (.ca takes 4, 8 or 16; .cg takes 16)", cg ? "cg" : "ca",
                                 cp_size));
    if (src_size > uint32_t(cp_size))
        fail(kLaunchFailed, strf("cp.async with src-size %u larger than cp-size %d (undefined)", src_size, cp_size));
    const uintptr_t d = reinterpret_cast<uintptr_t>(w.sh_lo) + dst;
    if (dst % uint32_t(cp_size) != 0)
        fail(kMisaligned, strf("cp.async destination 0x%x is not %d-byte aligned", dst, cp_size));
    if (!shared_ok(w, d, size_t(cp_size)))
        fail(kIllegalAddress, strf("cp.async destination: %s", describe_shared(w, d, size_t(cp_size)).c_str()));
    AsyncCopy c{};
    c.dst = reinterpret_cast<uint8_t*>(d);
    c.size = uint8_t(cp_size);
    if (src_size > 0) {
        const uintptr_t s = reinterpret_cast<uintptr_t>(src);
        if (s % uint32_t(cp_size) != 0)
            fail(kMisaligned, strf("cp.async source 0x%lx is not %d-byte aligned", (unsigned long)s, cp_size));
        std::string why;
        if (!heap_contains(s, src_size, &why))
            fail(kIllegalAddress, strf("cp.async reads %u bytes from global memory: %s", src_size, why.c_str()));
        memcpy(c.bytes, src, src_size);  // the source is read at issue; the bytes land at the wait
    }
    f.async.push_back(c);
    if (__builtin_expect(g_counting, 0)) {
        // The caller is the kernel's inlined cp.async wrapper: its return address is the site.
        const uint64_t site = uint64_t(__builtin_return_address(0));
        if (src_size > 0) count_access(site, reinterpret_cast<uintptr_t>(src), src_size, kGCpAsync);
        count_access(site, d, uint32_t(cp_size), kSCpAsync);
        count_async(kAsyncCpAsync, uint32_t(cp_size));
    }
}

void cp_async_commit() {
    Fiber& f = current_fiber();
    const uint32_t g = ++f.groups;  // an empty group too: it is complete at once
    for (AsyncCopy& c : f.async)
        if (c.group == 0) c.group = g;
}

void land_async(Fiber& f, uint32_t through) {
    size_t keep = 0;
    for (size_t i = 0; i < f.async.size(); ++i) {
        AsyncCopy& c = f.async[i];
        if (c.group != 0 && c.group <= through) {
            memcpy(c.dst, c.bytes, c.size);
            Worker& w = *tls_worker;
            mark_generic(w, uintptr_t(c.dst - w.sh_lo), c.size);  // cp.async writes as the generic proxy
        }
        else f.async[keep++] = c;
    }
    f.async.resize(keep);
    if (through > f.landed) f.landed = through;
}

// Groups G1..Gk committed: after wait_group N, G1..G(k-N) have landed. Copies not committed yet
// belong to no group and stay in flight.
void cp_async_wait(int n) {
    Fiber& f = current_fiber();
    if (f.groups > uint32_t(n)) land_async(f, f.groups - uint32_t(n));
}

void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait(0);
}

}  // namespace moe_emu
