// rms_norm.cu: RMS norms (Op::RmsNorm, Op::GatedRmsNorm).
//
//   rms_norm_f32:       out = x / rms(x) * (w + offset)
//   gated_rms_norm_f32: out = x / rms(x) * (w + offset) * silu(gate)
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

extern "C" __global__ void rms_norm_f32(const float* x, const void* w, int wdt, float* out, u32 dim, float eps, float offset) {
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * dim;
    const float r = row_inv_rms(x + base, dim, eps, red);
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) out[base + c] = x[base + c] * r * (load_float(w, wdt, c) + offset);
}

extern "C" __global__ void gated_rms_norm_f32(const float* x, const float* gate, const void* w, int wdt, float* out, u32 dim,
                                              float eps, float offset) {
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * dim;
    const float r = row_inv_rms(x + base, dim, eps, red);
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x)
        out[base + c] = x[base + c] * r * (load_float(w, wdt, c) + offset) * silu_f(gate[base + c]);
}
