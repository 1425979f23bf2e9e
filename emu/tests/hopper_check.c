/* Runs the Hopper test kernels of emu/tests/kernels/hopper.cu against the PTX ISA's definitions
 * of the tensor-copy swizzles and the wgmma layouts, through the driver API alone, so that the
 * same program judges the emulator (scripts/emulate, CI) and the hardware (gpu-check.sh, with
 * the file compiled by nvcc for sm_90a). Where the emulator's twins and the crate's kernels share
 * one reading of the ISA, this is the check the first GPU makes.
 *
 * usage: hopper_check HOPPER.cubin   (on the emulator any file: its kernels are built in) */
#include <cuda.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;

static void report(int ok, const char* what) {
    printf("%s  %s\n", ok ? "ok  " : "FAIL", what);
    if (ok) passed++;
    else failed++;
}

static void check(CUresult rc, const char* what) {
    if (rc != CUDA_SUCCESS) {
        const char* s = "";
        cuGetErrorString(rc, &s);
        fprintf(stderr, "hopper_check: %s: %d %s\n", what, (int)rc, s);
        exit(1);
    }
}

enum { ROWS = 100, COLS = 72 };

/* emu_test_tma's and emu_test_wgmma's parameters (hopper.cu). */
typedef struct {
    CUtensorMap map;
    CUdeviceptr out, src, lanes;
    int32_t c0, c1, bytes, mode;
} TmaParams;

typedef struct {
    CUdeviceptr a, b, d;
    int32_t swizzle, mode;
} WgmmaParams;

static uint16_t value(long r, long c) {
    if (r < 0 || c < 0 || r >= ROWS || c >= COLS) return 0;
    return (uint16_t)(r * COLS + c + 1);
}

static void launch(CUfunction f, void* params, unsigned smem) {
    void* args[] = {params};
    check(cuLaunchKernel(f, 1, 1, 1, 128, 1, 1, smem, 0, args, NULL), "launch");
    check(cuCtxSynchronize(), "synchronize");
}

/* The TMA box at (c0, c1), as the ISA's swizzle places it: the 16-byte chunk at offset o of the
 * dense box moves to o ^ (((o >> 7) & (rows - 1)) << 4), rows = 1, 2, 4, 8 for none, 32, 64 and
 * 128 bytes (the destination is 1024-byte aligned). */
static void tma_cases(CUmodule mod, CUdeviceptr tensor) {
    CUfunction f;
    check(cuModuleGetFunction(&f, mod, "emu_test_tma"), "emu_test_tma");
    const unsigned inner[4] = {40, 16, 32, 64}; /* elements per box row, per swizzle */
    const int coords[4][2] = {{0, 0}, {8, 37}, {COLS - 10, ROWS - 5}, {-8, -3}};
    for (int sw = 0; sw < 4; ++sw) {
        for (int ci = 0; ci < 4; ++ci) {
            const cuuint64_t dims[2] = {COLS, ROWS}, strides[1] = {COLS * 2};
            const cuuint32_t box[2] = {inner[sw], 24}, es[2] = {1, 1};
            TmaParams p;
            memset(&p, 0, sizeof p);
            check(cuTensorMapEncodeTiled(&p.map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void*)tensor, dims, strides,
                                         box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, (CUtensorMapSwizzle)sw,
                                         CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
                  "cuTensorMapEncodeTiled");
            const size_t bytes = (size_t)inner[sw] * 24 * 2;
            check(cuMemAlloc(&p.out, bytes), "alloc");
            p.c0 = coords[ci][0];
            p.c1 = coords[ci][1];
            p.bytes = (int32_t)bytes;
            launch(f, &p, (unsigned)bytes);
            uint8_t* got = malloc(bytes);
            uint8_t* plain = malloc(bytes);
            check(cuMemcpyDtoH(got, p.out, bytes), "download");
            for (unsigned i1 = 0; i1 < 24; ++i1)
                for (unsigned i0 = 0; i0 < inner[sw]; ++i0) {
                    const uint16_t v = value(p.c1 + (long)i1, p.c0 + (long)i0);
                    memcpy(plain + (i1 * inner[sw] + i0) * 2, &v, 2);
                }
            const size_t rows = (size_t)1 << sw;
            int ok = 1;
            for (size_t o = 0; o < bytes; o += 16) {
                const size_t to = o ^ (((o >> 7) & (rows - 1)) << 4);
                if (memcmp(got + to, plain + o, 16) != 0) ok = 0;
            }
            char what[128];
            snprintf(what, sizeof what, "tensor copy, swizzle mode %d, box %ux24 at (%d, %d)", sw, inner[sw], p.c0,
                     p.c1);
            report(ok, what);
            free(got);
            free(plain);
            cuMemFree(p.out);
        }
    }
}

