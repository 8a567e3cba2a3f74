// Flash Attention Entropy forward for Hopper (sm_90a): TMA + mbarrier pipeline, wgmma, warp specialisation.
//
// Block: 3 warpgroups (384 threads) on 128 query rows. Warpgroup 0 is the producer: one thread issues
// TMA bulk-tensor loads of the Q tile (once) and of K/V tiles of 128 keys into a STAGES-deep ring of
// shared-memory buffers, each completing on an mbarrier (full), and waits on the consumers' release
// (empty) before reusing a stage. Warpgroups 1 and 2 are consumers of 64 query rows each (setmaxnreg
// 240; the producer drops to 24): S = Q K^T by wgmma m64n128k16 with both operands in shared memory
// (128-byte swizzle, K-major), O += P V by wgmma with P in registers and V as an MN-major (transposed)
// shared-memory operand. Within a warpgroup, Q K^T of tile n+1 is issued before P V of tile n, so the
// softmax of tile n+1 runs while the tensor cores do P V (the rescale of O waits for P V). Optionally
// (PINGPONG) the two consumer warpgroups take turns issuing their GEMMs through named barriers.
//
// Online softmax and entropy per row as in fae_kernel.cuh (centered log2 form): on a new max,
// E <- alpha (E + delta l); per score E += p x (one FFMA); finish H = ln l - ln2 E / l, clamped to
// [0, ln N_valid]. Masked keys (j >= key_length) get x = -FLT_MAX, so p = 0, p x = 0. Keys past Nk are
// zero-filled by TMA (out-of-bounds fill); keys in [key_length, Nk) are loaded, their scores replaced by
// -inf (a select, so NaN in K is harmless), and their V rows zeroed in shared memory before P V.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "fae_hopper.h"
#include "fae_online.cuh"

namespace toprovar_fae_hopper {

constexpr int BM = 128;        // query rows per block (2 consumer warpgroups x 64)
constexpr int BN = 128;        // keys per K/V tile
constexpr int D = 128;         // head dim
constexpr int HALF = 64;       // elements of one 128-byte swizzle row (one TMA box column block)
constexpr int TILE_BYTES = BN * D * 2;        // 32 KB: one K or V tile (two 16 KB column blocks)
constexpr int QTILE_BYTES = BM * D * 2;       // 32 KB
constexpr int BLOCK_BYTES = 128 * HALF * 2;   // 16 KB column block of 128 rows
constexpr int NTHREADS = 384;

struct Params {
    void* o;
    float* h;  // (B, H, Nq) float32
    const int32_t* key_lengths;
    int32_t heads, nq, nk;
    int64_t o_sb, o_sh, o_sn;
    float scale_log2;
    uint32_t v_lbo, v_sbo;  // V descriptor byte offsets (MN-major, 128-byte swizzle)
};

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FAE_HOPPER_DEVICE 1
#endif

#ifdef FAE_HOPPER_DEVICE
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_regs(float (&r)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
__device__ __forceinline__ void fence_regs(uint32_t (&r)[8][4]) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    uint64_t d = static_cast<uint64_t>((saddr & 0x3FFFFu) >> 4);
    d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFFu) << 16;
    d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFFu) << 32;
    d |= static_cast<uint64_t>(1) << 62;
    return d;
}


__device__ __forceinline__ void wgmma_ss_bf16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,"
        "%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,"
        "%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,"
        "%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,"
        "%56,%57,%58,%59,%60,%61,%62,%63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_ss_f16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,"
        "%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,"
        "%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,"
        "%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,"
        "%56,%57,%58,%59,%60,%61,%62,%63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
