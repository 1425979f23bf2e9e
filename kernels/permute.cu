// Permutation family: the routing plan, gather into expert-major rows, and the weighted combine
// back into token order. Everything stays on the device; sizes the host does not know (how many
// rows each expert got) are read from device memory by the kernels that need them.
//
// plan_count / plan_scan / plan_scatter (PlanParams p): from topk_ids [T, K] (S = T*K slots)
//   counts[e]           = #{slots with id e}, e in [0, E)
//   offsets[e]          = sum_{e' < e} counts[e'];  padded_offsets likewise with each count
//                         rounded up to block_m ("contiguous" grouped layout)
//   sorted_slots[r]     = the slot of GEMM row r: expert-major, token order within an expert
//   slot_rows[s]        = its inverse (-1 for slots outside the GEMM)
//   padded_slots, slot_padded_rows: the same for the padded layout; block_experts[b] is the
//   expert of padded block b (-1 past the end).
//   Ids -1 and zero-computation experts [E, E_total) stay out of the GEMM; ids outside
//   [-1, E_total) are counted in status[0] and treated as -1.
//   count: block c histograms its chunk of kPlanChunk slots in shared memory. scan: one block
//   turns the per-chunk counts into per-chunk bases (a column scan per expert), then offsets and
//   block experts. scatter: block c ranks its slots warp by warp (match_any within a warp, a
//   shared running count across warps), which keeps token order; no float, no atomics on
//   positions, so the plan is deterministic.
//
// plan_identity(PlanIdentityParams p): the plan of E = 1, K = 1 (a shared expert's), where row
//   r is token r: the arrays plan_count/scan/scatter would give for ids all zero, written over
//   the whole allocated buffers in one grid-stride launch instead of three launches and memsets.
//
// gather_{dtype}(GatherParams p): out[r] = x[row_slots[r] / K]; one block per row, 16-byte copies.
//
// combine_{dtype}(CombineParams p): y[t] = sum_k w[t,k] * c(t,k) + sigmoid(gate[t]) * shared[t]
//   + residual[t], in f32, slots in order, one rounding: deterministic, no atomics. c is the
//   expert's output row, x[t] for a copy expert, a1 x[t] + a2 v_z for a constant expert z
//   ((a1, a2) = softmax(W_z x[t]), MoE++), 0 for a zero expert. One block per token.
//
// plan_masked(MaskedParams p): the masked layout [E, M, H] from the plan; block e fills rows
//   e*M .. e*M + M and the inverse of its slots; slots past M are counted in status.
//
// ep_send(EpSendParams p): one block; thread e finds where expert e's segment starts in the
//   rank-major order (the counts of experts on lower ranks, and of lower experts on its rank),
//   then the block copies each segment; thread r sums rank r's send count.
//
// History
//   v1: the three-launch plan, row-per-block gather and token-per-block combine described above;
//       plan_identity for one-expert plans.

#include "dtype.cuh"
#include "params.cuh"
#include "reduce.cuh"

namespace moe {

constexpr int kPlanChunk = 256;      // slots per block in count and scatter (8 warps)
constexpr int kPlanMaxExperts = 1024;
constexpr int kScanThreads = 1024;

__device__ __forceinline__ void plan_identity_v1(const PlanIdentityParams& p) {
    const int64_t n = p.max_slots > p.max_padded ? p.max_slots : p.max_padded;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int32_t v = i < p.tokens ? int32_t(i) : -1;
        if (i < p.max_slots) {
            p.sorted_slots[i] = v;
            p.slot_rows[i] = v;
            p.slot_padded_rows[i] = v;
        }
        if (i < p.max_padded) p.padded_slots[i] = v;
        if (i < p.max_padded / p.block_m) p.block_experts[i] = i * p.block_m < p.tokens ? 0 : -1;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const int32_t padded = (p.tokens + p.block_m - 1) / p.block_m * p.block_m;
        p.counts[0] = p.tokens;
        p.offsets[0] = 0;
        p.offsets[1] = p.tokens;
        p.padded_offsets[0] = 0;
        p.padded_offsets[1] = padded;
        p.status[0] = 0;
    }
}

