// conv1d.cu: depthwise causal conv1d over time followed by SiLU, with a carried window
// (Op::Conv1dSilu).
//
// x / out f32 [n, channels]; weight [channels, kernel] of dtype wdt (DT_*), where
// w[c * kernel + j] multiplies the input kernel - 1 - j steps back; state f32
// [kernel - 1, channels] holds the previous inputs, oldest first, and is advanced past the
// batch on the device. One thread per channel walks the n tokens in order with the window in
// registers (kernel <= CONV_MAXK, checked on the host). Grid ceil(channels / 256), block 256.
#include "common.cuh"

#define CONV_MAXK 8

extern "C" __global__ void conv1d_silu_f32(const float* x, float* state, const void* w, int wdt, float* out, u32 n, u32 channels,
                                           u32 kernel) { pdl_prologue();
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const u32 hist = kernel - 1;
    float win[CONV_MAXK], wt[CONV_MAXK];
#pragma unroll
    for (u32 j = 0; j < CONV_MAXK; j++) {
        win[j] = j < hist ? state[(u64)j * channels + c] : 0.f;
        wt[j] = j < kernel ? load_float(w, wdt, (u64)c * kernel + j) : 0.f;
    }
    for (u32 t = 0; t < n; t++) {
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
#pragma unroll
    for (u32 j = 0; j < CONV_MAXK; j++)
        if (j < hist) state[(u64)j * channels + c] = win[j];
}
