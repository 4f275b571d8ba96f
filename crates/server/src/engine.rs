//! The engine thread: the only owner of the model, fed by a bounded FIFO queue.
//!
//! HTTP handlers validate and tokenize a request, then push a [`Job`] carrying
//! the token prompt and a channel for [`Event`]s. A single thread pops jobs in
//! arrival order and runs them one at a time, so generation never contends for
//! the model and each request sees the speed of an idle engine; a full queue is
//! answered 429 by the handler rather than growing without bound.
//!
//! Prefix reuse: the thread remembers the tokens its session currently holds
//! (the "live" sequence) and keeps a few host snapshots of earlier states, taken
//! at message boundaries (before the last message of a chat, and at the end of
//! the prompt), evicted least recently used. A new prompt resumes from the
//! longest of these that is a prefix of it and prefills only the rest. Snapshots
//! are needed (not just a KV-cache truncation) because hybrid models carry
//! recurrent state that cannot be rewound.
//!
//! Cancellation: each generated token is sent to the request's channel; when
//! the client has gone (receiver dropped) the send fails or the channel reports
//! closed, and generation stops before the next decode step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use moeflux_text::{Sampler, SamplingParams, StreamDecoder, TextCodec};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::model::InferenceModel;
use crate::stop::StopMatcher;

/// One generation request, validated and tokenized.
pub struct Job {
    pub id: String,
    pub prompt: Vec<u32>,
    /// Token count at the start of the last chat message, where a snapshot is worth keeping.
    pub boundary: Option<usize>,
    pub max_new: usize,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    /// `Some(k)`: report each token's log-probability and the `k` most likely alternatives.
    pub logprobs: Option<usize>,
    pub events: mpsc::UnboundedSender<Event>,
    pub accepted: Instant,
}

/// A log-probability entry for one generated token.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string matched (index into the job's `stops`).
    StopString(usize),
    /// `max_new` tokens, or the context is full.
    Length,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub finish: Finish,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What the engine tells a request, in order: `Started`, any number of `Text`, then