__device__ __forceinline__ int valid_gemm_id(const PlanParams& p, int id) {
    if (id < -1 || id >= p.experts_total) {
        atomicAdd(p.status, 1);
        return -1;
    }
    return id < p.experts ? id : -1;
}

__device__ __forceinline__ void plan_count_v1(const PlanParams& p) {
    __shared__ int hist[kPlanMaxExperts];
    for (int e = threadIdx.x; e < p.experts; e += blockDim.x) hist[e] = 0;
    __syncthreads();
    const int64_t s = int64_t(blockIdx.x) * kPlanChunk + threadIdx.x;
    if (s < p.slots) {
        const int id = valid_gemm_id(p, p.ids[s]);
        if (id >= 0) atomicAdd(&hist[id], 1);
    }
    __syncthreads();
    int* out = p.chunk_base + int64_t(blockIdx.x) * p.experts;
    for (int e = threadIdx.x; e < p.experts; e += blockDim.x) out[e] = hist[e];
}

__device__ __forceinline__ void plan_scan_v1(const PlanParams& p) {
    __shared__ int sh_padded[kPlanMaxExperts + 1];
    __shared__ int warp_tot[2][kScanThreads / 32];
    const int e = threadIdx.x;
    int count = 0;
    if (e < p.experts) {
        // Column scan: chunk c's base for expert e is the count of e in chunks before c.
        for (int c = 0; c < p.chunks; ++c) {
            int* cell = p.chunk_base + int64_t(c) * p.experts + e;
            const int v = *cell;
            *cell = count;
            count += v;
        }
        p.counts[e] = count;
    }
    const int padded = (count + p.block_m - 1) / p.block_m * p.block_m;
    // Exclusive block scan of (count, padded) over experts: within warps, then across.
    const int lane = e & 31, warp = e >> 5;
    int a = count, b = padded;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int oa = __shfl_up_sync(kFullMask, a, off);
        const int ob = __shfl_up_sync(kFullMask, b, off);
        if (lane >= off) { a += oa; b += ob; }
    }
    if (lane == 31) { warp_tot[0][warp] = a; warp_tot[1][warp] = b; }
    __syncthreads();
    int base_a = 0, base_b = 0;
    for (int w = 0; w < warp; ++w) { base_a += warp_tot[0][w]; base_b += warp_tot[1][w]; }
    const int incl_a = base_a + a, incl_b = base_b + b;
    if (e < p.experts) {
        p.offsets[e + 1] = incl_a;
        p.padded_offsets[e + 1] = incl_b;
        sh_padded[e + 1] = incl_b;
    }
    if (e == 0) {
        p.offsets[0] = 0;
        p.padded_offsets[0] = 0;
        sh_padded[0] = 0;
    }
    __syncthreads();
    // The expert of each padded block: the e with padded_offsets[e] <= row < padded_offsets[e+1].
    const int nblocks = p.padded_capacity / p.block_m;
    const int total = sh_padded[p.experts];
    for (int blk = threadIdx.x; blk < nblocks; blk += blockDim.x) {
        const int row = blk * p.block_m;
        int owner = -1;
        if (row < total) {
            int lo = 0, hi = p.experts - 1;  // largest e with sh_padded[e] <= row
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if (sh_padded[mid] <= row) lo = mid; else hi = mid - 1;
            }
            owner = lo;
        }
        p.block_experts[blk] = owner;
    }
}

