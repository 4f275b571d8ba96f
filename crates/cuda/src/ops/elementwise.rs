//! Op::CopyRows, Op::Add, Op::SwiGlu, Op::SigmoidGate, Op::ScatterCols ->
//! kernels/elementwise.cu (CopyRows is a device-to-device copy).

use cudarc::driver::result as drv;
use moeflux_core::{Act, BufId, ColPart};

use super::{Enc, grid_1d, launch, u32_of};
use crate::error::CudaError;

pub(crate) fn copy_rows(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    out: BufId<Act>,
    start: usize,
    rows: usize,
    width: usize,
) -> Result<(), CudaError> {
    let bytes = rows * width * 4;
    if bytes == 0 {
        return Ok(());
    }
    let src = enc.buf(x.raw())? + (start * width * 4) as u64;
    let dst = enc.buf(out.raw())?;
    if x == out && start != 0 {
        return Err(CudaError::Unsupported {
            op: "copy_rows",
            msg: "in-place copy with an offset".into(),
        });
    }
    if src == dst {
        return Ok(());
    }
    // SAFETY: both ranges were validated against their buffers (Graph::validate); distinct
    // ids never share storage while both are live (planner invariant).
    unsafe { drv::memcpy_dtod_async(dst, src, bytes, enc.stream.cu_stream()) }
        .map_err(CudaError::driver("copy_rows: cuMemcpyDtoDAsync"))?;
    enc.recent.push("copy_rows (memcpy)");
    Ok(())
}

pub(crate) fn add(
    enc: &mut Enc<'_>,
    a: BufId<Act>,
    b: BufId<Act>,
    out: BufId<Act>,
    len: usize,
) -> Result<(), CudaError> {
    if len == 0 {
        return Ok(());
    }
    let (ap, bp, op) = (enc.buf(a.raw())?, enc.buf(b.raw())?, enc.buf(out.raw())?);
    let n = len as u64;
    // SAFETY: add_f32(const float*, const float*, float*, u64); all three hold len floats;
    // elementwise, so out may alias a or b.
    unsafe {
        launch!(
            enc,
            "elementwise.cu",
            "add_f32",
            grid_1d(len),
            [ap, bp, op, n]
        )
    }
}

pub(crate) fn swiglu(
    enc: &mut Enc<'_>,
    gate: BufId<Act>,
    up: BufId<Act>,
    out: BufId<Act>,
    len: usize,
) -> Result<(), CudaError> {
    if len == 0 {
        return Ok(());
    }
    let (gp, up_, op) = (
        enc.buf(gate.raw())?,
        enc.buf(up.raw())?,
        enc.buf(out.raw())?,
    );
    let n = len as u64;
    // SAFETY: swiglu_f32(const float*, const float*, float*, u64); all hold len floats.
    unsafe {
        launch!(
            enc,
            "elementwise.cu",
            "swiglu_f32",
            grid_1d(len),
            [gp, up_, op, n]
        )
    }
}

pub(crate) fn sigmoid_gate(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    gate: BufId<Act>,
    out: BufId<Act>,
    n: usize,
    width: usize,
    gate_width: usize,
) -> Result<(), CudaError> {
    let len = n * width;
    if len == 0 {
        return Ok(());
    }
    let (xp, gp, op) = (enc.buf(x.raw())?, enc.buf(gate.raw())?, enc.buf(out.raw())?);
    let (l, w, gw) = (
        len as u64,
        u32_of(width, "width", "sigmoid_gate")?,
        u32_of(gate_width, "gate_width", "sigmoid_gate")?,
    );
    // SAFETY: sigmoid_gate_f32(const float*, const float*, float*, u64, u32, u32); x/out hold
    // n * width floats, gate n * gate_width (Graph::validate; gate_width checked in check_shapes).
    unsafe {
        launch!(
            enc,
            "elementwise.cu",
            "sigmoid_gate_f32",
            grid_1d(len),
            [xp, gp, op, l, w, gw]
        )
    }
}

/// Parts of one `scatter_parts_f32` launch (C struct ScatterParts in elementwise.cu).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ScatterPartsArg {
    out: [u64; SCATTER_PARTS],
    width: [u32; SCATTER_PARTS],
    out_width: [u32; SCATTER_PARTS],
    out_offset: [u32; SCATTER_PARTS],
    start: [u32; SCATTER_PARTS],
    count: u32,
}

// SAFETY: #[repr(C)] plain-old-data with the field order, sizes and alignment of the C struct
// ScatterParts (8 pointers, four arrays of 8 unsigned ints, one unsigned int).
unsafe impl cudarc::driver::DeviceRepr for ScatterPartsArg {}

/// Parts per launch (SCATTER_PARTS in elementwise.cu).
const SCATTER_PARTS: usize = 8;

/// One launch per 8 parts (one in practice): each thread copies one element to its part.
pub(crate) fn scatter_cols(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    n: usize,
    groups: usize,
    parts: &[ColPart],
) -> Result<(), CudaError> {
    const OP: &str = "scatter_cols";
    let group_w: usize = parts.iter().map(|p| p.width).sum();
    let xp = enc.buf(x.raw())?;
    let (groups_u, row, gw) = (
        u32_of(groups, "groups", OP)?,
        u32_of(group_w * groups, "row", OP)?,
        u32_of(group_w, "group width", OP)?,
    );
    let mut col0 = 0usize;
    for chunk in parts.chunks(SCATTER_PARTS) {
        let cols: usize = chunk.iter().map(|p| p.width).sum();
        let len = n * groups * cols;
        if len > 0 {
            let mut a = ScatterPartsArg::default();
            let mut start = 0usize;
            for p in chunk.iter().filter(|p| p.width > 0) {
                let j = a.count as usize;
                a.out[j] = enc.buf(p.out.raw())?;
                a.width[j] = u32_of(p.width, "width", OP)?;
                a.out_width[j] = u32_of(p.out_width, "out width", OP)?;
                a.out_offset[j] = u32_of(p.out_offset, "out offset", OP)?;
                a.start[j] = u32_of(start, "part start", OP)?;
                a.count += 1;
                start += p.width;
            }
            let (l, c0, c) = (
                len as u64,
                u32_of(col0, "column", OP)?,
                u32_of(cols, "columns", OP)?,
            );
            // SAFETY: scatter_parts_f32(const float*, ScatterParts, u64, u32 x5); x holds n
            // rows of groups * group_w floats and every part's out n rows of out_width
            // (Graph::validate), with out_offset + groups * width <= out_width (check_shapes);
            // col0 + cols <= group_w.
            unsafe {
                launch!(
                    enc,
                    "elementwise.cu",
                    "scatter_parts_f32",
                    grid_1d(len),
                    [xp, a, l, groups_u, row, gw, c0, c]
                )
            }?;
        }
        col0 += chunk.iter().map(|p| p.width).sum::<usize>();
    }
    Ok(())
}
