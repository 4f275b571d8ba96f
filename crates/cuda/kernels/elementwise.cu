// elementwise.cu: Op::Add, Op::SwiGlu, Op::SigmoidGate, Op::ScatterCols (Op::CopyRows is a
// device-to-device copy on the Rust side).
//
// All f32. 1-D grids of 256-thread blocks with a grid-stride loop over the elements; each
// element is read and written by the same thread, so outputs may alias inputs (in place).
//   add_f32:          out[i] = a[i] + b[i]
//   swiglu_f32:       out[i] = silu(gate[i]) * up[i]
//   sigmoid_gate_f32: out[r, j] = x[r, j] * sigmoid(gate[r, gate_width == 1 ? 0 : j]), rows of width
//   scatter_parts_f32: a column split, every part in one launch: for token t, group g, column c
//                      of part p: out_p[t * out_width_p + out_offset_p + g * width_p + c] =
//                      x[t * row + g * group_w + (columns of the parts before p) + c]
#include "common.cuh"

#define GRID_STRIDE(i, len) for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (len); i += (u64)gridDim.x * blockDim.x)

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, u64 len) { pdl_prologue();
    GRID_STRIDE(i, len) out[i] = a[i] + b[i];
}

extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out, u64 len) { pdl_prologue();
    GRID_STRIDE(i, len) out[i] = silu_f(gate[i]) * up[i];
}

extern "C" __global__ void sigmoid_gate_f32(const float* x, const float* gate, float* out, u64 len, u32 width, u32 gate_width) { pdl_prologue();
    GRID_STRIDE(i, len) {
        u64 r = i / width;
        u32 j = (u32)(i - r * width);
        float g = gate_width == 1 ? gate[r] : gate[r * width + j];
        out[i] = x[i] * sigmoid_f(g);
    }
}

// scatter_parts_f32: up to SCATTER_PARTS parts of a column split in one launch. `a` describes
// them; `first`/`count` the parts of this launch, `cols` their columns per group (the sum of
// their widths), starting at column `col0` of each group. Grid-stride over n * groups * cols.
#define SCATTER_PARTS 8
struct ScatterParts {
    float* out[SCATTER_PARTS];
    u32 width[SCATTER_PARTS];
    u32 out_width[SCATTER_PARTS];
    u32 out_offset[SCATTER_PARTS];
    u32 start[SCATTER_PARTS];  // first column of the part within this launch's columns
    u32 count;
};

extern "C" __global__ void scatter_parts_f32(const float* x, ScatterParts a, u64 len, u32 groups, u32 row, u32 group_w, u32 col0,
                                             u32 cols) { pdl_prologue();
    GRID_STRIDE(i, len) {
        const u32 c = (u32)(i % cols);
        const u64 tg = i / cols;
        const u32 g = (u32)(tg % groups);
        const u64 t = tg / groups;
        u32 p = 0;
#pragma unroll
        for (u32 q = 1; q < SCATTER_PARTS; q++)
            if (q < a.count && c >= a.start[q]) p = q;
        const float v = x[t * row + (u64)g * group_w + col0 + c];
        a.out[p][t * a.out_width[p] + a.out_offset[p] + (u64)g * a.width[p] + (c - a.start[p])] = v;
    }
}
