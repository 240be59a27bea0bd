//! Reverse-process samplers: DDPM (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021) and
//! DPM-Solver++ 2M (Lu et al. 2022).

use burn::tensor::Tensor;

use crate::noise::NoiseSource;

/// One reverse-process integrator. The model is evaluated at each of [`Sampler::timesteps`] in
/// order; its output goes to [`Sampler::step`], which returns the next, less noisy sample.
pub trait Sampler {
    /// Training-time timesteps at which the model is evaluated, from noisiest to cleanest.
    fn timesteps(&self) -> &[usize];

    /// One step: from the model output at `timestep` for `sample` (x_t), return x_{t_prev}.
    /// Stochastic samplers draw their fresh noise from `noise`.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Tensor<4>;
}

pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use ddim::{DdimOptions, DdimSampler};
pub use ddpm::{DdpmOptions, DdpmSampler, VarianceType};
pub use dpm_solver::{
    AlgorithmType, DpmSolverOptions, DpmSolverSampler, FinalSigmasType, SolverType,
};

use crate::diffusion::PredictionType;
use crate::error::{Error, Result};
use crate::model_file::ModelInfo;
use crate::schedule::NoiseSchedule;

/// Both outputs of one sampler step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// x_{t_prev}: the input of the next step (or the final sample).
    pub prev_sample: Tensor<4>,
    /// The step's estimate of x_0 (after clipping / thresholding): a preview of the result.
    pub pred_original_sample: Tensor<4>,
}

/// Where the inference timesteps fall among the training timesteps: the three strategies of
/// Lin et al. 2023 (arXiv:2305.08891), Table 2, as diffusers' `timestep_spacing` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `"leading"`: (N−1)k, …, k, 0 with k = ⌊T/N⌋, plus `steps_offset` (starts below T−1).
    Leading,
    /// `"trailing"`: T−1, T−1−T/N, … (starts at the last training timestep).
    Trailing,
    /// `"linspace"`: N values evenly spaced over [0, T−1], rounded.
    Linspace,
}

impl TimestepSpacing {
    /// Every spacing, in the order of the docs.
    pub const ALL: [Self; 3] = [Self::Leading, Self::Trailing, Self::Linspace];

    /// diffusers' `timestep_spacing` string (also the serde name).
    pub fn name(self) -> &'static str {
        match self {
            Self::Leading => "leading",
            Self::Trailing => "trailing",
            Self::Linspace => "linspace",
        }
    }
}

/// The value of `all` called `s` (the `FromStr` of the named enums here).
fn by_name<T: Copy, const N: usize>(
    all: [T; N],
    name: fn(T) -> &'static str,
    s: &str,
) -> Option<T> {
    all.into_iter().find(|&k| name(k) == s)
}

impl fmt::Display for TimestepSpacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TimestepSpacing {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        by_name(Self::ALL, Self::name, s).ok_or_else(|| {
            Error::InvalidSampler(format!(
                "unknown timestep spacing {s:?} (expected leading, trailing or linspace)"
            ))
        })
    }
}

/// Checks `num_inference_steps` against the schedule.
pub(crate) fn check_steps(num_inference_steps: usize, num_train_timesteps: usize) -> Result<()> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(Error::InvalidSampler(format!(
            "num_inference_steps must be in 1..={num_train_timesteps} (the schedule's \
             num_train_timesteps), got {num_inference_steps}"
        )));
    }
    Ok(())
}

/// Checks that every timestep lies in the schedule (`steps_offset` can push them out).
pub(crate) fn check_timesteps_in_range(
    timesteps: &[usize],
    num_train_timesteps: usize,
    steps_offset: usize,
) -> Result<()> {
    match timesteps.iter().find(|&&t| t >= num_train_timesteps) {
        Some(t) => Err(Error::InvalidSampler(format!(
            "timestep {t} (steps_offset {steps_offset}) is outside the schedule's \
             {num_train_timesteps} training timesteps"
        ))),
        None => Ok(()),
    }
}

