// attention.cu: KV-cache append and causal GQA attention over the cache (Op::KvAppend,
// Op::Attention).
//
// Caches f32 [max_ctx, kv_heads * head_dim]; q / out f32 [n, heads * head_dim]; pos u32 [n]
// read on the device: query t attends cache rows 0..=pos[t] (prefill and decode are the same
// computation). Query head h reads kv head h / (heads / kv_heads).
//  * kv_append_f32: grid-stride over n * kv_dim, block 256. Rows at pos >= max_ctx are skipped
//    (the session never asks for them).
//  * attention_f32: grid (heads, n), block ATT_WARPS * 32. Each warp takes keys j = warp,
//    warp + ATT_WARPS, ... and keeps an online softmax (running max, sum and weighted V) with
//    lane d holding dims d, d + 32, ... (head_dim <= 32 * ATT_MAXD, checked on the host); the
//    warps are merged through shared memory at the end. Used for wide batches (prefill).
//  * attention_split_f32 + attention_merge_f32 (few queries: decode, for head dims the GQA
//    kernels below do not take): flash-decoding, one query head per block. Grid
//    (heads, n, splits) with splits = ceil(max_ctx / AS_KEYS); block z takes keys
//    [z * AS_KEYS, (z + 1) * AS_KEYS) of the query's 0..=pos[t] (blocks past it only mark
//    themselves empty), each warp walks AS_KU keys at a time (independent loads and reductions
//    in flight) with an online softmax, and the block writes its unnormalised partial
//    (max, sum, acc[head_dim]) to part[t, h, z]. The merge (grid (heads, n), block 128)
//    rescales the non-empty partials to the global max and normalises.
#include "common.cuh"

#define ATT_WARPS 8
#define ATT_MAXD 8

extern "C" __global__ void kv_append_f32(const float* k, const float* v, const u32* pos, float* kc, float* vc, u32 n, u32 kv_dim,
                                         u32 max_ctx) { pdl_prologue();
    const u64 total = (u64)n * kv_dim;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u32 t = (u32)(i / kv_dim), c = (u32)(i % kv_dim);
        u32 p = pos[t];
        if (p >= max_ctx) continue;
        kc[(u64)p * kv_dim + c] = k[i];
        vc[(u64)p * kv_dim + c] = v[i];
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_f32(const float* q, const u32* pos, const float* kc,
                                                                          const float* vc, float* out, u32 heads, u32 kv_heads,
                                                                          u32 head_dim, float scale, u32 max_ctx) { pdl_prologue();
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][ATT_MAXD * 32];
    const u32 h = blockIdx.x, t = blockIdx.y;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 kvh = h / (heads / kv_heads);
    const u32 kv_dim = kv_heads * head_dim;
    const u32 len = min(pos[t] + 1, max_ctx);
    const float* qr = q + ((u64)t * heads + h) * head_dim;

    float qv[ATT_MAXD], acc[ATT_MAXD];
#pragma unroll
    for (int i = 0; i < ATT_MAXD; i++) {
        u32 d = lane + 32 * i;
        qv[i] = d < head_dim ? qr[d] : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 j = warp; j < len; j += ATT_WARPS) {
        const float* kr = kc + (u64)j * kv_dim + (u64)kvh * head_dim;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) {
            u32 d = lane + 32 * i;
            if (d < head_dim) s += qv[i] * kr[d];
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn);  // 0 on the first key (m = -inf)
        float p = expf(s - mn);
        l = l * corr + p;
        const float* vr = vc + (u64)j * kv_dim + (u64)kvh * head_dim;
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) {
            u32 d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + p * vr[d];
        }
        m = mn;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_MAXD; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, s_m[w]);
    float L = 0.f, f[ATT_WARPS];
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = s_l[w] > 0.f ? expf(s_m[w] - M) : 0.f;  // warps that saw no key contribute nothing
        L += s_l[w] * f[w];
    }
    float* o = out + ((u64)t * heads + h) * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; w++) a += s_acc[w][d] * f[w];
        o[d] = a / L;
    }
}

#define AS_WARPS 4
#define AS_KEYS 256
#define AS_KU 4

