//! The commands as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn moeflux(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeflux"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ref_tokens(name: &str) -> String {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("ref.json")).unwrap())
            .unwrap();
    j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
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
            let mut args = vec![
                "logits",
                "--model",
                model.to_str().unwrap(),
                "--tokens",
                &toks,
                "--out",
                out.to_str().unwrap(),
                "--device",
                "cpu",
            ];
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
        let err = |a: &[f32], b: &[f32]| {
            a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max_ref
        };
        assert!(
            err(&p, &r) < 2e-3,
            "{name}: prefill vs reference {}",
            err(&p, &r)
        );
        assert!(
            err(&d, &p) < 1e-4,
            "{name}: decode vs prefill {}",
            err(&d, &p)
        );
    }
}

#[test]
fn info_reports_layout_and_counts() {
    let (ok, out, err) = moeflux(&[
        "info",
        "--model",
        fixture("qwen3_next_mlx4").join("model").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("architecture:   qwen3_next"), "{out}");
    assert!(out.contains("layer kinds:    LALA"), "{out}");
    assert!(
        out.contains("MLX affine 4-bit, group 64 (8 per-module overrides)"),
        "{out}"
    );
    assert!(out.contains("8 routed (top 2, renormalised)"), "{out}");
}

/// `moeflux bench --preset P --layers 1 --device cpu --prompt 4 --gen N --json F [extra]`:
/// stdout and the JSON report (the run must succeed).
fn bench_one_layer(preset: &str, gen_tokens: &str, extra: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    let mut args = vec![
        "bench",
        "--preset",
        preset,
        "--layers",
        "1",
        "--device",
        "cpu",
        "--prompt",
        "4",
        "--gen",
        gen_tokens,
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = moeflux(&args);
    assert!(ok, "{err}");
    let j = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (out, j)
}

/// The untimed warm-up before each decode row (graph capture, clocks) must stay inside the
/// session's context: at most --gen steps from context c, which the timed run then reuses.
#[test]
fn bench_warm_up_stays_within_the_context() {
    let (out, _) = bench_one_layer("qwen3-30b-a3b", "2", &["--context", "0,8"]);
    assert_eq!(out.matches("decode   ctx").count(), 2, "{out}");
}

#[test]
fn bench_runs_on_a_small_preset() {
    let (out, j) = bench_one_layer("qwen3-next-80b-a3b", "2", &[]);
    assert!(out.contains("decode") && out.contains("of floor"), "{out}");
    let dec = j["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "decode")
        .unwrap();
    assert!(dec["tok_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        dec["bytes_per_token"].as_u64().unwrap() > 100_000_000,
        "lm_head alone is >150 MB at this vocab"
    );
}

/// `--gen 0` times prefill only: no decode row (before, a 0 tok/s decode row was printed).
#[test]
fn bench_gen_zero_times_prefill_only() {
    let (out, j) = bench_one_layer("qwen3-30b-a3b", "0", &[]);
    assert!(out.contains("prefill") && !out.contains("decode"), "{out}");
    let kinds: Vec<&str> = j["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["prefill"], "{j}");
}

#[test]
fn bench_rejects_unknown_preset() {
    let (ok, _, err) = moeflux(&["bench", "--preset", "gpt-5"]);
    assert!(
        !ok && err.contains("unknown preset 'gpt-5'") && err.contains("qwen3-30b-a3b"),
        "{err}"
    );
}

#[test]
fn bundled_model_adds_numbers() {
    // Without --model: the bundled model, as in the README's first command.
    for (prompt, answer) in [
        ("12+34=", "46"),
        ("4821+377=", "5198"),
        ("999+1=", "1000"),
        ("8888+2222=", "11110"),
    ] {
        let (ok, out, err) =
            moeflux(&["generate", "--chat", "--prompt", prompt, "--device", "cpu"]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), answer, "{prompt}");
        assert!(err.contains("tok/s") && err.contains("(Stop)"), "{err}");
    }
}

#[test]
fn bundled_model_matches_transformers_token_for_token() {
    // Reference from tools/bundled (HF transformers 5.24, greedy): the chat-rendered prompt
    // of "12+34=" and its continuation "46<|im_end|>".
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bundled");
    let text = moeflux_text::TextCodec::from_dir(&dir).unwrap();
    let prompt = text
        .render_chat(&[moeflux_text::ChatMessage::new("user", "12+34=")], true)
        .unwrap();
    let ids = text.encode(&prompt, false).unwrap();
    assert_eq!(
        ids,
        vec![
            1, 91, 89, 75, 88, 4, 23, 24, 17, 25, 26, 35, 2, 4, 1, 71, 89, 89, 79, 89, 90, 71, 84,
            90, 4
        ]
    );
    let mut s = moeflux_engine::Session::open(
        &dir,
        &moeflux_engine::SessionOptions {
            device: moeflux_engine::Device::Cpu,
            ..Default::default()
        },
    )
    .unwrap();
    let mut logits = s.prefill(&ids, moeflux_model::LogitsRows::Last).unwrap();
    // HF top logit at step 0: id 26 with 9.8868
    assert!((logits[26] - 9.8868).abs() < 1e-3, "{}", logits[26]);
    let mut out = Vec::new();
    for _ in 0..3 {
        let t = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
            )
            .0 as u32;
        out.push(t);
        logits = s.decode(t).unwrap();
    }
    assert_eq!(out, vec![26, 28, 2]);
}
