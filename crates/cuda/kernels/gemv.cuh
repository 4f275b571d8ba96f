// gemv.cuh: the dequantizing dot-product building blocks shared by matmul.cu and moe.cu.
//
// Two shapes of work:
//  * mv_*: matrix-vector (decode). A 256-thread block = 8 warps, each warp owns MV_R = 4
//    consecutive weight rows and walks the columns. The input row x is first staged in shared
//    memory; on the vector path it is stored *permuted* so that the float4 a lane needs at
//    step f sits next to the float4s of its neighbours (conflict-free), and every lane loads
//    16 contiguous weight bytes per row per step (a warp reads 512 B of a row at once). The
//    staged x is reused for the MV_R rows, which keeps shared-memory traffic per weight byte
//    low even for 4-bit weights.
//    Vector path requirements (checked on the host): data pointer 16-byte aligned and the
//    row size in bytes a multiple of 16 (so cols is a multiple of E, the elements per 16 B),
//    and for affine formats group % E == 0 (each lane's 16 bytes lie in one group).
//    Otherwise the scalar path reads one element at a time (any alignment).
//  * gemm_tile: a 64 (tokens) x 64 (weight rows) output tile over K in steps of 32, 256
//    threads, 4x4 outputs per thread, weights dequantized into shared memory. Rows of x and
//    of the output are given per tile row through pointer tables, so the same code serves the
//    dense matmul and the gathered (token, slot) pairs of the experts.

#define MV_WARPS 8
#define MV_R 4
#define MV_ROWS_PER_BLOCK (MV_WARPS * MV_R)

// Elements of one format held by 16 bytes.
template <int FMT>
__device__ __host__ constexpr int elems16() {
    return FMT == FMT_F32 ? 4 : (FMT == FMT_F16 || FMT == FMT_BF16) ? 8 : FMT == FMT_Q4 ? 32 : 16;
}

// Byte offset of element e within a row.
template <int FMT>
__device__ __forceinline__ u64 elem_byte(u32 e) {
    if (FMT == FMT_F32) return (u64)e * 4;
    if (FMT == FMT_F16 || FMT == FMT_BF16) return (u64)e * 2;
    if (FMT == FMT_Q4) return e >> 1;
    return e;
}

// Round cols up to the warp span of one step (32 lanes x E elements).
template <int E>
__device__ __forceinline__ u32 mv_padded(u32 cols) {
    return (cols + 32 * E - 1) / (32 * E) * (32 * E);
}

// Stages x[0..cols) (zero-padded to `padded`) into shared memory. For E == 4 the permutation is
// the identity, which is what the scalar path uses.
template <int E>
__device__ __forceinline__ void stage_x(float* xs, const float* x, u32 cols, u32 padded) {
    for (u32 e = threadIdx.x; e < padded; e += blockDim.x) {
        float v = e < cols ? x[e] : 0.f;
        u32 base = e / (32 * E) * (32 * E);
        u32 rem = e - base;
        u32 lane = rem / E, f = (rem % E) >> 2, i = e & 3;
        xs[base + f * 128 + lane * 4 + i] = v;
    }
}

// 2^23 + q, minus 2^23: exact int -> float for q < 2^23 without the (slow) I2F unit.
__device__ __forceinline__ float qf(u32 q) { return __uint_as_float(0x4B000000u | q) - 8388608.f; }

