//! CUDA vs CPU parity, one test body per op.
//!
//! Every case is a small graph built through the `Backend` trait by one closure, run on the CPU
//! reference and on the CUDA backend from the same seed (so both see identical inputs and
//! weights). Outputs are poisoned (all bits set: NaN / u32::MAX) before the run, so an element
//! a kernel forgets to write shows up. Floats are compared as max|cuda - cpu| / max|cpu|;
//! integer outputs (routing indices) must match exactly.
//!
//! Without a usable device every test prints "skipping: no CUDA device (...)" and passes, so
//! CI without a GPU stays green; `scripts/gpu_check.sh --remote` runs them for real.

use std::sync::Arc;

use half::{bf16, f16};
use moeflux_core::{
    Act, Backend, BufId, Cache, ColPart, CoreError, DType, ExpertProvider, ExpertWeights, Graph,
    Idx, Lifetime, Matrix, Op, PoolExt, Pos, RawBufId, Region, Role, State, Tokens, Vector, Weight,
    WeightBytes, WeightFormat,
};
use moeflux_cpu::CpuBackend;
use moeflux_cuda::CudaBackend;

// ------------------------------------------------------------------------------------ harness

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.unit() * scale).collect()
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    F32,
    U32,
}

struct Out {
    label: String,
    id: RawBufId,
    len: usize,
    kind: Kind,
}

/// Builds one case's graph and buffers against any backend.
struct Setup<'a> {
    b: &'a mut dyn Backend,
    g: Graph,
    uploads: Vec<(RawBufId, Vec<u8>)>,
    outs: Vec<Out>,
    rng: Rng,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Setup<'_> {
    fn alloc<R: Role>(&mut self, bytes: usize, label: &str, lt: Lifetime) -> BufId<R> {
        self.b.pool().alloc(bytes, label, lt).unwrap()
    }
    /// An f32 buffer with uploaded contents (External unless a lifetime is given).
    fn input_as<R: Role>(&mut self, data: &[f32], label: &str, lt: Lifetime) -> BufId<R> {
        let id: BufId<R> = self.alloc(data.len() * 4, label, lt);
        self.uploads.push((id.raw(), f32_bytes(data)));
        id
    }
    fn input(&mut self, data: &[f32], label: &str) -> BufId<Act> {
        self.input_as(data, label, Lifetime::External)
    }
    fn input_u32<R: Role>(&mut self, data: &[u32], label: &str) -> BufId<R> {
        let id: BufId<R> = self.alloc(data.len() * 4, label, Lifetime::External);
        self.uploads.push((id.raw(), u32_bytes(data)));
        id
    }
    /// Downloads `id` after the run and compares it.
    fn watch<R: Role>(&mut self, id: BufId<R>, len: usize, label: &str, kind: Kind) {
        self.outs.push(Out {
            label: label.into(),
            id: id.raw(),
            len,
            kind,
        });
    }
    /// A poisoned output buffer of `len` elements.
    fn output_as<R: Role>(&mut self, len: usize, label: &str, kind: Kind) -> BufId<R> {
        let id: BufId<R> = self.alloc(len * 4, label, Lifetime::External);
        self.uploads.push((id.raw(), vec![0xff; len * 4]));
        self.watch(id, len, label, kind);
        id
    }
    fn output(&mut self, len: usize, label: &str) -> BufId<Act> {
        self.output_as(len, label, Kind::F32)
    }
    fn transient(&mut self, len: usize, label: &str) -> BufId<Act> {
        self.alloc(len * 4, label, Lifetime::Transient)
    }
    fn weights(&mut self, bytes: Vec<u8>, label: &str) -> BufId<Weight> {
        let len = bytes.len();
        let wb = WeightBytes::new(Arc::new(bytes), 0..len);
        BufId::from_raw(self.b.pool().register_weights(wb, label).unwrap())
    }
    fn op(&mut self, op: Op) {
        self.g.push(None, "case", op);
    }
    fn rand(&mut self, len: usize, scale: f32) -> Vec<f32> {
        self.rng.vec(len, scale)
    }
}

type Build<'f> = &'f dyn Fn(&mut Setup);

fn run(b: &mut dyn Backend, seed: u64, build: Build) -> Vec<(String, Kind, Vec<u32>)> {
    let mut s = Setup {
        b,
        g: Graph::new("parity"),
        uploads: Vec::new(),
        outs: Vec::new(),
        rng: Rng::new(seed),
    };
    build(&mut s);
    let Setup {
        b,
        g,
        uploads,
        outs,
        ..
    } = s;
    b.prepare(&g)
        .unwrap_or_else(|e| panic!("{} prepare: {e}", b.name()));
    for (id, bytes) in &uploads {
        b.pool().upload_raw(*id, 0, bytes).unwrap();
    }
    b.execute(&g)
        .unwrap_or_else(|e| panic!("{} execute: {e}", b.name()));
    let mut res = Vec::new();
    for o in &outs {
        let mut v = vec![0u32; o.len];
        b.pool()
            .download_u32(BufId::<Act>::from_raw(o.id), &mut v)
            .unwrap();
        res.push((o.label.clone(), o.kind, v));
    }
    res
}

/// One test at a time on the device: `cargo test` runs tests on parallel threads, and a test
/// whose VRAM cache takes "free memory minus a reserve" would leave the others too little to
/// open a backend (seen once as 2 of 30 failures on the H100).
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
    GPU.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device lock to hold while using it and the CUDA backend, or `None` after printing why
/// the test is skipped. `MOEFLUX_PARITY_SELFTEST=1` substitutes a second CPU backend, to check
/// the harness and the cases themselves on a machine without a GPU.
fn device() -> Option<(std::sync::MutexGuard<'static, ()>, Box<dyn Backend>)> {
    if std::env::var("MOEFLUX_PARITY_SELFTEST").is_ok_and(|v| v == "1") {
        return Some((gpu_lock(), Box::new(CpuBackend::new())));
    }
    if let Some(why) = moeflux_cuda::unavailable_reason() {
        eprintln!("skipping: no CUDA device ({why})");
        return None;
    }
    let lock = gpu_lock();
    match CudaBackend::new(0) {
        Ok(b) => Some((lock, Box::new(b))),
        Err(e) => panic!("a device is present but the backend failed to open: {e}"),
    }
}

