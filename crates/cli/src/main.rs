//! The `moeflux` command line.

mod bench;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use moeflux_engine::generate::{GenerateRequest, generate};
use moeflux_engine::{Device, Session, SessionOptions, npy};
use moeflux_model::{LayerKind, LogitsRows};
use moeflux_text::{ChatMessage, SamplingParams, StreamDecoder, TextCodec};

#[derive(Parser)]
#[command(
    name = "moeflux",
    version,
    about = "Run Mixture-of-Experts language models on CPU and CUDA"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt (streams to stdout; speeds to stderr).
    Generate(GenerateArgs),
    /// Write the logits at every prompt position to a float32 .npy [n_tokens, vocab].
    Logits(LogitsArgs),
    /// Describe a model: architecture, layers, parameter and byte counts, quantization.
    Info(InfoArgs),
    /// Benchmark prefill/decode on a random-weight model at real shapes (no disk).
    Bench(bench::BenchArgs),
    /// Repack a checkpoint for tiered expert streaming (experts as contiguous records).
    Convert(ConvertArgs),
    /// Serve the model over an OpenAI- and Anthropic-compatible HTTP API.
    Serve(ServeArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Model directory (config.json + *.safetensors). Defaults to the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// cpu, cuda or auto.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Maximum sequence length (KV cache rows); 0 = min(model limit, 4096).
    #[arg(long, default_value_t = 0)]
    max_context: usize,
    /// Widest prefill chunk (rounded down to a power of two); 0 = automatic: 4096 on CUDA,
    /// 256 on the CPU.
    #[arg(long, default_value_t = 0)]
    prefill_chunk: usize,
    /// RAM budget for the expert cache of a packed model (e.g. 512MiB, 20GiB).
    #[arg(long, value_parser = moeflux_engine::parse_size)]
    host_mem: Option<usize>,
    /// VRAM budget for the expert cache (CUDA; the CPU backend ignores it).
    #[arg(long, value_parser = moeflux_engine::parse_size)]
    gpu_mem: Option<usize>,
    /// Read a packed model's experts into the RAM tier before the first token (as many as
    /// --host-mem holds), instead of on first use.
    #[arg(long)]
    preload_experts: bool,
}

impl RunArgs {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(bundled_model)
    }
    fn open(&self) -> Result<Session> {
        let dir = self.dir();
        let opts = SessionOptions {
            device: self.device,
            max_context: self.max_context,
            prefill_chunk: self.prefill_chunk,
            host_mem: self.host_mem,
            gpu_mem: self.gpu_mem,
        };
        if self.gpu_mem.is_some() && self.device == Device::Cpu {
            eprintln!("note: --gpu-mem has no effect on the CPU backend");
        }
        let s = Session::open(&dir, &opts)
            .with_context(|| format!("opening model {}", dir.display()))?;
        if self.preload_experts {
            preload(&s.model)?;
        }
        Ok(s)
    }
}

/// Fills the RAM tier of a packed model's expert store (no-op for other models).
pub(crate) fn preload(model: &moeflux_model::Model) -> Result<()> {
    if let Some(store) = moeflux_engine::expert_store(model) {
        let (records, bytes, secs) = store.preload().context("preloading experts")?;
        eprintln!(
            "preloaded {records} expert records ({:.2} GB) into RAM in {secs:.1} s ({:.2} GB/s)",
            bytes as f64 / 1e9,
            bytes as f64 / secs.max(1e-9) / 1e9
        );
    }
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 128)]
    n: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Print a per-op time profile to stderr at the end.
    #[arg(long)]
    profile: bool,
    /// Print expert-store statistics (packed models).
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Comma-separated token ids.
    #[arg(long)]
    tokens: String,
    #[arg(long)]
    out: PathBuf,
    /// Feed the tokens one at a time through the decode path instead of one prefill.
    #[arg(long)]
    decode: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// Model directory. Defaults to the bundled model.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct ConvertArgs {
    /// Source model directory (any checkpoint `generate` can open).
    src: PathBuf,
    /// Output directory (must not exist).
    dst: PathBuf,
    /// Bits for weights quantized during conversion (already-quantized weights are copied).
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Re-read the output and check every checksum.
    #[arg(long)]
    verify: bool,
}

fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} ({eta})")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut tick = |done: u64, total: u64, what: &str| {
        bar.set_length(total);
        bar.set_position(done);
        bar.set_message(what.to_string());
    };
    let m = moeflux_model::packed::convert(&a.src, &a.dst, a.bits, &mut tick)
        .with_context(|| format!("converting {}", a.src.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {}: {} layers x {} experts, {} bytes per expert record",
        a.dst.display(),
        m.layers.len(),
        m.experts,
        m.record_bytes
    );
    if a.verify {
        let bar = indicatif::ProgressBar::new(0);
        let mut tick = |done: u64, total: u64, _: &str| {
            bar.set_length(total);
            bar.set_position(done);
        };
        moeflux_model::packed::verify(&a.dst, &mut tick)
            .with_context(|| format!("verifying {}", a.dst.display()))?;
        bar.finish_and_clear();
        eprintln!("verified: every checksum matches");
    }
    Ok(())
}

fn bundled_model() -> PathBuf {
    if let Some(p) = std::env::var_os("MOEFLUX_BUNDLED_MODEL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bundled")
}

fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let toks: Vec<u32> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--tokens: '{t}' is not a token id"))
        })
        .collect::<Result<_>>()?;
    if toks.is_empty() {
        bail!("--tokens: no token ids given");
    }
    Ok(toks)
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let mut s = a.run.open()?;
    let logits = if a.decode {
        let mut all = Vec::with_capacity(tokens.len() * s.vocab());
        for &t in &tokens {
            all.extend(s.decode(t)?);
        }
        all
    } else {
        s.prefill(&tokens, LogitsRows::All)?
    };
    npy::write_f32(&a.out, &[tokens.len(), s.vocab()], &logits)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "wrote {} x {} logits to {} ({} backend)",
        tokens.len(),
        s.vocab(),
        a.out.display(),
        s.backend_name()
    );
    Ok(())
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

fn count(p: usize) -> String {
    let x = p as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        format!("{:.1}K", x / 1e3)
    }
}

