//! The OpenAI-compatible endpoints: `POST /v1/chat/completions` and `POST /v1/completions`.
//!
//! Request fields follow the OpenAI API reference (plus the `top_k`, `min_p`,
//! `repetition_penalty` and `chat_template_kwargs` extensions vLLM and
//! llama.cpp accept). Features this server cannot honour (several choices,
//! tools, images, `echo`, `suffix`) are refused with a 400 naming the field
//! rather than silently ignored. Responses and stream chunks carry the same
//! fields as OpenAI's, including `usage.prompt_tokens_details.cached_tokens`,
//! which reports prefix reuse.

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use moeflux_text::{ChatMessage, SamplingParams};
use serde_json::{Map, Value, json};

use crate::engine::{Event, Finish, Summary, TokenLogprob};
use crate::error::ApiError;
use crate::fields::Fields;
use crate::http::{
    self, GenRequest, MAX_TOKENS_LIMIT, PromptSpec, RequestId, Shared, sse_json, unix_now,
};

/// Sampling fields shared by both endpoints.
fn sampling(f: &Fields) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let top_p = f.number("top_p", 0.0, 1.0)?.unwrap_or(d.top_p);
    if top_p <= 0.0 {
        return Err(ApiError::invalid("top_p", "must be greater than 0"));
    }
    let top_k = f.int("top_k", -1, 1 << 30)?.unwrap_or(0);
    let rep = f
        .number("repetition_penalty", 0.0, 100.0)?
        .unwrap_or(d.repetition_penalty);
    if rep <= 0.0 {
        return Err(ApiError::invalid(
            "repetition_penalty",
            "must be greater than 0",
        ));
    }
    let p = SamplingParams {
        temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(d.temperature),
        top_k: top_k.max(0) as usize,
        top_p,
        min_p: f.number("min_p", 0.0, 1.0)?.unwrap_or(d.min_p),
        repetition_penalty: rep,
        presence_penalty: f.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: f.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0),
        seed: f.seed("seed")?,
    };
    http::check_params(&p)?;
    Ok(p)
}

/// Fields that only make sense with several choices; this server produces one.
fn single_choice(f: &Fields) -> Result<(), ApiError> {
    if let Some(n) = f.int("n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    Ok(())
}

fn max_tokens(
    f: &Fields,
    keys: &[&'static str],
) -> Result<(Option<usize>, &'static str), ApiError> {
    for k in keys {
        if let Some(m) = f.int(k, 1, MAX_TOKENS_LIMIT)? {
            return Ok((Some(m as usize), k));
        }
    }
    Ok((None, keys[0]))
}

fn stream_flags(f: &Fields) -> Result<(bool, bool), ApiError> {
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(v) => Fields::object(v, "stream_options".into())?
            .bool("include_usage")?
            .unwrap_or(false),
    };
    Ok((stream, include_usage))
}

fn text_of_content(v: Option<&Value>, path: &str, role: &str) -> Result<String, ApiError> {
    match v {
        None if role == "assistant" => Ok(String::new()),
        None => Err(ApiError::invalid(format!("{path}.content"), "is required")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                let pf = Fields::object(p, format!("{path}.content[{i}]"))?;
                let ty = pf.require("type", pf.str("type")?)?;
                if ty != "text" {
                    return Err(ApiError::invalid(
                        pf.path("type"),
                        format!("content part type '{ty}' is not supported (text only)"),
                    ));
                }
                out.push_str(pf.require("text", pf.str("text")?)?);
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            format!("{path}.content"),
            "must be a string or an array of content parts",
        )),
    }
}

fn chat_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let list = f.require("messages", f.array("messages")?)?;
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "must contain at least one message",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let path = format!("messages[{i}]");
        let mf = Fields::object(m, path.clone())?;
        let role = mf.require("role", mf.str("role")?)?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" | "function" => {
                return Err(ApiError::invalid(
                    mf.path("role"),
                    format!("role '{role}' is not supported (this server does no tool calling)"),
                ));
            }
            other => {
                return Err(ApiError::invalid(
                    mf.path("role"),
                    format!("unknown role '{other}' (system, developer, user, assistant)"),
                ));
            }
        };
        if mf
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(ApiError::invalid(
                mf.path("tool_calls"),
                "tool calls are not supported",
            ));
        }
        out.push(ChatMessage::new(
            role,
            text_of_content(mf.get("content"), &path, role)?,
        ));
    }
    Ok(out)
}

