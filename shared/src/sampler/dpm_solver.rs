//! DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2): a second-order multistep
//! solver of the diffusion ODE in its data-prediction form, step for step as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_type="midpoint"`
//! (diffusers 0.42, `schedulers/scheduling_dpmsolver_multistep.py`).
//!
//! In diffusers' parametrisation, σ = √((1 − ᾱ)/ᾱ), α_t = 1/√(σ² + 1) (= √ᾱ), σ_t = σ α_t
//! (= √(1 − ᾱ)) and λ = log α_t − log σ_t. With h = λ_t − λ_s and the data prediction D = x̂_0:
//!
//! - first order (DDIM): x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D_s;
//! - second order: additionally − ½ α_t (e^{−h} − 1) (D_s − D_{s−1}) / r, r = h_{s−1}/h.
//!
//! The first step has no history and is first order; the last step is first order when the final
//! σ is 0 (`final_sigmas_type = zero`) or, with `lower_order_final`, for fewer than 15 steps. A
//! final σ of 0 means λ = +∞: the update is exactly x̂_0, which we return without taking log 0.
//! The solver never draws noise.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    Sampler, StepOutput, TimestepSpacing, X0Limit, check_steps, check_timesteps_in_range,
    numpy_arange_down, round_half_even,
};
use crate::diffusion::PredictionType;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::schedule::{NoiseSchedule, linspace, nonzero_alpha_cumprod};

/// diffusers' `algorithm_type`; only `"dpmsolver++"` is implemented (others fail to deserialize).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlgorithmType {
    /// `"dpmsolver++"`: the data-prediction solver of Lu et al. 2022.
    #[default]
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
}

/// diffusers' `solver_type`; only `"midpoint"` is implemented (others fail to deserialize).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SolverType {
    /// `"midpoint"`: the second-order correction ½ (e^{−h} − 1) D1 of Algorithm 2.
    #[default]
    #[serde(rename = "midpoint")]
    Midpoint,
}

/// The σ after the last step (diffusers' `final_sigmas_type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// `"zero"`: end on σ = 0, i.e. exactly on the last x̂_0.
    #[default]
    Zero,
    /// `"sigma_min"`: end on the σ of training timestep 0.
    SigmaMin,
}

/// Options of [`DpmSolverSampler`]: diffusers' `DPMSolverMultistepScheduler` config keys and
/// defaults (the supported subset).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpmSolverOptions {
    /// What the model predicts. Default epsilon.
    pub prediction_type: PredictionType,
    /// 1 (DDIM-equivalent) or 2 (2M). Default 2.
    pub solver_order: usize,
    /// Only dpmsolver++. Default dpmsolver++.
    pub algorithm_type: AlgorithmType,
    /// Only midpoint. Default midpoint.
    pub solver_type: SolverType,
    /// Dynamic thresholding of x̂_0. Default false.
    pub thresholding: bool,
    /// Quantile of |x̂_0| for dynamic thresholding. Default 0.995.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold. Default 1.
    pub sample_max_value: f64,
    /// First-order last step for fewer than 15 steps. Default true.
    pub lower_order_final: bool,
    /// The σ after the last step. Default zero.
    pub final_sigmas_type: FinalSigmasType,
    /// Timestep spacing. Default linspace.
    pub timestep_spacing: TimestepSpacing,
    /// Added to "leading" timesteps. Default 0.
    pub steps_offset: usize,
}

impl Default for DpmSolverOptions {
    fn default() -> Self {
        Self {
            prediction_type: PredictionType::Epsilon,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            lower_order_final: true,
            final_sigmas_type: FinalSigmasType::Zero,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
        }
    }
}

/// The inference timesteps of diffusers' `DPMSolverMultistepScheduler.set_timesteps` (with
/// `lambda_min_clipped = -inf`), noisiest first: "linspace" and "leading" place N + 1 points
/// and drop the one at 0.
pub fn dpm_solver_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check_steps(num_inference_steps, num_train_timesteps)?;
    let (t_total, n) = (num_train_timesteps, num_inference_steps);
    let timesteps: Vec<usize> = match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (t_total - 1) as f64, n + 1)
            .into_iter()
            .skip(1)
            .rev()
            .map(round_half_even)
            .collect(),
        TimestepSpacing::Leading => {
            let step_ratio = t_total / (n + 1);
            if step_ratio == 0 {
                return Err(Error::InvalidSampler(format!(
                    "DPM-Solver++ with leading spacing needs num_inference_steps < \
                     num_train_timesteps ({t_total}), got {n}"
                )));
            }
            (1..=n)
                .rev()
                .map(|i| i * step_ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            numpy_arange_down(t_total as f64, t_total as f64 / n as f64, n)
                .into_iter()
                .map(|t| round_half_even(t) - 1)
                .collect()
        }
    };
    check_timesteps_in_range(&timesteps, t_total, steps_offset)?;
    Ok(timesteps)
}

