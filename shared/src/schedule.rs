//! Noise schedules β_1..β_T and everything derived from them (Ho et al. 2020, arXiv:2006.11239,
//! §2 and eqs. (4), (6), (7)), computed in f64 on the CPU.
//!
//! The beta schedules are diffusers' (`DDPMScheduler.__init__`, diffusers 0.42):
//! `linear` (Ho et al.), `scaled_linear` (latent diffusion), `squaredcos_cap_v2` (the cosine
//! schedule of Nichol & Dhariwal 2021, arXiv:2102.09672, eq. (17), betas capped at 0.999) and
//! `sigmoid` (GeoDiff), optionally rescaled to zero terminal SNR (Lin et al. 2023,
//! arXiv:2305.08891, Algorithm 1). diffusers computes them in float32; we compute the same formulas
//! in f64, which is 1e-9 .. 1e-6 away from diffusers' float32 numbers (measured by the golden test
//! in `tests/tests/scheduler_golden.rs`) and ~1e-16 from a float64 recomputation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest `num_train_timesteps` accepted, so that a hostile config cannot ask for an unbounded
/// allocation (the schedule holds a dozen `Vec<f64>` of this length).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// Stand-in for ᾱ_t where it is exactly 0 (the last step of a zero-terminal-SNR schedule) and
/// has to be divided by: 2^-24, the smallest positive f16 subnormal, as diffusers'
/// `DPMSolverMultistepScheduler` does for `rescale_betas_zero_snr`.
pub const TERMINAL_ALPHA_CUMPROD: f64 = 1.0 / 16_777_216.0;

/// ᾱ_t, or [`TERMINAL_ALPHA_CUMPROD`] where ᾱ_t is 0, for use as a divisor.
pub fn nonzero_alpha_cumprod(alpha_cumprod: f64) -> f64 {
    if alpha_cumprod > 0.0 {
        alpha_cumprod
    } else {
        TERMINAL_ALPHA_CUMPROD
    }
}

/// How β_t grows over the training timesteps. Serde names are diffusers' `beta_schedule` strings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `"linear"`: β evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020).
    #[default]
    Linear,
    /// `"scaled_linear"`: √β evenly spaced from √`beta_start` to √`beta_end` (latent diffusion).
    ScaledLinear,
    /// `"squaredcos_cap_v2"`: ᾱ(t) = cos²((t/T + 0.008)/1.008 · π/2), β_t = min(1 − ᾱ(t+1)/ᾱ(t),
    /// 0.999) (Nichol & Dhariwal 2021, eq. (17)); ignores `beta_start` / `beta_end`.
    #[serde(rename = "squaredcos_cap_v2")]
    Cosine,
    /// `"sigmoid"`: β = sigmoid(x) · (`beta_end` − `beta_start`) + `beta_start`, x evenly spaced in
    /// [−6, 6] (GeoDiff).
    Sigmoid,
}

/// The schedule part of a diffusers `scheduler_config.json`: field names are diffusers' own, every
/// field has diffusers' `DDPMScheduler` default, and unknown fields are ignored, so a diffusers
/// config deserializes as is (see [`ScheduleConfig::from_json`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleConfig {
    /// Number of training timesteps T. Default 1000.
    pub num_train_timesteps: usize,
    /// First β of the `linear`, `scaled_linear` and `sigmoid` schedules. Default 1e-4.
    pub beta_start: f64,
    /// Last β of the `linear`, `scaled_linear` and `sigmoid` schedules. Default 0.02.
    pub beta_end: f64,
    /// The beta schedule. Default `linear`.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_schedule` (diffusers' `trained_betas`). Default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale the betas so that ᾱ_T = 0, i.e. zero terminal SNR (Lin et al. 2023). Default false.
    pub rescale_betas_zero_snr: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

impl ScheduleConfig {
    /// Reads the schedule fields of a diffusers `scheduler_config.json` (other fields are ignored).
    pub fn from_json(json: &str) -> Result<Self> {
        serde_json::from_str(json).map_err(|e| Error::Json {
            file: "scheduler_config.json".into(),
            message: e.to_string(),
        })
    }

