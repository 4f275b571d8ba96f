//! Turning a logit vector into the next token id.
//!
//! The pipeline is the one HF transformers and OpenAI-style servers expose,
//! applied in a fixed order so results are reproducible and comparable:
//! penalties (HF `repetition_penalty`, then OpenAI `presence_penalty` /
//! `frequency_penalty`) → temperature → top-k → softmax → top-p → min-p →
//! draw. Temperature 0 means greedy (argmax after penalties, ties to the
//! lowest id). NaN logits count as `-inf` and `+inf` as the largest finite
//! value, so a numerically broken forward pass degrades instead of panicking.
//!
//! Vocabularies are ~150k entries, so nothing here sorts the full vocabulary:
//! top-k uses `select_nth_unstable`, and top-p selects a growing top prefix
//! until it holds enough probability mass. Randomness comes from a seeded
//! xoshiro256** generator, so a given seed reproduces a generation exactly.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::TextError;

/// Sampling knobs. Each "off" value disables its stage entirely.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; `0` = greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass
    /// reaches `top_p`; `1` = off. Must be in `(0, 1]`.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` × the top token's
    /// probability; `0` = off. Must be in `[0, 1]`.
    pub min_p: f32,
    /// HF repetition penalty over tokens in the history: positive logits are
    /// divided by it, negative ones multiplied; `1` = off. Must be `> 0`.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from every token present in
    /// the history; `0` = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted once per occurrence in the
    /// history; `0` = off.
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling; `None` = seeded from the OS/time.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// HF/OpenAI defaults: plain sampling at temperature 1, every filter and
    /// penalty off.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range; the error names the first bad field.
    pub fn validate(&self) -> Result<(), TextError> {
        let bad =
            |field: &'static str, reason: String| Err(TextError::InvalidParam { field, reason });
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return bad("temperature", format!("{t} is not a finite value >= 0"));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad("top_p", format!("{p} is outside (0, 1]"));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return bad("min_p", format!("{m} is outside [0, 1]"));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("{r} is not a finite value > 0"),
            );
        }
        if !self.presence_penalty.is_finite() {
            return bad(
                "presence_penalty",
                format!("{} is not finite", self.presence_penalty),
            );
        }
        if !self.frequency_penalty.is_finite() {
            return bad(
                "frequency_penalty",
                format!("{} is not finite", self.frequency_penalty),
            );
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// Stateful sampler: owns the random generator and reusable scratch buffers
/// (so a step allocates nothing once warmed up). One per generation stream.
#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// Penalised, sanitised copy of the logits.
    scratch: Vec<f32>,
    /// (id, logit-then-probability) candidates.
    cand: Vec<(u32, f32)>,
    /// Occurrence counts of history ids (zeroed again after each step).
    counts: Vec<u32>,
    touched: Vec<u32>,
}

impl std::fmt::Debug for Sampler {
    /// Parameters only: the scratch buffers are vocabulary-sized.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// Validates `params` and seeds the generator.
    pub fn new(params: SamplingParams) -> Result<Self, TextError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(entropy_seed);
        Ok(Self {
            params,
            rng: Xoshiro256::from_seed(seed),
            scratch: Vec::new(),
            cand: Vec::new(),
            counts: Vec::new(),
            touched: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Restarts the random stream from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = Xoshiro256::from_seed(seed);
    }

    /// Picks the next token from `logits`, penalising ids in `history` (the
    /// prompt and/or generated ids, as the caller decides; ids outside the
    /// logit range are ignored). Empty `logits` yield 0; if every logit is
    /// `-inf`/NaN the result is 0 as well.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.penalize(logits, history);
        if self.params.temperature == 0.0 {
            return argmax(&self.scratch);
        }

        let cand = &mut self.cand;
        cand.clear();
        cand.extend(
            self.scratch
                .iter()
                .enumerate()
                .filter(|(_, l)| **l > f32::NEG_INFINITY)
                .map(|(i, &l)| (i as u32, l)),
        );
        if cand.is_empty() {
            return 0;
        }

        // top-k on logits (temperature does not change the order).
        let k = self.params.top_k;
        if k > 0 && k < cand.len() {
            cand.select_nth_unstable_by(k - 1, desc);
            cand.truncate(k);
        }

        // softmax with temperature; f32 exponentials (the hot loop over the
        // vocabulary), f64 sum. Dividing rather than multiplying by 1/T keeps
        // the top token at exp(0) = 1 even for subnormal temperatures.
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let t = self.params.temperature;
        let mut sum = 0.0f64;
        for c in cand.iter_mut() {
            let p = ((c.1 - max) / t).exp();
            sum += f64::from(p);
            c.1 = p;
        }
        let inv_sum = (1.0 / sum) as f32;
        for c in cand.iter_mut() {
            c.1 *= inv_sum;
        }

        if self.params.top_p < 1.0 {
            truncate_top_p(cand, self.params.top_p);
        }

        if self.params.min_p > 0.0 {
            let pmax = cand.iter().map(|c| c.1).fold(0.0f32, f32::max);
            let threshold = self.params.min_p * pmax;
            cand.retain(|c| c.1 >= threshold);
        }

        let total: f64 = cand.iter().map(|c| f64::from(c.1)).sum();
        let u = self.rng.next_f64() * total;
        let mut cum = 0.0f64;
        let mut last_nonzero = cand[0].0;
        for &(id, p) in cand.iter() {
            if p > 0.0 {
                cum += f64::from(p);
                last_nonzero = id;
                if u < cum {
                    return id;
                }
            }
        }
        // Only reachable through rounding at the very top of the range.
        last_nonzero
    }

