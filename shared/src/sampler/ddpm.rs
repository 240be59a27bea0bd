//! Ancestral DDPM sampling (Ho et al. 2020, arXiv:2006.11239, Algorithm 2), over a subsequence
//! of the training timesteps, step for step as diffusers' `DDPMScheduler.step` (diffusers 0.42,
//! `schedulers/scheduling_ddpm.py`).
//!
//! With inference timesteps τ_1 > … > τ_N and τ_{N+1} = −1 (ᾱ_{−1} = 1), a step from t = τ_i to
//! t' = τ_{i+1} uses the "skip" coefficients ᾱ_t / ᾱ_{t'} in place of α_t, so N = T recovers
//! Algorithm 2 exactly.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    Sampler, StepOutput, TimestepSpacing, X0Limit, check_steps, draw_noise, spaced_timesteps,
};
use crate::diffusion::PredictionType;
use crate::error::Result;
use crate::noise::NoiseSource;
use crate::schedule::{NoiseSchedule, nonzero_alpha_cumprod};

/// The variance σ_t² of the reverse step (Ho et al. 2020, §3.2). Serde names are diffusers'
/// `variance_type` strings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// `"fixed_small"`: σ² = β̃_t = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β_t, the posterior variance
    /// (optimal for deterministic x_0), floored at 1e-20 as diffusers does.
    #[default]
    FixedSmall,
    /// `"fixed_large"`: σ² = β_t (optimal for x_0 ~ N(0, I)).
    FixedLarge,
}

/// Options of [`DdpmSampler`]: diffusers' `DDPMScheduler` config keys and defaults, so the
/// sampler part of a diffusers `scheduler_config.json` deserializes into it (unknown keys are
/// ignored; unsupported values such as `"learned_range"` are an error).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmOptions {
    /// What the model predicts. Default epsilon.
    pub prediction_type: PredictionType,
    /// Reverse-step variance. Default fixed_small.
    pub variance_type: VarianceType,
    /// Clip the predicted x_0 to ±`clip_sample_range`. Default true.
    pub clip_sample: bool,
    /// Bound for `clip_sample`. Default 1.
    pub clip_sample_range: f64,
    /// Dynamic thresholding of x_0 (takes precedence over `clip_sample`). Default false.
    pub thresholding: bool,
    /// Quantile of |x_0| for dynamic thresholding. Default 0.995.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold. Default 1.
    pub sample_max_value: f64,
    /// Timestep spacing. Default leading.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps. Default 0.
    pub steps_offset: usize,
}

