//! Full (softmax) attention with GQA, per-head q/k RMS norms, partial RoPE and the
//! optional sigmoid output gate of Qwen3-Next / Qwen3.5 (q_proj emits `[q | gate]` per head).

use moeflux_core::{Act, BufId, Cache, ColPart, Matrix, Op, Vector};

use crate::builder::Builder;
use crate::config::AttnSpec;
use crate::error::ModelError;

pub struct AttnWeights {
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub o: Matrix,
    pub q_norm: Option<Vector>,
    pub k_norm: Option<Vector>,
}

/// One layer's KV cache.
#[derive(Clone, Copy, Debug)]
pub struct KvCache {
    pub k: BufId<Cache>,
    pub v: BufId<Cache>,
    pub max_ctx: usize,
}

pub struct AttnParams<'a> {
    pub spec: &'a AttnSpec,
    pub eps: f32,
    pub norm_offset: f32,
}

pub fn emit(
    b: &mut Builder,
    x: BufId<Act>,
    w: &AttnWeights,
    kv: KvCache,
    p: &AttnParams,
) -> Result<BufId<Act>, ModelError> {
    let s = p.spec;
    let (n, hd) = (b.n, s.head_dim);
    let q_width = s.heads * hd;
    let kv_dim = s.kv_heads * hd;
    let (q, gate) = if s.output_gate {
        let qg = b.matmul(x, &w.q, "q_proj")?;
        let q = b.act(q_width, "q")?;
        let gate = b.act(q_width, "attn_gate")?;
        let parts = vec![
            ColPart {
                out: q,
                width: hd,
                out_width: q_width,
                out_offset: 0,
            },
            ColPart {
                out: gate,
                width: hd,
                out_width: q_width,
                out_offset: 0,
            },
        ];
        b.push(
            "q_split",
            Op::ScatterCols {
                x: qg,
                n,
                groups: s.heads,
                parts,
            },
        );
        (q, Some(gate))
    } else {
        (b.matmul(x, &w.q, "q_proj")?, None)
    };
    let k = b.matmul(x, &w.k, "k_proj")?;
    let v = b.matmul(x, &w.v, "v_proj")?;
    if let Some(qn) = &w.q_norm {
        b.push(
            "q_norm",
            Op::RmsNorm {
                x: q,
                weight: *qn,
                out: q,
                rows: n * s.heads,
                dim: hd,
                eps: p.eps,
                offset: p.norm_offset,
            },
        );
    }
    if let Some(kn) = &w.k_norm {
        b.push(
            "k_norm",
            Op::RmsNorm {
                x: k,
                weight: *kn,
                out: k,
                rows: n * s.kv_heads,
                dim: hd,
                eps: p.eps,
                offset: p.norm_offset,
            },
        );
    }
    let pos = b.pos;
    if s.rotary_dim > 0 {
        b.push(
            "rope_q",
            Op::Rope {
                x: q,
                pos,
                n,
                heads: s.heads,
                head_dim: hd,
                rotary_dim: s.rotary_dim,
                theta: s.rope_theta,
            },
        );
        b.push(
            "rope_k",
            Op::Rope {
                x: k,
                pos,
                n,
                heads: s.kv_heads,
                head_dim: hd,
                rotary_dim: s.rotary_dim,
                theta: s.rope_theta,
            },
        );
    }
    b.push(
        "kv_append",
        Op::KvAppend {
            k,
            v,
            pos,
            k_cache: kv.k,
            v_cache: kv.v,
            n,
            kv_dim,
            max_ctx: kv.max_ctx,
        },
    );
    let o = b.act(q_width, "attn_out")?;
    b.push(
        "attention",
        Op::Attention {
            q,
            pos,
            k_cache: kv.k,
            v_cache: kv.v,
            out: o,
            n,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            max_ctx: kv.max_ctx,
        },
    );
    if let Some(gate) = gate {
        b.push(
            "output_gate",
            Op::SigmoidGate {
                x: o,
                gate,
                out: o,
                n,
                width: q_width,
                gate_width: q_width,
            },
        );
    }
    b.matmul(o, &w.o, "o_proj")
}
