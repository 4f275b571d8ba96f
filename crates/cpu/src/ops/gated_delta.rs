//! Gated delta rule (the core of Gated DeltaNet), token by token with the state carried.
//!
//! Per value head h (key head `h / (v_heads / k_heads)`), with S = state `[dk, dv]`:
//!   S <- S * exp(g);  u = v - S^T k;  S <- S + k (beta u)^T;  o = S^T q
//! where q, k are l2-normalised (q then scaled by dk^-0.5), beta = sigmoid(b) and
//! g = -exp(A_log) * softplus(a + dt_bias). Heads run in parallel.
//!
//! Decode (one token) runs the recurrence. Prefill runs the chunked (WY) form: within a
//! chunk of C tokens the delta-rule corrections are solved as a small triangular system,
//! so the state is read and written once per chunk instead of once per token and the
//! work becomes dense C x d products. Both compute the same function (tested against
//! each other below).

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

/// Tokens per chunk in the chunked prefill form.
pub const CHUNK: usize = 64;

/// One head's prepared inputs for a run of tokens.
struct HeadInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    beta: Vec<f32>,
    g: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    qkv: &[f32],
    a: &[f32],
    b: &[f32],
    a_log: &[f32],
    dt_bias: &[f32],
    h: usize,
    n: usize,
    s: &DeltaShape,
) -> HeadInputs {
    let (dk, dv) = (s.dk, s.dv);
    let key_dim = s.k_heads * dk;
    let row = 2 * key_dim + s.v_heads * dv;
    let kh = h / (s.v_heads / s.k_heads);
    let scale = 1.0 / (dk as f32).sqrt();
    let mut x = HeadInputs {
        q: vec![0.0; n * dk],
        k: vec![0.0; n * dk],
        v: vec![0.0; n * dv],
        beta: vec![0.0; n],
        g: vec![0.0; n],
    };
    for t in 0..n {
        let r = &qkv[t * row..(t + 1) * row];
        let q = &mut x.q[t * dk..(t + 1) * dk];
        q.copy_from_slice(&r[kh * dk..(kh + 1) * dk]);
        l2norm(q);
        q.iter_mut().for_each(|v| *v *= scale);
        let k = &mut x.k[t * dk..(t + 1) * dk];
        k.copy_from_slice(&r[key_dim + kh * dk..key_dim + (kh + 1) * dk]);
        l2norm(k);
        x.v[t * dv..(t + 1) * dv]
            .copy_from_slice(&r[2 * key_dim + h * dv..2 * key_dim + (h + 1) * dv]);
        x.beta[t] = sigmoid(b[t * s.v_heads + h]);
        x.g[t] = -a_log[h].exp() * softplus(a[t * s.v_heads + h] + dt_bias[h]);
    }
    x
}

