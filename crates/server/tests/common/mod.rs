//! Test support: a scripted fake model, an in-process server, and a tiny raw HTTP/1.1
//! client (raw so the hostile tests can send truncated, oversized and stalled requests).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use moeflux_engine::EngineError;
use moeflux_server::{InferenceModel, ServerConfig, ServerHandle};
use moeflux_text::TextCodec;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const EOS: u32 = 2;

pub fn chartok() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chartok")
}

pub fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/bundled")
}

/// Counters the fake model updates, shared with the test.
#[derive(Default)]
pub struct Counters {
    pub prefilled: AtomicUsize,
    pub decoded: AtomicUsize,
    pub restores: AtomicUsize,
    pub resets: AtomicUsize,
}

/// Emits `script` (as token ids of the char tokenizer) after every prefill, then EOS
/// (or cycles forever when `eos` is false); sleeps `delay` per decode step.
#[derive(Clone)]
pub struct FakeSpec {
    pub script: String,
    pub eos: bool,
    pub delay: Duration,
    pub max_ctx: usize,
    pub load_delay: Duration,
}

impl Default for FakeSpec {
    fn default() -> Self {
        FakeSpec {
            script: "Hello, world! STOP here.".into(),
            eos: true,
            delay: Duration::ZERO,
            max_ctx: 256,
            load_delay: Duration::ZERO,
        }
    }
}

pub struct Fake {
    spec: FakeSpec,
    script: Vec<u32>,
    vocab: usize,
    pos: usize,
    /// Tokens decoded since the last prefill: indexes the script.
    step: usize,
    pub counters: Arc<Counters>,
}

impl Fake {
    fn logits(&self) -> Vec<f32> {
        let mut l = vec![0.0; self.vocab];
        let id = if self.spec.eos && self.step >= self.script.len() {
            EOS
        } else {
            self.script[self.step % self.script.len()]
        };
        l[id as usize] = 20.0;
        l
    }
}

impl InferenceModel for Fake {
    type Snapshot = (usize, usize);
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn max_context(&self) -> usize {
        self.spec.max_ctx
    }
    fn stop_ids(&self) -> Vec<u32> {
        vec![EOS]
    }
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if self.pos + tokens.len() > self.spec.max_ctx {
            return Err(EngineError::ContextExceeded {
                needed: self.pos + tokens.len(),
                max: self.spec.max_ctx,
            });
        }
        self.pos += tokens.len();
        self.step = 0;
        self.counters.prefilled.fetch_add(tokens.len(), SeqCst);
        Ok(self.logits())
    }
    fn decode(&mut self, _token: u32) -> Result<Vec<f32>, EngineError> {
        if self.pos + 1 > self.spec.max_ctx {
            return Err(EngineError::ContextExceeded {
                needed: self.pos + 1,
                max: self.spec.max_ctx,
            });
        }
        std::thread::sleep(self.spec.delay);
        self.pos += 1;
        self.step += 1;
        self.counters.decoded.fetch_add(1, SeqCst);
        Ok(self.logits())
    }
    fn snapshot(&mut self) -> Result<(usize, usize), EngineError> {
        Ok((self.pos, self.step))
    }
    fn restore(&mut self, s: &(usize, usize)) -> Result<(), EngineError> {
        (self.pos, self.step) = *s;
        self.counters.restores.fetch_add(1, SeqCst);
        Ok(())
    }
    fn reset(&mut self) -> Result<(), EngineError> {
        self.pos = 0;
        self.step = 0;
        self.counters.resets.fetch_add(1, SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "fake".into()
    }
}

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: std::net::SocketAddr,
    pub counters: Arc<Counters>,
}

impl TestServer {
    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await.unwrap();
        }
    }
}

pub fn config() -> ServerConfig {
    ServerConfig {
        model_id: "fake".into(),
        ..ServerConfig::default()
    }
}

/// Starts a server with the fake model; waits until it is ready unless the spec has a load delay.
pub async fn start_fake(spec: FakeSpec, cfg: ServerConfig) -> TestServer {
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wait = spec.load_delay.is_zero();
    let handle = moeflux_server::start(listener, cfg, move || {
        std::thread::sleep(spec.load_delay);
        let codec = TextCodec::from_dir(&chartok()).map_err(|e| e.to_string())?;
        let vocab = codec.vocab_size();
        let script = codec
            .encode(&spec.script, false)
            .map_err(|e| e.to_string())?;
        Ok((
            Fake {
                spec,
                script,
                vocab,
                pos: 0,
                step: 0,
                counters: c,
            },
            codec,
        ))
    })
    .await
    .unwrap();
    if wait {
        handle.wait_ready().await.unwrap();
    }
    let addr = handle.local_addr();
    TestServer {
        handle: Some(handle),
        addr,
        counters,
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body, with their `event:` names.
    pub fn sse(&self) -> Vec<(Option<String>, String)> {
        parse_sse(&self.body)
    }
}

pub fn parse_sse(body: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut ev = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event:") {
                ev = Some(e.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data = Some(d.strip_prefix(' ').unwrap_or(d).to_string());
            }
        }
        if let Some(d) = data {
            out.push((ev, d));
        }
    }
    out
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..nl])
                .unwrap_or("0")
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        b = &b[nl + 2..];
        if size == 0 || b.len() < size {
            out.extend_from_slice(&b[..size.min(b.len())]);
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

pub fn parse_response(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends `raw` and reads until the server closes the connection.
pub async fn raw(addr: std::net::SocketAddr, raw: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .expect("response timed out")
        .unwrap();
    parse_response(&buf)
}

pub fn request_bytes(method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

pub async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> Resp {
    raw(addr, &request_bytes("POST", path, body, &[])).await
}

pub async fn post_h(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Resp {
    raw(addr, &request_bytes("POST", path, body, headers)).await
}

pub async fn get(addr: std::net::SocketAddr, path: &str) -> Resp {
    raw(addr, &request_bytes("GET", path, "", &[])).await
}

/// A metric's value from `/metrics` (first sample whose line starts with `name`).
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let m = get(addr, "/metrics").await;
    m.body
        .lines()
        .find(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing:\n{}", m.body))
}

/// Polls `cond` every 10 ms for up to `secs`.
pub async fn eventually<F, Fut>(secs: u64, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Opens a streaming request and returns the connection after reading at least `n` SSE
/// data events (and the raw bytes read so far).
pub async fn stream_some(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    n: usize,
) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request_bytes("POST", path, body, &[]))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let k = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("stream stalled")
            .unwrap();
        assert!(
            k > 0,
            "stream closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..k]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.matches("data:").count() >= n {
            return (s, text);
        }
    }
}

pub fn chat_body(content: &str, extra: &str) -> String {
    let content = serde_json::to_string(content).unwrap();
    format!(r#"{{"model":"fake","messages":[{{"role":"user","content":{content}}}]{extra}}}"#)
}
