//! Approximate ranking keys with a proven error bound, for exact search (`exact.rs`).
//!
//! Key decision: exact search does not rank by the f32 product it computes. For every query `q`
//! and reference `r` a tile gives an approximate key `a` (cheap: an int8 product where the CPU has
//! AVX-512 VNNI, an f16 one where it has AVX-512, else the f32 GEMM) and a bound `b` with `|key(q, r) - a| <= b`, where `key` is the
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
//! The f16 key, for sets where int8 does not prune (isotropic vectors at large widths, where every
//! similarity lies within the int8 bound of the k-th best): the same centring, references scaled
//! per row to a largest entry of ±1 and rounded to f16, queries to f32 the same way, multiplied
//! in f32. The bound is the int8 one with the f32 product's `γ_d ||s_q x_q||·||s_r x_r||` added:
//! about 2^-11 relative against int8's 2^-7, so it prunes where int8 does not, while a row is half
//! the bytes of f32. A single live query is bound by memory bandwidth, so it reads the references
//! in about half the time of the f32 GEMM.
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

/// The kernels that can give a tile's approximate keys, most compact first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kernel {
    Int8,
    F16,
    F32,
}

impl Kernel {
    /// Whether this CPU runs the kernel.
    pub(super) fn available(self) -> bool {
        match self {
            Kernel::Int8 => int8_available(),
            Kernel::F16 => f16_available(),
            Kernel::F32 => true,
        }
    }
}

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
    /// References minus `centre`, divided per row by `scale` (the largest magnitude) and
    /// rounded to f16 (bits), row-major, each row `stride` wide (the width rounded up to 16,
    /// zero-padded).
    F16 {
        rows: Vec<u16>,
        stride: usize,
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
        f.debug_struct("Bounds")
            .field("tiles", &self.kernel())
            .field("rows", &self.off.len())
            .finish()
    }
}

/// The per-query side of a block: int8 words (4 entries per i32, [`Tiles::Int8`]) or scaled f32
/// rows (`stride` wide, [`Tiles::F16`]), the tile correction and scale, and the bound
/// coefficients. `ok[i]` false: rank query `i` by brute force.
#[derive(Default)]
pub(super) struct QueryBlock {
    pub(super) words: Vec<i32>,
    pub(super) vals: Vec<f32>,
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

/// Whether this CPU runs the f16 kernel (AVX-512F converts 16 halves a register).
pub(super) fn f16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Absolute slack for f32 underflow in a key of `dim` products and its offset (each term at
/// most half the smallest subnormal, 2^-150), with a margin for rounding the bound itself.
fn underflow(dim: usize) -> f64 {
    (dim as f64 + 4.0) * 2f64.powi(-148)
}

/// `||v||` in f64, rounded up into an f32 (the bound columns must not shrink in the rounding).
fn up(v: f64) -> f32 {
    (v * (1.0 + 1e-6)) as f32
}

/// Rounds `c` (f64, exact centred entries) with one scale `s` (the largest magnitude over
/// `top`): `round(v / s)` gives what is stored and its value. Returns `(s, ||s·x||, ||e||)` with
/// `e = c - s·x` measured, the stored entries written to `out`. A zero row has scale 0.
#[inline(always)]
fn round_row<T: Copy>(
    c: &[f64],
    out: &mut [T],
    top: f64,
    zero: T,
    round: impl Fn(f64) -> (T, f64),
) -> (f32, f64, f64) {
    let m = lanes(c.len(), |j, l: &mut [f64; 1]| l[0] = l[0].max(c[j].abs()))
        .iter()
        .fold(0f64, |m, l| m.max(l[0]));
    let s = ((m / top) as f32).min(f32::MAX);
    if s <= 0.0 {
        out.iter_mut().for_each(|o| *o = zero);
        return (s.max(0.0), 0.0, c.iter().map(|v| v * v).sum::<f64>().sqrt());
    }
    // The entry nearest `v / s` is found by multiplying (the stored entry's error is measured
    // below, so any nearby one will do).
    let (sf, inv) = (f64::from(s), 1.0 / f64::from(s));
    let sums = lanes(c.len(), |j, l: &mut [f64; 2]| {
        let (stored, x) = round(c[j] * inv);
        out[j] = stored;
        let sx = sf * x;
        l[0] += sx * sx;
        l[1] += (c[j] - sx) * (c[j] - sx);
    });
    let (sx2, e2) = sums
        .iter()
        .fold((0f64, 0f64), |(a, b), l| (a + l[0], b + l[1]));
    (s, sx2.sqrt(), e2.sqrt())
}

/// Independent accumulators of the f64 sums over a row ([`LANES`] of them, entry `j` into lane
/// `j % LANES`), so that the sums do not wait on one another and vectorise. Any order of an f64
/// sum errs far inside the bounds' slack ([`EPS`]).
const LANES: usize = 8;

/// `f(j, lane)` for `j` in `0..n`, each into the accumulators of lane `j % LANES` (zeroed first);
/// the lanes, for the caller to combine.
#[inline(always)]
fn lanes<const K: usize>(n: usize, mut f: impl FnMut(usize, &mut [f64; K])) -> [[f64; K]; LANES] {
    let mut acc = [[0f64; K]; LANES];
    let full = n / LANES * LANES;
    for j0 in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            f(j0 + l, a);
        }
    }
    for (j, a) in (full..n).zip(acc.iter_mut()) {
        f(j, a);
    }
    acc
}