impl Default for DdpmOptions {
    fn default() -> Self {
        Self {
            prediction_type: PredictionType::Epsilon,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

/// DDPM ancestral sampler. Stateless between steps: one instance serves any number of runs.
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
    options: DdpmOptions,
    x0_limit: X0Limit,
}

impl DdpmSampler {
    /// A sampler taking `num_inference_steps` steps over `schedule`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidSampler`] for 0 steps, more steps than training timesteps,
    /// timesteps pushed past the schedule by `steps_offset`, or clip / threshold values out of
    /// range.
    pub fn new(
        schedule: &NoiseSchedule,
        num_inference_steps: usize,
        options: DdpmOptions,
    ) -> Result<Self> {
        let t_total = schedule.num_train_timesteps();
        check_steps(num_inference_steps, t_total)?;
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
        Ok(Self {
            alphas_cumprod: schedule.alphas_cumprod.clone(),
            timesteps,
            options,
            x0_limit,
        })
    }

    /// The options the sampler was built with.
    pub fn options(&self) -> &DdpmOptions {
        &self.options
    }

    /// The timestep after `timestep` in [`Sampler::timesteps`], or `None` after the last one
    /// (diffusers' `previous_timestep`, where −1 stands for "none"). A timestep that is not in the
    /// list steps to the next smaller listed one.
    pub fn previous_timestep(&self, timestep: usize) -> Option<usize> {
        match self.timesteps.iter().position(|&t| t == timestep) {
            Some(i) => self.timesteps.get(i + 1).copied(),
            None => self.timesteps.iter().copied().find(|&t| t < timestep),
        }
    }

    /// One reverse step, returning x_{t'} and the clipped x_0 estimate. Noise is drawn from
    /// `noise` only when a step follows (not at the last step, where σ would be ~0).
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
        let t = timestep;
        let prev_t = self.previous_timestep(t);

        // 1. compute alphas, betas
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = prev_t.map_or(1.0, |p| self.alphas_cumprod[p]);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        // ᾱ_{t'} ≥ ᾱ_t > 0 except at the very end of a zero-terminal-SNR schedule, never t'.
        let current_alpha_t = alpha_prod_t / nonzero_alpha_cumprod(alpha_prod_t_prev);
        let current_beta_t = 1.0 - current_alpha_t;

        // 2. compute predicted original sample from predicted noise also called
        // "predicted x_0" of formula (15) from https://arxiv.org/abs/2006.11239
        let pred_original_sample = match self.options.prediction_type {
            PredictionType::Epsilon => sample
                .clone()
                .sub(model_output.mul_scalar(beta_prod_t.sqrt()))
                .div_scalar(nonzero_alpha_cumprod(alpha_prod_t).sqrt()),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample
                .clone()
                .mul_scalar(alpha_prod_t.sqrt())
                .sub(model_output.mul_scalar(beta_prod_t.sqrt())),
        };

        // 3. clip or threshold "predicted x_0"
        let pred_original_sample = self.x0_limit.apply(pred_original_sample);

        // 4. compute coefficients for pred_original_sample x_0 and current sample x_t
        // see formula (7) from https://arxiv.org/abs/2006.11239
        // (1 − ᾱ_t = 0 would need β_0 to underflow; x_t = x_0 there, so step onto x_0.)
        let (pred_original_sample_coeff, current_sample_coeff) = if beta_prod_t > 0.0 {
            (
                alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t,
                current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t,
            )
        } else {
            (1.0, 0.0)
        };

        // 5. compute predicted previous sample µ_t
        // see formula (7) from https://arxiv.org/abs/2006.11239
        let pred_prev_sample = pred_original_sample
            .clone()
            .mul_scalar(pred_original_sample_coeff)
            .add(sample.mul_scalar(current_sample_coeff));

        // 6. add noise: x_{t'} = µ_t + σ_t z, z ~ N(0, I), except at the last step (Algorithm 2:
        // "z = 0 if t = 1"). diffusers tests t > 0 instead, which also adds σ z after the last
        // of "trailing" timesteps; for fixed_small that σ is 1e-10, for fixed_large it is √β_t.
        let prev_sample = if prev_t.is_some() {
            let variance = match self.options.variance_type {
                // For t > 0, compute predicted variance βt (see formula (6) and (7) from
                // https://arxiv.org/abs/2006.11239); clamped as it is often logged.
                VarianceType::FixedSmall => {
                    let v = if beta_prod_t > 0.0 {
                        beta_prod_t_prev / beta_prod_t * current_beta_t
                    } else {
                        0.0
                    };
                    v.max(1e-20)
                }
                VarianceType::FixedLarge => current_beta_t,
            };
            let z = draw_noise(noise, &pred_prev_sample);
            pred_prev_sample.add(z.mul_scalar(variance.sqrt()))
        } else {
            pred_prev_sample
        };

        StepOutput {
            prev_sample,
            pred_original_sample,
        }
    }
}

impl Sampler for DdpmSampler {
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
    use crate::Error;
    use crate::diffusion::q_sample;
    use crate::sampler::tests::{CountingNoise, max_diff, pattern, to_vec};
    use crate::schedule::ScheduleConfig;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(&ScheduleConfig::default()).unwrap()
    }

