//! Router top-k and the routed experts (SwiGLU), grouped by expert.
//!
//! Tokens are bucketed per expert so each expert's weights are read once per batch;
//! results land in per-(token, slot) rows and are summed in slot order, so the output
//! does not depend on thread scheduling.

use moeflux_core::ExpertWeights;
use rayon::prelude::*;

use super::matmul::{matmul, matmul_serial};
use super::qdot::{self, Layout};
use super::rms_norm::silu;
use super::weights::MatView;

pub fn router_topk(
    logits: &[f32],
    shared_gate: Option<&[f32]>,
    idx: &mut [u32],
    weights: &mut [f32],
    experts: usize,
    k: usize,
    renorm: bool,
) {
    let width = k + shared_gate.is_some() as usize;
    for (t, ((l, ix), w)) in logits
        .chunks_exact(experts)
        .zip(idx.chunks_exact_mut(width))
        .zip(weights.chunks_exact_mut(width))
        .enumerate()
    {
        if let Some(g) = shared_gate {
            ix[k] = experts as u32;
            w[k] = super::rms_norm::sigmoid(g[t]);
        }
        let (ix, w) = (&mut ix[..k], &mut w[..k]);
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
pub(crate) struct Scratch {
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
    let active: Vec<(usize, &Vec<usize>)> = buckets
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .collect();
    let mut per_pair = vec![0f32; n * k * hidden];
    let dst = PairsOut(per_pair.as_mut_ptr());
    active
        .par_iter()
        .for_each_init(Scratch::default, |s, (e, pairs)| {
            let y = run_expert(views.views(&experts[*e]), x, pairs, k, hidden, inter, s);
            let dst = &dst;
            for (r, &p) in pairs.iter().enumerate() {
                // SAFETY: `p < n * k`, and pair `p` belongs to this expert only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        y[r * hidden..].as_ptr(),
                        dst.0.add(p * hidden),
                        hidden,
                    )
                };
            }
        });
    combine(&per_pair, weights, out, n, k, hidden);
}

/// One expert's SwiGLU over the (token, slot) `pairs` routed to it; returns the result rows
/// (one per pair, `hidden` wide) in `s`. Shared by the resident and streamed paths so both
/// give bit-identical results.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_expert<'s>(
    [g, u, d]: [MatView<'_>; 3],
    x: &[f32],
    pairs: &[usize],
    k: usize,
    hidden: usize,
    inter: usize,
    s: &'s mut Scratch,
) -> &'s [f32] {
    let m = pairs.len();
    gather_rows(x, pairs, k, hidden, &mut s.xs);
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
    swiglu_in_place(&mut s.gate, &s.up);
    s.xs.resize(m * hidden, 0.0);
    matmul_serial(&s.gate, m, &d, &mut s.xs, &mut s.prep);
    &s.xs[..m * hidden]
}

