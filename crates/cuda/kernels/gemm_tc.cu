// gemm_tc.cu: prefill GEMMs on the tensor cores (mma.sync m16n8k16, f16 or bf16 in, f32 accumulate).
// Needs sm_80 or newer; the host only picks these kernels on such devices, and keeps them in
// their own program so an older GPU loses nothing else.
//
// Exactness. The SIMT kernels compute in f32; these must agree with them (and the CPU
// reference) to ~1e-6, so nothing is rounded that the f32 path keeps:
//  * affine weights (q4, q8): W[r, c] = s[r, g] * q[r, c] + b[r, g], and per group slice
//    sum_c W x = s * sum_c q x + b * sum_c x. The codes q (0..255) are exact in f16, so the
//    tensor cores compute sum q x, and s, b and sum x are applied in f32 per 32-column slice.
//  * bf16 weights are exact in bf16 as they are.
//  * bf16 weights: x (f32) is split in the tile into three bf16 parts x = hi + mid + lo (each
//    the rounded remainder of the previous), exact to ~2^-27 relative; every product of a bf16
//    weight with a part is exact in the f32 accumulator. Three mma per k16 step.
//  * affine weights: x is split once per call, before the GEMM, by tc_split_f16 (not once per
//    tile, which cost about half of the tile's instructions): each row is scaled by a power of
//    two 2^e that puts its largest magnitude in [2^14, 2^15), then split into two f16 parts
//    hi + lo. That keeps 22 bits of every element (error <= 2^-22 |x| + 2^-40 max|x|, the
//    second term from f16 subnormals), codes 0..255 are exact in f16, and f16 x f16 products
//    are exact in f32. Two mma per k16 step; the output is scaled back by 2^-e (exact).
//    Split row layout (floats): [2^-e, 0, 0, 0] then per 32-column stage 36 floats: 32 f16 hi,
//    32 f16 lo, the stage's sum of the scaled x, 3 of padding (tc_split_stride).
//
// Tile: TM tokens (32 or 64) x 64 weight rows, K in stages of 32, 128 threads = 4 warps as
// 2 (tokens) x 2 (rows); a warp owns TM/2 tokens x 32 rows = (TM/32) x 4 mma tiles.
// Shared memory rows are 40 bf16 (80 bytes) apart: ldmatrix rows fall in distinct banks.
// Stage s + 1's global loads are issued before stage s's mma (TcRaw). Launch bounds hold the
// kernels to 128 registers, four blocks per SM (run 34: 30b prefill 4096 +5% over 155
// registers and three blocks).
// Rows of x and of the output come from per-tile pointer tables (null past the end), so the
// same tile serves the dense GEMM and the expert-grouped pairs of the MoE.
//
// Kernels (F in q4, q8, bf16):
//   tc_split_f16(const float* x, const u32* live, u32 ne, u32 rows, u32 cols, float* dst): grid
//     (rows); the split x that
//     the q4 and q8 kernels below take in place of x (their x_width / cols name the f32 row).
//   gemm_tc_F(WMat w, const float* x, float* out, u32 n): grid (ceil(rows / 64), ceil(n / 64)).
//   moe_tc_gate_up_F / moe_tc_down_F: as moe_gemm_* in moe.cu (tiles of up to TM pairs of one
//     expert from moe_route), TM = 32 or 64 by name suffix. gate_up: a block computes 32 rows
//     of gate and the same 32 rows of up and writes silu(gate) * up; grid (ceil(inter / 32),
//     max_tiles). down: grid (ceil(hidden / 64), max_tiles).
// Host-checked requirements: cols % 32 == 0, group % 32 == 0 (affine), weight data 16-byte
// aligned, x rows 16-byte aligned.
#include "common.cuh"
#include "gemv.cuh"

#define TC_K 32
#define TC_LD 40  // bf16 per shared-memory row (32 + 8 padding)
#define TC_SPLIT 3
// Whether a weight format takes the pre-split f16 x (affine codes) rather than bf16 parts.
#define TC_PRE(FMT) ((FMT) == FMT_Q4 || (FMT) == FMT_Q8)

// Floats per row of split x (layout above).
__device__ __forceinline__ u32 tc_split_stride(u32 cols) { return 4 + cols / 32 * 36; }

