// moe.cu: router top-k and the routed SwiGLU experts (Op::RouterTopK, Op::MoeExperts).
// Routing indices never leave the device.
//
// router_topk_f32: softmax over `experts` logits per token, top-k by probability (ties: lower
//   index), optionally renormalised. One warp per token, 4 warps per block, dynamic shared
//   memory 4 * experts floats. Grid ceil(n / 4). With `shared` (one gate logit per token, or
//   null) rows of idx / weights are k + 1 wide and slot k is (experts, sigmoid(shared[t])).
//
// Experts: `table` is a device array, per expert 9 u64 device pointers: gate {data, scales,
// biases}, up {...}, down {...} (null scales/biases for dense formats). Gate and up share one
// format (FG), down may have another (FD); every expert of a role has the same format, rows and
// cols (checked on the host). P = n * k (token, slot) pairs, pair p = t * k + slot.
//  * Few tokens (decode): matrix-vector kernels (gemv.cuh). The vector ones are instantiated
//    for L = 32, 16, 8 lanes per row group (suffix _lL; the host picks L for the row width so
//    that short rows keep every lane loading); rows per block = 8 * (32 / L) * R.
//      moe_gate_up_vec_FG_lL / _scalar_FG: grid (row blocks of inter, P), R = 2 (gate and up
//        rows loaded together): h[p] = silu(G x_t) * (U x_t)
//      moe_down_vec_FD_lL / _scalar_FD: grid (row blocks of hidden, P), R = 4: y[p] = D h[p]
//      moe_down_combine_vec_FD_lL: grid (ceil(hidden / DC_RB), n): the down projections of all
//        k slots of a token and the combine below in one launch (resident tables).
//  * Many tokens (prefill): pairs grouped by expert on the device, then tiled GEMMs:
//      moe_route: one block of 1024 threads: counts per expert, expert-sorted pair list, and a
//        list of tiles (expert, first, count <= tm: MOE_TM for the kernels below, 32 or 64 for
//        the tensor-core ones in gemm_tc.cu) with their number; dynamic shared memory
//        2 * experts u32. With tiles_b (non-null), an expert's last tile of at most tm / 2
//        pairs goes to that second list instead (run with the half-size kernels), so experts
//        with, say, 88 pairs fill one tile of 64 and one of 32 rather than two of 64.
//      moe_gemm_gate_up_FG: grid (ceil(inter / 64), max_tiles); blocks past the tile count exit.
//      moe_gemm_down_FD:    grid (ceil(hidden / 64), max_tiles).
//  * moe_combine_f32: out[t] = sum_slot weights[t, slot] * y[t * k + slot], in slot order
//    (deterministic, same order as the CPU reference). Grid-stride over n * hidden.
// Pairs whose index is >= num_experts are skipped by every expert kernel (their y rows are left
// as they are): the host zeroes y first, and the streamed op runs one pass per wave of experts
// with the other waves' pairs marked that way.
#include "common.cuh"
#include "gemv.cuh"

// ----------------------------------------------------------------------------- router
// The largest (value, index) over the warp, lower index among equal values; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& v, u32& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) {
            v = ov;
            i = oi;
        }
    }
}

extern "C" __global__ void router_topk_f32(const float* logits, const float* shared, u32* idx, float* weights, u32 n, u32 experts,
                                           u32 k, int renorm) { pdl_prologue();
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 t = blockIdx.x * 4 + warp;
    if (t >= n) return;
    const u32 width = shared != 0 ? k + 1 : k;  // row width of idx / weights
    float* p = (float*)smem4 + warp * experts;
    const float* l = logits + (u64)t * experts;
    float mx = NEG_INF;
    for (u32 e = lane; e < experts; e += 32) mx = fmaxf(mx, l[e]);
    mx = warp_max(mx);
    float sum = 0.f;
    for (u32 e = lane; e < experts; e += 32) {
        float v = expf(l[e] - mx);
        p[e] = v;
        sum += v;
    }
    sum = warp_sum(sum);
    __syncwarp();
    float tot = 0.f;
    for (u32 j = 0; j < k; j++) {
        float bv = -1.f;
        u32 bi = 0xffffffffu;
        for (u32 e = lane; e < experts; e += 32) {
            float v = p[e];
            if (v > bv) {  // e increases within a lane, so ties keep the lower index
                bv = v;
                bi = e;
            }
        }
        warp_argmax(bv, bi);
        if (lane == 0) {
            float w = bv / sum;
            idx[(u64)t * width + j] = bi;
            weights[(u64)t * width + j] = w;
            tot += w;
            p[bi] = -1.f;  // taken
        }
        __syncwarp();
    }
    if (lane == 0 && renorm) {
        for (u32 j = 0; j < k; j++) weights[(u64)t * width + j] /= tot;
    }
    if (lane == 0 && shared != 0) {  // the shared expert rides along as slot k
        idx[(u64)t * width + k] = experts;
        weights[(u64)t * width + k] = sigmoid_f(shared[t]);
    }
}

