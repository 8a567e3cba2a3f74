// Flash Attention Entropy forward, mma.sync (sm_80 class) kernel, FA2-style structure:
// each warp owns 16 query rows held as bf16/fp16 A fragments in registers; K and V tiles of BN keys
// stream through shared memory with cp.async (one buffer each, V's load overlaps Q K^T and the next
// K's load overlaps P V); the online softmax keeps, per row, the running max m, the sum l and the
// centered entropy accumulator E (log2 units, form B of docs: E' = alpha (E + delta l) + sum p x).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fae.h"
#include "fae_online.cuh"

namespace toprovar_fae {

struct KernelParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    float* h;  // (B, H, Nq) float32
    const int32_t* key_lengths;
    int32_t heads, nq, nk;
    int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn;
    float scale_log2;  // scale * log2(e)
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;  // 0: zero-fill the 16 bytes
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};


// Shared-memory tile of BN rows x D elements; 16-byte chunk c of row r lives at chunk c ^ (r & 7).
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

template <typename T, int D, int BN, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride_n, int key0, int n_valid, int tid) {
    constexpr int CH = D / 8;
#pragma unroll
    for (int i = tid; i < BN * CH; i += NT) {
        const int r = i / CH, c = i % CH;
        const int key = key0 + r;
        const bool ok = key < n_valid;
        const T* src = ok ? g + static_cast<int64_t>(key) * stride_n + c * 8 : g;
        cp_async_16(smem_u32(s + swz<D>(r, c)), src, ok);
    }
}

// Grid: (ceil(Nq / BM), H, B); block: NW warps, BM = 16 * NW query rows.
template <typename T, int D, int BN, int NW>
__global__ void __launch_bounds__(NW * 32) fae_fwd_kernel(const KernelParams p) {
    constexpr int NT = NW * 32;
    constexpr int BM = NW * 16;
    constexpr int KD = D / 16;   // k-steps of Q K^T
    constexpr int NS = BN / 8;   // n-tiles of S
    constexpr int ND = D / 8;    // n-tiles of O
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BN * D;

    const int mb = blockIdx.x, hh = blockIdx.y, bb = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    int kv_len = p.nk;
    if (p.key_lengths != nullptr) kv_len = min(max(p.key_lengths[bb], 0), p.nk);

    const T* qg = static_cast<const T*>(p.q) + bb * p.q_sb + hh * p.q_sh;
    const T* kg = static_cast<const T*>(p.k) + bb * p.k_sb + hh * p.k_sh;
    const T* vg = static_cast<const T*>(p.v) + bb * p.v_sb + hh * p.v_sh;
    const int row0 = mb * BM + warp * 16;

    const int nblocks = (kv_len + BN - 1) / BN;
    if (nblocks > 0) {
        load_tile<T, D, BN, NT>(sK, kg, p.k_sn, 0, kv_len, tid);
        cp_async_commit();
    }

    // Q A-fragments straight from global memory (read once per block).
    uint32_t qf[KD][4];
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + (i & 1) * 8;
            const int col = kk * 16 + 2 * t + (i >> 1) * 8;
            qf[kk][i] = row < p.nq ? *reinterpret_cast<const uint32_t*>(qg + row * p.q_sn + col) : 0u;
        }
    }

    float acc[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};  // running max of s * scale * log2e
    float l[2] = {0.f, 0.f};              // per-thread partial sums of p
    float e[2] = {0.f, 0.f};              // per-thread partial sums of p * x (x = s*c - m <= 0)
    const float c = p.scale_log2;

    for (int n = 0; n < nblocks; ++n) {
        cp_async_wait_all();
        __syncthreads();  // K[n] landed; all warps finished reading V[n-1]
        load_tile<T, D, BN, NT>(sV, vg, p.v_sn, n * BN, kv_len, tid);
        cp_async_commit();

        float s[NS][4];
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
            for (int nn = 0; nn < NS / 2; ++nn) {
                uint32_t bf[4];
                const int key = nn * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int chunk = kk * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(bf, smem_u32(sK + swz<D>(key, chunk)));
                Mma<T>::run(s[2 * nn], qf[kk], bf[0], bf[1]);
                Mma<T>::run(s[2 * nn + 1], qf[kk], bf[2], bf[3]);
            }
        }
        if ((n + 1) * BN > kv_len) {
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int key = n * BN + nt * 8 + 2 * t + (i & 1);
                    if (key >= kv_len) s[nt][i] = -INFINITY;
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();  // V[n] landed; all warps finished reading K[n]
        if (n + 1 < nblocks) {
            load_tile<T, D, BN, NT>(sK, kg, p.k_sn, (n + 1) * BN, kv_len, tid);
            cp_async_commit();
        }

        // Online softmax + streaming centered entropy, rows g (r = 0) and g + 8 (r = 1).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const FaeRowShift sh = fae_shift_row(m[r], l[r], e[r], mx * c);
            const float m_use = sh.m_use, alpha = sh.alpha;
#pragma unroll
            for (int nt = 0; nt < ND; ++nt) {
                acc[nt][2 * r] *= alpha;
                acc[nt][2 * r + 1] *= alpha;
            }
            float ls = 0.f, es = 0.f;
#pragma unroll
            for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    // masked scores: -inf -> -FLT_MAX so that p = 0 and p * x = 0 (no NaN)
                    const float x = fmaxf(fmaf(s[nt][2 * r + j], c, -m_use), -3.402823466e38f);
                    const float pv = fast_exp2(x);
                    s[nt][2 * r + j] = pv;
                    ls += pv;
                    es = fmaf(pv, x, es);
                }
            }
            l[r] += ls;
            e[r] += es;
        }

        // O += P V; the S accumulator layout is the A-fragment layout of P.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            a[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
            a[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
            a[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t bf[4];
                const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int chunk = dn * 2 + (lane >> 4);
                ldmatrix_x4_trans(bf, smem_u32(sV + swz<D>(key, chunk)));
                Mma<T>::run(acc[2 * dn], a, bf[0], bf[1]);
                Mma<T>::run(acc[2 * dn + 1], a, bf[2], bf[3]);
            }
        }
    }

    // Epilogue: reduce the quad's partial l and E, normalise, write O and H.
    T* og = static_cast<T*>(p.o) + bb * p.o_sb + hh * p.o_sh;
    const float hmax = kv_len > 0 ? logf(static_cast<float>(kv_len)) : 0.f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float lr = l[r], er = e[r];
        lr += __shfl_xor_sync(0xffffffffu, lr, 1);
        lr += __shfl_xor_sync(0xffffffffu, lr, 2);
        er += __shfl_xor_sync(0xffffffffu, er, 1);
        er += __shfl_xor_sync(0xffffffffu, er, 2);
        const int row = row0 + g + 8 * r;
        const float inv = lr > 0.f ? 1.f / lr : 0.f;
        float ent = lr > 0.f ? logf(lr) - 0.69314718055994531f * er * inv : 0.f;
        ent = fminf(fmaxf(ent, 0.f), hmax);
        if (row < p.nq) {
            T* orow = og + row * p.o_sn;
#pragma unroll
            for (int nt = 0; nt < ND; ++nt) {
                *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t) =
                    Mma<T>::pack(acc[nt][2 * r] * inv, acc[nt][2 * r + 1] * inv);
            }
            if (t == 0) p.h[(static_cast<int64_t>(bb) * p.heads + hh) * p.nq + row] = ent;
        }
    }
}

