//! moeflux-core: the vocabulary every other crate speaks.
//!
//! * [`op`]: the typed op IR. A model is a [`Graph`]: a dispatch list of [`Op`]s over
//!   buffers named by [`BufId`]s whose type parameter is the buffer's *role*, so wiring a
//!   token buffer into an activation slot does not compile.
//! * [`planner`]: a pure lifetime planner that lets transient buffers share storage.
//! * [`backend`]: the [`Backend`] and [`BufferPool`] traits that the CPU and CUDA backends
//!   implement. Model code only ever emits IR; it never names a backend.
//!
//! Nothing here depends on a device or on a model format.

pub mod backend;
pub mod buf;
pub mod dtype;
pub mod error;
pub mod op;
pub mod planner;

pub use backend::{Backend, BufferPool, Lifetime, PoolExt, SharedBytes, WeightBytes};
pub use buf::{Act, BufId, Cache, Idx, Pos, RawBufId, Role, State, Tokens, Weight};
pub use dtype::{DType, WeightFormat};
pub use error::CoreError;
pub use op::{ColPart, ExpertProvider, ExpertWeights, Graph, Matrix, Op, Region, Vector};
pub use planner::{Access, Plan};
