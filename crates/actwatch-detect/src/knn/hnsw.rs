//! The HNSW graph (Malkov & Yashunin, 2018) over the detector's references, built and searched
//! here rather than through hnsw_rs.
//!
//! hnsw_rs 0.3.5 loses recall on clustered data as the index grows (recall@10 0.84 at ef 64 on
//! 100k x 384, and 0.87 at ef 128): when a node's link list overflows it drops the farthest link,
//! which is the link to another region of the space, so regions end up with no way in; and its
//! search moves at most one hop per upper layer. The same data through hnswlib reaches 0.987.
//! This graph makes hnswlib's choices: new nodes keep `m` links chosen by the neighbour-selection
//! heuristic (Malkov's algorithm 4, no extension, no pruned links kept); a full list (`m` links
//! on upper layers, `2 m` on layer 0) is re-selected by the same heuristic when a reverse link
//! arrives, so it keeps its diverse long links; search descends greedily to a local minimum on
//! every upper layer, then runs the `ef` beam search on layer 0.
//!
//! The graph holds node indices only (the vectors stay in the detector). Distances are squared
//! Euclidean in f32, which ranks like cosine distance on the L2-normalised references.
//!
//! The build is parallel and deterministic: nodes are inserted in batches whose boundaries depend
//! only on how many nodes are already in (never on the thread count), and every step that runs in
//! parallel reads only the graph as it stood at the start of the batch:
//! 1. each node of the batch searches the frozen graph, layer by layer, as a sequential insert
//!    would (in parallel);
//! 2. each node's candidates are joined by the nodes inserted before it in the same batch, at their
//!    exact distances (which a sequential insert could only have found by search), and its links
//!    are chosen by the heuristic (in parallel);
//! 3. the reverse links are applied per target node in node order, a full list re-selected as in
//!    a sequential insert (in parallel over targets, written back in target order).
//!
//! Every tie is broken by node index, so a graph is a function of the references, their order and
//! the options: node levels come from a fixed-seed generator drawn in reference order. Batches
//! grow with the graph (one node at a time at first, [`MAX_BATCH`] once the graph holds
//! `MAX_BATCH * BATCH_DIVISOR` nodes), so a batch is always a small share of what it searches.
//!
//! A built graph is kept with the monitor (see `KnnIndex`) and checked when loaded
//! ([`HnswGraph::check`]) so that a damaged one is rebuilt rather than followed out of bounds.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Mutex;

use rayon::prelude::*;

use super::mix64;

/// Most nodes inserted per batch of the parallel build. Each batch node also measures its
/// distance to the batch nodes before it (on average `MAX_BATCH / 2` distances, against the
/// thousands a search of `ef_construction = 200` computes).
const MAX_BATCH: usize = 256;
/// A batch is at most this fraction of the nodes already inserted (1/16), so the frozen graph each
/// batch searches is at least 16 times larger than the batch.
const BATCH_DIVISOR: usize = 16;

/// Seed of the node-level generator: fixed, so that a build is reproducible.
const LEVEL_SEED: u64 = 0x686e_7377_6c65_7665;

/// How the graph measures how near two vectors are: it ranks nodes only (the detector's scores
/// come from exact f64 distances of the nodes it returns), so what counts is the order, the
/// speed, and the same bits on every CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Distance {
    /// Squared Euclidean distance (the L2 metric).
    SquaredL2,
    /// `1 - a . b`: the cosine distance on the cosine metric's L2-normalised vectors (a zero
    /// vector at 1 from everything, as there). One fused multiply-add per component, where the
    /// squared distance of the same unit vectors (`2 - 2 a . b`) needs a subtraction too.
    OneMinusDot,
}

/// The vectors a graph is over (row-major), and how their nearness is measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refs<'a> {
    pub(super) data: &'a [f32],
    pub(super) kind: Distance,
}

impl Refs<'_> {
    #[inline(always)]
    fn distance(&self, a: &[f32], b: &[f32]) -> f32 {
        match self.kind {
            Distance::SquaredL2 => squared_l2(a, b),
            Distance::OneMinusDot => 1.0 - dot(a, b),
        }
    }
}

/// A node and its squared distance to the point searched for; ordered by distance, then node.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    dist: f32,
    node: u32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.dist
            .total_cmp(&other.dist)
            .then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Working memory of one search (or of the build): visit marks and the two heaps.
