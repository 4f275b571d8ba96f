//! moeflux-cuda: the CUDA backend. Every op of the IR runs on the device; the CPU backend is
//! the reference it is tested against (`tests/parity.rs`).
//!
//! * Kernels are CUDA C in `kernels/<op>.cu` (+ `common.cuh`, `gemv.cuh`), embedded in the
//!   binary and compiled by NVRTC at first use for the device's own `sm_XY`, with an on-disk
//!   CUBIN cache ([`kernels`]).
//! * `cudarc` loads libcuda and libnvrtc at run time, so this crate builds without CUDA, and
//!   [`CudaBackend::new`] returns an error (never panics) when no driver or device is present.
//! * Work is enqueued on one stream: `encode` launches, `submit` synchronises. Buffers are plain
//!   device allocations ([`pool`]); weights are copied to the device once when registered.
//! * `execute` replays a graph as a CUDA graph: the first execution of a prepared graph runs
//!   eagerly (it gives pending buffers their storage and grows scratch), the second is captured
//!   on the stream and instantiated, and every later one is a single `cuGraphLaunch` plus one
//!   synchronisation. Inputs are uploaded into the same device buffers before each execution,
//!   so a replay sees them. A captured graph is dropped and re-captured when any address it
//!   baked in may have moved (the pool's or the scratch's generation changed, or the graph was
//!   prepared again). A graph with `Op::MoeExpertsStreamed` (a host round-trip) is captured in
//!   pieces: each run of ops between two streamed ops is one CUDA graph, launched without a
//!   synchronisation, and the streamed ops run from the host in between.
//!   `MOEFLUX_CUDA_GRAPHS=0`, profiling and `MOEFLUX_CUDA_SYNC=1` disable capture.
//! * Nothing leaves the device inside a graph: positions, routing indices and recurrent state
//!   are read and written by kernels.

pub mod error;
mod expert_cache;
pub mod kernels;
mod ops;
pub mod pool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUdevice_attribute_enum;
use cudarc::driver::{CudaContext, CudaStream};
use moeflux_core::backend::OpProfile;
use moeflux_core::{Act, Backend, BufId, BufferPool, CoreError, Graph, Lifetime, Op, Plan};

pub use error::CudaError;
pub use expert_cache::CpuMisses;
pub use pool::CudaPool;

/// How to open the device.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Where compiled kernels are cached; `None` disables the disk cache.
    pub kernel_cache: Option<PathBuf>,
    /// Synchronise after every op so a device fault names the kernel that caused it (slow;
    /// for debugging).
    pub sync_each_op: bool,
    /// Capture graphs on their second execution and replay them (CUDA graphs); off with
    /// `MOEFLUX_CUDA_GRAPHS=0`.
    pub graphs: bool,
    /// VRAM budget (bytes) of the expert cache of streamed (packed) models: `Some(0)` = no
    /// cache (experts staged in waves), `None` = free device memory at first use minus a
    /// reserve of max(2 GiB, 10%), capped at every record.
    pub gpu_mem: Option<usize>,
    /// Whether missed experts may be computed on the CPU (`MOEFLUX_CPU_MISSES=0|1|auto`).
    pub cpu_misses: CpuMisses,
    /// CPU expert bandwidth in bytes/s for that split (`MOEFLUX_CPU_EXPERT_BW`); `None`:
    /// measured at the first miss.
    pub cpu_expert_bw: Option<f64>,
    /// Page-lock the expert store's host slab (`MOEFLUX_PIN_HOST=0` turns it off).
    pub pin_host: bool,
    /// Keep whole layers of a streamed model in VRAM when the budget holds all their experts
    /// (`MOEFLUX_PIN_LAYERS=0` turns it off: one LRU cache over every layer).
    pub pin_layers: bool,
}

impl CudaOptions {
    /// Defaults for `ordinal`: the cache from [`kernels::default_cache_dir`], and
    /// `sync_each_op` when `MOEFLUX_CUDA_SYNC=1`.
    pub fn new(ordinal: usize) -> Self {
        CudaOptions {
            ordinal,
            kernel_cache: kernels::default_cache_dir(),
            sync_each_op: std::env::var("MOEFLUX_CUDA_SYNC").is_ok_and(|v| v == "1"),
            graphs: std::env::var("MOEFLUX_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            gpu_mem: None,
            cpu_misses: match std::env::var("MOEFLUX_CPU_MISSES") {
                Ok(v) => v.parse().unwrap_or_else(|e| {
                    eprintln!("warning: MOEFLUX_CPU_MISSES: {e}; using auto");
                    CpuMisses::Auto
                }),
                Err(_) => CpuMisses::Auto,
            },
            cpu_expert_bw: std::env::var("MOEFLUX_CPU_EXPERT_BW")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| *v > 0.0),
            pin_host: std::env::var("MOEFLUX_PIN_HOST").map_or(true, |v| v != "0"),
            pin_layers: std::env::var("MOEFLUX_PIN_LAYERS").map_or(true, |v| v != "0"),
        }
    }
}