    /// Fills `scratch` with sanitised logits and applies the penalties.
    fn penalize(&mut self, logits: &[f32], history: &[u32]) {
        self.scratch.clear();
        self.scratch.extend(logits.iter().map(|&x| sanitize(x)));
        if !self.params.has_penalties() || history.is_empty() {
            return;
        }
        let n = logits.len();
        if self.counts.len() < n {
            self.counts.resize(n, 0);
        }
        for &id in history.iter().filter(|&&id| (id as usize) < n) {
            let c = &mut self.counts[id as usize];
            if *c == 0 {
                self.touched.push(id);
            }
            *c += 1;
        }
        let p = &self.params;
        for &id in &self.touched {
            let i = id as usize;
            let count = std::mem::take(&mut self.counts[i]);
            let mut l = self.scratch[i];
            if p.repetition_penalty != 1.0 {
                l = if l < 0.0 {
                    l * p.repetition_penalty
                } else {
                    l / p.repetition_penalty
                };
            }
            l -= p.presence_penalty + p.frequency_penalty * count as f32;
            self.scratch[i] = l;
        }
        self.touched.clear();
    }
}

/// Log-softmax of `logits` (NaN treated as `-inf`). If every entry is `-inf`
/// the result is all `-inf`.
pub fn logprobs(logits: &[f32]) -> Vec<f32> {
    match log_sum_exp(logits) {
        Some(lse) => logits
            .iter()
            .map(|&x| (f64::from(sanitize(x)) - lse) as f32)
            .collect(),
        None => vec![f32::NEG_INFINITY; logits.len()],
    }
}

/// The `k` most likely tokens with their log-probabilities, most likely
/// first (ties: lower id first), without a full sort or a full log-softmax.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, sanitize(x)))
        .collect();
    if k < cand.len() {
        cand.select_nth_unstable_by(k - 1, desc);
        cand.truncate(k);
    }
    cand.sort_unstable_by(desc);
    for c in cand.iter_mut() {
        c.1 = match lse {
            Some(lse) => (f64::from(c.1) - lse) as f32,
            None => f32::NEG_INFINITY,
        };
    }
    cand
}

/// NaN → `-inf` (never chosen), `+inf` → `f32::MAX` (keeps softmax finite).
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        x
    }
}

/// `ln Σ exp(x)` over sanitised logits, `None` when all are `-inf` or empty.
fn log_sum_exp(logits: &[f32]) -> Option<f64> {
    let max = logits
        .iter()
        .map(|&x| sanitize(x))
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    let sum: f64 = logits
        .iter()
        .map(|&x| f64::from((sanitize(x) - max).exp()))
        .sum();
    Some(f64::from(max) + sum.ln())
}

