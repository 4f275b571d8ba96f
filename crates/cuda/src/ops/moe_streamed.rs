//! [`Op::MoeExpertsStreamed`](moeflux_core::Op::MoeExpertsStreamed): routed experts whose
//! records live behind a host-side [`ExpertProvider`], copied to the device when routed.
//!
//! Tiers, fastest first: the VRAM cache ([`SlotTable`] over one device allocation), the
//! provider's host RAM (page-locked once when the provider exposes one slab, so copies are
//! DMA), and whatever the provider does below that (disk). Copies run on their own stream;
//! the compute stream waits on an event recorded after them. While a layer's experts run,
//! the records the next layer used on the previous step are copied ahead (prefetch). A miss
//! may instead be computed on the CPU from the host record ([`CpuMisses`]).
//!
//! Without a VRAM cache (`gpu_mem = 0`) the op runs in waves of at most `max_in_flight`
//! experts through a staging block, synchronising after each wave.
//!
//! When the budget holds every expert of some layers (and the provider says how many experts
//! a layer has), those layers are pinned: all their records are copied into VRAM the first
//! time the layer runs, and from then on the op is the resident one over a device table, with
//! no host round-trip, so the backend captures it inside its CUDA graph pieces. The rest of
//! the budget (at least [`LRU_RESERVE`] slots, or a quarter of a smaller budget) is the LRU
//! cache of the other layers.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::result as drv;
use cudarc::driver::{CudaEvent, CudaStream};
use moeflux_core::op::DeviceTierStats;
use moeflux_core::{Act, BufId, ExpertProvider, ExpertWeights, Idx, SharedBytes};
use rayon::prelude::*;

use super::moe::{
    MoeShape, Pass, RoleFmt, ScratchLayout, XSplit, align256, combine, expert_pass, table_op,
    zero_y,
};
use super::{Enc, Fmt, format_of, u32_of, vec_ok};
use crate::error::CudaError;
use crate::expert_cache::{
    CpuCost, CpuMisses, HostBuf, SlotTable, cpu_share, register_host, unregister_host,
};
use crate::pool::DevMem;

/// What the backend was opened with for the streamed tiers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TierOptions {
    /// VRAM cache budget in bytes; `None`: free memory at first use minus a reserve.
    pub gpu_mem: Option<usize>,
    pub cpu_misses: CpuMisses,
    /// CPU expert bandwidth (bytes/s) for the copy-vs-compute split; `None`: measured.
    pub cpu_bw: Option<f64>,
    /// Page-lock the provider's host slab.
    pub pin_host: bool,
    /// Pin whole layers in VRAM when the budget holds them.
    pub pin_layers: bool,
}

/// Device state of streamed experts: the wave staging block and, once a provider has been
/// seen, its tiers.
#[derive(Default)]
pub(crate) struct Staging {
    mem: Option<DevMem>,
    opts: TierOptions,
    tier: Option<Tier>,
}

impl Staging {
    pub(crate) fn new(opts: TierOptions) -> Self {
        Staging {
            mem: None,
            opts,
            tier: None,
        }
    }

    /// Counters of the device tiers so far (all providers together).
    pub(crate) fn stats(&self) -> DeviceTierStats {
        self.tier.as_ref().map(|t| t.total).unwrap_or_default()
    }

    /// Counts `pairs` run on a pinned layer of `store` by a replayed CUDA graph (the op's
    /// encoding, which counts them otherwise, does not run on a replay).
    pub(crate) fn count_pinned(&mut self, store: &Arc<dyn ExpertProvider>, pairs: u64) {
        let stats = DeviceTierStats {
            pinned_pairs: pairs,
            ..Default::default()
        };
        if let Some(t) = self.tier.as_mut().filter(|t| t.same(store)) {
            t.total.add(&stats);
        }
        store.add_device_stats(&stats);
    }

    /// Whether `layer` of `store` is pinned: its op then needs no host round-trip.
    pub(crate) fn is_pinned(&self, store: &Arc<dyn ExpertProvider>, layer: usize) -> bool {
        self.tier
            .as_ref()
            .is_some_and(|t| t.same(store) && t.pinned.contains_key(&layer))
    }
}

/// Cache slots kept for the LRU of unpinned layers when layers are pinned (at most a quarter of
/// the budget).
const LRU_RESERVE: usize = 64;

/// A layer whose every expert is resident in the pinned block: the device table of their
/// pointers in expert order, and the vector-path eligibility of both roles.
struct PinnedLayer {
    table: DevMem,
    vec: (bool, bool),
}

/// Room for whole layers: one block of `layers * experts` slots.
struct PinBlock {
    mem: DevMem,
    slot_bytes: usize,
    experts: usize,
    layers: usize,
}

/// The VRAM cache: `slots` records of `slot_bytes` each in one allocation.
struct VramCache {
    mem: DevMem,
    slot_bytes: usize,
    table: SlotTable,
}

impl VramCache {
    fn ptr(&self, slot: usize) -> u64 {
        self.mem.ptr + (slot * self.slot_bytes) as u64
    }
}

/// Host data that queued device work still reads (records, routing, CPU results), kept until
/// the event recorded after that work completes.
type Keep = Vec<Box<dyn Any + Send>>;

/// (pairs, their y rows) of one expert computed on the CPU.
type CpuRows = Result<(Vec<usize>, Vec<f32>), CudaError>;

