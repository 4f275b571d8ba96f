//! Op::KvAppend and Op::Attention -> kernels/attention.cu, and kernels/attention_tc.cu for
//! prefill on the tensor cores.
//!
//! Which attention kernel: up to [`SPLIT_MAX_N`] queries take split-K flash-decoding (the GQA
//! kernels, which read each K/V row once for all the query heads sharing it, for head_dim 128
//! or 256; one block per query head otherwise); wider batches take the tensor-core kernel (sm_80+, head_dim 64, 128 or 256), else the tiled SIMT
//! kernel (head_dim <= 128, a multiple of 4), else the one-pass kernel.

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, Cache, Pos};

use super::{Enc, grid_1d, grid_y, launch, u32_of};
use crate::error::CudaError;

/// `ATT_WARPS` and `ATT_MAXD` in attention.cu.
const WARPS: u32 = 8;
const MAX_HEAD_DIM: usize = 8 * 32;
/// `AS_WARPS` and `AS_KEYS` in attention.cu (the split, flash-decoding path).
const SPLIT_WARPS: u32 = 4;
const SPLIT_KEYS: usize = 256;
/// attention_gqa_* (attention.cu): warps per block (GQ_WARPS), the largest split count the
/// merge stages (GM_MAXZ) and the merge's block (GM_THREADS).
const GQA_WARPS: u32 = 4;
const GQA_MAX_SPLITS: usize = 1024;
const GQA_MERGE_THREADS: u32 = 256;
/// Batches up to this many queries take the split path: few queries leave the one-block-per-
/// (query, head) kernel with too few blocks to fill the GPU over a long context.
pub(crate) const SPLIT_MAX_N: usize = 4;
/// attention_tiled_f32 (wider batches, head_dim <= 128 and a multiple of 4): queries and keys
/// per tile, and the widest head (AT_Q, AT_K, AT_D in attention.cu).
const TILED_Q: usize = 32;
const TILED_K: usize = 32;
const TILED_D: usize = 128;

/// attention_tc_f32_d* (attention_tc.cu): queries per block (TA_Q) and keys per tile (TA_K).
const TC_Q: usize = 64;
const TC_K: usize = 32;