fn finish_reason(s: &Summary) -> &'static str {
    match s.finish {
        Finish::Eos | Finish::StopString(_) => "stop",
        Finish::Length => "length",
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(&l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|(t, lp)| entry(t, *lp)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

/// Legacy completions logprobs; `offset` is the text length before these tokens.
fn completion_logprobs(lps: &[TokenLogprob], with_top: bool, offset: usize) -> Value {
    let mut off = offset;
    let mut offsets = Vec::with_capacity(lps.len());
    for l in lps {
        offsets.push(off);
        off += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": if with_top {
            Value::Array(lps.iter().map(|l| Value::Object(l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<Map<_, _>>())).collect())
        } else {
            Value::Null
        },
        "text_offset": offsets,
    })
}

struct ChatRequest {
    generation: GenRequest,
    stream: bool,
    include_usage: bool,
}

fn parse_chat(st: &Shared, v: &Value) -> Result<ChatRequest, ApiError> {
    let f = Fields::root(v)?;
    st.check_model(&f)?;
    let messages = chat_messages(&f)?;
    single_choice(&f)?;
    if f.array("tools")?.is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    if let Some(rf) = f.get("response_format") {
        let rf = Fields::object(rf, "response_format".into())?;
        if let Some(t) = rf.str("type")? {
            if t != "text" {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!("'{t}' is not supported (text only)"),
                ));
            }
        }
    }
    let (max, max_param) = max_tokens(&f, &["max_completion_tokens", "max_tokens"])?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.int("top_logprobs", 0, 20)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "requires logprobs = true",
        ));
    }
    let kwargs = match f.get("chat_template_kwargs") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                "must be an object",
            ));
        }
    };
    let (stream, include_usage) = stream_flags(&f)?;
    Ok(ChatRequest {
        generation: GenRequest {
            prompt: PromptSpec::Chat {
                messages,
                kwargs,
                continue_with: None,
            },
            prompt_param: "messages",
            max_tokens: max,
            max_tokens_param: max_param,
            default_max: None,
            params: sampling(&f)?,
            stops: f.strings("stop", 16)?,
            logprobs: logprobs.then(|| top.unwrap_or(0) as usize),
        },
        stream,
        include_usage,
    })
}

pub async fn chat(
    State(st): State<Shared>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match chat_inner(st, rid, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(
    st: Shared,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let v = http::read_json(&st, &headers, body).await?;
    let req = parse_chat(&st, &v)?;
    let want_lp = req.generation.logprobs.is_some();
    let sub = http::submit(&st, &rid.0, req.generation).await?;
    let id = format!("chatcmpl-{}", rid.0);
    let model = st.cfg.model_id.clone();
    let created = unix_now();
    if !req.stream {
        let c = http::collect(sub.events).await?;
        let logprobs = if want_lp {
            chat_logprobs(&c.logprobs)
        } else {
            Value::Null
        };
        return Ok(axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs,
                "finish_reason": finish_reason(&c.summary),
            }],
            "usage": usage(&c.summary),
        }))
        .into_response());
    }
    let include_usage = req.include_usage;
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        sse_json(&c)
    };
    Ok(http::sse(sub.events, move |ev| match ev {
        Event::Started { .. } => vec![chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
            None,
        )],
        Event::Text { text, logprobs } => {
            let lp = if logprobs.is_empty() {
                Value::Null
            } else {
                chat_logprobs(&logprobs)
            };
            vec![chunk(
                json!([{"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]),
                None,
            )]
        }
        Event::Done(s) => {
            let mut out = vec![chunk(
                json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&s)}]),
                None,
            )];
            if include_usage {
                out.push(chunk(json!([]), Some(usage(&s))));
            }
            out.push(SseEvent::default().data("[DONE]"));
            out
        }
        Event::Failed(msg) => vec![
            sse_json(&ApiError::internal(format!("generation failed: {msg}")).body()),
            SseEvent::default().data("[DONE]"),
        ],
    }))
}

struct CompletionRequest {
    generation: GenRequest,
    stream: bool,
    include_usage: bool,
    top_logprobs: bool,
}