/// The tiers of one provider.
struct Tier {
    /// Identity of the provider, and kept alive: its slab must outlive the registration.
    provider: Arc<dyn ExpertProvider>,
    copy: Arc<CudaStream>,
    cache: Option<VramCache>,
    /// (address, bytes) of the page-locked slab.
    registered: Option<(usize, usize)>,
    pending: Vec<(CudaEvent, Keep)>,
    /// Copies were enqueued that the compute stream has not waited for yet.
    copies_unwaited: bool,
    h2d_bw: f64,
    /// Measured (or, with `TierOptions::cpu_bw`, given) cost of CPU experts.
    cpu_cost: CpuCost,
    /// Ops that could have sent misses to the CPU (paces the split's exploration).
    cpu_ops: u64,
    warned_waves: bool,
    total: DeviceTierStats,
    pin: Option<PinBlock>,
    pinned: HashMap<usize, PinnedLayer>,
    /// Page-locked destination of the routing (and activation) read-back.
    readback: HostBuf,
    /// How often prefetched records turned out to be used (decaying counts).
    prefetch_rate: PrefetchRate,
}

/// Every this many streamed ops, the copy/CPU split tries one more record on the CPU than its
/// model says (see [`cpu_share`]).
const CPU_EXPLORE: u64 = 16;

/// Decaying counts of prefetched records and of hits on them, which gate the prefetch: a
/// prediction that keeps missing (routing with little locality: random weights route almost
/// uniformly) only costs copy bandwidth the real misses then wait for, so below
/// [`PrefetchRate::MIN_USED`] only one record is prefetched every [`PrefetchRate::PROBE`] ops,
/// enough to notice when the routing turns predictable.
#[derive(Default)]
struct PrefetchRate {
    issued: f64,
    used: f64,
    ops: u64,
}

impl PrefetchRate {
    const MIN_USED: f64 = 0.2;
    const PROBE: u64 = 8;
    const DECAY: f64 = 0.97;

    fn observe(&mut self, issued: u64, used: u64) {
        self.issued = self.issued * Self::DECAY + issued as f64;
        self.used = self.used * Self::DECAY + used as f64;
    }

    /// How many of `predicted` records to prefetch for this op.
    fn budget(&mut self, predicted: usize) -> usize {
        self.ops += 1;
        // Optimistic until a few prefetches have been judged.
        let rate = (self.used + 1.0) / (self.issued + 2.0);
        if self.issued < 4.0 || rate >= Self::MIN_USED {
            predicted
        } else if self.ops.is_multiple_of(Self::PROBE) {
            predicted.min(1)
        } else {
            0
        }
    }
}

impl Tier {
    fn same(&self, p: &Arc<dyn ExpertProvider>) -> bool {
        Arc::as_ptr(&self.provider) as *const () == Arc::as_ptr(p) as *const ()
    }

