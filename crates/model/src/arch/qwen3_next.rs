//! Qwen3-Next and Qwen3.5-MoE: hybrid Gated DeltaNet / gated-attention layers, MoE with a
//! gated shared expert in every layer.
//!
//! Traps handled here: RMS-norm weights are stored as `w - 1` by transformers (the model
//! multiplies by `1 + w`) but already shifted in MLX conversions (recognised by their
//! safetensors `format: mlx` stamp or their `switch_mlp` experts); Qwen3-Next fuses `in_proj_qkvz` grouped per key head while
//! Qwen3.5 splits it.

use crate::arch::{self, Ffn, LayerWeights, Mixer, ModelWeights};
use crate::blocks::linear_attn::{InProj, LinearWeights};
use crate::config::{LayerKind, ModelSpec};
use crate::error::ModelError;
use crate::weights::Loader;

pub fn load(
    ld: &Loader,
    spec: &ModelSpec,
    store: Option<&std::sync::Arc<crate::packed::ExpertStore>>,
) -> Result<ModelWeights, ModelError> {
    let p = arch::text_prefix(ld)?;
    let (embed, lm_head, final_norm) = arch::outer(ld, spec, p)?;
    // MLX writers stamp their files; older conversions are recognised by `switch_mlp`.
    let mlx_layout = ld.src.format.as_deref() == Some("mlx")
        || ld.has(&format!("{p}layers.0.mlp.switch_mlp.gate_proj.weight"));
    let h = spec.hidden;
    let mut layers = Vec::new();
    for (l, kind) in spec.layers.iter().enumerate() {
        let base = format!("{p}layers.{l}");
        let mixer = match kind {
            LayerKind::FullAttention => Mixer::Attn(arch::attention(
                ld,
                &format!("{base}.self_attn"),
                spec,
                true,
            )?),
            LayerKind::LinearAttention => {
                let s = spec
                    .linear
                    .as_ref()
                    .expect("linear spec exists when a layer is linear");
                let la = format!("{base}.linear_attn");
                let in_proj = if ld.has(&format!("{la}.in_proj_qkvz.weight")) {
                    InProj::Fused {
                        qkvz: ld.matrix(
                            &format!("{la}.in_proj_qkvz"),
                            2 * s.key_dim() + 2 * s.value_dim(),
                            h,
                        )?,
                        ba: ld.matrix(&format!("{la}.in_proj_ba"), 2 * s.v_heads, h)?,
                    }
                } else {
                    InProj::Split {
                        qkv: ld.matrix(&format!("{la}.in_proj_qkv"), s.conv_dim(), h)?,
                        z: ld.matrix(&format!("{la}.in_proj_z"), s.value_dim(), h)?,
                        b: ld.matrix(&format!("{la}.in_proj_b"), s.v_heads, h)?,
                        a: ld.matrix(&format!("{la}.in_proj_a"), s.v_heads, h)?,
                    }
                };
                Mixer::Linear(LinearWeights {
                    in_proj,
                    conv: ld
                        .vector(&format!("{la}.conv1d.weight"), s.conv_dim() * s.conv_kernel)?,
                    a_log: ld.vector(&format!("{la}.A_log"), s.v_heads)?,
                    dt_bias: ld.vector(&format!("{la}.dt_bias"), s.v_heads)?,
                    norm: ld.vector(&format!("{la}.norm.weight"), s.dv)?,
                    out: ld.matrix(&format!("{la}.out_proj"), h, s.value_dim())?,
                })
            }
        };
        layers.push(LayerWeights {
            input_norm: ld.vector(&format!("{base}.input_layernorm.weight"), h)?,
            post_norm: ld.vector(&format!("{base}.post_attention_layernorm.weight"), h)?,
            mixer,
            ffn: Ffn::Moe(arch::moe(ld, &format!("{base}.mlp"), spec, store)?),
        });
    }
    Ok(ModelWeights {
        embed,
        lm_head,
        final_norm,
        layers,
        norm_offset: if mlx_layout { 0.0 } else { 1.0 },
    })
}
