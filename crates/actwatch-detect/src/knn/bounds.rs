//! Approximate ranking keys with a proven error bound, for exact search (`exact.rs`).
//!
//! Key decision: exact search does not rank by the f32 product it computes. For every query `q`
//! and reference `r` a tile gives an approximate key `a` (cheap: an int8 product where the CPU has
//! AVX-512 VNNI, else the f32 GEMM) and a bound `b` with `|key(q, r) - a| <= b`, where `key` is the
//! real-valued similarity (`q·r` for cosine, `q·r - ||r||²/2` for L2) up to a per-query constant.
//! The k-th largest lower bound `a - b` over all references is a threshold no true neighbour is
//! below, so only the few references whose upper bound `a + b` reaches it are ranked again by the
//! exact f64 distance. The result is the exact k nearest (ties to the lower index) whichever tile
//! kernel ran, so scores are the same bits on every CPU and any batch split.
//!
//! The int8 key: references and queries are centred on the references' mean (transformer states
//! share a large common direction; centring is what makes the bound tight: on the MiniLM files
//! about 20 of 6,000 references per query are ranked again, 400 to 800 without it), each row
//! scaled so its largest entry is ±127 and rounded. With `c = s·x + e` for both sides, the centred
//! product is `s_q s_r (x_q·x_r) + s_q x_q·e_r + e_q·c_r`, so
//! `b = ||s_q x_q||·||e_r|| + ||e_q||·||c_r||` (Cauchy-Schwarz) plus a relative slack `EPS` for the
//! f32 rounding of the key and the offsets. The f32 key: the GEMM's rounding error is at most
//! `γ_d Σ|q_j r_j| <= γ_d ||q||·||r||` (`γ_d = d u / (1 - d u)`, any summation order).
//!
//! Either way the bound is `alpha_q x_r + beta_q y_r + z_r`, per-reference columns `x, y, z`
//! kept here and per-query `alpha, beta` formed with the query block.

use std::fmt;

use super::Metric;

/// Relative slack covering the f32 roundings in forming a key, its offset and its bound (each
/// at most 2^-24 relative, a handful of them): generous, since it only widens the window.
const EPS: f64 = 1e-5;
/// References per packed block of the int8 kernel: 4 panels of 16 (one 512-bit register each).
pub(super) const QUAD: usize = 64;
/// Widest vector the int8 kernel takes: its i32 sums of `4 * 255 * 127` per group of 4 entries
/// cannot overflow below this.
const INT8_MAX_DIM: usize = 65_536;

/// How a tile's approximate keys are computed.
pub(super) enum Tiles {
    /// References minus `centre`, quantised per row to i8 (`scale` per row) and stored `+ 128`
    /// as u8, in blocks of [`QUAD`] rows: for each group of 4 entries, 4 panels of 16 rows x 4
    /// bytes (the layout `vpdpbusd` multiplies). Rows past the end are zero.
    Int8 {
        packed: Vec<u8>,
        groups: usize,
        scale: Vec<f32>,
        centre: Vec<f32>,
    },
    /// The f32 GEMM of the stored references.
    F32,
}

/// The per-reference columns of the bounds (see the module comment).
pub(super) struct Bounds {
    pub(super) tiles: Tiles,
    /// Added to a tile's key: `centre·r` (int8) minus `||r||²/2` (L2).
    pub(super) off: Vec<f32>,
    pub(super) x: Vec<f32>,
    pub(super) y: Vec<f32>,
    pub(super) z: Vec<f32>,
    /// Largest of `x`, `y`, `z` and `|off|`: a query whose bound could overflow f32 against it is
    /// ranked by brute force instead.
    pub(super) max_col: f64,
    /// False when a column overflowed f32 (L2 on values beyond ~1e18): every query by brute force.
    pub(super) usable: bool,
}

impl fmt::Debug for Bounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_int8() { "int8" } else { "f32" };
        f.debug_struct("Bounds")
            .field("tiles", &kind)
            .field("rows", &self.off.len())
            .finish()
    }
}

/// The per-query side of a block: int8 words (4 entries per i32, [`Tiles::Int8`]), the tile
/// correction and scale, and the bound coefficients. `ok[i]` false: rank query `i` by brute force.
#[derive(Default)]
pub(super) struct QueryBlock {
    pub(super) words: Vec<i32>,
    pub(super) corr: Vec<i32>,
    pub(super) scale: Vec<f32>,
    pub(super) alpha: Vec<f32>,
    pub(super) beta: Vec<f32>,
    pub(super) ok: Vec<bool>,
}

/// Whether this CPU runs the int8 kernel.
pub(super) fn int8_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `||v||` in f64, rounded up into an f32 (the bound columns must not shrink in the rounding).
fn up(v: f64) -> f32 {
    (v * (1.0 + 1e-6)) as f32
}

