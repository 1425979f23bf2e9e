// LoRA family: grouped low-rank products on the rows of a routing plan, gathered by
// (expert, adapter), for adapters on the routed experts and for a mixture of LoRA experts on a
// dense FFN (LLaVA-MoLE).
//
// lora_shrink_{dtype}(LoraParams p)    s[r, j] = sum_d A[a, e, j, d] * in[r, d]          (f32)
// lora_expand_{dtype}(LoraParams p)    out[r, c] += scale[a] * w * sum_j B[a, e, c, j] * s[r, h(c) * rank + j]
//   Row r of segment e takes the adapter a of its token (adapter_ids[slot / K]), or, without
//   per-token ids, a = e on expert 0. For gate/up, A holds the gate's r rows then the up's, B's
//   rows follow the layout of out's columns and h(c) picks the half of s (gate 0, up 1) that
//   column c reads. w is the slot's routing weight where it scales the expert input (Llama 4),
//   else 1. f32 accumulation; out is read, added to and rounded once.
//
// Grid: (tiles of 32 rank rows or 32 columns, chunks), 256 threads. The chunks of rows_per_block
// rows of every segment form one list (lora_locate); a block takes one chunk and, for each
// distinct adapter among its rows, reads that (expert, adapter)'s B columns of its tile once
// and its A rows once per 16 rows, and applies them to every row of the chunk that uses it:
// with rows_per_block = T <= 16 (decode), every A and B byte of a chosen (expert, adapter) is
// loaded once per forward. A row's ids come from smem; the adapter loop is uniform over the
// block.
//
// Decode mode (ids [T, K] given, no plan): grid (ceil(r_total / 8), min(T K, E)), a rank row
// per warp; block y takes the y-th distinct expert the tokens chose and its slots as rows (row =
// slot t * K + k), the input row of slot (t, k) being x[t] (by_token) or h[t * in_slots + k].
// The decode path launches only the shrink this way; its kernels fuse the expand (DecodeLora in
// params.cuh).
//
// History
//   v1: CUDA cores. The shrink gives each warp four rank rows and up to 16 rows of a chunk at a
//       time (16 f32 sums per lane, 16-byte loads of A and of the rows); the expand stages a
//       [32, rank] tile of B in smem as f32 (odd row stride: conflict-free) and gives each thread
//       one column and every eighth row. Prefill's long segments would want the shrink and
//       expand on tensor cores (Punica's SGMV, vLLM's fused MoE-LoRA use tensor cores there).

#include "chosen.cuh"
#include "dtype.cuh"
#include "params.cuh"
#include "reduce.cuh"

namespace moe {

constexpr int kLoraThreads = 256;
constexpr int kLoraTile = 32;       // rank rows (shrink) or columns (expand) per block
constexpr int kLoraGroup = 16;      // rows a shrink warp sums at once

// The chunks of all segments in one list, segments in order, segment g in
// ceil(counts[g] / rows_per_block) chunks: block y takes the y-th (the grid has one block per
// chunk that T*K rows can fill, so none is idle past the list's end but the last few). An
// exclusive block scan of the chunk counts finds it; `scan` holds kLoraThreads / 32 + 2 ints.
// Returns false past the end of the list.
__device__ __forceinline__ bool lora_locate(const LoraParams& p, int* scan, int& seg, int& chunk) {
    const int per = (p.segments + blockDim.x - 1) / blockDim.x;
    const int first = threadIdx.x * per;
    int mine = 0;
    for (int q = 0; q < per; ++q) {
        const int g = first + q;
        if (g < p.segments) mine += (p.counts[g] + p.rows_per_block - 1) / p.rows_per_block;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int v = __shfl_up_sync(kFullMask, incl, off);
        if (lane >= off) incl += v;
    }
    if (lane == 31) scan[warp] = incl;
    if (threadIdx.x == 0) scan[kLoraThreads / 32] = -1;
    __syncthreads();
    int base = 0;
    for (int w = 0; w < warp; ++w) base += scan[w];
    int c = int(blockIdx.y) - (base + incl - mine);
    if (c >= 0 && c < mine) {
        for (int q = 0; q < per && first + q < p.segments; ++q) {
            const int g = first + q;
            const int n = (p.counts[g] + p.rows_per_block - 1) / p.rows_per_block;
            if (c < n) {
                scan[kLoraThreads / 32] = g;
                scan[kLoraThreads / 32 + 1] = c;
                break;
            }
            c -= n;
        }
    }
    __syncthreads();
    seg = scan[kLoraThreads / 32];
    chunk = scan[kLoraThreads / 32 + 1];
    return seg >= 0;
}

// The rows of chunk `chunk` of segment `g` and each one's adapter (-1: nothing to do), in smem.
// Returns the number of rows.
__device__ __forceinline__ int lora_chunk(const LoraParams& p, int g, int chunk, int* rows, int* adapters) {
    const int first = chunk * p.rows_per_block;
    const int n = min(p.rows_per_block, p.counts[g] - first);
    const int base = p.seg_offsets[g] + first;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int r = base + i;
        const int slot = p.row_slots[r];
        int a = -1;
        if (slot >= 0 && slot < p.tokens * p.k) {
            a = p.adapter_ids ? p.adapter_ids[slot / p.k] : g;
            if (a >= p.adapters) a = -1;  // counted once per token below
        }
        rows[i] = r;
        adapters[i] = a < 0 ? -1 : a;
    }
    __syncthreads();
    return n;
}