    /// Drops kept host data whose device work has finished.
    fn retire(&mut self) -> Result<(), CudaError> {
        let mut i = 0;
        while i < self.pending.len() {
            let done = self.pending[i]
                .0
                .try_is_complete()
                .map_err(CudaError::driver("moe streamed: querying a copy event"))?;
            if done {
                self.pending.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Keeps `keep` alive until the work enqueued on `stream` so far has run.
    fn keep_until(&mut self, stream: &CudaStream, keep: Keep) -> Result<(), CudaError> {
        if keep.is_empty() {
            return Ok(());
        }
        let ev = stream
            .record_event(None)
            .map_err(CudaError::driver("moe streamed: recording an event"))?;
        self.pending.push((ev, keep));
        Ok(())
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        // Copies may still read the kept host records and write the cache.
        let _ = self.copy.context().bind_to_thread();
        let _ = self.copy.synchronize();
        self.pending.clear();
        if let Some((addr, _)) = self.registered.take()
            && let Err(e) = unregister_host(addr)
        {
            tracing::warn!("expert slab: {e}");
        }
    }
}

/// Opens the tiers of `store` (first use, or a different provider than before).
fn ensure_tier(
    enc: &mut Enc<'_>,
    store: &Arc<dyn ExpertProvider>,
    opts: TierOptions,
    record: usize,
) -> Result<(), CudaError> {
    if enc.staging.tier.as_ref().is_some_and(|t| t.same(store)) {
        return Ok(());
    }
    if enc.staging.tier.is_some() {
        // Another model's store: its cache is useless now. Nothing queued may still use it.
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("moe streamed: switching stores"))?;
        enc.staging.tier = None;
    }
    let ctx = enc.stream.context().clone();
    let copy = ctx
        .new_stream()
        .map_err(CudaError::driver("creating the expert copy stream"))?;
    let registered = match store.host_slab() {
        Some((addr, len)) if opts.pin_host => match register_host(addr, len) {
            Ok(()) => Some((addr, len)),
            Err(e) => {
                tracing::warn!(
                    "expert slab not page-locked, copies use pageable memory (slower): {e}"
                );
                None
            }
        },
        _ => None,
    };
    let slot_bytes = align256(record);
    let slots = match opts.gpu_mem {
        Some(b) => b / slot_bytes,
        None => {
            let (free, total) = ctx
                .mem_get_info()
                .map_err(CudaError::driver("cuMemGetInfo"))?;
            // Room for the KV cache, transients and scratch that later steps may still need.
            let reserve = (2usize << 30).max(total / 10);
            free.saturating_sub(reserve) / slot_bytes
        }
    };
    let slots = slots.min(store.total_records().unwrap_or(usize::MAX));
    // Whole layers first when some fit (and routing is the model's own).
    let pin_layers = match store.experts_per_layer() {
        Some(e) if e > 0 && opts.pin_layers && !store.remaps_routing() => {
            let layers = store.total_records().unwrap_or(0) / e;
            if layers * e <= slots {
                layers
            } else {
                (slots.saturating_sub(LRU_RESERVE.min(slots / 4)) / e).min(layers)
            }
        }
        _ => 0,
    };
    let mut pin = None;
    if pin_layers > 0 {
        let e = store.experts_per_layer().unwrap_or(0);
        match DevMem::zeroed(
            &ctx,
            enc.stream,
            pin_layers * e * slot_bytes,
            "pinned expert layers (VRAM)",
        ) {
            Ok(mem) => {
                pin = Some(PinBlock {
                    mem,
                    slot_bytes,
                    experts: e,
                    layers: pin_layers,
                })
            }
            // An automatic size may meet fragmentation: no pinning then.
            Err(CudaError::OutOfMemory { .. }) if opts.gpu_mem.is_none() => {}
            Err(err) => return Err(err),
        }
    }
    let pinned_slots = pin.as_ref().map_or(0, |p| p.layers * p.experts);
    let slots = slots - pinned_slots.min(slots);
    let mut cache = None;
    if slots > 0 {
        let mut n = slots;
        loop {
            match DevMem::zeroed(&ctx, enc.stream, n * slot_bytes, "expert cache (VRAM)") {
                Ok(mem) => {
                    cache = Some(VramCache {
                        mem,
                        slot_bytes,
                        table: SlotTable::new(n),
                    });
                    break;
                }
                // An automatic size may meet fragmentation: try smaller.
                Err(CudaError::OutOfMemory { .. }) if opts.gpu_mem.is_none() && n > 64 => {
                    n /= 2;
                }
                Err(e) => return Err(e),
            }
        }
        // The zeroing runs on the compute stream; copies into the cache must come after.
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("allocating the expert cache"))?;
    }
    let mut tier = Tier {
        provider: store.clone(),
        copy,
        cache,
        registered,
        pending: Vec::new(),
        copies_unwaited: false,
        h2d_bw: 0.0,
        cpu_cost: opts
            .cpu_bw
            .map_or_else(CpuCost::default, |bw| CpuCost::fixed(record, bw)),
        cpu_ops: 0,
        warned_waves: false,
        total: DeviceTierStats::default(),
        pin,
        pinned: HashMap::new(),
        readback: HostBuf::empty(),
        prefetch_rate: PrefetchRate::default(),
    };
    if tier.cache.is_some() && opts.cpu_misses == CpuMisses::Auto {
        let (dst, bytes) = tier
            .cache
            .as_ref()
            .map_or((0, 0), |c| (c.mem.ptr, c.mem.bytes));
        tier.h2d_bw = measure_h2d(&tier, dst, bytes)?;
    }
    if let Some(p) = &tier.pin {
        tracing::info!(
            "expert cache: up to {} layers of {} experts pinned in VRAM ({} bytes each)",
            p.layers,
            p.experts,
            p.experts * p.slot_bytes
        );
    }
    if let Some(c) = &tier.cache {
        tracing::info!(
            "expert cache: {} slots of {} bytes in VRAM, host slab {}",
            c.table.len(),
            c.slot_bytes,
            if tier.registered.is_some() {
                "page-locked"
            } else {
                "pageable"
            }
        );
    }
    enc.staging.tier = Some(tier);
    Ok(())
}

/// Host -> device bandwidth of the copies the tiers will do (from the page-locked slab when
/// there is one), best of three copies of up to 8 MiB into `dst` (the still empty cache, or
/// the idle staging block), on the copy stream.
fn measure_h2d(tier: &Tier, dst: u64, dst_bytes: usize) -> Result<f64, CudaError> {
    let bytes = (8usize << 20).min(dst_bytes);
    if bytes == 0 {
        return Ok(0.0);
    }
    let owned;
    let src: &[u8] = match tier.registered {
        Some((addr, len)) => {
            // SAFETY: the registered slab is a live mapping of `len` bytes owned by the provider
            // held in `tier`; only read here, by the copy engine.
            unsafe { std::slice::from_raw_parts(addr as *const u8, len.min(bytes)) }
        }
        None => {
            owned = vec![0u8; bytes];
            &owned
        }
    };
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: dst holds at least `bytes` >= src.len() and no queued work uses it (the
        // callers' contract); synchronised before `src` may go away.
        unsafe { drv::memcpy_htod_async(dst, src, tier.copy.cu_stream()) }
            .map_err(CudaError::driver("measuring host->device bandwidth"))?;
        tier.copy
            .synchronize()
            .map_err(CudaError::driver("measuring host->device bandwidth"))?;
        best = best.max(src.len() as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }
    Ok(best)
}

/// Formats of the two roles and the extent checks of the layout.
struct Formats {
    gu: (Fmt, u32, i32),
    dn: (Fmt, u32, i32),
}

fn check_layout(
    layout: &ExpertWeights,
    record: usize,
    op: &'static str,
) -> Result<Formats, CudaError> {
    let gu = format_of(layout.gate.format, op)?;
    let dn = format_of(layout.down.format, op)?;
    if layout.up.format != layout.gate.format {
        return Err(CudaError::Unsupported {
            op,
            msg: format!(
                "gate ({}) and up ({}) differ in format",
                layout.gate.format, layout.up.format
            ),
        });
    }
    // Every matrix must lie inside the record (check_shapes only checks the start offsets).
    if let Some(what) = layout.outside_record(record) {
        return Err(CudaError::Unsupported {
            op,
            msg: format!("{what} of the expert layout ends past the {record}-byte record"),
        });
    }
    Ok(Formats { gu, dn })
}

/// The record of `e`, checked to be at least `record` bytes.
fn fetch(
    store: &Arc<dyn ExpertProvider>,
    layer: usize,
    e: u32,
    record: usize,
    op: &'static str,
) -> Result<SharedBytes, CudaError> {
    let rec = store
        .fetch(layer, e as usize)
        .map_err(|err| CudaError::Unsupported {
            op,
            msg: format!("fetching expert {e} of layer {layer}: {err}"),
        })?;
    let len = (*rec).as_ref().len();
    if len < record {
        return Err(CudaError::Unsupported {
            op,
            msg: format!(
                "expert {e} of layer {layer}: record of {len} bytes, layout needs {record}"
            ),
        });
    }
    Ok(rec)
}

/// Appends the 9 pointers of the expert whose record starts at `dst` and updates the vector
/// eligibility of both roles.
fn push_ptrs(
    ptrs: &mut Vec<u64>,
    vec: &mut (bool, bool),
    layout: &ExpertWeights,
    f: &Formats,
    dst: u64,
) {
    for (j, m) in [&layout.gate, &layout.up, &layout.down]
        .into_iter()
        .enumerate()
    {
        let data = dst + m.data.offset as u64;
        if j < 2 {
            vec.0 &= vec_ok(f.gu.0, data, m.cols, f.gu.1);
        } else {
            vec.1 &= vec_ok(f.dn.0, data, m.cols, f.dn.1);
        }
        ptrs.push(data);
        ptrs.push(m.scales.map_or(0, |r| dst + r.offset as u64));
        ptrs.push(m.biases.map_or(0, |r| dst + r.offset as u64));
    }
}

fn pass_of(
    f: &Formats,
    table: u64,
    num: usize,
    idx: u64,
    vec: (bool, bool),
    op: &'static str,
) -> Result<Pass, CudaError> {
    Ok(Pass {
        table,
        num_experts: u32_of(num, "experts in the table", op)?,
        gate_up: RoleFmt {
            fmt: f.gu.0,
            group: f.gu.1,
            sdt: f.gu.2,
            vec: vec.0,
        },
        down: RoleFmt {
            fmt: f.dn.0,
            group: f.dn.1,
            sdt: f.dn.2,
            vec: vec.1,
        },
        idx,
    })
}

/// Uploads a pass's per-pair local expert index (`local`, out of range for pairs the pass
/// leaves alone) and its table (9 pointers per expert) into the scratch slots of `sc`, then runs
/// the pass.
///
/// # Safety
/// `local` must fit the scratch's routing slot and `ptrs` its table slot, and both must stay
/// alive until the stream has passed the copies.
#[allow(clippy::too_many_arguments)]
unsafe fn local_pass(
    enc: &mut Enc<'_>,
    f: &Formats,
    sc: &ScratchLayout,
    base: u64,
    xp: u64,
    x_split: &mut XSplit,
    s: &MoeShape,
    local: &[u32],
    ptrs: &[u64],
    vec: (bool, bool),
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts_streamed";
    let (idx, table) = (base + sc.wave_idx as u64, base + sc.wave_table as u64);
    // SAFETY: the caller's contract.
    unsafe {
        drv::memcpy_htod_async(idx, local, enc.stream.cu_stream())
            .map_err(CudaError::driver("moe streamed: routing table"))?;
        drv::memcpy_htod_async(table, ptrs, enc.stream.cu_stream())
            .map_err(CudaError::driver("moe streamed: expert table"))?;
    }
    let pass = pass_of(f, table, ptrs.len() / 9, idx, vec, OP)?;
    expert_pass(enc, &pass, sc, base, xp, x_split, s, OP, None).map(|_| ())
}

/// [`Op::MoeExpertsStreamed`](moeflux_core::Op::MoeExpertsStreamed): reads the routing back
/// (the one host round-trip in a graph), then runs the routed experts from the VRAM cache
/// (missing records copied in first, or computed on the CPU), or without a cache in waves
/// through staging. The combine runs once at the end, in slot order, so the result equals the
/// resident op's.
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
    let f = check_layout(&layout, record, OP)?;
    let opts = enc.staging.opts;
    ensure_tier(enc, store, opts, record)?;
    let mut tier = enc.staging.tier.take().expect("ensure_tier leaves a tier");
    let r = (|| -> Result<(), CudaError> {
        if !tier.pinned.contains_key(&layer)
            && tier
                .pin
                .as_ref()
                .is_some_and(|p| tier.pinned.len() < p.layers)
        {
            pin_layer(enc, &mut tier, store, layer, &f)?;
        }
        if let Some(p) = tier.pinned.get(&layer) {
            // Device-only (captured into CUDA graphs): the resident op over the layer's table.
            let e = tier.pin.as_ref().map_or(0, |b| b.experts);
            let pass = pass_of(&f, p.table.ptr, e, enc.buf(idx.raw())?, p.vec, OP)?;
            table_op(enc, &pass, x, weights, out, s, OP)?;
            let stats = DeviceTierStats {
                pinned_pairs: pairs as u64,
                ..Default::default()
            };
            tier.total.add(&stats);
            store.add_device_stats(&stats);
            return Ok(());
        }
        tier.retire()?;
        let cpu_possible = match opts.cpu_misses {
            CpuMisses::Off => false,
            CpuMisses::On => true,
            CpuMisses::Auto => s.n <= 2,
        };
        // Routing (and, when misses may run on the CPU, the activations) back to the host,
        // through page-locked memory: one DMA each and one wait.
        let ip = enc.buf(idx.raw())?;
        let xp = enc.buf(x.raw())?;
        let xs = if cpu_possible { s.n * s.hidden } else { 0 };
        let rb = tier
            .readback
            .slice_mut::<u32>(pairs + xs)
            .map_err(CudaError::driver(
                "moe streamed: page-locked read-back buffer",
            ))?;
        let (rb_idx, rb_x) = rb.split_at_mut(pairs);
        // SAFETY: idx holds n * k u32 and x n * hidden floats (Graph::validate); the buffers
        // are page-locked host memory of the tier, not touched until the stream is
        // synchronised below. f32 and u32 have the same size and alignment.
        unsafe {
            drv::memcpy_dtoh_async(&mut rb_idx[..], ip, enc.stream.cu_stream())
                .map_err(CudaError::driver("moe streamed: reading routing"))?;
            if cpu_possible {
                drv::memcpy_dtoh_async(&mut rb_x[..], xp, enc.stream.cu_stream())
                    .map_err(CudaError::driver("moe streamed: reading activations"))?;
            }
        }
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("moe streamed: reading routing"))?;
        let mut host_idx = rb_idx.to_vec();
        let host_x: Vec<f32> = rb_x.iter().map(|&b| f32::from_bits(b)).collect();
        store.remap_routing(layer, s.k, &mut host_idx);
        let mut active: Vec<u32> = host_idx.clone();
        active.sort_unstable();
        active.dedup();
        store.layer_routed(
            layer,
            &active.iter().map(|&e| e as usize).collect::<Vec<_>>(),
        );
        let mut stats = DeviceTierStats::default();
        let routed = Routed {
            store,
            layer,
            idx: &host_idx,
            x: &host_x,
            s,
            opts,
        };
        let res = if tier.cache.is_some() {
            cached(
                enc,
                &mut tier,
                &routed,
                &active,
                (x, weights, out),
                &f,
                &mut stats,
            )
        } else {
            waves(
                enc,
                &mut tier,
                &routed,
                &active,
                (x, weights, out),
                &f,
                &mut stats,
            )
        };
        tier.prefetch_rate
            .observe(stats.prefetched, stats.prefetch_used);
        tier.total.add(&stats);
        store.add_device_stats(&stats);
        res
    })();
    enc.staging.tier = Some(tier);
    r
}

