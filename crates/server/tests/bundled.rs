//! The server over the real bundled model (a tiny Qwen3-Next that adds numbers): correct
//! answers through every endpoint, and prefix reuse that changes nothing but the work done.
//! Prefix snapshots matter most for this hybrid model, whose Gated DeltaNet state cannot be
//! rewound, so the reused runs are compared with runs that prefill everything.

mod common;

use common::*;
use moeflux_engine::{Device, SessionOptions};
use moeflux_server::ServerConfig;
use serde_json::{Value, json};

async fn start_bundled(
    prefix_cache: usize,
) -> Option<(moeflux_server::ServerHandle, std::net::SocketAddr)> {
    let dir = bundled();
    if !dir.join("model.safetensors").exists() {
        eprintln!("skipping: no bundled model at {}", dir.display());
        return None;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = ServerConfig {
        model_id: moeflux_server::model_id(&dir),
        prefix_cache,
        ..ServerConfig::default()
    };
    let opts = SessionOptions {
        device: Device::Cpu,
        ..SessionOptions::default()
    };
    let h = moeflux_server::start(listener, cfg, moeflux_server::session_loader(dir, opts))
        .await
        .unwrap();
    h.wait_ready().await.unwrap();
    let a = h.local_addr();
    Some((h, a))
}

fn chat(messages: &[(&str, &str)]) -> String {
    let msgs: Vec<Value> = messages
        .iter()
        .map(|(r, c)| json!({"role": r, "content": c}))
        .collect();
    json!({"model": "bundled", "messages": msgs, "temperature": 0, "max_tokens": 8, "logprobs": true}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_through_every_endpoint() {
    let Some((h, a)) = start_bundled(8).await else {
        return;
    };
    let r = post(a, "/v1/chat/completions", &chat(&[("user", "12+34=")]))
        .await
        .json();
    assert_eq!(r["choices"][0]["message"]["content"], "46", "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], 2);
    // "<|im_start|>user\n12+34=<|im_end|>\n<|im_start|>assistant\n": one id per character or special.
    assert_eq!(r["usage"]["prompt_tokens"], 25);
    let r = post(a, "/v1/messages", r#"{"model":"bundled","max_tokens":8,"temperature":0,"messages":[{"role":"user","content":"123+4567="}]}"#).await.json();
    assert_eq!(r["content"][0]["text"], "4690", "{r}");
    assert_eq!(r["stop_reason"], "end_turn");
    let r = post(a, "/v1/completions", r#"{"model":"bundled","temperature":0,"prompt":"<|im_start|>user\n999+1=<|im_end|>\n<|im_start|>assistant\n"}"#).await.json();
    assert_eq!(r["choices"][0]["text"], "1000", "{r}");
    let r = post(a, "/v1/chat/completions", r#"{"model":"bundled","temperature":0,"max_tokens":1,"messages":[{"role":"user","content":"12+34="}]}"#).await.json();
    assert_eq!(r["choices"][0]["message"]["content"], "4");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    h.shutdown().await.unwrap();
}

/// Runs a three-turn conversation interleaved with an unrelated one; returns each reply
/// with its token logprobs, and the cached-token counts.
async fn conversation(a: std::net::SocketAddr) -> (Vec<(String, Vec<f64>)>, Vec<u64>) {
    let mut turns: Vec<(&str, String)> = Vec::new();
    let mut out = Vec::new();
    let mut cached = Vec::new();
    for q in ["12+34=", "5+7=", "100+200="] {
        turns.push(("user", q.into()));
        let msgs: Vec<(&str, &str)> = turns.iter().map(|(r, c)| (*r, c.as_str())).collect();
        let r = post(a, "/v1/chat/completions", &chat(&msgs)).await.json();
        let text = r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let lps = r["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        cached.push(
            r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
        );
        out.push((text.clone(), lps));
        turns.push(("assistant", text));
        // Something else in between, so the next turn must come back from a snapshot.
        let r = post(a, "/v1/chat/completions", &chat(&[("user", "9+9=")]))
            .await
            .json();
        assert_eq!(r["choices"][0]["message"]["content"], "18");
    }
    (out, cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_reuse_matches_full_prefill() {
    let Some((h, a)) = start_bundled(8).await else {
        return;
    };
    let before = metric(a, "moeflux_prefilled_tokens_total").await;
    let (reused, cached) = conversation(a).await;
    let prefilled = metric(a, "moeflux_prefilled_tokens_total").await - before;
    let prompt_total = metric(a, "moeflux_prompt_tokens_total").await;
    assert_eq!(cached[0], 0);
    assert!(
        cached[1] > 0 && cached[2] > cached[1],
        "cached tokens per turn: {cached:?}"
    );
    assert!(metric(a, "moeflux_prefix_snapshots_restored_total").await >= 2.0);
    assert!(
        prefilled < prompt_total,
        "prefilled {prefilled} of {prompt_total} prompt tokens"
    );
    h.shutdown().await.unwrap();

    let Some((h, a)) = start_bundled(0).await else {
        return;
    };
    let (fresh, cached) = conversation(a).await;
    assert!(cached.iter().all(|&c| c == 0));
    h.shutdown().await.unwrap();

    assert_eq!(
        reused.iter().map(|r| &r.0).collect::<Vec<_>>(),
        fresh.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    assert_eq!(reused[0].0, "46");
    for ((_, x), (_, y)) in reused.iter().zip(&fresh) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p - q).abs() < 1e-3,
                "logprobs differ with prefix reuse: {x:?} vs {y:?}"
            );
        }
    }
}