__device__ __forceinline__ void plan_scatter_v1(const PlanParams& p) {
    __shared__ int running[kPlanMaxExperts];
    const int* base = p.chunk_base + int64_t(blockIdx.x) * p.experts;
    for (int e = threadIdx.x; e < p.experts; e += blockDim.x) running[e] = base[e];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t s = int64_t(blockIdx.x) * kPlanChunk + threadIdx.x;
    int id = -1;
    if (s < p.slots) {
        id = p.ids[s];
        id = (id < -1 || id >= p.experts_total || id >= p.experts) ? -1 : id;  // counted in count
    }
    const unsigned peers = __match_any_sync(kFullMask, id);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    __syncthreads();
    int pos = -1;
    for (int w = 0; w < kPlanChunk / 32; ++w) {
        if (warp == w && id >= 0) {
            pos = running[id] + rank;
            __syncwarp(peers);
            // The last peer moves the running count past the whole group.
            if ((peers >> lane) == 1u) running[id] += __popc(peers);
        }
        __syncthreads();
    }
    if (s >= p.slots) return;
    if (id < 0) {
        p.slot_rows[s] = -1;
        p.slot_padded_rows[s] = -1;
        return;
    }
    const int row = p.offsets[id] + pos;
    const int prow = p.padded_offsets[id] + pos;
    p.sorted_slots[row] = int(s);
    p.slot_rows[s] = row;
    p.padded_slots[prow] = int(s);
    p.slot_padded_rows[s] = prow;
}

template <typename T>
__device__ __forceinline__ void gather_v1(const GatherParams& p) {
    const int64_t r = blockIdx.x;
    if (p.total_rows != nullptr && r >= *p.total_rows) return;
    const int slot = p.row_slots[r];
    T* dst = static_cast<T*>(p.out) + r * p.hidden;
    if (slot < 0 || int64_t(slot) >= int64_t(p.tokens) * p.k) {
        if (slot >= 0 && threadIdx.x == 0) atomicAdd(p.status, 1);
        if (!p.zero_unmapped) return;
        for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) dst[c] = Float<T>::from_f32(0.f);
        return;
    }
    const T* src = static_cast<const T*>(p.x) + int64_t(slot / p.k) * p.hidden;
    if (p.vec) {
        constexpr int V = kVec16<T>;
        for (int c = threadIdx.x * V; c < p.hidden; c += blockDim.x * V) store_vec16(dst + c, load_vec16(src + c));
    } else {
        for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) dst[c] = src[c];
    }
}

// Adds w * row[c .. c+n) to acc.
template <typename T, int N>
__device__ __forceinline__ void axpy(float (&acc)[N], float w, const T* row, bool vec) {
    if (vec) {
#pragma unroll
        for (int h = 0; h < N / kVec16<T>; ++h) {
            const Vec16<T> v = load_vec16(row + h * kVec16<T>);
#pragma unroll
            for (int j = 0; j < kVec16<T>; ++j) acc[h * kVec16<T> + j] = fmaf(w, Float<T>::to_f32(v.v[j]), acc[h * kVec16<T> + j]);
        }
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] = fmaf(w, Float<T>::to_f32(row[j]), acc[j]);
    }
}

constexpr int kCombineThreads = 256;

// Each thread owns 8 consecutive columns per step; the last step may be partial (scalar then).
// The kind of zero-computation expert `id`: 1 copy, 2 constant, 0 zero (also for a copy or
// constant expert whose inputs were not given), -1 for any other id.
__device__ __forceinline__ int zc_kind(const CombineParams& p, int id) {
    if (id < p.experts || id >= p.experts_total) return -1;
    const int kind = p.zc_kinds != nullptr ? p.zc_kinds[id - p.experts] : 0;
    if (kind == 1 && p.x != nullptr) return 1;
    if (kind == 2 && p.x != nullptr && p.const_w != nullptr && p.const_v != nullptr) return 2;
    return 0;
}

