// bandwidth.cu: device memory read bandwidth probe (Backend::measure_bandwidth), not an op.
//
// read_sum_f32: each thread sums float4s of `x` over a grid-stride loop (four independent
// accumulators so the loop is bound by memory, not add latency) and the block's sum goes to
// out[blockIdx.x], so the reads cannot be optimised away. x is 16-byte aligned, `n4` float4s.
// Grid: a few blocks per SM, block 256.
#include "common.cuh"

extern "C" __global__ void read_sum_f32(const float4* x, u64 n4, float* out) { pdl_prologue();
    __shared__ float red[32];
    float a = 0.f, b = 0.f, c = 0.f, d = 0.f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (u64)gridDim.x * blockDim.x) {
        float4 v = __ldcs(x + i);
        a += v.x;
        b += v.y;
        c += v.z;
        d += v.w;
    }
    float s = block_sum((a + b) + (c + d), red);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}
