// attention_tc.cu: causal GQA attention over the KV cache for wide batches (prefill) on the
// tensor cores (mma.sync m16n8k8 tf32, f32 accumulate). Needs sm_80 or newer; the host picks
// it only there, for head_dim 64, 128 or 256, and keeps it in its own program. (At 256 a lane
// holds 128 output accumulators: ~255 registers and one 197 KB block per SM; at 128, two
// 101 KB blocks of ~254 registers, the prefetched tile included.)
//
// Same computation and layouts as attention_tiled_f32 in attention.cu: caches f32 [max_ctx,
// kv_heads * head_dim], q / out f32 [n, heads * head_dim], query t attends keys 0..=pos[t]
// (clamped to max_ctx), q scaled by `scale` before the dot, online softmax over key tiles.
//
// Exactness. Every operand is split into tf32 parts a = hi + lo (hi = a rounded to tf32, lo =
// the f32 remainder, which the mma reads as tf32), and each product is hi*hi + hi*lo + lo*hi:
// the dropped lo*lo and the truncation of lo leave ~2^-21 relative, far below the 1e-5 of
// the parity test and near what the f32 SIMT kernels round to. So a score or output costs
// three mma per 8-deep step. K and V are split once per tile when staged (not once per warp
// and use), and a q or P fragment once per k-step for all the mma tiles that read it, so the
// inner loops are one 16-byte shared-memory read and three mma. At head_dim <= 128 the next
// tile's K and V loads are issued before a tile's mma work, so their latency hides behind it.
//
// attention_tc_f32_dD: grid (ceil(n / TA_Q), heads), block TA_WARPS * 32, the query tiles
//   with the most keys under the causal mask scheduled first. Warp w owns queries
//   t0 + 16w .. + 15 (mma rows g and g + 8, g = lane / 4, c = lane % 4). Per key tile of
//   TA_K keys: K and V staged in shared memory, S = Q K^T (16 x TA_K per warp: TA_K / 8 mma
//   tiles of C, c's columns 2c, 2c + 1), masked past each query's position, online softmax
//   (row max and sum over the 4 lanes of a row), P written to the warp's shared-memory tile
//   (over K, after a barrier) and read back as A fragments, O += P V (D / 8 mma tiles).
// Shared-memory layouts are chosen so that each lane reads a whole fragment pair with one
// load: q and P rows hold each group of 8 columns in the order 0 4 1 5 2 6 3 7 (columns c and
// c + 4 side by side, one 8-byte read); K row r holds for dims 8kk + e and + 4 the quad (hi,
// hi', lo, lo') at 16 kk + 4 e; V is stored by key pairs (j, j + 4) of each group of 8 keys,
// dim d as the quad (hi_j, hi_j+4, lo_j, lo_j+4) (16-byte reads). Row strides (q: D + 8, K:
// 2D + 16, V: 4D + 8 words) put the lanes of each load phase in distinct banks. Dynamic
// shared memory: TA_Q * (D + 8) + TA_K * (2D + 16) + TA_K / 2 * (4D + 8) words.
#include "common.cuh"

#define TA_WARPS 4
#define TA_Q (16 * TA_WARPS)
#define TA_K 32
#define TA_PP (TA_K + 8)

// Position of column k within its group of 8 in the paired order 0 4 1 5 2 6 3 7.
__device__ __forceinline__ u32 pair_pos(u32 k) { return 2 * (k & 3) + ((k >> 2) & 1); }

// Stores 8 consecutive columns (a: 0..3, b: 4..7) at dst in the paired order.
__device__ __forceinline__ void store_paired(float* dst, float4 a, float4 b) {
    *(float4*)dst = make_float4(a.x, b.x, a.y, b.y);
    *(float4*)(dst + 4) = make_float4(a.z, b.z, a.w, b.w);
}

__device__ __forceinline__ u32 tf32_rn(float f) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}

// a = hi + lo, both as tf32 operand bits.
__device__ __forceinline__ void tf32_split(float a, u32& hi, u32& lo) {
    hi = tf32_rn(a);
    lo = tf32_rn(a - __uint_as_float(hi));
}

