//! The crate's single error type.
//!
//! Loading a model directory touches five files written by different tools,
//! so every variant carries the path (and where relevant the JSON field) at
//! fault: the caller can then tell the user exactly what to fix, or decide
//! that an optional file being broken is not fatal.

use std::path::PathBuf;

/// Everything that can go wrong on the text side.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file the operation cannot do without does not exist (e.g.
    /// `tokenizer.json`). Kept apart from [`TextError::Io`] so callers can
    /// treat "no tokenizer shipped" differently from "tokenizer unreadable".
    #[error("required file not found: {}", path.display())]
    MissingFile { path: PathBuf },

    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A JSON file is valid but a field has an unexpected shape or value.
    #[error("{}: field `{field}`: {reason}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// The `tokenizers` crate rejected `tokenizer.json`.
    #[error("cannot load tokenizer {}: {message}", path.display())]
    TokenizerLoad { path: PathBuf, message: String },

    /// Encoding text into ids failed.
    #[error("tokenizer encode failed: {0}")]
    Encode(String),

    /// Decoding ids into text failed.
    #[error("tokenizer decode failed: {0}")]
    Decode(String),

    /// Chat rendering was requested but the model directory ships no chat
    /// template (neither `chat_template.jinja`, `chat_template.json` nor
    /// `tokenizer_config.json:chat_template`).
    #[error("no chat template found in {}", dir.display())]
    NoChatTemplate { dir: PathBuf },

    /// A chat template failed to compile or to render (including the
    /// template's own `raise_exception(...)`). `origin` names where the
    /// template text came from.
    #[error("chat template {origin}: {message}")]
    Template { origin: String, message: String },

    /// A sampling parameter is out of range; `field` is the parameter name.
    #[error("invalid sampling parameter `{field}`: {reason}")]
    InvalidParam { field: &'static str, reason: String },
}
