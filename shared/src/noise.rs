//! Portable seeded Gaussian noise.
//!
//! The same seed gives bit-identical numbers natively and in wasm32: a ChaCha8 stream
//! (platform-independent by construction) turned into normals with the Box–Muller transform in
//! f64 using `libm` (pure Rust, the same code on every target rather than the platform's libm),
//! then rounded to f32. Values are produced on the CPU in row-major order and uploaded; a sampler
//! draws its per-step noise from the same stream, so a whole sampling run is reproducible.

use burn::tensor::{Device, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// A source of standard normal noise for samplers. Tests pass fixed tensors; the apps pass
/// [`SeededNoise`].
pub trait NoiseSource {
    /// A tensor of independent N(0, 1) values of the given shape on `device`.
    fn gaussian(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4>;
}

/// Seeded, portable N(0, 1) generator.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
    /// The second Box–Muller value, kept for the next draw.
    spare: Option<f64>,
}

impl SeededNoise {
    /// A generator whose stream is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// A uniform value in the open interval (0, 1), from 53 random bits.
    fn uniform_open(&mut self) -> f64 {
        let bits = self.rng.next_u64() >> 11;
        (bits as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard normal value in f64.
    pub fn next_f64(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = self.uniform_open();
        let u2 = self.uniform_open();
        let radius = libm::sqrt(-2.0 * libm::log(u1));
        let angle = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(radius * libm::sin(angle));
        radius * libm::cos(angle)
    }

    /// `n` standard normal values rounded to f32.
    pub fn sample_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f64() as f32).collect()
    }
}

impl NoiseSource for SeededNoise {
    fn gaussian(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let n = shape.iter().product();
        let values = self.sample_vec(n);
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_different_seed_different_stream() {
        let a = SeededNoise::new(7).sample_vec(64);
        let b = SeededNoise::new(7).sample_vec(64);
        let c = SeededNoise::new(8).sample_vec(64);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn moments_are_standard_normal() {
        // 200k draws: the standard error of the mean is 1/sqrt(n) ≈ 0.0022, of the variance ≈ 0.0032.
        let v = SeededNoise::new(1).sample_vec(200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurt = v.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n / (var * var);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
        // P(|z| > 1.96) = 0.05 for a standard normal.
        let tail = v.iter().filter(|x| x.abs() > 1.96).count() as f64 / n;
        assert!((tail - 0.05).abs() < 0.003, "tail mass {tail}");
    }
}
