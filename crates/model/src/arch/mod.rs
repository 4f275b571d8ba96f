//! Weight manifests per architecture: which tensor names hold which weights. The decoder
//! graph itself is shared ([`crate::Model::build_step`]) because every supported model is
//! a pre-norm decoder of (mixer, MLP) layers; an arch only says how its tensors map onto
//! the blocks. DeepSeek-V3 will add an MLA mixer and a grouped router here.

pub mod qwen3_moe;
pub mod qwen3_next;

use std::sync::Arc;

use moeflux_core::{ExpertWeights, Matrix, Vector};

use crate::blocks::attn::AttnWeights;
use crate::blocks::linear_attn::LinearWeights;
use crate::blocks::moe::{Mlp, MoeWeights};
use crate::config::{ModelSpec, MoeSpec};
use crate::error::ModelError;
use crate::weights::Loader;

pub enum Mixer {
    Attn(AttnWeights),
    Linear(LinearWeights),
}

pub enum Ffn {
    Moe(MoeWeights),
    Dense(Mlp),
}

/// Where a layer's routed experts live.
pub enum Experts {
    /// Registered with the backend like every other weight.
    Resident(Arc<[ExpertWeights]>),
    /// In a packed file behind the tiered store.
    Streamed(Arc<crate::packed::ExpertStore>),
}

pub struct LayerWeights {
    pub input_norm: Vector,
    pub post_norm: Vector,
    pub mixer: Mixer,
    pub ffn: Ffn,
}

pub struct ModelWeights {
    pub embed: Matrix,
    pub lm_head: Matrix,
    pub final_norm: Vector,
    pub layers: Vec<LayerWeights>,
    /// Added to stored RMS-norm weights: 1 where the checkpoint stores `w - 1`.
    pub norm_offset: f32,
}

/// Finds where the language model's tensors live (`model.`, or under a VL wrapper).
pub fn text_prefix(ld: &Loader) -> Result<&'static str, ModelError> {
    for p in [
        "model.",
        "model.language_model.",
        "language_model.model.",
        "",
    ] {
        if ld.has(&format!("{p}embed_tokens.weight")) {
            return Ok(p);
        }
    }
    Err(ModelError::MissingTensor {
        name: "model.embed_tokens.weight".into(),
        dir: ld.src.dir.clone(),
    })
}

/// Embedding, final norm and LM head (tied to the embedding when the config says so or
/// no head is stored).
pub fn outer(
    ld: &Loader,
    spec: &ModelSpec,
    p: &str,
) -> Result<(Matrix, Matrix, Vector), ModelError> {
    let embed = ld.matrix(&format!("{p}embed_tokens"), spec.vocab, spec.hidden)?;
    let final_norm = ld.vector(&format!("{p}norm.weight"), spec.hidden)?;
    let head_names = [
        "lm_head",
        "model.language_model.lm_head",
        "language_model.lm_head",
    ];
    let lm_head = match head_names.iter().find(|h| ld.has(&format!("{h}.weight"))) {
        Some(h) if !spec.tie_embeddings => ld.matrix(h, spec.vocab, spec.hidden)?,
        _ if spec.tie_embeddings => embed,
        _ => {
            return Err(ModelError::MissingTensor {
                name: "lm_head.weight (tie_word_embeddings is false)".into(),
                dir: ld.src.dir.clone(),
            });
        }
    };
    Ok((embed, lm_head, final_norm))
}

/// Routed experts in any of the stored layouts: one tensor per expert (HF), stacked
/// under `switch_mlp` (MLX), or fused `gate_up_proj` / `down_proj` (transformers 5 /
/// Qwen3.5 releases, gate rows first).
pub fn experts(
    ld: &Loader,
    m: &str,
    s: &MoeSpec,
    hidden: usize,
) -> Result<Arc<[ExpertWeights]>, ModelError> {
    let (e, i, h) = (s.experts, s.inter, hidden);
    let v: Vec<ExpertWeights> = if ld.has(&format!("{m}.experts.0.gate_proj.weight")) {
        (0..e)
            .map(|x| {
                Ok(ExpertWeights {
                    gate: ld.matrix(&format!("{m}.experts.{x}.gate_proj"), i, h)?,
                    up: ld.matrix(&format!("{m}.experts.{x}.up_proj"), i, h)?,
                    down: ld.matrix(&format!("{m}.experts.{x}.down_proj"), h, i)?,
                })
            })
            .collect::<Result<_, ModelError>>()?
    } else if ld.has(&format!("{m}.switch_mlp.gate_proj.weight")) {
        let g = ld.stacked(&format!("{m}.switch_mlp.gate_proj"), "weight", e, i, h)?;
        let u = ld.stacked(&format!("{m}.switch_mlp.up_proj"), "weight", e, i, h)?;
        let d = ld.stacked(&format!("{m}.switch_mlp.down_proj"), "weight", e, h, i)?;
        (0..e)
            .map(|x| ExpertWeights {
                gate: g[x],
                up: u[x],
                down: d[x],
            })
            .collect()
    } else {
        let gu = ld.stacked(&format!("{m}.experts"), "gate_up_proj", e, 2 * i, h)?;
        let d = ld.stacked(&format!("{m}.experts"), "down_proj", e, h, i)?;
        (0..e)
            .map(|x| ExpertWeights {
                gate: Loader::row_slice(&gu[x], 0, i),
                up: Loader::row_slice(&gu[x], i, i),
                down: d[x],
            })
            .collect()
    };
    Ok(v.into())
}

