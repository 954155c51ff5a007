//! Exact search in blocks: a block of queries against a tile of references gives approximate
//! keys with a proven error bound (`bounds.rs`: an int8 product where the CPU has AVX-512 VNNI,
//! an f16 one where int8 does not prune, else the f32 GEMM), scanned into each query's threshold (the k-th largest lower bound) and the
//! references whose upper bound reaches it; only those are ranked by the exact f64 distance. Memory
//! is bounded by the tile sizes and [`CANDIDATES_MAX`] per query.

use actwatch_core::l2_normalize_rows;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::bounds::{
    f16_tile, int8_available, int8_tile, widen_f16, Bounds, QueryBlock, Tiles, F16_DIRECT_MAX, QUAD,
};
use super::hnsw::prefetch;
use super::{KnnDetector, Metric, QUERY_BLOCK, REF_BLOCK, SCAN_CHUNK};

/// A query's k nearest references, (exact distance before clamping, index), nearest first.
pub(super) type Nearest = Vec<(f64, usize)>;
/// What exact search does with each prepared query and its [`Nearest`].
pub(super) type Finish<'a, T> = dyn Fn(&[f32], Nearest) -> T + Sync + 'a;

/// Most references one query holds for ranking again. Beyond it (thousands of references tied
/// within the bound: duplicates, a degenerate set) the query is ranked by brute force in f64,
/// which is exact too; memory per query block stays bounded either way.
const CANDIDATES_MAX: usize = 8192;

/// Candidates ahead whose row is requested while one is ranked again.
const RANK_LOOKAHEAD: usize = 2;

/// References taken as queries to judge whether a kernel's bounds prune ([`KnnDetector::bounds_prune`]).
const PRUNE_SAMPLE: usize = 32;
/// The int8 kernel is kept when a query ranks at most 1/16 of the references again. Its product
/// costs about half the f32 GEMM's (6k x 384: 2x the queries/s), while ranking a reference again
/// (f64, a row from memory) costs several times its share of the GEMM, so beyond about 1/8 the
/// int8 kernel loses; 1/16 leaves a margin.
const PRUNE_MIN_RATIO: usize = 16;

/// One query's scan state: the k largest lower bounds seen (descending) and the references whose
/// upper bound reached the threshold when they were seen.
struct Found {
    k: usize,
    lows: Vec<f32>,
    cands: Vec<(u32, f32)>,
    cap: usize,
    /// More than [`CANDIDATES_MAX`] candidates stayed: rank by brute force.
    overflow: bool,
}

impl Found {
    fn new(k: usize) -> Self {
        Self {
            k,
            lows: Vec::with_capacity(k),
            cands: Vec::new(),
            cap: (4 * k).max(256),
            overflow: false,
        }
    }

