//! Routing, middleware and the plumbing every generation endpoint shares.
//!
//! Middleware gives each request an id (logged in its span and returned as
//! `x-request-id`), counts it by route and status, and checks the API key on
//! `/v1/*` (`/health` and `/metrics` stay open for probes and scrapers).
//! Bodies are read by hand rather than with axum's `Json` extractor so that
//! every failure (too large, too slow, truncated, malformed) becomes a JSON
//! error in the endpoint's dialect instead of axum's plain-text rejections.
//! [`submit`] turns a validated request into an engine job: it renders and
//! tokenizes the prompt off the async threads, checks it against the context,
//! and queues it (429 when the queue is full).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use http_body_util::BodyExt;
use moeflux_text::{ChatMessage, SamplingParams, TextCodec};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::engine::{EngineShared, Event, Job, PushError, Summary, TokenLogprob};
use crate::error::{ApiError, Dialect};
use crate::metrics::Metrics;
use crate::{LoadState, Loaded, ServerConfig};

/// Largest `max_tokens` accepted before comparing with the context (anything above is
/// certainly a client mistake, such as a negative number cast to unsigned).
pub const MAX_TOKENS_LIMIT: i64 = 1 << 24;

pub struct AppState {
    pub cfg: ServerConfig,
    pub engine: Arc<EngineShared>,
    pub metrics: Arc<Metrics>,
    pub load: watch::Receiver<LoadState>,
    /// Unix time the server started (`created` of `/v1/models`).
    pub started: u64,
    id_prefix: String,
    next_id: AtomicU64,
}

pub type Shared = Arc<AppState>;

/// The request id, placed in the request's extensions by the middleware.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    pub fn new(
        cfg: ServerConfig,
        engine: Arc<EngineShared>,
        metrics: Arc<Metrics>,
        load: watch::Receiver<LoadState>,
    ) -> Shared {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0);
        Arc::new(AppState {
            cfg,
            engine,
            metrics,
            load,
            started: unix_now(),
            id_prefix: format!("{nanos:08x}"),
            next_id: AtomicU64::new(1),
        })
    }

    fn new_id(&self) -> String {
        format!(
            "{}{:06}",
            self.id_prefix,
            self.next_id.fetch_add(1, Relaxed)
        )
    }

    fn loaded(&self) -> Option<Arc<Loaded>> {
        match &*self.load.borrow() {
            LoadState::Ready(l) => Some(l.clone()),
            _ => None,
        }
    }

    /// The loaded model, waiting for loading to finish.
    pub async fn wait_loaded(&self) -> Result<Arc<Loaded>, ApiError> {
        let mut rx = self.load.clone();
        let s = rx
            .wait_for(|s| !matches!(s, LoadState::Loading))
            .await
            .map(|s| s.clone());
        match s {
            Ok(LoadState::Ready(l)) => Ok(l),
            Ok(LoadState::Failed(msg)) => Err(ApiError::unavailable(format!(
                "the model failed to load: {msg}"
            ))),
            _ => Err(ApiError::unavailable("the engine is not running")),
        }
    }

    pub fn check_model(&self, f: &crate::fields::Fields) -> Result<(), ApiError> {
        let m = f.require("model", f.str("model")?)?;
        if m != self.cfg.model_id {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "unknown model '{m}'; this server serves '{}'",
                    self.cfg.model_id
                ),
            )
            .with_code("model_not_found"));
        }
        Ok(())
    }
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_get))
        .route("/v1/chat/completions", post(crate::openai::chat))
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/messages", post(crate::anthropic::messages))
        .route(
            "/v1/messages/count_tokens",
            post(crate::anthropic::count_tokens),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Metric label for a path: the route, or "other" (never the raw path, which is unbounded).
fn route_label(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/messages" => "/v1/messages",
        "/v1/messages/count_tokens" => "/v1/messages/count_tokens",
        p if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ => "other",
    }
}

async fn observe(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let id = st.new_id();
    req.extensions_mut().insert(RequestId(id.clone()));
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("http", request_id = %id, method = %req.method(), path = %path);
    let t = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    st.metrics.request(route_label(&path), status);
    span.in_scope(|| tracing::info!(status, ms = t.elapsed().as_secs_f64() * 1e3, "response"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Equal-time comparison, so the key cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn presented_key(h: &HeaderMap) -> Option<&str> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    h.get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let path = req.uri().path();
        if path.starts_with("/v1/") || path == "/v1" {
            let ok =
                presented_key(req.headers()).is_some_and(|k| same(k.as_bytes(), key.as_bytes()));
            if !ok {
                return ApiError::unauthorized()
                    .dialect(Dialect::of_path(path))
                    .into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path();
    ApiError::not_found(format!("no route for {} {path}", req.method()))
        .dialect(Dialect::of_path(path))
        .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::method_not_allowed()
        .dialect(Dialect::of_path(req.uri().path()))
        .into_response()
}

async fn health(State(st): State<Shared>) -> Response {
    let (code, body) = match &*st.load.borrow() {
        LoadState::Loading => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "loading"}),
        ),
        LoadState::Ready(_) => (
            StatusCode::OK,
            json!({"status": "ready", "model": st.cfg.model_id}),
        ),
        LoadState::Failed(msg) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "failed", "error": msg}),
        ),
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    let ready = st.loaded().is_some();
    let text = st
        .metrics
        .render(st.engine.queue.len(), st.engine.queue.capacity(), ready);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn model_object(st: &AppState) -> Value {
    let mut m = json!({"id": st.cfg.model_id, "object": "model", "created": st.started, "owned_by": "moeflux"});
    if let Some(l) = st.loaded() {
        m["max_model_len"] = json!(l.max_context);
    }
    m
}

