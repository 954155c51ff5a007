//! Seeded, order-free assignment of computations to the fit or calibration part of a reference set.
//!
//! The split is a pure function of `(seed, computation id)`, so it is the same whether the reference
//! set is read in one pass, in shards, or streamed over the network, and all traces of a computation
//! land on the same side.

/// 64-bit FNV-1a over the id, finished with a SplitMix64 mix of the seed.
#[derive(Debug, Clone, Copy)]
pub struct SplitHasher {
    seed: u64,
}

impl SplitHasher {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A uniform number in `[0, 1)` determined by the seed and the id.
    pub fn unit(&self, id: &str) -> f64 {
        split_unit(self.seed, id)
    }
}

/// A uniform number in `[0, 1)` determined by `seed` and `id`.
pub fn split_unit(seed: u64, id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_roughly_uniform() {
        let n = 20_000;
        let below: usize = (0..n)
            .filter(|i| split_unit(7, &format!("id-{i}")) < 0.25)
            .count();
        let share = below as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.02, "share {share}");
        assert_eq!(split_unit(7, "a"), split_unit(7, "a"));
        assert_ne!(split_unit(7, "a"), split_unit(8, "a"));
    }
}
