//! The CPU backend: the reference every other backend is checked against, and a fast
//! path of its own (rayon across rows/heads/experts, inner loops written so the compiler
//! vectorises them).
//!
//! Ops run synchronously inside `encode`; `begin`/`submit` only bracket a step. Weights
//! are borrowed from their memory maps, never copied.

pub mod ops;

use std::time::Instant;

use moeflux_core::backend::OpProfile;
use moeflux_core::{
    Backend, BufferPool, CoreError, ExpertWeights, Graph, Lifetime, Matrix, Op, Plan, RawBufId,
    Vector, WeightBytes,
};

use ops::weights::{MatView, floats};

enum Storage {
    /// Index into `physical`.
    Own(usize),
    Weights(WeightBytes),
}

struct Entry {
    label: String,
    bytes: usize,
    lifetime: Lifetime,
    storage: Storage,
}

/// Host memory pool. Owned buffers are `Vec<f32>` (4-byte aligned for f32/u32 views).
#[derive(Default)]
pub struct CpuPool {
    entries: Vec<Entry>,
    physical: Vec<Vec<f32>>,
}

impl CpuPool {
    fn entry(&self, id: RawBufId) -> Result<&Entry, CoreError> {
        self.entries
            .get(id.0 as usize)
            .ok_or(CoreError::UnknownBuffer(id))
    }

    fn bytes_ptr(&self, id: RawBufId) -> (*const u8, usize) {
        let e = &self.entries[id.0 as usize];
        match &e.storage {
            Storage::Own(p) => (self.physical[*p].as_ptr() as *const u8, e.bytes),
            Storage::Weights(w) => {
                let b = w.bytes();
                (b.as_ptr(), b.len())
            }
        }
    }

    fn new_physical(&mut self, bytes: usize) -> usize {
        self.physical.push(vec![0f32; bytes.div_ceil(4)]);
        self.physical.len() - 1
    }
}

impl BufferPool for CpuPool {
    fn alloc_raw(
        &mut self,
        bytes: usize,
        label: &str,
        lifetime: Lifetime,
    ) -> Result<RawBufId, CoreError> {
        let p = self.new_physical(bytes);
        self.entries.push(Entry {
            label: label.to_string(),
            bytes,
            lifetime,
            storage: Storage::Own(p),
        });
        Ok(RawBufId(self.entries.len() as u32 - 1))
    }

    fn register_weights(&mut self, bytes: WeightBytes, label: &str) -> Result<RawBufId, CoreError> {
        let len = bytes.range.len();
        self.entries.push(Entry {
            label: label.to_string(),
            bytes: len,
            lifetime: Lifetime::Persistent,
            storage: Storage::Weights(bytes),
        });
        Ok(RawBufId(self.entries.len() as u32 - 1))
    }