/// `Done` or `Failed`.
#[derive(Clone, Debug)]
pub enum Event {
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Done(Summary),
    Failed(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Full,
    Closed,
}

/// Bounded FIFO of waiting jobs (the running job is not in it).
pub struct JobQueue {
    state: Mutex<QueueState>,
    cv: Condvar,
    capacity: usize,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl JobQueue {
    pub fn new(capacity: usize) -> Self {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn push(&self, job: Job) -> Result<(), PushError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        if s.jobs.len() >= self.capacity {
            return Err(PushError::Full);
        }
        s.jobs.push_back(job);
        self.cv.notify_one();
        Ok(())
    }

    /// Blocks for the next job; `None` once closed and drained.
    pub fn pop(&self) -> Option<Job> {
        let mut s = self.lock();
        loop {
            if let Some(j) = s.jobs.pop_front() {
                return Some(j);
            }
            if s.closed {
                return None;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuse new jobs; the engine finishes the waiting ones and exits.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }
}

/// The session's current contents, when known: the tokens fed so far and the logits
/// that followed the last of them.
struct Live {
    tokens: Vec<u32>,
    logits: Vec<f32>,
}

struct Entry<S> {
    tokens: Vec<u32>,
    logits: Vec<f32>,
    snap: S,
    last_used: u64,
}

/// Snapshots of earlier sequence states, least recently used evicted first.
struct PrefixCache<S> {
    entries: Vec<Entry<S>>,
    capacity: usize,
    clock: u64,
}

impl<S> PrefixCache<S> {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Index of the longest entry that is a prefix of `prompt` and longer than `min`.
    fn longest(&self, prompt: &[u32], min: usize) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            let n = e.tokens.len();
            if n > min
                && n <= prompt.len()
                && prompt.starts_with(&e.tokens)
                && best.is_none_or(|(_, b)| n > b)
            {
                best = Some((i, n));
            }
        }
        best.map(|b| b.0)
    }

    fn contains(&mut self, tokens: &[u32]) -> bool {
        let t = self.tick();
        match self.entries.iter_mut().find(|e| e.tokens == tokens) {
            Some(e) => {
                e.last_used = t;
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, tokens: Vec<u32>, logits: Vec<f32>, snap: S) {
        if self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            if let Some(i) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            {
                self.entries.swap_remove(i);
            }
        }
        let last_used = self.tick();
        self.entries.push(Entry {
            tokens,
            logits,
            snap,
            last_used,
        });
    }
}

/// Everything the engine thread shares with the HTTP side.
pub struct EngineShared {
    pub queue: JobQueue,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown's grace period has run out: stop generating at once.
    pub abort: AtomicBool,
}

pub struct Engine<M: InferenceModel> {
    model: M,
    codec: Arc<TextCodec>,
    stop_ids: Vec<u32>,
    live: Option<Live>,
    cache: PrefixCache<M::Snapshot>,
    shared: Arc<EngineShared>,
}

/// Why a job ended early inside the loop.
enum Halt {
    /// The client went away (or the server is aborting).
    Cancelled,
    /// The engine failed; the session state is unknown.
    Failed(String),
}

fn lse(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let max = if max.is_infinite() { f32::MAX } else { max } as f64;
    let sum: f64 = logits
        .iter()
        .filter(|x| !x.is_nan())
        .map(|&x| (x as f64 - max).exp())
        .sum();
    max + sum.ln()
}

impl<M: InferenceModel> Engine<M> {
    pub fn new(
        model: M,
        codec: Arc<TextCodec>,
        prefix_cache: usize,
        shared: Arc<EngineShared>,
    ) -> Self {
        let mut stop_ids = codec.eos_ids().to_vec();
        for id in model.stop_ids() {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Engine {
            model,
            codec,
            stop_ids,
            live: None,
            cache: PrefixCache {
                entries: Vec::new(),
                capacity: prefix_cache,
                clock: 0,
            },
            shared,
        }
    }

    /// Runs jobs until the queue is closed and empty.
    pub fn run(mut self) {
        while let Some(job) = self.shared.queue.pop() {
            if job.events.is_closed() {
                self.shared.metrics.cancelled.fetch_add(1, Relaxed);
                tracing::info!(request_id = %job.id, "client left before its turn; skipped");
                continue;
            }
            self.shared.metrics.active.store(1, Relaxed);
            let id = job.id.clone();
            // A panic is a bug in the model code; keep serving, but forget the session
            // state (its caches may be half-written). The job's channel is dropped during
            // unwinding, so its handler answers 500.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_job(job))).is_err()
            {
                tracing::error!(request_id = %id, "generation panicked; session state reset");
                self.live = None;
            }
            self.shared.metrics.active.store(0, Relaxed);
        }
    }

    fn cancelled(&self, job: &Job) -> bool {
        job.events.is_closed() || self.shared.abort.load(Relaxed)
    }

    /// Puts the session at the longest known prefix of `prompt`; returns how many
    /// prompt tokens are already in place.
    fn resume(&mut self, prompt: &[u32]) -> Result<usize, String> {
        let live_len = match &self.live {
            Some(l)
                if !l.tokens.is_empty()
                    && l.tokens.len() <= prompt.len()
                    && prompt.starts_with(&l.tokens) =>
            {
                l.tokens.len()
            }
            _ => 0,
        };
        if let Some(i) = self.cache.longest(prompt, live_len) {
            let t = self.cache.tick();
            let e = &mut self.cache.entries[i];
            e.last_used = t;
            if let Err(err) = self.model.restore(&e.snap) {
                self.live = None;
                return Err(format!("restoring a prefix snapshot: {err}"));
            }
            self.shared.metrics.snapshots_restored.fetch_add(1, Relaxed);
            self.live = Some(Live {
                tokens: e.tokens.clone(),
                logits: e.logits.clone(),
            });
            return Ok(e.tokens.len());
        }
        if live_len > 0 {
            return Ok(live_len);
        }
        self.live = None;
        self.model
            .reset()
            .map_err(|e| format!("resetting the session: {e}"))?;
        self.live = Some(Live {
            tokens: Vec::new(),
            logits: Vec::new(),
        });
        Ok(0)
    }

    /// Feeds `tokens` and updates the live sequence; on failure the live state is unknown.
    fn feed(&mut self, tokens: &[u32]) -> Result<(), String> {
        let r = if tokens.len() == 1 {
            self.model.decode(tokens[0])
        } else {
            self.model.prefill(tokens)
        };
        match (r, self.live.as_mut()) {
            (Ok(logits), Some(live)) => {
                live.tokens.extend_from_slice(tokens);
                live.logits = logits;
                Ok(())
            }
            (Ok(_), None) => Err("internal: session state lost".into()),
            (Err(e), _) => {
                self.live = None;
                Err(e.to_string())
            }
        }
    }

    fn snapshot_here(&mut self) {
        let Some(live) = &self.live else { return };
        if self.cache.capacity == 0 || live.tokens.is_empty() || self.cache.contains(&live.tokens) {
            return;
        }
        match self.model.snapshot() {
            Ok(snap) => {
                let (tokens, logits) = (live.tokens.clone(), live.logits.clone());
                self.cache.insert(tokens, logits, snap);
                self.shared.metrics.snapshots_taken.fetch_add(1, Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "prefix snapshot failed; continuing without it"),
        }
    }

    fn run_job(&mut self, job: Job) {
        let t0 = Instant::now();
        let m = self.shared.metrics.clone();
        let prompt_tokens = job.prompt.len();
        let mut summary = Summary {
            finish: Finish::Length,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
        };
        let res = self.generate(&job, &mut summary);
        m.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
        m.cached_tokens
            .fetch_add(summary.cached_tokens as u64, Relaxed);
        m.generated_tokens
            .fetch_add(summary.completion_tokens as u64, Relaxed);
        let secs = t0.elapsed().as_secs_f64();
        match res {
            Ok(()) => {
                tracing::info!(
                    request_id = %job.id, prompt_tokens, cached_tokens = summary.cached_tokens,
                    completion_tokens = summary.completion_tokens, finish = ?summary.finish, secs, "generation done"
                );
                let _ = job.events.send(Event::Done(summary));
            }
            Err(Halt::Cancelled) => {
                m.cancelled.fetch_add(1, Relaxed);
                tracing::info!(request_id = %job.id, completion_tokens = summary.completion_tokens, secs, "client went away; generation cancelled");
            }
            Err(Halt::Failed(msg)) => {
                tracing::error!(request_id = %job.id, error = %msg, "generation failed");
                let _ = job.events.send(Event::Failed(msg));
            }
        }
    }

    fn generate(&mut self, job: &Job, summary: &mut Summary) -> Result<(), Halt> {
        let m = self.shared.metrics.clone();
        let max_ctx = self.model.max_context();
        let prompt = &job.prompt;
        if prompt.is_empty() || prompt.len() > max_ctx {
            return Err(Halt::Failed(format!(
                "prompt of {} tokens does not fit the context of {max_ctx}",
                prompt.len()
            )));
        }
        let mut sampler =
            Sampler::new(job.params.clone()).map_err(|e| Halt::Failed(e.to_string()))?;

        // Prefill: resume from the longest known prefix, then run the rest in segments
        // ending at message boundaries, snapshotting at each.
        let tp = Instant::now();
        let cached = self.resume(prompt).map_err(Halt::Failed)?;
        summary.cached_tokens = cached;
        if job
            .events
            .send(Event::Started {
                prompt_tokens: prompt.len(),
                cached_tokens: cached,
            })
            .is_err()
        {
            return Err(Halt::Cancelled);
        }
        let mut cuts: Vec<usize> = job
            .boundary
            .into_iter()
            .filter(|&b| b > cached && b < prompt.len())
            .collect();
        cuts.push(prompt.len());
        let mut at = cached;
        for cut in cuts {
            if at < cut {
                self.feed(&prompt[at..cut]).map_err(Halt::Failed)?;
                at = cut;
            }
            self.snapshot_here();
            if self.cancelled(job) {
                m.prefill(prompt.len() - cached, tp.elapsed());
                return Err(Halt::Cancelled);
            }
        }
        m.prefill(prompt.len() - cached, tp.elapsed());

        // Decode.
        let td = Instant::now();
        let mut steps = 0usize;
        let mut logits = match &self.live {
            Some(l) => l.logits.clone(),
            None => return Err(Halt::Failed("internal: session state lost".into())),
        };
        let mut history = prompt.clone();
        let mut decoder = StreamDecoder::new(true);
        let mut stops = StopMatcher::new(job.stops.clone());
        let mut pending_lp: Vec<TokenLogprob> = Vec::new();
        let mut generated = 0usize;
        let room = max_ctx - prompt.len();
        let max_new = job.max_new.min(room.max(1));
        let result = loop {
            if generated >= max_new {
                break Ok(Finish::Length);
            }
            let id = sampler.sample(&logits, &history);
            if generated == 0 {
                m.ttft(job.accepted.elapsed());
            }
            if self.stop_ids.contains(&id) {
                break Ok(Finish::Eos);
            }
            generated += 1;
            summary.completion_tokens = generated;
            history.push(id);
            if let Some(k) = job.logprobs {
                pending_lp.push(self.token_logprob(id, &logits, k));
            }
            let piece = match decoder.push(self.codec.as_ref(), id) {
                Ok(p) => p,
                Err(e) => break Err(Halt::Failed(e.to_string())),
            };
            let step = stops.push(&piece);
            if (!step.emit.is_empty() || step.matched.is_some())
                && !self.send_text(job, step.emit, &mut pending_lp)
            {
                break Err(Halt::Cancelled);
            }
            if let Some(i) = step.matched {
                break Ok(Finish::StopString(i));
            }
            if self.cancelled(job) {
                break Err(Halt::Cancelled);
            }
            if generated >= max_new || history.len() > max_ctx {
                break Ok(Finish::Length);
            }
            if let Err(e) = self.feed(&[id]) {
                break Err(Halt::Failed(e));
            }
            steps += 1;
            // Borrow the fresh logits out of the live state; they go back below.
            logits = match &mut self.live {
                Some(l) => std::mem::take(&mut l.logits),
                None => break Err(Halt::Failed("internal: session state lost".into())),
            };
        };
        if let Some(l) = &mut self.live {
            if l.logits.is_empty() {
                l.logits = logits;
            }
        }
        m.decode(steps, td.elapsed());
        let finish = result?;
        summary.finish = finish;
        if !matches!(finish, Finish::StopString(_)) {
            let tail = decoder
                .finish(self.codec.as_ref())
                .map_err(|e| Halt::Failed(e.to_string()))?;
            let step = stops.push(&tail);
            let mut text = step.emit;
            if let Some(i) = step.matched {
                summary.finish = Finish::StopString(i);
            } else {
                text.push_str(&stops.flush());
            }
            if (!text.is_empty() || !pending_lp.is_empty())
                && !self.send_text(job, text, &mut pending_lp)
            {
                return Err(Halt::Cancelled);
            }
        }
        Ok(())
    }

    fn send_text(&self, job: &Job, text: String, pending_lp: &mut Vec<TokenLogprob>) -> bool {
        job.events
            .send(Event::Text {
                text,
                logprobs: std::mem::take(pending_lp),
            })
            .is_ok()
    }

    fn token_logprob(&self, id: u32, logits: &[f32], k: usize) -> TokenLogprob {
        let z = lse(logits);
        let text = |t: u32| self.codec.decode(&[t], false).unwrap_or_default();
        let lp = logits
            .get(id as usize)
            .map(|&x| {
                if x.is_nan() {
                    f32::NEG_INFINITY
                } else {
                    (x as f64 - z) as f32
                }
            })
            .unwrap_or(f32::NEG_INFINITY);
        let top = if k > 0 {
            moeflux_text::top_logprobs(logits, k)
                .into_iter()
                .map(|(t, l)| (text(t), l))
                .collect()
        } else {
            Vec::new()
        };
        TokenLogprob {
            token: text(id),
            logprob: lp,
            top,
        }
    }
}

/// How long shutdown waits for the engine thread once the queue is closed (it may be
/// busy loading a large model, which cannot be interrupted).
pub const ENGINE_JOIN_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_fifo_and_bounded() {
        let q = JobQueue::new(2);
        let mk = |id: &str| {
            let (tx, _rx) = mpsc::unbounded_channel();
            Job {
                id: id.into(),
                prompt: vec![1],
                boundary: None,
                max_new: 1,
                params: SamplingParams::greedy(),
                stops: vec![],
                logprobs: None,
                events: tx,
                accepted: Instant::now(),
            }
        };
        q.push(mk("a")).unwrap();
        q.push(mk("b")).unwrap();
        assert_eq!(q.push(mk("c")).unwrap_err(), PushError::Full);
        assert_eq!(q.pop().unwrap().id, "a");
        q.push(mk("d")).unwrap();
        q.close();
        assert_eq!(q.push(mk("e")).unwrap_err(), PushError::Closed);
        assert_eq!(q.pop().unwrap().id, "b");
        assert_eq!(q.pop().unwrap().id, "d");
        assert!(q.pop().is_none());
    }

    #[test]
    fn prefix_cache_picks_longest_and_evicts_lru() {
        let mut c: PrefixCache<u32> = PrefixCache {
            entries: Vec::new(),
            capacity: 2,
            clock: 0,
        };
        c.insert(vec![1, 2], vec![], 0);
        c.insert(vec![1, 2, 3], vec![], 1);
        let i = c.longest(&[1, 2, 3, 4], 0).unwrap();
        assert_eq!(c.entries[i].snap, 1);
        assert!(c.longest(&[1, 2, 3, 4], 3).is_none());
        assert!(c.longest(&[2, 2], 0).is_none());
        assert!(c.contains(&[1, 2])); // touch: [1,2,3] is now least recently used
        c.insert(vec![5], vec![], 2);
        assert!(c.entries.iter().all(|e| e.snap != 1));
    }

    #[test]
    fn lse_ignores_nan() {
        let z = lse(&[0.0, 0.0, f32::NAN]);
        assert!((z - 2f64.ln()).abs() < 1e-9);
        assert_eq!(lse(&[f32::NEG_INFINITY]), f64::NEG_INFINITY);
    }
}