/// [`round_row`] to i8 (largest entry ±127).
#[inline(always)]
fn quantise(c: &[f64], out: &mut [i8]) -> (f32, f64, f64) {
    round_row(c, out, 127.0, 0, |t| {
        // Any integer near t will do (the error is measured, not assumed). Adding 1.5 * 2^52
        // (where the f64 spacing is 1) rounds t to the nearest integer, held in the low bits of
        // the sum: no libm call and no saturating cast, so the loop vectorises.
        const ROUND: f64 = 6_755_399_441_055_744.0;
        let x = (t.clamp(-127.0, 127.0) + ROUND).to_bits() as i32;
        (x as i8, f64::from(x))
    })
}

/// [`round_row`] to f16 bits (largest entry ±1).
fn round_f16(c: &[f64], out: &mut [u16]) -> (f32, f64, f64) {
    round_row(c, out, 1.0, 0, |t| {
        let h = half::f16::from_f64(t);
        (h.to_bits(), h.to_f64())
    })
}

/// [`round_row`] to f32 (largest entry ±1).
fn round_f32(c: &[f64], out: &mut [f32]) -> (f32, f64, f64) {
    round_row(c, out, 1.0, 0.0, |t| (t as f32, f64::from(t as f32)))
}

/// `f(i, c, ||c||, centre·row)` for each row `i` of `rows`, with `c` the row minus `centre`
/// (f64, exact).
#[inline(always)]
fn each_centred(
    rows: &[f32],
    dim: usize,
    centre: &[f32],
    mut f: impl FnMut(usize, &[f64], f64, f64),
) {
    let mut c = vec![0f64; dim];
    for (i, r) in rows.chunks_exact(dim).enumerate() {
        let (mu, norm2) = centred(r, centre, &mut c);
        f(i, &c, norm2.sqrt(), mu);
    }
}

/// Rounds centred row `i` (stores it) and returns its scale and the norm of its rounding error.
type RoundRow<'a> = dyn FnMut(usize, &[f64]) -> (f32, f64) + 'a;

/// `γ_d` (the relative error of an f32 dot product of `d` terms, any order) with a margin.
fn gamma(d: usize) -> f64 {
    let u = f64::from(f32::EPSILON) / 2.0;
    1.01 * (d as f64 * u / (1.0 - d as f64 * u))
}

/// The references' mean, in f32 (what keys are centred on).
fn mean_row(refs: &[f32], dim: usize) -> Vec<f32> {
    let n = (refs.len() / dim).max(1);
    let mut mean = vec![0f64; dim];
    for r in refs.chunks_exact(dim) {
        mean.iter_mut()
            .zip(r)
            .for_each(|(m, &v)| *m += f64::from(v));
    }
    mean.iter().map(|m| (m / n as f64) as f32).collect()
}

