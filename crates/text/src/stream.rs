//! Incremental detokenization for streaming output.
//!
//! Decoding one id at a time and concatenating is wrong in two ways: byte-level
//! BPE tokens can hold part of a multi-byte UTF-8 character (decoding such a
//! token alone yields U+FFFD), and some decoders treat the start of a sequence
//! specially (SentencePiece-style decoders drop the leading space of the first
//! token). [`StreamDecoder`] therefore keeps a small window of ids: it decodes
//! the already-emitted "prefix" part and the whole window, emits the
//! difference only once the window no longer ends in an incomplete character,
//! and then slides the window forward so each step costs a few tokens of
//! decoding regardless of how long the generation is.

use crate::TextError;

/// Anything that can turn ids into text; implemented by
/// [`crate::TextCodec`]. A trait so the stream logic does not borrow the codec
/// for its whole lifetime and can be tested with a fake decoder.
pub trait TokenDecoder {
    /// Decodes `ids` as one sequence.
    fn decode_ids(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError>;
}

/// Turns a stream of generated ids into a stream of text pieces.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    /// Window of ids: `ids[..read]` were already emitted (they serve as
    /// left context), `ids[read..]` are pending.
    ids: Vec<u32>,
    read: usize,
    /// Cached decode of `ids[..read]`.
    prefix_text: Option<String>,
}

impl StreamDecoder {
    /// A decoder that drops special tokens from the text when `skip_special`.
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Self::default()
        }
    }

    /// Feeds one generated id; returns the text it completes, possibly empty
    /// (when the id ends in the middle of a UTF-8 character, or decodes to
    /// nothing such as a skipped special token).
    pub fn push<D: TokenDecoder + ?Sized>(
        &mut self,
        decoder: &D,
        id: u32,
    ) -> Result<String, TextError> {
        self.ids.push(id);
        let prefix = match self.prefix_text.take() {
            Some(p) => p,
            None => decoder.decode_ids(&self.ids[..self.read], self.skip_special)?,
        };
        let full = decoder.decode_ids(&self.ids, self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new_text = suffix_after(&prefix, &full).to_string();
            // Slide: the just-emitted ids become the next step's left context.
            self.ids.drain(..self.read);
            self.read = self.ids.len();
            self.prefix_text = None;
            Ok(new_text)
        } else {
            self.prefix_text = Some(prefix);
            Ok(String::new())
        }
    }

    /// Emits whatever is still pending, even if it ends in an incomplete
    /// character (rendered as U+FFFD), and resets the decoder. Call at the
    /// end of generation.
    pub fn finish<D: TokenDecoder + ?Sized>(&mut self, decoder: &D) -> Result<String, TextError> {
        if self.read == self.ids.len() {
            self.reset();
            return Ok(String::new());
        }
        let prefix = match self.prefix_text.take() {
            Some(p) => p,
            None => decoder.decode_ids(&self.ids[..self.read], self.skip_special)?,
        };
        let full = decoder.decode_ids(&self.ids, self.skip_special)?;
        self.reset();
        Ok(suffix_after(&prefix, &full).to_string())
    }

    /// Forgets all state (for reuse on a new generation).
    pub fn reset(&mut self) {
        self.ids.clear();
        self.read = 0;
        self.prefix_text = None;
    }

    /// Number of ids fed but not yet turned into text.
    pub fn pending(&self) -> usize {
        self.ids.len() - self.read
    }
}

/// The part of `full` after `prefix`. Decoders normally extend the prefix
/// verbatim; if one rewrites it (a normalizing decoder), fall back to the
/// part after the longest common prefix on a character boundary.
fn suffix_after<'a>(prefix: &str, full: &'a str) -> &'a str {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest;
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(full.len()));
    let mut cut = common;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    &full[cut..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id is one byte; invalid UTF-8 decodes lossily like byte-level BPE.
    struct Bytes;
    impl TokenDecoder for Bytes {
        fn decode_ids(&self, ids: &[u32], _skip: bool) -> Result<String, TextError> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    /// SentencePiece-like: each id is a word with a leading space, and the
    /// first token of a sequence loses it.
    struct Words;
    impl TokenDecoder for Words {
        fn decode_ids(&self, ids: &[u32], _skip: bool) -> Result<String, TextError> {
            let s: String = ids.iter().map(|i| format!(" w{i}")).collect();
            Ok(s.strip_prefix(' ').unwrap_or(&s).to_string())
        }
    }

    fn run<D: TokenDecoder>(d: &D, ids: &[u32]) -> Vec<String> {
        let mut s = StreamDecoder::new(false);
        let mut out: Vec<String> = ids.iter().map(|&i| s.push(d, i).unwrap()).collect();
        out.push(s.finish(d).unwrap());
        out
    }

    #[test]
    fn multibyte_split_is_held_back() {
        // "aé😀b" = 61 c3a9 f09f9880 62
        let ids = [0x61, 0xc3, 0xa9, 0xf0, 0x9f, 0x98, 0x80, 0x62];
        let out = run(&Bytes, &ids);
        assert_eq!(out, ["a", "", "é", "", "", "", "😀", "b", ""]);
        assert_eq!(out.concat(), "aé😀b");
    }

    #[test]
    fn leading_space_kept_after_first_token() {
        let out = run(&Words, &[1, 2, 3]);
        assert_eq!(out, ["w1", " w2", " w3", ""]);
    }

    #[test]
    fn finish_flushes_incomplete_tail() {
        let mut s = StreamDecoder::new(false);
        assert_eq!(s.push(&Bytes, 0x61).unwrap(), "a");
        assert_eq!(s.push(&Bytes, 0xe2).unwrap(), "");
        assert_eq!(s.pending(), 1);
        assert_eq!(s.finish(&Bytes).unwrap(), "\u{FFFD}");
        assert_eq!(s.pending(), 0);
        assert_eq!(s.finish(&Bytes).unwrap(), "");
    }

    #[test]
    fn window_stays_small() {
        let mut s = StreamDecoder::new(false);
        for _ in 0..1000 {
            s.push(&Bytes, b'x'.into()).unwrap();
        }
        assert!(s.ids.len() <= 2);
    }

    #[test]
    fn suffix_after_handles_rewrites() {
        assert_eq!(suffix_after("ab", "abc"), "c");
        assert_eq!(suffix_after("aé", "aéz"), "z");
        assert_eq!(suffix_after("ax", "ayz"), "yz");
        assert_eq!(suffix_after("é", "e"), "e");
    }
}
