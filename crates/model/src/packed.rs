//! The packed layout (`moeflux convert`) and the expert store that reads it.
//!
//! A packed model directory is opened like any other: `config.json`, tokenizer files,
//! `dense.safetensors` (everything but the routed experts) and `experts/layer_NNN.bin`,
//! where each expert is one contiguous record `[gate | up | down]` (each part: packed
//! weights, scales, biases, 64-byte aligned; records 4096-byte aligned) so one positional
//! read fetches one expert. `manifest.json` holds the record layout and a CRC32 per record
//! and per file; every read from disk is checked against it.
//!
//! Conversion streams one tensor (or one expert) at a time, so memory stays bounded by the
//! largest single tensor whatever the model size, and writes into a temporary directory
//! renamed into place at the end: a killed run never leaves a directory that looks complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use moeflux_core::{
    BufId, CoreError, DType, ExpertProvider, ExpertWeights, Matrix, Region, WeightFormat,
};
use serde::{Deserialize, Serialize};

use crate::arch::{self, Ffn};
use crate::config::{Arch, ModelSpec};
use crate::error::ModelError;
use crate::source::WeightSource;
use crate::weights::Loader;

pub const MANIFEST: &str = "manifest.json";
const ALIGN: usize = 64;
const RECORD_ALIGN: usize = 4096;
/// Group size of weights quantized during conversion (32 for widths 64 does not divide).
const GROUP: usize = 64;

fn group_for(cols: usize) -> Option<usize> {
    [GROUP, 32].into_iter().find(|g| cols.is_multiple_of(*g))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |e| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn round_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartLayout {
    pub rows: usize,
    pub cols: usize,
    /// 4 or 8 (packed affine) — experts are always stored quantized.
    pub bits: u8,
    pub group_size: u32,
    /// "f32" | "bf16" | "f16"
    pub scale_dtype: String,
    pub data: usize,
    pub scales: usize,
    pub biases: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerFile {
    pub layer: usize,
    pub file: String,
    pub crc32: Vec<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub experts: usize,
    pub record_bytes: usize,
    pub parts: Vec<PartLayout>,
    pub layers: Vec<LayerFile>,
    pub dense_file: String,
    pub dense_crc32: u32,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::U32 => "u32",
        DType::I32 => "i32",
        DType::U8 => "u8",
    }
}

fn dtype_parse(s: &str) -> Option<DType> {
    Some(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => return None,
    })
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::U32 => "U32",
        DType::I32 => "I32",
        DType::U8 => "U8",
    }
}

/// f32 values of a stored float tensor.
fn to_f32(bytes: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => unreachable!("float tensors only"),
    }
}

/// MLX-style affine quantization of a row-major `[rows, cols]` matrix, groups of 64 along
/// the row: q = round((w - min) / scale), scale = (max - min) / (2^bits - 1), bias = min,
/// with scale and bias rounded to bf16 first so dequantization reproduces the rounding.
/// Returns (packed data, scales, biases) as bytes.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    group: usize,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let levels = ((1u32 << bits) - 1) as f32;
    let groups = cols / group;
    let mut data = Vec::with_capacity(rows * cols * bits as usize / 8);
    let (mut scales, mut biases) = (
        Vec::with_capacity(rows * groups * 2),
        Vec::with_capacity(rows * groups * 2),
    );
    let mut q = vec![0u8; group];
    for r in 0..rows {
        for g in 0..groups {
            let v = &w[r * cols + g * group..r * cols + (g + 1) * group];
            let (lo, hi) = v
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
                    (a.min(*x), b.max(*x))
                });
            let scale = bf16::from_f32(((hi - lo) / levels).max(1e-12));
            let bias = bf16::from_f32(lo);
            let (s, b) = (scale.to_f32(), bias.to_f32());
            for (qi, x) in q.iter_mut().zip(v) {
                *qi = ((x - b) / s).round().clamp(0.0, levels) as u8;
            }
            if bits == 4 {
                data.extend(q.chunks_exact(2).map(|p| p[0] | (p[1] << 4)));
            } else {
                data.extend_from_slice(&q);
            }
            scales.extend_from_slice(&scale.to_bits().to_le_bytes());
            biases.extend_from_slice(&bias.to_bits().to_le_bytes());
        }
    }
    (data, scales, biases)
}