extern "C" __global__ void __launch_bounds__(AS_WARPS * 32) attention_split_f32(const float* q, const u32* pos, const float* kc,
                                                                               const float* vc, float* part, u32 heads, u32 kv_heads,
                                                                               u32 head_dim, float scale, u32 max_ctx, u32 splits) { pdl_prologue();
    __shared__ float s_m[AS_WARPS], s_l[AS_WARPS];
    __shared__ float s_acc[AS_WARPS][ATT_MAXD * 32];
    const u32 h = blockIdx.x, t = blockIdx.y, sp = blockIdx.z;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 len = min(pos[t] + 1, max_ctx);
    const u32 j0 = sp * AS_KEYS, j1 = min(j0 + AS_KEYS, len);
    float* P = part + (((u64)t * heads + h) * splits + sp) * (head_dim + 2);
    if (j0 >= len) {
        if (threadIdx.x == 0) {
            P[0] = NEG_INF;
            P[1] = 0.f;
        }
        return;  // uniform across the block
    }
    const u32 kvh = h / (heads / kv_heads);
    const u32 kv_dim = kv_heads * head_dim;
    const float* qr = q + ((u64)t * heads + h) * head_dim;
    const float* kbase = kc + (u64)kvh * head_dim;
    const float* vbase = vc + (u64)kvh * head_dim;

    float qv[ATT_MAXD], acc[ATT_MAXD];
#pragma unroll
    for (int i = 0; i < ATT_MAXD; i++) {
        u32 d = lane + 32 * i;
        qv[i] = d < head_dim ? qr[d] : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (u32 jb = j0 + warp * AS_KU; jb < j1; jb += AS_WARPS * AS_KU) {
        float s[AS_KU];
#pragma unroll
        for (int u = 0; u < AS_KU; u++) {
            const u32 j = min(jb + u, j1 - 1);  // clamped rows are masked below
            const float* kr = kbase + (u64)j * kv_dim;
            float a = 0.f;
#pragma unroll
            for (int i = 0; i < ATT_MAXD; i++) {
                u32 d = lane + 32 * i;
                if (d < head_dim) a += qv[i] * kr[d];
            }
            s[u] = a;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < AS_KU; u++) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        float mn = m;
#pragma unroll
        for (int u = 0; u < AS_KU; u++) {
            s[u] = jb + u < j1 ? s[u] * scale : NEG_INF;
            mn = fmaxf(mn, s[u]);
        }
        const float corr = expf(m - mn);  // 0 on the first keys (m = -inf)
        float p[AS_KU];
        l *= corr;
#pragma unroll
        for (int u = 0; u < AS_KU; u++) {
            p[u] = expf(s[u] - mn);  // 0 for masked keys
            l += p[u];
        }
#pragma unroll
        for (int i = 0; i < ATT_MAXD; i++) {
            u32 d = lane + 32 * i;
            if (d < head_dim) {
                float a = acc[i] * corr;
#pragma unroll
                for (int u = 0; u < AS_KU; u++) a += p[u] * vbase[(u64)min(jb + u, j1 - 1) * kv_dim + d];
                acc[i] = a;
            }
        }
        m = mn;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_MAXD; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < AS_WARPS; w++) M = fmaxf(M, s_m[w]);
    float L = 0.f, f[AS_WARPS];
#pragma unroll
    for (int w = 0; w < AS_WARPS; w++) {
        f[w] = s_l[w] > 0.f ? expf(s_m[w] - M) : 0.f;
        L += s_l[w] * f[w];
    }
    if (threadIdx.x == 0) {
        P[0] = M;
        P[1] = L;
    }
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < AS_WARPS; w++) a += s_acc[w][d] * f[w];
        P[2 + d] = a;
    }
}

extern "C" __global__ void attention_merge_f32(const float* part, float* out, u32 heads, u32 head_dim, u32 splits) { pdl_prologue();
    const u32 h = blockIdx.x, t = blockIdx.y;
    const u64 stride = head_dim + 2;
    const float* P = part + ((u64)t * heads + h) * splits * stride;
    float M = NEG_INF;
    for (u32 s = 0; s < splits; s++) M = fmaxf(M, P[s * stride]);
    float L = 0.f;
    for (u32 s = 0; s < splits; s++) {
        float l = P[s * stride + 1];
        if (l > 0.f) L += l * expf(P[s * stride] - M);
    }
    float* o = out + ((u64)t * heads + h) * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (u32 s = 0; s < splits; s++) {
            float l = P[s * stride + 1];
            if (l > 0.f) a += P[s * stride + 2 + d] * expf(P[s * stride] - M);
        }
        o[d] = a / L;
    }
}

