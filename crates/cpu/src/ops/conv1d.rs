//! Depthwise causal conv1d over time with a carried window, then SiLU.
//!
//! `weight[c * kernel + j]` multiplies the input `kernel - 1 - j` steps back (tap
//! `kernel - 1` is the current token). `state` holds the last `kernel - 1` input rows,
//! oldest first, and is advanced past the batch.

use super::rms_norm::silu;

pub fn conv1d_silu(
    x: &[f32],
    state: &mut [f32],
    w: &[f32],
    out: &mut [f32],
    n: usize,
    channels: usize,
    kernel: usize,
) {
    let hist = kernel - 1;
    // window = state rows followed by the batch rows
    let row = |i: usize, c: usize, state: &[f32]| -> f32 {
        if i < hist {
            state[i * channels + c]
        } else {
            x[(i - hist) * channels + c]
        }
    };
    for t in 0..n {
        for c in 0..channels {
            let mut acc = 0f32;
            for j in 0..kernel {
                acc += w[c * kernel + j] * row(t + j, c, state);
            }
            out[t * channels + c] = silu(acc);
        }
    }
    // new state: the last `hist` rows of the window
    let total = hist + n;
    let new: Vec<f32> = (total - hist..total)
        .flat_map(|i| (0..channels).map(move |c| (i, c)))
        .map(|(i, c)| row(i, c, state))
        .collect();
    state[..hist * channels].copy_from_slice(&new);
}
