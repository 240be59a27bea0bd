//! The forward process and the training objective (Ho et al. 2020, arXiv:2006.11239).
//!
//! - [`q_sample`]: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. (4)).
//! - Conversions between what a model may predict — the noise ε, the clean sample x_0, or the
//!   velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, arXiv:2202.00512, §4) — given
//!   x_t and t, named as in lucidrains' `denoising-diffusion-pytorch`.
//! - The training target and loss: L_simple (eq. (14)) and min-SNR-γ weighting (Hang et al. 2023,
//!   arXiv:2303.09556).
//!
//! Every function takes one timestep per batch element; the per-element coefficients are looked up
//! in the f64 schedule on the CPU and uploaded as a `[batch, 1, 1, 1]` tensor of the input's dtype.
//! All operations are differentiable, so the loss works on an autodiff device.

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::schedule::{NoiseSchedule, nonzero_alpha_cumprod};

/// What the network predicts. Serde names are diffusers' `prediction_type` strings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// `"epsilon"`: the noise ε that was added (Ho et al. 2020).
    #[default]
    Epsilon,
    /// `"sample"`: the clean sample x_0.
    Sample,
    /// `"v_prediction"`: the velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022).
    VPrediction,
}

/// `values[t]` for each batch element's timestep, as a `[batch, 1, 1, 1]` tensor on `like`'s
/// device with `like`'s dtype (lucidrains' `extract`).
///
/// # Panics
/// If `timesteps.len()` differs from the batch size of `like`, or a timestep is out of range.
pub fn extract(values: &[f64], timesteps: &[usize], like: &Tensor<4>) -> Tensor<4> {
    let batch = like.dims()[0];
    assert_eq!(
        timesteps.len(),
        batch,
        "got {} timesteps for a batch of {batch}",
        timesteps.len()
    );
    let picked: Vec<f64> = timesteps
        .iter()
        .map(|&t| {
            assert!(
                t < values.len(),
                "timestep {t} is out of range for a schedule of {} steps",
                values.len()
            );
            values[t]
        })
        .collect();
    Tensor::<4>::from_data(
        TensorData::new(picked, [batch, 1, 1, 1]),
        (&like.device(), like.dtype()),
    )
}

fn map_extract(
    schedule: &NoiseSchedule,
    timesteps: &[usize],
    like: &Tensor<4>,
    f: impl Fn(f64) -> f64,
) -> Tensor<4> {
    let values: Vec<f64> = schedule.alphas_cumprod.iter().map(|&a| f(a)).collect();
    extract(&values, timesteps, like)
}

/// Samples q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. (4)), one timestep per batch element.
///
/// # Shapes
/// `x0`, `noise`: `[batch, channels, height, width]`; `timesteps`: `batch` values in `0..T`.
///
/// # Panics
/// If the timesteps do not match the batch or lie outside the schedule.
pub fn q_sample(
    schedule: &NoiseSchedule,
    x0: Tensor<4>,
    noise: Tensor<4>,
    timesteps: &[usize],
) -> Tensor<4> {
    let sqrt_ab = extract(&schedule.sqrt_alphas_cumprod, timesteps, &x0);
    let sqrt_one_minus = extract(&schedule.sqrt_one_minus_alphas_cumprod, timesteps, &x0);
    x0.mul(sqrt_ab).add(noise.mul(sqrt_one_minus))
}

/// x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t. Where ᾱ_t = 0 (zero terminal SNR) x_0 is undetermined; ᾱ_t
/// is then replaced by [`crate::schedule::TERMINAL_ALPHA_CUMPROD`] so the result stays finite.
pub fn predict_start_from_noise(
    schedule: &NoiseSchedule,
    x_t: Tensor<4>,
    timesteps: &[usize],
    noise: Tensor<4>,
) -> Tensor<4> {
    let recip = map_extract(schedule, timesteps, &x_t, |a| {
        1.0 / nonzero_alpha_cumprod(a).sqrt()
    });
    let recip_m1 = map_extract(schedule, timesteps, &x_t, |a| {
        (1.0 / nonzero_alpha_cumprod(a) - 1.0).sqrt()
    });
    x_t.mul(recip).sub(noise.mul(recip_m1))
}

/// ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t). (1 − ᾱ_t ≥ β_0 > 0 for every valid schedule.)
pub fn predict_noise_from_start(
    schedule: &NoiseSchedule,
    x_t: Tensor<4>,
    timesteps: &[usize],
    x0: Tensor<4>,
) -> Tensor<4> {
    let sqrt_ab = extract(&schedule.sqrt_alphas_cumprod, timesteps, &x_t);
    let recip = map_extract(schedule, timesteps, &x_t, |a| {
        let s = (1.0 - a).sqrt();
        if s > 0.0 { 1.0 / s } else { 0.0 }
    });
    x_t.sub(x0.mul(sqrt_ab)).mul(recip)
}

/// v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, the v-prediction target (diffusers' `get_velocity`).
pub fn predict_v(
    schedule: &NoiseSchedule,
    x0: Tensor<4>,
    timesteps: &[usize],
    noise: Tensor<4>,
) -> Tensor<4> {
    let sqrt_ab = extract(&schedule.sqrt_alphas_cumprod, timesteps, &x0);
    let sqrt_one_minus = extract(&schedule.sqrt_one_minus_alphas_cumprod, timesteps, &x0);
    noise.mul(sqrt_ab).sub(x0.mul(sqrt_one_minus))
}

/// x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v.
pub fn predict_start_from_v(
    schedule: &NoiseSchedule,
    x_t: Tensor<4>,
    timesteps: &[usize],
    v: Tensor<4>,
) -> Tensor<4> {
    let sqrt_ab = extract(&schedule.sqrt_alphas_cumprod, timesteps, &x_t);
    let sqrt_one_minus = extract(&schedule.sqrt_one_minus_alphas_cumprod, timesteps, &x_t);
    x_t.mul(sqrt_ab).sub(v.mul(sqrt_one_minus))
}

/// ε = √ᾱ_t v + √(1 − ᾱ_t) x_t.
pub fn predict_noise_from_v(
    schedule: &NoiseSchedule,
    x_t: Tensor<4>,
    timesteps: &[usize],
    v: Tensor<4>,
) -> Tensor<4> {
    let sqrt_ab = extract(&schedule.sqrt_alphas_cumprod, timesteps, &x_t);
    let sqrt_one_minus = extract(&schedule.sqrt_one_minus_alphas_cumprod, timesteps, &x_t);
    v.mul(sqrt_ab).add(x_t.mul(sqrt_one_minus))
}

/// The model's estimate of x_0, whatever it predicts.
pub fn predict_start(
    prediction: PredictionType,
    schedule: &NoiseSchedule,
    x_t: Tensor<4>,
    timesteps: &[usize],
    model_output: Tensor<4>,
) -> Tensor<4> {
    match prediction {
        PredictionType::Epsilon => predict_start_from_noise(schedule, x_t, timesteps, model_output),
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => predict_start_from_v(schedule, x_t, timesteps, model_output),
    }
}

/// The model's estimate of ε, whatever it predicts.
pub fn predict_noise(
    prediction: PredictionType,
    schedule: &NoiseSchedule,
    x_t: Tensor<4>,
    timesteps: &[usize],
    model_output: Tensor<4>,
) -> Tensor<4> {
    match prediction {
        PredictionType::Epsilon => model_output,
        PredictionType::Sample => predict_noise_from_start(schedule, x_t, timesteps, model_output),
        PredictionType::VPrediction => predict_noise_from_v(schedule, x_t, timesteps, model_output),
    }
}

/// What the network is trained to output for x_t = q_sample(x_0, ε, t): ε, x_0 or v.
/// (x_t itself is not needed: every target is a function of x_0, ε and t.)
pub fn training_target(
    prediction: PredictionType,
    schedule: &NoiseSchedule,
    x0: Tensor<4>,
    noise: Tensor<4>,
    timesteps: &[usize],
) -> Tensor<4> {
    match prediction {
        PredictionType::Epsilon => noise,
        PredictionType::Sample => x0,
        PredictionType::VPrediction => predict_v(schedule, x0, timesteps, noise),
    }
}

/// L_simple (Ho et al. 2020, eq. (14)): the mean squared error over every element, as a
/// one-element tensor.
pub fn l_simple(model_output: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    model_output.sub(target).square().mean()
}