// Decode mode (p.ids): the block's segment is the blockIdx.y-th distinct expert of ids [T, K]
// (chosen.cuh), its rows are the slots that chose it, in order (row = slot), and each row's
// adapter as lora_chunk gives it. Returns the number of rows (at most T: a routing or
// route_given leaves no id twice in a token's row), or -1 past the experts chosen; g: the expert.
__device__ __forceinline__ int lora_decode_rows(const LoraParams& p, int* rows, int* adapters, int& g) {
    __shared__ uint32_t bits[32];
    __shared__ int found[2];
    if (threadIdx.x < 32) {
        const int n = p.tokens * p.k;
        const int e = nth_chosen_expert(p.ids, n, p.segments, blockIdx.y, bits);
        const int c = e >= 0 ? slots_of_expert(p.ids, n, e, rows, kLoraRows) : 0;
        if (threadIdx.x == 0) {
            found[0] = e;
            found[1] = min(c, kLoraRows);
        }
    }
    __syncthreads();
    g = found[0];
    const int n = found[1];
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int a = p.adapter_ids[rows[i] / p.k];
        adapters[i] = a < 0 || a >= p.adapters ? -1 : a;
    }
    __syncthreads();
    return g < 0 ? -1 : n;
}

// The block's segment g, its rows and their adapters, in either mode; -1 past the end.
__device__ __forceinline__ int lora_block_rows(const LoraParams& p, int* scan, int* rows, int* adapters, int& g) {
    if (p.ids != nullptr) return lora_decode_rows(p, rows, adapters, g);
    int chunk;
    if (!lora_locate(p, scan, g, chunk)) return -1;
    return lora_chunk(p, g, chunk, rows, adapters);
}

// The row of `in` that row r of the shrink reads (in decode mode r is the slot).
__device__ __forceinline__ int64_t lora_in_row(const LoraParams& p, int r) {
    if (p.ids != nullptr) return p.by_token ? r / p.k : int64_t(r / p.k) * p.in_slots + r % p.k;
    return p.by_token ? p.row_slots[r] / p.k : r;
}

// Block (0, 0) of the counting launch: tokens whose adapter id is outside [-1, L).
__device__ __forceinline__ void lora_count_bad(const LoraParams& p) {
    if (!p.count_status || !p.adapter_ids || blockIdx.x || blockIdx.y) return;
    for (int t = threadIdx.x; t < p.tokens; t += blockDim.x) {
        const int a = p.adapter_ids[t];
        if (a < -1 || a >= p.adapters) atomicAdd(p.status, 1);
    }
}

// The chunk's rows that use adapter `adapters[i]`, from row i on, into `list`, or 0 where row i
// has no adapter or is not the first row of its adapter. Uniform over the block (smem reads);
// ends with a barrier so the list can be rebuilt on the next call.
__device__ __forceinline__ int lora_group(int i, int n, const int* adapters, int* list) {
    const int a = adapters[i];
    bool first = a >= 0;
    for (int m = 0; m < i && first; ++m) first = adapters[m] != a;
    if (!first) return 0;
    __syncthreads();  // the previous adapter's list is no longer read
    if (threadIdx.x == 0) {
        int c = 0;
        for (int m = i; m < n; ++m)
            if (adapters[m] == a) list[c++] = m;
        list[kLoraRows] = c;
    }
    __syncthreads();
    return list[kLoraRows];
}

