//! Fast row kernels for `W x` over stored weights (MLX affine 4/8-bit, bf16/f16/f32),
//! chosen once at run time from the CPU's features, with the portable code of
//! [`MatView::dot_row`]/[`MatView::row_f32`] as the fallback.
//!
//! Every affine kernel computes `sum_g s_g * sum_{j in g} q_j x_j + sum_g b_g * X_g`
//! (`X_g` the f32 sum of the group's activations). Activations keep (nearly) f32
//! precision: quantizing them to int8 the way llama.cpp does moves the golden mlx-lm
//! logits by ~1e-1, 16-bit fixed point by ~1e-4, split-bf16 by ~1e-5. With AVX-512 VNNI
//! each group of `x` becomes 24-bit fixed point (`x ~ d_g * V`, `|V| <= 127 * 2^16`,
//! error at most `2^-24 max|x_g|`, below f32 rounding of the larger elements), stored as
//! three signed bytes so `vpdpbusd` forms `sum q V` exactly in 32-bit integers
//! ([`Kind::Q4I`]); AVX2 machines form the same sums with `vpmaddubsw` + `vpmaddwd` for
//! one or two tokens ([`Kind::Q4IY`]); elsewhere the codes are turned into floats
//! ([`Kind::Q4`], [`Kind::Q4Y`]).
//!
//! The caller first lays the activations out for the matrix's format ([`Layout`],
//! [`prepare`]); one prepared buffer serves every matrix of the same format and width
//! (the gate and up projections of an expert, say). A kernel computes each (row, token)
//! result the same way whatever else is in its batch; batches of 4+ tokens go to AMX
//! tiles where available ([`super::amx`]), which sum the same exact integers in another
//! f32 order, so decode and prefill agree to f32 rounding.
//!
//! AVX-512 layout for 4-bit rows: a 64-byte chunk holds 128 elements; as 16 dwords, lane
//! `k` holds elements `8k..8k+8`, nibble `j` of the lane being element `8k+j`. The
//! activations of a chunk are stored transposed (`xp[16j + k] = x[8k + j]`), so nibble
//! `j` of every lane — isolated by a shift and turned into `0.0..=15.0` by a 16-entry
//! `vpermps` table — meets its activation in one FMA. Lanes are scaled per group after
//! the chunk's 8 FMAs; the bias term uses per-group sums of `x`.

use std::sync::OnceLock;

use moeflux_core::{DType, WeightFormat};

use super::weights::{MatView, dot};

/// Instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C (no AVX-512).
    Avx2,
    /// AVX-512 F/BW/VL with FMA and F16C.
    Avx512,
    /// [`Isa::Avx512`] plus VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// [`Isa::Avx512Vnni`] plus AMX-INT8 tiles (batches of tokens).
    Amx,
}

static ISA: OnceLock<Isa> = OnceLock::new();

/// The instruction set in use (detected once; `MOEFLUX_CPU_KERNELS=scalar` forces the
/// portable code, `=avx2` the AVX2 kernels, `=f32` the exact-f32 AVX-512 kernels only,
/// `=vnni` no AMX).
pub fn isa() -> Isa {
    *ISA.get_or_init(|| {
        let det = detect();
        match std::env::var("MOEFLUX_CPU_KERNELS").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") if det != Isa::Scalar => Isa::Avx2,
            Ok("f32") if matches!(det, Isa::Avx512Vnni | Isa::Amx) => Isa::Avx512,
            Ok("vnni") if det == Isa::Amx => Isa::Avx512Vnni,
            _ => det,
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("avx2")
    {
        if is_x86_feature_detected!("avx512vnni") {
            if super::amx::available() {
                Isa::Amx
            } else {
                Isa::Avx512Vnni
            }
        } else {
            Isa::Avx512
        }
    } else if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        Isa::Avx2
    } else {
        Isa::Scalar
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Scalar
}

/// Which kernel serves a matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `MatView::dot_row` / `row_f32` + `dot`.
    Scalar,
    /// 4-bit codes as floats (`vpermps` table), f32 activations.
    Q4,
    /// 4-bit codes against 24-bit fixed-point activations through `vpdpbusd`.
    Q4I,
    /// The same arithmetic through AMX tiles, for batches ([`super::amx`]).
    Q4A,
    Q8,
    Dense(DType),
    /// `Q4I`'s arithmetic on AVX2 (`vpmaddubsw` + `vpmaddwd`; 64-element chunks), for up
    /// to [`Q4IY_MAX_TOKENS`] tokens.
    Q4IY,
    /// AVX2 versions of `Q4` (64-element chunks, wider batches), `Q8` and `Dense`.
    Q4Y,
    Q8Y,
    DenseY(DType),
}

fn kind_for(isa: Isa, format: WeightFormat) -> Kind {
    let scales_ok = |dt: DType| matches!(dt, DType::F32 | DType::BF16 | DType::F16);
    match (isa, format) {
        (Isa::Scalar, _) => return Kind::Scalar,
        (
            Isa::Avx2,
            WeightFormat::Affine {
                bits: 4,
                group_size,
                scale_dtype,
            },
        ) if group_size % 8 == 0 && group_size > 0 && scales_ok(scale_dtype) => {
            return Kind::Q4IY;
        }
        (
            Isa::Avx2,
            WeightFormat::Affine {
                bits: 8,
                group_size,
                scale_dtype,
            },
        ) if group_size % 16 == 0 && group_size > 0 && scales_ok(scale_dtype) => {
            return Kind::Q8Y;
        }
        (Isa::Avx2, WeightFormat::Dense(dt @ (DType::F32 | DType::BF16 | DType::F16))) => {
            return Kind::DenseY(dt);
        }
        (Isa::Avx2, _) => return Kind::Scalar,
        _ => {}
    }
    match format {
        WeightFormat::Affine {
            bits: 4,
            group_size,
            scale_dtype,
        } if matches!(isa, Isa::Avx512Vnni | Isa::Amx)
            && group_size >= 8
            && group_size % 8 == 0
            && matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16) =>
        {
            Kind::Q4I
        }
        WeightFormat::Affine {
            bits: 4,
            group_size,
            scale_dtype,
        } if group_size >= 8
            && group_size % 8 == 0
            && matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16) =>
        {
            Kind::Q4
        }
        WeightFormat::Affine {
            bits: 8,
            group_size,
            scale_dtype,
        } if group_size >= 32
            && group_size % 32 == 0
            && matches!(scale_dtype, DType::F32 | DType::BF16 | DType::F16) =>
        {
            Kind::Q8
        }
        WeightFormat::Dense(dt @ (DType::F32 | DType::BF16 | DType::F16)) => Kind::Dense(dt),
        _ => Kind::Scalar,
    }
}

/// How `n` activation rows are laid out for one matrix format and width: `n` rows of
/// `stride` floats, then (affine formats) per token `gparts` runs of `gstride` floats:
/// the per-group sums of `x`, and for [`Kind::Q4I`] the per-group fixed-point steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    kind: Kind,
    pub n: usize,
    pub cols: usize,
    pub stride: usize,
    pub gstride: usize,
    gparts: usize,
    group_size: usize,
}

