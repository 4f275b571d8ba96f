//! The kernel sources, their NVRTC compilation and the on-disk module cache.
//!
//! Each `kernels/<op>.cu` is one NVRTC program; `#include "x.cuh"` lines naming one of our
//! headers are replaced by the header text (NVRTC gets no include paths). A program is compiled
//! the first time one of its kernels is needed, to a CUBIN for the device's own `sm_XY`, and the
//! CUBIN is cached on disk under a name keyed by a hash of the expanded source, the options,
//! the arch and the NVRTC version, so an edit or a new toolkit never reuses a stale binary.
//! A cache that cannot be read or written only costs a recompile.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{Ptx, result as nvrtc, sys as nvrtc_sys};

use crate::error::CudaError;

/// `(file name, source)` of every kernel program.
pub const FILES: &[(&str, &str)] = &[
    ("attention.cu", include_str!("../kernels/attention.cu")),
    (
        "attention_tc.cu",
        include_str!("../kernels/attention_tc.cu"),
    ),
    ("bandwidth.cu", include_str!("../kernels/bandwidth.cu")),
    ("conv1d.cu", include_str!("../kernels/conv1d.cu")),
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("embed.cu", include_str!("../kernels/embed.cu")),
    ("gated_delta.cu", include_str!("../kernels/gated_delta.cu")),
    ("gemm_tc.cu", include_str!("../kernels/gemm_tc.cu")),
    ("matmul.cu", include_str!("../kernels/matmul.cu")),
    ("moe.cu", include_str!("../kernels/moe.cu")),
    ("rms_norm.cu", include_str!("../kernels/rms_norm.cu")),
    ("rope.cu", include_str!("../kernels/rope.cu")),
];

const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("gemv.cuh", include_str!("../kernels/gemv.cuh")),
];

/// The text of a kernel file or header: the built-in one, or, when the developer variable
/// `MOEFLUX_KERNEL_DIR` names a directory holding a file of that name, that file (kernel
/// experiments without a rebuild: the module cache is keyed by the source, so variants never
/// mix).
fn text_of(name: &str, builtin: &'static str) -> std::borrow::Cow<'static, str> {
    if let Some(dir) = std::env::var_os("MOEFLUX_KERNEL_DIR")
        && let Ok(t) = std::fs::read_to_string(Path::new(&dir).join(name))
    {
        return t.into();
    }
    builtin.into()
}

/// The source of `file` with our headers pasted in place of their `#include` lines.
pub fn expanded_source(file: &str) -> Option<String> {
    let src = text_of(file, FILES.iter().find(|(f, _)| *f == file)?.1);
    let mut out = String::with_capacity(src.len() + 16 * 1024);
    for line in src.lines() {
        let t = line.trim();
        let header = t
            .strip_prefix("#include \"")
            .and_then(|r| r.strip_suffix('"'));
        match header.and_then(|h| HEADERS.iter().find(|(n, _)| *n == h)) {
            Some((name, text)) => {
                let text = text_of(name, text);
                out.push_str(&format!(
                    "// ---- begin {name}\n{text}\n// ---- end {name}\n"
                ));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Some(out)
}

/// NVRTC options for an arch such as `sm_90`.
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
}

/// `(major, minor)` of the NVRTC library found at run time.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    // SAFETY: probing for the library has no side effects beyond loading it.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err("libnvrtc not found on the library path".into());
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion: {e:?}"))?;
    Ok((major, minor))
}

/// FNV-1a, 64 bits: a cache key, not a security boundary.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.iter().chain([0xffu8].iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Compiles kernels/`file` to a CUBIN for `arch`. Needs libnvrtc but no GPU.
pub fn compile_cubin(file: &'static str, arch: &str) -> Result<Vec<u8>, CudaError> {
    let fail = |log: String| CudaError::Compile {
        file,
        arch: arch.to_string(),
        log,
    };
    let src = expanded_source(file).ok_or_else(|| fail("no such kernel file".into()))?;
    let csrc = CString::new(src).map_err(|_| fail("source contains a NUL byte".into()))?;
    let cname = CString::new(file).expect("file names have no NUL");
    let prog = nvrtc::create_program(&csrc, Some(&cname))
        .map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}")))?;
    // SAFETY: `prog` was just created and is destroyed exactly once below; csrc/cname outlive it.
    unsafe {
        let compiled = nvrtc::compile_program(prog, &compile_options(arch));
        let out = match compiled {
            Err(e) => {
                let log = nvrtc::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(fail(format!("{e:?}\n{log}")))
            }
            Ok(()) => {
                let mut size = 0usize;
                let mut bin = Vec::new();
                let r = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|_| {
                        bin = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut c_char).result()
                    });
                r.map(|_| bin)
                    .map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))
            }
        };
        let _ = nvrtc::destroy_program(prog);
        out
    }
}

/// Default cache directory: `$MOEFLUX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/moeflux/kernels`,
/// else `~/.cache/moeflux/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOEFLUX_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("moeflux").join("kernels"))
}

