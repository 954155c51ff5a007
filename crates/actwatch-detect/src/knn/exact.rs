//! Exact search as a blocked f32 GEMM: a block of queries times a block of references gives a
//! similarity tile, scanned into a per-query top-k ([`TopK`]), so memory is bounded by the tile
//! sizes and the arithmetic runs at matrix-product speed.

use actwatch_core::l2_normalize_rows;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{KnnDetector, Metric, QUERY_BLOCK, REF_BLOCK, SCAN_CHUNK};

/// Candidate neighbours of one query: ranking key (higher = nearer) and reference index.
struct TopK {
    k: usize,
    keys: Vec<f32>,
    idx: Vec<usize>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            keys: Vec::with_capacity(k),
            idx: Vec::with_capacity(k),
        }
    }

    #[inline]
    fn threshold(&self) -> f32 {
        if self.keys.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.keys[self.k - 1]
        }
    }

    /// Inserts when `key` beats the current k-th best; equal keys keep the earlier index. An
    /// insertion-sort step in place (the last entry falls off when full): most inserts move a
    /// few entries, and a call into `memmove` for each of two vectors cost more than that.
    #[inline]
    fn insert(&mut self, key: f32, i: usize) {
        let thr = self.threshold();
        if key.is_nan() || key <= thr {
            return;
        }
        if self.keys.len() < self.k {
            self.keys.push(key);
            self.idx.push(i);
        }
        let mut pos = self.keys.len() - 1;
        while pos > 0 && self.keys[pos - 1] < key {
            self.keys[pos] = self.keys[pos - 1];
            self.idx[pos] = self.idx[pos - 1];
            pos -= 1;
        }
        self.keys[pos] = key;
        self.idx[pos] = i;
    }

    /// Offers reference `base + j` with key `sims[j] - half[j]` (`half` absent: `sims[j]`),
    /// skipping whole chunks none of which can enter. One pass over the tile column: a chunk's
    /// keys are formed and compared with the threshold in registers (an or-reduction, so it
    /// vectorises), and only a chunk holding a candidate is walked again.
    fn scan(&mut self, sims: &[f32], half: Option<&[f32]>, base: usize) {
        let mut thr = self.threshold();
        for (c, chunk) in sims.chunks(SCAN_CHUNK).enumerate() {
            let start = c * SCAN_CHUNK;
            let half = half.map(|h| &h[start..start + chunk.len()]);
            let hit = match half {
                Some(h) => chunk
                    .iter()
                    .zip(h)
                    .fold(false, |any, (&s, &hr)| any | (s - hr > thr)),
                None => chunk.iter().fold(false, |any, &s| any | (s > thr)),
            };
            if hit {
                for (j, &s) in chunk.iter().enumerate() {
                    let v = half.map_or(s, |h| s - h[j]);
                    if v > thr {
                        self.insert(v, base + start + j);
                        thr = self.threshold();
                    }
                }
            }
        }
    }
}

impl KnnDetector {
    /// For every query, `finish(prepared query, indices of its k nearest references by the f32
    /// GEMM ranking)` (`k <= len()`). Query blocks run in parallel, each GEMM on one thread; memory
    /// is one tile and one prepared query block per thread. When there are fewer query blocks
    /// than threads (a few queries: a live token), each block's reference tiles are spread over
    /// the threads instead and their top-k lists merged, so one query uses every core's memory
    /// bandwidth; the result is the same either way.
    pub(super) fn exact_search<T: Send>(
        &self,
        rows: &[f32],
        k: usize,
        finish: &(dyn Fn(&[f32], Vec<usize>) -> T + Sync),
    ) -> Vec<T> {
        let dim = self.dim;
        let nq = rows.len() / dim;
        let threads = rayon::current_num_threads().max(1);
        let qb = nq.div_ceil(threads).clamp(1, QUERY_BLOCK);
        let split_refs = nq.div_ceil(qb) < threads && self.len() > REF_BLOCK;
        let half = match self.options.metric {
            Metric::L2 => Some(self.half_sq_norms()),
            Metric::Cosine => None,
        };
        rows.par_chunks(qb * dim)
            .flat_map_iter(|block| self.search_block(block, k, half, split_refs, finish))
            .collect()
    }

