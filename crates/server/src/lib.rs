//! moeflux-server: the `moeflux serve` HTTP server, OpenAI- and Anthropic-compatible.
//!
//! Shape: axum handlers parse and validate requests ([`fields`]), render chat
//! messages with the model's own template and tokenize them, then hand a job to
//! the single engine thread ([`engine`]) through a bounded FIFO queue and read
//! its token events back over a channel, as JSON or as server-sent events in the
//! OpenAI ([`openai`]) or Anthropic ([`anthropic`]) streaming format. The model
//! sits behind the small [`InferenceModel`] trait, so everything here can be
//! tested against a fake model; the real one is a `moeflux_engine::Session`.
//!
//! Boundaries: this crate does no model math and no sampling math (those are
//! `moeflux-engine` and `moeflux-text`); it owns HTTP, validation, scheduling,
//! prefix reuse, stop strings, cancellation and metrics.

pub mod anthropic;
pub mod engine;
pub mod error;
pub mod fields;
pub mod http;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod stop;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use moeflux_text::TextCodec;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use error::{ApiError, ServerError};
pub use model::{InferenceModel, model_id, session_loader};

use engine::{ENGINE_JOIN_TIMEOUT, Engine, EngineShared, JobQueue};
use metrics::Metrics;

/// Server settings (the model itself comes from the loader given to [`start`]).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The id clients must name in `model` and that `/v1/models` lists.
    pub model_id: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>` or `x-api-key: <key>`.
    pub api_key: Option<String>,
    /// Requests that may wait for the engine before new ones get 429.
    pub queue_capacity: usize,
    /// Prefix snapshots kept (0 disables prefix reuse across requests).
    pub prefix_cache: usize,
    /// Largest accepted request body (413 above).
    pub max_body_bytes: usize,
    /// How long a client may take to send its body (408 after).
    pub body_timeout: Duration,
    /// How long shutdown lets in-flight requests finish before cancelling them.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_id: "model".into(),
            api_key: None,
            queue_capacity: 64,
            prefix_cache: 8,
            max_body_bytes: 4 << 20,
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// What a handler needs once the model is loaded.
pub struct Loaded {
    pub codec: Arc<TextCodec>,
    pub max_context: usize,
    pub vocab: usize,
}

#[derive(Clone)]
pub enum LoadState {
    Loading,
    Ready(Arc<Loaded>),
    Failed(String),
}

/// A running server (see [`start`]).
pub struct ServerHandle {
    addr: SocketAddr,
    stop_http: Option<tokio::sync::oneshot::Sender<()>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    engine: Option<std::thread::JoinHandle<()>>,
    shared: Arc<EngineShared>,
    load: watch::Receiver<LoadState>,
    grace: Duration,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the model is loaded; `Err` if loading failed.
    pub async fn wait_ready(&self) -> Result<(), ServerError> {
        let mut rx = self.load.clone();
        let state = rx
            .wait_for(|s| !matches!(s, LoadState::Loading))
            .await
            .map(|s| s.clone());
        match state {
            Ok(LoadState::Ready(_)) => Ok(()),
            Ok(LoadState::Failed(msg)) => Err(ServerError::Load(msg)),
            _ => Err(ServerError::Load(
                "the engine thread ended while loading".into(),
            )),
        }
    }

    /// Resolves only if loading fails, with the reason.
    pub async fn load_failure(&self) -> String {
        let mut rx = self.load.clone();
        let r = rx
            .wait_for(|s| matches!(s, LoadState::Failed(_)))
            .await
            .map(|s| s.clone());
        match r {
            Ok(LoadState::Failed(msg)) => msg,
            _ if matches!(*rx.borrow(), LoadState::Loading) => {
                "the engine thread ended while loading the model".into()
            }
            _ => std::future::pending().await,
        }
    }

    /// Graceful shutdown: stop accepting connections, let in-flight requests finish for
    /// up to the grace period, then cancel what is left and stop the engine thread.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop_http.take() {
            let _ = tx.send(());
        }
        let http = match tokio::time::timeout(self.grace, &mut self.http).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("grace period over; cancelling in-flight requests");
                self.shared.abort.store(true, Relaxed);
                self.shared.queue.close();
                match tokio::time::timeout(Duration::from_secs(2), &mut self.http).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.http.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        self.shared.queue.close();
        if let Some(t) = self.engine.take() {
            let join = tokio::task::spawn_blocking(move || t.join());
            if tokio::time::timeout(ENGINE_JOIN_TIMEOUT, join)
                .await
                .is_err()
            {
                tracing::warn!("engine thread still busy (loading?); leaving it");
            }
        }
        match http {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Http(e)),
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(ServerError::Http(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Starts serving on `listener` and loads the model on the engine thread with `loader`;
/// returns at once (the server answers `/health` with "loading" meanwhile).
pub async fn start<M, F>(
    listener: TcpListener,
    cfg: ServerConfig,
    loader: F,
) -> Result<ServerHandle, ServerError>
where
    M: InferenceModel + 'static,
    F: FnOnce() -> Result<(M, TextCodec), String> + Send + 'static,
{
    let addr = listener.local_addr().map_err(|e| ServerError::Bind {
        addr: "listener".into(),
        source: e,
    })?;
    let metrics = Arc::new(Metrics::default());
    let shared = Arc::new(EngineShared {
        queue: JobQueue::new(cfg.queue_capacity),
        metrics: metrics.clone(),
        abort: AtomicBool::new(false),
    });
    let (load_tx, load_rx) = watch::channel(LoadState::Loading);

    let engine_shared = shared.clone();
    let prefix_cache = cfg.prefix_cache;
    let engine = std::thread::Builder::new()
        .name("moeflux-engine".into())
        .spawn(move || {
            let t = std::time::Instant::now();
            // A panicking loader (a bug, or a model file that trips one) must still end
            // in a reported failure rather than a server stuck at "loading".
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(loader)).unwrap_or_else(|_| Err("loading the model panicked".into()));
            match loaded {
                Ok((model, codec)) => {
                    let codec = Arc::new(codec);
                    let loaded = Loaded { codec: codec.clone(), max_context: model.max_context(), vocab: model.vocab() };
                    tracing::info!(model = %model.describe(), secs = t.elapsed().as_secs_f64(), "model loaded");
                    load_tx.send_replace(LoadState::Ready(Arc::new(loaded)));
                    Engine::new(model, codec, prefix_cache, engine_shared).run();
                }
                Err(msg) => {
                    tracing::error!(error = %msg, "loading the model failed");
                    load_tx.send_replace(LoadState::Failed(msg));
                }
            }
        })
        .map_err(ServerError::Thread)?;

    let grace = cfg.shutdown_grace;
    let app = http::router(http::AppState::new(
        cfg,
        shared.clone(),
        metrics,
        load_rx.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    Ok(ServerHandle {
        addr,
        stop_http: Some(stop_tx),
        http,
        engine: Some(engine),
        shared,
        load: load_rx,
        grace,
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Logs to stderr as `tracing` events; `RUST_LOG` overrides the default `info` level.
pub fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr as `tracing` events at `default` (a `RUST_LOG`-style filter) unless
/// `RUST_LOG` is set. A second call does nothing.
pub fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// The blocking entry point of `moeflux serve`: binds `host:port`, serves until SIGINT or
/// SIGTERM (or until loading the model fails), then shuts down gracefully. Prints
/// `listening on http://ADDR` on stdout once bound.
pub fn run<M, F>(host: &str, port: u16, cfg: ServerConfig, loader: F) -> Result<(), ServerError>
where
    M: InferenceModel + 'static,
    F: FnOnce() -> Result<(M, TextCodec), String> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    rt.block_on(serve_until(host, port, cfg, loader, shutdown_signal()))
}

async fn serve_until<M, F>(
    host: &str,
    port: u16,
    cfg: ServerConfig,
    loader: F,
    stop: impl Future<Output = ()>,
) -> Result<(), ServerError>
where
    M: InferenceModel + 'static,
    F: FnOnce() -> Result<(M, TextCodec), String> + Send + 'static,
{
    let listener = TcpListener::bind((host, port))
        .await
        .map_err(|e| ServerError::Bind {
            addr: format!("{host}:{port}"),
            source: e,
        })?;
    let model_id = cfg.model_id.clone();
    let auth = cfg.api_key.is_some();
    let handle = start(listener, cfg, loader).await?;
    let addr = handle.local_addr();
    tracing::info!(%addr, model = %model_id, auth, "listening");
    if !auth && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond this machine without an API key (set --api-key or MOEFLUX_API_KEY)");
    }
    println!("moeflux serve: listening on http://{addr} (model '{model_id}')");
    let failed = tokio::select! {
        _ = stop => None,
        msg = handle.load_failure() => Some(msg),
    };
    tracing::info!("shutting down");
    let r = handle.shutdown().await;
    match failed {
        Some(msg) => Err(ServerError::Load(msg)),
        None => r,
    }
}
