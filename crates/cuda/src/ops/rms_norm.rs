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
    let block = (dim.div_ceil(32) * 32).min(256) as u32;
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    let (w, wdt) = enc.vector(weight, op)?;
    let xp = enc.buf(x.raw())?;
    let outp = enc.buf(out.raw())?;
    match gate {
        None => {
            // SAFETY: rms_norm_f32(const float*, const void*, int, float*, u32, float, float);
            // x/out hold rows * dim floats and w dim elements (Graph::validate).
            unsafe {
                launch!(
                    enc,
                    "rms_norm.cu",
                    "rms_norm_f32",
                    cfg,
                    [xp, w, wdt, outp, dim_u, eps, offset]
                )
            }
        }
        Some(g) => {
            let gp = enc.buf(g.raw())?;
            // SAFETY: gated_rms_norm_f32(const float*, const float*, const void*, int, float*,
            // u32, float, float); x/gate/out hold rows * dim floats (Graph::validate).
            unsafe {
                launch!(
                    enc,
                    "rms_norm.cu",
                    "gated_rms_norm_f32",
                    cfg,
                    [xp, gp, w, wdt, outp, dim_u, eps, offset]
                )
            }
        }
    }
}