    /// Checks the numbers without building the schedule.
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        if t == 0 || t > MAX_TRAIN_TIMESTEPS {
            return Err(Error::InvalidSchedule(format!(
                "num_train_timesteps must be in 1..={MAX_TRAIN_TIMESTEPS}, got {t}"
            )));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != t {
                return Err(Error::InvalidSchedule(format!(
                    "trained_betas has {} values but num_train_timesteps is {t}",
                    betas.len()
                )));
            }
            return Ok(());
        }
        if self.beta_schedule != BetaSchedule::Cosine {
            let (start, end) = (self.beta_start, self.beta_end);
            for (name, beta) in [("beta_start", start), ("beta_end", end)] {
                // NaN fails this comparison too.
                if !(beta > 0.0 && beta < 1.0) {
                    return Err(Error::InvalidSchedule(format!(
                        "{name} must be in (0, 1), got {beta}"
                    )));
                }
            }
            if start > end {
                return Err(Error::InvalidSchedule(format!(
                    "beta_start ({start}) must not exceed beta_end ({end})"
                )));
            }
        }
        Ok(())
    }

    /// β_0..β_{T−1}, before the optional zero-terminal-SNR rescale.
    fn base_betas(&self) -> Vec<f64> {
        let t = self.num_train_timesteps;
        if let Some(betas) = &self.trained_betas {
            return betas.clone();
        }
        let (start, end) = (self.beta_start, self.beta_end);
        match self.beta_schedule {
            BetaSchedule::Linear => linspace(start, end, t),
            BetaSchedule::ScaledLinear => linspace(start.sqrt(), end.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::Cosine => cosine_betas(t),
            BetaSchedule::Sigmoid => linspace(-6.0, 6.0, t)
                .into_iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()) * (end - start) + start)
                .collect(),
        }
    }
}

/// `n` evenly spaced values from `start` to `end` inclusive, computed as numpy's `linspace`
/// does (`start + i · step`, the last value exactly `end`; one value gives `[start]`).
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut values: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = end;
    }
    values
}

