//! The generation loop shared by the CLI and the server: prefill the prompt, then sample
//! and decode until a stop id or the token limit, handing each token to a callback that
//! may stop early (a disconnected client, a stop string).

use std::time::Instant;

use moeflux_model::LogitsRows;
use moeflux_text::{Sampler, SamplingParams};

use crate::{EngineError, Session};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop id was sampled (it is not emitted) or the callback asked to stop.
    Stop,
    /// `max_new` tokens were generated.
    Length,
}

#[derive(Clone, Debug)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub finish: Finish,
}

impl GenStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode rate over the tokens that needed a decode step (the first comes from prefill).
    pub fn decode_tps(&self) -> f64 {
        self.generated.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub max_new: usize,
    pub params: SamplingParams,
    pub stop_ids: &'a [u32],
}

/// Runs one generation from the session's current position. `on_token(id, logits)`
/// returns `false` to stop.
pub fn generate(
    session: &mut Session,
    req: &GenerateRequest,
    on_token: &mut dyn FnMut(u32, &[f32]) -> bool,
) -> Result<GenStats, EngineError> {
    let mut sampler = Sampler::new(req.params.clone())?;
    let t0 = Instant::now();
    let mut logits = session.prefill(req.prompt, LogitsRows::Last)?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let mut history: Vec<u32> = req.prompt.to_vec();
    let t1 = Instant::now();
    let mut generated = 0;
    let mut finish = Finish::Length;
    while generated < req.max_new {
        let id = sampler.sample(&logits, &history);
        if req.stop_ids.contains(&id) {
            finish = Finish::Stop;
            break;
        }
        generated += 1;
        history.push(id);
        if !on_token(id, &logits) {
            finish = Finish::Stop;
            break;
        }
        if generated == req.max_new {
            break;
        }
        if session.position() + 1 > session.max_context() {
            return Err(EngineError::ContextExceeded {
                needed: session.position() + 1,
                max: session.max_context(),
            });
        }
        logits = session.decode(id)?;
    }
    Ok(GenStats {
        prompt_tokens: req.prompt.len(),
        generated,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        finish,
    })
}
