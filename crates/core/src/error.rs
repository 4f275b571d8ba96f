//! Errors of the IR layer and of backends.

use crate::RawBufId;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("buffer '{label}' ({id:?}) holds {capacity} bytes but {requested} bytes were {what}")]
    SizeMismatch {
        label: String,
        id: RawBufId,
        capacity: usize,
        requested: usize,
        what: &'static str,
    },
    #[error("unknown buffer id {0:?}")]
    UnknownBuffer(RawBufId),
    #[error("op {op} in graph '{graph}': {msg}")]
    BadOp {
        graph: String,
        op: String,
        msg: String,
    },
    #[error("out of device memory allocating '{label}' ({bytes} bytes): {msg}")]
    OutOfMemory {
        label: String,
        bytes: usize,
        msg: String,
    },
    #[error("backend '{backend}': {msg}")]
    Backend { backend: &'static str, msg: String },
}
