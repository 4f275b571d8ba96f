//! Router top-k and the routed experts (SwiGLU), grouped by expert.
//!
//! Tokens are bucketed per expert so each expert's weights are read once per batch;
//! results land in per-(token, slot) rows and are summed in slot order, so the output
//! does not depend on thread scheduling.

use moeflux_core::ExpertWeights;
use rayon::prelude::*;

use super::matmul::matmul_serial;
use super::qdot::{self, Layout};
use super::rms_norm::silu;
use super::weights::MatView;

pub fn router_topk(logits: &[f32], idx: &mut [u32], weights: &mut [f32], experts: usize, k: usize, renorm: bool) {
    for ((l, ix), w) in logits.chunks_exact(experts).zip(idx.chunks_exact_mut(k)).zip(weights.chunks_exact_mut(k)) {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = p.iter().sum();
        let mut order: Vec<u32> = (0..experts as u32).collect();
        // stable: equal probabilities keep the lower index first
        order.sort_by(|a, b| p[*b as usize].total_cmp(&p[*a as usize]));
        let mut tot = 0f32;
        for j in 0..k {
            ix[j] = order[j];
            w[j] = p[order[j] as usize] / sum;
            tot += w[j];
        }
        if renorm {
            w.iter_mut().for_each(|v| *v /= tot);
        }
    }
}

/// Resolves an expert's stored matrices.
pub trait ExpertViews: Sync {
    fn views(&self, e: &ExpertWeights) -> [MatView<'_>; 3];
}

/// Per-thread buffers of [`moe_experts`], reused across experts.
#[derive(Default)]
struct Scratch {
    xs: Vec<f32>,
    prep: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

struct PairsOut(*mut f32);
// SAFETY: each (token, slot) row is written by the one expert it was routed to.
unsafe impl Sync for PairsOut {}
unsafe impl Send for PairsOut {}

#[allow(clippy::too_many_arguments)]
pub fn moe_experts(
    x: &[f32],
    idx: &[u32],
    weights: &[f32],
    experts: &[ExpertWeights],
    views: &dyn ExpertViews,
    out: &mut [f32],
    n: usize,
    k: usize,
    hidden: usize,
    inter: usize,
) {
    // bucket (token, slot) pairs by expert
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); experts.len()];
    for (pair, &e) in idx[..n * k].iter().enumerate() {
        buckets[e as usize].push(pair);
    }
    let active: Vec<(usize, &Vec<usize>)> = buckets.iter().enumerate().filter(|(_, b)| !b.is_empty()).collect();
    let mut per_pair = vec![0f32; n * k * hidden];
    let dst = PairsOut(per_pair.as_mut_ptr());
    active.par_iter().for_each_init(Scratch::default, |s, (e, pairs)| {
        let [g, u, d] = views.views(&experts[*e]);
        let m = pairs.len();
        s.xs.clear();
        for &p in pairs.iter() {
            let t = p / k;
            s.xs.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        // gate and up read the same activations: lay them out once
        let lay = Layout::new(&g, m);
        qdot::prepare(&s.xs, &lay, &mut s.prep);
        s.gate.resize(m * inter, 0.0);
        s.up.resize(m * inter, 0.0);
        qdot::rows_serial(&g, &lay, &s.prep, &mut s.gate);
        if Layout::new(&u, m) == lay {
            qdot::rows_serial(&u, &lay, &s.prep, &mut s.up);
        } else {
            matmul_serial(&s.xs, m, &u, &mut s.up, &mut s.prep);
        }
        for (gv, uv) in s.gate.iter_mut().zip(&s.up) {
            *gv = silu(*gv) * uv;
        }
        s.xs.resize(m * hidden, 0.0);
        matmul_serial(&s.gate, m, &d, &mut s.xs, &mut s.prep);
        let dst = &dst;
        for (r, &p) in pairs.iter().enumerate() {
            // SAFETY: `p < n * k`, and pair `p` belongs to this expert only.
            unsafe { std::ptr::copy_nonoverlapping(s.xs[r * hidden..].as_ptr(), dst.0.add(p * hidden), hidden) };
        }
    });
    out[..n * hidden].fill(0.0);
    for t in 0..n {
        let o = &mut out[t * hidden..(t + 1) * hidden];
        for j in 0..k {
            let w = weights[t * k + j];
            let y = &per_pair[(t * k + j) * hidden..(t * k + j + 1) * hidden];
            for (a, b) in o.iter_mut().zip(y) {
                *a += w * b;
            }
        }
    }
}
