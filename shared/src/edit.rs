//! Editing with a trained model: the pieces that [`crate::pipeline::Generation`] runs.
//!
//! - Inpainting with RePaint (Lugmayr et al. 2022, arXiv:2201.09865): at each reverse step the
//!   pixels to keep are replaced by the known image noised to that step, and the schedule jumps
//!   back up `jump_length` steps, `jump_n_sample − 1` times per jump point, so that the generated
//!   part can harmonise with the kept part. [`RePaint`] follows diffusers 0.42's
//!   `RePaintScheduler` (`set_timesteps`, `step`, `undo_step`) and `RePaintPipeline`'s loop.
//! - Image-to-image (SDEdit, Meng et al. 2021, arXiv:2108.01073): noise the image to
//!   t₀ ≈ strength · T and denoise from there with any sampler; [`img2img_start`] picks the first
//!   inference step as diffusers' img2img pipelines do (`get_timesteps`).
//! - Interpolation: spherical interpolation between two seeds' x_T ([`slerp`], Song et al. 2021,
//!   arXiv:2010.02502, §5.3, decoded deterministically by DDIM).
//! - [`fit_image`]: an RGBA picture center-cropped to a square and resampled to the model's side,
//!   the same arithmetic natively and in the browser.

use burn::tensor::{Tensor, TensorData};

use crate::diffusion::{PredictionType, predict_noise, predict_start};
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::sampler::{StepOutput, draw_noise};
use crate::schedule::NoiseSchedule;

/// Settings of a RePaint run (diffusers' `RePaintPipeline.__call__` arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct RePaintOptions {
    /// Reverse steps N (model evaluations without the jumps). The inference timesteps are
    /// multiples of ⌊T/N⌋.
    pub steps: usize,
    /// j: how many steps each jump goes back up (the paper's jump length).
    pub jump_length: usize,
    /// r: how often each jump point is passed (r − 1 jumps back up; 1 = no resampling).
    pub jump_n_sample: usize,
    /// η of the DDIM-style reverse step: 0 deterministic (diffusers' default), 1 the DDPM
    /// posterior variance.
    pub eta: f64,
    /// Clip the predicted x_0 to [−1, 1] (diffusers' `clip_sample`, default true).
    pub clip_sample: bool,
}

impl Default for RePaintOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            jump_length: 10,
            jump_n_sample: 10,
            eta: 0.0,
            clip_sample: true,
        }
    }
}

/// One move of a RePaint run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RePaintMove {
    /// A reverse step at timestep t (to t − ⌊T/N⌋), with the known pixels put back.
    Denoise(usize),
    /// Noise the sample back up by ⌊T/N⌋ training steps, with β_{from}, …, β_{from+⌊T/N⌋−1}
    /// (diffusers' `undo_step(sample, from)`).
    Renoise(usize),
}

/// The RePaint schedule and step (diffusers 0.42 `RePaintScheduler`), for a model that predicts
/// `prediction`.
#[derive(Clone, Debug)]
pub struct RePaint {
    schedule: NoiseSchedule,
    /// ⌊T/N⌋: training timesteps per inference step.
    stride: usize,
    /// diffusers' `scheduler.timesteps`: the reverse steps with the jumps back up.
    timesteps: Vec<usize>,
    moves: Vec<RePaintMove>,
    options: RePaintOptions,
    prediction: PredictionType,
}