    fn upload_raw(&mut self, id: RawBufId, off: usize, data: &[u8]) -> Result<(), CoreError> {
        let e = self.entry(id)?;
        let Storage::Own(p) = e.storage else {
            return Err(CoreError::Backend {
                backend: "cpu",
                msg: format!("buffer '{}' holds weights and is read-only", e.label),
            });
        };
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut self.physical[p]);
        dst[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn download_raw(&mut self, id: RawBufId, off: usize, out: &mut [u8]) -> Result<(), CoreError> {
        self.entry(id)?;
        let (ptr, len) = self.bytes_ptr(id);
        // SAFETY: ptr/len describe a live buffer owned by the pool (or its weight owner).
        let src = unsafe { std::slice::from_raw_parts(ptr, len) };
        out.copy_from_slice(&src[off..off + out.len()]);
        Ok(())
    }

    fn zero(&mut self, id: RawBufId) -> Result<(), CoreError> {
        let e = self.entry(id)?;
        if let Storage::Own(p) = e.storage {
            let n = e.bytes.div_ceil(4);
            self.physical[p][..n].fill(0.0);
        }
        Ok(())
    }

    fn info(&self, id: RawBufId) -> Option<(usize, String, Lifetime)> {
        self.entries
            .get(id.0 as usize)
            .map(|e| (e.bytes, e.label.clone(), e.lifetime))
    }

    fn commit_plan(&mut self, plan: &Plan) -> Result<(), CoreError> {
        let base = self.physical.len();
        for &b in &plan.slot_bytes {
            self.new_physical(b);
        }
        for (id, slot) in &plan.slot_of {
            let e = self
                .entries
                .get_mut(id.0 as usize)
                .ok_or(CoreError::UnknownBuffer(*id))?;
            if e.lifetime != Lifetime::Transient {
                return Err(CoreError::Backend {
                    backend: "cpu",
                    msg: format!("plan aliases non-transient buffer '{}'", e.label),
                });
            }
            e.storage = Storage::Own(base + slot);
        }
        // Storage no buffer points at any more is released.
        let mut used = vec![false; self.physical.len()];
        for e in &self.entries {
            if let Storage::Own(p) = e.storage {
                used[p] = true;
            }
        }
        for (p, u) in used.iter().enumerate() {
            if !u {
                self.physical[p] = Vec::new();
            }
        }
        Ok(())
    }

    fn reset_transient(&mut self) {
        for e in &mut self.entries {
            if e.lifetime != Lifetime::Persistent {
                e.bytes = 0;
                e.label.push_str(" (released)");
                e.storage = Storage::Own(usize::MAX);
            }
        }
        let keep: Vec<bool> = {
            let mut used = vec![false; self.physical.len()];
            for e in &self.entries {
                if let Storage::Own(p) = e.storage
                    && p != usize::MAX
                {
                    used[p] = true;
                }
            }
            used
        };
        for (p, k) in keep.iter().enumerate() {
            if !k {
                self.physical[p] = Vec::new();
            }
        }
        // Released entries point at an empty buffer so stale ids fail size checks.
        let empty = self.new_physical(0);
        for e in &mut self.entries {
            if let Storage::Own(p) = &mut e.storage
                && *p == usize::MAX
            {
                *p = empty;
            }
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.physical.iter().map(|p| p.len() * 4).sum()
    }
}

pub struct CpuBackend {
    pool: CpuPool,
    profiling: bool,
    profile: Vec<(&'static str, u64, f64)>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend {
            pool: CpuPool::default(),
            profiling: false,
            profile: Vec::new(),
        }
    }

    // The accessors below hand out slices of pool storage for one op. Soundness rests on
    // two invariants: `Graph::validate` proved every access in bounds before the graph
    // ran, and the planner never gives an op's inputs and outputs the same storage unless
    // they are the same id (which the op code handles explicitly).
    fn f32s(&self, id: RawBufId, len: usize) -> &[f32] {
        let (p, bytes) = self.pool.bytes_ptr(id);
        debug_assert!(len * 4 <= bytes);
        // SAFETY: see above; owned buffers are Vec<f32> (aligned).
        unsafe { std::slice::from_raw_parts(p as *const f32, len) }
    }

    #[allow(clippy::mut_from_ref)]
    fn f32s_mut(&self, id: RawBufId, len: usize) -> &mut [f32] {
        let (p, bytes) = self.pool.bytes_ptr(id);
        assert!(
            matches!(self.pool.entries[id.0 as usize].storage, Storage::Own(_)),
            "write to weights"
        );
        debug_assert!(len * 4 <= bytes);
        // SAFETY: see above.
        unsafe { std::slice::from_raw_parts_mut(p as *mut f32, len) }
    }

    fn u32s(&self, id: RawBufId, len: usize) -> &[u32] {
        bytemuck::cast_slice(self.f32s(id, len))
    }

    #[allow(clippy::mut_from_ref)]
    fn u32s_mut(&self, id: RawBufId, len: usize) -> &mut [u32] {
        bytemuck::cast_slice_mut(self.f32s_mut(id, len))
    }

    fn weight_bytes(&self, buf: RawBufId, offset: usize) -> &[u8] {
        let (p, len) = self.pool.bytes_ptr(buf);
        // SAFETY: the pool keeps the buffer alive for `&self`.
        let all = unsafe { std::slice::from_raw_parts(p, len) };
        &all[offset..]
    }

    pub fn mat(&self, m: &Matrix) -> MatView<'_> {
        let region = |r: Option<moeflux_core::Region>| {
            r.map(|r| self.weight_bytes(r.buf.raw(), r.offset))
                .unwrap_or(&[])
        };
        MatView {
            data: self.weight_bytes(m.data.buf.raw(), m.data.offset),
            scales: region(m.scales),
            biases: region(m.biases),
            rows: m.rows,
            cols: m.cols,
            format: m.format,
        }
    }

