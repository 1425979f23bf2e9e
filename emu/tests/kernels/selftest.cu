// The emulator's own test kernels: each instruction twin against facts stated independently in
// emu/tests/instructions.rs, and planted bugs that the emulator must catch (emu/tests/catches.rs).
// Built only into the emulator, never by nvcc; every kernel takes one parameter struct.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "ptx.cuh"

struct RegsParams {
    uint32_t* out;       // [32][4] per lane
    const uint32_t* a;   // [32][4] per lane
    const uint32_t* b;   // [32][2] per lane
    const float* c;      // [32][4] per lane
    int32_t kind;        // 0 bf16, 1 f16
    int32_t pad_;
};

// One mma.sync m16n8k16 with each lane's registers as the host laid them out.
extern "C" __global__ void __launch_bounds__(32) emu_test_mma(const RegsParams p) {
    const int l = threadIdx.x;
    const uint32_t a[4] = {p.a[4 * l], p.a[4 * l + 1], p.a[4 * l + 2], p.a[4 * l + 3]};
    float acc[4] = {p.c[4 * l], p.c[4 * l + 1], p.c[4 * l + 2], p.c[4 * l + 3]};
    if (p.kind == 0) moe::ptx::Mma<__nv_bfloat16>::run(acc, a, p.b[2 * l], p.b[2 * l + 1]);
    else moe::ptx::Mma<__half>::run(acc, a, p.b[2 * l], p.b[2 * l + 1]);
    for (int i = 0; i < 4; ++i) p.out[4 * l + i] = __float_as_uint(acc[i]);
}

struct LdmatrixParams {
    uint32_t* out;          // [32][4] per lane
    const uint16_t* src;    // [4][8][8] elements: matrix, row, column
    const int32_t* rows;    // [32] the row (0..31, i.e. 8 * matrix + row) whose address lane l gives
    int32_t count;          // 1, 2 or 4
    int32_t trans;
};

// Copies four 8 x 8 matrices into shared memory, one 16-byte row per slot in a scrambled order
// (so a wrong address pairing shows), then one ldmatrix with each lane's row address.
extern "C" __global__ void __launch_bounds__(32) emu_test_ldmatrix(const LdmatrixParams p) {
    __shared__ alignas(16) uint16_t tile[32][8];  // slot s holds row (5 s + 3) % 32
    const int l = threadIdx.x;
    const int row = (5 * l + 3) % 32;
    for (int j = 0; j < 8; ++j) tile[l][j] = p.src[row * 8 + j];
    __syncthreads();
    // Lane l gives the address of row rows[l]; find the slot holding it.
    int slot = 0;
    for (int s = 0; s < 32; ++s)
        if ((5 * s + 3) % 32 == p.rows[l]) slot = s;
    uint32_t r[4] = {0, 0, 0, 0};
    if (p.count == 1) {
        uint32_t x[1];
        if (p.trans) moe::ptx::ldmatrix<1, true>(x, tile[slot]);
        else moe::ptx::ldmatrix<1, false>(x, tile[slot]);
        r[0] = x[0];
    } else if (p.count == 2) {
        uint32_t x[2];
        if (p.trans) moe::ptx::ldmatrix<2, true>(x, tile[slot]);
        else moe::ptx::ldmatrix<2, false>(x, tile[slot]);
        r[0] = x[0];
        r[1] = x[1];
    } else {
        if (p.trans) moe::ptx::ldmatrix<4, true>(r, tile[slot]);
        else moe::ptx::ldmatrix<4, false>(r, tile[slot]);
    }
    for (int i = 0; i < 4; ++i) p.out[4 * l + i] = r[i];
}

struct CopyParams {
    uint32_t* out;         // [threads][4 * 4] words: what each thread reads back, per step
    const uint32_t* src;   // [threads][4] words per group: group g's source is src + g * threads * 4
    int32_t mode;
    int32_t src_bytes;     // cp.async src-size for mode 2
};