// attention_gqa_f32_h{HB}_d{D} + attention_gqa_merge_f32 (few queries, head_dim 128 or 256):
//   flash-decoding that reads each K/V row once for all the query heads that share it. Grid
//   (kv_heads * G / HB, n, splits) for G = heads / kv_heads query heads per kv head and HB
//   (1, 2, 4 or 8, dividing G) of them per block; block GQ_WARPS * 32. The block's keys are
//   split z of the query's own 0..=pos[t] (so the splits follow the context actually
//   attended, not max_ctx: the grid is fixed when the decode step is captured, the length is
//   read on the device). Lane l holds dims 4l + 128c .. + 3 (c < D / 128) of q and of the
//   output for all HB heads; each warp walks GQ_KU keys at a time (a float4 of K and of V per
//   lane and key, all loads of a step in flight together). A key's HB partial dots are
//   summed over the warp by a reduce-scatter (HB - 1 + 5 - log2 HB shuffles instead of 5 HB),
//   which leaves lane l the score of head l >> (5 - log2 HB); that lane keeps the head's
//   online softmax, and the P V update reads each head's correction and probabilities back
//   with one shuffle each. The warps are merged in shared memory and the block writes its
//   unnormalised partial per head: (max, sum) to ml[t, h, z] and acc[D] to acc[t, h, z]. The
//   merge (grid (heads, n), block GM_THREADS) weighs the non-empty partials by exp(max - M) in
//   shared memory, sums them with the splits spread over the block, and normalises.
#define GQ_WARPS 4
#define GM_THREADS 256
#define GM_MAXZ 1024

template <int HB, int D4>
__device__ __forceinline__ void attention_gqa_body(const float* q, const u32* pos, const float* kc, const float* vc, float* ml,
                                                   float4* acc_out, u32 heads, u32 kv_heads, float scale, u32 max_ctx,
                                                   u32 splits) {
    constexpr int D = 128 * D4;
    constexpr int LOG_HB = HB == 8 ? 3 : HB == 4 ? 2 : HB == 2 ? 1 : 0;
    constexpr int KU = 4 / D4;  // keys per warp step: 8 (D 128) or 16 (D 256) float4 loads in flight
    constexpr u32 STEP = GQ_WARPS * KU;
    __shared__ float s_m[GQ_WARPS][HB], s_l[GQ_WARPS][HB];
    __shared__ float4 s_acc[GQ_WARPS][HB][D / 4];
    const u32 G = heads / kv_heads, groups = G / HB;
    const u32 kvh = blockIdx.x / groups, h0 = kvh * G + (blockIdx.x % groups) * HB;
    const u32 t = blockIdx.y, z = blockIdx.z;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 len = min(pos[t] + 1, max_ctx);
    const u32 chunk = ((len + splits - 1) / splits + STEP - 1) / STEP * STEP;
    const u32 j0 = z * chunk, j1 = min(j0 + chunk, len);
    const u64 rec0 = ((u64)t * heads + h0) * splits + z;  // head h0 + i's record: rec0 + i * splits
    if (j0 >= len) {
        if (threadIdx.x < HB) {
            ml[2 * (rec0 + threadIdx.x * splits)] = NEG_INF;
            ml[2 * (rec0 + threadIdx.x * splits) + 1] = 0.f;
        }
        return;  // uniform across the block
    }
    const u64 kv_dim = (u64)kv_heads * D;
    const float* kb = kc + (u64)kvh * D + 4 * lane;
    const float* vb = vc + (u64)kvh * D + 4 * lane;
    float4 qv[HB][D4], acc[HB][D4];
#pragma unroll
    for (int i = 0; i < HB; i++)
#pragma unroll
        for (int c = 0; c < D4; c++) {
            float4 a = *(const float4*)(q + ((u64)t * heads + h0 + i) * D + 128 * c + 4 * lane);
            qv[i][c] = make_float4(a.x * scale, a.y * scale, a.z * scale, a.w * scale);
            acc[i][c] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    float m = NEG_INF, l = 0.f;  // the online softmax of head lane >> (5 - LOG_HB)
    for (u32 jb = j0 + warp * KU; jb < j1; jb += STEP) {
        float4 kr[KU][D4], vr[KU][D4];
#pragma unroll
        for (int u = 0; u < KU; u++) {
            const u64 j = min(jb + u, j1 - 1);  // clamped rows are masked below
#pragma unroll
            for (int c = 0; c < D4; c++) {
                kr[u][c] = *(const float4*)(kb + j * kv_dim + 128 * c);
                vr[u][c] = *(const float4*)(vb + j * kv_dim + 128 * c);
            }
        }
        float sc[KU];
#pragma unroll
        for (int u = 0; u < KU; u++) {
            float v[HB];
#pragma unroll
            for (int i = 0; i < HB; i++) {
                float a = 0.f;
#pragma unroll
                for (int c = 0; c < D4; c++)
                    a += qv[i][c].x * kr[u][c].x + qv[i][c].y * kr[u][c].y + qv[i][c].z * kr[u][c].z + qv[i][c].w * kr[u][c].w;
                v[i] = a;
            }
            // Reduce-scatter: each step halves the heads a lane carries and sums them over the
            // lane pairs of one mask.
#pragma unroll
            for (int st = 0; st < LOG_HB; st++) {
                const u32 mask = 16u >> st;
                const int half = HB >> (st + 1);
                const bool up = lane & mask;
#pragma unroll
                for (int i = 0; i < half; i++) {
                    const float send = up ? v[i] : v[i + half];
                    const float keep = up ? v[i + half] : v[i];
                    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, mask);
                }
            }
#pragma unroll
            for (u32 mask = 16u >> LOG_HB; mask > 0; mask >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], mask);
            sc[u] = jb + u < j1 ? v[0] : NEG_INF;
        }
        float mn = m;
#pragma unroll
        for (int u = 0; u < KU; u++) mn = fmaxf(mn, sc[u]);
        const float corr = expf(m - mn);  // 0 on the first keys (m = -inf); key jb is valid
        float p[KU];
        l *= corr;
#pragma unroll
        for (int u = 0; u < KU; u++) {
            p[u] = expf(sc[u] - mn);  // 0 for masked keys
            l += p[u];
        }
        m = mn;
#pragma unroll
        for (int i = 0; i < HB; i++) {
            const int src = i << (5 - LOG_HB);
            const float ci = __shfl_sync(0xffffffffu, corr, src);
            float pi[KU];
#pragma unroll
            for (int u = 0; u < KU; u++) pi[u] = __shfl_sync(0xffffffffu, p[u], src);
#pragma unroll
            for (int c = 0; c < D4; c++) {
                float4 a = acc[i][c];
                a.x *= ci, a.y *= ci, a.z *= ci, a.w *= ci;
#pragma unroll
                for (int u = 0; u < KU; u++) {
                    a.x += pi[u] * vr[u][c].x;
                    a.y += pi[u] * vr[u][c].y;
                    a.z += pi[u] * vr[u][c].z;
                    a.w += pi[u] * vr[u][c].w;
                }
                acc[i][c] = a;
            }
        }
    }
    if ((lane & ((32 >> LOG_HB) - 1)) == 0) {
        s_m[warp][lane >> (5 - LOG_HB)] = m;
        s_l[warp][lane >> (5 - LOG_HB)] = l;
    }