pub(super) struct SearchScratch {
    /// `visited[i] == stamp` when node i was seen by the current search.
    visited: Vec<u32>,
    stamp: u32,
    candidates: BinaryHeap<Reverse<Candidate>>,
    results: BinaryHeap<Candidate>,
    /// The unvisited links of the node being expanded.
    fresh: Vec<u32>,
}

impl SearchScratch {
    pub(super) fn new(nodes: usize) -> Self {
        Self {
            visited: vec![0; nodes],
            stamp: 0,
            candidates: BinaryHeap::new(),
            results: BinaryHeap::new(),
            fresh: Vec::new(),
        }
    }

    fn next_search(&mut self) {
        if self.stamp == u32::MAX {
            self.visited.fill(0);
            self.stamp = 0;
        }
        self.stamp += 1;
        self.candidates.clear();
        self.results.clear();
    }

    /// Marks `node` seen; false when it already was.
    fn visit(&mut self, node: u32) -> bool {
        let seen = &mut self.visited[node as usize];
        if *seen == self.stamp {
            return false;
        }
        *seen = self.stamp;
        true
    }
}

/// Search scratches kept between calls, so that a search does not allocate (and zero) a visit
/// array of one u32 per node: a scoring call takes one per rayon job and gives it back when done.
#[derive(Default)]
pub(super) struct ScratchPool {
    free: Mutex<Vec<SearchScratch>>,
}

impl std::fmt::Debug for ScratchPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchPool").finish_non_exhaustive()
    }
}

impl ScratchPool {
    /// A scratch for a graph of `nodes` nodes: a pooled one when there is one (of that size).
    pub(super) fn take(&self, nodes: usize) -> PooledScratch<'_> {
        let pooled = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .filter(|s| s.visited.len() == nodes);
        PooledScratch {
            pool: self,
            scratch: Some(pooled.unwrap_or_else(|| SearchScratch::new(nodes))),
        }
    }
}

/// A scratch on loan from a [`ScratchPool`]; goes back to it when dropped.
pub(super) struct PooledScratch<'a> {
    pool: &'a ScratchPool,
    scratch: Option<SearchScratch>,
}

impl std::ops::Deref for PooledScratch<'_> {
    type Target = SearchScratch;
    fn deref(&self) -> &SearchScratch {
        self.scratch.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for PooledScratch<'_> {
    fn deref_mut(&mut self) -> &mut SearchScratch {
        self.scratch.as_mut().expect("present until dropped")
    }
}

impl Drop for PooledScratch<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.scratch.take() {
            self.pool
                .free
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(s);
        }
    }
}

/// The HNSW graph: links per node and layer, the entry node and the top layer.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct HnswGraph {
    dim: usize,
    /// Links per node on layers >= 1.
    m: usize,
    /// Links per node on layer 0 (`2 m`).
    m0: usize,
    /// Layer-0 links, `m0` slots per node (the first `base_len[i]` are used).
    base: Vec<u32>,
    base_len: Vec<u16>,
    /// Links on layers 1..=level per node (`upper[i][layer - 1]`; empty for level-0 nodes).
    upper: Vec<Vec<Vec<u32>>>,
    entry: u32,
    top: usize,
}

impl HnswGraph {
    /// Builds the graph over `refs` (row-major, `dim` wide, at most `u32::MAX` rows): `m` links
    /// per node and layer (`2 m` on layer 0), candidate lists of `ef_construction`, at most
    /// `max_layers` layers. Inserts in row order, in batches (see the module's documentation):
    /// the same graph on any number of threads.
    pub(super) fn build(
        refs: Refs<'_>,
        dim: usize,
        m: usize,
        ef_construction: usize,
        max_layers: usize,
        pool: &ScratchPool,
    ) -> Self {
        let n = refs.data.len() / dim;
        assert!(u32::try_from(n).is_ok(), "HNSW node ids are u32");
        let levels = node_levels(n, m, max_layers);
        let m0 = 2 * m;
        let mut graph = Self {
            dim,
            m,
            m0,
            base: vec![0; n * m0],
            base_len: vec![0; n],
            upper: levels.iter().map(|&l| vec![Vec::new(); l]).collect(),
            entry: 0,
            top: levels.first().copied().unwrap_or(0),
        };
        let mut start = 1.min(n);
        while start < n {
            let len = (start / BATCH_DIVISOR).clamp(1, MAX_BATCH).min(n - start);
            graph.insert_batch(
                refs,
                start,
                &levels[start..start + len],
                ef_construction,
                pool,
            );
            start += len;
        }
        graph
    }