/// What the host knows of one streamed op once its routing is back: the store and layer, the
/// expert of each (token, slot) pair (after the store's remapping), the activations (empty
/// when no miss may run on the CPU), the op's shape and the tier options.
#[derive(Clone, Copy)]
struct Routed<'a> {
    store: &'a Arc<dyn ExpertProvider>,
    layer: usize,
    idx: &'a [u32],
    x: &'a [f32],
    s: &'a MoeShape,
    opts: TierOptions,
}

/// The cached path: the active set in chunks of at most the cache's slot count (one chunk,
/// hence one pass of the expert kernels, whenever it fits).
fn cached(
    enc: &mut Enc<'_>,
    tier: &mut Tier,
    r: &Routed<'_>,
    active: &[u32],
    (x, weights, out): (BufId<Act>, BufId<Act>, BufId<Act>),
    f: &Formats,
    stats: &mut DeviceTierStats,
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts_streamed";
    let Routed {
        store,
        layer,
        idx: host_idx,
        s,
        ..
    } = *r;
    let layout = store.layout();
    let record = store.record_bytes();
    let pairs = s.n * s.k;
    let cap = tier.cache.as_ref().map_or(1, |c| c.table.len()).max(1);
    let chunk_max = cap.min(active.len()).max(1);
    let single = active.len() <= cap;
    if !single && !tier.warned_waves {
        tier.warned_waves = true;
        tracing::warn!(
            "the VRAM expert cache holds {cap} records, fewer than the {} experts one op routes to: running in waves (raise --gpu-mem to at least {} bytes for one pass)",
            active.len(),
            active.len() * align256(record)
        );
    }
    let sc = ScratchLayout::new(s, chunk_max, pairs, chunk_max);
    let base = enc.scratch.get(enc.stream, sc.total)?;
    let xp = enc.buf(x.raw())?;
    let mut x_split = XSplit::default();
    let (wp, op) = (enc.buf(weights.raw())?, enc.buf(out.raw())?);
    zero_y(enc, &sc, base, s)?;
    let y = base + sc.y as u64;

    for (ci, chunk) in active.chunks(cap).enumerate() {
        if ci > 0 {
            // The previous chunk's slots may be reused now: wait for its kernels.
            enc.stream
                .synchronize()
                .map_err(CudaError::driver("moe streamed: chunk"))?;
        }
        let cache = tier.cache.as_mut().expect("cached path has a cache");
        cache.table.begin_op();
        let mut entries: Vec<(u32, usize)> = Vec::with_capacity(chunk.len());
        let mut misses: Vec<u32> = Vec::new();
        for &e in chunk {
            match cache.table.lookup((layer, e as usize)) {
                Some((slot, pre)) => {
                    stats.vram_hits += 1;
                    stats.prefetch_used += pre as u64;
                    entries.push((e, slot));
                }
                None => misses.push(e),
            }
        }
        // Misses computed on the CPU (one chunk only: it overlaps that chunk's kernels).
        let n_cpu = if single {
            cpu_count(tier, r, &misses)?
        } else {
            0
        };
        let (cpu_set, gpu_misses) = misses.split_at(n_cpu.min(misses.len()));
        let mut keep: Keep = Vec::new();
        for &e in gpu_misses {
            let rec = fetch(store, layer, e, record, OP)?;
            let cache = tier.cache.as_mut().expect("cached path has a cache");
            let slot = cache
                .table
                .claim((layer, e as usize), false)
                .ok_or_else(|| CudaError::Unsupported {
                    op: OP,
                    msg: format!(
                        "no unlocked slot among {} for expert {e} of layer {layer} (internal error)",
                        cache.table.len()
                    ),
                })?;
            let dst = cache.ptr(slot);
            let bytes: &[u8] = (*rec).as_ref();
            // SAFETY: the slot holds slot_bytes >= record bytes; the record is kept alive (in
            // `keep`, then `pending`) until the copy stream has passed this copy. No queued
            // kernel reads the slot: it was free or unlocked (kernels of earlier ops finished
            // at the routing read-back).
            if let Err(err) =
                unsafe { drv::memcpy_htod_async(dst, &bytes[..record], tier.copy.cu_stream()) }
            {
                cache.table.invalidate(slot);
                return Err(CudaError::driver("moe streamed: copying a record")(err));
            }
            stats.vram_misses += 1;
            stats.h2d_bytes += record as u64;
            entries.push((e, slot));
            keep.push(Box::new(rec));
        }
        if !gpu_misses.is_empty() {
            tier.copies_unwaited = true;
        }
        if tier.copies_unwaited {
            // Hits may be prefetched records whose copies are still queued: wait for every
            // copy so far.
            let ev = tier
                .copy
                .record_event(None)
                .map_err(CudaError::driver("moe streamed: recording the copy event"))?;
            enc.stream
                .wait(&ev)
                .map_err(CudaError::driver("moe streamed: waiting for copies"))?;
            tier.pending.push((ev, keep));
            tier.copies_unwaited = false;
        }
        // One table for this chunk's device experts; the other pairs (other chunks, CPU) get an
        // out-of-range index and are left alone by the kernels.
        let cache = tier.cache.as_ref().expect("cached path has a cache");
        let mut ptrs: Vec<u64> = Vec::with_capacity(entries.len() * 9);
        let mut vec = (true, true);
        let mut local_of: HashMap<u32, u32> = HashMap::with_capacity(entries.len());
        for (i, &(e, slot)) in entries.iter().enumerate() {
            push_ptrs(&mut ptrs, &mut vec, &layout, f, cache.ptr(slot));
            local_of.insert(e, i as u32);
        }
        let local: Vec<u32> = host_idx
            .iter()
            .map(|e| local_of.get(e).copied().unwrap_or(u32::MAX))
            .collect();
        let mut keep: Keep = Vec::new();
        if !entries.is_empty() {
            // SAFETY: wave_idx holds `pairs` u32 and wave_table chunk_max * 9 u64 of scratch
            // (entries <= chunk); both host vectors are kept until the stream passes the copies.
            unsafe { local_pass(enc, f, &sc, base, xp, &mut x_split, s, &local, &ptrs, vec) }?;
            keep.push(Box::new(local));
            keep.push(Box::new(ptrs));
        }
        if single {
            prefetch(tier, store, layer, record, stats)?;
        }
        // On the host while the device runs the pass: y rows of the CPU experts' pairs.
        keep.extend(cpu_pass(enc, tier, r, cpu_set, y, stats)?);
        tier.keep_until(enc.stream, keep)?;
    }
    combine(enc, &sc, base, wp, op, s, OP)
}