// router_topk_reg_f32: the same result as router_topk_f32 for experts <= 512 and k <= 32, with
//   each lane's (at most 16) probabilities in registers: a selection costs one warp arg-max and
//   a rescan of the winning lane's values only, and lanes < k write the results together at the
//   end. One warp per token, 4 warps per block, no shared memory.
#define TOPK_PER_LANE 16
extern "C" __global__ void router_topk_reg_f32(const float* logits, const float* shared, u32* idx, float* weights, u32 n,
                                               u32 experts, u32 k, int renorm) { pdl_prologue();
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 t = blockIdx.x * 4 + warp;
    if (t >= n) return;
    const u32 width = shared != 0 ? k + 1 : k;
    const float* l = logits + (u64)t * experts;
    float v[TOPK_PER_LANE];
    float mx = NEG_INF;
#pragma unroll
    for (int j = 0; j < TOPK_PER_LANE; j++) {
        const u32 e = lane + 32u * j;
        v[j] = e < experts ? l[e] : NEG_INF;
        mx = fmaxf(mx, v[j]);
    }
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < TOPK_PER_LANE; j++) {
        const u32 e = lane + 32u * j;
        if (e < experts) {
            v[j] = expf(v[j] - mx);
            sum += v[j];
        } else {
            v[j] = -2.f;  // never selected: below the taken mark
        }
    }
    sum = warp_sum(sum);
    // This lane's best (lowest index among equals: j ascending with a strict compare).
    float lv = -2.f;
    u32 lj = 0;
#pragma unroll
    for (int j = 0; j < TOPK_PER_LANE; j++)
        if (v[j] > lv) {
            lv = v[j];
            lj = j;
        }
    float tot = 0.f, mine_w = 0.f;
    u32 mine_i = 0;
    for (u32 s = 0; s < k; s++) {
        float bv = lv;
        u32 bi = lane + 32u * lj;
        warp_argmax(bv, bi);
        const float w = bv / sum;
        tot += w;
        if (lane == s) {
            mine_w = w;
            mine_i = bi;
        }
        if (lane == (bi & 31u)) {  // the winner's lane marks it taken and rescans
            const u32 jj = bi >> 5;
            lv = -2.f;
#pragma unroll
            for (int j = 0; j < TOPK_PER_LANE; j++) {
                if ((u32)j == jj) v[j] = -1.f;
                if (v[j] > lv) {
                    lv = v[j];
                    lj = j;
                }
            }
        }
    }
    if (lane < k) {
        idx[(u64)t * width + lane] = mine_i;
        weights[(u64)t * width + lane] = renorm ? mine_w / tot : mine_w;
    }
    if (lane == 0 && shared != 0) {
        idx[(u64)t * width + k] = experts;
        weights[(u64)t * width + k] = sigmoid_f(shared[t]);
    }
}

// ----------------------------------------------------------------------------- experts
// Vector-path decode kernels take L, the lanes per row group (32, 16 or 8, the host's pick for
// the row width: see gemv.cuh); a warp holds 32 / L row groups.
#define GU_R 2  // rows per row group of gate_up (each row of gate and of up: 4 rows in flight)
#define DN_R 4  // rows per row group of down and down_combine
// Output rows per block of down_combine: 8 gives a 2048-row output 256 blocks, two per SM
// (16 gave 128 blocks, one per SM: 12% achieved occupancy under ncu, run 25).
#define DC_RB 8