// Dot of the 16 weight bytes `wv` (E elements) with the lane's E inputs `xv` (F = E/4 float4).
template <int FMT>
__device__ __forceinline__ float dot16(uint4 wv, const float4* xv) {
    u32 ws[4] = {wv.x, wv.y, wv.z, wv.w};
    float d = 0.f;
    if (FMT == FMT_F32) {
        float4 x = xv[0];
        d = __uint_as_float(ws[0]) * x.x + __uint_as_float(ws[1]) * x.y + __uint_as_float(ws[2]) * x.z +
            __uint_as_float(ws[3]) * x.w;
    } else if (FMT == FMT_F16 || FMT == FMT_BF16) {
#pragma unroll
        for (int f = 0; f < 2; f++) {
            u32 a = ws[2 * f], b = ws[2 * f + 1];
            float4 x = xv[f];
            float w0, w1, w2, w3;
            if (FMT == FMT_BF16) {
                w0 = __uint_as_float(a << 16);
                w1 = __uint_as_float(a & 0xffff0000u);
                w2 = __uint_as_float(b << 16);
                w3 = __uint_as_float(b & 0xffff0000u);
            } else {
                w0 = f16_to_f32((u16)(a & 0xffff));
                w1 = f16_to_f32((u16)(a >> 16));
                w2 = f16_to_f32((u16)(b & 0xffff));
                w3 = f16_to_f32((u16)(b >> 16));
            }
            d += w0 * x.x + w1 * x.y + w2 * x.z + w3 * x.w;
        }
    } else if (FMT == FMT_Q4) {
#pragma unroll
        for (int f = 0; f < 8; f++) {
            u32 word = ws[f >> 1] >> ((f & 1) * 16);
            float4 x = xv[f];
            d += qf(word & 15u) * x.x + qf((word >> 4) & 15u) * x.y + qf((word >> 8) & 15u) * x.z +
                 qf((word >> 12) & 15u) * x.w;
        }
    } else {
#pragma unroll
        for (int f = 0; f < 4; f++) {
            u32 word = ws[f];
            float4 x = xv[f];
            d += qf(word & 255u) * x.x + qf((word >> 8) & 255u) * x.y + qf((word >> 16) & 255u) * x.z +
                 qf(word >> 24) * x.w;
        }
    }
    return d;
}

// Per-lane partial dots of rows r0..r0+MV_R with the permuted staged x (vector path). Rows past
// the end are clamped to the last row (their results are discarded by the caller).
template <int FMT>
__device__ __forceinline__ void mv_vec(const WMat& w, const float* xs, u32 r0, float* acc) {
    constexpr int E = elems16<FMT>();
    constexpr int F = E / 4;
    constexpr bool AFF = FMT == FMT_Q4 || FMT == FMT_Q8;
    const u32 lane = threadIdx.x & 31;
    const u64 rb = row_bytes<FMT>(w.cols);
    const u32 groups = AFF ? w.cols / w.group : 1;
    u32 rr[MV_R];
#pragma unroll
    for (int j = 0; j < MV_R; j++) rr[j] = min(r0 + j, w.rows - 1);
    for (u32 base = 0; base < w.cols; base += 32 * E) {
        u32 e0 = base + lane * E;
        if (e0 >= w.cols) break;
        float4 xv[F];
#pragma unroll
        for (int f = 0; f < F; f++) xv[f] = *(const float4*)(xs + base + f * 128 + lane * 4);
        float sx = 0.f;
        if (AFF) {
#pragma unroll
            for (int f = 0; f < F; f++) sx += (xv[f].x + xv[f].y) + (xv[f].z + xv[f].w);
        }
#pragma unroll
        for (int j = 0; j < MV_R; j++) {
            uint4 wv = __ldg((const uint4*)(w.data + (u64)rr[j] * rb + elem_byte<FMT>(e0)));
            float d = dot16<FMT>(wv, xv);
            if (AFF) {
                u64 g = (u64)rr[j] * groups + e0 / w.group;
                acc[j] += load_float(w.scales, w.sdt, g) * d + load_float(w.biases, w.sdt, g) * sx;
            } else {
                acc[j] += d;
            }
        }
    }
}

// Scalar path: lanes stride over columns; x staged unpermuted.
template <int FMT>
__device__ __forceinline__ void mv_scalar(const WMat& w, const float* xs, u32 r0, float* acc) {
    const u32 lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < MV_R; j++) {
        u32 r = min(r0 + j, w.rows - 1);
        float a = 0.f;
        for (u32 c = lane; c < w.cols; c += 32) a += wload<FMT>(w, r, c) * xs[c];
        acc[j] = a;
    }
}

// Stage x and compute this warp's MV_R row dots into acc (reduced across the warp: every lane
// holds the totals). All threads of the block must call it (it synchronises).
template <int FMT, bool VEC>
__device__ __forceinline__ void mv_block(const WMat& w, float* xs, const float* x, u32 r0, float* acc) {
    constexpr int E = VEC ? elems16<FMT>() : 4;
    stage_x<E>(xs, x, w.cols, mv_padded<E>(w.cols));
    __syncthreads();
#pragma unroll
    for (int j = 0; j < MV_R; j++) acc[j] = 0.f;
    if (r0 < w.rows) {
        if (VEC) mv_vec<FMT>(w, xs, r0, acc);
        else mv_scalar<FMT>(w, xs, r0, acc);
    }
#pragma unroll
    for (int j = 0; j < MV_R; j++) acc[j] = warp_sum(acc[j]);
}

