//! `out[n, rows] = x[n, cols] @ W^T` for every weight format.
//!
//! The activations are laid out once for the matrix's kernel ([`qdot::prepare`]); work is
//! then split over output rows, each row's stored bytes read once for the whole batch
//! (tokens go through the kernels in blocks, the row staying in L1 between blocks).

use rayon::prelude::*;

use super::qdot::{self, Layout};
use super::weights::MatView;

/// Smallest rows per rayon task.
const MIN_ROWS_PER_TASK: usize = 16;

/// Rows per task: about eight tasks per thread (load balance with other work on the
/// machine) but no fewer than [`MIN_ROWS_PER_TASK`] rows.
fn rows_per_task(rows: usize, n: usize) -> usize {
    let tasks = rayon::current_num_threads() * 8;
    // big batches: more, smaller tasks keep every thread busy
    let per = rows.div_ceil(tasks * if n > 8 { 2 } else { 1 });
    // whole 16-row blocks (the AMX tile width)
    per.max(MIN_ROWS_PER_TASK).next_multiple_of(16)
}

struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own rows).
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

thread_local! {
    static PREP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub fn matmul(x: &[f32], n: usize, w: &MatView<'_>, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let x = &x[..n * cols];
    let out = &mut out[..n * rows];
    let lay = Layout::new(w, n);
    let mut buf = PREP.with(|b| std::mem::take(&mut *b.borrow_mut()));
    qdot::prepare(x, &lay, &mut buf);
    let per = rows_per_task(rows, n);
    let ptr = OutPtr(out.as_mut_ptr());
    let tasks = rows.div_ceil(per);
    (0..tasks).into_par_iter().for_each(|i| {
        let (r0, r1) = (i * per, ((i + 1) * per).min(rows));
        let p = &ptr;
        // SAFETY: `out` holds n * rows floats; each task writes only its rows r0..r1.
        unsafe { qdot::rows_raw(w, &lay, &buf, r0, r1, p.0, rows) };
    });
    PREP.with(|b| *b.borrow_mut() = buf);
}

/// Matrix-vector product for a single row of input, run on the calling thread (used
/// inside already-parallel loops such as the experts).
pub fn matvec_serial(x: &[f32], w: &MatView<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
    matmul_serial(x, 1, w, out, scratch)
}

/// Serial matmul over a small token batch (`n` rows of `x`); `scratch` holds the
/// prepared activations.
pub fn matmul_serial(
    x: &[f32],
    n: usize,
    w: &MatView<'_>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let lay = Layout::new(w, n);
    qdot::prepare(&x[..n * w.cols], &lay, scratch);
    qdot::rows_serial(w, &lay, scratch, out);
}

/// Decode matvec against a plain read of the same bytes, interleaved (the machine is
/// shared): `cargo test --release -p moeflux-cpu matvec_vs_read -- --ignored --nocapture`.
#[cfg(test)]
mod bench {
    use std::time::Instant;

    use moeflux_core::{DType, WeightFormat};
    use rayon::prelude::*;

    use super::*;

    #[test]
    #[ignore]
    fn matvec_vs_read() {
        let (rows, cols) = (151936usize, 2048usize);
        let format = WeightFormat::Affine {
            bits: 4,
            group_size: 64,
            scale_dtype: DType::BF16,
        };
        let data: Vec<u8> = (0..format.data_bytes(rows, cols))
            .map(|i| ((i * 2654435761usize) >> 7) as u8)
            .collect();
        let scales: Vec<u8> = (0..format.scale_bytes(rows, cols))
            .map(|i| if i % 2 == 1 { 0x3c } else { 0 })
            .collect();
        let w = MatView {
            data: &data,
            scales: &scales,
            biases: &scales,
            rows,
            cols,
            format,
        };
        let bytes = format.total_bytes(rows, cols) as f64;
        let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut out = vec![0f32; rows];
        let (mut best_mv, mut best_rd) = (0f64, 0f64);
        for _ in 0..10 {
            let t = Instant::now();
            matmul(&x, 1, &w, &mut out);
            best_mv = best_mv.max(bytes / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            let s: u64 = [&data[..], &scales[..], &scales[..]]
                .into_iter()
                .map(|b| {
                    b.par_chunks(1 << 18)
                        .map(|c| {
                            let mut acc = [0u64; 8];
                            for q in c.chunks_exact(64) {
                                for j in 0..8 {
                                    acc[j] = acc[j].wrapping_add(u64::from_le_bytes(
                                        q[8 * j..8 * j + 8].try_into().unwrap(),
                                    ));
                                }
                            }
                            acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
                        })
                        .reduce(|| 0, |a, b| a.wrapping_add(b))
                })
                .fold(0, |a, b| a.wrapping_add(b));
            std::hint::black_box(s);
            best_rd = best_rd.max(bytes / t.elapsed().as_secs_f64() / 1e9);
        }
        println!(
            "{rows}x{cols} q4: matvec {best_mv:.1} GB/s, plain read {best_rd:.1} GB/s ({:.0}%)",
            100.0 * best_mv / best_rd
        );
    }
}
