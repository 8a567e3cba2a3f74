// C API of the Flash Attention Entropy kernel: validation, dispatch on dtype and head dim, launch.
#include <stdlib.h>

#include "fae.h"
#include "fae_kernel.cuh"
#ifdef FAE_WITH_HOPPER
#include "fae_hopper.h"
#endif

namespace {

using toprovar_fae::KernelParams;

constexpr int kWarps = 4;   // 64 query rows per block
constexpr int kBlockN = 64; // keys per K/V tile

template <typename T, int D, int BN = kBlockN, int NW = kWarps>
int launch(const KernelParams& kp, int batch, int heads, int nq, cudaStream_t stream) {
    auto kernel = toprovar_fae::fae_fwd_kernel<T, D, BN, NW>;
    const size_t smem = 2u * BN * D * sizeof(T);
    if (smem > 48u * 1024u) {
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
            cudaSuccess)
            return FAE_ERR_CUDA;
    }
    const dim3 grid((nq + NW * 16 - 1) / (NW * 16), heads, batch);
    kernel<<<grid, NW * 32, smem, stream>>>(kp);
    return cudaGetLastError() == cudaSuccess ? FAE_OK : FAE_ERR_CUDA;
}

template <typename T, int D, int BN, int NW>
int launch_m2(const KernelParams& kp, int batch, int heads, int nq, cudaStream_t stream) {
    auto kernel = toprovar_fae::fae_fwd_kernel_m2<T, D, BN, NW>;
    constexpr int BM = NW * 32;
    const size_t smem = (static_cast<size_t>(BM) + 2u * BN) * D * sizeof(T);
    if (smem > 48u * 1024u) {
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
            cudaSuccess)
            return FAE_ERR_CUDA;
    }
    const dim3 grid((nq + BM - 1) / BM, heads, batch);
    kernel<<<grid, NW * 32, smem, stream>>>(kp);
    return cudaGetLastError() == cudaSuccess ? FAE_OK : FAE_ERR_CUDA;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
bool stride_ok(int64_t s) { return s % 8 == 0; }  // 8 x 2-byte elements = 16 bytes

}  // namespace