impl RePaint {
    /// The schedule of a run.
    ///
    /// # Errors
    /// [`Error::InvalidSampler`] for 0 steps or more steps than training timesteps, a jump
    /// length or resample count of 0 or more than the steps, or η outside [0, 1].
    pub fn new(
        schedule: &NoiseSchedule,
        prediction: PredictionType,
        options: &RePaintOptions,
    ) -> Result<Self> {
        let t_total = schedule.num_train_timesteps();
        let n = options.steps;
        crate::sampler::check_steps(n, t_total)?;
        for (name, value) in [
            ("jump length", options.jump_length),
            ("resample count", options.jump_n_sample),
        ] {
            if value == 0 || value > n {
                return Err(Error::InvalidSampler(format!(
                    "RePaint {name} ({value}) must be between 1 and the number of steps ({n})"
                )));
            }
        }
        if !(0.0..=1.0).contains(&options.eta) {
            return Err(Error::InvalidSampler(format!(
                "RePaint eta ({}) must be in [0, 1]",
                options.eta
            )));
        }
        let stride = t_total / n;
        let indices = repaint_indices(n, options.jump_length, options.jump_n_sample);
        let timesteps: Vec<usize> = indices.iter().map(|&k| k * stride).collect();
        // RePaintPipeline: a step down where t falls below the previous entry, else an undo
        // from the previous entry (the first entry is a step down: t_last = timesteps[0] + 1).
        let mut moves = Vec::with_capacity(timesteps.len());
        let mut t_last = timesteps[0] + 1;
        for &t in &timesteps {
            moves.push(if t < t_last {
                RePaintMove::Denoise(t)
            } else {
                RePaintMove::Renoise(t_last)
            });
            t_last = t;
        }
        Ok(Self {
            schedule: schedule.clone(),
            stride,
            timesteps,
            moves,
            options: options.clone(),
            prediction,
        })
    }

    /// diffusers' `scheduler.timesteps` after `set_timesteps(steps, jump_length, jump_n_sample)`.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// What each entry of [`RePaint::timesteps`] does.
    pub fn moves(&self) -> &[RePaintMove] {
        &self.moves
    }

    /// The options the schedule was built with.
    pub fn options(&self) -> &RePaintOptions {
        &self.options
    }

    /// One reverse step at `timestep` (diffusers' `RePaintScheduler.step`), with the pixels where
    /// `keep` is 1 taken from `known` noised to the next step. Draws one noise tensor, used for
    /// both the step's variance and the known part, as diffusers does.
    ///
    /// # Shapes
    /// `model_output`, `sample`: `[n, c, h, w]`; `known`, `keep`: the same or broadcastable
    /// (`[1, c, h, w]`, `[n, 1, h, w]` ...), `keep` in [0, 1].
    pub fn denoise(
        &self,
        model_output: Tensor<4>,
        timestep: usize,
        sample: Tensor<4>,
        known: &Tensor<4>,
        keep: &Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> StepOutput {
        let schedule = &self.schedule;
        // 1. compute alphas, betas (t' = t − ⌊T/N⌋; ᾱ = 1 below 0: final_alpha_cumprod)
        let alpha_prod_t = schedule.alphas_cumprod[timestep];
        let prev_timestep = timestep.checked_sub(self.stride);
        let alpha_prod_t_prev = prev_timestep.map_or(1.0, |p| schedule.alphas_cumprod[p]);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let n = sample.dims()[0];
        let t = vec![timestep; n];

        // 2. compute the predicted original sample (formula (12) of the DDIM paper) and ε
        let pred_epsilon = predict_noise(
            self.prediction,
            schedule,
            sample.clone(),
            &t,
            model_output.clone(),
        );
        let pred_original_sample =
            predict_start(self.prediction, schedule, sample, &t, model_output);

        // 3. clip "predicted x_0"
        let pred_original_sample = if self.options.clip_sample {
            pred_original_sample.clamp(-1.0, 1.0)
        } else {
            pred_original_sample
        };

        // 4. one noise draw for the whole step
        let z = draw_noise(noise, &pred_epsilon);

        // 5. σ_t(η), formula (16) of the DDIM paper
        let variance = beta_prod_t_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.options.eta * variance.max(0.0).sqrt();

        // 6. the unknown part: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z
        let direction = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t)
            .max(0.0)
            .sqrt();
        let mut prev_unknown = pred_original_sample
            .clone()
            .mul_scalar(alpha_prod_t_prev.sqrt())
            .add(pred_epsilon.mul_scalar(direction));
        if timestep > 0 && self.options.eta > 0.0 {
            prev_unknown = prev_unknown.add(z.clone().mul_scalar(std_dev_t));
        }

        // 7. the known part, noised to t': √ᾱ_{t'} x_0 + √(1 − ᾱ_{t'}) z
        let prev_known = known
            .clone()
            .mul_scalar(alpha_prod_t_prev.sqrt())
            .add(z.mul_scalar(beta_prod_t_prev.sqrt()));

        // 8. put them together: keep · known + (1 − keep) · unknown
        let prev_sample = prev_unknown
            .clone()
            .add(prev_known.sub(prev_unknown).mul(keep.clone()));
        StepOutput {
            prev_sample,
            pred_original_sample,
        }
    }

