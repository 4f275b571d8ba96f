//! `out[n, rows] = x[n, cols] @ W^T` for every weight format.
//!
//! Work is split over output rows. With one token the row is consumed straight from
//! the stored bytes ([`MatView::dot_row`]); with several, each row is dequantized once
//! and reused for every token, so quantized prefill pays the unpacking once per row.

use rayon::prelude::*;

use super::weights::{MatView, dot};

/// Rows per rayon task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

pub fn matmul(x: &[f32], n: usize, w: &MatView<'_>, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let x = &x[..n * cols];
    let out = &mut out[..n * rows];
    if n == 1 {
        let xsum = w.group_sums(x);
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each_init(
            || vec![0f32; cols],
            |scratch, (c, chunk)| {
                for (i, o) in chunk.iter_mut().enumerate() {
                    *o = w.dot_row(c * ROWS_PER_TASK + i, x, &xsum, scratch);
                }
            },
        );
        return;
    }
    // Row-major result per weight row, transposed at the end.
    let mut t = vec![0f32; rows * n];
    t.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each_init(
        || vec![0f32; cols],
        |wrow, (c, chunk)| {
            for (i, orow) in chunk.chunks_mut(n).enumerate() {
                w.row_f32(c * ROWS_PER_TASK + i, wrow);
                for (tok, o) in orow.iter_mut().enumerate() {
                    *o = dot(wrow, &x[tok * cols..(tok + 1) * cols]);
                }
            }
        },
    );
    out.par_chunks_mut(rows).enumerate().for_each(|(tok, orow)| {
        for (r, o) in orow.iter_mut().enumerate() {
            *o = t[r * n + tok];
        }
    });
}

/// Matrix-vector product for a single row of input, run on the calling thread (used
/// inside already-parallel loops such as the experts).
pub fn matvec_serial(x: &[f32], w: &MatView<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    scratch.resize(w.cols, 0.0);
    let xsum = w.group_sums(x);
    for (r, o) in out[..w.rows].iter_mut().enumerate() {
        *o = w.dot_row(r, x, &xsum, scratch);
    }
}

/// Serial matmul over a small token batch (`n` rows of `x`), dequantizing each weight
/// row once.
pub fn matmul_serial(x: &[f32], n: usize, w: &MatView<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    if n == 1 {
        return matvec_serial(x, w, out, scratch);
    }
    scratch.resize(w.cols, 0.0);
    for r in 0..w.rows {
        w.row_f32(r, scratch);
        for tok in 0..n {
            out[tok * w.rows + r] = dot(scratch, &x[tok * w.cols..(tok + 1) * w.cols]);
        }
    }
}
