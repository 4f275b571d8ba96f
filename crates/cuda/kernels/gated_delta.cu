// gated_delta.cu: the gated delta rule, the core of Gated DeltaNet (Op::GatedDelta).
//
// Per value head h (key head kh = h / (v_heads / k_heads)), state S = state[h] f32 [dk, dv]:
//   q, k l2-normalised (q then scaled by dk^-0.5); beta = sigmoid(b[t, h]);
//   g = -exp(A_log[h]) * softplus(a[t, h] + dt_bias[h]);
//   S <- S * exp(g);  u = (v - S^T k) * beta;  S <- S + k u^T;  o = S^T q
// token by token (exact recurrence: prefill and decode give the same numbers).
// qkv rows: [q (k_heads*dk) | k (k_heads*dk) | v (v_heads*dv)]; a, b rows [v_heads]; A_log and
// dt_bias stored vectors [v_heads] of dtype vdt; out f32 [n, v_heads * dv].
//
// Launch: grid (v_heads, ceil(dv / 32)), block 256 = 8 warps. Lane = value column j within
// the block's 32 columns; warp w owns key rows i in [w * sl, (w + 1) * sl), sl = ceil(dk / 8)
// <= GD_MAXS (dk <= 256, checked on the host). The state slice of a thread lives in registers
// for the whole batch and is written back once. Columns are independent, so the dv split
// across blocks needs no communication (each block redoes the cheap q/k normalisation).
//
// Prefill takes the chunked (WY) form instead: gated_delta_prep_f32, then gated_delta_chunks_f32
// (see below). It computes the same function with the sums in another order.
#include "common.cuh"

#define GD_MAXS 32
#define GD_WARPS 8

__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(expf(x)); }

extern "C" __global__ void __launch_bounds__(256) gated_delta_f32(const float* qkv, const float* a, const float* b, const void* a_log,
                                                                 const void* dt_bias, int vdt, float* state, float* out, u32 n,
                                                                 u32 k_heads, u32 v_heads, u32 dk, u32 dv) { pdl_prologue();
    __shared__ float qs[256], ks[256];
    __shared__ float red[32];
    __shared__ float part[GD_WARPS][32];
    const u32 h = blockIdx.x;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 j = blockIdx.y * 32 + lane;
    const bool col_ok = j < dv;
    const u32 sl = (dk + GD_WARPS - 1) / GD_WARPS;
    const u32 i0 = warp * sl;
    const u32 kh = h / (v_heads / k_heads);
    const u32 key_dim = k_heads * dk;
    const u64 row = 2 * (u64)key_dim + (u64)v_heads * dv;
    const float scale = 1.0f / sqrtf((float)dk);
    float* S = state + (u64)h * dk * dv;

    float s[GD_MAXS];
#pragma unroll
    for (u32 r = 0; r < GD_MAXS; r++) {
        u32 i = i0 + r;
        s[r] = (r < sl && i < dk && col_ok) ? S[(u64)i * dv + j] : 0.f;
    }
    const float neg_a = -expf(load_float(a_log, vdt, h));
    const float dtb = load_float(dt_bias, vdt, h);

    for (u32 t = 0; t < n; t++) {
        const float* r_ = qkv + (u64)t * row;
        float qv = 0.f, kv = 0.f;
        if (threadIdx.x < dk) {
            qv = r_[(u64)kh * dk + threadIdx.x];
            kv = r_[key_dim + (u64)kh * dk + threadIdx.x];
        }
        float qss = block_sum(qv * qv, red);
        float kss = block_sum(kv * kv, red);
        if (threadIdx.x < dk) {
            qs[threadIdx.x] = qv * (1.0f / sqrtf(qss + 1e-6f)) * scale;
            ks[threadIdx.x] = kv * (1.0f / sqrtf(kss + 1e-6f));
        }
        __syncthreads();
        const float beta = sigmoid_f(b[(u64)t * v_heads + h]);
        const float decay = expf(neg_a * softplus_f(a[(u64)t * v_heads + h] + dtb));

        // u_j = (v_j - sum_i k_i S_ij) * beta, with S already decayed
        float pu = 0.f;
#pragma unroll
        for (u32 r = 0; r < GD_MAXS; r++) {
            u32 i = i0 + r;
            if (r < sl && i < dk) {
                s[r] *= decay;
                pu += ks[i] * s[r];
            }
        }
        part[warp][lane] = pu;
        __syncthreads();
        float u = 0.f;
        for (u32 w = 0; w < GD_WARPS; w++) u += part[w][lane];
        const float vj = col_ok ? r_[2 * (u64)key_dim + (u64)h * dv + j] : 0.f;
        u = (vj - u) * beta;
        __syncthreads();  // part[] is reused below

        // S += k u^T; o_j = sum_i q_i S_ij
        float po = 0.f;
#pragma unroll
        for (u32 r = 0; r < GD_MAXS; r++) {
            u32 i = i0 + r;
            if (r < sl && i < dk) {
                s[r] += ks[i] * u;
                po += qs[i] * s[r];
            }
        }
        part[warp][lane] = po;
        __syncthreads();
        if (warp == 0 && col_ok) {
            float o = 0.f;
            for (u32 w = 0; w < GD_WARPS; w++) o += part[w][lane];
            out[((u64)t * v_heads + h) * dv + j] = o;
        }
        __syncthreads();  // qs / ks / part are rewritten by the next token
    }
#pragma unroll
    for (u32 r = 0; r < GD_MAXS; r++) {
        u32 i = i0 + r;
        if (r < sl && i < dk && col_ok) S[(u64)i * dv + j] = s[r];
    }
}

