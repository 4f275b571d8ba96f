//! Gated DeltaNet (linear attention) block.
//!
//! Two projection layouts reach the same core:
//! * Qwen3-Next: `in_proj_qkvz` rows are grouped per *key* head as
//!   `[q (dk) | k (dk) | v (r*dv) | z (r*dv)]` with `r = v_heads / k_heads`, and
//!   `in_proj_ba` as `[b (r) | a (r)]`; they are regrouped into the conv input order
//!   `[all q | all k | all v]`.
//! * Qwen3.5: separate `in_proj_qkv` (already in conv order), `in_proj_z`, `in_proj_b`,
//!   `in_proj_a`.

use moeflux_core::{Act, BufId, ColPart, Matrix, Op, State, Vector};

use crate::builder::Builder;
use crate::config::LinearSpec;
use crate::error::ModelError;

pub enum InProj {
    Fused {
        qkvz: Matrix,
        ba: Matrix,
    },
    Split {
        qkv: Matrix,
        z: Matrix,
        b: Matrix,
        a: Matrix,
    },
}

pub struct LinearWeights {
    pub in_proj: InProj,
    pub conv: Vector,
    pub a_log: Vector,
    pub dt_bias: Vector,
    pub norm: Vector,
    pub out: Matrix,
}

#[derive(Clone, Copy, Debug)]
pub struct LinearState {
    pub conv: BufId<State>,
    pub delta: BufId<State>,
}

pub fn emit(
    b: &mut Builder,
    x: BufId<Act>,
    w: &LinearWeights,
    st: LinearState,
    s: &LinearSpec,
    eps: f32,
) -> Result<BufId<Act>, ModelError> {
    let n = b.n;
    let r = s.v_heads / s.k_heads;
    let (kd, vd, cd) = (s.key_dim(), s.value_dim(), s.conv_dim());
    let (mixed, z, beta_in, a_in) = match &w.in_proj {
        InProj::Fused { qkvz, ba } => {
            let p = b.matmul(x, qkvz, "in_proj_qkvz")?;
            let pba = b.matmul(x, ba, "in_proj_ba")?;
            let mixed = b.act(cd, "mixed_qkv")?;
            let z = b.act(vd, "z")?;
            let parts = vec![
                ColPart {
                    out: mixed,
                    width: s.dk,
                    out_width: cd,
                    out_offset: 0,
                },
                ColPart {
                    out: mixed,
                    width: s.dk,
                    out_width: cd,
                    out_offset: kd,
                },
                ColPart {
                    out: mixed,
                    width: r * s.dv,
                    out_width: cd,
                    out_offset: 2 * kd,
                },
                ColPart {
                    out: z,
                    width: r * s.dv,
                    out_width: vd,
                    out_offset: 0,
                },
            ];
            b.push(
                "qkvz_split",
                Op::ScatterCols {
                    x: p,
                    n,
                    groups: s.k_heads,
                    parts,
                },
            );
            let bb = b.act(s.v_heads, "b")?;
            let aa = b.act(s.v_heads, "a")?;
            let parts = vec![
                ColPart {
                    out: bb,
                    width: r,
                    out_width: s.v_heads,
                    out_offset: 0,
                },
                ColPart {
                    out: aa,
                    width: r,
                    out_width: s.v_heads,
                    out_offset: 0,
                },
            ];
            b.push(
                "ba_split",
                Op::ScatterCols {
                    x: pba,
                    n,
                    groups: s.k_heads,
                    parts,
                },
            );
            (mixed, z, bb, aa)
        }
        InProj::Split { qkv, z, b: pb, a } => {
            let mixed = b.matmul(x, qkv, "in_proj_qkv")?;
            let z = b.matmul(x, z, "in_proj_z")?;
            let bb = b.matmul(x, pb, "in_proj_b")?;
            let aa = b.matmul(x, a, "in_proj_a")?;
            (mixed, z, bb, aa)
        }
    };
    let conv = b.act(cd, "conv_out")?;
    b.push(
        "conv1d",
        Op::Conv1dSilu {
            x: mixed,
            state: st.conv,
            weight: w.conv,
            out: conv,
            n,
            channels: cd,
            kernel: s.conv_kernel,
        },
    );
    let core = b.act(vd, "delta_out")?;
    b.push(
        "gated_delta",
        Op::GatedDelta {
            qkv: conv,
            a: a_in,
            b: beta_in,
            a_log: w.a_log,
            dt_bias: w.dt_bias,
            state: st.delta,
            out: core,
            n,
            k_heads: s.k_heads,
            v_heads: s.v_heads,
            dk: s.dk,
            dv: s.dv,
        },
    );
    // The gated norm's weight is stored as-is (initialised to ones) in every layout.
    b.push(
        "norm",
        Op::GatedRmsNorm {
            x: core,
            gate: z,
            weight: w.norm,
            out: core,
            rows: n * s.v_heads,
            dim: s.dv,
            eps,
            offset: 0.0,
        },
    );
    b.matmul(core, &w.out, "out_proj")
}
