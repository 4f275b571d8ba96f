//! Op::Matmul -> kernels/matmul.cu
//!
//! Up to [`MATVEC_MAX_N`] tokens take the matrix-vector kernels (each weight byte read once
//! per token, 16-byte loads when the matrix's alignment allows it); wider batches take the
//! tiled GEMM, which dequantizes each weight tile once per 64 tokens.

use cudarc::driver::LaunchConfig;
use moeflux_core::{Act, BufId, Matrix};

use super::{Enc, Fmt, WMatArg, grid_y, lanes_for, launch, u32_of, vec_ok};
use crate::error::CudaError;

pub(crate) const MATVEC_MAX_N: usize = 2;

const MATVEC_VEC_R1: [&str; 5] = [
    "matvec_vec_f32_r1",
    "matvec_vec_f16_r1",
    "matvec_vec_bf16_r1",
    "matvec_vec_q4_r1",
    "matvec_vec_q8_r1",
];
const MATVEC_VEC_R2: [&str; 5] = [
    "matvec_vec_f32_r2",
    "matvec_vec_f16_r2",
    "matvec_vec_bf16_r2",
    "matvec_vec_q4_r2",
    "matvec_vec_q8_r2",
];
const MATVEC_VEC_R4: [&str; 5] = [
    "matvec_vec_f32_r4",
    "matvec_vec_f16_r4",
    "matvec_vec_bf16_r4",
    "matvec_vec_q4_r4",
    "matvec_vec_q8_r4",
];
const MATVEC_SCALAR_R1: [&str; 5] = [
    "matvec_scalar_f32_r1",
    "matvec_scalar_f16_r1",
    "matvec_scalar_bf16_r1",
    "matvec_scalar_q4_r1",
    "matvec_scalar_q8_r1",
];
const MATVEC_SCALAR_R4: [&str; 5] = [
    "matvec_scalar_f32_r4",
    "matvec_scalar_f16_r4",
    "matvec_scalar_bf16_r4",
    "matvec_scalar_q4_r4",
    "matvec_scalar_q8_r4",
];
const GEMM: [&str; 5] = ["gemm_f32", "gemm_f16", "gemm_bf16", "gemm_q4", "gemm_q8"];
/// Tensor-core GEMMs (gemm_tc.cu); f32 and f16 weights have none (see `tc_ok`).
const GEMM_TC: [&str; 5] = ["", "", "gemm_tc_bf16", "gemm_tc_q4", "gemm_tc_q8"];

/// Whether a matrix of `fmt` at `data` with `cols` columns may take the tensor-core kernels:
/// bf16 or affine weights (exact in bf16 as values or codes), 32-column stages inside one
/// quantization group, 16-byte aligned rows. f16 weights would need f16 parts of x (whose
/// range is too small for activations) and f32 weights are not exact in bf16.
pub(crate) fn tc_ok(enc: &Enc<'_>, fmt: Fmt, data: u64, cols: usize, group: u32) -> bool {
    enc.kernels.tensor_cores()
        && matches!(fmt, Fmt::BF16 | Fmt::Q4 | Fmt::Q8)
        && cols.is_multiple_of(32)
        && data.is_multiple_of(16)
        && (!fmt.affine() || (group as usize).is_multiple_of(32))
}

/// Bytes of `rows` rows of `cols` f32 split for the affine tensor-core kernels
/// (`tc_split_stride` in gemm_tc.cu).
pub(crate) fn tc_split_bytes(rows: usize, cols: usize) -> usize {
    rows * (4 + cols / 32 * 36) * 4
}

