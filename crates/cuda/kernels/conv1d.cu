// conv1d.cu: depthwise causal conv1d over time followed by SiLU, with a carried window
// (Op::Conv1dSilu).
//
// x / out f32 [n, channels]; weight [channels, kernel] of dtype wdt (DT_*), where
// w[c * kernel + j] multiplies the input kernel - 1 - j steps back; state f32
// [kernel - 1, channels] holds the previous inputs, oldest first, and is advanced past the
// batch on the device. Thread per channel, window in registers (kernel <= CONV_MAXK, checked
// on the host). Grid (ceil(channels / 256), ceil(n / CONV_T)), block 256: block row y walks
// tokens [y * CONV_T, (y + 1) * CONV_T) in order, starting from the inputs before its first
// token. Only row 0 reads the carried window (CONV_T >= CONV_MAXK), so row 0 also writes the
// new one, after reading the old: no block reads state that another writes.
#include "common.cuh"

#define CONV_MAXK 8
#define CONV_T 64

extern "C" __global__ void conv1d_silu_f32(const float* x, float* state, const void* w, int wdt, float* out, u32 n, u32 channels,
                                           u32 kernel) { pdl_prologue();
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const u32 hist = kernel - 1;
    const u32 t0 = blockIdx.y * CONV_T, t1 = min(n, t0 + CONV_T);
    // Input at time tau: x for tau >= 0, else the carried window row tau + hist.
    auto input = [&](long long tau) -> float {
        return tau >= 0 ? x[(u64)tau * channels + c] : state[(u64)(tau + hist) * channels + c];
    };
    float win[CONV_MAXK], wt[CONV_MAXK];
#pragma unroll
    for (u32 j = 0; j < CONV_MAXK; j++) {
        win[j] = j < hist ? input((long long)t0 - hist + j) : 0.f;
        wt[j] = j < kernel ? load_float(w, wdt, (u64)c * kernel + j) : 0.f;
    }
    float next[CONV_MAXK];
    if (blockIdx.y == 0) {
#pragma unroll
        for (u32 j = 0; j < CONV_MAXK; j++) next[j] = j < hist ? input((long long)n - hist + j) : 0.f;
    }
    for (u32 t = t0; t < t1; t++) {
        // win[hist] = the current token; the unrolled select keeps win[] in registers.
        float xv = x[(u64)t * channels + c];
#pragma unroll
        for (u32 j = 0; j < CONV_MAXK; j++)
            if (j == hist) win[j] = xv;
        float acc = 0.f;
#pragma unroll
        for (u32 j = 0; j < CONV_MAXK; j++)
            if (j < kernel) acc += wt[j] * win[j];
        out[(u64)t * channels + c] = silu_f(acc);
#pragma unroll
        for (u32 j = 0; j + 1 < CONV_MAXK; j++) win[j] = win[j + 1];
    }
    if (blockIdx.y == 0) {
#pragma unroll
        for (u32 j = 0; j < CONV_MAXK; j++)
            if (j < hist) state[(u64)j * channels + c] = next[j];
    }
}
