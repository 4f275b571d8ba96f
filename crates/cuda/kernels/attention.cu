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
//  * attention_split_f32 + attention_merge_f32 (few queries: decode): flash-decoding. Grid
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