template <int FMT, bool VEC, int L>
__device__ __forceinline__ void gate_up_body(const u64* table, u32 num_experts, const float* x, const u32* idx, u32 k, u32 hidden,
                                             u32 inter, u32 group, int sdt, float* h) {
    constexpr int E = VEC ? elems16<FMT>() : 4;
    constexpr int R = VEC ? GU_R : MV_R;
    float* xs = (float*)smem4;
    const u32 p = blockIdx.y;
    const u32 e = idx[p];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 r0 = ((blockIdx.x * MV_WARPS + warp) * (32 / L) + lane / L) * R;
    float* hr = h + (u64)p * inter;
    if (e >= num_experts) return;  // not in this pass; uniform across the block
    const float* xt = x + (u64)(p / k) * hidden;
    WMat m[2] = {expert_mat(table, e, 0, inter, hidden, group, sdt), expert_mat(table, e, 1, inter, hidden, group, sdt)};
    auto stage = [&]() {
        stage_x<E, L>(xs, xt, hidden, mv_padded<E, L>(hidden));
        __syncthreads();
    };
    float acc[2][R];
#pragma unroll
    for (int j = 0; j < R; j++) acc[0][j] = acc[1][j] = 0.f;
    if (VEC) {
        mv_vec_n<FMT, R, L, 2>(m, xs, r0, acc, stage);  // gate and up loads issued together
    } else {
        stage();
        if (r0 < inter) {
            mv_scalar<FMT, R>(m[0], xs, r0, acc[0]);
            mv_scalar<FMT, R>(m[1], xs, r0, acc[1]);
        }
    }
#pragma unroll
    for (int j = 0; j < R; j++) {
        acc[0][j] = group_sum<L>(acc[0][j]);
        acc[1][j] = group_sum<L>(acc[1][j]);
    }
    if ((lane & (L - 1)) == 0) {
#pragma unroll
        for (int j = 0; j < R; j++)
            if (r0 + j < inter) hr[r0 + j] = silu_f(acc[0][j]) * acc[1][j];
    }
}

template <int FMT, bool VEC, int L>
__device__ __forceinline__ void down_body(const u64* table, u32 num_experts, const float* h, const u32* idx, u32 hidden, u32 inter,
                                          u32 group, int sdt, float* y) {
    constexpr int E = VEC ? elems16<FMT>() : 4;
    constexpr int R = VEC ? DN_R : MV_R;
    float* xs = (float*)smem4;
    const u32 p = blockIdx.y;
    const u32 e = idx[p];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 r0 = ((blockIdx.x * MV_WARPS + warp) * (32 / L) + lane / L) * R;
    float* yr = y + (u64)p * hidden;
    if (e >= num_experts) return;
    WMat d = expert_mat(table, e, 2, hidden, inter, group, sdt);
    auto stage = [&]() {
        stage_x<E, L>(xs, h + (u64)p * inter, inter, mv_padded<E, L>(inter));
        __syncthreads();
    };
    float acc[1][R];
#pragma unroll
    for (int j = 0; j < R; j++) acc[0][j] = 0.f;
    if (VEC) {
        mv_vec_n<FMT, R, L, 1>(&d, xs, r0, acc, stage);
    } else {
        stage();
        if (r0 < hidden) mv_scalar<FMT, R>(d, xs, r0, acc[0]);
    }
#pragma unroll
    for (int j = 0; j < R; j++) acc[0][j] = group_sum<L>(acc[0][j]);
    if ((lane & (L - 1)) == 0) {
#pragma unroll
        for (int j = 0; j < R; j++)
            if (r0 + j < hidden) yr[r0 + j] = acc[0][j];
    }
}

