//! The reverse process end to end (Ho et al. 2020, Algorithm 2, with any [`Sampler`]): start
//! from seeded Gaussian noise x_T, evaluate the UNet at each of the sampler's timesteps and let
//! the sampler step, with optional classifier-free guidance (Ho & Salimans 2022).
//!
//! [`Generation`] advances one step per call so that a caller can draw intermediate images,
//! yield to a browser's event loop, or cancel between steps; nothing here reads tensors back to
//! the host.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::model_file::ModelInfo;
use crate::noise::{NoiseSource, SeededNoise};
use crate::sampler::Sampler;
use crate::unet::UNet;

/// Most images generated in one batch.
pub const MAX_BATCH: usize = 1024;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Number of images.
    pub n: usize,
    /// Seed of the initial noise and of every later noise draw.
    pub seed: u64,
    /// Class label for a class-conditional model (required there, refused elsewhere).
    pub class: Option<usize>,
    /// Classifier-free guidance scale w: ε = ε_uncond + w (ε_cond − ε_uncond). 1 means no
    /// guidance (one forward pass per step); needs a model trained with a null class.
    pub guidance: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            n: 16,
            seed: 0,
            class: None,
            guidance: 1.0,
        }
    }
}

/// A sampling run in progress.
pub struct Generation<'a> {
    model: &'a UNet,
    sampler: Box<dyn Sampler + 'a>,
    sample: Tensor<4>,
    labels: Option<Tensor<1, Int>>,
    /// Labels for the doubled batch `[class; n] ++ [null; n]` when guiding.
    guided_labels: Option<Tensor<1, Int>>,
    guidance: f64,
    noise: SeededNoise,
    index: usize,
    device: Device,
    batch_threads: usize,
}

impl std::fmt::Debug for Generation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("shape", &self.sample.dims())
            .field("step", &self.index)
            .field("steps", &self.sampler.timesteps().len())
            .field("guidance", &self.guidance)
            .finish()
    }
}

impl<'a> Generation<'a> {
    /// Draw x_T from the seed and prepare the run. Checks the options against the model.
    pub fn new(
        model: &'a UNet,
        info: &ModelInfo,
        sampler: Box<dyn Sampler + 'a>,
        options: &GenerateOptions,
        device: &Device,
    ) -> Result<Self> {
        check_count(options.n)?;
        let s = info.unet.sample_size;
        let shape = [options.n, info.unet.in_channels, s, s];
        let mut noise = SeededNoise::new(options.seed);
        let x_t = noise.gaussian(shape, device); // x_T ~ N(0, I)
        Self::build(model, info, sampler, options, x_t, noise, device)
    }

    /// Start from a given x_T (`options.n` is taken from its batch size); later noise draws
    /// still come from `options.seed`.
    pub fn from_noise(
        model: &'a UNet,
        info: &ModelInfo,
        sampler: Box<dyn Sampler + 'a>,
        options: &GenerateOptions,
        x_t: Tensor<4>,
        device: &Device,
    ) -> Result<Self> {
        let dims = x_t.dims();
        check_count(dims[0])?;
        info.unet.check_input(dims)?;
        let options = GenerateOptions {
            n: dims[0],
            ..options.clone()
        };
        // Skip the values x_T would have used so that a file holding the seed's own x_T
        // reproduces the seeded run exactly.
        let mut noise = SeededNoise::new(options.seed);
        noise.sample_vec(dims.iter().product());
        Self::build(model, info, sampler, &options, x_t, noise, device)
    }

    fn build(
        model: &'a UNet,
        info: &ModelInfo,
        sampler: Box<dyn Sampler + 'a>,
        options: &GenerateOptions,
        sample: Tensor<4>,
        noise: SeededNoise,
        device: &Device,
    ) -> Result<Self> {
        let n = options.n;
        if !options.guidance.is_finite() || options.guidance < 0.0 {
            return Err(Error::InvalidInput(format!(
                "guidance scale ({}) must be a finite number ≥ 0",
                options.guidance
            )));
        }
        let labels = match (options.class, info.unet.num_class_embeds) {
            (Some(c), Some(_)) => {
                let classes = info.num_classes();
                if c >= classes {
                    return Err(Error::InvalidInput(format!(
                        "class {c} is out of range: the model has {classes} classes (0..{classes})"
                    )));
                }
                Some(c)
            }
            (None, Some(_)) => {
                return Err(Error::InvalidInput(
                    "the model is class-conditional: give a class label".into(),
                ));
            }
            (Some(_), None) => {
                return Err(Error::InvalidInput(
                    "the model is unconditional: it takes no class label".into(),
                ));
            }
            (None, None) => None,
        };
        let guided = options.guidance != 1.0;
        let null = info.null_class();
        if guided && (labels.is_none() || null.is_none()) {
            return Err(Error::InvalidInput(format!(
                "guidance scale {} needs a class-conditional model trained with a null class; use 1",
                options.guidance
            )));
        }
        let int_tensor = |values: Vec<i64>| {
            let len = values.len();
            Tensor::<1, Int>::from_data(TensorData::new(values, [len]), device)
        };
        let guided_labels = match (guided, labels, null) {
            (true, Some(c), Some(null)) => {
                let mut values = vec![c as i64; n];
                values.extend(std::iter::repeat_n(null as i64, n));
                Some(int_tensor(values))
            }
            _ => None,
        };
        let labels = labels.map(|c| int_tensor(vec![c as i64; n]));
        Ok(Self {
            model,
            sampler,
            sample,
            labels,
            guided_labels,
            guidance: options.guidance,
            noise,
            index: 0,
            device: device.clone(),
            batch_threads: 1,
        })
    }

