//! `ddpm train`: Algorithm 1 of Ho et al. 2020 with the usual modern additions (AdamW, warm-up
//! and cosine learning rate, gradient clipping, EMA, class conditioning with label dropout for
//! classifier-free guidance, min-SNR weighting), on any backend, with exact resume.
//!
//! Determinism: the batch at step k (which images, which flips, timesteps, noise, dropped
//! labels) is a pure function of (seed, k), so a resumed run sees exactly the batches an
//! uninterrupted one would have seen.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use ddpm::diffusion::{self, LossWeighting, PredictionType};
use ddpm::model_file::{self, ModelInfo, StoreDType};
use ddpm::noise::SeededNoise;
use ddpm::schedule::{BetaSchedule, NoiseSchedule, ScheduleConfig};
use ddpm::unet::{TimeScaleShift, UNet, UNetConfig};
use indicatif::{ProgressBar, ProgressStyle};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backend::{self, BackendChoice};
use crate::checkpoint;
use crate::data::{self, DataSource, ImageSet, Split};
use crate::ema;
use crate::images;

/// Model sizes offered by `--model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelSize {
    /// ~0.4M parameters: two levels (32, 64 channels), attention at the lower one. Seconds per
    /// step on a CPU; good enough for MNIST-like data.
    Tiny,
    /// ~2M parameters: three levels (32, 64, 128), attention at the lowest two.
    Small,
    /// ~9M parameters: three levels (64, 128, 256), attention at the lowest two.
    Base,
}

impl ModelSize {
    /// The UNet for images of `size`×`size`×`channels`.
    pub fn config(self, size: usize, channels: usize) -> UNetConfig {
        use ddpm::unet::{DownBlockType as D, UpBlockType as U};
        let (channels_per_level, layers, heads) = match self {
            Self::Tiny => (vec![32, 64], 1, 32),
            Self::Small => (vec![32, 64, 128], 1, 32),
            Self::Base => (vec![64, 128, 256], 2, 64),
        };
        let levels = channels_per_level.len();
        let down = (0..levels)
            .map(|i| {
                if i == 0 {
                    D::DownBlock2D
                } else {
                    D::AttnDownBlock2D
                }
            })
            .collect();
        let up = (0..levels)
            .map(|i| {
                if i + 1 == levels {
                    U::UpBlock2D
                } else {
                    U::AttnUpBlock2D
                }
            })
            .collect();
        UNetConfig {
            sample_size: size,
            in_channels: channels,
            out_channels: channels,
            down_block_types: down,
            up_block_types: up,
            block_out_channels: channels_per_level,
            layers_per_block: layers,
            attention_head_dim: Some(heads),
            norm_num_groups: Some(8),
            ..UNetConfig::default()
        }
    }
}

/// Learning-rate shape after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Constant after warm-up (Ho et al. 2020).
    Constant,
    /// Cosine decay to zero at the last step.
    Cosine,
}

/// Beta schedules offered on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// β from 1e-4 to 0.02, linearly (Ho et al. 2020).
    Linear,
    /// Squared-cosine ᾱ (Nichol & Dhariwal 2021).
    Cosine,
    /// Linear in √β (Stable Diffusion).
    ScaledLinear,
    /// Sigmoid-shaped β.
    Sigmoid,
}

/// Prediction targets offered on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PredictionArg {
    /// The noise ε (Ho et al. 2020).
    Epsilon,
    /// v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022).
    V,
    /// The clean image x_0.
    Sample,
}

/// How the timestep (and class) embedding enters the UNet's ResNet blocks, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeScaleShiftArg {
    /// Added to the features after the first convolution (Ho et al. 2020; diffusers' default).
    Default,
    /// A per-channel scale and shift after the second group norm (AdaGN, Dhariwal & Nichol 2021).
    ScaleShift,
}

/// `ddpm train` flags.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Data set: fashion-mnist[:DIR], mnist:DIR, mnist-json:DIR, cifar10:DIR or folder:DIR.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: DataSource,
    /// Run directory to create (config, checkpoints, samples, loss curve, model file). With
    /// --resume: continue the resumed run (or saved state) here instead, leaving it untouched.
    #[arg(long, required_unless_present = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run (or saved state, see `ddpm export --state`) in this directory from its
    /// newest readable checkpoint.
    #[arg(long, conflicts_with = "init")]
    pub resume: Option<PathBuf>,
    /// Start from the weights of this model file (fine-tuning); its architecture is used.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train on these classes only (names or label numbers, comma-separated), e.g. `ship`.
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Image side in pixels (folder images are center-cropped and resized to it).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Image channels for folder data: 1 (grayscale) or 3 (RGB).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Use only the first N training images (quick experiments, tests).
    #[arg(long)]
    pub limit: Option<usize>,
    /// UNet size (ignored with --init).
    #[arg(long, value_enum, default_value = "small")]
    pub model: ModelSize,
    /// How the timestep and class embedding enter each ResNet block (diffusers'
    /// `resnet_time_scale_shift`). With --init the model file decides; another value is refused.
    #[arg(long, value_enum, default_value = "default")]
    pub resnet_time_scale_shift: TimeScaleShiftArg,
    /// Condition on class labels, with label dropout for classifier-free guidance.
    #[arg(long)]
    pub conditional: bool,
    /// Probability of replacing a label with the null class while training (--conditional).
    #[arg(long, default_value_t = 0.1)]
    pub p_uncond: f64,
    /// Noise schedule.
    #[arg(long, value_enum, default_value = "linear")]
    pub schedule: ScheduleArg,
    /// Number of diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    pub timesteps: usize,
    /// Rescale the β schedule to zero terminal SNR, so x_{T-1} is pure noise as sampling assumes
    /// (Lin et al. 2023; diffusers' `rescale_betas_zero_snr`). Needs --prediction v or sample.
    /// With --init: fine-tunes the model onto the rescaled schedule.
    #[arg(long)]
    pub zero_terminal_snr: bool,
    /// What the UNet predicts.
    #[arg(long, value_enum, default_value = "epsilon")]
    pub prediction: PredictionArg,
    /// Min-SNR-γ loss weighting (Hang et al. 2023); 5 is the paper's value. Off by default.
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Input perturbation γ (Ning et al. 2023; diffusers' `--input_perturbation`): the UNet sees
    /// x_t noised with ε + γ·ξ while its target keeps ε, so it learns to undo the error its own
    /// predictions carry from step to step when sampling. 0.1 is the paper's value; 0 (off) by
    /// default. With --resume: the new value from the resumed step on (fine-tuning a run)
    #[arg(long, default_value_t = 0.0)]
    pub input_perturbation: f64,
    /// Total optimisation steps (with --resume: the new total).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW). With --resume: a new peak for the run's rate curve, which
    /// goes on at its value for the resumed step (printed when training starts)
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 500)]
    pub warmup: u64,
    /// Learning-rate shape after warm-up. With --resume: a new shape for the run's rate curve,
    /// which goes on at its value for the resumed step (e.g. cosine decay to zero at --steps to
    /// finish a run trained at a constant rate; a cosine runs from the warm-up's end, so it
    /// takes over below its peak)
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrSchedule,
    /// Clip each parameter's gradient to this L2 norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Largest EMA decay (the decay warms up as (1 + k) / (10 + k)).
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f64,
    /// Random horizontal flips (default: on for CIFAR-10 and folders, off for digits/clothes).
    #[arg(long)]
    pub hflip: Option<bool>,
    /// Seed for initialisation, data order, timesteps and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint (and the EMA model file) every N steps.
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Write a sample grid every N steps (0 disables).
    #[arg(long, default_value_t = 1000)]
    pub sample_every: u64,
    /// DDIM steps for the sample grids.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
    /// Keep the newest K checkpoints.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Print a log line every N steps (besides the progress bar).
    #[arg(long, default_value_t = 100)]
    pub log_every: u64,
    /// The flags given on the command line (clap ids), filled in by `main`: with --resume,
    /// a given flag must agree with the stored run.
    #[arg(skip)]
    pub given: Vec<String>,
}

