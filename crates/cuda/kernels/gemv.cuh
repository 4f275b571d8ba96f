// gemv.cuh: the dequantizing dot-product building blocks shared by matmul.cu and moe.cu.
//
// Two shapes of work:
//  * mv_*: matrix-vector (decode). A 256-thread block = 8 warps, each warp owns R (1, 2 or 4)
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
//  * gemm_tile: a TM (tokens: 64 dense, 16 experts) x 64 (weight rows) output tile over K in
//    steps of 32, 256 threads, (TM / 16) x 4 outputs per thread, weights dequantized into shared memory. Rows of x and
//    of the output are given per tile row through pointer tables, so the same code serves the
//    dense matmul and the gathered (token, slot) pairs of the experts.

#define MV_WARPS 8
#define MV_R 2  // rows per warp of the expert kernels; matmul picks 1, 2 or 4 per matrix

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

// Round cols up to the span of one step of an L-lane row group (L lanes x E elements).
template <int E, int L = 32>
__device__ __forceinline__ u32 mv_padded(u32 cols) {
    return (cols + L * E - 1) / (L * E) * (L * E);
}

// Stages `rows` consecutive rows of x (each `cols` floats, zero-padded to `padded`, a multiple
// of L * E) into shared memory, row j at xs + j * padded, permuted per span of L * E elements so
// that the float4 f of lane l of a row group sits at span + f * 4L + 4l (the four floats of one
// input float4 stay together). For E == 4 the permutation is the identity (the scalar path's
// layout). Loads are 16-byte and four per thread are in flight before their stores (a load
// may not pass an earlier store to shared memory the compiler cannot tell apart from x).
template <int E, int L = 32>
__device__ __forceinline__ void stage_rows(float* xs, const float* x, u32 rows, u32 cols, u32 padded) {
    const u32 pq = padded / 4, total = rows * pq;
    const bool v4 = (cols & 3) == 0 && ((u64)x & 15) == 0;
    for (u32 q0 = threadIdx.x; q0 < total; q0 += 4 * blockDim.x) {
        float4 v[4];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const u32 q = q0 + b * blockDim.x;
            const u32 j = q / pq, e = 4 * (q - j * pq);
            const float* src = x + (u64)j * cols + e;
            if (q < total && e < cols) {
                if (v4) {
                    v[b] = __ldg((const float4*)src);
                } else {
                    v[b].x = src[0];
                    v[b].y = e + 1 < cols ? src[1] : 0.f;
                    v[b].z = e + 2 < cols ? src[2] : 0.f;
                    v[b].w = e + 3 < cols ? src[3] : 0.f;
                }
            } else {
                v[b] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
#pragma unroll
        for (int b = 0; b < 4; b++) {
            const u32 q = q0 + b * blockDim.x;
            if (q >= total) break;
            const u32 j = q / pq, e = 4 * (q - j * pq);
            const u32 base = e / (L * E) * (L * E);
            const u32 rem = e - base;
            const u32 lane = rem / E, f = (rem % E) >> 2;
            *(float4*)(xs + (u64)j * padded + base + f * (4 * L) + lane * 4) = v[b];
        }
    }
}

template <int E, int L = 32>
__device__ __forceinline__ void stage_x(float* xs, const float* x, u32 cols, u32 padded) {
    stage_rows<E, L>(xs, x, 1, cols, padded);
}

// 2^23 + q, minus 2^23: exact int -> float for q < 2^23 without the (slow) I2F unit.
__device__ __forceinline__ float qf(u32 q) { return __uint_as_float(0x4B000000u | q) - 8388608.f; }

// Quantized codes are turned into floats 1 + q / 2^bits by moving them into the top mantissa
// bits under the exponent of 1.0 (a shift and a LOP3, no conversion); the dot of those with x
// is sum(x) + sum(q x) / 2^bits, and the caller recovers sum(q x) = 2^bits (dot - sum(x)) once
// per 16 bytes. The subtraction loses at most bits + 1 bits relative to sum(|x|), far below
// the f32 parity tolerance.
template <int SHIFT>  // SHIFT > 0: left, < 0: right
__device__ __forceinline__ u32 shl(u32 w) { return SHIFT >= 0 ? (w << (SHIFT & 31)) : (w >> ((-SHIFT) & 31)); }

template <int J>  // nibble J of w as 1 + q / 16
__device__ __forceinline__ float q4one(u32 w) { return __uint_as_float((shl<19 - 4 * J>(w) & 0x00780000u) | 0x3F800000u); }

template <int J>  // byte J of w as 1 + q / 256
__device__ __forceinline__ float q8one(u32 w) { return __uint_as_float((shl<15 - 8 * J>(w) & 0x007F8000u) | 0x3F800000u); }

// Dot of the 16 weight bytes `wv` (E elements) with the lane's E inputs `xv` (F = E/4 float4).
// Dense formats: the plain dot. Affine formats: sum((1 + q / 2^bits) x) (see above).
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
        // float4 f covers nibbles 4 (f & 1) .. + 3 of word f >> 1
        float d0 = 0.f, d1 = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            u32 word = ws[w];
            float4 a = xv[2 * w], b = xv[2 * w + 1];
            d0 += q4one<0>(word) * a.x + q4one<1>(word) * a.y + q4one<2>(word) * a.z + q4one<3>(word) * a.w;
            d1 += q4one<4>(word) * b.x + q4one<5>(word) * b.y + q4one<6>(word) * b.z + q4one<7>(word) * b.w;
        }
        d = d0 + d1;
    } else {
#pragma unroll
        for (int f = 0; f < 4; f++) {
            u32 word = ws[f];
            float4 x = xv[f];
            d += q8one<0>(word) * x.x + q8one<1>(word) * x.y + q8one<2>(word) * x.z + q8one<3>(word) * x.w;
        }
    }
    return d;
}

