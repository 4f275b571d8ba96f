//! Bad input through the real binary: each case must exit non-zero with a message that
//! names what is wrong and where, and must never panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
        .join("model")
}

/// A private copy of a fixture model to damage.
fn copy_model(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture_model(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn run(args: &[&str]) -> (bool, String, String) {
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

/// Runs `logits` on `dir` and expects a clean failure whose message contains every needle.
fn expect_error(dir: &Path, tokens: &str, needles: &[&str]) {
    let out = dir.join("out.npy");
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        tokens,
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!ok, "expected failure, stderr: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks '{n}': {err}");
    }
    assert!(!out.exists(), "no output may be written on failure");
}

/// Rewrites the JSON header of a safetensors file with `edit`.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(header.as_object_mut().unwrap());
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

const TOKENS: &str = "1,2,3";

#[test]
fn missing_config() {
    let d = copy_model("qwen3_moe_f32");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    expect_error(d.path(), TOKENS, &["config.json", "No such file"]);
}

#[test]
fn missing_weights_file() {
    let d = copy_model("qwen3_moe_f32");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    expect_error(d.path(), TOKENS, &["no *.safetensors files"]);
}

#[test]
fn missing_shard_listed_in_index() {
    let d = copy_model("qwen3_5_moe_vl");
    let shard = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-of-00003.safetensors"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    expect_error(d.path(), TOKENS, &["missing tensor", "listed in the index"]);
}

#[test]
fn missing_tensor() {
    let d = copy_model("qwen3_moe_f32");
    edit_header(&d.path().join("model.safetensors"), |h| {
        let v = h.remove("model.layers.1.mlp.gate.weight").unwrap();
        h.insert("model.layers.1.mlp.gate_renamed.weight".into(), v);
    });
    expect_error(
        d.path(),
        TOKENS,
        &["missing tensor 'model.layers.1.mlp.gate.weight'"],
    );
}

#[test]
fn wrong_shape() {
    let d = copy_model("qwen3_moe_f32");
    edit_header(&d.path().join("model.safetensors"), |h| {
        h["model.layers.0.mlp.gate.weight"]["shape"] = serde_json::json!([16, 32]);
    });
    expect_error(
        d.path(),
        TOKENS,
        &[
            "model.layers.0.mlp.gate.weight",
            "expected shape [8, 64]",
            "found [16, 32]",
        ],
    );
}

#[test]
fn unknown_model_type() {
    let d = copy_model("qwen3_moe_f32");
    let p = d.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"qwen3_moe\"", "\"llama4_moe\"");
    std::fs::write(&p, text).unwrap();
    expect_error(
        d.path(),
        TOKENS,
        &["unsupported architecture 'llama4_moe'", "config.json"],
    );
}

#[test]
fn truncated_safetensors() {
    let d = copy_model("qwen3_moe_f32");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    expect_error(d.path(), TOKENS, &["model.safetensors", "truncated"]);
}

#[test]
fn garbage_safetensors() {
    let d = copy_model("qwen3_moe_f32");
    std::fs::write(
        d.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a model",
    )
    .unwrap();
    expect_error(
        d.path(),
        TOKENS,
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn token_out_of_range() {
    expect_error(
        &fixture_model("qwen3_moe_f32"),
        "1,2,384",
        &["token id 384", "position 2", "vocabulary size 384"],
    );
}

#[test]
fn empty_tokens() {
    expect_error(&fixture_model("qwen3_moe_f32"), ",", &["no token ids"]);
}

#[test]
fn non_numeric_tokens() {
    expect_error(
        &fixture_model("qwen3_moe_f32"),
        "1,two",
        &["'two' is not a token id"],
    );
}

#[test]
fn context_exceeded() {
    let d = fixture_model("qwen3_moe_f32");
    let out = std::env::temp_dir().join("moeflux-ctx.npy");
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        d.to_str().unwrap(),
        "--tokens",
        "1,2,3,4,5",
        "--max-context",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("context length exceeded: 5 tokens needed"),
        "{err}"
    );
}

#[test]
fn empty_prompt_generate() {
    let (ok, _, err) = run(&["generate", "--prompt", "", "-n", "4"]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(err.contains("no tokens"), "{err}");
}

#[test]
fn generate_without_tokenizer_names_the_file() {
    let (ok, _, err) = run(&[
        "generate",
        "--model",
        fixture_model("qwen3_moe_f32").to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn logits_and_info_work_without_tokenizer() {
    let d = fixture_model("qwen3_next_f32");
    let out = tempfile::tempdir().unwrap();
    let f = out.path().join("l.npy");
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        d.to_str().unwrap(),
        "--tokens",
        "5,6,7",
        "--out",
        f.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(&f).unwrap();
    assert!(String::from_utf8_lossy(&bytes[..128]).contains("'shape': (3, 384)"));
    let (ok, info, err) = run(&["info", "--model", d.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        info.contains("qwen3_next") && info.contains("LALA"),
        "{info}"
    );
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if moeflux_cuda_present() {
        eprintln!("skipping: a CUDA device is present");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let f = out.path().join("l.npy");
    let (ok, _, err) = run(&[
        "logits",
        "--model",
        fixture_model("qwen3_moe_f32").to_str().unwrap(),
        "--tokens",
        "1",
        "--out",
        f.to_str().unwrap(),
        "--device",
        "cuda",
    ]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(err.contains("device 'cuda' is not available"), "{err}");
}

fn moeflux_cuda_present() -> bool {
    Path::new("/dev/nvidia0").exists()
}
