// Grouped expert GEMM family: every expert e multiplies its own rows by its weight,
// C_e = A_e . W_e^T, with the epilogue fused.
//
// grouped_gemm_{in}_{out}(GroupedGemmParams p), in = bf16 | f16, out = in | f32
// grouped_gemm_v2_{in}_{out}(GroupedGemmV2Params q): the same over q.g; with q.x set, row r of a
//   is read as x[row_slots[r] / K] instead (zeros for padding, slot -1)
//   a [P, Kd]: the rows of all experts in the plan's padded ("contiguous") layout, where every
//   block of plan_block_m rows belongs to one expert, named by block_experts (-1: skip).
//   x [T, Kd] (v2, gather-free): the layer input; slot t*K + k reads token t's row.
//   w [E, N, Kd]: each expert's Linear weight, out x in. f32 accumulation.
//   Epilogue, per output element, in this order:
//     (scale_input) acc *= routing weight of the row   (Llama 4 scales the expert input)
//     + bias[e, n]                                     (gpt-oss)
//     gated: act(gate) * up over the gate/up pair of `layout` (columns j and I + j, I + j and j,
//            or 2j and 2j + 1), N_out = N / 2; plain: optional act (ReLU, GELU, SiLU)
//     (!scale_input) *= routing weight of the row      (folds the combine's multiply)
//   then one rounding to the output dtype. Padding rows come out as the epilogue of a zero row.
//
// History
//   v1: the plainest tensor-core version: 64 x 64 output tiles (gated: 64 gate + 64 up columns),
//       BK = 32, four warps of 32 x 32, mma.sync m16n8k16 fed by ldmatrix from padded shared
//       tiles; global -> shared with 16-byte loads and no pipelining. Correct first; cp.async
//       multi-stage (sm_80) and wgmma + TMA (sm_90a) come next as separate versions.
//   v2: 128 x 128 tiles (gated: 64 gate + 64 up weight rows; plain: 128 columns), BK = 32,
//       eight warps of 32 x (2 x 32), a four-stage cp.async.cg pipeline (zero-fill through
//       src-size, one barrier per k-step) into 64 KB of dynamic shared memory, tiles XOR-swizzled
//       instead of padded; optionally reads x through the plan, so no gather and no [P, Kd].

#include "act.cuh"
#include "dtype.cuh"
#include "epilogue.cuh"
#include "params.cuh"
#include "ptx.cuh"
#include "reduce.cuh"

namespace moe {

constexpr int kGemmBM = 64;
constexpr int kGemmBN = 64;
constexpr int kGemmBK = 32;
constexpr int kGemmThreads = 128;        // 2 x 2 warps, 32 x 32 each
constexpr int kGemmLd = kGemmBK + 8;     // 80-byte rows: ldmatrix's eight rows hit distinct banks
constexpr int kChunks = kGemmBK / 8;     // 16-byte chunks per tile row

using ptx::Mma;

template <typename T, typename TO>
__device__ __forceinline__ void grouped_gemm_v1(const GroupedGemmParams& p) {
    __shared__ alignas(16) T sA[kGemmBM][kGemmLd];     // (BM, BK)
    __shared__ alignas(16) T sB[2][kGemmBN][kGemmLd];  // (mat, BN, BK)

    const int64_t m0 = int64_t(blockIdx.y) * kGemmBM;
    const int e = p.block_experts[m0 / p.plan_block_m];
    const int n_out = p.gated ? p.n / 2 : p.n;
    const int n0 = blockIdx.x * kGemmBN;
    // Uniform per block, before any barrier: blocks of no expert, or past N, cost nothing.
    if (e < 0 || e >= p.experts || n0 >= n_out) return;
    const int nmat = p.gated ? 2 : 1;
    const T* A = static_cast<const T*>(p.a);
    const T* W = static_cast<const T*>(p.w) + int64_t(e) * p.n * p.kdim;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    float acc[2][2][4][4];  // (mat, mi, ni, fragment)
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c)
#pragma unroll
                for (int d = 0; d < 4; ++d) acc[a][b][c][d] = 0.f;

