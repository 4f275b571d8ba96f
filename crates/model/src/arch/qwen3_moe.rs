//! Qwen3-MoE: full attention with per-head q/k norms in every layer, routed experts
//! without a shared expert (dense MLP on `mlp_only_layers`), plain `w` RMS norms.

use crate::arch::{self, Ffn, LayerWeights, Mixer, ModelWeights};
use crate::config::{MlpKind, ModelSpec};
use crate::error::ModelError;
use crate::weights::Loader;

pub fn load(
    ld: &Loader,
    spec: &ModelSpec,
    store: Option<&std::sync::Arc<crate::packed::ExpertStore>>,
) -> Result<ModelWeights, ModelError> {
    let p = arch::text_prefix(ld)?;
    let (embed, lm_head, final_norm) = arch::outer(ld, spec, p)?;
    let h = spec.hidden;
    let mut layers = Vec::new();
    for l in 0..spec.layers.len() {
        let base = format!("{p}layers.{l}");
        let ffn = match spec.mlp[l] {
            MlpKind::Moe => Ffn::Moe(arch::moe(ld, &format!("{base}.mlp"), spec, store)?),
            MlpKind::Dense => {
                Ffn::Dense(arch::mlp(ld, &format!("{base}.mlp"), spec.dense_inter, h)?)
            }
        };
        layers.push(LayerWeights {
            input_norm: ld.vector(&format!("{base}.input_layernorm.weight"), h)?,
            post_norm: ld.vector(&format!("{base}.post_attention_layernorm.weight"), h)?,
            mixer: Mixer::Attn(arch::attention(
                ld,
                &format!("{base}.self_attn"),
                spec,
                false,
            )?),
            ffn,
        });
    }
    Ok(ModelWeights {
        embed,
        lm_head,
        final_norm,
        layers,
        norm_offset: 0.0,
    })
}