    fn vector(&self, v: &Vector) -> std::borrow::Cow<'_, [f32]> {
        floats(
            self.weight_bytes(v.data.buf.raw(), v.data.offset),
            v.dtype,
            v.len,
        )
    }

    fn run(&self, op: &Op) -> Result<(), CoreError> {
        use ops::*;
        match op {
            Op::Embed {
                table,
                tokens,
                out,
                n,
            } => {
                embed::embed(
                    &self.mat(table),
                    self.u32s(tokens.raw(), *n),
                    self.f32s_mut(out.raw(), n * table.cols),
                );
            }
            Op::RmsNorm {
                x,
                weight,
                out,
                rows,
                dim,
                eps,
                offset,
            } => {
                let w = self.vector(weight);
                let len = rows * dim;
                if x == out {
                    let tmp = self.f32s(x.raw(), len).to_vec();
                    rms_norm::rms_norm(
                        &tmp,
                        &w,
                        self.f32s_mut(out.raw(), len),
                        *dim,
                        *eps,
                        *offset,
                    );
                } else {
                    rms_norm::rms_norm(
                        self.f32s(x.raw(), len),
                        &w,
                        self.f32s_mut(out.raw(), len),
                        *dim,
                        *eps,
                        *offset,
                    );
                }
            }
            Op::GatedRmsNorm {
                x,
                gate,
                weight,
                out,
                rows,
                dim,
                eps,
                offset,
            } => {
                let w = self.vector(weight);
                let len = rows * dim;
                let xs = self.f32s(x.raw(), len).to_vec();
                rms_norm::gated_rms_norm(
                    &xs,
                    self.f32s(gate.raw(), len),
                    &w,
                    self.f32s_mut(out.raw(), len),
                    *dim,
                    *eps,
                    *offset,
                );
            }
            Op::Matmul { x, w, out, n } => {
                matmul::matmul(
                    self.f32s(x.raw(), n * w.cols),
                    *n,
                    &self.mat(w),
                    self.f32s_mut(out.raw(), n * w.rows),
                );
            }
            Op::CopyRows {
                x,
                out,
                start,
                rows,
                width,
            } => {
                let src = &self.f32s(x.raw(), (start + rows) * width)[start * width..];
                self.f32s_mut(out.raw(), rows * width)
                    .copy_from_slice(&src[..rows * width]);
            }
            Op::Add { a, b, out, len } => {
                if out == a {
                    elementwise::add_into(self.f32s_mut(out.raw(), *len), self.f32s(b.raw(), *len));
                } else if out == b {
                    elementwise::add_into(self.f32s_mut(out.raw(), *len), self.f32s(a.raw(), *len));
                } else {
                    elementwise::add(
                        self.f32s(a.raw(), *len),
                        self.f32s(b.raw(), *len),
                        self.f32s_mut(out.raw(), *len),
                    );
                }
            }
            Op::SwiGlu { gate, up, out, len } => {
                let g = self.f32s(gate.raw(), *len).to_vec();
                let u = self.f32s(up.raw(), *len).to_vec();
                elementwise::swiglu(&g, &u, self.f32s_mut(out.raw(), *len));
            }
            Op::SigmoidGate {
                x,
                gate,
                out,
                n,
                width,
                gate_width,
            } => {
                let o = self.f32s_mut(out.raw(), n * width);
                let g = self.f32s(gate.raw(), n * gate_width);
                if x == out {
                    elementwise::sigmoid_gate(None, g, o, *width, *gate_width);
                } else {
                    elementwise::sigmoid_gate(
                        Some(self.f32s(x.raw(), n * width)),
                        g,
                        o,
                        *width,
                        *gate_width,
                    );
                }
            }
            Op::ScatterCols {
                x,
                n,
                groups,
                parts,
            } => {
                let row: usize = parts.iter().map(|p| p.width).sum::<usize>() * groups;
                let src = self.f32s(x.raw(), n * row);
                let mut outs: Vec<&mut [f32]> = parts
                    .iter()
                    .map(|p| self.f32s_mut(p.out.raw(), n * p.out_width))
                    .collect();
                elementwise::scatter_cols(src, *n, *groups, parts, &mut outs);
            }
            Op::Rope {
                x,
                pos,
                n,
                heads,
                head_dim,
                rotary_dim,
                theta,
            } => {
                rope::rope(
                    self.f32s_mut(x.raw(), n * heads * head_dim),
                    self.u32s(pos.raw(), *n),
                    *heads,
                    *head_dim,
                    *rotary_dim,
                    *theta,
                );
            }
            Op::KvAppend {
                k,
                v,
                pos,
                k_cache,
                v_cache,
                n,
                kv_dim,
                max_ctx,
            } => {
                attention::kv_append(
                    self.f32s(k.raw(), n * kv_dim),
                    self.f32s(v.raw(), n * kv_dim),
                    self.u32s(pos.raw(), *n),
                    self.f32s_mut(k_cache.raw(), max_ctx * kv_dim),
                    self.f32s_mut(v_cache.raw(), max_ctx * kv_dim),
                    *kv_dim,
                );
            }
            Op::Attention {
                q,
                pos,
                k_cache,
                v_cache,
                out,
                n,
                heads,
                kv_heads,
                head_dim,
                scale,
                max_ctx,
            } => {
                let kv = max_ctx * kv_heads * head_dim;
                attention::attention(
                    self.f32s(q.raw(), n * heads * head_dim),
                    self.u32s(pos.raw(), *n),
                    self.f32s(k_cache.raw(), kv),
                    self.f32s(v_cache.raw(), kv),
                    self.f32s_mut(out.raw(), n * heads * head_dim),
                    &attention::AttnShape {
                        heads: *heads,
                        kv_heads: *kv_heads,
                        head_dim: *head_dim,
                        scale: *scale,
                    },
                );
            }
            Op::Conv1dSilu {
                x,
                state,
                weight,
                out,
                n,
                channels,
                kernel,
            } => {
                let w = self.vector(weight);
                conv1d::conv1d_silu(
                    self.f32s(x.raw(), n * channels),
                    self.f32s_mut(state.raw(), (kernel - 1) * channels),
                    &w,
                    self.f32s_mut(out.raw(), n * channels),
                    *n,
                    *channels,
                    *kernel,
                );
            }
            Op::GatedDelta {
                qkv,
                a,
                b,
                a_log,
                dt_bias,
                state,
                out,
                n,
                k_heads,
                v_heads,
                dk,
                dv,
            } => {
                let s = gated_delta::DeltaShape {
                    k_heads: *k_heads,
                    v_heads: *v_heads,
                    dk: *dk,
                    dv: *dv,
                };
                let run = if *n > 1 {
                    gated_delta::gated_delta_chunked
                } else {
                    gated_delta::gated_delta
                };
                run(
                    self.f32s(qkv.raw(), n * (2 * k_heads * dk + v_heads * dv)),
                    self.f32s(a.raw(), n * v_heads),
                    self.f32s(b.raw(), n * v_heads),
                    &self.vector(a_log),
                    &self.vector(dt_bias),
                    self.f32s_mut(state.raw(), v_heads * dk * dv),
                    self.f32s_mut(out.raw(), n * v_heads * dv),
                    *n,
                    &s,
                );
            }
            Op::RouterTopK {
                logits,
                idx,
                weights,
                n,
                experts,
                k,
                renorm,
                shared_gate,
            } => {
                let width = k + shared_gate.is_some() as usize;
                moe::router_topk(
                    self.f32s(logits.raw(), n * experts),
                    shared_gate.map(|g| self.f32s(g.raw(), *n)),
                    self.u32s_mut(idx.raw(), n * width),
                    self.f32s_mut(weights.raw(), n * width),
                    *experts,
                    *k,
                    *renorm,
                );
            }
            Op::MoeExpertsStreamed {
                x,
                idx,
                weights,
                store,
                layer,
                out,
                n,
                k,
                hidden,
                inter,
            } => {
                moe_streamed::moe_experts_streamed(
                    self.f32s(x.raw(), n * hidden),
                    self.u32s(idx.raw(), n * k),
                    self.f32s(weights.raw(), n * k),
                    store.as_ref(),
                    *layer,
                    self.f32s_mut(out.raw(), n * hidden),
                    *n,
                    *k,
                    *hidden,
                    *inter,
                )?;
            }
            Op::MoeExperts {
                x,
                idx,
                weights,
                experts,
                out,
                n,
                k,
                hidden,
                inter,
            } => {
                moe::moe_experts(
                    self.f32s(x.raw(), n * hidden),
                    self.u32s(idx.raw(), n * k),
                    self.f32s(weights.raw(), n * k),
                    experts,
                    self,
                    self.f32s_mut(out.raw(), n * hidden),
                    *n,
                    *k,
                    *hidden,
                    *inter,
                );
            }
        }
        Ok(())
    }
}

