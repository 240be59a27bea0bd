//! The reverse process end to end (Ho et al. 2020, Algorithm 2, with any [`Sampler`]): start
//! from seeded Gaussian noise x_T, evaluate the UNet at each of the sampler's timesteps and let
//! the sampler step, with optional classifier-free guidance (Ho & Salimans 2022).
//!
//! [`Generation`] advances one step per call so that a caller can draw intermediate images,
//! yield to a browser's event loop, or cancel between steps; nothing here reads tensors back to
//! the host. The same loop runs the editing tasks of [`crate::edit`]: image-to-image
//! ([`Generation::img2img`]), RePaint inpainting ([`Generation::inpaint`]) and the decoding of
//! interpolated noise ([`Generation::interpolate`]).

use std::ops::Range;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::diffusion::q_sample;
use crate::edit::{RePaint, RePaintMove, img2img_start, slerp_path};
use crate::error::{Error, Result};
use crate::model_file::ModelInfo;
use crate::noise::{NoiseSource, SeededNoise};
use crate::sampler::Sampler;
use crate::schedule::NoiseSchedule;
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
    /// Compute only images `part` of the `n` (`None`: all of them), with the same noise, and so
    /// the same pixels, as those images of the whole run: one run split across workers.
    pub part: Option<Range<usize>>,
}

impl GenerateOptions {
    /// The images this run computes (`part`, or all `n`), checked against `n`.
    fn images(&self) -> Result<Range<usize>> {
        check_count(self.n)?;
        match &self.part {
            None => Ok(0..self.n),
            Some(part) if part.start < part.end && part.end <= self.n => Ok(part.clone()),
            Some(part) => Err(Error::InvalidInput(format!(
                "images {}..{} are not a part of a run of {} images (give a non-empty range \
                 within 0..{})",
                part.start, part.end, self.n, self.n
            ))),
        }
    }

    /// `noise` as this run draws it: whole-run draws cut down to `part`.
    fn part_noise<'a>(
        &self,
        noise: Box<dyn NoiseSource + 'a>,
        images: &Range<usize>,
    ) -> Box<dyn NoiseSource + 'a> {
        if images.len() == self.n {
            noise
        } else {
            Box::new(PartNoise {
                inner: noise,
                n: self.n,
                images: images.clone(),
            })
        }
    }
}

/// Draws noise for a whole run of `n` images and keeps `images` of it, so that a part of a run
/// sees the same numbers as the whole run does for those images.
struct PartNoise<'a> {
    inner: Box<dyn NoiseSource + 'a>,
    n: usize,
    images: Range<usize>,
}

impl NoiseSource for PartNoise<'_> {
    fn gaussian(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let [b, c, h, w] = shape;
        if b != self.images.len() {
            return self.inner.gaussian(shape, device);
        }
        self.inner
            .gaussian([self.n, c, h, w], device)
            .narrow(0, self.images.start, b)
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            n: 16,
            seed: 0,
            class: None,
            guidance: 1.0,
            part: None,
        }
    }
}

/// What each step of a run does.
enum Plan<'a> {
    /// The sampler's timesteps from `start` on (0 for plain sampling, later for image-to-image).
    Sample {
        sampler: Box<dyn Sampler + 'a>,
        start: usize,
    },
    /// RePaint's moves, putting back the known image.
    Inpaint(Box<Inpainting>),
}

/// A RePaint run's schedule and what it keeps: `known` where `keep` is 1.
struct Inpainting {
    repaint: RePaint,
    known: Tensor<4>,
    keep: Tensor<4>,
}

/// A sampling run in progress.
pub struct Generation<'a> {
    model: &'a UNet,
    plan: Plan<'a>,
    sample: Tensor<4>,
    labels: Option<Tensor<1, Int>>,
    /// Labels for the doubled batch `[class; n] ++ [null; n]` when guiding.
    guided_labels: Option<Tensor<1, Int>>,
    guidance: f64,
    noise: Box<dyn NoiseSource + 'a>,
    index: usize,
    device: Device,
    batch_threads: usize,
    /// Evaluate the UNet on one image at a time (interpolation: a batched forward rounds
    /// differently from a one-image run, by ~1e-5).
    per_image: bool,
}

