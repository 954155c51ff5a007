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
//! Euclidean in f32, which ranks like cosine distance on the L2-normalised references. The build
//! is sequential and every tie is broken by node index, so a graph is a function of the
//! references, their order and the options: node levels come from a fixed-seed generator drawn in
//! reference order.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::mix64;

/// Seed of the node-level generator: fixed, so that a build is reproducible.
const LEVEL_SEED: u64 = 0x686e_7377_6c65_7665;

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
}

impl SearchScratch {
    pub(super) fn new(nodes: usize) -> Self {
        Self {
            visited: vec![0; nodes],
            stamp: 0,
            candidates: BinaryHeap::new(),
            results: BinaryHeap::new(),
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

/// The HNSW graph: links per node and layer, the entry node and the top layer.
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
    /// `max_layers` layers. Inserts in row order, one at a time.
    pub(super) fn build(
        refs: &[f32],
        dim: usize,
        m: usize,
        ef_construction: usize,
        max_layers: usize,
    ) -> Self {
        let n = refs.len() / dim;
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
        let mut scratch = SearchScratch::new(n);
        for (node, &level) in levels.iter().enumerate().skip(1) {
            graph.insert(refs, node as u32, level, ef_construction, &mut scratch);
        }
        graph
    }

    /// The `k` nearest nodes to `q` found with a layer-0 candidate list of `ef` (at least `k`),
    /// nearest first.
    pub(super) fn search(
        &self,
        refs: &[f32],
        q: &[f32],
        k: usize,
        ef: usize,
        scratch: &mut SearchScratch,
    ) -> Vec<usize> {
        if self.base_len.is_empty() {
            return Vec::new();
        }
        let mut ep = Candidate {
            dist: squared_l2(q, self.vector(refs, self.entry)),
            node: self.entry,
        };
        for layer in (1..=self.top).rev() {
            ep = self.greedy(refs, q, ep, layer);
        }
        let found = self.search_layer(refs, q, ep, ef.max(k), 0, scratch);
        found.iter().take(k).map(|c| c.node as usize).collect()
    }

    fn vector<'a>(&self, refs: &'a [f32], node: u32) -> &'a [f32] {
        let i = node as usize * self.dim;
        &refs[i..i + self.dim]
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

    fn insert(
        &mut self,
        refs: &[f32],
        node: u32,
        level: usize,
        ef_construction: usize,
        scratch: &mut SearchScratch,
    ) {
        let q = self.vector(refs, node);
        let mut ep = Candidate {
            dist: squared_l2(q, self.vector(refs, self.entry)),
            node: self.entry,
        };
        for layer in (level + 1..=self.top).rev() {
            ep = self.greedy(refs, q, ep, layer);
        }
        for layer in (0..=level.min(self.top)).rev() {
            let found = self.search_layer(refs, q, ep, ef_construction, layer, scratch);
            let chosen = self.select(refs, &found, self.m);
            self.set_links(node, layer, chosen.iter().map(|c| c.node));
            for c in &chosen {
                self.link_back(refs, c.node, node, c.dist, layer);
            }
            ep = found[0];
        }
        if level > self.top {
            self.top = level;
            self.entry = node;
        }
    }

    /// Adds `new` (at squared distance `dist`) to `node`'s links on `layer`; a full list is
    /// re-selected by the heuristic over its links and `new`.
    fn link_back(&mut self, refs: &[f32], node: u32, new: u32, dist: f32, layer: usize) {
        let cap = if layer == 0 { self.m0 } else { self.m };
        let links = self.links(node, layer);
        if links.len() < cap {
            let links: Vec<u32> = links.iter().copied().chain([new]).collect();
            self.set_links(node, layer, links.into_iter());
            return;
        }
        let v = self.vector(refs, node);
        let mut cands: Vec<Candidate> = links
            .iter()
            .map(|&l| Candidate {
                dist: squared_l2(v, self.vector(refs, l)),
                node: l,
            })
            .chain([Candidate { dist, node: new }])
            .collect();
        cands.sort_unstable();
        let chosen = self.select(refs, &cands, cap);
        self.set_links(node, layer, chosen.iter().map(|c| c.node));
    }

    /// The neighbour-selection heuristic: candidates (nearest first) are taken in order, each
    /// unless an already chosen one is nearer to it than the base point is; at most `m`.
    fn select(&self, refs: &[f32], sorted: &[Candidate], m: usize) -> Vec<Candidate> {
        let mut chosen: Vec<Candidate> = Vec::with_capacity(m);
        for c in sorted {
            if chosen.len() >= m {
                break;
            }
            let v = self.vector(refs, c.node);
            if chosen
                .iter()
                .all(|s| squared_l2(v, self.vector(refs, s.node)) >= c.dist)
            {
                chosen.push(*c);
            }
        }
        chosen
    }

    /// Greedy walk on `layer` from `ep` to a node none of whose links is nearer to `q`.
    fn greedy(&self, refs: &[f32], q: &[f32], mut ep: Candidate, layer: usize) -> Candidate {
        loop {
            let mut moved = false;
            for &l in self.links(ep.node, layer) {
                let c = Candidate {
                    dist: squared_l2(q, self.vector(refs, l)),
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
        refs: &[f32],
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
            for &l in self.links(c.node, layer) {
                if !scratch.visit(l) {
                    continue;
                }
                let e = Candidate {
                    dist: squared_l2(q, self.vector(refs, l)),
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

/// Squared Euclidean distance in f32, in 16 independent lanes so that it vectorises.
fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..LANES {
            let d = x[j] - y[j];
            acc[j] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}
