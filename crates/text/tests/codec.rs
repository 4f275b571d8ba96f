//! `TextCodec::from_dir` against small model directories built on the fly: a
//! byte-level BPE `tokenizer.json` (the Qwen/GPT-2 family's scheme, where
//! one non-ASCII character spans several tokens) plus the JSON side files in
//! the shapes seen in the wild.

use std::path::{Path, PathBuf};

use moeflux_text::{ChatMessage, StreamDecoder, TextCodec, TextError};
use serde_json::json;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A fresh, empty directory unique to this test.
struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("moeflux-text-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn write(&self, file: &str, contents: impl AsRef<[u8]>) {
        std::fs::write(self.0.join(file), contents).unwrap();
    }
    fn write_json(&self, file: &str, v: serde_json::Value) {
        self.write(file, serde_json::to_vec_pretty(&v).unwrap());
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Byte-level BPE over the 256 byte symbols with a few ASCII merges, and the
/// ChatML special tokens after them (ids 260, 261, 262).
fn write_tokenizer(dir: &Path) {
    let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    chars.sort_unstable();
    let mut vocab: Vocab = chars
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    for (a, b) in &merges {
        let n = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), n);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIALS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(&specials);
    tok.save(dir.join("tokenizer.json"), false).unwrap();
}

fn chatml_dir(name: &str) -> TempDir {
    let d = TempDir::new(name);
    write_tokenizer(&d.0);
    d.write_json(
        "tokenizer_config.json",
        json!({
            "bos_token": null,
            "eos_token": {"content": "<|im_end|>", "lstrip": false, "__type": "AddedToken"},
            "pad_token": "<|endoftext|>",
            "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        }),
    );
    d
}

#[test]
fn loads_and_round_trips() {
    let d = chatml_dir("roundtrip");
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert_eq!(c.vocab_size(), 256 + 4 + 3);
    let im_start = c.token_to_id("<|im_start|>").unwrap();
    let im_end = c.token_to_id("<|im_end|>").unwrap();
    assert_eq!((im_start, im_end), (261, 262));

    let ids = c.encode("hello", false).unwrap();
    assert_eq!(ids, [c.token_to_id("hello").unwrap()]);

    let text = "<|im_start|>user\nhello é😀<|im_end|>";
    let ids = c.encode(text, false).unwrap();
    assert_eq!(ids.first(), Some(&im_start));
    assert_eq!(ids.last(), Some(&im_end));
    assert_eq!(c.decode(&ids, false).unwrap(), text);
    assert_eq!(c.decode(&ids, true).unwrap(), "user\nhello é😀");
    // Unknown ids are skipped rather than failing.
    assert_eq!(
        c.decode(&[c.token_to_id("hello").unwrap(), 100_000], true)
            .unwrap(),
        "hello"
    );
}

#[test]
fn chat_template_from_tokenizer_config() {
    let d = chatml_dir("chatml");
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert!(c.has_chat_template());
    assert_eq!(c.eos_token(), Some("<|im_end|>"));
    assert_eq!(c.bos_token(), None);
    let msgs = [
        ChatMessage::new("user", "Hello"),
        ChatMessage::new("assistant", "Hi!"),
        ChatMessage::new("user", "Bye"),
    ];
    let prompt = c.render_chat(&msgs, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = c.encode(&prompt, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 261).count(), 4);
}

#[test]
fn eos_ids_are_the_union_of_all_sources() {
    let d = chatml_dir("eos");
    d.write_json(
        "generation_config.json",
        json!({"eos_token_id": [262, 260], "do_sample": true}),
    );
    d.write_json(
        "config.json",
        json!({"eos_token_id": 260, "text_config": {"eos_token_id": [263, 262]}}),
    );
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert_eq!(c.eos_ids(), [262, 260, 263]);
    assert!(c.is_eos(263));
    assert!(!c.is_eos(261));

    // With only tokenizer_config.json, the eos_token string is resolved.
    let d = chatml_dir("eos-only-config");
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert_eq!(c.eos_ids(), [262]);
}

#[test]
fn template_precedence_and_list_form() {
    let d = chatml_dir("precedence");
    d.write_json(
        "tokenizer_config.json",
        json!({
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "chat_template": [
                {"name": "tool_use", "template": "TOOLS"},
                {"name": "default", "template": "{{ bos_token }}default{{ eos_token }}"}
            ]
        }),
    );
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert_eq!(
        c.render_chat(&[], false).unwrap(),
        "<|endoftext|>default<|im_end|>"
    );

    d.write_json("chat_template.json", json!({"chat_template": "from json"}));
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert_eq!(c.render_chat(&[], false).unwrap(), "from json");

    d.write(
        "chat_template.jinja",
        "from jinja {{ messages | length }}\n",
    );
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert_eq!(
        c.render_chat(&[ChatMessage::new("user", "x")], false)
            .unwrap(),
        "from jinja 1"
    );
    assert!(
        c.chat_template()
            .unwrap()
            .origin()
            .ends_with("chat_template.jinja")
    );

    // kwargs override and extend the variables.
    d.write(
        "chat_template.jinja",
        "{{ bos_token }}{% if enable_thinking is false %}NT{% endif %}",
    );
    let c = TextCodec::from_dir(&d.0).unwrap();
    let mut kw = serde_json::Map::new();
    kw.insert("enable_thinking".into(), false.into());
    kw.insert("bos_token".into(), "B".into());
    assert_eq!(c.render_chat_with(&[], true, &kw).unwrap(), "BNT");
}

#[test]
fn missing_tokenizer_names_the_path() {
    let d = TempDir::new("missing");
    match TextCodec::from_dir(&d.0) {
        Err(TextError::MissingFile { path }) => assert_eq!(path, d.0.join("tokenizer.json")),
        other => panic!("expected MissingFile, got {other:?}"),
    }
}

#[test]
fn optional_files_may_be_absent() {
    let d = TempDir::new("bare");
    write_tokenizer(&d.0);
    let c = TextCodec::from_dir(&d.0).unwrap();
    assert!(c.eos_ids().is_empty());
    assert!(!c.has_chat_template());
    assert!(matches!(
        c.render_chat(&[ChatMessage::new("user", "hi")], true),
        Err(TextError::NoChatTemplate { .. })
    ));
}

#[test]
fn malformed_files_name_file_and_field() {
    let d = chatml_dir("bad-field");
    d.write_json(
        "generation_config.json",
        json!({"eos_token_id": "<|im_end|>"}),
    );
    match TextCodec::from_dir(&d.0).unwrap_err() {
        TextError::Field { path, field, .. } => {
            assert_eq!(path, d.0.join("generation_config.json"));
            assert_eq!(field, "eos_token_id");
        }
        other => panic!("unexpected {other:?}"),
    }

    let d = chatml_dir("bad-nested");
    d.write_json(
        "config.json",
        json!({"text_config": {"eos_token_id": [1, -3]}}),
    );
    let err = TextCodec::from_dir(&d.0).unwrap_err();
    assert!(
        matches!(&err, TextError::Field { field, .. } if field == "text_config.eos_token_id"),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");

    let d = chatml_dir("bad-json");
    d.write("config.json", "{ not json");
    assert!(matches!(
        TextCodec::from_dir(&d.0).unwrap_err(),
        TextError::Json { path, .. } if path == d.0.join("config.json")
    ));

    let d = chatml_dir("bad-token");
    d.write_json("tokenizer_config.json", json!({"eos_token": 5}));
    assert!(matches!(
        TextCodec::from_dir(&d.0).unwrap_err(),
        TextError::Field { field, .. } if field == "eos_token"
    ));

    let d = chatml_dir("bad-template");
    d.write_json(
        "tokenizer_config.json",
        json!({"chat_template": "{% if %}"}),
    );
    match TextCodec::from_dir(&d.0).unwrap_err() {
        TextError::Template { origin, .. } => {
            assert!(
                origin.ends_with("tokenizer_config.json:chat_template"),
                "{origin}"
            )
        }
        other => panic!("unexpected {other:?}"),
    }

    let d = TempDir::new("bad-tokenizer");
    d.write("tokenizer.json", r#"{"model": {"type": "Nope"}}"#);
    assert!(matches!(
        TextCodec::from_dir(&d.0).unwrap_err(),
        TextError::TokenizerLoad { .. }
    ));
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let d = chatml_dir("stream");
    let c = TextCodec::from_dir(&d.0).unwrap();
    // 'é' is two byte tokens and '😀' four: neither may be emitted half-done.
    assert_eq!(c.encode("é", false).unwrap().len(), 2);
    assert_eq!(c.encode("😀", false).unwrap().len(), 4);

    let text = "hello é😀 world<|im_end|>";
    let ids = c.encode(text, false).unwrap();
    let mut s = StreamDecoder::new(true);
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = s.push(&c, id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        pieces.push(piece);
    }
    pieces.push(s.finish(&c).unwrap());
    assert_eq!(pieces.concat(), "hello é😀 world");
    assert!(pieces.contains(&"é".to_string()), "{pieces:?}");
    assert!(pieces.contains(&"😀".to_string()), "{pieces:?}");
    // Exactly one empty piece per held-back byte (1 for é, 3 for 😀), plus
    // the skipped special token and the empty finish.
    assert_eq!(
        pieces.iter().filter(|p| p.is_empty()).count(),
        1 + 3 + 1 + 1
    );
}