impl TrainArgs {
    /// Whether the flag with clap id `id` was given on the command line.
    fn is_given(&self, id: &str) -> bool {
        self.given.iter().any(|g| g == id)
    }
}

fn schedule_of(arg: ScheduleArg) -> BetaSchedule {
    match arg {
        ScheduleArg::Linear => BetaSchedule::Linear,
        ScheduleArg::Cosine => BetaSchedule::Cosine,
        ScheduleArg::ScaledLinear => BetaSchedule::ScaledLinear,
        ScheduleArg::Sigmoid => BetaSchedule::Sigmoid,
    }
}

fn time_scale_shift_of(arg: TimeScaleShiftArg) -> TimeScaleShift {
    match arg {
        TimeScaleShiftArg::Default => TimeScaleShift::Default,
        TimeScaleShiftArg::ScaleShift => TimeScaleShift::ScaleShift,
    }
}

fn prediction_of(arg: PredictionArg) -> PredictionType {
    match arg {
        PredictionArg::Epsilon => PredictionType::Epsilon,
        PredictionArg::V => PredictionType::VPrediction,
        PredictionArg::Sample => PredictionType::Sample,
    }
}

/// The command-line name of a value-enum value.
fn flag_value<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// The `--flag value` spelling of the enum value whose mapping gives `stored`, if any.
fn stored_enum<T: ValueEnum, U: PartialEq + std::fmt::Debug>(
    stored: &U,
    map: impl Fn(T) -> U,
) -> String {
    T::value_variants()
        .iter()
        .find(|v| map((*v).clone()) == *stored)
        .map(flag_value)
        .unwrap_or_else(|| format!("{stored:?}"))
}

/// `--model`'s preset name for a stored UNet, or its widths and depth.
fn stored_model(unet: &UNetConfig) -> String {
    ModelSize::value_variants()
        .iter()
        .find(|m| same_architecture(&m.config(unet.sample_size, unet.in_channels), unet))
        .map(flag_value)
        .unwrap_or_else(|| {
            format!(
                "channels {:?}, {} layers per block (from --init)",
                unet.block_out_channels, unet.layers_per_block
            )
        })
}

/// Equal UNets apart from the class embedding, which --conditional decides, and how the
/// timestep enters the ResNet blocks, which --resnet-time-scale-shift decides.
fn same_architecture(a: &UNetConfig, b: &UNetConfig) -> bool {
    let strip = |u: &UNetConfig| UNetConfig {
        num_class_embeds: None,
        resnet_time_scale_shift: TimeScaleShift::Default,
        ..u.clone()
    };
    strip(a) == strip(b)
}

/// Run settings that --resume may change: they do not alter what is trained (the model, the
/// data, the loss), only how long, at what learning rate and with what input perturbation it
/// goes on, and what is written.
const RESUME_SETTINGS: [&str; 12] = [
    "resume",
    "lr",
    "lr_schedule",
    "input_perturbation",
    "out",
    "steps",
    "backend",
    "log_every",
    "checkpoint_every",
    "sample_every",
    "sample_steps",
    "keep",
];

/// (given, stored, whether they agree) for a flag whose value prints as given.
fn plain<T: PartialEq + std::fmt::Display>(given: &T, stored: &T) -> (String, String, bool) {
    (given.to_string(), stored.to_string(), given == stored)
}