// Up to eight elements from `p` (`left` of them in range), as f32; 16-byte loads when `vec`.
template <typename T>
__device__ __forceinline__ void lora_load8(const T* p, int left, bool vec, float (&v)[8]) {
    if (vec) {
        load8(p, v);
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = j < left ? Float<T>::to_f32(p[j]) : 0.f;
}

template <typename T>
__device__ __forceinline__ void lora_shrink_v1(const LoraParams& p) {
    __shared__ int rows[kLoraRows];
    __shared__ int adapters[kLoraRows];
    __shared__ int list[kLoraRows + 1];
    __shared__ int scan[kLoraThreads / 32 + 2];
    lora_count_bad(p);
    int g;
    const int n = lora_block_rows(p, scan, rows, adapters, g);
    if (n < 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = p.adapter_ids ? g : 0;
    const T* in = static_cast<const T*>(p.in);
    const bool vec = p.vec;
    // Rank rows per warp: 4 (a tile of kLoraTile per block), or 1 in decode mode, whose grid has
    // a block row per chosen expert only and takes more column blocks to fill the SMs.
    const int per_warp = p.ids != nullptr ? 1 : kLoraTile / 8;
    for (int i = 0; i < n; ++i) {
        const int c = lora_group(i, n, adapters, list);
        if (c == 0) continue;
        const int64_t ae = int64_t(adapters[i]) * p.a_experts + e;
        for (int q = 0; q < per_warp; ++q) {
            const int j = blockIdx.x * 8 * per_warp + warp * per_warp + q;
            if (j >= p.r_total) break;
            const T* arow = static_cast<const T*>(p.a) + (ae * p.r_total + j) * p.d_in;
            for (int g0 = 0; g0 < c; g0 += kLoraGroup) {
                const int gc = min(kLoraGroup, c - g0);
                const T* x[kLoraGroup];
#pragma unroll
                for (int m = 0; m < kLoraGroup; ++m) {
                    x[m] = in + lora_in_row(p, rows[list[g0 + min(m, gc - 1)]]) * p.ld_in;
                }
                float acc[kLoraGroup] = {};
                for (int d = lane * 8; d < p.d_in; d += 32 * 8) {
                    float w[8];
                    lora_load8(arow + d, p.d_in - d, vec, w);
#pragma unroll
                    for (int m = 0; m < kLoraGroup; ++m) {
                        if (m >= gc) break;
                        float v[8];
                        lora_load8(x[m] + d, p.d_in - d, vec, v);
#pragma unroll
                        for (int u = 0; u < 8; ++u) acc[m] = fmaf(w[u], v[u], acc[m]);
                    }
                }
#pragma unroll
                for (int m = 0; m < kLoraGroup; ++m) {
                    if (m >= gc) break;
                    const float sum = warp_sum(acc[m]);
                    if (lane == 0) p.s[int64_t(rows[list[g0 + m]]) * p.r_total + j] = sum;
                }
            }
        }
    }
}

// The half of s that column c of out reads: 0 for a single product or the gate, 1 for the up.
__device__ __forceinline__ int lora_half(int split, int c, int d_out) {
    switch (split) {
        case kGateFirst + 1: return c >= d_out / 2;
        case kUpFirst + 1: return c < d_out / 2;
        case kInterleaved + 1: return c & 1;
        default: return 0;
    }
}

template <typename T>
__device__ __forceinline__ void lora_expand_v1(const LoraParams& p) {
    __shared__ int rows[kLoraRows];
    __shared__ int adapters[kLoraRows];
    __shared__ int list[kLoraRows + 1];
    // B's tile as f32, rows `stride` apart: odd, so the 32 lanes' columns fall in 32 banks.
    __shared__ float bs[kLoraTile * (kLoraMaxRank + 1)];
    __shared__ int scan[kLoraThreads / 32 + 2];
    int g;
    const int n = lora_block_rows(p, scan, rows, adapters, g);
    if (n < 0) return;
    const int e = p.adapter_ids ? g : 0;
    const int rank = p.rank, stride = rank | 1;
    const int c0 = blockIdx.x * kLoraTile;
    const int cols = min(kLoraTile, p.d_out - c0);
    const int lane = threadIdx.x % 32, part = threadIdx.x / 32;
    const int col = c0 + lane;
    const int half = lora_half(p.split, col, p.d_out);
    T* out = static_cast<T*>(p.out);
    for (int i = 0; i < n; ++i) {
        const int c = lora_group(i, n, adapters, list);
        if (c == 0) continue;
        const int a = adapters[i];
        const int64_t ae = int64_t(a) * p.a_experts + e;
        // The tile's B rows c0 .. c0 + cols are contiguous: [cols, rank].
        const T* b = static_cast<const T*>(p.b) + (ae * p.d_out + c0) * rank;
        for (int v = threadIdx.x; v < cols * rank; v += blockDim.x)
            bs[(v / rank) * stride + v % rank] = Float<T>::to_f32(b[v]);
        __syncthreads();
        if (lane < cols) {
            const float scale = p.scales[a];
            for (int m = part; m < c; m += kLoraThreads / 32) {
                const int r = rows[list[m]];
                const float* s = p.s + int64_t(r) * p.r_total + half * rank;
                float acc = 0.f;
                for (int j = 0; j < rank; ++j) acc = fmaf(bs[lane * stride + j], s[j], acc);
                float w = scale;
                if (p.row_weights) w *= p.row_weights[p.ids ? r : p.row_slots[r]];
                T* o = out + int64_t(r) * p.d_out + col;
                *o = Float<T>::from_f32(Float<T>::to_f32(*o) + w * acc);
            }
        }
    }
}

}  // namespace moe

#define MOE_LORA(SUFFIX, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(moe::kLoraThreads) lora_shrink_##SUFFIX(const moe::LoraParams p) { \
        moe::lora_shrink_v1<T>(p);                                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(moe::kLoraThreads) lora_expand_##SUFFIX(const moe::LoraParams p) { \
        moe::lora_expand_v1<T>(p);                                                                   \
    }
MOE_LORA(bf16, __nv_bfloat16)
MOE_LORA(f16, __half)
