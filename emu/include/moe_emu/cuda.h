// CUDA C++ on the host: the language extensions, built-in variables and intrinsics that
// kernels/*.cu use, for the CPU emulator. emu/build.rs force-includes this header when it
// compiles a kernel file with the host C++ compiler.
//
// What is here is implemented, each from the CUDA programming guide or the PTX ISA; what is not
// here is a build error in the emulated build. Three keywords are not macros:
// `__global__`, `__launch_bounds__` and `__shared__` survive preprocessing and emu/build.rs
// rewrites them (an entry point in the kernel table; a reference into the block's shared
// memory window), see emu/build.rs.
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

#define MOE_EMU 1

#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// ---- vector types -------------------------------------------------------------------------------

struct uint3 { unsigned x, y, z; };
// The driver's opaque 128-byte tensor map (cuda.h); the emulator's encoding is
// moe_emu/tensor_map.h.
struct alignas(64) CUtensorMap_st { unsigned long long opaque[16]; };
typedef CUtensorMap_st CUtensorMap;
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
// The 8- and 16-byte vector types. On the GPU a copy of one is a single 8- or 16-byte access
// (ld.v2/ld.v4, st.v2/st.v4); here it must be one too, or the profiler's counters would see
// two or four accesses where the hardware issues one request. So each type holds its fields
// beside a host vector of the same size, and copies go through that vector, hidden from the
// optimiser (which would otherwise split the copy into the fields it uses). Member access
// (`p->x`) stays a 4-byte access, as on the GPU.
namespace moe_emu {
template <typename V>
__attribute__((always_inline)) inline V opaque_vector(V v) {
    asm("" : "+x"(v));
    return v;
}
}  // namespace moe_emu
#define MOE_EMU_VECTOR2(NAME, T)                                                                     \
    union alignas(8) NAME {                                                                           \
        struct { T x, y; };                                                                           \
        T v_ __attribute__((vector_size(8)));                                                         \
        NAME() = default;                                                                             \
        constexpr NAME(T a, T b) : v_{a, b} {}                                                         \
        NAME(const NAME& o) : v_(::moe_emu::opaque_vector(o.v_)) {}                                    \
        NAME& operator=(const NAME& o) {                                                              \
            v_ = ::moe_emu::opaque_vector(o.v_);                                                      \
            return *this;                                                                             \
        }                                                                                             \
    };
#define MOE_EMU_VECTOR4(NAME, T)                                                                     \
    union alignas(16) NAME {                                                                          \
        struct { T x, y, z, w; };                                                                     \
        T v_ __attribute__((vector_size(16)));                                                        \
        NAME() = default;                                                                             \
        constexpr NAME(T a, T b, T c, T d) : v_{a, b, c, d} {}                                         \
        NAME(const NAME& o) : v_(::moe_emu::opaque_vector(o.v_)) {}                                    \
        NAME& operator=(const NAME& o) {                                                              \
            v_ = ::moe_emu::opaque_vector(o.v_);                                                      \
            return *this;                                                                             \
        }                                                                                             \
    };
MOE_EMU_VECTOR2(uint2, unsigned)
MOE_EMU_VECTOR4(uint4, unsigned)
MOE_EMU_VECTOR2(int2, int)
MOE_EMU_VECTOR4(int4, int)
MOE_EMU_VECTOR2(float2, float)
MOE_EMU_VECTOR4(float4, float)
#undef MOE_EMU_VECTOR2
#undef MOE_EMU_VECTOR4

inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- the runtime's entry points (emu/runtime) --------------------------------------------------

