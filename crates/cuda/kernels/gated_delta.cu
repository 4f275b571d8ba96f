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
