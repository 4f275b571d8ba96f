//! RMS norms: plain (also per head, as rows of `head_dim`) and gated by `silu(gate)`.

use rayon::prelude::*;

#[inline]
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

pub fn rms_norm(x: &[f32], w: &[f32], out: &mut [f32], dim: usize, eps: f32, offset: f32) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, xr)| {
            let r = inv_rms(xr, eps);
            for ((o, v), g) in o.iter_mut().zip(xr).zip(w) {
                *o = v * r * (g + offset);
            }
        });
}

pub fn gated_rms_norm(
    x: &[f32],
    gate: &[f32],
    w: &[f32],
    out: &mut [f32],
    dim: usize,
    eps: f32,
    offset: f32,
) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(gate.par_chunks(dim))
        .for_each(|((o, xr), gr)| {
            let r = inv_rms(xr, eps);
            for (((o, v), g), z) in o.iter_mut().zip(xr).zip(w).zip(gr) {
                *o = v * r * (g + offset) * silu(*z);
            }
        });
}

#[inline]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}