struct TcSmem {
    u16 xs[TC_SPLIT][64][TC_LD];  // x parts, [token][k]
    u16 ws[64][TC_LD];            // weights / codes, [row][k]
    float sc[64], bi[64];         // scale and bias of each tile row for this stage
    float sx[64];                 // sum of x over this stage's 32 columns, per token
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void ldm4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_f16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 f16_rn(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Two codes (< 1024) as packed exact f16: 1024 + q has q in the mantissa of 2^10, and the
// f16x2 subtraction of 1024 is exact.
__device__ __forceinline__ u32 codes_f16x2(u32 lo, u32 hi) {
    u32 r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(lo | (hi << 16) | 0x64006400u), "r"(0x64006400u));
    return r;
}

// x [rows, cols] f32 -> split rows (layout above). Grid (rows), block 256; cols % 32 == 0,
// rows of x 16-byte aligned. With `live` (non-null), row r is an expert pair and is skipped
// when live[r] >= ne, as the expert kernels skip it (another wave's pair).
extern "C" __global__ void __launch_bounds__(256) tc_split_f16(const float* x, const u32* live, u32 ne, u32 rows, u32 cols,
                                                               float* dst) { pdl_prologue();
    __shared__ float red[32];
    const u32 r = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (live != 0 && live[r] >= ne) return;  // uniform across the block
    const float4* xr = (const float4*)(x + (u64)r * cols);
    float* d = dst + (u64)r * tc_split_stride(cols);
    const u32 n4 = cols / 4;
    float m = 0.f;
    for (u32 i = tid; i < n4; i += 256) {
        const float4 v = xr[i];
        m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
    }
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = warp_max(lane < 8 ? red[lane] : 0.f);
    int e = 0;
    if (m > 0.f) {
        int ex;
        frexpf(m, &ex);  // m < 2^ex
        e = min(max(15 - ex, -100), 100);
    }
    const float sc = ldexpf(1.f, e);
    if (tid < 4) d[tid] = tid == 0 ? ldexpf(1.f, -e) : 0.f;
    // Eight consecutive lanes hold one 32-column stage (n4 is a multiple of 8).
    for (u32 base = 0; base < n4; base += 256) {
        const u32 i = base + tid;
        const bool ok = i < n4;
        const float4 v = ok ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        const float y[4] = {v.x * sc, v.y * sc, v.z * sc, v.w * sc};
        u32 hi[4], lo[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            hi[j] = f16_rn(y[j]);
            lo[j] = f16_rn(y[j] - f16_to_f32((u16)hi[j]));
        }
        float sum = (y[0] + y[1]) + (y[2] + y[3]);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        if (ok) {
            const u32 st = i >> 3, q = i & 7;
            float* sd = d + 4 + st * 36;
            *(uint2*)(sd + q * 2) = make_uint2(hi[0] | (hi[1] << 16), hi[2] | (hi[3] << 16));
            *(uint2*)(sd + 16 + q * 2) = make_uint2(lo[0] | (lo[1] << 16), lo[2] | (lo[3] << 16));
            if (q == 0) sd[32] = sum;
        }
    }
}

// Round-to-nearest-even f32 -> bf16 bits (finite inputs).
__device__ __forceinline__ u32 bf16_rn(float f) {
    u32 b = __float_as_uint(f);
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

// The three bf16 parts of v, packed as part p of 4 consecutive values.
__device__ __forceinline__ void split3(float v, u32* part) {
    u32 h = bf16_rn(v);
    float r = v - __uint_as_float(h << 16);
    u32 m = bf16_rn(r);
    float r2 = r - __uint_as_float(m << 16);
    part[0] = h;
    part[1] = m;
    part[2] = bf16_rn(r2);
}


// One K stage's global data, held in registers from the moment its loads are issued until
// it is converted into shared memory: the tile issues stage s + 1's loads before it computes
// stage s, so their latency hides behind the mma work (one stage of software pipelining;
// before, every stage waited for its own loads).
template <int FMT, int TM>
struct TcRaw {
    static constexpr int XI = TM * 8 / 128;  // float4 of x per thread
    static constexpr int CH = FMT == FMT_Q4 ? 1 : FMT == FMT_Q8 ? 2 : 4;  // 16-byte chunks per row
    static constexpr int WI = (64 * CH + 127) / 128;  // weight chunks per thread
    float4 x[XI];   // f32 x (bf16 weights)
    uint4 xp[XI];   // split x: 8 uint4 per token, hi then lo (affine weights)
    uint4 w[WI];
    float sb;  // a scale (threads 0..63) or bias (64..127) of the stage
    float sx;  // split x: the stage's sum for token `tid` (tid < TM)
};

// Issues the loads of stage k0: TM tokens x 32 floats of x, 64 weight rows (`w0` rows r0..,
// or for NMAT == 2 rows 0..31 of the tile from w0 and 32..63 from w1, both from r0) and
// their scales and biases.
template <int FMT, int NMAT, int TM>
__device__ __forceinline__ void tc_load(TcRaw<FMT, TM>& raw, const float* const* xr, const WMat& w0, const WMat& w1, u32 r0,
                                        u32 k0) {
    typedef TcRaw<FMT, TM> R;
    const u32 tid = threadIdx.x;
    if (TC_PRE(FMT)) {
        const u32 so = 4 + (k0 / 32) * 36;  // the stage's floats in a split row
#pragma unroll
        for (int it = 0; it < R::XI; it++) {
            const u32 i = tid + 128 * it;
            const u32 tok = i >> 3, j = i & 7;
            const float* src = xr[tok];
            raw.xp[it] = src != 0 ? *(const uint4*)(src + so + j * 4) : make_uint4(0, 0, 0, 0);
        }
        raw.sx = 0.f;
        if (tid < TM && xr[tid] != 0) raw.sx = xr[tid][so + 32];
    } else {
#pragma unroll
        for (int it = 0; it < R::XI; it++) {
            const u32 i = tid + 128 * it;
            const u32 tok = i >> 3, q = i & 7;
            const float* src = xr[tok];
            raw.x[it] = src != 0 ? *(const float4*)(src + k0 + q * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
#pragma unroll
    for (int it = 0; it < R::WI; it++) {
        const u32 i = tid + 128 * it;
        const u32 tr = i / R::CH, c = i % R::CH;
        const WMat& w = (NMAT == 2 && tr >= 32) ? w1 : w0;
        const u32 r = r0 + (NMAT == 2 ? (tr & 31) : tr);
        raw.w[it] = make_uint4(0, 0, 0, 0);
        if (i < 64 * R::CH && r < w.rows)
            raw.w[it] = __ldg((const uint4*)(w.data + (u64)r * row_bytes<FMT>(w.cols) + elem_byte<FMT>(k0) + 16 * c));
    }
    if (FMT == FMT_Q4 || FMT == FMT_Q8) {
        const u32 tr = tid & 63;
        const WMat& w = (NMAT == 2 && tr >= 32) ? w1 : w0;
        const u32 r = r0 + (NMAT == 2 ? (tr & 31) : tr);
        raw.sb = 0.f;
        if (r < w.rows) raw.sb = load_float(tid < 64 ? w.scales : w.biases, w.sdt, (u64)r * (w.cols / w.group) + k0 / w.group);
    }
}

// Converts a stage into shared memory: x parts (copied when split before the call, else split
// here) with per-token sums, codes into f16, scales and biases.
template <int FMT, int TM>
__device__ __forceinline__ void tc_store(TcSmem& sm, const TcRaw<FMT, TM>& raw) {
    typedef TcRaw<FMT, TM> R;
    const u32 tid = threadIdx.x;
    if (TC_PRE(FMT)) {
#pragma unroll
        for (int it = 0; it < R::XI; it++) {
            const u32 i = tid + 128 * it;
            const u32 tok = i >> 3, j = i & 7;
            *(uint4*)&sm.xs[j >> 2][tok][(j & 3) * 8] = raw.xp[it];
        }
        if (tid < TM) sm.sx[tid] = raw.sx;
    } else {
#pragma unroll
    for (int it = 0; it < R::XI; it++) {
        const u32 i = tid + 128 * it;
        const u32 tok = i >> 3, q = i & 7;
        const float4 v = raw.x[it];
        float vs[4] = {v.x, v.y, v.z, v.w};
        u32 parts[4][TC_SPLIT];
#pragma unroll
        for (int j = 0; j < 4; j++) split3(vs[j], parts[j]);
#pragma unroll
        for (int s = 0; s < TC_SPLIT; s++) {
            uint2 pk = make_uint2(parts[0][s] | (parts[1][s] << 16), parts[2][s] | (parts[3][s] << 16));
            *(uint2*)&sm.xs[s][tok][q * 4] = pk;
        }
        // The 8 lanes of one token are consecutive lanes of one warp.
        float sum = (v.x + v.y) + (v.z + v.w);
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        if (q == 0) sm.sx[tok] = sum;
    }
    }
#pragma unroll
    for (int it = 0; it < R::WI; it++) {
        const u32 i = tid + 128 * it;
        if (i >= 64 * R::CH) break;
        const u32 tr = i / R::CH, c = i % R::CH;
        const uint4 v = raw.w[it];
        u32 ws[4] = {v.x, v.y, v.z, v.w};
        if (FMT == FMT_Q4) {
            // 32 codes -> 32 f16 (16 words)
            u32 o[16];
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int b = 0; b < 4; b++) {
                    u32 byte = (ws[j] >> (8 * b)) & 0xffu;
                    o[4 * j + b] = codes_f16x2(byte & 15u, byte >> 4);
                }
            uint4* dst = (uint4*)&sm.ws[tr][0];
#pragma unroll
            for (int j = 0; j < 4; j++) dst[j] = make_uint4(o[4 * j], o[4 * j + 1], o[4 * j + 2], o[4 * j + 3]);
        } else if (FMT == FMT_Q8) {
            u32 o[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                o[2 * j] = codes_f16x2(ws[j] & 0xffu, (ws[j] >> 8) & 0xffu);
                o[2 * j + 1] = codes_f16x2((ws[j] >> 16) & 0xffu, ws[j] >> 24);
            }
            uint4* dst = (uint4*)&sm.ws[tr][16 * c];
            dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
            dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
        } else {
            *(uint4*)&sm.ws[tr][8 * c] = v;
        }
    }
    if (FMT == FMT_Q4 || FMT == FMT_Q8) {
        if (tid < 64) sm.sc[tid] = raw.sb;
        else sm.bi[tid & 63] = raw.sb;
    }
}

// The tile: out rows r0.. (NMAT == 1: x . w0; NMAT == 2: silu(x . w0) * (x . w1) for 32 rows).
template <int FMT, int NMAT, int TM>
__device__ __forceinline__ void tc_tile(const WMat& w0, const WMat& w1, const float* const* xr, float* const* orow, u32 r0,
                                        TcSmem& sm) {
    constexpr bool AFF = FMT == FMT_Q4 || FMT == FMT_Q8;
    constexpr int MT = TM / 32;  // m16 tiles per warp
    const u32 tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const u32 g = lane >> 2, tig = lane & 3;
    const u32 wm = warp & 1, wn = warp >> 1;
    const u32 K = w0.cols;
    float acc[MT][4][4];
    float part[MT][4][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int n = 0; n < 4; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[m][n][e] = 0.f;

    TcRaw<FMT, TM> raw;
    tc_load<FMT, NMAT, TM>(raw, xr, w0, w1, r0, 0);
    for (u32 k0 = 0; k0 < K; k0 += TC_K) {
        tc_store<FMT, TM>(sm, raw);
        __syncthreads();
        if (k0 + TC_K < K) tc_load<FMT, NMAT, TM>(raw, xr, w0, w1, r0, k0 + TC_K);
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int n = 0; n < 4; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) part[m][n][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            // B fragments of the warp's four n8 tiles (two ldmatrix.x4, each two tiles).
            u32 b[4][2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 mat = lane >> 3, r = lane & 7;
                const u32 n = wn * 32 + h * 16 + (mat >> 1) * 8 + r;
                u32 t[4];
                ldm4(t, &sm.ws[n][kk * 16 + (mat & 1) * 8]);
                b[2 * h][0] = t[0];
                b[2 * h][1] = t[1];
                b[2 * h + 1][0] = t[2];
                b[2 * h + 1][1] = t[3];
            }
#pragma unroll
            for (int s = 0; s < (AFF ? 2 : TC_SPLIT); s++)
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    u32 a[4];
                    const u32 row = wm * (TM / 2) + m * 16 + (lane & 15);
                    ldm4(a, &sm.xs[s][row][kk * 16 + (lane >> 4) * 8]);
#pragma unroll
                    for (int n = 0; n < 4; n++) {
                        if (AFF) mma_f16(part[m][n], a, b[n][0], b[n][1]);
                        else mma_bf16(acc[m][n], a, b[n][0], b[n][1]);
                    }
                }
        }
        if (AFF) {
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int n = 0; n < 4; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const u32 tok = wm * (TM / 2) + m * 16 + g + (e >> 1) * 8;
                        const u32 col = wn * 32 + n * 8 + tig * 2 + (e & 1);
                        acc[m][n][e] += sm.sc[col] * part[m][n][e] + sm.bi[col] * sm.sx[tok];
                    }
        }
        __syncthreads();
    }

    if (NMAT == 1) {
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 tok = wm * (TM / 2) + m * 16 + g + h * 8;
                float* o = orow[tok];
                if (o == 0) continue;
                const float inv = AFF ? xr[tok][0] : 1.f;  // 2^-e of split x
#pragma unroll
                for (int n = 0; n < 4; n++) {
                    const u32 r = r0 + wn * 32 + n * 8 + tig * 2;
                    if (r < w0.rows) o[r] = acc[m][n][2 * h] * inv;
                    if (r + 1 < w0.rows) o[r + 1] = acc[m][n][2 * h + 1] * inv;
                }
            }
    } else {
        // Warps wn = 0 hold gate, wn = 1 up, at the same (token, row) positions.
        float(*ep)[33] = (float(*)[33])&sm.xs[0][0][0];  // 64 x 33 floats fit in xs
        if (wn == 0) {
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int n = 0; n < 4; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        ep[wm * (TM / 2) + m * 16 + g + (e >> 1) * 8][n * 8 + tig * 2 + (e & 1)] = acc[m][n][e];
        }
        __syncthreads();
        if (wn == 1) {
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const u32 tok = wm * (TM / 2) + m * 16 + g + (e >> 1) * 8;
                    float* o = orow[tok];
                    if (o == 0) continue;
                    const float inv = AFF ? xr[tok][0] : 1.f;  // 2^-e of split x
#pragma unroll
                    for (int n = 0; n < 4; n++) {
                        const u32 c = n * 8 + tig * 2 + (e & 1);
                        const u32 r = r0 + c;
                        if (r < w0.rows) o[r] = silu_f(ep[tok][c] * inv) * (acc[m][n][e] * inv);
                    }
                }
        }
    }
}

