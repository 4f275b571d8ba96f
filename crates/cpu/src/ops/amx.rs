//! AMX (Advanced Matrix Extensions, INT8) tiles for 4-bit affine matmuls over batches
//! of tokens (prefill, experts with several tokens).
//!
//! The arithmetic is that of the VNNI kernel ([`super::qdot`]): the activations are
//! 24-bit fixed point per group, three signed byte planes, and each plane's integer dot
//! product with the 4-bit codes is exact; only how the f32 epilogue sums them differs.
//!
//! Tiles: `C[t][n] += A[t][k] * B[k][n]` with `A` = activations (up to 16 tokens x 64
//! bytes of one plane, signed), `B` = codes of 16 weight rows (unsigned), laid out as
//! `tdpbsud` wants: B row `i` holds, for every weight row `n`, 4 codes. Packed dword `j`
//! of a 64-element block holds elements `8j..8j+8` as nibbles, so its low nibbles are
//! elements `8j + 2q` and its high nibbles `8j + 1 + 2q` (`q = 0..4`): those are B rows
//! `2j` and `2j+1`, and activation byte `4i + q` of a block is element
//! `8 (i / 2) + i % 2 + 2q`. Per group the three planes' C tiles are stored and folded
//! into f32 accumulators (lanes = weight rows) with the group's scales and biases.

use std::sync::OnceLock;

static AVAILABLE: OnceLock<bool> = OnceLock::new();

