//! Models with random weights at real shapes, built straight in memory (no disk), for
//! `moeflux bench`. Weights are MLX-style affine 4-bit (group 64) with 8-bit router gates,
//! like the mlx-community checkpoints; norms are ones. Random routing makes every expert
//! equally likely, which is the worst case for any expert cache.

use std::sync::Arc;

use moeflux_core::{BufId, BufferPool, DType, ExpertWeights, Matrix, Region, Vector, Weight, WeightBytes, WeightFormat};
use serde_json::{Value, json};

use crate::arch::{Experts, Ffn, LayerWeights, Mixer, ModelWeights};
use crate::blocks::attn::AttnWeights;
use crate::blocks::linear_attn::{InProj, LinearWeights};
use crate::blocks::moe::{Mlp, MoeWeights};
use crate::config::{LayerKind, MlpKind, ModelSpec};
use crate::error::ModelError;
use crate::Model;

/// Real configs of the models the benchmarks are named after.
pub fn preset(name: &str) -> Option<Value> {
    let next = |hidden: usize, layers: usize, vocab: usize, heads: usize, v_heads: usize, experts: usize, k: usize, inter: usize| {
        json!({
            "model_type": "qwen3_next", "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab,
            "num_attention_heads": heads, "num_key_value_heads": 2, "head_dim": 256, "partial_rotary_factor": 0.25,
            "rope_theta": 10000000.0, "rms_norm_eps": 1e-6, "full_attention_interval": 4,
            "linear_num_key_heads": 16, "linear_num_value_heads": v_heads, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
            "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": inter,
            "shared_expert_intermediate_size": inter, "norm_topk_prob": true, "max_position_embeddings": 262144,
            "tie_word_embeddings": false,
        })
    };
    let mut v = match name {
        "qwen3-next-80b-a3b" => next(2048, 48, 151936, 16, 32, 512, 10, 512),
        "qwen3.5-35b-a3b" => next(2048, 40, 248320, 16, 32, 256, 8, 512),
        "qwen3.5-397b-a17b" => next(4096, 60, 248320, 32, 64, 512, 10, 1024),
        "qwen3-30b-a3b" => json!({
            "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 151936,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
            "norm_topk_prob": true, "max_position_embeddings": 40960, "tie_word_embeddings": false,
        }),
        _ => return None,
    };
    v["quantization"] = json!({"group_size": 64, "bits": 4});
    Some(v)
}

pub const PRESETS: [&str; 4] = ["qwen3-next-80b-a3b", "qwen3.5-35b-a3b", "qwen3-30b-a3b", "qwen3.5-397b-a17b"];

/// Lays out matrices in one host buffer, fills it with random bytes, registers it.
struct Arena {
    bytes: Vec<u8>,
    pending: Vec<(usize, usize, usize, WeightFormat, usize)>,
}

/// xorshift64 bytes, filled in parallel 1 MiB blocks (each block seeded from its index,
/// so the content does not depend on the thread count).
fn fill_random(buf: &mut [u8], seed: u64) {
    use rayon::prelude::*;
    buf.par_chunks_mut(1 << 20).enumerate().for_each(|(i, block)| {
        let mut s = (seed ^ (i as u64).wrapping_mul(0x9e3779b97f4a7c15)) | 1;
        for c in block.chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let b = s.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    });
}

fn bf16_bytes(v: f32) -> [u8; 2] {
    ((v.to_bits() >> 16) as u16).to_le_bytes()
}

impl Arena {
    fn new() -> Self {
        Arena { bytes: Vec::new(), pending: Vec::new() }
    }

    fn align(&mut self) {
        let pad = (64 - self.bytes.len() % 64) % 64;
        self.bytes.resize(self.bytes.len() + pad, 0);
    }

