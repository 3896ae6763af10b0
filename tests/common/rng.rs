//! One seeded generator for the tests: the library's SplitMix64 with the float mappings the
//! tests use.

pub use abf::train::data::SplitMix64;

/// SplitMix64 (`abf::train::data::SplitMix64`) with float helpers.
#[derive(Debug, Clone, Copy)]
pub struct Rng(pub SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [-1, 1) from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        self.unit() * 2.0 - 1.0
    }

    /// Uniform in [-scale, scale) from the top 24 bits, in f32.
    pub fn uniform_f32(&mut self, scale: f32) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }

    /// Approximately standard normal: Irwin-Hall of 4 uniforms in [-1, 1), rescaled.
    pub fn normal_ih4(&mut self) -> f64 {
        (0..4).map(|_| self.uniform()).sum::<f64>() * (3.0f64 / 4.0).sqrt()
    }

    /// Standard normal by Box-Muller (one of the pair).
    pub fn normal_box_muller(&mut self) -> f64 {
        let u1 = self.unit().max(1e-300);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