template <typename T>
__device__ __forceinline__ void combine_v1(const CombineParams& p) {
    constexpr int N = 8;
    const int64_t t = blockIdx.x;
    const int K = p.k;
    const float gate = p.shared_gate != nullptr
        ? 1.f / (1.f + expf(-Float<T>::to_f32(static_cast<const T*>(p.shared_gate)[t]))) : 0.f;
    const T* xt = p.x != nullptr ? static_cast<const T*>(p.x) + t * p.hidden : nullptr;

    // Constant experts (MoE++): (a1, a2) = softmax(W_z x[t]), two block-wide dot products per
    // slot; the branch is uniform across the block (it depends on t and k only).
    __shared__ float alpha[32][2];
    for (int k = 0; k < K; ++k) {
        const int id = p.ids[t * K + k];
        if (p.slot_rows[t * K + k] >= 0 || zc_kind(p, id) != 2) continue;
        const T* w = static_cast<const T*>(p.const_w) + int64_t(id - p.experts) * 2 * p.hidden;
        float d0 = 0.f, d1 = 0.f;
        for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
            const float xv = Float<T>::to_f32(xt[c]);
            d0 = fmaf(xv, Float<T>::to_f32(w[c]), d0);
            d1 = fmaf(xv, Float<T>::to_f32(w[p.hidden + c]), d1);
        }
        d0 = block_sum(d0);
        d1 = block_sum(d1);
        const float m = fmaxf(d0, d1);
        const float e0 = expf(d0 - m), e1 = expf(d1 - m);
        if (threadIdx.x == 0) {
            alpha[k][0] = e0 / (e0 + e1);
            alpha[k][1] = e1 / (e0 + e1);
        }
    }
    __syncthreads();
    for (int c0 = threadIdx.x * N; c0 < p.hidden; c0 += kCombineThreads * N) {
        const int n = min(N, p.hidden - c0);
        const bool vec = p.vec && n == N;
        float acc[N];
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] = 0.f;
        for (int k = 0; k < K; ++k) {
            const int64_t s = t * K + k;
            const float w = p.weights != nullptr ? p.weights[s] : 1.f;
            const int row = p.slot_rows[s];
            const T* src = nullptr;
            if (row >= 0) {
                if (row < p.rows) src = static_cast<const T*>(p.expert_out) + int64_t(row) * p.hidden;
                else if (threadIdx.x == 0 && c0 == 0) atomicAdd(p.status, 1);  // once per slot
            } else {
                const int id = p.ids[s];
                const int kind = zc_kind(p, id);
                if (kind == 1) {
                    src = xt;  // copy expert
                } else if (kind == 2) {
                    const T* v = static_cast<const T*>(p.const_v) + int64_t(id - p.experts) * p.hidden;
                    const float a1 = w * alpha[k][0], a2 = w * alpha[k][1];
                    for (int j = 0; j < n; ++j)
                        acc[j] += a1 * Float<T>::to_f32(xt[c0 + j]) + a2 * Float<T>::to_f32(v[c0 + j]);
                } else if (id < -1 || id >= p.experts_total) {
                    if (threadIdx.x == 0 && c0 == 0) atomicAdd(p.status, 1);
                }
            }
            if (src == nullptr) continue;
            if (vec) axpy<T, N>(acc, w, src + c0, true);
            else for (int j = 0; j < n; ++j) acc[j] = fmaf(w, Float<T>::to_f32(src[c0 + j]), acc[j]);
        }
        if (p.shared_out != nullptr) {
            const float g = p.shared_gate != nullptr ? gate : 1.f;
            const T* sh = static_cast<const T*>(p.shared_out) + t * p.hidden + c0;
            if (vec) axpy<T, N>(acc, g, sh, true);
            else for (int j = 0; j < n; ++j) acc[j] = fmaf(g, Float<T>::to_f32(sh[j]), acc[j]);
        }
        if (p.residual != nullptr) {
            const T* rs = static_cast<const T*>(p.residual) + t * p.hidden + c0;
            if (vec) axpy<T, N>(acc, 1.f, rs, true);
            else for (int j = 0; j < n; ++j) acc[j] += Float<T>::to_f32(rs[j]);
        }
        T* dst = static_cast<T*>(p.y) + t * p.hidden + c0;
        if (vec) {
#pragma unroll
            for (int h = 0; h < N / kVec16<T>; ++h) {
                Vec16<T> o;
#pragma unroll
                for (int j = 0; j < kVec16<T>; ++j) o.v[j] = Float<T>::from_f32(acc[h * kVec16<T> + j]);
                store_vec16(dst + h * kVec16<T>, o);
            }
        } else {
            for (int j = 0; j < n; ++j) dst[j] = Float<T>::from_f32(acc[j]);
        }
    }
}