    for (int k0 = 0; k0 < p.kdim; k0 += kGemmBK) {
        // gA (BM, BK) -> sA; chunks past Kd are zero (Kd % 8 == 0, so a chunk is in or out).
        for (int c = threadIdx.x; c < kGemmBM * kChunks; c += kGemmThreads) {
            const int r = c / kChunks, kc = (c % kChunks) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (k0 + kc < p.kdim) v = *reinterpret_cast<const uint4*>(A + (m0 + r) * p.kdim + k0 + kc);
            *reinterpret_cast<uint4*>(&sA[r][kc]) = v;
        }
        // gW (BN, BK) per matrix -> sB; columns past N_out are zero.
        for (int mat = 0; mat < nmat; ++mat) {
            for (int c = threadIdx.x; c < kGemmBN * kChunks; c += kGemmThreads) {
                const int r = c / kChunks, kc = (c % kChunks) * 8;
                const int j = n0 + r;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (j < n_out && k0 + kc < p.kdim)
                    v = *reinterpret_cast<const uint4*>(W + int64_t(weight_row(p, j, mat)) * p.kdim + k0 + kc);
                *reinterpret_cast<uint4*>(&sB[mat][r][kc]) = v;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kGemmBK; kk += 16) {
            uint32_t af[2][4];  // (mi) 16 x 16 A fragments
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                ptx::ldmatrix(af[mi], &sA[wm + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
            // Unrolled with a guard, so acc stays in registers (a runtime bound would index it
            // dynamically and put it in local memory).
#pragma unroll
            for (int mat = 0; mat < 2; ++mat) {
                if (mat >= nmat) break;
#pragma unroll
                for (int nj = 0; nj < 2; ++nj) {
                    // Two n8 x k16 B fragments: matrices (n 0-7, k 0-7), (n 0-7, k 8-15),
                    // (n 8-15, k 0-7), (n 8-15, k 8-15).
                    uint32_t bf[4];
                    ptx::ldmatrix(bf, &sB[mat][wn + nj * 16 + (lane >> 4) * 8 + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        Mma<T>::run(acc[mat][mi][2 * nj], af[mi], bf[0], bf[1]);
                        Mma<T>::run(acc[mat][mi][2 * nj + 1], af[mi], bf[2], bf[3]);
                    }
                }
            }
        }
        __syncthreads();
    }

    TO* out = static_cast<TO*>(p.out);
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int64_t r = m0 + wm + mi * 16 + g + half * 8;
            const float scale = row_scale(p, r);
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int j = n0 + wn + ni * 8 + 2 * tig + q;
                    if (j >= n_out) continue;
                    const float v = epilogue<T>(p, e, j, acc[0][mi][ni][half * 2 + q], acc[1][mi][ni][half * 2 + q], scale);
                    out[r * n_out + j] = Float<TO>::from_f32(v);
                }
            }
        }
    }
}


// ---- v2: cp.async pipeline, 128-row tiles, swizzled shared tiles --------------------------------

constexpr int kV2BM = 128;                    // output rows per block
constexpr int kV2BN = 128;                    // weight rows per block: 64 gate + 64 up, or 128 plain
constexpr int kV2BK = 32;                     // k per stage: 64-byte tile rows, four 16-byte chunks
constexpr int kV2Stages = 4;
constexpr int kV2Threads = 256;               // 4 x 2 warps, each 32 rows x (2 x 32) weight rows
constexpr int kV2Half = kV2BN / 2;            // weight rows per "mat": gate | up, or column halves
constexpr int kV2TileElems = kV2BM * kV2BK;   // one stage of sA (= one stage of sB)
static_assert(kV2BM == kV2BN, "sA and sB stages share one size and one loader mapping");
static_assert(kV2BM * kV2BK / 8 == 2 * kV2Threads, "each thread copies two 16-byte chunks per tile");
static_assert(kV2BK == 32, "the swizzle below is written for four chunks per row");

