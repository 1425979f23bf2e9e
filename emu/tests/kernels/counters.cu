// Kernels whose counters are known by hand, for the profiler's tests (emu/tests/counters.rs):
// each exercises one counting rule of emu/runtime/counters.cpp.

#include <stdint.h>

#include "dtype.cuh"
#include "ptx.cuh"
#include "ptx_sm90.cuh"

struct CountParams {
    const uint8_t* src;
    uint8_t* dst;
    uint32_t* word;  // one word for the atomics
    int32_t n;       // elements (per kernel's own unit)
    int32_t mode;
};

// Mode 0: one 16-byte __ldg and one 16-byte store per thread, element i by thread i (coalesced).
// Mode 1: the vector accesses the kernels use, one each per thread at 16-byte stride: uint4
// load and store, uint2 load and store, float4 load, Vec16 through load_vec16/store_vec16,
// each over its own quarter of src (thirds of dst).
extern "C" __global__ void __launch_bounds__(256) emu_count_copy(const CountParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const uint4* s = reinterpret_cast<const uint4*>(p.src);
    uint4* d = reinterpret_cast<uint4*>(p.dst);
    if (p.mode == 0) {
        d[i] = __ldg(s + i);
        return;
    }
    // Each access below is one request per warp, 16 (8) bytes per lane, each from its own part
    // of the buffers so that none can be merged with another.
    const int n = p.n;
    const uint4 a = s[i];
    const uint2 b = reinterpret_cast<const uint2*>(s + n + i)[0];
    const float4 c = reinterpret_cast<const float4*>(s + 2 * n + i)[0];
    const moe::Vec16<__nv_bfloat16> v = moe::load_vec16(reinterpret_cast<const __nv_bfloat16*>(s + 3 * n + i));
    uint4 r = a;
    r.x ^= b.y;
    r.y ^= __float_as_uint(c.z);
    d[i] = r;
    reinterpret_cast<uint2*>(d + n + i)[0] = b;
    moe::store_vec16(reinterpret_cast<__nv_bfloat16*>(d + 2 * n + i), v);
}

// Reads 4-byte words: mode 0 at a stride of 8 words (each lane its own sector); mode 1 all lanes
// word 0 (a broadcast); mode 2 the coalesced word i, four times over.
extern "C" __global__ void __launch_bounds__(256) emu_count_read(const CountParams p) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const uint32_t* s = reinterpret_cast<const uint32_t*>(p.src);
    uint32_t acc = 0;
    if (p.mode == 0) acc = s[8 * i];
    else if (p.mode == 1) acc = s[0];
    else
        for (int r = 0; r < 4; ++r) acc += s[i] * uint32_t(r + 1);
    reinterpret_cast<uint32_t*>(p.dst)[i] = acc;
}

// One block reads p.n bytes twice, 16 bytes per thread per step: mode 0 the whole buffer, then
// the whole buffer again (the second pass misses an L2 smaller than the buffer); mode 1 each
// 64 KiB chunk twice before the next (the second read of a chunk hits).
extern "C" __global__ void __launch_bounds__(1024) emu_count_reread(const CountParams p) {
    const uint4* s = reinterpret_cast<const uint4*>(p.src);
    const int n = p.n / 16, t = threadIdx.x, step = blockDim.x;
    uint32_t acc = 0;
    if (p.mode == 0) {
        for (int pass = 0; pass < 2; ++pass)
            for (int i = t; i < n; i += step) {
                const uint4 v = __ldg(s + i);
                acc ^= v.x ^ v.y ^ v.z ^ v.w;
            }
    } else {
        const int chunk = 65536 / 16;
        for (int c = 0; c < n; c += chunk)
            for (int pass = 0; pass < 2; ++pass)
                for (int i = c + t; i < c + chunk && i < n; i += step) {
                    const uint4 v = __ldg(s + i);
                    acc ^= v.x ^ v.y ^ v.z ^ v.w;
                }
    }
    reinterpret_cast<uint32_t*>(p.dst)[t] = acc;
}

