//! The traits a device implements: a [`BufferPool`] of typed buffers and a [`Backend`]
//! that runs [`Graph`]s over them.
//!
//! Pool semantics (shared by every backend):
//! * `alloc` returns a zeroed buffer with a label (used in every error about it) and a
//!   [`Lifetime`]. Only `Transient` buffers may be aliased by a [`Plan`]; `Persistent`
//!   (KV caches, recurrent state) and `External` (uploaded inputs, downloaded outputs)
//!   never are.
//! * `upload`/`download` have prefix semantics: the host slice may be shorter than the
//!   buffer (a narrower batch uses its first rows); longer is a `SizeMismatch` naming
//!   the buffer.
//! * Weights are registered, not allocated: a backend may borrow the bytes (CPU, from a
//!   memory map) or copy them once to device memory.

use std::ops::Range;
use std::sync::Arc;

use crate::buf::{BufId, RawBufId, Role};
use crate::error::CoreError;
use crate::op::Graph;
use crate::planner::Plan;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Lives across graph executions (KV cache, recurrent state).
    Persistent,
    /// Scratch inside one execution; may share storage with other transients.
    Transient,
    /// Written or read by the host around executions (inputs, logits).
    External,
}

/// Bytes kept alive by their owner: a memory map, or a buffer built in memory.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Bytes of stored weights kept alive by their owner (typically a memory map).
#[derive(Clone)]
pub struct WeightBytes {
    pub owner: SharedBytes,
    pub range: Range<usize>,
}

impl WeightBytes {
    pub fn new(owner: SharedBytes, range: Range<usize>) -> Self {
        WeightBytes { owner, range }
    }
    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

pub trait BufferPool {
    fn alloc_raw(
        &mut self,
        bytes: usize,
        label: &str,
        lifetime: Lifetime,
    ) -> Result<RawBufId, CoreError>;
    fn register_weights(&mut self, bytes: WeightBytes, label: &str) -> Result<RawBufId, CoreError>;
    fn upload_raw(
        &mut self,
        id: RawBufId,
        byte_offset: usize,
        data: &[u8],
    ) -> Result<(), CoreError>;
    fn download_raw(
        &mut self,
        id: RawBufId,
        byte_offset: usize,
        out: &mut [u8],
    ) -> Result<(), CoreError>;
    /// Zero the whole buffer (resets recurrent state, for example).
    fn zero(&mut self, id: RawBufId) -> Result<(), CoreError>;
    /// Byte size and label.
    fn info(&self, id: RawBufId) -> Option<(usize, String, Lifetime)>;
    /// Make the planned transients share storage. Safe to call again with a new plan.
    fn commit_plan(&mut self, plan: &Plan) -> Result<(), CoreError>;
    /// Drop every transient and external buffer (per-graph buffers; their ids become
    /// invalid). Persistent buffers and weights stay.
    fn reset_transient(&mut self);
    /// Bytes of device memory held (weights borrowed from the host excluded).
    fn allocated_bytes(&self) -> usize;
}

fn check_range(
    pool: &(impl BufferPool + ?Sized),
    id: RawBufId,
    off: usize,
    len: usize,
    what: &'static str,
) -> Result<(), CoreError> {
    let (cap, label, _) = pool.info(id).ok_or(CoreError::UnknownBuffer(id))?;
    if off + len > cap {
        return Err(CoreError::SizeMismatch {
            label,
            id,
            capacity: cap,
            requested: off + len,
            what,
        });
    }
    Ok(())
}

/// Typed conveniences over any pool.
pub trait PoolExt: BufferPool {
    fn alloc<R: Role>(
        &mut self,
        bytes: usize,
        label: &str,
        lifetime: Lifetime,
    ) -> Result<BufId<R>, CoreError> {
        Ok(BufId::from_raw(self.alloc_raw(bytes, label, lifetime)?))
    }
    fn upload<R: Role>(&mut self, id: BufId<R>, data: &[u8]) -> Result<(), CoreError> {
        self.upload_at(id, 0, data)
    }
    fn upload_at<R: Role>(
        &mut self,
        id: BufId<R>,
        byte_offset: usize,
        data: &[u8],
    ) -> Result<(), CoreError> {
        check_range(self, id.raw(), byte_offset, data.len(), "uploaded")?;
        self.upload_raw(id.raw(), byte_offset, data)
    }
    fn download<R: Role>(&mut self, id: BufId<R>, out: &mut [u8]) -> Result<(), CoreError> {
        check_range(self, id.raw(), 0, out.len(), "downloaded")?;
        self.download_raw(id.raw(), 0, out)
    }
    fn upload_u32<R: Role>(&mut self, id: BufId<R>, data: &[u32]) -> Result<(), CoreError> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(id, &bytes)
    }
    fn upload_f32<R: Role>(&mut self, id: BufId<R>, data: &[f32]) -> Result<(), CoreError> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.upload(id, &bytes)
    }
    fn download_f32<R: Role>(&mut self, id: BufId<R>, out: &mut [f32]) -> Result<(), CoreError> {
        let mut bytes = vec![0u8; out.len() * 4];
        self.download(id, &mut bytes)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
    fn download_u32<R: Role>(&mut self, id: BufId<R>, out: &mut [u32]) -> Result<(), CoreError> {
        let mut bytes = vec![0u8; out.len() * 4];
        self.download(id, &mut bytes)?;
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }
}