/// The flags of `args` that contradict the stored run `config`, as (flag, given, stored).
fn contradictions(args: &TrainArgs, config: &RunConfig) -> Vec<(String, String, String)> {
    let unet = &config.model.unet;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "unset".into());
    let mut found = Vec::new();
    for id in &args.given {
        if RESUME_SETTINGS.contains(&id.as_str()) {
            continue;
        }
        let (given, stored, same) = match id.as_str() {
            "data" => {
                let given = args.data.to_string();
                (given.clone(), config.data.clone(), given == config.data)
            }
            "model" => (
                flag_value(&args.model),
                stored_model(unet),
                same_architecture(&args.model.config(unet.sample_size, unet.in_channels), unet),
            ),
            "image_size" => (
                opt(args.image_size.map(|v| v.to_string())),
                unet.sample_size.to_string(),
                args.image_size == Some(unet.sample_size),
            ),
            "channels" => (
                opt(args.channels.map(|v| v.to_string())),
                unet.in_channels.to_string(),
                args.channels == Some(unet.in_channels),
            ),
            "classes" => (
                args.classes.join(","),
                config.classes.join(","),
                args.classes == config.classes,
            ),
            "limit" => (
                opt(args.limit.map(|v| v.to_string())),
                opt(config.limit.map(|v| v.to_string())),
                args.limit == config.limit,
            ),
            "resnet_time_scale_shift" => (
                flag_value(&args.resnet_time_scale_shift),
                stored_enum(&unet.resnet_time_scale_shift, time_scale_shift_of),
                time_scale_shift_of(args.resnet_time_scale_shift) == unet.resnet_time_scale_shift,
            ),
            "conditional" => plain(&args.conditional, &config.conditional),
            "p_uncond" => plain(&args.p_uncond, &config.p_uncond),
            "schedule" => (
                flag_value(&args.schedule),
                stored_enum(&config.model.schedule.beta_schedule, schedule_of),
                schedule_of(args.schedule) == config.model.schedule.beta_schedule,
            ),
            "timesteps" => plain(&args.timesteps, &config.model.schedule.num_train_timesteps),
            "zero_terminal_snr" => plain(
                &args.zero_terminal_snr,
                &config.model.schedule.rescale_betas_zero_snr,
            ),
            "prediction" => (
                flag_value(&args.prediction),
                stored_enum(&config.model.prediction, prediction_of),
                prediction_of(args.prediction) == config.model.prediction,
            ),
            "min_snr_gamma" => {
                let stored = match config.loss {
                    LossWeighting::MinSnr { gamma } => Some(gamma),
                    _ => None,
                };
                (
                    opt(args.min_snr_gamma.map(|v| v.to_string())),
                    opt(stored.map(|v| v.to_string())),
                    args.min_snr_gamma == stored,
                )
            }
            "batch_size" => plain(&args.batch_size, &config.batch_size),
            "warmup" => plain(&args.warmup, &config.warmup),
            "grad_clip" => plain(&args.grad_clip, &config.grad_clip),
            "ema_decay" => plain(&args.ema_decay, &config.ema_decay),
            "hflip" => (
                opt(args.hflip.map(|v| v.to_string())),
                config.hflip.to_string(),
                args.hflip == Some(config.hflip),
            ),
            "seed" => plain(&args.seed, &config.seed),
            other => (
                String::new(),
                format!("(a flag --resume does not take: {other})"),
                false,
            ),
        };
        if !same {
            found.push((format!("--{}", id.replace('_', "-")), given, stored));
        }
    }
    found
}

/// Refuse flags that contradict the run being resumed; apply the run settings it may change.
fn resume_config(args: &TrainArgs, dir: &Path, mut config: RunConfig) -> Result<RunConfig> {
    let found = contradictions(args, &config);
    if !found.is_empty() {
        let lines: Vec<String> = found
            .iter()
            .map(|(flag, given, stored)| {
                format!("  {flag} {given}: the run was trained with {stored}")
            })
            .collect();
        bail!(
            "{} the stored run in {}:\n{}\nDrop {} to continue that run (it keeps its \
             settings), or start a new run with --out DIR (without --resume). Nothing was written.",
            if found.len() == 1 {
                "a flag contradicts"
            } else {
                "flags contradict"
            },
            dir.display(),
            lines.join("\n"),
            if found.len() == 1 { "it" } else { "them" },
        );
    }
    if let Some(steps) = args.steps {
        config.steps = steps;
    }
    if args.is_given("lr") {
        check_lr(args.lr)?;
        config.lr = args.lr;
    }
    if args.is_given("lr_schedule") {
        config.lr_schedule = args.lr_schedule;
    }
    if args.is_given("input_perturbation") {
        check_input_perturbation(args.input_perturbation)?;
        config.input_perturbation = args.input_perturbation;
    }
    if args.is_given("log_every") {
        config.log_every = args.log_every.max(1);
    }
    if args.is_given("checkpoint_every") {
        ensure!(
            args.checkpoint_every > 0,
            "--checkpoint-every must be at least 1"
        );
        config.checkpoint_every = args.checkpoint_every;
    }
    if args.is_given("sample_every") {
        config.sample_every = args.sample_every;
    }
    if args.is_given("sample_steps") {
        config.sample_steps = args.sample_steps;
    }
    if args.is_given("keep") {
        config.keep = args.keep;
    }
    Ok(config)
}

/// Everything that defines a run, saved as `config.json` in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Data source as given.
    pub data: String,
    /// Class filter.
    pub classes: Vec<String>,
    /// Image-count limit.
    pub limit: Option<usize>,
    /// Folder resize.
    pub image_size: Option<usize>,
    /// Folder channel conversion.
    pub channels: Option<usize>,
    /// The model, schedule, prediction and class names.
    pub model: ModelInfo,
    /// Class conditioning with label dropout.
    pub conditional: bool,
    /// Label-dropout probability.
    pub p_uncond: f64,
    /// Loss weighting.
    pub loss: LossWeighting,
    /// Input perturbation γ (0 = off); absent from runs made before the flag.
    #[serde(default)]
    pub input_perturbation: f64,
    /// Total steps.
    pub steps: u64,
    /// Batch size.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: u64,
    /// Learning-rate shape.
    pub lr_schedule: LrSchedule,
    /// Gradient clipping norm (0 = off).
    pub grad_clip: f64,
    /// Maximum EMA decay.
    pub ema_decay: f64,
    /// Horizontal flips.
    pub hflip: bool,
    /// Seed.
    pub seed: u64,
    /// Checkpoint interval.
    pub checkpoint_every: u64,
    /// Sample-grid interval.
    pub sample_every: u64,
    /// DDIM steps for grids.
    pub sample_steps: usize,
    /// Checkpoints kept.
    pub keep: usize,
    /// Log interval.
    pub log_every: u64,
    /// Initial weights, if fine-tuning.
    pub init: Option<PathBuf>,
}

