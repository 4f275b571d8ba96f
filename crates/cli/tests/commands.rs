//! The commands as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn moeflux(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeflux")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn ref_tokens(name: &str) -> String {
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("ref.json")).unwrap()).unwrap();
    j["tokens"].as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

fn read_npy(p: &Path) -> (Vec<usize>, Vec<f32>) {
    moeflux_engine::npy::read_f32(p).unwrap()
}

#[test]
fn logits_prefill_and_decode_match_the_reference() {
    for name in ["qwen3_next_mlx4", "qwen3_5_moe_vl"] {
        let dir = tempfile::tempdir().unwrap();
        let model = fixture(name).join("model");
        let toks = ref_tokens(name);
        let (pre, dec) = (dir.path().join("p.npy"), dir.path().join("d.npy"));
        for (out, extra) in [(&pre, None), (&dec, Some("--decode"))] {
            let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--tokens", &toks, "--out", out.to_str().unwrap(), "--device", "cpu"];
            args.extend(extra);
            let (ok, _, err) = moeflux(&args);
            assert!(ok, "{name}: {err}");
        }
        let (shape, p) = read_npy(&pre);
        let (shape2, d) = read_npy(&dec);
        let (_, r) = read_npy(&fixture(name).join("logits.npy"));
        assert_eq!(shape, vec![80, 384]);
        assert_eq!(shape, shape2);
        let max_ref = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max_ref;
        assert!(err(&p, &r) < 2e-3, "{name}: prefill vs reference {}", err(&p, &r));
        assert!(err(&d, &p) < 1e-4, "{name}: decode vs prefill {}", err(&d, &p));
    }
}

#[test]
fn info_reports_layout_and_counts() {
    let (ok, out, err) = moeflux(&["info", "--model", fixture("qwen3_next_mlx4").join("model").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("architecture:   qwen3_next"), "{out}");
    assert!(out.contains("layer kinds:    LALA"), "{out}");
    assert!(out.contains("MLX affine 4-bit, group 64 (8 per-module overrides)"), "{out}");
    assert!(out.contains("8 routed (top 2, renormalised)"), "{out}");
}

#[test]
fn bench_runs_on_a_small_preset() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    let (ok, out, err) = moeflux(&["bench", "--preset", "qwen3-next-80b-a3b", "--layers", "1", "--device", "cpu", "--prompt", "4", "--gen", "2", "--json", json.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("decode") && out.contains("of floor"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let dec = j["results"].as_array().unwrap().iter().find(|r| r["kind"] == "decode").unwrap();
    assert!(dec["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(dec["bytes_per_token"].as_u64().unwrap() > 100_000_000, "lm_head alone is >150 MB at this vocab");
}

#[test]
fn bench_rejects_unknown_preset() {
    let (ok, _, err) = moeflux(&["bench", "--preset", "gpt-5"]);
    assert!(!ok && err.contains("unknown preset 'gpt-5'") && err.contains("qwen3-30b-a3b"), "{err}");
}
