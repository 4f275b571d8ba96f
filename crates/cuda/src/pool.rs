//! Device memory pool: one `cuMemAlloc` per physical allocation, labelled entries on top.
//!
//! Same semantics as the CPU pool (see `moeflux_core::backend`): allocations are zeroed,
//! `commit_plan` points planned transients at shared slots, `reset_transient` releases
//! transients and externals (their ids then have size 0, so a stale id fails validation).
//! Differences that matter on a GPU:
//! * Transient buffers get storage lazily: a plan usually aliases them right after the graph is
//!   built, so allocating each one first would only churn the allocator. A transient that is
//!   never planned (read before written) gets its own zeroed storage at first use.
//! * Registered weights are copied to device memory once and are read-only afterwards.
//! * Before storage is freed or re-pointed the stream is synchronised, so no queued kernel can
//!   touch memory that changed hands.

use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, cudaError_enum};
use cudarc::driver::{CudaContext, CudaStream, result as drv};
use moeflux_core::{BufferPool, CoreError, Lifetime, Plan, RawBufId, WeightBytes};

use crate::error::CudaError;

/// One device allocation, freed on drop.
pub(crate) struct DevMem {
    pub ptr: CUdeviceptr,
    pub bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DevMem {
    /// Zeroed device memory (enqueued on `stream`).
    pub fn zeroed(
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        bytes: usize,
        label: &str,
    ) -> Result<DevMem, CudaError> {
        if bytes == 0 {
            return Ok(DevMem {
                ptr: 0,
                bytes: 0,
                ctx: ctx.clone(),
            });
        }
        ctx.bind_to_thread()
            .map_err(CudaError::driver("binding the context"))?;
        // SAFETY: plain allocation; the pointer is owned by the returned DevMem and freed once.
        let ptr = match unsafe { drv::malloc_sync(bytes) } {
            Ok(p) => p,
            Err(e) if e.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => {
                let (free, total) = drv::mem_get_info().unwrap_or((0, 0));
                return Err(CudaError::OutOfMemory {
                    label: label.to_string(),
                    bytes,
                    free,
                    total,
                });
            }
            Err(e) => {
                return Err(CudaError::driver(format!(
                    "cuMemAlloc of {bytes} bytes for '{label}'"
                ))(e));
            }
        };
        let mem = DevMem {
            ptr,
            bytes,
            ctx: ctx.clone(),
        };
        // SAFETY: ptr..ptr+bytes was just allocated.
        unsafe { drv::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }
            .map_err(CudaError::driver(format!("zeroing '{label}'")))?;
        Ok(mem)
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: allocated by malloc_sync and freed only here; callers synchronise the
            // stream before dropping storage that queued work may still use.
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// Transient without storage yet.
    Pending,
    /// Index into `physical`.
    Own(usize),
    /// Dropped by `reset_transient`.
    Released,
}

struct Entry {
    label: String,
    bytes: usize,
    lifetime: Lifetime,
    storage: Storage,
    weights: bool,
}

pub struct CudaPool {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    entries: Vec<Entry>,
    physical: Vec<Option<DevMem>>,
    /// Bumped whenever an existing buffer id may change address (a plan committed, transients
    /// released, a pending transient given storage): captured CUDA graphs bake addresses in
    /// and are re-captured when this moves.
    generation: u64,
}

impl CudaPool {
    pub(crate) fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Self {
        CudaPool {
            ctx,
            stream,
            entries: Vec::new(),
            physical: Vec::new(),
            generation: 0,
        }
    }

    /// See the `generation` field.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    fn entry(&self, id: RawBufId) -> Result<&Entry, CudaError> {
        self.entries
            .get(id.0 as usize)
            .ok_or_else(|| CudaError::Buffer {
                label: format!("{id:?}"),
                msg: "unknown buffer id".into(),
            })
    }

    fn new_physical(&mut self, bytes: usize, label: &str) -> Result<usize, CudaError> {
        let mem = DevMem::zeroed(&self.ctx, &self.stream, bytes, label)?;
        self.physical.push(Some(mem));
        Ok(self.physical.len() - 1)
    }

    /// Device address of buffer `id`, giving a pending transient its storage.
    pub(crate) fn ptr(&mut self, id: RawBufId) -> Result<CUdeviceptr, CudaError> {
        let e = self.entry(id)?;
        match e.storage {
            Storage::Own(p) => Ok(self.physical[p].as_ref().map(|m| m.ptr).unwrap_or(0)),
            Storage::Pending => {
                let (bytes, label) = (e.bytes, e.label.clone());
                let p = self.new_physical(bytes, &label)?;
                self.entries[id.0 as usize].storage = Storage::Own(p);
                self.generation += 1;
                Ok(self.physical[p].as_ref().map(|m| m.ptr).unwrap_or(0))
            }
            Storage::Released => Err(CudaError::Buffer {
                label: e.label.clone(),
                msg: "used after reset_transient released it".into(),
            }),
        }
    }

    fn sync(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("synchronising the stream"))
    }

    /// Drops physical storage no entry points at any more.
    fn release_unused(&mut self) {
        let mut used = vec![false; self.physical.len()];
        for e in &self.entries {
            if let Storage::Own(p) = e.storage {
                used[p] = true;
            }
        }
        for (p, u) in used.iter().enumerate() {
            if !u {
                self.physical[p] = None;
            }
        }
    }

