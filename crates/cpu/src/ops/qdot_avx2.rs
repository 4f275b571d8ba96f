//! AVX2 + FMA (+ F16C) row kernels for x86_64 machines without AVX-512, 8 lanes wide.
//!
//! 4-bit ([`Kind::Q4IY`]): the arithmetic of the AVX-512 VNNI kernel (`Q4I`) on AVX2. The
//! activations are the same 24-bit fixed point in three signed byte planes (same layout,
//! made by [`super::prepare_q4i`]); `vpdpbusd` is emulated by `vpmaddubsw` (codes x bytes,
//! pairs summed in 16 bits: |15 * 128 * 2| < 2^15, so it never saturates) and `vpmaddwd`
//! against ones. A 32-byte chunk of codes holds 64 elements; dword lane `k` holds elements
//! `8k..8k+8` (low nibbles the even ones, high nibbles the odd ones), so a lane's sum stays in
//! one group and is scaled per group after the chunk; the bias term uses per-group sums of
//! `x`. The integer sums are exact, so results equal the VNNI kernel's up to f32 summation
//! order. Compared with turning codes into floats (shift, mask, convert, FMA per 8
//! elements) this issues about half the instructions per byte of weights.
//! Batches of 3+ tokens take [`Kind::Q4Y`] instead, exact f32 like the AVX-512 `Q4`: a
//! 32-byte chunk's codes are turned into floats once (shift, mask, convert) and meet each
//! token's activations, stored transposed per chunk (`xp[8j + k] = x[8k + j]`), in one FMA
//! per 8 elements, which costs less per token than the integer planes once the conversion
//! is shared.
//! 8-bit and dense formats: exact f32 like the AVX-512 `Q8`/dense kernels.
//! Tails that a full-width load would run past (the last scales of a matrix, a row's last
//! partial chunk) go through a small stack copy.

use std::arch::x86_64::*;

use moeflux_core::{DType, WeightFormat};

use super::{Kind, Layout, MatView};

/// Token blocks: each row is read once per block of up to 4 tokens.
const TB: usize = 4;
/// Rows per pass over the token blocks.
const ROW_CHUNK: usize = 8;

/// # Safety
/// AVX2, FMA and F16C must be available; as [`super::rows_raw`] otherwise.
pub(super) unsafe fn rows(
    w: &MatView<'_>,
    lay: &Layout,
    buf: &[f32],
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    let xs: Vec<*const f32> = (0..lay.n).map(|t| lay.x(buf, t)).collect();
    let ss: Vec<*const f32> = (0..lay.n).map(|t| lay.xs(buf, t)).collect();
    let mut r = r0;
    while r < r1 {
        let re = (r + ROW_CHUNK).min(r1);
        let mut t0 = 0;
        while t0 < lay.n {
            let nb = (lay.n - t0).min(TB);
            // SAFETY: forwarded from the caller.
            unsafe {
                match (lay.kind, nb) {
                    (Kind::Q4Y, 1) => q4::<1>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4IY, 1) => q4i::<1>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        lay.gstride,
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4Y, 2) => q4::<2>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4IY, 2) => q4i::<2>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        lay.gstride,
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4Y, 3) => q4::<3>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4IY, 3) => q4i::<3>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        lay.gstride,
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4Y, _) => q4::<4>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q4IY, _) => q4i::<4>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        lay.gstride,
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q8Y, 1) => q8::<1>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q8Y, 2) => q8::<2>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q8Y, 3) => q8::<3>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::Q8Y, _) => q8::<4>(
                        w,
                        &xs[t0..],
                        &ss[t0..],
                        r,
                        re,
                        out.add(t0 * ostride),
                        ostride,
                    ),
                    (Kind::DenseY(_), 1) => {
                        dense::<1>(w, &xs[t0..], r, re, out.add(t0 * ostride), ostride)
                    }
                    (Kind::DenseY(_), 2) => {
                        dense::<2>(w, &xs[t0..], r, re, out.add(t0 * ostride), ostride)
                    }
                    (Kind::DenseY(_), 3) => {
                        dense::<3>(w, &xs[t0..], r, re, out.add(t0 * ostride), ostride)
                    }
                    (Kind::DenseY(_), _) => {
                        dense::<4>(w, &xs[t0..], r, re, out.add(t0 * ostride), ostride)
                    }
                    _ => unreachable!(),
                }
            }
            t0 += nb;
        }
        r = re;
    }
}