__device__ __forceinline__ void mma_tf32(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a b for an A fragment split into (ah, al) and a B fragment pre-split into (bh, bl): the
// three products of the split, smallest first.
__device__ __forceinline__ void mma3s(float* c, const u32* ah, const u32* al, u32 bh0, u32 bh1, u32 bl0, u32 bl1) {
    mma_tf32(c, al, bh0, bh1);
    mma_tf32(c, ah, bl0, bl1);
    mma_tf32(c, ah, bh0, bh1);
}

// Stores the tf32 split of a (4 values) and b (4 values) as four quads (hi(a_e), hi(b_e),
// lo(a_e), lo(b_e)), e = 0..3, `stride` words apart from dst.
__device__ __forceinline__ void store_split(u32* dst, u32 stride, float4 a, float4 b) {
    const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        uint4 w;
        tf32_split(av[e], w.x, w.z);
        tf32_split(bv[e], w.y, w.w);
        *(uint4*)(dst + e * stride) = w;
    }
}

__device__ __forceinline__ void split4(const float* a, u32* ah, u32* al) {
#pragma unroll
    for (int i = 0; i < 4; i++) tf32_split(a[i], ah[i], al[i]);
}

// Shared-memory row strides in words: q (paired f32), split K, split V by key pairs.
template <int D>
struct TcStrides {
    static constexpr u32 QP = D + 8, KS = 2 * D + 16, VS = 4 * D + 8;
};

// K split once per tile: row kr, dims 8 kk + e and + 4 (e < 4) as the u32 quad (hi, hi + 4,
// lo, lo + 4) at kr * (2D + 16) + 16 kk + 4 e, one 16-byte read per B fragment. V split by key
// pairs: keys j and j + 4 of each group of 8 (pair p = 4 (j / 8) + j % 8), dim d as the quad
// (hi_j, hi_j+4, lo_j, lo_j+4) at p * (4D + 8) + 4 d. Both tiles have TA_K * D / 8 items of two
// float4; load_kv reads items it0 .. it0 + U of this thread (16-byte loads, all issued before
// any is used; rows past kmax read as 0), store_kv splits and stores them.
template <int D, int U>
__device__ __forceinline__ void load_kv(const float* kc, const float* vc, u64 kv_dim, u32 kvh, u32 k0, u32 kmax, int it0,
                                        float4* ka, float4* kb, float4* va, float4* vb) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const u32 i = threadIdx.x + (it0 + u) * TA_WARPS * 32;
        const u32 kr = i / (D / 8), kk = i % (D / 8), j = k0 + kr;
        ka[u] = kb[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (j < kmax) {
            const float* src = kc + (u64)j * kv_dim + (u64)kvh * D + 8 * kk;
            ka[u] = *(const float4*)src;
            kb[u] = *(const float4*)(src + 4);
        }
        const u32 p = i / (D / 4), d = 4 * (i % (D / 4));
        const u32 jv = k0 + 8 * (p >> 2) + (p & 3);
        const float* src = vc + (u64)jv * kv_dim + (u64)kvh * D + d;
        va[u] = vb[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (jv < kmax) va[u] = *(const float4*)src;
        if (jv + 4 < kmax) vb[u] = *(const float4*)(src + 4 * kv_dim);
    }
}

template <int D, int U>
__device__ __forceinline__ void store_kv(u32* ks, u32* vs, int it0, const float4* ka, const float4* kb, const float4* va,
                                         const float4* vb) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const u32 i = threadIdx.x + (it0 + u) * TA_WARPS * 32;
        const u32 kr = i / (D / 8), kk = i % (D / 8);
        store_split(ks + kr * TcStrides<D>::KS + 16 * kk, 4, ka[u], kb[u]);
        const u32 p = i / (D / 4), d = 4 * (i % (D / 4));
        store_split(vs + p * TcStrides<D>::VS + 4 * d, 4, va[u], vb[u]);
    }
}

