//! CPU kernels, one module per op, each a safe function over slices so it doubles as the
//! reference implementation other backends are tested against.

pub mod amx;
pub mod attention;
pub mod conv1d;
pub mod elementwise;
pub mod embed;
pub mod gated_delta;
pub mod matmul;
pub mod moe;
pub mod moe_streamed;
pub mod qdot;
pub mod rms_norm;
pub mod rope;
pub mod weights;
