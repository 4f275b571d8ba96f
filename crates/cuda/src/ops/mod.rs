//! Host side of the kernels: one module per op (same names as `kernels/<op>.cu` and the CPU
//! backend's `ops/`). Each function validates what `Graph::validate` cannot know (kernel
//! limits, formats), resolves buffers to device addresses and enqueues its kernels on the
//! backend's stream.

pub(crate) mod attention;
pub(crate) mod conv1d;
pub(crate) mod elementwise;
pub(crate) mod embed;
pub(crate) mod gated_delta;
pub(crate) mod matmul;
pub(crate) mod moe;
pub(crate) mod moe_streamed;
pub(crate) mod rms_norm;
pub(crate) mod rope;

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig};
use moeflux_core::{DType, Matrix, Op, RawBufId, Region, Vector, WeightFormat};

use crate::error::CudaError;
use crate::kernels::Kernels;
use crate::pool::{CudaPool, DevMem};

/// Launches a kernel of `$file` with the listed places (locals, or fields of locals: never
/// temporaries, whose addresses would dangle) as arguments, in order. They are borrowed until
/// the launch, and their Rust types must match the kernel's C parameter types exactly (u64 for
/// pointers, u32, i32, f32, WMatArg). Must be used inside an
/// `unsafe` block carrying a `// SAFETY:` comment.
macro_rules! launch {
    ($enc:expr, $file:expr, $name:expr, $cfg:expr, [$($arg:ident $(. $field:ident)?),* $(,)?]) => {{
        let (file, name): (&'static str, &'static str) = ($file, $name);
        let f = $enc.kernels.get(file, name)?;
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        if cfg.shared_mem_bytes as usize > 48 * 1024 {
            $enc.kernels.allow_smem(name, &f, cfg.shared_mem_bytes as usize)?;
        }
        let mut params = [$( (&$arg $(. $field)?) as *const _ as *mut std::ffi::c_void ),*];
        let pdl = $enc.pdl.applies(&cfg);
        let r = crate::ops::launch_raw(&f, cfg, $enc.stream, pdl, &mut params);
        $enc.recent.push(name);
        r.map_err(|err| crate::error::CudaError::Launch { kernel: name, err })
    }};
}
pub(crate) use launch;

/// Launches `f` on `stream` with `cuLaunchKernelEx`; with `pdl`, as a programmatic dependent
/// launch (every kernel of ours starts with `pdl_prologue()`, see common.cuh): the kernel may
/// be scheduled while the previous one runs and waits on the device for it, which hides the
/// launch gap between the many small kernels of a decode step, in streams and in captured
/// graphs alike.
///
/// # Safety
/// `params` point at live values whose types match the kernel's parameters, in order; the
/// kernel's memory accesses are within the buffers they name.
pub(crate) unsafe fn launch_raw(
    f: &cudarc::driver::CudaFunction,
    cfg: LaunchConfig,
    stream: &CudaStream,
    pdl: bool,
    params: &mut [*mut std::ffi::c_void],
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    // SAFETY: a plain C struct (ids and a union of plain values); all-zero is valid.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: u32::from(pdl),
    };
    // SAFETY: the caller's contract; `config` and `attr` outlive the call.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

/// Kernel-side weight format codes (`FMT_*` in common.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fmt {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    Q4 = 3,
    Q8 = 4,
}

impl Fmt {
    /// Elements held by 16 bytes (the vector path's unit).
    pub fn elems16(self) -> usize {
        match self {
            Fmt::F32 => 4,
            Fmt::F16 | Fmt::BF16 => 8,
            Fmt::Q4 => 32,
            Fmt::Q8 => 16,
        }
    }

    pub fn affine(self) -> bool {
        matches!(self, Fmt::Q4 | Fmt::Q8)
    }

