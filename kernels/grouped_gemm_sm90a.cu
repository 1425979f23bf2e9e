// Grouped expert GEMM v3, for Hopper (sm_90a): the product, epilogue and operands of
// grouped_gemm.cu (its header gives them), through the bulk tensor copy engine and wgmma.
//
// grouped_gemm_v3_{in}_{out}(GroupedGemmV3Params q), in = bf16 | f16, out = in | f32: over q.g,
//   with a [P, Kd] (gathered, padded layout) read through q.a_map and the weights [E*N, Kd]
//   through q.b_map, both tiled maps of 64-element (128-byte) boxes with the 128-byte swizzle.
//
// v3.0, first version:
//   - Tiles: 128 rows (two consumer warpgroups of 64) x 128 weight rows (gated: 64 gate + 64 up,
//     so 64 output columns; plain: 128 columns), BK = 64, four stages of 32 KB in dynamic shared
//     memory, each 1024-byte aligned.
//   - Warp-specialised: warpgroup 0 is the producer (one elected thread issues the copies onto
//     the stage's "full" mbarrier with its transaction bytes; the warpgroup gives registers back
//     with setmaxnreg); warpgroups 1 and 2 are consumers: wait on "full", four wgmma m64n128k16
//     per stage from swizzled K-major descriptors, wait for them, release the stage on "empty".
//   - Persistent: a grid of at most one block per SM walks (row block, column tile) items in
//     order; items whose row block belongs to no expert (block_experts -1) cost a read. Producer
//     and consumers walk the same items, and the stage ring and its phases run on across items.
//   - Tails: rows past the tensor and k past Kd arrive as zeros (the maps' fill); weight rows of
//     the next expert or past N, read for a column tile that overhangs N_out, are never written.
//   Not yet: wgmma overlapped across stages (each stage waits for its own), TMA multicast,
//   clusters, the gather-free input (v2 has it), tile shapes chosen by the problem.

#include "act.cuh"
#include "dtype.cuh"
#include "epilogue.cuh"
#include "params.cuh"
#include "ptx_sm90.cuh"

