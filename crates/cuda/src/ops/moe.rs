//! Op::RouterTopK and Op::MoeExperts -> kernels/moe.cu
//!
//! Routing stays on the device. The experts' weights are reached through a device table of
//! per-expert pointers, built once per expert set (keyed by the op's `Arc`, which the cache
//! keeps alive so the key cannot be reused) and reused by every later graph.
//! Up to [`PAIR_MAX_N`] tokens run one matrix-vector pass per (token, slot) pair; wider
//! batches group the pairs by expert on the device and run tiled GEMMs per expert.

use std::sync::Arc;

use cudarc::driver::result as drv;
use cudarc::driver::{CudaStream, LaunchConfig};
use moeflux_core::{Act, BufId, ExpertWeights, Idx, Matrix};

use super::matmul::{GT, MOE_TM, MV_ROWS, mv_smem, tc_ok, tc_split, tc_split_bytes};
use super::{Enc, Fmt, format_of, grid_1d, grid_y, lanes_for, launch, u32_of, vec_ok};
use crate::error::CudaError;
use crate::pool::{CudaPool, DevMem};

pub(crate) const PAIR_MAX_N: usize = 2;

/// Per-format names of a vector-path decode kernel for each lanes-per-row-group choice
/// (index 0, 1, 2 = 32, 16, 8 lanes; see [`lanes_for`]).
macro_rules! lane_names {
    ($p:literal) => {
        [
            lane_names!(@l $p, "32"),
            lane_names!(@l $p, "16"),
            lane_names!(@l $p, "8"),
        ]
    };
    (@l $p:literal, $l:literal) => {
        [
            concat!($p, "_f32_l", $l),
            concat!($p, "_f16_l", $l),
            concat!($p, "_bf16_l", $l),
            concat!($p, "_q4_l", $l),
            concat!($p, "_q8_l", $l),
        ]
    };
}
const GATE_UP_VEC: [[&str; 5]; 3] = lane_names!("moe_gate_up_vec");
const DOWN_VEC: [[&str; 5]; 3] = lane_names!("moe_down_vec");
const DOWN_COMBINE_VEC: [[&str; 5]; 3] = lane_names!("moe_down_combine_vec");
const GATE_UP_SCALAR: [&str; 5] = [
    "moe_gate_up_scalar_f32",
    "moe_gate_up_scalar_f16",
    "moe_gate_up_scalar_bf16",
    "moe_gate_up_scalar_q4",
    "moe_gate_up_scalar_q8",
];
const DOWN_SCALAR: [&str; 5] = [
    "moe_down_scalar_f32",
    "moe_down_scalar_f16",
    "moe_down_scalar_bf16",
    "moe_down_scalar_q4",
    "moe_down_scalar_q8",
];
/// Rows per row group of the vector gate/up and down kernels (`GU_R`, `DN_R` in moe.cu) and
/// output rows per block of down_combine (`DC_RB`).
const GU_R: usize = 2;
const DN_R: usize = 4;
const DC_RB: usize = 8;

/// How one role's decode kernel runs: name, rows per block, dynamic shared memory.
pub(crate) struct MvPlan {
    name: &'static str,
    rows_per_block: usize,
    smem: usize,
}