__device__ __forceinline__ void wgmma_rs_tb_bf16(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,"
        "%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,"
        "%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,"
        "%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,"
        "%56,%57,%58,%59,%60,%61,%62,%63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}
__device__ __forceinline__ void wgmma_rs_tb_f16(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,"
        "%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,"
        "%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,"
        "%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,"
        "%56,%57,%58,%59,%60,%61,%62,%63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

template <typename T> struct Ops;
template <> struct Ops<__nv_bfloat16> {
    __device__ __forceinline__ static void qk(float (&d)[64], uint64_t da, uint64_t db, int sd) {
        wgmma_ss_bf16(d, da, db, sd);
    }
    __device__ __forceinline__ static void pv(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
        wgmma_rs_tb_bf16(d, a, db);
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Ops<__half> {
    __device__ __forceinline__ static void qk(float (&d)[64], uint64_t da, uint64_t db, int sd) {
        wgmma_ss_f16(d, da, db, sd);
    }
    __device__ __forceinline__ static void pv(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
        wgmma_rs_tb_f16(d, a, db);
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

// S accumulator element i of a thread: n8 block j = i / 4, row g + 8 * ((i >> 1) & 1), key 8 j + 2 t + (i & 1).
__device__ __forceinline__ void mask_tile(float (&s)[64], int key0, int kv_len, int t) {
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        const int key = key0 + (i >> 2) * 8 + 2 * t + (i & 1);
        if (key >= kv_len) s[i] = -INFINITY;
    }
}

// Online softmax + centered entropy update on one tile of scores; s becomes p (unnormalised probabilities).
// Returns the per-row rescale factors of O. MASKED: the tile holds -inf scores (keys past the key length),
// clamped to -FLT_MAX before exp2 so that p = 0 and p x = 0; every other tile has finite x and skips the
// clamp (each tile that is processed holds at least one valid key for every row).
template <bool MASKED>
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&m)[2], float (&l)[2], float (&e)[2], float c,
                                             float (&alpha_out)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 16; j += 2) {
            mx0 = fmaxf(mx0, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
            mx1 = fmaxf(mx1, fmaxf(s[4 * j + 4 + 2 * r], s[4 * j + 4 + 2 * r + 1]));
        }
        float mx = fmaxf(mx0, mx1);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const FaeRowShift sh = fae_shift_row(m[r], l[r], e[r], mx * c);
        const float m_use = sh.m_use, alpha = sh.alpha;
        alpha_out[r] = alpha;
        float ls[2] = {0.f, 0.f}, es[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < 16; ++j) {
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                float x = fmaf(s[4 * j + 2 * r + k], c, -m_use);
                if (MASKED) x = fmaxf(x, -3.402823466e38f);
                const float pv = fast_exp2(x);
                s[4 * j + 2 * r + k] = pv;
                ls[k] += pv;
                es[k] = fmaf(pv, x, es[k]);
            }
        }
        l[r] += ls[0] + ls[1];
        e[r] += es[0] + es[1];
    }
}

template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&a)[8][4], const float (&s)[64]) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        a[kk][0] = Ops<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
        a[kk][1] = Ops<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
        a[kk][2] = Ops<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
        a[kk][3] = Ops<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
}
#endif  // FAE_HOPPER_DEVICE