/// One matrix as packed bytes: copied verbatim when already quantized, quantized otherwise.
fn pack_matrix(
    ld: &Loader,
    m: &Matrix,
    bits: u8,
) -> Result<(PartLayout, [Vec<u8>; 3]), ModelError> {
    match m.format {
        WeightFormat::Affine {
            bits: b,
            group_size,
            scale_dtype,
        } => {
            let (db, sb) = (
                m.format.data_bytes(m.rows, m.cols),
                m.format.scale_bytes(m.rows, m.cols),
            );
            let bytes = [
                ld.bytes(m.data, db).to_vec(),
                ld.bytes(m.scales.expect("quantized"), sb).to_vec(),
                ld.bytes(m.biases.expect("quantized"), sb).to_vec(),
            ];
            Ok((
                PartLayout {
                    rows: m.rows,
                    cols: m.cols,
                    bits: b,
                    group_size,
                    scale_dtype: dtype_name(scale_dtype).into(),
                    data: 0,
                    scales: 0,
                    biases: 0,
                },
                bytes,
            ))
        }
        WeightFormat::Dense(dt) => {
            let group = group_for(m.cols).ok_or_else(|| ModelError::Config {
                path: ld.src.dir.clone(),
                field: "experts".into(),
                msg: format!("expert width {} is not a multiple of 32", m.cols),
            })?;
            let w = to_f32(ld.bytes(m.data, m.format.data_bytes(m.rows, m.cols)), dt);
            let (d, s, b) = quantize(&w, m.rows, m.cols, bits, group);
            Ok((
                PartLayout {
                    rows: m.rows,
                    cols: m.cols,
                    bits,
                    group_size: group as u32,
                    scale_dtype: "bf16".into(),
                    data: 0,
                    scales: 0,
                    biases: 0,
                },
                [d, s, b],
            ))
        }
    }
}

/// Lays the parts of one expert out in a record; returns the layout and the record bytes.
fn build_record(parts: Vec<(PartLayout, [Vec<u8>; 3])>) -> (Vec<PartLayout>, Vec<u8>) {
    let mut rec = Vec::new();
    let mut layout = Vec::new();
    for (mut p, bytes) in parts {
        let mut at = [0usize; 3];
        for (i, b) in bytes.iter().enumerate() {
            rec.resize(round_up(rec.len(), ALIGN), 0);
            at[i] = rec.len();
            rec.extend_from_slice(b);
        }
        (p.data, p.scales, p.biases) = (at[0], at[1], at[2]);
        layout.push(p);
    }
    rec.resize(round_up(rec.len(), RECORD_ALIGN), 0);
    (layout, rec)
}

/// Progress reports: (done, total, what).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

fn is_expert_tensor(name: &str) -> bool {
    name.contains(".mlp.experts.") || name.contains(".mlp.switch_mlp.")
}

fn is_router(name: &str) -> bool {
    name.ends_with(".mlp.gate.weight") || name.ends_with(".shared_expert_gate.weight")
}

