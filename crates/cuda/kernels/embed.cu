// embed.cu: out[i, :] = table[tokens[i], :] dequantized to f32 (Op::Embed).
//
// table [rows = vocab, cols = hidden] in any weight format (common.cuh); tokens u32 [n];
// out f32 [n, cols]. Grid (ceil(cols / 256), n), block 256: one thread per output element.
// A token id past the table (the session range-checks ids, so only a bug gets here) yields a
// zero row rather than an out-of-bounds read.
#include "common.cuh"

template <int FMT>
__device__ __forceinline__ void embed_body(const WMat& t, const u32* tokens, float* out) {
    const u32 i = blockIdx.y;
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= t.cols) return;
    const u32 tok = tokens[i];
    out[(u64)i * t.cols + c] = tok < t.rows ? wload<FMT>(t, tok, c) : 0.f;
}

#define EMBED_KERNEL(NAME, FMT) \
    extern "C" __global__ void embed_##NAME(WMat t, const u32* tokens, float* out) { pdl_prologue(); embed_body<FMT>(t, tokens, out); }

EMBED_KERNEL(f32, FMT_F32)
EMBED_KERNEL(f16, FMT_F16)
EMBED_KERNEL(bf16, FMT_BF16)
EMBED_KERNEL(q4, FMT_Q4)
EMBED_KERNEL(q8, FMT_Q8)
