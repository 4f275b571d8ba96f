//! KV-cache append and causal GQA attention over the cache.
//!
//! Caches are `[max_ctx, kv_heads * head_dim]`; query `i` of the batch sits at absolute
//! position `pos[i]` and attends rows `0..=pos[i]`, which makes prefill and decode the
//! same computation. Positions past the cache are not stored, and a query attends at most
//! the whole cache (as the CUDA kernels do); the session never asks for either.

use rayon::prelude::*;

use super::weights::dot;

pub fn kv_append(
    k: &[f32],
    v: &[f32],
    pos: &[u32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    kv_dim: usize,
) {
    let max_ctx = k_cache.len() / kv_dim.max(1);
    for (t, &p) in pos.iter().enumerate() {
        let p = p as usize;
        if p >= max_ctx {
            continue;
        }
        k_cache[p * kv_dim..(p + 1) * kv_dim].copy_from_slice(&k[t * kv_dim..(t + 1) * kv_dim]);
        v_cache[p * kv_dim..(p + 1) * kv_dim].copy_from_slice(&v[t * kv_dim..(t + 1) * kv_dim]);
    }
}

pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

pub fn attention(
    q: &[f32],
    pos: &[u32],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    s: &AttnShape,
) {
    let hd = s.head_dim;
    let kv_dim = s.kv_heads * hd;
    let group = s.heads / s.kv_heads;
    let max_ctx = k_cache.len() / kv_dim.max(1);
    out.par_chunks_mut(hd).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (row, o)| {
            let (t, h) = (row / s.heads, row % s.heads);
            let kvh = h / group;
            let qv = &q[row * hd..(row + 1) * hd];
            let len = (pos[t] as usize + 1).min(max_ctx);
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..len {
                let kr = &k_cache[j * kv_dim + kvh * hd..j * kv_dim + (kvh + 1) * hd];
                let sc = dot(qv, kr) * s.scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut denom = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                denom += *sc;
            }
            o.fill(0.0);
            for (j, w) in scores.iter().enumerate() {
                let vr = &v_cache[j * kv_dim + kvh * hd..j * kv_dim + (kvh + 1) * hd];
                let w = w / denom;
                for (a, b) in o.iter_mut().zip(vr) {
                    *a += w * b;
                }
            }
        },
    );
}