/// numpy's rounding (half to even), as diffusers applies it to its float timesteps.
pub(crate) fn round_half_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// The values numpy's `arange(start, 0, -step)` produces, first `n` of them: `start`,
/// `start − step`, then `start + i · ((start − step) − start)` (numpy's fill rule). Taking exactly
/// `n` values avoids numpy's occasional extra element (arange's length is a rounded ceil).
pub(crate) fn numpy_arange_down(start: f64, step: f64, n: usize) -> Vec<f64> {
    let second = start - step;
    let delta = second - start;
    (0..n)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The inference timesteps of diffusers' `DDPMScheduler.set_timesteps` and
/// `DDIMScheduler.set_timesteps` (diffusers 0.42), noisiest first.
///
/// For "trailing", diffusers' `np.arange(T, 0, -T/N)` yields N + 1 values ending in −1 for some
/// N (e.g. 61 of 1000); we keep the first N, which agree with diffusers'.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check_steps(num_inference_steps, num_train_timesteps)?;
    let (t_total, n) = (num_train_timesteps, num_inference_steps);
    let timesteps: Vec<usize> = match spacing {
        TimestepSpacing::Linspace => crate::schedule::linspace(0.0, (t_total - 1) as f64, n)
            .into_iter()
            .rev()
            .map(round_half_even)
            .collect(),
        TimestepSpacing::Leading => {
            let step_ratio = t_total / n;
            (0..n)
                .rev()
                .map(|i| i * step_ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            numpy_arange_down(t_total as f64, t_total as f64 / n as f64, n)
                .into_iter()
                // round(·) ≥ round(T/N) ≥ 1, so the subtraction cannot underflow.
                .map(|t| round_half_even(t) - 1)
                .collect()
        }
    };
    check_timesteps_in_range(&timesteps, t_total, steps_offset)?;
    Ok(timesteps)
}

/// What happens to the predicted x_0 before it is used: nothing, clipping to ±range, or Imagen's
/// dynamic thresholding (diffusers: `thresholding` wins over `clip_sample`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum X0Limit {
    None,
    Clip(f64),
    Threshold { ratio: f64, max_value: f64 },
}

impl X0Limit {
    pub(crate) fn new(
        clip_sample: bool,
        clip_sample_range: f64,
        thresholding: bool,
        dynamic_thresholding_ratio: f64,
        sample_max_value: f64,
    ) -> Result<Self> {
        if thresholding {
            let ratio = dynamic_thresholding_ratio;
            if !(0.0..=1.0).contains(&ratio) {
                return Err(Error::InvalidSampler(format!(
                    "dynamic_thresholding_ratio must be in [0, 1], got {ratio}"
                )));
            }
            // NaN fails the comparison.
            if !(sample_max_value >= 1.0 && sample_max_value.is_finite()) {
                return Err(Error::InvalidSampler(format!(
                    "sample_max_value must be a finite number >= 1, got {sample_max_value}"
                )));
            }
            Ok(Self::Threshold {
                ratio,
                max_value: sample_max_value,
            })
        } else if clip_sample {
            if !(clip_sample_range > 0.0 && clip_sample_range.is_finite()) {
                return Err(Error::InvalidSampler(format!(
                    "clip_sample_range must be a positive finite number, got {clip_sample_range}"
                )));
            }
            Ok(Self::Clip(clip_sample_range))
        } else {
            Ok(Self::None)
        }
    }

    pub(crate) fn apply(self, x0: Tensor<4>) -> Tensor<4> {
        match self {
            Self::None => x0,
            Self::Clip(range) => x0.clamp(-range, range),
            Self::Threshold { ratio, max_value } => dynamic_threshold(x0, ratio, max_value),
        }
    }
}