pub(crate) struct Kernels {
    ctx: Arc<CudaContext>,
    arch: String,
    nvrtc: (i32, i32),
    cache_dir: Option<PathBuf>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Dynamic shared memory each function was opened up to (above the 48 KiB default).
    smem: HashMap<&'static str, usize>,
    /// Compile/load statistics: (compiled, loaded from cache).
    pub stats: (usize, usize),
}

impl Kernels {
    pub fn new(
        ctx: Arc<CudaContext>,
        arch: String,
        nvrtc: (i32, i32),
        cache_dir: Option<PathBuf>,
    ) -> Self {
        Kernels {
            ctx,
            arch,
            nvrtc,
            cache_dir,
            modules: HashMap::new(),
            funcs: HashMap::new(),
            smem: HashMap::new(),
            stats: (0, 0),
        }
    }

    /// Whether the tensor-core kernels (`gemm_tc.cu`: bf16 `mma.sync`, `ldmatrix`) may run:
    /// sm_80 or newer, and not switched off with `MOEFLUX_CUDA_TC=0`.
    pub fn tensor_cores(&self) -> bool {
        let major: u32 = self
            .arch
            .strip_prefix("sm_")
            .and_then(|s| s.get(..s.len().saturating_sub(1)))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        major >= 8 && std::env::var("MOEFLUX_CUDA_TC").map_or(true, |v| v != "0")
    }

    /// Whether prefill attention may take the tensor-core kernel (`attention_tc.cu`): tensor
    /// cores, and not switched off with `MOEFLUX_CUDA_TC_ATTN=0`.
    pub fn tc_attention(&self) -> bool {
        self.tensor_cores() && std::env::var("MOEFLUX_CUDA_TC_ATTN").map_or(true, |v| v != "0")
    }

    fn cache_path(&self, file: &str, src: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let opts = compile_options(&self.arch).join(" ");
        let ver = format!("nvrtc {}.{}", self.nvrtc.0, self.nvrtc.1);
        let key = fnv64(&[
            src.as_bytes(),
            opts.as_bytes(),
            self.arch.as_bytes(),
            ver.as_bytes(),
        ]);
        let stem = file.trim_end_matches(".cu");
        Some(dir.join(format!("{stem}-{}-{key:016x}.cubin", self.arch)))
    }

    fn load_cached(&self, path: &Path) -> Option<Arc<CudaModule>> {
        let bytes = std::fs::read(path).ok()?;
        self.ctx.load_module(Ptx::from_binary(bytes)).ok()
    }

    fn store(path: &Path, bin: &[u8]) {
        // Write then rename, so concurrent processes never see a half-written file.
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        if std::fs::write(&tmp, bin).is_ok() && std::fs::rename(&tmp, path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    pub fn module(&mut self, file: &'static str) -> Result<Arc<CudaModule>, CudaError> {
        if let Some(m) = self.modules.get(file) {
            return Ok(m.clone());
        }
        let src = expanded_source(file).ok_or_else(|| CudaError::Compile {
            file,
            arch: self.arch.clone(),
            log: "unknown kernel file".into(),
        })?;
        let path = self.cache_path(file, &src);
        let module = match path.as_deref().and_then(|p| self.load_cached(p)) {
            Some(m) => {
                self.stats.1 += 1;
                m
            }
            None => {
                let bin = compile_cubin(file, &self.arch)?;
                self.stats.0 += 1;
                if let Some(p) = &path {
                    Self::store(p, &bin);
                }
                self.ctx
                    .load_module(Ptx::from_binary(bin))
                    .map_err(|err| CudaError::ModuleLoad { file, err })?
            }
        };
        self.modules.insert(file, module.clone());
        Ok(module)
    }

    /// Function `name` of kernels/`file`.
    pub fn get(
        &mut self,
        file: &'static str,
        name: &'static str,
    ) -> Result<CudaFunction, CudaError> {
        if let Some(f) = self.funcs.get(name) {
            return Ok(f.clone());
        }
        let m = self.module(file)?;
        let f = m
            .load_function(name)
            .map_err(|err| CudaError::MissingKernel { file, name, err })?;
        self.funcs.insert(name, f.clone());
        Ok(f)
    }

    /// Allows `name` to use `bytes` of dynamic shared memory (needed above 48 KiB).
    pub fn allow_smem(
        &mut self,
        name: &'static str,
        f: &CudaFunction,
        bytes: usize,
    ) -> Result<(), CudaError> {
        if bytes <= 48 * 1024 || self.smem.get(name).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|err| CudaError::Launch { kernel: name, err })?;
        self.smem.insert(name, bytes);
        Ok(())
    }

    /// Compiles (or loads from the cache) every kernel file now.
    pub fn load_all(&mut self) -> Result<(), CudaError> {
        for (f, _) in FILES {
            self.module(f)?;
        }
        Ok(())
    }
}