    /// No true k-nearest neighbour has a key below this.
    #[inline]
    fn threshold(&self) -> f32 {
        if self.lows.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.lows[self.k - 1]
        }
    }

    #[inline]
    fn offer_low(&mut self, low: f32) {
        if low <= self.threshold() {
            return;
        }
        if self.lows.len() < self.k {
            self.lows.push(low);
        }
        let mut pos = self.lows.len() - 1;
        while pos > 0 && self.lows[pos - 1] < low {
            self.lows[pos] = self.lows[pos - 1];
            pos -= 1;
        }
        self.lows[pos] = low;
    }

    #[inline]
    fn push(&mut self, i: usize, high: f32) {
        if self.overflow {
            return;
        }
        if self.cands.len() >= self.cap {
            let thr = self.threshold();
            self.cands.retain(|c| c.1 >= thr);
            if self.cands.len() > self.cap / 2 {
                if self.cap >= CANDIDATES_MAX.max(4 * self.k) {
                    self.overflow = true;
                    self.cands = Vec::new();
                    return;
                }
                self.cap *= 2;
            }
        }
        // Reference indices fit u32: exact search is for sets far below 4 billion rows.
        self.cands.push((i as u32, high));
    }

    /// Reference `i` with approximate key `key` and bound `bound`: a candidate when its upper
    /// bound reaches the threshold, its lower bound offered too. Returns the threshold after.
    #[inline]
    fn offer(&mut self, i: usize, key: f32, bound: f32) -> f32 {
        if key + bound >= self.threshold() {
            self.push(i, key + bound);
            self.offer_low(key - bound);
        }
        self.threshold()
    }

    fn merge(&mut self, other: Found) {
        for low in other.lows {
            self.offer_low(low);
        }
        self.overflow |= other.overflow;
        for (i, high) in other.cands {
            self.push(i as usize, high);
        }
    }

    /// Offers references `base + j` with approximate keys `a[j]` (offsets and bound columns from
    /// `cols`, starting at `base`); whole chunks none of whose upper bounds reaches the threshold
    /// are skipped after one vectorised pass.
    #[inline(always)]
    fn scan(&mut self, a: &[f32], b: &Bounds, base: usize, alpha: f32, beta: f32) {
        let end = base + a.len();
        let (off, x, y, z) = (
            &b.off[base..end],
            &b.x[base..end],
            &b.y[base..end],
            &b.z[base..end],
        );
        let mut thr = self.threshold();
        let mut high = [0f32; SCAN_CHUNK];
        for (c, chunk) in a.chunks(SCAN_CHUNK).enumerate() {
            let s = c * SCAN_CHUNK;
            let e = s + chunk.len();
            // Upper bounds of the chunk and which reach the threshold, as a bit mask (vectorised).
            let mut mask = 0u32;
            for (j, ((((h, &a), &o), &x), (&y, &z))) in high
                .iter_mut()
                .zip(chunk)
                .zip(&off[s..e])
                .zip(&x[s..e])
                .zip(y[s..e].iter().zip(&z[s..e]))
                .enumerate()
            {
                *h = a + o + (alpha * x + beta * y + z);
                mask |= u32::from(*h >= thr) << j;
            }
            while mask != 0 {
                let j = mask.trailing_zeros() as usize;
                mask &= mask - 1;
                let bound = alpha * x[s + j] + beta * y[s + j] + z[s + j];
                thr = self.offer(base + s + j, chunk[j] + off[s + j], bound);
            }
        }
    }
}