static float small_int(uint64_t* s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 33) % 9) - 4.0f;
}

static uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* D = A . B^T with A, B 64 x 64 bf16 small integers (exact in f32), in each canonical K-major
 * layout the kernel stores them in. */
static void wgmma_cases(CUmodule mod) {
    CUfunction f;
    check(cuModuleGetFunction(&f, mod, "emu_test_wgmma"), "emu_test_wgmma");
    static float a[64 * 64], b[64 * 64], want[64 * 64], got[64 * 64];
    static uint16_t ab[64 * 64], bb[64 * 64];
    uint64_t s = 1;
    for (int i = 0; i < 64 * 64; ++i) a[i] = small_int(&s);
    s = 2;
    for (int i = 0; i < 64 * 64; ++i) b[i] = small_int(&s);
    for (int i = 0; i < 64 * 64; ++i) ab[i] = bf16_bits(a[i]), bb[i] = bf16_bits(b[i]);
    for (int m = 0; m < 64; ++m)
        for (int n = 0; n < 64; ++n) {
            float acc = 0;
            for (int k = 0; k < 64; ++k) acc += a[m * 64 + k] * b[n * 64 + k];
            want[m * 64 + n] = acc;
        }
    WgmmaParams p;
    check(cuMemAlloc(&p.a, sizeof ab), "alloc");
    check(cuMemAlloc(&p.b, sizeof bb), "alloc");
    check(cuMemAlloc(&p.d, sizeof got), "alloc");
    check(cuMemcpyHtoD(p.a, ab, sizeof ab), "upload");
    check(cuMemcpyHtoD(p.b, bb, sizeof bb), "upload");
    const char* names[4] = {"no swizzle", "128-byte swizzle", "64-byte swizzle", "32-byte swizzle"};
    for (int sw = 0; sw < 4; ++sw) {
        p.swizzle = sw;
        p.mode = 0;
        launch(f, &p, 16384);
        check(cuMemcpyDtoH(got, p.d, sizeof got), "download");
        int bad = 0;
        for (int i = 0; i < 64 * 64; ++i) bad += got[i] != want[i];
        char what[128];
        snprintf(what, sizeof what, "wgmma m64n64k16 bf16, K-major, %s: %d of 4096 outputs differ", names[sw], bad);
        report(bad == 0, what);
    }
    cuMemFree(p.a);
    cuMemFree(p.b);
    cuMemFree(p.d);
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: hopper_check HOPPER.cubin\n");
        return 2;
    }
    FILE* fp = fopen(argv[1], "rb");
    if (!fp) {
        perror(argv[1]);
        return 2;
    }
    fseek(fp, 0, SEEK_END);
    const long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char* image = calloc((size_t)n + 1, 1);
    if (fread(image, 1, (size_t)n, fp) != (size_t)n) return 2;
    fclose(fp);

    CUdevice dev;
    CUcontext ctx;
    check(cuInit(0), "cuInit");
    check(cuDeviceGet(&dev, 0), "cuDeviceGet");
    char name[256];
    check(cuDeviceGetName(name, sizeof name, dev), "cuDeviceGetName");
    printf("device: %s\n", name);
    check(cuDevicePrimaryCtxRetain(&ctx, dev), "retain");
    check(cuCtxSetCurrent(ctx), "set current");
    CUmodule mod;
    check(cuModuleLoadData(&mod, image), "cuModuleLoadData");
    CUfunction f;
    check(cuModuleGetFunction(&f, mod, "emu_test_wgmma"), "emu_test_wgmma");

    CUdeviceptr tensor;
    static uint16_t data[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; ++i) data[i] = (uint16_t)(i + 1);
    check(cuMemAlloc(&tensor, sizeof data), "alloc");
    check(cuMemcpyHtoD(tensor, data, sizeof data), "upload");
    tma_cases(mod, tensor);
    wgmma_cases(mod);
    cuMemFree(tensor);
    cuModuleUnload(mod);
    cuDevicePrimaryCtxRelease(dev);
    free(image);
    printf("hopper check: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