// cp.async's timing. Each thread owns 16 bytes of shared memory and copies into them:
//   mode 0: copy, commit, wait_group 0, read                      -> the data
//   mode 1: copy, commit, read (the planted missing wait)         -> the old bytes
//   mode 2: copy with src-size p.src_bytes, commit, wait_group 0  -> src bytes, then zeros
//   mode 3: group A, commit, group B (same bytes), commit, wait_group 1, read -> A; wait 0 -> B
//   mode 4: copy, commit, copy (not committed), wait_group 0, read -> the first copy only;
//           wait_all -> the second
//   mode 5: copy, commit, __syncthreads, each thread reads its neighbour's slot without waiting
//           -> the old bytes (the wait is per thread)
extern "C" __global__ void __launch_bounds__(256) emu_test_cp_async(const CopyParams p) {
    __shared__ alignas(16) uint32_t slot[256][4];
    const int t = threadIdx.x, n = blockDim.x;
    for (int i = 0; i < 4; ++i) slot[t][i] = 0xdead0000u + t;  // the old bytes
    __syncthreads();
    const uint32_t* src = p.src + 4 * t;
    uint32_t* out = p.out + 16 * t;
    auto read = [&](int step) {
        for (int i = 0; i < 4; ++i) out[4 * step + i] = slot[t][i];
    };
    switch (p.mode) {
        case 0:
            moe::ptx::cp_async_cg16(slot[t], src, 16);
            moe::ptx::cp_async_commit();
            moe::ptx::cp_async_wait<0>();
            read(0);
            break;
        case 1:
            moe::ptx::cp_async_cg16(slot[t], src, 16);
            moe::ptx::cp_async_commit();
            read(0);
            moe::ptx::cp_async_wait<0>();
            read(1);
            break;
        case 2:
            moe::ptx::cp_async_cg16(slot[t], src, uint32_t(p.src_bytes));
            moe::ptx::cp_async_commit();
            moe::ptx::cp_async_wait<0>();
            read(0);
            break;
        case 3:
            moe::ptx::cp_async_ca<16>(slot[t], src, 16);
            moe::ptx::cp_async_commit();
            moe::ptx::cp_async_ca<16>(slot[t], src + 4 * n, 16);
            moe::ptx::cp_async_commit();
            moe::ptx::cp_async_wait<1>();
            read(0);
            moe::ptx::cp_async_wait<0>();
            read(1);
            break;
        case 4:
            moe::ptx::cp_async_cg16(slot[t], src, 16);
            moe::ptx::cp_async_commit();
            moe::ptx::cp_async_cg16(slot[t], src + 4 * n, 16);
            moe::ptx::cp_async_wait<0>();
            read(0);
            moe::ptx::cp_async_wait_all();
            read(1);
            break;
        default: {
            moe::ptx::cp_async_cg16(slot[t], src, 16);
            moe::ptx::cp_async_commit();
            __syncthreads();
            const int o = (t + 1) % n;
            for (int i = 0; i < 4; ++i) out[i] = slot[o][i];
            __syncthreads();
            moe::ptx::cp_async_wait<0>();
            break;
        }
    }
}

struct ExchangeParams {
    int32_t* out;   // [n]
    int32_t barrier;
    int32_t pad_;
};

// Thread t writes its slot and reads the mirror slot n-1-t: correct only with the barrier.
// Forward order leaves the first half reading unwritten slots, reverse order the second half.
extern "C" __global__ void __launch_bounds__(256) emu_test_exchange(const ExchangeParams p) {
    __shared__ int32_t s[256];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = 1000 + t;
    if (p.barrier) __syncthreads();
    p.out[t] = s[n - 1 - t];
}

struct BufferParams {
    float* out;
    const float* in;
    int32_t n;
    int32_t mode;
};

// Memory faults, one per mode:
//   0 fine: out[i] = in[i] + 1 for i < n
//   1 writes out[n]: one element past the end
//   2 reads in[-1]: one element before the start
//   3 a 16-byte load from an address 8 bytes into the buffer
//   4 reads through a wild pointer (neither device memory nor the stack)
//   5 writes a static shared array one element past its end
//   6 reads from a freed buffer (in)
extern "C" __global__ void __launch_bounds__(256) emu_test_memory(const BufferParams p) {
    __shared__ float s[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    switch (p.mode) {
        case 1:
            if (i == 0) p.out[p.n] = 1.f;
            break;
        case 2:
            if (i == 0) p.out[0] = p.in[-1];
            break;
        case 3:
            if (i == 0) {
                const uint4 v = *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(p.in) + 8);
                p.out[0] = __uint_as_float(v.x);
            }
            break;
        case 4:
            if (i == 0) p.out[0] = *reinterpret_cast<const float*>(uintptr_t(0x1000));
            break;
        case 5: {
            float* q = s;  // through a pointer, so that the shared-memory check sees it, not UBSan's bounds
            if (threadIdx.x < 65) q[threadIdx.x] = 1.f;
            break;
        }
        default:
            if (i < p.n) p.out[i] = p.in[i] + 1.f;
            break;
    }
}

struct WarpParams {
    int32_t* out;
    int32_t mode;
    int32_t pad_;
};

