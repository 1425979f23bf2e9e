// IEEE binary16 for the CPU emulator's host build of the kernels: the storage type and its
// conversions, bit for bit CUDA's (round to nearest even, overflow to infinity, every NaN
// becomes 0x7fff).
#pragma once

#include <stdint.h>
#include <string.h>

struct __half {
    unsigned short __x;
};

inline float __half2float(__half h) {
    const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
    const uint32_t e = (h.__x >> 10) & 0x1fu, m = h.__x & 0x3ffu;
    uint32_t u;
    if (e == 0x1f) {
        u = sign | 0x7f800000u | (m << 13);
    } else if (e == 0) {
        // Zero or subnormal: m * 2^-24, exact in f32.
        float v = float(m) * 5.9604644775390625e-8f;
        memcpy(&u, &v, 4);
        u |= sign;
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const unsigned short sign = static_cast<unsigned short>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return __half{0x7fff};
    if (ax >= 0x47800000u) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // >= 2^16
    if (ax >= 0x38800000u) {  // a normal half (>= 2^-14); rounding may carry up to infinity
        const uint32_t mant = ax & 0x7fffffu;
        uint32_t h = ((((ax >> 23) - 127u + 15u)) << 10) | (mant >> 13);
        const uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
        return __half{static_cast<unsigned short>(sign | h)};
    }
    if (ax < 0x33000000u) return __half{sign};  // below 2^-25: rounds to zero
    // A subnormal half: the value is mant * 2^(e - 150); in units of 2^-24 that is mant >> (126 - e).
    const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(ax >> 23);
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return __half{static_cast<unsigned short>(sign | h)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }

inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
