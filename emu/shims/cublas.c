// For the CPU emulator only: the cuBLAS entry points a candle CUDA device calls as it starts
// (create, set the stream, destroy), so that candle's device opens on the emulator and the
// crate's `candle` feature is tested there. Nothing here multiplies: a program that calls any
// other cuBLAS function fails to load, naming it. scripts/candle.sh builds this as
// libcublas.so.13 beside the emulator when the tests run on it.
#include <stdlib.h>

enum { kSuccess = 0, kNotInitialized = 1, kAllocFailed = 3, kInvalidValue = 7 };

struct handle {
    void* stream;
};

int cublasCreate_v2(void** h) {
    if (!h) return kInvalidValue;
    *h = calloc(1, sizeof(struct handle));
    return *h ? kSuccess : kAllocFailed;
}

int cublasSetStream_v2(void* h, void* stream) {
    if (!h) return kNotInitialized;
    ((struct handle*)h)->stream = stream;
    return kSuccess;
}

int cublasDestroy_v2(void* h) {
    if (!h) return kNotInitialized;
    free(h);
    return kSuccess;
}