// ---------------------------------------------------------------------------------------------
// Chunked (WY) form for prefill. Within a chunk of GDC tokens, with G_i the cumulative log decay
// (G_i = sum_{m <= i} g_m, chunk-local) and S0 the state at the chunk's start:
//   u_i = beta_i (v_i - e^{G_i} S0^T k_i - sum_{j<i} e^{G_i - G_j} (k_i.k_j) u_j)
// so (I + A) U = diag(beta) V - diag(beta e^G) K S0 with A_ij = beta_i e^{G_i-G_j} k_i.k_j (j < i),
// and U = Vt - Kt S0 with Vt = (I + A)^-1 diag(beta) V, Kt = (I + A)^-1 diag(beta e^G) K, which
// do not depend on the state. Then
//   o_i = e^{G_i} S0^T q_i + sum_{j<=i} P_ij u_j,   P_ij = e^{G_i - G_j} q_i.k_j
//   S   = e^{G_last} S0 + sum_j e^{G_last - G_j} k_j u_j^T.
// Every exponent is <= 0 (g <= 0), so nothing overflows.
//
// gated_delta_prep_f32, grid (v_heads, chunks), block 256: everything that does not depend on
// the state, for all chunks at once. Writes the normalised q and k (from the first value head
// of each key head), G, P, Kt, and Vt (into `out`, which the second kernel overwrites with o).
// gated_delta_chunks_f32, grid (v_heads, ceil(dv / 32)), block 256: walks the chunks in order
// with the block's 32 state columns in shared memory.
// Both need dk <= GDC_MAXDK and dk % 4 == 0 (checked on the host).
#define GDC 64
#define GDC_MAXDK 128

