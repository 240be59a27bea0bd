//! Golden test: noise schedules, timestep lists and full sampler runs against diffusers 0.42.
//!
//! The fixtures come from `tests/fixtures/make_scheduler_fixtures.py` (run by hand; see its header
//! for versions and for how each reference number was made). Two references per quantity:
//!
//! - diffusers' own float32 numbers. Our schedules are f64, so the distance to these is diffusers'
//!   float32 rounding, measured and bounded below: ≤ 1e-7 for betas and 1e-6 for ᾱ, but up to 1e-5
//!   where rescaled (zero-terminal-SNR) betas approach 1; f32 sampler runs agree to 5e-5.
//! - a float64 run of the same formulas (diffusers' own `step()` on f64 tensors for DDPM / DDIM, an
//!   independent numpy transcription for DPM-Solver++). That is where the algorithm is pinned:
//!   schedules to 1e-14, and whole sampler runs, driven in f64 on `Device::flex()`, to 1e-12
//!   (1e-9 where diffusers' DDPM adds its 1e-10 · z after the last step and we do not).
//!
//! Every sampler run is a closed loop: the fake model's output at each step is a fixed function of
//! the sample we produced, so an error in one step shows in all the following ones.

use std::collections::BTreeSet;

use burn::tensor::{DType, Device, Tensor, TensorData};
use ddpm::noise::NoiseSource;
use ddpm::sampler::dpm_solver::dpm_solver_timesteps;
use ddpm::sampler::{
    DdimOptions, DdimSampler, DdpmOptions, DdpmSampler, DpmSolverOptions, DpmSolverSampler,
    Sampler, SamplerKind, StepOutput, TimestepSpacing, spaced_timesteps,
};
use ddpm::schedule::{NoiseSchedule, ScheduleConfig};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::{Map, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/scheduler");

/// f64 schedules vs numpy float64: measured max |Δ| 3.5e-18 (the same formulas; exp / cos may
/// differ in the last ulp).
const SCHEDULE_F64_TOL: f64 = 1e-14;
/// f64 betas vs diffusers' float32 betas: measured max |Δ| 2.2e-8 (cosine) without rescale.
const BETAS_F32_TOL: f64 = 1e-7;
/// With the zero-terminal-SNR rescale, diffusers' float32 betas near the end (up to 1) come from
/// ratios of small float32 numbers: measured max |Δ| 7.1e-6 (scaled_linear), 1.3e-6 (linear).
/// The float64 check above pins these schedules to 1e-14.
const BETAS_F32_RESCALED_TOL: f64 = 1e-5;
/// f64 ᾱ vs diffusers' float32 ᾱ (a float32 cumprod over 1000 steps): measured max |Δ| 5.1e-7.
const ALPHAS_CUMPROD_F32_TOL: f64 = 1e-6;
/// Sampler runs in f64 vs the float64 references, |Δ| / max(|x|, 1) over every step's x_{t'}
/// and x̂_0: measured max 6.7e-16.
const RUN_F64_TOL: f64 = 1e-12;
/// diffusers' DDPM draws noise whenever t > 0, so after a last timestep t > 0 ("trailing",
/// `steps_offset`) it adds √(1e-20) · z = 1e-10 · z (fixed_small); we add none there. Measured
/// 2.9e-10.
const RUN_F64_DDPM_LAST_NOISE_TOL: f64 = 1e-9;
/// Sampler runs in f32 vs diffusers' float32 runs, |Δ| / max(|x|, 1): the two round differently
/// (we scale by f64 coefficients rounded once, diffusers by coefficients computed in float32 from
/// a float32 schedule), which the 1/√ᾱ of the noisiest steps amplifies: measured max 1.9e-5
/// (DPM-Solver++ on the cosine schedule, 1/√ᾱ_999 ≈ 2e4), at most 4e-6 elsewhere.
const RUN_F32_TOL: f64 = 5e-5;

#[derive(Debug, Deserialize)]
struct Manifest {
    versions: Map<String, Value>,
    shape: [usize; 4],
    fake_model: FakeModel,
    schedules: Vec<ScheduleEntry>,
    timesteps: Vec<TimestepEntry>,
    runs: Vec<RunEntry>,
}

/// model_output = (a0 + a1 · t/T) · sample + (b0 + b1 · t/T) · base.
#[derive(Debug, Deserialize, Clone, Copy)]
struct FakeModel {
    a0: f64,
    a1: f64,
    b0: f64,
    b1: f64,
}

#[derive(Debug, Deserialize)]
struct ScheduleEntry {
    name: String,
    config: Value,
}

#[derive(Debug, Deserialize)]
struct TimestepEntry {
    sampler: SamplerKind,
    timestep_spacing: TimestepSpacing,
    steps_offset: usize,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    timesteps: Vec<i64>,
    diffusers_trailing_artefact: bool,
}

#[derive(Debug, Deserialize)]
struct RunEntry {
    name: String,
    sampler: SamplerKind,
    config: Map<String, Value>,
    step_kwargs: Map<String, Value>,
    num_inference_steps: usize,
    timesteps: Vec<usize>,
    noise_drawn_at: Vec<usize>,
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(format!("{FIXTURES}/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_bytes(file: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{file}")).unwrap()
}

/// A fixture tensor as f64 values (stored as F32 or F64), with its shape.
fn array(tensors: &SafeTensors, name: &str) -> (Vec<f64>, Vec<usize>) {
    let view = tensors
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    let values = match view.dtype() {
        Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => view
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    (values, view.shape().to_vec())
}

fn max_abs_diff(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// max |ours − ref| / max(|ref|, 1).
fn max_scaled_diff(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn to_vec(x: &Tensor<4>) -> Vec<f64> {
    x.to_data().try_into_vec_as::<f64>().unwrap()
}

#[test]
fn schedules_match_diffusers() {
    let manifest = manifest();
    let bytes = read_bytes("schedules.safetensors");
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    for entry in &manifest.schedules {
        let config: ScheduleConfig = serde_json::from_value(entry.config.clone()).unwrap();
        let schedule = NoiseSchedule::new(&config).unwrap();
        let name = &entry.name;
        let rescaled = config.rescale_betas_zero_snr;
        let checks = [
            ("betas_f64", &schedule.betas, SCHEDULE_F64_TOL),
            (
                "alphas_cumprod_f64",
                &schedule.alphas_cumprod,
                SCHEDULE_F64_TOL,
            ),
            (
                "betas_f32",
                &schedule.betas,
                if rescaled {
                    BETAS_F32_RESCALED_TOL
                } else {
                    BETAS_F32_TOL
                },
            ),
            (
                "alphas_cumprod_f32",
                &schedule.alphas_cumprod,
                ALPHAS_CUMPROD_F32_TOL,
            ),
        ];
        for (key, ours, tol) in checks {
            let (reference, shape) = array(&tensors, &format!("{name}/{key}"));
            assert_eq!(shape, [config.num_train_timesteps]);
            let diff = max_abs_diff(ours, &reference);
            println!("schedule {name:24} {key:20} max |Δ| {diff:.2e}");
            assert!(diff <= tol, "{name} {key}: max |Δ| {diff:e} > {tol:e}");
        }
    }

    // Ho et al.'s posterior coefficients, recomputed in float64 by the script.
    let schedule = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
    for (key, ours) in [
        ("posterior_variance", &schedule.posterior_variance),
        (
            "posterior_log_variance_clipped",
            &schedule.posterior_log_variance_clipped,
        ),
        ("posterior_mean_coef1", &schedule.posterior_mean_coef1),
        ("posterior_mean_coef2", &schedule.posterior_mean_coef2),
    ] {
        let (reference, _) = array(&tensors, &format!("linear/{key}_f64"));
        let diff = max_scaled_diff(ours, &reference);
        println!("schedule linear {key:32} max |Δ|/max(|x|,1) {diff:.2e}");
        assert!(diff <= SCHEDULE_F64_TOL, "linear {key}: {diff:e}");
    }
}

#[test]
fn timesteps_match_diffusers() {
    let manifest = manifest();
    let (mut artefacts, mut refused) = (0, 0);
    for e in &manifest.timesteps {
        let ours = match e.sampler {
            SamplerKind::DpmSolverPlusPlus => dpm_solver_timesteps(
                e.timestep_spacing,
                e.num_train_timesteps,
                e.num_inference_steps,
                e.steps_offset,
            ),
            SamplerKind::Ddpm | SamplerKind::Ddim => spaced_timesteps(
                e.timestep_spacing,
                e.num_train_timesteps,
                e.num_inference_steps,
                e.steps_offset,
            ),
        };
        let what = format!(
            "{} {:?} offset {} T={} N={}",
            e.sampler,
            e.timestep_spacing,
            e.steps_offset,
            e.num_train_timesteps,
            e.num_inference_steps
        );
        match ours {
            Ok(ours) => {
                let ours: Vec<i64> = ours.iter().map(|&t| t as i64).collect();
                assert_eq!(ours, e.timesteps, "{what}");
            }
            Err(err) => {
                // We refuse only lists diffusers cannot run either: a timestep pushed past the
                // schedule by steps_offset (diffusers fails on indexing ᾱ), or DPM-Solver++
                // "leading" with N + 1 > T, where the step ratio is 0 and every timestep is the
                // offset.
                let out_of_range = e
                    .timesteps
                    .iter()
                    .any(|&t| t >= e.num_train_timesteps as i64);
                let degenerate = e.sampler == SamplerKind::DpmSolverPlusPlus
                    && e.timestep_spacing == TimestepSpacing::Leading
                    && e.timesteps.iter().all(|&t| t == e.steps_offset as i64);
                assert!(out_of_range || degenerate, "{what}: {err}");
                refused += 1;
            }
        }
        artefacts += usize::from(e.diffusers_trailing_artefact);
    }
    // The fixtures do cover diffusers' extra-timestep artefact of "trailing" (N = 61, 103 of 1000)
    // and the refusals.
    assert!(artefacts >= 2, "{artefacts}");
    println!(
        "{} timestep lists, {artefacts} with diffusers' trailing artefact, {refused} refused",
        manifest.timesteps.len()
    );
}

/// Hands out the recorded N(0, 1) draw of the current step and records which steps drew.
struct FixtureNoise {
    noise: Option<(Vec<f64>, usize)>,
    step: usize,
    dtype: DType,
    drawn: BTreeSet<usize>,
}

impl NoiseSource for FixtureNoise {
    fn gaussian(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let (values, per_step) = self.noise.as_ref().expect("this run draws no noise");
        assert_eq!(*per_step, shape.iter().product::<usize>());
        assert!(
            self.drawn.insert(self.step),
            "two draws in step {}",
            self.step
        );
        let start = self.step * per_step;
        let data = TensorData::new(values[start..start + per_step].to_vec(), shape);
        Tensor::from_data(data, (device, self.dtype))
    }
}

enum AnySampler {
    Ddpm(DdpmSampler),
    Ddim(DdimSampler),
    Dpm(Box<DpmSolverSampler>),
}

impl AnySampler {
    fn new(run: &RunEntry, schedule: &NoiseSchedule) -> Self {
        // diffusers' config keys and the step() kwargs, in one object, as our options read them.
        let mut options = run.config.clone();
        options.extend(run.step_kwargs.clone());
        let options = Value::Object(options);
        let steps = run.num_inference_steps;
        match run.sampler {
            SamplerKind::Ddpm => {
                let o: DdpmOptions = serde_json::from_value(options).unwrap();
                Self::Ddpm(DdpmSampler::new(schedule, steps, o).unwrap())
            }
            SamplerKind::Ddim => {
                let o: DdimOptions = serde_json::from_value(options).unwrap();
                Self::Ddim(DdimSampler::new(schedule, steps, o).unwrap())
            }
            SamplerKind::DpmSolverPlusPlus => {
                let o: DpmSolverOptions = serde_json::from_value(options).unwrap();
                Self::Dpm(Box::new(DpmSolverSampler::new(schedule, steps, o).unwrap()))
            }
        }
    }

    fn timesteps(&self) -> Vec<usize> {
        match self {
            Self::Ddpm(s) => s.timesteps().to_vec(),
            Self::Ddim(s) => s.timesteps().to_vec(),
            Self::Dpm(s) => s.timesteps().to_vec(),
        }
    }

    fn step_output(
        &mut self,
        model_output: Tensor<4>,
        t: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> StepOutput {
        match self {
            Self::Ddpm(s) => s.step_output(model_output, t, sample, noise),
            Self::Ddim(s) => s.step_output(model_output, t, sample, noise),
            Self::Dpm(s) => s.step_output(model_output, t, sample),
        }
    }
}

#[test]
fn sampler_runs_match_diffusers() {
    let manifest = manifest();
    println!("fixtures from {:?}", manifest.versions);
    let bytes = read_bytes("samplers.safetensors");
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let device = Device::flex();
    let shape = manifest.shape;
    let per_step: usize = shape.iter().product();
    let model = manifest.fake_model;
    let (base, _) = array(&tensors, "base");
    assert!(!manifest.runs.is_empty());

    let (mut worst_f64, mut worst_f32) = (0.0f64, 0.0f64);
    for run in &manifest.runs {
        let name = &run.name;
        let config: ScheduleConfig =
            serde_json::from_value(Value::Object(run.config.clone())).unwrap();
        let schedule = NoiseSchedule::new(&config).unwrap();
        let t_total = schedule.num_train_timesteps() as f64;
        let (x_t, _) = array(&tensors, &format!("{name}/x_T"));
        let noise = tensors
            .tensor(&format!("{name}/noise"))
            .is_ok()
            .then(|| array(&tensors, &format!("{name}/noise")).0);
        let (prev_f64, prev_shape) = array(&tensors, &format!("{name}/prev_f64"));
        let (x0_f64, _) = array(&tensors, &format!("{name}/x0_f64"));
        let (prev_f32, _) = array(&tensors, &format!("{name}/prev_f32"));
        assert_eq!(prev_shape[0], run.timesteps.len());

        for dtype in [DType::F64, DType::F32] {
            let mut sampler = AnySampler::new(run, &schedule);
            assert_eq!(sampler.timesteps(), run.timesteps, "{name}");
            let tensor = |values: &[f64]| {
                Tensor::<4>::from_data(TensorData::new(values.to_vec(), shape), (&device, dtype))
            };
            let base = tensor(&base);
            let mut x = tensor(&x_t);
            let mut source = FixtureNoise {
                noise: noise.clone().map(|n| (n, per_step)),
                step: 0,
                dtype,
                drawn: BTreeSet::new(),
            };
            let (mut err_prev, mut err_x0) = (0.0f64, 0.0f64);
            for (i, &t) in run.timesteps.iter().enumerate() {
                let frac = t as f64 / t_total;
                let a = model.a0 + model.a1 * frac;
                let b = model.b0 + model.b1 * frac;
                let output = x.clone().mul_scalar(a).add(base.clone().mul_scalar(b));
                source.step = i;
                let out = sampler.step_output(output, t, x, &mut source);
                assert_eq!(out.prev_sample.dtype(), dtype, "{name}: dtype changed");
                let range = i * per_step..(i + 1) * per_step;
                let ours = to_vec(&out.prev_sample);
                if dtype == DType::F64 {
                    err_prev = err_prev.max(max_scaled_diff(&ours, &prev_f64[range.clone()]));
                    let x0 = to_vec(&out.pred_original_sample);
                    err_x0 = err_x0.max(max_scaled_diff(&x0, &x0_f64[range]));
                } else {
                    err_prev = err_prev.max(max_scaled_diff(&ours, &prev_f32[range]));
                }
                x = out.prev_sample;
            }
            let tol = if dtype == DType::F64 {
                println!(
                    "run {name:28} f64: max |Δ|/max(|x|,1) prev {err_prev:.2e} x0 {err_x0:.2e}"
                );
                worst_f64 = worst_f64.max(err_prev).max(err_x0);
                // diffusers' DDPM adds noise after the last step when that step's t > 0.
                let last_t = run.timesteps[run.timesteps.len() - 1];
                if run.sampler == SamplerKind::Ddpm && last_t > 0 {
                    RUN_F64_DDPM_LAST_NOISE_TOL
                } else {
                    RUN_F64_TOL
                }
            } else {
                println!("run {name:28} f32: max |Δ|/max(|x|,1) prev {err_prev:.2e}");
                worst_f32 = worst_f32.max(err_prev);
                RUN_F32_TOL
            };
            assert!(
                err_prev <= tol,
                "{name} {dtype:?}: prev_sample off by {err_prev:e}"
            );
            assert!(err_x0 <= tol, "{name} {dtype:?}: x0 off by {err_x0:e}");

            // Noise: only where diffusers drew too, and never at the last DDPM step or for a
            // deterministic sampler.
            let expected: BTreeSet<usize> = run.noise_drawn_at.iter().copied().collect();
            assert!(
                source.drawn.is_subset(&expected),
                "{name}: drew at {:?}",
                source.drawn
            );
            let last = run.timesteps.len() - 1;
            match run.sampler {
                SamplerKind::Ddpm => {
                    let all_but_last: BTreeSet<usize> = (0..last).collect();
                    assert_eq!(source.drawn, all_but_last, "{name}");
                }
                SamplerKind::Ddim => {
                    let eta = run
                        .step_kwargs
                        .get("eta")
                        .and_then(Value::as_f64)
                        .unwrap_or(0.0);
                    if eta == 0.0 {
                        assert!(source.drawn.is_empty(), "{name}");
                    } else {
                        assert!((0..last).all(|i| source.drawn.contains(&i)), "{name}");
                    }
                }
                SamplerKind::DpmSolverPlusPlus => assert!(source.drawn.is_empty(), "{name}"),
            }
        }
    }
    println!("worst: f64 {worst_f64:.2e}, f32 {worst_f32:.2e}");
}
