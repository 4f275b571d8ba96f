//! End to end on the golden fixtures (`tests/fixtures`, see its README): whole models run on
//! the CUDA backend must match the CPU backend step for step, and the references nobody here
//! wrote (transformers fp32, mlx-lm 4-bit).
//!
//! The loop mirrors `moeflux_engine::Session` (power-of-two prefill chunks, then decode) but
//! drives the backend directly, so it does not depend on how the engine picks its device.
//! Skips with a message when no CUDA device is present.

use std::path::{Path, PathBuf};

use moeflux_core::{Backend, PoolExt};
use moeflux_cpu::CpuBackend;
use moeflux_cuda::CudaBackend;
use moeflux_model::{LogitsRows, Model, SeqState, StepGraph};

/// `$MOEFLUX_FIXTURES` (set by `scripts/gpu_check.sh --remote`, where the source tree sits at
/// another path than at build time), else the repository's `tests/fixtures`.
fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("MOEFLUX_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"));
    dir.join(name)
}

/// `.npy` float32 reader (shape, data), enough for the fixtures' logits.
fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..6],
        b"\x93NUMPY",
        "{}: not a .npy file",
        path.display()
    );
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[hstart..hstart + hlen]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let shape_s = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .unwrap();
    let shape: Vec<usize> = shape_s
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[hstart + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), shape.iter().product::<usize>());
    (shape, data)
}

/// The id list under `key` in the fixture's ref.json.
fn ref_ids(name: &str, key: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture(name).join("ref.json")).unwrap();
    // "key": [1, 2, 3] -- a tiny scan instead of a JSON dependency
    let at = text
        .find(&format!("\"{key}\""))
        .unwrap_or_else(|| panic!("{key} in ref.json"));
    let rest = &text[at..];
    let list = &rest[rest.find('[').unwrap() + 1..rest.find(']').unwrap()];
    list.split(',').map(|s| s.trim().parse().unwrap()).collect()
}

struct Runner {
    backend: Box<dyn Backend>,
    model: Model,
    state: SeqState,
    graphs: Vec<((usize, LogitsRows), StepGraph)>,
    pos: usize,
}

impl Runner {
    fn open(mut backend: Box<dyn Backend>, name: &str) -> Runner {
        let model = Model::open(&fixture(name).join("model"), backend.pool())
            .unwrap_or_else(|e| panic!("{name} on {}: {e}", backend.name()));
        let state = model.alloc_state(backend.pool(), 128).unwrap();
        Runner {
            backend,
            model,
            state,
            graphs: Vec::new(),
            pos: 0,
        }
    }

    fn step(&mut self, tokens: &[u32], rows: LogitsRows) -> Vec<f32> {
        let n = tokens.len();
        let gi = match self.graphs.iter().position(|(k, _)| *k == (n, rows)) {
            Some(i) => i,
            None => {
                let g = self
                    .model
                    .build_step(self.backend.pool(), &self.state, n, rows)
                    .unwrap();
                self.backend.prepare(&g.graph).unwrap();
                self.graphs.push(((n, rows), g));
                self.graphs.len() - 1
            }
        };
        let g = &self.graphs[gi].1;
        let positions: Vec<u32> = (self.pos..self.pos + n).map(|p| p as u32).collect();
        let pool = self.backend.pool();
        pool.upload_u32(g.tokens, tokens).unwrap();
        pool.upload_u32(g.pos, &positions).unwrap();
        self.backend
            .execute(&g.graph)
            .unwrap_or_else(|e| panic!("{}: {e}", self.backend.name()));
        let mut out = vec![0f32; g.logits_rows * self.model.spec.vocab];
        self.backend
            .pool()
            .download_f32(g.logits, &mut out)
            .unwrap();
        self.pos += n;
        out
    }

    /// Prefill in power-of-two chunks of at most 16, logits at every position.
    fn prefill(&mut self, tokens: &[u32]) -> Vec<f32> {
        let mut out = Vec::new();
        let mut rest = tokens;
        while !rest.is_empty() {
            let w = if rest.len() >= 16 {
                16
            } else {
                1 << (usize::BITS - 1 - rest.len().leading_zeros())
            };
            out.extend(self.step(&rest[..w], LogitsRows::All));
            rest = &rest[w..];
        }
        out
    }

    fn reset(&mut self) {
        self.model
            .reset_state(self.backend.pool(), &self.state)
            .unwrap();
        self.pos = 0;
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let maxref = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / maxref
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b }) as u32
}