impl ops::moe::ExpertViews for CpuBackend {
    fn views(&self, e: &ExpertWeights) -> [MatView<'_>; 3] {
        [self.mat(&e.gate), self.mat(&e.up), self.mat(&e.down)]
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn pool(&mut self) -> &mut dyn BufferPool {
        &mut self.pool
    }
    fn pool_ref(&self) -> &dyn BufferPool {
        &self.pool
    }
    fn begin(&mut self) -> Result<(), CoreError> {
        Ok(())
    }
    fn encode(&mut self, graph: &Graph, index: usize) -> Result<(), CoreError> {
        let op = &graph.nodes[index].1;
        if self.profiling {
            let t = Instant::now();
            self.run(op)?;
            let dt = t.elapsed().as_secs_f64();
            let kind = op.kind();
            match self.profile.iter_mut().find(|r| r.0 == kind) {
                Some(r) => {
                    r.1 += 1;
                    r.2 += dt;
                }
                None => self.profile.push((kind, 1, dt)),
            }
        } else {
            self.run(op)?;
        }
        Ok(())
    }
    fn submit(&mut self) -> Result<(), CoreError> {
        Ok(())
    }
    /// Best of five parallel sums over 1 GiB (every rayon thread reads its share), the
    /// same measurement as a 2-thread STREAM-style sum.
    fn measure_bandwidth(&mut self) -> Result<f64, CoreError> {
        use rayon::prelude::*;
        let v = vec![1.0f32; 1 << 28];
        let mut best = 0f64;
        for _ in 0..5 {
            let t = Instant::now();
            // 16 independent lanes so the sum is bound by memory, not by add latency.
            let s: f32 = v
                .par_chunks(1 << 16)
                .map(|c| {
                    let mut acc = [0f32; 16];
                    for x in c.chunks_exact(16) {
                        for j in 0..16 {
                            acc[j] += x[j];
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum();
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(s);
            best = best.max((v.len() * 4) as f64 / dt);
        }
        Ok(best)
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