/// Runs `build` on both backends and compares every watched buffer.
fn check(name: &str, seed: u64, tol: f32, build: Build) {
    // the lock is bound first, so it is released after the backend is dropped
    let Some((_device, mut gpu)) = device() else {
        return;
    };
    let mut cpu = CpuBackend::new();
    let want = run(&mut cpu, seed, build);
    let got = run(gpu.as_mut(), seed, build);
    let mut failures = Vec::new();
    for ((label, kind, w), (_, _, g)) in want.iter().zip(&got) {
        match kind {
            Kind::U32 => {
                if let Some(i) = (0..w.len()).find(|&i| w[i] != g[i]) {
                    failures.push(format!(
                        "{name}/{label}: element {i}: cuda {} cpu {}",
                        g[i], w[i]
                    ));
                } else {
                    eprintln!("{name}/{label}: exact");
                }
            }
            Kind::F32 => {
                let (w, g): (Vec<f32>, Vec<f32>) = (
                    w.iter().map(|v| f32::from_bits(*v)).collect(),
                    g.iter().map(|v| f32::from_bits(*v)).collect(),
                );
                if let Some(i) = (0..w.len()).find(|&i| g[i].is_nan() != w[i].is_nan()) {
                    failures.push(format!(
                        "{name}/{label}: element {i} of {}: cuda {} cpu {} (unwritten or NaN)",
                        w.len(),
                        g[i],
                        w[i]
                    ));
                    continue;
                }
                let maxref = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (mut maxdiff, mut at) = (0f32, 0);
                for i in 0..w.len() {
                    let d = (w[i] - g[i]).abs();
                    if d > maxdiff {
                        maxdiff = d;
                        at = i;
                    }
                }
                let rel = if maxref > 0.0 {
                    maxdiff / maxref
                } else {
                    maxdiff
                };
                eprintln!(
                    "{name}/{label}: rel err {rel:.2e} (max |ref| {maxref:.3e}, {} elements)",
                    w.len()
                );
                if rel > tol || rel.is_nan() {
                    failures.push(format!("{name}/{label}: rel err {rel:.3e} > {tol:.1e} (element {at}: cuda {} cpu {})", g[at], w[at]));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ------------------------------------------------------------------------------------ weights

#[derive(Clone, Copy, Debug)]
enum WFmt {
    F32,
    F16,
    BF16,
    /// (bits, group, scale dtype)
    Q(u8, u32, DType),
}

const DENSE_AND_QUANT: [WFmt; 7] = [
    WFmt::F32,
    WFmt::F16,
    WFmt::BF16,
    WFmt::Q(4, 64, DType::BF16),
    WFmt::Q(4, 32, DType::F32),
    WFmt::Q(8, 64, DType::BF16),
    WFmt::Q(8, 128, DType::F16),
];

fn store_floats(v: &[f32], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => f32_bytes(v),
        DType::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_bits().to_le_bytes())
            .collect(),
        _ => unreachable!(),
    }
}

/// Appends `bytes` to `buf` at an offset aligned to 16, plus `skew` bytes; returns the offset.
fn place(buf: &mut Vec<u8>, bytes: &[u8], skew: usize) -> usize {
    let off = buf.len().div_ceil(16) * 16 + skew;
    buf.resize(off, 0xAB);
    buf.extend_from_slice(bytes);
    off
}

/// Appends a random `[rows, cols]` matrix of format `f` to `buf`. `skew` misaligns the data
/// (forcing the kernels' scalar path). Returns the matrix with regions in `buf` (buffer id
/// filled in later by `set_buf`).
fn gen_matrix(
    rng: &mut Rng,
    buf: &mut Vec<u8>,
    f: WFmt,
    rows: usize,
    cols: usize,
    skew: usize,
) -> Matrix {
    let scale = 1.0 / (cols as f32).sqrt();
    let dummy = Region {
        buf: BufId::from_raw(RawBufId(u32::MAX)),
        offset: 0,
    };
    let (format, data, scales, biases) = match f {
        WFmt::F32 | WFmt::F16 | WFmt::BF16 => {
            let dt = match f {
                WFmt::F32 => DType::F32,
                WFmt::F16 => DType::F16,
                _ => DType::BF16,
            };
            let bytes = store_floats(&rng.vec(rows * cols, scale), dt);
            let skew = skew.min(if dt == DType::F32 { 4 } else { 2 }); // keep element alignment
            (
                WeightFormat::Dense(dt),
                place(buf, &bytes, skew),
                None,
                None,
            )
        }
        WFmt::Q(bits, group, sdt) => {
            let bytes = rng.bytes(rows * cols * bits as usize / 8);
            let d = place(buf, &bytes, if skew > 0 { 4 } else { 0 });
            let ng = rows * (cols / group as usize);
            let qmax = ((1u32 << bits) - 1) as f32;
            let sc: Vec<f32> = (0..ng)
                .map(|_| (0.5 + 0.5 * rng.unit().abs()) * 2.0 * scale / qmax)
                .collect();
            let bi: Vec<f32> = (0..ng).map(|_| -scale + 0.2 * scale * rng.unit()).collect();
            // skewed scales sit off their element alignment (read byte-wise by the kernels)
            let s = place(
                buf,
                &store_floats(&sc, sdt),
                if skew > 0 {
                    if sdt == DType::F32 { 2 } else { 1 }
                } else {
                    0
                },
            );
            let b = place(buf, &store_floats(&bi, sdt), 0);
            (
                WeightFormat::Affine {
                    bits,
                    group_size: group,
                    scale_dtype: sdt,
                },
                d,
                Some(s),
                Some(b),
            )
        }
    };
    let r = |o: usize| Region { offset: o, ..dummy };
    Matrix {
        data: r(data),
        scales: scales.map(r),
        biases: biases.map(r),
        rows,
        cols,
        format,
    }
}

fn set_buf(m: &mut Matrix, id: BufId<Weight>) {
    m.data.buf = id;
    if let Some(s) = &mut m.scales {
        s.buf = id;
    }
    if let Some(b) = &mut m.biases {
        b.buf = id;
    }
}

/// A stored vector of `data` in dtype `dt`.
fn gen_vector(s: &mut Setup, data: &[f32], dt: DType, label: &str) -> Vector {
    let mut buf = Vec::new();
    let off = place(
        &mut buf,
        &store_floats(data, dt),
        if dt == DType::F32 { 4 } else { 2 },
    );
    let id = s.weights(buf, label);
    Vector {
        data: Region {
            buf: id,
            offset: off,
        },
        len: data.len(),
        dtype: dt,
    }
}

fn matrix(s: &mut Setup, f: WFmt, rows: usize, cols: usize, skew: usize) -> Matrix {
    let mut buf = Vec::new();
    let mut m = gen_matrix(&mut s.rng, &mut buf, f, rows, cols, skew);
    let id = s.weights(buf, "matrix");
    set_buf(&mut m, id);
    m
}

// ------------------------------------------------------------------------------------ ops

#[test]
fn embed() {
    for (i, f) in DENSE_AND_QUANT.into_iter().enumerate() {
        for skew in [0, 4] {
            check(
                &format!("embed {f:?} skew {skew}"),
                100 + i as u64,
                1e-6,
                &|s| {
                    let (vocab, d, n) = (50, 1152, 7);
                    let table = matrix(s, f, vocab, d, skew);
                    let toks: Vec<u32> = (0..n).map(|_| s.rng.below(vocab) as u32).collect();
                    let tokens: BufId<Tokens> = s.input_u32(&toks, "tokens");
                    let out = s.output(n * d, "out");
                    s.op(Op::Embed {
                        table,
                        tokens,
                        out,
                        n,
                    });
                },
            );
        }
    }
}

/// An add whose sum the next op normalises (the residual stream of a block) runs as one
/// kernel on CUDA when the rows take the vector path: both the sum and the norm must match,
/// in place (sum into an input) and when the shape falls back to two kernels (dim 1002).
#[test]
fn add_then_rms_norm() {
    for (rows, dim, in_place) in [
        (1, 2048, false),
        (3, 4096, true),
        (2, 1002, false),
        (1, 12288, true),
    ] {
        check(
            &format!("add + rms_norm {rows}x{dim} in place {in_place}"),
            9,
            1e-5,
            &|s| {
                let len = rows * dim;
                let (a, b) = (s.rand(len, 1.0), s.rand(len, 1.0));
                let (a, b) = (s.input(&a, "a"), s.input(&b, "b"));
                let sum = if in_place {
                    s.watch(a, len, "sum (in a)", Kind::F32);
                    a
                } else {
                    s.output(len, "sum")
                };
                let w = s.rand(dim, 1.0);
                let weight = gen_vector(s, &w, DType::BF16, "w");
                let out = s.output(len, "out");
                s.op(Op::Add {
                    a,
                    b,
                    out: sum,
                    len,
                });
                s.op(Op::RmsNorm {
                    x: sum,
                    weight,
                    out,
                    rows,
                    dim,
                    eps: 1e-6,
                    offset: 1.0,
                });
            },
        );
    }
}

#[test]
fn rms_norm() {
    // 1002: the scalar kernel (dim % 4 != 0); 12288: several float4 per thread.
    for (rows, dim) in [(5, 1000), (12, 64), (1, 4096), (3, 1002), (2, 12288)] {
        for (dt, offset) in [(DType::F32, 0.0), (DType::BF16, 1.0)] {
            check(&format!("rms_norm {rows}x{dim} {dt}"), 7, 1e-5, &|s| {
                let x = s.rand(rows * dim, 2.0);
                let x = s.input(&x, "x");
                let w = s.rand(dim, 1.0);
                let weight = gen_vector(s, &w, dt, "w");
                let out = s.output(rows * dim, "out");
                s.op(Op::RmsNorm {
                    x,
                    weight,
                    out,
                    rows,
                    dim,
                    eps: 1e-6,
                    offset,
                });
            });
        }
    }
    check("rms_norm in place", 8, 1e-5, &|s| {
        let (rows, dim) = (3, 200);
        let x = s.rand(rows * dim, 2.0);
        let x = s.input(&x, "x");
        let w = s.rand(dim, 1.0);
        let weight = gen_vector(s, &w, DType::F32, "w");
        s.watch(x, rows * dim, "x (in place)", Kind::F32);
        s.op(Op::RmsNorm {
            x,
            weight,
            out: x,
            rows,
            dim,
            eps: 1e-5,
            offset: 0.0,
        });
    });
}

#[test]
fn gated_rms_norm() {
    for (rows, dim, dt) in [
        (6, 128, DType::F32),
        (3, 1000, DType::BF16),
        (2, 998, DType::F32),
        (2, 6000, DType::F32),
    ] {
        check(&format!("gated_rms_norm {rows}x{dim}"), 9, 1e-5, &|s| {
            let x = s.rand(rows * dim, 2.0);
            let x = s.input(&x, "x");
            let gt = s.rand(rows * dim, 3.0);
            let gate = s.input(&gt, "gate");
            let w = s.rand(dim, 1.0);
            let weight = gen_vector(s, &w, dt, "w");
            let out = s.output(rows * dim, "out");
            s.op(Op::GatedRmsNorm {
                x,
                gate,
                weight,
                out,
                rows,
                dim,
                eps: 1e-6,
                offset: 0.0,
            });
        });
    }
}

#[test]
fn matmul() {
    for (i, f) in DENSE_AND_QUANT.into_iter().enumerate() {
        for skew in [0, 4] {
            for n in [1, 2, 3, 70] {
                check(
                    &format!("matmul {f:?} skew {skew} n {n}"),
                    200 + i as u64,
                    2e-5,
                    &|s| {
                        let (rows, cols) = (72, 1152);
                        let w = matrix(s, f, rows, cols, skew);
                        let x = s.rand(n * cols, 1.0);
                        let x = s.input(&x, "x");
                        let out = s.output(n * rows, "out");
                        s.op(Op::Matmul { x, w, out, n });
                    },
                );
            }
        }
    }
}

/// Prefill GEMMs with affine weights split x into scaled f16 parts (gemm_tc.cu): activations
/// from tiny to large, and rows that mix magnitudes five orders apart, stay at f32 accuracy.
#[test]
fn matmul_activation_range() {
    for (i, f) in [WFmt::Q(4, 64, DType::BF16), WFmt::Q(8, 32, DType::F16)]
        .into_iter()
        .enumerate()
    {
        for scale in [1e-7f32, 1.0, 3e4] {
            check(
                &format!("matmul range {f:?} scale {scale:e}"),
                450 + i as u64,
                2e-5,
                &|s| {
                    let (n, rows, cols) = (70, 96, 1024);
                    let mut x = s.rand(n * cols, scale);
                    for (j, v) in x.iter_mut().enumerate() {
                        if j % 7 == 3 {
                            *v *= 1e-5;
                        }
                    }
                    let x = s.input(&x, "x");
                    let w = matrix(s, f, rows, cols, 0);
                    let out = s.output(n * rows, "out");
                    s.op(Op::Matmul { x, w, out, n });
                },
            );
        }
    }
}

/// Consecutive matvecs of one input (merged into one launch on CUDA when formats agree): 2 to 5
/// of them (5: a run longer than one launch takes), rows from 1 to 700, and a run broken by a
/// matrix of another format.
#[test]
fn matmul_same_input_runs() {
    let q4 = WFmt::Q(4, 32, DType::BF16);
    let q8 = WFmt::Q(8, 32, DType::F32);
    let q4g64 = WFmt::Q(4, 64, DType::BF16);
    let cases: [&[(WFmt, usize)]; 5] = [
        &[(q4, 700), (q4, 64)],
        &[(q8, 512), (q8, 1)],
        &[(q4, 96), (q4, 32), (q4, 33), (q4, 8), (q4, 300)],
        &[(WFmt::BF16, 40), (q4, 72), (q4, 72)],
        &[
            (q4g64, 96),
            (q4g64, 32),
            (q4g64, 33),
            (q4g64, 8),
            (q4g64, 300),
        ],
    ];
    for (ci, parts) in cases.into_iter().enumerate() {
        for n in [1, 2] {
            check(
                &format!("matmul run {ci} n {n}"),
                400 + ci as u64,
                2e-5,
                &|s| {
                    let cols = 512;
                    let x = s.rand(n * cols, 1.0);
                    let x = s.input(&x, "x");
                    for &(f, rows) in parts {
                        let w = matrix(s, f, rows, cols, 0);
                        let out = s.output(n * rows, "out");
                        s.op(Op::Matmul { x, w, out, n });
                    }
                },
            );
        }
    }
}

/// Decode matvecs large enough that every block of the streamed kernel (sm_80+: weights
/// copied through shared memory in a ring of stages) goes round its ring several times, for
/// each row-group width (rows of >= 512, 256-511 and < 256 bytes), ragged row counts, rows
/// that end inside a step, and scales copied 16 or 4 bytes at a time.
#[test]
fn matmul_streamed() {
    let q4 = WFmt::Q(4, 64, DType::BF16);
    for (f, rows, cols) in [
        (q4, 34_001, 2048),
        (q4, 9_000, 768),
        (q4, 270_007, 256),
        (WFmt::Q(8, 32, DType::F32), 3_000, 4096),
        (WFmt::BF16, 5_003, 1000),
        (WFmt::F32, 4_000, 516),
    ] {
        check(
            &format!("matmul {f:?} {rows}x{cols} n 1"),
            310,
            2e-5,
            &|s| {
                let w = matrix(s, f, rows, cols, 0);
                let x = s.rand(cols, 1.0);
                let x = s.input(&x, "x");
                let out = s.output(rows, "out");
                s.op(Op::Matmul { x, w, out, n: 1 });
            },
        );
    }
}

#[test]
fn matmul_odd_shapes() {
    // Tiny and ragged shapes: fewer columns than one warp step, rows not a multiple of 4.
    for (f, rows, cols) in [
        (WFmt::F32, 5, 12),
        (WFmt::BF16, 33, 40),
        (WFmt::Q(4, 32, DType::BF16), 7, 64),
        (WFmt::Q(8, 32, DType::F32), 3, 96),
        (WFmt::Q(4, 128, DType::F16), 9, 384),
    ] {
        for n in [1, 5] {
            check(
                &format!("matmul {f:?} {rows}x{cols} n {n}"),
                300,
                2e-5,
                &|s| {
                    let w = matrix(s, f, rows, cols, 0);
                    let x = s.rand(n * cols, 1.0);
                    let x = s.input(&x, "x");
                    let out = s.output(n * rows, "out");
                    s.op(Op::Matmul { x, w, out, n });
                },
            );
        }
    }
    // Tall matrices: the decode kernels switch to 2 and 4 rows per warp once that still gives
    // every SM two blocks (132 SMs: > 4224 rows for 2, > 8448 for 4).
    for (f, rows) in [
        (WFmt::Q(4, 64, DType::BF16), 8500),
        (WFmt::BF16, 4300),
        (WFmt::Q(8, 32, DType::F16), 8500),
        (WFmt::F32, 4300),
    ] {
        for n in [1, 2] {
            check(&format!("matmul {f:?} {rows}x256 n {n}"), 302, 2e-5, &|s| {
                let cols = 256;
                let w = matrix(s, f, rows, cols, 0);
                let x = s.rand(n * cols, 1.0);
                let x = s.input(&x, "x");
                let out = s.output(n * rows, "out");
                s.op(Op::Matmul { x, w, out, n });
            });
        }
    }
    // Wide input: the staged x needs more than 48 KiB of shared memory.
    check("matmul f32 wide", 301, 2e-5, &|s| {
        let (rows, cols, n) = (40, 16384, 1);
        let w = matrix(s, WFmt::F32, rows, cols, 0);
        let x = s.rand(n * cols, 1.0);
        let x = s.input(&x, "x");
        let out = s.output(n * rows, "out");
        s.op(Op::Matmul { x, w, out, n });
    });
}

#[test]
fn copy_rows() {
    check("copy_rows", 10, 0.0, &|s| {
        let (rows_in, width) = (6, 40);
        let x = s.rand(rows_in * width, 1.0);
        let x = s.input(&x, "x");
        let out = s.output(3 * width, "out");
        s.op(Op::CopyRows {
            x,
            out,
            start: 2,
            rows: 3,
            width,
        });
    });
}

#[test]
fn add() {
    check("add", 11, 0.0, &|s| {
        let len = 1000;
        let a = s.rand(len, 1.0);
        let a = s.input(&a, "a");
        let b = s.rand(len, 1.0);
        let b = s.input(&b, "b");
        let out = s.output(len, "out");
        s.op(Op::Add { a, b, out, len });
    });
    check("add in place", 12, 0.0, &|s| {
        let len = 777;
        let a = s.rand(len, 1.0);
        let a = s.input(&a, "a");
        let b = s.rand(len, 1.0);
        let b = s.input(&b, "b");
        s.watch(a, len, "a (in place)", Kind::F32);
        s.op(Op::Add { a, b, out: a, len });
    });
}

#[test]
fn swiglu() {
    check("swiglu", 13, 1e-6, &|s| {
        let len = 1000;
        let g = s.rand(len, 4.0);
        let gate = s.input(&g, "gate");
        let u = s.rand(len, 1.0);
        let up = s.input(&u, "up");
        let out = s.output(len, "out");
        s.op(Op::SwiGlu { gate, up, out, len });
    });
}

#[test]
fn sigmoid_gate() {
    for gate_width in [48, 1] {
        check(&format!("sigmoid_gate gw {gate_width}"), 14, 1e-6, &|s| {
            let (n, width) = (4, 48);
            let x = s.rand(n * width, 1.0);
            let x = s.input(&x, "x");
            let g = s.rand(n * gate_width, 4.0);
            let gate = s.input(&g, "gate");
            let out = s.output(n * width, "out");
            s.op(Op::SigmoidGate {
                x,
                gate,
                out,
                n,
                width,
                gate_width,
            });
        });
    }
    check("sigmoid_gate in place", 15, 1e-6, &|s| {
        let (n, width) = (3, 64);
        let x = s.rand(n * width, 1.0);
        let x = s.input(&x, "x");
        let g = s.rand(n, 4.0);
        let gate = s.input(&g, "gate");
        s.watch(x, n * width, "x (in place)", Kind::F32);
        s.op(Op::SigmoidGate {
            x,
            gate,
            out: x,
            n,
            width,
            gate_width: 1,
        });
    });
}

#[test]
fn scatter_cols() {
    check("scatter_cols", 16, 0.0, &|s| {
        let (n, groups) = (3, 4);
        let widths = [8usize, 8, 4];
        let row = widths.iter().sum::<usize>() * groups;
        let x = s.rand(n * row, 1.0);
        let x = s.input(&x, "x");
        let p0 = s.output(n * 32, "part0");
        let p1 = s.output(n * 40, "part1");
        let p2 = s.output(n * 16, "part2");
        let parts = vec![
            ColPart {
                out: p0,
                width: 8,
                out_width: 32,
                out_offset: 0,
            },
            ColPart {
                out: p1,
                width: 8,
                out_width: 40,
                out_offset: 8,
            },
            ColPart {
                out: p2,
                width: 4,
                out_width: 16,
                out_offset: 0,
            },
        ];
        s.op(Op::ScatterCols {
            x,
            n,
            groups,
            parts,
        });
    });
    // More parts than one launch takes (8), two parts into one output, an empty part.
    check("scatter_cols 10 parts", 16, 0.0, &|s| {
        let (n, groups) = (2, 3);
        let widths = [3usize, 5, 0, 2, 7, 1, 4, 6, 2, 3];
        let row = widths.iter().sum::<usize>() * groups;
        let x = s.rand(n * row, 1.0);
        let x = s.input(&x, "x");
        let shared = s.output(n * (3 + 5) * groups, "part0+1");
        let mut parts = Vec::new();
        for (i, &w) in widths.iter().enumerate() {
            let (out, out_width, out_offset) = match i {
                0 => (shared, 8 * groups, 0),
                1 => (shared, 8 * groups, 3 * groups),
                2 => (shared, 8 * groups, 0), // empty: writes nothing
                _ => (s.output(n * w * groups, "part"), w * groups, 0),
            };
            parts.push(ColPart {
                out,
                width: w,
                out_width,
                out_offset,
            });
        }
        s.op(Op::ScatterCols {
            x,
            n,
            groups,
            parts,
        });
    });
}

#[test]
fn rope() {
    for (head_dim, rotary_dim, theta) in [(32, 32, 1e4f32), (64, 16, 1e6), (128, 64, 5e6)] {
        check(
            &format!("rope hd {head_dim} rd {rotary_dim}"),
            17,
            2e-6,
            &|s| {
                let (n, heads) = (5, 3);
                let positions: Vec<u32> = vec![0, 1, 517, 30000, 65535];
                let pos: BufId<Pos> = s.input_u32(&positions, "pos");
                let x = s.rand(n * heads * head_dim, 1.0);
                let x = s.input(&x, "x");
                s.watch(x, n * heads * head_dim, "x (in place)", Kind::F32);
                s.op(Op::Rope {
                    x,
                    pos,
                    n,
                    heads,
                    head_dim,
                    rotary_dim,
                    theta,
                });
            },
        );
    }
}

#[test]
fn qk_norm_rope_append() {
    // The attention block's q/k norms, ropes and KV append, which the CUDA backend launches as
    // one kernel (qk_prep_f32, head_dim <= 256): 30b's heads, next-80b's (partial rope), no
    // norms, norms without rope, a position past the cache (skipped), and head dim 80.
    // (heads, kv_heads, head_dim, rotary_dim), (q norm, k norm), positions
    type Case = ((usize, usize, usize, usize), (bool, bool), Vec<u32>);
    let cases: [Case; 6] = [
        ((32, 4, 128, 128), (true, true), vec![4095]),
        ((16, 2, 256, 64), (true, true), vec![7, 8, 9]),
        ((8, 2, 128, 128), (false, false), vec![0, 30000]),
        ((4, 4, 64, 0), (true, true), vec![2]),
        ((8, 1, 128, 64), (true, false), vec![5, 4100]),
        ((4, 2, 80, 80), (true, true), vec![1, 2]),
    ];
    for ((heads, kv_heads, hd, rd), (q_norm, k_norm), positions) in cases {
        check(
            &format!(
                "qk norm {q_norm}/{k_norm} rope {rd} h {heads} kv {kv_heads} hd {hd} pos {positions:?}"
            ),
            23,
            2e-6,
            &|s| {
                let n = positions.len();
                let max_ctx = 4097;
                let kv_dim = kv_heads * hd;
                let q = s.rand(n * heads * hd, 2.0);
                let q = s.input(&q, "q");
                let k = s.rand(n * kv_dim, 2.0);
                let k = s.input(&k, "k");
                let v = s.rand(n * kv_dim, 1.0);
                let v = s.input(&v, "v");
                s.watch(q, n * heads * hd, "q (in place)", Kind::F32);
                s.watch(k, n * kv_dim, "k (in place)", Kind::F32);
                let pos: BufId<Pos> = s.input_u32(&positions, "pos");
                let kc0 = s.rand(max_ctx * kv_dim, 1.0);
                let k_cache: BufId<Cache> = s.input_as(&kc0, "k_cache", Lifetime::Persistent);
                let vc0 = s.rand(max_ctx * kv_dim, 1.0);
                let v_cache: BufId<Cache> = s.input_as(&vc0, "v_cache", Lifetime::Persistent);
                s.watch(k_cache, max_ctx * kv_dim, "k_cache", Kind::F32);
                s.watch(v_cache, max_ctx * kv_dim, "v_cache", Kind::F32);
                for (on, x, rows, label) in [
                    (q_norm, q, n * heads, "q_norm"),
                    (k_norm, k, n * kv_heads, "k_norm"),
                ] {
                    if on {
                        let w = s.rand(hd, 1.0);
                        let weight = gen_vector(s, &w, DType::BF16, label);
                        s.op(Op::RmsNorm {
                            x,
                            weight,
                            out: x,
                            rows,
                            dim: hd,
                            eps: 1e-6,
                            offset: 1.0,
                        });
                    }
                }
                if rd > 0 {
                    for (x, h) in [(q, heads), (k, kv_heads)] {
                        s.op(Op::Rope {
                            x,
                            pos,
                            n,
                            heads: h,
                            head_dim: hd,
                            rotary_dim: rd,
                            theta: 1e7,
                        });
                    }
                }
                s.op(Op::KvAppend {
                    k,
                    v,
                    pos,
                    k_cache,
                    v_cache,
                    n,
                    kv_dim,
                    max_ctx,
                });
            },
        );
    }
}

#[test]
fn kv_append() {
    check("kv_append", 18, 0.0, &|s| {
        let (n, kv_dim, max_ctx) = (4, 64, 32);
        let k = s.rand(n * kv_dim, 1.0);
        let k = s.input(&k, "k");
        let v = s.rand(n * kv_dim, 1.0);
        let v = s.input(&v, "v");
        let pos: BufId<Pos> = s.input_u32(&[3, 4, 5, 31], "pos");
        let kc0 = s.rand(max_ctx * kv_dim, 1.0);
        let k_cache: BufId<Cache> = s.input_as(&kc0, "k_cache", Lifetime::Persistent);
        let vc0 = s.rand(max_ctx * kv_dim, 1.0);
        let v_cache: BufId<Cache> = s.input_as(&vc0, "v_cache", Lifetime::Persistent);
        s.watch(k_cache, max_ctx * kv_dim, "k_cache", Kind::F32);
        s.watch(v_cache, max_ctx * kv_dim, "v_cache", Kind::F32);
        s.op(Op::KvAppend {
            k,
            v,
            pos,
            k_cache,
            v_cache,
            n,
            kv_dim,
            max_ctx,
        });
    });
}

#[test]
fn attention() {
    // (heads, kv_heads, head_dim, positions)
    // Up to 4 queries take the split (flash-decoding) kernels; more take the tensor-core
    // kernel (sm_80+, head_dim 64, 128 or 256), the tiled kernel (head_dim <= 128, a multiple of
    // 4) or else the one-pass kernel (hd 66, and 256 without tensor cores).
    let prefill: Vec<u32> = (40..110).collect(); // 70 queries: two full tiles and a partial one
    let scattered: Vec<u32> = (0..37u32).map(|i| (i * 7919) % 523).collect();
    // Decode with head_dim 128 or 256 takes the GQA kernels (query heads per block: the
    // largest of 8, 4, 2, 1 dividing the group): 30b's and next-80b's shapes over long
    // contexts, a group of 16 (two blocks per kv head), of 6 (pairs) and of 1.
    let cases: [(usize, usize, usize, Vec<u32>); 17] = [
        (32, 4, 128, vec![4095, 17]),
        (16, 2, 256, vec![4999]),
        (32, 2, 256, vec![2047, 0, 1500]),
        (24, 4, 128, vec![700]),
        (4, 4, 128, vec![0, 1]),
        (4, 2, 64, prefill.clone()),
        (8, 4, 128, scattered.clone()),
        (8, 2, 64, vec![0, 17, 299]),
        (4, 4, 80, vec![250]),
        (16, 2, 128, vec![5, 6, 7, 8, 9, 10]),
        (6, 3, 256, vec![123]),
        (8, 1, 128, vec![1999, 3]),
        (4, 2, 32, vec![700, 701, 702, 703, 704]),
        (8, 2, 128, prefill.clone()),
        (4, 1, 36, scattered),
        (2, 2, 256, prefill.clone()),
        (3, 3, 66, prefill),
    ];
    for (heads, kv_heads, head_dim, positions) in cases {
        check(
            &format!("attention h {heads} kv {kv_heads} hd {head_dim} pos {positions:?}"),
            19,
            1e-5,
            &|s| {
                let n = positions.len();
                let max_ctx = (*positions.iter().max().unwrap() as usize + 1).max(300);
                let kv = max_ctx * kv_heads * head_dim;
                let q = s.rand(n * heads * head_dim, 1.0);
                let q = s.input(&q, "q");
                let pos: BufId<Pos> = s.input_u32(&positions, "pos");
                let kc = s.rand(kv, 1.0);
                let k_cache: BufId<Cache> = s.input_as(&kc, "k_cache", Lifetime::Persistent);
                let vc = s.rand(kv, 1.0);
                let v_cache: BufId<Cache> = s.input_as(&vc, "v_cache", Lifetime::Persistent);
                let out = s.output(n * heads * head_dim, "out");
                let scale = 1.0 / (head_dim as f32).sqrt() * 2.0;
                s.op(Op::Attention {
                    q,
                    pos,
                    k_cache,
                    v_cache,
                    out,
                    n,
                    heads,
                    kv_heads,
                    head_dim,
                    scale,
                    max_ctx,
                });
            },
        );
    }
}

#[test]
fn conv1d_silu() {
    // CUDA splits the tokens into blocks of 64: 150 tokens take three, the last partial; 2
    // tokens with a window of 3 carry part of the old window into the new one.
    for (n, dt, kernel) in [
        (1, DType::F32, 4),
        (7, DType::BF16, 4),
        (3, DType::F32, 2),
        (2, DType::F32, 4),
        (150, DType::F32, 4),
        (70, DType::BF16, 3),
    ] {
        check(
            &format!("conv1d_silu n {n} k {kernel} {dt}"),
            20,
            1e-6,
            &|s| {
                let channels = 300;
                let x = s.rand(n * channels, 1.0);
                let x = s.input(&x, "x");
                let st = s.rand((kernel - 1) * channels, 1.0);
                let state: BufId<State> = s.input_as(&st, "state", Lifetime::Persistent);
                let w = s.rand(channels * kernel, 1.0);
                let weight = gen_vector(s, &w, dt, "w");
                let out = s.output(n * channels, "out");
                s.watch(state, (kernel - 1) * channels, "state", Kind::F32);
                s.op(Op::Conv1dSilu {
                    x,
                    state,
                    weight,
                    out,
                    n,
                    channels,
                    kernel,
                });
            },
        );
    }
}

#[test]
fn gated_delta() {
    // (n, k_heads, v_heads, dk, dv, vector dtype)
    // Up to 7 tokens take the token-serial kernel; 8 or more with dk <= 128 (a multiple of 4)
    // the chunked one (64-token chunks): one partial chunk, exactly one, several with a partial
    // last one, and Qwen3-Next's head shape over three chunks. dk 200 stays token-serial.
    for (n, k_heads, v_heads, dk, dv, dt) in [
        (1, 2, 6, 32, 48, DType::F32),
        (6, 2, 6, 32, 48, DType::BF16),
        (3, 2, 4, 128, 128, DType::F32),
        (2, 1, 2, 200, 16, DType::F32),
        (9, 2, 6, 32, 48, DType::BF16),
        (64, 1, 3, 64, 40, DType::F32),
        (150, 2, 4, 128, 128, DType::F32),
        (70, 1, 2, 200, 16, DType::F32),
        (192, 16, 32, 128, 128, DType::BF16),
    ] {
        check(
            &format!("gated_delta n {n} kh {k_heads} vh {v_heads} dk {dk} dv {dv}"),
            21,
            5e-5,
            &|s| {
                let row = 2 * k_heads * dk + v_heads * dv;
                let qkv = s.rand(n * row, 1.0);
                let qkv = s.input(&qkv, "qkv");
                let a = s.rand(n * v_heads, 2.0);
                let a = s.input(&a, "a");
                let b = s.rand(n * v_heads, 2.0);
                let b = s.input(&b, "b");
                let al = s.rand(v_heads, 1.0);
                let a_log = gen_vector(s, &al, dt, "A_log");
                let db = s.rand(v_heads, 1.0);
                let dt_bias = gen_vector(s, &db, dt, "dt_bias");
                let st = s.rand(v_heads * dk * dv, 0.3);
                let state: BufId<State> = s.input_as(&st, "state", Lifetime::Persistent);
                let out = s.output(n * v_heads * dv, "out");
                s.watch(state, v_heads * dk * dv, "state", Kind::F32);
                s.op(Op::GatedDelta {
                    qkv,
                    a,
                    b,
                    a_log,
                    dt_bias,
                    state,
                    out,
                    n,
                    k_heads,
                    v_heads,
                    dk,
                    dv,
                });
            },
        );
    }
}

#[test]
fn router_topk() {
    for (n, experts, k, renorm) in [
        (9, 60, 4, true),
        (3, 128, 8, false),
        (2, 8, 2, true),
        (5, 512, 10, true),
        // Past the register kernel's limits (512 experts, k 32): the shared-memory one.
        (4, 600, 8, false),
        (3, 40, 33, true),
    ] {
        check(
            &format!("router_topk n {n} e {experts} k {k}"),
            22,
            1e-6,
            &|s| {
                let l = s.rand(n * experts, 3.0);
                let logits = s.input(&l, "logits");
                // Odd cases carry a shared-expert gate (slot k = expert `experts`).
                let shared_gate = (n % 2 == 1).then(|| {
                    let g = s.rand(n, 4.0);
                    s.input(&g, "shared_gate")
                });
                let width = k + shared_gate.is_some() as usize;
                let idx: BufId<Idx> = s.output_as(n * width, "idx", Kind::U32);
                let weights = s.output(n * width, "weights");
                s.op(Op::RouterTopK {
                    logits,
                    idx,
                    weights,
                    n,
                    experts,
                    k,
                    renorm,
                    shared_gate,
                });
            },
        );
    }
}

/// `e` experts of SwiGLU matrices in one weight buffer (formats per role), plus routing inputs.
fn gen_experts(
    s: &mut Setup,
    e: usize,
    hidden: usize,
    inter: usize,
    gu: WFmt,
    dn: WFmt,
    skew: usize,
) -> Arc<[ExpertWeights]> {
    let mut buf = Vec::new();
    let mut ws = Vec::new();
    for _ in 0..e {
        let gate = gen_matrix(&mut s.rng, &mut buf, gu, inter, hidden, skew);
        let up = gen_matrix(&mut s.rng, &mut buf, gu, inter, hidden, skew);
        let down = gen_matrix(&mut s.rng, &mut buf, dn, hidden, inter, skew);
        ws.push(ExpertWeights { gate, up, down });
    }
    let id = s.weights(buf, "experts");
    for w in &mut ws {
        set_buf(&mut w.gate, id);
        set_buf(&mut w.up, id);
        set_buf(&mut w.down, id);
    }
    ws.into()
}

/// A MoeExperts op over random x and weights for the routing `ids` (n * k), watching its
/// output; `shape` is (n, k, hidden, inter).
fn moe_op(
    s: &mut Setup,
    experts: Arc<[ExpertWeights]>,
    ids: &[u32],
    shape: (usize, usize, usize, usize),
) {
    let (n, k, hidden, inter) = shape;
    let x = s.rand(n * hidden, 1.0);
    let x = s.input(&x, "x");
    let idx: BufId<Idx> = s.input_u32(ids, "idx");
    let w = s.rand(n * k, 1.0);
    let weights = s.input(&w, "weights");
    let out = s.output(n * hidden, "out");
    s.op(Op::MoeExperts {
        x,
        idx,
        weights,
        experts,
        out,
        n,
        k,
        hidden,
        inter,
    });
}

#[test]
fn moe_experts() {
    let q4 = WFmt::Q(4, 32, DType::BF16);
    let q8 = WFmt::Q(8, 32, DType::F32);
    let combos = [
        (WFmt::F32, WFmt::F32),
        (WFmt::BF16, WFmt::BF16),
        (q4, q4),
        (q8, q8),
        (q4, q8),
        (WFmt::F16, WFmt::F16),
        // Gate/up scale groups spanning four K stages of the tensor-core GEMMs (the dense
        // GEMM's groups of 64 and 128 are in `matmul`).
        (WFmt::Q(4, 128, DType::BF16), WFmt::Q(4, 32, DType::F16)),
    ];
    for (ci, (gu, dn)) in combos.into_iter().enumerate() {
        for skew in [0, 4] {
            // 200 and 300 tokens take 64-pair tensor-core tiles; at 300 (~75 pairs per
            // expert) most experts end in a remainder that takes a 32-pair tile.
            for n in [1, 2, 5, 70, 200, 300] {
                check(
                    &format!("moe_experts {gu:?}/{dn:?} skew {skew} n {n}"),
                    400 + ci as u64,
                    2e-5,
                    &|s| {
                        let (e, k, hidden, inter) = (8, 2, 256, 96);
                        let experts = gen_experts(s, e, hidden, inter, gu, dn, skew);
                        // k distinct experts per token
                        let mut ids = Vec::new();
                        for _ in 0..n {
                            let a = s.rng.below(e);
                            let b = (a + 1 + s.rng.below(e - 1)) % e;
                            ids.extend([a as u32, b as u32]);
                        }
                        moe_op(s, experts, &ids, (n, k, hidden, inter));
                    },
                );
            }
        }
    }
}

/// Decode-sized batches at model-like widths: rows of 2048 (gate/up: 32-lane groups over two
/// steps), 512 (down: 16-lane groups) and 768 (down: 8-lane groups over three steps) in q4/q8,
/// k up to 11 slots (one expert named twice) so the fused down + combine kernel spreads
/// (slot, rows) units over its row groups in more than one round.
#[test]
fn moe_experts_decode_widths() {
    let q4 = WFmt::Q(4, 64, DType::BF16);
    let q8 = WFmt::Q(8, 64, DType::BF16);
    for (ci, (fmt, inter, k)) in [
        (q4, 512, 11),
        (q4, 768, 8),
        (q8, 512, 11),
        (WFmt::BF16, 768, 3),
    ]
    .into_iter()
    .enumerate()
    {
        for n in [1, 2] {
            check(
                &format!("moe_experts decode {fmt:?} inter {inter} k {k} n {n}"),
                480 + ci as u64,
                2e-5,
                &|s| {
                    let (e, hidden) = (12, 2048);
                    let experts = gen_experts(s, e, hidden, inter, fmt, fmt, 0);
                    let mut ids: Vec<u32> = Vec::new();
                    for t in 0..n {
                        for j in 0..k {
                            // slot 1 repeats slot 0's expert
                            let id = if j == 1 {
                                ids[t * k]
                            } else {
                                s.rng.below(e) as u32
                            };
                            ids.push(id);
                        }
                    }
                    moe_op(s, experts, &ids, (n, k, hidden, inter));
                },
            );
        }
    }
}

/// One token through experts wider than the models' (inter up to 4096, rows that end inside a
/// step of the decode kernels, f32 and bf16 scales) with 9 to 12 slots.
#[test]
fn moe_experts_decode_large() {
    for (ci, (fmt, hidden, inter, k)) in [
        (WFmt::Q(4, 64, DType::BF16), 1024, 4096, 10),
        (WFmt::Q(8, 32, DType::F32), 512, 3008, 9),
        (WFmt::BF16, 256, 2056, 12),
    ]
    .into_iter()
    .enumerate()
    {
        check(
            &format!("moe_experts streamed {fmt:?} {hidden}/{inter} k {k}"),
            490 + ci as u64,
            2e-5,
            &|s| {
                let e = k + 2;
                let experts = gen_experts(s, e, hidden, inter, fmt, fmt, 0);
                let ids: Vec<u32> = (0..k as u32).map(|j| (j * 5 + 1) % e as u32).collect();
                moe_op(s, experts, &ids, (1, k, hidden, inter));
            },
        );
    }
}

/// Expert records held in memory, served like a tiered store (budget = max_in_flight).
#[derive(Debug)]
struct TestStore {
    layout: ExpertWeights,
    records: Vec<Arc<Vec<u8>>>,
    budget: usize,
}

impl ExpertProvider for TestStore {
    fn layout(&self) -> ExpertWeights {
        self.layout
    }
    fn record_bytes(&self) -> usize {
        self.records[0].len()
    }
    fn max_in_flight(&self) -> usize {
        self.budget
    }
    fn fetch(
        &self,
        _layer: usize,
        expert: usize,
    ) -> Result<Arc<dyn AsRef<[u8]> + Send + Sync>, CoreError> {
        Ok(self.records[expert].clone())
    }
}

#[allow(clippy::too_many_arguments)]
fn gen_store(
    s: &mut Setup,
    e: usize,
    hidden: usize,
    inter: usize,
    gu: WFmt,
    dn: WFmt,
    skew: usize,
    budget: usize,
) -> Arc<dyn ExpertProvider> {
    let mut records = Vec::new();
    let mut layout = None;
    for _ in 0..e {
        let mut rec = Vec::new();
        let gate = gen_matrix(&mut s.rng, &mut rec, gu, inter, hidden, skew);
        let up = gen_matrix(&mut s.rng, &mut rec, gu, inter, hidden, skew);
        let down = gen_matrix(&mut s.rng, &mut rec, dn, hidden, inter, skew);
        rec.resize(rec.len() + 5, 0); // records need not end on a matrix
        layout.get_or_insert(ExpertWeights { gate, up, down });
        records.push(Arc::new(rec));
    }
    Arc::new(TestStore {
        layout: layout.unwrap(),
        records,
        budget,
    })
}

#[test]
fn moe_experts_streamed() {
    let q4 = WFmt::Q(4, 32, DType::BF16);
    let q8 = WFmt::Q(8, 32, DType::F32);
    for (ci, (gu, dn)) in [(q4, q4), (WFmt::BF16, WFmt::BF16), (q4, q8)]
        .into_iter()
        .enumerate()
    {
        for (skew, budget) in [(0, 3), (4, 100), (0, 1)] {
            for n in [1, 5, 70] {
                check(
                    &format!(
                        "moe_experts_streamed {gu:?}/{dn:?} skew {skew} budget {budget} n {n}"
                    ),
                    600 + ci as u64,
                    2e-5,
                    &|s| {
                        let (e, k, hidden, inter) = (8, 2, 256, 96);
                        let store = gen_store(s, e, hidden, inter, gu, dn, skew, budget);
                        let x = s.rand(n * hidden, 1.0);
                        let x = s.input(&x, "x");
                        let mut ids = Vec::new();
                        for _ in 0..n {
                            let a = s.rng.below(e);
                            let b = (a + 1 + s.rng.below(e - 1)) % e;
                            ids.extend([a as u32, b as u32]);
                        }
                        let idx: BufId<Idx> = s.input_u32(&ids, "idx");
                        let w = s.rand(n * k, 1.0);
                        let weights = s.input(&w, "weights");
                        let out = s.output(n * hidden, "out");
                        s.op(Op::MoeExpertsStreamed {
                            x,
                            idx,
                            weights,
                            store,
                            layer: 3,
                            out,
                            n,
                            k,
                            hidden,
                            inter,
                        });
                    },
                );
            }
        }
    }
}

/// Router + experts + shared expert through transients: exercises the plan's aliasing, the
/// device-side routing feeding the experts, and expert-table reuse across two layers.
#[test]
fn moe_block_chain() {
    for n in [1, 9] {
        check(&format!("moe block chain n {n}"), 500, 5e-5, &|s| {
            let (e, k, hidden, inter) = (16, 4, 128, 64);
            let q4 = WFmt::Q(4, 64, DType::BF16);
            let experts = gen_experts(s, e, hidden, inter, q4, q4, 0);
            let router = matrix(s, WFmt::BF16, e, hidden, 0);
            let norm_w = s.rand(hidden, 1.0);
            let norm = gen_vector(s, &norm_w, DType::BF16, "norm");
            let x0 = s.rand(n * hidden, 1.0);
            let x = s.input(&x0, "x");
            let mut cur = x;
            for layer in 0..2 {
                let hn = s.transient(n * hidden, "hn");
                s.op(Op::RmsNorm {
                    x: cur,
                    weight: norm,
                    out: hn,
                    rows: n,
                    dim: hidden,
                    eps: 1e-6,
                    offset: 1.0,
                });
                let logits = s.transient(n * e, "logits");
                s.op(Op::Matmul {
                    x: hn,
                    w: router,
                    out: logits,
                    n,
                });
                let idx: BufId<Idx> = s.alloc(n * k * 4, "idx", Lifetime::Transient);
                let weights = s.transient(n * k, "route_w");
                s.op(Op::RouterTopK {
                    logits,
                    idx,
                    weights,
                    n,
                    experts: e,
                    k,
                    renorm: layer == 0,
                    shared_gate: None,
                });
                let y = s.transient(n * hidden, "moe_out");
                s.op(Op::MoeExperts {
                    x: hn,
                    idx,
                    weights,
                    experts: experts.clone(),
                    out: y,
                    n,
                    k,
                    hidden,
                    inter,
                });
                let next = if layer == 1 {
                    s.output(n * hidden, "out")
                } else {
                    s.transient(n * hidden, "resid")
                };
                s.op(Op::Add {
                    a: cur,
                    b: y,
                    out: next,
                    len: n * hidden,
                });
                cur = next;
            }
        });
    }
}

// ------------------------------------------------------------------------------------ pool

#[test]
fn pool_semantics() {
    // the lock is bound first, so it is released after the backend is dropped
    let Some((_device, mut gpu)) = device() else {
        return;
    };
    let is_cuda = gpu.name() == "cuda";
    let pool = gpu.pool();
    // zeroed on allocation, prefix upload/download, zero
    let a: BufId<Act> = pool.alloc(64, "a", Lifetime::External).unwrap();
    let mut v = vec![1f32; 16];
    pool.download_f32(a, &mut v).unwrap();
    assert!(v.iter().all(|x| *x == 0.0), "fresh buffer not zeroed");
    pool.upload_f32(a, &[1.0, 2.0, 3.0]).unwrap();
    let mut p = vec![0f32; 4];
    pool.download_f32(a, &mut p).unwrap();
    assert_eq!(p, [1.0, 2.0, 3.0, 0.0]);
    assert!(
        pool.upload_f32(a, &[0.0; 17]).is_err(),
        "upload past the end must fail"
    );
    pool.upload_at(a, 8, &2.5f32.to_le_bytes()).unwrap();
    pool.download_f32(a, &mut p).unwrap();
    assert_eq!(p, [1.0, 2.0, 2.5, 0.0]);
    pool.zero(a.raw()).unwrap();
    pool.download_f32(a, &mut p).unwrap();
    assert_eq!(p, [0.0; 4]);
    // a transient gets zeroed storage lazily
    let t: BufId<Act> = pool.alloc(32, "t", Lifetime::Transient).unwrap();
    let mut q = vec![7f32; 8];
    pool.download_f32(t, &mut q).unwrap();
    assert_eq!(q, [0.0; 8]);
    // weights: readable, not writable
    let bytes: Vec<u8> = (0..=255u8).collect();
    let w = pool
        .register_weights(WeightBytes::new(Arc::new(bytes.clone()), 16..80), "w")
        .unwrap();
    let mut back = vec![0u8; 64];
    pool.download_raw(w, 0, &mut back).unwrap();
    assert_eq!(back, bytes[16..80]);
    assert!(
        pool.upload_raw(w, 0, &[0]).is_err(),
        "weights are read-only"
    );
    assert_eq!(pool.info(w).unwrap().0, 64);
    // persistent survives reset_transient, others are released
    let keep: BufId<State> = pool.alloc(16, "keep", Lifetime::Persistent).unwrap();
    pool.upload_f32(keep, &[4.0]).unwrap();
    pool.reset_transient();
    assert_eq!(pool.info(a.raw()).unwrap().0, 0);
    let mut k1 = [0f32; 1];
    pool.download_f32(keep, &mut k1).unwrap();
    assert_eq!(k1, [4.0]);
    assert!(pool.allocated_bytes() >= 16);
    // out of memory is a typed error naming the buffer
    if !is_cuda {
        return;
    }
    let huge = pool
        .alloc_raw(1 << 50, "huge", Lifetime::Persistent)
        .unwrap_err();
    assert!(
        matches!(huge, moeflux_core::CoreError::OutOfMemory { .. }),
        "{huge}"
    );
    assert!(huge.to_string().contains("huge"), "{huge}");
}

#[test]
fn bandwidth_probe() {
    // the lock is bound first, so it is released after the backend is dropped
    let Some((_device, mut gpu)) = device() else {
        return;
    };
    if gpu.name() != "cuda" {
        return;
    }
    let bw = gpu.measure_bandwidth().unwrap();
    eprintln!("read bandwidth {:.2} TB/s", bw / 1e12);
    assert!(bw > 1e11 && bw < 1e14, "implausible bandwidth {bw}");
}

/// A graph replayed several times keeps its recurrent state on the device and matches the CPU
/// after every run (conv window and delta state advance; KV cache grows).
#[test]
fn replay_keeps_state() {
    // the lock is bound first, so it is released after the backend is dropped
    let Some((_device, mut gpu)) = device() else {
        return;
    };
    let mut cpu = CpuBackend::new();
    let (n, channels, kernel) = (2, 128, 4);
    let (k_heads, v_heads, dk, dv) = (1, 2, 32, 32);
    let mut rng = Rng::new(77);
    let xs: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n * channels, 1.0)).collect();
    let w = rng.vec(channels * kernel, 1.0);
    let row = 2 * k_heads * dk + v_heads * dv;
    assert_eq!(row, channels);
    let gates: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n * v_heads, 1.0)).collect();
    let params = rng.vec(v_heads, 1.0);
    let mut results: Vec<Vec<Vec<f32>>> = Vec::new();
    for b in [&mut cpu as &mut dyn Backend, gpu.as_mut()] {
        let pool = b.pool();
        let x: BufId<Act> = pool
            .alloc(n * channels * 4, "x", Lifetime::External)
            .unwrap();
        let ab: BufId<Act> = pool
            .alloc(n * v_heads * 4, "ab", Lifetime::External)
            .unwrap();
        let conv_state: BufId<State> = pool
            .alloc((kernel - 1) * channels * 4, "conv", Lifetime::Persistent)
            .unwrap();
        let delta_state: BufId<State> = pool
            .alloc(v_heads * dk * dv * 4, "delta", Lifetime::Persistent)
            .unwrap();
        let out: BufId<Act> = pool
            .alloc(n * v_heads * dv * 4, "out", Lifetime::External)
            .unwrap();
        let wb = f32_bytes(&w);
        let wid: BufId<Weight> = BufId::from_raw(
            pool.register_weights(WeightBytes::new(Arc::new(wb.clone()), 0..wb.len()), "w")
                .unwrap(),
        );
        let pb = f32_bytes(&params);
        let pid: BufId<Weight> = BufId::from_raw(
            pool.register_weights(WeightBytes::new(Arc::new(pb.clone()), 0..pb.len()), "p")
                .unwrap(),
        );
        let conv_out: BufId<Act> = pool
            .alloc(n * channels * 4, "conv_out", Lifetime::Transient)
            .unwrap();
        let weight = Vector {
            data: Region {
                buf: wid,
                offset: 0,
            },
            len: channels * kernel,
            dtype: DType::F32,
        };
        let pv = Vector {
            data: Region {
                buf: pid,
                offset: 0,
            },
            len: v_heads,
            dtype: DType::F32,
        };
        let mut g = Graph::new("replay");
        g.push(
            None,
            "conv",
            Op::Conv1dSilu {
                x,
                state: conv_state,
                weight,
                out: conv_out,
                n,
                channels,
                kernel,
            },
        );
        g.push(
            None,
            "delta",
            Op::GatedDelta {
                qkv: conv_out,
                a: ab,
                b: ab,
                a_log: pv,
                dt_bias: pv,
                state: delta_state,
                out,
                n,
                k_heads,
                v_heads,
                dk,
                dv,
            },
        );
        b.prepare(&g).unwrap();
        let mut runs = Vec::new();
        for step in 0..3 {
            b.pool().upload_f32(x, &xs[step]).unwrap();
            b.pool().upload_f32(ab, &gates[step]).unwrap();
            b.execute(&g).unwrap();
            let mut o = vec![0f32; n * v_heads * dv];
            b.pool().download_f32(out, &mut o).unwrap();
            runs.push(o);
        }
        results.push(runs);
    }
    for (step, (c, g)) in results[0].iter().zip(&results[1]).enumerate() {
        let maxref = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let maxdiff = c.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("replay step {step}: rel err {:.2e}", maxdiff / maxref);
        assert!(
            maxdiff <= 5e-5 * maxref,
            "step {step}: rel err {}",
            maxdiff / maxref
        );
    }
}

