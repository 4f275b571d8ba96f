// matmul.cu: out[n, rows] = x[n, cols] @ W^T for every weight format (Op::Matmul).
//
// Layouts: x and out f32 row-major; W [rows, cols] row-major in its stored format (see
// common.cuh). Kernels per format F in {f32, f16, bf16, q4, q8}:
//  * matvec_{vec,scalar}_F_rR (few tokens, the decode path), R = rows per warp (1, 2, 4; the
//    host picks the largest that still fills the GPU): grid (ceil(rows / (8 R)), n), block 256,
//    dynamic shared memory = padded cols * 4 bytes (x of one token, see gemv.cuh).
//    Each weight byte is read once per token with 16-byte loads (vec) or per element (scalar,
//    for matrices whose alignment does not allow the vector path).
//  * matvec_multi_{vec,scalar}_F_rR: up to MV_PARTS matvecs of one x (consecutive Matmul ops
//    with the same input, formats and columns) in one launch: the grid's x blocks are the parts'
//    row blocks one after the other (`start` = first block of each part).
//  * matvec_stream_F_lL_rR: one token on sm_80+ (the host's first choice at decode): weights
//    copied through shared memory by cp.async in a ring of MS_STAGES tiles (gemv.cuh), up to
//    MV_PARTS matrices of one x per launch, a grid of at most what fits on the device at once
//    whose blocks walk the tiles.
//  * gemm_F (prefill): grid (ceil(rows / 64), ceil(n / 64)), block 256, static shared memory.
#include "common.cuh"
#include "gemv.cuh"

#define MV_PARTS 4
struct MvParts {
    WMat w[MV_PARTS];
    float* out[MV_PARTS];
    u32 start[MV_PARTS];
    u32 count;
};

template <int FMT, bool VEC, int R>
__device__ __forceinline__ void matvec_body(const WMat& w, const float* x, float* out, u32 bx) {
    float* xs = (float*)smem4;
    const u32 t = blockIdx.y;
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 r0 = (bx * MV_WARPS + warp) * R;
    float acc[R];
    mv_block<FMT, VEC, R>(w, xs, x + (u64)t * w.cols, r0, acc);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < R; j++)
            if (r0 + j < w.rows) out[(u64)t * w.rows + r0 + j] = acc[j];
    }
}

// Streamed matvec (one token; see gemv.cuh): `a` as for matvec_multi, but `start` counts tiles
// of TR = R * 256 / L rows (one part: count 1). Block b computes tiles b, b + grid, ...; the
// copies of the next MS_STAGES - 1 tiles are in flight while it computes one. Dynamic shared
// memory: x (padded) + sums (padded / E) + MS_STAGES * (TR * (row bytes + 2 * scale bytes)).
template <int FMT, int L, int R>
__device__ __forceinline__ void matvec_stream_body(const MvParts& a, const float* x, u32 ntiles) {
    constexpr int E = elems16<FMT>();
    constexpr bool AFF = FMT == FMT_Q4 || FMT == FMT_Q8;
    constexpr u32 TR = R * (256 / L);
    const u32 cols = a.w[0].cols, group = a.w[0].group;
    const int sdt = a.w[0].sdt;
    const u32 rb = (u32)row_bytes<FMT>(cols);
    const u32 sb = AFF ? cols / group * (sdt == DT_F32 ? 4u : 2u) : 0u;
    const u32 padded = mv_padded<E, L>(cols);
    float* xs = (float*)smem4;
    float* sxs = xs + padded;
    u8* st = (u8*)(sxs + padded / E);
    const u32 cb = TR * rb, stride = cb + 2 * TR * sb;
    auto part_of = [&](u32 t) {
        u32 p = 0;
#pragma unroll
        for (u32 q = 1; q < MV_PARTS; q++)
            if (q < a.count && t >= a.start[q]) p = q;
        return p;
    };
    auto issue = [&](u32 i) {
        const u32 t = blockIdx.x + i * gridDim.x;
        if (t < ntiles) {
            const u32 p = part_of(t);
            WMat w = a.w[0];
#pragma unroll
            for (u32 q = 1; q < MV_PARTS; q++)
                if (q == p) w = a.w[q];
            const u32 r0 = (t - a.start[p]) * TR, nr = min(TR, w.rows - r0);
            u8* dst = st + (i % MS_STAGES) * stride;
            cp_block(dst, w.data + (u64)r0 * rb, nr * rb);
            if (AFF) {
                cp_block(dst + cb, w.scales + (u64)r0 * sb, nr * sb);
                cp_block(dst + cb + TR * sb, w.biases + (u64)r0 * sb, nr * sb);
            }
        }
        cp_commit();  // empty groups too: every thread counts the same groups
    };
#pragma unroll
    for (u32 i = 0; i < MS_STAGES - 1; i++) issue(i);
    stage_x<E, L>(xs, x, cols, padded);
    if (AFF) {
        __syncthreads();
        chunk_sums<E, L>(sxs, xs, padded);
    }
    const u32 mine = blockIdx.x < ntiles ? (ntiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
    const u32 rr = threadIdx.x / L * R, sl = threadIdx.x & (L - 1);
    for (u32 i = 0; i < mine; i++) {
        cp_wait<MS_STAGES - 2>();
        __syncthreads();  // tile i is in for every thread, and tile i - 1's buffer is free
        issue(i + MS_STAGES - 1);
        const u32 t = blockIdx.x + i * gridDim.x;
        const u32 p = part_of(t);
        u32 rows = a.w[0].rows;
        float* out = a.out[0];
#pragma unroll
        for (u32 q = 1; q < MV_PARTS; q++)
            if (q == p) {
                rows = a.w[q].rows;
                out = a.out[q];
            }
        const u32 r0 = (t - a.start[p]) * TR, nr = min(TR, rows - r0);
        const u8* buf = st + (i % MS_STAGES) * stride;
        float acc[R];
#pragma unroll
        for (int j = 0; j < R; j++) acc[j] = 0.f;
        // Rows past nr hold stale bytes; their sums are discarded.
        ms_rows<FMT, R, L>(buf + rr * rb, buf + cb + rr * sb, buf + cb + TR * sb + rr * sb, rb, sb, sdt, cols, group, xs,
                           sxs, acc);
#pragma unroll
        for (int j = 0; j < R; j++) acc[j] = group_sum<L>(acc[j]);
        if (sl == 0) {
#pragma unroll
            for (int j = 0; j < R; j++)
                if (rr + j < nr) out[r0 + rr + j] = acc[j];
        }
    }
}

template <int FMT>
__device__ __forceinline__ void gemm_body(const WMat& w, const float* x, float* out, u32 n) {
    __shared__ GemmSmem sm;
    __shared__ const float* xr[GT_M];
    __shared__ float* orow[GT_M];
    const u32 t0 = blockIdx.y * GT_M;
    if (threadIdx.x < GT_M) {
        u32 t = t0 + threadIdx.x;
        xr[threadIdx.x] = t < n ? x + (u64)t * w.cols : 0;
        orow[threadIdx.x] = t < n ? out + (u64)t * w.rows : 0;
    }
    __syncthreads();
    gemm_tile<FMT, 1, GT_M>(w, w, xr, orow, blockIdx.x * GT_N, sm);
}

// LB: the launch bounds. The 4-bit, 4-row vector kernels would take 80 registers (three
// blocks per SM); held to 64 (`LB_FOUR`) they spill ~80 bytes to L1 but run four blocks per
// SM, which measured 11% faster on a 16384 x 4096 matvec (H100, run 24). The others already
// fit 64 registers or lose more to the spills.
#define LB_ANY __launch_bounds__(256)
#define LB_FOUR __launch_bounds__(256, 4)

#define MATVEC_KERNEL(NAME, FMT, VEC, KIND, R, LB)                                                  \
    extern "C" __global__ void LB matvec_##KIND##_##NAME##_r##R(WMat w, const float* x, float* out) { pdl_prologue(); \
        matvec_body<FMT, VEC, R>(w, x, out, blockIdx.x);                                            \
    }                                                                                               \
    extern "C" __global__ void LB matvec_multi_##KIND##_##NAME##_r##R(MvParts a, const float* x) { pdl_prologue(); \
        u32 p = 0;                                                                                  \
        _Pragma("unroll") for (u32 q = 1; q < MV_PARTS; q++) if (q < a.count && blockIdx.x >= a.start[q]) p = q; \
        WMat w = a.w[0];                                                                            \
        float* out = a.out[0];                                                                      \
        _Pragma("unroll") for (u32 q = 1; q < MV_PARTS; q++) if (q == p) { w = a.w[q]; out = a.out[q]; } \
        matvec_body<FMT, VEC, R>(w, x, out, blockIdx.x - a.start[p]);                               \
    }