/// `moeflux convert`: writes the packed layout of `src` into `dst`.
pub fn convert(
    src_dir: &Path,
    dst: &Path,
    bits: u8,
    progress: Progress,
) -> Result<Manifest, ModelError> {
    if !matches!(bits, 4 | 8) {
        return Err(ModelError::Config {
            path: dst.to_path_buf(),
            field: "--bits".into(),
            msg: format!("{bits} (use 4 or 8)"),
        });
    }
    if dst.exists() {
        return Err(ModelError::Io {
            path: dst.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output exists; remove it or pick another path",
            ),
        });
    }
    let spec = ModelSpec::from_dir(src_dir)?;
    let src = WeightSource::open(src_dir)?;
    let mut pool = RegionPool::default();
    let ld = Loader::new(&src, spec.quant.as_ref(), &mut pool)?;
    let weights = match spec.arch {
        Arch::Qwen3Next | Arch::Qwen35Moe => arch::qwen3_next::load(&ld, &spec, None)?,
        Arch::Qwen3Moe => arch::qwen3_moe::load(&ld, &spec, None)?,
    };
    let tmp = dst.with_file_name(format!(
        ".{}.partial-{}",
        dst.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("experts")).map_err(io_err(&tmp))?;
    let result = (|| {
        let quantize_dense = spec.quant.is_none();
        let total_experts = weights
            .layers
            .iter()
            .filter(|l| matches!(l.ffn, Ffn::Moe(_)))
            .count() as u64
            * spec.moe.experts as u64;
        let total = src.tensors.len() as u64 + total_experts;
        let mut done = 0u64;
        // 1. experts, one record at a time
        let mut layout: Option<(Vec<PartLayout>, usize)> = None;
        let mut layers = Vec::new();
        for (l, lw) in weights.layers.iter().enumerate() {
            let Ffn::Moe(m) = &lw.ffn else { continue };
            let arch::Experts::Resident(experts) = &m.experts else {
                unreachable!("loaded from safetensors")
            };
            let name = format!("experts/layer_{l:03}.bin");
            let path = tmp.join(&name);
            let mut f = BufWriter::new(File::create(&path).map_err(io_err(&path))?);
            let mut crcs = Vec::new();
            for e in experts.iter() {
                let parts = vec![
                    pack_matrix(&ld, &e.gate, bits)?,
                    pack_matrix(&ld, &e.up, bits)?,
                    pack_matrix(&ld, &e.down, bits)?,
                ];
                let (lay, rec) = build_record(parts);
                match &layout {
                    None => layout = Some((lay, rec.len())),
                    Some(x) if x.0 != lay => {
                        return Err(ModelError::Config {
                            path: src_dir.to_path_buf(),
                            field: "experts".into(),
                            msg: format!("layer {l}: experts differ in storage format"),
                        });
                    }
                    _ => {}
                }
                crcs.push(crc32fast::hash(&rec));
                f.write_all(&rec).map_err(io_err(&path))?;
                done += 1;
                progress(done, total, "experts");
            }
            f.flush().map_err(io_err(&path))?;
            layers.push(LayerFile {
                layer: l,
                file: name,
                crc32: crcs,
            });
        }
        // Every record has the same layout, hence the same (aligned) length.
        let (parts, record_bytes) = layout.ok_or_else(|| ModelError::Config {
            path: src_dir.to_path_buf(),
            field: "num_experts".into(),
            msg: "model has no MoE layers to pack".into(),
        })?;

        // 2. dense tensors into one safetensors file (header first: sizes are known)
        struct Entry {
            name: String,
            dtype: DType,
            shape: Vec<usize>,
            bytes: usize,
            source: String,
            quant: bool,
        }
        let mut entries = Vec::new();
        let mut overrides = serde_json::Map::new();
        for (name, t) in &src.tensors {
            if is_expert_tensor(name) || name.contains(".visual.") || name.starts_with("visual.") {
                continue;
            }
            let module = name.strip_suffix(".weight");
            let group = if t.shape.len() == 2 {
                group_for(t.shape[1])
            } else {
                None
            };
            let quant = quantize_dense
                && t.dtype.is_float()
                && module.is_some()
                && !name.contains("norm")
                && group.is_some();
            if quant {
                let (b, g) = (
                    if is_router(name) { 8 } else { bits },
                    group.expect("checked"),
                );
                if b != bits || g != GROUP {
                    overrides.insert(
                        module.unwrap().to_string(),
                        serde_json::json!({"group_size": g, "bits": b}),
                    );
                }
                let (r, c) = (t.shape[0], t.shape[1]);
                let m = module.unwrap();
                entries.push(Entry {
                    name: name.clone(),
                    dtype: DType::U32,
                    shape: vec![r, c * b as usize / 32],
                    bytes: r * c * b as usize / 8,
                    source: name.clone(),
                    quant: true,
                });
                for suffix in ["scales", "biases"] {
                    entries.push(Entry {
                        name: format!("{m}.{suffix}"),
                        dtype: DType::BF16,
                        shape: vec![r, c / g],
                        bytes: r * (c / g) * 2,
                        source: name.clone(),
                        quant: true,
                    });
                }
            } else {
                entries.push(Entry {
                    name: name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    bytes: t.bytes,
                    source: name.clone(),
                    quant: false,
                });
            }
        }
        let mut header = serde_json::Map::new();
        // Keep the writer's stamp: it tells the loader the norm-weight convention.
        header.insert("__metadata__".into(), serde_json::json!({"format": src.format.clone().unwrap_or_else(|| "pt".into()), "converted_by": "moeflux"}));
        let mut off = 0;
        for e in &entries {
            header.insert(e.name.clone(), serde_json::json!({"dtype": st_dtype(e.dtype), "shape": e.shape, "data_offsets": [off, off + e.bytes]}));
            off += e.bytes;
        }
        let mut h = serde_json::to_vec(&header).expect("json");
        h.resize(round_up(h.len(), 8), b' ');
        let dense_path = tmp.join("dense.safetensors");
        let mut crc = crc32fast::Hasher::new();
        let mut f = BufWriter::new(File::create(&dense_path).map_err(io_err(&dense_path))?);
        let mut put = |f: &mut BufWriter<File>, b: &[u8]| -> Result<(), ModelError> {
            crc.update(b);
            f.write_all(b).map_err(io_err(&dense_path))
        };
        put(&mut f, &(h.len() as u64).to_le_bytes())?;
        put(&mut f, &h)?;
        let mut cache: Option<(String, [Vec<u8>; 3])> = None;
        for e in &entries {
            let t = src.get(&e.source).expect("listed above");
            let file = &src.files[t.file];
            let raw = &(*file.data).as_ref()
                [file.data_start + t.offset..file.data_start + t.offset + t.bytes];
            if !e.quant {
                put(&mut f, raw)?;
            } else {
                if cache.as_ref().is_none_or(|(n, _)| *n != e.source) {
                    let b = if is_router(&e.source) { 8 } else { bits };
                    let g = group_for(t.shape[1]).expect("checked when listed");
                    let (d, s, bi) = quantize(&to_f32(raw, t.dtype), t.shape[0], t.shape[1], b, g);
                    cache = Some((e.source.clone(), [d, s, bi]));
                }
                let (_, parts) = cache.as_ref().expect("just set");
                let which = if e.name.ends_with(".scales") {
                    1
                } else if e.name.ends_with(".biases") {
                    2
                } else {
                    0
                };
                put(&mut f, &parts[which])?;
            }
            if !e.name.ends_with(".scales") && !e.name.ends_with(".biases") {
                done += 1;
                progress(done, total, "dense");
            }
        }
        f.flush().map_err(io_err(&dense_path))?;
        drop(f);

        // 3. config, tokenizer files, manifest
        let cfg_path = src_dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?)
                .map_err(|e| ModelError::Json {
                path: cfg_path.clone(),
                msg: e.to_string(),
            })?;
        if quantize_dense {
            let mut q = serde_json::json!({"group_size": GROUP, "bits": bits});
            for (k, v) in overrides {
                q[k] = v;
            }
            cfg["quantization"] = q;
        }
        std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&cfg).expect("json"),
        )
        .map_err(io_err(&tmp))?;
        for name in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "generation_config.json",
            "special_tokens_map.json",
        ] {
            let p = src_dir.join(name);
            if p.exists() {
                std::fs::copy(&p, tmp.join(name)).map_err(io_err(&p))?;
            }
        }
        let manifest = Manifest {
            format: "moeflux-packed".into(),
            version: 1,
            experts: spec.moe.experts,
            record_bytes,
            parts,
            layers,
            dense_file: "dense.safetensors".into(),
            dense_crc32: crc.finalize(),
        };
        std::fs::write(
            tmp.join(MANIFEST),
            serde_json::to_string_pretty(&manifest).expect("json"),
        )
        .map_err(io_err(&tmp))?;
        Ok(manifest)
    })();
    match result {
        Ok(m) => {
            std::fs::rename(&tmp, dst).map_err(io_err(dst))?;
            Ok(m)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Re-reads a packed directory and checks every checksum.
pub fn verify(dir: &Path, progress: Progress) -> Result<(), ModelError> {
    let m = read_manifest(dir)?;
    let total = m.layers.iter().map(|l| l.crc32.len() as u64).sum::<u64>() + 1;
    let dense = dir.join(&m.dense_file);
    let bytes = std::fs::read(&dense).map_err(io_err(&dense))?;
    if crc32fast::hash(&bytes) != m.dense_crc32 {
        return Err(ModelError::BadSafetensors {
            path: dense,
            msg: "checksum mismatch (file corrupted)".into(),
        });
    }
    let mut done = 1;
    progress(done, total, "verify");
    let mut buf = vec![0u8; m.record_bytes];
    for l in &m.layers {
        let path = dir.join(&l.file);
        let f = File::open(&path).map_err(io_err(&path))?;
        for (e, want) in l.crc32.iter().enumerate() {
            read_record(&f, &path, e, &mut buf)?;
            if crc32fast::hash(&buf) != *want {
                return Err(ModelError::CorruptExpert {
                    path,
                    layer: l.layer,
                    expert: e,
                });
            }
            done += 1;
            progress(done, total, "verify");
        }
    }
    Ok(())
}

fn read_record(f: &File, path: &Path, e: usize, buf: &mut [u8]) -> Result<(), ModelError> {
    f.read_exact_at(buf, (e * buf.len()) as u64)
        .map_err(|err| ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                err.kind(),
                format!("expert record {e}: {err} (file truncated?)"),
            ),
        })
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, ModelError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path,
        msg: e.to_string(),
    })
}

