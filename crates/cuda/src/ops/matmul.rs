//! Op::Matmul -> kernels/matmul.cu
//!
//! Up to [`MATVEC_MAX_N`] tokens take the matrix-vector kernels (each weight byte read once
//! per token, 16-byte loads when the matrix's alignment allows it); wider batches take the
//! tiled GEMM, which dequantizes each weight tile once per 64 tokens.

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, Matrix};

use super::{Enc, grid_y, launch, u32_of, vec_ok};
use crate::error::CudaError;

pub(crate) const MATVEC_MAX_N: usize = 2;

const MATVEC_VEC: [&str; 5] = ["matvec_vec_f32", "matvec_vec_f16", "matvec_vec_bf16", "matvec_vec_q4", "matvec_vec_q8"];
const MATVEC_SCALAR: [&str; 5] = ["matvec_scalar_f32", "matvec_scalar_f16", "matvec_scalar_bf16", "matvec_scalar_q4", "matvec_scalar_q8"];
const GEMM: [&str; 5] = ["gemm_f32", "gemm_f16", "gemm_bf16", "gemm_q4", "gemm_q8"];

/// Rows per matrix-vector block (`MV_ROWS_PER_BLOCK` in gemv.cuh) and GEMM tile sizes.
pub(crate) const MV_ROWS: usize = 32;
pub(crate) const GT: usize = 64;

/// Dynamic shared memory of a matrix-vector block over `cols` inputs (x staged, padded to the
/// warp span of one step).
pub(crate) fn mv_smem(cols: usize, elems: usize) -> usize {
    cols.div_ceil(32 * elems) * 32 * elems * 4
}

pub(crate) fn matmul(enc: &mut Enc<'_>, x: BufId<Act>, w: &Matrix, out: BufId<Act>, n: usize) -> Result<(), CudaError> {
    const OP: &str = "matmul";
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    let (wa, fmt) = enc.wmat(w, OP)?;
    let (xp, op) = (enc.buf(x.raw())?, enc.buf(out.raw())?);
    if n <= MATVEC_MAX_N {
        let vec = vec_ok(fmt, wa.data, w.cols, wa.group);
        let smem = mv_smem(w.cols, if vec { fmt.elems16() } else { 4 });
        if smem <= enc.smem_optin {
            let cfg = LaunchConfig {
                grid_dim: (u32_of(w.rows.div_ceil(MV_ROWS), "row blocks", OP)?, n as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let name = fmt.pick(if vec { &MATVEC_VEC } else { &MATVEC_SCALAR });
            // SAFETY: matvec_*(WMat, const float*, float*); x holds n * cols floats and out
            // n * rows (Graph::validate); the vector path's alignment was checked by vec_ok.
            return unsafe { launch!(enc, "matmul.cu", name, cfg, [wa, xp, op]) };
        }
    }
    let cfg = LaunchConfig {
        grid_dim: (u32_of(w.rows.div_ceil(GT), "row tiles", OP)?, grid_y(n.div_ceil(GT), "token tiles", OP)?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_u = u32_of(n, "n", OP)?;
    // SAFETY: gemm_*(WMat, const float*, float*, u32); sizes as above; tiles past n or rows are
    // masked in the kernel.
    unsafe { launch!(enc, "matmul.cu", fmt.pick(&GEMM), cfg, [wa, xp, op, n_u]) }
}
