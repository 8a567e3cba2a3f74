/*
 * Flash Attention Entropy (FAE): plain C API.
 *
 * One pass over K/V computes O = softmax(scale Q K^T) V and each query's softmax entropy
 * H = -sum_j a_j ln a_j (nats), never forming the Nq x Nk score matrix.
 *
 * Layout: q (B, H, Nq, d), k and v (B, H, Nk, d), o (B, H, Nq, d), any strides for the first three
 * dims (in elements) as long as the last dim is contiguous and every row starts 16-byte aligned.
 * h is float32, contiguous (B, H, Nq), or (B, Nq) when head_mean != 0.
 * key_lengths: optional device int32 (B,): keys j >= key_lengths[b] are masked. A row with no valid
 * key gives O = 0 and H = 0.
 */
#ifndef TOPROVAR_FAE_H
#define TOPROVAR_FAE_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FAE_API __declspec(dllexport)
#else
#define FAE_API __attribute__((visibility("default")))
#endif

enum FaeDtype { FAE_DTYPE_BF16 = 0, FAE_DTYPE_FP16 = 1 };

enum FaeStatus {
    FAE_OK = 0,
    FAE_ERR_INVALID = 1,     /* null pointer, non-positive size, scale <= 0 */
    FAE_ERR_UNSUPPORTED = 2, /* head_dim not 64/128, unknown dtype */
    FAE_ERR_ALIGNMENT = 3,   /* a pointer or row stride not 16-byte aligned */
    FAE_ERR_WORKSPACE = 4,   /* head_mean without enough workspace */
    FAE_ERR_CUDA = 5         /* a launch failed (cudaGetLastError) */
};

typedef struct FaeParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* h;
    const int32_t* key_lengths; /* device (B,) or NULL */
    void* workspace;            /* fae_workspace_size() bytes (needed only for head_mean) */
    size_t workspace_bytes;
    int32_t batch, heads, nq, nk, head_dim;
    int64_t q_stride_b, q_stride_h, q_stride_n; /* elements */
    int64_t k_stride_b, k_stride_h, k_stride_n;
    int64_t v_stride_b, v_stride_h, v_stride_n;
    int64_t o_stride_b, o_stride_h, o_stride_n;
    float scale;       /* > 0 */
    int32_t head_mean; /* 0: h is (B, H, Nq); 1: h is (B, Nq), the mean over heads */
    int32_t dtype;     /* FaeDtype: q, k, v and o share it */
} FaeParams;

/* Fill the strides of contiguous (B, H, N, d) tensors. */
FAE_API void fae_set_contiguous_strides(FaeParams* p);
/* Bytes of device workspace fae_forward needs (0 unless head_mean). */
FAE_API size_t fae_workspace_size(const FaeParams* p);
/* Launch on `stream` only: no synchronisation, no allocation, no host copies (CUDA-graph safe). */
FAE_API int fae_forward(const FaeParams* p, cudaStream_t stream);
FAE_API const char* fae_status_string(int status);
/* Benchmarking hook (bf16, d=128 only; process-wide, not thread-safe). 0: default tiles (64 queries x
 * 64 keys, 4 warps, 16 rows per warp, Q in registers); 1: 128 x 64, 8 warps; 2: 64 x 128, 4 warps;
 * 3: 128 x 64, 4 warps of 32 rows (Q in shared memory); 4: as 3 with 32-key tiles. On sm_90 (d=128,
 * bf16/fp16) 0 runs the Hopper kernel (= 6); 5: Hopper, 2 K/V stages; 6: Hopper, 3 stages; 7: the
 * mma.sync v0 kernel forced; 8: Hopper with consumer ping-pong. */
FAE_API int fae_set_variant(int variant);
/* 1 when the Hopper (sm_90a) kernel serves this head dim and dtype on the current device, else 0. */
FAE_API int fae_hopper_available(int head_dim, int dtype /* FaeDtype */);
/* 100 * major + minor of this library's interface. */
FAE_API int fae_version(void);

#ifdef __cplusplus
}
#endif
#endif /* TOPROVAR_FAE_H */