    #[test]
    fn timesteps_and_previous_timestep() {
        let s = schedule();
        let sampler = DdpmSampler::new(&s, 10, DdpmOptions::default()).unwrap();
        assert_eq!(
            sampler.timesteps(),
            &[900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
        assert_eq!(sampler.previous_timestep(900), Some(800));
        assert_eq!(sampler.previous_timestep(0), None);
        assert_eq!(sampler.previous_timestep(850), Some(800));
        let full = DdpmSampler::new(&s, 1000, DdpmOptions::default()).unwrap();
        assert_eq!(full.timesteps().len(), 1000);
        assert_eq!(full.previous_timestep(999), Some(998));
    }

    #[test]
    fn one_full_step_matches_algorithm_2_by_hand() {
        // N = T: the step is exactly Ho et al.'s Algorithm 2, line 4.
        let device = Device::flex();
        let s = schedule();
        let options = DdpmOptions {
            clip_sample: false,
            ..Default::default()
        };
        let sampler = DdpmSampler::new(&s, 1000, options).unwrap();
        let t = 500;
        let x = pattern([1, 2, 3, 3], 0.0, &device).cast(DType::F64);
        let eps = pattern([1, 2, 3, 3], 1.0, &device).cast(DType::F64);
        let mut noise = CountingNoise::new(0.5, DType::F64);
        let out = sampler.step_output(eps.clone(), t, x.clone(), &mut noise);
        // x_{t−1} = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε) + σ_t z with σ² = β̃_t and z = 0.5.
        let (a, b, ab) = (s.alphas[t], s.betas[t], s.alphas_cumprod[t]);
        let expected = x
            .clone()
            .sub(eps.clone().mul_scalar(b / (1.0 - ab).sqrt()))
            .div_scalar(a.sqrt())
            .add_scalar(0.5 * s.posterior_variance[t].sqrt());
        assert!(max_diff(out.prev_sample, expected) < 1e-12);
        // x_0 of eq. (15).
        let x0 = x
            .sub(eps.mul_scalar((1.0 - ab).sqrt()))
            .div_scalar(ab.sqrt());
        assert!(max_diff(out.pred_original_sample, x0) < 1e-12);
        assert_eq!(noise.draws, 1);
    }

    #[test]
    fn fixed_large_uses_beta() {
        let device = Device::flex();
        let s = schedule();
        let make = |variance_type| DdpmOptions {
            variance_type,
            clip_sample: false,
            ..Default::default()
        };
        let small = DdpmSampler::new(&s, 1000, make(VarianceType::FixedSmall)).unwrap();
        let large = DdpmSampler::new(&s, 1000, make(VarianceType::FixedLarge)).unwrap();
        let x = pattern([1, 1, 2, 2], 0.0, &device).cast(DType::F64);
        let eps = pattern([1, 1, 2, 2], 2.0, &device).cast(DType::F64);
        let t = 10;
        let run = |sampler: &DdpmSampler| {
            let mut noise = CountingNoise::new(1.0, DType::F64);
            sampler
                .step_output(eps.clone(), t, x.clone(), &mut noise)
                .prev_sample
        };
        // The means agree; the noise scales are √β̃_t and √β_t.
        let diff = to_vec(run(&large).sub(run(&small)));
        let expected = s.betas[t].sqrt() - s.posterior_variance[t].sqrt();
        assert!(
            diff.iter().all(|d| (d - expected).abs() < 1e-12),
            "{diff:?} vs {expected}"
        );
    }

    #[test]
    fn last_step_draws_no_noise_and_returns_the_posterior_mean() {
        let device = Device::flex();
        let s = schedule();
        for spacing in [TimestepSpacing::Leading, TimestepSpacing::Trailing] {
            let options = DdpmOptions {
                timestep_spacing: spacing,
                variance_type: VarianceType::FixedLarge,
                ..Default::default()
            };
            let mut sampler = DdpmSampler::new(&s, 4, options).unwrap();
            let shape = [1, 1, 2, 2];
            let mut x = pattern(shape, 0.0, &device);
            let mut noise = CountingNoise::new(1.0, DType::F32);
            let steps = sampler.timesteps().to_vec();
            for &t in &steps {
                let eps = pattern(shape, t as f32, &device);
                x = sampler.step(eps, t, x, &mut noise);
            }
            assert_eq!(noise.draws, 3, "{spacing:?}");
            // The final x_0 was clipped to [−1, 1] and the last step lands on it exactly.
            assert!(to_vec(x).iter().all(|v| v.abs() <= 1.0 + 1e-6));
        }
    }

    #[test]
    fn clip_and_threshold_bound_x0() {
        let device = Device::flex();
        let s = schedule();
        let x = pattern([2, 1, 4, 4], 0.0, &device).mul_scalar(3.0);
        let eps = Tensor::zeros([2, 1, 4, 4], &device);
        let clip = DdpmSampler::new(&s, 10, DdpmOptions::default()).unwrap();
        let out = clip.step_output(
            eps.clone(),
            900,
            x.clone(),
            &mut CountingNoise::new(0.0, DType::F32),
        );
        let x0 = to_vec(out.pred_original_sample);
        assert!(x0.iter().all(|v| v.abs() <= 1.0));
        assert!(x0.iter().any(|v| v.abs() == 1.0));
        let threshold = DdpmSampler::new(
            &s,
            10,
            DdpmOptions {
                thresholding: true,
                sample_max_value: 100.0,
                dynamic_thresholding_ratio: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        // Ratio 1: s = max |x_0| per sample, so each sample is divided by its own max.
        let out = threshold.step_output(
            eps,
            900,
            x.clone(),
            &mut CountingNoise::new(0.0, DType::F32),
        );
        let x0 = to_vec(out.pred_original_sample);
        for b in 0..2 {
            let m = x0[b * 16..(b + 1) * 16]
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()));
            assert!((m - 1.0).abs() < 1e-6, "sample {b}: max {m}");
        }
    }

    #[test]
    fn perfect_x0_oracle_denoises_to_x0() {
        // A model that predicts x_0 exactly ("sample" prediction): with fixed_small variance the
        // last step returns x_0 exactly, whatever noise was drawn before.
        let device = Device::flex();
        let s = schedule();
        let options = DdpmOptions {
            prediction_type: PredictionType::Sample,
            ..Default::default()
        };
        let mut sampler = DdpmSampler::new(&s, 20, options).unwrap();
        let shape = [1, 3, 2, 2];
        let x0 = pattern(shape, 0.4, &device).mul_scalar(0.6);
        let mut x = q_sample(
            &s,
            x0.clone(),
            pattern(shape, 3.0, &device),
            &[sampler.timesteps()[0]],
        );
        let mut noise = CountingNoise::new(0.3, DType::F32);
        for t in sampler.timesteps().to_vec() {
            x = sampler.step(x0.clone(), t, x, &mut noise);
        }
        assert!(max_diff(x, x0) < 1e-6);
        assert_eq!(noise.draws, 19);
    }

    #[test]
    fn zero_terminal_snr_steps_are_finite() {
        let device = Device::flex();
        let s = NoiseSchedule::new(&ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        })
        .unwrap();
        for prediction_type in [PredictionType::Epsilon, PredictionType::VPrediction] {
            let options = DdpmOptions {
                prediction_type,
                timestep_spacing: TimestepSpacing::Trailing,
                ..Default::default()
            };
            let mut sampler = DdpmSampler::new(&s, 5, options).unwrap();
            let shape = [1, 1, 2, 2];
            let mut x = pattern(shape, 0.0, &device);
            let mut noise = CountingNoise::new(0.5, DType::F32);
            for t in sampler.timesteps().to_vec() {
                x = sampler.step(pattern(shape, 1.0, &device), t, x, &mut noise);
            }
            assert!(
                to_vec(x).iter().all(|v| v.is_finite()),
                "{prediction_type:?}"
            );
        }
    }

    #[test]
    fn invalid_settings_are_refused() {
        let s = schedule();
        for (steps, options, needle) in [
            (0, DdpmOptions::default(), "got 0"),
            (1001, DdpmOptions::default(), "1..=1000"),
            (
                10,
                DdpmOptions {
                    steps_offset: 200,
                    ..Default::default()
                },
                "timestep 1100",
            ),
            (
                10,
                DdpmOptions {
                    clip_sample_range: 0.0,
                    ..Default::default()
                },
                "clip_sample_range",
            ),
        ] {
            match DdpmSampler::new(&s, steps, options) {
                Err(Error::InvalidSampler(msg)) => assert!(msg.contains(needle), "{msg}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn options_read_a_diffusers_config() {
        let json = r#"{"_class_name": "DDPMScheduler", "variance_type": "fixed_large",
            "clip_sample": false, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing", "num_train_timesteps": 1000}"#;
        let options: DdpmOptions = serde_json::from_str(json).unwrap();
        assert_eq!(
            options,
            DdpmOptions {
                variance_type: VarianceType::FixedLarge,
                clip_sample: false,
                prediction_type: PredictionType::VPrediction,
                timestep_spacing: TimestepSpacing::Trailing,
                ..Default::default()
            }
        );
        assert!(
            serde_json::from_str::<DdpmOptions>(r#"{"variance_type": "learned_range"}"#).is_err()
        );
    }
}