// Dynamic shared memory (floats): Q [GDC][dk+1] | K [GDC][dk+1] | A [GDC][GDC] | G [GDC] | B [GDC].
extern "C" __global__ void __launch_bounds__(256, 1) gated_delta_prep_f32(const float* qkv, const float* a, const float* b,
                                                                        const void* a_log, const void* dt_bias, int vdt,
                                                                        float* qn, float* kn, float* kt, float* gcum,
                                                                        float* pm, float* vt, u32 n, u32 k_heads,
                                                                        u32 v_heads, u32 dk, u32 dv) { pdl_prologue();
    float* sm = (float*)smem4;
    const u32 ld = dk + 1;
    float* Qs = sm;
    float* Ks = Qs + GDC * ld;
    float* As = Ks + GDC * ld;  // 2 * GDC * ld floats in: a multiple of 4, so float4-aligned
    float* Gs = As + GDC * GDC;
    float* Bs = Gs + GDC;
    const u32 h = blockIdx.x, c = blockIdx.y;
    const u32 t0 = c * GDC;
    const u32 L = min((u32)GDC, n - t0);
    const u32 ratio = v_heads / k_heads;
    const u32 kh = h / ratio;
    const u32 key_dim = k_heads * dk;
    const u64 row = 2 * (u64)key_dim + (u64)v_heads * dv;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float scale = 1.0f / sqrtf((float)dk);
    const bool write_qk = (h % ratio) == 0;

    // 1. l2-normalised q (times dk^-0.5) and k rows; rows past L are zero.
    for (u32 i = warp; i < GDC; i += 8) {
        const float* r = qkv + (u64)(t0 + i) * row;
        float qss = 0.f, kss = 0.f;
        for (u32 d = lane; d < dk; d += 32) {
            float qv = 0.f, kv = 0.f;
            if (i < L) {
                qv = r[(u64)kh * dk + d];
                kv = r[key_dim + (u64)kh * dk + d];
            }
            Qs[i * ld + d] = qv;
            Ks[i * ld + d] = kv;
            qss += qv * qv;
            kss += kv * kv;
        }
        const float qr = 1.0f / sqrtf(warp_sum(qss) + 1e-6f), kr = 1.0f / sqrtf(warp_sum(kss) + 1e-6f);
        for (u32 d = lane; d < dk; d += 32) {
            const float qv = Qs[i * ld + d] * qr * scale, kv = Ks[i * ld + d] * kr;
            Qs[i * ld + d] = qv;
            Ks[i * ld + d] = kv;
            if (write_qk && i < L) {
                qn[((u64)(t0 + i) * k_heads + kh) * dk + d] = qv;
                kn[((u64)(t0 + i) * k_heads + kh) * dk + d] = kv;
            }
        }
    }
    // 2. G (inclusive scan of the log decays) and beta; zero past L (so G stays at G_{L-1}).
    if (warp == 0) {
        const float neg_a = -expf(load_float(a_log, vdt, h));
        const float dtb = load_float(dt_bias, vdt, h);
        float g0 = 0.f, g1 = 0.f, b0 = 0.f, b1 = 0.f;
        if (lane < L) {
            g0 = neg_a * softplus_f(a[(u64)(t0 + lane) * v_heads + h] + dtb);
            b0 = sigmoid_f(b[(u64)(t0 + lane) * v_heads + h]);
        }
        if (lane + 32 < L) {
            g1 = neg_a * softplus_f(a[(u64)(t0 + lane + 32) * v_heads + h] + dtb);
            b1 = sigmoid_f(b[(u64)(t0 + lane + 32) * v_heads + h]);
        }
#pragma unroll
        for (u32 o = 1; o < 32; o <<= 1) {
            const float y0 = __shfl_up_sync(0xffffffffu, g0, o), y1 = __shfl_up_sync(0xffffffffu, g1, o);
            if (lane >= o) {
                g0 += y0;
                g1 += y1;
            }
        }
        g1 += __shfl_sync(0xffffffffu, g0, 31);
        Gs[lane] = g0;
        Gs[lane + 32] = g1;
        Bs[lane] = b0;
        Bs[lane + 32] = b1;
        if (lane < L) gcum[(u64)(t0 + lane) * v_heads + h] = g0;
        if (lane + 32 < L) gcum[(u64)(t0 + lane + 32) * v_heads + h] = g1;
    }
    __syncthreads();

    // 3. A (strictly lower) into shared memory, P (lower with the diagonal) to global; a 4x4
    // register tile per thread, rows ti + 16 r, columns tj + 16 s.
    {
        const u32 ti = threadIdx.x >> 4, tj = threadIdx.x & 15;
        float ak[4][4], aq[4][4];
#pragma unroll
        for (u32 r = 0; r < 4; r++)
#pragma unroll
            for (u32 s = 0; s < 4; s++) ak[r][s] = aq[r][s] = 0.f;
        for (u32 d = 0; d < dk; d++) {
            float ki[4], qi[4], kj[4];
#pragma unroll
            for (u32 r = 0; r < 4; r++) {
                ki[r] = Ks[(ti + 16 * r) * ld + d];
                qi[r] = Qs[(ti + 16 * r) * ld + d];
                kj[r] = Ks[(tj + 16 * r) * ld + d];
            }
#pragma unroll
            for (u32 r = 0; r < 4; r++)
#pragma unroll
                for (u32 s = 0; s < 4; s++) {
                    ak[r][s] += ki[r] * kj[s];
                    aq[r][s] += qi[r] * kj[s];
                }
        }
        float* P = pm + ((u64)h * gridDim.y + c) * (GDC * GDC);
#pragma unroll
        for (u32 r = 0; r < 4; r++)
#pragma unroll
            for (u32 s = 0; s < 4; s++) {
                const u32 i = ti + 16 * r, j = tj + 16 * s;
                const float e = j <= i ? expf(Gs[i] - Gs[j]) : 0.f;
                As[i * GDC + j] = j < i ? Bs[i] * e * ak[r][s] : 0.f;
                P[i * GDC + j] = e * aq[r][s];
            }
    }
    __syncthreads();

    // 4. Kt and Vt by forward substitution, x_i = r_i - sum_{j<i} A_ij x_j, one column per thread,
    // the column in registers (the loops are fully unrolled).
    for (u32 col = threadIdx.x; col < dk + dv; col += 256) {
        const bool isk = col < dk;
        float x[GDC];
#pragma unroll
        for (u32 i = 0; i < GDC; i++) {
            float r = 0.f;
            if (i < L) {
                r = isk ? Bs[i] * expf(Gs[i]) * Ks[i * ld + col]
                        : Bs[i] * qkv[(u64)(t0 + i) * row + 2 * (u64)key_dim + (u64)h * dv + (col - dk)];
            }
            x[i] = r;
        }
#pragma unroll
        for (u32 i = 1; i < GDC; i++) {
            // A_ij = 0 for j >= i, so the last float4 may run past the diagonal.
            const float4* Ar = (const float4*)(As + i * GDC);
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
            for (u32 j4 = 0; j4 < (i + 3) / 4; j4++) {
                const float4 av = Ar[j4];
                s0 += av.x * x[4 * j4];
                s1 += av.y * x[4 * j4 + 1];
                s2 += av.z * x[4 * j4 + 2];
                s3 += av.w * x[4 * j4 + 3];
            }
            x[i] -= (s0 + s1) + (s2 + s3);
        }
#pragma unroll
        for (u32 i = 0; i < GDC; i++) {
            if (i < L) {
                if (isk)
                    kt[((u64)(t0 + i) * v_heads + h) * dk + col] = x[i];
                else
                    vt[((u64)(t0 + i) * v_heads + h) * dv + (col - dk)] = x[i];
            }
        }
    }
}

