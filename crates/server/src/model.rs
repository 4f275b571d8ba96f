//! What the engine thread needs from a model: the [`InferenceModel`] trait.
//!
//! The server drives its own generation loop (it must snapshot at message
//! boundaries mid-prompt, detokenize, match stop strings and notice departed
//! clients between tokens), so it needs the session's primitives rather than
//! `moeflux_engine::generate`. A trait rather than `Session` itself keeps the
//! HTTP and scheduling logic testable with a scripted fake model whose speed
//! the tests control.

use std::path::{Path, PathBuf};

use moeflux_engine::{EngineError, Session, SessionOptions, Snapshot};
use moeflux_model::LogitsRows;
use moeflux_text::TextCodec;

/// One sequence's worth of model state with prefill/decode and host snapshots.
pub trait InferenceModel {
    /// A host copy of the sequence state (see [`Session::snapshot`]).
    type Snapshot;

    fn vocab(&self) -> usize;
    /// Most tokens the sequence can hold.
    fn max_context(&self) -> usize;
    /// Token ids that end generation, from the model's config (the tokenizer adds its own).
    fn stop_ids(&self) -> Vec<u32>;
    /// Feeds `tokens` after the current position; returns the next-token logits.
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError>;
    /// Feeds one token; returns the next-token logits.
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, EngineError>;
    fn snapshot(&mut self) -> Result<Self::Snapshot, EngineError>;
    fn restore(&mut self, snap: &Self::Snapshot) -> Result<(), EngineError>;
    /// Forget the sequence.
    fn reset(&mut self) -> Result<(), EngineError>;
    /// A short description for logs (backend name).
    fn describe(&self) -> String;
}

impl InferenceModel for Session {
    type Snapshot = Snapshot;

    fn vocab(&self) -> usize {
        Session::vocab(self)
    }
    fn max_context(&self) -> usize {
        Session::max_context(self)
    }
    fn stop_ids(&self) -> Vec<u32> {
        self.model.spec.eos_ids.clone()
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        Session::prefill(self, tokens, LogitsRows::Last)
    }
    fn decode(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        Session::decode(self, token)
    }
    fn snapshot(&mut self) -> Result<Snapshot, EngineError> {
        Session::snapshot(self)
    }
    fn restore(&mut self, snap: &Snapshot) -> Result<(), EngineError> {
        Session::restore(self, snap)
    }
    fn reset(&mut self) -> Result<(), EngineError> {
        Session::reset(self)
    }
    fn describe(&self) -> String {
        format!(
            "{} backend, context {}",
            self.backend_name(),
            Session::max_context(self)
        )
    }
}

/// A loader for [`crate::start`] that opens a model directory as a [`Session`] plus its
/// tokenizer (on the engine thread, so `/health` answers "loading" meanwhile).
pub fn session_loader(
    dir: PathBuf,
    opts: SessionOptions,
) -> impl FnOnce() -> Result<(Session, TextCodec), String> + Send + 'static {
    move || {
        let codec = TextCodec::from_dir(&dir)
            .map_err(|e| format!("loading the tokenizer of {}: {e}", dir.display()))?;
        let session = Session::open(&dir, &opts)
            .map_err(|e| format!("opening model {}: {e}", dir.display()))?;
        Ok((session, codec))
    }
}

/// The id a model directory is served under: its directory name.
pub fn model_id(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".to_string())
}