namespace moe_emu {

// The built-in variables of the thread now running on this OS thread. The scheduler sets
// thread_idx before it switches to a thread; all threads of a block run on one OS thread.
// Plain uint3s, so that the thread-local needs no initialisation call at each access.
struct Builtins {
    uint3 thread_idx;
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
};
extern thread_local Builtins builtins __attribute__((tls_model("initial-exec")));

// Block barrier (bar.sync 0): waits for every thread of the block that has not exited.
void syncthreads();
// Warp collectives. Each waits for the lanes `mask` names; a named lane that has exited fails
// the launch, one that waits elsewhere forever is a detected deadlock.
enum ShflMode : uint32_t { kShflUp = 0, kShflDown = 1, kShflBfly = 2, kShflIdx = 3 };
uint32_t shfl(uint32_t mask, uint32_t value, ShflMode mode, uint32_t b, uint32_t c);
enum VoteMode : uint32_t { kVoteBallot = 0, kVoteAny = 1, kVoteAll = 2 };
uint32_t vote(uint32_t mask, VoteMode mode, bool pred);
uint32_t match_any(uint32_t mask, uint64_t value);
uint32_t match_all(uint32_t mask, uint64_t value, int* pred);
void syncwarp(uint32_t mask);
// Checks an access the compiler does not instrument (atomics); fails the launch if [p, p + n)
// is neither inside one live device allocation nor inside the block's shared memory.
// `site` is the kernel's call site, for the profiler's counters.
void check_access(const volatile void* p, size_t n, bool write, const void* site);
// The shared-state-space address of a generic pointer into the block's shared memory.
uint32_t shared_offset(const void* p);
// The block's shared memory: a static variable's storage (one per `key`, i.e. per declaration,
// first come first placed) and the dynamic window of the launch.
void* shared_static(const void* key, size_t size, size_t align);
void* shared_dynamic(size_t align);
// Clock of the emulated thread: a per-thread counter, monotonic but not a time.
long long clock64();

// Storage of the rewritten `__shared__ <decl>` (emu/build.rs): one S per block, per declaration.
template <typename S>
__forceinline__ S& static_shared() {
    static const char key = 0;
    return *static_cast<S*>(shared_static(&key, sizeof(S), alignof(S)));
}

// One kernel entry point: emu/build.rs appends a table of these to every kernel file.
struct KernelDef {
    const char* name;
    void (*entry)(void* const* args);  // calls the kernel with *args[i] as argument i
    uint32_t nparams;
    uint32_t param_size[8];
    uint32_t param_align[8];
    uint32_t max_threads;  // __launch_bounds__'s first argument, else 1024
    const char* file;
};

template <typename F> struct Signature;
template <typename... A> struct Signature<void (*)(A...)> {
    static_assert(sizeof...(A) <= 8, "a kernel takes at most 8 parameters in the emulator");
    template <void (*F)(A...), size_t... I>
    static void call(void* const* args, std::index_sequence<I...>) {
        F(*static_cast<const std::remove_cv_t<A>*>(args[I])...);
    }
    static constexpr uint32_t count = sizeof...(A);
};

template <auto F>
void entry(void* const* args) {
    using S = Signature<decltype(F)>;
    S::template call<F>(args, std::make_index_sequence<S::count>{});
}

template <typename F> struct ParamLayout;
template <typename... A> struct ParamLayout<void (*)(A...)> {
    static constexpr uint32_t size(size_t i) {
        constexpr uint32_t s[] = {uint32_t(sizeof(A))..., 0};
        return i < sizeof...(A) ? s[i] : 0;
    }
    static constexpr uint32_t align(size_t i) {
        constexpr uint32_t s[] = {uint32_t(alignof(A))..., 0};
        return i < sizeof...(A) ? s[i] : 0;
    }
};

template <auto F>
constexpr KernelDef kernel_def(const char* name, uint32_t max_threads, const char* file) {
    using L = ParamLayout<decltype(F)>;
    return KernelDef{name,
                     &entry<F>,
                     Signature<decltype(F)>::count,
                     {L::size(0), L::size(1), L::size(2), L::size(3), L::size(4), L::size(5), L::size(6), L::size(7)},
                     {L::align(0), L::align(1), L::align(2), L::align(3), L::align(4), L::align(5), L::align(6),
                      L::align(7)},
                     max_threads,
                     file};
}

template <typename T>
__forceinline__ uint32_t to_bits32(T v) {
    static_assert(sizeof(T) == 4, "a 32-bit value");
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return u;
}
template <typename T>
__forceinline__ T from_bits32(uint32_t u) {
    T v;
    std::memcpy(&v, &u, 4);
    return v;
}

// A shuffle of a 4- or 8-byte value: 8-byte values travel as two 32-bit halves, as CUDA does.
template <typename T>
__forceinline__ T shfl_any(unsigned mask, T var, ShflMode mode, uint32_t b, uint32_t c) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__shfl_*_sync moves 4- or 8-byte values");
    if constexpr (sizeof(T) == 4) {
        return from_bits32<T>(shfl(mask, to_bits32(var), mode, b, c));
    } else {
        uint32_t h[2];
        std::memcpy(h, &var, 8);
        h[0] = shfl(mask, h[0], mode, b, c);
        h[1] = shfl(mask, h[1], mode, b, c);
        T out;
        std::memcpy(&out, h, 8);
        return out;
    }
}

