//! Denoising diffusion implicit models (Song et al. 2021, arXiv:2010.02502), step for step as
//! diffusers' `DDIMScheduler.step` (diffusers 0.42, `schedulers/scheduling_ddim.py`).
//!
//! x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ_t²) ε̂ + σ_t z (eq. (12)), with
//! σ_t = η √((1 − ᾱ_{t'})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'}) (eq. (16)): η = 0 is the deterministic
//! DDIM sampler, η = 1 the DDPM posterior.
//!
//! As in diffusers, the previous timestep is t' = t − ⌊T/N⌋ whatever the spacing (for "linspace"
//! that is not the next listed timestep), and t' < 0 uses ᾱ = 1 (`set_alpha_to_one`) or ᾱ_0.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    Sampler, StepOutput, TimestepSpacing, X0Limit, check_steps, draw_noise, spaced_timesteps,
};
use crate::diffusion::PredictionType;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::schedule::{NoiseSchedule, nonzero_alpha_cumprod};

/// Options of [`DdimSampler`]: diffusers' `DDIMScheduler` config keys and defaults, plus the
/// two `step()` arguments `eta` and `use_clipped_model_output`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimOptions {
    /// What the model predicts. Default epsilon.
    pub prediction_type: PredictionType,
    /// η of eq. (16), ≥ 0: 0 = deterministic DDIM, 1 = DDPM posterior noise. Default 0.
    pub eta: f64,
    /// Clip the predicted x_0 to ±`clip_sample_range`. Default true.
    pub clip_sample: bool,
    /// Bound for `clip_sample`. Default 1.
    pub clip_sample_range: f64,
    /// After the last step use ᾱ = 1 (true) or ᾱ_0 (false). Default true.
    pub set_alpha_to_one: bool,
    /// Dynamic thresholding of x_0 (takes precedence over `clip_sample`). Default false.
    pub thresholding: bool,
    /// Quantile of |x_0| for dynamic thresholding. Default 0.995.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold. Default 1.
    pub sample_max_value: f64,
    /// Recompute ε̂ from the clipped x̂_0 (as GLIDE does). Default false.
    pub use_clipped_model_output: bool,
    /// Timestep spacing. Default leading.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps. Default 0.
    pub steps_offset: usize,
}

impl Default for DdimOptions {
    fn default() -> Self {
        Self {
            prediction_type: PredictionType::Epsilon,
            eta: 0.0,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            use_clipped_model_output: false,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

/// DDIM sampler. Stateless between steps: one instance serves any number of runs.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    /// ⌊T/N⌋, the distance to the previous timestep.
    step_ratio: usize,
    options: DdimOptions,
    x0_limit: X0Limit,
}

impl DdimSampler {
    /// A sampler taking `num_inference_steps` steps over `schedule`.
    ///
    /// # Errors
    /// [`Error::InvalidSampler`] for 0 steps, more steps than training timesteps, timesteps
    /// pushed past the schedule by `steps_offset`, a negative or non-finite η, or clip / threshold
    /// values out of range.
    pub fn new(
        schedule: &NoiseSchedule,
        num_inference_steps: usize,
        options: DdimOptions,
    ) -> Result<Self> {
        let t_total = schedule.num_train_timesteps();
        check_steps(num_inference_steps, t_total)?;
        if !(options.eta >= 0.0 && options.eta.is_finite()) {
            return Err(Error::InvalidSampler(format!(
                "DDIM's η (eta) is {}: choose a number ≥ 0 (0 = deterministic, 1 = as noisy as \
                 the ancestral sampler)",
                options.eta
            )));
        }
        let timesteps = spaced_timesteps(
            options.timestep_spacing,
            t_total,
            num_inference_steps,
            options.steps_offset,
        )?;
        let x0_limit = X0Limit::new(
            options.clip_sample,
            options.clip_sample_range,
            options.thresholding,
            options.dynamic_thresholding_ratio,
            options.sample_max_value,
        )?;
        let final_alpha_cumprod = if options.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            alphas_cumprod: schedule.alphas_cumprod.clone(),
            final_alpha_cumprod,
            timesteps,
            step_ratio: t_total / num_inference_steps,
            options,
            x0_limit,
        })
    }

