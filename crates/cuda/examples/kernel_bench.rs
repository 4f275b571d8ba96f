//! Kernel throughput at decode/prefill shapes of real MoE models, as ratios to the memory
//! bandwidth floor (bytes / 3.0 TB/s on an H100) or to a FLOP figure for the prefill GEMM.
//!
//!   cargo run --release -p moeflux-cuda --example kernel_bench
//!
//! Each case is a graph of `REPS` copies of one op on the same buffers, timed over several
//! executions after a warm-up (which also compiles the kernels), so launch gaps are included
//! the way a real step sees them.

use std::sync::Arc;
use std::time::Instant;

use moeflux_core::{
    Act, Backend, BufId, Cache, DType, ExpertWeights, Graph, Idx, Lifetime, Matrix, Op, PoolExt,
    Pos, Region, State, Vector, Weight, WeightBytes, WeightFormat,
};
use moeflux_cuda::CudaBackend;

const REPS: usize = 20;
const RUNS: usize = 5;
const FLOOR_BPS: f64 = 3.0e12;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    /// Small finite floats in the given dtype.
    fn floats(&mut self, n: usize, dt: DType) -> Vec<u8> {
        let f = |r: &mut Rng| ((r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05;
        match dt {
            DType::F32 => (0..n).flat_map(|_| f(self).to_le_bytes()).collect(),
            DType::BF16 => (0..n)
                .flat_map(|_| ((f(self).to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    }
}

fn weights(b: &mut dyn Backend, bytes: Vec<u8>) -> BufId<Weight> {
    let len = bytes.len();
    BufId::from_raw(
        b.pool()
            .register_weights(WeightBytes::new(Arc::new(bytes), 0..len), "bench")
            .unwrap(),
    )
}

/// A `[rows, cols]` matrix in its own weight buffer; returns it and its byte size.
fn matrix(
    b: &mut dyn Backend,
    rng: &mut Rng,
    fmt: WeightFormat,
    rows: usize,
    cols: usize,
) -> Matrix {
    let db = fmt.data_bytes(rows, cols);
    let sb = fmt.scale_bytes(rows, cols);
    let mut buf = match fmt {
        WeightFormat::Dense(dt) => rng.floats(rows * cols, dt),
        WeightFormat::Affine { .. } => rng.bytes(db),
    };
    let (mut scales, mut biases) = (None, None);
    if let WeightFormat::Affine {
        scale_dtype,
        group_size,
        ..
    } = fmt
    {
        let ng = rows * cols / group_size as usize;
        let s = buf.len();
        buf.extend(rng.floats(ng, scale_dtype));
        let bi = buf.len();
        buf.extend(rng.floats(ng, scale_dtype));
        assert_eq!(buf.len(), db + 2 * sb);
        scales = Some(s);
        biases = Some(bi);
    }
    let id = weights(b, buf);
    let r = |o: usize| Region { buf: id, offset: o };
    Matrix {
        data: r(0),
        scales: scales.map(r),
        biases: biases.map(r),
        rows,
        cols,
        format: fmt,
    }
}

fn act(b: &mut dyn Backend, floats: usize) -> BufId<Act> {
    let id: BufId<Act> = b
        .pool()
        .alloc(floats * 4, "act", Lifetime::External)
        .unwrap();
    let v: Vec<f32> = (0..floats)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    b.pool().upload_f32(id, &v).unwrap();
    id
}

/// Seconds per op: REPS copies of `op`, best of RUNS executions.
fn time(b: &mut dyn Backend, op: Op) -> f64 {
    let mut g = Graph::new("bench");
    for _ in 0..REPS {
        g.push(None, "bench", op.clone());
    }
    b.prepare(&g).unwrap();
    b.execute(&g).unwrap();
    let mut best = f64::MAX;
    for _ in 0..RUNS {
        let t = Instant::now();
        b.execute(&g).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best / REPS as f64
}

/// Seconds per Op::Attention of queries at `positions` over caches of `max_ctx` rows, for
/// (heads, kv heads, head dim).
fn time_attention(
    b: &mut dyn Backend,
    (heads, kv_heads, head_dim): (usize, usize, usize),
    positions: &[u32],
    max_ctx: usize,
) -> f64 {
    let n = positions.len();
    let q = act(b, n * heads * head_dim);
    let out = act(b, n * heads * head_dim);
    let pos: BufId<Pos> = b.pool().alloc(4 * n, "pos", Lifetime::External).unwrap();
    b.pool().upload_u32(pos, positions).unwrap();
    let cache = max_ctx * kv_heads * head_dim * 4;
    let k_cache: BufId<Cache> = b.pool().alloc(cache, "k", Lifetime::Persistent).unwrap();
    let v_cache: BufId<Cache> = b.pool().alloc(cache, "v", Lifetime::Persistent).unwrap();
    time(
        b,
        Op::Attention {
            q,
            pos,
            k_cache,
            v_cache,
            out,
            n,
            heads,
            kv_heads,
            head_dim,
            scale: 0.088,
            max_ctx,
        },
    )
}

fn report_bytes(name: &str, secs: f64, bytes: usize) {
    let floor = bytes as f64 / FLOOR_BPS;
    println!(
        "| {name} | {:.1} | {:.2} | {:.0} | {:.2}x |",
        secs * 1e6,
        bytes as f64 / 1e6,
        bytes as f64 / secs / 1e9,
        secs / floor
    );
}

fn main() {
    let mut gpu = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("no CUDA device: {e}");
            return;
        }
    };
    println!("device: {}", gpu.device_description());
    let b: &mut dyn Backend = &mut gpu;
    let bw = b.measure_bandwidth().expect("bandwidth probe");
    println!(
        "measured read bandwidth: {:.2} TB/s (floor below uses 3.0 TB/s)",
        bw / 1e12
    );
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let q4 = WeightFormat::Affine {
        bits: 4,
        group_size: 64,
        scale_dtype: DType::BF16,
    };
    let q8 = WeightFormat::Affine {
        bits: 8,
        group_size: 64,
        scale_dtype: DType::BF16,
    };

    println!("\n| case | us/op | MB moved | GB/s | time / floor (3 TB/s) |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, fmt, rows, cols) in [
        ("matvec q4 g64 16384x4096", q4, 16384, 4096),
        ("matvec q8 g64 8192x4096", q8, 8192, 4096),
        (
            "matvec bf16 8192x4096",
            WeightFormat::Dense(DType::BF16),
            8192,
            4096,
        ),
        (
            "matvec f32 4096x4096",
            WeightFormat::Dense(DType::F32),
            4096,
            4096,
        ),
        ("matvec q4 g64 151936x2048 (lm_head)", q4, 151936, 2048),
        (
            "matvec q4 g64 2048x4096 (out-proj, L2-resident)",
            q4,
            2048,
            4096,
        ),
    ] {
        let w = matrix(b, &mut rng, fmt, rows, cols);
        let x = act(b, cols);
        let out = act(b, rows);
        let s = time(b, Op::Matmul { x, w, out, n: 1 });
        report_bytes(name, s, w.bytes() + cols * 4 + rows * 4);
    }

    // MoE: 128 experts of [768, 2048] in q4, top-8 (Qwen3-30B-A3B-like), decode and a
    // 64-token batch; 512 experts of [512, 2048], top-10 + the shared expert as slot 11
    // (Qwen3-Next-like), decode.
    for (e, k, hidden, inter, ns) in [
        (128usize, 8usize, 2048usize, 768usize, &[1usize, 64][..]),
        (513, 11, 2048, 512, &[1][..]),
    ] {
        let ws: Vec<ExpertWeights> = (0..e)
            .map(|_| ExpertWeights {
                gate: matrix(b, &mut rng, q4, inter, hidden),
                up: matrix(b, &mut rng, q4, inter, hidden),
                down: matrix(b, &mut rng, q4, hidden, inter),
            })
            .collect();
        let per_expert = ws[0].gate.bytes() + ws[0].up.bytes() + ws[0].down.bytes();
        let experts: Arc<[ExpertWeights]> = ws.into();
        for &n in ns {
            let x = act(b, n * hidden);
            let idx: BufId<Idx> = b
                .pool()
                .alloc(n * k * 4, "idx", Lifetime::External)
                .unwrap();
            let ids: Vec<u32> = (0..n * k)
                .map(|i| ((i / k) * 37 + (i % k) * 16) as u32 % e as u32)
                .collect();
            b.pool().upload_u32(idx, &ids).unwrap();
            let wts = act(b, n * k);
            let out = act(b, n * hidden);
            let s = time(
                b,
                Op::MoeExperts {
                    x,
                    idx,
                    weights: wts,
                    experts: experts.clone(),
                    out,
                    n,
                    k,
                    hidden,
                    inter,
                },
            );
            let distinct = {
                let mut d = ids.clone();
                d.sort();
                d.dedup();
                d.len()
            };
            report_bytes(
                &format!("moe q4 E{e} top{k} {hidden}/{inter} n={n} ({distinct} experts hit)"),
                s,
                distinct * per_expert,
            );
        }
    }

    // Attention decode at the last position: qwen3-30b-a3b's heads (32, kv 4, dim 128) at 4096
    // and qwen3-next-80b-a3b's (16, kv 2, dim 256) at 4096 and 32768.
    for (heads, kvh, hd, ctx) in [(32, 4, 128, 4096), (16, 2, 256, 4096), (16, 2, 256, 32768)] {
        let s = time_attention(b, (heads, kvh, hd), &[ctx as u32 - 1], ctx);
        report_bytes(
            &format!("attention decode h{heads} kv{kvh} hd{hd} ctx {ctx}"),
            s,
            2 * ctx * kvh * hd * 4,
        );
    }

    // Causal attention prefill of 4096 queries over the cache (the tensor-core kernel):
    // qwen3-30b-a3b's and qwen3-next-80b-a3b's head shapes. Reported as useful TFLOP/s (the
    // causal half of Q K^T and P V; the kernel spends three tf32 mma per product).
    for (heads, kvh, hd) in [(32, 4, 128), (16, 2, 256)] {
        let n = 4096;
        let positions: Vec<u32> = (0..n as u32).collect();
        let s = time_attention(b, (heads, kvh, hd), &positions, n);
        let flops = (n * (n + 1) / 2 * heads * hd * 4) as f64;
        println!(
            "| attention prefill h{heads} kv{kvh} hd{hd} n {n} | {:.1} | | {:.1} TFLOP/s | |",
            s * 1e6,
            flops / s / 1e12
        );
    }

    // Gated delta decode: 32 value heads, 16 key heads, 128 x 128 state per head.
    {
        let (kh, vh, dk, dv) = (16, 32, 128, 128);
        let qkv = act(b, 2 * kh * dk + vh * dv);
        let a = act(b, vh);
        let bb = act(b, vh);
        let vb = weights(b, rng.floats(2 * vh, DType::F32));
        let a_log = Vector {
            data: Region { buf: vb, offset: 0 },
            len: vh,
            dtype: DType::F32,
        };
        let dt_bias = Vector {
            data: Region {
                buf: vb,
                offset: vh * 4,
            },
            len: vh,
            dtype: DType::F32,
        };
        let state: BufId<State> = b
            .pool()
            .alloc(vh * dk * dv * 4, "state", Lifetime::Persistent)
            .unwrap();
        let out = act(b, vh * dv);
        let s = time(
            b,
            Op::GatedDelta {
                qkv,
                a,
                b: bb,
                a_log,
                dt_bias,
                state,
                out,
                n: 1,
                k_heads: kh,
                v_heads: vh,
                dk,
                dv,
            },
        );
        report_bytes(
            "gated delta decode vh32 kh16 128x128",
            s,
            2 * vh * dk * dv * 4,
        );
    }

    // Prefill GEMM: 256 tokens through a q4 [4096, 4096] matrix.
    {
        let (rows, cols, n) = (4096, 4096, 256);
        let w = matrix(b, &mut rng, q4, rows, cols);
        let x = act(b, n * cols);
        let out = act(b, n * rows);
        let s = time(b, Op::Matmul { x, w, out, n });
        let flops = 2.0 * (n * rows * cols) as f64;
        println!(
            "\nprefill gemm q4 4096x4096, n=256: {:.1} us, {:.1} TFLOP/s (tensor cores on sm_80+: x split once into two f16 parts, two mma per product; dense f16 peak ~790)",
            s * 1e6,
            flops / s / 1e12
        );
    }
    let (compiled, cached) = gpu.kernel_stats();
    println!("\nkernel modules: {compiled} compiled by NVRTC, {cached} loaded from the disk cache");
}
