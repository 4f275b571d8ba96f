//! The op IR: one enum variant per op, typed fields, and the graph as a dispatch list.
//!
//! Conventions shared by every backend:
//! * Activations are f32, row-major `[n, width]` where `n` is the number of tokens in the
//!   batch. Weights keep their stored dtype or packing ([`WeightFormat`]).
//! * Positions come from a [`Pos`] buffer (one absolute position per token) so a graph
//!   built once for a batch width can be replayed at any point of a sequence.
//! * Every op declares each buffer it touches and how many bytes it needs there
//!   ([`Op::for_each_access`]); [`Graph::validate`] checks those against the pool
//!   before a backend launches anything, so kernels may assume in-bounds access.

use std::sync::Arc;

use crate::buf::{Act, BufId, Cache, Idx, Pos, RawBufId, State, Tokens, Weight};
use crate::dtype::{DType, WeightFormat};
use crate::planner::Access;

/// A byte offset into a weight buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub buf: BufId<Weight>,
    pub offset: usize,
}

/// A weight matrix `[rows, cols]` (rows = output features, cols = input features).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matrix {
    pub data: Region,
    /// Present iff `format` is affine-quantized.
    pub scales: Option<Region>,
    pub biases: Option<Region>,
    pub rows: usize,
    pub cols: usize,
    pub format: WeightFormat,
}

impl Matrix {
    /// Bytes of weight data read to use the matrix once (data + scales + biases).
    pub fn bytes(&self) -> usize {
        self.format.total_bytes(self.rows, self.cols)
    }
}

/// A stored weight vector (norm weights, per-head parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vector {
    pub data: Region,
    pub len: usize,
    pub dtype: DType,
}

/// The three matrices of one SwiGLU expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertWeights {
    /// `[inter, hidden]`
    pub gate: Matrix,
    /// `[inter, hidden]`
    pub up: Matrix,
    /// `[hidden, inter]`
    pub down: Matrix,
}

impl ExpertWeights {
    /// For a layout inside one expert record (offsets relative to the record): the name of
    /// the first matrix whose data, scales or biases end past `record` bytes, if any.
    pub fn outside_record(&self, record: usize) -> Option<&'static str> {
        [("gate", &self.gate), ("up", &self.up), ("down", &self.down)]
            .into_iter()
            .find(|(_, m)| {
                let end = m.data.offset + m.format.data_bytes(m.rows, m.cols);
                let send = [m.scales, m.biases]
                    .iter()
                    .flatten()
                    .map(|r| r.offset + m.format.scale_bytes(m.rows, m.cols))
                    .max()
                    .unwrap_or(0);
                end.max(send) > record
            })
            .map(|(what, _)| what)
    }
}