/// How many of `misses` (the first ones) to compute on the CPU: `cpu_share` at the measured
/// copy and CPU rates (the CPU's timed on the first miss when not known yet).
fn cpu_count(tier: &mut Tier, r: &Routed<'_>, misses: &[u32]) -> Result<usize, CudaError> {
    const OP: &str = "moe_experts_streamed";
    let Routed {
        store,
        layer,
        x: host_x,
        s,
        opts,
        ..
    } = *r;
    if host_x.is_empty() {
        return Ok(0); // the activations were not read back: no CPU work possible
    }
    if opts.cpu_misses == CpuMisses::Auto
        && tier.cpu_cost.t1.is_none()
        && s.n <= 2
        && let Some(&e) = misses.first()
    {
        let secs = measure_cpu(store, layer, e, host_x, s, OP)?;
        tier.cpu_cost.observe(1, secs);
        tracing::info!(
            "expert misses: copies at {:.1} GB/s, one record on the CPU in {:.0} us",
            tier.h2d_bw / 1e9,
            secs * 1e6
        );
    }
    tier.cpu_ops += 1;
    // seconds per copied record; 0 (no split) while the copy rate is unknown
    let copy = if tier.h2d_bw > 0.0 {
        store.record_bytes() as f64 / tier.h2d_bw
    } else {
        0.0
    };
    let explore = opts.cpu_bw.is_none() && tier.cpu_ops.is_multiple_of(CPU_EXPLORE);
    let n = cpu_share(
        opts.cpu_misses,
        misses.len(),
        s.n,
        copy,
        &tier.cpu_cost,
        explore,
    );
    Ok(n.min(misses.len()))
}

