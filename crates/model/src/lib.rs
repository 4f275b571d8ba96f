//! moeflux-model: from a model directory to IR.
//!
//! [`Model::open`] reads `config.json` into a [`ModelSpec`], maps the safetensors files,
//! registers them with a backend's pool (zero-copy on the CPU) and resolves every weight
//! into typed references. [`Model::build_step`] emits the graph for one batch of `n`
//! tokens; the engine owns the per-sequence state ([`SeqState`]) the graph reads and
//! writes.

pub mod arch;
pub mod blocks;
pub mod builder;
pub mod config;
pub mod error;
pub mod packed;
pub mod source;
pub mod synthetic;
pub mod weights;

use std::path::Path;

use moeflux_core::{Act, BufId, BufferPool, Lifetime, Matrix, Op, PoolExt, Pos, Tokens};

use arch::{Ffn, Mixer, ModelWeights};
use blocks::attn::{AttnParams, KvCache};
use blocks::linear_attn::LinearState;
use builder::Builder;
pub use config::{Arch, LayerKind, ModelSpec};
pub use error::ModelError;
use source::WeightSource;

pub struct Model {
    pub spec: ModelSpec,
    /// The directory the weights came from (`None` for synthetic benchmark models).
    pub dir: Option<std::path::PathBuf>,
    pub weights: ModelWeights,
}

/// How a model is opened.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// RAM budget (bytes) for the expert cache of a packed model; `None` = unbounded.
    pub host_mem: Option<usize>,
}

/// Per-layer recurrent or cached state of one sequence.
#[derive(Clone, Copy, Debug)]
pub enum LayerState {
    Kv(KvCache),
    Linear(LinearState),
}

#[derive(Clone, Debug)]
pub struct SeqState {
    pub layers: Vec<LayerState>,
    pub max_ctx: usize,
}

/// Which rows of logits a step graph produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogitsRows {
    /// Every position (the `logits` command).
    All,
    /// Only the last position (generation).
    Last,
}

/// A built step: the graph plus the buffers the host writes and reads.
pub struct StepGraph {
    pub graph: moeflux_core::Graph,
    pub n: usize,
    pub tokens: BufId<Tokens>,
    pub pos: BufId<Pos>,
    pub logits: BufId<Act>,
    pub logits_rows: usize,
}

/// Sizes reported by `moeflux info`.
#[derive(Clone, Debug, Default)]
pub struct ModelStats {
    pub params_total: usize,
    pub params_active: usize,
    pub params_experts: usize,
    pub bytes_total: usize,
    pub bytes_active: usize,
    pub bytes_experts: usize,
}

fn mat_params(m: &Matrix) -> (usize, usize) {
    (m.rows * m.cols, m.bytes())
}

impl Model {
    pub fn open(dir: &Path, pool: &mut dyn BufferPool) -> Result<Self, ModelError> {
        Self::open_with(dir, pool, &LoadOptions::default())
    }