/// Counters of an [`ExpertStore`].
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    /// Fetches served from RAM.
    pub hits: u64,
    /// Fetches that had to wait for a disk read.
    pub misses: u64,
    /// Bytes read from disk (misses and prefetches).
    pub bytes_read: u64,
    /// Records read ahead of need.
    pub prefetched: u64,
    /// Prefetched records that were used before being evicted.
    pub prefetch_used: u64,
}

impl StoreStats {
    /// Share of prefetched records that were used.
    pub fn prefetch_accuracy(&self) -> f64 {
        self.prefetch_used as f64 / self.prefetched.max(1) as f64
    }
}

struct Cached {
    data: Arc<Vec<u8>>,
    last_use: u64,
    uses: u32,
    /// Read ahead and not used yet.
    prefetched: bool,
}

struct Cache {
    map: HashMap<(usize, usize), Cached>,
    clock: u64,
    stats: StoreStats,
    /// Experts each layer used on its latest step: the prediction for its next step.
    last_set: HashMap<usize, Vec<usize>>,
}

impl Cache {
    /// Inserts a record, evicting by frequency-aware LRU while over `capacity`.
    fn insert(
        &mut self,
        key: (usize, usize),
        data: Arc<Vec<u8>>,
        capacity: usize,
        prefetched: bool,
    ) {
        let bonus = capacity as u64;
        while self.map.len() >= capacity {
            let victim = self
                .map
                .iter()
                .min_by_key(|(k, v)| (v.last_use + bonus * v.uses.min(8) as u64, **k))
                .map(|(k, _)| *k)
                .expect("non-empty");
            self.map.remove(&victim);
        }
        let now = self.clock;
        self.map.insert(
            key,
            Cached {
                data,
                last_use: now,
                uses: 0,
                prefetched,
            },
        );
    }
}