#pragma unroll
    for (int i = 0; i < HB; i++)
#pragma unroll
        for (int c = 0; c < D4; c++) s_acc[warp][i][32 * c + lane] = acc[i][c];
    __syncthreads();
    for (u32 idx = threadIdx.x; idx < HB * (D / 4); idx += blockDim.x) {
        const u32 i = idx / (D / 4), d4 = idx % (D / 4);
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < GQ_WARPS; w++) M = fmaxf(M, s_m[w][i]);
        float L = 0.f;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int w = 0; w < GQ_WARPS; w++) {
            const float f = s_l[w][i] > 0.f ? expf(s_m[w][i] - M) : 0.f;  // warps that saw no key: 0
            L += s_l[w][i] * f;
            const float4 b = s_acc[w][i][d4];
            a.x += b.x * f, a.y += b.y * f, a.z += b.z * f, a.w += b.w * f;
        }
        const u64 rec = rec0 + (u64)i * splits;
        acc_out[rec * (D / 4) + d4] = a;
        if (d4 == 0) {
            ml[2 * rec] = M;
            ml[2 * rec + 1] = L;
        }
    }
}

#define ATTENTION_GQA(HB, D4, D)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GQ_WARPS * 32) attention_gqa_f32_h##HB##_d##D(                           \
        const float* q, const u32* pos, const float* kc, const float* vc, float* ml, float4* acc, u32 heads, u32 kv_heads, \
        float scale, u32 max_ctx, u32 splits) { pdl_prologue();                                                            \
        attention_gqa_body<HB, D4>(q, pos, kc, vc, ml, acc, heads, kv_heads, scale, max_ctx, splits);                      \
    }