    /// The options the sampler was built with.
    pub fn options(&self) -> &DdimOptions {
        &self.options
    }

    /// diffusers' previous timestep t − ⌊T/N⌋, `None` when negative.
    pub fn previous_timestep(&self, timestep: usize) -> Option<usize> {
        timestep.checked_sub(self.step_ratio)
    }

    /// One DDIM step, returning x_{t'} and the clipped x_0 estimate. Noise is drawn from `noise`
    /// only when σ_t > 0 (never for η = 0, nor for the last step with `set_alpha_to_one`).
    ///
    /// # Panics
    /// If `timestep` is not below the schedule's `num_train_timesteps`.
    pub fn step_output(
        &self,
        model_output: Tensor<4>,
        timestep: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> StepOutput {
        // 1. get previous step value (=t-1)
        let prev_timestep = self.previous_timestep(timestep);

        // 2. compute alphas, betas
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev =
            prev_timestep.map_or(self.final_alpha_cumprod, |p| self.alphas_cumprod[p]);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        // ε̂ = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t); 1 − ᾱ_t > 0 for every valid schedule.
        let recip_sqrt_beta_prod_t = if beta_prod_t > 0.0 {
            1.0 / beta_prod_t.sqrt()
        } else {
            0.0
        };
        let eps_from_x0 = |x0: Tensor<4>, sample: Tensor<4>| {
            sample
                .sub(x0.mul_scalar(alpha_prod_t.sqrt()))
                .mul_scalar(recip_sqrt_beta_prod_t)
        };

        // 3. compute predicted original sample from predicted noise also called
        // "predicted x_0" of formula (12) from https://arxiv.org/abs/2010.02502
        let (pred_original_sample, pred_epsilon) = match self.options.prediction_type {
            PredictionType::Epsilon => (
                sample
                    .clone()
                    .sub(model_output.clone().mul_scalar(beta_prod_t.sqrt()))
                    .div_scalar(nonzero_alpha_cumprod(alpha_prod_t).sqrt()),
                model_output,
            ),
            PredictionType::Sample => {
                let eps = eps_from_x0(model_output.clone(), sample.clone());
                (model_output, eps)
            }
            PredictionType::VPrediction => (
                sample
                    .clone()
                    .mul_scalar(alpha_prod_t.sqrt())
                    .sub(model_output.clone().mul_scalar(beta_prod_t.sqrt())),
                model_output
                    .mul_scalar(alpha_prod_t.sqrt())
                    .add(sample.clone().mul_scalar(beta_prod_t.sqrt())),
            ),
        };

        // 4. clip or threshold "predicted x_0"
        let pred_original_sample = self.x0_limit.apply(pred_original_sample);

        // 5. compute variance: "sigma_t(η)" -> see formula (16)
        // σ_t = sqrt((1 − α_t−1)/(1 − α_t)) * sqrt(1 − α_t/α_t−1)
        let variance = if beta_prod_t > 0.0 {
            beta_prod_t_prev / beta_prod_t
                * (1.0 - alpha_prod_t / nonzero_alpha_cumprod(alpha_prod_t_prev))
        } else {
            0.0
        };
        let std_dev_t = self.options.eta * variance.max(0.0).sqrt();

        let pred_epsilon = if self.options.use_clipped_model_output {
            // the pred_epsilon is always re-derived from the clipped x_0 in GLIDE
            eps_from_x0(pred_original_sample.clone(), sample)
        } else {
            pred_epsilon
        };

        // 6. compute "direction pointing to x_t" of formula (12) from
        // https://arxiv.org/abs/2010.02502 (≥ 0 for η ≤ 1; clamped against rounding and η > 1)
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t)
            .max(0.0)
            .sqrt();
        let pred_sample_direction = pred_epsilon.mul_scalar(direction_coeff);

        // 7. compute x_t without "random noise" of formula (12) from
        // https://arxiv.org/abs/2010.02502
        let prev_sample = pred_original_sample
            .clone()
            .mul_scalar(alpha_prod_t_prev.sqrt())
            .add(pred_sample_direction);

        // 8. add "random noise" σ_t z
        let prev_sample = if std_dev_t > 0.0 {
            let z = draw_noise(noise, &prev_sample);
            prev_sample.add(z.mul_scalar(std_dev_t))
        } else {
            prev_sample
        };

        StepOutput {
            prev_sample,
            pred_original_sample,
        }
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        self.step_output(model_output, timestep, sample, noise)
            .prev_sample
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device};