template <int D>
__device__ __forceinline__ void attention_tc_body(const float* q, const u32* pos, const float* kc, const float* vc, float* out,
                                                  u32 n, u32 heads, u32 kv_heads, float scale, u32 max_ctx) {
    constexpr u32 QP = TcStrides<D>::QP, KS = TcStrides<D>::KS, VS = TcStrides<D>::VS;
    // K and V staging: D / 32 items of two float4 per thread and tile (both tiles have
    // TA_K * D / 8 of them), loaded STAGE_U at a time (2 at D 256, where o fills the registers).
    constexpr int STAGE_IT = TA_K * D / 8 / (TA_WARPS * 32), STAGE_U = D > 128 ? 2 : STAGE_IT < 4 ? STAGE_IT : 4;
    float* qs = (float*)smem4;         // [TA_Q][QP], paired columns
    u32* ks = (u32*)(qs + TA_Q * QP);  // [TA_K][KS]: split K, see below
    u32* vs = ks + TA_K * KS;          // [TA_K / 2][VS]: split V by key pairs
    float* ps = (float*)ks;            // [TA_Q][TA_PP], paired columns, 16 rows per warp: over K,
                                       // which S no longer reads when P is written
    __shared__ u32 s_len;
    // Heaviest query tiles (the most keys under the causal mask) first.
    const u32 h = blockIdx.y, t0 = (gridDim.x - 1 - blockIdx.x) * TA_Q;
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const u32 kvh = h / (heads / kv_heads);
    const u64 kv_dim = (u64)kv_heads * D;
    if (tid == 0) s_len = 0;
    // This lane's two query rows and their attended lengths (0 past n).
    const u32 ra = 16 * warp + g, rb = ra + 8;
    const u32 la = t0 + ra < n ? min(pos[t0 + ra] + 1, max_ctx) : 0;
    const u32 lb = t0 + rb < n ? min(pos[t0 + rb] + 1, max_ctx) : 0;
    for (u32 i = tid; i < TA_Q * D / 8; i += blockDim.x) {
        const u32 qr = i / (D / 8), d = 8 * (i % (D / 8));
        const u32 tq = t0 + qr;
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
        if (tq < n) {
            const float* src = q + ((u64)tq * heads + h) * D + d;
            a = *(const float4*)src;
            b = *(const float4*)(src + 4);
            a.x *= scale, a.y *= scale, a.z *= scale, a.w *= scale;
            b.x *= scale, b.y *= scale, b.z *= scale, b.w *= scale;
        }
        store_paired(qs + qr * QP + d, a, b);
    }
    __syncthreads();
    if (c == 0) atomicMax(&s_len, max(la, lb));
    __syncthreads();
    const u32 kmax = s_len;

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float ma = NEG_INF, mb = NEG_INF, sa = 0.f, sb = 0.f;  // running max and (lane-partial) sum
    const float* qa = qs + ra * QP;
    const float* qb = qs + rb * QP;
    float* pw = ps + 16 * warp * TA_PP;
    // K and V tiles: with PREFETCH (D <= 128, where the registers allow) the next tile's loads
    // are issued before this tile's mma work and stored after it; at D 256 each tile is loaded
    // and stored in chunks of STAGE_U items before its work.
    constexpr bool PREFETCH = D <= 128;
    constexpr int PF = PREFETCH ? STAGE_IT : 1;
    float4 ka[PF], kb[PF], va[PF], vb[PF];
    if (PREFETCH) load_kv<D, PF>(kc, vc, kv_dim, kvh, 0, kmax, 0, ka, kb, va, vb);
    for (u32 k0 = 0; k0 < kmax; k0 += TA_K) {
        if (PREFETCH) {
            store_kv<D, PF>(ks, vs, 0, ka, kb, va, vb);
        } else {
#pragma unroll
            for (int it0 = 0; it0 < STAGE_IT; it0 += STAGE_U) {
                float4 a[STAGE_U], b[STAGE_U], c2[STAGE_U], d2[STAGE_U];
                load_kv<D, STAGE_U>(kc, vc, kv_dim, kvh, k0, kmax, it0, a, b, c2, d2);
                store_kv<D, STAGE_U>(ks, vs, it0, a, b, c2, d2);
            }
        }
        __syncthreads();
        if (PREFETCH && k0 + TA_K < kmax) load_kv<D, PF>(kc, vc, kv_dim, kvh, k0 + TA_K, kmax, 0, ka, kb, va, vb);
        // S = Q K^T: tile nt holds keys 8 nt + 2c, + 1 of rows ra (s[nt][0..1]) and rb ([2..3]).
        float s[TA_K / 8][4];
#pragma unroll
        for (int nt = 0; nt < TA_K / 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll 4
        for (u32 kk = 0; kk < D / 8; kk++) {
            const u32 d = 8 * kk + 2 * c;  // dims 8 kk + c and + 4, paired
            const float2 x = *(const float2*)(qa + d), y = *(const float2*)(qb + d);
            const float a[4] = {x.x, y.x, x.y, y.y};
            u32 ah[4], al[4];
            split4(a, ah, al);
#pragma unroll
            for (int nt = 0; nt < TA_K / 8; nt++) {
                const uint4 k4 = *(const uint4*)(ks + (8 * nt + g) * KS + 16 * kk + 4 * c);
                mma3s(s[nt], ah, al, k4.x, k4.y, k4.z, k4.w);
            }
        }
        // Mask, then the online softmax of rows ra and rb over this tile.
        float ta = NEG_INF, tb = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < TA_K / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const u32 j = k0 + 8 * nt + 2 * c + e;
                if (j >= la) s[nt][e] = NEG_INF;
                if (j >= lb) s[nt][2 + e] = NEG_INF;
                ta = fmaxf(ta, s[nt][e]);
                tb = fmaxf(tb, s[nt][2 + e]);
            }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
            ta = fmaxf(ta, __shfl_xor_sync(0xffffffffu, ta, x));
            tb = fmaxf(tb, __shfl_xor_sync(0xffffffffu, tb, x));
        }
        const float na = fmaxf(ma, ta), nb = fmaxf(mb, tb);
        // A row with no key yet (max -inf) keeps everything at zero.
        const float ca = na == NEG_INF ? 1.f : expf(ma - na), cb = nb == NEG_INF ? 1.f : expf(mb - nb);
        sa *= ca;
        sb *= cb;
#pragma unroll
        for (int nt = 0; nt < TA_K / 8; nt++) {  // s becomes P
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[nt][e] = s[nt][e] == NEG_INF ? 0.f : expf(s[nt][e] - na);
                s[nt][2 + e] = s[nt][2 + e] == NEG_INF ? 0.f : expf(s[nt][2 + e] - nb);
            }
            sa += s[nt][0] + s[nt][1];
            sb += s[nt][2] + s[nt][3];
        }
        ma = na;
        mb = nb;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            o[i][0] *= ca, o[i][1] *= ca;
            o[i][2] *= cb, o[i][3] *= cb;
        }
        __syncthreads();  // every warp is past S: P may overwrite K