    /// Noise `sample` back up by ⌊T/N⌋ training steps, x ← √(1 − β_s) x + √β_s z for
    /// s = from, …, from + ⌊T/N⌋ − 1 (diffusers' `undo_step`): one noise draw per training step.
    pub fn renoise(
        &self,
        sample: Tensor<4>,
        from: usize,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        (from..from + self.stride).fold(sample, |x, s| {
            let beta = self.schedule.betas[s];
            let z = draw_noise(noise, &x);
            x.mul_scalar((1.0 - beta).sqrt())
                .add(z.mul_scalar(beta.sqrt()))
        })
    }
}

/// The values of ⌊T/N⌋ · k that diffusers' `RePaintScheduler.set_timesteps` lists, as k.
fn repaint_indices(steps: usize, jump_length: usize, jump_n_sample: usize) -> Vec<usize> {
    // jumps[j] = r − 1 for j = 0, j, 2j, … below N − j
    let mut jumps = vec![0usize; steps];
    for j in (0..steps.saturating_sub(jump_length)).step_by(jump_length) {
        jumps[j] = jump_n_sample - 1;
    }
    let mut indices = Vec::new();
    let mut t = steps;
    while t >= 1 {
        t -= 1;
        indices.push(t);
        if jumps[t] > 0 {
            jumps[t] -= 1;
            for _ in 0..jump_length {
                t += 1;
                indices.push(t);
            }
        }
    }
    indices
}

/// The first of `timesteps` an image-to-image run uses for `strength` ∈ (0, 1], and that many
/// skipped: diffusers' `get_timesteps` (init_timestep = min(⌊N · strength⌋, N),
/// t_start = N − init_timestep).
///
/// # Errors
/// [`Error::InvalidInput`] for a strength outside (0, 1], or one so small that no step is left.
pub fn img2img_start(num_steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidInput(format!(
            "strength ({strength}) must be in (0, 1]: 1 starts from pure noise, small values stay \
             close to the image"
        )));
    }
    let init_timestep = ((num_steps as f64 * strength) as usize).min(num_steps);
    if init_timestep == 0 {
        return Err(Error::InvalidInput(format!(
            "strength {strength} with {num_steps} steps leaves no denoising step (⌊{num_steps} × \
             {strength}⌋ = 0): raise the strength or the steps"
        )));
    }
    Ok(num_steps - init_timestep)
}

/// Spherical interpolation between two noise vectors (Shoemake 1985; the interpolation of x_T in
/// Song et al. 2021, §5.3): `sin((1−α)θ)/sin θ · a + sin(αθ)/sin θ · b`, θ the angle between them,
/// computed in f64. α = 0 and α = 1 give `a` and `b` exactly; (nearly) parallel vectors fall back
/// to linear interpolation.
///
/// # Panics
/// If the lengths differ.
pub fn slerp(a: &[f32], b: &[f32], alpha: f64) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "slerp of vectors of different lengths");
    if alpha == 0.0 {
        return a.to_vec();
    }
    if alpha == 1.0 {
        return b.to_vec();
    }
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = (dot / (norm(a) * norm(b))).clamp(-1.0, 1.0);
    let theta = cos.acos();
    let (wa, wb) = if theta.sin().abs() < 1e-6 {
        (1.0 - alpha, alpha)
    } else {
        (
            ((1.0 - alpha) * theta).sin() / theta.sin(),
            (alpha * theta).sin() / theta.sin(),
        )
    };
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (wa * x as f64 + wb * y as f64) as f32)
        .collect()
}

/// `n` points from `a` to `b` (`a` and `b` included) by [`slerp`], one after another.
pub fn slerp_path(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    (0..n)
        .flat_map(|i| {
            let alpha = if n == 1 {
                0.0
            } else {
                i as f64 / (n - 1) as f64
            };
            slerp(a, b, alpha)
        })
        .collect()
}

/// Largest side [`fit_image`] and the editing commands accept.
pub const MAX_IMAGE_SIDE: usize = 8192;