/// Nichol & Dhariwal 2021, eq. (17) with s = 0.008, discretised as β_i = 1 − ᾱ((i+1)/T) / ᾱ(i/T)
/// and capped at 0.999 (diffusers' `betas_for_alpha_bar`). Times are f64: no integer i / T.
fn cosine_betas(t: usize) -> Vec<f64> {
    let alpha_bar = |x: f64| {
        ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..t)
        .map(|i| {
            let t1 = i as f64 / t as f64;
            let t2 = (i + 1) as f64 / t as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

/// Lin et al. 2023, Algorithm 1: shift and scale √ᾱ so that √ᾱ_T = 0 while √ᾱ_1 is unchanged,
/// then convert back to betas (the last beta becomes exactly 1).
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut product = 1.0;
    let sqrt_ab: Vec<f64> = betas
        .iter()
        .map(|b| {
            product *= 1.0 - b;
            product.sqrt()
        })
        .collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    let scale = first / (first - last);
    let ab: Vec<f64> = sqrt_ab
        .iter()
        .map(|s| {
            let s = (s - last) * scale;
            s * s
        })
        .collect();
    (0..ab.len())
        .map(|i| {
            let alpha = if i == 0 { ab[0] } else { ab[i] / ab[i - 1] };
            1.0 - alpha
        })
        .collect()
}

/// A noise schedule with every coefficient the forward process, the training loss and the
/// samplers need, indexed by the training timestep t ∈ 0..T (t = 0 is the least noisy step,
/// the paper's t = 1).
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// The config the schedule was built from.
    pub config: ScheduleConfig,
    /// β_t.
    pub betas: Vec<f64>,
    /// α_t = 1 − β_t.
    pub alphas: Vec<f64>,
    /// ᾱ_t = ∏_{s≤t} α_s.
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ_{t−1}, with ᾱ_{−1} = 1.
    pub alphas_cumprod_prev: Vec<f64>,
    /// √ᾱ_t.
    pub sqrt_alphas_cumprod: Vec<f64>,
    /// √(1 − ᾱ_t).
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    /// β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t), the variance of q(x_{t−1} | x_t, x_0) (eq. (7)).
    pub posterior_variance: Vec<f64>,
    /// log β̃_t with β̃_0 (= 0) replaced by β̃_1, as in Ho et al.'s code.
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of x_0 in the posterior mean: β_t √ᾱ_{t−1} / (1 − ᾱ_t) (eq. (7)).
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of x_t in the posterior mean: (1 − ᾱ_{t−1}) √α_t / (1 − ᾱ_t) (eq. (7)).
    pub posterior_mean_coef2: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds and checks the schedule: every β_t must end up in (0, 1] (β = 1 only at the end of
    /// a zero-terminal-SNR schedule).
    pub fn new(config: &ScheduleConfig) -> Result<Self> {
        config.validate()?;
        let mut betas = config.base_betas();
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b <= 1.0))
        {
            return Err(Error::InvalidSchedule(format!(
                "beta at timestep {t} is {b}; every beta must be in (0, 1]"
            )));
        }
        if config.rescale_betas_zero_snr {
            if betas.len() < 2 {
                return Err(Error::InvalidSchedule(format!(
                    "rescale_betas_zero_snr needs at least 2 timesteps, got {}",
                    betas.len()
                )));
            }
            betas = rescale_zero_terminal_snr(&betas);
            let last = betas.len() - 1;
            if let Some((t, b)) = betas
                .iter()
                .enumerate()
                .find(|&(t, b)| !(b.is_finite() && *b > 0.0 && (*b < 1.0 || t == last)))
            {
                return Err(Error::InvalidSchedule(format!(
                    "zero-terminal-SNR rescale gives beta {b} at timestep {t}; \
                     the schedule's alphas_cumprod must decrease strictly"
                )));
            }
        }

        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let mut product = 1.0;
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .map(|a| {
                product *= a;
                product
            })
            .collect();
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod.iter().copied().take(betas.len() - 1))
            .collect();
        let sqrt_alphas_cumprod = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
        let sqrt_one_minus_alphas_cumprod =
            alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect();

        let n = betas.len();
        // (β̃_t, coef1_t, coef2_t). 1 − ᾱ_t ≥ β_0 > 0 since every β is positive; the guard keeps
        // an f64 underflow of a tiny β_0 from dividing by zero (the limit there is x_{t−1} = x_0).
        let posterior: Vec<(f64, f64, f64)> = (0..n)
            .map(|t| {
                let one_minus = 1.0 - alphas_cumprod[t];
                let prev = alphas_cumprod_prev[t];
                if one_minus > 0.0 {
                    (
                        betas[t] * (1.0 - prev) / one_minus,
                        betas[t] * prev.sqrt() / one_minus,
                        (1.0 - prev) * alphas[t].sqrt() / one_minus,
                    )
                } else {
                    (0.0, 1.0, 0.0)
                }
            })
            .collect();
        let posterior_variance: Vec<f64> = posterior.iter().map(|p| p.0).collect();
        let posterior_mean_coef1 = posterior.iter().map(|p| p.1).collect();
        let posterior_mean_coef2 = posterior.iter().map(|p| p.2).collect();
        let posterior_log_variance_clipped = (0..n)
            .map(|t| {
                let v = if t == 0 && n > 1 {
                    posterior_variance[1]
                } else {
                    posterior_variance[t]
                };
                v.max(1e-20).ln()
            })
            .collect();

        Ok(Self {
            config: config.clone(),
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            sqrt_alphas_cumprod,
            sqrt_one_minus_alphas_cumprod,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        })
    }

    /// The number of training timesteps T.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at timestep `t` (0 at the end of a
    /// zero-terminal-SNR schedule).
    ///
    /// # Panics
    /// If `t >= T`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        let one_minus = 1.0 - a;
        if one_minus > 0.0 {
            a / one_minus
        } else {
            f64::INFINITY
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(config: ScheduleConfig) -> NoiseSchedule {
        NoiseSchedule::new(&config).unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn default_is_diffusers_ddpm_linear() {
        let s = schedule(ScheduleConfig::default());
        assert_eq!(s.num_train_timesteps(), 1000);
        assert_eq!(s.betas[0], 1e-4);
        assert_eq!(s.betas[999], 0.02);
        // β_500 = 1e-4 + 500 · (0.02 − 1e-4) / 999.
        assert!(close(s.betas[500], 1e-4 + 500.0 * 0.0199 / 999.0, 1e-17));
        assert!(close(s.alphas_cumprod[0], 0.9999, 1e-16));
        assert!(close(
            s.alphas_cumprod[1],
            0.9999 * (1.0 - s.betas[1]),
            1e-16
        ));
        // Known value: ᾱ_999 of the DDPM linear schedule is ≈ 4.0358e-5.
        assert!(
            close(s.alphas_cumprod[999], 4.0358e-5, 1e-8),
            "{}",
            s.alphas_cumprod[999]
        );
        assert_eq!(s.alphas_cumprod_prev[0], 1.0);
        assert_eq!(s.alphas_cumprod_prev[10], s.alphas_cumprod[9]);
    }

    #[test]
    fn scaled_linear_endpoints_are_squares() {
        let s = schedule(ScheduleConfig {
            beta_schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.00085,
            beta_end: 0.012,
            ..Default::default()
        });
        assert!(close(s.betas[0], 0.00085, 1e-18));
        assert!(close(s.betas[999], 0.012, 1e-17));
        let mid =
            (0.00085f64.sqrt() + 500.0 * (0.012f64.sqrt() - 0.00085f64.sqrt()) / 999.0).powi(2);
        assert!(close(s.betas[500], mid, 1e-17));
    }

    #[test]
    fn cosine_follows_alpha_bar_and_caps_at_0_999() {
        // Small T: an integer division in i / T would make every beta 0 or the cap.
        for t_total in [10usize, 50, 1000] {
            let s = schedule(ScheduleConfig {
                num_train_timesteps: t_total,
                beta_schedule: BetaSchedule::Cosine,
                ..Default::default()
            });
            let f = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            assert_eq!(s.betas[t_total - 1], 0.999);
            // Away from the cap, ᾱ_t = f((t+1)/T) / f(0) exactly (a telescoping product).
            for t in [0, t_total / 3, t_total / 2] {
                let expected = f((t + 1) as f64 / t_total as f64) / f(0.0);
                assert!(
                    close(s.alphas_cumprod[t], expected, 1e-14),
                    "T={t_total} t={t}"
                );
            }
        }
    }

    #[test]
    fn sigmoid_is_symmetric_around_the_middle() {
        let s = schedule(ScheduleConfig {
            beta_schedule: BetaSchedule::Sigmoid,
            ..Default::default()
        });
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!(close(s.betas[0], sig(-6.0) * 0.0199 + 1e-4, 1e-18));
        assert!(close(s.betas[999], sig(6.0) * 0.0199 + 1e-4, 1e-17));
        // sigmoid(x) + sigmoid(−x) = 1.
        assert!(close(s.betas[10] + s.betas[989], 0.0199 + 2e-4, 1e-16));
    }

    #[test]
    fn zero_terminal_snr_rescale() {
        let plain = schedule(ScheduleConfig::default());
        let s = schedule(ScheduleConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        });
        assert_eq!(s.alphas_cumprod[999], 0.0);
        assert_eq!(s.betas[999], 1.0);
        assert_eq!(s.snr(999), 0.0);
        // √ᾱ_0 is unchanged and √ᾱ is affine in the original √ᾱ.
        assert!(close(
            s.sqrt_alphas_cumprod[0],
            plain.sqrt_alphas_cumprod[0],
            1e-15
        ));
        let (a0, at) = (plain.sqrt_alphas_cumprod[0], plain.sqrt_alphas_cumprod[999]);
        let expected = (plain.sqrt_alphas_cumprod[400] - at) * a0 / (a0 - at);
        assert!(close(s.sqrt_alphas_cumprod[400], expected, 1e-15));
        assert!(s.posterior_variance.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn posterior_coefficients_match_ho_et_al() {
        let s = schedule(ScheduleConfig::default());
        for t in [1usize, 10, 500, 999] {
            let (b, a, ab, abp) = (
                s.betas[t],
                s.alphas[t],
                s.alphas_cumprod[t],
                s.alphas_cumprod[t - 1],
            );
            assert!(close(
                s.posterior_variance[t],
                b * (1.0 - abp) / (1.0 - ab),
                1e-18
            ));
            assert!(close(
                s.posterior_mean_coef1[t],
                b * abp.sqrt() / (1.0 - ab),
                1e-15
            ));
            assert!(close(
                s.posterior_mean_coef2[t],
                (1.0 - abp) * a.sqrt() / (1.0 - ab),
                1e-15
            ));
            // Eq. (7): coef2 / √α_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) = β̃_t / β_t.
            assert!(close(
                s.posterior_variance[t],
                s.posterior_mean_coef2[t] / a.sqrt() * b,
                1e-16
            ));
        }
        // At t = 0 the posterior is a point mass at x_0.
        assert_eq!(s.posterior_variance[0], 0.0);
        assert!(close(s.posterior_mean_coef1[0], 1.0, 1e-12));
        assert_eq!(s.posterior_mean_coef2[0], 0.0);
        assert_eq!(
            s.posterior_log_variance_clipped[0],
            s.posterior_variance[1].ln()
        );
    }

    #[test]
    fn single_step_schedule() {
        let s = schedule(ScheduleConfig {
            num_train_timesteps: 1,
            ..Default::default()
        });
        assert_eq!(s.betas, vec![1e-4]);
        assert!(s.posterior_log_variance_clipped[0].is_finite());
    }

    #[test]
    fn invalid_configs_are_refused_with_numbers() {
        let cases = [
            (
                ScheduleConfig {
                    num_train_timesteps: 0,
                    ..Default::default()
                },
                "got 0",
            ),
            (
                ScheduleConfig {
                    beta_start: 0.0,
                    ..Default::default()
                },
                "beta_start must be in (0, 1), got 0",
            ),
            (
                ScheduleConfig {
                    beta_end: 1.5,
                    ..Default::default()
                },
                "beta_end must be in (0, 1), got 1.5",
            ),
            (
                ScheduleConfig {
                    beta_end: f64::NAN,
                    ..Default::default()
                },
                "got NaN",
            ),
            (
                ScheduleConfig {
                    beta_start: 0.03,
                    ..Default::default()
                },
                "beta_start (0.03) must not exceed beta_end (0.02)",
            ),
            (
                ScheduleConfig {
                    num_train_timesteps: 3,
                    trained_betas: Some(vec![0.1, 0.2]),
                    ..Default::default()
                },
                "trained_betas has 2 values but num_train_timesteps is 3",
            ),
            (
                ScheduleConfig {
                    num_train_timesteps: 2,
                    trained_betas: Some(vec![0.1, 0.0]),
                    ..Default::default()
                },
                "beta at timestep 1 is 0",
            ),
        ];
        for (config, needle) in cases {
            match NoiseSchedule::new(&config) {
                Err(Error::InvalidSchedule(msg)) => {
                    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
                }
                other => panic!("{config:?} gave {other:?}"),
            }
        }
        // The cosine schedule ignores beta_start / beta_end, so does the check.
        let cosine = ScheduleConfig {
            beta_schedule: BetaSchedule::Cosine,
            beta_start: 0.0,
            ..Default::default()
        };
        assert!(NoiseSchedule::new(&cosine).is_ok());
    }

    #[test]
    fn reads_a_diffusers_scheduler_config() {
        let json = r#"{
            "_class_name": "DDPMScheduler",
            "_diffusers_version": "0.42.1",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": true,
            "trained_betas": null,
            "variance_type": "fixed_small"
        }"#;
        let config = ScheduleConfig::from_json(json).unwrap();
        assert_eq!(
            config,
            ScheduleConfig {
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: BetaSchedule::ScaledLinear,
                rescale_betas_zero_snr: true,
                ..Default::default()
            }
        );
        let cosine = ScheduleConfig::from_json(r#"{"beta_schedule": "squaredcos_cap_v2"}"#);
        assert_eq!(cosine.unwrap().beta_schedule, BetaSchedule::Cosine);
        assert_eq!(
            serde_json::to_string(&BetaSchedule::Cosine).unwrap(),
            "\"squaredcos_cap_v2\""
        );
        match ScheduleConfig::from_json(r#"{"beta_schedule": "laplace"}"#) {
            Err(Error::Json { message, .. }) => assert!(message.contains("laplace"), "{message}"),
            other => panic!("{other:?}"),
        }
        // Round trip through our own serialization.
        let back: ScheduleConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn linspace_matches_numpy_conventions() {
        assert_eq!(linspace(0.0, 1.0, 1), vec![0.0]);
        assert_eq!(linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        let v = linspace(1e-4, 0.02, 1000);
        assert_eq!(v[999], 0.02);
        assert_eq!(v[1], 1.0 * ((0.02 - 1e-4) / 999.0) + 1e-4);
    }
}