impl std::fmt::Debug for Generation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("shape", &self.sample.dims())
            .field("step", &self.index)
            .field("steps", &self.total_steps())
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
        let images = options.images()?;
        let s = info.unet.sample_size;
        let shape = [images.len(), info.unet.in_channels, s, s];
        let mut noise = options.part_noise(Box::new(SeededNoise::new(options.seed)), &images);
        let x_t = noise.gaussian(shape, device); // x_T ~ N(0, I)
        let plan = Plan::Sample { sampler, start: 0 };
        Self::build(model, info, plan, options, x_t, noise, device)
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
            part: None,
            ..options.clone()
        };
        // Skip the values x_T would have used so that a file holding the seed's own x_T
        // reproduces the seeded run exactly.
        let mut noise = SeededNoise::new(options.seed);
        noise.sample_vec(dims.iter().product());
        let plan = Plan::Sample { sampler, start: 0 };
        Self::build(model, info, plan, &options, x_t, Box::new(noise), device)
    }

    /// Decode `options.n` points on the great circle between the x_T of `seeds.0` and the x_T
    /// of `seeds.1` (spherical interpolation, [`crate::edit::slerp`]), in a batch whose first
    /// and last images are those two seeds' own. Later noise draws (stochastic samplers only)
    /// come from `options.seed`; with DDIM at η = 0 the end images equal the seeded runs.
    ///
    /// # Errors
    /// As [`Generation::new`], and for fewer than 2 images or two equal seeds.
    pub fn interpolate(
        model: &'a UNet,
        info: &ModelInfo,
        sampler: Box<dyn Sampler + 'a>,
        options: &GenerateOptions,
        seeds: (u64, u64),
        device: &Device,
    ) -> Result<Self> {
        let images = options.images()?;
        if options.n < 2 {
            return Err(Error::InvalidInput(format!(
                "an interpolation needs at least 2 images (from one seed to the other), got {}",
                options.n
            )));
        }
        if seeds.0 == seeds.1 {
            return Err(Error::InvalidInput(format!(
                "interpolating from seed {} to itself gives one image {} times: choose two seeds",
                seeds.0, options.n
            )));
        }
        let s = info.unet.sample_size;
        let one = [1, info.unet.in_channels, s, s];
        let len: usize = one.iter().product();
        let a = SeededNoise::new(seeds.0).sample_vec(len);
        let b = SeededNoise::new(seeds.1).sample_vec(len);
        let path = slerp_path(&a, &b, options.n)[images.start * len..images.end * len].to_vec();
        let x_t = Tensor::from_data(TensorData::new(path, [images.len(), one[1], s, s]), device);
        let plan = Plan::Sample { sampler, start: 0 };
        let noise = options.part_noise(Box::new(SeededNoise::new(options.seed)), &images);
        let mut generation = Self::build(model, info, plan, options, x_t, noise, device)?;
        // One image per UNet call, as in each seed's own run, so that the ends match it bit
        // for bit on the CPU.
        generation.per_image = true;
        Ok(generation)
    }

    /// Image-to-image (SDEdit): noise `image` to the sampler's timestep at `strength` (see
    /// [`img2img_start`]) with the seed's first draw, x_{t₀} = √ᾱ x_0 + √(1 − ᾱ) ε, and denoise
    /// from there with the sampler's remaining steps (diffusers' img2img: `get_timesteps`, then
    /// `add_noise`). `image` is `[1, c, s, s]` (every one of the `options.n` images a variation
    /// of it) or `[n, c, s, s]`, values in [−1, 1].
    ///
    /// # Errors
    /// As [`Generation::new`], for an image that does not fit the model, and for a strength
    /// outside (0, 1] or one that leaves no step.
    pub fn img2img(
        model: &'a UNet,
        info: &ModelInfo,
        sampler: Box<dyn Sampler + 'a>,
        options: &GenerateOptions,
        image: Tensor<4>,
        strength: f64,
        device: &Device,
    ) -> Result<Self> {
        let noise = Box::new(SeededNoise::new(options.seed));
        Self::img2img_with_noise(
            model, info, sampler, options, image, strength, noise, device,
        )
    }

    /// [`Generation::img2img`] with every noise draw taken from `noise` (tests replay another
    /// implementation's draws through it).
    #[allow(clippy::too_many_arguments)]
    pub fn img2img_with_noise(
        model: &'a UNet,
        info: &ModelInfo,
        sampler: Box<dyn Sampler + 'a>,
        options: &GenerateOptions,
        image: Tensor<4>,
        strength: f64,
        noise: Box<dyn NoiseSource + 'a>,
        device: &Device,
    ) -> Result<Self> {
        let images = options.images()?;
        let image = part_of(batch_of(image, options.n, info, "image")?, &images);
        let start = img2img_start(sampler.timesteps().len(), strength)?;
        let t0 = sampler.timesteps()[start];
        let schedule = NoiseSchedule::new(&info.schedule)?;
        let mut noise = options.part_noise(noise, &images);
        let eps = noise.gaussian(image.dims(), device);
        let x_t0 = q_sample(&schedule, image, eps, &vec![t0; images.len()]);
        let plan = Plan::Sample { sampler, start };
        Self::build(model, info, plan, options, x_t0, noise, device)
    }

    /// Inpainting with RePaint: regenerate the pixels where `mask` is 1 and keep `image` where
    /// it is 0, starting from the seed's x_T. `image` is `[1 or n, c, s, s]` in [−1, 1]; `mask`
    /// is `[1 or n, 1 or c, s, s]` in [0, 1].
    ///
    /// # Errors
    /// As [`Generation::new`], and for an image or mask that does not fit the model.
    pub fn inpaint(
        model: &'a UNet,
        info: &ModelInfo,
        repaint: RePaint,
        options: &GenerateOptions,
        image: Tensor<4>,
        mask: Tensor<4>,
        device: &Device,
    ) -> Result<Self> {
        let noise = Box::new(SeededNoise::new(options.seed));
        Self::inpaint_with_noise(model, info, repaint, options, image, mask, noise, device)
    }

    /// [`Generation::inpaint`] with every noise draw (x_T first) taken from `noise`.
    #[allow(clippy::too_many_arguments)]
    pub fn inpaint_with_noise(
        model: &'a UNet,
        info: &ModelInfo,
        repaint: RePaint,
        options: &GenerateOptions,
        image: Tensor<4>,
        mask: Tensor<4>,
        noise: Box<dyn NoiseSource + 'a>,
        device: &Device,
    ) -> Result<Self> {
        let images = options.images()?;
        let known = part_of(batch_of(image, options.n, info, "image")?, &images);
        let [_, c, s, _] = known.dims();
        let [mn, mc, mh, mw] = mask.dims();
        if !(mn == 1 || mn == options.n) || !(mc == 1 || mc == c) || mh != s || mw != s {
            return Err(Error::InvalidInput(format!(
                "the mask is {mh}×{mw} ({mn} × {mc} channels); it must be {s}×{s} like the image, \
                 with 1 or {c} channels"
            )));
        }
        let mask = if mn == options.n {
            part_of(mask, &images)
        } else {
            mask
        };
        let keep = mask.neg().add_scalar(1.0).clamp(0.0, 1.0); // 1 = keep the known pixel
        let mut noise = options.part_noise(noise, &images);
        let x_t = noise.gaussian(known.dims(), device); // x_T ~ N(0, I)
        let plan = Plan::Inpaint(Box::new(Inpainting {
            repaint,
            known,
            keep,
        }));
        Self::build(model, info, plan, options, x_t, noise, device)
    }

    fn build(
        model: &'a UNet,
        info: &ModelInfo,
        plan: Plan<'a>,
        options: &GenerateOptions,
        sample: Tensor<4>,
        noise: Box<dyn NoiseSource + 'a>,
        device: &Device,
    ) -> Result<Self> {
        let n = sample.dims()[0];
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
            plan,
            sample,
            labels,
            guided_labels,
            guidance: options.guidance,
            noise,
            index: 0,
            device: device.clone(),
            batch_threads: 1,
            per_image: false,
        })
    }

    /// Evaluate the UNet on up to `threads` slices of the batch at once
    /// ([`UNet::forward_split`]): the CPU's thread count on burn's CPU backend, 1 (the default)
    /// on a GPU. The samples are the same either way.
    pub fn with_batch_threads(mut self, threads: usize) -> Self {
        self.batch_threads = threads.max(1);
        self
    }

    /// Number of steps in the whole run: model evaluations, plus RePaint's moves back up.
    pub fn total_steps(&self) -> usize {
        match &self.plan {
            Plan::Sample { sampler, start } => sampler.timesteps().len() - start,
            Plan::Inpaint(inpainting) => inpainting.repaint.moves().len(),
        }
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

    /// Run one step. Returns false (and does nothing) once the run is complete.
    pub fn step(&mut self) -> bool {
        if self.is_done() {
            return false;
        }
        let x = self.sample.clone();
        self.sample = match &self.plan {
            Plan::Sample { sampler, start } => {
                let t = sampler.timesteps()[start + self.index];
                let model_output = self.predict(x.clone(), t);
                let Plan::Sample { sampler, .. } = &mut self.plan else {
                    unreachable!("matched above")
                };
                sampler.step(model_output, t, x, self.noise.as_mut())
            }
            Plan::Inpaint(inpainting) => {
                let Inpainting {
                    repaint,
                    known,
                    keep,
                } = inpainting.as_ref();
                match repaint.moves()[self.index] {
                    RePaintMove::Denoise(t) => {
                        let model_output = self.predict(x.clone(), t);
                        repaint
                            .denoise(model_output, t, x, known, keep, self.noise.as_mut())
                            .prev_sample
                    }
                    RePaintMove::Renoise(from) => repaint.renoise(x, from, self.noise.as_mut()),
                }
            }
        };
        self.index += 1;
        true
    }

    /// The model's output for x at timestep t, with classifier-free guidance when asked.
    fn predict(&self, x: Tensor<4>, t: usize) -> Tensor<4> {
        let [n, _, _, _] = x.dims();
        let parts = |batch: usize| {
            if self.per_image {
                batch
            } else {
                self.batch_threads
            }
        };
        match &self.guided_labels {
            Some(labels) => {
                // One forward pass over [x; x] with [class; null] labels.
                let both = Tensor::cat(vec![x.clone(), x], 0);
                let out = self.model.forward_split(
                    both,
                    self.timesteps(2 * n, t),
                    Some(labels.clone()),
                    parts(2 * n),
                );
                let cond = out.clone().narrow(0, 0, n);
                let uncond = out.narrow(0, n, n);
                uncond.clone() + (cond - uncond).mul_scalar(self.guidance)
            }
            None => {
                self.model
                    .forward_split(x, self.timesteps(n, t), self.labels.clone(), parts(n))
            }
        }
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

/// `image` as a batch of `n`: a single image repeated, or already `n` images; checked against
/// the model.
fn batch_of(image: Tensor<4>, n: usize, info: &ModelInfo, what: &str) -> Result<Tensor<4>> {
    let dims = image.dims();
    info.unet.check_input(dims).map_err(|e| match e {
        Error::InvalidInput(m) => Error::InvalidInput(format!("{what}: {m}")),
        other => other,
    })?;
    match dims[0] {
        b if b == n => Ok(image),
        1 => Ok(image.repeat_dim(0, n)),
        b => Err(Error::InvalidInput(format!(
            "{what}: a batch of {b} for {n} images (give 1 or {n})"
        ))),
    }
}

/// Images `images` of a whole-run batch.
fn part_of(batch: Tensor<4>, images: &Range<usize>) -> Tensor<4> {
    if images.len() == batch.dims()[0] {
        batch
    } else {
        batch.narrow(0, images.start, images.len())
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