// Grid: (ceil(Nq / 128), H, B). Shared memory: Q | K[STAGES] | V[STAGES] | mbarriers, 1024-aligned.
template <typename T, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(NTHREADS, 1)
    fae_hopper_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tk,
                      const __grid_constant__ CUtensorMap tv, const Params p) {
#ifdef FAE_HOPPER_DEVICE
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const uint32_t sQ = base;
    const uint32_t sK0 = base + QTILE_BYTES;
    const uint32_t sV0 = sK0 + STAGES * TILE_BYTES;
    const uint32_t bars = sV0 + STAGES * TILE_BYTES;
    const uint32_t q_full = bars;
    auto k_full = [&](int s) { return bars + 8u * (1 + s); };
    auto v_full = [&](int s) { return bars + 8u * (1 + STAGES + s); };
    auto empty = [&](int s) { return bars + 8u * (1 + 2 * STAGES + s); };

    const int mb = blockIdx.x, hh = blockIdx.y, bb = blockIdx.z;
    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    int kv_len = p.nk;
    if (p.key_lengths != nullptr) kv_len = min(max(p.key_lengths[bb], 0), p.nk);
    const int ntiles = (kv_len + BN - 1) / BN;

    if (tid == 0) {
        mbar_init(q_full, 1);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(empty(s), 8);  // one arrive per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tk)) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&tv)) : "memory");
            mbar_expect_tx(q_full, QTILE_BYTES);
            tma_load_4d(sQ, &tq, 0, mb * BM, hh, bb, q_full);
            tma_load_4d(sQ + BLOCK_BYTES, &tq, HALF, mb * BM, hh, bb, q_full);
            for (int n = 0; n < ntiles; ++n) {
                const int s = n % STAGES;
                if (n >= STAGES) mbar_wait(empty(s), ((n / STAGES) - 1) & 1);
                const uint32_t dk = sK0 + s * TILE_BYTES, dv = sV0 + s * TILE_BYTES;
                mbar_expect_tx(k_full(s), TILE_BYTES);
                tma_load_4d(dk, &tk, 0, n * BN, hh, bb, k_full(s));
                tma_load_4d(dk + BLOCK_BYTES, &tk, HALF, n * BN, hh, bb, k_full(s));
                mbar_expect_tx(v_full(s), TILE_BYTES);
                tma_load_4d(dv, &tv, 0, n * BN, hh, bb, v_full(s));
                tma_load_4d(dv + BLOCK_BYTES, &tv, HALF, n * BN, hh, bb, v_full(s));
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
        const int cw = wg - 1;                 // consumer warpgroup: rows 64 cw .. 64 cw + 63 of the tile
        const int ltid = tid & 127;
        const int warp = ltid >> 5, lane = ltid & 31;
        const int g = lane >> 2, t = lane & 3;
        const float c = p.scale_log2;
        const uint32_t qrow = sQ + cw * 64 * 128;  // 64 rows x 128 bytes into each column block

        float o[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) o[i] = 0.f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, e[2] = {0.f, 0.f};
        float s[64];
        uint32_t pa[8][4];

        mbar_wait(q_full, 0);
        auto issue_qk = [&](int n) {
            const int st = n % STAGES;
            const uint32_t kb = sK0 + st * TILE_BYTES;
            mbar_wait(k_full(st), (n / STAGES) & 1);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
                const uint32_t off = (kk >> 2) * BLOCK_BYTES + (kk & 3) * 32;
                Ops<T>::qk(s, make_desc(qrow + off, 16, 1024), make_desc(kb + off, 16, 1024), kk > 0);
            }
            wgmma_commit();
        };
        auto issue_pv = [&](int n) {
            const int st = n % STAGES;
            const uint32_t vb = sV0 + st * TILE_BYTES;
            mbar_wait(v_full(st), (n / STAGES) & 1);
            if (n == ntiles - 1 && kv_len < p.nk) {
                // Last tile under a key length: V rows [kv_len, Nk) hold real (maybe non-finite) data; their p
                // is 0, but 0 * inf = NaN in the MMA, so zero them (each warpgroup zeroes the same rows with the
                // same value, then orders its stores before its own wgmma reads).
                const int r0 = kv_len - n * BN, r1 = min(p.nk - n * BN, BN);
                for (int i = ltid; i < (r1 - r0) * 16; i += 128) {
                    const uint32_t addr = vb + (i & 8 ? BLOCK_BYTES : 0) + (r0 + (i >> 4)) * 128 + (i & 7) * 16;
                    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0) : "memory");
                }
                asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
                asm volatile("bar.sync %0, 128;\n" ::"r"(4 + cw) : "memory");
            }
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) Ops<T>::pv(o, pa[kk], make_desc(vb + kk * 16 * 128, p.v_lbo, p.v_sbo));
            wgmma_commit();
        };

        // Ping-pong (optional): the two consumer warpgroups take turns issuing their GEMMs (named barriers 2
        // and 3), so one warpgroup's softmax runs while the other's GEMMs own the tensor cores.
        auto turn_wait = [&]() {
            if (PINGPONG) asm volatile("bar.sync %0, 256;\n" ::"r"(2 + cw) : "memory");
        };
        auto turn_pass = [&](bool last) {
            if (PINGPONG && !(last && cw == 1)) asm volatile("bar.arrive %0, 256;\n" ::"r"(3 - cw) : "memory");
        };
        if (PINGPONG && ntiles > 0 && cw == 1) asm volatile("bar.arrive 2, 256;\n" ::: "memory");

        if (ntiles > 0) {
            turn_wait();
            issue_qk(0);
            turn_pass(false);
            wgmma_wait<0>();
            fence_regs(s);
            float alpha[2];
            if (BN > kv_len) {
                mask_tile(s, 0, kv_len, t);
                softmax_tile<true>(s, m, l, e, c, alpha);  // O is zero: no rescale
            } else {
                softmax_tile<false>(s, m, l, e, c, alpha);
            }
            pack_p<T>(pa, s);
        }
        // Steady state: Q K^T of tile n+1 is in flight with P V of tile n; the softmax of n+1 overlaps P V.
        for (int n = 0; n + 1 < ntiles; ++n) {
            turn_wait();
            issue_qk(n + 1);
            issue_pv(n);
            turn_pass(false);
            wgmma_wait<1>();  // S of tile n+1 is ready; P V of tile n may still run
            fence_regs(s);
            float alpha[2];
            if ((n + 2) * BN > kv_len) {
                mask_tile(s, (n + 1) * BN, kv_len, t);
                softmax_tile<true>(s, m, l, e, c, alpha);
            } else {
                softmax_tile<false>(s, m, l, e, c, alpha);
            }
            wgmma_wait<0>();
            fence_regs(o);
            if (lane == 0) mbar_arrive(empty(n % STAGES));
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                o[4 * j + 0] *= alpha[0];
                o[4 * j + 1] *= alpha[0];
                o[4 * j + 2] *= alpha[1];
                o[4 * j + 3] *= alpha[1];
            }
            pack_p<T>(pa, s);
        }
        if (ntiles > 0) {
            turn_wait();
            issue_pv(ntiles - 1);
            turn_pass(true);
            wgmma_wait<0>();
            fence_regs(o);
            if (lane == 0) mbar_arrive(empty((ntiles - 1) % STAGES));
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
            const int row = mb * BM + cw * 64 + warp * 16 + g + 8 * r;
            const float inv = lr > 0.f ? 1.f / lr : 0.f;
            float ent = lr > 0.f ? logf(lr) - 0.69314718055994531f * er * inv : 0.f;
            ent = fminf(fmaxf(ent, 0.f), hmax);
            if (row < p.nq) {
                T* orow = og + row * p.o_sn;
#pragma unroll
                for (int j = 0; j < 16; ++j)
                    *reinterpret_cast<uint32_t*>(orow + j * 8 + 2 * t) =
                        Ops<T>::pack(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
                if (t == 0) p.h[(static_cast<int64_t>(bb) * p.heads + hh) * p.nq + row] = ent;
            }
        }
    }