extern "C" {

FAE_API void fae_set_contiguous_strides(FaeParams* p) {
    const int64_t d = p->head_dim;
    p->q_stride_n = p->o_stride_n = d;
    p->q_stride_h = p->o_stride_h = d * p->nq;
    p->q_stride_b = p->o_stride_b = d * p->nq * p->heads;
    p->k_stride_n = p->v_stride_n = d;
    p->k_stride_h = p->v_stride_h = d * p->nk;
    p->k_stride_b = p->v_stride_b = d * p->nk * p->heads;
}

FAE_API size_t fae_workspace_size(const FaeParams* p) {
    if (p == nullptr || !p->head_mean) return 0;
    return static_cast<size_t>(p->batch) * p->heads * p->nq * sizeof(float);
}

// Benchmarking only: 0 default (the Hopper kernel where available, else the mma.sync kernel's default
// tiles), 1-4 mma.sync tile variants, 5 Hopper with 2 K/V stages, 6 Hopper with 3 stages, 7 the mma.sync
// default tiles even on Hopper, 8 Hopper with 3 stages and ping-pong of the consumer warpgroups.
static int g_variant = 0;

FAE_API int fae_set_variant(int variant) {
    if (variant < 0 || variant > 8) return FAE_ERR_INVALID;
    g_variant = variant;
    return FAE_OK;
}

FAE_API int fae_forward(const FaeParams* p, cudaStream_t stream) {
    if (p == nullptr) return FAE_ERR_INVALID;
    if (p->batch <= 0 || p->heads <= 0 || p->nq < 0 || p->nk < 0) return FAE_ERR_INVALID;
    if (!(p->scale > 0.f)) return FAE_ERR_INVALID;
    if (p->nq == 0) return FAE_OK;
    if (p->q == nullptr || p->o == nullptr || p->h == nullptr) return FAE_ERR_INVALID;
    if (p->nk > 0 && (p->k == nullptr || p->v == nullptr)) return FAE_ERR_INVALID;
    if (p->head_dim != 64 && p->head_dim != 128) return FAE_ERR_UNSUPPORTED;
    if (p->dtype != FAE_DTYPE_BF16 && p->dtype != FAE_DTYPE_FP16) return FAE_ERR_UNSUPPORTED;
    if (!aligned16(p->q) || !aligned16(p->o) || (p->nk > 0 && (!aligned16(p->k) || !aligned16(p->v))))
        return FAE_ERR_ALIGNMENT;
    const int64_t strides[] = {p->q_stride_b, p->q_stride_h, p->q_stride_n, p->k_stride_b, p->k_stride_h,
                               p->k_stride_n, p->v_stride_b, p->v_stride_h, p->v_stride_n, p->o_stride_b,
                               p->o_stride_h, p->o_stride_n};
    for (int64_t s : strides)
        if (!stride_ok(s)) return FAE_ERR_ALIGNMENT;
    float* h_heads = p->h;
    if (p->head_mean) {
        if (p->workspace == nullptr || p->workspace_bytes < fae_workspace_size(p)) return FAE_ERR_WORKSPACE;
        if (!aligned16(p->workspace)) return FAE_ERR_ALIGNMENT;
        h_heads = static_cast<float*>(p->workspace);
    }

    KernelParams kp;
    kp.q = p->q;
    kp.k = p->k;
    kp.v = p->v;
    kp.o = p->o;
    kp.h = h_heads;
    kp.key_lengths = p->key_lengths;
    kp.heads = p->heads;
    kp.nq = p->nq;
    kp.nk = p->nk;
    kp.q_sb = p->q_stride_b, kp.q_sh = p->q_stride_h, kp.q_sn = p->q_stride_n;
    kp.k_sb = p->k_stride_b, kp.k_sh = p->k_stride_h, kp.k_sn = p->k_stride_n;
    kp.v_sb = p->v_stride_b, kp.v_sh = p->v_stride_h, kp.v_sn = p->v_stride_n;
    kp.o_sb = p->o_stride_b, kp.o_sh = p->o_stride_h, kp.o_sn = p->o_stride_n;
    kp.scale_log2 = p->scale * 1.4426950408889634f;

    int st;
#ifdef FAE_WITH_HOPPER
    // Hopper (sm_90a, TMA + wgmma) kernel: the default on compute 9.0 for head dim 128 when this build holds
    // its sm_90a code; TOPROVAR_FAE_NO_HOPPER=1 in the environment keeps the mma.sync kernel.
    static const bool no_hopper = getenv("TOPROVAR_FAE_NO_HOPPER") != nullptr && getenv("TOPROVAR_FAE_NO_HOPPER")[0] == '1';
    const bool hopper_variant = g_variant == 5 || g_variant == 6 || g_variant == 8;
    if ((hopper_variant || (g_variant == 0 && !no_hopper)) && toprovar_fae_hopper::available(p)) {
        const int flags = g_variant == 5   ? toprovar_fae_hopper::FAE_HOPPER_STAGES2
                          : g_variant == 8 ? toprovar_fae_hopper::FAE_HOPPER_PINGPONG
                                           : 0;
        st = toprovar_fae_hopper::forward(p, h_heads, flags, stream);
    } else if (hopper_variant) {
        return FAE_ERR_UNSUPPORTED;
    } else
#else
    if (g_variant == 5 || g_variant == 6 || g_variant == 8) return FAE_ERR_UNSUPPORTED;
#endif
    if (g_variant >= 3 && g_variant <= 4 && p->dtype == FAE_DTYPE_BF16 && p->head_dim == 128)
        st = g_variant == 3 ? launch_m2<__nv_bfloat16, 128, 64, 4>(kp, p->batch, p->heads, p->nq, stream)
                            : launch_m2<__nv_bfloat16, 128, 32, 4>(kp, p->batch, p->heads, p->nq, stream);
    else if ((g_variant == 1 || g_variant == 2) && p->dtype == FAE_DTYPE_BF16 && p->head_dim == 128)
        st = g_variant == 1 ? launch<__nv_bfloat16, 128, 64, 8>(kp, p->batch, p->heads, p->nq, stream)
                            : launch<__nv_bfloat16, 128, 128, 4>(kp, p->batch, p->heads, p->nq, stream);
    else if (p->dtype == FAE_DTYPE_BF16)
        st = p->head_dim == 64 ? launch<__nv_bfloat16, 64>(kp, p->batch, p->heads, p->nq, stream)
                               : launch<__nv_bfloat16, 128>(kp, p->batch, p->heads, p->nq, stream);
    else
        st = p->head_dim == 64 ? launch<__half, 64>(kp, p->batch, p->heads, p->nq, stream)
                               : launch<__half, 128>(kp, p->batch, p->heads, p->nq, stream);
    if (st != FAE_OK) return st;
    if (p->head_mean) {
        const int64_t n = static_cast<int64_t>(p->batch) * p->nq;
        const int threads = 256;
        toprovar_fae::fae_head_mean_kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
            h_heads, p->h, p->batch, p->heads, p->nq);
        if (cudaGetLastError() != cudaSuccess) return FAE_ERR_CUDA;
    }
    return FAE_OK;
}

FAE_API const char* fae_status_string(int status) {
    switch (status) {
        case FAE_OK: return "ok";
        case FAE_ERR_INVALID: return "invalid argument (null pointer, negative size or scale <= 0)";
        case FAE_ERR_UNSUPPORTED: return "unsupported head_dim (64, 128) or dtype (bf16, fp16)";
        case FAE_ERR_ALIGNMENT: return "pointer or stride not 16-byte aligned (last dim must be contiguous)";
        case FAE_ERR_WORKSPACE: return "head_mean needs fae_workspace_size() bytes of workspace";
        case FAE_ERR_CUDA: return "CUDA launch failed";
        default: return "unknown status";
    }
}

FAE_API int fae_version(void) { return 100; }

// 1 when fae_forward would run the Hopper (sm_90a) kernel on the current device for this head dim and
// dtype (the build holds its sm_90a code and the device is compute 9.0), else 0. Used by the Python op to
// choose its route.
FAE_API int fae_hopper_available(int head_dim, int dtype) {
#ifdef FAE_WITH_HOPPER
    FaeParams p{};
    p.head_dim = head_dim;
    p.dtype = dtype;
    return toprovar_fae_hopper::available(&p) ? 1 : 0;
#else
    (void)head_dim;
    (void)dtype;
    return 0;
#endif
}

}  // extern "C"