/// `c = v - centre` in f64 (exact), returning `centre·v` and `||c||²`.
#[inline(always)]
fn centred(v: &[f32], centre: &[f32], c: &mut [f64]) -> (f64, f64) {
    let n = v.len().min(centre.len()).min(c.len());
    let sums = lanes(n, |j, l: &mut [f64; 2]| {
        let (x, m) = (f64::from(v[j]), f64::from(centre[j]));
        c[j] = x - m;
        l[0] += m * x;
        l[1] += c[j] * c[j];
    });
    sums.iter()
        .fold((0f64, 0f64), |(a, b), l| (a + l[0], b + l[1]))
}

impl Bounds {
    /// The kernel tiles come from.
    pub(super) fn kernel(&self) -> Kernel {
        match self.tiles {
            Tiles::Int8 { .. } => Kernel::Int8,
            Tiles::F16 { .. } => Kernel::F16,
            Tiles::F32 => Kernel::F32,
        }
    }

    /// The columns for `refs` (row-major, `dim` wide, as stored: normalised for cosine) for
    /// `kernel` (the caller checks [`Kernel::available`]); int8 falls back to f32 beyond
    /// [`INT8_MAX_DIM`].
    pub(super) fn build(refs: &[f32], dim: usize, metric: Metric, kernel: Kernel) -> Self {
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
        let kernel = match kernel {
            Kernel::Int8 if dim > INT8_MAX_DIM => Kernel::F32,
            k => k,
        };
        // The centred kernels: each row centred on the mean, rounded by `round(i, c)` (which
        // stores it and returns its scale and measured error), its columns pushed.
        let mut centred_rows = |round: &mut RoundRow<'_>| {
            let centre = mean_row(refs, dim);
            let mut scale = Vec::with_capacity(n);
            each_centred(refs, dim, &centre, |i, c, norm, mu_r| {
                let (s, e) = round(i, c);
                let h = half(&refs[i * dim..(i + 1) * dim]);
                scale.push(s);
                off.push((mu_r - h) as f32);
                x.push(up(e));
                y.push(up(norm));
                z.push(up(EPS * (mu_r.abs() + h) + underflow(dim)));
            });
            (centre, scale)
        };
        let tiles = match kernel {
            Kernel::Int8 => {
                let groups = dim.div_ceil(4);
                let mut packed = vec![128u8; n.div_ceil(QUAD) * QUAD * groups * 4];
                let mut row = vec![0i8; dim];
                let (centre, scale) = centred_rows(&mut |i, c| {
                    let (s, _, e) = quantise(c, &mut row);
                    // block i / QUAD, group t, panel (i % QUAD) / 16, lane i % 16, byte j % 4
                    let base = (i / QUAD) * QUAD * groups * 4 + (i % QUAD / 16) * 64 + (i % 16) * 4;
                    for (j, &v) in row.iter().enumerate() {
                        packed[base + (j / 4) * QUAD * 4 + j % 4] = (i16::from(v) + 128) as u8;
                    }
                    (s, e)
                });
                Tiles::Int8 {
                    packed,
                    groups,
                    scale,
                    centre,
                }
            }
            Kernel::F16 => {
                let stride = dim.div_ceil(16) * 16;
                let mut rows = vec![0u16; n * stride];
                let (centre, scale) = centred_rows(&mut |i, c| {
                    let (s, _, e) = round_f16(c, &mut rows[i * stride..i * stride + dim]);
                    (s, e)
                });
                Tiles::F16 {
                    rows,
                    stride,
                    scale,
                    centre,
                }
            }
            Kernel::F32 => {
                for r in refs.chunks_exact(dim) {
                    let h = half(r);
                    off.push(-h as f32);
                    x.push(up((2.0 * half_any(r)).sqrt()));
                    y.push(0.0);
                    z.push(up(EPS * h + underflow(dim)));
                }
                Tiles::F32
            }
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

    /// For prepared query `q`, the key the tiles approximate (`key` in the module comment) of a
    /// reference at exact rank distance `d` (cosine `1 - q·r`, L2 `||q - r||²`, as exact search
    /// ranks), and a margin: `key(d) - margin` is below the reference's real key, and
    /// `key(d) + margin` above it, whatever the rounding of `d` and of this map. The centred
    /// kernels' key is `(q - μ)·(r - μ) + μ·r - h_r = q·r - h_r - (q·μ - ||μ||²)` (`h_r =
    /// ||r||²/2` for L2, else 0); the f32 kernel's is `q·r - h_r`; and `q·r` is `1 - d` (cosine) or
    /// `(||q||² - d) / 2 + h_r` (L2).
    pub(super) fn key_of_distance(&self, q: &[f32], metric: Metric) -> impl Fn(f64) -> (f64, f64) {
        let centre = match &self.tiles {
            Tiles::Int8 { centre, .. } | Tiles::F16 { centre, .. } => Some(centre.as_slice()),
            Tiles::F32 => None,
        };
        let (mut shift, mut size) = (0f64, 0f64);
        if let Some(mu) = centre {
            let (qm, mm) = q.iter().zip(mu).fold((0f64, 0f64), |(a, b), (&x, &m)| {
                let (x, m) = (f64::from(x), f64::from(m));
                (a + x * m, b + m * m)
            });
            shift = qm - mm;
            size = q
                .iter()
                .zip(mu)
                .map(|(&x, &m)| (f64::from(x) * f64::from(m)).abs())
                .sum::<f64>()
                + mm;
        }
        let qq = match metric {
            Metric::Cosine => 0.0,
            Metric::L2 => q.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>(),
        };
        // Each f64 sum of `dim` terms errs by at most `dim * 2^-53` of the sum of its terms'
        // magnitudes: far inside this relative margin for any width a detector takes.
        let rel = 1e-9;
        move |d: f64| {
            let dot = match metric {
                Metric::Cosine => 1.0 - d,
                Metric::L2 => 0.5 * (qq - d),
            };
            let key = dot - shift;
            (key, rel * (1.0 + d.abs() + qq + size + key.abs()))
        }
    }

    /// The query side for `queries` (row-major, prepared as the references are stored), into `qb`.
    pub(super) fn prepare_queries(&self, queries: &[f32], dim: usize, qb: &mut QueryBlock) {
        let nq = queries.len() / dim;
        *qb = QueryBlock::default();
        match &self.tiles {
            Tiles::Int8 { groups, centre, .. } => {
                assert!(
                    int8_available(),
                    "int8 tiles on a CPU without the int8 kernel"
                );
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512F/BW (asserted), all `prepare_int8_avx512` enables.
                #[allow(unsafe_code)]
                unsafe {
                    self.prepare_int8_avx512(queries, dim, *groups, centre, qb)
                }
                #[cfg(not(target_arch = "x86_64"))]
                self.prepare_int8(queries, dim, *groups, centre, qb)
            }
            Tiles::F16 { stride, centre, .. } => {
                // The f32 product of the scaled rows errs by at most γ ||s_q x_q||·||s_r x_r||,
                // and ||s_r x_r|| <= ||c_r|| + ||e_r||: γ joins both coefficients.
                let stride = *stride;
                let g = gamma(stride);
                let mut vals = vec![0f32; nq * stride];
                each_centred(queries, dim, centre, |qi, c, norm, _| {
                    let (s, sx, e) = round_f32(c, &mut vals[qi * stride..qi * stride + dim]);
                    qb.scale.push(s);
                    self.push_coefficients(qb, sx * (1.0 + g), e + g * sx + EPS * norm, norm);
                });
                qb.vals = vals;
            }
            Tiles::F32 => {
                // γ_d with a margin, plus the slack for the offsets' and keys' roundings.
                let g = gamma(dim);
                for q in queries.chunks_exact(dim) {
                    let norm = (2.0 * half_any(q)).sqrt();
                    self.push_coefficients(qb, (g + EPS) * norm, 0.0, norm);
                }
            }
        }
    }

    /// [`Bounds::prepare_queries`] for int8 tiles, compiled for AVX-512 (which the int8 kernel
    /// needs anyway): the f64 centring, rounding and norms run 8 lanes a register, against 2 in
    /// the baseline build. The same operations in the same order, so the same bits.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn prepare_int8_avx512(
        &self,
        queries: &[f32],
        dim: usize,
        groups: usize,
        centre: &[f32],
        qb: &mut QueryBlock,
    ) {
        self.prepare_int8(queries, dim, groups, centre, qb);
    }