// Per-lane partial dots of rows r0..r0+R of NM matrices (same rows, cols, group and format;
// gate and up share x) with the permuted staged x (vector path). A row group of L lanes (32,
// 16 or 8: the warp holds 32 / L of them, each with its own r0) walks a row in steps of L * E
// elements, NM * R 16-byte loads per lane per step. Rows past the end are clamped to the last
// row (their results are discarded by the caller).
// `stage` runs once, after the first step's loads are issued and before x is first read: the
// caller stages x there (and synchronises), so the staging overlaps the weights' latency. Every
// thread of the block must call this (with the same cols) when `stage` synchronises.
// (Measured on the H100, run 14: issuing two or four steps' loads at once, or loading the
// scales ahead with them, raised register use and made the q4 matvecs 5-50% slower.)
template <int FMT, int R, int L, int NM, typename Stage>
__device__ __forceinline__ void mv_vec_n(const WMat* w, const float* xs, u32 r0, float (*acc)[R], Stage stage) {
    constexpr int E = elems16<FMT>();
    constexpr int F = E / 4;
    constexpr bool AFF = FMT == FMT_Q4 || FMT == FMT_Q8;
    constexpr float QS = FMT == FMT_Q4 ? 16.f : 256.f;
    constexpr u32 SPAN = L * E;
    const u32 sl = threadIdx.x & (L - 1);
    const u32 cols = w[0].cols;
    const u64 rb = row_bytes<FMT>(cols);
    const u32 groups = AFF ? cols / w[0].group : 1;
    u32 rr[R];
#pragma unroll
    for (int j = 0; j < R; j++) rr[j] = min(r0 + j, w[0].rows - 1);
    for (u32 base = 0; base < cols; base += SPAN) {
        const u32 e0 = base + sl * E;
        const bool ok = e0 < cols;
        uint4 wv[NM][R];
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int j = 0; j < R; j++)
                wv[m][j] = ok ? __ldg((const uint4*)(w[m].data + (u64)rr[j] * rb + elem_byte<FMT>(e0)))
                              : make_uint4(0, 0, 0, 0);
        if (base == 0) stage();
        if (!ok) continue;
        const float* xb = xs + base + sl * 4;
        float4 xv[F];
#pragma unroll
        for (int f = 0; f < F; f++) xv[f] = *(const float4*)(xb + f * (4 * L));
        float sx = 0.f;
        if (AFF) {
#pragma unroll
            for (int f = 0; f < F; f++) sx += (xv[f].x + xv[f].y) + (xv[f].z + xv[f].w);
        }
        const u32 gi = AFF ? e0 / w[0].group : 0;
#pragma unroll
        for (int m = 0; m < NM; m++)
#pragma unroll
            for (int j = 0; j < R; j++) {
                const float d = dot16<FMT>(wv[m][j], xv);
                if (AFF) {
                    const u64 g = (u64)rr[j] * groups + gi;
                    acc[m][j] += load_float(w[m].scales, w[m].sdt, g) * (QS * (d - sx)) + load_float(w[m].biases, w[m].sdt, g) * sx;
                } else {
                    acc[m][j] += d;
                }
            }
    }
}

