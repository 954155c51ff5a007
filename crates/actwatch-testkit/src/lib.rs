//! actwatch-testkit: what the tests of every actwatch crate share (dev-only, never shipped).
//!
//! The decision a reader must know: all randomness in tests comes from one seeded generator,
//! [`Rng`] (SplitMix64 with Box-Muller normals, no `rand`), so every test is reproducible from its
//! seed and no crate grows its own copy. The heavier fixtures sit behind features so that the
//! compute crates' tests stay free of I/O and transport: `io` ([`minilm`], [`fixture`]: the shared
//! MiniLM activations and a fitted monitor) and `server` ([`server::TestServer`], a real gRPC
//! server on a loopback port that stops when dropped). The fuzz suites and targets share their
//! harnesses ([`fuzz`], feature `fuzz`) and an allocator that measures what decoding asks for
//! ([`alloc`]).

pub mod alloc;
mod rng;

#[cfg(feature = "io")]
pub mod fixture;
#[cfg(feature = "fuzz")]
pub mod fuzz;
#[cfg(feature = "io")]
pub mod minilm;
#[cfg(feature = "server")]
pub mod server;

pub use rng::Rng;

/// Runs `f` on a fresh rayon pool of `threads` threads (for tests that a result is the same on
/// any number of threads).
pub fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
        .install(f)
}

/// The median wall seconds of `repeats` runs of `f`, after one warm-up run (the benchmark
/// examples' timer).
pub fn median_seconds(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