/// Expert weights that live outside device memory (a packed file behind a cache) and are
/// fetched when the router picks them. Every expert of a layer has the same layout.
pub trait ExpertProvider: Send + Sync + std::fmt::Debug {
    /// Where gate, up and down sit inside one expert record (offsets relative to the
    /// record; the `buf` fields of the regions are meaningless).
    fn layout(&self) -> ExpertWeights;
    /// Bytes of one expert record.
    fn record_bytes(&self) -> usize;
    /// How many records may be held at once (the cache budget), at least 1.
    fn max_in_flight(&self) -> usize;
    /// The record of `expert` in `layer`, from cache or storage.
    fn fetch(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<Arc<dyn AsRef<[u8]> + Send + Sync>, crate::CoreError>;
    /// Called once a layer's experts for the current step are known: lets the provider
    /// record the set and start fetching what the next layer is likely to need.
    fn layer_routed(&self, _layer: usize, _experts: &[usize]) {}
    /// The record of `expert` in `layer` if it is in host memory now, without waiting for
    /// storage (`None`: not cached, or the provider cannot tell). Used for device prefetch,
    /// which must not stall the compute thread on a disk read.
    fn fetch_cached(&self, _layer: usize, _expert: usize) -> Option<crate::SharedBytes> {
        None
    }
    /// The layer after `layer` and the experts it used on its latest step: the prediction
    /// of what it needs next (`None`: no prediction yet).
    fn predicted_next(&self, _layer: usize) -> Option<(usize, Vec<usize>)> {
        None
    }
    /// Records in the whole store (every layer), when known: caps device caches.
    fn total_records(&self) -> Option<usize> {
        None
    }
    /// Experts of each layer, when known: a device backend with room for every expert of a
    /// layer may then keep that layer resident ("pinned") and route it on the device.
    fn experts_per_layer(&self) -> Option<usize> {
        None
    }
    /// Whether [`remap_routing`](Self::remap_routing) changes routing (then every layer's
    /// routing must pass through the host, and none may be pinned).
    fn remaps_routing(&self) -> bool {
        false
    }
    /// The host memory every record returned by `fetch` lies in, as (address, bytes), when
    /// it is one fixed range for the provider's lifetime: a device backend may page-lock it
    /// once (`cuMemHostRegister`) so copies from it are DMA. Records outside it are allowed.
    fn host_slab(&self) -> Option<(usize, usize)> {
        None
    }
    /// Benchmarks only: rewrites the routed expert indices of one step of `layer` (`k` per
    /// token, distinct within a token) before they are used, to imitate the temporal
    /// locality of real routers on random weights. Changes the model's outputs.
    fn remap_routing(&self, _layer: usize, _k: usize, _idx: &mut [u32]) {}
    /// A backend's counters for the tiers it owns (device cache, CPU-computed misses),
    /// added to the provider's statistics.
    fn add_device_stats(&self, _delta: &DeviceTierStats) {}
}

/// Counters of the tiers a device backend keeps in front of an [`ExpertProvider`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceTierStats {
    /// Routed experts found in the device cache.
    pub vram_hits: u64,
    /// Routed experts copied host -> device for the step that needs them.
    pub vram_misses: u64,
    /// Missed experts computed on the CPU from the host record instead of copied.
    pub cpu_computed: u64,
    /// Bytes copied host -> device (misses and prefetches).
    pub h2d_bytes: u64,
    /// Records copied into the device cache ahead of need.
    pub prefetched: u64,
    /// Of those, records used before being evicted.
    pub prefetch_used: u64,
    /// (token, expert) pairs run on layers whose experts are all kept in VRAM (pinned),
    /// routed on the device without a host round-trip.
    pub pinned_pairs: u64,
}

impl DeviceTierStats {
    pub fn add(&mut self, o: &DeviceTierStats) {
        self.vram_hits += o.vram_hits;
        self.vram_misses += o.vram_misses;
        self.cpu_computed += o.cpu_computed;
        self.h2d_bytes += o.h2d_bytes;
        self.prefetched += o.prefetched;
        self.prefetch_used += o.prefetch_used;
        self.pinned_pairs += o.pinned_pairs;
    }

    /// Counters accumulated since `before` (a copy taken earlier).
    pub fn since(&self, before: &DeviceTierStats) -> DeviceTierStats {
        DeviceTierStats {
            vram_hits: self.vram_hits - before.vram_hits,
            vram_misses: self.vram_misses - before.vram_misses,
            cpu_computed: self.cpu_computed - before.cpu_computed,
            h2d_bytes: self.h2d_bytes - before.h2d_bytes,
            prefetched: self.prefetched - before.prefetched,
            prefetch_used: self.prefetch_used - before.prefetch_used,
            pinned_pairs: self.pinned_pairs - before.pinned_pairs,
        }
    }
}

/// One destination of [`Op::ScatterCols`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColPart {
    pub out: BufId<Act>,
    /// Columns this part takes from each source group.
    pub width: usize,
    /// Row width of `out`.
    pub out_width: usize,
    /// Column in `out` where group 0 of this part lands; group g lands at
    /// `out_offset + g * width`.
    pub out_offset: usize,
}