// The c operand of shfl.sync for a CUDA width: segment mask in bits 8..12, clamp in bits 0..4.
constexpr uint32_t shfl_c(int width, bool up) { return (uint32_t(32 - width) << 8) | (up ? 0u : 0x1fu); }

}  // namespace moe_emu

#define threadIdx (static_cast<const uint3&>(::moe_emu::builtins.thread_idx))
#define blockIdx (static_cast<const uint3&>(::moe_emu::builtins.block_idx))
#define blockDim (static_cast<const uint3&>(::moe_emu::builtins.block_dim))
#define gridDim (static_cast<const uint3&>(::moe_emu::builtins.grid_dim))
constexpr int warpSize = 32;

// ---- synchronisation and warp intrinsics --------------------------------------------------------

inline void __syncthreads() { ::moe_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::moe_emu::syncwarp(mask); }

template <typename T>
__forceinline__ T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
    return ::moe_emu::shfl_any(mask, var, ::moe_emu::kShflIdx, uint32_t(src_lane), ::moe_emu::shfl_c(width, false));
}
template <typename T>
__forceinline__ T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::moe_emu::shfl_any(mask, var, ::moe_emu::kShflUp, delta, ::moe_emu::shfl_c(width, true));
}
template <typename T>
__forceinline__ T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::moe_emu::shfl_any(mask, var, ::moe_emu::kShflDown, delta, ::moe_emu::shfl_c(width, false));
}
template <typename T>
__forceinline__ T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return ::moe_emu::shfl_any(mask, var, ::moe_emu::kShflBfly, uint32_t(lane_mask), ::moe_emu::shfl_c(width, false));
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return ::moe_emu::vote(mask, ::moe_emu::kVoteBallot, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return int(::moe_emu::vote(mask, ::moe_emu::kVoteAny, pred != 0)); }
inline int __all_sync(unsigned mask, int pred) { return int(::moe_emu::vote(mask, ::moe_emu::kVoteAll, pred != 0)); }

template <typename T>
__forceinline__ unsigned __match_any_sync(unsigned mask, T value) {
    static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "32- or 64-bit integers");
    return ::moe_emu::match_any(mask, sizeof(T) == 4 ? uint64_t(uint32_t(value)) : uint64_t(value));
}
template <typename T>
__forceinline__ unsigned __match_all_sync(unsigned mask, T value, int* pred) {
    static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "32- or 64-bit integers");
    return ::moe_emu::match_all(mask, sizeof(T) == 4 ? uint64_t(uint32_t(value)) : uint64_t(value), pred);
}

inline long long clock64() { return ::moe_emu::clock64(); }

// ---- memory ------------------------------------------------------------------------------------

template <typename T>
__forceinline__ T __ldg(const T* p) {
    return *p;
}

inline size_t __cvta_generic_to_shared(const void* p) { return ::moe_emu::shared_offset(p); }

// Atomics on global or shared memory. The block's threads share one OS thread, blocks run on
// several, so global atomics are real ones. They are checked (and counted) once, as one atomic
// access: not instrumented, and never inlined, so that their return address is the kernel's
// call site.
#define MOE_EMU_ATOMIC_FN __attribute__((noinline, no_sanitize_address)) inline
#define MOE_EMU_ATOMIC(NAME, T, EXPR)                                         \
    MOE_EMU_ATOMIC_FN T NAME(T* p, T v) {                                     \
        ::moe_emu::check_access(p, sizeof(T), true, __builtin_return_address(0)); \
        T old;                                                                \
        __atomic_load(p, &old, __ATOMIC_RELAXED);                            \
        T next;                                                               \
        do {                                                                  \
            next = (EXPR);                                                    \
        } while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)); \
        return old;                                                           \
    }
