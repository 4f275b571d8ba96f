//! Op::RmsNorm and Op::GatedRmsNorm -> kernels/rms_norm.cu

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
    // Rows in registers, 16-byte loads: dim a multiple of 4 up to 16384, aligned rows.
    let vec = dim % 4 == 0 && dim <= 16384 && [xp, outp, gp].iter().all(|p| p % 16 == 0);
    let block = if vec {
        // One float4 per thread up to 1024 threads, then up to 4.
        let d4 = dim / 4;
        (d4.div_ceil(d4.div_ceil(1024)).div_ceil(32) * 32) as u32
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