#[derive(Clone, Debug)]
pub enum Op {
    /// `out[i] = table[tokens[i]]` (dequantized to f32).
    Embed {
        table: Matrix,
        tokens: BufId<Tokens>,
        out: BufId<Act>,
        n: usize,
    },
    /// `out = x / rms(x) * (weight + offset)` over `rows` rows of `dim` (per-head norms use
    /// `rows = n * heads`). `offset` is 1 for checkpoints that store `w - 1`.
    RmsNorm {
        x: BufId<Act>,
        weight: Vector,
        out: BufId<Act>,
        rows: usize,
        dim: usize,
        eps: f32,
        offset: f32,
    },
    /// `out = x / rms(x) * (weight + offset) * silu(gate)`, rows of `dim`.
    GatedRmsNorm {
        x: BufId<Act>,
        gate: BufId<Act>,
        weight: Vector,
        out: BufId<Act>,
        rows: usize,
        dim: usize,
        eps: f32,
        offset: f32,
    },
    /// `out[n, w.rows] = x[n, w.cols] @ w^T`.
    Matmul {
        x: BufId<Act>,
        w: Matrix,
        out: BufId<Act>,
        n: usize,
    },
    /// `out[0..rows] = x[start..start + rows]` for rows of `width` floats.
    CopyRows {
        x: BufId<Act>,
        out: BufId<Act>,
        start: usize,
        rows: usize,
        width: usize,
    },
    /// `out = a + b` elementwise over `len` floats (`out` may alias `a` or `b`).
    Add {
        a: BufId<Act>,
        b: BufId<Act>,
        out: BufId<Act>,
        len: usize,
    },
    /// `out = silu(gate) * up` over `len` floats.
    SwiGlu {
        gate: BufId<Act>,
        up: BufId<Act>,
        out: BufId<Act>,
        len: usize,
    },
    /// `out[i, j] = x[i, j] * sigmoid(gate[i, j * gate_width / width])`: `gate_width` is
    /// `width` (elementwise gate) or 1 (one scalar gate per row).
    SigmoidGate {
        x: BufId<Act>,
        gate: BufId<Act>,
        out: BufId<Act>,
        n: usize,
        width: usize,
        gate_width: usize,
    },
    /// Splits each row of `x` (`groups` repetitions of the parts' widths, in order) into
    /// the parts' outputs. Covers head-interleaved projections and plain column splits.
    ScatterCols {
        x: BufId<Act>,
        n: usize,
        groups: usize,
        parts: Vec<ColPart>,
    },
    /// NeoX-style rotary embedding on the first `rotary_dim` dims of each head, in place.
    Rope {
        x: BufId<Act>,
        pos: BufId<Pos>,
        n: usize,
        heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
    },
    /// Writes `k`, `v` rows `[n, kv_dim]` into the caches at rows `pos[i]`.
    KvAppend {
        k: BufId<Act>,
        v: BufId<Act>,
        pos: BufId<Pos>,
        k_cache: BufId<Cache>,
        v_cache: BufId<Cache>,
        n: usize,
        kv_dim: usize,
        max_ctx: usize,
    },
    /// Causal attention with GQA: query `i` attends cache rows `0..=pos[i]`.
    /// `q`/`out` are `[n, heads * head_dim]`.
    Attention {
        q: BufId<Act>,
        pos: BufId<Pos>,
        k_cache: BufId<Cache>,
        v_cache: BufId<Cache>,
        out: BufId<Act>,
        n: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        max_ctx: usize,
    },
    /// Depthwise causal conv1d over time followed by SiLU; `state` holds the previous
    /// `kernel - 1` input rows and is updated. `weight` is `[channels, kernel]`.
    Conv1dSilu {
        x: BufId<Act>,
        state: BufId<State>,
        weight: Vector,
        out: BufId<Act>,
        n: usize,
        channels: usize,
        kernel: usize,
    },
    /// Gated delta rule (Gated DeltaNet core). `qkv` rows are `[q (k_heads*dk) | k | v
    /// (v_heads*dv)]`; `a`, `b` rows are `[v_heads]`. Inside: l2-norm of q and k, q scaled
    /// by `dk^-0.5`, `beta = sigmoid(b)`, `g = -exp(a_log) * softplus(a + dt_bias)`; value
    /// head h reads key head `h / (v_heads / k_heads)`. `state` is `[v_heads, dk, dv]`.
    GatedDelta {
        qkv: BufId<Act>,
        a: BufId<Act>,
        b: BufId<Act>,
        a_log: Vector,
        dt_bias: Vector,
        state: BufId<State>,
        out: BufId<Act>,
        n: usize,
        k_heads: usize,
        v_heads: usize,
        dk: usize,
        dv: usize,
    },
    /// Softmax over `experts` router logits, top-`k` (ties: lower index), optionally
    /// renormalised to sum 1. Writes `idx[n, k]` and `weights[n, k]`.
    /// With `shared_gate` (one logit per token), a shared expert rides along as slot `k`:
    /// rows of `idx` / `weights` are `k + 1` wide and slot `k` is expert `experts` (one past
    /// the routed ones) with weight `sigmoid(shared_gate[t])`, so one [`Op::MoeExperts`] over
    /// the routed experts plus the shared one computes the whole block.
    RouterTopK {
        logits: BufId<Act>,
        idx: BufId<Idx>,
        weights: BufId<Act>,
        n: usize,
        experts: usize,
        k: usize,
        renorm: bool,
        shared_gate: Option<BufId<Act>>,
    },
    /// [`Op::MoeExperts`] with the experts fetched through a provider (tiered storage).
    MoeExpertsStreamed {
        x: BufId<Act>,
        idx: BufId<Idx>,
        weights: BufId<Act>,
        store: Arc<dyn ExpertProvider>,
        layer: usize,
        out: BufId<Act>,
        n: usize,
        k: usize,
        hidden: usize,
        inter: usize,
    },
    /// `out[i] = sum_j weights[i, j] * down_e(silu(gate_e x_i) * up_e x_i)`, `e = idx[i, j]`.
    MoeExperts {
        x: BufId<Act>,
        idx: BufId<Idx>,
        weights: BufId<Act>,
        experts: Arc<[ExpertWeights]>,
        out: BufId<Act>,
        n: usize,
        k: usize,
        hidden: usize,
        inter: usize,
    },
}

