//! Loading an HF model directory's text assets into a [`TextCodec`].
//!
//! The information needed to talk to a model is scattered over several
//! files whose shapes drifted across transformers versions: the tokenizer
//! itself (`tokenizer.json`), special tokens and (older) chat templates
//! (`tokenizer_config.json`, where tokens may be plain strings or
//! `{"content": ...}` objects and the template a string or a list of named
//! templates), newer standalone templates (`chat_template.jinja`,
//! `chat_template.json`), and end-of-sequence ids (`generation_config.json`,
//! `config.json`, sometimes nested under `text_config`, as an int or a list).
//! [`TextCodec::from_dir`] reads them all once, tolerates every optional file
//! being absent, and reports malformed ones with the path and field at fault.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tokenizers::Tokenizer;

use crate::TextError;
use crate::stream::TokenDecoder;
use crate::template::{ChatMessage, ChatTemplate};

/// Tokenizer, special tokens, stop ids and chat template of one model.
#[derive(Debug)]
pub struct TextCodec {
    dir: PathBuf,
    tokenizer: Tokenizer,
    eos_ids: Vec<u32>,
    special_tokens: serde_json::Map<String, Json>,
    template: Option<ChatTemplate>,
}

/// Special-token fields of `tokenizer_config.json` passed to chat templates,
/// as transformers does with its `special_tokens_map`.
const SPECIAL_TOKEN_FIELDS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl TextCodec {
    /// Loads the text side of the HF model directory `dir`.
    ///
    /// Only `tokenizer.json` is required; its absence is reported as
    /// [`TextError::MissingFile`] so the caller can decide whether running
    /// without a tokenizer (ids in, ids out) is acceptable. Every other file
    /// is optional but must be well-formed when present.
    ///
    /// Chat template precedence follows transformers: `chat_template.jinja`,
    /// then `chat_template.json`, then `tokenizer_config.json:chat_template`
    /// (for a list of named templates, the one named `default`, else the
    /// first).
    pub fn from_dir(dir: &Path) -> Result<Self, TextError> {
        let tok_path = dir.join("tokenizer.json");
        let bytes = read_required(&tok_path)?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| TextError::TokenizerLoad {
            path: tok_path.clone(),
            message: e.to_string(),
        })?;

        let tc_path = dir.join("tokenizer_config.json");
        let tok_config = read_json_optional(&tc_path)?;
        let mut special_tokens = serde_json::Map::new();
        if let Some(cfg) = &tok_config {
            for field in SPECIAL_TOKEN_FIELDS {
                if let Some(tok) = token_field(cfg, field, &tc_path)? {
                    special_tokens.insert(field.to_string(), Json::String(tok));
                }
            }
        }

        let mut eos_ids = Vec::new();
        let gc_path = dir.join("generation_config.json");
        if let Some(gc) = read_json_optional(&gc_path)?
            && let Some(v) = gc.get("eos_token_id")
        {
            eos_ids.extend(id_list(v, &gc_path, "eos_token_id")?);
        }
        let cfg_path = dir.join("config.json");
        if let Some(cfg) = read_json_optional(&cfg_path)? {
            if let Some(v) = cfg.get("eos_token_id") {
                eos_ids.extend(id_list(v, &cfg_path, "eos_token_id")?);
            }
            if let Some(v) = cfg.get("text_config").and_then(|t| t.get("eos_token_id")) {
                eos_ids.extend(id_list(v, &cfg_path, "text_config.eos_token_id")?);
            }
        }
        if let Some(Json::String(eos)) = special_tokens.get("eos_token") {
            match tokenizer.token_to_id(eos) {
                Some(id) => eos_ids.push(id),
                None => tracing::warn!(
                    path = %tc_path.display(),
                    token = %eos,
                    "eos_token is not in the tokenizer vocabulary; ignored"
                ),
            }
        }
        dedup_in_order(&mut eos_ids);

        let template = load_template(dir, tok_config.as_ref(), &tc_path)?;

        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            eos_ids,
            special_tokens,
            template,
        })
    }

    /// Text → ids. With `add_special_tokens` the tokenizer's post-processor
    /// runs (e.g. inserting BOS); prompts produced by [`Self::render_chat`]
    /// already contain their special tokens and should be encoded with
    /// `false`, as transformers does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| TextError::Encode(e.to_string()))
    }

    /// Ids → text. Ids the tokenizer does not know (e.g. from a model whose
    /// embedding table is padded beyond the vocabulary) are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| TextError::Decode(e.to_string()))
    }

    /// End-of-sequence ids: the union of `generation_config.json`,
    /// `config.json` (and its `text_config`) and `tokenizer_config.json`'s
    /// `eos_token`, first-seen order, deduplicated. Chat models often stop on
    /// several ids (e.g. `<|im_end|>` and `<|endoftext|>`), so generation must
    /// check membership in this whole set.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Vocabulary size including added tokens. The model's logits may be
    /// longer (padded embedding tables); the sampler does not care.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Id of a token string (special tokens included), if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Token string of an id, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// `bos_token` from `tokenizer_config.json`, if set.
    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.get("bos_token").and_then(Json::as_str)
    }

    /// `eos_token` from `tokenizer_config.json`, if set.
    pub fn eos_token(&self) -> Option<&str> {
        self.special_tokens.get("eos_token").and_then(Json::as_str)
    }

    /// Whether the model ships a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// The loaded chat template, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// The underlying `tokenizers` tokenizer, for anything not wrapped here.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders a conversation with the model's chat template, passing the
    /// special tokens of `tokenizer_config.json` (`bos_token`, `eos_token`,
    /// ...) as transformers does. Encode the result with
    /// `add_special_tokens = false`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        self.render_chat_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`Self::render_chat`] with extra template variables (transformers'
    /// `**kwargs`, e.g. `{"enable_thinking": false}` for Qwen3, or `tools`),
    /// which override the special tokens on name clashes.
    pub fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Json>,
    ) -> Result<String, TextError> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| TextError::NoChatTemplate {
                dir: self.dir.clone(),
            })?;
        let mut vars = self.special_tokens.clone();
        vars.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        template.render(messages, add_generation_prompt, &vars)
    }
}

