//! Router top-k and the routed experts (SwiGLU), grouped by expert.
//!
//! Tokens are bucketed per expert so each expert's weights are read once per batch;
//! results land in per-(token, slot) rows and are summed in slot order, so the output
//! does not depend on thread scheduling.

use moeflux_core::ExpertWeights;
use rayon::prelude::*;

use super::matmul::matmul_serial;
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
    let results: Vec<(Vec<usize>, Vec<f32>)> = active
        .par_iter()
        .map(|(e, pairs)| {
            let [g, u, d] = views.views(&experts[*e]);
            let m = pairs.len();
            let mut xs = vec![0f32; m * hidden];
            for (r, &p) in pairs.iter().enumerate() {
                let t = p / k;
                xs[r * hidden..(r + 1) * hidden].copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
            }
            let mut scratch = Vec::new();
            let mut gate = vec![0f32; m * inter];
            let mut up = vec![0f32; m * inter];
            matmul_serial(&xs, m, &g, &mut gate, &mut scratch);
            matmul_serial(&xs, m, &u, &mut up, &mut scratch);
            for (gv, uv) in gate.iter_mut().zip(&up) {
                *gv = silu(*gv) * uv;
            }
            let mut y = vec![0f32; m * hidden];
            matmul_serial(&gate, m, &d, &mut y, &mut scratch);
            ((*pairs).clone(), y)
        })
        .collect();
    let mut per_pair = vec![0f32; n * k * hidden];
    for (pairs, y) in &results {
        for (r, &p) in pairs.iter().enumerate() {
            per_pair[p * hidden..(p + 1) * hidden].copy_from_slice(&y[r * hidden..(r + 1) * hidden]);
        }
    }
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