template <int FMT>
__device__ __forceinline__ void gemm_tc_body(const WMat& w, const float* x, float* out, u32 n) {
    __shared__ TcSmem sm;
    __shared__ const float* xr[64];
    __shared__ float* orow[64];
    const u32 t0 = blockIdx.y * 64;
    if (threadIdx.x < 64) {
        u32 t = t0 + threadIdx.x;
        xr[threadIdx.x] = t < n ? x + (u64)t * (TC_PRE(FMT) ? tc_split_stride(w.cols) : w.cols) : 0;
        orow[threadIdx.x] = t < n ? out + (u64)t * w.rows : 0;
    }
    __syncthreads();
    tc_tile<FMT, 1, 64>(w, w, xr, orow, blockIdx.x * 64, sm);
}

template <int FMT, int NMAT, int TM>
__device__ __forceinline__ void moe_tc_body(const u64* table, const u32* sorted, const u32* tiles, const u32* ntiles, const float* x,
                                            u32 gather_div, u32 x_width, u32 rows, u32 cols, u32 group, int sdt, float* out,
                                            u32 out_width) {
    __shared__ TcSmem sm;
    __shared__ const float* xr[TM];
    __shared__ float* orow[TM];
    const u32 xw = TC_PRE(FMT) ? tc_split_stride(x_width) : x_width;
    const u32 e = expert_tile_rows<TM>(sorted, tiles, ntiles, x, gather_div, xw, out, out_width, xr, orow);
    if (e == 0xffffffffu) return;  // past the tile count, uniform across the block
    WMat w0 = expert_mat(table, e, NMAT == 2 ? 0 : 2, rows, cols, group, sdt);
    WMat w1 = NMAT == 2 ? expert_mat(table, e, 1, rows, cols, group, sdt) : w0;
    tc_tile<FMT, NMAT, TM>(w0, w1, xr, orow, blockIdx.x * (NMAT == 2 ? 32 : 64), sm);
}