/// Splits `rows` rows of `cols` f32 at `x` into f16 parts at `dst` (tc_split_bytes of
/// scratch), the x operand of the affine tensor-core kernels. With `live` = (device `[rows]`
/// expert indices, experts), rows whose index is out of range are skipped (another wave's
/// expert pairs, which the expert kernels skip too).
pub(crate) fn tc_split(
    enc: &mut Enc<'_>,
    x: u64,
    live: Option<(u64, u32)>,
    rows: usize,
    cols: usize,
    dst: u64,
    op: &'static str,
) -> Result<(), CudaError> {
    if rows == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (u32_of(rows, "split rows", op)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (r, c) = (u32_of(rows, "rows", op)?, u32_of(cols, "cols", op)?);
    let (idx, ne) = live.unwrap_or((0, 0));
    // SAFETY: tc_split_f16(const float*, const u32*, u32, u32, u32, float*); x holds rows * cols
    // floats with 16-byte aligned rows and cols % 32 == 0 (tc_ok: pool and scratch buffers are
    // 256-byte aligned, rows are cols * 4 bytes); idx is null or holds rows entries; dst holds
    // tc_split_bytes(rows, cols).
    unsafe {
        launch!(
            enc,
            "gemm_tc.cu",
            "tc_split_f16",
            cfg,
            [x, idx, ne, r, c, dst]
        )
    }
}

/// Rows per block of the expert matrix-vector kernels (8 warps x `MV_R` = 2 in gemv.cuh), the
/// dense GEMM tile (`GT_M` = `GT_N`) and the expert GEMM's pairs per tile (`MOE_TM`).
pub(crate) const MV_ROWS: usize = 16;
pub(crate) const GT: usize = 64;
pub(crate) const MOE_TM: usize = 16;

/// Dynamic shared memory of a matrix-vector block over `cols` inputs: x staged, padded to the
/// span of one step of a `lanes`-lane row group (32: a whole warp) over `elems` elements each.
pub(crate) fn mv_smem(cols: usize, elems: usize, lanes: usize) -> usize {
    cols.div_ceil(lanes * elems) * lanes * elems * 4
}

/// Rows per warp of the matrix-vector kernels (4, 2 or 1; 2 only on the vector path): as many
/// as still give every SM two blocks (x is staged once per block, so more rows per block
/// amortise it; fewer keep small matrices parallel).
fn rows_per_warp(rows: usize, n: usize, sm_count: usize, vec: bool) -> usize {
    let enough = |r: usize| rows.div_ceil(8 * r) * n >= 2 * sm_count;
    if enough(4) {
        4
    } else if vec && enough(2) {
        2
    } else {
        1
    }
}

pub(crate) fn matmul(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    w: &Matrix,
    out: BufId<Act>,
    n: usize,
) -> Result<(), CudaError> {
    const OP: &str = "matmul";
    if n == 0 || w.rows == 0 {
        return Ok(());
    }
    let (wa, fmt) = enc.wmat(w, OP)?;
    let (xp, op) = (enc.buf(x.raw())?, enc.buf(out.raw())?);
    if n == 1 && matvec_stream(enc, fmt, &[(wa, op)], xp)? {
        return Ok(());
    }
    if n <= MATVEC_MAX_N {
        let vec = vec_ok(fmt, wa.data, w.cols, wa.group);
        let smem = mv_smem(w.cols, if vec { fmt.elems16() } else { 4 }, 32);
        if smem <= enc.smem_optin {
            let r = rows_per_warp(w.rows, n, enc.sm_count, vec);
            let names = match (vec, r) {
                (true, 4) => &MATVEC_VEC_R4,
                (true, 2) => &MATVEC_VEC_R2,
                (true, _) => &MATVEC_VEC_R1,
                (false, 4) => &MATVEC_SCALAR_R4,
                (false, _) => &MATVEC_SCALAR_R1,
            };
            let cfg = LaunchConfig {
                grid_dim: (
                    u32_of(w.rows.div_ceil(8 * r), "row blocks", OP)?,
                    n as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let name = fmt.pick(names);
            // SAFETY: matvec_*(WMat, const float*, float*); x holds n * cols floats and out
            // n * rows (Graph::validate); the vector path's alignment was checked by vec_ok.
            return unsafe { launch!(enc, "matmul.cu", name, cfg, [wa, xp, op]) };
        }
    }
    let n_u = u32_of(n, "n", OP)?;
    // Tensor-core tiles (bf16 mma, 4 warps) where the format and alignment allow them (tc_ok),
    // else the f32 SIMT tiles (8 warps); both 64 x 64 output tiles.
    let tc = tc_ok(enc, fmt, wa.data, w.cols, wa.group);
    let (file, name, threads) = if tc {
        ("gemm_tc.cu", fmt.pick(&GEMM_TC), 128)
    } else {
        ("matmul.cu", fmt.pick(&GEMM), 256)
    };
    // The affine tensor-core kernels take x split once into f16 parts (gemm_tc.cu).
    let xp = if tc && fmt.affine() {
        let dst = enc.scratch.get(enc.stream, tc_split_bytes(n, w.cols))?;
        tc_split(enc, xp, None, n, w.cols, dst, OP)?;
        dst
    } else {
        xp
    };
    let cfg = LaunchConfig {
        grid_dim: (
            u32_of(w.rows.div_ceil(GT), "row tiles", OP)?,
            grid_y(n.div_ceil(GT), "token tiles", OP)?,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: gemm_tc_* / gemm_*(WMat, const float*, float*, u32); x holds n * cols floats (for
    // gemm_tc_q4/q8 its split, n rows of scratch) and out n * rows (Graph::validate); for
    // gemm_tc, cols % 32 == 0 and 16-byte aligned rows
    // (tc_ok; pool buffers are 256-byte aligned); tiles past n or rows are masked in the
    // kernels.
    unsafe { launch!(enc, file, name, cfg, [wa, xp, op, n_u]) }
}

/// Parts of one `matvec_multi_*` launch (C struct MvParts in matmul.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MvPartsArg {
    w: [WMatArg; MV_PARTS],
    out: [u64; MV_PARTS],
    start: [u32; MV_PARTS],
    count: u32,
}

// SAFETY: #[repr(C)] plain-old-data with the field order, sizes and alignment of the C struct
// MvParts (4 WMat, 4 pointers, 4 unsigned ints, 1 unsigned int).
unsafe impl cudarc::driver::DeviceRepr for MvPartsArg {}

/// Matrices one `matvec_multi_*` launch takes (MV_PARTS in matmul.cu).
pub(crate) const MV_PARTS: usize = 4;

const MATVEC_MULTI_VEC_R1: [&str; 5] = [
    "matvec_multi_vec_f32_r1",
    "matvec_multi_vec_f16_r1",
    "matvec_multi_vec_bf16_r1",
    "matvec_multi_vec_q4_r1",
    "matvec_multi_vec_q8_r1",
];
const MATVEC_MULTI_VEC_R2: [&str; 5] = [
    "matvec_multi_vec_f32_r2",
    "matvec_multi_vec_f16_r2",
    "matvec_multi_vec_bf16_r2",
    "matvec_multi_vec_q4_r2",
    "matvec_multi_vec_q8_r2",
];
const MATVEC_MULTI_VEC_R4: [&str; 5] = [
    "matvec_multi_vec_f32_r4",
    "matvec_multi_vec_f16_r4",
    "matvec_multi_vec_bf16_r4",
    "matvec_multi_vec_q4_r4",
    "matvec_multi_vec_q8_r4",
];

/// Consecutive matrix-vector products of one input (`parts`: weight and output, 2 to
/// [`MV_PARTS`]) in one launch, when every matrix has the same format, columns, group and
/// vector-path eligibility and no output overlaps the input or another output. `Ok(false)`:
/// not eligible, nothing launched (the caller runs the ops one by one).
pub(crate) fn matvec_multi(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    parts: &[(&Matrix, BufId<Act>)],
    n: usize,
) -> Result<bool, CudaError> {
    const OP: &str = "matmul";
    if !(2..=MV_PARTS).contains(&parts.len()) || n == 0 || n > MATVEC_MAX_N {
        return Ok(false);
    }
    let cols = parts[0].0.cols;
    let xp = enc.buf(x.raw())?;
    let mut ranges = vec![(xp, xp + (n * cols * 4) as u64)];
    let mut ws = Vec::with_capacity(parts.len());
    for (w, out) in parts {
        if w.cols != cols || w.rows == 0 || w.format != parts[0].0.format {
            return Ok(false);
        }
        let (wa, fmt) = enc.wmat(w, OP)?;
        let op = enc.buf(out.raw())?;
        ranges.push((op, op + (n * w.rows * 4) as u64));
        ws.push((wa, fmt, op, vec_ok(fmt, wa.data, w.cols, wa.group)));
    }
    let disjoint = ranges
        .iter()
        .enumerate()
        .all(|(i, a)| ranges[i + 1..].iter().all(|b| a.1 <= b.0 || b.1 <= a.0));
    let (fmt, vec, group) = (ws[0].1, ws[0].3, ws[0].0.group);
    if !disjoint || !vec || ws.iter().any(|w| w.3 != vec || w.0.group != group) {
        return Ok(false);
    }
    if n == 1 {
        let parts: Vec<(WMatArg, u64)> = ws.iter().map(|w| (w.0, w.2)).collect();
        if matvec_stream(enc, fmt, &parts, xp)? {
            return Ok(true);
        }
    }
    let smem = mv_smem(cols, fmt.elems16(), 32);
    if smem > enc.smem_optin {
        return Ok(false);
    }
    let rows: usize = parts.iter().map(|(w, _)| w.rows).sum();
    let r = rows_per_warp(rows, n, enc.sm_count, true);
    let mut a = MvPartsArg::default();
    let mut blocks = 0usize;
    for (i, (wa, _, op, _)) in ws.iter().enumerate() {
        a.w[i] = *wa;
        a.out[i] = *op;
        a.start[i] = u32_of(blocks, "row blocks", OP)?;
        blocks += (wa.rows as usize).div_ceil(8 * r);
    }
    a.count = parts.len() as u32;
    let names = match r {
        4 => &MATVEC_MULTI_VEC_R4,
        2 => &MATVEC_MULTI_VEC_R2,
        _ => &MATVEC_MULTI_VEC_R1,
    };
    let cfg = LaunchConfig {
        grid_dim: (u32_of(blocks, "row blocks", OP)?, n as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: matvec_multi_*(MvParts, const float*); x holds n * cols floats and each out n *
    // rows of its matrix (Graph::validate); every matrix passed vec_ok; outputs overlap neither
    // x nor each other, so one launch equals the ops in order.
    unsafe { launch!(enc, "matmul.cu", fmt.pick(names), cfg, [a, xp]) }?;
    Ok(true)
}

/// Stages of the streamed matvec's copy ring (MS_STAGES in gemv.cuh).
const MS_STAGES: usize = 4;

/// `matvec_stream_<fmt>_l<L>_r<R>` per format, (L, R) in (32, 1), (32, 2), (16, 1), (16, 2),
/// (8, 1), (8, 2).
const MATVEC_STREAM: [[&str; 6]; 5] = [
    [
        "matvec_stream_f32_l32_r1",
        "matvec_stream_f32_l32_r2",
        "matvec_stream_f32_l16_r1",
        "matvec_stream_f32_l16_r2",
        "matvec_stream_f32_l8_r1",
        "matvec_stream_f32_l8_r2",
    ],
    [
        "matvec_stream_f16_l32_r1",
        "matvec_stream_f16_l32_r2",
        "matvec_stream_f16_l16_r1",
        "matvec_stream_f16_l16_r2",
        "matvec_stream_f16_l8_r1",
        "matvec_stream_f16_l8_r2",
    ],
    [
        "matvec_stream_bf16_l32_r1",
        "matvec_stream_bf16_l32_r2",
        "matvec_stream_bf16_l16_r1",
        "matvec_stream_bf16_l16_r2",
        "matvec_stream_bf16_l8_r1",
        "matvec_stream_bf16_l8_r2",
    ],
    [
        "matvec_stream_q4_l32_r1",
        "matvec_stream_q4_l32_r2",
        "matvec_stream_q4_l16_r1",
        "matvec_stream_q4_l16_r2",
        "matvec_stream_q4_l8_r1",
        "matvec_stream_q4_l8_r2",
    ],
    [
        "matvec_stream_q8_l32_r1",
        "matvec_stream_q8_l32_r2",
        "matvec_stream_q8_l16_r1",
        "matvec_stream_q8_l16_r2",
        "matvec_stream_q8_l8_r1",
        "matvec_stream_q8_l8_r2",
    ],
];

/// Whether the streamed decode matvec may run: it needs cp.async (sm_80+), and
/// `MOEFLUX_CUDA_STREAM=0` turns it off (A/B measurements).
fn stream_enabled(enc: &Enc<'_>) -> bool {
    enc.kernels.tensor_cores() && std::env::var("MOEFLUX_CUDA_STREAM").as_deref() != Ok("0")
}

/// Rows per row group of a streamed kernel: 2 (x read once per step for two rows) when that
/// still leaves two blocks per SM and two tiles per block slot, else 1 (more warps per SM).
fn stream_rows(enc: &Enc<'_>, tiles2: usize, smem2: usize) -> usize {
    if 2 * smem2 + 2048 <= enc.smem_optin && tiles2 >= 2 * enc.sm_count {
        2
    } else {
        1
    }
}

/// The shape of a streamed kernel's work over rows of `cols` elements of one format: its lanes
/// per row group, and the shared memory its staged inputs and tiles take.
#[derive(Clone, Copy, Debug)]
struct StreamGeom {
    fmt: Fmt,
    cols: usize,
    /// Lanes per row group (`lanes_for`) and its index in the name table.
    lanes: usize,
    li: usize,
    /// Scale bytes per row (affine formats; 0 for dense ones).
    sb: usize,
}

impl StreamGeom {
    fn new(fmt: Fmt, cols: usize, group: u32, sdt: i32) -> Self {
        let (lanes, li) = lanes_for(cols, fmt.elems16());
        let sb = match fmt.affine() {
            true => cols / group as usize * if sdt == 0 { 4 } else { 2 },
            false => 0,
        };
        StreamGeom {
            fmt,
            cols,
            lanes,
            li,
            sb,
        }
    }

    /// Rows per tile with `r` rows per row group (`R * 256 / L`).
    fn tile_rows(&self, r: usize) -> usize {
        r * 256 / self.lanes
    }

    /// Bytes of one row in a tile: codes, scales and biases.
    fn row_bytes(&self) -> usize {
        self.cols / self.fmt.elems16() * 16 + 2 * self.sb
    }

    /// Shared memory of `rows` staged input rows and their per-chunk sums.
    fn x_bytes(&self, rows: usize) -> usize {
        let e = self.fmt.elems16();
        let padded = self.cols.div_ceil(self.lanes * e) * self.lanes * e;
        rows * (padded * 4 + padded / e * 4)
    }

    /// `matvec_stream_<fmt>_l<L>_r<R>` (matmul.cu) for this geometry and `r`.
    fn name(&self, r: usize) -> &'static str {
        MATVEC_STREAM[self.fmt as usize][2 * self.li + usize::from(r == 2)]
    }
}

/// A streamed kernel's launch: one block per `work` unit up to as many as fit on the device at
/// once with `smem` bytes each (at most 4 per SM): the blocks then walk the rest.
fn stream_cfg(
    enc: &Enc<'_>,
    work: usize,
    smem: usize,
    op: &'static str,
) -> Result<LaunchConfig, CudaError> {
    let per_sm = ((enc.smem_optin + 1024) / (smem + 1024)).clamp(1, 4);
    let blocks = work.min(enc.sm_count * per_sm).max(1);
    Ok(LaunchConfig {
        grid_dim: (u32_of(blocks, "blocks", op)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

/// One token through up to [`MV_PARTS`] matrices of one input (same format, columns, group and
/// scale dtype) with the streamed kernel. `Ok(false)`: not eligible (arch, alignment, shared
/// memory), nothing launched.
fn matvec_stream(
    enc: &mut Enc<'_>,
    fmt: Fmt,
    parts: &[(WMatArg, u64)],
    xp: u64,
) -> Result<bool, CudaError> {
    const OP: &str = "matmul";
    if !stream_enabled(enc) || parts.is_empty() || parts.len() > MV_PARTS {
        return Ok(false);
    }
    let w0 = parts[0].0;
    let cols = w0.cols as usize;
    let same = |w: &WMatArg| w.cols == w0.cols && w.group == w0.group && w.sdt == w0.sdt;
    if !parts
        .iter()
        .all(|(w, _)| same(w) && vec_ok(fmt, w.data, cols, w.group))
    {
        return Ok(false);
    }
    let g = StreamGeom::new(fmt, cols, w0.group, w0.sdt);
    let tiles = |r: usize| -> usize {
        let tr = g.tile_rows(r);
        parts
            .iter()
            .map(|(w, _)| (w.rows as usize).div_ceil(tr))
            .sum()
    };
    let smem = |r: usize| g.x_bytes(1) + MS_STAGES * g.tile_rows(r) * g.row_bytes();
    let r = stream_rows(enc, tiles(2), smem(2));
    let (tr, smem) = (g.tile_rows(r), smem(r));
    if smem > enc.smem_optin {
        return Ok(false);
    }
    let mut a = MvPartsArg::default();
    let mut start = 0usize;
    for (i, (w, out)) in parts.iter().enumerate() {
        a.w[i] = *w;
        a.out[i] = *out;
        a.start[i] = u32_of(start, "tiles", OP)?;
        start += (w.rows as usize).div_ceil(tr);
    }
    a.count = parts.len() as u32;
    let ntiles = u32_of(start, "tiles", OP)?;
    let cfg = stream_cfg(enc, start, smem, OP)?;
    // SAFETY: matvec_stream_*(MvParts, const float*, u32); x holds cols floats and each out
    // rows floats of its matrix (Graph::validate, n = 1); data is 16-byte aligned with rows of
    // a multiple of 16 bytes (vec_ok), so the kernel's 16-byte copies stay inside each matrix
    // (scales are copied at the alignment they have); smem matches the kernel's layout
    // (StreamGeom).
    let name = g.name(r);
    unsafe { launch!(enc, "matmul.cu", name, cfg, [a, xp, ntiles]) }?;
    Ok(true)
}