// Dynamic shared memory (floats): S [dk][32] | Kt [GDC][dk] | Q [GDC][dk] | K [GDC][dk] + GDC_MAXDK
// slack (phase 3 reads 16 floats per warp past short rows) | P [GDC][GDC] | U [GDC][32] | G [GDC].
// Thread (warp w, lane l): state column col0 + l; rows w * 8 .. w * 8 + 7 of U and o; state
// rows w * 16 .. w * 16 + 15 in the update.
extern "C" __global__ void __launch_bounds__(256) gated_delta_chunks_f32(const float* qn, const float* kn, const float* kt,
                                                                        const float* gcum, const float* pm, float* state,
                                                                        float* out, u32 n, u32 k_heads, u32 v_heads,
                                                                        u32 dk, u32 dv) { pdl_prologue();
    float* sm = (float*)smem4;
    float* S = sm;
    float* Kt = S + dk * 32;
    float* Qs = Kt + GDC * dk;
    float* Ks = Qs + GDC * dk;
    float* Ps = Ks + GDC * dk + GDC_MAXDK;
    float* Us = Ps + GDC * GDC;
    float* Gs = Us + GDC * 32;
    const u32 h = blockIdx.x, col0 = blockIdx.y * 32;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 kh = h / (v_heads / k_heads);
    const bool col_ok = col0 + lane < dv;
    const u32 chunks = (n + GDC - 1) / GDC;
    const u32 dk4 = dk / 4;
    float* St = state + (u64)h * dk * dv;

    for (u32 e = threadIdx.x; e < dk * 32; e += 256) {
        const u32 d = e >> 5, cc = e & 31;
        S[e] = col0 + cc < dv ? St[(u64)d * dv + col0 + cc] : 0.f;
    }
    for (u32 c = 0; c < chunks; c++) {
        const u32 t0 = c * GDC;
        const u32 L = min((u32)GDC, n - t0);
        for (u32 e = threadIdx.x; e < L * dk4; e += 256) {
            const u32 i = e / dk4, d4 = e - i * dk4;
            ((float4*)Kt)[e] = ((const float4*)(kt + ((u64)(t0 + i) * v_heads + h) * dk))[d4];
            ((float4*)Qs)[e] = ((const float4*)(qn + ((u64)(t0 + i) * k_heads + kh) * dk))[d4];
            ((float4*)Ks)[e] = ((const float4*)(kn + ((u64)(t0 + i) * k_heads + kh) * dk))[d4];
        }
        const float4* Pg = (const float4*)(pm + ((u64)h * chunks + c) * (GDC * GDC));
        for (u32 e = threadIdx.x; e < GDC * GDC / 4; e += 256) ((float4*)Ps)[e] = Pg[e];
        if (threadIdx.x < GDC) Gs[threadIdx.x] = threadIdx.x < L ? gcum[(u64)(t0 + threadIdx.x) * v_heads + h] : 0.f;
        float vv[8];
#pragma unroll
        for (u32 r = 0; r < 8; r++) {
            const u32 i = warp * 8 + r;
            vv[r] = (i < L && col_ok) ? out[((u64)(t0 + i) * v_heads + h) * dv + col0 + lane] : 0.f;
        }
        __syncthreads();

        // 1. U = Vt - Kt S0 and the state part of o, Q S0 (one pass over S0). Rows past L hold
        // stale values; their results are dropped and their U rows zeroed.
        float au[8], ao[8];
#pragma unroll
        for (u32 r = 0; r < 8; r++) au[r] = ao[r] = 0.f;
        for (u32 d = 0; d < dk; d += 4) {
            const float s0 = S[d * 32 + lane], s1 = S[(d + 1) * 32 + lane], s2 = S[(d + 2) * 32 + lane],
                        s3 = S[(d + 3) * 32 + lane];
#pragma unroll
            for (u32 r = 0; r < 8; r++) {
                const float4 k4 = *(const float4*)(Kt + (warp * 8 + r) * dk + d);
                const float4 q4 = *(const float4*)(Qs + (warp * 8 + r) * dk + d);
                au[r] += k4.x * s0 + k4.y * s1 + k4.z * s2 + k4.w * s3;
                ao[r] += q4.x * s0 + q4.y * s1 + q4.z * s2 + q4.w * s3;
            }
        }
#pragma unroll
        for (u32 r = 0; r < 8; r++) {
            const u32 i = warp * 8 + r;
            Us[i * 32 + lane] = i < L ? vv[r] - au[r] : 0.f;
        }
        __syncthreads();

        // 2. o_i = e^{G_i} q_i S0 + sum_{j<=i} P_ij u_j (P is zero past the diagonal, U past L).
        const u32 jend = (min(warp * 8 + 8, L) + 3) & ~3u;
        float po[8];
#pragma unroll
        for (u32 r = 0; r < 8; r++) po[r] = 0.f;
        for (u32 j = 0; j < jend; j += 4) {
            const float u0 = Us[j * 32 + lane], u1 = Us[(j + 1) * 32 + lane], u2 = Us[(j + 2) * 32 + lane],
                        u3 = Us[(j + 3) * 32 + lane];
#pragma unroll
            for (u32 r = 0; r < 8; r++) {
                const float4 p4 = *(const float4*)(Ps + (warp * 8 + r) * GDC + j);
                po[r] += p4.x * u0 + p4.y * u1 + p4.z * u2 + p4.w * u3;
            }
        }
#pragma unroll
        for (u32 r = 0; r < 8; r++) {
            const u32 i = warp * 8 + r;
            if (i < L && col_ok) out[((u64)(t0 + i) * v_heads + h) * dv + col0 + lane] = expf(Gs[i]) * ao[r] + po[r];
        }
        __syncthreads();
        const float gl = Gs[L - 1];
#pragma unroll
        for (u32 r = 0; r < 8; r++) {
            const u32 i = warp * 8 + r;
            if (i < L) Us[i * 32 + lane] *= expf(gl - Gs[i]);
        }
        __syncthreads();

        // 3. S = e^{G_last} S0 + sum_j k_j (e^{G_last - G_j} u_j)^T.
        float as[16];
#pragma unroll
        for (u32 r = 0; r < 16; r++) as[r] = 0.f;
        for (u32 j = 0; j < L; j++) {
            const float u = Us[j * 32 + lane];
            const float4* kr = (const float4*)(Ks + j * dk + warp * 16);
#pragma unroll
            for (u32 q = 0; q < 4; q++) {
                const float4 k4 = kr[q];
                as[4 * q] += k4.x * u;
                as[4 * q + 1] += k4.y * u;
                as[4 * q + 2] += k4.z * u;
                as[4 * q + 3] += k4.w * u;
            }
        }
        const float eg = expf(gl);
#pragma unroll
        for (u32 r = 0; r < 16; r++) {
            const u32 d = warp * 16 + r;
            if (d < dk) S[d * 32 + lane] = eg * S[d * 32 + lane] + as[r];
        }
        __syncthreads();
    }
    for (u32 e = threadIdx.x; e < dk * 32; e += 256) {
        const u32 d = e >> 5, cc = e & 31;
        if (col0 + cc < dv) St[(u64)d * dv + col0 + cc] = S[e];
    }
}