// ---------------------------------------------------------------------------------------------
// Tiled GEMM

#define GT_M 64  // tokens (rows of x / output) per tile
#define GT_N 64  // weight rows (output features) per tile
#define GT_K 32

struct GemmSmem {
    float xs[GT_K][GT_M + 4];
    float ws[2][GT_K][GT_N + 4];
};

// Eight consecutive elements W[r, c0..c0+8), zero past the end of the row. Byte loads only, so
// any alignment works.
template <int FMT>
__device__ __forceinline__ void wload8(const WMat& w, u32 r, u32 c0, float* o) {
    bool aff = FMT == FMT_Q4 || FMT == FMT_Q8;
    if (c0 + 8 <= w.cols && (!aff || (w.group % 8 == 0))) {
        const u8* row = w.data + (u64)r * row_bytes<FMT>(w.cols);
        if (FMT == FMT_Q4 || FMT == FMT_Q8) {
            u64 g = (u64)r * (w.cols / w.group) + c0 / w.group;
            float s = load_float(w.scales, w.sdt, g), b = load_float(w.biases, w.sdt, g);
            if (FMT == FMT_Q4) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    u8 byte = row[(c0 >> 1) + i];
                    o[2 * i] = s * qf(byte & 15) + b;
                    o[2 * i + 1] = s * qf(byte >> 4) + b;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) o[i] = s * qf(row[c0 + i]) + b;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = wload<FMT>(w, r, c0 + i);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = c0 + i < w.cols ? wload<FMT>(w, r, c0 + i) : 0.f;
    }
}

// out_rows[i][r0 + j] for the tile: NMAT == 1: x . w0; NMAT == 2: silu(x . w0) * (x . w1).
// `xr[i]` / `orow[i]` (shared memory, GT_M entries) are the input / output rows of tile row i,
// null for rows past the end. K = w0.cols. Block: 256 threads.
template <int FMT, int NMAT>
__device__ __forceinline__ void gemm_tile(const WMat& w0, const WMat& w1, const float* const* xr, float* const* orow,
                                          u32 r0, GemmSmem& sm) {
    const u32 tid = threadIdx.x;
    const u32 tx = tid & 15, ty = tid >> 4;
    const u32 K = w0.cols;
    float acc[NMAT][4][4];
#pragma unroll
    for (int m = 0; m < NMAT; m++)
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[m][i][j] = 0.f;

    const u32 li = tid >> 2, lk = (tid & 3) * 8;  // loader: tile row li, k offset lk (8 elements)
    for (u32 k0 = 0; k0 < K; k0 += GT_K) {
        {
            const float* src = xr[li];
#pragma unroll
            for (int e = 0; e < 8; e++) {
                u32 k = k0 + lk + e;
                sm.xs[lk + e][li] = (src != 0 && k < K) ? src[k] : 0.f;
            }
        }
#pragma unroll
        for (int m = 0; m < NMAT; m++) {
            const WMat& w = m == 0 ? w0 : w1;
            u32 r = r0 + li;
            float v[8];
            if (r < w.rows && k0 + lk < K) {
                wload8<FMT>(w, r, k0 + lk, v);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) v[e] = 0.f;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) sm.ws[m][lk + e][li] = v[e];
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < GT_K; kk++) {
            float4 a = *(const float4*)&sm.xs[kk][ty * 4];
            float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int m = 0; m < NMAT; m++) {
                float4 b = *(const float4*)&sm.ws[m][kk][tx * 4];
                float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[m][i][j] += av[i] * bv[j];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float* o = orow[ty * 4 + i];
        if (o == 0) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 r = r0 + tx * 4 + j;
            if (r >= w0.rows) continue;
            o[r] = NMAT == 1 ? acc[0][i][j] : silu_f(acc[0][i][j]) * acc[NMAT - 1][i][j];
        }
    }
}
