// For the CPU emulator only: the cuRAND entry points a candle CUDA device calls as it starts
// (create a generator, seed it, set its stream, destroy it). Nothing here draws numbers: a
// program that calls any other cuRAND function fails to load, naming it. scripts/candle.sh
// builds this as libcurand.so.10 beside the emulator when the tests run on it.
#include <stdlib.h>

enum { kSuccess = 0, kNotInitialized = 101, kAllocationFailed = 102, kTypeError = 103 };

struct generator {
    int type;
    unsigned long long seed;
    void* stream;
};

int curandCreateGenerator(void** g, int type) {
    if (!g) return kTypeError;
    struct generator* p = calloc(1, sizeof(struct generator));
    if (!p) return kAllocationFailed;
    p->type = type;
    *g = p;
    return kSuccess;
}

int curandSetPseudoRandomGeneratorSeed(void* g, unsigned long long seed) {
    if (!g) return kNotInitialized;
    ((struct generator*)g)->seed = seed;
    return kSuccess;
}

int curandSetStream(void* g, void* stream) {
    if (!g) return kNotInitialized;
    ((struct generator*)g)->stream = stream;
    return kSuccess;
}

int curandDestroyGenerator(void* g) {
    if (!g) return kNotInitialized;
    free(g);
    return kSuccess;
}