// down_combine (vector path, resident tables): out[t, r] = sum_slot weights[t, slot] *
//   (D_e h[t * k + slot])[r] for DC_RB rows r per block, every slot of token t = blockIdx.y:
//   the down projections and the combine in one launch, no y rows. The block stages the k h
//   rows of its token, its row groups take (slot, DN_R rows) units in rounds, and the sums run
//   in slot order (the order of moe_combine_f32 and the CPU). Pairs with an index >= ne count
//   as zero. Dynamic shared memory: k * padded(inter) + k * DC_RB floats.
template <int FMT, int L>
__device__ __forceinline__ void down_combine_body(const u64* table, u32 ne, const float* h, const u32* idx, const float* weights,
                                                  u32 k, u32 hidden, u32 inter, u32 group, int sdt, float* out) {
    constexpr int E = elems16<FMT>();
    constexpr u32 G = DC_RB / DN_R;  // row groups per slot
    constexpr u32 S = 256 / L;      // row groups per block
    const u32 t = blockIdx.y;
    const u32 padded = mv_padded<E, L>(inter);
    float* xs = (float*)smem4;
    float* part = xs + (u64)k * padded;
    stage_rows<E, L>(xs, h + (u64)t * k * inter, k, inter, padded);
    __syncthreads();
    const u32 sub = threadIdx.x / L, sl = threadIdx.x & (L - 1);
    const u32 rbase = blockIdx.x * DC_RB;
    const u32 units = k * G;
    for (u32 round = 0; round * S < units; round++) {  // uniform trip count: shuffles stay whole-warp
        const u32 u = round * S + sub;
        const u32 j = min(u, units - 1) / G, g = u % G;
        const u32 e = idx[(u64)t * k + j];
        const bool live = u < units && e < ne;
        WMat d = expert_mat(table, live ? e : 0, 2, hidden, inter, group, sdt);
        float acc[1][DN_R];
#pragma unroll
        for (int jj = 0; jj < DN_R; jj++) acc[0][jj] = 0.f;
        if (live) mv_vec_n<FMT, DN_R, L, 1>(&d, xs + (u64)j * padded, rbase + g * DN_R, acc, [] {});
#pragma unroll
        for (int jj = 0; jj < DN_R; jj++) acc[0][jj] = group_sum<L>(acc[0][jj]);
        if (sl == 0 && u < units) {
#pragma unroll
            for (int jj = 0; jj < DN_R; jj++) part[j * DC_RB + g * DN_R + jj] = acc[0][jj];
        }
    }
    __syncthreads();
    if (threadIdx.x < DC_RB) {
        const u32 r = rbase + threadIdx.x;
        if (r < hidden) {
            float a = 0.f;
            for (u32 j = 0; j < k; j++) a += weights[(u64)t * k + j] * part[j * DC_RB + threadIdx.x];
            out[(u64)t * hidden + r] = a;
        }
    }
}