fn mat_access(m: &Matrix, f: &mut dyn FnMut(RawBufId, Access, usize)) {
    let data = m.format.data_bytes(m.rows, m.cols);
    f(m.data.buf.raw(), Access::Read, m.data.offset + data);
    let sb = m.format.scale_bytes(m.rows, m.cols);
    for r in [m.scales, m.biases].into_iter().flatten() {
        f(r.buf.raw(), Access::Read, r.offset + sb);
    }
}

fn vec_access(v: &Vector, f: &mut dyn FnMut(RawBufId, Access, usize)) {
    f(
        v.data.buf.raw(),
        Access::Read,
        v.data.offset + v.len * v.dtype.size(),
    );
}

const F: usize = 4;

impl Op {
    /// Short stable name, used in errors and profiles.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Embed { .. } => "embed",
            Op::RmsNorm { .. } => "rms_norm",
            Op::GatedRmsNorm { .. } => "gated_rms_norm",
            Op::Matmul { .. } => "matmul",
            Op::CopyRows { .. } => "copy_rows",
            Op::Add { .. } => "add",
            Op::SwiGlu { .. } => "swiglu",
            Op::SigmoidGate { .. } => "sigmoid_gate",
            Op::ScatterCols { .. } => "scatter_cols",
            Op::Rope { .. } => "rope",
            Op::KvAppend { .. } => "kv_append",
            Op::Attention { .. } => "attention",
            Op::Conv1dSilu { .. } => "conv1d_silu",
            Op::GatedDelta { .. } => "gated_delta",
            Op::RouterTopK { .. } => "router_topk",
            Op::MoeExperts { .. } => "moe_experts",
            Op::MoeExpertsStreamed { .. } => "moe_experts_streamed",
        }
    }

    /// Calls `f(buffer, access, bytes needed)` for every buffer the op touches.
    /// Reads are reported before writes.
    pub fn for_each_access(&self, f: &mut dyn FnMut(RawBufId, Access, usize)) {
        use Access::{Read, ReadWrite, Write};
        match self {
            Op::Embed {
                table,
                tokens,
                out,
                n,
            } => {
                mat_access(table, f);
                f(tokens.raw(), Read, n * 4);
                f(out.raw(), Write, n * table.cols * F);
            }
            Op::RmsNorm {
                x,
                weight,
                out,
                rows,
                dim,
                ..
            } => {
                f(x.raw(), Read, rows * dim * F);
                vec_access(weight, f);
                f(out.raw(), Write, rows * dim * F);
            }
            Op::GatedRmsNorm {
                x,
                gate,
                weight,
                out,
                rows,
                dim,
                ..
            } => {
                f(x.raw(), Read, rows * dim * F);
                f(gate.raw(), Read, rows * dim * F);
                vec_access(weight, f);
                f(out.raw(), Write, rows * dim * F);
            }
            Op::Matmul { x, w, out, n } => {
                f(x.raw(), Read, n * w.cols * F);
                mat_access(w, f);
                f(out.raw(), Write, n * w.rows * F);
            }
            Op::CopyRows {
                x,
                out,
                start,
                rows,
                width,
            } => {
                f(x.raw(), Read, (start + rows) * width * F);
                f(out.raw(), Write, rows * width * F);
            }
            Op::Add { a, b, out, len } => {
                f(a.raw(), Read, len * F);
                f(b.raw(), Read, len * F);
                f(out.raw(), Write, len * F);
            }
            Op::SwiGlu { gate, up, out, len } => {
                f(gate.raw(), Read, len * F);
                f(up.raw(), Read, len * F);
                f(out.raw(), Write, len * F);
            }
            Op::SigmoidGate {
                x,
                gate,
                out,
                n,
                width,
                gate_width,
            } => {
                f(x.raw(), Read, n * width * F);
                f(gate.raw(), Read, n * gate_width * F);
                f(out.raw(), Write, n * width * F);
            }
            Op::ScatterCols {
                x,
                n,
                groups,
                parts,
            } => {
                let row: usize = parts.iter().map(|p| p.width).sum::<usize>() * groups;
                f(x.raw(), Read, n * row * F);
                for p in parts {
                    f(p.out.raw(), Write, n * p.out_width * F);
                }
            }
            Op::Rope {
                x,
                pos,
                n,
                heads,
                head_dim,
                ..
            } => {
                f(pos.raw(), Read, n * 4);
                f(x.raw(), ReadWrite, n * heads * head_dim * F);
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
                f(k.raw(), Read, n * kv_dim * F);
                f(v.raw(), Read, n * kv_dim * F);
                f(pos.raw(), Read, n * 4);
                f(k_cache.raw(), ReadWrite, max_ctx * kv_dim * F);
                f(v_cache.raw(), ReadWrite, max_ctx * kv_dim * F);
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
                max_ctx,
                ..
            } => {
                f(q.raw(), Read, n * heads * head_dim * F);
                f(pos.raw(), Read, n * 4);
                f(k_cache.raw(), Read, max_ctx * kv_heads * head_dim * F);
                f(v_cache.raw(), Read, max_ctx * kv_heads * head_dim * F);
                f(out.raw(), Write, n * heads * head_dim * F);
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
                f(x.raw(), Read, n * channels * F);
                vec_access(weight, f);
                f(state.raw(), ReadWrite, (kernel - 1) * channels * F);
                f(out.raw(), Write, n * channels * F);
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
                f(qkv.raw(), Read, n * (2 * k_heads * dk + v_heads * dv) * F);
                f(a.raw(), Read, n * v_heads * F);
                f(b.raw(), Read, n * v_heads * F);
                vec_access(a_log, f);
                vec_access(dt_bias, f);
                f(state.raw(), ReadWrite, v_heads * dk * dv * F);
                f(out.raw(), Write, n * v_heads * dv * F);
            }
            Op::RouterTopK {
                logits,
                idx,
                weights,
                n,
                experts,
                k,
                shared_gate,
                ..
            } => {
                f(logits.raw(), Read, n * experts * F);
                let width = k + shared_gate.is_some() as usize;
                if let Some(g) = shared_gate {
                    f(g.raw(), Read, n * F);
                }
                f(idx.raw(), Write, n * width * 4);
                f(weights.raw(), Write, n * width * F);
            }
            Op::MoeExpertsStreamed {
                x,
                idx,
                weights,
                out,
                n,
                k,
                hidden,
                ..
            } => {
                f(x.raw(), Read, n * hidden * F);
                f(idx.raw(), Read, n * k * 4);
                f(weights.raw(), Read, n * k * F);
                f(out.raw(), Write, n * hidden * F);
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
                ..
            } => {
                f(x.raw(), Read, n * hidden * F);
                f(idx.raw(), Read, n * k * 4);
                f(weights.raw(), Read, n * k * F);
                for e in experts.iter() {
                    mat_access(&e.gate, f);
                    mat_access(&e.up, f);
                    mat_access(&e.down, f);
                }
                f(out.raw(), Write, n * hidden * F);
            }
        }
    }

    /// Shape checks that do not need the pool (divisibility, consistent dims).
    pub fn check_shapes(&self) -> Result<(), String> {
        let mat_ok = |m: &Matrix, what: &str| -> Result<(), String> {
            if let WeightFormat::Affine {
                bits, group_size, ..
            } = m.format
            {
                if !matches!(bits, 4 | 8) {
                    return Err(format!(
                        "{what}: {bits}-bit affine weights are not supported (4 or 8)"
                    ));
                }
                if group_size == 0 || !m.cols.is_multiple_of(group_size as usize) {
                    return Err(format!(
                        "{what}: {} inputs not a multiple of group size {group_size}",
                        m.cols
                    ));
                }
                if m.scales.is_none() || m.biases.is_none() {
                    return Err(format!("{what}: quantized matrix without scales/biases"));
                }
            }
            Ok(())
        };
        match self {
            Op::Embed { table, .. } => mat_ok(table, "embedding"),
            Op::Matmul { w, .. } => mat_ok(w, "matmul weight"),
            Op::RmsNorm { weight, dim, .. } | Op::GatedRmsNorm { weight, dim, .. } => {
                if weight.len != *dim {
                    return Err(format!(
                        "norm weight has {} elements, rows have {dim}",
                        weight.len
                    ));
                }
                Ok(())
            }
            Op::SigmoidGate {
                width, gate_width, ..
            } => {
                if *gate_width != 1 && gate_width != width {
                    return Err(format!("gate width {gate_width} is neither 1 nor {width}"));
                }
                Ok(())
            }
            Op::ScatterCols { parts, groups, .. } => {
                for p in parts {
                    if p.out_offset + groups * p.width > p.out_width {
                        return Err(format!(
                            "part of width {}x{groups} at {} overflows row {}",
                            p.width, p.out_offset, p.out_width
                        ));
                    }
                }
                Ok(())
            }
            Op::Rope {
                head_dim,
                rotary_dim,
                ..
            } => {
                if rotary_dim > head_dim || rotary_dim % 2 != 0 {
                    return Err(format!(
                        "rotary dim {rotary_dim} invalid for head dim {head_dim}"
                    ));
                }
                Ok(())
            }
            Op::Attention {
                heads, kv_heads, ..
            } => {
                if *kv_heads == 0 || heads % kv_heads != 0 {
                    return Err(format!(
                        "{heads} heads not a multiple of {kv_heads} kv heads"
                    ));
                }
                Ok(())
            }
            Op::Conv1dSilu {
                weight,
                channels,
                kernel,
                ..
            } => {
                if *kernel < 1 || weight.len != channels * kernel {
                    return Err(format!(
                        "conv weight has {} elements, expected {channels}x{kernel}",
                        weight.len
                    ));
                }
                Ok(())
            }
            Op::GatedDelta {
                k_heads,
                v_heads,
                a_log,
                dt_bias,
                ..
            } => {
                if *k_heads == 0 || v_heads % k_heads != 0 {
                    return Err(format!(
                        "{v_heads} value heads not a multiple of {k_heads} key heads"
                    ));
                }
                if a_log.len != *v_heads || dt_bias.len != *v_heads {
                    return Err("A_log / dt_bias length differs from value heads".into());
                }
                Ok(())
            }
            Op::RouterTopK { experts, k, .. } => {
                if *k == 0 || k > experts {
                    return Err(format!("top-{k} of {experts} experts"));
                }
                Ok(())
            }
            Op::MoeExpertsStreamed {
                store,
                hidden,
                inter,
                ..
            } => {
                let e = store.layout();
                let need = [&e.gate, &e.up, &e.down]
                    .iter()
                    .map(|m| {
                        m.data
                            .offset
                            .max(m.scales.map_or(0, |s| s.offset))
                            .max(m.biases.map_or(0, |b| b.offset))
                    })
                    .max()
                    .unwrap_or(0);
                if e.gate.rows != *inter
                    || e.gate.cols != *hidden
                    || e.down.rows != *hidden
                    || e.down.cols != *inter
                {
                    return Err(format!(
                        "streamed expert layout does not match hidden {hidden} / inter {inter}"
                    ));
                }
                if need >= store.record_bytes() {
                    return Err("streamed expert layout points past its record".into());
                }
                Ok(())
            }
            Op::MoeExperts {
                experts,
                hidden,
                inter,
                ..
            } => {
                for (i, e) in experts.iter().enumerate() {
                    let ok = e.gate.rows == *inter
                        && e.gate.cols == *hidden
                        && e.up.rows == *inter
                        && e.up.cols == *hidden
                        && e.down.rows == *hidden
                        && e.down.cols == *inter;
                    if !ok {
                        return Err(format!(
                            "expert {i} matrices do not match hidden {hidden} / inter {inter}"
                        ));
                    }
                    mat_ok(&e.gate, "expert gate")?;
                    mat_ok(&e.up, "expert up")?;
                    mat_ok(&e.down, "expert down")?;
                }
                Ok(())
            }
            Op::Add { .. } | Op::SwiGlu { .. } | Op::KvAppend { .. } | Op::CopyRows { .. } => {
                Ok(())
            }
        }
    }
}