/// Imagen's dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487, §2.3), per batch
/// element: s = clamp(quantile(|x_0|, `ratio`), 1, `max_value`), then x_0 ← clamp(x_0, −s, s) / s.
///
/// The quantile interpolates linearly between order statistics as `torch.quantile` does. It is
/// computed on the device from a `topk` of the largest |x_0| (no full sort, no read-back).
///
/// # Shapes
/// `x0`: `[batch, channels, height, width]`, returned unchanged in shape.
pub fn dynamic_threshold(x0: Tensor<4>, ratio: f64, max_value: f64) -> Tensor<4> {
    let [batch, channels, height, width] = x0.dims();
    let n = channels * height * width;
    let flat = x0.reshape([batch, n]); // [batch, n]
    // Position of the quantile in ascending order, and its two neighbours.
    let position = ratio.clamp(0.0, 1.0) * (n - 1) as f64;
    let below = (position.floor() as usize).min(n - 1);
    let above = (position.ceil() as usize).min(n - 1);
    let weight = position - below as f64;
    // The k = n − below largest values, descending: ascending index i sits at k − 1 − (i − below).
    let k = n - below;
    let top = flat.clone().abs().topk(k, 1); // [batch, k]
    let v_below = top.clone().narrow(1, k - 1, 1); // [batch, 1]
    let v_above = top.narrow(1, k - 1 - (above - below), 1); // [batch, 1]
    // torch.lerp's two-sided formula.
    let s = if weight < 0.5 {
        v_below.clone().add(v_above.sub(v_below).mul_scalar(weight))
    } else {
        v_above
            .clone()
            .sub(v_above.sub(v_below).mul_scalar(1.0 - weight))
    };
    let s = s.clamp(1.0, max_value); // [batch, 1]
    // clamp(x, −s, s) / s = clamp(x / s, −1, 1) since s ≥ 1 > 0, bit for bit.
    flat.div(s)
        .clamp(-1.0, 1.0)
        .reshape([batch, channels, height, width])
}

/// Draws one N(0, 1) tensor shaped like `like`, in its dtype.
pub(crate) fn draw_noise(noise: &mut dyn NoiseSource, like: &Tensor<4>) -> Tensor<4> {
    let z = noise.gaussian(like.dims(), &like.device());
    z.cast(like.dtype())
}

/// The samplers [`build_sampler`] can make. Serde / CLI names: "ddpm", "ddim", "dpm-solver++".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SamplerKind {
    /// Ancestral sampling of Ho et al. 2020 (Algorithm 2), [`DdpmSampler`].
    #[serde(rename = "ddpm")]
    Ddpm,
    /// Song et al. 2021 (arXiv:2010.02502), deterministic at η = 0, [`DdimSampler`].
    #[default]
    #[serde(rename = "ddim")]
    Ddim,
    /// Lu et al. 2022 (arXiv:2211.01095), second-order multistep, [`DpmSolverSampler`].
    #[serde(rename = "dpm-solver++")]
    DpmSolverPlusPlus,
}

impl SamplerKind {
    /// Every kind, in the order of the docs.
    pub const ALL: [Self; 3] = [Self::Ddpm, Self::Ddim, Self::DpmSolverPlusPlus];

    /// The serde / CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::DpmSolverPlusPlus => "dpm-solver++",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        by_name(Self::ALL, Self::name, s).ok_or_else(|| {
            Error::InvalidSampler(format!(
                "unknown sampler {s:?} (expected one of \"ddpm\", \"ddim\", \"dpm-solver++\")"
            ))
        })
    }
}

/// The knobs [`build_sampler`] passes on; each sampler ignores the ones it does not have.
/// `Default` is diffusers' defaults. For every option of one sampler, build it directly from its
/// own options struct ([`DdpmOptions`], [`DdimOptions`], [`DpmSolverOptions`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplerOptions {
    /// DDIM's η: 0 = deterministic DDIM, 1 = DDPM-like noise. Default 0. (DDIM only.)
    pub eta: f64,
    /// Clip the predicted x_0 to ±`clip_sample_range`. Default true. (DDPM, DDIM.)
    pub clip_sample: bool,
    /// Bound for `clip_sample`. Default 1.
    pub clip_sample_range: f64,
    /// Imagen's dynamic thresholding of x_0 instead of clipping. Default false. (All samplers.)
    pub thresholding: bool,
    /// Quantile of |x_0| for dynamic thresholding. Default 0.995.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the dynamic threshold. Default 1.
    pub sample_max_value: f64,
    /// Timestep spacing; `None` takes each sampler's diffusers default (leading for DDPM and
    /// DDIM, linspace for DPM-Solver++). Default none.
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to "leading" timesteps. Default 0.
    pub steps_offset: usize,
    /// DDPM's variance. Default fixed_small. (DDPM only.)
    pub variance_type: VarianceType,
    /// Re-derive ε̂ from the clipped x̂_0 before the step, as GLIDE does. Default false, as in
    /// diffusers. (DDIM only.) See [`SamplerOptions::guided`].
    pub use_clipped_model_output: bool,
}

