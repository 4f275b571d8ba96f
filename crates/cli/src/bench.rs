//! `moeflux bench`: random-weight models at real shapes, built in memory; measures
//! prefill and decode speed and reports decode against the memory-bandwidth floor
//! (bytes that must be read per token / bandwidth measured in the same run).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use moeflux_engine::{Device, Session, SessionOptions, expert_store, open_backend_with};
use moeflux_model::synthetic::{PRESETS, preset};
use moeflux_model::{LayerKind, LogitsRows, Model};

#[derive(Args)]
pub struct BenchArgs {
    /// Model shape: qwen3-next-80b-a3b, qwen3.5-35b-a3b, qwen3-30b-a3b, qwen3.5-397b-a17b.
    #[arg(long)]
    preset: String,
    /// Keep only the first N layers (to fit memory); per-token figures scale with it.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Prompt lengths to time prefill at (comma-separated).
    #[arg(long, default_value = "512", value_delimiter = ',')]
    prompt: Vec<usize>,
    /// Tokens decoded per context length (0: prefill only).
    #[arg(long = "gen", default_value_t = 32)]
    gen_tokens: usize,
    /// Context lengths to time decode at (comma-separated).
    #[arg(long, default_value = "0", value_delimiter = ',')]
    context: Vec<usize>,
    /// Widest prefill chunk (rounded down to a power of two); 0 = automatic: 4096 on CUDA,
    /// 256 on the CPU.
    #[arg(long, default_value_t = 0)]
    prefill_chunk: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Print a per-op time profile of the decode steps.
    #[arg(long)]
    profile: bool,
    /// Run from a packed directory on disk (written here once if missing) with the routed
    /// experts behind the tiered store instead of all in memory.
    #[arg(long)]
    store: Option<std::path::PathBuf>,
    /// RAM budget of the expert cache with --store (e.g. 2GiB).
    #[arg(long, value_parser = moeflux_engine::parse_size)]
    host_mem: Option<usize>,
    /// With --store: read the experts into the RAM tier before measuring (as many as
    /// --host-mem holds), so the rows measure warm tiers rather than first reads from disk.
    #[arg(long)]
    preload_experts: bool,
    /// VRAM budget of the expert cache with --store on CUDA (e.g. 20GiB; 0 = no VRAM cache;
    /// default: free device memory minus a reserve).
    #[arg(long, value_parser = moeflux_engine::parse_size)]
    gpu_mem: Option<usize>,
    /// With --store: make routing temporally local like a real model's (random weights route
    /// nearly uniformly). The value is the hit rate a per-layer LRU of 64 experts should see
    /// (e.g. 0.67). Replaces the routed experts, so outputs change: benchmarks only.
    #[arg(long)]
    routing_locality: Option<f64>,
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

pub fn run(a: BenchArgs) -> Result<()> {
    let Some(cfg) = preset(&a.preset) else {
        bail!(
            "unknown preset '{}' (known: {})",
            a.preset,
            PRESETS.join(", ")
        )
    };
    if a.store.is_none()
        && (a.routing_locality.is_some() || a.host_mem.is_some() || a.preload_experts)
    {
        bail!(
            "--routing-locality, --host-mem and --preload-experts need --store DIR (a packed model on disk)"
        );
    }
    if let Some(r) = a.routing_locality
        && !(0.0..=1.0).contains(&r)
    {
        bail!("--routing-locality {r}: use a hit rate between 0 and 1 (e.g. 0.67)");
    }
    let mut backend = open_backend_with(a.device, a.gpu_mem)?;
    let name = backend.name();
    eprintln!("[{name}] measuring memory bandwidth ...");
    let bw = backend.measure_bandwidth().context("measuring bandwidth")?;
    eprintln!(
        "[{name}] building {} with random 4-bit weights{} ...",
        a.preset,
        a.layers
            .map(|l| format!(" ({l} layers)"))
            .unwrap_or_default()
    );
    let t = Instant::now();
    let model = match &a.store {
        None => Model::synthetic(&cfg, a.layers, backend.pool(), 0x5eed)
            .context("building the synthetic model")?,
        Some(dir) => {
            if !dir.join(moeflux_model::packed::MANIFEST).exists() {
                let src = dir.with_extension("src-tmp");
                moeflux_model::synthetic::write_checkpoint(&cfg, a.layers, 0x5eed, &src)?;
                moeflux_model::packed::convert(&src, dir, 4, &mut |_, _, _| {})?;
                std::fs::remove_dir_all(&src)
                    .with_context(|| format!("removing {}", src.display()))?;
            }
            let load = moeflux_model::LoadOptions {
                host_mem: a.host_mem,
            };
            let m = Model::open_with(dir, backend.pool(), &load)
                .with_context(|| format!("opening {}", dir.display()))?;
            if let Some(store) = expert_store(&m) {
                store.set_routing_locality(a.routing_locality)?;
            }
            if a.preload_experts {
                crate::preload(&m)?;
            }
            m
        }
    };
    let st = model.stats();
    let spec = model.spec.clone();
    eprintln!(
        "[{name}] built in {:.1}s: {:.2} GB of weights, {:.1} MB read per token",
        t.elapsed().as_secs_f64(),
        st.bytes_total as f64 / 1e9,
        st.bytes_active as f64 / 1e6
    );
    let max_prompt = a.prompt.iter().copied().max().unwrap_or(0);
    let max_ctx = a.context.iter().copied().max().unwrap_or(0).max(max_prompt) + a.gen_tokens + 1;
    let opts = SessionOptions {
        device: a.device,
        max_context: max_ctx,
        prefill_chunk: a.prefill_chunk,
        ..SessionOptions::default()
    };
    let mut s = Session::with_model(backend, model, &opts)?;
    let vocab = spec.vocab;

    let mut rows = Vec::new();
    println!(
        "preset {}  layers {}  device {}  bandwidth {:.1} GB/s",
        a.preset,
        spec.layers.len(),
        name,
        bw / 1e9
    );
    for &p in &a.prompt {
        if p == 0 {
            continue;
        }
        let toks = tokens(p, vocab, 7);
        s.reset()?;
        s.prefill(&toks[..p.min(8)], LogitsRows::Last)?; // build graphs before timing
        s.reset()?;
        let t = Instant::now();
        s.prefill(&toks, LogitsRows::Last)?;
        let tps = p as f64 / t.elapsed().as_secs_f64();
        println!("prefill  {p:>6} tokens   {tps:>10.1} tok/s");
        rows.push(serde_json::json!({"kind": "prefill", "tokens": p, "tok_per_s": tps}));
    }
    let kv_row = spec.attn.kv_heads * spec.attn.head_dim * 4 * 2;
    let full = spec
        .layers
        .iter()
        .filter(|k| **k == LayerKind::FullAttention)
        .count();
    let lin_state = spec
        .linear
        .as_ref()
        .map(|l| (l.v_heads * l.dk * l.dv + (l.conv_kernel - 1) * l.conv_dim()) * 4 * 2)
        .unwrap_or(0);
    let lins = spec.layers.len() - full;
    s.set_profiling(a.profile);
    // `--gen 0` times prefill only.
    let contexts: &[usize] = if a.gen_tokens == 0 { &[] } else { &a.context };
    for &c in contexts {
        s.reset()?;
        s.seek(c)?;
        let mut tok = tokens(1, vocab, 11)[0];
        // Warm-up, untimed: the first steps run eagerly, then capture and instantiate the
        // decode graph (tens of ms); and a GPU idle during the model build needs a moment to
        // come back to full clocks. At least three steps and 100 ms, then back to context c
        // (at most --gen steps: the timed run then writes over the same positions, so the
        // session's context is never exceeded).
        let t = Instant::now();
        for i in 0..a.gen_tokens.min(256) {
            if i >= 3 && t.elapsed().as_secs_f64() >= 0.1 {
                break;
            }
            s.decode(tok)?;
        }
        s.seek(c)?;
        let before = s.expert_stats();
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            let logits = s.decode(tok)?;
            tok = logits
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
                )
                .0 as u32;
        }
        let tps = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        let bytes = st.bytes_active + full * kv_row * (c + a.gen_tokens / 2) + lins * lin_state;
        let floor = bw / bytes as f64;
        println!(
            "decode   ctx {c:>6}   {tps:>10.1} tok/s   {:>8.1} MB/token   floor {floor:>8.1} tok/s   {:>5.1}% of floor",
            bytes as f64 / 1e6,
            100.0 * tps / floor
        );
        let mut row = serde_json::json!({"kind": "decode", "context": c, "tok_per_s": tps, "bytes_per_token": bytes, "floor_tok_per_s": floor, "fraction_of_floor": tps / floor});
        if let (Some(b), Some(e)) = (before, s.expert_stats()) {
            let n = a.gen_tokens as f64;
            let d = e.since(&b);
            print!("{}", d.report(n));
            row["experts"] = d.to_json(n);
            row["expert_hits"] = d.hits.into();
            row["expert_misses"] = d.misses.into();
            row["disk_bytes_per_token"] = (d.bytes_read as f64 / n).into();
        }
        rows.push(row);
    }
    if a.profile {
        print!("{}", s.profile().table());
    }
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "preset": a.preset, "layers": spec.layers.len(), "device": name, "bandwidth_bytes_per_s": bw,
            "weight_bytes": st.bytes_total, "active_bytes_per_token": st.bytes_active, "results": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
