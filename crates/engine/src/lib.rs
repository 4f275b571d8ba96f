//! moeflux-engine: runs a model for one sequence at a time.
//!
//! A [`Session`] owns the backend, the model and the sequence state (KV caches, conv
//! and delta-rule states). Prefill splits a prompt into power-of-two chunks (at most
//! `prefill_chunk` wide) so only `log2(chunk) + 1` distinct graphs ever exist per logits
//! mode; each is built, validated and planned once and replayed from then on.

pub mod generate;
pub mod npy;

use std::path::Path;

use moeflux_core::{Backend, PoolExt};
use moeflux_model::{LayerState, LogitsRows, Model, ModelError, SeqState, StepGraph};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Core(#[from] moeflux_core::CoreError),
    #[error(transparent)]
    Text(#[from] moeflux_text::TextError),
    #[error("token id {token} at position {index} is out of range (vocabulary size {vocab})")]
    TokenOutOfRange {
        token: u32,
        index: usize,
        vocab: usize,
    },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error(
        "context length exceeded: {needed} tokens needed, the session holds at most {max} (raise --max-context)"
    )]
    ContextExceeded { needed: usize, max: usize },
    #[error("device '{0}' is not available: {1}")]
    Device(String, String),
    #[error("{0}")]
    Invalid(String),
}

/// Parses a human size: `512MiB`, `20GiB`, `1.5GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512MiB, 20GiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "'{s}': unknown unit '{u}' (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    Ok((v * mult) as usize)
}

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
    /// CUDA when a GPU is usable, otherwise the CPU.
    Auto,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(format!("unknown device '{s}' (cpu, cuda, auto)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub device: Device,
    /// Maximum tokens in the sequence (KV cache rows). 0 = min(model limit, 4096).
    pub max_context: usize,
    /// Widest prefill chunk (rounded down to a power of two); 0 = automatic (see
    /// [`resolve_prefill_chunk`]).
    pub prefill_chunk: usize,
    /// RAM budget for the expert cache of a packed model (bytes; `None` = unbounded).
    pub host_mem: Option<usize>,
    /// VRAM budget for the expert cache of a packed model on CUDA (bytes; `None` = free
    /// device memory at first use minus a reserve; `Some(0)` = no VRAM cache).
    pub gpu_mem: Option<usize>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            device: Device::Auto,
            max_context: 0,
            prefill_chunk: 0,
            host_mem: None,
            gpu_mem: None,
        }
    }
}

/// Opens the backend for `device`; `Auto` takes CUDA when a device and NVRTC are usable.
pub fn open_backend(device: Device) -> Result<Box<dyn Backend>, EngineError> {
    open_backend_with(device, None)
}

/// [`open_backend`] with the VRAM budget of the expert cache (CUDA; see
/// [`SessionOptions::gpu_mem`]).
pub fn open_backend_with(
    device: Device,
    gpu_mem: Option<usize>,
) -> Result<Box<dyn Backend>, EngineError> {
    match device {
        Device::Cpu => Ok(Box::new(moeflux_cpu::CpuBackend::new())),
        Device::Cuda => {
            let mut o = moeflux_cuda::CudaOptions::new(0);
            o.gpu_mem = gpu_mem;
            Ok(Box::new(
                moeflux_cuda::CudaBackend::with_options(o)
                    .map_err(|e| EngineError::Device("cuda".into(), e.to_string()))?,
            ))
        }
        Device::Auto => match moeflux_cuda::available() {
            true => open_backend_with(Device::Cuda, gpu_mem),
            false => Ok(Box::new(moeflux_cpu::CpuBackend::new())),
        },
    }
}

/// The expert store of a model whose routed experts are streamed (a packed directory).
pub fn expert_store(model: &Model) -> Option<std::sync::Arc<moeflux_model::packed::ExpertStore>> {
    model.weights.layers.iter().find_map(|l| match &l.ffn {
        moeflux_model::arch::Ffn::Moe(m) => match &m.experts {
            moeflux_model::arch::Experts::Streamed(s) => Some(s.clone()),
            moeflux_model::arch::Experts::Resident(_) => None,
        },
        moeflux_model::arch::Ffn::Dense(_) => None,
    })
}

/// Host copy of a session's state at a position (see [`Session::snapshot`]).
#[derive(Clone, Debug)]
pub struct Snapshot {
    pos: usize,
    bufs: Vec<(moeflux_core::RawBufId, Vec<u8>)>,
}