/// Each query's approximate keys from its column of the int8 tile (`a = s_q s_r (t - corr)`),
/// scanned into its state. Compiled for AVX-512, which the int8 kernel needs anyway (checked when
/// its bounds were built); the scan is as long as the product, so it runs 16 keys a compare.
#[allow(clippy::too_many_arguments)]
#[allow(unsafe_code)]
fn scan_int8(
    found: &mut [Found],
    tile: &[i32],
    ld: usize,
    scale: &[f32],
    qblock: &QueryBlock,
    bounds: &Bounds,
    base: usize,
) {
    assert!(int8_available() && scale.len() <= ld && tile.len() >= found.len() * ld);
    assert!(base + scale.len() <= bounds.off.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F/BW (asserted), the features `avx512::scan_int8` is compiled
    // for; it reads `tile` and the columns within the lengths asserted here and in `scan`.
    unsafe {
        avx512::scan_int8(found, tile, ld, scale, qblock, bounds, base)
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Bounds, Found, QueryBlock};

    /// `sum_f64_lanes(a, b, term)` (knn/mod.rs) with `term` the product (`l2`: the squared
    /// difference), its 8 lanes in one register: per lane the same additions in the same order,
    /// the tail into the first lanes, then halving 8 -> 4 -> 2 -> 1 as it does.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lanes8(a: &[f32], b: &[f32], l2: bool) -> f64 {
        assert_eq!(a.len(), b.len());
        let n = a.len() / 8 * 8;
        let mut acc = _mm512_setzero_pd();
        let mut j = 0;
        while j < n {
            let x = _mm512_cvtps_pd(_mm256_loadu_ps(a.as_ptr().add(j)));
            let y = _mm512_cvtps_pd(_mm256_loadu_ps(b.as_ptr().add(j)));
            let t = if l2 {
                let d = _mm512_sub_pd(x, y);
                _mm512_mul_pd(d, d)
            } else {
                _mm512_mul_pd(x, y)
            };
            acc = _mm512_add_pd(acc, t);
            j += 8;
        }
        let mut lanes = [0f64; 8];
        _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
        for (l, (&x, &y)) in lanes.iter_mut().zip(a[n..].iter().zip(&b[n..])) {
            let (x, y) = (f64::from(x), f64::from(y));
            *l += if l2 { (x - y) * (x - y) } else { x * y };
        }
        let mut width = 8;
        while width > 1 {
            width /= 2;
            for k in 0..width {
                lanes[k] += lanes[k + width];
            }
        }
        lanes[0]
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn scan_int8(
        found: &mut [Found],
        tile: &[i32],
        ld: usize,
        scale: &[f32],
        qblock: &QueryBlock,
        bounds: &Bounds,
        base: usize,
    ) {
        let n = scale.len();
        let end = base + n;
        let (off, x, y, z) = (
            &bounds.off[base..end],
            &bounds.x[base..end],
            &bounds.y[base..end],
            &bounds.z[base..end],
        );
        // The tile's largest bound columns: `alpha xmax + beta ymax + zmax` is at least every
        // reference's bound (f32 rounding is monotone), so one add makes the skip test.
        let max = |v: &[f32]| v.iter().fold(0f32, |m, &a| m.max(a));
        let (xmax, ymax, zmax) = (max(x), max(y), max(z));
        for (qi, top) in found.iter_mut().enumerate() {
            let (sq, corr) = (qblock.scale[qi], qblock.corr[qi]);
            let (alpha, beta) = (qblock.alpha[qi], qblock.beta[qi]);
            let bmax = alpha * xmax + beta * ymax + zmax;
            let t = &tile[qi * ld..qi * ld + n];
            let (vsq, vcorr, vbmax) = (
                _mm512_set1_ps(sq),
                _mm512_set1_epi32(corr),
                _mm512_set1_ps(bmax),
            );
            // In runs of [`SCAN_RUN`] keys: first every key of the run whose highest possible
            // bound reaches the threshold is gathered (no call, so the loop keeps its constants
            // in registers), then those are offered in order. The threshold only rises while a
            // run is offered, so a key gathered against the run's first threshold that no longer
            // reaches it is refused by `offer` exactly as the earlier key-by-key scan refused it:
            // the same state, the same candidates.
            let mut hit_key = [0f32; SCAN_RUN + 16];
            let mut hit_at = [0u32; SCAN_RUN + 16];
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let mut s = 0;
            while s < n {
                let e = (s + SCAN_RUN).min(n);
                let thr = top.threshold();
                let vthr = _mm512_set1_ps(thr);
                let mut hits = 0;
                let mut j = s;
                while j + 16 <= e {
                    // key = s_q (s_r (t - corr)) + off, in any rounding: the bound's slack
                    // covers it.
                    let dot = _mm512_sub_epi32(_mm512_loadu_si512(t.as_ptr().add(j).cast()), vcorr);
                    let a = _mm512_mul_ps(
                        _mm512_loadu_ps(scale.as_ptr().add(j)),
                        _mm512_cvtepi32_ps(dot),
                    );
                    let key = _mm512_fmadd_ps(a, vsq, _mm512_loadu_ps(off.as_ptr().add(j)));
                    let m = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_add_ps(key, vbmax), vthr);
                    // Compressed in registers (a compressing store to memory is slow on some
                    // cores), stored whole: the buffers hold 16 past the run.
                    _mm512_storeu_ps(
                        hit_key.as_mut_ptr().add(hits),
                        _mm512_maskz_compress_ps(m, key),
                    );
                    let at = _mm512_add_epi32(lanes, _mm512_set1_epi32(j as i32));
                    _mm512_storeu_si512(
                        hit_at.as_mut_ptr().add(hits).cast(),
                        _mm512_maskz_compress_epi32(m, at),
                    );
                    hits += m.count_ones() as usize;
                    j += 16;
                }
                for i in j..e {
                    let k = sq * (scale[i] * (t[i] - corr) as f32) + off[i];
                    if k + bmax >= thr {
                        hit_key[hits] = k;
                        hit_at[hits] = i as u32;
                        hits += 1;
                    }
                }
                for (&key, &i) in hit_key[..hits].iter().zip(&hit_at[..hits]) {
                    let i = i as usize;
                    let bound = alpha * x[i] + beta * y[i] + z[i];
                    top.offer(base + i, key, bound);
                }
                s = e;
            }
        }
    }

    /// Keys [`scan_int8`] gathers before offering them.
    const SCAN_RUN: usize = 128;
}