namespace moe {

constexpr int kV3BM = 128;                       // rows per tile: two consumer warpgroups of 64
constexpr int kV3BN = 128;                       // weight rows per tile
constexpr int kV3BK = 64;                        // k per stage: one 128-byte swizzle span of 16-bit
constexpr int kV3Stages = 4;
constexpr int kV3Threads = 384;                  // producer warpgroup + two consumers
constexpr int kV3TileBytes = kV3BM * kV3BK * 2;  // one stage of A (= one stage of B): 16 KB
constexpr int kV3StageBytes = 2 * kV3TileBytes;
constexpr int kV3SmemBytes = kV3Stages * kV3StageBytes + 1024;  // + slack to align to 1024
static_assert(kV3BM == kV3BN, "A and B stages share one size");
static_assert(kV3BK * 2 == 128, "a tile row is exactly the 128-byte swizzle span");
static_assert(kV3SmemBytes == 132096, "mirror in src/gemm/mod.rs");

// The argument of v3: the two tensor maps (64-byte aligned, first) and the parameters the
// epilogue helpers take. Mirrored in src/params.rs.
struct GroupedGemmV3Params {
    CUtensorMap a_map;  // a [P, Kd]: dims {Kd, P}, box {64, 128}, 128-byte swizzle
    CUtensorMap b_map;  // w [E*N, Kd]: dims {Kd, E*N}, box {64, 64}, 128-byte swizzle
    GroupedGemmParams g;
};
static_assert(sizeof(GroupedGemmV3Params) == 384, "mirror in src/params.rs");
static_assert(offsetof(GroupedGemmV3Params, g) == 256, "mirror in src/params.rs");

// The first weight row of each 64-row half of B for output columns n0.. (gated: column tile of
// 64, halves gate | up, or one interleaved run of 128; plain: columns n0 .. n0 + 127).
__device__ __forceinline__ void v3_b_rows(const GroupedGemmParams& p, int e, int n0, int (&row)[2]) {
    const int base = e * p.n;
    if (!p.gated) {
        row[0] = base + n0;
        row[1] = base + n0 + 64;
    } else if (p.layout == kInterleaved) {
        row[0] = base + 2 * n0;
        row[1] = base + 2 * n0 + 64;
    } else {
        row[0] = base + weight_row(p, n0, 0);
        row[1] = base + weight_row(p, n0, 1);
    }
}

// The work items: row block mb (of kV3BM rows) and column tile nb, item = mb * n_tiles + nb.
struct V3Item {
    int64_t m0;
    int n0;
    int e;
};

__device__ __forceinline__ bool v3_item(const GroupedGemmParams& p, int64_t item, int n_tiles, V3Item& it) {
    const int n_out = p.gated ? p.n / 2 : p.n;
    const int per_tile = p.gated ? kV3BN / 2 : kV3BN;
    it.m0 = (item / n_tiles) * kV3BM;
    it.n0 = int(item % n_tiles) * per_tile;
    it.e = p.block_experts[it.m0 / p.plan_block_m];
    return it.e >= 0 && it.e < p.experts && it.n0 < n_out;
}

template <typename T, typename TO>
__device__ __forceinline__ void grouped_gemm_v3(const GroupedGemmV3Params& q) {
    const GroupedGemmParams& p = q.g;
    extern __shared__ __align__(1024) uint8_t smem_v3_raw[];
    __shared__ __align__(8) uint64_t full[kV3Stages];
    __shared__ __align__(8) uint64_t empty[kV3Stages];
    // The swizzle is a function of the address: stages start on 1024-byte boundaries.
    uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_v3_raw) + 1023) & ~uintptr_t(1023));

    const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
    const int n_out = p.gated ? p.n / 2 : p.n;
    const int per_tile = p.gated ? kV3BN / 2 : kV3BN;
    const int n_tiles = (n_out + per_tile - 1) / per_tile;
    const int64_t items = int64_t(p.rows / kV3BM) * n_tiles;
    const int ktiles = (p.kdim + kV3BK - 1) / kV3BK;

    if (threadIdx.x == 0) {
        for (int s = 0; s < kV3Stages; ++s) {
            ptx::mbarrier_init(&full[s], 1);   // the producer's arrive, with the stage's bytes
            ptx::mbarrier_init(&empty[s], 2);  // one arrive per consumer warpgroup
        }
        ptx::fence_proxy_async();  // the initialised barriers, before the copy engine uses them
    }
    __syncthreads();

    int stage = 0;
    uint32_t phase = 0;
    auto advance = [&] {
        if (++stage == kV3Stages) {
            stage = 0;
            phase ^= 1;
        }
    };

    if (wg == 0) {
        // Producer.
        ptx::setmaxnreg<40, false>();
        if (threadIdx.x / 32 != 0 || !ptx::elect_one()) return;
        for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
            V3Item it;
            if (!v3_item(p, item, n_tiles, it)) continue;
            int brow[2];
            v3_b_rows(p, it.e, it.n0, brow);
            for (int kt = 0; kt < ktiles; ++kt) {
                ptx::mbarrier_wait(&empty[stage], phase ^ 1);  // a fresh stage passes at once
                uint8_t* sa = smem + stage * kV3StageBytes;
                uint8_t* sb = sa + kV3TileBytes;
                ptx::mbarrier_arrive_expect_tx(&full[stage], kV3StageBytes);
                ptx::tma_load_2d(sa, &q.a_map, &full[stage], kt * kV3BK, int32_t(it.m0));
                ptx::tma_load_2d(sb, &q.b_map, &full[stage], kt * kV3BK, brow[0]);
                ptx::tma_load_2d(sb + kV3TileBytes / 2, &q.b_map, &full[stage], kt * kV3BK, brow[1]);
                advance();
            }
        }
        return;
    }

    // Consumers: warpgroup c computes rows 64c .. 64c + 63 of each tile.
    ptx::setmaxnreg<232, true>();
    const int c = wg - 1;
    TO* out = static_cast<TO*>(p.out);
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
        V3Item it;
        if (!v3_item(p, item, n_tiles, it)) continue;
        float acc[64];
        for (int kt = 0; kt < ktiles; ++kt) {
            ptx::mbarrier_wait(&full[stage], phase);
            const uint8_t* sa = smem + stage * kV3StageBytes + c * (kV3TileBytes / 2);
            const uint8_t* sb = smem + stage * kV3StageBytes + kV3TileBytes;
            __syncwarp();  // the waits and epilogue branches may leave lanes apart: .aligned below
            ptx::wgmma_fence();
            ptx::fence_operand(acc);
#pragma unroll
            for (int kk = 0; kk < kV3BK / 16; ++kk) {
                // K-major, 128-byte swizzle: 8-row groups 1024 bytes apart, k16 slices 32 bytes.
                const uint64_t da = ptx::smem_desc(sa + kk * 32, 0, 1024, ptx::DescSwizzle::B128);
                const uint64_t db = ptx::smem_desc(sb + kk * 32, 0, 1024, ptx::DescSwizzle::B128);
                ptx::Wgmma<T, 128>::run(acc, da, db, kt > 0 || kk > 0);
            }
            ptx::wgmma_commit();
            ptx::wgmma_wait<0>();
            ptx::fence_operand(acc);
            if (t == 0) ptx::mbarrier_arrive(&empty[stage]);
            advance();
        }
        if (ktiles == 0) {
            for (int v = 0; v < 64; ++v) acc[v] = 0.f;
        }
        // Epilogue: register v of thread t holds row 16 (t / 32) + (t % 32) / 4 + 8 ((v / 2) % 2)
        // and accumulator column cc = 8 (v / 4) + 2 (t % 4) + v % 2.