#endif  // FAE_HOPPER_DEVICE
}

// ------------------------------------------------------------------------------------------------ host

namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    static bool tried = false;
    if (!tried) {
        tried = true;
        void* ptr = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) ==
                cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
        else
            cudaGetLastError();
    }
    return fn;
}

// (B, H, N, d) tensor with element strides sb, sh, sn; box of 64 x rows, 128-byte swizzle.
bool make_map(CUtensorMap* map, const void* ptr, int dtype, int batch, int heads, int n, int64_t sb, int64_t sh,
              int64_t sn, int box_rows) {
    auto fn = encode_fn();
    if (fn == nullptr) return false;
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(n),
                                static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
    const cuuint64_t strides[3] = {static_cast<cuuint64_t>(sn) * 2, static_cast<cuuint64_t>(sh) * 2,
                                   static_cast<cuuint64_t>(sb) * 2};
    const cuuint32_t box[4] = {HALF, static_cast<cuuint32_t>(box_rows), 1, 1};
    const cuuint32_t estr[4] = {1, 1, 1, 1};
    const CUtensorMapDataType dt =
        dtype == FAE_DTYPE_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    const CUresult r = fn(map, dt, 4, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS;
}

template <int STAGES>
constexpr size_t smem_bytes() {
    return 1024 + QTILE_BYTES + 2 * STAGES * TILE_BYTES + 8 * (1 + 3 * STAGES);
}

template <typename T, int STAGES, bool PINGPONG>
int launch(const FaeParams* fp, float* h_heads, cudaStream_t stream) {
    CUtensorMap tq, tk, tv;
    // Nk may be 0 (every row then gets O = 0, H = 0); the maps need a positive extent.
    const int nk_map = fp->nk > 0 ? fp->nk : 1;
    const void* kp = fp->nk > 0 ? fp->k : fp->q;
    const void* vp = fp->nk > 0 ? fp->v : fp->q;
    if (!make_map(&tq, fp->q, fp->dtype, fp->batch, fp->heads, fp->nq, fp->q_stride_b, fp->q_stride_h,
                  fp->q_stride_n, BM) ||
        !make_map(&tk, kp, fp->dtype, fp->batch, fp->heads, nk_map, fp->nk > 0 ? fp->k_stride_b : fp->q_stride_b,
                  fp->nk > 0 ? fp->k_stride_h : fp->q_stride_h, fp->nk > 0 ? fp->k_stride_n : fp->q_stride_n, BN) ||
        !make_map(&tv, vp, fp->dtype, fp->batch, fp->heads, nk_map, fp->nk > 0 ? fp->v_stride_b : fp->q_stride_b,
                  fp->nk > 0 ? fp->v_stride_h : fp->q_stride_h, fp->nk > 0 ? fp->v_stride_n : fp->q_stride_n, BN))
        return FAE_ERR_CUDA;
    Params p;
    p.o = fp->o;
    p.h = h_heads;
    p.key_lengths = fp->key_lengths;
    p.heads = fp->heads;
    p.nq = fp->nq;
    p.nk = fp->nk;
    p.o_sb = fp->o_stride_b, p.o_sh = fp->o_stride_h, p.o_sn = fp->o_stride_n;
    p.scale_log2 = fp->scale * 1.4426950408889634f;
    // MN-major 128B-swizzle operand: LBO = stride between 64-element column blocks, SBO = between 8-key groups.
    p.v_lbo = BLOCK_BYTES;
    p.v_sbo = 1024u;
    auto kernel = fae_hopper_kernel<T, STAGES, PINGPONG>;
    constexpr size_t smem = smem_bytes<STAGES>();
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
        cudaSuccess)
        return FAE_ERR_CUDA;
    const dim3 grid((fp->nq + BM - 1) / BM, fp->heads, fp->batch);
    kernel<<<grid, NTHREADS, smem, stream>>>(tq, tk, tv, p);
    return cudaGetLastError() == cudaSuccess ? FAE_OK : FAE_ERR_CUDA;
}

}  // namespace