/// A read-ahead request: (layer, experts).
type PrefetchJob = (usize, Vec<usize>);

/// Expert records of a packed model behind a bounded host-RAM cache (the CPU tier).
/// Eviction is frequency-aware LRU: an entry's score is its last use plus a bonus per
/// past use, so experts the router keeps coming back to outlive one-off visitors.
pub struct ExpertStore {
    dir: PathBuf,
    manifest: Manifest,
    files: HashMap<usize, (PathBuf, File)>,
    capacity: usize,
    cache: Mutex<Cache>,
    /// Work queue of the read-ahead thread (started on first use).
    prefetch_tx: Mutex<Option<std::sync::mpsc::Sender<PrefetchJob>>>,
    /// Layers in model order, to find "the next layer".
    layer_order: Vec<usize>,
    /// Handed to the read-ahead thread (which must not keep the store alive).
    self_ref: std::sync::Weak<ExpertStore>,
}

impl std::fmt::Debug for ExpertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ExpertStore({}, {} records cached at most)",
            self.dir.display(),
            self.capacity
        )
    }
}

impl ExpertStore {
    /// Opens the store with a RAM budget in bytes (`None`: everything may be cached).
    /// A budget below `min_records` records is refused, naming the minimum.
    pub fn open(
        dir: &Path,
        budget: Option<usize>,
        min_records: usize,
    ) -> Result<Arc<Self>, ModelError> {
        let manifest = read_manifest(dir)?;
        let mut files = HashMap::new();
        for l in &manifest.layers {
            let path = dir.join(&l.file);
            let f = File::open(&path).map_err(io_err(&path))?;
            let len = f.metadata().map_err(io_err(&path))?.len() as usize;
            if len < l.crc32.len() * manifest.record_bytes {
                return Err(ModelError::Truncated {
                    path,
                    tensor: format!("expert record {}", len / manifest.record_bytes),
                    end: l.crc32.len() * manifest.record_bytes,
                    len,
                });
            }
            files.insert(l.layer, (path, f));
        }
        let total = manifest.layers.len() * manifest.experts;
        let capacity = match budget {
            None => total,
            Some(b) => {
                let c = b / manifest.record_bytes;
                if c < min_records {
                    return Err(ModelError::Budget {
                        what: "--host-mem".into(),
                        given: b,
                        minimum: min_records * manifest.record_bytes,
                    });
                }
                c.min(total)
            }
        };
        let layer_order = manifest.layers.iter().map(|l| l.layer).collect();
        Ok(Arc::new_cyclic(|me| ExpertStore {
            dir: dir.to_path_buf(),
            manifest,
            files,
            capacity,
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                clock: 0,
                stats: StoreStats::default(),
                last_set: HashMap::new(),
            }),
            prefetch_tx: Mutex::new(None),
            layer_order,
            self_ref: me.clone(),
        }))
    }

    /// Reads `experts` of `layer` into the cache unless present. Runs on the read-ahead
    /// thread; errors are left for the real fetch to report.
    fn prefetch_now(&self, layer: usize, experts: &[usize]) {
        for &e in experts {
            if self
                .cache
                .lock()
                .expect("store lock")
                .map
                .contains_key(&(layer, e))
            {
                continue;
            }
            let Ok(data) = self.load(layer, e) else {
                return;
            };
            let mut c = self.cache.lock().expect("store lock");
            if c.map.contains_key(&(layer, e)) {
                continue;
            }
            c.stats.prefetched += 1;
            c.stats.bytes_read += data.len() as u64;
            c.insert((layer, e), Arc::new(data), self.capacity, true);
        }
    }

    pub fn stats(&self) -> StoreStats {
        self.cache.lock().expect("store lock").stats.clone()
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn load(&self, layer: usize, expert: usize) -> Result<Vec<u8>, ModelError> {
        let (path, f) = self
            .files
            .get(&layer)
            .ok_or_else(|| ModelError::MissingTensor {
                name: format!("experts of layer {layer}"),
                dir: self.dir.clone(),
            })?;
        let lf = self
            .manifest
            .layers
            .iter()
            .find(|l| l.layer == layer)
            .expect("file exists for layer");
        if expert >= lf.crc32.len() {
            return Err(ModelError::MissingTensor {
                name: format!("expert {expert} of layer {layer}"),
                dir: self.dir.clone(),
            });
        }
        let mut buf = vec![0u8; self.manifest.record_bytes];
        read_record(f, path, expert, &mut buf)?;
        if crc32fast::hash(&buf) != lf.crc32[expert] {
            return Err(ModelError::CorruptExpert {
                path: path.clone(),
                layer,
                expert,
            });
        }
        Ok(buf)
    }
}

