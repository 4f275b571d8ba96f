// rope.cu: NeoX rotary embedding on the first rotary_dim dims of each head, in place (Op::Rope),
// and qk_prep_f32 (below): an attention block's q/k norms, rope and KV append in one launch.
//
// x f32 [n, heads, head_dim]; pos u32 [n] (read on the device). Pairs (i, i + rotary_dim/2).
// Angles are computed in double, as the CPU reference does (positions in the tens of thousands
// lose precision in f32 before the sin/cos), then rounded to f32.
// Grid-stride over n * heads * rotary_dim/2 pairs, block 256.
#include "common.cuh"

// cos and sin of pair i's angle at position p: pos * theta^(-2i / rotary_dim), in double.
__device__ __forceinline__ void rope_cos_sin(u32 p, u32 i, u32 rotary_dim, float theta, float& c, float& s) {
    const double inv = 1.0 / pow((double)theta, 2.0 * (double)i / (double)rotary_dim);
    const double a = (double)p * inv;
    c = (float)cos(a);
    s = (float)sin(a);
}

extern "C" __global__ void rope_f32(float* x, const u32* pos, u32 n, u32 heads, u32 head_dim, u32 rotary_dim, float theta) { pdl_prologue();
    const u32 half = rotary_dim / 2;
    const u64 total = (u64)n * heads * half;
    for (u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (u64)gridDim.x * blockDim.x) {
        u32 i = (u32)(k % half);
        u64 th = k / half;  // t * heads + h
        u32 t = (u32)(th / heads);
        float c, s;
        rope_cos_sin(pos[t], i, rotary_dim, theta, c, s);
        float* v = x + th * head_dim;
        float p = v[i], q = v[i + half];
        v[i] = p * c - q * s;
        v[i + half] = q * c + p * s;
    }
}

// qk_prep_f32: the attention block's per-head preparation of one step in one launch, for the
// CUDA backend's fusion of [q norm] [k norm] [rope q, rope k] kv_append (the same math as
// rms_norm_f32, rope_f32 and kv_append_f32 in turn): each q and k head row is RMS-normed with
// its weight (flags bit 0: q, bit 1: k), rotated (bit 2), written back in place, and the k
// rows and the v rows are appended to the caches at pos[t] (skipped at pos >= max_ctx). One
// warp per row of q, k or v (rows of a token in that order), block QP_WARPS * 32. Lane l holds
// elements l + 32 i (head_dim <= 256, checked on the host); the rope pairs (i, i + rotary_dim
// / 2) are rotated in the warp's copy of the row in shared memory.
#define QP_WARPS 4

extern "C" __global__ void __launch_bounds__(QP_WARPS * 32) qk_prep_f32(float* q, float* k, const float* v, const u32* pos,
                                                                      float* kc, float* vc, const void* qw, int qwdt,
                                                                      const void* kw, int kwdt, u32 n, u32 heads, u32 kv_heads,
                                                                      u32 head_dim, u32 rotary_dim, float theta, float eps,
                                                                      float offset, u32 max_ctx, u32 flags) { pdl_prologue();
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 per_t = heads + 2 * kv_heads;
    const u64 r = (u64)blockIdx.x * QP_WARPS + warp;
    if (r >= (u64)n * per_t) return;
    const u32 t = (u32)(r / per_t), j = (u32)(r % per_t);
    const u32 p = pos[t];
    const u64 kv_dim = (u64)kv_heads * head_dim;
    __shared__ float s_row[QP_WARPS][256];
    if (j >= heads + kv_heads) {  // a v row: the append only
        if (p >= max_ctx) return;
        const u32 vh = j - heads - kv_heads;
        const float* src = v + (u64)t * kv_dim + (u64)vh * head_dim;
        float* dst = vc + (u64)p * kv_dim + (u64)vh * head_dim;
        for (u32 c = lane; c < head_dim; c += 32) dst[c] = src[c];
        return;
    }
    const bool is_q = j < heads;
    float* row = is_q ? q + ((u64)t * heads + j) * head_dim : k + (u64)t * kv_dim + (u64)(j - heads) * head_dim;
    float e[8];
#pragma unroll
    for (int i = 0; i < 8; i++) e[i] = lane + 32 * i < head_dim ? row[lane + 32 * i] : 0.f;
    if (flags & (is_q ? 1u : 2u)) {
        const void* w = is_q ? qw : kw;
        const int wdt = is_q ? qwdt : kwdt;
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) ss += e[i] * e[i];
        ss = warp_sum(ss);
        const float inv = 1.0f / sqrtf(ss / (float)head_dim + eps);
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (lane + 32 * i < head_dim) e[i] = e[i] * inv * (load_float(w, wdt, lane + 32 * i) + offset);
    }
    if (flags & 4u) {  // pairs (i, i + half) go through the warp's row in shared memory
        float* sr = s_row[warp];
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (lane + 32 * i < head_dim) sr[lane + 32 * i] = e[i];
        __syncwarp();
        const u32 half = rotary_dim / 2;
        for (u32 i = lane; i < half; i += 32) {
            float c, s;
            rope_cos_sin(p, i, rotary_dim, theta, c, s);
            const float x0 = sr[i], x1 = sr[i + half];
            sr[i] = x0 * c - x1 * s;
            sr[i + half] = x1 * c + x0 * s;
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (lane + 32 * i < head_dim) e[i] = sr[lane + 32 * i];
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (lane + 32 * i < head_dim) row[lane + 32 * i] = e[i];
    if (!is_q && p < max_ctx) {
        float* dst = kc + (u64)p * kv_dim + (u64)(j - heads) * head_dim;
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (lane + 32 * i < head_dim) dst[lane + 32 * i] = e[i];
    }
}
