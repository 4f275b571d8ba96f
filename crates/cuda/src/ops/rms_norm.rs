//! Op::RmsNorm and Op::GatedRmsNorm -> kernels/rms_norm.cu, and an Op::Add whose sum the next
//! Op::RmsNorm normalises, as one kernel (see [`add_rms_norm`]).

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, Vector};

use super::{Enc, launch, u32_of};
use crate::error::CudaError;

#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    gate: Option<BufId<Act>>,
    weight: &Vector,
    out: BufId<Act>,
    rows: usize,
    dim: usize,
    eps: f32,
    offset: f32,
) -> Result<(), CudaError> {
    let op = if gate.is_some() {
        "gated_rms_norm"
    } else {
        "rms_norm"
    };
    if rows == 0 || dim == 0 {
        return Ok(());
    }
    let grid = u32_of(rows, "rows", op)?;
    if grid > i32::MAX as u32 {
        return Err(CudaError::Unsupported {
            op,
            msg: format!("{rows} rows exceed the grid"),
        });
    }
    let dim_u = u32_of(dim, "dim", op)?;
    let (xp, outp) = (enc.buf(x.raw())?, enc.buf(out.raw())?);
    let gp = match gate {
        Some(g) => enc.buf(g.raw())?,
        None => 0,
    };
    let vec = vec_ok(dim, &[xp, outp, gp]);
    let block = if vec {
        vec_block(dim)
    } else {
        (dim.div_ceil(32) * 32).min(256) as u32
    };
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    let (w, wdt) = enc.vector(weight, op)?;
    match gate {
        None => {
            // SAFETY: rms_norm_{vec_,}f32(const float*, const void*, int, float*, u32, float,
            // float); x/out hold rows * dim floats and w dim elements (Graph::validate); the
            // vec kernel only for aligned rows, dim % 4 == 0, dim <= 16 * block.
            unsafe {
                launch!(
                    enc,
                    "rms_norm.cu",
                    if vec {
                        "rms_norm_vec_f32"
                    } else {
                        "rms_norm_f32"
                    },
                    cfg,
                    [xp, w, wdt, outp, dim_u, eps, offset]
                )
            }
        }
        Some(_) => {
            // SAFETY: gated_rms_norm_{vec_,}f32(const float*, const float*, const void*, int,
            // float*, u32, float, float); x/gate/out hold rows * dim floats (Graph::validate);
            // the vec kernel as above.
            unsafe {
                launch!(
                    enc,
                    "rms_norm.cu",
                    if vec {
                        "gated_rms_norm_vec_f32"
                    } else {
                        "gated_rms_norm_f32"
                    },
                    cfg,
                    [xp, gp, w, wdt, outp, dim_u, eps, offset]
                )
            }
        }
    }
}

/// Rows in registers, 16-byte loads: dim a multiple of 4 up to 16384, aligned rows (null
/// pointers stand for absent operands).
fn vec_ok(dim: usize, ptrs: &[u64]) -> bool {
    dim.is_multiple_of(4) && dim <= 16384 && ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// Threads of a vector-path block: one float4 per thread up to 1024 threads, then up to 4.
fn vec_block(dim: usize) -> u32 {
    let d4 = dim / 4;
    (d4.div_ceil(d4.div_ceil(1024)).div_ceil(32) * 32) as u32
}

/// `sum = a + b` (an Op::Add of `rows * dim` floats) and `out = rms_norm(sum)` (the
/// Op::RmsNorm that follows it) in one launch, when the vector path applies and the norm
/// does not write over the sum (`out` may be `a` or `b`: each thread writes only elements it
/// has read). Returns false, launching nothing, when it does not apply.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_rms_norm(
    enc: &mut Enc<'_>,
    a: BufId<Act>,
    b: BufId<Act>,
    sum: BufId<Act>,
    weight: &Vector,
    out: BufId<Act>,
    rows: usize,
    dim: usize,
    eps: f32,
    offset: f32,
) -> Result<bool, CudaError> {
    const OP: &str = "add_rms_norm";
    if rows == 0 || dim == 0 || rows > i32::MAX as usize {
        return Ok(false);
    }
    let (ap, bp, sp, op) = (
        enc.buf(a.raw())?,
        enc.buf(b.raw())?,
        enc.buf(sum.raw())?,
        enc.buf(out.raw())?,
    );
    if !vec_ok(dim, &[ap, bp, sp, op]) || op == sp {
        return Ok(false);
    }
    let cfg = LaunchConfig {
        grid_dim: (u32_of(rows, "rows", OP)?, 1, 1),
        block_dim: (vec_block(dim), 1, 1),
        shared_mem_bytes: 0,
    };
    let (w, wdt) = enc.vector(weight, OP)?;
    let dim_u = u32_of(dim, "dim", OP)?;
    // SAFETY: add_rms_norm_vec_f32(const float*, const float*, float*, const void*, int,
    // float*, u32, float, float); a/b/sum/out hold rows * dim floats (Graph::validate of the
    // Add and the RmsNorm, whose len and rows * dim the caller matched), all 16-byte aligned,
    // dim % 4 == 0 and dim <= 16 * block; each thread writes only elements it read.
    unsafe {
        launch!(
            enc,
            "rms_norm.cu",
            "add_rms_norm_vec_f32",
            cfg,
            [ap, bp, sp, w, wdt, op, dim_u, eps, offset]
        )
    }?;
    Ok(true)
}