#pragma unroll
        for (int nt = 0; nt < TA_K / 8; nt++) {
            const u32 c0 = 8 * nt + pair_pos(2 * c), c1 = 8 * nt + pair_pos(2 * c + 1);
            pw[g * TA_PP + c0] = s[nt][0];
            pw[g * TA_PP + c1] = s[nt][1];
            pw[(g + 8) * TA_PP + c0] = s[nt][2];
            pw[(g + 8) * TA_PP + c1] = s[nt][3];
        }
        __syncwarp();

        // O += P V: k-steps of 8 keys, output tiles of 8 dims (dims 8i + 2c, + 1).
#pragma unroll
        for (int kk = 0; kk < TA_K / 8; kk++) {
            const u32 j = 8 * kk + 2 * c;  // keys 8 kk + c and + 4, paired
            const float2 x = *(const float2*)(pw + g * TA_PP + j), y = *(const float2*)(pw + (g + 8) * TA_PP + j);
            const float a[4] = {x.x, y.x, x.y, y.y};
            u32 ah[4], al[4];
            split4(a, ah, al);
            const u32* vp = vs + (4 * kk + c) * VS + 4 * g;
#pragma unroll
            for (int i = 0; i < D / 8; i++) {
                const uint4 v4 = *(const uint4*)(vp + 32 * i);  // dim 8 i + g of keys j, j + 4
                mma3s(o[i], ah, al, v4.x, v4.y, v4.z, v4.w);
            }
        }
        __syncthreads();
    }
    sa += __shfl_xor_sync(0xffffffffu, sa, 1);
    sa += __shfl_xor_sync(0xffffffffu, sa, 2);
    sb += __shfl_xor_sync(0xffffffffu, sb, 1);
    sb += __shfl_xor_sync(0xffffffffu, sb, 2);
    const float ia = sa > 0.f ? 1.f / sa : 0.f, ib = sb > 0.f ? 1.f / sb : 0.f;
    if (t0 + ra < n) {
        float* orow = out + ((u64)(t0 + ra) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; i++) *(float2*)(orow + 8 * i + 2 * c) = make_float2(o[i][0] * ia, o[i][1] * ia);
    }
    if (t0 + rb < n) {
        float* orow = out + ((u64)(t0 + rb) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; i++) *(float2*)(orow + 8 * i + 2 * c) = make_float2(o[i][2] * ib, o[i][3] * ib);
    }
}

#define ATTENTION_TC(D)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(TA_WARPS * 32) attention_tc_f32_d##D(                                    \
        const float* q, const u32* pos, const float* kc, const float* vc, float* out, u32 n, u32 heads, u32 kv_heads,      \
        float scale, u32 max_ctx) { pdl_prologue();                                                                        \
        attention_tc_body<D>(q, pos, kc, vc, out, n, heads, kv_heads, scale, max_ctx);                                     \
    }

ATTENTION_TC(64)
ATTENTION_TC(128)
ATTENTION_TC(256)