ATTENTION_GQA(1, 1, 128)
ATTENTION_GQA(2, 1, 128)
ATTENTION_GQA(4, 1, 128)
ATTENTION_GQA(8, 1, 128)
ATTENTION_GQA(1, 2, 256)
ATTENTION_GQA(2, 2, 256)
ATTENTION_GQA(4, 2, 256)
ATTENTION_GQA(8, 2, 256)

extern "C" __global__ void __launch_bounds__(GM_THREADS) attention_gqa_merge_f32(const float* ml, const float4* acc, float* out,
                                                                                u32 heads, u32 head_dim, u32 splits) { pdl_prologue();
    __shared__ float s_w[GM_MAXZ];
    __shared__ float red[32];
    __shared__ float4 s_part[GM_THREADS];
    const u32 h = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    const u64 base = ((u64)t * heads + h) * splits;
    float mx = NEG_INF;
    for (u32 s = tid; s < splits; s += GM_THREADS)
        if (ml[2 * (base + s) + 1] > 0.f) mx = fmaxf(mx, ml[2 * (base + s)]);
    const float M = block_max(mx, red);
    float ls = 0.f;
    for (u32 s = tid; s < splits; s += GM_THREADS) {
        const float l = ml[2 * (base + s) + 1];
        const float w = l > 0.f ? expf(ml[2 * (base + s)] - M) : 0.f;
        s_w[s] = w;
        ls += l * w;
    }
    const float L = block_sum(ls, red);  // synchronises: s_w is visible below
    const u32 d4n = head_dim / 4, groups = GM_THREADS / d4n, g = tid / d4n, d4 = tid % d4n;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    if (g < groups)
        for (u32 s = g; s < splits; s += groups) {
            const float w = s_w[s];
            if (w > 0.f) {
                const float4 b = acc[(base + s) * d4n + d4];
                a.x += b.x * w, a.y += b.y * w, a.z += b.z * w, a.w += b.w * w;
            }
        }
    s_part[tid] = a;
    __syncthreads();
    if (tid < d4n) {
        float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
        for (u32 gg = 0; gg < groups; gg++) {
            const float4 b = s_part[gg * d4n + tid];
            r.x += b.x, r.y += b.y, r.z += b.z, r.w += b.w;
        }
        const float inv = L > 0.f ? 1.f / L : 0.f;
        ((float4*)(out + ((u64)t * heads + h) * head_dim))[tid] = make_float4(r.x * inv, r.y * inv, r.z * inv, r.w * inv);
    }
}

// attention_tiled_f32 (prefill, head_dim <= AT_D and a multiple of 4): grid (ceil(n / AT_Q),
//   heads), block 256. A block takes AT_Q queries of one head and walks the keys in tiles of
//   AT_K rows staged in shared memory, so each K/V row is read once per AT_Q queries (not once
//   per query). Thread (row r = tid / 8, g = tid % 8) scores keys g, g + 8, .. of the tile
//   against query r and holds output dims 4g + 32i + c of it (16-byte shared-memory reads; row
//   stride AT_D + 4 keeps the 8 rows a warp reads in distinct banks); the 8 threads of a row
//   keep its online softmax (shuffles within the group). Keys past a query's position (or
//   max_ctx) are masked. q is scaled when staged (scale * q . k, as the other kernels).
//   Dynamic shared memory: (AT_Q + AT_K) * AT_DP + AT_K * AT_D + AT_Q * AT_K floats.
#define AT_Q 32
#define AT_K 32
#define AT_D 128
#define AT_DP (AT_D + 4)