/// Per-thread buffers of one query block's scan: the tile, and for f16 rows multiplied by the
/// GEMM, the rows widened to f32 a slice at a time.
struct Scratch {
    f32_tile: Vec<f32>,
    i32_tile: Vec<i32>,
    wide: Vec<f32>,
}

/// f32 entries of f16 rows widened at once for the GEMM (512 KiB: in a core's L2 with the
/// queries while the product reads them).
const WIDE_FLOATS: usize = 1 << 17;

impl Scratch {
    fn new(b: &Bounds, tile_len: usize, queries: usize) -> Self {
        let mut s = Self {
            f32_tile: Vec::new(),
            i32_tile: Vec::new(),
            wide: Vec::new(),
        };
        match b.tiles {
            Tiles::Int8 { .. } => s.i32_tile = vec![0; tile_len],
            Tiles::F16 { stride, .. } => {
                s.f32_tile = vec![0.0; tile_len];
                if queries > F16_DIRECT_MAX {
                    s.wide = vec![0.0; wide_rows(stride) * stride];
                }
            }
            Tiles::F32 => s.f32_tile = vec![0.0; tile_len],
        }
        s
    }
}

/// Rows of `stride` f16 entries widened at once ([`WIDE_FLOATS`], at least one).
fn wide_rows(stride: usize) -> usize {
    (WIDE_FLOATS / stride.max(1)).clamp(1, REF_BLOCK)
}

/// Reference rows per tile when a few queries spread one block's tiles over `threads` threads:
/// about [`SPLIT_TILES_PER_THREAD`] tiles each, whole 64-row blocks of the int8 kernel, at most
/// [`REF_BLOCK`]. A single token's query reads every reference once, so its time is the slowest
/// thread's share: 1,500 references in 512-row tiles are three tiles, two on one thread (a third
/// more than an even split); in 192-row tiles eight, four each.
fn split_tile_rows(refs: usize, threads: usize) -> usize {
    let rows = refs.div_ceil(threads.max(1) * SPLIT_TILES_PER_THREAD);
    (rows.div_ceil(QUAD).max(1) * QUAD).min(REF_BLOCK)
}

/// Queries per block for `nq` queries on `threads` threads: at most [`QUERY_BLOCK`], in a number
/// of blocks that is a multiple of the threads and of even sizes, so that every thread gets the
/// same share. Each block scans every reference, so a batch's time is the busiest thread's share:
/// 2,730 queries (a 8,192-row batch at three sites) in 512-query blocks are six blocks of which
/// the last holds 170, so one thread scans 1,536 queries while the other scans 1,194; in six
/// blocks of 455 each scans 1,365.
fn query_block_rows(nq: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let blocks = nq.div_ceil(QUERY_BLOCK).div_ceil(threads) * threads;
    nq.div_ceil(blocks).clamp(1, QUERY_BLOCK)
}

/// Tiles per thread when one query block's references are split ([`split_tile_rows`]).
const SPLIT_TILES_PER_THREAD: usize = 4;

impl KnnDetector {
    /// For every query, `finish(prepared query, its k nearest references as (exact f64 distance
    /// before clamping, index), nearest first, ties to the lower index)` (`k <= len()`). Query blocks run in
    /// parallel, each on one thread; memory is one tile and one prepared query block per thread.
    /// When there are fewer query blocks than threads (a few queries: a live token), each block's
    /// reference tiles are spread over the threads instead and their scans merged, so one query
    /// uses every core's memory bandwidth; the result is the same either way.
    pub(super) fn exact_search<T: Send>(
        &self,
        rows: &[f32],
        k: usize,
        finish: &Finish<'_, T>,
    ) -> Vec<T> {
        let dim = self.dim;
        let nq = rows.len() / dim;
        let threads = rayon::current_num_threads().max(1);
        let qb = query_block_rows(nq, threads);
        let split_refs = nq.div_ceil(qb) < threads && self.len() > REF_BLOCK;
        let bounds = self.bounds();
        rows.par_chunks(qb * dim)
            .flat_map_iter(|block| self.search_block(bounds, block, k, split_refs, finish))
            .collect()
    }