    /// Opens a model directory; a packed directory (`moeflux convert`) streams its routed
    /// experts through an [`packed::ExpertStore`] bounded by `opts.host_mem`.
    pub fn open_with(
        dir: &Path,
        pool: &mut dyn BufferPool,
        opts: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let spec = ModelSpec::from_dir(dir)?;
        let source = WeightSource::open(dir)?;
        let store = if dir.join(packed::MANIFEST).exists() {
            Some(packed::ExpertStore::open(
                dir,
                opts.host_mem,
                spec.moe.top_k,
            )?)
        } else {
            None
        };
        let mut m = Self::from_source(spec, &source, pool, store)?;
        m.dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// Resolves a model from already-parsed weights (files or in-memory buffers).
    pub fn from_source(
        spec: ModelSpec,
        source: &WeightSource,
        pool: &mut dyn BufferPool,
        store: Option<std::sync::Arc<packed::ExpertStore>>,
    ) -> Result<Self, ModelError> {
        let ld = weights::Loader::new(source, spec.quant.as_ref(), pool)?;
        let weights = match spec.arch {
            Arch::Qwen3Next | Arch::Qwen35Moe => {
                arch::qwen3_next::load(&ld, &spec, store.as_ref())?
            }
            Arch::Qwen3Moe => arch::qwen3_moe::load(&ld, &spec, store.as_ref())?,
        };
        Ok(Model {
            spec,
            dir: None,
            weights,
        })
    }

    /// Allocates the KV caches and recurrent state for one sequence of up to `max_ctx`
    /// tokens (persistent, zeroed).
    pub fn alloc_state(
        &self,
        pool: &mut dyn BufferPool,
        max_ctx: usize,
    ) -> Result<SeqState, ModelError> {
        let s = &self.spec;
        let mut layers = Vec::new();
        for (l, kind) in s.layers.iter().enumerate() {
            layers.push(match kind {
                LayerKind::FullAttention => {
                    let bytes = max_ctx * s.attn.kv_heads * s.attn.head_dim * 4;
                    LayerState::Kv(KvCache {
                        k: pool.alloc(bytes, &format!("L{l}.k_cache"), Lifetime::Persistent)?,
                        v: pool.alloc(bytes, &format!("L{l}.v_cache"), Lifetime::Persistent)?,
                        max_ctx,
                    })
                }
                LayerKind::LinearAttention => {
                    let ls = s.linear.as_ref().expect("linear spec");
                    LayerState::Linear(LinearState {
                        conv: pool.alloc(
                            (ls.conv_kernel - 1) * ls.conv_dim() * 4,
                            &format!("L{l}.conv_state"),
                            Lifetime::Persistent,
                        )?,
                        delta: pool.alloc(
                            ls.v_heads * ls.dk * ls.dv * 4,
                            &format!("L{l}.delta_state"),
                            Lifetime::Persistent,
                        )?,
                    })
                }
            });
        }
        Ok(SeqState { layers, max_ctx })
    }

    /// Zeroes a sequence's state (a fresh conversation).
    pub fn reset_state(&self, pool: &mut dyn BufferPool, st: &SeqState) -> Result<(), ModelError> {
        for l in &st.layers {
            match l {
                LayerState::Kv(kv) => {
                    pool.zero(kv.k.raw())?;
                    pool.zero(kv.v.raw())?;
                }
                LayerState::Linear(ls) => {
                    pool.zero(ls.conv.raw())?;
                    pool.zero(ls.delta.raw())?;
                }
            }
        }
        Ok(())
    }

    /// Emits the graph that runs `n` tokens through the model.
    pub fn build_step(
        &self,
        pool: &mut dyn BufferPool,
        st: &SeqState,
        n: usize,
        rows: LogitsRows,
    ) -> Result<StepGraph, ModelError> {
        let s = &self.spec;
        let w = &self.weights;
        let h = s.hidden;
        let tokens: BufId<Tokens> = pool.alloc(n * 4, "tokens", Lifetime::External)?;
        let pos: BufId<Pos> = pool.alloc(n * 4, "positions", Lifetime::External)?;
        let logits_rows = match rows {
            LogitsRows::All => n,
            LogitsRows::Last => 1,
        };
        let logits: BufId<Act> =
            pool.alloc(logits_rows * s.vocab * 4, "logits", Lifetime::External)?;
        let mut b = Builder::new(pool, format!("{}-n{n}", s.arch.name()), n, pos);
        let x = b.act(h, "residual")?;
        b.push(
            "embed",
            Op::Embed {
                table: w.embed,
                tokens,
                out: x,
                n,
            },
        );
        let attn_params = AttnParams {
            spec: &s.attn,
            eps: s.eps,
            norm_offset: w.norm_offset,
        };
        for (l, lw) in w.layers.iter().enumerate() {
            b.set_layer(Some(l));
            let hn = b.act(h, "input_norm")?;
            b.push(
                "input_layernorm",
                Op::RmsNorm {
                    x,
                    weight: lw.input_norm,
                    out: hn,
                    rows: n,
                    dim: h,
                    eps: s.eps,
                    offset: w.norm_offset,
                },
            );
            let mixed = match (&lw.mixer, &st.layers[l]) {
                (Mixer::Attn(aw), LayerState::Kv(kv)) => {
                    blocks::attn::emit(&mut b, hn, aw, *kv, &attn_params)?
                }
                (Mixer::Linear(lw2), LayerState::Linear(ls)) => blocks::linear_attn::emit(
                    &mut b,
                    hn,
                    lw2,
                    *ls,
                    s.linear.as_ref().expect("linear spec"),
                    s.eps,
                )?,
                _ => unreachable!("state allocated from the same spec"),
            };
            b.push(
                "residual_add",
                Op::Add {
                    a: x,
                    b: mixed,
                    out: x,
                    len: n * h,
                },
            );
            let hn2 = b.act(h, "post_norm")?;
            b.push(
                "post_attention_layernorm",
                Op::RmsNorm {
                    x,
                    weight: lw.post_norm,
                    out: hn2,
                    rows: n,
                    dim: h,
                    eps: s.eps,
                    offset: w.norm_offset,
                },
            );
            let y = match &lw.ffn {
                Ffn::Moe(mw) => blocks::moe::emit(&mut b, hn2, mw, &s.moe, h)?,
                Ffn::Dense(mlp) => blocks::moe::emit_mlp(&mut b, hn2, mlp, "mlp")?,
            };
            b.push(
                "residual_add",
                Op::Add {
                    a: x,
                    b: y,
                    out: x,
                    len: n * h,
                },
            );
        }
        b.set_layer(None);
        let last = if logits_rows < n {
            let t = b.act(h, "last_hidden")?;
            b.push(
                "take_last",
                Op::CopyRows {
                    x,
                    out: t,
                    start: n - 1,
                    rows: 1,
                    width: h,
                },
            );
            t
        } else {
            x
        };
        let normed = b.act(h, "final_norm")?;
        b.push(
            "final_norm",
            Op::RmsNorm {
                x: last,
                weight: w.final_norm,
                out: normed,
                rows: logits_rows,
                dim: h,
                eps: s.eps,
                offset: w.norm_offset,
            },
        );
        b.push(
            "lm_head",
            Op::Matmul {
                x: normed,
                w: w.lm_head,
                out: logits,
                n: logits_rows,
            },
        );
        Ok(StepGraph {
            graph: b.graph,
            n,
            tokens,
            pos,
            logits,
            logits_rows,
        })
    }

    /// Parameter and byte counts: total, active per token, experts.
    pub fn stats(&self) -> ModelStats {
        let mut st = ModelStats::default();
        let w = &self.weights;
        let mut add = |m: &Matrix, active: bool, expert: bool| {
            let (p, b) = mat_params(m);
            st.params_total += p;
            st.bytes_total += b;
            if active {
                st.params_active += p;
                st.bytes_active += b;
            }
            if expert {
                st.params_experts += p;
                st.bytes_experts += b;
            }
        };
        add(&w.embed, false, false);
        if !self.spec.tie_embeddings {
            add(&w.lm_head, true, false);
        }
        let k = self.spec.moe.top_k;
        for l in &w.layers {
            match &l.mixer {
                Mixer::Attn(a) => [&a.q, &a.k, &a.v, &a.o]
                    .into_iter()
                    .for_each(|m| add(m, true, false)),
                Mixer::Linear(la) => {
                    match &la.in_proj {
                        blocks::linear_attn::InProj::Fused { qkvz, ba } => {
                            [qkvz, ba].into_iter().for_each(|m| add(m, true, false))
                        }
                        blocks::linear_attn::InProj::Split { qkv, z, b, a } => {
                            [qkv, z, b, a].into_iter().for_each(|m| add(m, true, false))
                        }
                    }
                    add(&la.out, true, false);
                }
            }
            match &l.ffn {
                Ffn::Moe(m) => {
                    add(&m.router, true, false);
                    let experts: Vec<moeflux_core::ExpertWeights> = match &m.experts {
                        arch::Experts::Resident(e) => e.to_vec(),
                        arch::Experts::Streamed(s) => {
                            vec![
                                moeflux_core::ExpertProvider::layout(s.as_ref());
                                s.manifest().experts
                            ]
                        }
                    };
                    for (i, e) in experts.iter().enumerate() {
                        // active per token: k experts (count the first k as representative)
                        for mm in [&e.gate, &e.up, &e.down] {
                            add(mm, i < k, true);
                        }
                    }
                    if let Some((mlp, g)) = &m.shared {
                        [&mlp.gate, &mlp.up, &mlp.down, g]
                            .into_iter()
                            .for_each(|mm| add(mm, true, false));
                    }
                }
                Ffn::Dense(mlp) => [&mlp.gate, &mlp.up, &mlp.down]
                    .into_iter()
                    .for_each(|mm| add(mm, true, false)),
            }
        }
        st
    }
}