/// Rounds `c` (f64, exact centred entries) to i8 with one scale: `(scale, ||s·x||, ||e||)`,
/// the entries written to `out`. A zero row has scale 0.
fn quantise(c: &[f64], out: &mut [i8]) -> (f32, f64, f64) {
    let m = c.iter().fold(0f64, |m, v| m.max(v.abs()));
    let s = (m / 127.0) as f32;
    let (mut sx2, mut e2) = (0f64, 0f64);
    for (v, o) in c.iter().zip(out.iter_mut()) {
        let x = if s > 0.0 {
            // Any integer near v / s will do (the error is measured, not assumed); this rounds
            // half away from zero without a libm call.
            let t = v / f64::from(s);
            ((t + 0.5f64.copysign(t)) as i32).clamp(-127, 127).into()
        } else {
            0.0
        };
        *o = x as i8;
        let sx = f64::from(s) * x;
        sx2 += sx * sx;
        e2 += (v - sx) * (v - sx);
    }
    (s, sx2.sqrt(), e2.sqrt())
}

impl Bounds {
    /// Whether tiles come from the int8 kernel.
    pub(super) fn is_int8(&self) -> bool {
        matches!(self.tiles, Tiles::Int8 { .. })
    }

    /// The columns for `refs` (row-major, `dim` wide, as stored: normalised for cosine); the int8
    /// kernel when `int8` and the width allows it.
    pub(super) fn build(refs: &[f32], dim: usize, metric: Metric, int8: bool) -> Self {
        let n = refs.len() / dim;
        let half = |r: &[f32]| match metric {
            Metric::Cosine => 0.0,
            Metric::L2 => half_any(r),
        };
        let (mut off, mut x, mut y, mut z) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let tiles = if int8 && dim <= INT8_MAX_DIM {
            let mut mean = vec![0f64; dim];
            for r in refs.chunks_exact(dim) {
                mean.iter_mut()
                    .zip(r)
                    .for_each(|(m, &v)| *m += f64::from(v));
            }
            let centre: Vec<f32> = mean.iter().map(|m| (m / n as f64) as f32).collect();
            let groups = dim.div_ceil(4);
            let mut packed = vec![128u8; n.div_ceil(QUAD) * QUAD * groups * 4];
            let mut scale = Vec::with_capacity(n);
            let (mut c, mut row) = (vec![0f64; dim], vec![0i8; dim]);
            for (i, r) in refs.chunks_exact(dim).enumerate() {
                let mut mu_r = 0f64;
                for ((cj, &v), &m) in c.iter_mut().zip(r).zip(&centre) {
                    *cj = f64::from(v) - f64::from(m);
                    mu_r += f64::from(m) * f64::from(v);
                }
                let (s, _, e) = quantise(&c, &mut row);
                let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
                let h = half(r);
                scale.push(s);
                off.push((mu_r - h) as f32);
                x.push(up(e));
                y.push(up(norm));
                z.push(up(EPS * (mu_r.abs() + h)));
                // block i / QUAD, group t, panel (i % QUAD) / 16, lane i % 16, byte j % 4
                let base = (i / QUAD) * QUAD * groups * 4 + (i % QUAD / 16) * 64 + (i % 16) * 4;
                for (j, &v) in row.iter().enumerate() {
                    packed[base + (j / 4) * QUAD * 4 + j % 4] = (i16::from(v) + 128) as u8;
                }
            }
            Tiles::Int8 {
                packed,
                groups,
                scale,
                centre,
            }
        } else {
            for r in refs.chunks_exact(dim) {
                let h = half(r);
                off.push(-h as f32);
                x.push(up((2.0 * half_any(r)).sqrt()));
                y.push(0.0);
                z.push(up(EPS * h));
            }
            Tiles::F32
        };
        let max_col = off
            .iter()
            .map(|v| v.abs())
            .chain(x.iter().copied())
            .chain(y.iter().copied())
            .chain(z.iter().copied())
            .fold(0f32, f32::max);
        Self {
            tiles,
            usable: max_col.is_finite(),
            max_col: f64::from(max_col),
            off,
            x,
            y,
            z,
        }
    }