/// An RGBA picture fitted to the model: center-cropped to a square, resampled to `side`×`side`
/// by area averaging (each output pixel the mean of the input area it covers), and converted
/// to `channels` values per pixel in [−1, 1] (1: luma 0.299 R + 0.587 G + 0.114 B, as PIL's
/// "L"; 3: RGB), channel-major (`[channels, side, side]`).
#[derive(Clone, Debug, PartialEq)]
pub struct FittedImage {
    /// `channels · side · side` values in [−1, 1].
    pub values: Vec<f32>,
    /// What was done to fit it ("center-cropped 40×28 to 28×28", "resized 56×56 to 28×28"), if
    /// anything.
    pub note: Option<String>,
}

/// Fit an RGBA picture (`width · height · 4` bytes, row-major) to the model's `side` and
/// `channels` (see [`FittedImage`]).
///
/// # Errors
/// [`Error::InvalidInput`] for an empty picture, a side above [`MAX_IMAGE_SIDE`], a buffer of the
/// wrong length, or `channels` other than 1 and 3.
pub fn fit_image(
    rgba: &[u8],
    width: usize,
    height: usize,
    side: usize,
    channels: usize,
) -> Result<FittedImage> {
    check_image_size(width, height)?;
    if rgba.len() != width * height * 4 {
        return Err(Error::InvalidInput(format!(
            "a {width}×{height} RGBA image has {} bytes, got {}",
            width * height * 4,
            rgba.len()
        )));
    }
    if channels != 1 && channels != 3 {
        return Err(Error::InvalidInput(format!(
            "images can be fitted to 1 or 3 channels, not {channels}"
        )));
    }
    // Center crop to the shorter side.
    let crop = width.min(height);
    let (x0, y0) = ((width - crop) / 2, (height - crop) / 2);
    let mut notes = Vec::new();
    if width != height {
        notes.push(format!("center-cropped {width}×{height} to {crop}×{crop}"));
    }
    if crop != side {
        notes.push(format!("resized {crop}×{crop} to {side}×{side}"));
    }
    // Per output index, the input pixels it covers with their weights (area averaging).
    let weights = area_weights(crop, side);
    let plane = side * side;
    let mut values = vec![0.0f32; channels * plane];
    for (oy, ys) in weights.iter().enumerate() {
        for (ox, xs) in weights.iter().enumerate() {
            let mut rgb = [0.0f64; 3];
            for &(iy, wy) in ys {
                for &(ix, wx) in xs {
                    let p = ((y0 + iy) * width + x0 + ix) * 4;
                    for (k, v) in rgb.iter_mut().enumerate() {
                        *v += wy * wx * rgba[p + k] as f64;
                    }
                }
            }
            let to_unit = |v: f64| (v / 127.5 - 1.0) as f32;
            let o = oy * side + ox;
            if channels == 1 {
                values[o] = to_unit(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]);
            } else {
                for (k, v) in rgb.iter().enumerate() {
                    values[k * plane + o] = to_unit(*v);
                }
            }
        }
    }
    Ok(FittedImage {
        values,
        note: (!notes.is_empty()).then(|| notes.join(", then ")),
    })
}

/// Refuses a picture whose sides are 0 or above [`MAX_IMAGE_SIDE`] (before anything is
/// allocated for it).
pub fn check_image_size(width: usize, height: usize) -> Result<()> {
    if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(Error::InvalidInput(format!(
            "image of {width}×{height} pixels: each side must be 1 to {MAX_IMAGE_SIDE}"
        )));
    }
    Ok(())
}

/// For each of `to` output pixels along one axis of `from` input pixels: the input pixels it
/// covers and the fraction of its width each covers (summing to 1).
fn area_weights(from: usize, to: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = from as f64 / to as f64;
    (0..to)
        .map(|o| {
            let (start, end) = (o as f64 * scale, (o + 1) as f64 * scale);
            let first = start.floor() as usize;
            let last = (end.ceil() as usize).min(from);
            (first..last)
                .filter_map(|i| {
                    let cover = (end.min((i + 1) as f64) - start.max(i as f64)) / scale;
                    (cover > 1e-12).then_some((i, cover))
                })
                .collect()
        })
        .collect()
}

