//! Elementwise ops and the column scatter used to split fused projections.

use moeflux_core::ColPart;

use super::rms_norm::{sigmoid, silu};

/// `out += b` (residual add in place).
pub fn add_into(out: &mut [f32], b: &[f32]) {
    for (o, v) in out.iter_mut().zip(b) {
        *o += v;
    }
}

pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(*g) * u;
    }
}

/// `x` may be `out` itself (pass `None`).
pub fn sigmoid_gate(
    x: Option<&[f32]>,
    gate: &[f32],
    out: &mut [f32],
    width: usize,
    gate_width: usize,
) {
    let rows = out.len() / width;
    for r in 0..rows {
        for j in 0..width {
            let g = if gate_width == 1 {
                gate[r]
            } else {
                gate[r * width + j]
            };
            let v = match x {
                Some(x) => x[r * width + j],
                None => out[r * width + j],
            };
            out[r * width + j] = v * sigmoid(g);
        }
    }
}

/// Splits each row of `x` into the parts (see `Op::ScatterCols`).
pub fn scatter_cols(
    x: &[f32],
    n: usize,
    groups: usize,
    parts: &[ColPart],
    outs: &mut [&mut [f32]],
) {
    let row: usize = parts.iter().map(|p| p.width).sum::<usize>() * groups;
    for t in 0..n {
        let src = &x[t * row..(t + 1) * row];
        let mut at = 0;
        for g in 0..groups {
            for (p, out) in parts.iter().zip(outs.iter_mut()) {
                let dst = t * p.out_width + p.out_offset + g * p.width;
                out[dst..dst + p.width].copy_from_slice(&src[at..at + p.width]);
                at += p.width;
            }
        }
    }
}