    /// The query side for `queries` (row-major, prepared as the references are stored), into `qb`.
    pub(super) fn prepare_queries(&self, queries: &[f32], dim: usize, qb: &mut QueryBlock) {
        let nq = queries.len() / dim;
        *qb = QueryBlock::default();
        match &self.tiles {
            Tiles::Int8 { groups, centre, .. } => {
                let mut all_words = vec![0i32; nq * groups];
                let (mut c, mut row) = (vec![0f64; dim], vec![0i8; groups * 4]);
                for (q, words) in queries
                    .chunks_exact(dim)
                    .zip(all_words.chunks_exact_mut(*groups))
                {
                    for ((cj, &v), &m) in c.iter_mut().zip(q).zip(centre) {
                        *cj = f64::from(v) - f64::from(m);
                    }
                    let (s, sx, e) = quantise(&c, &mut row[..dim]);
                    let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
                    for (w, b) in words.iter_mut().zip(row.chunks_exact(4)) {
                        *w = i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
                    }
                    // The kernel multiplies the references' u8 (x + 128) by the query's i8.
                    qb.corr
                        .push(128 * row.iter().map(|&v| i32::from(v)).sum::<i32>());
                    qb.scale.push(s);
                    self.push_coefficients(qb, sx, e + EPS * norm, norm);
                }
                qb.words = all_words;
            }
            Tiles::F32 => {
                // γ_d with a margin, plus the slack for the offsets' and keys' roundings.
                let u = f64::from(f32::EPSILON) / 2.0;
                let gamma = dim as f64 * u / (1.0 - dim as f64 * u);
                for q in queries.chunks_exact(dim) {
                    let norm = (2.0 * half_any(q)).sqrt();
                    self.push_coefficients(qb, (1.01 * gamma + EPS) * norm, 0.0, norm);
                }
            }
        }
    }

    fn push_coefficients(&self, qb: &mut QueryBlock, alpha: f64, beta: f64, norm: f64) {
        // Every term of a key, offset and bound stays far inside f32 for this query.
        let worst = (alpha + beta + norm + 1.0) * self.max_col;
        qb.ok.push(self.usable && worst.is_finite() && worst < 1e36);
        qb.alpha.push(up(alpha));
        qb.beta.push(up(beta));
    }
}

/// `||v||² / 2` in f64.
fn half_any(v: &[f32]) -> f64 {
    0.5 * v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>()
}

/// `out[qi * ld + r]` = the i32 product of packed reference row `r` (u8, `+ 128`) with query
/// `qi`'s i8 words, for the [`QUAD`]-row blocks in `packed` and the `nq` queries in `words`.
/// Only called after [`int8_available`] said yes (it asserts the shapes it relies on).
#[allow(unsafe_code)]
pub(super) fn int8_tile(
    packed: &[u8],
    groups: usize,
    words: &[i32],
    nq: usize,
    out: &mut [i32],
    ld: usize,
) {
    let quad_bytes = QUAD * groups * 4;
    let quads = packed.len() / quad_bytes;
    assert!(packed.len() == quads * quad_bytes && words.len() >= nq * groups);
    assert!(ld >= quads * QUAD && out.len() >= nq.saturating_sub(1) * ld + quads * QUAD);
    assert!(int8_available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F/BW/VNNI (asserted), the features `vnni::tile` is compiled for,
    // and the shapes it reads and writes within are the ones asserted above.
    unsafe {
        vnni::tile(packed, groups, words, nq, out, ld)
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni {
    use std::arch::x86_64::*;

    use super::QUAD;

    /// Queries per micro-kernel call: 6 x 4 accumulators + 4 reference registers of 32.
    const NQ: usize = 6;

    /// See [`super::int8_tile`] (which checks the shapes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(
        packed: &[u8],
        groups: usize,
        words: &[i32],
        nq: usize,
        out: &mut [i32],
        ld: usize,
    ) {
        let quad_bytes = QUAD * groups * 4;
        for (b, quad) in packed.chunks_exact(quad_bytes).enumerate() {
            let mut q0 = 0;
            while q0 < nq {
                let w = words.as_ptr().add(q0 * groups);
                let o = out.as_mut_ptr().add(q0 * ld + b * QUAD);
                let p = quad.as_ptr();
                q0 += match nq - q0 {
                    1 => micro::<1>(p, groups, w, o, ld),
                    2 => micro::<2>(p, groups, w, o, ld),
                    3 => micro::<3>(p, groups, w, o, ld),
                    4 => micro::<4>(p, groups, w, o, ld),
                    5 => micro::<5>(p, groups, w, o, ld),
                    _ => micro::<NQ>(p, groups, w, o, ld),
                };
            }
        }
    }

    /// One block of [`QUAD`] references times `Q` queries, accumulated over all groups in
    /// registers and stored once. Returns `Q`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn micro<const Q: usize>(
        quad: *const u8,
        groups: usize,
        words: *const i32,
        out: *mut i32,
        ld: usize,
    ) -> usize {
        let mut acc = [[_mm512_setzero_si512(); 4]; Q];
        for t in 0..groups {
            let p = quad.add(t * QUAD * 4);
            let r = [
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(64).cast()),
                _mm512_loadu_si512(p.add(128).cast()),
                _mm512_loadu_si512(p.add(192).cast()),
            ];
            for (qi, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_epi32(*words.add(qi * groups + t));
                for (a, &r) in acc.iter_mut().zip(&r) {
                    *a = _mm512_dpbusd_epi32(*a, r, w);
                }
            }
        }
        for (qi, acc) in acc.iter().enumerate() {
            for (j, a) in acc.iter().enumerate() {
                _mm512_storeu_si512(out.add(qi * ld + j * 16).cast(), *a);
            }
        }
        Q
    }
}
