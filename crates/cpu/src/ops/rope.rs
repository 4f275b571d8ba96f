//! Rotary position embedding, NeoX layout (pairs `i` and `i + rotary_dim / 2`), applied
//! to the first `rotary_dim` dims of each head (partial rotary).

pub fn rope(
    x: &mut [f32],
    pos: &[u32],
    heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    theta: f32,
) {
    let half = rotary_dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / rotary_dim as f64))
        .collect();
    for (t, &p) in pos.iter().enumerate() {
        // Angles in f64 then rounded: positions in the tens of thousands lose precision
        // in f32 before the sin/cos.
        let cs: Vec<(f32, f32)> = inv
            .iter()
            .map(|f| {
                let a = p as f64 * f;
                (a.cos() as f32, a.sin() as f32)
            })
            .collect();
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim..(t * heads + h) * head_dim + rotary_dim];
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (a, b) = (v[i], v[i + half]);
                v[i] = a * c - b * s;
                v[i + half] = b * c + a * s;
            }
        }
    }
}
