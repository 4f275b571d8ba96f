// common.cuh: helpers shared by every moeflux kernel file.
//
// Pasted in front of each kernel source by the Rust side (NVRTC is given one translation unit
// per .cu file and no include paths), so nothing here may #include system headers: fp16/bf16
// conversions use PTX directly.
//
// Dtype codes (must match `crates/cuda/src/kernels.rs`):
//   DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2                 -- floats of stored vectors / scales
// Weight formats of a matrix [rows, cols] (row-major, rows = outputs):
//   FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2              -- dense
//   FMT_Q4 = 3, FMT_Q8 = 4                              -- MLX affine: u32 words, little-endian,
//       element j of a word at bits bits*j (so for 4-bit, byte b holds elements 2b (low nibble)
//       and 2b+1); scales/biases [rows, cols/group] of a float dtype; w = scale * q + bias.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

#define NEG_INF __int_as_float(0xff800000)

#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_Q4 3
#define FMT_Q8 4

// Dynamic shared memory of every kernel that takes some (16-byte aligned).
extern __shared__ float4 smem4[];

// Programmatic dependent launch (sm_90+): every kernel starts with this. The host launches
// kernels with programmatic stream serialisation, so a kernel may be scheduled while the one
// before it is still running; `griddepcontrol.wait` holds it until that kernel has finished
// and its writes are visible, then `launch_dependents` lets the next kernel be scheduled in
// turn (at most one kernel waits ahead). Without the launch attribute both are no-ops.
__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

__device__ __forceinline__ float bf16_to_f32(u32 h) { return __uint_as_float(h << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Element i of a stored float array of dtype `dt`. Stored tensors need not be aligned to
// their element size (safetensors packs them back to back), so a misaligned array is read
// byte by byte.
__device__ __forceinline__ float load_float(const void* p, int dt, u64 i) {
    if (dt == DT_F32) {
        if (((u64)p & 3) == 0) return ((const float*)p)[i];
        const u8* b = (const u8*)p + 4 * i;
        return __uint_as_float((u32)b[0] | ((u32)b[1] << 8) | ((u32)b[2] << 16) | ((u32)b[3] << 24));
    }
    u16 h;
    if (((u64)p & 1) == 0) {
        h = ((const u16*)p)[i];
    } else {
        const u8* b = (const u8*)p + 2 * i;
        h = (u16)((u32)b[0] | ((u32)b[1] << 8));
    }
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

// Descriptor of one weight matrix as the kernels see it. Passed by value.
struct WMat {
    const u8* data;    // packed data, row-major
    const u8* scales;  // affine only, [rows, cols/group] of sdt
    const u8* biases;
    u32 rows;
    u32 cols;
    u32 group;         // affine group size (1 for dense)
    int sdt;           // scale dtype
};

// Expert weight tables (moe.cu, gemm_tc.cu): per expert 9 u64 device pointers, gate {data,
// scales, biases}, up {...}, down {...}.
// Matrix `m` (0 gate, 1 up, 2 down) of expert e.
__device__ __forceinline__ WMat expert_mat(const u64* table, u32 e, int m, u32 rows, u32 cols, u32 group, int sdt) {
    const u64* p = table + (u64)e * 9 + m * 3;
    WMat w;
    w.data = (const u8*)p[0];
    w.scales = (const u8*)p[1];
    w.biases = (const u8*)p[2];
    w.rows = rows;
    w.cols = cols;
    w.group = group;
    w.sdt = sdt;
    return w;
}

// Rows of one expert tile (moe_route's (expert, first, count) list): xr[i] / orow[i] are the
// input / output rows of the tile's pair i (null past `count`). Returns the tile's expert, or
// 0xffffffff when the block's tile is past the tile count (uniform across the block). Called
// by every thread; synchronises.
template <int TM>
__device__ __forceinline__ u32 expert_tile_rows(const u32* sorted, const u32* tiles, const u32* ntiles, const float* x,
                                                u32 gather_div, u32 x_width, float* out, u32 out_width,
                                                const float** xr, float** orow) {
    const u32 tile = blockIdx.y;
    if (tile >= *ntiles) return 0xffffffffu;
    const u32 first = tiles[3 * tile + 1], count = tiles[3 * tile + 2];
    if (threadIdx.x < TM) {
        u32 i = threadIdx.x;
        if (i < count) {
            u32 p = sorted[first + i];
            xr[i] = x + (u64)(p / gather_div) * x_width;
            orow[i] = out + (u64)p * out_width;
        } else {
            xr[i] = 0;
            orow[i] = 0;
        }
    }
    __syncthreads();
    return tiles[3 * tile];
}

// Bytes of one stored row for a format.
template <int FMT>
__device__ __forceinline__ u64 row_bytes(u32 cols) {
    if (FMT == FMT_F32) return (u64)cols * 4;
    if (FMT == FMT_F16 || FMT == FMT_BF16) return (u64)cols * 2;
    if (FMT == FMT_Q4) return (u64)cols / 2;
    return (u64)cols;
}

// W[r, c] dequantized. Scalar path: any alignment, any column.
template <int FMT>
__device__ __forceinline__ float wload(const WMat& w, u32 r, u32 c) {
    const u8* row = w.data + (u64)r * row_bytes<FMT>(w.cols);
    if (FMT == FMT_F32) {
        const u8* b = row + (u64)c * 4;
        u32 v = (u32)b[0] | ((u32)b[1] << 8) | ((u32)b[2] << 16) | ((u32)b[3] << 24);
        return __uint_as_float(v);
    }
    if (FMT == FMT_F16 || FMT == FMT_BF16) {
        const u8* b = row + (u64)c * 2;
        u32 h = (u32)b[0] | ((u32)b[1] << 8);
        return FMT == FMT_BF16 ? bf16_to_f32(h) : f16_to_f32((u16)h);
    }
    u64 g = (u64)r * (w.cols / w.group) + c / w.group;
    float s = load_float(w.scales, w.sdt, g);
    float bi = load_float(w.biases, w.sdt, g);
    u32 q;
    if (FMT == FMT_Q4) {
        u8 byte = row[c >> 1];
        q = (c & 1) ? (byte >> 4) : (byte & 15);
    } else {
        q = row[c];
    }
    return s * (float)q + bi;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `red` is 32 floats of
// shared memory. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.f;
    return warp_sum(t);
}

// Max over the whole block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : NEG_INF;
    return warp_max(t);
}

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }
__device__ __forceinline__ float sigmoid_f(float v) { return 1.0f / (1.0f + expf(-v)); }
