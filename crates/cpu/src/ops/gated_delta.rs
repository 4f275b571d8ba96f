//! Gated delta rule (the core of Gated DeltaNet), token by token with the state carried.
//!
//! Per value head h (key head `h / (v_heads / k_heads)`), with S = state `[dk, dv]`:
//!   S <- S * exp(g);  u = v - S^T k;  S <- S + k (beta u)^T;  o = S^T q
//! where q, k are l2-normalised (q then scaled by dk^-0.5), beta = sigmoid(b) and
//! g = -exp(A_log) * softplus(a + dt_bias). The recurrence is exact, so prefill and
//! decode produce the same numbers; heads run in parallel.

use rayon::prelude::*;

use super::rms_norm::sigmoid;

pub struct DeltaShape {
    pub k_heads: usize,
    pub v_heads: usize,
    pub dk: usize,
    pub dv: usize,
}

fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

fn l2norm(v: &mut [f32]) {
    let ss: f32 = v.iter().map(|x| x * x).sum();
    let r = 1.0 / (ss + 1e-6).sqrt();
    v.iter_mut().for_each(|x| *x *= r);
}

#[allow(clippy::too_many_arguments)]
pub fn gated_delta(qkv: &[f32], a: &[f32], b: &[f32], a_log: &[f32], dt_bias: &[f32], state: &mut [f32], out: &mut [f32], n: usize, s: &DeltaShape) {
    let (dk, dv) = (s.dk, s.dv);
    let key_dim = s.k_heads * dk;
    let row = 2 * key_dim + s.v_heads * dv;
    let ratio = s.v_heads / s.k_heads;
    let scale = 1.0 / (dk as f32).sqrt();
    let per_head: Vec<Vec<f32>> = state
        .par_chunks_mut(dk * dv)
        .enumerate()
        .map(|(h, st)| {
            let kh = h / ratio;
            let mut res = vec![0f32; n * dv];
            let (mut q, mut k, mut u) = (vec![0f32; dk], vec![0f32; dk], vec![0f32; dv]);
            for t in 0..n {
                let r = &qkv[t * row..(t + 1) * row];
                q.copy_from_slice(&r[kh * dk..(kh + 1) * dk]);
                k.copy_from_slice(&r[key_dim + kh * dk..key_dim + (kh + 1) * dk]);
                let v = &r[2 * key_dim + h * dv..2 * key_dim + (h + 1) * dv];
                l2norm(&mut q);
                l2norm(&mut k);
                q.iter_mut().for_each(|x| *x *= scale);
                let beta = sigmoid(b[t * s.v_heads + h]);
                let g = -a_log[h].exp() * softplus(a[t * s.v_heads + h] + dt_bias[h]);
                let decay = g.exp();
                st.iter_mut().for_each(|x| *x *= decay);
                // u = v - S^T k
                u.copy_from_slice(v);
                for (i, ki) in k.iter().enumerate() {
                    for (uj, sj) in u.iter_mut().zip(&st[i * dv..(i + 1) * dv]) {
                        *uj -= ki * sj;
                    }
                }
                u.iter_mut().for_each(|x| *x *= beta);
                // S += k u^T
                for (i, ki) in k.iter().enumerate() {
                    for (sj, uj) in st[i * dv..(i + 1) * dv].iter_mut().zip(&u) {
                        *sj += ki * uj;
                    }
                }
                // o = S^T q
                let o = &mut res[t * dv..(t + 1) * dv];
                for (i, qi) in q.iter().enumerate() {
                    for (oj, sj) in o.iter_mut().zip(&st[i * dv..(i + 1) * dv]) {
                        *oj += qi * sj;
                    }
                }
            }
            res
        })
        .collect();
    for (h, res) in per_head.iter().enumerate() {
        for t in 0..n {
            out[(t * s.v_heads + h) * dv..(t * s.v_heads + h + 1) * dv].copy_from_slice(&res[t * dv..(t + 1) * dv]);
        }
    }
}
