//! Models with random weights at real shapes for `moeflux bench`, as mlx-community
//! checkpoints would store them: affine 4-bit (group 64) with 8-bit router gates, experts
//! stacked under `switch_mlp`, norms of ones. The weights are real safetensors bytes (one
//! shard per layer) parsed by the normal loader, either straight from memory (no disk) or
//! written to a directory for the tiered-store benchmarks. Random routing makes every
//! expert equally likely: the worst case for any expert cache.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moeflux_core::BufferPool;
use serde_json::{Value, json};

use crate::Model;
use crate::config::{LayerKind, MlpKind, ModelSpec};
use crate::error::ModelError;
use crate::source::WeightSource;

/// Real configs of the models the benchmarks are named after.
pub fn preset(name: &str) -> Option<Value> {
    let next = |hidden: usize,
                layers: usize,
                vocab: usize,
                heads: usize,
                v_heads: usize,
                experts: usize,
                k: usize,
                inter: usize| {
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

pub const PRESETS: [&str; 4] = [
    "qwen3-next-80b-a3b",
    "qwen3.5-35b-a3b",
    "qwen3-30b-a3b",
    "qwen3.5-397b-a17b",
];

/// xorshift64 bytes, filled in parallel 1 MiB blocks (each block seeded from its index,
/// so the content does not depend on the thread count).
fn fill_random(buf: &mut [u8], seed: u64) {
    use rayon::prelude::*;
    buf.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(i, block)| {
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

fn bf16(v: f32) -> [u8; 2] {
    ((v.to_bits() >> 16) as u16).to_le_bytes()
}

/// One safetensors shard being assembled in memory.
struct Shard {
    seed: u64,
    /// (name, dtype, shape, byte range in `data`)
    entries: Vec<(String, &'static str, Vec<usize>, usize, usize)>,
    data: Vec<u8>,
}

impl Shard {
    fn new(seed: u64) -> Self {
        Shard {
            seed,
            entries: Vec::new(),
            data: Vec::new(),
        }
    }

    fn push(
        &mut self,
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: impl FnOnce(&mut Vec<u8>),
    ) {
        let at = self.data.len();
        bytes(&mut self.data);
        self.entries.push((name, dtype, shape, at, self.data.len()));
    }

    fn filled(&mut self, name: String, shape: Vec<usize>, v: f32) {
        let n: usize = shape.iter().product();
        self.push(name, "BF16", shape, |d| {
            (0..n).for_each(|_| d.extend_from_slice(&bf16(v)))
        });
    }

    /// `[lead.., rows, cols]` affine-quantized matrix (or stack of them) under `module`.
    fn quantized(&mut self, module: &str, lead: &[usize], rows: usize, cols: usize, bits: usize) {
        let count: usize = lead.iter().product();
        let with = |tail: &[usize]| -> Vec<usize> { lead.iter().chain(tail).copied().collect() };
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let seed = self.seed;
        self.push(
            format!("{module}.weight"),
            "U32",
            with(&[rows, cols * bits / 32]),
            |d| {
                let at = d.len();
                d.resize(at + count * rows * cols * bits / 8, 0);
                fill_random(&mut d[at..], seed);
            },
        );
        // scale * q + bias with q uniform in [0, 2^bits): centred on zero, activations O(1)
        let levels = ((1u32 << bits) - 1) as f32;
        let scale = 2.0 / (levels * (cols as f32).sqrt());
        self.filled(format!("{module}.scales"), with(&[rows, cols / 64]), scale);
        self.filled(
            format!("{module}.biases"),
            with(&[rows, cols / 64]),
            -scale * levels / 2.0,
        );
    }

    fn bytes(self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "mlx"}));
        for (name, dt, shape, a, b) in &self.entries {
            header.insert(
                name.clone(),
                json!({"dtype": dt, "shape": shape, "data_offsets": [a, b]}),
            );
        }
        let mut h = serde_json::to_vec(&header).expect("json");
        h.resize(h.len().div_ceil(8) * 8, b' ');
        let mut out = Vec::with_capacity(8 + h.len() + self.data.len());
        out.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&self.data);
        out
    }
}

/// The config (with the MLX quantization block, routers at 8 bits) and the shards of a
/// synthetic model: one with embeddings, final norm and head, then one per layer.
/// Shards are handed to `emit` as they are made, so only one is in memory at a time.
fn shards(
    config: &Value,
    layers: Option<usize>,
    seed: u64,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<(), ModelError>,
) -> Result<Value, ModelError> {
    let mut cfg = config.clone();
    if let Some(l) = layers {
        cfg["num_hidden_layers"] = json!(l);
    }
    let spec = ModelSpec::from_json(&cfg, Path::new("<synthetic>"))?;
    let h = spec.hidden;
    let mut s = Shard::new(seed);
    s.quantized("model.embed_tokens", &[], spec.vocab, h, 4);
    s.filled("model.norm.weight".into(), vec![h], 1.0);
    s.quantized("lm_head", &[], spec.vocab, h, 4);
    emit(s.bytes())?;
    for (l, kind) in spec.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let mut s = Shard::new(seed ^ (l as u64 + 1).wrapping_mul(0x2545f4914f6cdd1d));
        s.filled(format!("{p}.input_layernorm.weight"), vec![h], 1.0);
        s.filled(format!("{p}.post_attention_layernorm.weight"), vec![h], 1.0);
        match kind {
            LayerKind::FullAttention => {
                let a = &spec.attn;
                let q_rows = a.heads * a.head_dim * if a.output_gate { 2 } else { 1 };
                s.quantized(&format!("{p}.self_attn.q_proj"), &[], q_rows, h, 4);
                s.quantized(
                    &format!("{p}.self_attn.k_proj"),
                    &[],
                    a.kv_heads * a.head_dim,
                    h,
                    4,
                );
                s.quantized(
                    &format!("{p}.self_attn.v_proj"),
                    &[],
                    a.kv_heads * a.head_dim,
                    h,
                    4,
                );
                s.quantized(
                    &format!("{p}.self_attn.o_proj"),
                    &[],
                    h,
                    a.heads * a.head_dim,
                    4,
                );
                s.filled(
                    format!("{p}.self_attn.q_norm.weight"),
                    vec![a.head_dim],
                    1.0,
                );
                s.filled(
                    format!("{p}.self_attn.k_norm.weight"),
                    vec![a.head_dim],
                    1.0,
                );
            }
            LayerKind::LinearAttention => {
                let la = spec.linear.as_ref().expect("linear spec");
                let q = format!("{p}.linear_attn");
                s.quantized(
                    &format!("{q}.in_proj_qkvz"),
                    &[],
                    2 * la.key_dim() + 2 * la.value_dim(),
                    h,
                    4,
                );
                s.quantized(&format!("{q}.in_proj_ba"), &[], 2 * la.v_heads, h, 4);
                s.filled(
                    format!("{q}.conv1d.weight"),
                    vec![la.conv_dim(), la.conv_kernel, 1],
                    0.25,
                );
                s.filled(format!("{q}.A_log"), vec![la.v_heads], 0.0);
                s.filled(format!("{q}.dt_bias"), vec![la.v_heads], 0.5);
                s.filled(format!("{q}.norm.weight"), vec![la.dv], 1.0);
                s.quantized(&format!("{q}.out_proj"), &[], h, la.value_dim(), 4);
            }
        }
        let m = &spec.moe;
        match spec.mlp[l] {
            MlpKind::Moe => {
                s.quantized(&format!("{p}.mlp.gate"), &[], m.experts, h, 8);
                s.quantized(
                    &format!("{p}.mlp.switch_mlp.gate_proj"),
                    &[m.experts],
                    m.inter,
                    h,
                    4,
                );
                s.quantized(
                    &format!("{p}.mlp.switch_mlp.up_proj"),
                    &[m.experts],
                    m.inter,
                    h,
                    4,
                );
                s.quantized(
                    &format!("{p}.mlp.switch_mlp.down_proj"),
                    &[m.experts],
                    h,
                    m.inter,
                    4,
                );
                if let Some(si) = m.shared_inter {
                    s.quantized(&format!("{p}.mlp.shared_expert.gate_proj"), &[], si, h, 4);
                    s.quantized(&format!("{p}.mlp.shared_expert.up_proj"), &[], si, h, 4);
                    s.quantized(&format!("{p}.mlp.shared_expert.down_proj"), &[], h, si, 4);
                    s.quantized(&format!("{p}.mlp.shared_expert_gate"), &[], 1, h, 8);
                    cfg["quantization"][format!("{p}.mlp.shared_expert_gate")] =
                        json!({"group_size": 64, "bits": 8});
                }
                cfg["quantization"][format!("{p}.mlp.gate")] = json!({"group_size": 64, "bits": 8});
            }
            MlpKind::Dense => {
                let i = spec.dense_inter;
                s.quantized(&format!("{p}.mlp.gate_proj"), &[], i, h, 4);
                s.quantized(&format!("{p}.mlp.up_proj"), &[], i, h, 4);
                s.quantized(&format!("{p}.mlp.down_proj"), &[], h, i, 4);
            }
        }
        emit(s.bytes())?;
    }
    Ok(cfg)
}