/// (α_t, σ_t) from diffusers' σ: α_t = 1/√(σ² + 1), σ_t = σ α_t.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α_t − log σ_t (σ_t > 0).
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// DPM-Solver++(2M) sampler. It keeps the previous x̂_0 between steps: run the timesteps in
/// order. Calling [`Sampler::step`] with a timestep other than the expected next one (e.g. the
/// first timestep again) starts a new run there; [`DpmSolverSampler::reset`] does so explicitly.
#[derive(Debug, Clone)]
pub struct DpmSolverSampler {
    timesteps: Vec<usize>,
    /// diffusers' σ at each inference timestep, then the final σ: N + 1 values.
    sigmas: Vec<f64>,
    options: DpmSolverOptions,
    x0_limit: X0Limit,
    /// Index of the next step in `timesteps`; `None` before a run.
    step_index: Option<usize>,
    /// How many steps of history the solver has (capped at its order).
    lower_order_nums: usize,
    /// x̂_0 of the previous step.
    prev_x0: Option<Tensor<4>>,
}

impl DpmSolverSampler {
    /// A sampler taking `num_inference_steps` steps over `schedule`. With
    /// `rescale_betas_zero_snr`, ᾱ_{T−1} = 0 is replaced by 2^-24 (as diffusers does) so that
    /// the first σ is finite.
    ///
    /// # Errors
    /// [`Error::InvalidSampler`] for 0 steps, more steps than training timesteps, a solver order
    /// other than 1 or 2, or threshold values out of range.
    pub fn new(
        schedule: &NoiseSchedule,
        num_inference_steps: usize,
        options: DpmSolverOptions,
    ) -> Result<Self> {
        let t_total = schedule.num_train_timesteps();
        if !(1..=2).contains(&options.solver_order) {
            return Err(Error::InvalidSampler(format!(
                "DPM-Solver++ solver_order must be 1 or 2, got {}",
                options.solver_order
            )));
        }
        let timesteps = dpm_solver_timesteps(
            options.timestep_spacing,
            t_total,
            num_inference_steps,
            options.steps_offset,
        )?;
        let x0_limit = X0Limit::new(
            false,
            1.0,
            options.thresholding,
            options.dynamic_thresholding_ratio,
            options.sample_max_value,
        )?;
        let sigma_of = |t: usize| {
            let a = nonzero_alpha_cumprod(schedule.alphas_cumprod[t]);
            ((1.0 - a) / a).sqrt()
        };
        let final_sigma = match options.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => sigma_of(0),
        };
        let sigmas = timesteps
            .iter()
            .map(|&t| sigma_of(t))
            .chain(std::iter::once(final_sigma))
            .collect();
        Ok(Self {
            timesteps,
            sigmas,
            options,
            x0_limit,
            step_index: None,
            lower_order_nums: 0,
            prev_x0: None,
        })
    }

    /// The options the sampler was built with.
    pub fn options(&self) -> &DpmSolverOptions {
        &self.options
    }

    /// diffusers' σ = √((1 − ᾱ)/ᾱ) at each inference timestep, then the final σ.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Forgets the solver history: the next step starts a new run.
    pub fn reset(&mut self) {
        self.step_index = None;
        self.lower_order_nums = 0;
        self.prev_x0 = None;
    }

    /// The index of `timestep` for the first step of a run: diffusers' `index_for_timestep`
    /// (the second match if it appears twice, the last index if it is absent).
    fn index_for_timestep(&self, timestep: usize) -> usize {
        let matches: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] == timestep)
            .collect();
        match matches.as_slice() {
            [] => self.timesteps.len() - 1,
            [only] => *only,
            [_, second, ..] => *second,
        }
    }

    /// One solver step, returning x_{t'} and the (thresholded) x̂_0 it used.
    pub fn step_output(
        &mut self,
        model_output: Tensor<4>,
        timestep: usize,
        sample: Tensor<4>,
    ) -> StepOutput {
        let n = self.timesteps.len();
        let i = match self.step_index {
            Some(i) if i < n && self.timesteps[i] == timestep => i,
            _ => {
                self.reset();
                self.index_for_timestep(timestep)
            }
        };

        // 1. σ, α_t, σ_t at the current (s0) and next (t) step
        let sigma_s0 = self.sigmas[i];
        let sigma_next = self.sigmas[i + 1];
        let (alpha_s0, sigma_t_s0) = alpha_sigma(sigma_s0);

        // 2. convert the model output to the data prediction x̂_0 (convert_model_output)
        let x0_pred = match self.options.prediction_type {
            PredictionType::Epsilon => sample
                .clone()
                .sub(model_output.mul_scalar(sigma_t_s0))
                .div_scalar(alpha_s0),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample
                .clone()
                .mul_scalar(alpha_s0)
                .sub(model_output.mul_scalar(sigma_t_s0)),
        };
        let x0_pred = self.x0_limit.apply(x0_pred);

        // 3. the order of this step: first order without history, and at the end when the
        // final σ is zero or (lower_order_final) for short runs
        let lower_order_final = i == n - 1
            && ((self.options.lower_order_final && n < 15)
                || self.options.final_sigmas_type == FinalSigmasType::Zero);
        let first_order =
            self.options.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final;

        // 4. the update
        let prev_sample = if sigma_next == 0.0 {
            // σ_t = 0: λ_t = +∞, e^{−h} = 0, σ_t/σ_s = 0 and α_t = 1, so x_t = x̂_0 exactly.
            x0_pred.clone()
        } else {
            let (alpha_t, sigma_t) = alpha_sigma(sigma_next);
            let lambda_s0 = lambda(alpha_s0, sigma_t_s0);
            let h = lambda(alpha_t, sigma_t) - lambda_s0;
            let phi = alpha_t * ((-h).exp() - 1.0);
            // First order (DPM-Solver++ 1, = DDIM): x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D0.
            let x_t = sample
                .mul_scalar(sigma_t / sigma_t_s0)
                .sub(x0_pred.clone().mul_scalar(phi));
            match (&self.prev_x0, first_order) {
                (Some(prev_x0), false) => {
                    // Second order, midpoint: − ½ α_t (e^{−h} − 1) D1 with
                    // D1 = (D0 − D_{−1}) / r0, r0 = h_0 / h (Algorithm 2, line 5).
                    let (alpha_s1, sigma_t_s1) = alpha_sigma(self.sigmas[i - 1]);
                    let h_0 = lambda_s0 - lambda(alpha_s1, sigma_t_s1);
                    if h != 0.0 && h_0 != 0.0 {
                        let r0 = h_0 / h;
                        let d1 = x0_pred.clone().sub(prev_x0.clone()).mul_scalar(1.0 / r0);
                        x_t.sub(d1.mul_scalar(0.5 * phi))
                    } else {
                        // Repeated timesteps (h or h_0 = 0): no slope to extrapolate.
                        x_t
                    }
                }
                _ => x_t,
            }
        };

        // 5. keep the history
        self.prev_x0 = Some(x0_pred.clone());
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.options.solver_order);
        self.step_index = Some(i + 1);

        StepOutput {
            prev_sample,
            pred_original_sample: x0_pred,
        }
    }
}