__device__ __forceinline__ void plan_masked_v1(const MaskedParams& p) {
    const int e = blockIdx.x;
    const int count = p.counts[e];
    const int kept = min(count, p.max_rows);
    const int start = p.offsets[e];
    if (threadIdx.x == 0) {
        p.masked_counts[e] = kept;
        if (count > kept) atomicAdd(p.status, count - kept);
    }
    for (int j = threadIdx.x; j < p.max_rows; j += blockDim.x) {
        const int64_t row = int64_t(e) * p.max_rows + j;
        const int slot = j < kept ? p.sorted_slots[start + j] : -1;
        p.masked_slots[row] = slot;
        if (slot >= 0) p.slot_masked_rows[slot] = int(row);
    }
}

constexpr int kEpThreads = 1024;

__device__ __forceinline__ void ep_send_v1(const EpSendParams& p) {
    __shared__ int seg_start[kPlanMaxExperts];
    __shared__ int rank_of[kPlanMaxExperts];
    for (int e = threadIdx.x; e < p.experts; e += blockDim.x) {
        const int r = p.expert_rank[e];
        const bool ok = r >= 0 && r < p.ranks;
        if (!ok) atomicAdd(p.status, 1);
        rank_of[e] = ok ? r : -1;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < p.experts; e += blockDim.x) {
        const int r = rank_of[e];
        int start = 0;
        for (int o = 0; o < p.experts; ++o) {
            const int ro = rank_of[o];
            if (ro >= 0 && r >= 0 && (ro < r || (ro == r && o < e))) start += p.counts[o];
        }
        seg_start[e] = start;
    }
    for (int r = threadIdx.x; r < p.ranks; r += blockDim.x) {
        int n = 0;
        for (int e = 0; e < p.experts; ++e) n += rank_of[e] == r ? p.counts[e] : 0;
        p.send_counts[r] = n;
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int e = warp; e < p.experts; e += kEpThreads / 32) {
        if (rank_of[e] < 0) continue;
        const int src = p.offsets[e], dst = seg_start[e], n = p.counts[e];
        for (int j = lane; j < n; j += 32) p.send_slots[dst + j] = p.sorted_slots[src + j];
    }
}

}  // namespace moe

extern "C" __global__ void __launch_bounds__(256) plan_masked(const moe::MaskedParams p) { moe::plan_masked_v1(p); }
extern "C" __global__ void __launch_bounds__(moe::kEpThreads) ep_send(const moe::EpSendParams p) { moe::ep_send_v1(p); }
extern "C" __global__ void __launch_bounds__(moe::kPlanChunk) plan_count(const moe::PlanParams p) { moe::plan_count_v1(p); }
extern "C" __global__ void __launch_bounds__(moe::kScanThreads) plan_scan(const moe::PlanParams p) { moe::plan_scan_v1(p); }
extern "C" __global__ void __launch_bounds__(moe::kPlanChunk) plan_scatter(const moe::PlanParams p) { moe::plan_scatter_v1(p); }
extern "C" __global__ void __launch_bounds__(256) plan_identity(const moe::PlanIdentityParams p) { moe::plan_identity_v1(p); }

#define MOE_PERMUTE(SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(128) gather_##SUFFIX(const moe::GatherParams p) { moe::gather_v1<T>(p); } \
    extern "C" __global__ void __launch_bounds__(moe::kCombineThreads, 1) combine_##SUFFIX(const moe::CombineParams p) { moe::combine_v1<T>(p); }
MOE_PERMUTE(f32, float)
MOE_PERMUTE(bf16, __nv_bfloat16)
MOE_PERMUTE(f16, __half)