impl SamplerOptions {
    /// These options for a run of the model `info`: where no timestep spacing was chosen, the
    /// model's own ([`ModelInfo::timestep_spacing`], as diffusers reads `timestep_spacing` from
    /// a pipeline's scheduler config).
    pub fn for_model(self, info: &ModelInfo) -> Self {
        Self {
            timestep_spacing: self.timestep_spacing.or(info.timestep_spacing),
            ..self
        }
    }

    /// These options for a run with classifier-free guidance scale `guidance`: when guided
    /// (w ≠ 1) and clipping, DDIM re-derives ε̂ from the clipped x̂_0 (GLIDE's choice for its
    /// guided sampling). Guidance extrapolates the model's output, so x̂_0 leaves [-1, 1] early in
    /// the run; with ε̂ left unclipped the deterministic DDIM update then carries the overshoot
    /// from step to step. Measured on the bundled v-prediction model (`ddpm eval`, DDIM 50
    /// steps, guidance 2): backgrounds turned white and the requested class fell to 45 % without
    /// this (README, "The bundled model").
    pub fn guided(self, guidance: f64) -> Self {
        Self {
            use_clipped_model_output: guidance != 1.0 && self.clip_sample,
            ..self
        }
    }
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            eta: 0.0,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: None,
            steps_offset: 0,
            variance_type: VarianceType::FixedSmall,
            use_clipped_model_output: false,
        }
    }
}

