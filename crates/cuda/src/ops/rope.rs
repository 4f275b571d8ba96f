//! Op::Rope -> kernels/rope.cu, and [`qk_prep`]: an attention block's [q norm] [k norm]
//! [rope q, rope k] kv_append run as one kernel.

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, Cache, Pos, Vector};

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

/// `QP_WARPS` in rope.cu: rows (one warp each) per block of qk_prep_f32.
const QP_WARPS: usize = 4;

/// One attention block's per-head preparation, as the nodes the CUDA backend fuses:
/// optional in-place RMS norms of the q and k heads (one eps and offset), an optional rope of
/// both, and the append of k and v to the caches.
pub(crate) struct QkPrep<'a> {
    pub q: BufId<Act>,
    pub k: BufId<Act>,
    pub v: BufId<Act>,
    pub pos: BufId<Pos>,
    pub k_cache: BufId<Cache>,
    pub v_cache: BufId<Cache>,
    pub q_norm: Option<&'a Vector>,
    pub k_norm: Option<&'a Vector>,
    pub eps: f32,
    pub offset: f32,
    /// (rotary_dim, theta)
    pub rope: Option<(usize, f32)>,
    pub n: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_ctx: usize,
}

/// Whether qk_prep_f32 takes this shape: a warp's lanes hold a whole row in registers
/// (head_dim at most 256) and the rotated dims lie inside the head.
pub(crate) fn qk_prep_fits(head_dim: usize, rope: Option<(usize, f32)>) -> bool {
    head_dim > 0 && head_dim <= 256 && rope.is_none_or(|(rd, _)| rd <= head_dim)
}

/// Launches qk_prep_f32 for `p` (the caller checked [`qk_prep_fits`]).
pub(crate) fn qk_prep(enc: &mut Enc<'_>, p: &QkPrep<'_>) -> Result<(), CudaError> {
    const OP: &str = "qk_prep";
    let rows = p.n * (p.heads + 2 * p.kv_heads);
    if rows == 0 {
        return Ok(());
    }
    let (qp, kp, vp, pp, kc, vc) = (
        enc.buf(p.q.raw())?,
        enc.buf(p.k.raw())?,
        enc.buf(p.v.raw())?,
        enc.buf(p.pos.raw())?,
        enc.buf(p.k_cache.raw())?,
        enc.buf(p.v_cache.raw())?,
    );
    let (qw, qwdt) = match p.q_norm {
        Some(w) => enc.vector(w, OP)?,
        None => (0, 0),
    };
    let (kw, kwdt) = match p.k_norm {
        Some(w) => enc.vector(w, OP)?,
        None => (0, 0),
    };
    let flags = p.q_norm.is_some() as u32
        | (p.k_norm.is_some() as u32) << 1
        | (p.rope.is_some() as u32) << 2;
    let (rd, theta) = p.rope.unwrap_or((0, 0.0));
    let (n_, h, kvh, hd, rd, mc) = (
        u32_of(p.n, "n", OP)?,
        u32_of(p.heads, "heads", OP)?,
        u32_of(p.kv_heads, "kv_heads", OP)?,
        u32_of(p.head_dim, "head_dim", OP)?,
        u32_of(rd, "rotary_dim", OP)?,
        u32_of(p.max_ctx, "max_ctx", OP)?,
    );
    let (eps, offset) = (p.eps, p.offset);
    let cfg = LaunchConfig {
        grid_dim: (u32_of(rows.div_ceil(QP_WARPS), "rows", OP)?, 1, 1),
        block_dim: (QP_WARPS as u32 * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: qk_prep_f32(float*, float*, const float*, const u32*, float*, float*, const void*,
    // int, const void*, int, u32, u32, u32, u32, u32, float, float, float, u32, u32); q holds
    // n * heads * head_dim floats, k and v n * kv_heads * head_dim, the caches max_ctx *
    // kv_heads * head_dim, the norm weights head_dim elements (Graph::validate of the fused
    // nodes); rows past n * (heads + 2 kv_heads) return at once, cache rows at pos >= max_ctx
    // are skipped; qk_prep_fits holds, so every lane index is inside its row.
    unsafe {
        launch!(
            enc,
            "rope.cu",
            "qk_prep_f32",
            cfg,
            [
                qp, kp, vp, pp, kc, vc, qw, qwdt, kw, kwdt, n_, h, kvh, hd, rd, theta, eps, offset,
                mc, flags
            ]
        )
    }
}