fn completion_prompt(f: &Fields) -> Result<PromptSpec, ApiError> {
    let v = f.require("prompt", f.get("prompt"))?;
    let ids = |a: &Vec<Value>, path: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("{path}[{i}]"),
                            "must be a token id (a non-negative integer)",
                        )
                    })
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(PromptSpec::Text(s.clone())),
        Value::Array(a) if a.is_empty() => Err(ApiError::invalid("prompt", "must not be empty")),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            Ok(PromptSpec::Tokens(ids(a, "prompt")?))
        }
        Value::Array(a) if a.len() == 1 => match &a[0] {
            Value::String(s) => Ok(PromptSpec::Text(s.clone())),
            Value::Array(inner) => Ok(PromptSpec::Tokens(ids(inner, "prompt[0]")?)),
            _ => Err(ApiError::invalid(
                "prompt[0]",
                "must be a string or an array of token ids",
            )),
        },
        Value::Array(_) => Err(ApiError::invalid(
            "prompt",
            "only one prompt per request is supported",
        )),
        _ => Err(ApiError::invalid(
            "prompt",
            "must be a string, an array of token ids, or a one-element array of either",
        )),
    }
}

fn parse_completion(st: &Shared, v: &Value) -> Result<CompletionRequest, ApiError> {
    let f = Fields::root(v)?;
    st.check_model(&f)?;
    let prompt = completion_prompt(&f)?;
    single_choice(&f)?;
    if let Some(b) = f.int("best_of", 1, i64::MAX)? {
        if b != 1 {
            return Err(ApiError::invalid(
                "best_of",
                "only best_of = 1 is supported",
            ));
        }
    }
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let (max, max_param) = max_tokens(&f, &["max_tokens"])?;
    let lp = f.int("logprobs", 0, 20)?;
    let (stream, include_usage) = stream_flags(&f)?;
    Ok(CompletionRequest {
        generation: GenRequest {
            prompt,
            prompt_param: "prompt",
            max_tokens: max,
            max_tokens_param: max_param,
            // The OpenAI completions default.
            default_max: Some(16),
            params: sampling(&f)?,
            stops: f.strings("stop", 16)?,
            logprobs: lp.map(|k| k as usize),
        },
        stream,
        include_usage,
        top_logprobs: lp.is_some_and(|k| k > 0),
    })
}

pub async fn completions(
    State(st): State<Shared>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match completions_inner(st, rid, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    st: Shared,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let v = http::read_json(&st, &headers, body).await?;
    let req = parse_completion(&st, &v)?;
    let want_lp = req.generation.logprobs.is_some();
    let with_top = req.top_logprobs;
    let sub = http::submit(&st, &rid.0, req.generation).await?;
    let id = format!("cmpl-{}", rid.0);
    let model = st.cfg.model_id.clone();
    let created = unix_now();
    if !req.stream {
        let c = http::collect(sub.events).await?;
        let lp = if want_lp {
            completion_logprobs(&c.logprobs, with_top, 0)
        } else {
            Value::Null
        };
        return Ok(axum::Json(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": c.text, "index": 0, "logprobs": lp, "finish_reason": finish_reason(&c.summary)}],
            "usage": usage(&c.summary),
        }))
        .into_response());
    }
    let include_usage = req.include_usage;
    let chunk = move |choices: Value, usage: Option<Value>| {
        let mut c = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices});
        if include_usage {
            c["usage"] = usage.unwrap_or(Value::Null);
        }
        sse_json(&c)
    };
    let mut offset = 0usize;
    Ok(http::sse(sub.events, move |ev| match ev {
        Event::Started { .. } => vec![],
        Event::Text { text, logprobs } => {
            let lp = if want_lp {
                completion_logprobs(&logprobs, with_top, offset)
            } else {
                Value::Null
            };
            offset += text.len();
            vec![chunk(
                json!([{"text": text, "index": 0, "logprobs": lp, "finish_reason": null}]),
                None,
            )]
        }
        Event::Done(s) => {
            let mut out = vec![chunk(
                json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": finish_reason(&s)}]),
                None,
            )];
            if include_usage {
                out.push(chunk(json!([]), Some(usage(&s))));
            }
            out.push(SseEvent::default().data("[DONE]"));
            out
        }
        Event::Failed(msg) => vec![
            sse_json(&ApiError::internal(format!("generation failed: {msg}")).body()),
            SseEvent::default().data("[DONE]"),
        ],
    }))
}