// Variant with MT = 2 m-tiles (32 query rows) per warp: Q lives in shared memory and is re-read per
// k-step with ldmatrix, so each K/V fragment loaded from shared memory feeds two MMAs (half the
// shared-memory traffic per FLOP of the 16-row kernel above; FA2's hdim-128 layout). BM = 32 * NW.
template <typename T, int D, int BN, int NW>
__global__ void __launch_bounds__(NW * 32) fae_fwd_kernel_m2(const KernelParams p) {
    constexpr int MT = 2;
    constexpr int NT = NW * 32;
    constexpr int BM = NW * 16 * MT;
    constexpr int KD = D / 16;
    constexpr int NS = BN / 8;
    constexpr int ND = D / 8;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BM * D;
    T* sV = sK + BN * D;

    const int mb = blockIdx.x, hh = blockIdx.y, bb = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;

    int kv_len = p.nk;
    if (p.key_lengths != nullptr) kv_len = min(max(p.key_lengths[bb], 0), p.nk);

    const T* qg = static_cast<const T*>(p.q) + bb * p.q_sb + hh * p.q_sh;
    const T* kg = static_cast<const T*>(p.k) + bb * p.k_sb + hh * p.k_sh;
    const T* vg = static_cast<const T*>(p.v) + bb * p.v_sb + hh * p.v_sh;
    const int q0 = mb * BM;

    load_tile<T, D, BM, NT>(sQ, qg + static_cast<int64_t>(q0) * p.q_sn, p.q_sn, 0, p.nq - q0, tid);
    const int nblocks = (kv_len + BN - 1) / BN;
    if (nblocks > 0) load_tile<T, D, BN, NT>(sK, kg, p.k_sn, 0, kv_len, tid);
    cp_async_commit();

    float acc[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < ND; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;
    float m[MT][2], l[MT][2], e[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) m[mt][r] = -INFINITY, l[mt][r] = 0.f, e[mt][r] = 0.f;
    const float c = p.scale_log2;

    for (int n = 0; n < nblocks; ++n) {
        cp_async_wait_all();
        __syncthreads();
        load_tile<T, D, BN, NT>(sV, vg, p.v_sn, n * BN, kv_len, tid);
        cp_async_commit();

        float s[MT][NS][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < NS; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                ldmatrix_x4(qa[mt], smem_u32(sQ + swz<D>(warp * 16 * MT + mt * 16 + (lane & 15), kk * 2 + (lane >> 4))));
#pragma unroll
            for (int nn = 0; nn < NS / 2; ++nn) {
                uint32_t bf[4];
                const int key = nn * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int chunk = kk * 2 + ((lane >> 3) & 1);
                ldmatrix_x4(bf, smem_u32(sK + swz<D>(key, chunk)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(s[mt][2 * nn], qa[mt], bf[0], bf[1]);
                    Mma<T>::run(s[mt][2 * nn + 1], qa[mt], bf[2], bf[3]);
                }
            }
        }
        if ((n + 1) * BN > kv_len) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
                        if (n * BN + nt * 8 + 2 * t + (i & 1) >= kv_len) s[mt][nt][i] = -INFINITY;
        }
        cp_async_wait_all();
        __syncthreads();
        if (n + 1 < nblocks) {
            load_tile<T, D, BN, NT>(sK, kg, p.k_sn, (n + 1) * BN, kv_len, tid);
            cp_async_commit();
        }

#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const FaeRowShift sh = fae_shift_row(m[mt][r], l[mt][r], e[mt][r], mx * c);
                const float m_use = sh.m_use, alpha = sh.alpha;
#pragma unroll
                for (int nt = 0; nt < ND; ++nt) {
                    acc[mt][nt][2 * r] *= alpha;
                    acc[mt][nt][2 * r + 1] *= alpha;
                }
                float ls = 0.f, es = 0.f;
#pragma unroll
                for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
                    for (int j = 0; j < 2; ++j) {
                        const float x = fmaxf(fmaf(s[mt][nt][2 * r + j], c, -m_use), -3.402823466e38f);
                        const float pv = fast_exp2(x);
                        s[mt][nt][2 * r + j] = pv;
                        ls += pv;
                        es = fmaf(pv, x, es);
                    }
                }
                l[mt][r] += ls;
                e[mt][r] += es;
            }
        }

