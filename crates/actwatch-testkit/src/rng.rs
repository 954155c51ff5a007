//! The one seeded random number generator of the tests.

/// SplitMix64 with Box-Muller normals.
pub struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn exponential(&mut self) -> f64 {
        -self.uniform().ln()
    }

    /// `n` rows of width `dim` of independent standard normals plus `shift`.
    pub fn gaussian_rows(&mut self, n: usize, dim: usize, shift: f64) -> Vec<f32> {
        (0..n * dim)
            .map(|_| (self.normal() + shift) as f32)
            .collect()
    }

    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * t.sin());
        r * t.cos()
    }

    /// `k` rows of width `d`: `offset + z · diag(scales) · M` with `M` a fixed random mixing
    /// matrix, so the covariance is full, anisotropic and has distinct eigenvalues.
    pub fn correlated_rows(
        &mut self,
        k: usize,
        d: usize,
        offset: f64,
        mixing_seed: u64,
    ) -> Vec<f32> {
        let mut mix = Rng::new(mixing_seed);
        let m: Vec<f64> = (0..d * d)
            .map(|i| {
                let (a, b) = (i / d, i % d);
                mix.normal() * 0.3 + if a == b { 1.0 } else { 0.0 }
            })
            .collect();
        let scales: Vec<f64> = (0..d).map(|j| 2.0 * 0.8f64.powi(j as i32) + 0.05).collect();
        let mut out = Vec::with_capacity(k * d);
        let mut z = vec![0.0f64; d];
        for _ in 0..k {
            for (j, zj) in z.iter_mut().enumerate() {
                *zj = self.normal() * scales[j];
            }
            for c in 0..d {
                let v: f64 = (0..d).map(|a| z[a] * m[a * d + c]).sum();
                out.push((offset + v) as f32);
            }
        }
        out
    }
}