/// How much of the picture a mask regenerates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskCover {
    /// No white pixel: the picture comes back unchanged.
    Nothing,
    /// Some white pixels: the usual case.
    Part,
    /// Every pixel white: nothing is kept, the run is plain sampling.
    Everything,
}

/// A mask fitted to the model as its picture is ([`fit_mask`]).
#[derive(Clone, Debug, PartialEq)]
pub struct FittedMask {
    /// `side · side` values: 1 where the pixel is to be regenerated, else 0.
    pub values: Vec<f32>,
    /// How many of them are 1.
    pub cover: MaskCover,
}

/// Fit a mask picture (RGBA, `width · height · 4` bytes) the way [`fit_image`] fits the picture
/// it belongs to, whose size is `picture` (width, height), then threshold it: white (luma ≥ 128
/// after fitting) = regenerate.
///
/// # Errors
/// [`Error::InvalidInput`] for a mask of another size than the picture, and as [`fit_image`].
pub fn fit_mask(
    rgba: &[u8],
    width: usize,
    height: usize,
    picture: (usize, usize),
    side: usize,
) -> Result<FittedMask> {
    if (width, height) != picture {
        return Err(Error::InvalidInput(format!(
            "the mask is {width}×{height} but the image is {}×{}: give a mask of the image's size",
            picture.0, picture.1
        )));
    }
    let luma = fit_image(rgba, width, height, side, 1)?.values;
    // Luma v ∈ [−1, 1] is the byte (v + 1) · 127.5: white from 127.5 (v ≥ 0) up.
    let values: Vec<f32> = luma
        .iter()
        .map(|&v| if v >= 0.0 { 1.0 } else { 0.0 })
        .collect();
    let white = values.iter().filter(|&&m| m > 0.5).count();
    let cover = match white {
        0 => MaskCover::Nothing,
        w if w == values.len() => MaskCover::Everything,
        _ => MaskCover::Part,
    };
    Ok(FittedMask { values, cover })
}