fn part_matrix(p: &PartLayout) -> Matrix {
    let buf = BufId::from_raw(moeflux_core::RawBufId(u32::MAX));
    let scale_dtype = dtype_parse(&p.scale_dtype).unwrap_or(DType::BF16);
    Matrix {
        data: Region {
            buf,
            offset: p.data,
        },
        scales: Some(Region {
            buf,
            offset: p.scales,
        }),
        biases: Some(Region {
            buf,
            offset: p.biases,
        }),
        rows: p.rows,
        cols: p.cols,
        format: WeightFormat::Affine {
            bits: p.bits,
            group_size: p.group_size,
            scale_dtype,
        },
    }
}

impl ExpertProvider for ExpertStore {
    fn layout(&self) -> ExpertWeights {
        let p = &self.manifest.parts;
        ExpertWeights {
            gate: part_matrix(&p[0]),
            up: part_matrix(&p[1]),
            down: part_matrix(&p[2]),
        }
    }

    fn record_bytes(&self) -> usize {
        self.manifest.record_bytes
    }

    fn max_in_flight(&self) -> usize {
        self.capacity
    }

    fn fetch(&self, layer: usize, expert: usize) -> Result<moeflux_core::SharedBytes, CoreError> {
        let key = (layer, expert);
        {
            let mut c = self.cache.lock().expect("store lock");
            c.clock += 1;
            let now = c.clock;
            if let Some(e) = c.map.get_mut(&key) {
                e.last_use = now;
                e.uses = e.uses.saturating_add(1);
                let was_prefetched = std::mem::take(&mut e.prefetched);
                let data = e.data.clone();
                c.stats.hits += 1;
                c.stats.prefetch_used += was_prefetched as u64;
                return Ok(data);
            }
        }
        let data = Arc::new(self.load(layer, expert).map_err(|e| CoreError::Backend {
            backend: "expert-store",
            msg: e.to_string(),
        })?);
        let mut c = self.cache.lock().expect("store lock");
        c.stats.misses += 1;
        c.stats.bytes_read += data.len() as u64;
        c.insert(key, data.clone(), self.capacity, false);
        Ok(data)
    }

