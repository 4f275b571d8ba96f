//! Op::Embed -> kernels/embed.cu

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, Matrix, Tokens};

use super::{BLOCK, Enc, Fmt, grid_y, launch};
use crate::error::CudaError;

const NAMES: [&str; 5] = [
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "embed_q4",
    "embed_q8",
];

pub(crate) fn embed(
    enc: &mut Enc<'_>,
    table: &Matrix,
    tokens: BufId<Tokens>,
    out: BufId<Act>,
    n: usize,
) -> Result<(), CudaError> {
    if n == 0 {
        return Ok(());
    }
    let (t, fmt): (_, Fmt) = enc.wmat(table, "embed")?;
    let cfg = LaunchConfig {
        grid_dim: (
            table.cols.div_ceil(BLOCK as usize) as u32,
            grid_y(n, "tokens", "embed")?,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let tokens = enc.buf(tokens.raw())?;
    let out = enc.buf(out.raw())?;
    // SAFETY: embed_<fmt>(WMat, const u32*, float*); Graph::validate checked that the table,
    // tokens [n] and out [n, cols] are in bounds; the kernel zero-fills out-of-range ids.
    unsafe { launch!(enc, "embed.cu", fmt.pick(&NAMES), cfg, [t, tokens, out]) }
}