// Sum over the L lanes of a row group (every lane of the warp must call it).
template <int L>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Scalar path: lanes stride over columns; x staged unpermuted.
template <int FMT, int R>
__device__ __forceinline__ void mv_scalar(const WMat& w, const float* xs, u32 r0, float* acc) {
    const u32 lane = threadIdx.x & 31;
#pragma unroll
    for (int j = 0; j < R; j++) {
        u32 r = min(r0 + j, w.rows - 1);
        float a = 0.f;
        for (u32 c = lane; c < w.cols; c += 32) a += wload<FMT>(w, r, c) * xs[c];
        acc[j] = a;
    }
}

// Stage x and compute this warp's R row dots into acc (reduced across the warp: every lane
// holds the totals). All threads of the block must call it (it synchronises). On the vector
// path the first weight loads are in flight while x is staged.
template <int FMT, bool VEC, int R>
__device__ __forceinline__ void mv_block(const WMat& w, float* xs, const float* x, u32 r0, float* acc) {
    constexpr int E = VEC ? elems16<FMT>() : 4;
    auto stage = [&]() {
        stage_x<E>(xs, x, w.cols, mv_padded<E>(w.cols));
        __syncthreads();
    };
#pragma unroll
    for (int j = 0; j < R; j++) acc[j] = 0.f;
    if (VEC) {
        float a[1][R];
#pragma unroll
        for (int j = 0; j < R; j++) a[0][j] = 0.f;
        mv_vec_n<FMT, R, 32, 1>(&w, xs, r0, a, stage);
#pragma unroll
        for (int j = 0; j < R; j++) acc[j] = a[0][j];
    } else {
        stage();
        if (r0 < w.rows) mv_scalar<FMT, R>(w, xs, r0, acc);
    }
#pragma unroll
    for (int j = 0; j < R; j++) acc[j] = warp_sum(acc[j]);
}

// ---------------------------------------------------------------------------------------------
// Tiled GEMM

