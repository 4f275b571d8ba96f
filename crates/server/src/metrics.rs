//! Counters behind `GET /metrics`, rendered in the Prometheus text format.
//!
//! Everything is an atomic (or a small mutex-guarded map for per-route request
//! counts) updated by the HTTP handlers and the engine thread, so scraping never
//! waits on generation. `prefilled_tokens_total` counts tokens actually run
//! through prefill (after prefix reuse), which is how tests observe the prefix
//! cache.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Time-to-first-token histogram bucket bounds, seconds.
const TTFT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub rejected_queue_full: AtomicU64,
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub prefilled_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    prefill_nanos: AtomicU64,
    decode_nanos: AtomicU64,
    decode_steps: AtomicU64,
    last_prefill_tps: AtomicU64,
    last_decode_tps: AtomicU64,
    pub snapshots_taken: AtomicU64,
    pub snapshots_restored: AtomicU64,
    pub active: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    ttft_sum_nanos: AtomicU64,
}

fn store_f64(a: &AtomicU64, x: f64) {
    a.store(x.to_bits(), Relaxed);
}

fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Relaxed))
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn ttft(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            if s <= bound {
                b.fetch_add(1, Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Relaxed);
        self.ttft_sum_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    pub fn prefill(&self, tokens: usize, d: Duration) {
        self.prefilled_tokens.fetch_add(tokens as u64, Relaxed);
        self.prefill_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        if tokens > 0 {
            store_f64(
                &self.last_prefill_tps,
                tokens as f64 / d.as_secs_f64().max(1e-9),
            );
        }
    }

    /// `steps` decode calls taking `d` in total.
    pub fn decode(&self, steps: usize, d: Duration) {
        self.decode_steps.fetch_add(steps as u64, Relaxed);
        self.decode_nanos.fetch_add(d.as_nanos() as u64, Relaxed);
        if steps > 0 {
            store_f64(
                &self.last_decode_tps,
                steps as f64 / d.as_secs_f64().max(1e-9),
            );
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize, ready: bool) -> String {
        let mut o = String::new();
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        {
            let _ = writeln!(
                o,
                "# HELP moeflux_requests_total HTTP requests by route and status.\n# TYPE moeflux_requests_total counter"
            );
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "moeflux_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        counter(
            &mut o,
            "moeflux_requests_rejected_queue_full_total",
            "Requests refused with 429 because the queue was full.",
            self.rejected_queue_full.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_requests_cancelled_total",
            "Generations stopped because the client went away.",
            self.cancelled.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_prompt_tokens_total",
            "Prompt tokens of completed and cancelled requests (tokens in).",
            self.prompt_tokens.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_prefilled_tokens_total",
            "Prompt tokens actually run through prefill (after prefix reuse).",
            self.prefilled_tokens.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_cached_prompt_tokens_total",
            "Prompt tokens served from the prefix cache.",
            self.cached_tokens.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_generated_tokens_total",
            "Generated tokens (tokens out).",
            self.generated_tokens.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_prefix_snapshots_taken_total",
            "Prefix-cache snapshots taken.",
            self.snapshots_taken.load(Relaxed),
        );
        counter(
            &mut o,
            "moeflux_prefix_snapshots_restored_total",
            "Prefix-cache snapshots restored.",
            self.snapshots_restored.load(Relaxed),
        );
        let secs = |a: &AtomicU64| a.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(
            o,
            "# HELP moeflux_prefill_seconds_total Time spent in prefill.\n# TYPE moeflux_prefill_seconds_total counter\nmoeflux_prefill_seconds_total {}",
            secs(&self.prefill_nanos)
        );
        let _ = writeln!(
            o,
            "# HELP moeflux_decode_seconds_total Time spent in decode steps.\n# TYPE moeflux_decode_seconds_total counter\nmoeflux_decode_seconds_total {}",
            secs(&self.decode_nanos)
        );
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut o,
            "moeflux_prefill_tokens_per_second",
            "Prefill speed of the most recent request that prefilled.",
            load_f64(&self.last_prefill_tps),
        );
        gauge(
            &mut o,
            "moeflux_decode_tokens_per_second",
            "Decode speed of the most recent request that decoded.",
            load_f64(&self.last_decode_tps),
        );
        gauge(
            &mut o,
            "moeflux_queue_depth",
            "Requests waiting for the engine.",
            queue_depth as f64,
        );
        gauge(
            &mut o,
            "moeflux_queue_capacity",
            "Most requests that may wait before 429.",
            queue_capacity as f64,
        );
        gauge(
            &mut o,
            "moeflux_active_requests",
            "Requests the engine is generating for (0 or 1).",
            self.active.load(Relaxed) as f64,
        );
        gauge(
            &mut o,
            "moeflux_model_ready",
            "1 once the model is loaded.",
            if ready { 1.0 } else { 0.0 },
        );
        let name = "moeflux_time_to_first_token_seconds";
        let _ = writeln!(
            o,
            "# HELP {name} From request accepted to first generated token (queue wait included).\n# TYPE {name} histogram"
        );
        for (b, bound) in self.ttft_buckets.iter().zip(TTFT_BUCKETS) {
            let _ = writeln!(o, "{name}_bucket{{le=\"{bound}\"}} {}", b.load(Relaxed));
        }
        let count = self.ttft_count.load(Relaxed);
        let _ = writeln!(
            o,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}",
            secs(&self.ttft_sum_nanos)
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.ttft(Duration::from_millis(30));
        m.ttft(Duration::from_secs(3));
        m.request("/v1/chat/completions", 200);
        let t = m.render(2, 8, true);
        assert!(
            t.contains("moeflux_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("moeflux_time_to_first_token_seconds_bucket{le=\"5\"} 2"),
            "{t}"
        );
        assert!(t.contains("moeflux_time_to_first_token_seconds_count 2"));
        assert!(t.contains("moeflux_queue_depth 2"));
        assert!(
            t.contains("moeflux_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1")
        );
    }
}