#define MATMUL_KERNELS(NAME, FMT, LB_R4)                                                            \
    MATVEC_KERNEL(NAME, FMT, true, vec, 1, LB_ANY)                                                  \
    MATVEC_KERNEL(NAME, FMT, true, vec, 2, LB_ANY)                                                  \
    MATVEC_KERNEL(NAME, FMT, true, vec, 4, LB_R4)                                                   \
    MATVEC_KERNEL(NAME, FMT, false, scalar, 1, LB_ANY)                                              \
    MATVEC_KERNEL(NAME, FMT, false, scalar, 4, LB_ANY)                                              \
    extern "C" __global__ void __launch_bounds__(256) gemm_##NAME(WMat w, const float* x, float* out, u32 n) { pdl_prologue(); \
        gemm_body<FMT>(w, x, out, n);                                                               \
    }

#define STREAM_KERNEL(NAME, FMT, L, R)                                                              \
    extern "C" __global__ void __launch_bounds__(256) matvec_stream_##NAME##_l##L##_r##R(MvParts a, const float* x, u32 ntiles) { pdl_prologue(); \
        matvec_stream_body<FMT, L, R>(a, x, ntiles);                                                \
    }
#define STREAM_KERNELS(NAME, FMT)                                                                   \
    STREAM_KERNEL(NAME, FMT, 32, 1)                                                                 \
    STREAM_KERNEL(NAME, FMT, 32, 2)                                                                 \
    STREAM_KERNEL(NAME, FMT, 16, 1)                                                                 \
    STREAM_KERNEL(NAME, FMT, 16, 2)                                                                 \
    STREAM_KERNEL(NAME, FMT, 8, 1)                                                                  \
    STREAM_KERNEL(NAME, FMT, 8, 2)

MATMUL_KERNELS(f32, FMT_F32, LB_ANY)
MATMUL_KERNELS(f16, FMT_F16, LB_ANY)
MATMUL_KERNELS(bf16, FMT_BF16, LB_ANY)
MATMUL_KERNELS(q4, FMT_Q4, LB_FOUR)
MATMUL_KERNELS(q8, FMT_Q8, LB_ANY)

STREAM_KERNELS(f32, FMT_F32)
STREAM_KERNELS(f16, FMT_F16)
STREAM_KERNELS(bf16, FMT_BF16)
STREAM_KERNELS(q4, FMT_Q4)
STREAM_KERNELS(q8, FMT_Q8)
