//! Op::GatedDelta -> kernels/gated_delta.cu

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, State, Vector};

use super::{Enc, grid_y, launch, u32_of};
use crate::error::CudaError;

/// 8 warps x `GD_MAXS` key rows per thread in gated_delta.cu.
const MAX_DK: usize = 256;
/// Tokens per chunk of the chunked form (`GDC` in gated_delta.cu).
const CHUNK: usize = 64;
/// Largest key head dim of the chunked form (`GDC_MAXDK`).
const CHUNK_MAX_DK: usize = 128;
/// Fewest tokens that take the chunked form: below this the token-serial kernel (~2-3 us per
/// token) is as fast as two launches.
const CHUNK_MIN_N: usize = 8;

pub(crate) struct DeltaShape {
    pub n: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

/// Device addresses and 32-bit shape arguments shared by both forms' kernels.
struct Args {
    al: u64,
    vdt: i32,
    dt: u64,
    qp: u64,
    ap: u64,
    bp: u64,
    sp: u64,
    op: u64,
    n: u32,
    kh: u32,
    vh: u32,
    dk: u32,
    dv: u32,
}

impl Args {
    /// `acts` = [qkv, a, b, out].
    fn new(
        enc: &mut Enc<'_>,
        acts: [BufId<Act>; 4],
        a_log: &Vector,
        dt_bias: &Vector,
        state: BufId<State>,
        s: &DeltaShape,
    ) -> Result<Self, CudaError> {
        const OP: &str = "gated_delta";
        let (al, vdt) = enc.vector(a_log, OP)?;
        let (dt, _) = enc.vector(dt_bias, OP)?;
        let [qp, ap, bp, op] = [
            enc.buf(acts[0].raw())?,
            enc.buf(acts[1].raw())?,
            enc.buf(acts[2].raw())?,
            enc.buf(acts[3].raw())?,
        ];
        Ok(Args {
            al,
            vdt,
            dt,
            qp,
            ap,
            bp,
            sp: enc.buf(state.raw())?,
            op,
            n: u32_of(s.n, "n", OP)?,
            kh: u32_of(s.k_heads, "k_heads", OP)?,
            vh: u32_of(s.v_heads, "v_heads", OP)?,
            dk: u32_of(s.dk, "dk", OP)?,
            dv: u32_of(s.dv, "dv", OP)?,
        })
    }
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
    let d = Args::new(enc, [qkv, a, b, out], a_log, dt_bias, state, s)?;
    if chunked_applies(enc, s) {
        return gated_delta_chunked(enc, &d, s);
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
    // SAFETY: gated_delta_f32(const float*, const float*, const float*, const void*, const
    // void*, int, float*, float*, u32 x5); qkv/a/b/out/state sizes checked by Graph::validate,
    // v_heads % k_heads == 0 and the vector lengths by check_shapes, dk <= 256 above.
    unsafe {
        launch!(
            enc,
            "gated_delta.cu",
            "gated_delta_f32",
            cfg,
            [
                d.qp, d.ap, d.bp, d.al, d.dt, d.vdt, d.sp, d.op, d.n, d.kh, d.vh, d.dk, d.dv
            ]
        )
    }
}

/// Whether this call takes the chunked (WY) kernels: prefill-sized, a key head dim they hold,
/// shared memory for them, and not switched off with `MOEFLUX_CUDA_CHUNKED_DELTA=0`.
fn chunked_applies(enc: &Enc<'_>, s: &DeltaShape) -> bool {
    s.n >= CHUNK_MIN_N
        && s.dk <= CHUNK_MAX_DK
        && s.dk.is_multiple_of(4)
        && prep_smem(s.dk).max(chunks_smem(s.dk)) <= enc.smem_optin
        && std::env::var("MOEFLUX_CUDA_CHUNKED_DELTA").map_or(true, |v| v != "0")
}

/// Dynamic shared memory of gated_delta_prep_f32 (layout in gated_delta.cu).
fn prep_smem(dk: usize) -> usize {
    (2 * CHUNK * (dk + 1) + CHUNK * CHUNK + 2 * CHUNK) * 4
}

/// Dynamic shared memory of gated_delta_chunks_f32 (layout in gated_delta.cu).
fn chunks_smem(dk: usize) -> usize {
    (dk * 32 + 3 * CHUNK * dk + CHUNK_MAX_DK + CHUNK * CHUNK + CHUNK * 32 + CHUNK) * 4
}

/// Byte offsets of the chunked form's intermediates in the backend scratch, each 256-byte
/// aligned: normalised q and k `[n, k_heads, dk]`, Kt `[n, v_heads, dk]`, G `[n, v_heads]`,
/// P `[v_heads, chunks, CHUNK, CHUNK]`; and the total.
fn scratch_layout(s: &DeltaShape) -> ([usize; 5], usize) {
    let chunks = s.n.div_ceil(CHUNK);
    let sizes = [
        s.n * s.k_heads * s.dk,
        s.n * s.k_heads * s.dk,
        s.n * s.v_heads * s.dk,
        s.n * s.v_heads,
        s.v_heads * chunks * CHUNK * CHUNK,
    ];
    let mut offs = [0usize; 5];
    let mut at = 0;
    for (o, floats) in offs.iter_mut().zip(sizes) {
        *o = at;
        at += (floats * 4).next_multiple_of(256);
    }
    (offs, at)
}

fn gated_delta_chunked(enc: &mut Enc<'_>, d: &Args, s: &DeltaShape) -> Result<(), CudaError> {
    const OP: &str = "gated_delta";
    let (offs, total) = scratch_layout(s);
    let base = enc.scratch.get(enc.stream, total)?;
    let [qn, kn, kt, gc, pm] = offs.map(|o| base + o as u64);
    let cfg = LaunchConfig {
        grid_dim: (d.vh, grid_y(s.n.div_ceil(CHUNK), "chunks", OP)?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: prep_smem(s.dk) as u32,
    };
    // SAFETY: gated_delta_prep_f32(const float* x3, const void* x2, int, float* x6, u32 x5);
    // qkv/a/b/out sizes checked by Graph::validate, v_heads % k_heads == 0 by check_shapes;
    // qn/kn/kt/gc/pm are the scratch regions of scratch_layout (total bytes obtained above);
    // dk <= 128 and a multiple of 4 (chunked_applies), as the kernels require.
    unsafe {
        launch!(
            enc,
            "gated_delta.cu",
            "gated_delta_prep_f32",
            cfg,
            [
                d.qp, d.ap, d.bp, d.al, d.dt, d.vdt, qn, kn, kt, gc, pm, d.op, d.n, d.kh, d.vh,
                d.dk, d.dv
            ]
        )
    }?;
    let cfg = LaunchConfig {
        grid_dim: (
            d.vh,
            grid_y(s.dv.div_ceil(32), "value column blocks", OP)?,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: chunks_smem(s.dk) as u32,
    };
    // SAFETY: gated_delta_chunks_f32(const float* x5, float* x2, u32 x5); the scratch regions
    // as written by the prep kernel above (stream order), state v_heads * dk * dv floats, out
    // n * v_heads * dv floats holding Vt.
    unsafe {
        launch!(
            enc,
            "gated_delta.cu",
            "gated_delta_chunks_f32",
            cfg,
            [qn, kn, kt, gc, pm, d.sp, d.op, d.n, d.kh, d.vh, d.dk, d.dv]
        )
    }
}