async fn models(State(st): State<Shared>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&st)]})).into_response()
}

async fn model_get(
    State(st): State<Shared>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id != st.cfg.model_id {
        return ApiError::not_found(format!(
            "unknown model '{id}'; this server serves '{}'",
            st.cfg.model_id
        ))
        .with_code("model_not_found")
        .into_response();
    }
    axum::Json(model_object(&st)).into_response()
}

/// Reads the whole body (bounded in size and time) and parses it as JSON.
pub async fn read_json(st: &AppState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let limit = st.cfg.max_body_bytes;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::too_large(limit));
        }
    }
    let limited = http_body_util::Limited::new(body, limit);
    let collected = match tokio::time::timeout(st.cfg.body_timeout, limited.collect()).await {
        Err(_) => return Err(ApiError::body_timeout()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::too_large(limit));
        }
        Ok(Err(e)) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                format!("could not read the request body: {e}"),
            ));
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    if collected.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the request body is empty; a JSON object is expected",
        ));
    }
    serde_json::from_slice(&collected).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })
}

/// The prompt of a generation request, before tokenization.
pub enum PromptSpec {
    /// Chat messages rendered with the model's template (plus a partial assistant reply
    /// to continue, for Anthropic's prefill).
    Chat {
        messages: Vec<ChatMessage>,
        kwargs: serde_json::Map<String, Value>,
        continue_with: Option<String>,
    },
    /// Raw text, encoded with the tokenizer's special tokens (as `moeflux generate` does).
    Text(String),
    /// Token ids given by the client.
    Tokens(Vec<u32>),
}

/// A validated generation request.
pub struct GenRequest {
    pub prompt: PromptSpec,
    /// The request field holding the prompt (for error messages).
    pub prompt_param: &'static str,
    pub max_tokens: Option<usize>,
    pub max_tokens_param: &'static str,
    /// Used when `max_tokens` is absent; `None` = as much as the context allows.
    pub default_max: Option<usize>,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    pub logprobs: Option<usize>,
}

/// A queued job's handle for the handler.
pub struct Submitted {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub prompt_tokens: usize,
    pub stops: Vec<String>,
}

/// Maps a sampling-parameter error from `moeflux-text` to a 400 naming the field.
pub fn check_params(p: &SamplingParams) -> Result<(), ApiError> {
    p.validate().map_err(|e| match e {
        moeflux_text::TextError::InvalidParam { field, reason } => ApiError::invalid(field, reason),
        other => ApiError::bad_request("invalid_parameter", other.to_string()),
    })
}

fn tokenize(
    codec: &TextCodec,
    spec: &PromptSpec,
    param: &'static str,
    vocab: usize,
) -> Result<(Vec<u32>, Option<usize>), ApiError> {
    let encode = |text: &str, special: bool| {
        codec
            .encode(text, special)
            .map_err(|e| ApiError::invalid(param, e.to_string()))
    };
    match spec {
        PromptSpec::Text(t) => Ok((encode(t, true)?, None)),
        PromptSpec::Tokens(ids) => {
            if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
                return Err(ApiError::invalid(
                    format!("{param}[{i}]"),
                    format!("token id {t} is outside the vocabulary (size {vocab})"),
                ));
            }
            Ok((ids.clone(), None))
        }
        PromptSpec::Chat {
            messages,
            kwargs,
            continue_with,
        } => {
            if !codec.has_chat_template() {
                return Err(ApiError::bad_request(
                    "no_chat_template",
                    "this model has no chat template; use /v1/completions with a text prompt",
                ));
            }
            let render = |msgs: &[ChatMessage], gen_prompt: bool| {
                codec
                    .render_chat_with(msgs, gen_prompt, kwargs)
                    .map_err(|e| ApiError::invalid(param, e.to_string()))
            };
            let mut text = render(messages, true)?;
            if let Some(c) = continue_with {
                text.push_str(c);
            }
            let tokens = encode(&text, false)?;
            // Where the last message starts, if the rendering and the tokenization are both
            // prefix-stable there (they normally are: templates render message by message).
            let boundary = if messages.len() >= 2 {
                render(&messages[..messages.len() - 1], false)
                    .ok()
                    .filter(|p| !p.is_empty() && text.starts_with(p.as_str()))
                    .and_then(|p| {
                        let pt = codec.encode(&p, false).ok()?;
                        (tokens.starts_with(&pt) && pt.len() < tokens.len()).then_some(pt.len())
                    })
            } else {
                None
            };
            Ok((tokens, boundary))
        }
    }
}