impl Snapshot {
    pub fn position(&self) -> usize {
        self.pos
    }
    pub fn bytes(&self) -> usize {
        self.bufs.iter().map(|b| b.1.len()).sum()
    }
}

pub struct Session {
    backend: Box<dyn Backend>,
    pub model: Model,
    state: SeqState,
    graphs: Vec<((usize, LogitsRows), StepGraph)>,
    pos: usize,
    chunk: usize,
}

/// The prefill chunk a session on backend `backend` uses when asked for `requested` tokens
/// (0 = automatic): the largest power of two not above it. Automatic is 4096 on CUDA, where
/// wide chunks fill the expert GEMM tiles (a 4096-token prompt of qwen3-next prefills ~1.4x
/// faster in one chunk than in chunks of 512), and 256 on the CPU, whose GEMMs gain nothing
/// from wider chunks and whose activations then stay small.
pub fn resolve_prefill_chunk(backend: &str, requested: usize) -> usize {
    let want = match (requested, backend) {
        (0, "cuda") => 4096,
        (0, _) => 256,
        (n, _) => n,
    };
    1usize << (usize::BITS - 1 - want.leading_zeros())
}

impl Session {
    /// The widest prefill chunk this session uses.
    pub fn prefill_chunk(&self) -> usize {
        self.chunk
    }

    pub fn open(dir: &Path, opts: &SessionOptions) -> Result<Self, EngineError> {
        let mut backend = open_backend_with(opts.device, opts.gpu_mem)?;
        let load = moeflux_model::LoadOptions {
            host_mem: opts.host_mem,
        };
        let model = Model::open_with(dir, backend.pool(), &load)?;
        Self::with_model(backend, model, opts)
    }

    /// A session over a model already resolved against `backend`'s pool.
    pub fn with_model(
        mut backend: Box<dyn Backend>,
        model: Model,
        opts: &SessionOptions,
    ) -> Result<Self, EngineError> {
        let max_ctx = if opts.max_context == 0 {
            model.spec.max_position.min(4096)
        } else {
            opts.max_context
        };
        let state = model.alloc_state(backend.pool(), max_ctx)?;
        let chunk = resolve_prefill_chunk(backend.name(), opts.prefill_chunk);
        Ok(Session {
            backend,
            model,
            state,
            graphs: Vec::new(),
            pos: 0,
            chunk,
        })
    }

    /// Benchmarks only: jump to position `pos` without computing the tokens before it.
    /// The cache rows below `pos` hold whatever they held; the work of a step at `pos`
    /// (attention over `pos` rows) is the same as after a real prefill.
    pub fn seek(&mut self, pos: usize) -> Result<(), EngineError> {
        if pos > self.state.max_ctx {
            return Err(EngineError::ContextExceeded {
                needed: pos,
                max: self.state.max_ctx,
            });
        }
        self.pos = pos;
        Ok(())
    }

    /// Counters of the expert store (and of the device tiers in front of it), for models
    /// whose experts are streamed.
    pub fn expert_stats(&self) -> Option<moeflux_model::packed::StoreStats> {
        expert_store(&self.model).map(|s| s.stats())
    }

    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        self.backend.as_mut()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn vocab(&self) -> usize {
        self.model.spec.vocab
    }