impl<P: BufferPool + ?Sized> PoolExt for P {}

/// Per-op timing gathered when profiling is on.
#[derive(Clone, Debug, Default)]
pub struct OpProfile {
    /// `(op kind, calls, total seconds)`.
    pub rows: Vec<(&'static str, u64, f64)>,
}

impl OpProfile {
    /// The rows as a text table, most expensive first.
    pub fn table(&self) -> String {
        let mut rows = self.rows.clone();
        rows.sort_by(|x, y| y.2.total_cmp(&x.2));
        let total: f64 = rows.iter().map(|r| r.2).sum();
        let mut out = format!("{:<20} {:>8} {:>10} {:>6}\n", "op", "calls", "ms", "%");
        for (k, n, t) in rows {
            out.push_str(&format!(
                "{k:<20} {n:>8} {:>10.2} {:>5.1}%\n",
                t * 1e3,
                100.0 * t / total.max(1e-12)
            ));
        }
        out
    }
}

pub trait Backend: Send {
    fn name(&self) -> &'static str;
    fn pool(&mut self) -> &mut dyn BufferPool;
    fn pool_ref(&self) -> &dyn BufferPool;

    /// Start recording work.
    fn begin(&mut self) -> Result<(), CoreError>;
    /// Record (or, on a synchronous backend, run) node `index` of `graph`.
    fn encode(&mut self, graph: &Graph, index: usize) -> Result<(), CoreError>;
    /// Finish the recorded work and wait for it.
    fn submit(&mut self) -> Result<(), CoreError>;

    /// Validate a freshly built graph against the pool and alias its transients. Call once
    /// per graph before executing it.
    fn prepare(&mut self, graph: &Graph) -> Result<(), CoreError> {
        let pool = self.pool_ref();
        graph.validate(&|id| pool.info(id).map(|(b, l, _)| (b, l)))?;
        let plan = Plan::build(graph, &|id| match pool.info(id) {
            Some((b, _, Lifetime::Transient)) => Some(b),
            _ => None,
        });
        self.pool().commit_plan(&plan)
    }

    /// Run a prepared graph to completion.
    fn execute(&mut self, graph: &Graph) -> Result<(), CoreError> {
        self.begin()?;
        for i in 0..graph.nodes.len() {
            self.encode(graph, i)?;
        }
        self.submit()
    }

    /// Memory read bandwidth of the device in bytes/s, measured now (benchmarks divide
    /// bytes moved per token by this to get the floor).
    fn measure_bandwidth(&mut self) -> Result<f64, CoreError> {
        Err(CoreError::Backend {
            backend: self.name(),
            msg: "bandwidth measurement not implemented".into(),
        })
    }

    fn set_profiling(&mut self, _on: bool) {}
    fn profile(&self) -> OpProfile {
        OpProfile::default()
    }
}