/// Why no device can be used, or `Ok` with its count.
fn probe() -> Result<usize, String> {
    // SAFETY: probing for the shared libraries only tries to dlopen them.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver library) was not found".into());
    }
    let count = std::panic::catch_unwind(|| -> Result<i32, String> {
        cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
        CudaContext::device_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))
    })
    .map_err(|_| {
        "the CUDA driver library is missing a required entry point (driver too old?)".to_string()
    })??;
    if count <= 0 {
        return Err("the driver reports no CUDA devices".into());
    }
    Ok(count as usize)
}

/// Whether a CUDA device and NVRTC are usable on this machine.
pub fn available() -> bool {
    unavailable_reason().is_none()
}

/// Why [`available`] is false (`None` when a device is usable).
pub fn unavailable_reason() -> Option<String> {
    if let Err(e) = probe() {
        return Some(e);
    }
    kernels::nvrtc_version().err()
}

pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: CudaPool,
    kernels: kernels::Kernels,
    scratch: ops::Scratch,
    tables: ops::moe::ExpertTables,
    staging: ops::moe_streamed::Staging,
    smem_optin: usize,
    sm_count: usize,
    device_name: String,
    arch: String,
    sync_each_op: bool,
    /// Kernels enqueued since the last synchronisation.
    recent: Vec<&'static str>,
    profiling: bool,
    profile: Vec<(&'static str, u64, f64)>,
    graphs: bool,
    /// Capture state of every graph executed so far (a handful: one per step shape).
    captures: Vec<Capture>,
    /// Merge consecutive decode matvecs of one input into one launch, and a residual add
    /// with the norm of its sum (`MOEFLUX_CUDA_MERGE=0` turns both off).
    merge_nodes: bool,
    /// (graph address, first, end): nodes `first + 1 .. end` of that graph were launched
    /// together with node `first` and are skipped.
    merged: Option<(usize, usize, usize)>,
    /// Programmatic dependent launches (see `ops::launch_raw`), for decode graphs.
    pdl: ops::Pdl,
    /// (address, is a decode step) of the graph being encoded.
    pdl_graph: Option<(usize, bool)>,
}

/// What `execute` knows about one graph. Keyed by the graph's address, name and node count;
/// `prepare` forgets the entry, so a new graph at a reused address starts over.
struct Capture {
    addr: usize,
    nodes: usize,
    name: String,
    /// (pool generation, scratch generation) the state below is valid for.
    generation: (u64, u64),
    state: CaptureState,
}

/// One piece of a captured graph.
enum Piece {
    /// A run of ops from node `first` captured as one CUDA graph, with its kernels in order
    /// (named when a replay fails) and the pinned streamed-expert ops in it (store, pairs),
    /// counted on each replay.
    Graph {
        first: usize,
        exec: SendGraph,
        kernels: Vec<&'static str>,
        pinned: Vec<Pinned>,
    },
    /// An op that needs the host (`Op::MoeExpertsStreamed`), encoded eagerly each time.
    Host(usize),
}

/// A streamed-expert op on a pinned layer inside a captured piece: its store and pairs.
type Pinned = (Arc<dyn moeflux_core::ExpertProvider>, u64);

/// The graph's nodes in pieces: maximal runs of device-only ops, and the ops that need the host
/// between them (`needs_host`).
fn pieces_of(
    graph: &Graph,
    needs_host: impl Fn(&Op) -> bool,
) -> Vec<Result<std::ops::Range<usize>, usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, (_, op)) in graph.nodes.iter().enumerate() {
        if needs_host(op) {
            if start < i {
                out.push(Ok(start..i));
            }
            out.push(Err(i));
            start = i + 1;
        }
    }
    if start < graph.nodes.len() {
        out.push(Ok(start..graph.nodes.len()));
    }
    out
}

/// An instantiated CUDA graph. cudarc leaves it `!Send` because graph objects must not be used
/// from two threads at once; the backend owns it exclusively (`Backend` is `Send`, not `Sync`)
/// and every use binds the context to the calling thread first.
struct SendGraph(cudarc::driver::CudaGraph);

// SAFETY: see above: moved between threads only together with its (exclusive) owner, never
// shared; CUDA graph handles are not tied to the thread that created them.
unsafe impl Send for SendGraph {}

enum CaptureState {
    /// Not yet executed at this generation: run eagerly (materialises storage, grows scratch).
    Fresh,
    /// Executed eagerly once at this generation: capture on the next execution.
    Warm,
    Captured(Vec<Piece>),
    /// Cannot be captured (capture failed): always eager.
    Never,
}

impl CudaBackend {
    /// Opens device `ordinal` with default options. Errors (no driver, no device, no NVRTC)
    /// are returned, never panicked.
    pub fn new(ordinal: usize) -> Result<Self, CoreError> {
        Self::with_options(CudaOptions::new(ordinal))
    }

    pub fn with_options(opts: CudaOptions) -> Result<Self, CoreError> {
        Ok(Self::open(opts)?)
    }