    /// Records the layer's set and reads ahead the set the *next* layer used on its last
    /// step (routing is temporally local: consecutive tokens reuse most experts), so the
    /// disk reads overlap this layer's remaining work and the next layer's attention.
    fn layer_routed(&self, layer: usize, experts: &[usize]) {
        let next = {
            let mut c = self.cache.lock().expect("store lock");
            c.last_set.insert(layer, experts.to_vec());
            let pos = self
                .layer_order
                .iter()
                .position(|l| *l == layer)
                .unwrap_or(0);
            let next_layer = self.layer_order[(pos + 1) % self.layer_order.len()];
            c.last_set.get(&next_layer).map(|s| (next_layer, s.clone()))
        };
        // Read-ahead only helps when the cache cannot hold every layer's set anyway.
        let Some((next_layer, set)) = next else {
            return;
        };
        if self.capacity >= self.manifest.experts * self.layer_order.len() {
            return;
        }
        let mut tx = self.prefetch_tx.lock().expect("prefetch lock");
        if tx.is_none() {
            let (send, recv) = std::sync::mpsc::channel::<PrefetchJob>();
            let weak = self.self_ref.clone();
            std::thread::Builder::new()
                .name("moeflux-prefetch".into())
                .spawn(move || {
                    while let Ok((l, set)) = recv.recv() {
                        let Some(store) = weak.upgrade() else { break };
                        store.prefetch_now(l, &set);
                    }
                })
                .ok();
            *tx = Some(send);
        }
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send((next_layer, set));
        }
    }
}

/// A pool that only hands out ids for registered weights: lets the converter resolve a
/// checkpoint with the normal loader without a backend.
#[derive(Default)]
struct RegionPool {
    n: u32,
}