/// Computes on the host the y rows of the pairs routed to `cpu_set` (the CPU expert kernels,
/// one expert's rows spread over the pool) and queues their upload into y (scratch, pairs *
/// hidden floats) on the compute stream, after the device pass already queued (which leaves
/// these rows alone: their local index is out of range). Learns the CPU's rate. The returned
/// host rows must live until the stream has passed the uploads.
fn cpu_pass(
    enc: &mut Enc<'_>,
    tier: &mut Tier,
    r: &Routed<'_>,
    cpu_set: &[u32],
    y: u64,
    stats: &mut DeviceTierStats,
) -> Result<Keep, CudaError> {
    const OP: &str = "moe_experts_streamed";
    let Routed {
        store,
        layer,
        idx: host_idx,
        x: host_x,
        s,
        opts,
    } = *r;
    let mut keep: Keep = Vec::new();
    if cpu_set.is_empty() {
        return Ok(keep);
    }
    let layout = store.layout();
    let record = store.record_bytes();
    let pairs = s.n * s.k;
    let jobs: Vec<(u32, Vec<usize>)> = cpu_set
        .iter()
        .map(|&e| {
            let ps = (0..pairs).filter(|&p| host_idx[p] == e).collect();
            (e, ps)
        })
        .collect();
    let started = Instant::now();
    let rows: Vec<CpuRows> = jobs
        .into_par_iter()
        .map(|(e, ps)| {
            let rec = fetch(store, layer, e, record, OP)?;
            let y = moeflux_cpu::ops::moe_streamed::expert_rows(
                (*rec).as_ref(),
                &layout,
                host_x,
                &ps,
                s.k,
                s.hidden,
                s.inter,
            )
            .map_err(|err| CudaError::Unsupported {
                op: OP,
                msg: format!("expert {e} of layer {layer} on the CPU: {err}"),
            })?;
            Ok((ps, y))
        })
        .collect();
    if opts.cpu_misses == CpuMisses::Auto && opts.cpu_bw.is_none() {
        // The split follows the CPU's cost measured in this run.
        let secs = started.elapsed().as_secs_f64();
        tier.cpu_cost.observe(cpu_set.len(), secs);
        tracing::debug!(
            "layer {layer}: {} records on the CPU in {:.0} us; cost now {:?}",
            cpu_set.len(),
            secs * 1e6,
            tier.cpu_cost
        );
    }
    for r in rows {
        let (ps, rows) = r?;
        for (i, &p) in ps.iter().enumerate() {
            let row = &rows[i * s.hidden..(i + 1) * s.hidden];
            // SAFETY: y holds pairs * hidden floats and p < pairs; `rows` is kept by the caller
            // until the stream passes the copy.
            unsafe {
                drv::memcpy_htod_async(y + (p * s.hidden * 4) as u64, row, enc.stream.cu_stream())
            }
            .map_err(CudaError::driver("moe streamed: uploading CPU rows"))?;
        }
        stats.cpu_computed += 1;
        keep.push(Box::new(rows));
    }
    Ok(keep)
}