/// Elements `i..i+n` (`n <= 8`) of a float vector of `dt` as f32, lanes past `n` zero.
#[inline(always)]
unsafe fn load8(p: *const u8, dt: DType, i: usize, n: usize) -> __m256 {
    unsafe {
        let sz = dt.size();
        let mut tmp = [0u8; 32];
        let src = if n >= 8 {
            p.add(i * sz)
        } else {
            std::ptr::copy_nonoverlapping(p.add(i * sz), tmp.as_mut_ptr(), n * sz);
            tmp.as_ptr()
        };
        match dt {
            DType::F32 => _mm256_loadu_ps(src as *const f32),
            DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(src as *const _),
            ))),
            _ => _mm256_cvtph_ps(_mm_loadu_si128(src as *const _)),
        }
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// Per chunk of a window of 8 groups, the group (within the window) of each dword lane of a
/// 64-element chunk: lane `k` holds elements `8k..8k+8`.
#[inline(always)]
unsafe fn lane_groups(gs: usize) -> Vec<__m256i> {
    unsafe {
        (0..gs / 8)
            .map(|co| {
                let v: [i32; 8] = std::array::from_fn(|k| ((co * 64 + 8 * k) / gs) as i32);
                _mm256_loadu_si256(v.as_ptr() as *const _)
            })
            .collect()
    }
}

/// The 32 code bytes of chunk `c` of a row (`tail` bytes, zero padded, for a last partial
/// chunk).
#[inline(always)]
unsafe fn code_chunk(row: *const u8, c: usize, nchunks: usize, tail: usize) -> __m256i {
    unsafe {
        if c + 1 == nchunks && tail != 0 {
            let mut tmp = [0u8; 32];
            std::ptr::copy_nonoverlapping(row.add(32 * c), tmp.as_mut_ptr(), tail);
            _mm256_loadu_si256(tmp.as_ptr() as *const _)
        } else {
            _mm256_loadu_si256(row.add(32 * c) as *const _)
        }
    }
}

struct Geo {
    data: *const u8,
    scales: *const u8,
    biases: *const u8,
    row_bytes: usize,
    groups: usize,
    gs: usize,
    sdt: DType,
}