impl moeflux_core::BufferPool for RegionPool {
    fn alloc_raw(
        &mut self,
        _: usize,
        label: &str,
        _: moeflux_core::Lifetime,
    ) -> Result<moeflux_core::RawBufId, CoreError> {
        Err(CoreError::Backend {
            backend: "converter",
            msg: format!("no device buffers ({label})"),
        })
    }
    fn register_weights(
        &mut self,
        _: moeflux_core::WeightBytes,
        _: &str,
    ) -> Result<moeflux_core::RawBufId, CoreError> {
        self.n += 1;
        Ok(moeflux_core::RawBufId(self.n - 1))
    }
    fn upload_raw(
        &mut self,
        id: moeflux_core::RawBufId,
        _: usize,
        _: &[u8],
    ) -> Result<(), CoreError> {
        Err(CoreError::UnknownBuffer(id))
    }
    fn download_raw(
        &mut self,
        id: moeflux_core::RawBufId,
        _: usize,
        _: &mut [u8],
    ) -> Result<(), CoreError> {
        Err(CoreError::UnknownBuffer(id))
    }
    fn zero(&mut self, id: moeflux_core::RawBufId) -> Result<(), CoreError> {
        Err(CoreError::UnknownBuffer(id))
    }
    fn info(&self, _: moeflux_core::RawBufId) -> Option<(usize, String, moeflux_core::Lifetime)> {
        None
    }
    fn commit_plan(&mut self, _: &moeflux_core::Plan) -> Result<(), CoreError> {
        Ok(())
    }
    fn reset_transient(&mut self) {}
    fn allocated_bytes(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_roundtrip_error_is_within_half_a_step() {
        let (rows, cols) = (3, 128);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / cols) as f32))
            .collect();
        for bits in [4u8, 8] {
            let (d, s, b) = quantize(&w, rows, cols, bits, 64);
            assert_eq!(d.len(), rows * cols * bits as usize / 8);
            for r in 0..rows {
                for c in 0..cols {
                    let g = r * 2 + c / 64;
                    let scale =
                        bf16::from_bits(u16::from_le_bytes([s[2 * g], s[2 * g + 1]])).to_f32();
                    let bias =
                        bf16::from_bits(u16::from_le_bytes([b[2 * g], b[2 * g + 1]])).to_f32();
                    let i = r * cols + c;
                    let q = if bits == 4 {
                        (d[i / 2] >> (4 * (i % 2))) & 15
                    } else {
                        d[i]
                    };
                    let err = (scale * q as f32 + bias - w[i]).abs();
                    assert!(
                        err <= scale * 0.5 + 1e-3 * scale.max(1e-3),
                        "bits {bits} at ({r},{c}): err {err} step {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn read_ahead_fetches_the_next_layers_previous_set() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/qwen3_next_mlx4/model");
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("p");
        convert(&fixture, &dst, 4, &mut |_, _, _| {}).unwrap();
        // room for 3 records: far less than 4 layers x 8 experts
        let rec = read_manifest(&dst).unwrap().record_bytes;
        let store = ExpertStore::open(&dst, Some(3 * rec), 2).unwrap();
        let step = |sets: [[usize; 2]; 4]| {
            for (l, set) in sets.iter().enumerate() {
                for &e in set {
                    store.fetch(l, e).unwrap();
                }
                store.layer_routed(l, set);
            }
        };
        step([[0, 1], [2, 3], [4, 5], [6, 7]]);
        // same routing next token: each layer's set was read ahead while the previous
        // layer ran
        step([[0, 1], [2, 3], [4, 5], [6, 7]]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let st = loop {
            let st = store.stats();
            if st.prefetched > 0 || std::time::Instant::now() > deadline {
                break st;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(st.prefetched > 0, "{st:?}");
        assert!(st.hits + st.misses == 16, "{st:?}");
        assert!(st.prefetch_accuracy() <= 1.0);
        // budget is respected: never more records than capacity in the cache
        assert!(store.cache.lock().unwrap().map.len() <= 3);
    }
}
