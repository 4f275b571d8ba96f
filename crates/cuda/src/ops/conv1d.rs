//! Op::Conv1dSilu -> kernels/conv1d.cu

use moeflux_core::{Act, BufId, State, Vector};

use super::{BLOCK, Enc, grid_y, launch, u32_of};
use crate::error::CudaError;
use cudarc::driver::LaunchConfig;

/// `CONV_MAXK` in conv1d.cu.
const MAX_KERNEL: usize = 8;
/// Tokens per block row (`CONV_T` in conv1d.cu).
const TOKENS_PER_BLOCK: usize = 64;

#[allow(clippy::too_many_arguments)]
pub(crate) fn conv1d_silu(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    state: BufId<State>,
    weight: &Vector,
    out: BufId<Act>,
    n: usize,
    channels: usize,
    kernel: usize,
) -> Result<(), CudaError> {
    const OP: &str = "conv1d_silu";
    if kernel == 0 || kernel > MAX_KERNEL {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: format!("kernel size {kernel} (the kernel takes 1..={MAX_KERNEL})"),
        });
    }
    if channels == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (
            u32_of(channels.div_ceil(BLOCK as usize), "channel blocks", OP)?,
            grid_y(n.div_ceil(TOKENS_PER_BLOCK).max(1), "token blocks", OP)?,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (w, wdt) = enc.vector(weight, OP)?;
    let (xp, sp, op) = (
        enc.buf(x.raw())?,
        enc.buf(state.raw())?,
        enc.buf(out.raw())?,
    );
    let (n_, c, k) = (
        u32_of(n, "n", OP)?,
        u32_of(channels, "channels", OP)?,
        u32_of(kernel, "kernel", OP)?,
    );
    // SAFETY: conv1d_silu_f32(const float*, float*, const void*, int, float*, u32, u32, u32);
    // x/out hold n * channels floats, state (kernel - 1) * channels, weight channels * kernel
    // (Graph::validate, check_shapes).
    unsafe {
        launch!(
            enc,
            "conv1d.cu",
            "conv1d_silu_f32",
            cfg,
            [xp, sp, w, wdt, op, n_, c, k]
        )
    }
}
