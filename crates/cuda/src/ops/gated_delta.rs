//! Op::GatedDelta -> kernels/gated_delta.cu

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, State, Vector};

use super::{Enc, grid_y, launch, u32_of};
use crate::error::CudaError;

/// 8 warps x `GD_MAXS` key rows per thread in gated_delta.cu.
const MAX_DK: usize = 256;

pub(crate) struct DeltaShape {
    pub n: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn gated_delta(
    enc: &mut Enc<'_>,
    qkv: BufId<Act>,
    a: BufId<Act>,
    b: BufId<Act>,
    a_log: &Vector,
    dt_bias: &Vector,
    state: BufId<State>,
    out: BufId<Act>,
    s: &DeltaShape,
) -> Result<(), CudaError> {
    const OP: &str = "gated_delta";
    if s.dk == 0 || s.dk > MAX_DK {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: format!("key head dim {} (the kernel takes 1..={MAX_DK})", s.dk),
        });
    }
    if a_log.dtype != dt_bias.dtype {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: format!(
                "A_log ({}) and dt_bias ({}) differ in dtype",
                a_log.dtype, dt_bias.dtype
            ),
        });
    }
    if s.v_heads == 0 || s.dv == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (
            u32_of(s.v_heads, "v_heads", OP)?,
            grid_y(s.dv.div_ceil(32), "value column blocks", OP)?,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (al, vdt) = enc.vector(a_log, OP)?;
    let (dt, _) = enc.vector(dt_bias, OP)?;
    let (qp, ap, bp, sp, op) = (
        enc.buf(qkv.raw())?,
        enc.buf(a.raw())?,
        enc.buf(b.raw())?,
        enc.buf(state.raw())?,
        enc.buf(out.raw())?,
    );
    let (n, kh, vh, dk, dv) = (
        u32_of(s.n, "n", OP)?,
        u32_of(s.k_heads, "k_heads", OP)?,
        u32_of(s.v_heads, "v_heads", OP)?,
        u32_of(s.dk, "dk", OP)?,
        u32_of(s.dv, "dv", OP)?,
    );
    // SAFETY: gated_delta_f32(const float*, const float*, const float*, const void*, const
    // void*, int, float*, float*, u32 x5); qkv/a/b/out/state sizes checked by Graph::validate,
    // v_heads % k_heads == 0 and the vector lengths by check_shapes, dk <= 256 above.
    unsafe {
        launch!(
            enc,
            "gated_delta.cu",
            "gated_delta_f32",
            cfg,
            [qp, ap, bp, al, dt, vdt, sp, op, n, kh, vh, dk, dv]
        )
    }
}