// Dynamic shared memory of v2: kV2Stages stages of sA (BM, BK) then as many of sB (BN, BK), with
// no padding. Mirrored by V2_SMEM_BYTES in src/gemm/mod.rs.
constexpr int kV2SmemBytes = 2 * kV2Stages * kV2TileElems * 2;
static_assert(kV2SmemBytes == 65536, "mirror in src/gemm/mod.rs");

// The element offset of 16-byte chunk `chunk` (0..3) of row `row` in a swizzled (rows, BK) tile.
// A row is 64 bytes, so rows 2i and 2i + 1 share one 128-byte line of the 32 banks. Each phase of
// an ldmatrix reads one chunk from eight consecutive rows (8-aligned); XOR-ing the chunk with bits
// 1..2 of the row sends the four rows of each parity to four distinct chunk slots, so the eight
// reads cover all 32 banks once: conflict-free. Chosen over v1's padding, which would cost a
// quarter more shared memory (80 KB instead of 64 KB for the four stages).
__device__ __forceinline__ int v2_swizzle(int row, int chunk) {
    return row * kV2BK + ((chunk ^ ((row >> 1) & 3)) << 3);
}

template <typename T, typename TO>
__device__ __forceinline__ void grouped_gemm_v2(const GroupedGemmV2Params& q) {
    const GroupedGemmParams& p = q.g;
    extern __shared__ __align__(128) uint8_t smem_v2[];
    T* sA = reinterpret_cast<T*>(smem_v2);          // (stage, BM, BK) swizzled
    T* sB = sA + kV2Stages * kV2TileElems;          // (stage, BN, BK) swizzled

    const int64_t m0 = int64_t(blockIdx.y) * kV2BM;
    const int e = p.block_experts[m0 / p.plan_block_m];
    const int n_out = p.gated ? p.n / 2 : p.n;
    // Output columns per block: gated, 64 (their gate and up rows fill the 128); plain, 128.
    const int n0 = blockIdx.x * (p.gated ? kV2Half : kV2BN);
    // Uniform per block, before any barrier: blocks of no expert, or past N, cost nothing.
    if (e < 0 || e >= p.experts || n0 >= n_out) return;
    const T* W = static_cast<const T*>(p.w) + int64_t(e) * p.n * p.kdim;
    const T* A = static_cast<const T*>(p.a);
    const T* X = static_cast<const T*>(q.x);

    // This thread's share of every stage: chunk kc of tile rows lrow and lrow + 64, in sA and sB.
    // The source rows are found once; nullptr marks a row that reads zeros (padding, a bad slot,
    // a column past N_out).
    const int kc = (threadIdx.x & 3) * 8;
    const int lrow = threadIdx.x >> 2;
    const T* gA[2];  // (row) global row of A (or x) feeding tile row lrow + 64 i
    const T* gB[2];  // (row) global weight row feeding tile row lrow + 64 i
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = lrow + i * kV2Half;
        if (X != nullptr) {
            // Gather-free: padded row m0 + row holds slot t * K + k, i.e. token t's row of x.
            const int slot = p.row_slots[m0 + row];
            const bool ok = slot >= 0 && int64_t(slot) < int64_t(q.tokens) * q.top_k;
            gA[i] = ok ? X + int64_t(slot / q.top_k) * p.kdim : nullptr;
        } else {
            gA[i] = A + (m0 + row) * p.kdim;
        }
        // Weight row i*64 + lrow: gated, mat i of column n0 + lrow; plain, column n0 + row.
        const int j = p.gated ? n0 + lrow : n0 + row;
        gB[i] = j < n_out ? W + int64_t(weight_row(p, j, p.gated ? i : 0)) * p.kdim : nullptr;
    }
    const void* any = p.w;  // a valid address for the zero-filling copies, which read nothing
    auto load_tile = [&](int stage, int k0) {
        const int k = k0 + kc;
        const bool in_k = k < p.kdim;  // Kd % 8 == 0: a chunk is wholly inside or outside
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = lrow + i * kV2Half;
            const int off = stage * kV2TileElems + v2_swizzle(row, kc / 8);
            const bool a_ok = in_k && gA[i] != nullptr, b_ok = in_k && gB[i] != nullptr;
            ptx::cp_async_cg16(sA + off, a_ok ? static_cast<const void*>(gA[i] + k) : any, a_ok ? 16 : 0);
            ptx::cp_async_cg16(sB + off, b_ok ? static_cast<const void*>(gB[i] + k) : any, b_ok ? 16 : 0);
        }
    };

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
    float acc[2][2][4][4] = {};  // (mat, mi, ni, fragment); mat: gate | up, or the column halves

    // Prologue: stages 0 .. S-2 in flight. A group is committed even when empty, so that
    // "group kt is complete" always means wait_group(S - 2) at step kt.
    const int ktiles = (p.kdim + kV2BK - 1) / kV2BK;