    use super::*;
    use crate::diffusion::{predict_noise_from_start, predict_v, q_sample};
    use crate::sampler::ddpm::{DdpmOptions, DdpmSampler};
    use crate::sampler::tests::{CountingNoise, max_diff, pattern, to_vec};
    use crate::schedule::ScheduleConfig;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(&ScheduleConfig::default()).unwrap()
    }

    #[test]
    fn eta0_with_a_perfect_oracle_recovers_x0_exactly() {
        // The oracle knows x_0 and returns the ε (or v) consistent with x_t; deterministic DDIM
        // then keeps x_t on the line √ᾱ x_0 + √(1 − ᾱ) ε and lands on x_0 after N steps. (Only
        // where t − ⌊T/N⌋ is the next listed timestep: "leading", "trailing" with N | T, and
        // "linspace" with N = T. Elsewhere diffusers' DDIM steps to a ᾱ the model is not
        // evaluated at, and a run may end on ᾱ_0 rather than 1.)
        let device = Device::flex();
        let s = schedule();
        let shape = [2, 3, 4, 4];
        let x0 = pattern(shape, 0.2, &device).cast(DType::F64);
        for (prediction, spacing, steps) in [
            (PredictionType::Epsilon, TimestepSpacing::Leading, 10),
            (PredictionType::Epsilon, TimestepSpacing::Leading, 7),
            (PredictionType::Epsilon, TimestepSpacing::Trailing, 8),
            (PredictionType::VPrediction, TimestepSpacing::Trailing, 20),
            (PredictionType::VPrediction, TimestepSpacing::Linspace, 1000),
            (PredictionType::Sample, TimestepSpacing::Trailing, 1),
        ] {
            let options = DdimOptions {
                prediction_type: prediction,
                clip_sample: false,
                timestep_spacing: spacing,
                ..Default::default()
            };
            let mut sampler = DdimSampler::new(&s, steps, options).unwrap();
            let t0 = sampler.timesteps()[0];
            let eps = pattern(shape, 1.7, &device).cast(DType::F64);
            let mut x = q_sample(&s, x0.clone(), eps, &[t0, t0]);
            let mut noise = CountingNoise::new(1.0, DType::F64);
            for t in sampler.timesteps().to_vec() {
                let eps = predict_noise_from_start(&s, x.clone(), &[t, t], x0.clone());
                let output = match prediction {
                    PredictionType::Epsilon => eps,
                    PredictionType::Sample => x0.clone(),
                    PredictionType::VPrediction => predict_v(&s, x0.clone(), &[t, t], eps),
                };
                x = sampler.step(output, t, x, &mut noise);
            }
            let err = max_diff(x, x0.clone());
            assert!(err < 1e-12, "{prediction:?} {spacing:?}: {err}");
            assert_eq!(noise.draws, 0);
        }
    }

    #[test]
    fn eta1_over_every_timestep_is_the_ddpm_posterior() {
        let device = Device::flex();
        let s = schedule();
        let ddim = DdimSampler::new(
            &s,
            1000,
            DdimOptions {
                eta: 1.0,
                clip_sample: false,
                ..Default::default()
            },
        )
        .unwrap();
        let ddpm = DdpmSampler::new(
            &s,
            1000,
            DdpmOptions {
                clip_sample: false,
                ..Default::default()
            },
        )
        .unwrap();
        let x = pattern([1, 2, 3, 3], 0.0, &device).cast(DType::F64);
        let eps = pattern([1, 2, 3, 3], 0.9, &device).cast(DType::F64);
        for t in [999, 500, 1] {
            let mut noise = CountingNoise::new(0.7, DType::F64);
            let a = ddim.step_output(eps.clone(), t, x.clone(), &mut noise);
            let b = ddpm.step_output(eps.clone(), t, x.clone(), &mut noise);
            assert!(max_diff(a.prev_sample, b.prev_sample) < 1e-12, "t = {t}");
            assert!(max_diff(a.pred_original_sample, b.pred_original_sample) < 1e-12);
            assert_eq!(noise.draws, 2);
        }
    }

    #[test]
    fn previous_timestep_is_t_minus_t_over_n() {
        let s = schedule();
        let options = DdimOptions {
            timestep_spacing: TimestepSpacing::Linspace,
            ..Default::default()
        };
        let sampler = DdimSampler::new(&s, 10, options).unwrap();
        assert_eq!(sampler.timesteps()[..3], [999, 888, 777]);
        assert_eq!(sampler.previous_timestep(999), Some(899));
        assert_eq!(sampler.previous_timestep(99), None);
    }

    #[test]
    fn noise_only_when_sigma_is_positive() {
        let device = Device::flex();
        let s = schedule();
        let shape = [1, 1, 2, 2];
        // Leading ends at t = 0, where σ = 0 with either final ᾱ; trailing ends at t = 199, where
        // σ > 0 unless the final ᾱ is 1.
        for (eta, set_alpha_to_one, spacing, draws) in [
            (0.0, true, TimestepSpacing::Trailing, 0),
            (0.5, true, TimestepSpacing::Leading, 4),
            (1.0, false, TimestepSpacing::Leading, 4),
            (1.0, true, TimestepSpacing::Trailing, 4),
            (1.0, false, TimestepSpacing::Trailing, 5),
        ] {
            let options = DdimOptions {
                eta,
                set_alpha_to_one,
                timestep_spacing: spacing,
                ..Default::default()
            };
            let mut sampler = DdimSampler::new(&s, 5, options).unwrap();
            let mut x = pattern(shape, 0.0, &device);
            let mut noise = CountingNoise::new(1.0, DType::F32);
            for t in sampler.timesteps().to_vec() {
                x = sampler.step(pattern(shape, 1.0, &device), t, x, &mut noise);
            }
            assert_eq!(
                noise.draws, draws,
                "eta {eta} {set_alpha_to_one} {spacing:?}"
            );
        }
    }

    #[test]
    fn zero_terminal_snr_epsilon_step_is_finite() {
        // ᾱ_999 = 0: x_0 from ε divides by √ᾱ, guarded by ᾱ = 2^-24 and then clipped.
        let device = Device::flex();
        let s = NoiseSchedule::new(&ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        })
        .unwrap();
        let options = DdimOptions {
            timestep_spacing: TimestepSpacing::Trailing,
            eta: 1.0,
            ..Default::default()
        };
        let sampler = DdimSampler::new(&s, 10, options).unwrap();
        assert_eq!(sampler.timesteps()[0], 999);
        let x = pattern([1, 1, 2, 2], 0.0, &device);
        let mut noise = CountingNoise::new(1.0, DType::F32);
        let out = sampler.step_output(pattern([1, 1, 2, 2], 1.0, &device), 999, x, &mut noise);
        for v in to_vec(out.prev_sample)
            .into_iter()
            .chain(to_vec(out.pred_original_sample))
        {
            assert!(v.is_finite() && v.abs() <= 3.0, "{v}");
        }
    }

    #[test]
    fn negative_eta_is_refused() {
        let s = schedule();
        let options = DdimOptions {
            eta: -0.1,
            ..Default::default()
        };
        match DdimSampler::new(&s, 10, options) {
            Err(Error::InvalidSampler(msg)) => assert!(msg.contains("-0.1"), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}