    fn open(opts: CudaOptions) -> Result<Self, CudaError> {
        let count = probe().map_err(CudaError::NoDevice)?;
        if opts.ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {} requested, {count} present",
                opts.ordinal
            )));
        }
        let nvrtc = kernels::nvrtc_version().map_err(CudaError::NoDevice)?;
        let ctx = std::panic::catch_unwind(|| CudaContext::new(opts.ordinal))
            .map_err(|_| {
                CudaError::NoDevice(
                    "creating the CUDA context panicked (driver too old for CUDA 13 bindings?)"
                        .into(),
                )
            })?
            .map_err(CudaError::driver(format!(
                "creating a context on device {}",
                opts.ordinal
            )))?;
        let stream = ctx
            .new_stream()
            .map_err(CudaError::driver("creating a stream"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(CudaError::driver("querying the compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let smem_optin =
            ctx.attribute(
                CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(CudaError::driver("querying shared memory"))? as usize;
        let sm_count = ctx
            .attribute(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("querying the multiprocessor count"))?
            as usize;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let kernels =
            kernels::Kernels::new(ctx.clone(), arch.clone(), nvrtc, opts.kernel_cache.clone());
        Ok(CudaBackend {
            pool: CudaPool::new(ctx.clone(), stream.clone()),
            ctx,
            stream,
            kernels,
            scratch: ops::Scratch::default(),
            tables: Default::default(),
            staging: ops::moe_streamed::Staging::new(ops::moe_streamed::TierOptions {
                gpu_mem: opts.gpu_mem,
                cpu_misses: opts.cpu_misses,
                cpu_bw: opts.cpu_expert_bw,
                pin_host: opts.pin_host,
                pin_layers: opts.pin_layers,
            }),
            smem_optin,
            sm_count,
            device_name,
            arch,
            sync_each_op: opts.sync_each_op,
            recent: Vec::new(),
            profiling: false,
            profile: Vec::new(),
            graphs: opts.graphs,
            captures: Vec::new(),
            merge_nodes: std::env::var("MOEFLUX_CUDA_MERGE").map_or(true, |v| v != "0"),
            merged: None,
            pdl: ops::Pdl::from_env(major, sm_count),
            pdl_graph: None,
        })
    }

    /// e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn device_description(&self) -> String {
        format!("{} ({})", self.device_name, self.arch)
    }

    /// Compiles (or loads from the cache) every kernel now rather than at first use.
    pub fn precompile(&mut self) -> Result<(), CoreError> {
        self.bind()?;
        Ok(self.kernels.load_all()?)
    }

    /// (modules compiled by NVRTC, modules loaded from the disk cache) so far.
    pub fn kernel_stats(&self) -> (usize, usize) {
        self.kernels.stats
    }

    /// Counters of the streamed-expert device tiers (VRAM cache, CPU-computed misses).
    pub fn expert_tier_stats(&self) -> moeflux_core::op::DeviceTierStats {
        self.staging.stats()
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CoreError> {
        self.bind()?;
        Ok(self
            .ctx
            .mem_get_info()
            .map_err(CudaError::driver("cuMemGetInfo"))?)
    }

    fn read_bandwidth(&mut self) -> Result<f64, CudaError> {
        self.bind()?;
        let (free, _) = self
            .ctx
            .mem_get_info()
            .map_err(CudaError::driver("cuMemGetInfo"))?;
        let bytes = (1usize << 30).min(free / 4) / 16 * 16;
        let blocks = (self.sm_count * 8) as u32;
        let src = pool::DevMem::zeroed(&self.ctx, &self.stream, bytes, "bandwidth probe")?;
        let out = pool::DevMem::zeroed(
            &self.ctx,
            &self.stream,
            blocks as usize * 4,
            "bandwidth probe sums",
        )?;
        let f = self.kernels.get("bandwidth.cu", "read_sum_f32")?;
        let (x, n4, o) = (src.ptr, (bytes / 16) as u64, out.ptr);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        const LAUNCHES: usize = 4;
        let mut best = 0f64;
        for run in 0..6 {
            let t = Instant::now();
            for _ in 0..LAUNCHES {
                let mut b = self.stream.launch_builder(&f);
                cudarc::driver::PushKernelArg::arg(&mut b, &x);
                cudarc::driver::PushKernelArg::arg(&mut b, &n4);
                cudarc::driver::PushKernelArg::arg(&mut b, &o);
                // SAFETY: read_sum_f32(const float4*, u64, float*); src holds n4 float4s
                // (16-byte aligned device allocation), out `blocks` floats.
                unsafe { b.launch(cfg) }.map_err(|err| CudaError::Launch {
                    kernel: "read_sum_f32",
                    err,
                })?;
            }
            self.sync("bandwidth probe")?;
            let dt = t.elapsed().as_secs_f64();
            if run > 0 {
                best = best.max((bytes * LAUNCHES) as f64 / dt);
            }
        }
        Ok(best)
    }

    /// Runs the captured pieces of `captures[i]` (graph launches, host ops between them) and
    /// waits once. When a host op moved an address that a later piece baked in, the rest runs
    /// eagerly and the graph is captured afresh next time.
    fn replay(&mut self, i: usize, graph: &Graph) -> Result<(), CoreError> {
        let CaptureState::Captured(pieces) =
            std::mem::replace(&mut self.captures[i].state, CaptureState::Fresh)
        else {
            unreachable!("replay of an uncaptured graph")
        };
        let r = self.run_pieces(i, graph, &pieces);
        if r.is_ok() && self.captures[i].generation == self.generation() {
            self.captures[i].state = CaptureState::Captured(pieces);
        }
        r
    }

    fn run_pieces(&mut self, i: usize, graph: &Graph, pieces: &[Piece]) -> Result<(), CoreError> {
        let valid = self.captures[i].generation;
        self.recent.clear();
        for piece in pieces {
            if self.generation() != valid {
                // Addresses moved under a host op: finish eagerly from this piece on.
                let (Piece::Host(first) | Piece::Graph { first, .. }) = piece;
                for n in *first..graph.nodes.len() {
                    self.encode(graph, n)?;
                }
                return Ok(self.sync(&graph.name)?);
            }
            match piece {
                Piece::Graph {
                    exec,
                    kernels,
                    pinned,
                    ..
                } => {
                    self.recent.extend_from_slice(kernels);
                    for (store, pairs) in pinned {
                        self.staging.count_pinned(store, *pairs);
                    }
                    if let Err(err) = exec.0.launch() {
                        self.recent.clear();
                        return Err(CudaError::Launch {
                            kernel: "cuGraphLaunch",
                            err,
                        }
                        .into());
                    }
                }
                Piece::Host(n) => self.encode(graph, *n)?,
            }
        }
        Ok(self.sync(&graph.name)?)
    }

    /// The capturing execution: each device-only run of ops is captured, instantiated and
    /// launched at once, host ops run eagerly between them. A run whose capture fails runs
    /// eagerly; `None` then (nothing to keep), else the pieces.
    fn capture_and_run(&mut self, graph: &Graph) -> Result<Option<Vec<Piece>>, CoreError> {
        let mut pieces = Vec::new();
        let mut ok = true;
        self.recent.clear();
        // Streamed experts need the host unless their layer is pinned in VRAM (decided on the
        // eager run before this one; a layer pinned later runs eagerly, correct either way).
        let staging = &self.staging;
        let parts = pieces_of(graph, |op| match op {
            Op::MoeExpertsStreamed { store, layer, .. } => !staging.is_pinned(store, *layer),
            _ => false,
        });
        for part in parts {
            match part {
                Err(n) => {
                    self.encode(graph, n)?;
                    pieces.push(Piece::Host(n));
                }
                Ok(range) => {
                    let recent = std::mem::take(&mut self.recent);
                    let captured = if ok {
                        self.capture(graph, range.clone())
                    } else {
                        None
                    };
                    self.recent = recent;
                    match captured {
                        Some((g, kernels)) => {
                            self.recent.extend_from_slice(&kernels);
                            g.launch().map_err(|err| CudaError::Launch {
                                kernel: "cuGraphLaunch",
                                err,
                            })?;
                            let first = range.start;
                            let pinned = graph.nodes[range]
                                .iter()
                                .filter_map(|(_, op)| match op {
                                    Op::MoeExpertsStreamed { store, n, k, .. } => {
                                        Some((store.clone(), (n * k) as u64))
                                    }
                                    _ => None,
                                })
                                .collect();
                            pieces.push(Piece::Graph {
                                first,
                                exec: SendGraph(g),
                                kernels,
                                pinned,
                            });
                        }
                        None => {
                            ok = false;
                            for n in range {
                                self.encode(graph, n)?;
                            }
                        }
                    }
                }
            }
        }
        self.sync(&graph.name)?;
        Ok(ok.then_some(pieces))
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(CudaError::driver("binding the context to this thread"))
    }

    fn sync(&mut self, graph: &str) -> Result<(), CudaError> {
        let r = self.stream.synchronize();
        let r = r.map_err(|err| {
            let recent = &self.recent;
            let tail: Vec<&str> = recent.iter().rev().take(8).rev().copied().collect();
            CudaError::Execution {
                graph: graph.to_string(),
                recent: format!("{} launched, last: {}", recent.len(), tail.join(", ")),
                err,
            }
        });
        // Cleared, not taken: the vector keeps its capacity for the next step.
        self.recent.clear();
        r
    }

    /// (pool, scratch) generations: a captured graph is valid while these are unchanged.
    fn generation(&self) -> (u64, u64) {
        (self.pool.generation(), self.scratch.generation)
    }

    /// The default `execute`: every op launched from the host, one synchronisation.
    fn execute_eager(&mut self, graph: &Graph) -> Result<(), CoreError> {
        self.begin()?;
        for i in 0..graph.nodes.len() {
            self.encode(graph, i)?;
        }
        self.submit()
    }

    /// Captures `graph`'s launches on the stream and instantiates them. `None` when the capture
    /// failed (an op did something that cannot be captured) or moved an address; nothing
    /// captured has run, so the caller runs the graph eagerly.
    fn capture(
        &mut self,
        graph: &Graph,
        range: std::ops::Range<usize>,
    ) -> Option<(cudarc::driver::CudaGraph, Vec<&'static str>)> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let before = self.generation();
        self.recent.clear();
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .ok()?;
        let mut ok = true;
        for i in range {
            if self.encode(graph, i).is_err() {
                ok = false;
                break;
            }
        }
        // Always leave capture mode, even after a failed op.
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let kernels = std::mem::take(&mut self.recent);
        if !ok || self.generation() != before {
            return None;
        }
        match ended {
            Ok(Some(g)) => Some((g, kernels)),
            _ => None,
        }
    }

    /// Launches node `index` together with the nodes after it that one kernel can serve: the
    /// decode matvecs of the same input (up to 4 in all, see [`ops::matmul::matvec_multi`]),
    /// the RMS norm of an add's sum, or an attention block's q/k norms, rope and KV append. The number of nodes launched, or 0 when the node runs
    /// alone.
    fn merge_run(&mut self, graph: &Graph, index: usize) -> Result<usize, CudaError> {
        if !self.merge_nodes {
            return Ok(0);
        }
        if let Op::Add { a, b, out, len } = &graph.nodes[index].1 {
            return self.fuse_add_norm(graph, index, (*a, *b, *out, *len));
        }
        if matches!(graph.nodes[index].1, Op::RmsNorm { .. } | Op::Rope { .. }) {
            return self.fuse_qk_prep(graph, index);
        }
        let Op::Matmul { x, n, .. } = &graph.nodes[index].1 else {
            return Ok(0);
        };
        if *n > ops::matmul::MATVEC_MAX_N {
            return Ok(0);
        }
        let parts: Vec<(
            &moeflux_core::Matrix,
            moeflux_core::BufId<moeflux_core::Act>,
        )> = graph.nodes[index..]
            .iter()
            .take(ops::matmul::MV_PARTS)
            .map_while(|(_, op)| match op {
                Op::Matmul {
                    x: x2,
                    w,
                    out,
                    n: n2,
                } if x2 == x && n2 == n => Some((w, *out)),
                _ => None,
            })
            .collect();
        if parts.len() < 2 {
            return Ok(0);
        }
        let (x, n) = (*x, *n);
        let merged = ops::matmul::matvec_multi(&mut self.enc(), x, &parts, n)?;
        Ok(if merged { parts.len() } else { 0 })
    }

    /// Launches the Add at node `index` and the RmsNorm of its sum that follows it as one
    /// kernel (the residual add of a block and the next block's input norm): 2 nodes launched,
    /// or 0 when they run apart.
    fn fuse_add_norm(
        &mut self,
        graph: &Graph,
        index: usize,
        (a, b, sum, len): (BufId<Act>, BufId<Act>, BufId<Act>, usize),
    ) -> Result<usize, CudaError> {
        let Some((
            _,
            Op::RmsNorm {
                x,
                weight,
                out,
                rows,
                dim,
                eps,
                offset,
            },
        )) = graph.nodes.get(index + 1)
        else {
            return Ok(0);
        };
        if *x != sum || rows.checked_mul(*dim) != Some(len) {
            return Ok(0);
        }
        let fused = ops::rms_norm::add_rms_norm(
            &mut self.enc(),
            a,
            b,
            sum,
            weight,
            *out,
            *rows,
            *dim,
            *eps,
            *offset,
        )?;
        Ok(if fused { 2 } else { 0 })
    }

    /// Launches an attention block's per-head preparation as one kernel (see
    /// [`match_qk_prep`] and [`ops::rope::qk_prep`]). The number of nodes launched, or 0 when
    /// they run apart.
    fn fuse_qk_prep(&mut self, graph: &Graph, index: usize) -> Result<usize, CudaError> {
        let Some((count, prep)) = match_qk_prep(&graph.nodes[index..]) else {
            return Ok(0);
        };
        ops::rope::qk_prep(&mut self.enc(), &prep)?;
        Ok(count)
    }

    fn encode_one(&mut self, op: &Op) -> Result<(), CudaError> {
        ops::encode_op(&mut self.enc(), op)
    }

    /// What the op encoders see of the backend.
    fn enc(&mut self) -> ops::Enc<'_> {
        ops::Enc {
            stream: &self.stream,
            kernels: &mut self.kernels,
            pool: &mut self.pool,
            scratch: &mut self.scratch,
            tables: &mut self.tables,
            staging: &mut self.staging,
            smem_optin: self.smem_optin,
            sm_count: self.sm_count,
            recent: &mut self.recent,
            pdl: if self.pdl_graph.is_some_and(|(_, decode)| decode) {
                self.pdl
            } else {
                ops::Pdl::Off
            },
        }
    }
}

/// The attention block's per-head preparation at the head of `nodes`, as `attn::emit` writes
/// it: in-place RMS norms of the q and k heads (either may be absent, one eps and offset), the
/// rope of both (or none), then the KV append. The number of nodes and what one qk_prep_f32
/// launch must do for them, or None when the nodes are anything else.
fn match_qk_prep(
    nodes: &[(moeflux_core::op::NodeName, Op)],
) -> Option<(usize, ops::rope::QkPrep<'_>)> {
    /// An in-place RmsNorm node's fields.
    struct Norm<'a> {
        x: BufId<Act>,
        weight: &'a moeflux_core::op::Vector,
        rows: usize,
        dim: usize,
        eps: f32,
        offset: f32,
    }
    /// A Rope node's fields.
    struct Rope {
        x: BufId<Act>,
        pos: BufId<moeflux_core::Pos>,
        n: usize,
        heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
    }
    let mut i = 0;
    let mut norms = Vec::new();
    while i < nodes.len().min(2) {
        match &nodes[i].1 {
            &Op::RmsNorm {
                x,
                ref weight,
                out,
                rows,
                dim,
                eps,
                offset,
            } if x == out => norms.push(Norm {
                x,
                weight,
                rows,
                dim,
                eps,
                offset,
            }),
            _ => break,
        }
        i += 1;
    }
    let mut ropes = Vec::new();
    while i < nodes.len() && ropes.len() < 2 {
        match nodes[i].1 {
            Op::Rope {
                x,
                pos,
                n,
                heads,
                head_dim,
                rotary_dim,
                theta,
            } => ropes.push(Rope {
                x,
                pos,
                n,
                heads,
                head_dim,
                rotary_dim,
                theta,
            }),
            _ => break,
        }
        i += 1;
    }
    let Some((
        _,
        Op::KvAppend {
            k,
            v,
            pos,
            k_cache,
            v_cache,
            n,
            kv_dim,
            max_ctx,
        },
    )) = nodes.get(i)
    else {
        return None;
    };
    let (k, n) = (*k, *n);
    // q is the one other buffer the norms and ropes touch; it must be touched.
    let mut q = None;
    for x in norms.iter().map(|n| n.x).chain(ropes.iter().map(|r| r.x)) {
        if x != k {
            if q.is_some_and(|q| q != x) {
                return None;
            }
            q = Some(x);
        }
    }
    let q = q?;
    if *v == k || *v == q {
        return None;
    }
    // The ropes: none, or one of q's heads then one of k's (the cache's) with the same pos, n
    // and angles.
    let (heads, head_dim, rope) = match ropes.as_slice() {
        [] => {
            let qn = norms.iter().find(|nm| nm.x == q)?;
            if n == 0 || !qn.rows.is_multiple_of(n) {
                return None;
            }
            (qn.rows / n, qn.dim, None)
        }
        [rq, rk] => {
            let same = |r: &Rope| {
                r.pos == *pos
                    && r.n == n
                    && r.head_dim == rq.head_dim
                    && r.rotary_dim == rq.rotary_dim
                    && r.theta == rq.theta
            };
            if rq.x != q
                || rk.x != k
                || !same(rq)
                || !same(rk)
                || rk.heads.checked_mul(rk.head_dim) != Some(*kv_dim)
            {
                return None;
            }
            (rq.heads, rq.head_dim, Some((rq.rotary_dim, rq.theta)))
        }
        _ => return None,
    };
    if head_dim == 0 || !kv_dim.is_multiple_of(head_dim) {
        return None;
    }
    let kv_heads = kv_dim / head_dim;
    // Norms: at most one per buffer, per head, with one eps and offset.
    let mut q_norm: Option<&Norm> = None;
    let mut k_norm: Option<&Norm> = None;
    for nm in &norms {
        let (slot, heads) = if nm.x == q {
            (&mut q_norm, heads)
        } else {
            (&mut k_norm, kv_heads)
        };
        if slot.is_some() || nm.dim != head_dim || Some(nm.rows) != n.checked_mul(heads) {
            return None;
        }
        *slot = Some(nm);
    }
    let (eps, offset) = match (q_norm, k_norm) {
        (Some(a), Some(b)) if (a.eps, a.offset) != (b.eps, b.offset) => return None,
        (Some(nm), _) | (_, Some(nm)) => (nm.eps, nm.offset),
        (None, None) => (0.0, 0.0),
    };
    if !ops::rope::qk_prep_fits(head_dim, rope) {
        return None;
    }
    Some((
        i + 1,
        ops::rope::QkPrep {
            q,
            k,
            v: *v,
            pos: *pos,
            k_cache: *k_cache,
            v_cache: *v_cache,
            q_norm: q_norm.map(|nm| nm.weight),
            k_norm: k_norm.map(|nm| nm.weight),
            eps,
            offset,
            rope,
            n,
            heads,
            kv_heads,
            head_dim,
            max_ctx: *max_ctx,
        },
    ))
}

/// Whether `graph` is a decode step: every matmul takes the matrix-vector path. Programmatic
/// dependent launches pay off there (many short kernels); measured on the H100 (run 18) they
/// cost a 512-token prefill of qwen3-30b ~6%, so prefill graphs launch plainly.
fn is_decode(graph: &Graph) -> bool {
    graph.nodes.iter().all(|(_, op)| match op {
        Op::Matmul { n, .. } => *n <= ops::matmul::MATVEC_MAX_N,
        _ => true,
    })
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Queued work may still use buffers that are about to be freed.
        let _ = self.bind();
        let _ = self.stream.synchronize();
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn pool(&mut self) -> &mut dyn BufferPool {
        let _ = self.bind();
        &mut self.pool
    }
    fn pool_ref(&self) -> &dyn BufferPool {
        &self.pool
    }

    fn begin(&mut self) -> Result<(), CoreError> {
        Ok(())
    }

    fn encode(&mut self, graph: &Graph, index: usize) -> Result<(), CoreError> {
        self.bind()?;
        let (name, op) = &graph.nodes[index];
        let at = |e: CudaError| CoreError::BadOp {
            graph: graph.name.clone(),
            op: format!(
                "{} ({}{})",
                op.kind(),
                name.role,
                name.layer
                    .map(|l| format!(", layer {l}"))
                    .unwrap_or_default()
            ),
            msg: e.to_string(),
        };
        let addr = graph as *const Graph as usize;
        if self.pdl_graph.is_none_or(|(g, _)| g != addr) {
            self.pdl_graph = Some((addr, is_decode(graph)));
        }
        if let Some((g, first, end)) = self.merged
            && g == addr
            && first < index
            && index < end
        {
            return Ok(()); // launched with node `first`
        }
        self.merged = None;
        let t0 = self.profiling.then(Instant::now);
        let r = match self.merge_run(graph, index) {
            Ok(0) => self.encode_one(op),
            Ok(len) => {
                self.merged = Some((addr, index, index + len));
                Ok(())
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {}
            Err(e @ CudaError::OutOfMemory { .. }) => return Err(e.into()),
            Err(e) => return Err(at(e)),
        }
        if self.sync_each_op || self.profiling {
            self.sync(&graph.name).map_err(at)?;
        }
        if let Some(t0) = t0 {
            let dt = t0.elapsed().as_secs_f64();
            let kind = op.kind();
            match self.profile.iter_mut().find(|r| r.0 == kind) {
                Some(r) => {
                    r.1 += 1;
                    r.2 += dt;
                }
                None => self.profile.push((kind, 1, dt)),
            }
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<(), CoreError> {
        self.bind()?;
        Ok(self.sync("(submitted work)")?)
    }

    /// Eager on a graph's first execution (per generation), captured as a CUDA graph on the
    /// second, replayed (one launch, one synchronisation) from then on. See the crate docs.
    fn execute(&mut self, graph: &Graph) -> Result<(), CoreError> {
        if !self.graphs || self.profiling || self.sync_each_op {
            return self.execute_eager(graph);
        }
        self.bind()?;
        let addr = graph as *const Graph as usize;
        let nodes = graph.nodes.len();
        let now = self.generation();
        let i = match self
            .captures
            .iter()
            .position(|c| c.addr == addr && c.nodes == nodes && c.name == graph.name)
        {
            Some(i) => i,
            None => {
                let state = if nodes == 0 {
                    CaptureState::Never
                } else {
                    CaptureState::Fresh
                };
                self.captures.push(Capture {
                    addr,
                    nodes,
                    name: graph.name.clone(),
                    generation: now,
                    state,
                });
                self.captures.len() - 1
            }
        };
        let c = &mut self.captures[i];
        if c.generation != now && !matches!(c.state, CaptureState::Never) {
            // An address it may have baked in moved: start over (nothing of it is in flight,
            // every execution ends with a synchronisation).
            c.state = CaptureState::Fresh;
            c.generation = now;
        }
        match &c.state {
            CaptureState::Never => self.execute_eager(graph),
            CaptureState::Fresh => {
                self.execute_eager(graph)?;
                let now = self.generation();
                let c = &mut self.captures[i];
                c.state = CaptureState::Warm;
                c.generation = now;
                Ok(())
            }
            CaptureState::Warm => {
                let pieces = self.capture_and_run(graph)?;
                let after = self.generation();
                let c = &mut self.captures[i];
                c.state = match pieces {
                    // Valid while nothing moved during this run (its host ops may allocate).
                    Some(p) if c.generation == now && now == after => CaptureState::Captured(p),
                    Some(_) => CaptureState::Fresh,
                    None => CaptureState::Never,
                };
                Ok(())
            }
            CaptureState::Captured(_) => self.replay(i, graph),
        }
    }

    /// Validates and plans like the default, then builds what the graph's ops will need
    /// (expert tables) so the first execution does not pay for it.
    fn prepare(&mut self, graph: &Graph) -> Result<(), CoreError> {
        self.bind()?;
        let pool = self.pool_ref();
        graph.validate(&|id| pool.info(id).map(|(b, l, _)| (b, l)))?;
        let plan = Plan::build(graph, &|id| match pool.info(id) {
            Some((b, _, Lifetime::Transient)) => Some(b),
            _ => None,
        });
        self.pool.commit_plan(&plan)?;
        // A graph prepared again (or a new one at a reused address) is captured afresh.
        let addr = graph as *const Graph as usize;
        self.captures.retain(|c| c.addr != addr);
        for op in graph.ops() {
            if let Op::MoeExperts { experts, .. } = op {
                self.tables.ensure(&mut self.pool, &self.stream, experts)?;
            }
        }
        Ok(())
    }

    /// Read bandwidth of device memory: a summing kernel over 1 GiB, best of several runs.
    fn measure_bandwidth(&mut self) -> Result<f64, CoreError> {
        Ok(self.read_bandwidth()?)
    }

    fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        self.profile.clear();
    }

    fn profile(&self) -> OpProfile {
        OpProfile {
            rows: self.profile.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles every kernel file with NVRTC for sm_90 when libnvrtc is present (no GPU needed),
    /// so a syntax error shows up on any machine that has the library.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if let Err(why) = kernels::nvrtc_version() {
            eprintln!("skipping: {why}");
            return;
        }
        for (file, _) in kernels::FILES {
            let bin = kernels::compile_cubin(file, "sm_90").unwrap_or_else(|e| panic!("{e}"));
            assert!(!bin.is_empty(), "{file}: empty CUBIN");
        }
    }

    /// The attention block's nodes as `attn::emit` writes them (q/k norms, ropes, KV append),
    /// with what may be left out.
    fn attn_prep_nodes(
        norms: bool,
        ropes: bool,
        k_rope_heads: usize,
    ) -> Vec<(moeflux_core::op::NodeName, Op)> {
        use moeflux_core::op::{Region, Vector};
        use moeflux_core::{BufId, DType, RawBufId, Role};
        fn id<R: Role>(i: u32) -> BufId<R> {
            BufId::from_raw(RawBufId(i))
        }
        let (q, k, v, pos, kc, vc) = (id(1), id(2), id(3), id(4), id(5), id(6));
        let (n, heads, kv_heads, hd) = (1, 32, 4, 128);
        let w = Vector {
            data: Region {
                buf: id(7),
                offset: 0,
            },
            len: hd,
            dtype: DType::BF16,
        };
        let mut g = Graph::new("attn");
        if norms {
            for (x, h) in [(q, heads), (k, kv_heads)] {
                g.push(
                    None,
                    "norm",
                    Op::RmsNorm {
                        x,
                        weight: w,
                        out: x,
                        rows: n * h,
                        dim: hd,
                        eps: 1e-6,
                        offset: 0.0,
                    },
                );
            }
        }
        if ropes {
            for (x, h) in [(q, heads), (k, k_rope_heads)] {
                g.push(
                    None,
                    "rope",
                    Op::Rope {
                        x,
                        pos,
                        n,
                        heads: h,
                        head_dim: hd,
                        rotary_dim: hd,
                        theta: 1e6,
                    },
                );
            }
        }
        g.push(
            None,
            "kv_append",
            Op::KvAppend {
                k,
                v,
                pos,
                k_cache: kc,
                v_cache: vc,
                n,
                kv_dim: kv_heads * hd,
                max_ctx: 64,
            },
        );
        g.nodes
    }

    #[test]
    fn the_attention_prep_nodes_fuse() {
        let full = attn_prep_nodes(true, true, 4);
        let (count, p) = match_qk_prep(&full).expect("norms, ropes and append fuse");
        assert_eq!(
            (count, p.heads, p.kv_heads, p.head_dim, p.n),
            (5, 32, 4, 128, 1)
        );
        assert!(p.q_norm.is_some() && p.k_norm.is_some() && p.rope == Some((128, 1e6)));
        let no_norms = attn_prep_nodes(false, true, 4);
        let (count, p) = match_qk_prep(&no_norms).expect("ropes and append");
        assert_eq!((count, p.heads, p.q_norm.is_none()), (3, 32, true));
        let no_ropes = attn_prep_nodes(true, false, 4);
        let (count, p) = match_qk_prep(&no_ropes).expect("norms and append");
        assert_eq!((count, p.heads, p.rope), (3, 32, None));
        // Nothing on q, or a k rope over other heads than the cache's: the nodes run apart.
        assert!(match_qk_prep(&attn_prep_nodes(false, false, 4)).is_none());
        assert!(match_qk_prep(&attn_prep_nodes(true, true, 2)).is_none());
        // Starting anywhere but the first norm is not the pattern.
        assert!(
            match_qk_prep(&full[1..]).is_none()
                || match_qk_prep(&full[1..]).is_some_and(|(c, _)| c == 4)
        );
    }

    #[test]
    fn includes_are_expanded() {
        let s = kernels::expanded_source("moe.cu").unwrap();
        assert!(
            s.contains("struct WMat")
                && s.contains("gemm_tile")
                && !s.contains("#include \"common.cuh\"")
        );
    }

    /// Decode graphs launch every kernel as a programmatic dependent launch, which is only
    /// safe when the kernel waits for its predecessor before touching memory: each kernel's
    /// body must open with `pdl_prologue();`.
    #[test]
    fn every_kernel_starts_with_the_pdl_prologue() {
        let mut kernels = 0;
        for (file, _) in kernels::FILES {
            let s = kernels::expanded_source(file).unwrap();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("extern \"C\" __global__") {
                rest = &rest[i..];
                let open = rest.find('{').expect("a kernel body");
                let head: String = rest[..open].chars().filter(|c| *c != '\n').collect();
                let body = rest[open + 1..].trim_start();
                assert!(
                    body.starts_with("pdl_prologue();"),
                    "{file}: kernel `{}` does not start with pdl_prologue()",
                    head.split('(').next().unwrap_or(&head).trim()
                );
                kernels += 1;
                rest = &rest[open..];
            }
        }
        assert!(kernels >= 30, "{kernels} kernels found");
    }

    #[test]
    fn new_errors_cleanly_without_a_device() {
        if available() {
            return;
        }
        let e = CudaBackend::new(0).err().expect("no device, so an error");
        assert!(e.to_string().contains("cuda"), "{e}");
    }
}