/// Copies every record of `layer` into the next free layer of the pinned block and builds its
/// device table (once per layer, synchronously: this is load time).
fn pin_layer(
    enc: &mut Enc<'_>,
    tier: &mut Tier,
    store: &Arc<dyn ExpertProvider>,
    layer: usize,
    f: &Formats,
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts_streamed";
    let Some(pin) = &tier.pin else { return Ok(()) };
    let record = store.record_bytes();
    let layout = store.layout();
    let first = tier.pinned.len() * pin.experts;
    let t = Instant::now();
    let mut ptrs: Vec<u64> = Vec::with_capacity(pin.experts * 9);
    let mut vec = (true, true);
    let mut keep: Vec<SharedBytes> = Vec::with_capacity(pin.experts);
    for e in 0..pin.experts {
        let rec = fetch(store, layer, e as u32, record, OP)?;
        let dst = pin.mem.ptr + ((first + e) * pin.slot_bytes) as u64;
        let bytes: &[u8] = (*rec).as_ref();
        // SAFETY: the slot holds slot_bytes >= record bytes; `keep` holds the records until
        // the copy stream is synchronised below.
        unsafe { drv::memcpy_htod_async(dst, &bytes[..record], tier.copy.cu_stream()) }
            .map_err(CudaError::driver("moe streamed: pinning a record"))?;
        push_ptrs(&mut ptrs, &mut vec, &layout, f, dst);
        keep.push(rec);
    }
    let table = DevMem::zeroed(
        enc.stream.context(),
        enc.stream,
        ptrs.len() * 8,
        "pinned layer table",
    )?;
    // The zeroing runs on the compute stream: finish it before the table upload.
    enc.stream
        .synchronize()
        .map_err(CudaError::driver("moe streamed: pinning a layer"))?;
    // SAFETY: the table holds ptrs.len() u64; synchronised before `ptrs` is dropped.
    unsafe { drv::memcpy_htod_async(table.ptr, &ptrs[..], tier.copy.cu_stream()) }
        .map_err(CudaError::driver("moe streamed: pinned layer table"))?;
    tier.copy
        .synchronize()
        .map_err(CudaError::driver("moe streamed: pinning a layer"))?;
    drop(keep);
    tracing::info!(
        "expert cache: layer {layer} pinned in VRAM ({} experts, {:.1} MB) in {:.2} s",
        pin.experts,
        (pin.experts * record) as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let h2d = (pin.experts * record) as u64;
    tier.pinned.insert(layer, PinnedLayer { table, vec });
    let stats = DeviceTierStats {
        h2d_bytes: h2d,
        ..Default::default()
    };
    tier.total.add(&stats);
    store.add_device_stats(&stats);
    Ok(())
}

/// Copies into the VRAM cache, on the copy stream, the records the next layer used on its
/// previous step and that are in host RAM now (no disk waits on the compute thread), as many
/// as [`PrefetchRate::budget`] allows. Slots the current op needs are locked and never taken.
fn prefetch(
    tier: &mut Tier,
    store: &Arc<dyn ExpertProvider>,
    layer: usize,
    record: usize,
    stats: &mut DeviceTierStats,
) -> Result<(), CudaError> {
    let Some((next, set)) = store.predicted_next(layer) else {
        return Ok(());
    };
    let budget = tier.prefetch_rate.budget(set.len());
    let Some(cache) = tier.cache.as_mut() else {
        return Ok(());
    };
    let mut keep: Keep = Vec::new();
    let mut issued = 0;
    // Resident predictions first, so the copies below cannot evict them.
    for &e in &set {
        cache.table.lock((next, e));
    }
    for &e in &set {
        if issued == budget {
            break;
        }
        if cache.table.contains((next, e)) {
            continue;
        }
        let Some(rec) = store.fetch_cached(next, e) else {
            continue;
        };
        let bytes: &[u8] = (*rec).as_ref();
        if bytes.len() < record {
            continue; // the real fetch reports it
        }
        let Some(slot) = cache.table.claim((next, e), true) else {
            break; // every slot is needed by this op or predicted
        };
        // SAFETY: as for misses: the slot holds >= record bytes and no queued kernel reads it
        // (unlocked before the claim); the record is kept until the copy has run.
        if let Err(err) = unsafe {
            drv::memcpy_htod_async(cache.ptr(slot), &bytes[..record], tier.copy.cu_stream())
        } {
            cache.table.invalidate(slot);
            return Err(CudaError::driver("moe streamed: prefetching a record")(err));
        }
        stats.prefetched += 1;
        issued += 1;
        stats.h2d_bytes += record as u64;
        keep.push(Box::new(rec));
    }
    if !keep.is_empty() {
        tier.copies_unwaited = true;
        let copy = tier.copy.clone();
        tier.keep_until(&copy, keep)?;
    }
    Ok(())
}

/// Seconds the CPU expert path takes for one record at this batch size (its rows spread over
/// the thread pool, as the misses run), best of two. Not used when `MOEFLUX_CPU_EXPERT_BW`
/// gives a rate.
fn measure_cpu(
    store: &Arc<dyn ExpertProvider>,
    layer: usize,
    e: u32,
    host_x: &[f32],
    s: &MoeShape,
    op: &'static str,
) -> Result<f64, CudaError> {
    let record = store.record_bytes();
    let rec = fetch(store, layer, e, record, op)?;
    let layout = store.layout();
    let pairs: Vec<usize> = (0..s.n).map(|t| t * s.k).collect();
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        let t = Instant::now();
        moeflux_cpu::ops::moe_streamed::expert_rows(
            (*rec).as_ref(),
            &layout,
            host_x,
            &pairs,
            s.k,
            s.hidden,
            s.inter,
        )
        .map_err(|err| CudaError::Unsupported {
            op,
            msg: format!("measuring the CPU expert kernel: {err}"),
        })?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Without a VRAM cache: one wave of at most `max_in_flight` experts at a time, fetched,
/// copied into staging and run; synchronised after each wave (staging is reused). Like the
/// cached path, some experts may run on the CPU instead (during the last wave).
fn waves(
    enc: &mut Enc<'_>,
    tier: &mut Tier,
    r: &Routed<'_>,
    active: &[u32],
    (x, weights, out): (BufId<Act>, BufId<Act>, BufId<Act>),
    f: &Formats,
    stats: &mut DeviceTierStats,
) -> Result<(), CudaError> {
    const OP: &str = "moe_experts_streamed";
    let Routed {
        store,
        layer,
        idx: host_idx,
        x: host_x,
        s,
        opts,
    } = *r;
    let layout = store.layout();
    let record = store.record_bytes();
    let slot = align256(record);
    let pairs = s.n * s.k;
    let wave_max = store.max_in_flight().max(1);
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
        enc.staging
            .mem
            .as_ref()
            .map(|m| (m.ptr, m.bytes))
            .unwrap_or((0, 0))
    };
    if !host_x.is_empty() && opts.cpu_misses == CpuMisses::Auto && tier.h2d_bw <= 0.0 {
        // The staging block's zeroing runs on the compute stream: done before the copy stream
        // writes it.
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("moe streamed: measuring copies"))?;
        tier.h2d_bw = measure_h2d(tier, stage.0, stage.1)?;
    }
    let stage = stage.0;
    let xp = enc.buf(x.raw())?;
    let mut x_split = XSplit::default();
    let (wp, op) = (enc.buf(weights.raw())?, enc.buf(out.raw())?);
    zero_y(enc, &sc, base, s)?;
    let y = base + sc.y as u64;

    // Some experts on the CPU while the device copies and runs the others (the last wave).
    let n_cpu = cpu_count(tier, r, active)?;
    let (cpu_set, gpu_set) = active.split_at(n_cpu);
    let n_waves = gpu_set.len().div_ceil(wave_max);
    if n_waves == 0 {
        let keep = cpu_pass(enc, tier, r, cpu_set, y, stats)?;
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("moe streamed: CPU rows"))?;
        drop(keep);
    }
    for (wi, wave) in gpu_set.chunks(wave_max).enumerate() {
        // Fetch (host) and stage (device) this wave's records; they stay referenced until the
        // wave's kernels have run.
        let mut records = Vec::with_capacity(wave.len());
        let mut ptrs: Vec<u64> = Vec::with_capacity(wave.len() * 9);
        let mut vec = (true, true);
        for (i, &e) in wave.iter().enumerate() {
            let rec = fetch(store, layer, e, record, OP)?;
            let bytes: &[u8] = (*rec).as_ref();
            let dst = stage + (i * slot) as u64;
            // SAFETY: slot i of the staging block holds `slot` >= record bytes; the record is
            // held until the wave's synchronisation.
            unsafe { drv::memcpy_htod_async(dst, &bytes[..record], enc.stream.cu_stream()) }
                .map_err(CudaError::driver("moe streamed: staging a record"))?;
            stats.vram_misses += 1;
            stats.h2d_bytes += record as u64;
            push_ptrs(&mut ptrs, &mut vec, &layout, f, dst);
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
        // SAFETY: wave_idx holds `pairs` u32 and wave_table wave_n * 9 u64 of scratch; both
        // host vectors live until the synchronisation below.
        unsafe { local_pass(enc, f, &sc, base, xp, &mut x_split, s, &local, &ptrs, vec) }?;
        let keep = if wi + 1 == n_waves {
            cpu_pass(enc, tier, r, cpu_set, y, stats)?
        } else {
            Vec::new()
        };
        // The staging slots, the wave's routing and table are rewritten by the next wave, and
        // the records may be dropped: wait for this wave's kernels (and the CPU rows' uploads).
        enc.stream
            .synchronize()
            .map_err(CudaError::driver("moe streamed: wave"))?;
        drop(records);
        drop((local, ptrs, keep));
    }
    combine(enc, &sc, base, wp, op, s, OP)
}

#[cfg(test)]
mod tests {
    use super::PrefetchRate;

    #[test]
    fn prefetch_backs_off_when_predictions_miss_and_returns_when_they_hit() {
        let mut r = PrefetchRate::default();
        // untried: the whole prediction
        assert_eq!(r.budget(10), 10);
        // predictions that are almost never used: mostly nothing, a probe of one now and then
        for _ in 0..50 {
            let b = r.budget(10);
            r.observe(b as u64, 0);
        }
        let given: usize = (0..64).map(|_| r.budget(10)).sum();
        assert!(
            (1..=64 / PrefetchRate::PROBE as usize).contains(&given),
            "{given}"
        );
        // the routing turns predictable: the probes hit, and the full set comes back
        let mut full = false;
        for _ in 0..200 {
            let b = r.budget(10);
            r.observe(b as u64, b as u64);
            full |= b == 10;
        }
        assert!(full);
        assert_eq!(r.budget(10), 10);
    }
}