    /// Offers every reference of tile `b` (`rblock`, its rows) to the queries' top-k lists.
    fn scan_ref_block(
        &self,
        qmat: MatRef<'_, f32>,
        b: usize,
        rblock: &[f32],
        half: Option<&[f32]>,
        tile: &mut [f32],
        tops: &mut [TopK],
    ) {
        let (dim, bq) = (self.dim, qmat.nrows());
        let br = rblock.len() / dim;
        let base = b * REF_BLOCK;
        let tile = &mut tile[..br * bq];
        // tile (br x bq, column-major) = R_block · Qᵀ: column j holds query j's similarities.
        matmul(
            MatMut::from_column_major_slice_mut(tile, br, bq),
            Accum::Replace,
            MatRef::from_row_major_slice(rblock, br, dim),
            qmat.transpose(),
            1.0f32,
            Par::Seq,
        );
        // L2 ranking key: q·r - ||r||²/2 (= (||q||² - ||q - r||²) / 2), formed in the scan.
        let half = half.map(|h| &h[base..base + br]);
        for (col, top) in tile.chunks_exact(br).zip(tops.iter_mut()) {
            top.scan(col, half, base);
        }
    }

    fn search_block<T>(
        &self,
        block: &[f32],
        k: usize,
        half: Option<&[f32]>,
        split_refs: bool,
        finish: &(dyn Fn(&[f32], Vec<usize>) -> T + Sync),
    ) -> Vec<T> {
        let dim = self.dim;
        let bq = block.len() / dim;
        let mut queries = block.to_vec();
        if self.options.metric == Metric::Cosine {
            l2_normalize_rows(&mut queries, dim);
        }
        let qmat = MatRef::from_row_major_slice(&queries, bq, dim);
        let new_tops = || (0..bq).map(|_| TopK::new(k)).collect::<Vec<_>>();
        let tile_len = REF_BLOCK.min(self.len()) * bq;
        let tops = if split_refs {
            // Every tile on its own (the same products as below), and lists merged two
            // neighbours at a time, the later one offered to the earlier: equal keys keep the
            // earlier index, as in one sequential scan, and only a few lists are alive at once.
            self.refs
                .par_chunks(REF_BLOCK * dim)
                .enumerate()
                .map_init(
                    || vec![0f32; tile_len],
                    |tile, (b, rblock)| {
                        let mut tops = new_tops();
                        self.scan_ref_block(qmat, b, rblock, half, tile, &mut tops);
                        tops
                    },
                )
                .reduce(new_tops, |mut earlier, later| {
                    for (top, p) in earlier.iter_mut().zip(later) {
                        for (&key, &i) in p.keys.iter().zip(&p.idx) {
                            top.insert(key, i);
                        }
                    }
                    earlier
                })
        } else {
            let mut tops = new_tops();
            let mut tile = vec![0f32; tile_len];
            for (b, rblock) in self.refs.chunks(REF_BLOCK * dim).enumerate() {
                self.scan_ref_block(qmat, b, rblock, half, &mut tile, &mut tops);
            }
            tops
        };
        queries
            .chunks_exact(dim)
            .zip(tops)
            .map(|(q, top)| {
                let mut idx = top.idx;
                if idx.len() < k {
                    // Only when f32 keys overflowed to NaN (values beyond ~1e18): rank exactly.
                    let d = self.brute_force_distances(q);
                    let mut order: Vec<usize> = (0..d.len()).collect();
                    order.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
                    order.truncate(k);
                    idx = order;
                }
                finish(q, idx)
            })
            .collect()
    }
}