impl RunConfig {
    /// The rate at (0-based) step `step` and where the curve goes from there, for the resume
    /// message.
    pub fn describe_rate(&self, step: u64) -> String {
        let rate = self.lr_at(step);
        match self.lr_schedule {
            LrSchedule::Constant => format!(
                "learning rate {rate:.3e} at step {step}, {:.3e} from step {} on",
                self.lr, self.warmup
            ),
            LrSchedule::Cosine => format!(
                "learning rate {rate:.3e} at step {step}, on a cosine from {:.3e} at step {} to \
                 zero at step {}",
                self.lr, self.warmup, self.steps
            ),
        }
    }

    /// Learning rate at (0-based) step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
                let progress = ((step - self.warmup) as f64 / span).min(1.0);
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

fn default_steps(n_images: usize, batch: usize) -> u64 {
    // About 20 epochs, at least 1000 steps.
    ((20 * n_images).div_ceil(batch.max(1)) as u64).max(1000)
}

/// Load the training images with the run's class filter and image limit.
fn load_data(
    source: &DataSource,
    classes: &[String],
    limit: Option<usize>,
    image_size: Option<usize>,
    channels: Option<usize>,
) -> Result<ImageSet> {
    let mut set = data::load(source, Split::Train, image_size, channels)?;
    if !classes.is_empty() {
        set.filter_classes(classes)?;
    }
    if let Some(n) = limit {
        ensure!(n > 0, "--limit must be at least 1");
        set.truncate(n);
    }
    ensure!(!set.is_empty(), "the data set is empty");
    Ok(set)
}

/// `--lr` of a new run, or the new rate of a resumed one.
fn check_lr(lr: f64) -> Result<()> {
    ensure!(
        lr.is_finite() && lr > 0.0,
        "--lr must be a positive number (got {lr})"
    );
    Ok(())
}

fn check_input_perturbation(gamma: f64) -> Result<()> {
    ensure!(
        gamma.is_finite() && (0.0..=1.0).contains(&gamma),
        "--input-perturbation must be in [0, 1] (got {gamma}; 0.1 is Ning et al.'s value, 0 turns it off)"
    );
    Ok(())
}

/// Build the run configuration of a new run from the flags.
fn new_config(args: &TrainArgs, set_probe: &ImageSet) -> Result<RunConfig> {
    ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    check_lr(args.lr)?;
    check_input_perturbation(args.input_perturbation)?;
    ensure!(
        (0.0..1.0).contains(&args.p_uncond),
        "--p-uncond must be in [0, 1)"
    );
    ensure!(
        (0.0..1.0).contains(&args.ema_decay),
        "--ema-decay must be in [0, 1)"
    );
    ensure!(
        args.checkpoint_every > 0,
        "--checkpoint-every must be at least 1"
    );
    let mut info = match &args.init {
        Some(path) => {
            let bytes = checkpoint::read(path)?;
            let info = model_file::read_info(&bytes)
                .with_context(|| format!("{} is not a usable model file", path.display()))?;
            ensure!(
                info.unet.sample_size == set_probe.size
                    && info.unet.in_channels == set_probe.channels,
                "--init model {} is for {}x{}x{} images but the data is {}x{}x{}: pass a matching --image-size/--channels or another model",
                path.display(),
                info.unet.sample_size,
                info.unet.sample_size,
                info.unet.in_channels,
                set_probe.size,
                set_probe.size,
                set_probe.channels
            );
            let wanted = time_scale_shift_of(args.resnet_time_scale_shift);
            ensure!(
                !args.is_given("resnet_time_scale_shift")
                    || wanted == info.unet.resnet_time_scale_shift,
                "--resnet-time-scale-shift {}: the --init model {} was built with {} (its \
                 architecture is kept); drop the flag",
                flag_value(&args.resnet_time_scale_shift),
                path.display(),
                stored_enum(&info.unet.resnet_time_scale_shift, time_scale_shift_of)
            );
            info
        }
        None => {
            let mut unet = args.model.config(set_probe.size, set_probe.channels);
            unet.resnet_time_scale_shift = time_scale_shift_of(args.resnet_time_scale_shift);
            unet.validate().with_context(|| {
                format!(
                    "--model {:?} does not fit {}x{} images",
                    args.model, set_probe.size, set_probe.size
                )
            })?;
            let mut info = ModelInfo::new(unet);
            info.schedule = ScheduleConfig {
                num_train_timesteps: args.timesteps,
                beta_schedule: schedule_of(args.schedule),
                ..ScheduleConfig::default()
            };
            info.prediction = prediction_of(args.prediction);
            info
        }
    };
    if args.zero_terminal_snr {
        ensure!(
            info.prediction != PredictionType::Epsilon,
            "--zero-terminal-snr needs --prediction v (or sample){}: at zero SNR the noise ε says \
             nothing about the image (Lin et al. 2023)",
            if args.init.is_some() {
                ", and the --init model predicts ε"
            } else {
                ""
            }
        );
        info.schedule.rescale_betas_zero_snr = true;
    }
    if args.conditional {
        ensure!(
            !set_probe.class_names.is_empty(),
            "--conditional needs a labeled data set"
        );
        let classes = set_probe.class_names.len();
        match (&args.init, info.unet.num_class_embeds) {
            (Some(_), Some(n)) => ensure!(
                n == classes + 1,
                "the --init model has {n} class embeddings; this data set needs {} ({classes} classes + null)",
                classes + 1
            ),
            (Some(_), None) => bail!("the --init model is unconditional; drop --conditional"),
            (None, _) => info.unet.num_class_embeds = Some(classes + 1),
        }
        info.class_names = set_probe.class_names.clone();
    } else if info.unet.num_class_embeds.is_some() {
        bail!("the --init model is class-conditional: pass --conditional");
    }
    NoiseSchedule::new(&info.schedule)?;
    let hflip = args.hflip.unwrap_or(matches!(
        args.data,
        DataSource::Cifar10(_) | DataSource::Folder(_)
    ));
    let loss = match args.min_snr_gamma {
        Some(g) => {
            ensure!(g.is_finite() && g > 0.0, "--min-snr-gamma must be positive");
            LossWeighting::MinSnr { gamma: g }
        }
        None => LossWeighting::Uniform,
    };
    Ok(RunConfig {
        data: args.data.to_string(),
        classes: args.classes.clone(),
        limit: args.limit,
        image_size: args.image_size,
        channels: args.channels,
        model: info,
        conditional: args.conditional,
        p_uncond: args.p_uncond,
        loss,
        input_perturbation: args.input_perturbation,
        steps: args
            .steps
            .unwrap_or_else(|| default_steps(set_probe.len(), args.batch_size)),
        batch_size: args.batch_size,
        lr: args.lr,
        warmup: args.warmup,
        lr_schedule: args.lr_schedule,
        grad_clip: args.grad_clip,
        ema_decay: args.ema_decay,
        hflip,
        seed: args.seed,
        checkpoint_every: args.checkpoint_every,
        sample_every: args.sample_every,
        sample_steps: args.sample_steps,
        keep: args.keep,
        log_every: args.log_every.max(1),
        init: args.init.clone(),
    })
}

/// One training batch, prepared on the CPU by the loader thread.
struct Batch {
    step: u64,
    images: Vec<f32>,
    labels: Vec<i64>,
    timesteps: Vec<usize>,
    /// ε, the target's noise.
    noise: Vec<f32>,
    /// ε + γ·ξ, the noise of the UNet's input, with input perturbation γ > 0.
    input_noise: Option<Vec<f32>>,
}

/// A seed for (run seed, purpose, index) that does not collide across purposes.
fn derive_seed(seed: u64, purpose: u64, index: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    rng.set_stream(index);
    rng.next_u64()
}

/// The batch of step `step`: a pure function of the data, the config and the step.
fn make_batch(set: &ImageSet, config: &RunConfig, step: u64) -> Batch {
    let n = set.len() as u64;
    let b = config.batch_size as u64;
    let image_len = set.image_len();
    let s = set.size;
    let mut images = Vec::with_capacity(config.batch_size * image_len);
    let mut labels = Vec::with_capacity(config.batch_size);
    let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(config.seed, 1, step));
    let null = config.model.unet.num_class_embeds.map(|e| e as i64 - 1);
    let mut epoch_cache: Option<(u64, Vec<u32>)> = None;
    for j in 0..b {
        let global = step * b + j;
        let (epoch, pos) = (global / n, global % n);
        if epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            epoch_cache = Some((
                epoch,
                permutation(n as usize, derive_seed(config.seed, 2, epoch)),
            ));
        }
        let index = epoch_cache.as_ref().expect("set above").1[pos as usize] as usize;
        let image = set.image(index);
        let flip = config.hflip && rng.next_u32() & 1 == 1;
        if flip {
            for row in image.chunks_exact(s) {
                images.extend(row.iter().rev());
            }
        } else {
            images.extend_from_slice(image);
        }
        if config.conditional {
            let dropped = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= config.p_uncond
                && config.p_uncond > 0.0;
            let label = if dropped {
                null.unwrap_or(0)
            } else {
                set.labels[index] as i64
            };
            labels.push(label);
        }
    }
    let t_max = config.model.schedule.num_train_timesteps as u64;
    let timesteps = (0..b).map(|_| (rng.next_u64() % t_max) as usize).collect();
    let noise = SeededNoise::new(derive_seed(config.seed, 3, step)).sample_vec(images.len());
    let gamma = config.input_perturbation as f32;
    let input_noise = (gamma > 0.0).then(|| {
        let xi = SeededNoise::new(derive_seed(config.seed, 4, step)).sample_vec(images.len());
        noise.iter().zip(xi).map(|(e, x)| e + gamma * x).collect()
    });
    Batch {
        step,
        images,
        labels,
        timesteps,
        noise,
        input_noise,
    }
}

