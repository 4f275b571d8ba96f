//! `config.json` -> [`ModelSpec`]: everything the graph builders need, resolved once.
//!
//! Handles the shapes the released checkpoints come in: flat text configs, the
//! vision-language wrapper (`text_config` nested, tensors under a language-model
//! prefix), rotary settings either flat or in `rope_parameters`, and mlx-lm's
//! `quantization` block with per-module overrides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Qwen3-Next: hybrid Gated DeltaNet + gated attention, fused `in_proj_qkvz`.
    Qwen3Next,
    /// Qwen3.5-MoE: same blocks, split linear-attention projections.
    Qwen35Moe,
    /// Qwen3-MoE: full attention everywhere, no shared expert.
    Qwen3Moe,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Qwen3Next => "qwen3_next",
            Arch::Qwen35Moe => "qwen3_5_moe",
            Arch::Qwen3Moe => "qwen3_moe",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    LinearAttention,
    FullAttention,
}

#[derive(Clone, Debug)]
pub struct AttnSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rope_theta: f32,
    /// q_proj also produces a per-head sigmoid gate for the attention output.
    pub output_gate: bool,
}

#[derive(Clone, Debug)]
pub struct LinearSpec {
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
    pub conv_kernel: usize,
}

impl LinearSpec {
    pub fn key_dim(&self) -> usize {
        self.k_heads * self.dk
    }
    pub fn value_dim(&self) -> usize {
        self.v_heads * self.dv
    }
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
}

#[derive(Clone, Debug)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    pub inter: usize,
    /// Shared expert intermediate size (with a sigmoid gate), if the model has one.
    pub shared_inter: Option<usize>,
    pub renorm: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    Moe,
    Dense,
}

/// MLX affine quantization settings: the default and per-module overrides
/// (`None` = that module is not quantized).
#[derive(Clone, Debug, Default)]
pub struct QuantConfig {
    pub bits: u8,
    pub group_size: u32,
    pub overrides: BTreeMap<String, Option<(u8, u32)>>,
}

