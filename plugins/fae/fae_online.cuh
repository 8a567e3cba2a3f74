// Online softmax with entropy: the per-row state update shared by every FAE kernel.
//
// A row keeps, in log2 units (x = s * c - m with c = scale * log2 e): the running max m (of s * c),
// l = sum 2^x and the centred sum e = sum 2^x * x. When a tile moves the max from m to m' (delta =
// m - m' <= 0, alpha = 2^delta) the exact update is e <- alpha (e + delta l), l <- alpha l; the
// tile's own terms are then added with x taken against m'. At the end H = ln l - ln 2 * e / l (nats).
#pragma once

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

struct FaeRowShift {
    float alpha;  // factor for the output accumulator
    float m_use;  // max to subtract from this tile's scaled scores (0 while every key is masked)
};

// Move a row's state (m, l, e) to the max of m and this tile's scaled row max ``tile_max``.
__device__ __forceinline__ FaeRowShift fae_shift_row(float& m, float& l, float& e, float tile_max) {
    const float m_new = fmaxf(m, tile_max);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // every key so far masked
    const float delta = m - m_use;                          // <= 0, -inf on the first valid tile
    const float alpha = fast_exp2(delta);
    e = l > 0.f ? alpha * (e + delta * l) : 0.f;
    l *= alpha;
    m = m_new;
    return {alpha, m_use};
}
