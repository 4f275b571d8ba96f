// rope.cu: NeoX rotary embedding on the first rotary_dim dims of each head, in place (Op::Rope).
//
// x f32 [n, heads, head_dim]; pos u32 [n] (read on the device). Pairs (i, i + rotary_dim/2).
// Angles are computed in double, as the CPU reference does (positions in the tens of thousands
// lose precision in f32 before the sin/cos), then rounded to f32.
// Grid-stride over n * heads * rotary_dim/2 pairs, block 256.
#include "common.cuh"

extern "C" __global__ void rope_f32(float* x, const u32* pos, u32 n, u32 heads, u32 head_dim, u32 rotary_dim, float theta) { pdl_prologue();
    const u32 half = rotary_dim / 2;
    const u64 total = (u64)n * heads * half;
    for (u64 k = (u64)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (u64)gridDim.x * blockDim.x) {
        u32 i = (u32)(k % half);
        u64 th = k / half;  // t * heads + h
        u32 t = (u32)(th / heads);
        double inv = 1.0 / pow((double)theta, 2.0 * (double)i / (double)rotary_dim);
        double a = (double)pos[t] * inv;
        float c = (float)cos(a), s = (float)sin(a);
        float* v = x + th * head_dim;
        float p = v[i], q = v[i + half];
        v[i] = p * c - q * s;
        v[i + half] = q * c + p * s;
    }
}