/// A seeded Fisher–Yates permutation of 0..n.
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// Prepare batches on a worker thread, a few ahead, so the device never waits for the CPU.
fn spawn_loader(
    set: Arc<ImageSet>,
    config: RunConfig,
    start: u64,
    end: u64,
) -> mpsc::Receiver<Batch> {
    let (tx, rx) = mpsc::sync_channel(4);
    std::thread::spawn(move || {
        for step in start..end {
            if tx.send(make_batch(&set, &config, step)).is_err() {
                break;
            }
        }
    });
    rx
}

/// Append-only `loss.csv`; on resume, rows past the checkpoint are dropped first.
struct LossLog {
    path: PathBuf,
    rows: Vec<(u64, f64)>,
    file: fs::File,
}

impl LossLog {
    fn open(run: &Path, upto: u64) -> Result<Self> {
        let path = run.join("loss.csv");
        let mut rows = Vec::new();
        let mut text = String::from("step,loss,lr\n");
        if let Ok(old) = fs::read_to_string(&path) {
            for line in old.lines().skip(1) {
                let mut parts = line.split(',');
                if let (Some(s), Some(l)) = (parts.next(), parts.next())
                    && let (Ok(s), Ok(l)) = (s.parse::<u64>(), l.parse::<f64>())
                    && s <= upto
                {
                    rows.push((s, l));
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        checkpoint::write_atomic(&path, text.as_bytes())?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { path, rows, file })
    }

    fn push(&mut self, step: u64, loss: f64, lr: f64) -> Result<()> {
        self.rows.push((step, loss));
        writeln!(self.file, "{step},{loss},{lr}")
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Hold the run directory's lock (`.lock`, an advisory file lock that the OS releases when the
/// process ends, however it ends): two trainers writing one run would corrupt each other's
/// loss log and checkpoints.
fn lock_run(dir: &Path) -> Result<fs::File> {
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another `ddpm train` is using {}: wait for it to finish (or stop it with Ctrl-C)",
            dir.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// `out` may become a new run: it holds no run (and, for a copy of a resumed run, is absent
/// or an empty directory).
fn ensure_new_run_dir(out: &Path, copy: bool) -> Result<()> {
    if out.join("config.json").exists() {
        bail!(
            "{} already holds a run: continue it with --resume {} or choose another --out",
            out.display(),
            out.display()
        );
    }
    if copy
        && out.is_dir()
        && fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty: choose a new or empty --out directory",
            out.display()
        );
    }
    ensure!(
        !out.exists() || out.is_dir(),
        "--out {} is a file: choose a directory",
        out.display()
    );
    Ok(())
}

/// Run `ddpm train`.
pub fn run(args: TrainArgs, stop: Arc<AtomicBool>) -> Result<()> {
    // Held until the run ends.
    let _lock: fs::File;
    let (run_dir, config, new_run_data) = match &args.resume {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = fs::read_to_string(&path).with_context(|| {
                format!(
                    "{} is not a run directory or saved state (no readable config.json)",
                    dir.display()
                )
            })?;
            let stored: RunConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is corrupt", path.display()))?;
            let config = resume_config(&args, dir, stored)?;
            let run_dir = match &args.out {
                Some(out) if out != dir => {
                    // Continue into a new run directory: check the source loads before
                    // anything is created, then copy its newest readable checkpoint.
                    ensure_new_run_dir(out, true)?;
                    let loaded = checkpoint::load_latest(
                        dir,
                        &config.model,
                        &Device::flex().autodiff(),
                        &Device::flex(),
                    )?;
                    checkpoint::fork(dir, &loaded.dir, out)?;
                    _lock = lock_run(out)?;
                    out.clone()
                }
                _ => {
                    _lock = lock_run(dir)?;
                    dir.clone()
                }
            };
            checkpoint::write_atomic(
                &run_dir.join("config.json"),
                &serde_json::to_vec_pretty(&config)?,
            )?;
            (run_dir, config, None)
        }
        None => {
            let out = args
                .out
                .clone()
                .expect("clap requires --out without --resume");
            let set = load_data(
                &args.data,
                &args.classes,
                args.limit,
                args.image_size,
                args.channels,
            )?;
            let config = new_config(&args, &set)?;
            ensure_new_run_dir(&out, false)?;
            fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            _lock = lock_run(&out)?;
            checkpoint::write_atomic(
                &out.join("config.json"),
                &serde_json::to_vec_pretty(&config)?,
            )?;
            (out, config, Some(set))
        }
    };
    let set = Arc::new(match new_run_data {
        Some(set) => set,
        None => {
            let source: DataSource = config.data.parse().map_err(anyhow::Error::msg)?;
            load_data(
                &source,
                &config.classes,
                config.limit,
                config.image_size,
                config.channels,
            )?
        }
    });
    let schedule = NoiseSchedule::new(&config.model.schedule)?;
    let selected = backend::select(args.backend)?;
    let base = selected.device.clone();
    let device = base.clone().autodiff();
    let info = config.model.clone();

    let grad_clip =
        (config.grad_clip > 0.0).then_some(GradientClippingConfig::Norm(config.grad_clip as f32));
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_epsilon(1e-8)
        .with_grad_clipping(grad_clip)
        .init();
    let (mut model, mut ema, start, mut elapsed) = if args.resume.is_some() {
        let loaded = checkpoint::load_latest(&run_dir, &info, &device, &base)?;
        optim = optim.load_record(loaded.optimizer);
        println!(
            "resuming {} from {} (step {}); {}",
            run_dir.display(),
            loaded.dir.display(),
            loaded.state.step,
            config.describe_rate(loaded.state.step)
        );
        (
            loaded.model,
            loaded.ema,
            loaded.state.step,
            loaded.state.elapsed_secs,
        )
    } else {
        let model = match &config.init {
            Some(path) => {
                let bytes = checkpoint::read(path)?;
                model_file::load(&bytes, &device)
                    .with_context(|| format!("loading --init {}", path.display()))?
                    .0
            }
            None => {
                device.seed(config.seed);
                info.unet.init(&device)?
            }
        };
        let ema = model.valid();
        (model, ema, 0, 0.0)
    };
    ensure!(
        start < config.steps,
        "the run is already at step {start} of {}: pass --steps N (N > {start}) to train further",
        config.steps
    );

    println!(
        "training on {}: {} images {}x{}x{}, {} parameters, batch {}, steps {}..{}",
        selected.name,
        set.len(),
        set.size,
        set.size,
        set.channels,
        model_file::num_params(&model),
        config.batch_size,
        start,
        config.steps
    );
    if config.input_perturbation > 0.0 {
        println!(
            "input perturbation γ = {}: the UNet sees x_t noised with ε + γ·ξ, the target keeps ε",
            config.input_perturbation
        );
    }
    let mut log = LossLog::open(&run_dir, start)?;
    fs::create_dir_all(run_dir.join("samples"))?;
    let batches = spawn_loader(set.clone(), config.clone(), start, config.steps);
    let bar = ProgressBar::new(config.steps);
    bar.set_position(start);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
        )
        .expect("valid template"),
    );
    let [c, s] = [set.channels, set.size];
    let b = config.batch_size;
    let session = Instant::now();
    let mut window = (0.0f64, 0u64, Instant::now());
    let mut step = start;
    let mut last_checkpoint = start;
    while step < config.steps {
        if stop.load(Ordering::SeqCst) {
            bar.suspend(|| println!("interrupted: saving a checkpoint at step {step}"));
            break;
        }
        let batch = batches.recv().context("the data loader stopped")?;
        debug_assert_eq!(batch.step, step);
        let x0 = Tensor::<4>::from_data(TensorData::new(batch.images, [b, c, s, s]), &device);
        let noise = Tensor::<4>::from_data(TensorData::new(batch.noise, [b, c, s, s]), &device);
        let input_noise = match batch.input_noise {
            Some(v) => Tensor::<4>::from_data(TensorData::new(v, [b, c, s, s]), &device),
            None => noise.clone(),
        };
        let x_t = diffusion::q_sample(&schedule, x0.clone(), input_noise, &batch.timesteps);
        let t = Tensor::<1>::from_data(
            TensorData::new(
                batch
                    .timesteps
                    .iter()
                    .map(|&t| t as f32)
                    .collect::<Vec<_>>(),
                [b],
            ),
            &device,
        );
        let labels = config.conditional.then(|| {
            Tensor::<1, Int>::from_data(TensorData::new(batch.labels.clone(), [b]), &device)
        });
        let target =
            diffusion::training_target(info.prediction, &schedule, x0, noise, &batch.timesteps);
        let (grads, loss_value) = batch_gradients(
            &model,
            &device,
            b,
            selected.batch_threads,
            |part, start, len| {
                let output = part.forward_slice(&x_t, &t, labels.as_ref(), start, len);
                config.loss.loss(
                    info.prediction,
                    &schedule,
                    output,
                    target.clone().narrow(0, start, len),
                    &batch.timesteps[start..start + len],
                )
            },
        );
        if !loss_value.is_finite() {
            bar.abandon();
            let last = checkpoint::list(&run_dir)
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none yet".into());
            bail!(
                "the loss became {loss_value} at step {step}: training stopped without saving the diverged weights. Last good checkpoint: {last}. Try a lower --lr (now {}) or --grad-clip.",
                config.lr
            );
        }
        let lr = config.lr_at(step);
        model = optim.step(lr, model, grads);
        step += 1;
        ema = ema::update(ema, &model.valid(), ema::decay(step, config.ema_decay));
        log.push(step, loss_value, lr)?;

        window.0 += loss_value;
        window.1 += 1;
        let rate = (window.1 * b as u64) as f64 / window.2.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(step);
        bar.set_message(format!(
            "loss {:.4} {:.1} img/s",
            window.0 / window.1 as f64,
            rate
        ));
        if step % config.log_every == 0 {
            bar.suspend(|| {
                println!(
                    "step {step}: loss {:.5} lr {lr:.2e} {rate:.1} img/s",
                    window.0 / window.1 as f64
                )
            });
            window = (0.0, 0, Instant::now());
        }
        if step % config.checkpoint_every == 0 || step == config.steps {
            let total = elapsed + session.elapsed().as_secs_f64();
            save_all(
                &run_dir, &model, &ema, &info, &config, &optim, step, total, &log,
            )?;
            last_checkpoint = step;
        }
        if config.sample_every > 0 && step % config.sample_every == 0 {
            let path = run_dir.join("samples").join(format!("step-{step:08}.png"));
            images::sample_grid(
                &ema,
                &info,
                &schedule,
                config.sample_steps,
                16,
                config.seed,
                &selected,
                &path,
            )?;
        }
    }
    bar.finish_and_clear();
    if step != last_checkpoint {
        let total = elapsed + session.elapsed().as_secs_f64();
        save_all(
            &run_dir, &model, &ema, &info, &config, &optim, step, total, &log,
        )?;
    }
    elapsed += session.elapsed().as_secs_f64();
    println!(
        "step {step}/{}: {} ({:.0} s of training in all); EMA model: {}",
        config.steps,
        if step == config.steps {
            "done"
        } else {
            "stopped"
        },
        elapsed,
        run_dir.join("model.safetensors").display()
    );
    Ok(())
}