#pragma unroll
        for (int v = 0; v < 64; ++v) {
            const int64_t r = it.m0 + 64 * c + 16 * (t / 32) + (t % 32) / 4 + 8 * ((v >> 1) & 1);
            const int cc = 8 * (v >> 2) + 2 * (t % 4) + (v & 1);
            int j;
            float gate = acc[v], up = 0.f;
            if (!p.gated) {
                j = it.n0 + cc;
            } else if (p.layout == kInterleaved) {
                if (v & 1) continue;  // the up half of the pair held at v - 1
                j = it.n0 + cc / 2;
                up = acc[v + 1];
            } else {
                if (cc >= 64) continue;  // the up half, held at v - 32
                j = it.n0 + cc;
                up = acc[v + 32];
            }
            if (j >= n_out) continue;
            const float y = epilogue<T>(p, it.e, j, gate, up, row_scale(p, r));
            out[r * n_out + j] = Float<TO>::from_f32(y);
        }
    }
}

}  // namespace moe

#define MOE_GROUPED_GEMM_V3(SIN, TIN, SOUT, TOUT)                                                        \
    extern "C" __global__ void __launch_bounds__(moe::kV3Threads, 1)                                   \
        grouped_gemm_v3_##SIN##_##SOUT(const __grid_constant__ moe::GroupedGemmV3Params p) {           \
        moe::grouped_gemm_v3<TIN, TOUT>(p);                                                            \
    }

MOE_GROUPED_GEMM_V3(bf16, __nv_bfloat16, bf16, __nv_bfloat16)
MOE_GROUPED_GEMM_V3(bf16, __nv_bfloat16, f32, float)
MOE_GROUPED_GEMM_V3(f16, __half, f16, __half)
MOE_GROUPED_GEMM_V3(f16, __half, f32, float)
