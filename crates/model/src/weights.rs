//! Resolving tensor names to typed weight references ([`Matrix`], [`Vector`]).
//!
//! Shapes are checked against the spec here, so a checkpoint that does not match its
//! config fails at load naming the tensor, the file and both shapes.

use moeflux_core::{
    BufId, BufferPool, DType, Matrix, Region, Vector, Weight, WeightBytes, WeightFormat,
};

use crate::config::QuantConfig;
use crate::error::ModelError;
use crate::source::{TensorInfo, WeightSource};

pub struct Loader<'a> {
    pub src: &'a WeightSource,
    bufs: Vec<BufId<Weight>>,
    quant: Option<&'a QuantConfig>,
}

impl<'a> Loader<'a> {
    /// Registers every file with the backend (one weight buffer per file).
    pub fn new(
        src: &'a WeightSource,
        quant: Option<&'a QuantConfig>,
        pool: &mut dyn BufferPool,
    ) -> Result<Self, ModelError> {
        let mut bufs = Vec::new();
        for f in &src.files {
            let wb = WeightBytes::new(f.data.clone(), f.data_start..(*f.data).as_ref().len());
            let label = f
                .path
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            bufs.push(BufId::from_raw(pool.register_weights(wb, &label)?));
        }
        Ok(Loader { src, bufs, quant })
    }

    fn region(&self, t: &TensorInfo, extra: usize) -> Region {
        Region {
            buf: self.bufs[t.file],
            offset: t.offset + extra,
        }
    }

    /// The stored bytes of `len` bytes at `r` (for converters reading resolved weights).
    pub fn bytes(&self, r: Region, len: usize) -> &'a [u8] {
        let f = self
            .bufs
            .iter()
            .position(|b| *b == r.buf)
            .expect("region from this loader");
        let file = &self.src.files[f];
        &(*file.data).as_ref()[file.data_start + r.offset..file.data_start + r.offset + len]
    }

    pub fn has(&self, name: &str) -> bool {
        self.src.get(name).is_some()
    }

    fn shape_err(&self, name: &str, t: &TensorInfo, expected: Vec<usize>) -> ModelError {
        ModelError::Shape {
            name: name.to_string(),
            path: self.src.path_of(t).to_path_buf(),
            expected,
            found: t.shape.clone(),
        }
    }

    fn float(&self, name: &str, t: &TensorInfo) -> Result<(), ModelError> {
        if !t.dtype.is_float() {
            return Err(ModelError::DType {
                name: name.into(),
                path: self.src.path_of(t).into(),
                dtype: t.dtype.to_string(),
                what: "expected a float tensor",
            });
        }
        Ok(())
    }

    /// A vector of `len` elements (any shape with that many elements, e.g. conv weights
    /// stored `[C, 1, K]` by transformers or `[C, K, 1]` by MLX: same element order).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vector, ModelError> {
        let t = self.src.require(name)?;
        self.float(name, t)?;
        if t.shape.iter().product::<usize>() != len {
            return Err(self.shape_err(name, t, vec![len]));
        }
        Ok(Vector {
            data: self.region(t, 0),
            len,
            dtype: t.dtype,
        })
    }

    /// The matrix of module `module` (`{module}.weight`, plus `.scales`/`.biases` when
    /// quantized), `[rows, cols]`.
    pub fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, ModelError> {
        Ok(self
            .stacked_at(module, "weight", None, rows, cols)?
            .remove(0))
    }

    /// `experts` matrices stacked in one tensor `[experts, rows, cols]` (`{module}.{suffix}`).
    pub fn stacked(
        &self,
        module: &str,
        suffix: &str,
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Matrix>, ModelError> {
        self.stacked_at(module, suffix, Some(experts), rows, cols)
    }

    fn stacked_at(
        &self,
        module: &str,
        suffix: &str,
        experts: Option<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Matrix>, ModelError> {
        let name = format!("{module}.{suffix}");
        let lead: Vec<usize> = experts.into_iter().collect();
        let count = experts.unwrap_or(1);
        let with = |tail: &[usize]| -> Vec<usize> { lead.iter().chain(tail).copied().collect() };
        let t = self.src.require(&name)?;
        let scales_name = format!("{module}.scales");
        if let Some(st) = self.src.get(&scales_name) {
            let (bits, gs) = self
                .quant
                .and_then(|q| q.for_module(module))
                .ok_or_else(|| ModelError::DType {
                    name: name.clone(),
                    path: self.src.path_of(t).into(),
                    dtype: t.dtype.to_string(),
                    what: "has scales but config.json has no quantization for it",
                })?;
            if !matches!(bits, 4 | 8)
                || gs == 0
                || !gs.is_multiple_of(8)
                || !cols.is_multiple_of(gs as usize)
            {
                return Err(ModelError::DType {
                    name,
                    path: self.src.path_of(t).into(),
                    dtype: format!("q{bits}/g{gs}"),
                    what: "supported: 4 or 8 bits, group size a multiple of 8 dividing the input width",
                });
            }
            if t.dtype != DType::U32 {
                return Err(ModelError::DType {
                    name,
                    path: self.src.path_of(t).into(),
                    dtype: t.dtype.to_string(),
                    what: "packed quantized weights must be u32",
                });
            }
            if t.shape != with(&[rows, cols * bits as usize / 32]) {
                return Err(self.shape_err(&name, t, with(&[rows, cols * bits as usize / 32])));
            }
            let bt = self.src.require(&format!("{module}.biases"))?;
            for (n, s) in [(&scales_name, st), (&format!("{module}.biases"), bt)] {
                self.float(n, s)?;
                if s.shape != with(&[rows, cols / gs as usize]) {
                    return Err(self.shape_err(n, s, with(&[rows, cols / gs as usize])));
                }
            }
            if st.dtype != bt.dtype {
                return Err(ModelError::DType {
                    name: format!("{module}.biases"),
                    path: self.src.path_of(bt).into(),
                    dtype: bt.dtype.to_string(),
                    what: "scales and biases differ in dtype",
                });
            }
            let format = WeightFormat::Affine {
                bits,
                group_size: gs,
                scale_dtype: st.dtype,
            };
            let (db, sb) = (
                format.data_bytes(rows, cols),
                format.scale_bytes(rows, cols),
            );
            return Ok((0..count)
                .map(|e| Matrix {
                    data: self.region(t, e * db),
                    scales: Some(self.region(st, e * sb)),
                    biases: Some(self.region(bt, e * sb)),
                    rows,
                    cols,
                    format,
                })
                .collect());
        }
        self.float(&name, t)?;
        if t.shape != with(&[rows, cols]) {
            return Err(self.shape_err(&name, t, with(&[rows, cols])));
        }
        let format = WeightFormat::Dense(t.dtype);
        let db = format.data_bytes(rows, cols);
        Ok((0..count)
            .map(|e| Matrix {
                data: self.region(t, e * db),
                scales: None,
                biases: None,
                rows,
                cols,
                format,
            })
            .collect())
    }

    /// Rows `[start, start + rows)` of every stacked matrix (splits a fused `gate_up`).
    pub fn row_slice(m: &Matrix, start: usize, rows: usize) -> Matrix {
        let shift = |r: Region, per_row: usize| Region {
            buf: r.buf,
            offset: r.offset + start * per_row,
        };
        let drow = m.format.data_bytes(1, m.cols);
        let srow = m.format.scale_bytes(1, m.cols);
        Matrix {
            data: shift(m.data, drow),
            scales: m.scales.map(|s| shift(s, srow)),
            biases: m.biases.map(|b| shift(b, srow)),
            rows,
            cols: m.cols,
            format: m.format,
        }
    }
}
