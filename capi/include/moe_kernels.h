/* moe-kernels' C ABI: one MoE block of a Hugging Face checkpoint, opened on a CUDA stream of the
 * caller's, run on the caller's device buffers. capi/src/lib.rs implements it; capi/tests check
 * that this header and the Rust side declare the same functions and codes.
 *
 * Errors come back as a moe_status; moe_last_error() gives the calling thread's last error
 * message, naming the function, the argument, what was expected and what came. No call
 * aborts the process or lets a Rust panic through.
 *
 * The layer enqueues its work on the stream given at open and never waits for the host, so a
 * forward can be captured in a CUDA graph; order your own work on that stream. */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_status {
    MOE_OK = 0,
    MOE_ERROR_NULL = 1,         /* a null pointer where one is needed */
    MOE_ERROR_ARGUMENT = 2,     /* a size, shape, alignment or context that does not fit */
    MOE_ERROR_CHECKPOINT = 3,   /* the model folder or its files */
    MOE_ERROR_UNSUPPORTED = 4,  /* a configuration this build or device cannot run */
    MOE_ERROR_NO_DEVICE = 5,    /* no driver, no such device, or no kernels in this build */
    MOE_ERROR_CUDA = 6,         /* the CUDA driver refused a call */
    MOE_ERROR_DEVICE_CHECK = 7, /* a check on the device found bad data (ids out of range) */
    MOE_ERROR_PANIC = 8         /* a bug in the library: please report the message */
} moe_status;

typedef enum moe_dtype {
    MOE_BF16 = 0,
    MOE_F16 = 1
} moe_dtype;

typedef struct moe_layer moe_layer;

/* The calling thread's last error message ("" when none); valid until the thread's next
 * failing call. */
const char* moe_last_error(void);

/* Opens decoder layer `layer` of the Hugging Face folder `model_dir` (config.json and
 * safetensors) on CUDA device `device`, computing in `dtype`, for up to `max_tokens` tokens
 * per forward. `stream` is a CUstream of that device's primary context, or NULL for a stream
 * of the layer's own. Writes the layer to *out. */
moe_status moe_layer_open(const char* model_dir, int32_t layer, int32_t device, void* stream, moe_dtype dtype,
                          int64_t max_tokens, moe_layer** out);

/* The layer's hidden size H, experts per token K and largest token count. */
moe_status moe_layer_dims(const moe_layer* layer, int64_t* hidden, int64_t* top_k, int64_t* max_tokens);

/* y [T, H] = block(x [T, H]) on the layer's stream, x and y device pointers (CUdeviceptr) of
 * `tokens` rows in the layer's dtype. topk_ids (int32 [T, K]) and topk_weights (float [T, K])
 * receive the routing in selection order when not 0. Returns before the work is done. */
moe_status moe_layer_forward(moe_layer* layer, uint64_t x, uint64_t y, int64_t tokens, uint64_t topk_ids,
                             uint64_t topk_weights);

/* moe_layer_forward with routing controls, device pointers or 0. given_ids (int32 [T, K]) and
 * given_weights (float [T, K]), both or neither: the routing to run instead of the layer's
 * router (id -1: an unused slot; ids from E name zero-computation experts; the weights multiply
 * the expert outputs). Slots with ids outside [-1, E_total), repeated in a row, or with NaN or
 * infinite weights run as unused; moe_layer_check reports them. mask_index (int32 [T]): each
 * token's expert mask (moe_layer_set_expert_masks), -1 for none; 0: mask 0 for every token
 * when masks are set. Returns before the work is done. */
moe_status moe_layer_forward_routed(moe_layer* layer, uint64_t x, uint64_t y, int64_t tokens, uint64_t given_ids,
                                    uint64_t given_weights, uint64_t mask_index);

/* Sets `masks` expert masks: mask m removes the counts[m] experts listed next in `removed`
 * (ids in [0, E_total)); the router's rule then runs on the experts that remain. masks = 0 turns
 * masking off. Keeps the device buffer when the number of masks is unchanged, so that a
 * captured graph replays with the new masks; another number frees it, and a graph captured
 * before must be captured again. Not inside a stream capture. */
moe_status moe_layer_set_expert_masks(moe_layer* layer, const int32_t* removed, const int64_t* counts,
                                      int64_t masks);

/* Waits for the layer's stream and reports what its forwards found on the device since the
 * last check (given routing out of range, repeated or not finite; mask indices out of range):
 * MOE_ERROR_DEVICE_CHECK with the message, and resets it. Not inside a stream capture. */
moe_status moe_layer_check(moe_layer* layer);

/* The same block on the CPU in f64 (slow: for checks), on host arrays x and y [T, H] of float. */
moe_status moe_layer_forward_host(const moe_layer* layer, const float* x, float* y, int64_t tokens);

/* Frees the layer (NULL: nothing). Waits for its stream. */
void moe_layer_destroy(moe_layer* layer);

#ifdef __cplusplus
}
#endif

#endif /* MOE_KERNELS_H */