// ------------------------------------------------------------------------ streamed tiers

/// Several layers of expert records served like the packed store: read-ahead prediction (the
/// next layer's previous set), everything "in host RAM", and a host budget for the wave path.
#[derive(Debug)]
struct TierStore {
    layout: ExpertWeights,
    /// `records[layer][expert]`
    records: Vec<Vec<Arc<Vec<u8>>>>,
    budget: usize,
    last: std::sync::Mutex<std::collections::HashMap<usize, Vec<usize>>>,
    /// Whether to tell the backend the experts per layer (which lets it pin whole layers).
    tell_layers: bool,
}

impl ExpertProvider for TierStore {
    fn layout(&self) -> ExpertWeights {
        self.layout
    }
    fn record_bytes(&self) -> usize {
        self.records[0][0].len()
    }
    fn max_in_flight(&self) -> usize {
        self.budget
    }
    fn fetch(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<Arc<dyn AsRef<[u8]> + Send + Sync>, CoreError> {
        self.records
            .get(layer)
            .and_then(|l| l.get(expert))
            .map(|r| r.clone() as Arc<dyn AsRef<[u8]> + Send + Sync>)
            .ok_or_else(|| CoreError::Backend {
                backend: "test-store",
                msg: format!("no expert {expert} in layer {layer}"),
            })
    }
    fn layer_routed(&self, layer: usize, experts: &[usize]) {
        self.last.lock().unwrap().insert(layer, experts.to_vec());
    }
    fn fetch_cached(&self, layer: usize, expert: usize) -> Option<moeflux_core::SharedBytes> {
        self.fetch(layer, expert).ok()
    }
    fn predicted_next(&self, layer: usize) -> Option<(usize, Vec<usize>)> {
        let next = (layer + 1) % self.records.len();
        self.last
            .lock()
            .unwrap()
            .get(&next)
            .map(|s| (next, s.clone()))
    }
    fn total_records(&self) -> Option<usize> {
        Some(self.records.len() * self.records[0].len())
    }
    fn experts_per_layer(&self) -> Option<usize> {
        self.tell_layers.then(|| self.records[0].len())
    }
}

/// Streamed experts over `steps` executions of a graph of `layers` MoE layers, routing
/// temporally local (hits, misses and evictions in the VRAM cache), on CUDA with the given
/// cache budget (in records; `None` = automatic) and CPU-miss mode, against the CPU backend
/// running the same experts resident (`Op::MoeExperts`). With `pin` the store tells the
/// experts per layer, so layers that fit are pinned. Returns the device tier counters.
fn streamed_tiers_case(
    name: &str,
    n: usize,
    cache_records: Option<usize>,
    cpu: moeflux_cuda::CpuMisses,
    pin: bool,
) -> Option<moeflux_core::op::DeviceTierStats> {
    if let Some(why) = moeflux_cuda::unavailable_reason()
        && !std::env::var("MOEFLUX_PARITY_SELFTEST").is_ok_and(|v| v == "1")
    {
        eprintln!("skipping: no CUDA device ({why})");
        return None;
    }
    let (layers, e, k, hidden, inter, steps) = (3, 16, 4, 256, 96, 6);
    let q4 = WFmt::Q(4, 32, DType::BF16);
    let mut rng = Rng::new(0x71e5);
    // records (identical bytes for both backends)
    let mut records = Vec::new();
    let mut layout = None;
    for _ in 0..layers {
        let mut lr = Vec::new();
        for _ in 0..e {
            let mut rec = Vec::new();
            let gate = gen_matrix(&mut rng, &mut rec, q4, inter, hidden, 0);
            let up = gen_matrix(&mut rng, &mut rec, q4, inter, hidden, 0);
            let down = gen_matrix(&mut rng, &mut rec, q4, hidden, inter, 0);
            rec.resize(rec.len() + 5, 0);
            layout.get_or_insert(ExpertWeights { gate, up, down });
            lr.push(Arc::new(rec));
        }
        records.push(lr);
    }
    let layout = layout.unwrap();
    let record = records[0][0].len();
    let slot = record.div_ceil(256) * 256;
    // inputs per step and layer: x, routing (distinct per token, drawn mostly from a small
    // per-layer pool so the cache sees reuse), weights
    let mut inputs = Vec::new();
    for step in 0..steps {
        let mut per_layer = Vec::new();
        for l in 0..layers {
            let x = rng.vec(n * hidden, 1.0);
            let mut ids = Vec::new();
            for _ in 0..n {
                let mut tok: Vec<u32> = Vec::new();
                while tok.len() < k {
                    let cand = if rng.below(4) < 3 {
                        ((l * 5 + step / 2 + rng.below(6)) % e) as u32
                    } else {
                        rng.below(e) as u32
                    };
                    if !tok.contains(&cand) {
                        tok.push(cand);
                    }
                }
                ids.extend(tok);
            }
            let w = rng.vec(n * k, 1.0);
            per_layer.push((x, ids, w));
        }
        inputs.push(per_layer);
    }
    let store = Arc::new(TierStore {
        layout,
        records: records.clone(),
        budget: 3,
        last: Default::default(),
        tell_layers: pin,
    });
    let selftest = moeflux_cuda::unavailable_reason().is_some();
    let _device = gpu_lock();
    let mut cuda: Option<CudaBackend> = None;
    let mut self_b = CpuBackend::new();
    if !selftest {
        let mut o = moeflux_cuda::CudaOptions::new(0);
        o.gpu_mem = cache_records.map(|r| r * slot);
        o.cpu_misses = cpu;
        cuda = Some(CudaBackend::with_options(o).expect("a device is present"));
    }
    let gpu: &mut dyn Backend = match cuda.as_mut() {
        Some(c) => c,
        None => &mut self_b,
    };
    let mut cpu_b = CpuBackend::new();
    let mut results: Vec<Vec<Vec<Vec<f32>>>> = Vec::new();
    for (bi, b) in [&mut cpu_b as &mut dyn Backend, gpu]
        .into_iter()
        .enumerate()
    {
        let streamed = bi == 1;
        let mut g = Graph::new("tiers");
        let mut bufs = Vec::new();
        for (l, layer_records) in records.iter().enumerate() {
            let pool = b.pool();
            let x: BufId<Act> = pool.alloc(n * hidden * 4, "x", Lifetime::External).unwrap();
            let idx: BufId<Idx> = pool.alloc(n * k * 4, "idx", Lifetime::External).unwrap();
            let w: BufId<Act> = pool.alloc(n * k * 4, "w", Lifetime::External).unwrap();
            let out: BufId<Act> = pool
                .alloc(n * hidden * 4, "out", Lifetime::External)
                .unwrap();
            let op = if streamed {
                Op::MoeExpertsStreamed {
                    x,
                    idx,
                    weights: w,
                    store: store.clone(),
                    layer: l,
                    out,
                    n,
                    k,
                    hidden,
                    inter,
                }
            } else {
                // the same records, resident: one weight buffer per layer
                let all: Vec<u8> = layer_records
                    .iter()
                    .flat_map(|r| r.iter().copied())
                    .collect();
                let len = all.len();
                let id: BufId<Weight> = BufId::from_raw(
                    pool.register_weights(WeightBytes::new(Arc::new(all), 0..len), "experts")
                        .unwrap(),
                );
                let experts: Arc<[ExpertWeights]> = (0..e)
                    .map(|j| {
                        let mut ew = layout;
                        for m in [&mut ew.gate, &mut ew.up, &mut ew.down] {
                            set_buf(m, id);
                            m.data.offset += j * record;
                            if let Some(s) = &mut m.scales {
                                s.offset += j * record;
                            }
                            if let Some(bb) = &mut m.biases {
                                bb.offset += j * record;
                            }
                        }
                        ew
                    })
                    .collect();
                Op::MoeExperts {
                    x,
                    idx,
                    weights: w,
                    experts,
                    out,
                    n,
                    k,
                    hidden,
                    inter,
                }
            };
            g.push(Some(l), "moe", op);
            bufs.push((x, idx, w, out));
        }
        b.prepare(&g).unwrap();
        let mut runs = Vec::new();
        for step_inputs in &inputs {
            for ((x, idx, w, out), (xv, iv, wv)) in bufs.iter().zip(step_inputs) {
                let pool = b.pool();
                pool.upload_f32(*x, xv).unwrap();
                pool.upload_raw(idx.raw(), 0, &u32_bytes(iv)).unwrap();
                pool.upload_f32(*w, wv).unwrap();
                pool.upload_raw(out.raw(), 0, &vec![0xff; n * hidden * 4])
                    .unwrap();
            }
            b.execute(&g)
                .unwrap_or_else(|err| panic!("{name}: {} execute: {err}", b.name()));
            let mut step_out = Vec::new();
            for (_, _, _, out) in &bufs {
                let mut o = vec![0f32; n * hidden];
                b.pool().download_f32(*out, &mut o).unwrap();
                step_out.push(o);
            }
            runs.push(step_out);
        }
        results.push(runs);
    }
    for (step, (c, g)) in results[0].iter().zip(&results[1]).enumerate() {
        for (l, (c, g)) in c.iter().zip(g).enumerate() {
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{name}: step {step} layer {l}: non-finite (unwritten?) output"
            );
            let maxref = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            let maxdiff = c.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let rel = maxdiff / maxref;
            assert!(
                rel <= 1e-5,
                "{name}: step {step} layer {l}: rel err {rel:.3e} > 1e-5"
            );
        }
    }
    eprintln!("{name}: {} steps x {layers} layers match", steps);
    let Some(cuda) = cuda else {
        return Some(Default::default());
    };
    let stats = cuda.expert_tier_stats();
    eprintln!("{name}: {stats:?}");
    Some(stats)
}

