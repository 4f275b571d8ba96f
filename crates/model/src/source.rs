//! Safetensors files of a model directory, memory-mapped.
//!
//! Each file is mapped once and registered with the backend as one weight buffer; a
//! tensor is an offset into it. Headers are validated up front (every tensor must lie
//! inside the file), so a truncated download fails at open with the file and tensor
//! named, not with garbage at the first forward pass.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use moeflux_core::DType;

use crate::error::ModelError;

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub file: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Offset from the start of the file's data section.
    pub offset: usize,
    pub bytes: usize,
}

pub struct SafetensorsFile {
    pub path: PathBuf,
    /// The whole file: a memory map, or bytes built in memory (synthetic models).
    pub data: moeflux_core::SharedBytes,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
}

pub struct WeightSource {
    pub dir: PathBuf,
    /// `__metadata__.format` of the files ("mlx" for MLX-saved checkpoints, "pt", ...).
    pub format: Option<String>,
    pub files: Vec<SafetensorsFile>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::U32 => DType::U32,
        S::I32 => DType::I32,
        S::U8 => DType::U8,
        _ => return None,
    })
}

impl WeightSource {
    /// Opens every `*.safetensors` in `dir` (sorted by name; the index file, when present,
    /// only has to agree with what the files contain).
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let rd = std::fs::read_dir(dir).map_err(|e| ModelError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mut src = WeightSource {
            dir: dir.to_path_buf(),
            format: None,
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for path in paths {
            src.add_file(path)?;
        }
        src.check_index()?;
        Ok(src)
    }

    /// Parses safetensors files already in memory (`name` labels errors).
    pub fn from_buffers(
        dir: &Path,
        files: Vec<(PathBuf, moeflux_core::SharedBytes)>,
    ) -> Result<Self, ModelError> {
        let mut src = WeightSource {
            dir: dir.to_path_buf(),
            format: None,
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for (path, data) in files {
            src.add_bytes(path, data)?;
        }
        Ok(src)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<(), ModelError> {
        let io = |e| ModelError::Io {
            path: path.clone(),
            source: e,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only; a checkpoint modified underneath a running engine
        // is outside what we can defend against (same contract as every mmap loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        self.add_bytes(path, Arc::new(mmap))
    }

    fn add_bytes(
        &mut self,
        path: PathBuf,
        data: moeflux_core::SharedBytes,
    ) -> Result<(), ModelError> {
        let mmap: &[u8] = (*data).as_ref();
        let bad = |msg: String| ModelError::BadSafetensors {
            path: path.clone(),
            msg,
        };
        if mmap.len() < 8 {
            return Err(bad(format!(
                "{} bytes, shorter than the 8-byte header length",
                mmap.len()
            )));
        }
        let n = u64::from_le_bytes(mmap[..8].try_into().unwrap()) as usize;
        if n > mmap.len() - 8 {
            return Err(bad(format!(
                "header claims {n} bytes but the file has {}",
                mmap.len()
            )));
        }
        let header: serde_json::Value = serde_json::from_slice(&mmap[8..8 + n])
            .map_err(|e| bad(format!("header JSON: {e}")))?;
        let obj = header
            .as_object()
            .ok_or_else(|| bad("header is not a JSON object".into()))?;
        let data_start = 8 + n;
        let data_len = mmap.len() - data_start;
        let fidx = self.files.len();
        for (name, v) in obj {
            if name == "__metadata__" {
                if let Some(f) = v.get("format").and_then(|f| f.as_str()) {
                    self.format.get_or_insert_with(|| f.to_string());
                }
                continue;
            }
            let info: safetensors::tensor::TensorInfo = serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
            let (start, end) = info.data_offsets;
            if end > data_len {
                return Err(ModelError::Truncated {
                    path: path.clone(),
                    tensor: name.clone(),
                    end: data_start + end,
                    len: mmap.len(),
                });
            }
            let dtype = dtype_of(info.dtype).ok_or_else(|| ModelError::DType {
                name: name.clone(),
                path: path.clone(),
                dtype: format!("{:?}", info.dtype),
                what: "not one of f32, f16, bf16, u32, i32, u8",
            })?;
            let elems: usize = info.shape.iter().product();
            if start > end || end - start != elems * dtype.size() {
                return Err(bad(format!(
                    "tensor '{name}': {} bytes for shape {:?} of {dtype}",
                    end.saturating_sub(start),
                    info.shape
                )));
            }
            self.tensors.insert(
                name.clone(),
                TensorInfo {
                    file: fidx,
                    dtype,
                    shape: info.shape,
                    offset: start,
                    bytes: end - start,
                },
            );
        }
        self.files.push(SafetensorsFile {
            path,
            data: data.clone(),
            data_start,
        });
        Ok(())
    }

    fn check_index(&self) -> Result<(), ModelError> {
        let path = self.dir.join("model.safetensors.index.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) {
            for (name, file) in map {
                if !self.tensors.contains_key(name) {
                    return Err(ModelError::MissingTensor {
                        name: format!(
                            "{name} (listed in the index under {})",
                            file.as_str().unwrap_or("?")
                        ),
                        dir: self.dir.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn require(&self, name: &str) -> Result<&TensorInfo, ModelError> {
        self.get(name).ok_or_else(|| ModelError::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })
    }

    pub fn path_of(&self, t: &TensorInfo) -> &Path {
        &self.files[t.file].path
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }
}