fn check(name: &str, golden_tol: f32) {
    // MOEFLUX_PARITY_SELFTEST=1: a second CPU backend stands in for the device (checks this
    // harness on machines without a GPU).
    let gpu: Box<dyn Backend> =
        if std::env::var("MOEFLUX_PARITY_SELFTEST").is_ok_and(|v| v == "1") {
            Box::new(CpuBackend::new())
        } else {
            if let Some(why) = moeflux_cuda::unavailable_reason() {
                eprintln!("skipping: no CUDA device ({why})");
                return;
            }
            Box::new(CudaBackend::new(0).unwrap_or_else(|e| {
                panic!("a device is present but the backend failed to open: {e}")
            }))
        };
    let tokens = ref_ids(name, "tokens");
    let greedy_ref = ref_ids(name, "greedy");
    let (shape, golden) = read_npy_f32(&fixture(name).join("logits.npy"));
    let vocab = shape[1];

    let mut cpu = Runner::open(Box::new(CpuBackend::new()), name);
    let mut dev = Runner::open(gpu, name);
    let want = cpu.prefill(&tokens);
    let got = dev.prefill(&tokens);
    let vs_cpu = rel_err(&got, &want);
    let vs_ref = rel_err(&got, &golden);
    eprintln!(
        "{name}: prefill rel err vs cpu {vs_cpu:.2e}, vs reference {vs_ref:.2e} (cpu vs reference {:.2e})",
        rel_err(&want, &golden)
    );
    for (p, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        assert!(
            rel_err(g, w) <= 1e-4,
            "{name}: position {p}: rel err vs cpu {}",
            rel_err(g, w)
        );
    }
    assert!(
        vs_ref <= golden_tol,
        "{name}: rel err vs reference {vs_ref} > {golden_tol}"
    );

    // Decode one token at a time from a reset state: same logits as the prefill.
    dev.reset();
    let mut dec = Vec::new();
    for &t in &tokens {
        dec.extend(dev.step(&[t], LogitsRows::Last));
    }
    let e = rel_err(&dec, &got);
    eprintln!("{name}: decode vs prefill rel err {e:.2e}");
    assert!(e <= 1e-4, "{name}: decode vs prefill rel err {e}");

    // Greedy continuation identical to the reference's (its margins are >= 0.03).
    let mut logits = dec[dec.len() - vocab..].to_vec();
    let mut out = Vec::new();
    for _ in 0..greedy_ref.len() {
        let t = argmax(&logits);
        out.push(t);
        logits = dev.step(&[t], LogitsRows::Last);
    }
    assert_eq!(out, greedy_ref, "{name}: greedy continuation");
}

#[test]
fn qwen3_next_f32() {
    check("qwen3_next_f32", 1e-4);
}

#[test]
fn qwen3_5_moe_vl() {
    check("qwen3_5_moe_vl", 1e-4);
}

#[test]
fn qwen3_moe_f32() {
    check("qwen3_moe_f32", 1e-4);
}

#[test]
fn qwen3_next_mlx4() {
    check("qwen3_next_mlx4", 2e-3);
}

/// A packed (`moeflux convert`) copy of the 4-bit fixture streams its experts through the
/// tiers: on CUDA, under VRAM budgets of every record, one layer's active set and none (wave
/// path), RAM budgets unbounded and minimal, and CPU-computed misses off and on, prefill,
/// decode and greedy logits match the resident model on the same device (1e-5) and the CPU
/// (1e-4).
#[test]
fn qwen3_next_mlx4_packed_tiers() {
    use moeflux_cuda::{CpuMisses, CudaOptions};
    let name = "qwen3_next_mlx4";
    let selftest = std::env::var("MOEFLUX_PARITY_SELFTEST").is_ok_and(|v| v == "1");
    if !selftest && let Some(why) = moeflux_cuda::unavailable_reason() {
        eprintln!("skipping: no CUDA device ({why})");
        return;
    }
    let open_dev = |gpu_mem: Option<usize>, cpu: CpuMisses| -> Box<dyn Backend> {
        if selftest {
            return Box::new(CpuBackend::new());
        }
        let mut o = CudaOptions::new(0);
        o.gpu_mem = gpu_mem;
        o.cpu_misses = cpu;
        Box::new(CudaBackend::with_options(o).expect("device"))
    };
    let tmp = tempfile::tempdir().unwrap();
    let packed = tmp.path().join("packed");
    moeflux_model::packed::convert(&fixture(name).join("model"), &packed, 4, &mut |_, _, _| {})
        .unwrap();
    let m = moeflux_model::packed::read_manifest(&packed).unwrap();
    let (record, layers, experts) = (m.record_bytes, m.layers.len(), m.experts);
    let slot = record.div_ceil(256) * 256;
    let tokens = ref_ids(name, "tokens");
    let run = |r: &mut Runner| -> Vec<f32> {
        let mut out = r.prefill(&tokens);
        r.reset();
        for &t in &tokens {
            out.extend(r.step(&[t], LogitsRows::Last));
        }
        for _ in 0..4 {
            let t = argmax(&out[out.len() - r.model.spec.vocab..]);
            out.extend(r.step(&[t], LogitsRows::Last));
        }
        out
    };
    let want_cpu = run(&mut Runner::open(Box::new(CpuBackend::new()), name));
    let want_dev = run(&mut Runner::open(open_dev(Some(0), CpuMisses::Off), name));
    let top_k = 2; // the fixture routes to 2 experts per token
    for gpu_records in [Some(layers * experts), Some(top_k), Some(0), None] {
        for host in [None, Some(top_k * record)] {
            for cpu in [CpuMisses::Off, CpuMisses::On] {
                let gpu_mem = gpu_records.map(|r| r * slot);
                let mut backend = open_dev(gpu_mem, cpu);
                let model = Model::open_with(
                    &packed,
                    backend.pool(),
                    &moeflux_model::LoadOptions { host_mem: host },
                )
                .unwrap();
                let state = model.alloc_state(backend.pool(), 128).unwrap();
                let mut r = Runner {
                    backend,
                    model,
                    state,
                    graphs: Vec::new(),
                    pos: 0,
                };
                let got = run(&mut r);
                let (e_dev, e_cpu) = (rel_err(&got, &want_dev), rel_err(&got, &want_cpu));
                eprintln!(
                    "packed gpu {gpu_records:?} records, host {host:?}, cpu misses {cpu:?}: rel err vs resident device {e_dev:.2e}, vs cpu {e_cpu:.2e}"
                );
                assert!(e_dev <= 1e-5, "vs resident on the device: {e_dev}");
                assert!(e_cpu <= 1e-4, "vs cpu: {e_cpu}");
            }
        }
    }
}
