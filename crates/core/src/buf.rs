//! Buffer ids typed by role.
//!
//! A [`BufId<R>`] is a plain index into a backend's pool; `R` says what the buffer holds.
//! Ops name the role of every slot, so a token buffer wired into an activation input, or
//! a weight wired into a KV-cache slot, is a compile error rather than silent garbage.

use std::fmt;
use std::marker::PhantomData;

/// Untyped buffer index, used by pools and the planner.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawBufId(pub u32);

impl fmt::Debug for RawBufId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "buf#{}", self.0)
    }
}

/// A buffer role: what the bytes of a buffer mean.
pub trait Role: Copy + 'static {
    const NAME: &'static str;
}

macro_rules! roles {
    ($($(#[$m:meta])* $name:ident),*) => {$(
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name;
        impl Role for $name { const NAME: &'static str = stringify!($name); }
    )*};
}

roles!(
    /// f32 activations, row-major `[tokens, width]`.
    Act,
    /// u32 token ids.
    Tokens,
    /// u32 absolute positions, one per token of the batch.
    Pos,
    /// Stored weight bytes of any dtype or packing (read-only for ops).
    Weight,
    /// f32 attention KV cache `[max_ctx, kv_heads, head_dim]`.
    Cache,
    /// f32 recurrent state (conv window or delta-rule matrix) carried across calls.
    State,
    /// u32 routing indices `[tokens, k]`.
    Idx
);

/// A typed buffer id.
pub struct BufId<R: Role> {
    raw: RawBufId,
    _role: PhantomData<R>,
}

impl<R: Role> BufId<R> {
    pub fn from_raw(raw: RawBufId) -> Self {
        BufId {
            raw,
            _role: PhantomData,
        }
    }
    pub fn raw(self) -> RawBufId {
        self.raw
    }
}

impl<R: Role> Clone for BufId<R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R: Role> Copy for BufId<R> {}
impl<R: Role> PartialEq for BufId<R> {
    fn eq(&self, o: &Self) -> bool {
        self.raw == o.raw
    }
}
impl<R: Role> Eq for BufId<R> {}
impl<R: Role> fmt::Debug for BufId<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", R::NAME, self.raw.0)
    }
}
