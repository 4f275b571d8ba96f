//! Op::Rope -> kernels/rope.cu

use moeflux_core::{Act, BufId, Pos};

use super::{Enc, grid_1d, launch, u32_of};
use crate::error::CudaError;

#[allow(clippy::too_many_arguments)]
pub(crate) fn rope(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    pos: BufId<Pos>,
    n: usize,
    heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    theta: f32,
) -> Result<(), CudaError> {
    const OP: &str = "rope";
    let pairs = n * heads * (rotary_dim / 2);
    if pairs == 0 {
        return Ok(());
    }
    let (xp, pp) = (enc.buf(x.raw())?, enc.buf(pos.raw())?);
    let (n_, h, hd, rd) = (
        u32_of(n, "n", OP)?,
        u32_of(heads, "heads", OP)?,
        u32_of(head_dim, "head_dim", OP)?,
        u32_of(rotary_dim, "rotary_dim", OP)?,
    );
    // SAFETY: rope_f32(float*, const u32*, u32, u32, u32, u32, float); x holds n * heads *
    // head_dim floats and pos n entries (Graph::validate); rotary_dim <= head_dim (check_shapes).
    unsafe {
        launch!(
            enc,
            "rope.cu",
            "rope_f32",
            grid_1d(pairs),
            [xp, pp, n_, h, hd, rd, theta]
        )
    }
}