    /// Inserts nodes `first..first + levels.len()` (steps 1 to 3 of the module's documentation).
    fn insert_batch(
        &mut self,
        refs: Refs<'_>,
        first: usize,
        levels: &[usize],
        ef_construction: usize,
        pool: &ScratchPool,
    ) {
        let n_nodes = self.base_len.len();
        let this = &*self;
        // 1 and 2: per node, its chosen links per layer (index = layer), from the frozen graph.
        let chosen: Vec<Vec<Vec<Candidate>>> = (0..levels.len())
            .into_par_iter()
            .map_init(
                || pool.take(n_nodes),
                |scratch, b| {
                    let node = (first + b) as u32;
                    let level = levels[b];
                    let mut found = this.search_frozen(refs, node, level, ef_construction, scratch);
                    let q = this.vector(refs, node);
                    for (e, &le) in levels[..b].iter().enumerate() {
                        let other = (first + e) as u32;
                        let c = Candidate {
                            dist: refs.distance(q, this.vector(refs, other)),
                            node: other,
                        };
                        for list in found.iter_mut().take(le.min(level) + 1) {
                            list.push(c);
                        }
                    }
                    found
                        .iter_mut()
                        .map(|list| {
                            list.sort_unstable();
                            this.select(refs, list, this.m)
                        })
                        .collect()
                },
            )
            .collect();
        for (b, lists) in chosen.iter().enumerate() {
            for (layer, list) in lists.iter().enumerate() {
                self.set_links((first + b) as u32, layer, list.iter().map(|c| c.node));
            }
        }
        // 3: reverse links, grouped by (target, layer), each group in node order.
        let mut back: Vec<(u32, usize, Candidate)> = chosen
            .iter()
            .enumerate()
            .flat_map(|(b, lists)| {
                lists.iter().enumerate().flat_map(move |(layer, list)| {
                    list.iter().map(move |c| {
                        let new = Candidate {
                            dist: c.dist,
                            node: (first + b) as u32,
                        };
                        (c.node, layer, new)
                    })
                })
            })
            .collect();
        back.sort_by_key(|&(target, layer, new)| (target, layer, new.node));
        let groups: Vec<&[(u32, usize, Candidate)]> =
            back.chunk_by(|a, b| a.0 == b.0 && a.1 == b.1).collect();
        let this = &*self;
        let relinked: Vec<Vec<u32>> = groups
            .par_iter()
            .map(|g| {
                let (target, layer) = (g[0].0, g[0].1);
                let mut links = this.links(target, layer).to_vec();
                for &(_, _, new) in g.iter() {
                    this.link_back(refs, target, &mut links, new, layer);
                }
                links
            })
            .collect();
        for (g, links) in groups.iter().zip(relinked) {
            self.set_links(g[0].0, g[0].1, links.into_iter());
        }
        // The entry: the first node of the highest level above the old top, as sequential
        // inserts would have left it.
        for (b, &level) in levels.iter().enumerate() {
            if level > self.top {
                self.top = level;
                self.entry = (first + b) as u32;
            }
        }
    }

    /// The candidates of a sequential insert of `node` at `level` into the graph as it stands:
    /// one list per layer `0..=level` (nearest first; empty above the graph's top).
    fn search_frozen(
        &self,
        refs: Refs<'_>,
        node: u32,
        level: usize,
        ef_construction: usize,
        scratch: &mut SearchScratch,
    ) -> Vec<Vec<Candidate>> {
        let q = self.vector(refs, node);
        let mut found = vec![Vec::new(); level + 1];
        let mut ep = Candidate {
            dist: refs.distance(q, self.vector(refs, self.entry)),
            node: self.entry,
        };
        for layer in (level + 1..=self.top).rev() {
            ep = self.greedy(refs, q, ep, layer);
        }
        for layer in (0..=level.min(self.top)).rev() {
            let list = self.search_layer(refs, q, ep, ef_construction, layer, scratch);
            ep = list[0];
            found[layer] = list;
        }
        found
    }