pub fn mlp(ld: &Loader, m: &str, inter: usize, hidden: usize) -> Result<Mlp, ModelError> {
    Ok(Mlp {
        gate: ld.matrix(&format!("{m}.gate_proj"), inter, hidden)?,
        up: ld.matrix(&format!("{m}.up_proj"), inter, hidden)?,
        down: ld.matrix(&format!("{m}.down_proj"), hidden, inter)?,
    })
}

pub fn moe(
    ld: &Loader,
    m: &str,
    spec: &ModelSpec,
    store: Option<&Arc<crate::packed::ExpertStore>>,
) -> Result<MoeWeights, ModelError> {
    let s = &spec.moe;
    let routed = match store {
        Some(st) => Experts::Streamed(st.clone()),
        None => Experts::Resident(experts(ld, m, s, spec.hidden)?),
    };
    let shared = match s.shared_inter {
        Some(si) => Some((
            mlp(ld, &format!("{m}.shared_expert"), si, spec.hidden)?,
            ld.matrix(&format!("{m}.shared_expert_gate"), 1, spec.hidden)?,
        )),
        None => None,
    };
    let with_shared = fuse_shared(&routed, shared.as_ref().map(|(mlp, _)| mlp));
    Ok(MoeWeights {
        router: ld.matrix(&format!("{m}.gate"), s.experts, spec.hidden)?,
        experts: routed,
        shared,
        with_shared,
    })
}

/// The resident routed experts with the shared expert appended as one more, when the shared
/// expert has the routed experts' shapes and formats (Qwen3-Next, Qwen3.5-MoE): the block then
/// runs as one expert op with k + 1 slots (see `Op::RouterTopK::shared_gate`). Streamed
/// experts keep the shared expert apart (it stays resident).
fn fuse_shared(routed: &Experts, shared: Option<&Mlp>) -> Option<Arc<[ExpertWeights]>> {
    let (Experts::Resident(experts), Some(mlp)) = (routed, shared) else {
        return None;
    };
    let first = experts.first()?;
    let same = |a: &moeflux_core::Matrix, b: &moeflux_core::Matrix| {
        a.rows == b.rows && a.cols == b.cols && a.format == b.format
    };
    if !(same(&mlp.gate, &first.gate) && same(&mlp.up, &first.up) && same(&mlp.down, &first.down)) {
        return None;
    }
    let mut all: Vec<ExpertWeights> = experts.to_vec();
    all.push(ExpertWeights {
        gate: mlp.gate,
        up: mlp.up,
        down: mlp.down,
    });
    Some(all.into())
}

pub fn attention(
    ld: &Loader,
    a: &str,
    spec: &ModelSpec,
    with_norms: bool,
) -> Result<AttnWeights, ModelError> {
    let s = &spec.attn;
    let q_rows = s.heads * s.head_dim * if s.output_gate { 2 } else { 1 };
    let kv_rows = s.kv_heads * s.head_dim;
    let norm = |n: &str| -> Result<Option<Vector>, ModelError> {
        let name = format!("{a}.{n}.weight");
        if with_norms || ld.has(&name) {
            Ok(Some(ld.vector(&name, s.head_dim)?))
        } else {
            Ok(None)
        }
    };
    Ok(AttnWeights {
        q: ld.matrix(&format!("{a}.q_proj"), q_rows, spec.hidden)?,
        k: ld.matrix(&format!("{a}.k_proj"), kv_rows, spec.hidden)?,
        v: ld.matrix(&format!("{a}.v_proj"), kv_rows, spec.hidden)?,
        o: ld.matrix(&format!("{a}.o_proj"), spec.hidden, s.heads * s.head_dim)?,
        q_norm: norm("q_norm")?,
        k_norm: norm("k_norm")?,
    })
}