#pragma unroll
    for (int s = 0; s < kV2Stages - 1; ++s) {
        if (s < ktiles) load_tile(s, s * kV2BK);
        ptx::cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        ptx::cp_async_wait<kV2Stages - 2>();  // this thread's copies of tile kt have landed
        // The one barrier per step: everyone's copies of tile kt are visible, and everyone has
        // finished reading stage (kt - 1) % S, which the copies issued next overwrite.
        __syncthreads();
        const int next = kt + kV2Stages - 1;
        if (next < ktiles) load_tile(next % kV2Stages, next * kV2BK);
        ptx::cp_async_commit();

        const T* sa = sA + (kt % kV2Stages) * kV2TileElems;
        const T* sb = sB + (kt % kV2Stages) * kV2TileElems;
#pragma unroll
        for (int ks = 0; ks < kV2BK / 16; ++ks) {
            uint32_t af[2][4];  // (mi) 16 x 16 A fragments
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                ptx::ldmatrix(af[mi], sa + v2_swizzle(wm + mi * 16 + (lane & 15), 2 * ks + (lane >> 4)));
#pragma unroll
            for (int mat = 0; mat < 2; ++mat) {
#pragma unroll
                for (int nj = 0; nj < 2; ++nj) {
                    // Two n8 x k16 B fragments, as in v1.
                    uint32_t bf[4];
                    const int row = mat * kV2Half + wn + nj * 16 + (lane >> 4) * 8 + (lane & 7);
                    ptx::ldmatrix(bf, sb + v2_swizzle(row, 2 * ks + ((lane >> 3) & 1)));
#pragma unroll
                    for (int mi = 0; mi < 2; ++mi) {
                        Mma<T>::run(acc[mat][mi][2 * nj], af[mi], bf[0], bf[1]);
                        Mma<T>::run(acc[mat][mi][2 * nj + 1], af[mi], bf[2], bf[3]);
                    }
                }
            }
        }
    }
    ptx::cp_async_wait<0>();  // only empty groups remain; leave nothing in flight all the same

    TO* out = static_cast<TO*>(p.out);
    const int g = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int64_t r = m0 + wm + mi * 16 + g + half * 8;
            const float scale = row_scale(p, r);
#pragma unroll
            for (int mat = 0; mat < 2; ++mat) {
                if (p.gated && mat == 1) break;  // gated: mat 1 is the up half of the same columns
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int j = n0 + (p.gated ? 0 : mat * kV2Half) + wn + ni * 8 + 2 * tig + c;
                        if (j >= n_out) continue;
                        const int f = half * 2 + c;
                        const float v = epilogue<T>(p, e, j, acc[mat][mi][ni][f], acc[1][mi][ni][f], scale);
                        out[r * n_out + j] = Float<TO>::from_f32(v);
                    }
                }
            }
        }
    }
}