/// Index of the largest value, lowest index on ties. Values are sanitised.
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate().skip(1) {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Descending by value, then ascending by id: a total order, so selection
/// and sorting are deterministic even with tied values.
fn desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the most likely candidates while the mass of those ranked above is
/// below `top_p` (HF semantics: the token crossing the threshold is kept, so
/// at least one always is). Instead of sorting the vocabulary this bisects on
/// rank with `select_nth_unstable` (expected O(n)), sorting only the last
/// small range; the kept candidates end up in no particular order.
fn truncate_top_p(cand: &mut Vec<(u32, f32)>, top_p: f32) {
    const SMALL: usize = 64;
    let top_p = f64::from(top_p);
    let mass = |c: &[(u32, f32)]| c.iter().map(|c| f64::from(c.1)).sum::<f64>();
    // Invariants: cand[..lo] hold ranks 0..lo, cand[lo..hi] ranks lo..hi, the
    // number of kept candidates lies in [lo, hi], and acc = mass(cand[..lo]).
    let (mut lo, mut hi, mut acc) = (0usize, cand.len(), 0.0f64);
    while hi - lo > SMALL {
        let mid = lo + (hi - lo) / 2;
        cand[lo..hi].select_nth_unstable_by(mid - lo, desc);
        let above_mid = acc + mass(&cand[lo..mid]);
        if above_mid < top_p {
            // Rank `mid` is kept.
            acc = above_mid + f64::from(cand[mid].1);
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    cand[lo..hi].sort_unstable_by(desc);
    let mut kept = lo;
    while kept < hi && acc < top_p {
        acc += f64::from(cand[kept].1);
        kept += 1;
    }
    cand.truncate(kept);
}

/// A seed for unseeded samplers: std's per-process random hasher keys mixed
/// with the clock, so no OS-RNG dependency is needed.
fn entropy_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64: tiny, fast,
/// and good enough statistically for sampling.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn from_seed(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).unwrap()
    }

    fn seeded(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Logits whose softmax is exactly `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn histogram(s: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[s.sample(logits, &[]) as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, f32::NAN], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0], &[]), 1);
        assert_eq!(s.sample(&[], &[]), 0);
    }

    #[test]
    fn nan_never_sampled() {
        let mut s = sampler(seeded(1.0, 7));
        let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
        let h = histogram(&mut s, &logits, 2000);
        assert_eq!(h[0] + h[2], 0);
        assert!(h[1] > 800 && h[3] > 800, "{h:?}");
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3], &[]), 0);
    }

    #[test]
    fn same_seed_same_sequence() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(1234),
            ..SamplingParams::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = sampler(p.clone());
            (0..200).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run(&params);
        assert_eq!(a, run(&params));
        let other = SamplingParams {
            seed: Some(4321),
            ..params.clone()
        };
        assert_ne!(a, run(&other));
        // reseed restarts the stream.
        let mut s = sampler(params.clone());
        let first: Vec<_> = (0..10).map(|_| s.sample(&logits, &[])).collect();
        s.reseed(1234);
        let again: Vec<_> = (0..10).map(|_| s.sample(&logits, &[])).collect();
        assert_eq!(first, again);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 4999) as f32 * 1e-3)
            .collect();
        let expected = argmax(&logits);
        for seed in 0..50 {
            let mut s = sampler(SamplingParams {
                top_k: 1,
                temperature: 1.5,
                seed: Some(seed),
                ..SamplingParams::default()
            });
            assert_eq!(s.sample(&logits, &[]), expected);
        }
    }

    #[test]
    fn top_k_restricts_support() {
        let logits = [3.0, 1.0, 2.0, 0.0, 2.5];
        let mut s = sampler(SamplingParams {
            top_k: 2,
            ..seeded(1.0, 3)
        });
        let h = histogram(&mut s, &logits, 3000);
        assert_eq!(h[1] + h[2] + h[3], 0, "{h:?}");
        assert!(h[0] > h[4] && h[4] > 0, "{h:?}");
    }

    #[test]
    fn temperature_sampling_matches_softmax() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let mut s = sampler(seeded(1.0, 11));
        let n = 20_000;
        let h = histogram(&mut s, &logits_of(&probs), n);
        for (count, p) in h.iter().zip(probs) {
            let f = *count as f32 / n as f32;
            assert!((f - p).abs() < 0.02, "{h:?}");
        }
        // Low temperature sharpens towards the mode.
        let mut cold = sampler(seeded(0.1, 11));
        let h = histogram(&mut cold, &logits_of(&probs), 2000);
        assert!(h[0] > 1950, "{h:?}");
    }

    #[test]
    fn top_p_excludes_tail() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        let mut s = sampler(SamplingParams {
            top_p: 0.75,
            ..seeded(1.0, 5)
        });
        let h = histogram(&mut s, &logits_of(&probs), 4000);
        assert_eq!(h[2] + h[3], 0, "{h:?}");
        // Renormalised 0.5 : 0.3 → 62.5% / 37.5%.
        let f0 = h[0] as f32 / 4000.0;
        assert!((f0 - 0.625).abs() < 0.03, "{h:?}");
        // The token that crosses the threshold is kept: top_p just above the
        // first token's mass keeps exactly two.
        let mut s = sampler(SamplingParams {
            top_p: 0.51,
            ..seeded(1.0, 5)
        });
        let h = histogram(&mut s, &logits_of(&probs), 2000);
        assert_eq!(h[2] + h[3], 0, "{h:?}");
        assert!(h[1] > 0, "{h:?}");
    }

    #[test]
    fn top_p_on_large_vocab() {
        // 1000 equal logits: top_p = 0.5 keeps ids 0..=500 (ties by id).
        let logits = vec![0.0f32; 1000];
        let mut s = sampler(SamplingParams {
            top_p: 0.5,
            ..seeded(1.0, 9)
        });
        let mut max_id = 0;
        for _ in 0..5000 {
            let id = s.sample(&logits, &[]);
            assert!(id <= 501, "{id}");
            max_id = max_id.max(id);
        }
        assert!(max_id > 450, "{max_id}");
        let mut cand: Vec<(u32, f32)> = (0..1000).map(|i| (i, 0.001)).collect();
        truncate_top_p(&mut cand, 0.5);
        assert!((500..=501).contains(&cand.len()), "{}", cand.len());
        let mut ids: Vec<u32> = cand.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        assert!(ids.iter().enumerate().all(|(i, &id)| i as u32 == id));
    }

    #[test]
    fn top_p_bisection_matches_sorted_scan() {
        // Reference: sort everything, keep while the mass above is < top_p.
        let mut rng = Xoshiro256::from_seed(99);
        for case in 0..40 {
            let n = [1, 5, 64, 65, 300, 5000][case % 6];
            let raw: Vec<f32> = (0..n).map(|_| (rng.next_f64() as f32).powi(6)).collect();
            let total: f32 = raw.iter().sum();
            let cand: Vec<(u32, f32)> = raw
                .iter()
                .enumerate()
                .map(|(i, &p)| (i as u32, p / total))
                .collect();
            let top_p = [0.1, 0.5, 0.9, 0.99, 1e-6][case % 5] as f32;
            let mut sorted = cand.clone();
            sorted.sort_by(desc);
            let mut acc = 0.0f64;
            let expect = sorted
                .iter()
                .take_while(|c| {
                    let keep = acc < f64::from(top_p);
                    acc += f64::from(c.1);
                    keep
                })
                .count();
            let mut got = cand.clone();
            truncate_top_p(&mut got, top_p);
            // Summation order may move the boundary by one in a near-tie.
            assert!(
                got.len().abs_diff(expect) <= 1,
                "n={n} p={top_p} {} vs {expect}",
                got.len()
            );
            let min_kept = got.iter().map(|c| c.1).fold(f32::INFINITY, f32::min);
            assert!(sorted[..got.len()].iter().all(|c| c.1 >= min_kept));
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let probs = [0.6, 0.3, 0.1];
        let mut s = sampler(SamplingParams {
            min_p: 0.4, // threshold 0.24
            ..seeded(1.0, 13)
        });
        let h = histogram(&mut s, &logits_of(&probs), 3000);
        assert_eq!(h[2], 0, "{h:?}");
        assert!(h[1] > 700, "{h:?}");
        // min_p = 1 keeps only the mode.
        let mut s = sampler(SamplingParams {
            min_p: 1.0,
            ..seeded(1.0, 13)
        });
        let h = histogram(&mut s, &logits_of(&probs), 500);
        assert_eq!(h[0], 500);
    }

    #[test]
    fn repetition_penalty_hf_semantics() {
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        // Repeated ids are penalised once, ids out of range ignored.
        s.penalize(&[2.0, 1.0, -1.0, 0.5], &[0, 2, 2, 99]);
        assert_eq!(s.scratch, [1.0, 1.0, -2.0, 0.5]);
        // Id 0 drops from 2.0 to 1.0 and loses to id 1 (1.5).
        assert_eq!(s.sample(&[2.0, 1.5, -1.0], &[0]), 1);
        // Counts are reset between steps.
        s.penalize(&[2.0, 1.0], &[]);
        assert_eq!(s.scratch, [2.0, 1.0]);
        assert!(s.counts.iter().all(|&c| c == 0));
    }

    #[test]
    fn presence_and_frequency_penalties_openai_semantics() {
        let mut s = sampler(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        });
        s.penalize(&[1.0, 1.0, 1.0, f32::NAN], &[1, 1, 1, 2, 3]);
        // id1: 1 - 0.5 - 3*0.25 = -0.25; id2: 1 - 0.5 - 0.25 = 0.25; NaN stays -inf.
        assert_eq!(s.scratch, [1.0, -0.25, 0.25, f32::NEG_INFINITY]);
        // Combined with repetition penalty: divide first, then subtract.
        let mut s = sampler(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 1.0,
            frequency_penalty: 1.0,
            ..SamplingParams::greedy()
        });
        s.penalize(&[4.0, -4.0], &[0, 1, 1]);
        assert_eq!(s.scratch, [4.0 / 2.0 - 2.0, -4.0 * 2.0 - 3.0]);
    }

    #[test]
    fn validate_names_the_field() {
        let field_of = |p: SamplingParams| match p.validate() {
            Err(TextError::InvalidParam { field, .. }) => field,
            other => panic!("expected InvalidParam, got {other:?}"),
        };
        let d = SamplingParams::default;
        assert!(d().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        let cases = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..d()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..d()
                },
                "temperature",
            ),
            (SamplingParams { top_p: 0.0, ..d() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..d() }, "top_p"),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..d()
                },
                "top_p",
            ),
            (SamplingParams { min_p: -0.5, ..d() }, "min_p"),
            (SamplingParams { min_p: 1.5, ..d() }, "min_p"),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..d()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::INFINITY,
                    ..d()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..d()
                },
                "frequency_penalty",
            ),
        ];
        for (p, field) in cases {
            assert_eq!(field_of(p.clone()), field, "{p:?}");
            assert!(Sampler::new(p).is_err());
        }
    }

    #[test]
    fn params_deserialize_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.7, "seed": 5}"#).unwrap();
        assert_eq!(p.temperature, 0.7);
        assert_eq!(p.seed, Some(5));
        assert_eq!(p.top_p, 1.0);
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let lp = logprobs(&[1.0, 2.0, 3.0, f32::NAN]);
        let sum: f32 = lp.iter().map(|x| x.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!((lp[2] - lp[1] - 1.0).abs() < 1e-6);
        assert_eq!(lp[3], f32::NEG_INFINITY);
        let z = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        assert!((f64::from(lp[0]) - (1.0 - z)).abs() < 1e-6);
        assert!(
            logprobs(&[f32::NEG_INFINITY; 2])
                .iter()
                .all(|x| *x == f32::NEG_INFINITY)
        );
        assert!(logprobs(&[]).is_empty());
    }

    #[test]
    fn top_logprobs_sorted_and_consistent() {
        let logits = [0.5, 3.0, -1.0, 3.0, 2.0];
        let full = logprobs(&logits);
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 4]);
        for (id, lp) in &top {
            assert!((lp - full[*id as usize]).abs() < 1e-6);
        }
        assert_eq!(top_logprobs(&logits, 0), []);
        assert_eq!(top_logprobs(&logits, 10).len(), 5);
        assert_eq!(top_logprobs(&[], 3), []);
    }

    #[test]
    fn xoshiro_is_uniform_enough() {
        let mut r = Xoshiro256::from_seed(42);
        let n = 100_000;
        let mean: f64 = (0..n).map(|_| r.next_f64()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let mut r = Xoshiro256::from_seed(0);
        assert!(
            (0..1000)
                .map(|_| r.next_f64())
                .all(|x| (0.0..1.0).contains(&x))
        );
    }
}