/// One training step's gradients and its loss, the batch mean of `loss_of`.
///
/// `loss_of(model, start, len)` is the mean loss of the batch slice `start..start + len`. With
/// `parts` > 1 the batch is cut into that many slices, each run forward and backward on its own
/// thread through its own autodiff graph (a [`Module::fork`] of the model), and the slice
/// gradients, weighted by slice size, add up to the whole batch's. burn's CPU backend runs its
/// element-wise kernels on the calling thread only; with one slice per core both cores stay busy
/// between the convolutions. `parts` is 1 on a GPU ([`backend::Selected::batch_threads`]).
///
/// The slices run as rayon jobs ([`ddpm::unet::on_batch_slices`]), so a worker that waits
/// inside one slice's backward pass, which holds that graph's lock, may pick up another slice.
/// That is safe because each fork's parameters are detached copies with fresh autodiff nodes:
/// the slices' graphs, and their locks, are separate.
pub(crate) fn batch_gradients<F>(
    model: &UNet,
    device: &burn::tensor::Device,
    batch: usize,
    parts: usize,
    loss_of: F,
) -> (GradientsParams, f64)
where
    F: Fn(&UNet, usize, usize) -> Tensor<1> + Sync,
{
    let parts = parts.clamp(1, batch.max(1));
    if parts == 1 {
        let loss = loss_of(model, 0, batch);
        let value = loss.clone().into_scalar::<f32>() as f64;
        return (GradientsParams::from_grads(loss.backward(), model), value);
    }
    let slices = ddpm::unet::on_batch_slices(batch, parts, |start, len| {
        let part = model.clone().fork(device);
        let loss = loss_of(&part, start, len).mul_scalar(len as f64 / batch as f64);
        let value = loss.clone().into_scalar::<f32>() as f64;
        (GradientsParams::from_grads(loss.backward(), &part), value)
    });
    let mut sum = GradientsAccumulator::new();
    let mut value = 0.0;
    for (grads, v) in slices {
        sum.accumulate(model, grads);
        value += v;
    }
    (sum.grads(), value)
}