#[inline]
fn dotp(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Chunked form for one head over all `n` tokens; `st` is `[dk, dv]`, `res` `[n, dv]`.
fn head_chunked(x: &HeadInputs, st: &mut [f32], res: &mut [f32], n: usize, dk: usize, dv: usize) {
    let mut t0 = 0;
    while t0 < n {
        let c = CHUNK.min(n - t0);
        let k = &x.k[t0 * dk..(t0 + c) * dk];
        let q = &x.q[t0 * dk..(t0 + c) * dk];
        let v = &x.v[t0 * dv..(t0 + c) * dv];
        let beta = &x.beta[t0..t0 + c];
        // cumulative log-decay inside the chunk
        let gc: Vec<f32> = x.g[t0..t0 + c]
            .iter()
            .scan(0f32, |acc, g| {
                *acc += g;
                Some(*acc)
            })
            .collect();
        // T = (I + strictly-lower A)^-1-style correction, by forward substitution:
        // A[i][j] = -beta_i (k_i . k_j) exp(G_i - G_j), j < i.
        let mut tm = vec![0f32; c * c];
        for i in 0..c {
            for j in 0..i {
                tm[i * c + j] = -beta[i]
                    * dotp(&k[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk])
                    * (gc[i] - gc[j]).exp();
            }
        }
        for i in 1..c {
            let row: Vec<f32> = tm[i * c..i * c + i].to_vec();
            for j in 0..i {
                let mut s = 0f32;
                for m in j + 1..i {
                    s += row[m] * tm[m * c + j];
                }
                tm[i * c + j] = row[j] + s;
            }
        }
        for i in 0..c {
            tm[i * c + i] = 1.0;
        }
        // U = T (beta v), W = T (beta exp(G) k)
        let mut u = vec![0f32; c * dv];
        let mut w = vec![0f32; c * dk];
        for i in 0..c {
            for j in 0..=i {
                let t = tm[i * c + j];
                if t == 0.0 {
                    continue;
                }
                let bv = t * beta[j];
                let bk = bv * gc[j].exp();
                for (o, a) in u[i * dv..(i + 1) * dv]
                    .iter_mut()
                    .zip(&v[j * dv..(j + 1) * dv])
                {
                    *o += bv * a;
                }
                for (o, a) in w[i * dk..(i + 1) * dk]
                    .iter_mut()
                    .zip(&k[j * dk..(j + 1) * dk])
                {
                    *o += bk * a;
                }
            }
        }
        // v_new = U - W S ; out_i = exp(G_i) q_i S + sum_{j<=i} (q_i.k_j) exp(G_i-G_j) v_new_j
        let mut vnew = u;
        for i in 0..c {
            let o = &mut vnew[i * dv..(i + 1) * dv];
            for (r, wr) in w[i * dk..(i + 1) * dk].iter().enumerate() {
                for (a, sv) in o.iter_mut().zip(&st[r * dv..(r + 1) * dv]) {
                    *a -= wr * sv;
                }
            }
        }
        for i in 0..c {
            let out = &mut res[(t0 + i) * dv..(t0 + i + 1) * dv];
            let eg = gc[i].exp();
            for (r, qr) in q[i * dk..(i + 1) * dk].iter().enumerate() {
                let f = qr * eg;
                for (a, sv) in out.iter_mut().zip(&st[r * dv..(r + 1) * dv]) {
                    *a += f * sv;
                }
            }
            for j in 0..=i {
                let f = dotp(&q[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk])
                    * (gc[i] - gc[j]).exp();
                for (a, b) in out.iter_mut().zip(&vnew[j * dv..(j + 1) * dv]) {
                    *a += f * b;
                }
            }
        }
        // S = exp(G_last) S + sum_j exp(G_last - G_j) k_j v_new_j^T
        let gl = gc[c - 1];
        let el = gl.exp();
        st.iter_mut().for_each(|a| *a *= el);
        for j in 0..c {
            let f = (gl - gc[j]).exp();
            for (r, kr) in k[j * dk..(j + 1) * dk].iter().enumerate() {
                let fk = f * kr;
                for (a, b) in st[r * dv..(r + 1) * dv]
                    .iter_mut()
                    .zip(&vnew[j * dv..(j + 1) * dv])
                {
                    *a += fk * b;
                }
            }
        }
        t0 += c;
    }
}

/// Chunked prefill form (see the module docs); same contract as [`gated_delta`].
#[allow(clippy::too_many_arguments)]
pub fn gated_delta_chunked(
    qkv: &[f32],
    a: &[f32],
    b: &[f32],
    a_log: &[f32],
    dt_bias: &[f32],
    state: &mut [f32],
    out: &mut [f32],
    n: usize,
    s: &DeltaShape,
) {
    let (dk, dv) = (s.dk, s.dv);
    let per_head: Vec<Vec<f32>> = state
        .par_chunks_mut(dk * dv)
        .enumerate()
        .map(|(h, st)| {
            let x = prepare(qkv, a, b, a_log, dt_bias, h, n, s);
            let mut res = vec![0f32; n * dv];
            head_chunked(&x, st, &mut res, n, dk, dv);
            res
        })
        .collect();
    scatter_heads(&per_head, out, n, s.v_heads, dv);
}

fn scatter_heads(per_head: &[Vec<f32>], out: &mut [f32], n: usize, v_heads: usize, dv: usize) {
    for (h, res) in per_head.iter().enumerate() {
        for t in 0..n {
            out[(t * v_heads + h) * dv..(t * v_heads + h + 1) * dv]
                .copy_from_slice(&res[t * dv..(t + 1) * dv]);
        }
    }
}

/// Token-by-token recurrence (the decode path).
#[allow(clippy::too_many_arguments)]
pub fn gated_delta(
    qkv: &[f32],
    a: &[f32],
    b: &[f32],
    a_log: &[f32],
    dt_bias: &[f32],
    state: &mut [f32],
    out: &mut [f32],
    n: usize,
    s: &DeltaShape,
) {
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
    scatter_heads(&per_head, out, n, s.v_heads, dv);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(seed: &mut u64, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    #[test]
    fn chunked_matches_recurrence() {
        let s = DeltaShape {
            k_heads: 2,
            v_heads: 4,
            dk: 16,
            dv: 8,
        };
        let n = CHUNK * 2 + 13; // two full chunks and a partial one
        let mut seed = 0x9e3779b97f4a7c15;
        let row = 2 * s.k_heads * s.dk + s.v_heads * s.dv;
        let qkv = rand_vec(&mut seed, n * row, 1.0);
        let a = rand_vec(&mut seed, n * s.v_heads, 2.0);
        let b = rand_vec(&mut seed, n * s.v_heads, 2.0);
        let a_log = rand_vec(&mut seed, s.v_heads, 1.0);
        let dt = rand_vec(&mut seed, s.v_heads, 0.5);
        let st0 = rand_vec(&mut seed, s.v_heads * s.dk * s.dv, 0.3);
        let (mut st1, mut st2) = (st0.clone(), st0.clone());
        let mut o1 = vec![0f32; n * s.v_heads * s.dv];
        let mut o2 = o1.clone();
        gated_delta(&qkv, &a, &b, &a_log, &dt, &mut st1, &mut o1, n, &s);
        gated_delta_chunked(&qkv, &a, &b, &a_log, &dt, &mut st2, &mut o2, n, &s);
        let err = |x: &[f32], y: &[f32]| {
            let m = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            x.iter().zip(y).fold(0f32, |e, (p, q)| e.max((p - q).abs())) / m
        };
        assert!(err(&o2, &o1) < 1e-5, "outputs differ: {}", err(&o2, &o1));
        assert!(err(&st2, &st1) < 1e-5, "states differ: {}", err(&st2, &st1));
    }
}