fn cmd_info(a: InfoArgs) -> Result<()> {
    let dir = a.model.unwrap_or_else(bundled_model);
    // Resolving weights needs a pool; the CPU one borrows the maps and copies nothing.
    let mut backend = moeflux_engine::open_backend(Device::Cpu)?;
    let model = moeflux_model::Model::open(&dir, backend.pool())
        .with_context(|| format!("opening model {}", dir.display()))?;
    let s = &model.spec;
    let st = model.stats();
    let lin = s
        .layers
        .iter()
        .filter(|k| **k == LayerKind::LinearAttention)
        .count();
    println!("model:          {}", dir.display());
    println!(
        "architecture:   {} (model_type {})",
        s.arch.name(),
        s.model_type
    );
    println!(
        "layers:         {} ({} gated-deltanet linear attention, {} full attention)",
        s.layers.len(),
        lin,
        s.layers.len() - lin
    );
    let kinds: String = s
        .layers
        .iter()
        .map(|k| {
            if *k == LayerKind::LinearAttention {
                'L'
            } else {
                'A'
            }
        })
        .collect();
    println!("layer kinds:    {kinds}");
    println!("hidden:         {}   vocab: {}", s.hidden, s.vocab);
    println!(
        "attention:      {} heads / {} kv heads x {} (rotary {}), output gate: {}",
        s.attn.heads, s.attn.kv_heads, s.attn.head_dim, s.attn.rotary_dim, s.attn.output_gate
    );
    if let Some(l) = &s.linear {
        println!(
            "linear attn:    {} key heads x {}, {} value heads x {}, conv {}",
            l.k_heads, l.dk, l.v_heads, l.dv, l.conv_kernel
        );
    }
    println!(
        "experts:        {} routed (top {}{}), inter {}, shared: {}",
        s.moe.experts,
        s.moe.top_k,
        if s.moe.renorm { ", renormalised" } else { "" },
        s.moe.inter,
        s.moe
            .shared_inter
            .map(|x| format!("inter {x}"))
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "parameters:     {} total, {} active per token, {} in routed experts",
        count(st.params_total),
        count(st.params_active),
        count(st.params_experts)
    );
    println!(
        "bytes:          {} total, {} read per token, {} in routed experts",
        human(st.bytes_total),
        human(st.bytes_active),
        human(st.bytes_experts)
    );
    match &s.quant {
        Some(q) => println!(
            "quantization:   MLX affine {}-bit, group {} ({} per-module overrides)",
            q.bits,
            q.group_size,
            q.overrides.len()
        ),
        None => println!(
            "quantization:   none (weights {})",
            model.weights.embed.format
        ),
    }
    println!(
        "max position:   {}   tied embeddings: {}",
        s.max_position, s.tie_embeddings
    );
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let dir = a.run.dir();
    let text = TextCodec::from_dir(&dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))?;
    let prompt_text = if a.chat {
        text.render_chat(&[ChatMessage::new("user", a.prompt.clone())], true)?
    } else {
        a.prompt.clone()
    };
    let prompt = text.encode(&prompt_text, !a.chat)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        ..SamplingParams::default()
    };
    params.validate()?;
    let mut s = a.run.open()?;
    s.set_profiling(a.profile);
    let mut stops: Vec<u32> = text.eos_ids().to_vec();
    stops.extend(s.model.spec.eos_ids.iter().copied());
    let mut dec = StreamDecoder::new(true);
    let mut out = std::io::stdout().lock();
    let mut err: Option<anyhow::Error> = None;
    let req = GenerateRequest {
        prompt: &prompt,
        max_new: a.n,
        params,
        stop_ids: &stops,
    };
    let stats = generate(&mut s, &req, &mut |id, _| match dec.push(&text, id) {
        Ok(piece) => {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
            true
        }
        Err(e) => {
            err = Some(e.into());
            false
        }
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let tail = dec.finish(&text)?;
    writeln!(out, "{tail}")?;
    eprintln!(
        "[{}] prompt {} tokens at {:.1} tok/s, generated {} tokens at {:.1} tok/s ({:?})",
        s.backend_name(),
        stats.prompt_tokens,
        stats.prefill_tps(),
        stats.generated,
        stats.decode_tps(),
        stats.finish
    );
    if a.verbose
        && let Some(st) = s.expert_stats()
    {
        let tokens = (stats.prompt_tokens + stats.generated).max(1) as f64;
        eprint!("experts per tier:\n{}", st.report(tokens));
    }
    if a.profile {
        eprint!("{}", s.profile().table());
    }
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Address to listen on (127.0.0.1 = this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require this key on /v1/* (`Authorization: Bearer KEY` or `x-api-key: KEY`). Default: $MOEFLUX_API_KEY.
    #[arg(long)]
    api_key: Option<String>,
    /// Requests that may wait for the engine; more get 429.
    #[arg(long, default_value_t = 64)]
    queue_size: usize,
    /// Prompt-prefix snapshots kept for reuse across requests (0 = off).
    #[arg(long, default_value_t = 8)]
    prefix_cache: usize,
    /// Model id clients must use (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let dir = a.run.dir();
    let opts = SessionOptions {
        device: a.run.device,
        max_context: a.run.max_context,
        prefill_chunk: a.run.prefill_chunk,
        host_mem: a.run.host_mem,
        gpu_mem: a.run.gpu_mem,
    };
    let cfg = moeflux_server::ServerConfig {
        model_id: a
            .served_model_name
            .unwrap_or_else(|| moeflux_server::model_id(&dir)),
        api_key: a
            .api_key
            .or_else(|| std::env::var("MOEFLUX_API_KEY").ok())
            .filter(|k| !k.is_empty()),
        queue_capacity: a.queue_size,
        prefix_cache: a.prefix_cache,
        ..moeflux_server::ServerConfig::default()
    };
    moeflux_server::init_logging();
    moeflux_server::run(
        &a.host,
        a.port,
        cfg,
        moeflux_server::session_loader(dir, opts),
    )?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        // Engine warnings (a budget that forces waves, a slab that could not be page-locked)
        // reach stderr; `RUST_LOG` sets the level (`serve` logs at `info`).
        moeflux_server::init_logging_with("warn");
    }
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Info(a) => cmd_info(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Convert(a) => cmd_convert(a),
        Cmd::Serve(a) => cmd_serve(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
