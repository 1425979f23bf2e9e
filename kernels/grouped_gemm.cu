// Grouped expert GEMM family: every expert e multiplies its own rows by its weight,
// C_e = A_e . W_e^T, with the epilogue fused.
//
// grouped_gemm_{in}_{out}(GroupedGemmParams p), in = bf16 | f16, out = in | f32
//   a [P, Kd]: the rows of all experts in the plan's padded ("contiguous") layout, where every
//   block of plan_block_m rows belongs to one expert, named by block_experts (-1: skip).
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

#include "act.cuh"
#include "dtype.cuh"
#include "epilogue.cuh"
#include "params.cuh"
#include "reduce.cuh"

namespace moe {

constexpr int kGemmBM = 64;
constexpr int kGemmBN = 64;
constexpr int kGemmBK = 32;
constexpr int kGemmThreads = 128;        // 2 x 2 warps, 32 x 32 each
constexpr int kGemmLd = kGemmBK + 8;     // 80-byte rows: ldmatrix's eight rows hit distinct banks
constexpr int kChunks = kGemmBK / 8;     // 16-byte chunks per tile row

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

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
                ldmatrix_x4(af[mi], &sA[wm + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
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
                    ldmatrix_x4(bf, &sB[mat][wn + nj * 16 + (lane >> 4) * 8 + (lane & 7)][kk + ((lane >> 3) & 1) * 8]);
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
    }
MOE_GROUPED_GEMM(bf16, bf16, __nv_bfloat16, __nv_bfloat16)
MOE_GROUPED_GEMM(bf16, f32, __nv_bfloat16, float)
MOE_GROUPED_GEMM(f16, f16, __half, __half)
MOE_GROUPED_GEMM(f16, f32, __half, float)