/// The min-SNR-γ weight of one timestep (Hang et al. 2023, arXiv:2303.09556, §3.4): with
/// SNR = ᾱ_t / (1 − ᾱ_t), min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for
/// v-prediction and min(SNR, γ) for x_0-prediction. At SNR = 0 (zero terminal SNR) the
/// ε-weight is its limit, 1.
pub fn min_snr_weight(prediction: PredictionType, snr: f64, gamma: f64) -> f64 {
    let clipped = snr.min(gamma);
    match prediction {
        // min(SNR, γ)/SNR = 1 when SNR ≤ γ, which also covers SNR = 0 without dividing.
        PredictionType::Epsilon => {
            if snr <= gamma {
                1.0
            } else {
                gamma / snr
            }
        }
        PredictionType::VPrediction => clipped / (snr + 1.0),
        PredictionType::Sample => clipped,
    }
}

/// L_simple with each batch element's squared error weighted by [`min_snr_weight`], then
/// averaged: mean_b(w_b · mean_{c,h,w}((output − target)²)). γ = 5 is the paper's choice.
///
/// # Panics
/// If `gamma` is not a positive finite number, or the timesteps do not match the batch.
pub fn min_snr_loss(
    prediction: PredictionType,
    schedule: &NoiseSchedule,
    model_output: Tensor<4>,
    target: Tensor<4>,
    timesteps: &[usize],
    gamma: f64,
) -> Tensor<1> {
    assert!(
        gamma.is_finite() && gamma > 0.0,
        "min-SNR gamma must be a positive number, got {gamma}"
    );
    let weights: Vec<f64> = (0..schedule.num_train_timesteps())
        .map(|t| min_snr_weight(prediction, schedule.snr(t), gamma))
        .collect();
    let weights = extract(&weights, timesteps, &model_output);
    let [batch, channels, height, width] = model_output.dims();
    let per_sample = model_output
        .sub(target)
        .square()
        .reshape([batch, channels * height * width])
        .mean_dim(1); // [batch, 1]
    per_sample.mul(weights.reshape([batch, 1])).mean()
}

/// How the per-timestep losses are weighted in training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossWeighting {
    /// Plain L_simple: every element counts the same.
    #[default]
    Uniform,
    /// Min-SNR-γ weighting (Hang et al. 2023); γ = 5 in the paper.
    MinSnr {
        /// The SNR cap γ.
        gamma: f64,
    },
}