impl Model {
    /// A random-weight model for `config` (a config.json value) built in memory, keeping
    /// only the first `layers` layers when given.
    pub fn synthetic(
        config: &Value,
        layers: Option<usize>,
        pool: &mut dyn BufferPool,
        seed: u64,
    ) -> Result<Model, ModelError> {
        let mut files: Vec<(PathBuf, moeflux_core::SharedBytes)> = Vec::new();
        let cfg = shards(config, layers, seed, &mut |b| {
            files.push((
                PathBuf::from(format!("<synthetic shard {}>", files.len())),
                Arc::new(b),
            ));
            Ok(())
        })?;
        let spec = ModelSpec::from_json(&cfg, Path::new("<synthetic>"))?;
        let source = WeightSource::from_buffers(Path::new("<synthetic>"), files)?;
        Model::from_source(spec, &source, pool, None)
    }
}

/// Writes the synthetic model as a checkpoint directory (config.json + one shard per
/// layer), one shard in memory at a time.
pub fn write_checkpoint(
    config: &Value,
    layers: Option<usize>,
    seed: u64,
    dir: &Path,
) -> Result<(), ModelError> {
    let io = |e| ModelError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut i = 0;
    let cfg = shards(config, layers, seed, &mut |b| {
        let path = dir.join(format!("model-{i:05}.safetensors"));
        i += 1;
        std::fs::write(&path, b).map_err(|e| ModelError::Io { path, source: e })
    })?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("json"),
    )
    .map_err(io)?;
    Ok(())
}