    /// Reserves a `[rows, cols]` matrix; returns its index for [`Self::finish`].
    fn matrix(&mut self, rows: usize, cols: usize, bits: u8, seed: u64) -> usize {
        let f = WeightFormat::Affine { bits, group_size: 64, scale_dtype: DType::BF16 };
        self.align();
        let data = self.bytes.len();
        self.bytes.resize(data + f.data_bytes(rows, cols), 0);
        fill_random(&mut self.bytes[data..], seed);
        let sb = f.scale_bytes(rows, cols);
        // scale * q + bias with q uniform in [0, 2^bits): centre at zero, keep the
        // activations O(1) whatever the width.
        let levels = ((1u32 << bits) - 1) as f32;
        let scale = 2.0 / (levels * (cols as f32).sqrt());
        for v in [scale, -scale * levels / 2.0] {
            let b = bf16_bytes(v);
            for _ in 0..sb / 2 {
                self.bytes.extend_from_slice(&b);
            }
        }
        self.pending.push((rows, cols, data, f, sb));
        self.pending.len() - 1
    }

    fn ones(&mut self, len: usize) -> usize {
        self.align();
        let at = self.bytes.len();
        for _ in 0..len {
            self.bytes.extend_from_slice(&bf16_bytes(1.0));
        }
        at
    }

    fn small(&mut self, len: usize, v: f32) -> usize {
        self.align();
        let at = self.bytes.len();
        for _ in 0..len {
            self.bytes.extend_from_slice(&bf16_bytes(v));
        }
        at
    }

    fn register(self, pool: &mut dyn BufferPool, label: &str) -> Result<Registered, ModelError> {
        let len = self.bytes.len();
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(self.bytes);
        let buf: BufId<Weight> = BufId::from_raw(pool.register_weights(WeightBytes::new(owner, 0..len), label)?);
        Ok(Registered { buf, pending: self.pending })
    }
}

struct Registered {
    buf: BufId<Weight>,
    pending: Vec<(usize, usize, usize, WeightFormat, usize)>,
}

impl Registered {
    fn mat(&self, i: usize) -> Matrix {
        let (rows, cols, data, format, sb) = self.pending[i];
        let end = data + format.data_bytes(rows, cols);
        Matrix {
            data: Region { buf: self.buf, offset: data },
            scales: Some(Region { buf: self.buf, offset: end }),
            biases: Some(Region { buf: self.buf, offset: end + sb }),
            rows,
            cols,
            format,
        }
    }
    fn vec(&self, at: usize, len: usize) -> Vector {
        Vector { data: Region { buf: self.buf, offset: at }, len, dtype: DType::BF16 }
    }
}

impl Model {
    /// A random-weight model for `config` (a config.json value), keeping only the first
    /// `layers` layers when given.
    pub fn synthetic(config: &Value, layers: Option<usize>, pool: &mut dyn BufferPool, seed: u64) -> Result<Model, ModelError> {
        let mut cfg = config.clone();
        if let Some(l) = layers {
            cfg["num_hidden_layers"] = json!(l);
        }
        let spec = ModelSpec::from_json(&cfg, std::path::Path::new("<synthetic>"))?;
        let h = spec.hidden;
        let mut seed = seed;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            seed
        };
        // embeddings + head
        let mut outer = Arena::new();
        let e = outer.matrix(spec.vocab, h, 4, next());
        let head = outer.matrix(spec.vocab, h, 4, next());
        let norm = outer.ones(h);
        let reg = outer.register(pool, "synthetic.outer")?;
        let (embed, lm_head, final_norm) = (reg.mat(e), reg.mat(head), reg.vec(norm, h));

