//! The text side of moeflux: everything between the user's characters and the
//! model's token ids, with no model math.
//!
//! An HF model directory is turned into a [`TextCodec`] (tokenizer, special
//! tokens, end-of-sequence ids and chat template, see [`tokenizer`]); chat
//! messages are rendered to a prompt the way HF transformers does it
//! ([`template`]); generated ids are turned back into text incrementally
//! without ever emitting half a UTF-8 character ([`stream`]); and logits are
//! turned into the next token id under the usual sampling knobs ([`sampler`]).
//! Every fallible operation returns [`TextError`], whose variants name the
//! file or field at fault, so a malformed model directory or request never
//! panics the engine.

pub mod error;
pub mod sampler;
pub mod stream;
pub mod template;
pub mod tokenizer;

pub use error::TextError;
pub use sampler::{Sampler, SamplingParams, logprobs, top_logprobs};
pub use stream::{StreamDecoder, TokenDecoder};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::TextCodec;
