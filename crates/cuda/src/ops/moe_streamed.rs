//! [`Op::MoeExpertsStreamed`](moeflux_core::Op::MoeExpertsStreamed): routed experts whose
//! records live behind a host-side [`ExpertProvider`], copied to the device when routed.

use std::sync::Arc;

use cudarc::driver::result as drv;
use moeflux_core::{Act, BufId, ExpertProvider, Idx};

use super::moe::{MoeShape, Pass, RoleFmt, ScratchLayout, align256, combine, expert_pass, zero_y};
use super::{Enc, format_of, u32_of, vec_ok};
use crate::error::CudaError;
use crate::pool::DevMem;

/// Device memory holding the expert records of one wave of a streamed op, grown on demand.
#[derive(Default)]
pub(crate) struct Staging {
    mem: Option<DevMem>,
}

/// [`Op::MoeExpertsStreamed`](moeflux_core::Op::MoeExpertsStreamed): the experts live behind a
/// host-side provider, so this op reads the routing back (the one host round-trip in a graph),
/// then, one wave of at most `max_in_flight` experts at a time: fetches the records, copies
/// them into device staging, and runs the expert kernels on that wave's pairs (the others are
/// marked out of range). The combine runs once at the end, in slot order, so the result equals
/// the resident op's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_experts_streamed(
    enc: &mut Enc<'_>,
    x: BufId<Act>,
    idx: BufId<Idx>,
    weights: BufId<Act>,
    store: &Arc<dyn ExpertProvider>,
    layer: usize,
    out: BufId<Act>,
    s: &MoeShape,
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts_streamed";
    if s.n == 0 || s.hidden == 0 {
        return Ok(());
    }
    let pairs = s.n * s.k;
    let layout = store.layout();
    let record = store.record_bytes();
    let slot = align256(record);
    let wave_max = store.max_in_flight().max(1);
    let (gu_fmt, gu_group, gu_sdt) = format_of(layout.gate.format, OP)?;
    let (dn_fmt, dn_group, dn_sdt) = format_of(layout.down.format, OP)?;
    if layout.up.format != layout.gate.format {
        return Err(CudaError::Unsupported {
            op: OP,
            msg: format!(
                "gate ({}) and up ({}) differ in format",
                layout.gate.format, layout.up.format
            ),
        });
    }
    // Every matrix must lie inside the record (check_shapes only checks the start offsets).
    for (what, m) in [
        ("gate", &layout.gate),
        ("up", &layout.up),
        ("down", &layout.down),
    ] {
        let end = m.data.offset + m.format.data_bytes(m.rows, m.cols);
        let send = [m.scales, m.biases]
            .iter()
            .flatten()
            .map(|r| r.offset + m.format.scale_bytes(m.rows, m.cols))
            .max()
            .unwrap_or(0);
        if end.max(send) > record {
            return Err(CudaError::Unsupported {
                op: OP,
                msg: format!("{what} of the expert layout ends past the {record}-byte record"),
            });
        }
    }

    // Routing back to the host (waits for the router).
    let ip = enc.buf(idx.raw())?;
    let mut host_idx = vec![0u32; pairs];
    // SAFETY: idx holds n * k u32 (Graph::validate); synchronised before host_idx is read.
    unsafe { drv::memcpy_dtoh_async(&mut host_idx[..], ip, enc.stream.cu_stream()) }
        .map_err(CudaError::driver("moe streamed: reading routing"))?;
    enc.stream
        .synchronize()
        .map_err(CudaError::driver("moe streamed: reading routing"))?;
    let mut active: Vec<u32> = host_idx.clone();
    active.sort_unstable();
    active.dedup();
    store.layer_routed(
        layer,
        &active.iter().map(|&e| e as usize).collect::<Vec<_>>(),
    );

    let wave_n = wave_max.min(active.len().max(1));
    let sc = ScratchLayout::new(s, wave_n, pairs, wave_n);
    let base = enc.scratch.get(enc.stream, sc.total)?;
    let stage = {
        let need = wave_n * slot;
        if enc.staging.mem.as_ref().is_none_or(|m| m.bytes < need) {
            enc.stream.synchronize().map_err(CudaError::driver(
                "synchronising before growing expert staging",
            ))?;
            enc.staging.mem = None;
            enc.staging.mem = Some(DevMem::zeroed(
                enc.stream.context(),
                enc.stream,
                need,
                "expert staging",
            )?);
        }
        enc.staging.mem.as_ref().map(|m| m.ptr).unwrap_or(0)
    };
    let xp = enc.buf(x.raw())?;
    let (wp, op) = (enc.buf(weights.raw())?, enc.buf(out.raw())?);
    zero_y(enc, &sc, base, s)?;
    let (wave_idx, wave_table) = (base + sc.wave_idx as u64, base + sc.wave_table as u64);

    for wave in active.chunks(wave_max) {
        // Fetch (host) and stage (device) this wave's records; they stay referenced until the
        // wave's kernels have run.
        let mut records = Vec::with_capacity(wave.len());
        let mut ptrs: Vec<u64> = Vec::with_capacity(wave.len() * 9);
        let (mut gu_vec, mut dn_vec) = (true, true);
        for (i, &e) in wave.iter().enumerate() {
            let rec = store
                .fetch(layer, e as usize)
                .map_err(|err| CudaError::Unsupported {
                    op: OP,
                    msg: format!("fetching expert {e} of layer {layer}: {err}"),
                })?;
            let bytes: &[u8] = (*rec).as_ref();
            if bytes.len() < record {
                return Err(CudaError::Unsupported {
                    op: OP,
                    msg: format!(
                        "expert {e} of layer {layer}: record of {} bytes, layout needs {record}",
                        bytes.len()
                    ),
                });
            }
            let dst = stage + (i * slot) as u64;
            // SAFETY: slot i of the staging block holds `slot` >= record bytes.
            unsafe { drv::memcpy_htod_async(dst, &bytes[..record], enc.stream.cu_stream()) }
                .map_err(CudaError::driver("moe streamed: staging a record"))?;
            for (j, m) in [&layout.gate, &layout.up, &layout.down]
                .into_iter()
                .enumerate()
            {
                let data = dst + m.data.offset as u64;
                let ok = if j < 2 {
                    vec_ok(gu_fmt, data, m.cols, gu_group)
                } else {
                    vec_ok(dn_fmt, data, m.cols, dn_group)
                };
                if !ok {
                    if j < 2 {
                        gu_vec = false;
                    } else {
                        dn_vec = false;
                    }
                }
                ptrs.push(data);
                ptrs.push(m.scales.map_or(0, |r| dst + r.offset as u64));
                ptrs.push(m.biases.map_or(0, |r| dst + r.offset as u64));
            }
            records.push(rec);
        }
        // Pairs of this wave get their slot in the wave, the others an out-of-range index.
        let local: Vec<u32> = host_idx
            .iter()
            .map(|e| {
                wave.iter()
                    .position(|w| w == e)
                    .map_or(u32::MAX, |i| i as u32)
            })
            .collect();
        // SAFETY: wave_idx holds `pairs` u32 and wave_table wave_n * 9 u64 of scratch.
        unsafe {
            drv::memcpy_htod_async(wave_idx, &local[..], enc.stream.cu_stream())
                .map_err(CudaError::driver("moe streamed: wave routing"))?;
            drv::memcpy_htod_async(wave_table, &ptrs[..], enc.stream.cu_stream())
                .map_err(CudaError::driver("moe streamed: wave table"))?;
        }
        let pass = Pass {
            table: wave_table,
            num_experts: u32_of(wave.len(), "wave", OP)?,
            gate_up: RoleFmt {
                fmt: gu_fmt,
                group: gu_group,
                sdt: gu_sdt,
                vec: gu_vec,
            },
            down: RoleFmt {
                fmt: dn_fmt,
                group: dn_group,
                sdt: dn_sdt,
                vec: dn_vec,
            },
            idx: wave_idx,
        };
        expert_pass(enc, &pass, &sc, base, xp, s, OP)?;
        // The staging slots, the wave's routing and table are rewritten by the next wave, and
        // the records may be dropped: wait for this wave's kernels.
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("moe streamed: wave"))?;
        drop(records);
    }
    combine(enc, &sc, base, wp, op, s, OP)
}