/// Where a node comes from in the model: `(layer, role)`, so a debug dump or a profile
/// lines up with the reference's module names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeName {
    pub layer: Option<usize>,
    pub role: &'static str,
}

/// A dispatch list.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<(NodeName, Op)>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Self {
        Graph {
            name: name.into(),
            nodes: Vec::new(),
        }
    }

    pub fn push(&mut self, layer: Option<usize>, role: &'static str, op: Op) {
        self.nodes.push((NodeName { layer, role }, op));
    }

    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.nodes.iter().map(|(_, op)| op)
    }

    /// Checks every op's shapes and that every buffer it touches is large enough.
    /// `size_of` returns the byte size of a buffer, or `None` if the pool does not know it.
    pub fn validate(
        &self,
        size_of: &dyn Fn(RawBufId) -> Option<(usize, String)>,
    ) -> Result<(), crate::CoreError> {
        for (name, op) in &self.nodes {
            let bad = |msg: String| crate::CoreError::BadOp {
                graph: self.name.clone(),
                op: format!(
                    "{} ({}{})",
                    op.kind(),
                    name.role,
                    name.layer
                        .map(|l| format!(", layer {l}"))
                        .unwrap_or_default()
                ),
                msg,
            };
            op.check_shapes().map_err(bad)?;
            let mut err = None;
            op.for_each_access(&mut |id, _, need| {
                if err.is_some() {
                    return;
                }
                match size_of(id) {
                    None => err = Some(format!("unknown buffer {id:?}")),
                    Some((have, label)) if have < need => {
                        err = Some(format!(
                            "buffer '{label}' has {have} bytes, op needs {need}"
                        ))
                    }
                    Some(_) => {}
                }
            });
            if let Some(e) = err {
                return Err(bad(e));
            }
        }
        Ok(())
    }
}
