//! Shared blocks. Each takes its weights as a struct and emits IR; none names a backend.

pub mod attn;
pub mod linear_attn;
pub mod moe;