impl LossWeighting {
    /// The training loss of a batch under this weighting ([`l_simple`] or [`min_snr_loss`]).
    pub fn loss(
        &self,
        prediction: PredictionType,
        schedule: &NoiseSchedule,
        model_output: Tensor<4>,
        target: Tensor<4>,
        timesteps: &[usize],
    ) -> Tensor<1> {
        match *self {
            Self::Uniform => l_simple(model_output, target),
            Self::MinSnr { gamma } => {
                min_snr_loss(prediction, schedule, model_output, target, timesteps, gamma)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device};

    use super::*;
    use crate::schedule::ScheduleConfig;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(&ScheduleConfig::default()).unwrap()
    }

    fn tensor(values: &[f32], shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
    }

    /// Deterministic test data: a smooth pattern in [-1.5, 1.5].
    fn pattern(shape: [usize; 4], phase: f32, device: &Device) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|i| 1.5 * ((i as f32) * 0.37 + phase).sin())
            .collect();
        tensor(&values, shape, device)
    }

    fn to_vec(x: Tensor<4>) -> Vec<f64> {
        x.into_data().try_into_vec_as::<f64>().unwrap()
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f64 {
        to_vec(a)
            .iter()
            .zip(to_vec(b))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn q_sample_with_zero_noise_scales_x0_per_batch_element() {
        let device = Device::flex();
        let s = schedule();
        let x0 = pattern([2, 3, 4, 4], 0.0, &device);
        let zeros = Tensor::zeros([2, 3, 4, 4], &device);
        let xt = q_sample(&s, x0.clone(), zeros, &[0, 999]);
        let x0v = to_vec(x0);
        let xtv = to_vec(xt);
        for (i, (a, b)) in x0v.iter().zip(&xtv).enumerate() {
            let t = if i < 48 { 0 } else { 999 };
            let expected = a * s.sqrt_alphas_cumprod[t];
            assert!((b - expected).abs() < 1e-6, "{i}: {b} vs {expected}");
        }
    }

    #[test]
    fn q_sample_with_zero_signal_scales_noise() {
        let device = Device::flex();
        let s = schedule();
        let noise = pattern([1, 1, 2, 2], 1.0, &device);
        let xt = q_sample(
            &s,
            Tensor::zeros([1, 1, 2, 2], &device),
            noise.clone(),
            &[500],
        );
        let expected = noise.mul_scalar(s.sqrt_one_minus_alphas_cumprod[500]);
        assert!(max_diff(xt, expected) < 1e-7);
    }

    #[test]
    fn conversions_round_trip() {
        let device = Device::flex();
        let s = schedule();
        let shape = [3, 2, 3, 3];
        let ts = [1, 400, 998];
        let x0 = pattern(shape, 0.3, &device);
        let eps = pattern(shape, 2.0, &device);
        let xt = q_sample(&s, x0.clone(), eps.clone(), &ts);
        let v = predict_v(&s, x0.clone(), &ts, eps.clone());

        let x0_from_eps = predict_start_from_noise(&s, xt.clone(), &ts, eps.clone());
        // 1/√ᾱ_998 ≈ 155 amplifies f32 rounding of x_t.
        assert!(max_diff(x0_from_eps, x0.clone()) < 5e-4);
        let eps_from_x0 = predict_noise_from_start(&s, xt.clone(), &ts, x0.clone());
        assert!(max_diff(eps_from_x0, eps.clone()) < 1e-3);
        let x0_from_v = predict_start_from_v(&s, xt.clone(), &ts, v.clone());
        assert!(max_diff(x0_from_v, x0.clone()) < 1e-5);
        let eps_from_v = predict_noise_from_v(&s, xt.clone(), &ts, v.clone());
        assert!(max_diff(eps_from_v, eps.clone()) < 1e-5);

        for (prediction, output) in [
            (PredictionType::Epsilon, eps.clone()),
            (PredictionType::Sample, x0.clone()),
            (PredictionType::VPrediction, v.clone()),
        ] {
            let target = training_target(prediction, &s, x0.clone(), eps.clone(), &ts);
            assert!(max_diff(target, output.clone()) < 1e-6);
            let x0_hat = predict_start(prediction, &s, xt.clone(), &ts, output.clone());
            assert!(max_diff(x0_hat, x0.clone()) < 5e-4, "{prediction:?}");
            let eps_hat = predict_noise(prediction, &s, xt.clone(), &ts, output);
            assert!(max_diff(eps_hat, eps.clone()) < 1e-3, "{prediction:?}");
        }
    }

    #[test]
    fn conversions_in_f64_are_exact_to_rounding() {
        let device = Device::flex();
        let s = schedule();
        let shape = [2, 1, 2, 2];
        let ts = [0, 999];
        let x0 = pattern(shape, 0.1, &device).cast(DType::F64);
        let eps = pattern(shape, 0.7, &device).cast(DType::F64);
        let xt = q_sample(&s, x0.clone(), eps.clone(), &ts);
        assert_eq!(xt.dtype(), DType::F64);
        let x0_hat = predict_start_from_noise(&s, xt, &ts, eps);
        assert!(max_diff(x0_hat, x0) < 1e-12);
    }

    #[test]
    fn terminal_zero_snr_stays_finite() {
        let device = Device::flex();
        let s = NoiseSchedule::new(&ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        })
        .unwrap();
        let x = pattern([1, 1, 2, 2], 0.0, &device);
        let x0 = predict_start_from_noise(&s, x.clone(), &[999], x.clone());
        assert!(to_vec(x0).iter().all(|v| v.is_finite()));
        // At ᾱ = 0, x_t is pure noise: ε = x_t exactly and x_0 = −v.
        let eps = predict_noise_from_start(&s, x.clone(), &[999], x.clone());
        assert!(max_diff(eps, x.clone()) < 1e-7);
        let x0 = predict_start_from_v(&s, x.clone(), &[999], x.clone());
        assert!(max_diff(x0, x.neg()) < 1e-7);
        assert_eq!(
            min_snr_weight(PredictionType::Epsilon, s.snr(999), 5.0),
            1.0
        );
    }

    #[test]
    fn l_simple_is_the_mean_squared_error() {
        let device = Device::flex();
        let a = tensor(&[1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2], &device);
        let b = tensor(&[1.0, 0.0, 3.0, 1.0], [1, 1, 2, 2], &device);
        let loss: f32 = l_simple(a, b).into_scalar();
        assert_eq!(loss, (4.0 + 9.0) / 4.0);
    }

    #[test]
    fn min_snr_weights_follow_hang_et_al() {
        // SNR 20 > γ = 5: ε → 5/20, v → 5/21, x0 → 5. SNR 2 < γ: ε → 1, v → 2/3, x0 → 2.
        assert_eq!(min_snr_weight(PredictionType::Epsilon, 20.0, 5.0), 0.25);
        assert_eq!(
            min_snr_weight(PredictionType::VPrediction, 20.0, 5.0),
            5.0 / 21.0
        );
        assert_eq!(min_snr_weight(PredictionType::Sample, 20.0, 5.0), 5.0);
        assert_eq!(min_snr_weight(PredictionType::Epsilon, 2.0, 5.0), 1.0);
        assert_eq!(
            min_snr_weight(PredictionType::VPrediction, 2.0, 5.0),
            2.0 / 3.0
        );
        assert_eq!(min_snr_weight(PredictionType::Sample, 2.0, 5.0), 2.0);
    }

    #[test]
    fn min_snr_loss_weights_each_sample() {
        let device = Device::flex();
        let s = schedule();
        // Sample 0 has error 1 everywhere, sample 1 error 2 everywhere.
        let out = tensor(&[1.0, 1.0, 2.0, 2.0], [2, 1, 1, 2], &device);
        let target = Tensor::zeros([2, 1, 1, 2], &device);
        let ts = [10, 900];
        let loss: f32 =
            min_snr_loss(PredictionType::Epsilon, &s, out, target, &ts, 5.0).into_scalar();
        let w0 = min_snr_weight(PredictionType::Epsilon, s.snr(10), 5.0);
        let w1 = min_snr_weight(PredictionType::Epsilon, s.snr(900), 5.0);
        assert!(s.snr(10) > 5.0 && s.snr(900) < 5.0);
        let expected = (w0 * 1.0 + w1 * 4.0) / 2.0;
        assert!(
            (loss as f64 - expected).abs() < 1e-6,
            "{loss} vs {expected}"
        );
    }

    #[test]
    fn loss_is_differentiable() {
        let device = Device::flex().autodiff();
        let s = schedule();
        let shape = [2, 1, 2, 2];
        let x0 = pattern(shape, 0.0, &device);
        let eps = pattern(shape, 1.0, &device);
        let ts = [5, 700];
        let out = Tensor::<4>::zeros(shape, &device).require_grad();
        let target = training_target(PredictionType::VPrediction, &s, x0, eps, &ts);
        for weighting in [LossWeighting::Uniform, LossWeighting::MinSnr { gamma: 5.0 }] {
            let loss = weighting.loss(
                PredictionType::VPrediction,
                &s,
                out.clone(),
                target.clone(),
                &ts,
            );
            let grads = loss.backward();
            let grad = out.grad(&grads).expect("gradient of the model output");
            let g = grad.into_data().try_into_vec_as::<f64>().unwrap();
            let t = target.clone().into_data().try_into_vec_as::<f64>().unwrap();
            // d/d out of mean_b(w_b mean((out − target)²)) at out = 0 is −2 w_b target / n.
            for (i, (gi, ti)) in g.iter().zip(&t).enumerate() {
                let w = match weighting {
                    LossWeighting::Uniform => 1.0,
                    LossWeighting::MinSnr { gamma } => {
                        min_snr_weight(PredictionType::VPrediction, s.snr(ts[i / 4]), gamma)
                    }
                };
                let expected = -2.0 * w * ti / 8.0;
                assert!(
                    (gi - expected).abs() < 1e-6,
                    "{weighting:?} {i}: {gi} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn serde_names_are_diffusers() {
        assert_eq!(
            serde_json::to_string(&PredictionType::VPrediction).unwrap(),
            "\"v_prediction\""
        );
        let p: PredictionType = serde_json::from_str("\"epsilon\"").unwrap();
        assert_eq!(p, PredictionType::Epsilon);
        let w: LossWeighting = serde_json::from_str(r#"{"min_snr":{"gamma":5.0}}"#).unwrap();
        assert_eq!(w, LossWeighting::MinSnr { gamma: 5.0 });
    }
}