    /// Picks `names[self]` from a table of per-format kernel names ordered f32, f16, bf16, q4, q8.
    pub fn pick(self, names: &[&'static str; 5]) -> &'static str {
        names[self as usize]
    }
}

/// Kernel-side float dtype codes (`DT_*` in common.cuh).
pub(crate) fn dtype_code(dt: DType, op: &'static str) -> Result<i32, CudaError> {
    match dt {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => Err(CudaError::Unsupported {
            op,
            msg: format!("{other} is not a float dtype"),
        }),
    }
}

/// Mirror of `struct WMat` in common.cuh (passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct WMatArg {
    pub data: u64,
    pub scales: u64,
    pub biases: u64,
    pub rows: u32,
    pub cols: u32,
    pub group: u32,
    pub sdt: i32,
}

// SAFETY: #[repr(C)] plain-old-data with the same field order, sizes and alignment as the
// C struct WMat (3 pointers, 3 unsigned ints, 1 int).
unsafe impl DeviceRepr for WMatArg {}

/// Format, group size and scale dtype code of a matrix format.
pub(crate) fn format_of(f: WeightFormat, op: &'static str) -> Result<(Fmt, u32, i32), CudaError> {
    match f {
        WeightFormat::Dense(DType::F32) => Ok((Fmt::F32, 1, 0)),
        WeightFormat::Dense(DType::F16) => Ok((Fmt::F16, 1, 0)),
        WeightFormat::Dense(DType::BF16) => Ok((Fmt::BF16, 1, 0)),
        WeightFormat::Affine {
            bits: 4,
            group_size,
            scale_dtype,
        } => Ok((Fmt::Q4, group_size, dtype_code(scale_dtype, op)?)),
        WeightFormat::Affine {
            bits: 8,
            group_size,
            scale_dtype,
        } => Ok((Fmt::Q8, group_size, dtype_code(scale_dtype, op)?)),
        other => Err(CudaError::Unsupported {
            op,
            msg: format!("weight format {other}"),
        }),
    }
}

/// Whether a matrix with data at `data` may take the 16-byte vector path (see gemv.cuh).
pub(crate) fn vec_ok(fmt: Fmt, data: u64, cols: usize, group: u32) -> bool {
    let e = fmt.elems16();
    data.is_multiple_of(16)
        && cols.is_multiple_of(e)
        && (!fmt.affine() || (group as usize).is_multiple_of(e))
}

/// Lanes per row group of a vector-path matvec over rows of `cols` elements (`elems` per 16
/// bytes): of 32, 16 and 8, the one whose step span (lanes x elems) pads a row least, the
/// widest on ties. Returns (lanes, index into per-lane name tables: 0, 1, 2 = 32, 16, 8).
pub(crate) fn lanes_for(cols: usize, elems: usize) -> (usize, usize) {
    [32usize, 16, 8]
        .into_iter()
        .enumerate()
        .map(|(i, l)| (l, i))
        .min_by_key(|&(l, _)| cols.div_ceil(l * elems) * l * elems - cols)
        .expect("three choices")
}

pub(crate) fn u32_of(v: usize, what: &str, op: &'static str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Unsupported {
        op,
        msg: format!("{what} = {v} does not fit the kernels' 32-bit indices"),
    })
}

pub(crate) const BLOCK: u32 = 256;

