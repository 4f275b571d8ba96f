// elementwise.cu: Op::Add, Op::SwiGlu, Op::SigmoidGate, Op::ScatterCols (Op::CopyRows is a
// device-to-device copy on the Rust side).
//
// All f32. 1-D grids of 256-thread blocks with a grid-stride loop over the elements; each
// element is read and written by the same thread, so outputs may alias inputs (in place).
//   add_f32:          out[i] = a[i] + b[i]
//   swiglu_f32:       out[i] = silu(gate[i]) * up[i]
//   sigmoid_gate_f32: out[r, j] = x[r, j] * sigmoid(gate[r, gate_width == 1 ? 0 : j]), rows of width
//   scatter_cols_f32: one part of a column split: for token t, group g, column c < width:
//                     out[t * out_width + out_offset + g * width + c] = x[t * row + g * group_w + src_off + c]
#include "common.cuh"

#define GRID_STRIDE(i, len) for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (len); i += (u64)gridDim.x * blockDim.x)

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, u64 len) {
    GRID_STRIDE(i, len) out[i] = a[i] + b[i];
}

extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out, u64 len) {
    GRID_STRIDE(i, len) out[i] = silu_f(gate[i]) * up[i];
}

extern "C" __global__ void sigmoid_gate_f32(const float* x, const float* gate, float* out, u64 len, u32 width, u32 gate_width) {
    GRID_STRIDE(i, len) {
        u64 r = i / width;
        u32 j = (u32)(i - r * width);
        float g = gate_width == 1 ? gate[r] : gate[r * width + j];
        out[i] = x[i] * sigmoid_f(g);
    }
}

extern "C" __global__ void scatter_cols_f32(const float* x, float* out, u64 len, u32 groups, u32 row, u32 group_w, u32 src_off,
                                            u32 width, u32 out_width, u32 out_offset) {
    GRID_STRIDE(i, len) {
        u32 c = (u32)(i % width);
        u64 tg = i / width;
        u32 g = (u32)(tg % groups);
        u64 t = tg / groups;
        out[t * out_width + out_offset + (u64)g * width + c] = x[t * row + (u64)g * group_w + src_off + c];
    }
}
