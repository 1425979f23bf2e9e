// The CPU emulator's twins of the PTX instructions in kernels/common/ptx.cuh, each implemented
// in emu/runtime from the PTX ISA's definition (the section named beside each).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>

namespace moe_emu {

enum MmaKind : int { kMmaBf16 = 0, kMmaF16 = 1 };

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ("Matrix Fragments for
// mma.m16n8k16 with floating point type"): acc = A . B + acc. A warp collective of all 32 lanes.
void mma_m16n8k16(int kind, float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 ("Warp-level matrix load
// instruction: ldmatrix"). A warp collective of all 32 lanes; r holds n registers.
void ldmatrix(int n, bool trans, uint32_t* r, uint32_t smem_addr);

// cp.async.{ca,cg}.shared.global [dst], [src], cp_size, src_size ("Data Movement and Conversion
// Instructions: cp.async"): the bytes land at the cp.async.wait_group that covers their group.
void cp_async(uint32_t dst, const void* src, int cp_size, uint32_t src_size, bool cg);
void cp_async_commit();
void cp_async_wait(int n);
void cp_async_wait_all();

// prmt.b32, generic mode ("Data Movement and Conversion Instructions: prmt"): the 8 bytes
// {b, a} are numbered 0..7 from a's low byte; result byte n is byte (sel >> 4n) & 7, or, where
// bit 3 of that nibble is set, the top bit of that byte replicated over the 8 bits.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
    const uint64_t bytes = (uint64_t(b) << 32) | a;
    uint32_t d = 0;
    for (int n = 0; n < 4; ++n) {
        const uint32_t s = (sel >> (4 * n)) & 15u;
        uint32_t v = uint32_t(bytes >> (8 * (s & 7u))) & 0xffu;
        if (s & 8u) v = (v & 0x80u) ? 0xffu : 0u;
        d |= v << (8 * n);
    }
    return d;
}

// cvt.rn.f16x2.e4m3x2 d, a ("cvt", conversions from e4m3x2): the e4m3fn value in a's low byte
// to d's low half, the high byte's to the high half. Every e4m3fn value is exact in f16:
// +-0, subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e - 7) up to 448; S.1111.111 is NaN
// (0x7fff here: the canonical NaN, sign dropped).
inline uint16_t e4m3_to_f16_bits(uint32_t b) {
    const uint32_t sign = (b & 0x80u) << 8, e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15u && m == 7u) return 0x7fffu;
    if (e != 0u) return uint16_t(sign | ((e + 8u) << 10) | (m << 7));  // f16 exponent e - 7 + 15
    if (m == 0u) return uint16_t(sign);
    // m * 2^-9 with m's top bit p: 2^(p - 9) * (1 + (m - 2^p) / 2^p), a normal f16.
    const uint32_t p = m >= 4u ? 2u : (m >= 2u ? 1u : 0u);
    return uint16_t(sign | ((p + 6u) << 10) | ((m - (1u << p)) << (10u - p)));
}

inline uint32_t cvt_f16x2_e4m3x2(uint16_t a) {
    return uint32_t(e4m3_to_f16_bits(a & 0xffu)) | (uint32_t(e4m3_to_f16_bits(uint32_t(a) >> 8)) << 16);
}

// lop3.b32 d, a, b, c, immLut ("Logic and Shift Instructions: lop3"): immLut is the truth table
// of F(a, b, c) written as F(0xf0, 0xcc, 0xaa), so bit i of d is bit (a_i b_i c_i, a the high
// bit) of immLut.
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
    uint32_t d = 0;
    for (int i = 0; i < 32; ++i) {
        const uint32_t idx = (((a >> i) & 1u) << 2) | (((b >> i) & 1u) << 1) | ((c >> i) & 1u);
        d |= ((lut >> idx) & 1u) << i;
    }
    return d;
}

// fma.rn.{bf16x2,f16x2} d, a, b, c ("Half Precision Floating Point Instructions: fma"): per
// 16-bit half (low half from the low bits), d = a * b + c computed exactly and rounded once to
// the format, to nearest even; overflow to infinity, subnormals kept (the instruction has no
// .ftz for bf16, and f16 keeps subnormals without it). A NaN result is the canonical NaN.
inline double half_bits_value(MmaKind kind, uint32_t h) {
    const bool neg = (h & 0x8000u) != 0u;
    const int mbits = kind == kMmaBf16 ? 7 : 10;
    const int ebits = 15 - mbits, bias = (1 << (ebits - 1)) - 1;
    const uint32_t e = (h >> mbits) & ((1u << ebits) - 1u), m = h & ((1u << mbits) - 1u);
    double v;
    if (e == (1u << ebits) - 1u) v = m != 0u ? NAN : INFINITY;
    else if (e == 0u) v = std::ldexp(double(m), 1 - bias - mbits);
    else v = std::ldexp(double(m | (1u << mbits)), int(e) - bias - mbits);
    return neg ? -v : v;
}

// v + tail (tail the exact remainder of the double sum that made v, |tail| below half an ulp
// of v in double) rounded once to the format.
inline uint32_t half_bits_round(MmaKind kind, double v, double tail) {
    const int mbits = kind == kMmaBf16 ? 7 : 10;
    const int ebits = 15 - mbits, bias = (1 << (ebits - 1)) - 1;
    if (std::isnan(v)) return 0x7fffu;
    const uint32_t sign = std::signbit(v) ? 0x8000u : 0u;
    const uint32_t inf = ((1u << ebits) - 1u) << mbits;
    if (std::isinf(v)) return sign | inf;
    if (v == 0.0) return tail == 0.0 ? sign : half_bits_round(kind, tail, 0.0);
    const double a = std::fabs(v), t = std::signbit(v) ? -tail : tail;  // t: toward larger |v|
    int e2;
    std::frexp(a, &e2);                          // a = f * 2^e2, f in [0.5, 1)
    const int exp = std::max(e2 - 1, 1 - bias);  // the unbiased exponent, the normals' floor
    const double units = std::ldexp(a, mbits - exp);  // exact: a in units of the last place
    double q = std::floor(units);
    const double frac = units - q;
    if (frac > 0.5 || (frac == 0.5 && (t > 0.0 || (t == 0.0 && std::fmod(q, 2.0) != 0.0)))) q += 1.0;
    const double r = std::ldexp(q, exp - mbits);
    if (r >= std::ldexp(1.0, bias + 1)) return sign | inf;
    if (r < std::ldexp(1.0, 1 - bias)) return sign | uint32_t(q);  // subnormal: q < 2^mbits
    int re;
    std::frexp(r, &re);
    const uint32_t e = uint32_t(re - 1 + bias);
    const uint32_t m = uint32_t(std::ldexp(r, mbits - (re - 1))) & ((1u << mbits) - 1u);
    return sign | (e << mbits) | m;
}

inline uint32_t fma_x2(MmaKind kind, uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d = 0;
    for (int i = 0; i < 2; ++i) {
        const int s = 16 * i;
        // a * b is exact in double (at most 22 significant bits); the sum's rounding error is
        // exact by TwoSum and decides a tie at the format's precision.
        const double p = half_bits_value(kind, (a >> s) & 0xffffu) * half_bits_value(kind, (b >> s) & 0xffffu);
        const double c0 = half_bits_value(kind, (c >> s) & 0xffffu);
        const double v = p + c0, bv = v - p;
        const double tail = std::isfinite(v) ? (p - (v - bv)) + (c0 - bv) : 0.0;
        d |= half_bits_round(kind, v, tail) << s;
    }
    return d;
}

// ---- Hopper (sm_90a), kernels/common/ptx_sm90.cuh; implemented in emu/runtime/hopper.cpp ----

// mbarrier.init / inval / arrive / expect_tx / try_wait.parity on the shared::cta object at
// shared offset `bar` ("Parallel Synchronization and Communication Instructions: mbarrier").
void mbarrier_init(uint32_t bar, uint32_t count);
void mbarrier_inval(uint32_t bar);
uint64_t mbarrier_arrive(uint32_t bar, uint32_t count);
void mbarrier_expect_tx(uint32_t bar, uint32_t tx);
uint64_t mbarrier_arrive_expect_tx(uint32_t bar, uint32_t tx);
bool mbarrier_try_wait_parity(uint32_t bar, uint32_t parity);

// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], size, [bar]
// ("Data Movement and Conversion Instructions: cp.async.bulk").
void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar);

// cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes
// [dst], [map, {coords}], [bar] ("cp.async.bulk.tensor"): coords innermost first.
void bulk_tensor_g2s(uint32_t dst, const void* map, int rank, const int32_t* coords, uint32_t bar);

// elect.sync _|p, membermask ("elect.sync"): a warp collective; true in one lane of the mask.
bool elect_sync(uint32_t mask);

// setmaxnreg.{inc,dec}.sync.aligned.u32 n ("setmaxnreg"): checked, otherwise nothing.
void setmaxnreg(bool inc, uint32_t n);

// wgmma.fence / commit_group / wait_group and wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}
// with both operands from shared memory, K-major ("Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate Instructions"): d holds the thread's N / 2 accumulators. Warpgroup collectives.
void wgmma_fence();
void wgmma_mma_async(int kind, uint32_t n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d);
void wgmma_commit();
void wgmma_wait(int n);

// fence.proxy.async.shared::cta ("membar / fence"): orders this block's generic-proxy writes to
// shared memory before the async proxy's later reads of them (wgmma, bulk stores).
void fence_proxy_async();

}  // namespace moe_emu