    /// Scans reference tile `b` of `tile_rows` rows (`rblock`, its rows) into the queries'
    /// states.
    #[allow(clippy::too_many_arguments)]
    fn scan_ref_block(
        &self,
        bounds: &Bounds,
        queries: &[f32],
        qblock: &QueryBlock,
        (b, tile_rows): (usize, usize),
        rblock: &[f32],
        scratch: &mut Scratch,
        found: &mut [Found],
    ) {
        let (dim, bq) = (self.dim, queries.len() / self.dim);
        let br = rblock.len() / dim;
        let base = b * tile_rows;
        match &bounds.tiles {
            Tiles::Int8 {
                packed,
                groups,
                scale,
                ..
            } => {
                let quad_bytes = QUAD * groups * 4;
                let first = base / QUAD * quad_bytes;
                let last = (base + br).div_ceil(QUAD) * quad_bytes;
                let ld = br.div_ceil(QUAD) * QUAD;
                let tile = &mut scratch.i32_tile[..ld * bq];
                int8_tile(&packed[first..last], *groups, &qblock.words, bq, tile, ld);
                let scale = &scale[base..base + br];
                scan_int8(found, tile, ld, scale, qblock, bounds, base);
            }
            Tiles::F16 {
                rows,
                stride,
                scale,
                ..
            } => {
                let stride = *stride;
                let tile = &mut scratch.f32_tile[..br * bq];
                let hrows = &rows[base * stride..(base + br) * stride];
                if bq <= F16_DIRECT_MAX {
                    // A few queries (a live token): every row read once from memory, at half the
                    // bytes of f32.
                    f16_tile(hrows, stride, &qblock.vals, bq, tile, br);
                } else {
                    let mut out = MatMut::from_column_major_slice_mut(tile, br, bq);
                    let per = wide_rows(stride);
                    for (c, part) in hrows.chunks(per * stride).enumerate() {
                        let nr = part.len() / stride;
                        let wide = &mut scratch.wide[..part.len()];
                        widen_f16(part, wide);
                        matmul(
                            out.as_mut().subrows_mut(c * per, nr),
                            Accum::Replace,
                            MatRef::from_row_major_slice(wide, nr, stride),
                            MatRef::from_row_major_slice(&qblock.vals, bq, stride).transpose(),
                            1.0f32,
                            Par::Seq,
                        );
                    }
                }
                // key = s_q (s_r t) + off: the scan adds the offset and the bound.
                let scale = &scale[base..base + br];
                for (qi, (col, top)) in tile.chunks_exact_mut(br).zip(found.iter_mut()).enumerate()
                {
                    let sq = qblock.scale[qi];
                    col.iter_mut()
                        .zip(scale)
                        .for_each(|(a, &sr)| *a = sq * (sr * *a));
                    top.scan(col, bounds, base, qblock.alpha[qi], qblock.beta[qi]);
                }
            }
            Tiles::F32 => {
                let tile = &mut scratch.f32_tile[..br * bq];
                // tile (br x bq, column-major) = R_block · Qᵀ: column j holds query j's products.
                matmul(
                    MatMut::from_column_major_slice_mut(tile, br, bq),
                    Accum::Replace,
                    MatRef::from_row_major_slice(rblock, br, dim),
                    MatRef::from_row_major_slice(queries, bq, dim).transpose(),
                    1.0f32,
                    Par::Seq,
                );
                for (qi, (col, top)) in tile.chunks_exact(br).zip(found.iter_mut()).enumerate() {
                    top.scan(col, bounds, base, qblock.alpha[qi], qblock.beta[qi]);
                }
            }
        }
    }

    fn search_block<T>(
        &self,
        bounds: &Bounds,
        block: &[f32],
        k: usize,
        split_refs: bool,
        finish: &Finish<'_, T>,
    ) -> Vec<T> {
        let (queries, qblock, found) = self.scan_block(bounds, block, k, split_refs);
        queries
            .chunks_exact(self.dim)
            .zip(found)
            .zip(&qblock.ok)
            .map(|((q, f), &ok)| finish(q, self.rank(q, f, k, bounds, ok && bounds.usable)))
            .collect()
    }