#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                uint32_t bf[4];
                const int key = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                const int chunk = dn * 2 + (lane >> 4);
                ldmatrix_x4_trans(bf, smem_u32(sV + swz<D>(key, chunk)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    Mma<T>::run(acc[mt][2 * dn], a[mt], bf[0], bf[1]);
                    Mma<T>::run(acc[mt][2 * dn + 1], a[mt], bf[2], bf[3]);
                }
            }
        }
    }

    T* og = static_cast<T*>(p.o) + bb * p.o_sb + hh * p.o_sh;
    const float hmax = kv_len > 0 ? logf(static_cast<float>(kv_len)) : 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float lr = l[mt][r], er = e[mt][r];
            lr += __shfl_xor_sync(0xffffffffu, lr, 1);
            lr += __shfl_xor_sync(0xffffffffu, lr, 2);
            er += __shfl_xor_sync(0xffffffffu, er, 1);
            er += __shfl_xor_sync(0xffffffffu, er, 2);
            const int row = q0 + warp * 16 * MT + mt * 16 + g + 8 * r;
            const float inv = lr > 0.f ? 1.f / lr : 0.f;
            float ent = lr > 0.f ? logf(lr) - 0.69314718055994531f * er * inv : 0.f;
            ent = fminf(fmaxf(ent, 0.f), hmax);
            if (row < p.nq) {
                T* orow = og + row * p.o_sn;
#pragma unroll
                for (int nt = 0; nt < ND; ++nt)
                    *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t) =
                        Mma<T>::pack(acc[mt][nt][2 * r] * inv, acc[mt][nt][2 * r + 1] * inv);
                if (t == 0) p.h[(static_cast<int64_t>(bb) * p.heads + hh) * p.nq + row] = ent;
            }
        }
    }
}

// (B, H, Nq) -> (B, Nq) mean over heads, fixed summation order (deterministic).
__global__ void fae_head_mean_kernel(const float* __restrict__ hin, float* __restrict__ hout, int batch, int heads,
                                     int nq) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<int64_t>(batch) * nq) return;
    const int64_t b = i / nq, q = i % nq;
    float sum = 0.f;
    for (int hh = 0; hh < heads; ++hh) sum += hin[(b * heads + hh) * nq + q];
    hout[i] = sum / static_cast<float>(heads);
}

}  // namespace toprovar_fae
