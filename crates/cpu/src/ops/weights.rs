//! Read-only views of stored weights and their dequantization to f32.

use std::borrow::Cow;

use half::{bf16, f16};
use moeflux_core::{DType, WeightFormat};

/// Elements of a stored float vector as f32 (borrowed when already f32 and aligned).
pub fn floats(bytes: &[u8], dtype: DType, len: usize) -> Cow<'_, [f32]> {
    let bytes = &bytes[..len * dtype.size()];
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        },
        DType::BF16 => Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        ),
        DType::F16 => Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        ),
        DType::U32 | DType::I32 | DType::U8 => {
            unreachable!("non-float vector; rejected when the model is loaded")
        }
    }
}

/// A weight matrix `[rows, cols]` as stored.
#[derive(Clone, Copy)]
pub struct MatView<'a> {
    pub data: &'a [u8],
    pub scales: &'a [u8],
    pub biases: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub format: WeightFormat,
}

#[inline]
fn scalar(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 => {
            let b = &bytes[4 * i..4 * i + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        DType::BF16 => {
            bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
        }
        DType::F16 => f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        _ => unreachable!("scale dtype checked at load"),
    }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

impl<'a> MatView<'a> {
    fn row_bytes(&self) -> usize {
        self.format.data_bytes(1, self.cols)
    }

    /// Dequantizes row `r` into `out[..cols]`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        let out = &mut out[..self.cols];
        match self.format {
            WeightFormat::Dense(DType::F32) => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            WeightFormat::Dense(DType::BF16) => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            WeightFormat::Dense(DType::F16) => {
                for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            WeightFormat::Dense(dt) => unreachable!("dense {dt} matrix rejected at load"),
            WeightFormat::Affine {
                bits,
                group_size,
                scale_dtype,
            } => {
                let gs = group_size as usize;
                let groups = self.cols / gs;
                for g in 0..groups {
                    let s = scalar(self.scales, scale_dtype, r * groups + g);
                    let b = scalar(self.biases, scale_dtype, r * groups + g);
                    let o = &mut out[g * gs..(g + 1) * gs];
                    if bits == 4 {
                        let src = &row[g * gs / 2..(g + 1) * gs / 2];
                        for (pair, byte) in o.chunks_exact_mut(2).zip(src) {
                            pair[0] = s * (byte & 15) as f32 + b;
                            pair[1] = s * (byte >> 4) as f32 + b;
                        }
                    } else {
                        let src = &row[g * gs..(g + 1) * gs];
                        for (v, byte) in o.iter_mut().zip(src) {
                            *v = s * *byte as f32 + b;
                        }
                    }
                }
            }
        }
    }

    /// `row(r) . x` without materialising the row (the decode path). `xsum` holds the
    /// per-group sums of `x` for affine formats (empty otherwise).
    #[inline]
    pub fn dot_row(&self, r: usize, x: &[f32], xsum: &[f32], scratch: &mut [f32]) -> f32 {
        match self.format {
            WeightFormat::Affine {
                bits,
                group_size,
                scale_dtype,
            } => {
                let gs = group_size as usize;
                let groups = self.cols / gs;
                let rb = self.row_bytes();
                let row = &self.data[r * rb..(r + 1) * rb];
                let mut acc = 0f32;
                for g in 0..groups {
                    let s = scalar(self.scales, scale_dtype, r * groups + g);
                    let b = scalar(self.biases, scale_dtype, r * groups + g);
                    let xg = &x[g * gs..(g + 1) * gs];
                    let mut q = [0f32; 8];
                    if bits == 4 {
                        let src = &row[g * gs / 2..(g + 1) * gs / 2];
                        for (xc, bc) in xg.chunks_exact(8).zip(src.chunks_exact(4)) {
                            for j in 0..4 {
                                q[2 * j] += (bc[j] & 15) as f32 * xc[2 * j];
                                q[2 * j + 1] += (bc[j] >> 4) as f32 * xc[2 * j + 1];
                            }
                        }
                    } else {
                        let src = &row[g * gs..(g + 1) * gs];
                        for (xc, bc) in xg.chunks_exact(8).zip(src.chunks_exact(8)) {
                            for j in 0..8 {
                                q[j] += bc[j] as f32 * xc[j];
                            }
                        }
                    }
                    acc += s * q.iter().sum::<f32>() + b * xsum[g];
                }
                acc
            }
            WeightFormat::Dense(DType::F32) => {
                let rb = self.row_bytes();
                match bytemuck::try_cast_slice::<u8, f32>(&self.data[r * rb..(r + 1) * rb]) {
                    Ok(w) => dot(w, x),
                    Err(_) => {
                        self.row_f32(r, scratch);
                        dot(&scratch[..self.cols], x)
                    }
                }
            }
            WeightFormat::Dense(_) => {
                self.row_f32(r, scratch);
                dot(&scratch[..self.cols], x)
            }
        }
    }

    /// Per-group sums of `x` needed by [`Self::dot_row`].
    pub fn group_sums(&self, x: &[f32]) -> Vec<f32> {
        match self.format {
            WeightFormat::Affine { group_size, .. } => x[..self.cols]
                .chunks_exact(group_size as usize)
                .map(|c| c.iter().sum())
                .collect(),
            WeightFormat::Dense(_) => Vec::new(),
        }
    }
}