impl Sampler for DpmSolverSampler {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Never draws from `noise`.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: usize,
        sample: Tensor<4>,
        _noise: &mut dyn NoiseSource,
    ) -> Tensor<4> {
        self.step_output(model_output, timestep, sample).prev_sample
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device};

    use super::*;
    use crate::diffusion::{predict_noise_from_start, q_sample};
    use crate::sampler::tests::{CountingNoise, max_diff, pattern, to_vec};
    use crate::schedule::ScheduleConfig;

    fn schedule(config: ScheduleConfig) -> NoiseSchedule {
        NoiseSchedule::new(&config).unwrap()
    }

    #[test]
    fn default_timesteps_and_sigmas() {
        let s = schedule(ScheduleConfig::default());
        let sampler = DpmSolverSampler::new(&s, 10, DpmSolverOptions::default()).unwrap();
        assert_eq!(
            sampler.timesteps(),
            &[999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
        );
        let sigmas = sampler.sigmas();
        assert_eq!(sigmas.len(), 11);
        assert_eq!(sigmas[10], 0.0);
        let a = s.alphas_cumprod[500];
        assert_eq!(sigmas[5], ((1.0 - a) / a).sqrt());
    }

    #[test]
    fn perfect_oracle_lands_on_x0_without_noise_or_nan() {
        // With the exact ε the ODE's solution is x_0 for any step sizes; the final σ = 0 step
        // returns x̂_0 itself.
        let device = Device::flex();
        for config in [
            ScheduleConfig::default(),
            ScheduleConfig {
                rescale_betas_zero_snr: true,
                ..Default::default()
            },
        ] {
            let s = schedule(config);
            let mut sampler = DpmSolverSampler::new(&s, 8, DpmSolverOptions::default()).unwrap();
            let shape = [2, 1, 3, 3];
            let x0 = pattern(shape, 0.5, &device).cast(DType::F64);
            let t0 = sampler.timesteps()[0];
            let mut x = q_sample(
                &s,
                x0.clone(),
                pattern(shape, 2.2, &device).cast(DType::F64),
                &[t0, t0],
            );
            let mut noise = CountingNoise::new(1.0, DType::F64);
            for t in sampler.timesteps().to_vec() {
                let eps = predict_noise_from_start(&s, x.clone(), &[t, t], x0.clone());
                x = sampler.step(eps, t, x, &mut noise);
            }
            assert!(to_vec(x.clone()).iter().all(|v| v.is_finite()));
            assert!(max_diff(x, x0) < 1e-9);
            assert_eq!(noise.draws, 0);
        }
    }

    #[test]
    fn second_order_step_by_hand() {
        // Two steps of order 2 with sigma_min final: step 0 is first order, step 1 second order.
        let device = Device::flex();
        let s = schedule(ScheduleConfig::default());
        let options = DpmSolverOptions {
            final_sigmas_type: FinalSigmasType::SigmaMin,
            lower_order_final: false,
            prediction_type: PredictionType::Sample,
            ..Default::default()
        };
        let mut sampler = DpmSolverSampler::new(&s, 2, options).unwrap();
        assert_eq!(sampler.timesteps(), &[999, 500]);
        let shape = [1, 1, 1, 2];
        let x = pattern(shape, 0.0, &device).cast(DType::F64);
        let d0 = pattern(shape, 1.0, &device).cast(DType::F64);
        let d1 = pattern(shape, 2.0, &device).cast(DType::F64);
        let x1 = sampler.step_output(d0.clone(), 999, x.clone()).prev_sample;
        let x2 = sampler.step_output(d1.clone(), 500, x1.clone()).prev_sample;

        let ab = |t: usize| s.alphas_cumprod[t];
        let lam = |a: f64| 0.5 * (a / (1.0 - a)).ln();
        let (l0, l1, l2) = (lam(ab(999)), lam(ab(500)), lam(ab(0)));
        let (h1, h2) = (l1 - l0, l2 - l1);
        let sq = |a: f64| (a.sqrt(), (1.0 - a).sqrt());
        let ((_, s0), (a1, s1), (a2, s2)) = (sq(ab(999)), sq(ab(500)), sq(ab(0)));
        let expected1 = x
            .mul_scalar(s1 / s0)
            .add(d0.clone().mul_scalar(a1 * (1.0 - (-h1).exp())));
        assert!(max_diff(x1.clone(), expected1) < 1e-12);
        let r = h1 / h2;
        let dd = d1.clone().sub(d0).div_scalar(r);
        let expected2 = x1
            .mul_scalar(s2 / s1)
            .add(d1.mul_scalar(a2 * (1.0 - (-h2).exp())))
            .add(dd.mul_scalar(0.5 * a2 * (1.0 - (-h2).exp())));
        assert!(max_diff(x2, expected2) < 1e-12);
    }

    #[test]
    fn restarting_a_run_forgets_the_history() {
        let device = Device::flex();
        let s = schedule(ScheduleConfig::default());
        let mut sampler = DpmSolverSampler::new(&s, 5, DpmSolverOptions::default()).unwrap();
        let shape = [1, 1, 2, 2];
        let run = |sampler: &mut DpmSolverSampler| {
            let mut x = pattern(shape, 0.0, &device);
            for t in sampler.timesteps().to_vec() {
                x = sampler
                    .step_output(pattern(shape, t as f32, &device), t, x)
                    .prev_sample;
            }
            to_vec(x)
        };
        let first = run(&mut sampler);
        // Abandon a run half way, then start again from the first timestep.
        let t0 = sampler.timesteps()[0];
        let t1 = sampler.timesteps()[1];
        let x = sampler.step_output(
            pattern(shape, 9.0, &device),
            t0,
            pattern(shape, 1.0, &device),
        );
        let _ = sampler.step_output(pattern(shape, 9.0, &device), t1, x.prev_sample);
        assert_eq!(run(&mut sampler), first);
    }

    #[test]
    fn invalid_settings_are_refused() {
        let s = schedule(ScheduleConfig::default());
        for (steps, options, needle) in [
            (0, DpmSolverOptions::default(), "got 0"),
            (
                10,
                DpmSolverOptions {
                    solver_order: 3,
                    ..Default::default()
                },
                "solver_order must be 1 or 2, got 3",
            ),
            (
                1000,
                DpmSolverOptions {
                    timestep_spacing: TimestepSpacing::Leading,
                    ..Default::default()
                },
                "leading",
            ),
        ] {
            match DpmSolverSampler::new(&s, steps, options) {
                Err(Error::InvalidSampler(msg)) => assert!(msg.contains(needle), "{msg}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(
            serde_json::from_str::<DpmSolverOptions>(r#"{"algorithm_type": "sde-dpmsolver++"}"#)
                .is_err()
        );
        let options: DpmSolverOptions = serde_json::from_str(
            r#"{"algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                "final_sigmas_type": "sigma_min", "use_karras_sigmas": false}"#,
        )
        .unwrap();
        assert_eq!(options.final_sigmas_type, FinalSigmasType::SigmaMin);
    }
}
