//! Token embedding lookup from a (possibly quantized) table.

use rayon::prelude::*;

use super::weights::MatView;

/// `tokens` were range-checked against the vocabulary by the session before upload.
pub fn embed(table: &MatView<'_>, tokens: &[u32], out: &mut [f32]) {
    let d = table.cols;
    out.par_chunks_mut(d)
        .zip(tokens.par_iter())
        .for_each(|(o, &t)| {
            table.row_f32(t as usize, o);
        });
}