    /// The prepared queries of `block`, their bound coefficients and their scan states over
    /// every reference tile.
    fn scan_block(
        &self,
        bounds: &Bounds,
        block: &[f32],
        k: usize,
        split_refs: bool,
    ) -> (Vec<f32>, QueryBlock, Vec<Found>) {
        let dim = self.dim;
        let bq = block.len() / dim;
        let mut queries = block.to_vec();
        if self.options.metric == Metric::Cosine {
            l2_normalize_rows(&mut queries, dim);
        }
        let mut qblock = QueryBlock::default();
        bounds.prepare_queries(&queries, dim, &mut qblock);
        let new_found = || (0..bq).map(|_| Found::new(k)).collect::<Vec<_>>();
        let tile_len = REF_BLOCK.min(self.len()).div_ceil(QUAD) * QUAD * bq;
        let found = if !bounds.usable {
            new_found()
        } else if split_refs {
            // Every tile on its own (the same products as below), states merged; the result is
            // exact either way, so the merge order does not matter. Smaller tiles than below,
            // so that the threads get even shares ([`split_tile_rows`]).
            let rows = split_tile_rows(self.len(), rayon::current_num_threads());
            self.refs
                .par_chunks(rows * dim)
                .enumerate()
                .map_init(
                    || Scratch::new(bounds, tile_len, bq),
                    |scratch, (b, rblock)| {
                        let mut found = new_found();
                        self.scan_ref_block(
                            bounds,
                            &queries,
                            &qblock,
                            (b, rows),
                            rblock,
                            scratch,
                            &mut found,
                        );
                        found
                    },
                )
                .reduce(new_found, |mut earlier, later| {
                    for (f, l) in earlier.iter_mut().zip(later) {
                        f.merge(l);
                    }
                    earlier
                })
        } else {
            let mut found = new_found();
            let mut scratch = Scratch::new(bounds, tile_len, bq);
            for (b, rblock) in self.refs.chunks(REF_BLOCK * dim).enumerate() {
                self.scan_ref_block(
                    bounds,
                    &queries,
                    &qblock,
                    (b, REF_BLOCK),
                    rblock,
                    &mut scratch,
                    &mut found,
                );
            }
            found
        };
        (queries, qblock, found)
    }

    /// Whether `bounds` prune on these references: the mean number of references a query would
    /// rank again, over [`PRUNE_SAMPLE`] references taken as queries (evenly spaced, scanned on
    /// this thread), is at most 1/[`PRUNE_MIN_RATIO`] of the set. Where it is not, a tighter bound
    /// is cheaper than ranking most of the set in f64 (isotropic data at large widths, where every
    /// similarity lies within the int8 bound of the k-th best).
    pub(super) fn bounds_prune(&self, bounds: &Bounds) -> bool {
        let n = self.len();
        let take = n.min(PRUNE_SAMPLE);
        let sample: Vec<f32> = (0..take)
            .flat_map(|j| self.reference(j * n / take).iter().copied())
            .collect();
        let k = self.options.k.min(n);
        // f16 rows in blocks its direct kernel takes: the GEMM would give the loading thread a
        // packing buffer for its life (64 MiB), and the count per query is the same either way.
        let block = match bounds.tiles {
            Tiles::F16 { .. } => F16_DIRECT_MAX,
            _ => take,
        };
        let mut ranked = 0;
        for queries in sample.chunks(block.max(1) * self.dim) {
            let (_, qblock, found) = self.scan_block(bounds, queries, k, false);
            ranked += found
                .iter()
                .zip(&qblock.ok)
                .map(|(f, &ok)| {
                    let thr = f.threshold();
                    if !ok || f.overflow {
                        n
                    } else {
                        f.cands.iter().filter(|c| c.1 >= thr).count()
                    }
                })
                .sum::<usize>();
        }
        bounds.usable && ranked * PRUNE_MIN_RATIO <= n * take
    }

