//! The server against hostile and unlucky clients, with a scripted fake model so timing
//! is under the test's control: every validation error is a 4xx JSON body naming the
//! field, the server never answers 5xx for client mistakes, stalled and vanished clients
//! do not hurt anyone else, and the server answers normally afterwards.

mod common;

use std::time::{Duration, Instant};

use common::*;
use moeflux_server::ServerConfig;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// A normal request still works (used after every kind of abuse).
async fn healthy(addr: std::net::SocketAddr) {
    let r = post(
        addr,
        "/v1/chat/completions",
        &chat_body("hi", r#","max_tokens":5"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello");
}

fn assert_openai_error(r: &Resp, status: u16, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.body);
    let j = r.json();
    let e = &j["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
    assert!(e["type"].is_string(), "{}", r.body);
    assert!(
        e.get("code").is_some() && e.get("param").is_some(),
        "{}",
        r.body
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_name_the_field() {
    let srv = start_fake(
        FakeSpec {
            max_ctx: 64,
            ..FakeSpec::default()
        },
        config(),
    )
    .await;
    let a = srv.addr;
    let long = "x".repeat(100);
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("/v1/chat/completions", "{not json".into(), None),
        ("/v1/chat/completions", "".into(), None),
        ("/v1/chat/completions", "[1,2]".into(), None),
        (
            "/v1/chat/completions",
            r#"{"model":"fake"}"#.into(),
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[]}"#.into(),
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":"hi"}"#.into(),
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"role":"wizard","content":"hi"}]}"#.into(),
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"content":"hi"}]}"#.into(),
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"role":"user","content":5}]}"#.into(),
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"role":"user"}]}"#.into(),
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#
                .into(),
            Some("messages[0].content[0].type"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"fake","messages":[1]}"#.into(),
            Some("messages[0]"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","max_tokens":-1"#),
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","max_tokens":0"#),
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","max_tokens":1e12"#),
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","max_tokens":99999"#),
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","max_tokens":"ten""#),
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","max_completion_tokens":2.5"#),
            Some("max_completion_tokens"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","temperature":"hot""#),
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","temperature":-1"#),
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","temperature":9"#),
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","top_p":0"#),
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","top_p":1.5"#),
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","top_k":-5"#),
            Some("top_k"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","min_p":2"#),
            Some("min_p"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","presence_penalty":3"#),
            Some("presence_penalty"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","frequency_penalty":"x""#),
            Some("frequency_penalty"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","repetition_penalty":0"#),
            Some("repetition_penalty"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","seed":"abc""#),
            Some("seed"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","stop":5"#),
            Some("stop"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","stop":["a",""]"#),
            Some("stop[1]"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","stream":"yes""#),
            Some("stream"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","n":2"#),
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","top_logprobs":3"#),
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","logprobs":true,"top_logprobs":50"#),
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","tools":[{"type":"function"}]"#),
            Some("tools"),
        ),
        (
            "/v1/chat/completions",
            chat_body("hi", r#","stream_options":3"#),
            Some("stream_options"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi"}]}"#.into(),
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}]}"#.into(),
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            r#"{"model":7,"messages":[{"role":"user","content":"hi"}]}"#.into(),
            Some("model"),
        ),
        (
            "/v1/chat/completions",
            chat_body(&long, ""),
            Some("messages"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake"}"#.into(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":5}"#.into(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":["a","b"]}"#.into(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":[1,99999]}"#.into(),
            Some("prompt[1]"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":[1,-3]}"#.into(),
            Some("prompt[1]"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":""}"#.into(),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"fake","prompt":"{long}"}}"#),
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":"a","echo":true}"#.into(),
            Some("echo"),
        ),
        (
            "/v1/completions",
            r#"{"model":"fake","prompt":"a","logprobs":99}"#.into(),
            Some("logprobs"),
        ),
    ];
    for (path, body, param) in &cases {
        let r = post(a, path, body).await;
        assert!(
            r.status >= 400 && r.status < 500,
            "{path} {body}: {} {}",
            r.status,
            r.body
        );
        assert_openai_error(&r, 400, *param);
    }
    // Context overflow is marked with a code clients can act on.
    let r = post(a, "/v1/chat/completions", &chat_body(&long, "")).await;
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    healthy(a).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_validation_uses_its_error_shape() {
    let srv = start_fake(FakeSpec::default(), config()).await;
    let a = srv.addr;
    let cases: Vec<(String, &str)> = vec![
        (r#"{"model":"fake","messages":[{"role":"user","content":"hi"}]}"#.into(), "max_tokens"),
        (r#"{"model":"fake","max_tokens":-4,"messages":[{"role":"user","content":"hi"}]}"#.into(), "max_tokens"),
        (r#"{"model":"fake","max_tokens":5,"messages":[]}"#.into(), "messages"),
        (r#"{"model":"fake","max_tokens":5,"messages":[{"role":"system","content":"hi"}]}"#.into(), "messages[0].role"),
        (r#"{"model":"fake","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image"}]}]}"#.into(), "messages[0].content[0].type"),
        (r#"{"model":"fake","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"temperature":1.5}"#.into(), "temperature"),
        (r#"{"model":"fake","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"stop_sequences":"x"}"#.into(), "stop_sequences"),
        (r#"{"model":"fake","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"system":5}"#.into(), "system"),
        (r#"{"model":"nope","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#.into(), "model"),
        ("{oops".into(), "JSON"),
    ];
    for (body, needle) in &cases {
        let r = post(a, "/v1/messages", body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let j = r.json();
        assert_eq!(j["type"], "error", "{}", r.body);
        assert_eq!(j["error"]["type"], "invalid_request_error", "{}", r.body);
        assert!(
            j["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {}",
            r.body
        );
    }
    // count_tokens needs no max_tokens; "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" = 2 + 19.
    let r = post(
        a,
        "/v1/messages/count_tokens",
        r#"{"model":"fake","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["input_tokens"], 21);
    let r = post(
        a,
        "/v1/messages/count_tokens",
        r#"{"model":"fake","messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_json() {
    let srv = start_fake(FakeSpec::default(), config()).await;
    let r = get(srv.addr, "/v1/nothing").await;
    assert_openai_error(&r, 404, None);
    let r = get(srv.addr, "/v1/chat/completions").await;
    assert_openai_error(&r, 405, None);
    let r = get(srv.addr, "/v1/models/other").await;
    assert_openai_error(&r, 404, None);
    let r = get(srv.addr, "/v1/messages").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["type"], "error");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_oversized_bodies() {
    let cfg = ServerConfig {
        max_body_bytes: 64 << 10,
        ..config()
    };
    let srv = start_fake(FakeSpec::default(), cfg).await;
    let a = srv.addr;
    // Declares 100 bytes, sends 10, then closes its side.
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":").await.unwrap();
    s.shutdown().await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
    )
    .await
    .expect("server hung on a truncated body");
    if !buf.is_empty() {
        let r = parse_response(&buf);
        assert!(r.status >= 400 && r.status < 500, "{} {}", r.status, r.body);
    }
    // Over the limit with a Content-Length...
    let big = format!(
        r#"{{"model":"fake","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(100 << 10)
    );
    let r = post(a, "/v1/chat/completions", &big).await;
    assert_openai_error(&r, 413, None);
    // ...and chunked with no length (the limit is enforced while reading).
    let mut req = b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in big.as_bytes().chunks(8192) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw(a, &req).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "request_too_large");
    healthy(a).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_does_not_block_others() {
    let cfg = ServerConfig {
        body_timeout: Duration::from_secs(2),
        ..config()
    };
    let srv = start_fake(FakeSpec::default(), cfg).await;
    let a = srv.addr;
    // Headers, then nothing.
    let mut slow = tokio::net::TcpStream::connect(a).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"mo").await.unwrap();
    // A connection that sends nothing at all.
    let _silent = tokio::net::TcpStream::connect(a).await.unwrap();
    let t = Instant::now();
    healthy(a).await;
    healthy(a).await;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "normal requests waited for the slow client: {:?}",
        t.elapsed()
    );
    // The stalled body times out with 408.
    let mut buf = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut buf),
    )
    .await
    .expect("no answer to the stalled body")
    .unwrap();
    let r = parse_response(&buf);
    assert_openai_error(&r, 408, None);
    healthy(a).await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_cancels_generation() {
    let spec = FakeSpec {
        eos: false,
        delay: Duration::from_millis(20),
        ..FakeSpec::default()
    };
    let srv = start_fake(spec, config()).await;
    let a = srv.addr;
    let body = chat_body("go", r#","stream":true,"max_tokens":200"#);
    let (conn, seen) = stream_some(a, "/v1/chat/completions", &body, 3).await;
    assert!(seen.contains("chat.completion.chunk"), "{seen}");
    let at_drop = srv
        .counters
        .decoded
        .load(std::sync::atomic::Ordering::SeqCst);
    drop(conn);
    assert!(
        eventually(5, || async {
            metric(a, "moeflux_requests_cancelled_total").await == 1.0
        })
        .await,
        "generation was not cancelled"
    );
    let decoded = srv
        .counters
        .decoded
        .load(std::sync::atomic::Ordering::SeqCst);
    // The first write after the close may still succeed (the peer answers it with a reset);
    // the next fails, drops the stream, and the engine stops before its next decode step.
    eprintln!("decode steps after the client left: {}", decoded - at_drop);
    assert!(
        decoded - at_drop <= 3,
        "kept decoding after the client left: {} steps",
        decoded - at_drop
    );
    assert_eq!(metric(a, "moeflux_active_requests").await, 0.0);
    // Same for the Anthropic stream.
    let body = r#"{"model":"fake","max_tokens":200,"stream":true,"messages":[{"role":"user","content":"go"}]}"#;
    let (conn, seen) = stream_some(a, "/v1/messages", body, 4).await;
    assert!(seen.contains("message_start"), "{seen}");
    drop(conn);
    assert!(
        eventually(5, || async {
            metric(a, "moeflux_requests_cancelled_total").await == 2.0
        })
        .await
    );
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","max_tokens":5"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced() {
    let cfg = ServerConfig {
        api_key: Some("sekrit".into()),
        ..config()
    };
    let srv = start_fake(FakeSpec::default(), cfg).await;
    let a = srv.addr;
    let body = chat_body("hi", r#","max_tokens":5"#);
    let r = post(a, "/v1/chat/completions", &body).await;
    assert_openai_error(&r, 401, None);
    let r = post_h(
        a,
        "/v1/chat/completions",
        &body,
        &[("Authorization", "Bearer wrong")],
    )
    .await;
    assert_openai_error(&r, 401, None);
    let r = post_h(
        a,
        "/v1/chat/completions",
        &body,
        &[("Authorization", "Basic sekrit")],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = raw(a, &request_bytes("GET", "/v1/models", "", &[])).await;
    assert_eq!(r.status, 401);
    let r = post(
        a,
        "/v1/messages",
        r#"{"model":"fake","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = post_h(
        a,
        "/v1/chat/completions",
        &body,
        &[("Authorization", "Bearer sekrit")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post_h(
        a,
        "/v1/messages",
        r#"{"model":"fake","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
        &[("x-api-key", "sekrit")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Probes stay open.
    assert_eq!(get(a, "/health").await.status, 200);
    assert_eq!(get(a, "/metrics").await.status, 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_then_recovers() {
    let spec = FakeSpec {
        eos: false,
        delay: Duration::from_millis(20),
        ..FakeSpec::default()
    };
    let cfg = ServerConfig {
        queue_capacity: 1,
        ..config()
    };
    let srv = start_fake(spec, cfg).await;
    let a = srv.addr;
    let long = chat_body("go", r#","stream":true,"max_tokens":200"#);
    // A runs...
    let (conn_a, _) = stream_some(a, "/v1/chat/completions", &long, 2).await;
    assert_eq!(metric(a, "moeflux_active_requests").await, 1.0);
    // ...B waits (its handler is parked on the queue; send it from a task)...
    let b = tokio::spawn(async move {
        post(
            a,
            "/v1/chat/completions",
            &chat_body("b", r#","max_tokens":3"#),
        )
        .await
    });
    assert!(
        eventually(5, || async {
            metric(a, "moeflux_queue_depth").await == 1.0
        })
        .await
    );
    // ...so C is refused.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("c", r#","max_tokens":3"#),
    )
    .await;
    assert_openai_error(&r, 429, None);
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = post(
        a,
        "/v1/messages",
        r#"{"model":"fake","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(
        metric(a, "moeflux_requests_rejected_queue_full_total").await,
        2.0
    );
    // A leaves; B runs in turn and completes.
    drop(conn_a);
    let rb = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rb.status, 200, "{}", rb.body);
    assert_eq!(rb.json()["choices"][0]["message"]["content"], "Hel");
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("d", r#","max_tokens":3"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_loading_then_ready() {
    let spec = FakeSpec {
        load_delay: Duration::from_millis(700),
        ..FakeSpec::default()
    };
    let srv = start_fake(spec, config()).await;
    let a = srv.addr;
    let r = get(a, "/health").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "loading");
    assert_eq!(metric(a, "moeflux_model_ready").await, 0.0);
    // A request sent while loading waits for the model instead of failing.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","max_tokens":5"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(a, "/health").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_load_is_reported() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = moeflux_server::start::<Fake, _>(listener, config(), || Err("no such model".into()))
        .await
        .unwrap();
    assert!(h.wait_ready().await.is_err());
    let a = h.local_addr();
    let r = get(a, "/health").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "failed");
    let r = post(a, "/v1/chat/completions", &chat_body("hi", "")).await;
    assert_openai_error(&r, 503, None);
    h.shutdown().await.unwrap();
    // A loader that panics is a failed load too, not a server stuck loading.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = moeflux_server::start::<Fake, _>(listener, config(), || panic!("boom"))
        .await
        .unwrap();
    assert!(h.wait_ready().await.is_err());
    assert_eq!(
        get(h.local_addr(), "/health").await.json()["status"],
        "failed"
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_metrics() {
    let srv = start_fake(FakeSpec::default(), config()).await;
    let a = srv.addr;
    let r = get(a, "/v1/models").await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["object"], "list");
    assert_eq!(j["data"][0]["id"], "fake");
    assert_eq!(get(a, "/v1/models/fake").await.json()["id"], "fake");
    assert!(r.header("x-request-id").is_some());
    healthy(a).await;
    let m = get(a, "/metrics").await;
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    for name in [
        "moeflux_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "moeflux_prompt_tokens_total",
        "moeflux_generated_tokens_total 5",
        "moeflux_queue_depth 0",
        "moeflux_prefill_tokens_per_second",
        "moeflux_decode_tokens_per_second",
        "moeflux_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1",
        "moeflux_time_to_first_token_seconds_count 1",
    ] {
        assert!(m.body.contains(name), "missing {name}:\n{}", m.body);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_finish_reasons() {
    let srv = start_fake(FakeSpec::default(), config()).await;
    let a = srv.addr;
    // Script: "Hello, world! STOP here." then EOS.
    let r = post(a, "/v1/chat/completions", &chat_body("hi", ""))
        .await
        .json();
    assert_eq!(
        r["choices"][0]["message"]["content"],
        "Hello, world! STOP here."
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], 24);
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","max_tokens":4"#),
    )
    .await
    .json();
    assert_eq!(r["choices"][0]["message"]["content"], "Hell");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    // "STOP" arrives one character per token: matched across tokens, none of it sent.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","stop":["STOP","zzz"]"#),
    )
    .await
    .json();
    assert_eq!(r["choices"][0]["message"]["content"], "Hello, world! ");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","stop":"ld! S","stream":true"#),
    )
    .await;
    let text: String = r
        .sse()
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|j| {
            j["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, "Hello, wor");
    // A prefix of a stop string that never completes is released at the end.
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","stop":"here!""#),
    )
    .await
    .json();
    assert_eq!(
        r["choices"][0]["message"]["content"],
        "Hello, world! STOP here."
    );
    let r = post(a, "/v1/messages", r#"{"model":"fake","max_tokens":50,"stop_sequences":["world"],"messages":[{"role":"user","content":"hi"}]}"#).await.json();
    assert_eq!(r["content"][0]["text"], "Hello, ");
    assert_eq!(r["stop_reason"], "stop_sequence");
    assert_eq!(r["stop_sequence"], "world");
    let r = post(
        a,
        "/v1/messages",
        r#"{"model":"fake","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
    .json();
    assert_eq!(r["stop_reason"], "max_tokens");
    assert_eq!(r["usage"]["output_tokens"], 3);
    let r = post(a, "/v1/messages", r#"{"model":"fake","max_tokens":100,"system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#).await.json();
    assert_eq!(r["stop_reason"], "end_turn");
    assert_eq!(r["stop_sequence"], Value::Null);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_formats() {
    let srv = start_fake(FakeSpec::default(), config()).await;
    let a = srv.addr;
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body(
            "hi",
            r#","stream":true,"max_tokens":5,"stream_options":{"include_usage":true}"#,
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let ev = r.sse();
    assert_eq!(ev.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "fake")
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    assert_eq!(
        usage["usage"]["total_tokens"],
        usage["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
    // Completions.
    let r = post(
        a,
        "/v1/completions",
        r#"{"model":"fake","prompt":"12+34=","stream":true,"max_tokens":3}"#,
    )
    .await;
    let ev = r.sse();
    let text: String = ev
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, "Hel");
    // Anthropic event sequence.
    let r = post(a, "/v1/messages", r#"{"model":"fake","max_tokens":4,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#).await;
    let ev = r.sse();
    let names: Vec<&str> = ev.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[3..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta")
    );
    let start: Value = serde_json::from_str(&ev[0].1).unwrap();
    assert!(start["message"]["usage"]["input_tokens"].as_u64().unwrap() > 0);
    let delta: Value = serde_json::from_str(&ev[ev.len() - 2].1).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 4);
    let text: String = ev
        .iter()
        .filter(|(e, _)| e.as_deref() == Some("content_block_delta"))
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["delta"]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text, "Hell");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_token_prompts() {
    let srv = start_fake(FakeSpec::default(), config()).await;
    let a = srv.addr;
    let r = post(
        a,
        "/v1/chat/completions",
        &chat_body("hi", r#","max_tokens":3,"logprobs":true,"top_logprobs":2"#),
    )
    .await
    .json();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["token"], "H");
    assert!(content[0]["logprob"].as_f64().unwrap() > -0.01);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(content[0]["top_logprobs"][0]["token"], "H");
    // Prompt as token ids; legacy logprobs.
    let r = post(
        a,
        "/v1/completions",
        r#"{"model":"fake","prompt":[23,24],"max_tokens":2,"logprobs":1}"#,
    )
    .await
    .json();
    assert_eq!(r["choices"][0]["text"], "He");
    assert_eq!(
        r["choices"][0]["logprobs"]["tokens"],
        serde_json::json!(["H", "e"])
    );
    assert_eq!(
        r["choices"][0]["logprobs"]["text_offset"],
        serde_json::json!([0, 1])
    );
    assert_eq!(r["usage"]["prompt_tokens"], 2);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_reuse_prefills_only_the_new_suffix() {
    use std::sync::atomic::Ordering::SeqCst;
    let srv = start_fake(FakeSpec::default(), config()).await;
    let a = srv.addr;
    let prefilled = || srv.counters.prefilled.load(SeqCst);
    let turn1 = r#"{"model":"fake","max_tokens":5,"messages":[{"role":"system","content":"You add numbers."},{"role":"user","content":"12+34="}]}"#;
    let r1 = post(a, "/v1/chat/completions", turn1).await.json();
    let p1 = r1["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(r1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(prefilled(), p1);
    // The same prompt again: nothing to prefill (snapshot at the prompt's end).
    let before = prefilled();
    let r = post(a, "/v1/chat/completions", turn1).await.json();
    assert_eq!(
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap() as usize,
        p1
    );
    assert_eq!(prefilled() - before, 0);
    assert_eq!(
        r["choices"][0]["message"]["content"],
        r1["choices"][0]["message"]["content"]
    );
    // The next turn extends the first: only the new suffix is prefilled.
    let turn2 = r#"{"model":"fake","max_tokens":5,"messages":[{"role":"system","content":"You add numbers."},{"role":"user","content":"12+34="},{"role":"assistant","content":"Hello"},{"role":"user","content":"1+1="}]}"#;
    let before = prefilled();
    let r2 = post(a, "/v1/chat/completions", turn2).await.json();
    let p2 = r2["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as usize;
    assert!(cached >= p1, "cached {cached} < first prompt {p1}");
    assert_eq!(prefilled() - before, p2 - cached);
    // Another conversation with the same system prompt, then back to the first one:
    // its state comes back from a snapshot.
    let other = r#"{"model":"fake","max_tokens":5,"messages":[{"role":"system","content":"You add numbers."},{"role":"user","content":"5+5="}]}"#;
    let ro = post(a, "/v1/chat/completions", other).await.json();
    assert_eq!(ro["choices"][0]["message"]["content"], "Hello");
    let restores = srv.counters.restores.load(SeqCst);
    let turn3 = r#"{"model":"fake","max_tokens":5,"messages":[{"role":"system","content":"You add numbers."},{"role":"user","content":"12+34="},{"role":"assistant","content":"Hello"},{"role":"user","content":"1+1="},{"role":"assistant","content":"Hello"},{"role":"user","content":"2+2="}]}"#;
    let before = prefilled();
    let r3 = post(a, "/v1/chat/completions", turn3).await.json();
    let p3 = r3["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let cached3 = r3["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap() as usize;
    assert!(cached3 >= p2, "cached {cached3} < previous prompt {p2}");
    assert_eq!(prefilled() - before, p3 - cached3);
    assert!(srv.counters.restores.load(SeqCst) > restores);
    assert_eq!(r3["choices"][0]["message"]["content"], "Hello");
    // The metrics counter agrees with the model's own count.
    assert_eq!(
        metric(a, "moeflux_prefilled_tokens_total").await as usize,
        prefilled()
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_prefix_cache_still_reuses_the_live_sequence_only() {
    use std::sync::atomic::Ordering::SeqCst;
    let cfg = ServerConfig {
        prefix_cache: 0,
        ..config()
    };
    let srv = start_fake(FakeSpec::default(), cfg).await;
    let a = srv.addr;
    let body = chat_body("12+34=", r#","max_tokens":5"#);
    let p = post(a, "/v1/chat/completions", &body).await.json()["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap() as usize;
    let r = post(a, "/v1/chat/completions", &body).await.json();
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(srv.counters.prefilled.load(SeqCst), 2 * p);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let spec = FakeSpec {
        delay: Duration::from_millis(10),
        ..FakeSpec::default()
    };
    let srv = start_fake(spec, config()).await;
    let a = srv.addr;
    let inflight =
        tokio::spawn(async move { post(a, "/v1/chat/completions", &chat_body("hi", "")).await });
    assert!(
        eventually(5, || async {
            metric(a, "moeflux_active_requests").await == 1.0
        })
        .await
    );
    srv.stop().await;
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "Hello, world! STOP here."
    );
    assert!(
        tokio::net::TcpStream::connect(a).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_while_waiting_for_a_whole_response_cancels_too() {
    let spec = FakeSpec {
        eos: false,
        delay: Duration::from_millis(20),
        ..FakeSpec::default()
    };
    let srv = start_fake(spec, config()).await;
    let a = srv.addr;
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(&request_bytes(
        "POST",
        "/v1/chat/completions",
        &chat_body("go", r#","max_tokens":200"#),
        &[],
    ))
    .await
    .unwrap();
    assert!(
        eventually(5, || async {
            srv.counters
                .decoded
                .load(std::sync::atomic::Ordering::SeqCst)
                >= 3
        })
        .await
    );
    drop(s);
    assert!(
        eventually(5, || async {
            metric(a, "moeflux_requests_cancelled_total").await == 1.0
        })
        .await,
        "not cancelled"
    );
    let decoded = srv
        .counters
        .decoded
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        decoded < 50,
        "kept decoding after the client left: {decoded} steps"
    );
    healthy(a).await;
    srv.stop().await;
}