    /// Evaluate the UNet on up to `threads` slices of the batch at once
    /// ([`UNet::forward_split`]): the CPU's thread count on burn's CPU backend, 1 (the default)
    /// on a GPU. The samples are the same either way.
    pub fn with_batch_threads(mut self, threads: usize) -> Self {
        self.batch_threads = threads.max(1);
        self
    }

    /// Number of model evaluations in the whole run.
    pub fn total_steps(&self) -> usize {
        self.sampler.timesteps().len()
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.index
    }

    /// Whether every step has run.
    pub fn is_done(&self) -> bool {
        self.index >= self.total_steps()
    }

    /// The current sample x_t (x_0 once done), values nominally in [-1, 1].
    pub fn sample(&self) -> &Tensor<4> {
        &self.sample
    }

    /// Run one reverse step. Returns false (and does nothing) once the run is complete.
    pub fn step(&mut self) -> bool {
        let Some(&t) = self.sampler.timesteps().get(self.index) else {
            return false;
        };
        let x = self.sample.clone();
        let [n, _, _, _] = x.dims();
        let model_output = match &self.guided_labels {
            Some(labels) => {
                // One forward pass over [x; x] with [class; null] labels.
                let both = Tensor::cat(vec![x.clone(), x.clone()], 0);
                let out = self.model.forward_split(
                    both,
                    self.timesteps(2 * n, t),
                    Some(labels.clone()),
                    self.batch_threads,
                );
                let cond = out.clone().narrow(0, 0, n);
                let uncond = out.narrow(0, n, n);
                uncond.clone() + (cond - uncond).mul_scalar(self.guidance)
            }
            None => self.model.forward_split(
                x.clone(),
                self.timesteps(n, t),
                self.labels.clone(),
                self.batch_threads,
            ),
        };
        self.sample = self.sampler.step(model_output, t, x, &mut self.noise);
        self.index += 1;
        true
    }

    /// Run the remaining steps and return x_0.
    pub fn run(mut self) -> Tensor<4> {
        while self.step() {}
        self.sample
    }

    fn timesteps(&self, n: usize, t: usize) -> Tensor<1> {
        Tensor::from_data(TensorData::new(vec![t as f32; n], [n]), &self.device)
    }
}

fn check_count(n: usize) -> Result<()> {
    if n == 0 || n > MAX_BATCH {
        return Err(Error::InvalidInput(format!(
            "number of images ({n}) must be in 1..={MAX_BATCH}"
        )));
    }
    Ok(())
}

/// Map samples in [-1, 1] (values of a `[n, c, h, w]` tensor, row-major) to 8-bit RGBA images,
/// one `h × w × 4` buffer per image; grayscale is replicated to RGB, alpha is opaque.
pub fn to_rgba(values: &[f32], shape: [usize; 4]) -> Vec<Vec<u8>> {
    let [n, c, h, w] = shape;
    let plane = h * w;
    let quantise = |v: f32| (((v.clamp(-1.0, 1.0) + 1.0) * 127.5) + 0.5).floor() as u8;
    (0..n)
        .map(|i| {
            let image = &values[i * c * plane..(i + 1) * c * plane];
            let mut rgba = vec![255u8; plane * 4];
            for p in 0..plane {
                for k in 0..3 {
                    let channel = if c >= 3 { k } else { 0 };
                    rgba[p * 4 + k] = quantise(image[channel * plane + p]);
                }
            }
            rgba
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgba_quantisation() {
        // One 1×2 grayscale image and one 1×1 RGB image.
        let gray = to_rgba(&[-1.0, 1.0], [1, 1, 1, 2]);
        assert_eq!(gray[0], vec![0, 0, 0, 255, 255, 255, 255, 255]);
        let rgb = to_rgba(&[0.0, -2.0, 0.5], [1, 3, 1, 1]);
        assert_eq!(rgb[0], vec![128, 0, 191, 255]);
    }
}