MOE_EMU_ATOMIC(atomicAdd, int, int(unsigned(old) + unsigned(v)))
MOE_EMU_ATOMIC(atomicAdd, unsigned, old + v)
MOE_EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
MOE_EMU_ATOMIC(atomicAdd, float, old + v)
MOE_EMU_ATOMIC(atomicAdd, double, old + v)
MOE_EMU_ATOMIC(atomicSub, int, int(unsigned(old) - unsigned(v)))
MOE_EMU_ATOMIC(atomicSub, unsigned, old - v)
MOE_EMU_ATOMIC(atomicMax, int, old > v ? old : v)
MOE_EMU_ATOMIC(atomicMax, unsigned, old > v ? old : v)
MOE_EMU_ATOMIC(atomicMin, int, old < v ? old : v)
MOE_EMU_ATOMIC(atomicMin, unsigned, old < v ? old : v)
MOE_EMU_ATOMIC(atomicExch, int, v)
MOE_EMU_ATOMIC(atomicExch, unsigned, v)
MOE_EMU_ATOMIC(atomicOr, unsigned, old | v)
MOE_EMU_ATOMIC(atomicAnd, unsigned, old & v)
MOE_EMU_ATOMIC(atomicXor, unsigned, old ^ v)
#undef MOE_EMU_ATOMIC

MOE_EMU_ATOMIC_FN int atomicCAS(int* p, int compare, int v) {
    ::moe_emu::check_access(p, sizeof(int), true, __builtin_return_address(0));
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
MOE_EMU_ATOMIC_FN unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) {
    ::moe_emu::check_access(p, sizeof(unsigned), true, __builtin_return_address(0));
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}

#undef MOE_EMU_ATOMIC_FN

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- integer and bit intrinsics ----------------------------------------------------------------

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}

// Bytes x<7:0> .. x<31:24> are inputs 0..3, y's 4..7; result byte n is input (s >> 4n) & 7
// (the CUDA Math API's integer intrinsics: three selector bits per byte, no sign replication).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long in = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= static_cast<unsigned>((in >> (8 * ((s >> (4 * n)) & 7u))) & 0xffu) << (8 * n);
    return r;
}

inline float __int_as_float(int x) { return ::moe_emu::from_bits32<float>(uint32_t(x)); }
inline float __uint_as_float(unsigned x) { return ::moe_emu::from_bits32<float>(x); }
inline int __float_as_int(float x) { return int(::moe_emu::to_bits32(x)); }
inline unsigned __float_as_uint(float x) { return ::moe_emu::to_bits32(x); }
inline double __longlong_as_double(long long x) {
    double d;
    std::memcpy(&d, &x, 8);
    return d;
}
inline long long __double_as_longlong(double x) {
    long long v;
    std::memcpy(&v, &x, 8);
    return v;
}

// ---- float intrinsics: IEEE round-to-nearest, never contracted (the host build uses
// -ffp-contract=off), so __fmul_rn and friends are the plain operators. The fast-math forms are
// the libm functions: the GPU's approximations differ in the last bits, which the emulator does
// not model.

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __saturatef(float a) { return a != a ? 0.f : (a < 0.f ? 0.f : (a > 1.f ? 1.f : a)); }

// CUDA's min/max overloads for the integer and float types.
#define MOE_EMU_MINMAX(T)                                  \
    inline T min(T a, T b) { return a < b ? a : b; }       \
    inline T max(T a, T b) { return a > b ? a : b; }
MOE_EMU_MINMAX(int)
MOE_EMU_MINMAX(unsigned)
MOE_EMU_MINMAX(long)
MOE_EMU_MINMAX(unsigned long)
MOE_EMU_MINMAX(long long)
MOE_EMU_MINMAX(unsigned long long)
#undef MOE_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
