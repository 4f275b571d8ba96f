//! Element types of stored tensors and the formats weight matrices come in.

use std::fmt;

/// Element type of a stored tensor (as safetensors names them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
            DType::U8 => "u8",
        };
        f.write_str(s)
    }
}

/// How a weight matrix `[rows, cols]` (rows = outputs, cols = inputs) is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Plain row-major elements of this float type.
    Dense(DType),
    /// MLX affine quantization: each row is split into groups of `group_size` inputs;
    /// element = scale * q + bias with `bits`-bit unsigned q packed little-endian into
    /// u32 words (element j of a word sits at bits `bits*j`). Scales and biases are
    /// `[rows, cols / group_size]` of `scale_dtype`.
    Affine {
        bits: u8,
        group_size: u32,
        scale_dtype: DType,
    },
}

impl WeightFormat {
    /// Bytes of the packed data of a `[rows, cols]` matrix (not counting scales/biases).
    pub fn data_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            WeightFormat::Dense(dt) => rows * cols * dt.size(),
            WeightFormat::Affine { bits, .. } => rows * cols * bits as usize / 8,
        }
    }

    /// Bytes of scales (and, separately, of biases) of a `[rows, cols]` matrix.
    pub fn scale_bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            WeightFormat::Dense(_) => 0,
            WeightFormat::Affine {
                group_size,
                scale_dtype,
                ..
            } => rows * (cols / group_size as usize) * scale_dtype.size(),
        }
    }

    /// Total bytes read to use the whole matrix once.
    pub fn total_bytes(self, rows: usize, cols: usize) -> usize {
        self.data_bytes(rows, cols) + 2 * self.scale_bytes(rows, cols)
    }
}

impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Dense(dt) => write!(f, "{dt}"),
            WeightFormat::Affine {
                bits,
                group_size,
                scale_dtype,
            } => {
                write!(f, "q{bits}/g{group_size} ({scale_dtype} scales)")
            }
        }
    }
}