    #[inline(always)]
    fn prepare_int8(
        &self,
        queries: &[f32],
        dim: usize,
        groups: usize,
        centre: &[f32],
        qb: &mut QueryBlock,
    ) {
        let nq = queries.len() / dim;
        let mut words = vec![0i32; nq * groups];
        let mut row = vec![0i8; groups * 4];
        each_centred(queries, dim, centre, |qi, c, norm, _| {
            let (s, sx, e) = quantise(c, &mut row[..dim]);
            let out = &mut words[qi * groups..(qi + 1) * groups];
            for (w, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *w = i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
            }
            // The kernel multiplies the references' u8 (x + 128) by the query's i8.
            qb.corr
                .push(128 * row.iter().map(|&v| i32::from(v)).sum::<i32>());
            qb.scale.push(s);
            self.push_coefficients(qb, sx, e + EPS * norm, norm);
        });
        qb.words = words;
    }

    #[inline(always)]
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

/// Most queries [`f16_tile`] multiplies at once: more would re-read a tile from memory per four
/// queries, so larger blocks widen the rows ([`widen_f16`]) for the f32 GEMM instead.
pub(super) const F16_DIRECT_MAX: usize = 4;

/// `out[qi * ld + r]` = the f32 product of f16 row `r` of `rows` (`stride` wide) with query `qi`
/// of `vals` (`stride` wide, `nq <= F16_DIRECT_MAX`), every row read once. Only called after
/// [`f16_available`] said yes (it asserts the shapes it relies on).
#[allow(unsafe_code)]
pub(super) fn f16_tile(
    rows: &[u16],
    stride: usize,
    vals: &[f32],
    nq: usize,
    out: &mut [f32],
    ld: usize,
) {
    assert!(stride.is_multiple_of(16) && rows.len().is_multiple_of(stride.max(1)));
    let n = rows.len() / stride.max(1);
    assert!((1..=F16_DIRECT_MAX).contains(&nq) && vals.len() >= nq * stride);
    assert!(ld >= n && out.len() >= (nq - 1) * ld + n);
    assert!(f16_available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (asserted), the feature `halves::tile` is compiled for, and
    // the shapes it reads and writes within are the ones asserted above.
    unsafe {
        halves::tile(rows, stride, vals, nq, out, ld)
    };
}

/// The f16 bits in `rows` as f32 into `out` (the same length). Only called after
/// [`f16_available`] said yes.
#[allow(unsafe_code)]
pub(super) fn widen_f16(rows: &[u16], out: &mut [f32]) {
    assert!(rows.len() == out.len() && f16_available());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (asserted); `halves::widen` stays within the equal lengths.
    unsafe {
        halves::widen(rows, out)
    };
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod halves {
    use std::arch::x86_64::*;

    /// Reference rows per micro-kernel call: with 4 queries, 16 accumulators.
    const NR: usize = 4;

    /// See [`super::f16_tile`] (which checks the shapes).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        rows: &[u16],
        stride: usize,
        vals: &[f32],
        nq: usize,
        out: &mut [f32],
        ld: usize,
    ) {
        let n = rows.len() / stride;
        let mut r = 0;
        while r < n {
            let p = rows.as_ptr().add(r * stride);
            let (q, o) = (vals.as_ptr(), out.as_mut_ptr().add(r));
            r += match (n - r >= NR, nq) {
                (true, 1) => micro::<NR, 1>(p, stride, q, o, ld),
                (true, 2) => micro::<NR, 2>(p, stride, q, o, ld),
                (true, 3) => micro::<NR, 3>(p, stride, q, o, ld),
                (true, _) => micro::<NR, 4>(p, stride, q, o, ld),
                (false, 1) => micro::<1, 1>(p, stride, q, o, ld),
                (false, 2) => micro::<1, 2>(p, stride, q, o, ld),
                (false, 3) => micro::<1, 3>(p, stride, q, o, ld),
                (false, _) => micro::<1, 4>(p, stride, q, o, ld),
            };
        }
    }

    /// `R` rows times `Q` queries, each row's halves widened once a register and multiplied by
    /// every query; one accumulator per pair, summed across lanes at the end. Returns `R`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn micro<const R: usize, const Q: usize>(
        rows: *const u16,
        stride: usize,
        vals: *const f32,
        out: *mut f32,
        ld: usize,
    ) -> usize {
        let mut acc = [[_mm512_setzero_ps(); Q]; R];
        let mut j = 0;
        while j < stride {
            for (ri, acc) in acc.iter_mut().enumerate() {
                let h = _mm512_cvtph_ps(_mm256_loadu_si256(rows.add(ri * stride + j).cast()));
                for (qi, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(h, _mm512_loadu_ps(vals.add(qi * stride + j)), *a);
                }
            }
            j += 16;
        }
        for (ri, acc) in acc.iter().enumerate() {
            for (qi, a) in acc.iter().enumerate() {
                *out.add(qi * ld + ri) = _mm512_reduce_add_ps(*a);
            }
        }
        R
    }

    /// See [`super::widen_f16`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(rows: &[u16], out: &mut [f32]) {
        let n = rows.len() / 16 * 16;
        let mut j = 0;
        while j < n {
            let h = _mm256_loadu_si256(rows.as_ptr().add(j).cast());
            _mm512_storeu_ps(out.as_mut_ptr().add(j), _mm512_cvtph_ps(h));
            j += 16;
        }
        for (o, &h) in out[n..].iter_mut().zip(&rows[n..]) {
            *o = half::f16::from_bits(h).to_f32();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use actwatch_testkit::Rng;

    /// The approximate keys one kernel gives `queries` against every reference
    /// (`[query][reference]`), as exact search forms them before the scan: the tile product,
    /// scaled, plus the offset. The f32 GEMM's product is a plain loop here (its bound holds in
    /// any summation order; the test passes the f32 kernel's queries in `vals`); the f16 rows
    /// are multiplied both directly and widened.
    fn approximate_keys(b: &Bounds, qb: &QueryBlock, dim: usize, refs: &[f32]) -> Vec<Vec<f32>> {
        let n = b.off.len();
        let nq = qb.ok.len();
        let mut keys = vec![vec![0f32; n]; nq];
        match &b.tiles {
            Tiles::Int8 {
                packed,
                groups,
                scale,
                ..
            } => {
                let ld = n.div_ceil(QUAD) * QUAD;
                let mut t = vec![0i32; nq * ld];
                int8_tile(packed, *groups, &qb.words, nq, &mut t, ld);
                for (qi, k) in keys.iter_mut().enumerate() {
                    for (r, k) in k.iter_mut().enumerate() {
                        let dot = (t[qi * ld + r] - qb.corr[qi]) as f32;
                        *k = qb.scale[qi] * (scale[r] * dot) + b.off[r];
                    }
                }
            }
            Tiles::F16 {
                rows,
                stride,
                scale,
                ..
            } => {
                let mut wide = vec![0f32; rows.len()];
                widen_f16(rows, &mut wide);
                for (h, w) in rows.iter().zip(&wide) {
                    assert_eq!(half::f16::from_bits(*h).to_f32(), *w);
                }
                let mut t = vec![0f32; nq * n];
                for q0 in (0..nq).step_by(F16_DIRECT_MAX) {
                    let m = (nq - q0).min(F16_DIRECT_MAX);
                    let vals = &qb.vals[q0 * stride..];
                    f16_tile(rows, *stride, vals, m, &mut t[q0 * n..], n);
                }
                for (qi, k) in keys.iter_mut().enumerate() {
                    let q = &qb.vals[qi * stride..(qi + 1) * stride];
                    for (r, k) in k.iter_mut().enumerate() {
                        let w = &wide[r * stride..(r + 1) * stride];
                        let plain: f32 = q.iter().zip(w).map(|(a, b)| a * b).sum();
                        let direct = t[qi * n + r];
                        let g = gamma(*stride) as f32;
                        let size: f32 = q.iter().zip(w).map(|(a, b)| (a * b).abs()).sum();
                        assert!((direct - plain).abs() <= 2.0 * g * size + f32::MIN_POSITIVE);
                        *k = qb.scale[qi] * (scale[r] * direct) + b.off[r];
                    }
                }
            }
            Tiles::F32 => {
                for (qi, k) in keys.iter_mut().enumerate() {
                    let q = &qb.vals[qi * dim..(qi + 1) * dim];
                    for (r, k) in k.iter_mut().enumerate() {
                        let row = &refs[r * dim..(r + 1) * dim];
                        *k = q.iter().zip(row).map(|(a, b)| a * b).sum::<f32>() + b.off[r];
                    }
                }
            }
        }
        keys
    }

    /// Oracle: for every kernel, query and reference, `|key - approximate key| <= bound` with the
    /// key computed in f64 from the definition (`q·r`, minus `||r||²/2` for L2, minus the
    /// per-query constant `(q - centre)·centre` of the centred kernels), and the key
    /// `key_of_distance` maps the exact distance to within its margin of it. Isotropic rows at a
    /// large width (where int8's bound is loose and f16's is not), clustered rows off the origin
    /// at a width that is not a multiple of 16, a zero query, tiny and huge magnitudes.
    #[test]
    fn every_kernel_keeps_its_keys_within_their_bounds() {
        let mut rng = Rng::new(29);
        let mut sets = vec![(rng.gaussian_rows(45, 600, 0.0), 600)];
        let mut clus = rng.gaussian_rows(39, 37, 0.0);
        for (i, v) in clus.iter_mut().enumerate() {
            *v = 0.05 * *v + if i % 37 == 0 { 3.0 } else { 0.0 };
        }
        clus[37..74].iter_mut().for_each(|v| *v *= 1e-30);
        clus[74..111].iter_mut().for_each(|v| *v *= 1e8);
        sets.push((clus, 37));
        for (refs, dim) in &sets {
            let dim = *dim;
            let mut queries = rng.gaussian_rows(9, dim, 0.0);
            queries.extend(std::iter::repeat_n(0.0, dim));
            queries.extend_from_slice(&refs[..dim]);
            for metric in [Metric::Cosine, Metric::L2] {
                for kernel in [Kernel::Int8, Kernel::F16, Kernel::F32] {
                    if !kernel.available() {
                        continue;
                    }
                    let b = Bounds::build(refs, dim, metric, kernel);
                    assert_eq!(b.kernel(), kernel);
                    let mut qb = QueryBlock::default();
                    b.prepare_queries(&queries, dim, &mut qb);
                    if kernel == Kernel::F32 {
                        qb.vals = queries.clone();
                    }
                    let keys = approximate_keys(&b, &qb, dim, refs);
                    let centre = match &b.tiles {
                        Tiles::Int8 { centre, .. } | Tiles::F16 { centre, .. } => {
                            Some(centre.clone())
                        }
                        Tiles::F32 => None,
                    };
                    for (qi, q) in queries.chunks_exact(dim).enumerate() {
                        if !qb.ok[qi] {
                            continue;
                        }
                        let key_of = b.key_of_distance(q, metric);
                        let shift = centre.as_ref().map_or(0.0, |m| {
                            q.iter()
                                .zip(m)
                                .map(|(&a, &m)| (f64::from(a) - f64::from(m)) * f64::from(m))
                                .sum()
                        });
                        for (r, row) in refs.chunks_exact(dim).enumerate() {
                            let dot: f64 = q
                                .iter()
                                .zip(row)
                                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                                .sum();
                            let h = match metric {
                                Metric::Cosine => 0.0,
                                Metric::L2 => half_any(row),
                            };
                            let want = dot - h - shift;
                            // The key exact search maps a rank distance to is this one.
                            let d = match metric {
                                Metric::Cosine => 1.0 - dot,
                                Metric::L2 => q
                                    .iter()
                                    .zip(row)
                                    .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                                    .sum(),
                            };
                            let (mapped, margin) = key_of(d);
                            assert!(
                                (mapped - want).abs() <= margin,
                                "{kernel:?} {metric:?} d={dim} q={qi} r={r}: distance {d} maps \
                                 to {mapped}, key {want}, margin {margin}"
                            );
                            let bound = f64::from(qb.alpha[qi]) * f64::from(b.x[r])
                                + f64::from(qb.beta[qi]) * f64::from(b.y[r])
                                + f64::from(b.z[r]);
                            let got = f64::from(keys[qi][r]);
                            assert!(
                                (got - want).abs() <= bound,
                                "{kernel:?} {metric:?} d={dim} q={qi} r={r}: \
                                 {got} vs {want}, bound {bound}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Quantising stores, for every entry, an integer nearest `c / s` within ±127, and returns
    /// the scale, the norm of the stored row and the norm of its error as the naive formulas
    /// give them (the lanes sum in another order: equal to far inside the bounds' slack). Ties,
    /// the largest entry, a zero row and rows whose scale underflows f32.
    #[test]
    fn quantised_rows_are_the_nearest_integers_and_their_error_is_measured() {
        let mut rng = Rng::new(37);
        let mut rows: Vec<Vec<f64>> = (0..20usize)
            .map(|i| {
                (0..(37 + i * 11))
                    .map(|_| rng.normal() * 10f64.powi(i as i32 - 10))
                    .collect()
            })
            .collect();
        // Halves (ties at scale 1), the extremes, zero, and entries whose scale underflows.
        rows.push(
            (0..40)
                .map(|j| f64::from(j) - 20.5)
                .chain([127.0, -127.0])
                .collect(),
        );
        rows.push(vec![0.0; 19]);
        rows.push(vec![1e-300, -3e-300, 0.0]);
        for c in &rows {
            let mut out = vec![0i8; c.len()];
            let (s, sx, e) = quantise(c, &mut out);
            let m = c.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert_eq!(s, ((m / 127.0) as f32).min(f32::MAX));
            let (mut sx2, mut e2) = (0f64, 0f64);
            for (&v, &x) in c.iter().zip(&out) {
                let stored = f64::from(s) * f64::from(x);
                if s > 0.0 {
                    let t = v / f64::from(s);
                    assert!(
                        (t - f64::from(x)).abs() <= 0.5 + 1e-9,
                        "{v} / {s} stored as {x}"
                    );
                } else {
                    assert_eq!(x, 0);
                }
                sx2 += stored * stored;
                e2 += (v - stored) * (v - stored);
            }
            assert!(out.iter().all(|&x| x >= -127));
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.max(f64::MIN_POSITIVE);
            assert!(close(sx, sx2.sqrt()), "{sx} vs {}", sx2.sqrt());
            assert!(close(e, e2.sqrt()), "{e} vs {}", e2.sqrt());
        }
    }

    /// On isotropic rows at a large width the f16 bound is far tighter than int8's: the point
    /// of the kernel (mean bound over the mean spread of the keys).
    #[test]
    fn the_f16_bound_is_tighter_than_int8s() {
        let mut rng = Rng::new(31);
        let dim = 2048;
        let refs = rng.gaussian_rows(64, dim, 0.0);
        let queries = rng.gaussian_rows(4, dim, 0.0);
        let mean_bound = |kernel| {
            let b = Bounds::build(&refs, dim, Metric::L2, kernel);
            let mut qb = QueryBlock::default();
            b.prepare_queries(&queries, dim, &mut qb);
            let mut sum = 0f64;
            for qi in 0..4 {
                for r in 0..64 {
                    sum += f64::from(qb.alpha[qi]) * f64::from(b.x[r])
                        + f64::from(qb.beta[qi]) * f64::from(b.y[r]);
                }
            }
            sum / 256.0
        };
        let (i8b, f16b) = (mean_bound(Kernel::Int8), mean_bound(Kernel::F16));
        // The keys (products of two 2048-wide unit-variance rows) spread about sqrt(2048) = 45:
        // int8's bound is most of that (34 here), f16's a small fraction (0.7).
        assert!(
            f16b * 16.0 < i8b && f16b < 0.05 * 45.0,
            "int8 {i8b}, f16 {f16b}"
        );
    }
}