impl MvPlan {
    /// 256-thread blocks over `rows` output rows, `y` blocks deep (pairs or tokens).
    fn cfg(
        &self,
        rows: usize,
        y: usize,
        y_what: &str,
        op: &'static str,
    ) -> Result<LaunchConfig, CudaError> {
        Ok(LaunchConfig {
            grid_dim: (
                u32_of(rows.div_ceil(self.rows_per_block), "row blocks", op)?,
                grid_y(y, y_what, op)?,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: self.smem as u32,
        })
    }
}

fn mv_plan(
    role: RoleFmt,
    cols: usize,
    vec_names: &[[&'static str; 5]; 3],
    scalar_names: &[&'static str; 5],
    rows_per_group: usize,
) -> MvPlan {
    if role.vec {
        let (lanes, li) = lanes_for(cols, role.fmt.elems16());
        MvPlan {
            name: role.fmt.pick(&vec_names[li]),
            rows_per_block: 8 * (32 / lanes) * rows_per_group,
            smem: mv_smem(cols, role.fmt.elems16(), lanes),
        }
    } else {
        MvPlan {
            name: role.fmt.pick(scalar_names),
            rows_per_block: MV_ROWS,
            smem: mv_smem(cols, 4, 32),
        }
    }
}

/// The per-pair matrix-vector kernels (gate/up, down) when the batch is small enough and
/// their staged inputs fit in shared memory; None means the grouped GEMMs.
fn per_pair_plans(
    enc: &Enc<'_>,
    gu: RoleFmt,
    dn: RoleFmt,
    s: &MoeShape,
) -> Option<(MvPlan, MvPlan)> {
    let gu_plan = mv_plan(gu, s.hidden, &GATE_UP_VEC, &GATE_UP_SCALAR, GU_R);
    let dn_plan = mv_plan(dn, s.inter, &DOWN_VEC, &DOWN_SCALAR, DN_R);
    (s.n <= PAIR_MAX_N && gu_plan.smem.max(dn_plan.smem) <= enc.smem_optin)
        .then_some((gu_plan, dn_plan))
}

/// The fused down + combine kernel for a resident table at decode, when it applies: the
/// per-pair path, the vector path for down, and its staged h rows (k of them) plus partial
/// sums fit in shared memory.
fn down_combine_plan(enc: &Enc<'_>, gu: RoleFmt, dn: RoleFmt, s: &MoeShape) -> Option<MvPlan> {
    if !dn.vec || per_pair_plans(enc, gu, dn, s).is_none() {
        return None;
    }
    let (lanes, li) = lanes_for(s.inter, dn.fmt.elems16());
    let smem = s.k * (mv_smem(s.inter, dn.fmt.elems16(), lanes) + DC_RB * 4);
    (smem <= enc.smem_optin).then(|| MvPlan {
        name: dn.fmt.pick(&DOWN_COMBINE_VEC[li]),
        rows_per_block: DC_RB,
        smem,
    })
}
const GEMM_GATE_UP: [&str; 5] = [
    "moe_gemm_gate_up_f32",
    "moe_gemm_gate_up_f16",
    "moe_gemm_gate_up_bf16",
    "moe_gemm_gate_up_q4",
    "moe_gemm_gate_up_q8",
];
const TC_GATE_UP_M32: [&str; 5] = [
    "",
    "",
    "moe_tc_gate_up_bf16_m32",
    "moe_tc_gate_up_q4_m32",
    "moe_tc_gate_up_q8_m32",
];
const TC_GATE_UP_M64: [&str; 5] = [
    "",
    "",
    "moe_tc_gate_up_bf16_m64",
    "moe_tc_gate_up_q4_m64",
    "moe_tc_gate_up_q8_m64",
];
const TC_DOWN_M32: [&str; 5] = [
    "",
    "",
    "moe_tc_down_bf16_m32",
    "moe_tc_down_q4_m32",
    "moe_tc_down_q8_m32",
];
const TC_DOWN_M64: [&str; 5] = [
    "",
    "",
    "moe_tc_down_bf16_m64",
    "moe_tc_down_q4_m64",
    "moe_tc_down_q8_m64",
];
const GEMM_DOWN: [&str; 5] = [
    "moe_gemm_down_f32",
    "moe_gemm_down_f16",
    "moe_gemm_down_bf16",
    "moe_gemm_down_q4",
    "moe_gemm_down_q8",
];

/// `shape` is (tokens, routed experts, k).
pub(crate) fn router_topk(
    enc: &mut Enc<'_>,
    logits: BufId<Act>,
    shared_gate: Option<BufId<Act>>,
    idx: BufId<Idx>,
    weights: BufId<Act>,
    shape: (usize, usize, usize),
    renorm: bool,
) -> Result<(), CudaError> {
    const OP: &str = "router_topk";
    let (n, experts, k) = shape;
    if n == 0 {
        return Ok(());
    }
    // Registers hold every probability when each lane has at most 16; else shared memory.
    let in_regs = experts <= 512 && k <= 32;
    let smem = if in_regs { 0 } else { 4 * experts * 4 };
    if smem > enc.smem_optin {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: format!("{experts} experts exceed the kernel's shared memory"),
        });
    }
    let cfg = LaunchConfig {
        grid_dim: (u32_of(n.div_ceil(4), "blocks", OP)?, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (lp, ip, wp) = (
        enc.buf(logits.raw())?,
        enc.buf(idx.raw())?,
        enc.buf(weights.raw())?,
    );
    let gp = match shared_gate {
        Some(g) => enc.buf(g.raw())?,
        None => 0,
    };
    let (n_, e, k_, r) = (
        u32_of(n, "n", OP)?,
        u32_of(experts, "experts", OP)?,
        u32_of(k, "k", OP)?,
        renorm as i32,
    );
    // SAFETY: router_topk_{reg_,}f32(const float*, const float*, u32*, float*, u32, u32, u32,
    // int), the register one only for experts <= 512 and k <= 32;
    // logits hold n * experts floats, the shared gate (or null) n, idx/weights n * (k + 1 if
    // shared else k) (Graph::validate), 1 <= k <= experts (check_shapes).
    unsafe {
        launch!(
            enc,
            "moe.cu",
            if in_regs {
                "router_topk_reg_f32"
            } else {
                "router_topk_f32"
            },
            cfg,
            [lp, gp, ip, wp, n_, e, k_, r]
        )
    }
}

/// Format, group, scale dtype and vector-path eligibility of one role (gate+up, or down).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RoleFmt {
    pub(crate) fmt: Fmt,
    pub(crate) group: u32,
    pub(crate) sdt: i32,
    pub(crate) vec: bool,
}

pub(crate) struct ExpertTable {
    experts: Arc<[ExpertWeights]>,
    mem: DevMem,
    gate_up: RoleFmt,
    down: RoleFmt,
}

/// Device tables of expert weight pointers, one per distinct expert set.
#[derive(Default)]
pub(crate) struct ExpertTables {
    tables: Vec<ExpertTable>,
}

impl ExpertTables {
    fn index(
        &mut self,
        pool: &mut CudaPool,
        stream: &Arc<CudaStream>,
        experts: &Arc<[ExpertWeights]>,
    ) -> Result<usize, CudaError> {
        if let Some(i) = self
            .tables
            .iter()
            .position(|t| Arc::ptr_eq(&t.experts, experts))
        {
            return Ok(i);
        }
        let t = build_table(pool, stream, experts)?;
        self.tables.push(t);
        Ok(self.tables.len() - 1)
    }

    /// Builds the table for `experts` now (called from `prepare`, so the first step does not pay).
    pub fn ensure(
        &mut self,
        pool: &mut CudaPool,
        stream: &Arc<CudaStream>,
        experts: &Arc<[ExpertWeights]>,
    ) -> Result<(), CudaError> {
        self.index(pool, stream, experts).map(|_| ())
    }
}

fn build_table(
    pool: &mut CudaPool,
    stream: &Arc<CudaStream>,
    experts: &Arc<[ExpertWeights]>,
) -> Result<ExpertTable, CudaError> {
    const OP: &str = "moe_experts";
    let first = experts.first().ok_or_else(|| CudaError::Unsupported {
        op: OP,
        msg: "no experts".into(),
    })?;
    let gu = format_of(first.gate.format, OP)?;
    let d = format_of(first.down.format, OP)?;
    let mut ptrs: Vec<u64> = Vec::with_capacity(experts.len() * 9);
    let (mut gu_vec, mut d_vec) = (true, true);
    let region = |pool: &mut CudaPool, r: Option<moeflux_core::Region>| -> Result<u64, CudaError> {
        match r {
            Some(r) => Ok(pool.ptr(r.buf.raw())? + r.offset as u64),
            None => Ok(0),
        }
    };
    for (i, e) in experts.iter().enumerate() {
        let same = |m: &Matrix, want: WeightFmt| m.format == want;
        if !same(&e.gate, first.gate.format)
            || !same(&e.up, first.gate.format)
            || !same(&e.down, first.down.format)
        {
            return Err(CudaError::Unsupported {
                op: OP,
                msg: format!(
                    "expert {i} is stored as gate {} / up {} / down {}, expert 0 as gate {} / down {}: every expert's gate and up must share one format and every down another",
                    e.gate.format, e.up.format, e.down.format, first.gate.format, first.down.format
                ),
            });
        }
        for (j, m) in [&e.gate, &e.up, &e.down].into_iter().enumerate() {
            let data = region(pool, Some(m.data))?;
            let (fmt, group, _) = if j < 2 { gu } else { d };
            if !vec_ok(fmt, data, m.cols, group) {
                if j < 2 {
                    gu_vec = false;
                } else {
                    d_vec = false;
                }
            }
            ptrs.push(data);
            ptrs.push(region(pool, m.scales)?);
            ptrs.push(region(pool, m.biases)?);
        }
    }
    let bytes = ptrs.len() * 8;
    let mem = DevMem::zeroed(stream.context(), stream, bytes, "expert table")?;
    // SAFETY: mem holds `bytes` bytes; synchronised before `ptrs` is dropped.
    unsafe { drv::memcpy_htod_async(mem.ptr, &ptrs, stream.cu_stream()) }
        .map_err(CudaError::driver("uploading the expert table"))?;
    stream
        .synchronize()
        .map_err(CudaError::driver("uploading the expert table"))?;
    Ok(ExpertTable {
        experts: experts.clone(),
        mem,
        gate_up: RoleFmt {
            fmt: gu.0,
            group: gu.1,
            sdt: gu.2,
            vec: gu_vec,
        },
        down: RoleFmt {
            fmt: d.0,
            group: d.1,
            sdt: d.2,
            vec: d_vec,
        },
    })
}

type WeightFmt = moeflux_core::WeightFormat;

pub(crate) struct MoeShape {
    pub n: usize,
    pub k: usize,
    pub hidden: usize,
    pub inter: usize,
}

pub(crate) fn align256(v: usize) -> usize {
    v.div_ceil(256) * 256
}

pub(crate) fn moe_experts(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    idx: BufId<Idx>,
    weights: BufId<Act>,
    experts: &Arc<[ExpertWeights]>,
    out: BufId<Act>,
    s: &MoeShape,
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts";
    if s.n == 0 || s.hidden == 0 {
        return Ok(());
    }
    let ti = enc.tables.index(enc.pool, enc.stream, experts)?;
    let (table, gate_up, down) = {
        let t = &enc.tables.tables[ti];
        (t.mem.ptr, t.gate_up, t.down)
    };
    let pass = Pass {
        table,
        num_experts: u32_of(experts.len(), "experts", OP)?,
        gate_up,
        down,
        idx: enc.buf(idx.raw())?,
    };
    table_op(enc, &pass, x, weights, out, s, OP)
}

/// The whole op over a device table holding every expert the routing can name (resident
/// experts, or a pinned layer of streamed ones): scratch, one pass, the combine.
pub(crate) fn table_op(
    enc: &mut Enc<'_>,
    pass: &Pass,
    x: BufId<Act>,
    weights: BufId<Act>,
    out: BufId<Act>,
    s: &MoeShape,
    op: &'static str,
) -> Result<(), CudaError> {
    let sc = ScratchLayout::new(s, pass.num_experts as usize, 0, 0);
    let base = enc.scratch.get(enc.stream, sc.total)?;
    let (xp, wp, outp) = (
        enc.buf(x.raw())?,
        enc.buf(weights.raw())?,
        enc.buf(out.raw())?,
    );
    // At decode the down projections and the combine run as one kernel; every pair's y row
    // is then never materialised, so there is nothing to zero either.
    let fused = down_combine_plan(enc, pass.gate_up, pass.down, s);
    if fused.is_none() {
        zero_y(enc, &sc, base, s)?;
    }
    let combined = expert_pass(
        enc,
        pass,
        &sc,
        base,
        xp,
        &mut XSplit::default(),
        s,
        op,
        fused.map(|f| (f, wp, outp)),
    )?;
    if !combined {
        combine(enc, &sc, base, wp, outp, s, op)?;
    }
    Ok(())
}

/// Whether the op's x has been split (`ScratchLayout::x_split`) by an earlier pass: one per op,
/// shared by its passes (the waves of a streamed op all read the same x).
#[derive(Default)]
pub(crate) struct XSplit(pub(crate) bool);

/// One pass of the routed experts over the pairs whose (possibly remapped) index is below
/// `num_experts`: h and y rows of those pairs are written, the others are left alone.
pub(crate) struct Pass {
    pub(crate) table: u64,
    pub(crate) num_experts: u32,
    pub(crate) gate_up: RoleFmt,
    pub(crate) down: RoleFmt,
    /// Device `[n * k]` u32 expert index per pair, as the table numbers them.
    pub(crate) idx: u64,
}

/// Byte offsets in the scratch block: h [pairs, inter] | y [pairs, hidden] | sorted [pairs] |
/// tiles [max_tiles * 3] | ntiles | tiles_b [min(experts, pairs) * 3] | ntiles_b | (streamed)
/// idx [pairs] | table [wave * 9 u64] | the f16 splits of x [n rows] and of h [pairs rows] for
/// the affine tensor-core GEMMs.
pub(crate) struct ScratchLayout {
    pub(crate) h: usize,
    pub(crate) x_split: usize,
    pub(crate) h_split: usize,
    pub(crate) y: usize,
    pub(crate) sorted: usize,
    pub(crate) tiles: usize,
    pub(crate) ntiles: usize,
    /// Half-size remainder tiles (at most one per expert) and their count.
    pub(crate) tiles_b: usize,
    pub(crate) ntiles_b: usize,
    pub(crate) wave_idx: usize,
    pub(crate) wave_table: usize,
    pub(crate) total: usize,
    pub(crate) max_tiles: usize,
}

impl ScratchLayout {
    pub(crate) fn new(
        s: &MoeShape,
        num_experts: usize,
        wave_idx_pairs: usize,
        wave_experts: usize,
    ) -> Self {
        let pairs = s.n * s.k;
        let max_tiles = pairs.div_ceil(MOE_TM) + num_experts.min(pairs);
        let h = 0;
        let y = h + align256(pairs * s.inter * 4);
        let sorted = y + align256(pairs * s.hidden * 4);
        let tiles = sorted + align256(pairs * 4);
        let ntiles = tiles + align256(max_tiles * 12);
        let tiles_b = ntiles + 256;
        let ntiles_b = tiles_b + align256(num_experts.min(pairs) * 12);
        let wave_idx = ntiles_b + 256;
        let wave_table = wave_idx + align256(wave_idx_pairs * 4);
        let x_split = wave_table + align256(wave_experts * 9 * 8);
        let h_split = x_split + align256(tc_split_bytes(s.n, s.hidden));
        let total = h_split + align256(tc_split_bytes(pairs, s.inter));
        ScratchLayout {
            h,
            x_split,
            h_split,
            y,
            sorted,
            tiles,
            ntiles,
            tiles_b,
            ntiles_b,
            wave_idx,
            wave_table,
            total,
            max_tiles,
        }
    }
}

pub(crate) fn zero_y(
    enc: &mut Enc<'_>,
    sc: &ScratchLayout,
    base: u64,
    s: &MoeShape,
) -> Result<(), CudaError> {
    // Every pair's y row is read by the combine; pairs no pass computes stay zero.
    // SAFETY: y spans pairs * hidden floats of scratch.
    unsafe {
        drv::memset_d8_async(
            base + sc.y as u64,
            0,
            s.n * s.k * s.hidden * 4,
            enc.stream.cu_stream(),
        )
    }
    .map_err(CudaError::driver("moe: zeroing y"))
}

/// Runs `pass`: gate/up then down into the scratch y rows, or, with `down_combine` (its plan,
/// the weights and the output; decode over a table holding every routed expert), the down
/// projections and the combine into the output in one kernel. Returns whether it combined.
#[allow(non_snake_case)] // OP names the op in errors, as in the other op functions
#[allow(clippy::too_many_arguments)]
pub(crate) fn expert_pass(
    enc: &mut Enc<'_>,
    pass: &Pass,
    sc: &ScratchLayout,
    base: u64,
    xp: u64,
    x_split: &mut XSplit,
    s: &MoeShape,
    OP: &'static str,
    down_combine: Option<(MvPlan, u64, u64)>,
) -> Result<bool, CudaError> {
    let (gu, dn) = (pass.gate_up, pass.down);
    let (table, ne, ip) = (pass.table, pass.num_experts, pass.idx);
    let pairs = s.n * s.k;
    let (h, y, sorted, tiles, ntiles) = (
        base + sc.h as u64,
        base + sc.y as u64,
        base + sc.sorted as u64,
        base + sc.tiles as u64,
        base + sc.ntiles as u64,
    );
    let (k, hidden, inter) = (
        u32_of(s.k, "k", OP)?,
        u32_of(s.hidden, "hidden", OP)?,
        u32_of(s.inter, "inter", OP)?,
    );
    let (gu_group, gu_sdt, dn_group, dn_sdt) = (gu.group, gu.sdt, dn.group, dn.sdt);

    if let Some((gu_plan, dn_plan)) = per_pair_plans(enc, gu, dn, s) {
        let cfg = gu_plan.cfg(s.inter, pairs, "pairs", OP)?;
        // SAFETY: moe_gate_up_*(const u64*, u32, const float*, const u32*, u32, u32, u32, u32,
        // int, float*); the table holds 9 pointers per expert to matrices whose extents were
        // checked (Graph::validate for resident experts, the record size for streamed ones);
        // x holds n * hidden floats, idx n * k; h (scratch) pairs * inter. Pairs with an index
        // >= ne are skipped.
        unsafe {
            launch!(
                enc,
                "moe.cu",
                gu_plan.name,
                cfg,
                [table, ne, xp, ip, k, hidden, inter, gu_group, gu_sdt, h]
            )
        }?;
        if let Some((plan, wp, outp)) = down_combine {
            let cfg = plan.cfg(s.hidden, s.n, "tokens", OP)?;
            // SAFETY: moe_down_combine_vec_*(const u64*, u32, const float*, const u32*, const
            // float*, u32, u32, u32, u32, int, float*); h holds pairs * inter floats, idx and
            // weights n * k, out n * hidden (Graph::validate); the shared memory was sized for
            // k staged h rows and k * DC_RB partial sums (down_combine_plan).
            unsafe {
                launch!(
                    enc,
                    "moe.cu",
                    plan.name,
                    cfg,
                    [
                        table, ne, h, ip, wp, k, hidden, inter, dn_group, dn_sdt, outp
                    ]
                )
            }?;
            return Ok(true);
        }
        let cfg = dn_plan.cfg(s.hidden, pairs, "pairs", OP)?;
        // SAFETY: moe_down_*(const u64*, u32, const float*, const u32*, u32, u32, u32, int,
        // float*); h holds pairs * inter floats and y (scratch) pairs * hidden.
        unsafe {
            launch!(
                enc,
                "moe.cu",
                dn_plan.name,
                cfg,
                [table, ne, h, ip, hidden, inter, dn_group, dn_sdt, y]
            )
        }?;
        Ok(false)
    } else {
        let route_smem = 2 * ne as usize * 4;
        if route_smem > enc.smem_optin {
            return Err(CudaError::Unsupported {
                op: OP,
                msg: format!("{ne} experts exceed the routing kernel's shared memory"),
            });
        }
        let p_u = u32_of(pairs, "pairs", OP)?;
        // Tensor cores when both roles allow them; their tile takes 32 or 64 pairs of one
        // expert (64 once experts average enough pairs to fill it).
        let tc = tc_roles(enc, gu, dn, s);
        // (`MOEFLUX_CUDA_MOE_TM=32|64` forces one, for measurements.)
        let forced = std::env::var("MOEFLUX_CUDA_MOE_TM").ok();
        let tm: u32 = match (tc, forced.as_deref()) {
            (false, _) => MOE_TM as u32,
            (true, Some("32")) => 32,
            (true, Some("64")) => 64,
            (true, _) if pairs >= 48 * (ne as usize).min(pairs) => 64,
            (true, _) => 32,
        };
        // With 64-pair tiles, an expert's remainder of at most 32 pairs takes a 32-pair tile
        // from a second list (moe_route), run by the m32 kernels after the m64 ones
        // (`MOEFLUX_CUDA_MOE_HALVES=0`: not, for measurements).
        let halves =
            tc && tm == 64 && std::env::var("MOEFLUX_CUDA_MOE_HALVES").map_or(true, |v| v != "0");
        let (tiles_b, ntiles_b) = match halves {
            true => (base + sc.tiles_b as u64, base + sc.ntiles_b as u64),
            false => (0u64, 0u64),
        };
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: route_smem as u32,
        };
        // SAFETY: moe_route(const u32*, u32, u32, u32, u32*, u32*, u32*, u32*, u32*); idx holds
        // pairs entries; sorted / tiles / ntiles are scratch sized pairs, 3 * max_tiles and 1
        // (max_tiles bounds the tile count for any tm >= MOE_TM); tiles_b / ntiles_b are null
        // or scratch sized 3 * min(experts, pairs) and 1 (one remainder tile per expert).
        unsafe {
            launch!(
                enc,
                "moe.cu",
                "moe_route",
                cfg,
                [ip, p_u, ne, tm, sorted, tiles, ntiles, tiles_b, ntiles_b]
            )
        }?;
        // Tensor-core tiles (4 warps; gate/up 32 rows per tile, down 64) or the f32 SIMT tiles
        // (8 warps, 64 rows), over the same arguments: (file, gate/up kernel, down kernel,
        // threads, gate/up rows per block, tile list, its count, grid rows).
        type Launch = (
            &'static str,
            &'static str,
            &'static str,
            u32,
            usize,
            u64,
            u64,
            u32,
        );
        let mut lists: Vec<Launch> = Vec::with_capacity(2);
        let ty = grid_y(sc.max_tiles, "expert tiles", OP)?;
        lists.push(match (tc, tm) {
            (true, 64) => (
                "gemm_tc.cu",
                gu.fmt.pick(&TC_GATE_UP_M64),
                dn.fmt.pick(&TC_DOWN_M64),
                128,
                32,
                tiles,
                ntiles,
                ty,
            ),
            (true, _) => (
                "gemm_tc.cu",
                gu.fmt.pick(&TC_GATE_UP_M32),
                dn.fmt.pick(&TC_DOWN_M32),
                128,
                32,
                tiles,
                ntiles,
                ty,
            ),
            (false, _) => (
                "moe.cu",
                gu.fmt.pick(&GEMM_GATE_UP),
                dn.fmt.pick(&GEMM_DOWN),
                256,
                GT,
                tiles,
                ntiles,
                ty,
            ),
        });
        if halves {
            let ty_b = grid_y((ne as usize).min(pairs), "remainder tiles", OP)?;
            lists.push((
                "gemm_tc.cu",
                gu.fmt.pick(&TC_GATE_UP_M32),
                dn.fmt.pick(&TC_DOWN_M32),
                128,
                32,
                tiles_b,
                ntiles_b,
                ty_b,
            ));
        }
        // The affine tensor-core kernels take their x split into f16 parts (gemm_tc.cu): made
        // by the first pass of the op that needs it, reused by its later waves.
        let gu_x = if tc && gu.fmt.affine() {
            let split = base + sc.x_split as u64;
            if !x_split.0 {
                tc_split(enc, xp, None, s.n, s.hidden, split, OP)?;
                x_split.0 = true;
            }
            split
        } else {
            xp
        };
        for &(file, gu_name, _, threads, gu_rows, tl, nt, ty) in &lists {
            let cfg = LaunchConfig {
                grid_dim: (u32_of(s.inter.div_ceil(gu_rows), "row tiles", OP)?, ty, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: moe_tc_gate_up_* / moe_gemm_gate_up_*(const u64*, const u32*, const u32*,
            // const u32*, const float*, u32, u32, u32, u32, int, float*); tiles beyond the
            // list's count exit and hold at most the kernel's tile size of pairs (moe_route
            // above); x n * hidden floats (affine tensor-core kernels: its split, n rows in
            // scratch), h pairs * inter floats; for the tensor-core kernels hidden, inter and
            // the group are multiples of 32 and every expert's data 16-byte aligned (tc_roles).
            unsafe {
                launch!(
                    enc,
                    file,
                    gu_name,
                    cfg,
                    [
                        table, sorted, tl, nt, gu_x, k, hidden, inter, gu_group, gu_sdt, h
                    ]
                )
            }?;
        }
        let dn_x = if tc && dn.fmt.affine() {
            // Only this pass's pairs: h rows of other waves' pairs are not computed here.
            let split = base + sc.h_split as u64;
            tc_split(enc, h, Some((ip, ne)), pairs, s.inter, split, OP)?;
            split
        } else {
            h
        };
        for &(file, _, dn_name, threads, _, tl, nt, ty) in &lists {
            let cfg = LaunchConfig {
                grid_dim: (u32_of(s.hidden.div_ceil(GT), "row tiles", OP)?, ty, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: moe_tc_down_* / moe_gemm_down_*(const u64*, const u32*, const u32*, const
            // u32*, const float*, u32, u32, u32, int, float*); h pairs * inter floats (affine
            // tensor-core kernels: its split, pairs rows in scratch), y pairs * hidden floats;
            // as above.
            unsafe {
                launch!(
                    enc,
                    file,
                    dn_name,
                    cfg,
                    [
                        table, sorted, tl, nt, dn_x, hidden, inter, dn_group, dn_sdt, y
                    ]
                )
            }?;
        }
        Ok(false)
    }
}

/// Whether both expert roles may take the tensor-core GEMMs (see `matmul::tc_ok`): every
/// expert's data passed the vector path's 16-byte alignment check, and the shapes and groups
/// are multiples of 32.
fn tc_roles(enc: &Enc<'_>, gu: RoleFmt, dn: RoleFmt, s: &MoeShape) -> bool {
    // tc_ok's data check is per matrix; `vec` already holds it for every expert.
    gu.vec
        && dn.vec
        && tc_ok(enc, gu.fmt, 0, s.hidden, gu.group)
        && tc_ok(enc, dn.fmt, 0, s.inter, dn.group)
}

pub(crate) fn combine(
    enc: &mut Enc<'_>,
    sc: &ScratchLayout,
    base: u64,
    wp: u64,
    op: u64,
    s: &MoeShape,
    name: &'static str,
) -> Result<(), CudaError> {
    let y = base + sc.y as u64;
    let (n_u, k, hidden) = (
        u32_of(s.n, "n", name)?,
        u32_of(s.k, "k", name)?,
        u32_of(s.hidden, "hidden", name)?,
    );
    // SAFETY: moe_combine_f32(const float*, const float*, float*, u32, u32, u32); y holds
    // pairs * hidden floats, weights n * k, out n * hidden (Graph::validate).
    unsafe {
        launch!(
            enc,
            "moe.cu",
            "moe_combine_f32",
            grid_1d(s.n * s.hidden),
            [y, wp, op, n_u, k, hidden]
        )
    }
}