    /// Tokens consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn max_context(&self) -> usize {
        self.state.max_ctx
    }

    /// Copies the sequence state (recurrent states and the KV rows in use) to the host, so
    /// a later [`Session::restore`] resumes exactly here. Hybrid models cannot rewind
    /// their recurrent state, so this is how a server reuses a shared prompt prefix.
    pub fn snapshot(&mut self) -> Result<Snapshot, EngineError> {
        let mut bufs = Vec::new();
        let pos = self.pos;
        for l in &self.state.layers {
            let ids: Vec<(moeflux_core::RawBufId, usize)> = match l {
                LayerState::Kv(kv) => {
                    let row = self.model.spec.attn.kv_heads * self.model.spec.attn.head_dim * 4;
                    vec![(kv.k.raw(), pos * row), (kv.v.raw(), pos * row)]
                }
                LayerState::Linear(ls) => {
                    let pool = self.backend.pool_ref();
                    let size = |id: moeflux_core::RawBufId| pool.info(id).map(|i| i.0).unwrap_or(0);
                    vec![
                        (ls.conv.raw(), size(ls.conv.raw())),
                        (ls.delta.raw(), size(ls.delta.raw())),
                    ]
                }
            };
            for (id, bytes) in ids {
                let mut host = vec![0u8; bytes];
                self.backend.pool().download_raw(id, 0, &mut host)?;
                bufs.push((id, host));
            }
        }
        Ok(Snapshot { pos, bufs })
    }

    /// Returns the session to a [`Snapshot`] taken from this session.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<(), EngineError> {
        for (id, host) in &snap.bufs {
            self.backend.pool().upload_raw(*id, 0, host)?;
        }
        self.pos = snap.pos;
        Ok(())
    }

    /// Forget the sequence (zero caches and recurrent state).
    pub fn reset(&mut self) -> Result<(), EngineError> {
        self.model.reset_state(self.backend.pool(), &self.state)?;
        self.pos = 0;
        Ok(())
    }

    pub fn set_profiling(&mut self, on: bool) {
        self.backend.set_profiling(on);
    }

    pub fn profile(&self) -> moeflux_core::backend::OpProfile {
        self.backend.profile()
    }

    fn check(&self, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let vocab = self.vocab();
        if let Some((index, &token)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            return Err(EngineError::TokenOutOfRange {
                token,
                index,
                vocab,
            });
        }
        if self.pos + tokens.len() > self.state.max_ctx {
            return Err(EngineError::ContextExceeded {
                needed: self.pos + tokens.len(),
                max: self.state.max_ctx,
            });
        }
        Ok(())
    }

    fn graph_index(&mut self, n: usize, rows: LogitsRows) -> Result<usize, EngineError> {
        if let Some(i) = self.graphs.iter().position(|(k, _)| *k == (n, rows)) {
            return Ok(i);
        }
        let g = self
            .model
            .build_step(self.backend.pool(), &self.state, n, rows)?;
        self.backend.prepare(&g.graph)?;
        self.graphs.push(((n, rows), g));
        Ok(self.graphs.len() - 1)
    }

    fn run_chunk(
        &mut self,
        tokens: &[u32],
        rows: LogitsRows,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        let n = tokens.len();
        let gi = self.graph_index(n, rows)?;
        let positions: Vec<u32> = (self.pos..self.pos + n).map(|p| p as u32).collect();
        let (tok_buf, pos_buf, logits, lrows) = {
            let g = &self.graphs[gi].1;
            (g.tokens, g.pos, g.logits, g.logits_rows)
        };
        let pool = self.backend.pool();
        pool.upload_u32(tok_buf, tokens)?;
        pool.upload_u32(pos_buf, &positions)?;
        self.backend.execute(&self.graphs[gi].1.graph)?;
        let vocab = self.vocab();
        let start = out.len();
        out.resize(start + lrows * vocab, 0.0);
        self.backend
            .pool()
            .download_f32(logits, &mut out[start..])?;
        self.pos += n;
        Ok(())
    }

    /// Feeds `tokens` through the model. Returns logits for every position (`All`,
    /// `[n, vocab]` row-major) or for the last one (`Last`, `[vocab]`).
    pub fn prefill(&mut self, tokens: &[u32], rows: LogitsRows) -> Result<Vec<f32>, EngineError> {
        self.check(tokens)?;
        let mut out = Vec::new();
        let mut rest = tokens;
        while !rest.is_empty() {
            let width = if rest.len() >= self.chunk {
                self.chunk
            } else {
                1usize << (usize::BITS - 1 - rest.len().leading_zeros())
            };
            let (now, later) = rest.split_at(width);
            let chunk_rows = if rows == LogitsRows::Last && !later.is_empty() {
                LogitsRows::Last
            } else {
                rows
            };
            if rows == LogitsRows::Last {
                out.clear();
            }
            self.run_chunk(now, chunk_rows, &mut out)?;
            rest = later;
        }
        Ok(out)
    }

    /// One decode step: feeds `token`, returns the next-token logits.
    pub fn decode(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        self.check(&[token])?;
        let mut out = Vec::new();
        self.run_chunk(&[token], LogitsRows::Last, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_prefill_chunk;

    #[test]
    fn prefill_chunk_is_automatic_per_backend_and_a_power_of_two() {
        assert_eq!(resolve_prefill_chunk("cuda", 0), 4096);
        assert_eq!(resolve_prefill_chunk("cpu", 0), 256);
        assert_eq!(resolve_prefill_chunk("cpu", 1000), 512);
        assert_eq!(resolve_prefill_chunk("cuda", 64), 64);
        assert_eq!(resolve_prefill_chunk("cuda", 1), 1);
    }
}