#define GT_M 64  // tokens (rows of x / output) per tile of the dense GEMM
#define MOE_TM 16  // (token, slot) pairs per tile of the expert GEMMs: an expert sees few pairs
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
// TM (16 or 64) rows of x per tile; `xr[i]` / `orow[i]` (shared memory, TM entries) are the
// input / output rows of tile row i, null for rows past the end. K = w0.cols. Block: 256
// threads as 16 (weight rows, 4 each) x 16 (x rows, TM / 16 each).
template <int FMT, int NMAT, int TM>
__device__ __forceinline__ void gemm_tile(const WMat& w0, const WMat& w1, const float* const* xr, float* const* orow,
                                          u32 r0, GemmSmem& sm) {
    constexpr int TI = TM / 16;  // x rows per thread
    const u32 tid = threadIdx.x;
    const u32 tx = tid & 15, ty = tid >> 4;
    const u32 K = w0.cols;
    float acc[NMAT][TI][4];
#pragma unroll
    for (int m = 0; m < NMAT; m++)
#pragma unroll
        for (int i = 0; i < TI; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[m][i][j] = 0.f;

    const u32 li = tid >> 2, lk = (tid & 3) * 8;  // loader: tile row li, k offset lk (8 elements)
    for (u32 k0 = 0; k0 < K; k0 += GT_K) {
        if (li < TM) {
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
            float av[TI];
            if (TI == 4) {
                float4 a = *(const float4*)&sm.xs[kk][ty * 4];
                av[0] = a.x;
                av[TI > 1 ? 1 : 0] = a.y;
                av[TI > 2 ? 2 : 0] = a.z;
                av[TI > 3 ? 3 : 0] = a.w;
            } else {
#pragma unroll
                for (int i = 0; i < TI; i++) av[i] = sm.xs[kk][ty * TI + i];
            }
#pragma unroll
            for (int m = 0; m < NMAT; m++) {
                float4 b = *(const float4*)&sm.ws[m][kk][tx * 4];
                float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < TI; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[m][i][j] += av[i] * bv[j];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TI; i++) {
        float* o = orow[ty * TI + i];
        if (o == 0) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            u32 r = r0 + tx * 4 + j;
            if (r >= w0.rows) continue;
            o[r] = NMAT == 1 ? acc[0][i][j] : silu_f(acc[0][i][j]) * acc[NMAT - 1][i][j];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Streamed matrix-vector products (decode, one token)
//
// The mv_* kernels above keep a warp's in-flight weights in registers, one step of R rows at a
// time, so how many bytes are in flight is tied to occupancy and register use. Here weights pass
// through shared memory instead: cp.async (sm_80+) copies tiles of whole rows (codes, and for
// affine formats their scales and biases) MS_STAGES - 1 tiles ahead of the tile being computed,
// so each block keeps tens of KB in flight whatever its registers. A tile is TR = MS_R * (256 /
// L) rows: each L-lane row group of the block takes MS_R consecutive rows and walks them in
// steps of L * E elements with x staged (permuted, as above) in shared memory and read once per
// step for its MS_R rows. For affine formats the per-lane sums of x per step are computed once
// per block (`sxs`).
#define MS_STAGES 4

// 16 bytes global -> shared, asynchronously where the arch has cp.async.
__device__ __forceinline__ void cp16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
#else
    *(uint4*)dst = *(const uint4*)src;
#endif
}

__device__ __forceinline__ void cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// 4 bytes global -> shared, asynchronously where the arch has cp.async.
__device__ __forceinline__ void cp4(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(src) : "memory");
#else
    *(u32*)dst = *(const u32*)src;
#endif
}

// `bytes` from src to dst, spread over the block: 16-byte asynchronous copies when both
// addresses and the size are multiples of 16, 4-byte ones when they are multiples of 4, and
// plain byte copies otherwise (scales of checkpoints that pack tensors off their alignment).
__device__ __forceinline__ void cp_block(u8* dst, const u8* src, u32 bytes) {
    const u64 a = (u64)src | (u64)dst | bytes;
    if ((a & 15) == 0) {
        for (u32 o = threadIdx.x * 16; o < bytes; o += blockDim.x * 16) cp16(dst + o, src + o);
    } else if ((a & 3) == 0) {
        for (u32 o = threadIdx.x * 4; o < bytes; o += blockDim.x * 4) cp4(dst + o, src + o);
    } else {
        for (u32 o = threadIdx.x; o < bytes; o += blockDim.x) dst[o] = src[o];
    }
}

// Sums of x per 16-byte weight chunk (E elements), sxs[c] for chunk c < padded / E, from the
// permuted staged x (see stage_rows). Affine formats use them to recover sum(q x).
template <int E, int L>
__device__ __forceinline__ void chunk_sums(float* sxs, const float* xs, u32 padded) {
    constexpr int F = E / 4;
    for (u32 c = threadIdx.x; c < padded / E; c += blockDim.x) {
        const u32 base = c / L * (L * E), lane = c % L;
        float s = 0.f;
#pragma unroll
        for (int f = 0; f < F; f++) {
            const float4 v = *(const float4*)(xs + base + f * (4 * L) + lane * 4);
            s += (v.x + v.y) + (v.z + v.w);
        }
        sxs[c] = s;
    }
}

// Per-lane partial dots of R consecutive rows of a tile in shared memory (`codes`: row j at
// codes + j * rb; `sc` / `bi`: row j's scales / biases at + j * sb, affine only) with the staged
// x, for this thread's lane of an L-lane row group.
template <int FMT, int R, int L>
__device__ __forceinline__ void ms_rows(const u8* codes, const u8* sc, const u8* bi, u32 rb, u32 sb, int sdt, u32 cols,
                                        u32 group, const float* xs, const float* sxs, float* acc) {
    constexpr int E = elems16<FMT>();
    constexpr int F = E / 4;
    constexpr bool AFF = FMT == FMT_Q4 || FMT == FMT_Q8;
    constexpr float QS = FMT == FMT_Q4 ? 16.f : 256.f;
    const u32 sl = threadIdx.x & (L - 1);
    for (u32 base = 0; base < cols; base += L * E) {
        const u32 e0 = base + sl * E;
        if (e0 >= cols) break;
        float4 xv[F];
#pragma unroll
        for (int f = 0; f < F; f++) xv[f] = *(const float4*)(xs + base + sl * 4 + f * (4 * L));
        const float sx = AFF ? sxs[e0 / E] : 0.f;
        const u32 gi = AFF ? e0 / group : 0;
#pragma unroll
        for (int j = 0; j < R; j++) {
            const uint4 wv = *(const uint4*)(codes + j * rb + elem_byte<FMT>(e0));
            const float d = dot16<FMT>(wv, xv);
            if (AFF) {
                acc[j] += load_float(sc + j * sb, sdt, gi) * (QS * (d - sx)) + load_float(bi + j * sb, sdt, gi) * sx;
            } else {
                acc[j] += d;
            }
        }
    }
}