#[allow(clippy::too_many_arguments)]
fn save_all(
    run: &Path,
    model: &UNet,
    ema: &UNet,
    info: &ModelInfo,
    config: &RunConfig,
    optim: &burn::optim::ModuleOptimizer,
    step: u64,
    elapsed: f64,
    log: &LossLog,
) -> Result<()> {
    let mut info = info.clone();
    info.training = BTreeMap::from([
        ("data".into(), serde_json::json!(config.data)),
        ("steps".into(), serde_json::json!(step)),
        ("batch_size".into(), serde_json::json!(config.batch_size)),
        ("lr".into(), serde_json::json!(config.lr)),
        ("seed".into(), serde_json::json!(config.seed)),
        (
            "training_seconds".into(),
            serde_json::json!(elapsed.round()),
        ),
        ("weights".into(), serde_json::json!("ema")),
    ]);
    if config.input_perturbation > 0.0 {
        info.training.insert(
            "input_perturbation".into(),
            serde_json::json!(config.input_perturbation),
        );
    }
    let state = checkpoint::State {
        step,
        elapsed_secs: elapsed,
    };
    checkpoint::save(
        run,
        model,
        ema,
        &info,
        optim.to_record(),
        &state,
        config.keep,
    )?;
    let bytes = model_file::save(ema, &info, StoreDType::F32)?;
    checkpoint::write_atomic(&run.join("model.safetensors"), &bytes)?;
    images::loss_curve(&log.rows, &run.join("loss.png"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::Device;

    use super::*;

    /// Every parameter's gradient, flattened in visiting order.
    struct Flatten<'a>(&'a GradientsParams, Vec<f32>);

    impl ModuleVisitor for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.0.get::<D>(param.id) {
                self.1.extend(grad.into_data().try_to_vec::<f32>().unwrap());
            }
        }
    }

    #[test]
    fn sliced_batch_gradients_equal_the_whole_batch_gradients() {
        let config = UNetConfig {
            num_class_embeds: Some(3),
            ..UNetConfig::small_28()
        };
        let device = Device::flex().autodiff();
        let model = config.init(&device).unwrap();
        let schedule = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let batch = 5;
        let mut noise = SeededNoise::new(11);
        let shape = [batch, 1, 28, 28];
        let n = batch * 28 * 28;
        let x0 = Tensor::<4>::from_data(TensorData::new(noise.sample_vec(n), shape), &device)
            .clamp(-1.0, 1.0);
        let eps = Tensor::<4>::from_data(TensorData::new(noise.sample_vec(n), shape), &device);
        let timesteps = [3usize, 250, 999, 40, 600];
        let x_t = diffusion::q_sample(&schedule, x0, eps.clone(), &timesteps);
        let t = Tensor::<1>::from_data(
            TensorData::new(timesteps.map(|t| t as f32).to_vec(), [batch]),
            &device,
        );
        let labels =
            Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 0, 1], [batch]), &device);
        // Min-SNR weighting: per-image weights must land on the right slice too.
        let weighting = LossWeighting::MinSnr { gamma: 5.0 };
        let run = |parts: usize| {
            let (grads, loss) = batch_gradients(&model, &device, batch, parts, |m, start, len| {
                let out = m.forward_slice(&x_t, &t, Some(&labels), start, len);
                weighting.loss(
                    PredictionType::Epsilon,
                    &schedule,
                    out,
                    eps.clone().narrow(0, start, len),
                    &timesteps[start..start + len],
                )
            });
            let mut flat = Flatten(&grads, Vec::new());
            model.visit(&mut flat);
            (flat.1, loss)
        };
        // Every parameter has a gradient.
        let (whole, loss) = run(1);
        assert_eq!(whole.len(), model_file::num_params(&model));
        let scale = whole.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        assert!(scale > 0.0);
        // The slices run as rayon jobs. Called from outside rayon's pool (this test thread)
        // and from a worker of a 2-thread pool, as in the `ddpm` binary, whose main thread is
        // worker 0: each slice's kernels then split their own work on the same two workers.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // Uneven slices (3 + 2, 2 + 2 + 1) and more threads than images.
        for (parts, in_pool) in [(2, false), (3, false), (8, false), (2, true), (3, true)] {
            let (sliced, sliced_loss) = if in_pool {
                pool.install(|| run(parts))
            } else {
                run(parts)
            };
            assert_eq!(
                sliced.len(),
                whole.len(),
                "{parts} slices: gradients missing"
            );
            assert!((sliced_loss - loss).abs() <= 1e-6 * loss.abs().max(1.0));
            let diff = whole
                .iter()
                .zip(&sliced)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff <= 1e-5 * scale,
                "{parts} slices: max |diff| {diff} (largest gradient {scale})"
            );
        }
    }

    #[test]
    fn input_perturbation_adds_fresh_noise_to_the_input_only() {
        // The committed bundled run, saved before the flag existed, reads as γ = 0.
        let mut config: RunConfig =
            serde_json::from_str(include_str!("../../training/fashion-mnist/config.json")).unwrap();
        assert_eq!(config.input_perturbation, 0.0);
        let set = ImageSet {
            pixels: (0..10 * 16).map(|i| (i % 7) as f32 / 3.0 - 1.0).collect(),
            labels: (0..10).collect(),
            class_names: (0..10).map(|i| i.to_string()).collect(),
            channels: 1,
            size: 4,
        };
        config.batch_size = 128;
        let plain = make_batch(&set, &config, 7);
        assert!(plain.input_noise.is_none());
        let gamma = 0.1;
        config.input_perturbation = gamma;
        let perturbed = make_batch(&set, &config, 7);
        // Images, labels, timesteps and the target's noise ε are those of the same step without it.
        assert_eq!(plain.images, perturbed.images);
        assert_eq!(plain.labels, perturbed.labels);
        assert_eq!(plain.timesteps, perturbed.timesteps);
        assert_eq!(plain.noise, perturbed.noise);
        // The input's noise is ε + γ·ξ with ξ standard normal and independent of ε.
        let eps = &perturbed.noise;
        let xi: Vec<f64> = perturbed
            .input_noise
            .as_ref()
            .unwrap()
            .iter()
            .zip(eps)
            .map(|(n, e)| f64::from(n - e) / gamma)
            .collect();
        let n = xi.len() as f64;
        assert_eq!(xi.len(), 128 * 16);
        let mean = xi.iter().sum::<f64>() / n;
        let var = xi.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let corr = xi
            .iter()
            .zip(eps)
            .map(|(x, &e)| x * f64::from(e))
            .sum::<f64>()
            / n;
        // 2,048 draws: the standard error of the mean and of the correlation is 0.022, of the
        // variance 0.031; these bounds are over 4 of them.
        assert!(mean.abs() < 0.1, "mean of ξ {mean}");
        assert!((var - 1.0).abs() < 0.15, "variance of ξ {var}");
        assert!(corr.abs() < 0.1, "ξ correlates with ε: {corr}");
        // A new step draws a new ξ.
        let next = make_batch(&set, &config, 8);
        let next_xi: Vec<f64> = next
            .input_noise
            .unwrap()
            .iter()
            .zip(&next.noise)
            .map(|(n, e)| f64::from(n - e) / gamma)
            .collect();
        assert_ne!(next_xi, xi);
    }
}
