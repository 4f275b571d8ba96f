// rms_norm.cu: RMS norms (Op::RmsNorm, Op::GatedRmsNorm).
//
//   rms_norm_f32:       out = x / rms(x) * (w + offset)
//   gated_rms_norm_f32: out = x / rms(x) * (w + offset) * silu(gate)
//   add_rms_norm_vec_f32: sum = x + y and out = rms_norm(sum), in one pass (below)
// over `rows` rows of `dim` f32 (per-head norms pass rows = n * heads). `w` is a stored vector
// of dtype `wdt` (DT_* in common.cuh). Grid (rows), block min(256, dim rounded up to 32): one
// block per row. Each thread writes only elements it read itself, after the reduction, so
// out may be x (in place).
#include "common.cuh"

__device__ __forceinline__ float row_inv_rms(const float* xr, u32 dim, float eps, float* red) {
    float ss = 0.f;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, red);
    return 1.0f / sqrtf(ss / (float)dim + eps);
}

extern "C" __global__ void rms_norm_f32(const float* x, const void* w, int wdt, float* out, u32 dim, float eps, float offset) { pdl_prologue();
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * dim;
    const float r = row_inv_rms(x + base, dim, eps, red);
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) out[base + c] = x[base + c] * r * (load_float(w, wdt, c) + offset);
}

extern "C" __global__ void gated_rms_norm_f32(const float* x, const float* gate, const void* w, int wdt, float* out, u32 dim,
                                              float eps, float offset) { pdl_prologue();
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * dim;
    const float r = row_inv_rms(x + base, dim, eps, red);
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x)
        out[base + c] = x[base + c] * r * (load_float(w, wdt, c) + offset) * silu_f(gate[base + c]);
}

// rms_norm_vec_f32 / gated_rms_norm_vec_f32: the same for dim % 4 == 0 and dim <= 16 * blockDim
// (so dim <= 16384), 16-byte aligned rows: each thread holds at most 4 float4 of its row in
// registers, so x (and the gate) are read once, with 16-byte loads. Block ceil(dim / 4 / 4)
// rounded up to 32 at least, at most 1024.
// With `y` (add_rms_norm_vec_f32), the row normalised is x + y, and that sum is also written to
// `sum` (the residual stream of a block: Op::Add followed by the next Op::RmsNorm of the sum).
template <bool GATED>
__device__ __forceinline__ void rms_norm_vec(const float* x, const float* gate, const void* w, int wdt, float* out, u32 dim,
                                             float eps, float offset, const float* y = nullptr, float* sum = nullptr) {
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * dim;
    const u32 d4 = dim >> 2;
    const float4* xr = (const float4*)(x + base);
    float4 v[4];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const u32 c = threadIdx.x + j * blockDim.x;
        if (c < d4) {
            v[j] = xr[c];
            if (y != nullptr) {
                const float4 b = ((const float4*)(y + base))[c];
                v[j].x += b.x;
                v[j].y += b.y;
                v[j].z += b.z;
                v[j].w += b.w;
                ((float4*)(sum + base))[c] = v[j];
            }
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)dim + eps);
    float4* orow = (float4*)(out + base);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const u32 c = threadIdx.x + j * blockDim.x;
        if (c < d4) {
            const u32 e = c << 2;
            float4 o;
            o.x = v[j].x * r * (load_float(w, wdt, e) + offset);
            o.y = v[j].y * r * (load_float(w, wdt, e + 1) + offset);
            o.z = v[j].z * r * (load_float(w, wdt, e + 2) + offset);
            o.w = v[j].w * r * (load_float(w, wdt, e + 3) + offset);
            if (GATED) {
                const float4 g = ((const float4*)(gate + base))[c];
                o.x *= silu_f(g.x);
                o.y *= silu_f(g.y);
                o.z *= silu_f(g.z);
                o.w *= silu_f(g.w);
            }
            orow[c] = o;
        }
    }
}

extern "C" __global__ void rms_norm_vec_f32(const float* x, const void* w, int wdt, float* out, u32 dim, float eps, float offset) { pdl_prologue();
    rms_norm_vec<false>(x, nullptr, w, wdt, out, dim, eps, offset);
}

extern "C" __global__ void gated_rms_norm_vec_f32(const float* x, const float* gate, const void* w, int wdt, float* out, u32 dim,
                                                  float eps, float offset) { pdl_prologue();
    rms_norm_vec<true>(x, gate, w, wdt, out, dim, eps, offset);
}

// add_rms_norm_vec_f32: sum = x + y, out = sum / rms(sum) * (w + offset), with the conditions
// of rms_norm_vec_f32 (every pointer 16-byte aligned). One pass over x and y instead of an
// add kernel and a norm kernel that re-reads the sum.
extern "C" __global__ void add_rms_norm_vec_f32(const float* x, const float* y, float* sum, const void* w, int wdt, float* out,
                                                u32 dim, float eps, float offset) { pdl_prologue();
    rms_norm_vec<false>(x, nullptr, w, wdt, out, dim, eps, offset, y, sum);
}