/// A 1-D grid-stride launch over `len` elements.
pub(crate) fn grid_1d(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks a grid's y extent (at most 65535).
pub(crate) fn grid_y(v: usize, what: &str, op: &'static str) -> Result<u32, CudaError> {
    if v == 0 || v > 65535 {
        return Err(CudaError::Unsupported {
            op,
            msg: format!("{what} = {v} is outside the kernel's grid limit (1..=65535)"),
        });
    }
    Ok(v as u32)
}

/// Scratch memory owned by the backend (expert intermediates), grown on demand.
#[derive(Default)]
pub(crate) struct Scratch {
    mem: Option<DevMem>,
    /// Bumped when the block moves (captured CUDA graphs hold its address).
    pub generation: u64,
}

impl Scratch {
    /// At least `bytes` of scratch. Growing synchronises the stream first: queued kernels may
    /// still use the old block.
    pub fn get(&mut self, enc_stream: &Arc<CudaStream>, bytes: usize) -> Result<u64, CudaError> {
        if self.mem.as_ref().is_none_or(|m| m.bytes < bytes) {
            enc_stream
                .synchronize()
                .map_err(CudaError::driver("synchronising before growing scratch"))?;
            self.mem = None;
            self.generation += 1;
            let grown = bytes.next_power_of_two().max(1 << 20);
            self.mem = Some(DevMem::zeroed(
                enc_stream.context(),
                enc_stream,
                grown,
                "moe scratch",
            )?);
        }
        Ok(self.mem.as_ref().map(|m| m.ptr).unwrap_or(0))
    }
}

/// Everything an op needs to enqueue its kernels.
pub(crate) struct Enc<'a> {
    pub stream: &'a Arc<CudaStream>,
    pub kernels: &'a mut Kernels,
    pub pool: &'a mut CudaPool,
    pub scratch: &'a mut Scratch,
    pub tables: &'a mut moe::ExpertTables,
    pub staging: &'a mut moe_streamed::Staging,
    /// Largest dynamic shared memory a block may opt into.
    pub smem_optin: usize,
    /// Streaming multiprocessors of the device (grid sizing).
    pub sm_count: usize,
    /// Kernels enqueued since the last synchronisation (named in execution errors).
    pub recent: &'a mut Vec<&'static str>,
    /// Which kernels launch as programmatic dependent launches.
    pub pdl: Pdl,
}

/// Programmatic dependent launch policy (sm_90+; `MOEFLUX_CUDA_PDL=0|small|all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pdl {
    Off,
    /// Kernels of at most this many blocks: the decode kernels, whose launch gap is a large
    /// part of their time; big grids amortise it.
    Small(u32),
    All,
}

impl Pdl {
    pub(crate) fn from_env(major: i32, sm_count: usize) -> Self {
        if major < 9 {
            return Pdl::Off;
        }
        match std::env::var("MOEFLUX_CUDA_PDL").as_deref() {
            Ok("0") | Ok("off") => Pdl::Off,
            Ok("all") => Pdl::All,
            _ => Pdl::Small((4 * sm_count).min(u32::MAX as usize) as u32),
        }
    }

    pub(crate) fn applies(self, cfg: &LaunchConfig) -> bool {
        match self {
            Pdl::Off => false,
            Pdl::All => true,
            Pdl::Small(max) => {
                let (x, y, z) = cfg.grid_dim;
                (x as u64) * (y as u64) * (z as u64) <= max as u64
            }
        }
    }
}

impl Enc<'_> {
    pub fn buf(&mut self, id: RawBufId) -> Result<CUdeviceptr, CudaError> {
        self.pool.ptr(id)
    }

    pub fn region(&mut self, r: &Region) -> Result<CUdeviceptr, CudaError> {
        Ok(self.pool.ptr(r.buf.raw())? + r.offset as u64)
    }

    /// A stored vector's address and dtype code.
    pub fn vector(
        &mut self,
        v: &Vector,
        op: &'static str,
    ) -> Result<(CUdeviceptr, i32), CudaError> {
        Ok((self.region(&v.data)?, dtype_code(v.dtype, op)?))
    }

    /// The kernel descriptor of a matrix and its format.
    pub fn wmat(&mut self, m: &Matrix, op: &'static str) -> Result<(WMatArg, Fmt), CudaError> {
        let (fmt, group, sdt) = format_of(m.format, op)?;
        let data = self.region(&m.data)?;
        let scales = match &m.scales {
            Some(r) => self.region(r)?,
            None => 0,
        };
        let biases = match &m.biases {
            Some(r) => self.region(r)?,
            None => 0,
        };
        if fmt.affine() && (scales == 0 || biases == 0) {
            return Err(CudaError::Unsupported {
                op,
                msg: "quantized matrix without scales/biases".into(),
            });
        }
        let rows = u32_of(m.rows, "rows", op)?;
        let cols = u32_of(m.cols, "cols", op)?;
        Ok((
            WMatArg {
                data,
                scales,
                biases,
                rows,
                cols,
                group,
                sdt,
            },
            fmt,
        ))
    }
}