// Warp collectives, correct and misused:
//   0 __shfl_xor_sync(full) on every lane                        -> lane ^ 1
//   1 lanes 16..31 exit; lanes 0..15 read lane + 16              -> fails: an exited lane
//   2 lanes 16..31 exit; lanes 0..15 ballot with the full mask   -> 0x0000ffff (exited vote 0)
//   3 lane 0 shuffles with a mask that does not name it           -> fails
//   4 threads 0..47 wait at __syncthreads, 48..63 at __syncwarp     -> fails: a deadlock
//   5 lanes 0..15 read lane 16+ while the mask names only 0..15   -> fails: outside the mask
//   6 __match_any_sync(full, lane % 4)                            -> 0x11111111 << (lane % 4)
//   7 __shfl_up_sync(full, lane, 1)                                -> lane 0 keeps 0, lane i gets i - 1
extern "C" __global__ void __launch_bounds__(64) emu_test_warp(const WarpParams p) {
    const int t = threadIdx.x, lane = t & 31;
    switch (p.mode) {
        case 0: p.out[t] = __shfl_xor_sync(0xffffffffu, t, 1); break;
        case 1:
            if (lane >= 16) return;
            p.out[t] = __shfl_sync(0xffffffffu, t, lane + 16);
            break;
        case 2:
            if (lane >= 16) return;
            p.out[t] = int(__ballot_sync(0xffffffffu, 1));
            break;
        case 3: p.out[t] = __shfl_sync(lane == 0 ? 0xfffffffeu : 0xffffffffu, t, 0); break;
        case 4:
            // Warp 1's lanes 16..31 wait at __syncwarp for lanes 0..15, which wait at the barrier
            // for them.
            if (t < 48) __syncthreads();
            else __syncwarp();
            p.out[t] = t;
            break;
        case 5:
            if (lane < 16) p.out[t] = __shfl_sync(0x0000ffffu, t, lane + 16);
            else p.out[t] = __shfl_sync(0xffff0000u, t, lane);
            break;
        case 6: p.out[t] = int(__match_any_sync(0xffffffffu, lane % 4)); break;
        default: p.out[t] = __shfl_up_sync(0xffffffffu, t, 1); break;
    }
}

struct OrderParams {
    int32_t* out;      // [n] the position at which thread t ran
    int32_t* counter;  // [1] zeroed by the host
};

// Records the order in which a block's threads run up to their first barrier.
extern "C" __global__ void __launch_bounds__(128) emu_test_order(const OrderParams p) {
    p.out[threadIdx.x] = atomicAdd(p.counter, 1);
    __syncthreads();
}

struct UbParams {
    int32_t* out;
    int32_t a;
    int32_t mode;
};

// Undefined behaviour UBSan reports: 0 a signed overflow, 1 a shift past the width, 2 a
// division by zero, 3 an index past a local array's end.
extern "C" __global__ void __launch_bounds__(32) emu_test_ub(const UbParams p) {
    if (threadIdx.x != 0) return;
    int local[4] = {1, 2, 3, 4};
    switch (p.mode) {
        case 0: p.out[0] = p.a * 65536 * 65536; break;
        case 1: p.out[0] = 1 << (p.a + 40); break;
        case 2: p.out[0] = 7 / (p.a - p.a); break;
        default: p.out[0] = local[p.a + 3]; break;
    }
}

struct SmemParams {
    int32_t* out;
    int32_t n;
    int32_t pad_;
};

// Dynamic shared memory: each thread writes and reads back its word; word n (past the launch's
// size) is written when n is odd.
extern "C" __global__ void __launch_bounds__(1024) emu_test_dynamic_smem(const SmemParams p) {
    extern __shared__ __align__(16) int32_t dyn[];
    const int t = threadIdx.x;
    if (t < p.n) dyn[t] = 3 * t + 1;
    __syncthreads();
    if (t < p.n) p.out[t] = dyn[(t + 1) % p.n];
    if (t == 0 && (p.n & 1)) dyn[p.n] = 0;
}

struct PoisonParams {
    uint32_t* out;  // [2]: a word of a fresh allocation (passed as in), a word of shared memory
    const uint32_t* in;
};

extern "C" __global__ void __launch_bounds__(32) emu_test_poison(const PoisonParams p) {
    __shared__ uint32_t s[32];
    if (threadIdx.x == 0) {
        p.out[0] = p.in[0];
        p.out[1] = s[5];
    }
}

// Recursion deep enough to overflow an emulated thread's stack.
__device__ __noinline__ int emu_test_deep(volatile int* p, int n) {
    volatile int pad[256];
    pad[n & 255] = n;
    return n == 0 ? pad[0] : emu_test_deep(p, n - 1) + pad[n & 255] + *p;
}

extern "C" __global__ void __launch_bounds__(32) emu_test_stack(const SmemParams p) {
    if (threadIdx.x == 0) p.out[0] = emu_test_deep(p.out, p.n);
}