/// `gate = silu(gate) * up`, elementwise.
fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// The activation row of each (token, slot) pair's token (token = pair / k), in pair order.
fn gather_rows(x: &[f32], pairs: &[usize], k: usize, hidden: usize, out: &mut Vec<f32>) {
    out.clear();
    for &p in pairs {
        let t = p / k;
        out.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
}

/// [`run_expert`] with each matrix's rows spread over the thread pool (gate and up side by
/// side, then down): one expert's latency shrinks with the threads, which is what a device
/// backend computing a few missed experts while its copies run needs. Per row the same
/// kernels as `run_expert`, so the rows are bit-identical.
pub(crate) fn run_expert_par(
    [g, u, d]: [MatView<'_>; 3],
    x: &[f32],
    pairs: &[usize],
    k: usize,
    hidden: usize,
    inter: usize,
) -> Vec<f32> {
    let m = pairs.len();
    let mut xs = Vec::with_capacity(m * hidden);
    gather_rows(x, pairs, k, hidden, &mut xs);
    let (mut gate, mut up) = (vec![0f32; m * inter], vec![0f32; m * inter]);
    rayon::join(
        || matmul(&xs, m, &g, &mut gate),
        || matmul(&xs, m, &u, &mut up),
    );
    swiglu_in_place(&mut gate, &up);
    let mut y = vec![0f32; m * hidden];
    matmul(&gate, m, &d, &mut y);
    y
}

/// `out[t] = sum_j weights[t, j] * per_pair[t * k + j]`, in slot order (deterministic).
pub(crate) fn combine(
    per_pair: &[f32],
    weights: &[f32],
    out: &mut [f32],
    n: usize,
    k: usize,
    hidden: usize,
) {
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

/// Routed experts at qwen3-30b-a3b shapes (128 experts, top-8, 2048 -> 768), random
/// routing: `cargo test --release -p moeflux-cpu moe_bench -- --ignored --nocapture`.
#[cfg(test)]
mod bench {
    use std::time::Instant;

    use moeflux_core::{BufId, DType, Matrix, RawBufId, Region, WeightFormat};

    use super::*;

    struct Store {
        data: Vec<u8>,
        scales: Vec<u8>,
        per: [usize; 2],
    }

    const FMT: WeightFormat = WeightFormat::Affine {
        bits: 4,
        group_size: 64,
        scale_dtype: DType::BF16,
    };

    impl ExpertViews for Store {
        fn views(&self, e: &ExpertWeights) -> [MatView<'_>; 3] {
            [&e.gate, &e.up, &e.down].map(|m| {
                let i = m.data.offset;
                MatView {
                    data: &self.data[i * self.per[0]..(i + 1) * self.per[0]],
                    scales: &self.scales[i * self.per[1]..(i + 1) * self.per[1]],
                    biases: &self.scales[i * self.per[1]..(i + 1) * self.per[1]],
                    rows: m.rows,
                    cols: m.cols,
                    format: m.format,
                }
            })
        }
    }

    #[test]
    #[ignore]
    fn moe_bench() {
        let experts: usize = std::env::var("MOE_EXPERTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128);
        let (k, hidden, inter) = (8usize, 2048usize, 768usize);
        let per = [
            FMT.data_bytes(inter, hidden),
            FMT.scale_bytes(inter, hidden),
        ];
        let mats = 3 * experts;
        let store = Store {
            data: (0..mats * per[0])
                .map(|i| ((i * 2654435761usize) >> 9) as u8)
                .collect(),
            scales: (0..mats * per[1])
                .map(|i| if i % 2 == 1 { 0x3c } else { 0x10 })
                .collect(),
            per,
        };
        let m = |i: usize, rows: usize, cols: usize| Matrix {
            data: Region {
                buf: BufId::from_raw(RawBufId(0)),
                offset: i,
            },
            scales: None,
            biases: None,
            rows,
            cols,
            format: FMT,
        };
        let ew: Vec<ExpertWeights> = (0..experts)
            .map(|e| ExpertWeights {
                gate: m(3 * e, inter, hidden),
                up: m(3 * e + 1, inter, hidden),
                down: m(3 * e + 2, hidden, inter),
            })
            .collect();
        let bytes_per_expert = 3 * FMT.total_bytes(inter, hidden);
        let ns: Vec<usize> = match std::env::var("MOE_N") {
            Ok(v) => v.split(',').map(|s| s.parse().unwrap()).collect(),
            Err(_) => vec![1, 64],
        };
        for n in ns {
            let x: Vec<f32> = (0..n * hidden)
                .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                .collect();
            let mut seed = 0x2545f4914f6cdd1du64;
            let mut idx = vec![0u32; n * k];
            for t in 0..n {
                let mut j = 0;
                while j < k {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let e = (seed % experts as u64) as u32;
                    if !idx[t * k..t * k + j].contains(&e) {
                        idx[t * k + j] = e;
                        j += 1;
                    }
                }
            }
            let active = {
                let mut v = idx.clone();
                v.sort();
                v.dedup();
                v.len()
            };
            let wts = vec![1.0 / k as f32; n * k];
            let mut out = vec![0f32; n * hidden];
            let mut best = f64::MAX;
            let reps = if n == 1 { 50 } else { 5 };
            for _ in 0..reps {
                let t = Instant::now();
                moe_experts(&x, &idx, &wts, &ew, &store, &mut out, n, k, hidden, inter);
                best = best.min(t.elapsed().as_secs_f64());
            }
            let macs = (n * k * 3 * hidden * inter) as f64;
            println!(
                "moe n={n}: {:.2} ms  {active} experts  {:.1} GB/s  {:.1} GMAC/s",
                best * 1e3,
                (active * bytes_per_expert) as f64 / best / 1e9,
                macs / best / 1e9
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use moeflux_core::{DType, WeightFormat};

    use super::*;

    /// The row-parallel expert gives the serial one's rows bit for bit (so a device backend
    /// computing a miss on the CPU matches the resident result), for one and several pairs.
    #[test]
    fn parallel_expert_rows_equal_serial() {
        let fmt = WeightFormat::Affine {
            bits: 4,
            group_size: 64,
            scale_dtype: DType::BF16,
        };
        let (k, hidden, inter) = (4usize, 256usize, 192usize);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut mats = Vec::new();
        for (rows, cols) in [(inter, hidden), (inter, hidden), (hidden, inter)] {
            let data: Vec<u8> = (0..fmt.data_bytes(rows, cols))
                .map(|_| next() as u8)
                .collect();
            // bf16 scales / biases of small magnitude
            let sb = |n: &mut dyn FnMut() -> u64| -> Vec<u8> {
                (0..fmt.scale_bytes(rows, cols) / 2)
                    .flat_map(|_| {
                        let v = ((n() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
                        half::bf16::from_f32(v).to_bits().to_le_bytes()
                    })
                    .collect()
            };
            let (scales, biases) = (sb(&mut next), sb(&mut next));
            mats.push((data, scales, biases, rows, cols));
        }
        let views = || {
            [0, 1, 2].map(|i| {
                let (d, s, b, rows, cols) = &mats[i];
                MatView {
                    data: d,
                    scales: s,
                    biases: b,
                    rows: *rows,
                    cols: *cols,
                    format: fmt,
                }
            })
        };
        let x: Vec<f32> = (0..3 * hidden)
            .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
            .collect();
        for pairs in [vec![1usize], vec![0, 5, 11]] {
            let mut s = Scratch::default();
            let serial = run_expert(views(), &x, &pairs, k, hidden, inter, &mut s).to_vec();
            let par = run_expert_par(views(), &x, &pairs, k, hidden, inter);
            assert_eq!(serial.len(), pairs.len() * hidden);
            assert!(serial.iter().any(|v| *v != 0.0));
            let same = serial
                .iter()
                .zip(&par)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "pairs {pairs:?}: parallel rows differ from serial");
        }
    }
}