/// Builds a sampler of the given kind for a model that predicts `prediction_type`, taking
/// `num_inference_steps` steps over `schedule`.
///
/// # Errors
/// [`Error::InvalidSampler`] for 0 steps, more steps than training timesteps, or options out of
/// range.
pub fn build_sampler(
    kind: SamplerKind,
    schedule: &NoiseSchedule,
    prediction_type: PredictionType,
    num_inference_steps: usize,
    options: &SamplerOptions,
) -> Result<Box<dyn Sampler + Send>> {
    let o = options;
    Ok(match kind {
        SamplerKind::Ddpm => Box::new(DdpmSampler::new(
            schedule,
            num_inference_steps,
            DdpmOptions {
                prediction_type,
                variance_type: o.variance_type,
                clip_sample: o.clip_sample,
                clip_sample_range: o.clip_sample_range,
                thresholding: o.thresholding,
                dynamic_thresholding_ratio: o.dynamic_thresholding_ratio,
                sample_max_value: o.sample_max_value,
                timestep_spacing: o.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
                steps_offset: o.steps_offset,
            },
        )?),
        SamplerKind::Ddim => Box::new(DdimSampler::new(
            schedule,
            num_inference_steps,
            DdimOptions {
                prediction_type,
                eta: o.eta,
                clip_sample: o.clip_sample,
                clip_sample_range: o.clip_sample_range,
                thresholding: o.thresholding,
                dynamic_thresholding_ratio: o.dynamic_thresholding_ratio,
                sample_max_value: o.sample_max_value,
                timestep_spacing: o.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
                steps_offset: o.steps_offset,
                use_clipped_model_output: o.use_clipped_model_output,
                ..DdimOptions::default()
            },
        )?),
        SamplerKind::DpmSolverPlusPlus => Box::new(DpmSolverSampler::new(
            schedule,
            num_inference_steps,
            DpmSolverOptions {
                prediction_type,
                thresholding: o.thresholding,
                dynamic_thresholding_ratio: o.dynamic_thresholding_ratio,
                sample_max_value: o.sample_max_value,
                timestep_spacing: o.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
                steps_offset: o.steps_offset,
                ..DpmSolverOptions::default()
            },
        )?),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use burn::tensor::{DType, Device, TensorData};

    use super::*;
    use crate::schedule::ScheduleConfig;

    /// A noise source returning a constant tensor of the given dtype, counting its draws.
    pub(crate) struct CountingNoise {
        value: f64,
        dtype: DType,
        pub(crate) draws: usize,
    }

    impl CountingNoise {
        pub(crate) fn new(value: f64, dtype: DType) -> Self {
            Self {
                value,
                dtype,
                draws: 0,
            }
        }
    }

    impl NoiseSource for CountingNoise {
        fn gaussian(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
            self.draws += 1;
            Tensor::full(shape, self.value, (device, self.dtype))
        }
    }

    /// Deterministic test data: a smooth pattern in [-1.5, 1.5].
    pub(crate) fn pattern(shape: [usize; 4], phase: f32, device: &Device) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| 1.5 * ((i as f32) * 0.37 + phase).sin())
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    pub(crate) fn to_vec(x: Tensor<4>) -> Vec<f64> {
        x.into_data().try_into_vec_as::<f64>().unwrap()
    }

    pub(crate) fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f64 {
        to_vec(a)
            .iter()
            .zip(to_vec(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn spaced_timesteps_match_diffusers_examples() {
        use TimestepSpacing::*;
        let ts = |spacing, t, n, offset| spaced_timesteps(spacing, t, n, offset).unwrap();
        assert_eq!(ts(Leading, 1000, 4, 0), [750, 500, 250, 0]);
        assert_eq!(ts(Leading, 1000, 4, 1), [751, 501, 251, 1]);
        assert_eq!(ts(Leading, 1000, 3, 0), [666, 333, 0]);
        assert_eq!(ts(Trailing, 1000, 3, 0), [999, 666, 332]);
        assert_eq!(ts(Linspace, 1000, 3, 0), [999, 500, 0]);
        assert_eq!(ts(Linspace, 1000, 1, 0), [0]);
        assert_eq!(ts(Trailing, 1000, 1, 0), [999]);
        // N = 61 is one of the counts where numpy's arange yields an extra −1.
        let t61 = ts(Trailing, 1000, 61, 0);
        assert_eq!(t61.len(), 61);
        assert_eq!((t61[0], t61[60]), (999, 15));
        assert_eq!(ts(Trailing, 10, 10, 0), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(
            dpm_solver::dpm_solver_timesteps(Linspace, 1000, 4, 0).unwrap(),
            [999, 749, 500, 250]
        );
        assert_eq!(
            dpm_solver::dpm_solver_timesteps(Leading, 1000, 4, 1).unwrap(),
            [801, 601, 401, 201]
        );
    }

    #[test]
    fn dynamic_threshold_matches_torch_quantile() {
        let device = Device::flex();
        // Sample 0: |x| = 0..15 / 4, quantile 0.9 at position 13.5 → s = 13.5 / 4 = 3.375, capped
        // at 2.5. Sample 1: values in [−1.5, 1.5] → s = quantile = 1.35, under the cap.
        let a: Vec<f32> = (0..16)
            .map(|i| (if i % 2 == 0 { i as f32 } else { -(i as f32) }) / 4.0)
            .collect();
        let b: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 5.0).collect();
        let x = Tensor::<4>::from_data(
            TensorData::new([a.clone(), b.clone()].concat(), [2, 1, 4, 4]),
            &device,
        );
        let y = to_vec(dynamic_threshold(x, 0.9, 2.5));
        for (i, v) in a.iter().enumerate() {
            let expected = (*v as f64).clamp(-2.5, 2.5) / 2.5;
            assert!((y[i] - expected).abs() < 1e-6, "a[{i}]");
        }
        // |b| sorted: 0.1 0.1 0.3 0.3 … 1.5 1.5; positions 13 and 14 hold 1.3 and 1.5.
        let s = 1.3 + 0.5 * (1.5 - 1.3);
        for (i, v) in b.iter().enumerate() {
            let expected = (*v as f64).clamp(-s, s) / s;
            assert!(
                (y[16 + i] - expected).abs() < 1e-6,
                "b[{i}]: {} vs {expected}",
                y[16 + i]
            );
        }
        // Small values: s is clamped up to 1 and nothing changes.
        let small =
            Tensor::<4>::from_data(TensorData::new(vec![0.5f32, -0.25], [1, 1, 1, 2]), &device);
        assert_eq!(
            to_vec(dynamic_threshold(small, 0.995, 1.0)),
            vec![0.5, -0.25]
        );
    }

    #[test]
    fn sampler_kind_names() {
        for kind in SamplerKind::ALL {
            assert_eq!(kind.name().parse::<SamplerKind>().unwrap(), kind);
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.name())
            );
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(
            serde_json::from_str::<SamplerKind>("\"dpm-solver++\"").unwrap(),
            SamplerKind::DpmSolverPlusPlus
        );
        assert!(matches!(
            "euler".parse::<SamplerKind>(),
            Err(Error::InvalidSampler(_))
        ));
    }

    #[test]
    fn build_sampler_passes_prediction_and_options_on() {
        let device = Device::flex();
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let shape = [1, 1, 2, 2];
        let x = pattern(shape, 0.0, &device).cast(DType::F64);
        let out = pattern(shape, 1.0, &device).cast(DType::F64);
        let options = SamplerOptions {
            eta: 0.5,
            clip_sample: false,
            ..Default::default()
        };
        let v = PredictionType::VPrediction;
        let mut built = build_sampler(SamplerKind::Ddim, &s, v, 10, &options).unwrap();
        let direct = DdimSampler::new(
            &s,
            10,
            DdimOptions {
                prediction_type: v,
                eta: 0.5,
                clip_sample: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(built.timesteps(), direct.timesteps());
        let a = built.step(
            out.clone(),
            900,
            x.clone(),
            &mut CountingNoise::new(1.0, DType::F64),
        );
        let b = direct.step_output(
            out.clone(),
            900,
            x.clone(),
            &mut CountingNoise::new(1.0, DType::F64),
        );
        assert_eq!(to_vec(a), to_vec(b.prev_sample));

        let dpm = build_sampler(SamplerKind::DpmSolverPlusPlus, &s, v, 10, &options).unwrap();
        assert_eq!(dpm.timesteps()[0], 999);
        let ddpm = build_sampler(SamplerKind::Ddpm, &s, v, 10, &options).unwrap();
        assert_eq!(ddpm.timesteps()[0], 900);
        for kind in SamplerKind::ALL {
            assert!(matches!(
                build_sampler(kind, &s, v, 0, &options),
                Err(Error::InvalidSampler(_))
            ));
            assert!(matches!(
                build_sampler(kind, &s, v, 1001, &options),
                Err(Error::InvalidSampler(_))
            ));
        }
    }

    /// A guided run's DDIM re-derives ε̂ from the clipped x̂_0: the step equals DDIM with
    /// `use_clipped_model_output` (golden-tested against diffusers), and differs from the plain
    /// step where x̂_0 is clipped. Unguided runs and runs without clipping keep diffusers' step.
    #[test]
    fn guided_options_re_derive_eps_from_the_clipped_x0() {
        let plain = SamplerOptions::default();
        assert!(!plain.clone().guided(1.0).use_clipped_model_output);
        assert!(plain.clone().guided(2.0).use_clipped_model_output);
        assert!(plain.clone().guided(0.0).use_clipped_model_output);
        let unclipped = SamplerOptions {
            clip_sample: false,
            ..SamplerOptions::default()
        };
        assert!(!unclipped.guided(2.0).use_clipped_model_output);

        let device = Device::flex();
        let s = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let shape = [1, 1, 2, 2];
        let x = pattern(shape, 0.0, &device).cast(DType::F64);
        // A large ε̂ at t = 500 puts x̂_0 far outside [-1, 1].
        let out = pattern(shape, 1.0, &device)
            .cast(DType::F64)
            .mul_scalar(3.0);
        let e = PredictionType::Epsilon;
        let step = |options: &SamplerOptions| {
            let mut sampler = build_sampler(SamplerKind::Ddim, &s, e, 10, options).unwrap();
            let t = sampler.timesteps()[5];
            to_vec(sampler.step(
                out.clone(),
                t,
                x.clone(),
                &mut CountingNoise::new(0.0, DType::F64),
            ))
        };
        let direct = DdimSampler::new(
            &s,
            10,
            DdimOptions {
                use_clipped_model_output: true,
                ..Default::default()
            },
        )
        .unwrap();
        let t = direct.timesteps()[5];
        let want = direct.step_output(
            out.clone(),
            t,
            x.clone(),
            &mut CountingNoise::new(0.0, DType::F64),
        );
        assert_eq!(step(&plain.clone().guided(2.0)), to_vec(want.prev_sample));
        let (guided, unguided) = (step(&plain.clone().guided(2.0)), step(&plain.guided(1.0)));
        let gap = guided
            .iter()
            .zip(&unguided)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap > 1e-3, "the guided step equals the plain one ({gap})");
    }
}