#[test]
fn streamed_tiers_all_records_cached() {
    use moeflux_cuda::CpuMisses;
    for cpu in [CpuMisses::Off, CpuMisses::On] {
        for n in [1, 3] {
            let Some(st) = streamed_tiers_case(
                &format!("tiers all-records cpu {cpu:?} n {n}"),
                n,
                Some(3 * 16),
                cpu,
                false,
            ) else {
                return;
            };
            if moeflux_cuda::available() {
                assert!(st.vram_hits > 0, "{st:?}");
                if cpu == CpuMisses::On {
                    assert!(st.cpu_computed > 0, "{st:?}");
                } else {
                    assert_eq!(st.cpu_computed, 0, "{st:?}");
                }
            }
        }
    }
}

#[test]
fn streamed_tiers_one_active_set() {
    use moeflux_cuda::CpuMisses;
    // 4 slots = one layer's active set at n = 1 (k = 4): one pass, evictions every layer;
    // at n = 3 the active set is larger than the cache: chunks through the cache.
    for cpu in [CpuMisses::Off, CpuMisses::On] {
        for n in [1, 3] {
            let Some(st) = streamed_tiers_case(
                &format!("tiers one-set cpu {cpu:?} n {n}"),
                n,
                Some(4),
                cpu,
                false,
            ) else {
                return;
            };
            if moeflux_cuda::available() {
                assert!(st.vram_misses > 4, "{st:?}");
            }
        }
    }
}