    /// Whether this (loaded) graph is one that [`Self::build`] could have made over `n` nodes of
    /// width `dim` with `m` links and at most `max_layers` layers: every list within its capacity
    /// and pointing at existing nodes that reach that layer, the entry on the top layer. A graph
    /// that passes can be searched without going out of bounds; which graph it is, is the
    /// artifact's checksum's business.
    pub(super) fn check(
        &self,
        n: usize,
        dim: usize,
        m: usize,
        max_layers: usize,
    ) -> Result<(), String> {
        if self.dim != dim || self.m != m || self.m0 != 2 * m {
            return Err(format!(
                "built for width {} and m {} ({} on layer 0), not {dim} and {m}",
                self.dim, self.m, self.m0
            ));
        }
        if self.base.len() != n.saturating_mul(self.m0)
            || self.base_len.len() != n
            || self.upper.len() != n
        {
            return Err(format!("holds {} nodes, not {n}", self.base_len.len()));
        }
        if n == 0 {
            return Ok(());
        }
        let entry = self.entry as usize;
        if entry >= n || self.upper[entry].len() != self.top || self.top >= max_layers {
            return Err(format!(
                "entry {entry} at top layer {} does not fit",
                self.top
            ));
        }
        for (i, (&len, upper)) in self.base_len.iter().zip(&self.upper).enumerate() {
            if usize::from(len) > self.m0 || upper.len() > self.top {
                return Err(format!(
                    "node {i} has {len} links or {} layers",
                    upper.len()
                ));
            }
            let base = &self.base[i * self.m0..i * self.m0 + usize::from(len)];
            let lists = std::iter::once(base).chain(upper.iter().map(Vec::as_slice));
            for (layer, links) in lists.enumerate() {
                if layer > 0 && links.len() > self.m {
                    return Err(format!(
                        "node {i} has {} links on layer {layer}",
                        links.len()
                    ));
                }
                if let Some(&bad) = links
                    .iter()
                    .find(|&&l| (l as usize) >= n || self.upper[l as usize].len() < layer)
                {
                    return Err(format!(
                        "node {i} links to {bad}, not a node of layer {layer}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `k` nearest nodes to `q` found with a layer-0 candidate list of `ef` (at least `k`),
    /// nearest first.
    pub(super) fn search(
        &self,
        refs: Refs<'_>,
        q: &[f32],
        k: usize,
        ef: usize,
        scratch: &mut SearchScratch,
    ) -> Vec<usize> {
        if self.base_len.is_empty() {
            return Vec::new();
        }
        let mut ep = Candidate {
            dist: refs.distance(q, self.vector(refs, self.entry)),
            node: self.entry,
        };
        for layer in (1..=self.top).rev() {
            ep = self.greedy(refs, q, ep, layer);
        }
        let found = self.search_layer(refs, q, ep, ef.max(k), 0, scratch);
        found.iter().take(k).map(|c| c.node as usize).collect()
    }

    fn vector<'a>(&self, refs: Refs<'a>, node: u32) -> &'a [f32] {
        let i = node as usize * self.dim;
        &refs.data[i..i + self.dim]
    }

    fn links(&self, node: u32, layer: usize) -> &[u32] {
        let i = node as usize;
        if layer == 0 {
            &self.base[i * self.m0..i * self.m0 + usize::from(self.base_len[i])]
        } else {
            &self.upper[i][layer - 1]
        }
    }

    fn set_links(&mut self, node: u32, layer: usize, links: impl Iterator<Item = u32>) {
        let i = node as usize;
        if layer == 0 {
            let slots = &mut self.base[i * self.m0..(i + 1) * self.m0];
            let mut len = 0;
            for (slot, link) in slots.iter_mut().zip(links) {
                *slot = link;
                len += 1;
            }
            self.base_len[i] = len;
        } else {
            let list = &mut self.upper[i][layer - 1];
            list.clear();
            list.extend(links);
        }
    }

    /// Adds `new` to `node`'s links on `layer` (`links`, updated in place); a full list is
    /// re-selected by the heuristic over its links and `new`.
    fn link_back(
        &self,
        refs: Refs<'_>,
        node: u32,
        links: &mut Vec<u32>,
        new: Candidate,
        layer: usize,
    ) {
        let cap = if layer == 0 { self.m0 } else { self.m };
        if links.len() < cap {
            links.push(new.node);
            return;
        }
        let v = self.vector(refs, node);
        let mut cands: Vec<Candidate> = links
            .iter()
            .map(|&l| Candidate {
                dist: refs.distance(v, self.vector(refs, l)),
                node: l,
            })
            .chain([new])
            .collect();
        cands.sort_unstable();
        let chosen = self.select(refs, &cands, cap);
        links.clear();
        links.extend(chosen.iter().map(|c| c.node));
    }

    /// The neighbour-selection heuristic: candidates (nearest first) are taken in order, each
    /// unless an already chosen one is nearer to it than the base point is; at most `m`.
    fn select(&self, refs: Refs<'_>, sorted: &[Candidate], m: usize) -> Vec<Candidate> {
        let mut chosen: Vec<Candidate> = Vec::with_capacity(m);
        for c in sorted {
            if chosen.len() >= m {
                break;
            }
            let v = self.vector(refs, c.node);
            if chosen
                .iter()
                .all(|s| refs.distance(v, self.vector(refs, s.node)) >= c.dist)
            {
                chosen.push(*c);
            }
        }
        chosen
    }

    /// Greedy walk on `layer` from `ep` to a node none of whose links is nearer to `q`.
    fn greedy(&self, refs: Refs<'_>, q: &[f32], mut ep: Candidate, layer: usize) -> Candidate {
        loop {
            let mut moved = false;
            for &l in self.links(ep.node, layer) {
                let c = Candidate {
                    dist: refs.distance(q, self.vector(refs, l)),
                    node: l,
                };
                if c < ep {
                    ep = c;
                    moved = true;
                }
            }
            if !moved {
                return ep;
            }
        }
    }

    /// Beam search on `layer` from `ep`: the `ef` nearest nodes found, nearest first.
    fn search_layer(
        &self,
        refs: Refs<'_>,
        q: &[f32],
        ep: Candidate,
        ef: usize,
        layer: usize,
        scratch: &mut SearchScratch,
    ) -> Vec<Candidate> {
        scratch.next_search();
        scratch.visit(ep.node);
        scratch.candidates.push(Reverse(ep));
        scratch.results.push(ep);
        while let Some(Reverse(c)) = scratch.candidates.pop() {
            let worst = *scratch.results.peek().expect("never empty");
            if c.dist > worst.dist {
                break;
            }
            // Memory, not arithmetic, sets the pace here (a vector is 24 cache lines at width
            // 384, mostly not in cache), so loads are asked for ahead of their use: the link
            // list of the candidate expanded next; the first line of each unvisited neighbour
            // as it is found; and the rest of the neighbour [`LOOKAHEAD`] places on while this
            // one's distance is computed. One A/B (100k x 384, ef 48, same binary, 2 / 1
            // threads): 12.1k / 6.0k queries/s with four lines of each neighbour asked for as
            // found and nothing else, 16.7k / 8.0k with this; the build 20.2 -> about 16.5 s.
            if let Some(Reverse(next)) = scratch.candidates.peek() {
                prefetch(self.links(next.node, layer), usize::MAX);
            }
            scratch.fresh.clear();
            for &l in self.links(c.node, layer) {
                if scratch.visit(l) {
                    prefetch(self.vector(refs, l), 1);
                    scratch.fresh.push(l);
                }
            }
            for i in 0..scratch.fresh.len() {
                let l = scratch.fresh[i];
                if let Some(&ahead) = scratch.fresh.get(i + LOOKAHEAD) {
                    prefetch(self.vector(refs, ahead), PREFETCH_LINES);
                }
                let e = Candidate {
                    dist: refs.distance(q, self.vector(refs, l)),
                    node: l,
                };
                let worst = *scratch.results.peek().expect("never empty");
                if scratch.results.len() < ef || e < worst {
                    scratch.candidates.push(Reverse(e));
                    scratch.results.push(e);
                    if scratch.results.len() > ef {
                        scratch.results.pop();
                    }
                }
            }
        }
        let mut found: Vec<Candidate> = scratch.results.drain().collect();
        found.sort_unstable();
        found
    }
}

/// The layer of each of `n` nodes: `floor(-ln(u) / ln(m))` for u uniform in (0, 1) from a seeded
/// SplitMix64 stream, below `max_layers`.
fn node_levels(n: usize, m: usize, max_layers: usize) -> Vec<usize> {
    let scale = 1.0 / (m.max(2) as f64).ln();
    let mut state = LEVEL_SEED;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let u = ((mix64(state) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            ((-u.ln() * scale) as usize).min(max_layers - 1)
        })
        .collect()
}

/// How many neighbours ahead of the distance being computed a vector is asked for. Measured
/// (100k x 384, ef 48): 1 ahead 14.8k queries/s, 2 ahead 16.1k, 3 ahead 16.7k, 4 ahead 16.4k.
const LOOKAHEAD: usize = 3;

/// Most cache lines of a vector asked for ahead (2 KiB, all of a vector up to width 512): the
/// hardware's own prefetcher follows a wider vector on from there, and asking for more would
/// fill the core's queue of outstanding misses with lines needed later.
const PREFETCH_LINES: usize = 32;

/// Asks for the first `lines` cache lines of `s` (at most all of it) to be brought into the
/// cache: a hint, with no effect on results.
#[inline(always)]
#[allow(unsafe_code)]
pub(super) fn prefetch<T>(s: &[T], lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = s.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(s);
        for offset in (0..bytes).step_by(64).take(lines) {
            // SAFETY: `offset` is within `s`, so the pointer stays inside one allocation; SSE is
            // part of x86_64, and a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, lines);
}

/// Squared Euclidean distance in f32 ([`lanes`]).
fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    dispatch::<false>(a, b)
}

/// Dot product in f32 ([`lanes`]).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dispatch::<true>(a, b)
}

/// [`lanes`] compiled for the best of AVX-512 and AVX2 (each with FMA) the CPU has, picked at run
/// time. (One of this crate's two `unsafe`s, with [`prefetch`]: calling a function compiled for
/// a CPU feature after checking that the CPU has it.)
#[allow(unsafe_code)]
#[inline(always)]
fn dispatch<const DOT: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            // SAFETY: the CPU has AVX-512F and FMA, the features the function is compiled for.
            return unsafe { lanes_avx512::<DOT>(a, b) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
            return unsafe { lanes_avx2::<DOT>(a, b) };
        }
    }
    lanes::<DOT>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn lanes_avx512<const DOT: bool>(a: &[f32], b: &[f32]) -> f32 {
    lanes::<DOT>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lanes_avx2<const DOT: bool>(a: &[f32], b: &[f32]) -> f32 {
    lanes::<DOT>(a, b)
}

/// Lanes of [`lanes`]: two AVX-512 registers (four AVX2 ones), so that consecutive adds do
/// not wait on each other.
const LANES: usize = 32;

/// `sum (a_i - b_i)^2`, or with `DOT` `sum a_i b_i`, in f32: [`LANES`] independent lanes, each
/// term added by one fused multiply-add, the lanes then summed in a fixed order, so that it
/// vectorises and gives the same bits on every CPU. The AVX-512 and AVX2 builds only change how
/// many lanes one instruction holds, and a CPU without FMA computes the same correctly rounded
/// `mul_add` in software (slowly). With `1 - dot` for cosine, the fused form took one A/B on
/// 100k x 384 (2 threads, ef 64, same recall) from 9.4k to 10.5k queries/s and the build from
/// 20.2 to 18.9 s, against an unfused squared distance for both metrics.
#[inline(always)]
fn lanes<const DOT: bool>(a: &[f32], b: &[f32]) -> f32 {
    let term = |x: f32, y: f32, acc: f32| {
        if DOT {
            x.mul_add(y, acc)
        } else {
            let d = x - y;
            d.mul_add(d, acc)
        }
    };
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(0f32, |t, (&x, &y)| term(x, y, t));
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            acc[j] = term(x[j], y[j], acc[j]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels the CPU runs give the bits of the portable loop (software `mul_add`), at
    /// every length (tails included), and agree with f64 arithmetic to f32 rounding.
    #[test]
    fn distance_kernels_give_the_portable_bits_and_the_f64_values() {
        let mut rng = actwatch_testkit::Rng::new(11);
        for len in [1, 7, 31, 32, 33, 64, 100, 384, 1000] {
            let a: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
            assert_eq!(
                squared_l2(&a, &b).to_bits(),
                lanes::<false>(&a, &b).to_bits()
            );
            assert_eq!(dot(&a, &b).to_bits(), lanes::<true>(&a, &b).to_bits());
            let l2: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                .sum();
            let ip: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| (x as f64 * y as f64).abs())
                .sum();
            assert!(
                (squared_l2(&a, &b) as f64 - l2).abs() <= 1e-5 * l2.max(1.0),
                "{len}"
            );
            assert!(
                (dot(&a, &b) as f64 - ip).abs() <= 1e-5 * scale.max(1.0),
                "{len}"
            );
        }
    }
}