/// Smallest batch sent to the AMX kernel.
const AMX_MIN_TOKENS: usize = 4;

/// Largest batch the AVX2 fixed-point kernel takes; wider ones convert each chunk's codes
/// to floats once for all their tokens ([`Kind::Q4Y`]), which then costs less per token.
const Q4IY_MAX_TOKENS: usize = 2;

/// Largest fixed-point activation magnitude: `127 * 2^16`, three signed bytes.
const VMAX: f32 = 8_323_072.0;

impl Layout {
    pub fn new(w: &MatView<'_>, n: usize) -> Self {
        Self::with_isa(isa(), w.format, w.cols, n)
    }

    fn with_isa(isa: Isa, format: WeightFormat, cols: usize, n: usize) -> Self {
        let mut kind = kind_for(isa, format);
        // AMX pays off from four tokens on (its per-block cost of unpacking the codes
        // and storing tiles is ~3 tokens' worth of VNNI work)
        if kind == Kind::Q4I
            && isa == Isa::Amx
            && n >= AMX_MIN_TOKENS
            && matches!(format, WeightFormat::Affine { group_size, .. } if group_size % 64 == 0)
        {
            kind = Kind::Q4A;
        }
        if kind == Kind::Q4IY && n > Q4IY_MAX_TOKENS {
            kind = Kind::Q4Y;
        }
        let group_size = match format {
            WeightFormat::Affine { group_size, .. } => group_size as usize,
            WeightFormat::Dense(_) => 0,
        };
        let groups = cols.checked_div(group_size).unwrap_or(0);
        // whole chunks / windows of 16 groups, zero padded
        let (stride, gstride, gparts) = match kind {
            Kind::Scalar => (cols, groups, 1),
            Kind::Q4 | Kind::Q8 | Kind::Dense(_) | Kind::Q4Y | Kind::Q8Y | Kind::DenseY(_) => {
                (cols.div_ceil(128) * 128, groups.div_ceil(16) * 16, 1)
            }
            // 3 bytes per element
            Kind::Q4I | Kind::Q4IY => (cols.div_ceil(128) * 96, groups.div_ceil(16) * 16, 2),
            // 3 planes of 64 bytes per 64 elements
            Kind::Q4A => (cols.div_ceil(64) * 48, groups.div_ceil(16) * 16, 2),
        };
        Layout {
            kind,
            n,
            cols,
            stride,
            gstride,
            gparts,
            group_size,
        }
    }