    fn try_commit(&mut self, plan: &Plan) -> Result<(), CudaError> {
        for id in plan.slot_of.keys() {
            let e = self.entry(*id)?;
            if e.lifetime != Lifetime::Transient {
                return Err(CudaError::Buffer {
                    label: e.label.clone(),
                    msg: "a plan aliases this non-transient buffer".into(),
                });
            }
        }
        self.sync()?;
        self.generation += 1;
        let mut slots = Vec::with_capacity(plan.slot_bytes.len());
        for (s, &b) in plan.slot_bytes.iter().enumerate() {
            slots.push(self.new_physical(b, &format!("plan slot {s}"))?);
        }
        for (id, slot) in &plan.slot_of {
            self.entries[id.0 as usize].storage = Storage::Own(slots[*slot]);
        }
        self.release_unused();
        Ok(())
    }
}

impl BufferPool for CudaPool {
    fn alloc_raw(
        &mut self,
        bytes: usize,
        label: &str,
        lifetime: Lifetime,
    ) -> Result<RawBufId, CoreError> {
        let storage = if lifetime == Lifetime::Transient {
            Storage::Pending
        } else {
            Storage::Own(self.new_physical(bytes, label)?)
        };
        self.entries.push(Entry {
            label: label.to_string(),
            bytes,
            lifetime,
            storage,
            weights: false,
        });
        Ok(RawBufId(self.entries.len() as u32 - 1))
    }

    fn register_weights(&mut self, bytes: WeightBytes, label: &str) -> Result<RawBufId, CoreError> {
        let host = bytes.bytes();
        let p = self.new_physical(host.len(), label)?;
        if let Some(mem) = &self.physical[p] {
            // Ordered after the zeroing memset on the same stream; synchronous, so the host
            // bytes need not outlive the call.
            // SAFETY: mem holds host.len() bytes.
            unsafe { drv::memcpy_htod_async(mem.ptr, host, self.stream.cu_stream()) }
                .map_err(CudaError::driver(format!("uploading weights '{label}'")))?;
            self.sync()?;
        }
        self.entries.push(Entry {
            label: label.to_string(),
            bytes: host.len(),
            lifetime: Lifetime::Persistent,
            storage: Storage::Own(p),
            weights: true,
        });
        Ok(RawBufId(self.entries.len() as u32 - 1))
    }

    fn upload_raw(&mut self, id: RawBufId, off: usize, data: &[u8]) -> Result<(), CoreError> {
        let e = self.entry(id)?;
        if e.weights {
            return Err(CudaError::Buffer {
                label: e.label.clone(),
                msg: "holds weights and is read-only".into(),
            }
            .into());
        }
        if off + data.len() > e.bytes {
            return Err(CoreError::SizeMismatch {
                label: e.label.clone(),
                id,
                capacity: e.bytes,
                requested: off + data.len(),
                what: "uploaded",
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        let label = e.label.clone();
        let ptr = self.ptr(id)?;
        // Pageable host memory: the call returns once `data` is staged, so it may be dropped
        // right after; the copy itself is ordered on the stream.
        // SAFETY: the range was checked against the buffer size above.
        unsafe { drv::memcpy_htod_async(ptr + off as u64, data, self.stream.cu_stream()) }
            .map_err(CudaError::driver(format!("uploading to '{label}'")))?;
        Ok(())
    }

    fn download_raw(&mut self, id: RawBufId, off: usize, out: &mut [u8]) -> Result<(), CoreError> {
        let e = self.entry(id)?;
        if off + out.len() > e.bytes {
            return Err(CoreError::SizeMismatch {
                label: e.label.clone(),
                id,
                capacity: e.bytes,
                requested: off + out.len(),
                what: "downloaded",
            });
        }
        if out.is_empty() {
            return Ok(());
        }
        let label = e.label.clone();
        let ptr = self.ptr(id)?;
        // SAFETY: range checked above; the stream is synchronised before `out` is used.
        unsafe { drv::memcpy_dtoh_async(out, ptr + off as u64, self.stream.cu_stream()) }
            .map_err(CudaError::driver(format!("downloading '{label}'")))?;
        self.sync()?;
        Ok(())
    }

    fn zero(&mut self, id: RawBufId) -> Result<(), CoreError> {
        let e = self.entry(id)?;
        if e.weights {
            return Err(CudaError::Buffer {
                label: e.label.clone(),
                msg: "holds weights and is read-only".into(),
            }
            .into());
        }
        let (bytes, label) = (e.bytes, e.label.clone());
        if bytes == 0 {
            return Ok(());
        }
        let ptr = self.ptr(id)?;
        // SAFETY: ptr holds `bytes` bytes.
        unsafe { drv::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(CudaError::driver(format!("zeroing '{label}'")))?;
        Ok(())
    }

    fn info(&self, id: RawBufId) -> Option<(usize, String, Lifetime)> {
        self.entries
            .get(id.0 as usize)
            .map(|e| (e.bytes, e.label.clone(), e.lifetime))
    }

    fn commit_plan(&mut self, plan: &Plan) -> Result<(), CoreError> {
        Ok(self.try_commit(plan)?)
    }

    fn reset_transient(&mut self) {
        // Errors here would surface at the next use of the stream.
        let _ = self.sync();
        self.generation += 1;
        for e in &mut self.entries {
            if e.lifetime != Lifetime::Persistent {
                e.bytes = 0;
                e.label.push_str(" (released)");
                e.storage = Storage::Released;
            }
        }
        self.release_unused();
    }

    fn allocated_bytes(&self) -> usize {
        self.physical.iter().flatten().map(|m| m.bytes).sum()
    }
}