extern "C" __global__ void moe_route(const u32* idx, u32 pairs, u32 num_experts, u32 tm, u32* sorted, u32* tiles, u32* ntiles,
                                     u32* tiles_b, u32* ntiles_b) { pdl_prologue();
    u32* cnt = (u32*)smem4;
    u32* fill = cnt + num_experts;
    for (u32 e = threadIdx.x; e < num_experts; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (u32 p = threadIdx.x; p < pairs; p += blockDim.x) {
        u32 e = idx[p];
        if (e < num_experts) atomicAdd(&cnt[e], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 off = 0, nt = 0, nb = 0;
        for (u32 e = 0; e < num_experts; e++) {
            u32 c = cnt[e];
            fill[e] = off;
            for (u32 s = 0; s < c; s += tm) {
                const u32 cnt = min(c - s, tm);
                if (tiles_b != 0 && cnt <= tm / 2) {
                    // A short remainder goes to the list of half-size tiles.
                    tiles_b[3 * nb] = e;
                    tiles_b[3 * nb + 1] = off + s;
                    tiles_b[3 * nb + 2] = cnt;
                    nb++;
                    continue;
                }
                tiles[3 * nt] = e;
                tiles[3 * nt + 1] = off + s;
                tiles[3 * nt + 2] = cnt;
                nt++;
            }
            off += c;
        }
        *ntiles = nt;
        if (ntiles_b != 0) *ntiles_b = nb;
    }
    __syncthreads();
    // Order inside an expert's range does not matter: each pair's row is computed alone.
    for (u32 p = threadIdx.x; p < pairs; p += blockDim.x) {
        u32 e = idx[p];
        if (e < num_experts) sorted[atomicAdd(&fill[e], 1u)] = p;
    }
}

template <int FMT, int NMAT>
__device__ __forceinline__ void moe_gemm_body(const u64* table, const u32* sorted, const u32* tiles, const u32* ntiles, const float* x,
                                              u32 k, u32 x_width, u32 gather_div, u32 rows, u32 cols, u32 group, int sdt,
                                              float* out, u32 out_width) {
    __shared__ GemmSmem sm;
    __shared__ const float* xr[MOE_TM];
    __shared__ float* orow[MOE_TM];
    const u32 e = expert_tile_rows<MOE_TM>(sorted, tiles, ntiles, x, gather_div, x_width, out, out_width, xr, orow);
    if (e == 0xffffffffu) return;  // past the tile count, uniform across the block
    WMat w0 = expert_mat(table, e, NMAT == 2 ? 0 : 2, rows, cols, group, sdt);
    WMat w1 = NMAT == 2 ? expert_mat(table, e, 1, rows, cols, group, sdt) : w0;
    gemm_tile<FMT, NMAT, MOE_TM>(w0, w1, xr, orow, blockIdx.x * GT_N, sm);
}

#define MOE_VEC_KERNELS(NAME, FMT, L)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_vec_##NAME##_l##L(const u64* table, u32 ne, const float* x, \
        const u32* idx, u32 k, u32 hidden, u32 inter, u32 group, int sdt, float* h) { pdl_prologue();                                    \
        gate_up_body<FMT, true, L>(table, ne, x, idx, k, hidden, inter, group, sdt, h);                                  \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moe_down_vec_##NAME##_l##L(const u64* table, u32 ne, const float* h,  \
        const u32* idx, u32 hidden, u32 inter, u32 group, int sdt, float* y) { pdl_prologue();                                           \
        down_body<FMT, true, L>(table, ne, h, idx, hidden, inter, group, sdt, y);                                        \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moe_down_combine_vec_##NAME##_l##L(const u64* table, u32 ne,          \
        const float* h, const u32* idx, const float* weights, u32 k, u32 hidden, u32 inter, u32 group, int sdt,           \
        float* out) { pdl_prologue();                                                                                                   \
        down_combine_body<FMT, L>(table, ne, h, idx, weights, k, hidden, inter, group, sdt, out);                        \
    }

#define MOE_KERNELS(NAME, FMT)                                                                                          \
    MOE_VEC_KERNELS(NAME, FMT, 32)                                                                                      \
    MOE_VEC_KERNELS(NAME, FMT, 16)                                                                                      \
    MOE_VEC_KERNELS(NAME, FMT, 8)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_scalar_##NAME(const u64* table, u32 ne, const float* x,  \
        const u32* idx, u32 k, u32 hidden, u32 inter, u32 group, int sdt, float* h) { pdl_prologue();                                    \
        gate_up_body<FMT, false, 32>(table, ne, x, idx, k, hidden, inter, group, sdt, h);                                \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moe_down_scalar_##NAME(const u64* table, u32 ne, const float* h,     \
        const u32* idx, u32 hidden, u32 inter, u32 group, int sdt, float* y) { pdl_prologue();                                           \
        down_body<FMT, false, 32>(table, ne, h, idx, hidden, inter, group, sdt, y);                                      \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moe_gemm_gate_up_##NAME(const u64* table, const u32* sorted,          \
        const u32* tiles, const u32* ntiles, const float* x, u32 k, u32 hidden, u32 inter, u32 group, int sdt, float* h) { pdl_prologue(); \
        moe_gemm_body<FMT, 2>(table, sorted, tiles, ntiles, x, k, hidden, k, inter, hidden, group, sdt, h, inter);       \
    }                                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) moe_gemm_down_##NAME(const u64* table, const u32* sorted,             \
        const u32* tiles, const u32* ntiles, const float* h, u32 hidden, u32 inter, u32 group, int sdt, float* y) { pdl_prologue();       \
        moe_gemm_body<FMT, 1>(table, sorted, tiles, ntiles, h, 1, inter, 1, hidden, inter, group, sdt, y, hidden);       \
    }

MOE_KERNELS(f32, FMT_F32)
MOE_KERNELS(f16, FMT_F16)
MOE_KERNELS(bf16, FMT_BF16)
MOE_KERNELS(q4, FMT_Q4)
MOE_KERNELS(q8, FMT_Q8)

extern "C" __global__ void moe_combine_f32(const float* y, const float* weights, float* out, u32 n, u32 k, u32 hidden) { pdl_prologue();
    const u64 total = (u64)n * hidden;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 t = i / hidden;
        u32 c = (u32)(i % hidden);
        float a = 0.f;
        for (u32 j = 0; j < k; j++) a += weights[t * k + j] * y[(t * k + j) * hidden + c];
        out[i] = a;
    }
}
