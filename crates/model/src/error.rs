//! Errors from reading a model directory.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: config field '{field}': {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error(
        "{path}: unsupported architecture '{model_type}' (supported: qwen3_next, qwen3_5_moe, qwen3_5_moe_text, qwen3_moe)"
    )]
    UnknownArch { path: PathBuf, model_type: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    BadSafetensors { path: PathBuf, msg: String },
    #[error("{path}: truncated: tensor '{tensor}' ends at byte {end} but the file has {len} bytes")]
    Truncated {
        path: PathBuf,
        tensor: String,
        end: usize,
        len: usize,
    },
    #[error("{dir}: no *.safetensors files")]
    NoWeights { dir: PathBuf },
    #[error("missing tensor '{name}' (looked in {dir})")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor '{name}' in {path}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor '{name}' in {path}: unsupported dtype {dtype} ({what})")]
    DType {
        name: String,
        path: PathBuf,
        dtype: String,
        what: &'static str,
    },
    #[error(
        "{path}: expert {expert} of layer {layer} fails its checksum (file corrupted; re-run `moeflux convert`)"
    )]
    CorruptExpert {
        path: PathBuf,
        layer: usize,
        expert: usize,
    },
    #[error(
        "{what} of {given} bytes is too small to run this model: the minimum is {minimum} bytes"
    )]
    Budget {
        what: String,
        given: usize,
        minimum: usize,
    },
    #[error(transparent)]
    Core(#[from] moeflux_core::CoreError),
}
