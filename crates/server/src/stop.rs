//! Stop strings matched across token boundaries.
//!
//! Generated text arrives in token-sized pieces, and a stop string may span
//! several of them (`"\n\n"` as two `"\n"` tokens, `"END"` as `"E"`+`"ND"`). The
//! text a client sees must never contain the stop string nor any part of it, so
//! the matcher holds back the longest tail of the unsent text that is still a
//! prefix of some stop string, and releases it only once it can no longer start
//! a match. Invariant: released text contains no stop string, and no stop string
//! can begin inside released text (so a match is always searched for in the
//! held-back text only).

/// Outcome of feeding one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// Text safe to send now.
    pub emit: String,
    /// Index (into the stop list) of the stop string that matched; generation ends.
    pub matched: Option<usize>,
}

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    pub fn push(&mut self, text: &str) -> Step {
        if self.stops.is_empty() {
            return Step {
                emit: text.to_string(),
                matched: None,
            };
        }
        self.held.push_str(text);
        // Earliest match wins; among matches at the same place, the longest.
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.stops.iter().enumerate() {
            if let Some(at) = self.held.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((bat, bi)) => at < bat || (at == bat && s.len() > self.stops[bi].len()),
                };
                if better {
                    best = Some((at, i));
                }
            }
        }
        if let Some((at, i)) = best {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return Step {
                emit,
                matched: Some(i),
            };
        }
        let keep = self.partial_tail();
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        Step {
            emit,
            matched: None,
        }
    }

    /// Length of the longest tail of `held` that is a proper prefix of a stop string.
    fn partial_tail(&self) -> usize {
        let mut keep = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(self.held.len());
            for k in (keep + 1..=max).rev() {
                if s.is_char_boundary(k) && self.held.ends_with(&s[..k]) {
                    keep = k;
                    break;
                }
            }
        }
        keep
    }

    /// End of generation: whatever is held back can no longer become a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let st = m.push(p);
            out.push_str(&st.emit);
            if st.matched.is_some() {
                return (out, st.matched);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn matches_across_pieces() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxx"]),
            ("abc".into(), Some(0))
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\n", "b"]), ("a".into(), Some(0)));
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("xxS").emit, "xx");
        assert_eq!(m.push("T").emit, "");
        assert_eq!(m.push("x").emit, "STx");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn released_at_end() {
        assert_eq!(run(&["STOP"], &["a", "ST"]), ("aST".into(), None));
    }

    #[test]
    fn earliest_match_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), Some(1)));
        assert_eq!(run(&["ab", "abc"], &["xabc"]), ("x".into(), Some(1)));
    }

    #[test]
    fn multibyte_stop() {
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), Some(0)));
        assert_eq!(run(&["éa"], &["xé", "b"]), ("xéb".into(), None));
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(
            m.push("abc"),
            Step {
                emit: "abc".into(),
                matched: None
            }
        );
    }
}