#define TC_MOE(NAME, FMT, TM)                                                                                              \
    extern "C" __global__ void __launch_bounds__(128, 4) moe_tc_gate_up_##NAME##_m##TM(const u64* table, const u32* sorted,  \
        const u32* tiles, const u32* ntiles, const float* x, u32 k, u32 hidden, u32 inter, u32 group, int sdt, float* h) { pdl_prologue(); \
        moe_tc_body<FMT, 2, TM>(table, sorted, tiles, ntiles, x, k, hidden, inter, hidden, group, sdt, h, inter);          \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 4) moe_tc_down_##NAME##_m##TM(const u64* table, const u32* sorted,     \
        const u32* tiles, const u32* ntiles, const float* h, u32 hidden, u32 inter, u32 group, int sdt, float* y) { pdl_prologue();       \
        moe_tc_body<FMT, 1, TM>(table, sorted, tiles, ntiles, h, 1, inter, hidden, inter, group, sdt, y, hidden);          \
    }

#define TC_KERNELS(NAME, FMT)                                                                                              \
    extern "C" __global__ void __launch_bounds__(128, 4) gemm_tc_##NAME(WMat w, const float* x, float* out, u32 n) { pdl_prologue();         \
        gemm_tc_body<FMT>(w, x, out, n);                                                                                   \
    }                                                                                                                      \
    TC_MOE(NAME, FMT, 32)                                                                                                  \
    TC_MOE(NAME, FMT, 64)

TC_KERNELS(bf16, FMT_BF16)
TC_KERNELS(q4, FMT_Q4)
TC_KERNELS(q8, FMT_Q8)