fn geo(w: &MatView<'_>) -> Geo {
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
    assert!(
        w.scales.len() >= w.rows * groups * scale_dtype.size()
            && w.biases.len() >= w.rows * groups * scale_dtype.size()
    );
    Geo {
        data: w.data.as_ptr(),
        scales: w.scales.as_ptr(),
        biases: w.biases.as_ptr(),
        row_bytes,
        groups,
        gs,
        sdt: scale_dtype,
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4i<const N: usize>(
    w: &MatView<'_>,
    xs: &[*const f32],
    ss: &[*const f32],
    gstride: usize,
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    unsafe {
        let g = geo(w);
        let x: [*const u8; N] = std::array::from_fn(|t| xs[t] as *const u8);
        let xsum: [*const f32; N] = std::array::from_fn(|t| ss[t]);
        let steps: [*const f32; N] = std::array::from_fn(|t| ss[t].add(gstride));
        // chunks per window of 8 groups
        let wchunks = g.gs / 8;
        let tab = lane_groups(g.gs);
        let m0f = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let nchunks = g.row_bytes.div_ceil(32);
        let tail = g.row_bytes % 32;
        for r in r0..r1 {
            let row = g.data.add(r * g.row_bytes);
            let sp = g.scales.add(r * g.groups * g.sdt.size());
            let bp = g.biases.add(r * g.groups * g.sdt.size());
            let mut tot = [_mm256_setzero_ps(); N];
            let mut c = 0;
            let mut g0 = 0;
            while g0 < g.groups {
                let ng = (g.groups - g0).min(8);
                let s8 = load8(sp, g.sdt, g0, ng);
                let b8 = load8(bp, g.sdt, g0, ng);
                let mut sd = [_mm256_setzero_ps(); N];
                for t in 0..N {
                    tot[t] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(xsum[t].add(g0)), tot[t]);
                    sd[t] = _mm256_mul_ps(s8, _mm256_loadu_ps(steps[t].add(g0)));
                }
                let cend = (c + wchunks).min(nchunks);
                let mut co = 0;
                while c < cend {
                    let wv = code_chunk(row, c, nchunks, tail);
                    let lo = _mm256_and_si256(wv, m0f);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), m0f);
                    for t in 0..N {
                        // this chunk's 32 even and 32 odd activations of each byte plane
                        let xb = x[t].add(384 * (c / 2) + 32 * (c % 2));
                        let ld = |o: usize| _mm256_loadu_si256(xb.add(o) as *const _);
                        let plane = |o: usize| {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, ld(o)),
                                _mm256_maddubs_epi16(hi, ld(o + 64)),
                            );
                            _mm256_madd_epi16(p, ones)
                        };
                        let mut acc = _mm256_slli_epi32::<8>(plane(0));
                        acc = _mm256_slli_epi32::<8>(_mm256_add_epi32(acc, plane(128)));
                        acc = _mm256_add_epi32(acc, plane(256));
                        tot[t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(acc),
                            _mm256_permutevar8x32_ps(sd[t], tab[co]),
                            tot[t],
                        );
                    }
                    c += 1;
                    co += 1;
                }
                g0 += 8;
            }
            for t in 0..N {
                *out.add(t * ostride + r) = hsum(tot[t]);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4<const N: usize>(
    w: &MatView<'_>,
    xs: &[*const f32],
    ss: &[*const f32],
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    unsafe {
        let g = geo(w);
        let x: [*const f32; N] = std::array::from_fn(|t| xs[t]);
        let xsum: [*const f32; N] = std::array::from_fn(|t| ss[t]);
        // chunks per window of 8 groups
        let wchunks = g.gs / 8;
        let tab = lane_groups(g.gs);
        let m0f = _mm256_set1_epi32(0xf);
        let nchunks = g.row_bytes.div_ceil(32);
        let tail = g.row_bytes % 32;
        for r in r0..r1 {
            let row = g.data.add(r * g.row_bytes);
            let sp = g.scales.add(r * g.groups * g.sdt.size());
            let bp = g.biases.add(r * g.groups * g.sdt.size());
            let mut tot = [_mm256_setzero_ps(); N];
            let mut c = 0;
            let mut g0 = 0;
            while g0 < g.groups {
                let ng = (g.groups - g0).min(8);
                let s8 = load8(sp, g.sdt, g0, ng);
                let b8 = load8(bp, g.sdt, g0, ng);
                for t in 0..N {
                    tot[t] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(xsum[t].add(g0)), tot[t]);
                }
                let cend = (c + wchunks).min(nchunks);
                let mut co = 0;
                while c < cend {
                    let wv = code_chunk(row, c, nchunks, tail);
                    let sv = _mm256_permutevar8x32_ps(s8, tab[co]);
                    let mut a0 = [_mm256_setzero_ps(); N];
                    let mut a1 = [_mm256_setzero_ps(); N];
                    macro_rules! step {
                        ($j:literal, $acc:ident) => {{
                            let q = _mm256_cvtepi32_ps(_mm256_and_si256(
                                _mm256_srli_epi32::<{ 4 * $j }>(wv),
                                m0f,
                            ));
                            for t in 0..N {
                                $acc[t] = _mm256_fmadd_ps(
                                    q,
                                    _mm256_loadu_ps(x[t].add(64 * c + 8 * $j)),
                                    $acc[t],
                                );
                            }
                        }};
                    }
                    step!(0, a0);
                    step!(1, a1);
                    step!(2, a0);
                    step!(3, a1);
                    step!(4, a0);
                    step!(5, a1);
                    step!(6, a0);
                    step!(7, a1);
                    for t in 0..N {
                        tot[t] = _mm256_fmadd_ps(_mm256_add_ps(a0[t], a1[t]), sv, tot[t]);
                    }
                    c += 1;
                    co += 1;
                }
                g0 += 8;
            }
            for t in 0..N {
                *out.add(t * ostride + r) = hsum(tot[t]);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8<const N: usize>(
    w: &MatView<'_>,
    xs: &[*const f32],
    ss: &[*const f32],
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    unsafe {
        let g = geo(w);
        let x: [*const f32; N] = std::array::from_fn(|t| xs[t]);
        let xsum: [*const f32; N] = std::array::from_fn(|t| ss[t]);
        for r in r0..r1 {
            let row = g.data.add(r * g.row_bytes);
            let sp = g.scales.add(r * g.groups * g.sdt.size());
            let bp = g.biases.add(r * g.groups * g.sdt.size());
            let mut tot = [_mm256_setzero_ps(); N];
            let mut g0 = 0;
            while g0 < g.groups {
                let ng = (g.groups - g0).min(8);
                let s8: [f32; 8] = std::mem::transmute(load8(sp, g.sdt, g0, ng));
                let b8 = load8(bp, g.sdt, g0, ng);
                for t in 0..N {
                    tot[t] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(xsum[t].add(g0)), tot[t]);
                }
                for (gi, &s) in s8.iter().enumerate().take(ng) {
                    let e0 = (g0 + gi) * g.gs;
                    let mut a0 = [_mm256_setzero_ps(); N];
                    let mut a1 = [_mm256_setzero_ps(); N];
                    let mut e = e0;
                    while e < e0 + g.gs {
                        let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            row.add(e) as *const _,
                        )));
                        let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            row.add(e + 8) as *const _,
                        )));
                        for t in 0..N {
                            a0[t] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(x[t].add(e)), a0[t]);
                            a1[t] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(x[t].add(e + 8)), a1[t]);
                        }
                        e += 16;
                    }
                    let sv = _mm256_set1_ps(s);
                    for t in 0..N {
                        tot[t] = _mm256_fmadd_ps(_mm256_add_ps(a0[t], a1[t]), sv, tot[t]);
                    }
                }
                g0 += 8;
            }
            for t in 0..N {
                *out.add(t * ostride + r) = hsum(tot[t]);
            }
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense<const N: usize>(
    w: &MatView<'_>,
    xs: &[*const f32],
    r0: usize,
    r1: usize,
    out: *mut f32,
    ostride: usize,
) {
    unsafe {
        let WeightFormat::Dense(dt) = w.format else {
            unreachable!()
        };
        let esz = dt.size();
        assert!(w.data.len() >= w.rows * w.cols * esz);
        let x: [*const f32; N] = std::array::from_fn(|t| xs[t]);
        let ld = |p: *const u8| match dt {
            DType::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p as *const _),
            ))),
            DType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const _)),
            _ => _mm256_loadu_ps(p as *const f32),
        };
        let full = w.cols / 8 * 8;
        for r in r0..r1 {
            let row = w.data.as_ptr().add(r * w.cols * esz);
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let mut i = 0;
            while i + 16 <= full {
                let w0 = ld(row.add(i * esz));
                let w1 = ld(row.add((i + 8) * esz));
                for t in 0..N {
                    acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t].add(i)), acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t].add(i + 8)), acc[t][1]);
                }
                i += 16;
            }
            if i < full {
                let w0 = ld(row.add(i * esz));
                for t in 0..N {
                    acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t].add(i)), acc[t][0]);
                }
                i += 8;
            }
            for t in 0..N {
                let mut v = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
                let row = &w.data[r * w.cols * esz..(r + 1) * w.cols * esz];
                for j in i..w.cols {
                    let b = &row[j * esz..(j + 1) * esz];
                    let wj = match dt {
                        DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                        DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    };
                    v += wj * *x[t].add(j);
                }
                *out.add(t * ostride + r) = v;
            }
        }
    }
}