/// Enqueues one op. Exhaustive on purpose: a new op does not compile until handled here.
pub(crate) fn encode_op(enc: &mut Enc<'_>, op: &Op) -> Result<(), CudaError> {
    match op {
        Op::Embed {
            table,
            tokens,
            out,
            n,
        } => embed::embed(enc, table, *tokens, *out, *n),
        Op::RmsNorm {
            x,
            weight,
            out,
            rows,
            dim,
            eps,
            offset,
        } => rms_norm::rms_norm(enc, *x, None, weight, *out, *rows, *dim, *eps, *offset),
        Op::GatedRmsNorm {
            x,
            gate,
            weight,
            out,
            rows,
            dim,
            eps,
            offset,
        } => rms_norm::rms_norm(
            enc,
            *x,
            Some(*gate),
            weight,
            *out,
            *rows,
            *dim,
            *eps,
            *offset,
        ),
        Op::Matmul { x, w, out, n } => matmul::matmul(enc, *x, w, *out, *n),
        Op::CopyRows {
            x,
            out,
            start,
            rows,
            width,
        } => elementwise::copy_rows(enc, *x, *out, *start, *rows, *width),
        Op::Add { a, b, out, len } => elementwise::add(enc, *a, *b, *out, *len),
        Op::SwiGlu { gate, up, out, len } => elementwise::swiglu(enc, *gate, *up, *out, *len),
        Op::SigmoidGate {
            x,
            gate,
            out,
            n,
            width,
            gate_width,
        } => elementwise::sigmoid_gate(enc, *x, *gate, *out, *n, *width, *gate_width),
        Op::ScatterCols {
            x,
            n,
            groups,
            parts,
        } => elementwise::scatter_cols(enc, *x, *n, *groups, parts),
        Op::Rope {
            x,
            pos,
            n,
            heads,
            head_dim,
            rotary_dim,
            theta,
        } => rope::rope(enc, *x, *pos, *n, *heads, *head_dim, *rotary_dim, *theta),
        Op::KvAppend {
            k,
            v,
            pos,
            k_cache,
            v_cache,
            n,
            kv_dim,
            max_ctx,
        } => attention::kv_append(enc, *k, *v, *pos, *k_cache, *v_cache, *n, *kv_dim, *max_ctx),
        Op::Attention {
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
        } => {
            let shape = attention::AttnShape {
                n: *n,
                heads: *heads,
                kv_heads: *kv_heads,
                head_dim: *head_dim,
                scale: *scale,
                max_ctx: *max_ctx,
            };
            attention::attention(enc, *q, *pos, *k_cache, *v_cache, *out, &shape)
        }
        Op::Conv1dSilu {
            x,
            state,
            weight,
            out,
            n,
            channels,
            kernel,
        } => conv1d::conv1d_silu(enc, *x, *state, weight, *out, *n, *channels, *kernel),
        Op::GatedDelta {
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
        } => {
            let shape = gated_delta::DeltaShape {
                n: *n,
                k_heads: *k_heads,
                v_heads: *v_heads,
                dk: *dk,
                dv: *dv,
            };
            gated_delta::gated_delta(enc, *qkv, *a, *b, a_log, dt_bias, *state, *out, &shape)
        }
        Op::RouterTopK {
            logits,
            idx,
            weights,
            n,
            experts,
            k,
            renorm,
            shared_gate,
        } => moe::router_topk(
            enc,
            *logits,
            *shared_gate,
            *idx,
            *weights,
            (*n, *experts, *k),
            *renorm,
        ),
        Op::MoeExpertsStreamed {
            x,
            idx,
            weights,
            store,
            layer,
            out,
            n,
            k,
            hidden,
            inter,
        } => {
            let shape = moe::MoeShape {
                n: *n,
                k: *k,
                hidden: *hidden,
                inter: *inter,
            };
            moe_streamed::moe_experts_streamed(enc, *x, *idx, *weights, store, *layer, *out, &shape)
        }
        Op::MoeExperts {
            x,
            idx,
            weights,
            experts,
            out,
            n,
            k,
            hidden,
            inter,
        } => {
            let shape = moe::MoeShape {
                n: *n,
                k: *k,
                hidden: *hidden,
                inter: *inter,
            };
            moe::moe_experts(enc, *x, *idx, *weights, experts, *out, &shape)
        }
    }
}
