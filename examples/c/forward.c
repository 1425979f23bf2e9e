/* A C runtime's use of moe-kernels: open one MoE block of a Hugging Face folder on our own CUDA
 * stream, run it on our own device buffers, and compare with the CPU forward. Then the refusals:
 * each bad call returns its code and a message naming the argument.
 *
 *   usage: forward MODEL_DIR LAYER
 *
 * Built and run by examples/c/run.sh (under the CPU emulator in CI). Exit 0 when every check
 * passes. */
#include <cuda.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_kernels.h"

static int failures = 0;

#define CU(call)                                                                   \
    do {                                                                           \
        CUresult rc_ = (call);                                                     \
        if (rc_ != CUDA_SUCCESS) {                                                 \
            fprintf(stderr, "%s:%d: %s failed: %d\n", __FILE__, __LINE__, #call, (int)rc_); \
            exit(2);                                                               \
        }                                                                          \
    } while (0)

/* f32 to bf16, round to nearest even, as the layer's inputs are stored. */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A call that must fail with `want`, its message mentioning `word`. */
static void expect(const char* what, moe_status got, moe_status want, const char* word) {
    const char* msg = moe_last_error();
    if (got != want || strstr(msg, word) == NULL) {
        printf("FAIL  %s: status %d (wanted %d), message \"%s\" (wanted \"%s\" in it)\n", what, (int)got,
               (int)want, msg, word);
        failures++;
    } else {
        printf("ok    %s: %d, \"%s\"\n", what, (int)got, msg);
    }
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR LAYER\n", argv[0]);
        return 2;
    }
    const char* dir = argv[1];
    const int layer_index = atoi(argv[2]);

    CUdevice cu_dev;
    CUcontext ctx;
    CUstream stream;
    CU(cuInit(0));
    CU(cuDeviceGet(&cu_dev, 0));
    CU(cuDevicePrimaryCtxRetain(&ctx, cu_dev));
    CU(cuCtxSetCurrent(ctx));
    CU(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING));

    moe_layer* layer = NULL;
    moe_status s = moe_layer_open(dir, layer_index, 0, stream, MOE_BF16, 16, &layer);
    if (s != MOE_OK) {
        fprintf(stderr, "moe_layer_open: %d: %s\n", (int)s, moe_last_error());
        return 1;
    }
    int64_t hidden, top_k, max_tokens;
    if (moe_layer_dims(layer, &hidden, &top_k, &max_tokens) != MOE_OK) return 1;
    const int64_t t = 5;
    printf("opened %s layer %d: H=%lld K=%lld, up to %lld tokens\n", dir, layer_index, (long long)hidden,
           (long long)top_k, (long long)max_tokens);

    /* Our input, rounded to bf16 as the device sees it. */
    const size_t n = (size_t)(t * hidden);
    float* x = malloc(n * sizeof(float));
    uint16_t* xb = malloc(n * 2);
    for (size_t i = 0; i < n; ++i) {
        xb[i] = to_bf16(sinf(0.37f * (float)i) * 0.8f);
        x[i] = from_bf16(xb[i]);
    }
    CUdeviceptr dx, dy, dids, dweights;
    CU(cuMemAlloc(&dx, n * 2));
    CU(cuMemAlloc(&dy, n * 2));
    CU(cuMemAlloc(&dids, (size_t)(t * top_k) * 4));
    CU(cuMemAlloc(&dweights, (size_t)(t * top_k) * 4));
    CU(cuMemcpyHtoDAsync(dx, xb, n * 2, stream));

    s = moe_layer_forward(layer, dx, dy, t, dids, dweights);
    if (s != MOE_OK) {
        fprintf(stderr, "moe_layer_forward: %d: %s\n", (int)s, moe_last_error());
        return 1;
    }
    uint16_t* yb = malloc(n * 2);
    int32_t* ids = malloc((size_t)(t * top_k) * 4);
    CU(cuMemcpyDtoHAsync(yb, dy, n * 2, stream));
    CU(cuMemcpyDtoHAsync(ids, dids, (size_t)(t * top_k) * 4, stream));
    CU(cuStreamSynchronize(stream));

    /* Against the CPU forward, in f64: within 3% of the output's scale, as forward --check. */
    float* want = malloc(n * sizeof(float));
    if (moe_layer_forward_host(layer, x, want, t) != MOE_OK) {
        fprintf(stderr, "moe_layer_forward_host: %s\n", moe_last_error());
        return 1;
    }
    double scale = 0, err = 0;
    for (size_t i = 0; i < n; ++i) {
        scale = fmax(scale, fabs(want[i]));
        err = fmax(err, fabs((double)from_bf16(yb[i]) - want[i]));
    }
    int ids_ok = 1;
    for (int64_t i = 0; i < t * top_k; ++i) ids_ok &= ids[i] >= 0;
    if (err <= 0.03 * scale && ids_ok && scale > 0) {
        printf("ok    forward: max |err| %.3e of scale %.3e against the CPU forward\n", err, scale);
    } else {
        printf("FAIL  forward: max |err| %.3e of scale %.3e, ids %s\n", err, scale, ids_ok ? "ok" : "bad");
        failures++;
    }

    /* The routing the layer chose, given back: the same output, bit for bit. */
    CUdeviceptr dy2;
    CU(cuMemAlloc(&dy2, n * 2));
    s = moe_layer_forward_routed(layer, dx, dy2, t, dids, dweights, 0);
    if (s != MOE_OK || moe_layer_check(layer) != MOE_OK) {
        fprintf(stderr, "moe_layer_forward_routed: %d: %s\n", (int)s, moe_last_error());
        return 1;
    }
    uint16_t* yb2 = malloc(n * 2);
    CU(cuMemcpyDtoHAsync(yb2, dy2, n * 2, stream));
    CU(cuStreamSynchronize(stream));
    if (memcmp(yb, yb2, n * 2) == 0) {
        printf("ok    forward_routed: the layer's own routing given back gives the same bits\n");
    } else {
        printf("FAIL  forward_routed: the layer's own routing given back gives other bits\n");
        failures++;
    }

    /* Token 0's first expert masked: no token chooses it. */
    const int32_t removed[1] = {ids[0]};
    const int64_t counts[1] = {1};
    s = moe_layer_set_expert_masks(layer, removed, counts, 1);
    if (s == MOE_OK) s = moe_layer_forward(layer, dx, dy2, t, dids, 0);
    if (s != MOE_OK || moe_layer_check(layer) != MOE_OK) {
        fprintf(stderr, "masked forward: %d: %s\n", (int)s, moe_last_error());
        return 1;
    }
    int32_t* ids2 = malloc((size_t)(t * top_k) * 4);
    CU(cuMemcpyDtoHAsync(ids2, dids, (size_t)(t * top_k) * 4, stream));
    CU(cuStreamSynchronize(stream));
    int masked_ok = 1;
    for (int64_t i = 0; i < t * top_k; ++i) masked_ok &= ids2[i] != removed[0];
    if (masked_ok) {
        printf("ok    set_expert_masks: expert %d chosen by no token\n", (int)removed[0]);
    } else {
        printf("FAIL  set_expert_masks: expert %d still chosen\n", (int)removed[0]);
        failures++;
    }
    moe_layer_set_expert_masks(layer, NULL, NULL, 0);

    /* The refusals. */
    expect("given ids without weights", moe_layer_forward_routed(layer, dx, dy, t, dids, 0, 0), MOE_ERROR_ARGUMENT,
           "both device pointers");
    expect("mask index without masks", moe_layer_forward_routed(layer, dx, dy, t, 0, 0, dids), MOE_ERROR_ARGUMENT,
           "`mask_index`");
    expect("masked expert out of range", moe_layer_set_expert_masks(layer, (const int32_t[]){100000}, counts, 1),
           MOE_ERROR_ARGUMENT, "`removed`");
    expect("null x", moe_layer_forward(layer, 0, dy, t, 0, 0), MOE_ERROR_NULL, "`x`");
    expect("null layer", moe_layer_forward(NULL, dx, dy, t, 0, 0), MOE_ERROR_NULL, "`layer`");
    expect("too many tokens", moe_layer_forward(layer, dx, dy, max_tokens + 1, 0, 0), MOE_ERROR_ARGUMENT,
           "`tokens`");
    expect("misaligned x", moe_layer_forward(layer, dx + 1, dy, t, 0, 0), MOE_ERROR_ARGUMENT, "`x`: TensorView");
    expect("host memory as x", moe_layer_forward(layer, (uint64_t)(uintptr_t)x, dy, t, 0, 0), MOE_ERROR_ARGUMENT,
           "device memory");
    expect("y too short for T", moe_layer_forward(layer, dx, dy + n * 2 - 2, t, 0, 0), MOE_ERROR_ARGUMENT,
           "an allocation ending 2 bytes after it");
    moe_layer* other = NULL;
    expect("null model_dir", moe_layer_open(NULL, 0, 0, stream, MOE_BF16, 4, &other), MOE_ERROR_NULL, "model_dir");
    expect("missing folder", moe_layer_open("/nonexistent", 0, 0, stream, MOE_BF16, 4, &other), MOE_ERROR_CHECKPOINT,
           "/nonexistent");
    expect("bad dtype", moe_layer_open(dir, layer_index, 0, stream, (moe_dtype)7, 4, &other), MOE_ERROR_ARGUMENT,
           "dtype");
    int count = 0;
    CU(cuDeviceGetCount(&count));
    if (count > 1) {
        /* A stream of device 1's context for a layer of device 0. */
        CUdevice d1;
        CUcontext c1;
        CUstream s1;
        CU(cuDeviceGet(&d1, 1));
        CU(cuDevicePrimaryCtxRetain(&c1, d1));
        CU(cuCtxSetCurrent(c1));
        CU(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING));
        CU(cuCtxSetCurrent(ctx));
        expect("a stream of another context", moe_layer_open(dir, layer_index, 0, s1, MOE_BF16, 4, &other),
               MOE_ERROR_ARGUMENT, "another context");
        CU(cuStreamDestroy(s1));
        CU(cuDevicePrimaryCtxRelease(d1));
    }

    moe_layer_destroy(layer);
    moe_layer_destroy(NULL);
    CU(cuMemFree(dx));
    CU(cuMemFree(dy));
    CU(cuMemFree(dids));
    CU(cuMemFree(dweights));
    CU(cuMemFree(dy2));
    CU(cuStreamDestroy(stream));
    CU(cuDevicePrimaryCtxRelease(cu_dev));
    free(x);
    free(xb);
    free(yb);
    free(ids);
    free(ids2);
    free(yb2);
    free(want);
    printf("%s\n", failures == 0 ? "c example: all passed" : "c example: FAILURES");
    return failures == 0 ? 0 : 1;
}
