//! Sparse MoE block: softmax router, top-k routed SwiGLU experts, and the optional shared
//! expert scaled by `sigmoid(shared_expert_gate(x))`. Also the dense SwiGLU MLP.

use std::sync::Arc;

use moeflux_core::{Act, BufId, ExpertWeights, Idx, Lifetime, Matrix, Op, PoolExt};

use crate::arch::Experts;

use crate::builder::Builder;
use crate::config::MoeSpec;
use crate::error::ModelError;

pub struct Mlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

pub struct MoeWeights {
    pub router: Matrix,
    pub experts: Experts,
    pub shared: Option<(Mlp, Matrix)>,
    /// Resident experts plus the shared expert as the last one, when shapes and formats
    /// allow running the whole block as one expert op.
    pub with_shared: Option<Arc<[ExpertWeights]>>,
}

pub fn emit_mlp(
    b: &mut Builder,
    x: BufId<Act>,
    w: &Mlp,
    role: &'static str,
) -> Result<BufId<Act>, ModelError> {
    let g = b.matmul(x, &w.gate, role)?;
    let u = b.matmul(x, &w.up, role)?;
    let len = b.n * w.gate.rows;
    b.push(
        role,
        Op::SwiGlu {
            gate: g,
            up: u,
            out: g,
            len,
        },
    );
    b.matmul(g, &w.down, role)
}

pub fn emit(
    b: &mut Builder,
    x: BufId<Act>,
    w: &MoeWeights,
    s: &MoeSpec,
    hidden: usize,
) -> Result<BufId<Act>, ModelError> {
    let n = b.n;
    let logits = b.matmul(x, &w.router, "router")?;
    // Shared expert as slot k of every token when its shape allows (`with_shared`): one
    // expert op, no separate shared MLP, gate and sum.
    let fused = match (&w.with_shared, &w.shared) {
        (Some(all), Some((_, gate))) => {
            Some((all.clone(), b.matmul(x, gate, "shared_expert_gate")?))
        }
        _ => None,
    };
    let k = s.top_k + fused.is_some() as usize;
    let idx: BufId<Idx> = b
        .pool()
        .alloc(n * k * 4, "route_idx", Lifetime::Transient)?;
    let weights = b.act(k, "route_w")?;
    b.push(
        "router_topk",
        Op::RouterTopK {
            logits,
            idx,
            weights,
            n,
            experts: s.experts,
            k: s.top_k,
            renorm: s.renorm,
            shared_gate: fused.as_ref().map(|(_, g)| *g),
        },
    );
    let out = b.act(hidden, "moe_out")?;
    let op = match (&fused, &w.experts) {
        (Some((experts, _)), _) | (None, Experts::Resident(experts)) => Op::MoeExperts {
            x,
            idx,
            weights,
            experts: experts.clone(),
            out,
            n,
            k,
            hidden,
            inter: s.inter,
        },
        (None, Experts::Streamed(store)) => Op::MoeExpertsStreamed {
            x,
            idx,
            weights,
            store: store.clone(),
            layer: b.layer().unwrap_or(0),
            out,
            n,
            k,
            hidden,
            inter: s.inter,
        },
    };
    b.push("experts", op);
    if let (None, Some((mlp, gate))) = (&fused, &w.shared) {
        let y = emit_mlp(b, x, mlp, "shared_expert")?;
        let g = b.matmul(x, gate, "shared_expert_gate")?;
        b.push(
            "shared_gate",
            Op::SigmoidGate {
                x: y,
                gate: g,
                out: y,
                n,
                width: hidden,
                gate_width: 1,
            },
        );
        b.push(
            "moe_sum",
            Op::Add {
                a: out,
                b: y,
                out,
                len: n * hidden,
            },
        );
    }
    Ok(out)
}