extern "C" __global__ void __launch_bounds__(256) attention_tiled_f32(const float* q, const u32* pos, const float* kc,
                                                                     const float* vc, float* out, u32 n, u32 heads,
                                                                     u32 kv_heads, u32 head_dim, float scale, u32 max_ctx) { pdl_prologue();
    float* qs = (float*)smem4;          // [AT_Q][AT_DP]
    float* ks = qs + AT_Q * AT_DP;      // [AT_K][AT_DP]
    float* vs = ks + AT_K * AT_DP;      // [AT_K][AT_D]
    float* ps = vs + AT_K * AT_D;       // [AT_Q][AT_K]
    __shared__ u32 s_len;
    const u32 h = blockIdx.y, t0 = blockIdx.x * AT_Q;
    const u32 tid = threadIdx.x, r = tid >> 3, g = tid & 7;
    const u32 kvh = h / (heads / kv_heads);
    const u32 kv_dim = kv_heads * head_dim;
    const u32 t = t0 + r;
    // The query's attended length (0 for rows past n), and the tile's longest.
    const u32 len = t < n ? min(pos[t] + 1, max_ctx) : 0;
    if (tid == 0) s_len = 0;
    for (u32 i = tid; i < AT_Q * AT_D; i += blockDim.x) {
        const u32 qr = i / AT_D, d = i % AT_D;
        const u32 tq = t0 + qr;
        qs[qr * AT_DP + d] = (tq < n && d < head_dim) ? q[((u64)tq * heads + h) * head_dim + d] * scale : 0.f;
    }
    __syncthreads();
    if (g == 0) atomicMax(&s_len, len);
    __syncthreads();
    const u32 kmax = s_len;
    float4 o[AT_D / 32];
#pragma unroll
    for (int i = 0; i < AT_D / 32; i++) o[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    float m = NEG_INF, l = 0.f;
    const float4* qrow = (const float4*)(qs + r * AT_DP);
    for (u32 k0 = 0; k0 < kmax; k0 += AT_K) {
        for (u32 i = tid; i < AT_K * AT_D; i += blockDim.x) {
            const u32 kr = i / AT_D, d = i % AT_D;
            const u32 j = k0 + kr;
            const bool in = j < kmax && d < head_dim;
            const u64 off = (u64)j * kv_dim + (u64)kvh * head_dim + d;
            ks[kr * AT_DP + d] = in ? kc[off] : 0.f;
            vs[kr * AT_D + d] = in ? vc[off] : 0.f;
        }
        __syncthreads();
        float sc[AT_K / 8];
#pragma unroll
        for (int c = 0; c < AT_K / 8; c++) sc[c] = 0.f;
        for (u32 d4 = 0; d4 < head_dim / 4; d4++) {
            const float4 qv = qrow[d4];
#pragma unroll
            for (int c = 0; c < AT_K / 8; c++) {
                const float4 kv = ((const float4*)(ks + (g + 8 * c) * AT_DP))[d4];
                sc[c] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
        }
        float tmax = NEG_INF;
#pragma unroll
        for (int c = 0; c < AT_K / 8; c++) {
            const u32 j = k0 + g + 8 * c;
            if (j >= len) sc[c] = NEG_INF;
            tmax = fmaxf(tmax, sc[c]);
        }
#pragma unroll
        for (int x = 1; x < 8; x <<= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, x));
        const float mn = fmaxf(m, tmax);
        // A row with no key yet (mn = -inf) keeps everything at zero.
        const float corr = mn == NEG_INF ? 1.f : expf(m - mn);
        float psum = 0.f;
#pragma unroll
        for (int c = 0; c < AT_K / 8; c++) {
            const float p = sc[c] == NEG_INF ? 0.f : expf(sc[c] - mn);
            ps[r * AT_K + g + 8 * c] = p;
            psum += p;
        }
#pragma unroll
        for (int x = 1; x < 8; x <<= 1) psum += __shfl_xor_sync(0xffffffffu, psum, x);
        l = l * corr + psum;
        m = mn;
        __syncwarp();
#pragma unroll
        for (int i = 0; i < AT_D / 32; i++) {
            o[i].x *= corr;
            o[i].y *= corr;
            o[i].z *= corr;
            o[i].w *= corr;
        }
        for (u32 kr = 0; kr < AT_K; kr++) {
            const float p = ps[r * AT_K + kr];
            const float4* vrow = (const float4*)(vs + kr * AT_D) + g;
#pragma unroll
            for (int i = 0; i < AT_D / 32; i++) {
                const float4 v = vrow[8 * i];
                o[i].x += p * v.x;
                o[i].y += p * v.y;
                o[i].z += p * v.z;
                o[i].w += p * v.w;
            }
        }
        __syncthreads();
    }
    if (t < n) {
        float* orow = out + ((u64)t * heads + h) * head_dim;
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int i = 0; i < AT_D / 32; i++) {
            const u32 d = 4 * g + 32 * i;
            if (d < head_dim) {  // head_dim % 4 == 0: all four or none
                orow[d] = o[i].x * inv;
                orow[d + 1] = o[i].y * inv;
                orow[d + 2] = o[i].z * inv;
                orow[d + 3] = o[i].w * inv;
            }
        }
    }
}
