//! Routed experts fetched through an [`ExpertProvider`] (packed files behind a bounded
//! cache). Experts are processed in waves no larger than the provider's budget, so the
//! records held at once never exceed it; within a wave, fetches (disk reads on a miss)
//! and expert math run in parallel. The per-expert math and the slot-order combine are
//! `moe.rs`'s, so the output is bit-identical to the resident path whatever the budget.

use moeflux_core::{CoreError, ExpertProvider, Matrix};
use rayon::prelude::*;

use super::moe::{Scratch, combine, run_expert, run_expert_par};
use super::weights::MatView;

fn view<'a>(rec: &'a [u8], m: &Matrix) -> MatView<'a> {
    MatView {
        data: &rec[m.data.offset..],
        scales: m.scales.map_or(&[][..], |s| &rec[s.offset..]),
        biases: m.biases.map_or(&[][..], |b| &rec[b.offset..]),
        rows: m.rows,
        cols: m.cols,
        format: m.format,
    }
}

#[allow(clippy::too_many_arguments)]
pub fn moe_experts_streamed(
    x: &[f32],
    idx: &[u32],
    weights: &[f32],
    store: &dyn ExpertProvider,
    layer: usize,
    out: &mut [f32],
    n: usize,
    k: usize,
    hidden: usize,
    inter: usize,
) -> Result<(), CoreError> {
    let layout = store.layout();
    // Benchmarks may rewrite the routing (`remap_routing`; a no-op for real runs).
    let mut idx = idx[..n * k].to_vec();
    store.remap_routing(layer, k, &mut idx);
    let mut buckets: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (pair, &e) in idx.iter().enumerate() {
        buckets.entry(e).or_default().push(pair);
    }
    let active: Vec<(u32, Vec<usize>)> = buckets.into_iter().collect();
    store.layer_routed(
        layer,
        &active.iter().map(|(e, _)| *e as usize).collect::<Vec<_>>(),
    );
    let mut per_pair = vec![0f32; n * k * hidden];
    for wave in active.chunks(store.max_in_flight().max(1)) {
        let results: Vec<Result<(&Vec<usize>, Vec<f32>), CoreError>> = wave
            .par_iter()
            .map_init(Scratch::default, |s, (e, pairs)| {
                let rec = store.fetch(layer, *e as usize)?;
                let rec: &[u8] = (*rec).as_ref();
                let views = [
                    view(rec, &layout.gate),
                    view(rec, &layout.up),
                    view(rec, &layout.down),
                ];
                Ok((
                    pairs,
                    run_expert(views, x, pairs, k, hidden, inter, s).to_vec(),
                ))
            })
            .collect();
        for r in results {
            let (pairs, y) = r?;
            for (row, &p) in pairs.iter().enumerate() {
                per_pair[p * hidden..(p + 1) * hidden]
                    .copy_from_slice(&y[row * hidden..(row + 1) * hidden]);
            }
        }
    }
    combine(&per_pair, weights, out, n, k, hidden);
    Ok(())
}

/// One expert's SwiGLU output rows computed from its packed record: for each `(token, slot)`
/// pair in `pairs` (token = pair / k), the `hidden`-wide row `down(silu(gate x) * up x)`,
/// concatenated in the order of `pairs`. The same kernels as [`moe_experts_streamed`], for
/// device backends that compute a missed expert on the CPU instead of copying it.
///
/// Errors (never panics) when the record is too short for `layout` or `x` for the pairs.
#[allow(clippy::too_many_arguments)]
pub fn expert_rows(
    rec: &[u8],
    layout: &moeflux_core::ExpertWeights,
    x: &[f32],
    pairs: &[usize],
    k: usize,
    hidden: usize,
    inter: usize,
) -> Result<Vec<f32>, CoreError> {
    let bad = |msg: String| CoreError::Backend {
        backend: "cpu",
        msg: format!("expert_rows: {msg}"),
    };
    if let Some(what) = layout.outside_record(rec.len()) {
        return Err(bad(format!(
            "{what} ends past the {}-byte record",
            rec.len()
        )));
    }
    if k == 0 || pairs.iter().any(|&p| (p / k + 1) * hidden > x.len()) {
        return Err(bad(format!(
            "pairs {pairs:?} (k {k}) reach past {} activations",
            x.len()
        )));
    }
    let views = [
        view(rec, &layout.gate),
        view(rec, &layout.up),
        view(rec, &layout.down),
    ];
    Ok(run_expert_par(views, x, pairs, k, hidden, inter))
}
