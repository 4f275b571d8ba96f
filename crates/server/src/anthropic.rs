//! The Anthropic Messages API: `POST /v1/messages`.
//!
//! Follows Anthropic's request rules (`max_tokens` is required, roles are
//! `user` and `assistant` only, the system prompt is the top-level `system`
//! field, temperature is in `[0, 1]`) and its streaming event sequence:
//! `message_start`, `content_block_start`, `ping`, `content_block_delta`...,
//! `content_block_stop`, `message_delta` (stop reason and output tokens),
//! `message_stop`. `POST /v1/messages/count_tokens` counts a prompt's tokens. A final `assistant` message is treated as the beginning of
//! the reply to continue ("prefill"), as the API does. Errors use Anthropic's
//! `{"type": "error", "error": {...}}` shape.

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use moeflux_text::{ChatMessage, SamplingParams};
use serde_json::{Map, Value, json};

use crate::engine::{Event, Finish, Summary};
use crate::error::{ApiError, Dialect};
use crate::fields::Fields;
use crate::http::{self, GenRequest, MAX_TOKENS_LIMIT, PromptSpec, RequestId, Shared};

/// Text of a `content` (or `system`) value: a string, or an array of text blocks.
fn text_blocks(v: &Value, path: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for (i, b) in blocks.iter().enumerate() {
                let bf = Fields::object(b, format!("{path}[{i}]"))?;
                let ty = bf.require("type", bf.str("type")?)?;
                if ty != "text" {
                    return Err(ApiError::invalid(
                        bf.path("type"),
                        format!("content block type '{ty}' is not supported (text only)"),
                    ));
                }
                out.push_str(bf.require("text", bf.str("text")?)?);
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            path,
            "must be a string or an array of text blocks",
        )),
    }
}

struct MessagesRequest {
    generation: GenRequest,
    stream: bool,
}

/// `count_only`: for `/v1/messages/count_tokens`, where `max_tokens` is not required.
fn parse(st: &Shared, v: &Value, count_only: bool) -> Result<MessagesRequest, ApiError> {
    let f = Fields::root(v)?;
    st.check_model(&f)?;
    let max = f.int("max_tokens", 1, MAX_TOKENS_LIMIT)?;
    let max = if count_only {
        max.unwrap_or(1)
    } else {
        f.require("max_tokens", max)?
    } as usize;
    let list = f.require("messages", f.array("messages")?)?;
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "must contain at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(list.len() + 1);
    if let Some(sys) = f.get("system") {
        let s = text_blocks(sys, "system")?;
        if !s.is_empty() {
            messages.push(ChatMessage::new("system", s));
        }
    }
    for (i, m) in list.iter().enumerate() {
        let mf = Fields::object(m, format!("messages[{i}]"))?;
        let role = mf.require("role", mf.str("role")?)?;
        if role != "user" && role != "assistant" {
            return Err(ApiError::invalid(
                mf.path("role"),
                format!(
                    "unknown role '{role}' (user, assistant; the system prompt goes in the top-level 'system' field)"
                ),
            ));
        }
        let content = text_blocks(
            mf.require("content", mf.get("content"))?,
            &mf.path("content"),
        )?;
        messages.push(ChatMessage::new(role, content));
    }
    // A trailing assistant message is the start of the reply.
    let continue_with = match messages.last() {
        Some(m) if m.role == "assistant" => {
            messages.pop().map(|m| m.content.trim_end().to_string())
        }
        _ => None,
    };
    if !messages.iter().any(|m| m.role == "user") {
        return Err(ApiError::invalid("messages", "must contain a user message"));
    }
    let d = SamplingParams::default();
    let top_p = f.number("top_p", 0.0, 1.0)?.unwrap_or(d.top_p);
    if top_p <= 0.0 {
        return Err(ApiError::invalid("top_p", "must be greater than 0"));
    }
    let params = SamplingParams {
        temperature: f.number("temperature", 0.0, 1.0)?.unwrap_or(1.0),
        top_k: f.int("top_k", 0, 1 << 30)?.unwrap_or(0) as usize,
        top_p,
        ..d
    };
    http::check_params(&params)?;
    if f.array("tools")?.is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "tool use is not supported"));
    }
    let stops = match f.get("stop_sequences") {
        None => Vec::new(),
        Some(Value::Array(_)) => f.strings("stop_sequences", 16)?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop_sequences",
                "must be an array of strings",
            ));
        }
    };
    Ok(MessagesRequest {
        generation: GenRequest {
            prompt: PromptSpec::Chat {
                messages,
                kwargs: Map::new(),
                continue_with,
            },
            prompt_param: "messages",
            max_tokens: Some(max),
            max_tokens_param: "max_tokens",
            default_max: None,
            params,
            stops,
            logprobs: None,
        },
        stream: f.bool("stream")?.unwrap_or(false),
    })
}

fn stop_reason(s: &Summary, stops: &[String]) -> (&'static str, Value) {
    match s.finish {
        Finish::Eos => ("end_turn", Value::Null),
        Finish::StopString(i) => (
            "stop_sequence",
            stops.get(i).map(|x| json!(x)).unwrap_or(Value::Null),
        ),
        Finish::Length => ("max_tokens", Value::Null),
    }
}

fn event(name: &str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

pub async fn messages(
    State(st): State<Shared>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match inner(st, rid, headers, body).await {
        Ok(r) => r,
        Err(e) => e.dialect(Dialect::Anthropic).into_response(),
    }
}

async fn inner(
    st: Shared,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let v = http::read_json(&st, &headers, body).await?;
    let req = parse(&st, &v, false)?;
    let sub = http::submit(&st, &rid.0, req.generation).await?;
    let id = format!("msg_{}", rid.0);
    let model = st.cfg.model_id.clone();
    let stops = sub.stops.clone();
    if !req.stream {
        let c = http::collect(sub.events).await?;
        let (reason, seq) = stop_reason(&c.summary, &stops);
        return Ok(axum::Json(json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": reason,
            "stop_sequence": seq,
            "usage": {"input_tokens": c.summary.prompt_tokens, "output_tokens": c.summary.completion_tokens},
        }))
        .into_response());
    }
    Ok(http::sse(sub.events, move |ev| match ev {
        Event::Started { prompt_tokens, .. } => vec![
            event(
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
                }}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event("ping", json!({"type": "ping"})),
        ],
        Event::Text { text, .. } if text.is_empty() => vec![],
        Event::Text { text, .. } => vec![event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        )],
        Event::Done(s) => {
            let (reason, seq) = stop_reason(&s, &stops);
            vec![
                event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
                event(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": {"output_tokens": s.completion_tokens}}),
                ),
                event("message_stop", json!({"type": "message_stop"})),
            ]
        }
        Event::Failed(msg) => vec![event(
            "error",
            ApiError::internal(format!("generation failed: {msg}"))
                .dialect(Dialect::Anthropic)
                .body(),
        )],
    }))
}

/// `POST /v1/messages/count_tokens`: the prompt's token count, without generating.
pub async fn count_tokens(State(st): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let v = http::read_json(&st, &headers, body).await?;
        let req = parse(&st, &v, true)?;
        let n = http::count_prompt(&st, req.generation).await?;
        Ok::<_, ApiError>(axum::Json(json!({"input_tokens": n})).into_response())
    };
    match r.await {
        Ok(r) => r,
        Err(e) => e.dialect(Dialect::Anthropic).into_response(),
    }
}