/// AMX-INT8 usable: the CPU has it and (Linux) the kernel granted this process the tile
/// state.
pub fn available() -> bool {
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let (leaf7, leaf1) = (__cpuid_count(7, 0), __cpuid(1));
    // AMX-TILE (EDX 24), AMX-INT8 (EDX 25), OSXSAVE (ECX 27)
    if leaf7.edx & (3 << 24) != 3 << 24
        || leaf1.ecx & (1 << 27) == 0
        || !std::is_x86_feature_detected!("avx512vnni")
    {
        return false;
    }
    // SAFETY: OSXSAVE is set, so xgetbv is allowed.
    let xcr0 = unsafe { xcr0() };
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    let ret: i64;
    // SAFETY: a plain syscall with no memory arguments.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") 0x1023i64, in("rsi") 18i64,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    // SAFETY: the caller checked OSXSAVE.
    unsafe { std::arch::x86_64::_xgetbv(0) }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) mod kernel {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use moeflux_core::DType;

    /// Tile configuration (palette 1): tmm0-2 the three planes' C (`mt` x 16 i32), tmm3
    /// the codes B (16 x 64 bytes), tmm4-6 the three planes' A (`mt` x 64 bytes).
    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    fn tile_cfg(mt: usize) -> TileCfg {
        let mut c = TileCfg([0; 64]);
        c.0[0] = 1;
        for t in 0..7 {
            c.0[16 + 2 * t] = 64; // bytes per row
            c.0[48 + t] = if t == 3 { 16 } else { mt as u8 };
        }
        c
    }

    /// A 64-byte aligned scratch area.
    struct Aligned {
        v: Vec<u8>,
        off: usize,
    }

    impl Aligned {
        fn new(len: usize) -> Self {
            let v = vec![0u8; len + 64];
            let off = v.as_ptr().align_offset(64);
            Aligned { v, off }
        }
        fn ptr(&mut self) -> *mut u8 {
            self.v[self.off..].as_mut_ptr()
        }
    }

    /// One 4-bit matrix as the kernel reads it.
    pub(in super::super) struct Mat {
        pub data: *const u8,
        pub scales: *const u8,
        pub biases: *const u8,
        pub rows: usize,
        pub row_bytes: usize,
        pub groups: usize,
        pub gs: usize,
        pub sdt: DType,
    }

    /// Prepared activations (layout `Q4A`): the 64 bytes of token `t`, block `kb`, plane
    /// `k` at `x + ((3 kb + k) n + t) * 64`, so a tile of consecutive tokens is 64-byte
    /// rows; token `t`'s group sums at `g + t * gtok`, its fixed-point steps `gstride`
    /// floats further.
    pub(in super::super) struct Act {
        pub x: *const u8,
        pub g: *const f32,
        pub gtok: usize,
        pub gstride: usize,
        pub n: usize,
    }

    const LO: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const HI: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

    /// One round of the perfect-shuffle transpose over `N` registers (pairs `p`,
    /// `p + N/2`): register bits shift up, taking the lane's top bit.
    #[inline(always)]
    unsafe fn shuffle_round<const N: usize>(z: &mut [__m512i; N]) {
        unsafe {
            let (lo, hi) = (
                _mm512_loadu_si512(LO.as_ptr() as *const _),
                _mm512_loadu_si512(HI.as_ptr() as *const _),
            );
            let mut n = [_mm512_setzero_si512(); N];
            for p in 0..N / 2 {
                n[2 * p] = _mm512_permutex2var_epi32(z[p], lo, z[p + N / 2]);
                n[2 * p + 1] = _mm512_permutex2var_epi32(z[p], hi, z[p + N / 2]);
            }
            *z = n;
        }
    }

    /// Elements `i..i+16` (those in `m`) of a float vector of `dt` as f32.
    #[inline(always)]
    unsafe fn load16(p: *const u8, dt: DType, m: __mmask16) -> __m512 {
        unsafe {
            match dt {
                DType::F32 => _mm512_maskz_loadu_ps(m, p as *const f32),
                DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_maskz_loadu_epi16(m, p as *const i16),
                ))),
                _ => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16)),
            }
        }
    }

    /// Writes `out[t * ostride + r] = row(r) . x_t` for rows `r0..r1`, every token.
    ///
    /// # Safety
    /// AMX must be [`super::available`]; pointers as documented on [`Mat`]/[`Act`];
    /// `out` valid for those writes and not touched by other threads there.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c,avx2")]
    pub(in super::super) unsafe fn rows(
        m: &Mat,
        a: &Act,
        r0: usize,
        r1: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        unsafe {
            let nkb = m.row_bytes / 32;
            let kpg = m.gs / 64;
            let ssz = m.sdt.size();
            let mut bbuf = Aligned::new(nkb * 1024);
            let mut cbuf = Aligned::new(3 * 1024);
            // per group: 16 scales then 16 biases (lanes = rows of the block)
            let mut sbuf = Aligned::new(m.groups.div_ceil(16) * 16 * 128);
            let (bb, cb, sb) = (bbuf.ptr(), cbuf.ptr(), sbuf.ptr() as *mut f32);
            let m0f = _mm512_set1_epi8(0x0f);
            let mut cur_mt = 0;
            let mut rb0 = r0;
            while rb0 < r1 {
                let nr = (r1 - rb0).min(16);
                let rmask: __mmask16 = if nr == 16 {
                    0xffff
                } else {
                    ((1u32 << nr) - 1) as __mmask16
                };
                // codes of rows rb0.., one B tile per 64-element block
                let next = rb0 + 16;
                for kb in 0..nkb {
                    let mut z = [_mm512_setzero_si512(); 8];
                    for (p, zp) in z.iter_mut().enumerate() {
                        let row = |r: usize| {
                            if r < nr {
                                _mm256_loadu_si256(
                                    m.data.add((rb0 + r) * m.row_bytes + 32 * kb) as *const _
                                )
                            } else {
                                _mm256_setzero_si256()
                            }
                        };
                        *zp = _mm512_inserti64x4::<1>(
                            _mm512_castsi256_si512(row(2 * p)),
                            row(2 * p + 1),
                        );
                    }
                    for _ in 0..4 {
                        shuffle_round(&mut z);
                    }
                    // z[j] lane r = packed dword j of row r
                    let dst = bb.add(kb * 1024);
                    for (j, zj) in z.iter().enumerate() {
                        _mm512_store_si512(dst.add(128 * j) as *mut _, _mm512_and_si512(*zj, m0f));
                        _mm512_store_si512(
                            dst.add(128 * j + 64) as *mut _,
                            _mm512_and_si512(_mm512_srli_epi16::<4>(*zj), m0f),
                        );
                    }
                    // the next block's rows, one line in two blocks
                    if kb % 2 == 0 && next < m.rows {
                        for r in 0..(m.rows - next).min(16) {
                            _mm_prefetch::<_MM_HINT_T0>(
                                m.data.add((next + r) * m.row_bytes + 32 * kb) as *const i8,
                            );
                        }
                    }
                }
                // scales and biases, transposed to lanes = rows
                for (src, off) in [(m.scales, 0usize), (m.biases, 16usize)] {
                    let mut g0 = 0;
                    while g0 < m.groups {
                        let gm: __mmask16 = if m.groups - g0 >= 16 {
                            0xffff
                        } else {
                            ((1u32 << (m.groups - g0)) - 1) as __mmask16
                        };
                        let mut z = [_mm512_setzero_si512(); 16];
                        for (r, zr) in z.iter_mut().enumerate().take(nr) {
                            *zr = _mm512_castps_si512(load16(
                                src.add(((rb0 + r) * m.groups + g0) * ssz),
                                m.sdt,
                                gm,
                            ));
                        }
                        for _ in 0..4 {
                            shuffle_round(&mut z);
                        }
                        for (g, zg) in z.iter().enumerate().take((m.groups - g0).min(16)) {
                            _mm512_store_si512(sb.add((g0 + g) * 32 + off) as *mut _, *zg);
                        }
                        g0 += 16;
                    }
                }
                let mut t0 = 0;
                while t0 < a.n {
                    let mt = (a.n - t0).min(16);
                    if mt != cur_mt {
                        let cfg = tile_cfg(mt);
                        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
                        cur_mt = mt;
                    }
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for g in 0..m.groups {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            options(nostack, nomem)
                        );
                        for kk in 0..kpg {
                            let kb = g * kpg + kk;
                            let xa = a.x.add((3 * kb * a.n + t0) * 64);
                            let plane = 64 * a.n;
                            asm!(
                                "tileloadd tmm3, [{b} + {s64}*1]",
                                "tileloadd tmm4, [{x} + {s64}*1]",
                                "tileloadd tmm5, [{x1} + {s64}*1]",
                                "tileloadd tmm6, [{x2} + {s64}*1]",
                                "tdpbsud tmm0, tmm4, tmm3",
                                "tdpbsud tmm1, tmm5, tmm3",
                                "tdpbsud tmm2, tmm6, tmm3",
                                b = in(reg) bb.add(kb * 1024),
                                s64 = in(reg) 64usize,
                                x = in(reg) xa,
                                x1 = in(reg) xa.add(plane),
                                x2 = in(reg) xa.add(2 * plane),
                                options(nostack, readonly),
                            );
                        }
                        asm!(
                            "tilestored [{c} + {s64}*1], tmm0",
                            "tilestored [{c1} + {s64}*1], tmm1",
                            "tilestored [{c2} + {s64}*1], tmm2",
                            c = in(reg) cb,
                            c1 = in(reg) cb.add(1024),
                            c2 = in(reg) cb.add(2048),
                            s64 = in(reg) 64usize,
                            options(nostack),
                        );
                        let sv = _mm512_load_ps(sb.add(g * 32));
                        let bv = _mm512_load_ps(sb.add(g * 32 + 16));
                        for (t, acc) in acc.iter_mut().enumerate().take(mt) {
                            let c1 = _mm512_load_si512(cb.add(64 * t) as *const _);
                            let c2 = _mm512_load_si512(cb.add(1024 + 64 * t) as *const _);
                            let c3 = _mm512_load_si512(cb.add(2048 + 64 * t) as *const _);
                            // plane 1 * 2^16 + plane 2 * 2^8 + plane 3; (c1 << 8) + c2 fits i32
                            let hi = _mm512_add_epi32(_mm512_slli_epi32::<8>(c1), c2);
                            let f = _mm512_fmadd_ps(
                                _mm512_cvtepi32_ps(hi),
                                _mm512_set1_ps(256.0),
                                _mm512_cvtepi32_ps(c3),
                            );
                            let gp = a.g.add((t0 + t) * a.gtok);
                            let step = _mm512_set1_ps(*gp.add(a.gstride + g));
                            *acc = _mm512_fmadd_ps(f, _mm512_mul_ps(sv, step), *acc);
                            *acc = _mm512_fmadd_ps(bv, _mm512_set1_ps(*gp.add(g)), *acc);
                        }
                    }
                    for (t, acc) in acc.iter().enumerate().take(mt) {
                        _mm512_mask_storeu_ps(out.add((t0 + t) * ostride + rb0), rmask, *acc);
                    }
                    t0 += mt;
                }
                rb0 += 16;
            }
            if cur_mt != 0 {
                asm!("tilerelease", options(nostack, nomem));
            }
        }
    }
}