/// Renders and tokenizes a prompt off the async threads.
async fn tokenize_blocking(
    loaded: &Loaded,
    spec: PromptSpec,
    param: &'static str,
) -> Result<(Vec<u32>, Option<usize>), ApiError> {
    let codec = loaded.codec.clone();
    let vocab = loaded.vocab;
    tokio::task::spawn_blocking(move || tokenize(&codec, &spec, param, vocab))
        .await
        .map_err(|e| ApiError::internal(format!("tokenization failed: {e}")))?
}

/// The number of tokens `req`'s prompt encodes to.
pub async fn count_prompt(st: &AppState, req: GenRequest) -> Result<usize, ApiError> {
    let loaded = st.wait_loaded().await?;
    Ok(tokenize_blocking(&loaded, req.prompt, req.prompt_param)
        .await?
        .0
        .len())
}

/// Tokenizes, checks against the context and queues a generation job.
pub async fn submit(st: &AppState, id: &str, req: GenRequest) -> Result<Submitted, ApiError> {
    let loaded = st.wait_loaded().await?;
    let max_ctx = loaded.max_context;
    if let Some(m) = req.max_tokens {
        if m > max_ctx {
            return Err(ApiError::invalid(
                req.max_tokens_param,
                format!("{m} exceeds the model's context of {max_ctx} tokens"),
            ));
        }
    }
    let param = req.prompt_param;
    let (tokens, boundary) = tokenize_blocking(&loaded, req.prompt, param).await?;
    if tokens.is_empty() {
        return Err(ApiError::invalid(
            param,
            "the prompt is empty (it encodes to no tokens)",
        ));
    }
    if tokens.len() >= max_ctx {
        return Err(ApiError::invalid(param, format!("the prompt is {} tokens; the model's context is {max_ctx} tokens (at least one must be left to generate)", tokens.len()))
            .with_code("context_length_exceeded"));
    }
    let room = max_ctx - tokens.len();
    let max_new = req.max_tokens.or(req.default_max).unwrap_or(room).min(room);
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = tokens.len();
    let job = Job {
        id: id.to_string(),
        prompt: tokens,
        boundary,
        max_new,
        params: req.params,
        stops: req.stops.clone(),
        logprobs: req.logprobs,
        events: tx,
        accepted: Instant::now(),
    };
    match st.engine.queue.push(job) {
        Ok(()) => Ok(Submitted {
            events: rx,
            prompt_tokens,
            stops: req.stops,
        }),
        Err(PushError::Full) => {
            st.metrics.rejected_queue_full.fetch_add(1, Relaxed);
            Err(ApiError::queue_full(st.engine.queue.capacity()))
        }
        Err(PushError::Closed) => Err(ApiError::unavailable("the server is shutting down")),
    }
}

/// The whole result of a non-streaming request.
pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub summary: Summary,
}

pub async fn collect(mut events: mpsc::UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Started { .. } => {}
            Event::Text {
                text: t,
                logprobs: lp,
            } => {
                text.push_str(&t);
                logprobs.extend(lp);
            }
            Event::Done(summary) => {
                return Ok(Collected {
                    text,
                    logprobs,
                    summary,
                });
            }
            Event::Failed(msg) => {
                return Err(ApiError::internal(format!("generation failed: {msg}")));
            }
        }
    }
    Err(ApiError::internal(
        "the engine stopped before finishing this request",
    ))
}

/// Server-sent events from engine events: `format` maps each engine event to zero or
/// more SSE events. The stream ends when the engine drops the job's channel; dropping
/// the stream (client gone) drops the receiver, which cancels the generation.
pub fn sse<F>(events: mpsc::UnboundedReceiver<Event>, format: F) -> Response
where
    F: FnMut(Event) -> Vec<SseEvent> + Send + 'static,
{
    Sse::new(event_stream(events, format)).into_response()
}

fn event_stream<F>(
    events: mpsc::UnboundedReceiver<Event>,
    format: F,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send
where
    F: FnMut(Event) -> Vec<SseEvent> + Send + 'static,
{
    let state = (
        events,
        format,
        std::collections::VecDeque::<SseEvent>::new(),
    );
    futures_util::stream::unfold(state, |(mut rx, mut f, mut buf)| async move {
        loop {
            if let Some(e) = buf.pop_front() {
                return Some((Ok(e), (rx, f, buf)));
            }
            let ev = rx.recv().await?;
            buf.extend(f(ev));
        }
    })
}

/// An SSE event whose data is `v` as JSON.
pub fn sse_json(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}
