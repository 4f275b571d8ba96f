//! `moeflux convert` and the expert store behind `--host-mem`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn moeflux(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moeflux"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.success(), err)
}

fn tokens(name: &str) -> String {
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

fn logits(model: &Path, toks: &str, out: &Path, extra: &[&str]) -> Vec<f32> {
    let mut args = vec![
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        toks,
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend(extra);
    let (ok, err) = moeflux(&args);
    assert!(ok, "{err}");
    moeflux_engine::npy::read_f32(out).unwrap().1
}

fn convert(src: &Path, dst: &Path, extra: &[&str]) {
    let mut args = vec![
        "convert",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--verify",
    ];
    args.extend(extra);
    let (ok, err) = moeflux(&args);
    assert!(ok, "{err}");
    assert!(err.contains("verified: every checksum matches"), "{err}");
}

#[test]
fn packed_mlx_model_is_bit_identical_under_any_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    convert(&fixture("qwen3_next_mlx4").join("model"), &dst, &[]);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("manifest.json")).unwrap()).unwrap();
    let record = m["record_bytes"].as_u64().unwrap() as usize;
    let toks = tokens("qwen3_next_mlx4");
    let want = logits(
        &fixture("qwen3_next_mlx4").join("model"),
        &toks,
        &tmp.path().join("src.npy"),
        &[],
    );
    // all-resident, a few experts, and the minimum (top-k = 2 records)
    for budget in [None, Some(5 * record), Some(2 * record)] {
        let b = budget.map(|b| format!("{b}"));
        let extra: Vec<&str> = b
            .as_deref()
            .map(|b| vec!["--host-mem", b])
            .unwrap_or_default();
        let got = logits(&dst, &toks, &tmp.path().join("p.npy"), &extra);
        assert!(
            got == want,
            "budget {budget:?}: logits differ from the source checkpoint"
        );
        let dec = logits(
            &dst,
            &toks,
            &tmp.path().join("d.npy"),
            &[extra.as_slice(), &["--decode"]].concat(),
        );
        let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = dec
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / max;
        assert!(err < 1e-4, "budget {budget:?}: decode path rel err {err}");
    }
}

#[test]
fn bf16_or_f32_checkpoints_are_quantized_on_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("q8");
    convert(
        &fixture("qwen3_next_f32").join("model"),
        &dst,
        &["--bits", "8"],
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dst.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization"]["bits"], 8);
    let toks = tokens("qwen3_next_f32");
    let got = logits(&dst, &toks, &tmp.path().join("q.npy"), &[]);
    let (_, want) =
        moeflux_engine::npy::read_f32(&fixture("qwen3_next_f32").join("logits.npy")).unwrap();
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / max;
    assert!(err < 0.1, "8-bit conversion drifted: rel err {err}");
    assert!(err > 0.0, "weights were not quantized");
}

#[test]
fn damaged_packed_models_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    convert(&fixture("qwen3_next_mlx4").join("model"), &dst, &[]);
    let toks = tokens("qwen3_next_mlx4");
    let out = tmp.path().join("x.npy");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "logits",
            "--model",
            dst.to_str().unwrap(),
            "--tokens",
            &toks,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend(extra);
        moeflux(&args)
    };

    // budget below the minimum names the minimum
    let (ok, err) = run(&["--host-mem", "1KiB"]);
    assert!(
        !ok && err.contains("too small") && err.contains("minimum is 32768 bytes"),
        "{err}"
    );
    let (ok, err) = run(&["--host-mem", "lots"]);
    assert!(!ok && err.contains("not a size"), "{err}");

    // flip one byte inside an expert record: caught by the checksum, named precisely
    let f = dst.join("experts/layer_002.bin");
    let mut bytes = std::fs::read(&f).unwrap();
    let record = bytes.len() / 8;
    bytes[3 * record + 100] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    let (ok, err) = run(&[]);
    assert!(
        !ok && err.contains("checksum") && err.contains("layer 2") && err.contains("expert"),
        "{err}"
    );

    // truncated expert file: refused at open
    std::fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    let (ok, err) = run(&[]);
    assert!(
        !ok && err.contains("layer_002.bin") && err.contains("truncated"),
        "{err}"
    );

    // converting onto an existing directory is refused, and nothing partial is left behind
    let (ok, err) = moeflux(&[
        "convert",
        fixture("qwen3_next_mlx4").join("model").to_str().unwrap(),
        dst.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("exists"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bench_reports_every_tier_with_a_store_and_local_routing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let json = tmp.path().join("b.json");
    let out = Command::new(env!("CARGO_BIN_EXE_moeflux"))
        .args([
            "bench",
            "--preset",
            "qwen3-30b-a3b",
            "--layers",
            "1",
            "--device",
            "cpu",
            "--prompt",
            "0",
            "--gen",
            "8",
            "--store",
            store.to_str().unwrap(),
            "--host-mem",
            "64MiB",
            "--gpu-mem",
            "0",
            "--routing-locality",
            "0.67",
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success() && !e.contains("panicked"), "{o}\n{e}");
    assert!(o.contains("RAM:") && o.contains("disk:"), "{o}");
    assert!(o.contains("routing locality"), "{o}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let dec = j["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "decode")
        .unwrap();
    let ex = &dec["experts"];
    let rate = ex["routing_locality_hit_rate"].as_f64().unwrap();
    // 8 tokens from a cold window (it fills at 8 experts per token): well above uniform's
    // start, below the 0.67 reached once warm (the generator's unit test checks that)
    assert!(rate > 0.25, "{ex}");
    assert!(ex["ram_hits"].as_u64().unwrap() + ex["ram_misses"].as_u64().unwrap() > 0);

    // bad values are refused with a message
    for (args, want) in [
        (
            vec![
                "--store",
                store.to_str().unwrap(),
                "--routing-locality",
                "1.5",
            ],
            "between 0 and 1",
        ),
        (vec!["--routing-locality", "0.5"], "need --store"),
    ] {
        let mut a = vec![
            "bench",
            "--preset",
            "qwen3-30b-a3b",
            "--layers",
            "1",
            "--device",
            "cpu",
        ];
        a.extend(args);
        let (ok, err) = moeflux(&a);
        assert!(!ok && err.contains(want), "{err}");
    }
}