/// The tensor-core prefill kernel for `head_dim`, where there is one and the device may run it.
fn tc_attention_kernel(enc: &Enc<'_>, head_dim: usize) -> Option<&'static str> {
    if !enc.kernels.tc_attention() {
        return None;
    }
    match head_dim {
        64 => Some("attention_tc_f32_d64"),
        128 => Some("attention_tc_f32_d128"),
        256 => Some("attention_tc_f32_d256"),
        _ => None,
    }
}

/// Dynamic shared memory of attention_tc_f32_d{head_dim}: the q tile (rows padded by 8
/// floats), the K tile split in tf32 halves (rows padded by 16), V split by key pairs (rows
/// padded by 8); the warps' P tiles reuse K's space.
fn tc_attention_smem(head_dim: usize) -> usize {
    (TC_Q * (head_dim + 8) + TC_K * (2 * head_dim + 16) + TC_K / 2 * (4 * head_dim + 8)) * 4
}

/// The GQA decode kernel for this head shape and the query heads per block (the largest of 8,
/// 4, 2, 1 dividing the group), or None for head dims other than 128 and 256.
fn gqa_kernel(heads: usize, kv_heads: usize, head_dim: usize) -> Option<(&'static str, usize)> {
    let group = heads / kv_heads;
    let hb = [8, 4, 2, 1]
        .into_iter()
        .find(|hb| group.is_multiple_of(*hb))?;
    const NAMES: [[&str; 4]; 2] = [
        [
            "attention_gqa_f32_h1_d128",
            "attention_gqa_f32_h2_d128",
            "attention_gqa_f32_h4_d128",
            "attention_gqa_f32_h8_d128",
        ],
        [
            "attention_gqa_f32_h1_d256",
            "attention_gqa_f32_h2_d256",
            "attention_gqa_f32_h4_d256",
            "attention_gqa_f32_h8_d256",
        ],
    ];
    let d = match head_dim {
        128 => 0,
        256 => 1,
        _ => return None,
    };
    Some((NAMES[d][hb.trailing_zeros() as usize], hb))
}

/// Key splits of the GQA decode kernel: enough blocks for two per SM, no split shorter than
/// one warp step of keys at full context, at most what the merge stages.
fn gqa_splits(blocks: usize, sm_count: usize, max_ctx: usize, head_dim: usize) -> usize {
    let step = GQA_WARPS as usize * (4 / (head_dim / 128));
    let want = (2 * sm_count).div_ceil(blocks.max(1));
    want.min(max_ctx.div_ceil(step)).clamp(1, GQA_MAX_SPLITS)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_append(
    enc: &mut Enc<'_>,
    k: BufId<Act>,
    v: BufId<Act>,
    pos: BufId<Pos>,
    k_cache: BufId<Cache>,
    v_cache: BufId<Cache>,
    n: usize,
    kv_dim: usize,
    max_ctx: usize,
) -> Result<(), CudaError> {
    const OP: &str = "kv_append";
    if n * kv_dim == 0 {
        return Ok(());
    }
    let (kp, vp, pp, kc, vc) = (
        enc.buf(k.raw())?,
        enc.buf(v.raw())?,
        enc.buf(pos.raw())?,
        enc.buf(k_cache.raw())?,
        enc.buf(v_cache.raw())?,
    );
    let (n_, d, m) = (
        u32_of(n, "n", OP)?,
        u32_of(kv_dim, "kv_dim", OP)?,
        u32_of(max_ctx, "max_ctx", OP)?,
    );
    // SAFETY: kv_append_f32(const float*, const float*, const u32*, float*, float*, u32, u32,
    // u32); k/v hold n * kv_dim floats, caches max_ctx * kv_dim (Graph::validate); rows at
    // pos >= max_ctx are skipped by the kernel.
    unsafe {
        launch!(
            enc,
            "attention.cu",
            "kv_append_f32",
            grid_1d(n * kv_dim),
            [kp, vp, pp, kc, vc, n_, d, m]
        )
    }
}

pub(crate) struct AttnShape {
    pub n: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub max_ctx: usize,
}

pub(crate) fn attention(
    enc: &mut Enc<'_>,
    q: BufId<Act>,
    pos: BufId<Pos>,
    k_cache: BufId<Cache>,
    v_cache: BufId<Cache>,
    out: BufId<Act>,
    s: &AttnShape,
) -> Result<(), CudaError> {
    const OP: &str = "attention";
    if s.n == 0 || s.heads == 0 {
        return Ok(());
    }
    if s.head_dim == 0 || s.head_dim > MAX_HEAD_DIM {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: format!(
                "head_dim {} (the kernel takes 1..={MAX_HEAD_DIM})",
                s.head_dim
            ),
        });
    }
    if s.max_ctx == 0 {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: "max_ctx is 0".into(),
        });
    }
    let (qp, pp, kc, vc, op) = (
        enc.buf(q.raw())?,
        enc.buf(pos.raw())?,
        enc.buf(k_cache.raw())?,
        enc.buf(v_cache.raw())?,
        enc.buf(out.raw())?,
    );
    let (h, kvh, hd, scale, mc) = (
        u32_of(s.heads, "heads", OP)?,
        u32_of(s.kv_heads, "kv_heads", OP)?,
        u32_of(s.head_dim, "head_dim", OP)?,
        s.scale,
        u32_of(s.max_ctx, "max_ctx", OP)?,
    );
    let ty = grid_y(s.n, "tokens", OP)?;
    if s.n <= SPLIT_MAX_N
        && let Some((name, hb)) = gqa_kernel(s.heads, s.kv_heads, s.head_dim)
    {
        let blocks_x = s.heads / hb;
        let splits = gqa_splits(blocks_x * s.n, enc.sm_count, s.max_ctx, s.head_dim);
        let sp = grid_y(splits, "key splits", OP)?;
        let recs = s.n * s.heads * splits;
        let acc_bytes = recs * s.head_dim * 4;
        let part = enc.scratch.get(enc.stream, acc_bytes + recs * 2 * 4)?;
        let (acc, ml) = (part, part + acc_bytes as u64);
        let cfg = LaunchConfig {
            grid_dim: (u32_of(blocks_x, "head groups", OP)?, ty, sp),
            block_dim: (GQA_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_gqa_f32_h*_d*(const float*, const u32*, const float*, const float*,
        // float*, float4*, u32, u32, float, u32, u32); q holds n * heads * head_dim floats, caches
        // max_ctx * kv_heads * head_dim (Graph::validate), head_dim is the kernel's D and HB
        // divides heads / kv_heads (gqa_kernel), so every float4 load is aligned in the 256-byte
        // aligned pool buffers; acc (scratch, 256-byte aligned) holds n * heads * splits *
        // head_dim floats and ml, right after it, 2 per record; keys are clamped to max_ctx.
        unsafe {
            launch!(
                enc,
                "attention.cu",
                name,
                cfg,
                [qp, pp, kc, vc, ml, acc, h, kvh, scale, mc, sp]
            )
        }?;
        let cfg = LaunchConfig {
            grid_dim: (h, ty, 1),
            block_dim: (GQA_MERGE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_gqa_merge_f32(const float*, const float4*, float*, u32, u32, u32);
        // ml and acc as written above (splits <= GM_MAXZ, head_dim / 4 <= GM_THREADS), out
        // n * heads * head_dim floats.
        return unsafe {
            launch!(
                enc,
                "attention.cu",
                "attention_gqa_merge_f32",
                cfg,
                [ml, acc, op, h, hd, sp]
            )
        };
    }
    if s.n <= SPLIT_MAX_N {
        let splits = s.max_ctx.div_ceil(SPLIT_KEYS);
        let sp = grid_y(splits, "key splits", OP)?;
        let part = enc
            .scratch
            .get(enc.stream, s.n * s.heads * splits * (s.head_dim + 2) * 4)?;
        let cfg = LaunchConfig {
            grid_dim: (h, ty, sp),
            block_dim: (SPLIT_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_split_f32(const float*, const u32*, const float*, const float*, float*,
        // u32, u32, u32, float, u32, u32); q holds n * heads * head_dim floats, caches max_ctx *
        // kv_heads * head_dim (Graph::validate); part (scratch) n * heads * splits * (head_dim + 2);
        // heads % kv_heads == 0 (check_shapes); keys are clamped to max_ctx in the kernel.
        unsafe {
            launch!(
                enc,
                "attention.cu",
                "attention_split_f32",
                cfg,
                [qp, pp, kc, vc, part, h, kvh, hd, scale, mc, sp]
            )
        }?;
        let cfg = LaunchConfig {
            grid_dim: (h, ty, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention_merge_f32(const float*, float*, u32, u32, u32); part as written above,
        // out n * heads * head_dim floats.
        return unsafe {
            launch!(
                enc,
                "attention.cu",
                "attention_merge_f32",
                cfg,
                [part, op, h, hd, sp]
            )
        };
    }
    if let Some(name) = tc_attention_kernel(enc, s.head_dim) {
        let smem = tc_attention_smem(s.head_dim);
        if smem <= enc.smem_optin {
            let n_u = u32_of(s.n, "tokens", OP)?;
            let cfg = LaunchConfig {
                grid_dim: (u32_of(s.n.div_ceil(TC_Q), "query tiles", OP)?, h, 1),
                block_dim: (TC_Q as u32 / 16 * 32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: attention_tc_f32_d*(const float*, const u32*, const float*, const float*,
            // float*, u32, u32, u32, float, u32); q/out hold n * heads * head_dim floats,
            // caches max_ctx * kv_heads * head_dim (Graph::validate); heads % kv_heads == 0
            // (check_shapes); head_dim is the kernel's D (tc_attention_kernel), so every row is
            // 16-byte aligned in the 256-byte aligned pool buffers; keys are clamped to max_ctx
            // and rows past n masked in the kernel.
            return unsafe {
                launch!(
                    enc,
                    "attention_tc.cu",
                    name,
                    cfg,
                    [qp, pp, kc, vc, op, n_u, h, kvh, scale, mc]
                )
            };
        }
    }
    if s.head_dim <= TILED_D && s.head_dim.is_multiple_of(4) {
        let smem =
            ((TILED_Q + TILED_K) * (TILED_D + 4) + TILED_K * TILED_D + TILED_Q * TILED_K) * 4;
        if smem <= enc.smem_optin {
            let n_u = u32_of(s.n, "tokens", OP)?;
            let cfg = LaunchConfig {
                grid_dim: (u32_of(s.n.div_ceil(TILED_Q), "query tiles", OP)?, h, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: attention_tiled_f32(const float*, const u32*, const float*, const float*,
            // float*, u32, u32, u32, u32, float, u32); q/out hold n * heads * head_dim floats,
            // caches max_ctx * kv_heads * head_dim (Graph::validate); heads % kv_heads == 0
            // (check_shapes); head_dim <= 128 and a multiple of 4 (above); keys are clamped to
            // max_ctx and rows past n masked in the kernel.
            return unsafe {
                launch!(
                    enc,
                    "attention.cu",
                    "attention_tiled_f32",
                    cfg,
                    [qp, pp, kc, vc, op, n_u, h, kvh, hd, scale, mc]
                )
            };
        }
    }
    let cfg = LaunchConfig {
        grid_dim: (h, ty, 1),
        block_dim: (WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: attention_f32(const float*, const u32*, const float*, const float*, float*, u32,
    // u32, u32, float, u32); q/out hold n * heads * head_dim floats, caches max_ctx * kv_heads
    // * head_dim (Graph::validate); heads % kv_heads == 0 (check_shapes); the kernel clamps
    // the attended length to max_ctx.
    unsafe {
        launch!(
            enc,
            "attention.cu",
            "attention_f32",
            cfg,
            [qp, pp, kc, vc, op, h, kvh, hd, scale, mc]
        )
    }
}