    /// Floats [`prepare`] writes.
    pub fn len(&self) -> usize {
        self.n * (self.stride + self.gparts * self.gstride)
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Activation row `t` as the kernel reads it.
    fn x(&self, buf: &[f32], t: usize) -> *const f32 {
        buf[t * self.stride..].as_ptr()
    }

    /// Group sums of token `t` (then, for `Q4I`, its fixed-point steps).
    fn xs(&self, buf: &[f32], t: usize) -> *const f32 {
        buf[self.n * self.stride + t * self.gparts * self.gstride..].as_ptr()
    }
}

/// Lays `x` (`n` rows of `cols`) out for the kernel into `buf` (resized to `lay.len()`).
pub fn prepare(x: &[f32], lay: &Layout, buf: &mut Vec<f32>) {
    let (n, cols) = (lay.n, lay.cols);
    buf.clear();
    buf.resize(lay.len(), 0.0);
    let (xb, sb) = buf.split_at_mut(n * lay.stride);
    for t in 0..n {
        let src = &x[t * cols..(t + 1) * cols];
        // AMX tiles want the tokens of a block adjacent: that layout spans the region
        let dst = if lay.kind == Kind::Q4A {
            &mut xb[..]
        } else {
            &mut xb[t * lay.stride..(t + 1) * lay.stride]
        };
        let gp = &mut sb[t * lay.gparts * lay.gstride..(t + 1) * lay.gparts * lay.gstride];
        match lay.kind {
            Kind::Q4 => {
                // transpose each 128-element chunk: dst[16j + k] = src[8k + j]
                for (c, d) in dst.chunks_exact_mut(128).enumerate() {
                    let s = &src[(c * 128).min(cols)..((c + 1) * 128).min(cols)];
                    for (e, v) in s.iter().enumerate() {
                        d[16 * (e % 8) + e / 8] = *v;
                    }
                }
            }
            Kind::Q4Y => {
                // transpose each 64-element chunk: dst[8j + k] = src[8k + j]
                for (c, d) in dst.chunks_exact_mut(64).enumerate() {
                    let s = &src[(c * 64).min(cols)..((c + 1) * 64).min(cols)];
                    for (e, v) in s.iter().enumerate() {
                        d[8 * (e % 8) + e / 8] = *v;
                    }
                }
            }
            Kind::Q4I | Kind::Q4A | Kind::Q4IY => {
                let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
                let steps = &mut gp[lay.gstride..];
                let amx = (lay.kind == Kind::Q4A).then_some((t, n));
                #[cfg(target_arch = "x86_64")]
                if matches!(lay.kind, Kind::Q4I | Kind::Q4A) && lay.group_size.is_multiple_of(16) {
                    // SAFETY: Q4I/Q4A are only chosen on AVX-512 (VNNI) machines (AVX2 ones,
                    // Q4IY, take the portable code below); the slices are the ones
                    // `prepare_q4i` fills.
                    unsafe { avx512::prepare_q4i(src, dst, steps, lay.group_size, amx) };
                } else {
                    prepare_q4i(src, dst, steps, lay.group_size, amx);
                }
                #[cfg(not(target_arch = "x86_64"))]
                prepare_q4i(src, dst, steps, lay.group_size, amx);
            }
            _ => dst[..cols].copy_from_slice(src),
        }
        if lay.group_size > 0 {
            for (s, c) in gp[..lay.gstride]
                .iter_mut()
                .zip(src.chunks_exact(lay.group_size))
            {
                *s = c.iter().sum();
            }
        }
    }
}

/// Fixed point for [`Kind::Q4I`]: per group `x ~ step * V` with `V` an integer of at
/// most `127 * 2^16` in magnitude, written as three signed bytes `V = 2^16 v1 + 2^8 v2 + v3`.
/// Per 128-element chunk, byte plane `k` (v1, v2, v3) takes 128 bytes: the even elements
/// (low nibbles of the packed weights) then the odd ones. With `amx = Some((t, n))`
/// (token `t` of `n`), the AMX order instead ([`super::amx`]): per 64-element block
/// and plane, the `n` tokens' 64 bytes one after the other, each group of 8 elements as
/// `0 2 4 6 1 3 5 7`.
fn prepare_q4i(
    src: &[f32],
    dst: &mut [u8],
    steps: &mut [f32],
    gs: usize,
    amx: Option<(usize, usize)>,
) {
    for (g, xg) in src.chunks_exact(gs).enumerate() {
        let m = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
        // a non-finite group poisons its result, as it would in f32
        let (step, inv) = if !m.is_finite() || xg.iter().any(|v| v.is_nan()) {
            (f32::NAN, 0.0)
        } else if m == 0.0 {
            (0.0, 0.0)
        } else {
            (m / VMAX, VMAX / m)
        };
        steps[g] = step;
        for (i, &x) in xg.iter().enumerate() {
            let e = g * gs + i;
            let v = ((x * inv).round_ties_even() as i32).clamp(-(VMAX as i32), VMAX as i32);
            let v3 = ((v + 128) & 255) - 128;
            let v = (v - v3) >> 8;
            let v2 = ((v + 128) & 255) - 128;
            let v1 = (v - v2) >> 8;
            let (at, plane) = if let Some((t, n)) = amx {
                let p = e % 8;
                (
                    ((e / 64) * 3 * n + t) * 64 + (e % 64) - p + 4 * (p % 2) + p / 2,
                    64 * n,
                )
            } else {
                (384 * (e / 128) + 64 * (e % 2) + (e % 128) / 2, 128)
            };
            dst[at] = v1 as i8 as u8;
            dst[at + plane] = v2 as i8 as u8;
            dst[at + 2 * plane] = v3 as i8 as u8;
        }
    }
}

/// Writes `out[t * ostride + r] = row(r) . x_t` for rows `r0..r1` and every token of
/// `lay`, from activations made by [`prepare`].
///
/// # Safety
/// `out` must be valid for those writes and no other thread may touch those elements.
pub unsafe fn rows_raw(
    w: &MatView<'_>,
    lay: &Layout,
    buf: &[f32],
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    assert!(r1 <= w.rows && buf.len() >= lay.len() && lay.cols == w.cols);
    match lay.kind {
        Kind::Scalar => unsafe { rows_scalar(w, lay, buf, r0, r1, out, ostride) },
        #[cfg(target_arch = "x86_64")]
        Kind::Q4IY | Kind::Q4Y | Kind::Q8Y | Kind::DenseY(_) => unsafe {
            avx2::rows(w, lay, buf, r0, r1, out, ostride)
        },
        #[cfg(target_arch = "x86_64")]
        _ => unsafe { avx512::rows(w, lay, buf, r0, r1, out, ostride) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!(),
    }
}

/// All rows, on the calling thread: `out[t * rows + r]`.
pub fn rows_serial(w: &MatView<'_>, lay: &Layout, buf: &[f32], out: &mut [f32]) {
    let out = &mut out[..lay.n * w.rows];
    // SAFETY: `out` covers every written element and is borrowed exclusively.
    unsafe { rows_raw(w, lay, buf, 0, w.rows, out.as_mut_ptr(), w.rows) }
}

unsafe fn rows_scalar(
    w: &MatView<'_>,
    lay: &Layout,
    buf: &[f32],
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    let n = lay.n;
    let cols = w.cols;
    let mut scratch = vec![0f32; cols];
    for r in r0..r1 {
        if n == 1 {
            let x = &buf[..cols];
            let xs = &buf[lay.stride..lay.stride + lay.gstride];
            // SAFETY: caller guarantees `out`.
            unsafe { *out.add(r) = w.dot_row(r, x, xs, &mut scratch) };
        } else {
            w.row_f32(r, &mut scratch);
            for t in 0..n {
                let v = dot(&scratch, &buf[t * lay.stride..t * lay.stride + cols]);
                // SAFETY: caller guarantees `out`.
                unsafe { *out.add(t * ostride + r) = v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "qdot_avx2.rs"]
#[allow(clippy::needless_range_loop)]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
mod avx512 {
    use std::arch::x86_64::*;

    use moeflux_core::{DType, WeightFormat};

    use super::{Kind, Layout, MatView};

    pub(super) unsafe fn rows(
        w: &MatView<'_>,
        lay: &Layout,
        buf: &[f32],
        r0: usize,
        r1: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        unsafe {
            match lay.kind {
                Kind::Q4 => rows_q4(w, lay, buf, r0, r1, out, ostride),
                Kind::Q4I => rows_q4i(w, lay, buf, r0, r1, out, ostride),
                #[cfg(target_os = "linux")]
                Kind::Q4A => {
                    let a = Aff::new(w);
                    let m = crate::ops::amx::kernel::Mat {
                        data: a.data,
                        scales: a.scales,
                        biases: a.biases,
                        rows: w.rows,
                        row_bytes: a.row_bytes,
                        groups: a.groups,
                        gs: a.gs,
                        sdt: a.sdt,
                    };
                    let act = crate::ops::amx::kernel::Act {
                        x: lay.x(buf, 0) as *const u8,
                        g: lay.xs(buf, 0),
                        gtok: lay.gparts * lay.gstride,
                        gstride: lay.gstride,
                        n: lay.n,
                    };
                    crate::ops::amx::kernel::rows(&m, &act, r0, r1, out, ostride)
                }
                Kind::Q8 => rows_q8(w, lay, buf, r0, r1, out, ostride),
                Kind::Dense(dt) => rows_dense(w, dt, lay, buf, r0, r1, out, ostride),
                _ => unreachable!(),
            }
        }
    }

    /// Geometry of one affine matrix.
    #[derive(Clone, Copy)]
    struct Aff {
        data: *const u8,
        scales: *const u8,
        biases: *const u8,
        row_bytes: usize,
        groups: usize,
        gs: usize,
        sdt: DType,
    }

    impl Aff {
        fn new(w: &MatView<'_>) -> Self {
            let WeightFormat::Affine {
                bits,
                group_size,
                scale_dtype,
            } = w.format
            else {
                unreachable!()
            };
            let gs = group_size as usize;
            let groups = w.cols / gs;
            let row_bytes = w.cols * bits as usize / 8;
            assert!(w.data.len() >= w.rows * row_bytes);
            assert!(w.scales.len() >= w.rows * groups * scale_dtype.size());
            assert!(w.biases.len() >= w.rows * groups * scale_dtype.size());
            Aff {
                data: w.data.as_ptr(),
                scales: w.scales.as_ptr(),
                biases: w.biases.as_ptr(),
                row_bytes,
                groups,
                gs,
                sdt: scale_dtype,
            }
        }
    }

    /// Elements `i..i+16` (those in `m`) of a float vector of `dt` as f32.
    #[inline(always)]
    unsafe fn load16(p: *const u8, dt: DType, i: usize, m: __mmask16) -> __m512 {
        unsafe {
            match dt {
                DType::F32 => _mm512_maskz_loadu_ps(m, p.add(4 * i) as *const f32),
                DType::BF16 => {
                    let h = _mm256_maskz_loadu_epi16(m, p.add(2 * i) as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.add(2 * i) as *const i16)),
            }
        }
    }

    #[inline(always)]
    fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// Bytes ahead of the row being computed that are prefetched into L1. Without it
    /// a decode matvec streams at ~70% of a plain read of the same bytes (the hardware
    /// prefetchers lag behind three interleaved streams and the arithmetic); 2-4 KB ahead
    /// brings it to 80-90% (measured with `matmul::bench::matvec_vs_read`).
    const PF_BYTES: usize = 4096;

    /// Prefetches the cache lines of `[base + from, base + to)` below `end`.
    #[inline(always)]
    fn prefetch(base: *const u8, from: usize, to: usize, end: usize) {
        let mut o = from & !63;
        let to = to.min(end);
        while o < to {
            // SAFETY: in bounds of the matrix (and prefetches never fault).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(o) as *const i8) };
            o += 64;
        }
    }

    impl Aff {
        /// Prefetches the bytes [`PF_BYTES`] past row `r`, and the scales and biases of
        /// the row they belong to.
        #[inline(always)]
        fn prefetch_row(&self, r: usize, rows: usize) {
            let rb = self.row_bytes;
            prefetch(
                self.data,
                r * rb + PF_BYTES,
                (r + 1) * rb + PF_BYTES,
                rows * rb,
            );
            let sb = self.groups * self.sdt.size();
            let ahead = r + PF_BYTES.div_ceil(rb);
            prefetch(self.scales, ahead * sb, (ahead + 1) * sb, rows * sb);
            prefetch(self.biases, ahead * sb, (ahead + 1) * sb, rows * sb);
        }
    }

    /// Rows handled per pass over the token blocks: their bytes stay in L1 while every
    /// block of tokens goes by, and a block's activations stay there across the rows.
    const ROW_CHUNK: usize = 8;

    fn row_chunks(r0: usize, r1: usize) -> impl Iterator<Item = (usize, usize)> {
        (r0..r1)
            .step_by(ROW_CHUNK)
            .map(move |r| (r, (r + ROW_CHUNK).min(r1)))
    }

    /// Dispatches `f::<N>` over blocks of up to 6 (4-bit) or 4 tokens, each weight row
    /// being read once per block (from L1 after the first).
    macro_rules! token_blocks {
        (6, $n:expr, $f:ident, ($($a:expr),*)) => {{
            let mut t0 = 0;
            while t0 < $n {
                let nb = ($n - t0).min(6);
                match nb {
                    1 => $f::<1>($($a,)* t0),
                    2 => $f::<2>($($a,)* t0),
                    3 => $f::<3>($($a,)* t0),
                    4 => $f::<4>($($a,)* t0),
                    5 => $f::<5>($($a,)* t0),
                    _ => $f::<6>($($a,)* t0),
                }
                t0 += nb;
            }
        }};
        (4, $n:expr, $f:ident, ($($a:expr),*)) => {{
            let mut t0 = 0;
            while t0 < $n {
                let nb = ($n - t0).min(4);
                match nb {
                    1 => $f::<1>($($a,)* t0),
                    2 => $f::<2>($($a,)* t0),
                    3 => $f::<3>($($a,)* t0),
                    _ => $f::<4>($($a,)* t0),
                }
                t0 += nb;
            }
        }};
    }

    // ---------------------------------------------------------------- 4-bit

    /// Lane -> group (within its 16-group window) for each 128-element chunk of a window.
    fn lane_groups(gs: usize) -> Vec<[u32; 16]> {
        (0..gs / 8)
            .map(|co| std::array::from_fn(|k| ((co * 128 + 8 * k) / gs) as u32))
            .collect()
    }

    unsafe fn rows_q4(
        w: &MatView<'_>,
        lay: &Layout,
        buf: &[f32],
        r0: usize,
        r1: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        let a = Aff::new(w);
        let xs: Vec<*const f32> = (0..lay.n).map(|t| lay.x(buf, t)).collect();
        let ss: Vec<*const f32> = (0..lay.n).map(|t| lay.xs(buf, t)).collect();
        let tab = lane_groups(a.gs);
        for (ra, rb) in row_chunks(r0, r1) {
            unsafe {
                token_blocks!(
                    6,
                    lay.n,
                    q4_block,
                    (&a, &tab, (ra, rb, w.rows), &xs, &ss, out, ostride)
                )
            };
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx2")]
    unsafe fn q4_block<const N: usize>(
        a: &Aff,
        tab: &[[u32; 16]],
        (ra, rb, rows): (usize, usize, usize),
        xs: &[*const f32],
        ss: &[*const f32],
        out: *mut f32,
        ostride: usize,
        t0: usize,
    ) {
        unsafe {
            let x: [*const f32; N] = std::array::from_fn(|t| xs[t0 + t]);
            let xsum: [*const f32; N] = std::array::from_fn(|t| ss[t0 + t]);
            for r in ra..rb {
                a.prefetch_row(r, rows);
                let res = q4_row::<N>(a, tab, r, &x, &xsum);
                for t in 0..N {
                    *out.add((t0 + t) * ostride + r) = res[t];
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn q4_row<const N: usize>(
        a: &Aff,
        tab: &[[u32; 16]],
        r: usize,
        x: &[*const f32; N],
        xsum: &[*const f32; N],
    ) -> [f32; N] {
        unsafe {
            let row = a.data.add(r * a.row_bytes);
            let sp = a.scales.add(r * a.groups * a.sdt.size());
            let bp = a.biases.add(r * a.groups * a.sdt.size());
            let iota = _mm512_setr_ps(
                0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
            );
            let nchunks = a.row_bytes.div_ceil(64);
            let tail_dw = (a.row_bytes % 64) / 4;
            let tail: __mmask16 = if tail_dw == 0 {
                0xFFFF
            } else {
                mask16(tail_dw)
            };
            let wchunks = tab.len();
            let mut tot = [_mm512_setzero_ps(); N];
            let mut c = 0;
            let mut g0 = 0;
            while g0 < a.groups {
                let m = mask16(a.groups - g0);
                let s16 = load16(sp, a.sdt, g0, m);
                let b16 = load16(bp, a.sdt, g0, m);
                for t in 0..N {
                    tot[t] = _mm512_fmadd_ps(b16, _mm512_loadu_ps(xsum[t].add(g0)), tot[t]);
                }
                let cend = (c + wchunks).min(nchunks);
                let mut co = 0;
                while c < cend {
                    let p = row.add(64 * c);
                    let wv = if c + 1 == nchunks {
                        _mm512_maskz_loadu_epi32(tail, p as *const i32)
                    } else {
                        _mm512_loadu_si512(p as *const _)
                    };
                    let sv = _mm512_permutexvar_ps(
                        _mm512_loadu_si512(tab[co].as_ptr() as *const _),
                        s16,
                    );
                    let mut a0 = [_mm512_setzero_ps(); N];
                    let mut a1 = [_mm512_setzero_ps(); N];
                    macro_rules! step {
                        ($j:literal, $acc:ident, $q:expr) => {{
                            let q = _mm512_permutexvar_ps($q, iota);
                            for t in 0..N {
                                $acc[t] = _mm512_fmadd_ps(
                                    q,
                                    _mm512_loadu_ps(x[t].add(128 * c + 16 * $j)),
                                    $acc[t],
                                );
                            }
                        }};
                    }
                    step!(0, a0, wv);
                    step!(1, a1, _mm512_srli_epi32::<4>(wv));
                    step!(2, a0, _mm512_srli_epi32::<8>(wv));
                    step!(3, a1, _mm512_srli_epi32::<12>(wv));
                    step!(4, a0, _mm512_srli_epi32::<16>(wv));
                    step!(5, a1, _mm512_srli_epi32::<20>(wv));
                    step!(6, a0, _mm512_srli_epi32::<24>(wv));
                    step!(7, a1, _mm512_srli_epi32::<28>(wv));
                    for t in 0..N {
                        tot[t] = _mm512_fmadd_ps(_mm512_add_ps(a0[t], a1[t]), sv, tot[t]);
                    }
                    c += 1;
                    co += 1;
                }
                g0 += 16;
            }
            std::array::from_fn(|t| _mm512_reduce_add_ps(tot[t]))
        }
    }

    // ---------------------------------------------------------------- 4-bit, VNNI

    /// [`super::prepare_q4i`] 16 elements at a time (`gs % 16 == 0`); same results.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx2")]
    pub(super) unsafe fn prepare_q4i(
        src: &[f32],
        dst: &mut [u8],
        steps: &mut [f32],
        gs: usize,
        amx: Option<(usize, usize)>,
    ) {
        unsafe {
            let groups = src.len() / gs;
            let need = match amx {
                Some((_, n)) => src.len().div_ceil(64) * 192 * n,
                None => src.len().div_ceil(128) * 384,
            };
            assert!(dst.len() >= need && steps.len() >= groups);
            let amx_order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
            let vmax = _mm512_set1_epi32(super::VMAX as i32);
            let vmin = _mm512_set1_epi32(-(super::VMAX as i32));
            let c128 = _mm512_set1_epi32(128);
            let c255 = _mm512_set1_epi32(255);
            // even bytes to the low half, odd to the high half
            let deint = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
            let absm = _mm512_set1_epi32(0x7fff_ffff);
            for g in 0..groups {
                let xg = src.as_ptr().add(g * gs);
                let mut m = _mm512_setzero_ps();
                for i in (0..gs).step_by(16) {
                    m = _mm512_max_ps(
                        m,
                        _mm512_castsi512_ps(_mm512_and_si512(
                            _mm512_castps_si512(_mm512_loadu_ps(xg.add(i))),
                            absm,
                        )),
                    );
                }
                // NaN lanes: max_ps returns its second operand when one is NaN
                let mut bad = false;
                for i in (0..gs).step_by(16) {
                    let v = _mm512_loadu_ps(xg.add(i));
                    bad |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) != 0;
                }
                let mx = _mm512_reduce_max_ps(m);
                let (step, inv) = if bad || !mx.is_finite() {
                    (f32::NAN, 0.0)
                } else if mx == 0.0 {
                    (0.0, 0.0)
                } else {
                    (mx / super::VMAX, super::VMAX / mx)
                };
                steps[g] = step;
                let vinv = _mm512_set1_ps(inv);
                for i in (0..gs).step_by(16) {
                    let e = g * gs + i;
                    let xv = _mm512_loadu_ps(xg.add(i));
                    // zero, NaN or infinite groups store zeros (NaN * 0 would convert to i32::MIN)
                    let xv = if inv == 0.0 { _mm512_setzero_ps() } else { xv };
                    let v = _mm512_cvtps_epi32(_mm512_mul_ps(xv, vinv));
                    let v = _mm512_max_epi32(_mm512_min_epi32(v, vmax), vmin);
                    let v3 =
                        _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), c255), c128);
                    let v = _mm512_srai_epi32::<8>(_mm512_sub_epi32(v, v3));
                    let v2 =
                        _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, c128), c255), c128);
                    let v1 = _mm512_srai_epi32::<8>(_mm512_sub_epi32(v, v2));
                    if let Some((t, n)) = amx {
                        for (k, p) in [v1, v2, v3].into_iter().enumerate() {
                            let at = (((e / 64) * 3 + k) * n + t) * 64 + e % 64;
                            let b = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(p), amx_order);
                            _mm_storeu_si128(dst.as_mut_ptr().add(at) as *mut __m128i, b);
                        }
                        continue;
                    }
                    let at = 384 * (e / 128) + (e % 128) / 2;
                    for (k, p) in [v1, v2, v3].into_iter().enumerate() {
                        let b = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(p), deint);
                        let d = dst.as_mut_ptr().add(at + 128 * k);
                        _mm_storel_epi64(d as *mut __m128i, b);
                        _mm_storel_epi64(d.add(64) as *mut __m128i, _mm_unpackhi_epi64(b, b));
                    }
                }
            }
        }
    }

    unsafe fn rows_q4i(
        w: &MatView<'_>,
        lay: &Layout,
        buf: &[f32],
        r0: usize,
        r1: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        let a = Aff::new(w);
        let xs: Vec<*const f32> = (0..lay.n).map(|t| lay.x(buf, t)).collect();
        let ss: Vec<*const f32> = (0..lay.n).map(|t| lay.xs(buf, t)).collect();
        let tab = lane_groups(a.gs);
        for (ra, rb) in row_chunks(r0, r1) {
            unsafe {
                token_blocks!(
                    6,
                    lay.n,
                    q4i_block,
                    (
                        &a,
                        &tab,
                        lay.gstride,
                        (ra, rb, w.rows),
                        &xs,
                        &ss,
                        out,
                        ostride
                    )
                )
            };
        }
    }

    /// One row against `N` tokens. Per 64-byte chunk the low and high nibbles meet the
    /// even and odd activations; the three byte planes go through `vpdpbusd` with a
    /// shift of 8 between planes, which keeps `sum q V` exact (|lane| < 15 * 128 * 8 *
    /// 65793 < 2^31).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx2,avx512vnni")]
    unsafe fn q4i_block<const N: usize>(
        a: &Aff,
        tab: &[[u32; 16]],
        gstride: usize,
        (ra, rb, rows): (usize, usize, usize),
        xs: &[*const f32],
        ss: &[*const f32],
        out: *mut f32,
        ostride: usize,
        t0: usize,
    ) {
        unsafe {
            let x: [*const u8; N] = std::array::from_fn(|t| xs[t0 + t] as *const u8);
            let sums: [*const f32; N] = std::array::from_fn(|t| ss[t0 + t]);
            let steps: [*const f32; N] = std::array::from_fn(|t| ss[t0 + t].add(gstride));
            for r in ra..rb {
                a.prefetch_row(r, rows);
                let row = a.data.add(r * a.row_bytes);
                let sp = a.scales.add(r * a.groups * a.sdt.size());
                let bp = a.biases.add(r * a.groups * a.sdt.size());
                let m0f = _mm512_set1_epi8(0x0f);
                let nchunks = a.row_bytes.div_ceil(64);
                let tail_dw = (a.row_bytes % 64) / 4;
                let tail: __mmask16 = if tail_dw == 0 {
                    0xFFFF
                } else {
                    mask16(tail_dw)
                };
                let wchunks = tab.len();
                let mut tot = [_mm512_setzero_ps(); N];
                let mut c = 0;
                let mut g0 = 0;
                while g0 < a.groups {
                    let m = mask16(a.groups - g0);
                    let s16 = load16(sp, a.sdt, g0, m);
                    let b16 = load16(bp, a.sdt, g0, m);
                    let mut sd = [_mm512_setzero_ps(); N];
                    for t in 0..N {
                        tot[t] = _mm512_fmadd_ps(b16, _mm512_loadu_ps(sums[t].add(g0)), tot[t]);
                        sd[t] = _mm512_mul_ps(s16, _mm512_loadu_ps(steps[t].add(g0)));
                    }
                    let cend = (c + wchunks).min(nchunks);
                    let mut co = 0;
                    while c < cend {
                        let p = row.add(64 * c);
                        let wv = if c + 1 == nchunks {
                            _mm512_maskz_loadu_epi32(tail, p as *const i32)
                        } else {
                            _mm512_loadu_si512(p as *const _)
                        };
                        let idx = _mm512_loadu_si512(tab[co].as_ptr() as *const _);
                        let lo = _mm512_and_si512(wv, m0f);
                        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), m0f);
                        for t in 0..N {
                            let xb = x[t].add(384 * c);
                            let ld = |o: usize| _mm512_loadu_si512(xb.add(o) as *const _);
                            let mut acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, ld(0));
                            acc = _mm512_dpbusd_epi32(acc, hi, ld(64));
                            acc = _mm512_slli_epi32::<8>(acc);
                            acc = _mm512_dpbusd_epi32(acc, lo, ld(128));
                            acc = _mm512_dpbusd_epi32(acc, hi, ld(192));
                            acc = _mm512_slli_epi32::<8>(acc);
                            acc = _mm512_dpbusd_epi32(acc, lo, ld(256));
                            acc = _mm512_dpbusd_epi32(acc, hi, ld(320));
                            tot[t] = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(acc),
                                _mm512_permutexvar_ps(idx, sd[t]),
                                tot[t],
                            );
                        }
                        c += 1;
                        co += 1;
                    }
                    g0 += 16;
                }
                for t in 0..N {
                    *out.add((t0 + t) * ostride + r) = _mm512_reduce_add_ps(tot[t]);
                }
            }
        }
    }

    // ---------------------------------------------------------------- 8-bit

    unsafe fn rows_q8(
        w: &MatView<'_>,
        lay: &Layout,
        buf: &[f32],
        r0: usize,
        r1: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        let a = Aff::new(w);
        let xs: Vec<*const f32> = (0..lay.n).map(|t| lay.x(buf, t)).collect();
        let ss: Vec<*const f32> = (0..lay.n).map(|t| lay.xs(buf, t)).collect();
        for (ra, rb) in row_chunks(r0, r1) {
            unsafe {
                token_blocks!(
                    4,
                    lay.n,
                    q8_block,
                    (&a, (ra, rb, w.rows), &xs, &ss, out, ostride)
                )
            };
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx2")]
    unsafe fn q8_block<const N: usize>(
        a: &Aff,
        (ra, rb, rows): (usize, usize, usize),
        xs: &[*const f32],
        ss: &[*const f32],
        out: *mut f32,
        ostride: usize,
        t0: usize,
    ) {
        unsafe {
            let x: [*const f32; N] = std::array::from_fn(|t| xs[t0 + t]);
            let xsum: [*const f32; N] = std::array::from_fn(|t| ss[t0 + t]);
            for r in ra..rb {
                a.prefetch_row(r, rows);
                let res = q8_row::<N>(a, r, &x, &xsum);
                for t in 0..N {
                    *out.add((t0 + t) * ostride + r) = res[t];
                }
            }
        }
    }

    /// 8-bit rows: 32 elements (two vectors of 16, one group) per step.
    #[inline(always)]
    unsafe fn q8_row<const N: usize>(
        a: &Aff,
        r: usize,
        x: &[*const f32; N],
        xsum: &[*const f32; N],
    ) -> [f32; N] {
        unsafe {
            let row = a.data.add(r * a.row_bytes);
            let sp = a.scales.add(r * a.groups * a.sdt.size());
            let bp = a.biases.add(r * a.groups * a.sdt.size());
            let mut tot = [_mm512_setzero_ps(); N];
            let mut g0 = 0;
            while g0 < a.groups {
                let ng = (a.groups - g0).min(16);
                let m = mask16(ng);
                let s16 = load16(sp, a.sdt, g0, m);
                let b16 = load16(bp, a.sdt, g0, m);
                for t in 0..N {
                    tot[t] = _mm512_fmadd_ps(b16, _mm512_loadu_ps(xsum[t].add(g0)), tot[t]);
                }
                for gi in 0..ng {
                    let sv = _mm512_permutexvar_ps(_mm512_set1_epi32(gi as i32), s16);
                    let e0 = (g0 + gi) * a.gs;
                    let mut a0 = [_mm512_setzero_ps(); N];
                    let mut a1 = [_mm512_setzero_ps(); N];
                    let mut e = e0;
                    while e < e0 + a.gs {
                        let q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                            row.add(e) as *const _,
                        )));
                        let q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                            row.add(e + 16) as *const _,
                        )));
                        for t in 0..N {
                            a0[t] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(x[t].add(e)), a0[t]);
                            a1[t] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x[t].add(e + 16)), a1[t]);
                        }
                        e += 32;
                    }
                    for t in 0..N {
                        tot[t] = _mm512_fmadd_ps(_mm512_add_ps(a0[t], a1[t]), sv, tot[t]);
                    }
                }
                g0 += 16;
            }
            std::array::from_fn(|t| _mm512_reduce_add_ps(tot[t]))
        }
    }

    // ---------------------------------------------------------------- dense

    unsafe fn rows_dense(
        w: &MatView<'_>,
        dt: DType,
        lay: &Layout,
        buf: &[f32],
        r0: usize,
        r1: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        assert!(w.data.len() >= w.rows * w.cols * dt.size());
        let xs: Vec<*const f32> = (0..lay.n).map(|t| lay.x(buf, t)).collect();
        let d = Dense {
            data: w.data.as_ptr(),
            cols: w.cols,
            dt,
        };
        for (ra, rb) in row_chunks(r0, r1) {
            unsafe {
                token_blocks!(
                    4,
                    lay.n,
                    dense_block,
                    (&d, (ra, rb, w.rows), &xs, out, ostride)
                )
            };
        }
    }

    struct Dense {
        data: *const u8,
        cols: usize,
        dt: DType,
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx2")]
    unsafe fn dense_block<const N: usize>(
        d: &Dense,
        (ra, rb, rows): (usize, usize, usize),
        xs: &[*const f32],
        out: *mut f32,
        ostride: usize,
        t0: usize,
    ) {
        unsafe {
            let x: [*const f32; N] = std::array::from_fn(|t| xs[t0 + t]);
            let bytes = d.cols * d.dt.size();
            for r in ra..rb {
                prefetch(
                    d.data,
                    r * bytes + PF_BYTES,
                    (r + 1) * bytes + PF_BYTES,
                    rows * bytes,
                );
                let res = match d.dt {
                    DType::BF16 => dense_row::<N, 0>(d, r, &x),
                    DType::F16 => dense_row::<N, 1>(d, r, &x),
                    _ => dense_row::<N, 2>(d, r, &x),
                };
                for t in 0..N {
                    *out.add((t0 + t) * ostride + r) = res[t];
                }
            }
        }
    }

    /// 16 weights at element `i` of a dense row (`D`: 0 bf16, 1 f16, 2 f32), lanes in `m`.
    #[inline(always)]
    unsafe fn dense16<const D: u8>(row: *const u8, i: usize, m: __mmask16) -> __m512 {
        unsafe {
            match D {
                0 => {
                    let h = _mm256_maskz_loadu_epi16(m, row.add(2 * i) as *const i16);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                1 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row.add(2 * i) as *const i16)),
                _ => _mm512_maskz_loadu_ps(m, row.add(4 * i) as *const f32),
            }
        }
    }

    #[inline(always)]
    unsafe fn dense_row<const N: usize, const D: u8>(
        d: &Dense,
        r: usize,
        x: &[*const f32; N],
    ) -> [f32; N] {
        unsafe {
            let esz = if D == 2 { 4 } else { 2 };
            let row = d.data.add(r * d.cols * esz);
            let mut acc = [[_mm512_setzero_ps(); 4]; N];
            let mut i = 0;
            while i + 64 <= d.cols {
                for u in 0..4 {
                    let wv = dense16::<D>(row, i + 16 * u, 0xFFFF);
                    for t in 0..N {
                        acc[t][u] =
                            _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[t].add(i + 16 * u)), acc[t][u]);
                    }
                }
                i += 64;
            }
            let mut u = 0;
            while i < d.cols {
                let wv = dense16::<D>(row, i, mask16(d.cols - i));
                for t in 0..N {
                    acc[t][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x[t].add(i)), acc[t][u]);
                }
                i += 16;
                u += 1;
            }
            std::array::from_fn(|t| {
                let s = _mm512_add_ps(
                    _mm512_add_ps(acc[t][0], acc[t][1]),
                    _mm512_add_ps(acc[t][2], acc[t][3]),
                );
                _mm512_reduce_add_ps(s)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn put(dt: DType, v: f32, out: &mut Vec<u8>) {
        match dt {
            DType::F32 => out.extend(v.to_le_bytes()),
            DType::BF16 => out.extend(half::bf16::from_f32(v).to_bits().to_le_bytes()),
            DType::F16 => out.extend(half::f16::from_f32(v).to_bits().to_le_bytes()),
            _ => unreachable!(),
        }
    }

    /// A random matrix in `format`, stored at byte offset `skew` (unaligned).
    struct Mat {
        data: Vec<u8>,
        scales: Vec<u8>,
        biases: Vec<u8>,
        rows: usize,
        cols: usize,
        format: WeightFormat,
        skew: usize,
    }

    impl Mat {
        fn new(rng: &mut Rng, rows: usize, cols: usize, format: WeightFormat, skew: usize) -> Self {
            let mut data = vec![0u8; skew];
            let (mut scales, mut biases) = (vec![0u8; skew], vec![0u8; skew]);
            match format {
                WeightFormat::Dense(dt) => {
                    for _ in 0..rows * cols {
                        put(dt, rng.f(), &mut data);
                    }
                }
                WeightFormat::Affine {
                    bits,
                    group_size,
                    scale_dtype,
                } => {
                    for _ in 0..format.data_bytes(rows, cols) {
                        data.push(rng.next() as u8);
                    }
                    let _ = bits;
                    for _ in 0..rows * cols / group_size as usize {
                        put(scale_dtype, rng.f() * 0.1, &mut scales);
                        put(scale_dtype, rng.f(), &mut biases);
                    }
                }
            }
            Mat {
                data,
                scales,
                biases,
                rows,
                cols,
                format,
                skew,
            }
        }

        fn view(&self) -> MatView<'_> {
            MatView {
                data: &self.data[self.skew..],
                scales: &self.scales[self.skew.min(self.scales.len())..],
                biases: &self.biases[self.skew.min(self.biases.len())..],
                rows: self.rows,
                cols: self.cols,
                format: self.format,
            }
        }
    }

    /// f64 reference: dequantized row . x.
    fn reference(w: &MatView<'_>, x: &[f32], n: usize) -> Vec<f64> {
        let mut row = vec![0f32; w.cols];
        let mut out = vec![0f64; n * w.rows];
        for r in 0..w.rows {
            w.row_f32(r, &mut row);
            for t in 0..n {
                out[t * w.rows + r] = row
                    .iter()
                    .zip(&x[t * w.cols..(t + 1) * w.cols])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
            }
        }
        out
    }

    fn run(isa: Isa, w: &MatView<'_>, x: &[f32], n: usize) -> Vec<f32> {
        let lay = Layout::with_isa(isa, w.format, w.cols, n);
        let mut buf = Vec::new();
        prepare(x, &lay, &mut buf);
        let mut out = vec![f32::NAN; n * w.rows];
        rows_serial(w, &lay, &buf, &mut out);
        out
    }

    fn formats() -> Vec<WeightFormat> {
        let mut f = vec![
            WeightFormat::Dense(DType::F32),
            WeightFormat::Dense(DType::BF16),
            WeightFormat::Dense(DType::F16),
        ];
        for bits in [4u8, 8] {
            for group_size in [32u32, 64, 128] {
                for scale_dtype in [DType::BF16, DType::F16, DType::F32] {
                    f.push(WeightFormat::Affine {
                        bits,
                        group_size,
                        scale_dtype,
                    });
                }
            }
        }
        f.push(WeightFormat::Affine {
            bits: 4,
            group_size: 8,
            scale_dtype: DType::BF16,
        });
        f.push(WeightFormat::Affine {
            bits: 4,
            group_size: 24,
            scale_dtype: DType::F32,
        });
        f
    }

    /// Every kernel against an f64 reference, on odd shapes, unaligned data and several
    /// batch sizes. All paths are f32 arithmetic, so the bound is a small multiple of
    /// f32 rounding on `sum |w x|`.
    #[test]
    fn kernels_match_reference() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let mut isas = vec![Isa::Scalar, detect()];
        if matches!(detect(), Isa::Avx512Vnni | Isa::Amx) {
            isas.push(Isa::Avx512);
        }
        if detect() == Isa::Amx {
            isas.push(Isa::Avx512Vnni);
        }
        if detect() != Isa::Scalar {
            isas.push(Isa::Avx2);
        }
        for format in formats() {
            let gs = match format {
                WeightFormat::Affine { group_size, .. } => group_size as usize,
                _ => 16,
            };
            for &cols in &[gs.max(24), 2 * gs.max(16), 192, 320, 1024, 1088] {
                if cols % gs != 0 {
                    continue;
                }
                let rows = if cols == 1024 { 37 } else { 7 };
                let m = Mat::new(&mut rng, rows, cols, format, 3);
                let w = m.view();
                for n in [1usize, 2, 5, 9, 17] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
                    let want = reference(&w, &x, n);
                    let mut row = vec![0f32; cols];
                    let scale: Vec<f64> = (0..n * rows)
                        .map(|i| {
                            let (t, r) = (i / rows, i % rows);
                            w.row_f32(r, &mut row);
                            row.iter()
                                .zip(&x[t * cols..(t + 1) * cols])
                                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                                .sum::<f64>()
                        })
                        .collect();
                    for &isa in &isas {
                        let got = run(isa, &w, &x, n);
                        // fixed-point activations: error <= 2^-24 max|x_g| per element
                        let tol = 2e-6;
                        for i in 0..n * rows {
                            let err = (got[i] as f64 - want[i]).abs() / scale[i].max(1e-30);
                            assert!(
                                err < tol,
                                "{format} cols {cols} n {n} {isa:?}: [{i}] got {} want {} (rel {err:.2e})",
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vectorized fixed-point layout is byte-identical to the portable one, NaNs,
    /// zero groups and outliers included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn prepare_q4i_matches() {
        if !matches!(detect(), Isa::Avx512Vnni | Isa::Amx) {
            return;
        }
        let mut rng = Rng(7);
        for gs in [16usize, 32, 64, 128] {
            let cols = 8 * gs.max(48);
            let mut x: Vec<f32> = (0..cols)
                .map(|i| rng.f() * if i % 37 == 0 { 1e3 } else { 1.0 })
                .collect();
            x[..gs].fill(0.0);
            x[gs + 3] = f32::NAN;
            x[2 * gs + 5] = f32::INFINITY;
            let groups = cols / gs;
            let (mut d1, mut d2) = (
                vec![0u8; cols.div_ceil(128) * 384],
                vec![0u8; cols.div_ceil(128) * 384],
            );
            let (mut s1, mut s2) = (vec![0f32; groups], vec![0f32; groups]);
            for amx in [None, Some((0, 1))] {
                prepare_q4i(&x, &mut d1, &mut s1, gs, amx);
                unsafe { avx512::prepare_q4i(&x, &mut d2, &mut s2, gs, amx) };
                assert_eq!(d1, d2, "gs {gs} amx {amx:?}");
            }
            for (a, b) in s1.iter().zip(&s2) {
                assert!(a == b || (a.is_nan() && b.is_nan()), "gs {gs}: {a} vs {b}");
            }
            assert!(s1[1].is_nan() && s1[2].is_nan() && s1[0] == 0.0);
        }
    }

    /// A token's result does not depend on the batch it is computed in (SIMD kernels;
    /// the portable fallback dequantizes rows for batches).
    #[test]
    fn batch_invariant() {
        if detect() == Isa::Scalar {
            return;
        }
        let mut rng = Rng(12345);
        for format in formats() {
            let cols = 1024;
            let m = Mat::new(&mut rng, 5, cols, format, 1);
            let w = m.view();
            let n = 11;
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f()).collect();
            let all = run(detect(), &w, &x, n);
            // batched kernels against batched kernels (AMX serves AMX_MIN_TOKENS+)
            let b = AMX_MIN_TOKENS;
            for t in 0..n - b {
                let part = run(detect(), &w, &x[t * cols..(t + b) * cols], b);
                assert_eq!(&all[t * 5..(t + 1) * 5], &part[..5], "{format} token {t}");
            }
        }
    }
}

/// Kernel throughput: `cargo test --release -p moeflux-cpu qdot_bench -- --ignored --nocapture`.
#[cfg(test)]
mod bench {
    use std::time::Instant;

    use super::*;

    fn mat(rows: usize, cols: usize, format: WeightFormat) -> (Vec<u8>, Vec<u8>) {
        let mut data: Vec<u8> = (0..format.data_bytes(rows, cols))
            .map(|i| ((i * 2654435761usize) >> 7) as u8)
            .collect();
        if let WeightFormat::Dense(_) = format {
            // normal floats only (denormals would measure microcode assists)
            for (i, b) in data.iter_mut().enumerate() {
                if i % 2 == 1 {
                    *b = 0x3c;
                }
            }
        }
        let sb = format.scale_bytes(rows, cols);
        let scales: Vec<u8> = (0..sb).map(|i| if i % 2 == 1 { 0x3c } else { 0 }).collect();
        (data, scales)
    }

    #[test]
    #[ignore]
    fn qdot_bench() {
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
        for (name, format, rows, cols) in [
            ("q4 l2", q4, 768, 2048),
            ("q4 l3", q4, 8192, 2048),
            ("q4 dram", q4, 65536, 2048),
            ("q8 l2", q8, 512, 2048),
            ("bf16 l2", WeightFormat::Dense(DType::BF16), 256, 2048),
        ] {
            if std::env::var("QDOT_BENCH").is_ok_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            let (data, scales) = mat(rows, cols, format);
            let w = MatView {
                data: &data,
                scales: &scales,
                biases: &scales,
                rows,
                cols,
                format,
            };
            let bytes = format.total_bytes(rows, cols) as f64;
            let ns: Vec<usize> = match std::env::var("QDOT_N") {
                Ok(v) => vec![v.parse().unwrap()],
                Err(_) => vec![1, 4, 6, 8],
            };
            for n in ns {
                let x: Vec<f32> = (0..n * cols).map(|i| (i % 13) as f32 * 0.1).collect();
                let lay = Layout::new(&w, n);
                let mut buf = Vec::new();
                prepare(&x, &lay, &mut buf);
                let mut out = vec![0f32; n * rows];
                // many short trials, best kept: the machine is shared
                let reps = (1e6 / bytes).clamp(1.0, 100.0) as usize;
                let trials = (3e8 / (bytes * reps as f64 * n as f64)).clamp(20.0, 300.0) as usize;
                let mut best = f64::MAX;
                if n == 1 {
                    println!("{:?} kernels", isa());
                }
                for _ in 0..trials {
                    let t = Instant::now();
                    for _ in 0..reps {
                        rows_serial(&w, &lay, &buf, &mut out);
                    }
                    best = best.min(t.elapsed().as_secs_f64() / reps as f64);
                }
                let macs = (rows * cols * n) as f64;
                println!(
                    "{name:8} {rows}x{cols} n={n}: {:7.1} us  {:6.1} GB/s  {:6.1} GMAC/s",
                    best * 1e6,
                    bytes / best / 1e9,
                    macs / best / 1e9
                );
            }
        }
    }
}
