//! actwatch-testkit: what the tests of every actwatch crate share (dev-only, never shipped).
//!
//! The decision a reader must know: all randomness in tests comes from one seeded generator,
//! [`Rng`] (SplitMix64 with Box-Muller normals, no `rand`), so every test is reproducible from its
//! seed and no crate grows its own copy.

mod rng;

pub use rng::Rng;
