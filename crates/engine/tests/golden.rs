//! Golden tests: logits at every position against references nobody here wrote
//! (transformers fp32, mlx-lm 4-bit), made by `tools/fixtures/make_all.sh`.

use std::path::PathBuf;

use moeflux_engine::{Device, Session, SessionOptions, npy};
use moeflux_model::LogitsRows;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

struct Ref {
    tokens: Vec<u32>,
    greedy: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
}

fn load_ref(name: &str) -> Ref {
    let dir = fixture(name);
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
    let ids = |k: &str| {
        j[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    let (shape, logits) = npy::read_f32(&dir.join("logits.npy")).unwrap();
    Ref {
        tokens: ids("tokens"),
        greedy: ids("greedy"),
        logits,
        vocab: shape[1],
    }
}

pub fn device() -> Device {
    match std::env::var("MOEFLUX_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda,
        _ => Device::Cpu,
    }
}

fn open(name: &str, chunk: usize) -> Session {
    let opts = SessionOptions {
        device: device(),
        max_context: 256,
        prefill_chunk: chunk,
        ..SessionOptions::default()
    };
    Session::open(&fixture(name).join("model"), &opts)
        .unwrap_or_else(|e| panic!("open {name}: {e}"))
}

/// max|a - b| / max|b| over all elements.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let maxref = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let maxdiff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    maxdiff / maxref
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn check(name: &str, tol: f32) {
    let r = load_ref(name);
    // Prefill in chunks of 16 (exercises power-of-two chunking and state carry-over).
    let mut s = open(name, 16);
    let got = s.prefill(&r.tokens, LogitsRows::All).unwrap();
    let e = rel_err(&got, &r.logits);
    eprintln!("{name}: prefill rel err {e:.3e}");
    assert!(e <= tol, "{name}: prefill rel err {e} > {tol}");
    // Per position, too, so a bad position is named.
    for (p, (g, w)) in got
        .chunks(r.vocab)
        .zip(r.logits.chunks(r.vocab))
        .enumerate()
    {
        assert!(
            rel_err(g, w) <= tol * 4.0,
            "{name}: position {p} rel err {}",
            rel_err(g, w)
        );
    }

    // Wide chunks: 80 tokens as 64 + 16, so the chunked delta rule spans chunk borders
    // inside one call.
    let wide = open(name, 128).prefill(&r.tokens, LogitsRows::All).unwrap();
    let ew = rel_err(&wide, &r.logits);
    assert!(ew <= tol, "{name}: wide-chunk prefill rel err {ew} > {tol}");

    // Decode path: one token at a time must match prefill.
    s.reset().unwrap();
    let mut dec = Vec::new();
    for &t in &r.tokens {
        dec.extend(s.decode(t).unwrap());
    }
    let e2 = rel_err(&dec, &got);
    eprintln!("{name}: decode vs prefill rel err {e2:.3e}");
    assert!(e2 <= 1e-4, "{name}: decode vs prefill rel err {e2}");

    // Greedy continuation identical to the reference's.
    s.reset().unwrap();
    let mut logits = s.prefill(&r.tokens, LogitsRows::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..r.greedy.len() {
        let t = argmax(&logits);
        out.push(t);
        logits = s.decode(t).unwrap();
    }
    assert_eq!(out, r.greedy, "{name}: greedy continuation");
}

#[test]
fn qwen3_next_f32_matches_transformers() {
    check("qwen3_next_f32", 1e-4);
}

#[test]
fn qwen3_5_moe_vl_matches_transformers() {
    check("qwen3_5_moe_vl", 1e-4);
}

#[test]
fn qwen3_moe_f32_matches_transformers() {
    check("qwen3_moe_f32", 1e-4);
}

#[test]
fn qwen3_next_mlx4_matches_mlx_lm() {
    check("qwen3_next_mlx4", 2e-3);
}

#[test]
fn snapshot_restore_resumes_exactly() {
    let r = load_ref("qwen3_next_f32");
    let mut s = open("qwen3_next_f32", 16);
    let (a, b) = r.tokens.split_at(40);
    s.prefill(a, LogitsRows::Last).unwrap();
    let snap = s.snapshot().unwrap();
    let want = s.prefill(b, LogitsRows::All).unwrap();
    // Diverge, then come back.
    s.prefill(&[1, 2, 3], LogitsRows::Last).unwrap();
    s.restore(&snap).unwrap();
    assert_eq!(s.position(), 40);
    let got = s.prefill(b, LogitsRows::All).unwrap();
    assert_eq!(got, want);
    assert!(rel_err(&got, &r.logits[40 * r.vocab..]) <= 1e-4);
}