#[test]
fn streamed_tiers_no_cache_waves() {
    use moeflux_cuda::CpuMisses;
    for cpu in [CpuMisses::Off, CpuMisses::On] {
        for n in [1, 3] {
            let Some(st) = streamed_tiers_case(
                &format!("tiers waves cpu {cpu:?} n {n}"),
                n,
                Some(0),
                cpu,
                false,
            ) else {
                return;
            };
            if moeflux_cuda::available() {
                assert_eq!(st.vram_hits, 0, "{st:?}");
                // without a cache, misses still go to the CPU when allowed (during the waves)
                match cpu {
                    CpuMisses::Off => assert_eq!(st.cpu_computed, 0, "{st:?}"),
                    _ => assert!(st.cpu_computed > 0, "{st:?}"),
                }
            }
        }
    }
}

#[test]
fn streamed_tiers_auto_size_and_cpu_auto() {
    let _ = streamed_tiers_case("tiers auto", 1, None, moeflux_cuda::CpuMisses::Auto, false);
    let _ = streamed_tiers_case(
        "tiers auto pinned",
        1,
        None,
        moeflux_cuda::CpuMisses::Auto,
        true,
    );
}

/// Whole layers pinned in VRAM (routed on the device, captured into CUDA graph pieces): every
/// layer (48 slots), or one layer plus a 16-slot LRU for the others (32 slots: the LRU keeps a
/// quarter), where the graph runs as a captured piece followed by host round-trips.
#[test]
fn streamed_tiers_pinned_layers() {
    use moeflux_cuda::CpuMisses;
    for (slots, cpu) in [
        (3 * 16, CpuMisses::Off),
        (32, CpuMisses::Off),
        (32, CpuMisses::On),
    ] {
        for n in [1, 3] {
            let Some(st) = streamed_tiers_case(
                &format!("tiers pinned {slots} slots cpu {cpu:?} n {n}"),
                n,
                Some(slots),
                cpu,
                true,
            ) else {
                return;
            };
            if moeflux_cuda::available() {
                assert!(st.pinned_pairs > 0, "{st:?}");
                if slots == 3 * 16 {
                    // Every execution counts, replays of the captured graph included:
                    // 6 steps x 3 layers x n tokens x k 4.
                    assert_eq!(st.pinned_pairs, (6 * 3 * n * 4) as u64, "{st:?}");
                    assert_eq!(st.vram_hits + st.vram_misses + st.cpu_computed, 0, "{st:?}");
                } else {
                    assert!(
                        st.vram_hits + st.vram_misses + st.cpu_computed > 0,
                        "{st:?}"
                    );
                }
            }
        }
    }
}