impl QuantConfig {
    /// `(bits, group_size)` for the module at `path` (e.g. `model.layers.0.mlp.gate`).
    pub fn for_module(&self, path: &str) -> Option<(u8, u32)> {
        match self.overrides.get(path) {
            Some(o) => *o,
            None => Some((self.bits, self.group_size)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub arch: Arch,
    pub model_type: String,
    pub hidden: usize,
    pub vocab: usize,
    pub eps: f32,
    pub layers: Vec<LayerKind>,
    pub mlp: Vec<MlpKind>,
    pub attn: AttnSpec,
    pub linear: Option<LinearSpec>,
    pub moe: MoeSpec,
    /// Intermediate size of dense MLP layers (Qwen3-MoE `mlp_only_layers`).
    pub dense_inter: usize,
    pub tie_embeddings: bool,
    pub max_position: usize,
    pub quant: Option<QuantConfig>,
    pub eos_ids: Vec<u32>,
}

struct Fields<'a> {
    path: &'a Path,
    /// Text config first, then the top level (VL wrappers keep some fields outside).
    scopes: Vec<&'a Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: self.path.to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }
    fn raw(&self, field: &str) -> Option<&Value> {
        self.scopes
            .iter()
            .find_map(|s| s.get(field))
            .filter(|v| !v.is_null())
    }
    fn rope(&self, field: &str) -> Option<&Value> {
        self.raw(field)
            .or_else(|| self.raw("rope_parameters").and_then(|r| r.get(field)))
            .or_else(|| self.raw("rope_scaling").and_then(|r| r.get(field)))
    }
    fn usize(&self, field: &str) -> Result<usize, ModelError> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ModelError> {
        match self.raw(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                self.err(field, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn f32_or(&self, v: Option<&Value>, field: &str, default: f32) -> Result<f32, ModelError> {
        match v {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }
    fn bool_or(&self, field: &str, default: bool) -> Result<bool, ModelError> {
        match self.raw(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true/false, found {v}"))),
        }
    }
}

fn positive(f: &Fields, field: &str, v: usize) -> Result<usize, ModelError> {
    if v == 0 {
        return Err(f.err(field, "must be > 0"));
    }
    Ok(v)
}

impl ModelSpec {
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path: PathBuf = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        let root: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        Self::from_json(&root, &path)
    }

    pub fn from_json(root: &Value, path: &Path) -> Result<Self, ModelError> {
        let top_type = root
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let text = root.get("text_config").filter(|v| v.is_object());
        let arch = match top_type.as_str() {
            "qwen3_next" => Arch::Qwen3Next,
            "qwen3_5_moe" | "qwen3_5_moe_text" => Arch::Qwen35Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            other => {
                return Err(ModelError::UnknownArch {
                    path: path.to_path_buf(),
                    model_type: if other.is_empty() {
                        "<missing model_type>".into()
                    } else {
                        other.into()
                    },
                });
            }
        };
        let mut scopes = Vec::new();
        if let Some(t) = text {
            scopes.push(t);
        }
        scopes.push(root);
        let f = Fields { path, scopes };

        let hidden = positive(&f, "hidden_size", f.usize("hidden_size")?)?;
        let n_layers = positive(&f, "num_hidden_layers", f.usize("num_hidden_layers")?)?;
        let vocab = positive(&f, "vocab_size", f.usize("vocab_size")?)?;
        let eps = f.f32_or(f.raw("rms_norm_eps"), "rms_norm_eps", 1e-6)?;
        let heads = positive(&f, "num_attention_heads", f.usize("num_attention_heads")?)?;
        let kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{kv_heads} does not divide {heads} attention heads"),
            ));
        }
        let partial = f.f32_or(
            f.rope("partial_rotary_factor"),
            "partial_rotary_factor",
            1.0,
        )?;
        let rotary_dim = ((head_dim as f32 * partial) as usize) & !1;
        let rope_theta = f.f32_or(f.rope("rope_theta"), "rope_theta", 10000.0)?;

        let layers: Vec<LayerKind> = match (arch, f.raw("layer_types")) {
            (Arch::Qwen3Moe, _) => vec![LayerKind::FullAttention; n_layers],
            (_, Some(Value::Array(types))) => {
                if types.len() != n_layers {
                    return Err(f.err(
                        "layer_types",
                        format!("{} entries for {n_layers} layers", types.len()),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("linear_attention") => Ok(LayerKind::LinearAttention),
                        Some("full_attention") => Ok(LayerKind::FullAttention),
                        _ => Err(f.err("layer_types", format!("unknown layer type {t}"))),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                let interval = positive(
                    &f,
                    "full_attention_interval",
                    f.opt_usize("full_attention_interval")?.unwrap_or(4),
                )?;
                (0..n_layers)
                    .map(|i| {
                        if (i + 1) % interval == 0 {
                            LayerKind::FullAttention
                        } else {
                            LayerKind::LinearAttention
                        }
                    })
                    .collect()
            }
        };
        let linear = if layers.contains(&LayerKind::LinearAttention) {
            let k_heads = positive(&f, "linear_num_key_heads", f.usize("linear_num_key_heads")?)?;
            let v_heads = positive(
                &f,
                "linear_num_value_heads",
                f.usize("linear_num_value_heads")?,
            )?;
            if v_heads % k_heads != 0 {
                return Err(f.err(
                    "linear_num_value_heads",
                    format!("{v_heads} is not a multiple of {k_heads} key heads"),
                ));
            }
            Some(LinearSpec {
                k_heads,
                v_heads,
                dk: positive(&f, "linear_key_head_dim", f.usize("linear_key_head_dim")?)?,
                dv: positive(
                    &f,
                    "linear_value_head_dim",
                    f.usize("linear_value_head_dim")?,
                )?,
                conv_kernel: positive(
                    &f,
                    "linear_conv_kernel_dim",
                    f.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4),
                )?,
            })
        } else {
            None
        };

        let experts = positive(&f, "num_experts", f.usize("num_experts")?)?;
        let top_k = f.usize("num_experts_per_tok")?;
        if top_k == 0 || top_k > experts {
            return Err(f.err(
                "num_experts_per_tok",
                format!("{top_k} must be in 1..={experts}"),
            ));
        }
        let shared_inter = match arch {
            Arch::Qwen3Moe => None,
            _ => f
                .opt_usize("shared_expert_intermediate_size")?
                .filter(|&s| s > 0),
        };
        let moe = MoeSpec {
            experts,
            top_k,
            inter: positive(
                &f,
                "moe_intermediate_size",
                f.usize("moe_intermediate_size")?,
            )?,
            shared_inter,
            renorm: f.bool_or("norm_topk_prob", arch != Arch::Qwen3Moe)?,
        };
        let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
        let dense_only: Vec<usize> = match f.raw("mlp_only_layers") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|x| x as usize))
                .collect(),
            _ => Vec::new(),
        };
        let mlp: Vec<MlpKind> = (0..n_layers)
            .map(|i| {
                if dense_only.contains(&i) || (i + 1) % step != 0 {
                    MlpKind::Dense
                } else {
                    MlpKind::Moe
                }
            })
            .collect();
        let dense_inter = if mlp.contains(&MlpKind::Dense) {
            f.usize("intermediate_size")?
        } else {
            0
        };

        let quant = match root
            .get("quantization")
            .or_else(|| root.get("quantization_config"))
        {
            Some(q) if q.get("bits").is_some() => {
                let bits = q["bits"]
                    .as_u64()
                    .ok_or_else(|| f.err("quantization.bits", "expected an integer"))?
                    as u8;
                let group_size = q.get("group_size").and_then(|v| v.as_u64()).unwrap_or(64) as u32;
                let mut overrides = BTreeMap::new();
                for (k, v) in q.as_object().into_iter().flatten() {
                    match v {
                        Value::Object(o) => {
                            let b = o
                                .get("bits")
                                .and_then(|v| v.as_u64())
                                .unwrap_or(bits as u64) as u8;
                            let g = o
                                .get("group_size")
                                .and_then(|v| v.as_u64())
                                .unwrap_or(group_size as u64)
                                as u32;
                            overrides.insert(k.clone(), Some((b, g)));
                        }
                        Value::Bool(false) => {
                            overrides.insert(k.clone(), None);
                        }
                        _ => {}
                    }
                }
                Some(QuantConfig {
                    bits,
                    group_size,
                    overrides,
                })
            }
            _ => None,
        };

        let mut eos_ids = Vec::new();
        for s in &f.scopes {
            match s.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => {
                    eos_ids.extend(a.iter().filter_map(|v| v.as_u64().map(|x| x as u32)))
                }
                _ => {}
            }
        }
        eos_ids.dedup();

        Ok(ModelSpec {
            arch,
            model_type: top_type,
            hidden,
            vocab,
            eps,
            layers,
            mlp,
            attn: AttnSpec {
                heads,
                kv_heads,
                head_dim,
                rotary_dim,
                rope_theta,
                output_gate: arch != Arch::Qwen3Moe,
            },
            linear,
            moe,
            dense_inter,
            tie_embeddings: root
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .or_else(|| {
                    text.and_then(|t| t.get("tie_word_embeddings"))
                        .and_then(|v| v.as_bool())
                })
                .unwrap_or(false),
            max_position: f.opt_usize("max_position_embeddings")?.unwrap_or(32768),
            quant,
            eos_ids,
        })
    }
}