constexpr int kGemvWarps = 8;   // output columns per block, one per warp
constexpr int kGemvRows = 8;    // rows of an expert held in registers at once

// Decode: few rows per expert, so the weights dominate. Block (x, e) computes output columns
// 8x .. 8x + 8 of expert e, one per warp; the warp streams that column's weight row (and the up
// row, gated) once per chunk of 8 rows with 16-byte loads, multiplying it with each row of the
// chunk (rows of A are few and stay in L1/L2), then reduces across the warp.
template <typename T, typename TO>
__device__ __forceinline__ void grouped_gemv_v1(const GroupedGemmParams& p) {
    const int e = blockIdx.y;
    const int r0 = p.offsets[e];
    const int count = p.offsets[e + 1] - r0;
    const int n_out = p.gated ? p.n / 2 : p.n;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * kGemvWarps + warp;
    if (count <= 0 || j >= n_out) return;  // no barrier in this kernel: warps may leave alone
    const T* A = static_cast<const T*>(p.a);
    const T* W = static_cast<const T*>(p.w) + int64_t(e) * p.n * p.kdim;
    const T* wg = W + int64_t(weight_row(p, j, 0)) * p.kdim;
    const T* wu = W + int64_t(weight_row(p, j, p.gated ? 1 : 0)) * p.kdim;
    TO* out = static_cast<TO*>(p.out);
    for (int c0 = 0; c0 < count; c0 += kGemvRows) {
        const int rows = min(kGemvRows, count - c0);
        float accg[kGemvRows], accu[kGemvRows];
#pragma unroll
        for (int i = 0; i < kGemvRows; ++i) accg[i] = accu[i] = 0.f;
        for (int k = lane * 8; k < p.kdim; k += 32 * 8) {
            float fg[8], fu[8];
            load8(wg + k, fg);
            if (p.gated) load8(wu + k, fu);
#pragma unroll
            for (int i = 0; i < kGemvRows; ++i) {
                if (i >= rows) break;
                float fa[8];
                load8(A + int64_t(r0 + c0 + i) * p.kdim + k, fa);
#pragma unroll
                for (int q = 0; q < 8; ++q) {
                    accg[i] = fmaf(fa[q], fg[q], accg[i]);
                    if (p.gated) accu[i] = fmaf(fa[q], fu[q], accu[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < kGemvRows; ++i) {
            if (i >= rows) break;
            const float g = warp_sum(accg[i]);
            const float u = p.gated ? warp_sum(accu[i]) : 0.f;
            if (lane == 0) {
                const int64_t r = r0 + c0 + i;
                out[r * n_out + j] = Float<TO>::from_f32(epilogue<T>(p, e, j, g, u, row_scale(p, r)));
            }
        }
    }
}

}  // namespace moe

#define MOE_GROUPED_GEMM(SIN, SOUT, TIN, TOUT) \
    extern "C" __global__ void __launch_bounds__(moe::kGemmThreads) grouped_gemm_##SIN##_##SOUT(const moe::GroupedGemmParams p) { \
        moe::grouped_gemm_v1<TIN, TOUT>(p); \
    } \
    extern "C" __global__ void __launch_bounds__(32 * moe::kGemvWarps) grouped_gemv_##SIN##_##SOUT(const moe::GroupedGemmParams p) { \
        moe::grouped_gemv_v1<TIN, TOUT>(p); \
    } \
    extern "C" __global__ void __launch_bounds__(moe::kV2Threads, 2) grouped_gemm_v2_##SIN##_##SOUT(const moe::GroupedGemmV2Params p) { \
        moe::grouped_gemm_v2<TIN, TOUT>(p); \
    }
MOE_GROUPED_GEMM(bf16, bf16, __nv_bfloat16, __nv_bfloat16)
MOE_GROUPED_GEMM(bf16, f32, __nv_bfloat16, float)
MOE_GROUPED_GEMM(f16, f16, __half, __half)
MOE_GROUPED_GEMM(f16, f32, __half, float)