// Shared memory, one warp: mode 0..3 store then load 4-byte words at lane x stride for strides
// 1, 2, 4, 32 (1-, 2-, 4- and 32-way bank conflicts); mode 4 all lanes load word 0 (broadcast);
// mode 5 16-byte stores and loads by lane (conflict-free, 4 wavefronts each); mode 6 16-byte
// accesses at a 128-byte stride (every quarter-warp's 8 rows in the same 4 banks: 8-way);
// mode 7 8-byte loads by half-warps, each half reading the same 128 bytes (1 wavefront a half).
extern "C" __global__ void __launch_bounds__(32) emu_count_shared(const CountParams p) {
    __shared__ __align__(16) uint32_t tile[32 * 32 * 4];
    const int l = threadIdx.x;
    uint32_t v = 0;
    if (p.mode <= 3) {
        const int stride = 1 << (p.mode == 3 ? 5 : p.mode);
        tile[l * stride] = uint32_t(l);
        __syncwarp();
        v = tile[l * stride];
    } else if (p.mode == 4) {
        if (l == 0) tile[0] = 7;
        __syncwarp();
        v = tile[0];
    } else if (p.mode == 7) {
        uint2* q = reinterpret_cast<uint2*>(tile) + (l % 16);
        if (l < 16) *q = make_uint2(l, l);
        __syncwarp();
        const uint2 x = *q;
        v = x.x ^ x.y;
    } else {
        const int stride = p.mode == 5 ? 4 : 32;
        uint4* q = reinterpret_cast<uint4*>(tile + l * stride);
        *q = make_uint4(l, l, l, l);
        __syncwarp();
        const uint4 x = *q;
        v = x.y ^ x.w;
    }
    reinterpret_cast<uint32_t*>(p.dst)[l] = v;
}

// ldmatrix.x4 of an 8-row tile per matrix whose rows are 128 bytes apart: mode 0 unswizzled
// (every row of a matrix in banks 0-3: 8 wavefronts per matrix), mode 1 with the row's 16-byte
// chunk XOR-ed by the row (conflict-free: 1 per matrix).
extern "C" __global__ void __launch_bounds__(32) emu_count_ldmatrix(const CountParams p) {
    __shared__ __align__(128) uint8_t tile[4 * 8 * 128];
    const int l = threadIdx.x;
    for (int i = l; i < int(sizeof tile / 4); i += 32) reinterpret_cast<uint32_t*>(tile)[i] = uint32_t(i);
    __syncwarp();
    const int m = l / 8, r = l % 8;
    const int chunk = p.mode == 1 ? (r ^ m) & 7 : m;
    uint32_t out[4];
    moe::ptx::ldmatrix<4>(out, tile + (m * 8 + r) * 128 + chunk * 16);
    reinterpret_cast<uint32_t*>(p.dst)[l] = out[0] ^ out[1] ^ out[2] ^ out[3];
}

// Tensor cores and copies: mode 0 one mma.sync m16n8k16 bf16 per warp; mode 1 one warpgroup's
// four chained wgmma m64n64k16 bf16; mode 2 one 16-byte cp.async per thread, coalesced, then a
// wait; mode 3 one atomicAdd per thread on one word.
extern "C" __global__ void __launch_bounds__(128) emu_count_units(const CountParams p) {
    extern __shared__ __align__(1024) uint8_t smem[];
    const int t = threadIdx.x;
    if (p.mode == 0) {
        const uint32_t a[4] = {0x3f803f80u, 0, 0, 0};
        float acc[4] = {0, 0, 0, 0};
        moe::ptx::Mma<__nv_bfloat16>::run(acc, a, 0x3f803f80u, 0);
        reinterpret_cast<float*>(p.dst)[t] = acc[0];
    } else if (p.mode == 1) {
        float d[32];
        for (int v = 0; v < 32; ++v) d[v] = 0.f;
        moe::ptx::wgmma_fence();
        for (int kk = 0; kk < 4; ++kk)
            moe::ptx::Wgmma<__nv_bfloat16, 64>::run(
                d, moe::ptx::smem_desc(smem + kk * 256, 128, 1024, moe::ptx::DescSwizzle::None),
                moe::ptx::smem_desc(smem + 8192 + kk * 256, 128, 1024, moe::ptx::DescSwizzle::None), kk > 0);
        moe::ptx::wgmma_commit();
        moe::ptx::wgmma_wait<0>();
        reinterpret_cast<float*>(p.dst)[t] = d[0];
    } else if (p.mode == 2) {
        moe::ptx::cp_async_cg16(smem + 16 * t, p.src + 16 * t, 16);
        moe::ptx::cp_async_wait_all();
        __syncthreads();
        reinterpret_cast<uint32_t*>(p.dst)[t] = reinterpret_cast<const uint32_t*>(smem)[4 * t];
    } else {
        atomicAdd(p.word, 1u);
    }
}