/// A `[1, c, s, s]` (or `[1, 1, s, s]` for a mask) tensor from fitted values.
pub fn image_tensor(values: Vec<f32>, channels: usize, device: &burn::tensor::Device) -> Tensor<4> {
    let side = ((values.len() / channels) as f64).sqrt() as usize;
    Tensor::from_data(TensorData::new(values, [1, channels, side, side]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::ScheduleConfig;

    #[test]
    fn repaint_timesteps_match_diffusers_set_timesteps() {
        // diffusers 0.42: RePaintScheduler(num_train_timesteps=1000).set_timesteps(10, 3, 2)
        // → k · 100 for the k below (jump points 0, 3 and 6: every third index below 10 − 3).
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let options = RePaintOptions {
            steps: 10,
            jump_length: 3,
            jump_n_sample: 2,
            ..Default::default()
        };
        let r = RePaint::new(&s, PredictionType::Epsilon, &options).unwrap();
        let k: Vec<usize> = r.timesteps().iter().map(|t| t / 100).collect();
        assert_eq!(
            k,
            [
                9, 8, 7, 6, 7, 8, 9, 8, 7, 6, 5, 4, 3, 4, 5, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0
            ]
        );
        use RePaintMove::*;
        assert_eq!(
            &r.moves()[3..8],
            &[
                Denoise(600),
                Renoise(600),
                Renoise(700),
                Renoise(800),
                Denoise(800)
            ]
        );
        for (name, jump, resample) in [("jump", 0, 2), ("jump", 11, 2), ("resample", 3, 0)] {
            let bad = RePaintOptions {
                steps: 10,
                jump_length: jump,
                jump_n_sample: resample,
                ..Default::default()
            };
            let e = RePaint::new(&s, PredictionType::Epsilon, &bad).unwrap_err();
            assert!(
                e.to_string()
                    .contains("between 1 and the number of steps (10)"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn img2img_start_is_diffusers_get_timesteps() {
        // init_timestep = min(int(N · strength), N); t_start = N − init_timestep.
        assert_eq!(img2img_start(50, 0.6).unwrap(), 20);
        assert_eq!(img2img_start(50, 1.0).unwrap(), 0);
        assert_eq!(img2img_start(25, 0.3).unwrap(), 18); // int(7.5) = 7
        assert_eq!(img2img_start(10, 0.1).unwrap(), 9);
        assert!(
            img2img_start(10, 0.05)
                .unwrap_err()
                .to_string()
                .contains("no denoising step")
        );
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            assert!(
                img2img_start(10, bad)
                    .unwrap_err()
                    .to_string()
                    .contains("(0, 1]")
            );
        }
    }

    #[test]
    fn slerp_ends_are_exact_and_the_middle_keeps_the_norm() {
        let a: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.7).sin()).collect();
        let b: Vec<f32> = (0..64).map(|i| ((i as f32) * 1.3 + 0.2).cos()).collect();
        assert_eq!(slerp(&a, &b, 0.0), a);
        assert_eq!(slerp(&a, &b, 1.0), b);
        let path = slerp_path(&a, &b, 5);
        assert_eq!(&path[..64], &a[..]);
        assert_eq!(&path[4 * 64..], &b[..]);
        // Between two vectors of equal norm, slerp stays on the sphere.
        let unit = |v: &[f32]| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let (ua, ub) = (unit(&a), unit(&b));
        let mid = slerp(&ua, &ub, 0.5);
        let norm: f32 = mid.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
        // The midpoint is equally far (in angle) from both ends.
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        assert!((dot(&mid, &ua) - dot(&mid, &ub)).abs() < 1e-5);
    }

    #[test]
    fn fit_image_crops_resizes_and_converts() {
        // A 4×2 picture: the center 2×2 is kept; it is already 2×2, so values pass through.
        let mut rgba = Vec::new();
        for y in 0..2 {
            for x in 0..4 {
                let v = (y * 4 + x) as u8 * 30;
                rgba.extend([v, v, v, 255]);
            }
        }
        let f = fit_image(&rgba, 4, 2, 2, 1).unwrap();
        let expect: Vec<f32> = [30u8, 60, 150, 180]
            .iter()
            .map(|&v| v as f32 / 127.5 - 1.0)
            .collect();
        for (g, e) in f.values.iter().zip(&expect) {
            assert!((g - e).abs() < 1e-6);
        }
        assert_eq!(f.note.as_deref(), Some("center-cropped 4×2 to 2×2"));
        // Downscaling 3 → 2 averages areas: output 0 covers pixel 0 and half of pixel 1.
        let row = [0u8, 90, 255];
        let mut rgba = Vec::new();
        for _ in 0..3 {
            for &v in &row {
                rgba.extend([v, 0, 0, 255]);
            }
        }
        let f = fit_image(&rgba, 3, 3, 2, 3).unwrap();
        let red0 = (0.0 * (2.0 / 3.0) + 90.0 * (1.0 / 3.0)) / 127.5 - 1.0;
        assert!((f.values[0] as f64 - red0).abs() < 1e-6, "{}", f.values[0]);
        assert_eq!(f.values[4], -1.0); // green plane
        assert_eq!(f.note.as_deref(), Some("resized 3×3 to 2×2"));
        // Bad input.
        assert!(fit_image(&rgba, 3, 2, 2, 1).is_err()); // wrong length
        assert!(
            fit_image(&[], 0, 0, 2, 1)
                .unwrap_err()
                .to_string()
                .contains("1 to 8192")
        );
        assert!(check_image_size(9000, 10).is_err());
        // White regenerates, black keeps (the threshold is 128); the mask must be the picture's
        // size.
        let grey = |v: u8| [v, v, v, 255];
        let pixels = [grey(255), grey(0), grey(200), grey(100)].concat();
        let mask = fit_mask(&pixels, 2, 2, (2, 2), 2).unwrap();
        assert_eq!(mask.values, [1.0, 0.0, 1.0, 0.0]);
        assert_eq!(mask.cover, MaskCover::Part);
        let cover = |v: u8| {
            fit_mask(&[grey(v), grey(v)].concat(), 2, 1, (2, 1), 1)
                .unwrap()
                .cover
        };
        assert_eq!(cover(128), MaskCover::Everything);
        assert_eq!(cover(127), MaskCover::Nothing);
        let e = fit_mask(&pixels, 2, 2, (3, 2), 2).unwrap_err().to_string();
        assert!(e.contains("the mask is 2×2 but the image is 3×2"), "{e}");
    }
}