        let mut out_layers = Vec::new();
        for (l, kind) in spec.layers.iter().enumerate() {
            let mut a = Arena::new();
            let n_in = a.ones(h);
            let n_post = a.ones(h);
            enum M {
                Attn(usize, usize, usize, usize, usize, usize),
                Lin(usize, usize, usize, usize, usize, usize, usize),
            }
            let at = &spec.attn;
            let m = match kind {
                LayerKind::FullAttention => {
                    let q_rows = at.heads * at.head_dim * if at.output_gate { 2 } else { 1 };
                    let kv = at.kv_heads * at.head_dim;
                    M::Attn(a.matrix(q_rows, h, 4, next()), a.matrix(kv, h, 4, next()), a.matrix(kv, h, 4, next()), a.matrix(h, at.heads * at.head_dim, 4, next()), a.ones(at.head_dim), a.ones(at.head_dim))
                }
                LayerKind::LinearAttention => {
                    let s = spec.linear.as_ref().expect("linear spec");
                    let qkvz = a.matrix(2 * s.key_dim() + 2 * s.value_dim(), h, 4, next());
                    let ba = a.matrix(2 * s.v_heads, h, 4, next());
                    let conv = a.small(s.conv_dim() * s.conv_kernel, 0.25);
                    let alog = a.small(s.v_heads, 0.0);
                    let dtb = a.small(s.v_heads, 0.5);
                    let out = a.matrix(h, s.value_dim(), 4, next());
                    M::Lin(qkvz, ba, conv, alog, dtb, out, a.ones(s.dv))
                }
            };
            let moe = &spec.moe;
            let ffn = match spec.mlp[l] {
                MlpKind::Moe => {
                    let router = a.matrix(moe.experts, h, 8, next());
                    let ex: Vec<(usize, usize, usize)> = (0..moe.experts).map(|_| (a.matrix(moe.inter, h, 4, next()), a.matrix(moe.inter, h, 4, next()), a.matrix(h, moe.inter, 4, next()))).collect();
                    let shared = moe.shared_inter.map(|si| (a.matrix(si, h, 4, next()), a.matrix(si, h, 4, next()), a.matrix(h, si, 4, next()), a.matrix(1, h, 8, next())));
                    (Some((router, ex, shared)), None)
                }
                MlpKind::Dense => {
                    let i = spec.dense_inter;
                    (None, Some((a.matrix(i, h, 4, next()), a.matrix(i, h, 4, next()), a.matrix(h, i, 4, next()))))
                }
            };
            let r = a.register(pool, &format!("synthetic.L{l}"))?;
            let mixer = match m {
                M::Attn(q, k, v, o, qn, kn) => Mixer::Attn(AttnWeights { q: r.mat(q), k: r.mat(k), v: r.mat(v), o: r.mat(o), q_norm: Some(r.vec(qn, at.head_dim)), k_norm: Some(r.vec(kn, at.head_dim)) }),
                M::Lin(qkvz, ba, conv, alog, dtb, out, norm) => {
                    let s = spec.linear.as_ref().expect("linear spec");
                    Mixer::Linear(LinearWeights {
                        in_proj: InProj::Fused { qkvz: r.mat(qkvz), ba: r.mat(ba) },
                        conv: r.vec(conv, s.conv_dim() * s.conv_kernel),
                        a_log: r.vec(alog, s.v_heads),
                        dt_bias: r.vec(dtb, s.v_heads),
                        norm: r.vec(norm, s.dv),
                        out: r.mat(out),
                    })
                }
            };
            let ffn = match ffn {
                (Some((router, ex, shared)), _) => Ffn::Moe(MoeWeights {
                    router: r.mat(router),
                    experts: Experts::Resident(ex.iter().map(|&(g, u, d)| ExpertWeights { gate: r.mat(g), up: r.mat(u), down: r.mat(d) }).collect::<Vec<_>>().into()),
                    shared: shared.map(|(g, u, d, sg)| (Mlp { gate: r.mat(g), up: r.mat(u), down: r.mat(d) }, r.mat(sg))),
                }),
                (None, Some((g, u, d))) => Ffn::Dense(Mlp { gate: r.mat(g), up: r.mat(u), down: r.mat(d) }),
                _ => unreachable!("one of the two"),
            };
            out_layers.push(LayerWeights { input_norm: r.vec(n_in, h), post_norm: r.vec(n_post, h), mixer, ffn });
        }
        Ok(Model { spec, dir: None, weights: ModelWeights { embed, lm_head, final_norm, layers: out_layers, norm_offset: 0.0 } })
    }
}