bool available(const FaeParams* p) {
    if (p->head_dim != D) return false;
    if (p->dtype != FAE_DTYPE_BF16 && p->dtype != FAE_DTYPE_FP16) return false;
    // Strides: TMA needs 16-byte multiples (already required by fae_forward) below 2^40 bytes.
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    static int cached_dev = -1, cached_ok = 0;
    if (dev != cached_dev) {
        cudaDeviceProp prop;
        cudaFuncAttributes attr;
        int ok = cudaGetDeviceProperties(&prop, dev) == cudaSuccess && prop.major == 9 && prop.minor == 0 &&
                 prop.sharedMemPerBlockOptin >= smem_bytes<3>() &&
                 cudaFuncGetAttributes(&attr, fae_hopper_kernel<__nv_bfloat16, 3, false>) == cudaSuccess &&
                 attr.binaryVersion == 90 && encode_fn() != nullptr;
        cudaGetLastError();
        cached_dev = dev;
        cached_ok = ok;
    }
    return cached_ok != 0;
}

int forward(const FaeParams* p, float* h_heads, int flags, cudaStream_t stream) {
    if (!available(p)) return FAE_ERR_UNSUPPORTED;
    const bool two = (flags & FAE_HOPPER_STAGES2) != 0, pp = (flags & FAE_HOPPER_PINGPONG) != 0;
    if (p->dtype == FAE_DTYPE_BF16)
        return two  ? launch<__nv_bfloat16, 2, false>(p, h_heads, stream)
               : pp ? launch<__nv_bfloat16, 3, true>(p, h_heads, stream)
                    : launch<__nv_bfloat16, 3, false>(p, h_heads, stream);
    return two  ? launch<__half, 2, false>(p, h_heads, stream)
           : pp ? launch<__half, 3, true>(p, h_heads, stream)
                : launch<__half, 3, false>(p, h_heads, stream);
}

}  // namespace toprovar_fae_hopper