    /// `(rank_distance(q, i), i)` for each candidate. Where the CPU has AVX-512 the sums run 8
    /// f64 lanes a register ([`avx512::lanes8`]): the same IEEE operations on the same lanes in
    /// the same order as `sum_f64_lanes`, so the same bits.
    #[allow(unsafe_code)]
    fn rank_distances(&self, q: &[f32], cands: &[usize]) -> Nearest {
        #[cfg(target_arch = "x86_64")]
        let fast = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        let l2 = self.options.metric == Metric::L2;
        let mut out = Vec::with_capacity(cands.len());
        for (j, &i) in cands.iter().enumerate() {
            // The rows are scattered and rarely cached: ask for the one [`RANK_LOOKAHEAD`] on
            // while this one is summed (all at once would fill the miss queue).
            if let Some(&ahead) = cands.get(j + RANK_LOOKAHEAD) {
                prefetch(self.reference(ahead), usize::MAX);
            }
            let d = if fast {
                #[cfg(target_arch = "x86_64")]
                {
                    // SAFETY: the CPU has AVX-512F, the feature `lanes8` is compiled for; it
                    // reads `q` and the row within their (equal) lengths.
                    let s = unsafe { avx512::lanes8(q, self.reference(i), l2) };
                    if l2 {
                        s
                    } else {
                        1.0 - s
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!()
            } else {
                self.rank_distance(q, i)
            };
            out.push((d, i));
        }
        out
    }

    /// The k nearest of the candidates by exact distance (ties to the lower index); every
    /// reference by brute force when the bounds could not be used or held too many.
    ///
    /// The candidates are ranked in order of their upper bounds, highest first, [`RANK_STEP`] at
    /// a time. Once k are ranked, the k-th best exact distance so far is a key
    /// ([`Bounds::key_of_distance`]) that a candidate whose upper bound lies below it (by twice
    /// the map's margin, which covers the rounding of both distances) cannot reach: its exact
    /// distance is larger, so it is not among the k nearest and is never read, nor is any after
    /// it. The threshold of the scan is the k-th best lower bound, a bound's width below that
    /// key, so this ranks about half as many candidates again: on 15,000 isotropic references
    /// at width 384 (`examples/knn_batch.rs` under `perf record`) ranking went from 22% to 13%
    /// of exact search's time, and the archive benchmark from 39.6 / 37.2 to 36.5 / 34.0 s in
    /// an A/B of the two binaries (the same scores, byte for byte).
    fn rank(&self, q: &[f32], f: Found, k: usize, bounds: &Bounds, bounded: bool) -> Nearest {
        let thr = f.threshold();
        let by = |a: &(f64, usize), b: &(f64, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        let mut ranked: Vec<(f64, usize)> = Vec::new();
        if bounded && !f.overflow && f.lows.len() == k {
            let mut cands: Vec<(u32, f32)> = f.cands.into_iter().filter(|c| c.1 >= thr).collect();
            cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let key_of = bounds.key_of_distance(q, self.options.metric);
            let mut ids = Vec::with_capacity(RANK_STEP.max(k));
            let mut at = 0;
            while at < cands.len() {
                if ranked.len() == k {
                    let kth = ranked.iter().copied().max_by(by).unwrap_or((f64::MAX, 0));
                    let (key, margin) = key_of(kth.0);
                    if f64::from(cands[at].1) < key - 2.0 * margin {
                        break;
                    }
                }
                let end = (at + RANK_STEP.max(k - ranked.len())).min(cands.len());
                ids.clear();
                ids.extend(cands[at..end].iter().map(|c| c.0 as usize));
                ranked.extend(self.rank_distances(q, &ids));
                if ranked.len() > k {
                    ranked.select_nth_unstable_by(k - 1, by);
                    ranked.truncate(k);
                }
                at = end;
            }
        }
        if ranked.len() < k {
            let all: Vec<usize> = (0..self.len()).collect();
            ranked = self.rank_distances(q, &all);
        }
        if ranked.len() > k {
            ranked.select_nth_unstable_by(k - 1, by);
            ranked.truncate(k);
        }
        ranked.sort_unstable_by(by);
        ranked
    }
}

/// Candidates ranked again between two checks of whether the rest can reach the k nearest
/// ([`KnnDetector::rank`]): a few, so that the rows of a step are fetched together.
const RANK_STEP: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    /// Bound columns for `n` references with offset 0 and bound `x[i]` (alpha 1, beta 0).
    fn columns(x: Vec<f32>) -> Bounds {
        let n = x.len();
        Bounds {
            tiles: Tiles::F32,
            off: vec![0.0; n],
            x,
            y: vec![0.0; n],
            z: vec![0.0; n],
            max_col: 1.0,
            usable: true,
        }
    }

    #[test]
    fn query_blocks_are_even_across_threads() {
        for threads in [1, 2, 3, 8] {
            for nq in [1, 2, 7, 170, 511, 512, 513, 1024, 2730, 8192, 100_000] {
                let qb = query_block_rows(nq, threads);
                assert!((1..=QUERY_BLOCK).contains(&qb), "{nq} {threads}: {qb}");
                let blocks = nq.div_ceil(qb);
                // Every thread gets a block when there are enough queries, and the busiest
                // thread's share (blocks dealt in turn) exceeds an even split by at most one
                // query per block it holds (the rounding of the block size).
                if nq >= threads {
                    assert!(blocks >= threads, "{nq} {threads}: {blocks} blocks");
                }
                let share = |t: usize| {
                    (0..blocks)
                        .filter(|b| b % threads == t)
                        .map(|b| qb.min(nq - b * qb))
                        .sum::<usize>()
                };
                let most = (0..threads).map(share).max().unwrap();
                assert!(
                    most <= nq.div_ceil(threads) + blocks.div_ceil(threads),
                    "{nq} {threads}: {most} of {nq} in {blocks} blocks"
                );
            }
        }
        // The case in its comment: 2,730 queries on 2 threads.
        assert_eq!(query_block_rows(2730, 2), 455);
        assert_eq!(query_block_rows(100, 2), 50);
    }

    #[test]
    fn split_tiles_are_whole_int8_blocks_and_even_across_threads() {
        // 1,500 references on 2 threads: 192-row tiles, eight of them (four a thread).
        assert_eq!(split_tile_rows(1500, 2), 192);
        for (refs, threads) in [
            (1500, 2),
            (513, 2),
            (100_000, 2),
            (6000, 16),
            (10, 64),
            (1, 0),
        ] {
            let rows = split_tile_rows(refs, threads);
            assert!(
                rows.is_multiple_of(QUAD) && rows <= REF_BLOCK,
                "{refs} {threads}: {rows}"
            );
            let tiles = refs.div_ceil(rows);
            assert!(
                rows == REF_BLOCK
                    || tiles
                        >= (SPLIT_TILES_PER_THREAD * threads.max(1) / 2).min(refs.div_ceil(QUAD)),
                "{refs} {threads}: {tiles} tiles of {rows}"
            );
        }
    }

    #[test]
    fn a_reference_below_the_threshold_but_within_its_bound_stays_a_candidate() {
        // k = 1. Reference 0 (first chunk): key 1.0, bound 0, so the threshold becomes 1.0.
        // Reference 16 (second chunk): key 0.9 but bound 0.2, so its true key may be 1.1: it
        // must stay a candidate although its approximate key is below the threshold, and a
        // reference with key 0.5 and bound 0.2 must not.
        if !int8_available() {
            eprintln!("no AVX-512 VNNI here: the int8 scan does not run on this CPU");
            return;
        }
        let n = 48;
        let mut x = vec![0f32; n];
        x[16] = 0.2;
        x[32] = 0.2;
        let b = columns(x);
        let mut tile = vec![0i32; n];
        tile[0] = 100;
        tile[16] = 90;
        tile[32] = 50;
        let scale = vec![0.01f32; n];
        let q = QueryBlock {
            words: Vec::new(),
            vals: Vec::new(),
            corr: vec![0],
            scale: vec![1.0],
            alpha: vec![1.0],
            beta: vec![0.0],
            ok: vec![true],
        };
        let mut found = vec![Found::new(1)];
        scan_int8(&mut found, &tile, n, &scale, &q, &b, 0);
        let thr = found[0].threshold();
        assert!((thr - 1.0).abs() < 1e-6, "{thr}");
        let kept: Vec<u32> = found[0]
            .cands
            .iter()
            .filter(|c| c.1 >= thr)
            .map(|c| c.0)
            .collect();
        assert_eq!(kept, vec![0, 16]);
    }
}
