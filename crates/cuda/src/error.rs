//! Errors of the CUDA backend. Each names what failed (kernel, file, buffer) so a user can act
//! on it; they convert into [`CoreError`] at the trait boundary.

use cudarc::driver::DriverError;
use moeflux_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no usable CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver call failed ({what}): {err}")]
    Driver { what: String, err: DriverError },
    #[error("NVRTC failed to compile kernels/{file} for {arch}:\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        log: String,
    },
    #[error("loading the compiled module of kernels/{file}: {err}")]
    ModuleLoad {
        file: &'static str,
        err: DriverError,
    },
    #[error("kernel '{name}' not found in kernels/{file}: {err}")]
    MissingKernel {
        file: &'static str,
        name: &'static str,
        err: DriverError,
    },
    #[error("launching kernel '{kernel}': {err}")]
    Launch {
        kernel: &'static str,
        err: DriverError,
    },
    #[error("graph '{graph}' failed on the device ({err}); kernels since the last sync: {recent}")]
    Execution {
        graph: String,
        recent: String,
        err: DriverError,
    },
    #[error("op {op}: {msg}")]
    Unsupported { op: &'static str, msg: String },
    #[error(
        "out of device memory allocating '{label}' ({bytes} bytes; {free} of {total} bytes free)"
    )]
    OutOfMemory {
        label: String,
        bytes: usize,
        free: usize,
        total: usize,
    },
    #[error("buffer '{label}': {msg}")]
    Buffer { label: String, msg: String },
}

impl CudaError {
    pub(crate) fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let what = what.into();
        move |err| CudaError::Driver { what, err }
    }
}

impl From<CudaError> for CoreError {
    fn from(e: CudaError) -> CoreError {
        match e {
            CudaError::OutOfMemory {
                label,
                bytes,
                free,
                total,
            } => CoreError::OutOfMemory {
                label,
                bytes,
                msg: format!("{free} of {total} bytes of device memory free"),
            },
            other => CoreError::Backend {
                backend: "cuda",
                msg: other.to_string(),
            },
        }
    }
}