impl TokenDecoder for TextCodec {
    fn decode_ids(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        self.decode(ids, skip_special)
    }
}

fn read_required(path: &Path) -> Result<Vec<u8>, TextError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TextError::MissingFile {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(TextError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TextError> {
    match read_required(path) {
        Ok(b) => Ok(Some(b)),
        Err(TextError::MissingFile { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_json_optional(path: &Path) -> Result<Option<Json>, TextError> {
    let Some(bytes) = read_optional(path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| TextError::Json {
            path: path.to_path_buf(),
            source,
        })
}

fn field_error(path: &Path, field: &str, reason: impl Into<String>) -> TextError {
    TextError::Field {
        path: path.to_path_buf(),
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// A special token given as `"<s>"`, `{"content": "<s>", ...}` (serialized
/// `AddedToken`) or `null`.
fn token_field(cfg: &Json, field: &str, path: &Path) -> Result<Option<String>, TextError> {
    match cfg.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(field_error(
                path,
                field,
                "object without a string `content`",
            )),
        },
        Some(_) => Err(field_error(
            path,
            field,
            "expected a string, an object with `content`, or null",
        )),
    }
}

/// A token id given as an int, a list of ints, or null.
fn id_list(v: &Json, path: &Path, field: &str) -> Result<Vec<u32>, TextError> {
    let one = |x: &Json| -> Result<u32, TextError> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| field_error(path, field, format!("`{x}` is not a valid token id")))
    };
    match v {
        Json::Null => Ok(Vec::new()),
        Json::Array(items) => items.iter().map(one).collect(),
        x => Ok(vec![one(x)?]),
    }
}

fn dedup_in_order(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

fn load_template(
    dir: &Path,
    tok_config: Option<&Json>,
    tc_path: &Path,
) -> Result<Option<ChatTemplate>, TextError> {
    let jinja_path = dir.join("chat_template.jinja");
    if let Some(bytes) = read_optional(&jinja_path)? {
        let source = String::from_utf8(bytes)
            .map_err(|_| field_error(&jinja_path, "(file)", "not valid UTF-8"))?;
        return ChatTemplate::new(source, jinja_path.display().to_string()).map(Some);
    }
    let json_path = dir.join("chat_template.json");
    if let Some(j) = read_json_optional(&json_path)?
        && let Some(t) = template_field(&j, &json_path)?
    {
        let origin = format!("{}:chat_template", json_path.display());
        return ChatTemplate::new(t, origin).map(Some);
    }
    if let Some(cfg) = tok_config
        && let Some(t) = template_field(cfg, tc_path)?
    {
        let origin = format!("{}:chat_template", tc_path.display());
        return ChatTemplate::new(t, origin).map(Some);
    }
    Ok(None)
}

/// `chat_template` as a string, or a list of `{"name", "template"}` from which
/// `default` (else the first) is taken.
fn template_field(cfg: &Json, path: &Path) -> Result<Option<String>, TextError> {
    const FIELD: &str = "chat_template";
    match cfg.get(FIELD) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(items)) => {
            let mut first = None;
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Json::as_str);
                let Some(tmpl) = item.get("template").and_then(Json::as_str) else {
                    return Err(field_error(
                        path,
                        &format!("{FIELD}[{i}].template"),
                        "expected a string",
                    ));
                };
                if name == Some("default") {
                    return Ok(Some(tmpl.to_string()));
                }
                first.get_or_insert(tmpl);
            }
            Ok(first.map(str::to_string))
        }
        Some(_) => Err(field_error(
            path,
            FIELD,
            "expected a string or a list of {name, template}",
        )),
    }
}
