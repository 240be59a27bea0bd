//! `ddpm bench`: training and sampling throughput and peak memory of this crate's UNet, side by
//! side with the identical diffusers `UNet2DModel` in PyTorch.
//!
//! Both sides read one model file (the file uses diffusers' parameter names, so PyTorch loads
//! it with `load_state_dict`), one forward pass is compared first to show that they compute the
//! same function, and then every case (phase × batch) runs in a fresh process on each side:
//! `ddpm bench-worker` for ours, `benches/pytorch_reference.py` for PyTorch. A fresh process per
//! case makes each peak-memory figure belong to that case alone, and lets a case that runs out
//! of memory or hits an unsupported op fail with a message instead of taking the benchmark
//! down. Both sides time the same way: `--warmup` untimed iterations, then `--repeats` timed
//! repeats of k iterations, k chosen so a repeat lasts at least `--min-repeat-secs`; the figures
//! are medians over the repeats.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use ddpm::diffusion;
use ddpm::model_file::{self, ModelInfo, StoreDType};
use ddpm::noise::SeededNoise;
use ddpm::pipeline::{GenerateOptions, Generation, MAX_BATCH};
use ddpm::schedule::NoiseSchedule;
use ddpm::unet::{DownBlockType as D, UNet, UNetConfig, UpBlockType as U};
use serde::{Deserialize, Serialize};

use crate::backend::{self, BackendChoice};
use crate::images::ddim;
use crate::train::ModelSize;

/// The PyTorch side, carried in the binary so `ddpm bench` works from any directory.
const REFERENCE_SCRIPT: &str = include_str!("../../benches/pytorch_reference.py");

/// Architectures `ddpm bench` knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The bundled web model's architecture: the tiny UNet for 28×28×1 images with 11 class
    /// embeddings (10 classes and the null class of classifier-free guidance).
    FashionMnist,
    /// The DDPM paper's CIFAR-10 layout (diffusers' google/ddpm-cifar10-32: four levels,
    /// attention at 16×16, two ResNets per level) at a quarter of its width, 32, 64, 64, 64
    /// channels, so that a CPU runs it in seconds per step.
    Cifar,
}

impl Preset {
    /// The model description of the preset.
    pub fn info(self) -> ModelInfo {
        let unet = match self {
            Self::FashionMnist => UNetConfig {
                num_class_embeds: Some(11),
                ..ModelSize::Tiny.config(28, 1)
            },
            Self::Cifar => UNetConfig {
                sample_size: 32,
                in_channels: 3,
                out_channels: 3,
                down_block_types: vec![
                    D::DownBlock2D,
                    D::AttnDownBlock2D,
                    D::DownBlock2D,
                    D::DownBlock2D,
                ],
                up_block_types: vec![U::UpBlock2D, U::UpBlock2D, U::AttnUpBlock2D, U::UpBlock2D],
                block_out_channels: vec![32, 64, 64, 64],
                layers_per_block: 2,
                attention_head_dim: None,
                // 4 channels per group, as the original's 32 groups over 128 channels.
                norm_num_groups: Some(8),
                downsample_padding: 0,
                flip_sin_to_cos: false,
                freq_shift: 1.0,
                ..UNetConfig::default()
            },
        };
        ModelInfo::new(unet)
    }
}

/// What one case measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Training steps: q_sample, forward, MSE to the noise, backward, AdamW.
    Train,
    /// DDIM sampling runs of `--sample-steps` UNet evaluations each.
    Sample,
    /// One 3×3 convolution alone (the first level's channels, full resolution), forward and
    /// backward with input and weight gradients, through the UNet's convolution path: the
    /// kernels against PyTorch's, in isolation.
    Conv,
    /// SiLU alone on the first level's activations, forward only (no autodiff), through the
    /// UNet's activation: the element-wise kernels against PyTorch's, in isolation.
    Silu,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Sample => "sample",
            Self::Conv => "conv",
            Self::Silu => "silu",
        }
    }
}

/// `ddpm bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Architecture to measure (with seeded random weights).
    #[arg(long, default_value = "fashion-mnist", conflicts_with = "model")]
    pub preset: Preset,
    /// Measure this model file's architecture and weights instead of a preset.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64])]
    pub batch: Vec<usize>,
    /// Phases, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "train,sample")]
    pub phases: Vec<Phase>,
    /// Timed repeats per case; the figures are their medians.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Run each case this many times on each side, alternating ours and PyTorch, and take the
    /// medians over all their repeats: a machine whose speed drifts during the run (a shared VM)
    /// then slows both sides alike.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Untimed iterations before the repeats (autotuning, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Shortest timed repeat: short iterations are repeated k times within one repeat.
    #[arg(long, default_value_t = 0.5)]
    pub min_repeat_secs: f64,
    /// DDIM steps per sampling run.
    #[arg(long, default_value_t = 10)]
    pub sample_steps: usize,
    /// Our backend. PyTorch runs on CUDA when ours runs on a GPU, on the CPU otherwise.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// CPU threads for both sides (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Python interpreter with torch, diffusers and safetensors.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Report ours only.
    #[arg(long)]
    pub no_reference: bool,
    /// Also write every measurement as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Instead of the cases, measure what bounds the page's CPU fallback: one core's peak f32
    /// fused multiply-add rate at 4 lanes (the width of every WebAssembly SIMD instruction), 8
    /// and 16, and one native forward pass per --batch on one thread with the GFLOP of its
    /// matrix products (`benches/browser.mjs` runs it).
    /// The forward runs on the CPU, as the page's fallback does; the other timing flags do not
    /// apply.
    #[arg(long, conflicts_with_all = [
        "phases", "repeats", "rounds", "warmup", "min_repeat_secs", "sample_steps", "backend",
        "threads", "python", "no_reference",
    ])]
    pub ceiling: bool,
}

/// `ddpm bench-worker` flags: one case of our side, run by `ddpm bench` in a fresh process.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    phase: Phase,
    #[arg(long)]
    batch: usize,
    #[arg(long)]
    repeats: usize,
    #[arg(long)]
    warmup: usize,
    #[arg(long)]
    min_repeat_secs: f64,
    #[arg(long)]
    sample_steps: usize,
    #[arg(long, value_enum)]
    backend: BackendChoice,
}

/// One side's measurement of one case, as both workers print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// Seconds per iteration in each timed repeat.
    pub per_iter_s: Vec<f64>,
    /// Iterations per timed repeat.
    pub iters_per_repeat: usize,
    /// Peak resident set size of the worker process.
    pub peak_rss_bytes: u64,
    /// Resident set size once the worker's libraries were loaded, before the model was: what
    /// the peak includes that is not the case's own work (PyTorch's import alone is hundreds
    /// of MB).
    #[serde(default)]
    pub start_rss_bytes: u64,
    /// Peak device memory (PyTorch on CUDA only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_bytes: Option<u64>,
}

impl Measured {
    fn median_s(&self) -> f64 {
        median(&self.per_iter_s)
    }
}

/// The median of a non-empty list (the mean of the middle two for an even length).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One row of the report.
#[derive(Debug, Serialize)]
struct Row {
    phase: Phase,
    batch: usize,
    /// Work items per iteration: images (train) or image-evaluations (sample).
    items_per_iter: usize,
    ours: std::result::Result<Measured, String>,
    pytorch: Option<std::result::Result<Measured, String>>,
}

impl Row {
    fn rate(&self, m: &Measured) -> f64 {
        self.items_per_iter as f64 / m.median_s()
    }

    fn unit(&self) -> &'static str {
        match self.phase {
            Phase::Train | Phase::Conv | Phase::Silu => "img/s",
            Phase::Sample => "evals/s",
        }
    }
}

/// Removes the benchmark's scratch directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A memory figure of this process from `/proc/self/status` (Linux), in bytes; 0 where unknown.
/// `VmHWM` is the peak resident set size, `VmRSS` the current one.
fn status_bytes(key: &str) -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Time `iteration` as `benches/pytorch_reference.py` does.
fn measure(
    mut iteration: impl FnMut() -> Result<()>,
    sync: impl Fn() -> Result<()>,
    warmup: usize,
    repeats: usize,
    min_repeat_secs: f64,
) -> Result<(Vec<f64>, usize)> {
    let start = Instant::now();
    for _ in 0..warmup {
        iteration()?;
    }
    sync()?;
    let warm = start.elapsed().as_secs_f64() / warmup.max(1) as f64;
    let k = ((min_repeat_secs / warm.max(1e-9)).ceil() as usize).max(1);
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        for _ in 0..k {
            iteration()?;
        }
        sync()?;
        times.push(start.elapsed().as_secs_f64() / k as f64);
    }
    Ok((times, k))
}

/// `ddpm bench-worker`: one case of our side; prints one JSON line.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let start_rss_bytes = status_bytes("VmRSS");
    let selected = backend::select(args.backend)?;
    let bytes = fs::read(&args.model)
        .with_context(|| format!("reading model file {}", args.model.display()))?;
    let info = model_file::read_info(&bytes)?;
    let schedule = NoiseSchedule::new(&info.schedule)?;
    let b = args.batch;
    let u = &info.unet;
    let shape = [b, u.in_channels, u.sample_size, u.sample_size];
    let numel: usize = shape.iter().product();
    let classes = info.num_classes();
    let mut noise = SeededNoise::new(0);
    let sync = |device: &Device| {
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device error: {e:?}"))
    };

    let (times, k) = match args.phase {
        Phase::Train => {
            let device = selected.device.clone().autodiff();
            let (model, _) = model_file::load(&bytes, &device)?;
            let x0 =
                Tensor::<4>::from_data(TensorData::new(noise.sample_vec(numel), shape), &device)
                    .clamp(-1.0, 1.0);
            let eps =
                Tensor::<4>::from_data(TensorData::new(noise.sample_vec(numel), shape), &device);
            let t_max = info.schedule.num_train_timesteps;
            let timesteps: Vec<usize> = (0..b).map(|i| (i * 397 + 11) % t_max).collect();
            let t = Tensor::<1>::from_data(
                TensorData::new(timesteps.iter().map(|&t| t as f32).collect(), [b]),
                &device,
            );
            let labels = (classes > 0).then(|| {
                let l: Vec<i64> = (0..b).map(|i| (i % classes) as i64).collect();
                Tensor::<1, Int>::from_data(TensorData::new(l, [b]), &device)
            });
            let mut optim = AdamWConfig::new()
                .with_weight_decay(0.0)
                .with_epsilon(1e-8)
                .init();
            let mut slot = Some(model);
            measure(
                || {
                    let model = slot
                        .take()
                        .context("the model was lost by an earlier step")?;
                    let x_t = diffusion::q_sample(&schedule, x0.clone(), eps.clone(), &timesteps);
                    let (grads, value) = crate::train::batch_gradients(
                        &model,
                        &device,
                        b,
                        selected.batch_threads,
                        |part, start, len| {
                            let output = part.forward_slice(&x_t, &t, labels.as_ref(), start, len);
                            diffusion::l_simple(output, eps.clone().narrow(0, start, len))
                        },
                    );
                    ensure!(value.is_finite(), "the loss is {value}");
                    slot = Some(optim.step(1e-4, model, grads));
                    Ok(())
                },
                || sync(&device),
                args.warmup,
                args.repeats,
                args.min_repeat_secs,
            )?
        }
        Phase::Conv => {
            let device = selected.device.clone().autodiff();
            let (c, s) = (u.block_out_channels[0], u.sample_size);
            let conv = burn::nn::conv::Conv2dConfig::new([c, c], [3, 3])
                .with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&device);
            let x = Tensor::<4>::from_data(
                TensorData::new(noise.sample_vec(b * c * s * s), [b, c, s, s]),
                &device,
            )
            .require_grad();
            measure(
                || {
                    let grads = ddpm::unet::conv_forward(&conv, x.clone()).sum().backward();
                    let gx = x.grad(&grads).context("no input gradient")?;
                    let gw = conv.weight.val().grad(&grads);
                    ensure!(gw.is_some(), "no weight gradient");
                    let _ = gx.slice([0..1, 0..1, 0..1, 0..1]).into_data();
                    Ok(())
                },
                || sync(&device),
                args.warmup,
                args.repeats,
                args.min_repeat_secs,
            )?
        }
        Phase::Silu => {
            let device = selected.device.clone();
            let (c, s) = (u.block_out_channels[0], u.sample_size);
            let x = Tensor::<4>::from_data(
                TensorData::new(noise.sample_vec(b * c * s * s), [b, c, s, s]),
                &device,
            );
            measure(
                || {
                    let y = ddpm::unet::silu(x.clone());
                    let _ = y.slice([0..1, 0..1, 0..1, 0..1]).into_data();
                    Ok(())
                },
                || sync(&device),
                args.warmup,
                args.repeats,
                args.min_repeat_secs,
            )?
        }
        Phase::Sample => {
            let device = selected.device.clone();
            let (model, _) = model_file::load(&bytes, &device)?;
            let options = GenerateOptions {
                n: b,
                seed: 0,
                class: (classes > 0).then_some(0),
                guidance: 1.0,
                part: None,
            };
            let sampler = || ddim(&schedule, &info, args.sample_steps);
            sampler()?;
            measure(
                || {
                    let out = Generation::new(&model, &info, sampler()?, &options, &device)?
                        .with_batch_threads(selected.batch_threads)
                        .run();
                    // Reading the samples back waits for the device, as a user's program would.
                    let _ = out.into_data();
                    Ok(())
                },
                || sync(&device),
                args.warmup,
                args.repeats,
                args.min_repeat_secs,
            )?
        }
    };
    let measured = Measured {
        per_iter_s: times,
        iters_per_repeat: k,
        peak_rss_bytes: status_bytes("VmHWM"),
        start_rss_bytes,
        peak_device_bytes: None,
    };
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

/// Why a worker process failed, in one line: the panic or error message, or the signal.
fn describe_failure(status: ExitStatus, stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    if let Some(l) = lines.iter().find(|l| l.starts_with("memory allocation of")) {
        return format!("out of memory ({l})");
    }
    let message = lines
        .iter()
        .position(|l| l.contains("panicked at"))
        .and_then(|i| lines.get(i + 1))
        .or_else(|| lines.iter().find(|l| l.starts_with("Error:")))
        .or(lines.last())
        .map_or_else(String::new, |l| l.to_string());
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        match status.signal() {
            Some(9) => {
                return "killed by SIGKILL (most likely the system ran out of memory)".into();
            }
            Some(signal) => return format!("killed by signal {signal}: {message}"),
            None => {}
        }
    }
    match status.code() {
        Some(code) => format!("exit code {code}: {message}"),
        None => message,
    }
}

/// Run a worker (ours or the PyTorch script) and read the JSON object on the last stdout line
/// that holds one. A worker that fails says why: the script in an `{"error": …}` object, ours
/// on stderr.
fn run_json(mut command: Command) -> std::result::Result<serde_json::Value, String> {
    let output = command
        .output()
        .map_err(|e| format!("could not start {:?} ({e})", command.get_program()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = stdout.lines().rev().find_map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .filter(serde_json::Value::is_object)
    });
    if let Some(error) = value
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.as_str())
    {
        return Err(error.to_string());
    }
    if !output.status.success() {
        return Err(describe_failure(
            output.status,
            &String::from_utf8_lossy(&output.stderr),
        ));
    }
    value.ok_or_else(|| "printed no result".to_string())
}

/// One side's rounds of a case as one measurement: every round's repeats, and the largest
/// peaks. A failed round fails the case (the rounds stop at the first failure).
fn pool_rounds(
    rounds: Vec<std::result::Result<Measured, String>>,
) -> std::result::Result<Measured, String> {
    let mut pooled: Option<Measured> = None;
    for round in rounds {
        let m = round?;
        pooled = Some(match pooled {
            None => m,
            Some(mut p) => {
                p.per_iter_s.extend(m.per_iter_s);
                p.iters_per_repeat = p.iters_per_repeat.min(m.iters_per_repeat);
                p.peak_rss_bytes = p.peak_rss_bytes.max(m.peak_rss_bytes);
                p.start_rss_bytes = p.start_rss_bytes.min(m.start_rss_bytes);
                p.peak_device_bytes = p.peak_device_bytes.max(m.peak_device_bytes);
                p
            }
        });
    }
    pooled.ok_or_else(|| "did not run".to_string())
}

/// Run one case and read its measurement.
fn run_case(command: Command) -> std::result::Result<Measured, String> {
    let value = run_json(command)?;
    serde_json::from_value(value.clone())
        .map_err(|e| format!("printed an unreadable result ({e}): {value}"))
}

/// The PyTorch side, once found.
#[derive(Debug)]
struct Reference {
    python: String,
    script: PathBuf,
    device: &'static str,
    versions: String,
    threads: usize,
}

impl Reference {
    fn command(&self, model: &Path, phase: &str) -> Command {
        let mut c = Command::new(&self.python);
        c.arg(&self.script)
            .args(["--phase", phase, "--device", self.device])
            .arg("--threads")
            .arg(self.threads.to_string())
            .arg("--model")
            .arg(model);
        c
    }

    /// Find python with torch and diffusers, or say why not.
    fn find(
        python: &str,
        scratch: &Path,
        device: &'static str,
        threads: usize,
    ) -> std::result::Result<Self, String> {
        let script = scratch.join("pytorch_reference.py");
        fs::write(&script, REFERENCE_SCRIPT).map_err(|e| e.to_string())?;
        let mut c = Command::new(python);
        c.arg(&script).args(["--phase", "versions"]);
        let v = run_json(c)?;
        let torch = v.get("torch").and_then(|s| s.as_str()).unwrap_or("?");
        let diffusers = v.get("diffusers").and_then(|s| s.as_str()).unwrap_or("?");
        if device == "cuda" && v.get("cuda") != Some(&serde_json::Value::Bool(true)) {
            return Err(format!(
                "PyTorch {torch} sees no CUDA device, so it cannot be compared with our GPU backend"
            ));
        }
        Ok(Self {
            python: python.into(),
            script,
            device,
            versions: format!("PyTorch {torch} + diffusers {diffusers}"),
            threads,
        })
    }
}

/// Write the inputs and our output of one forward pass for the PyTorch side to compare.
fn write_check_file(model: &UNet, info: &ModelInfo, path: &Path) -> Result<()> {
    use safetensors::{Dtype, tensor::TensorView};
    let device = Device::flex();
    let u = &info.unet;
    let shape = [2, u.in_channels, u.sample_size, u.sample_size];
    let sample = SeededNoise::new(1).sample_vec(shape.iter().product());
    let timesteps = vec![
        3.0f32,
        777.0f32.min(info.schedule.num_train_timesteps as f32 - 1.0),
    ];
    let classes = info.num_classes();
    let labels: Option<Vec<i64>> = (classes > 0).then(|| vec![0, 1 % classes as i64]);
    let output = model.forward(
        Tensor::<4>::from_data(TensorData::new(sample.clone(), shape), &device),
        Tensor::<1>::from_data(TensorData::new(timesteps.clone(), [2]), &device),
        labels
            .clone()
            .map(|l| Tensor::<1, Int>::from_data(TensorData::new(l, [2]), &device)),
    );
    let output = crate::images::to_vec(output);
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut owned: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("sample", Dtype::F32, shape.to_vec(), f32_bytes(&sample)),
        ("timesteps", Dtype::F32, vec![2], f32_bytes(&timesteps)),
        ("output", Dtype::F32, shape.to_vec(), f32_bytes(&output)),
    ];
    if let Some(l) = labels {
        let b = l.iter().flat_map(|x| x.to_le_bytes()).collect();
        owned.push(("class_labels", Dtype::I64, vec![2], b));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data).map(|v| (name.to_string(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    fs::write(path, safetensors::serialize(views, None)?)?;
    Ok(())
}

fn format_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

fn format_row(row: &Row) -> String {
    let mut s = format!("{:<7}{:>6}  ", row.phase.name(), row.batch);
    let cell = |m: &std::result::Result<Measured, String>| match m {
        Ok(m) => format!("{} {}", format_rate(row.rate(m)), row.unit()),
        Err(_) => "failed".into(),
    };
    let _ = write!(s, "{:<18}", cell(&row.ours));
    match (&row.ours, &row.pytorch) {
        (Ok(o), None) => {
            let _ = write!(s, "{}", mb(o.peak_rss_bytes));
        }
        (_, None) => {}
        (Err(_), Some(p)) => {
            let _ = write!(s, "{}", cell(p));
        }
        (Ok(_), Some(Err(_))) => s.push_str("failed"),
        (Ok(o), Some(Ok(p))) => {
            let _ = write!(
                s,
                "{:<18}{:>6.2}×  ",
                format!("{} {}", format_rate(row.rate(p)), row.unit()),
                row.rate(o) / row.rate(p)
            );
            match p.peak_device_bytes {
                None => {
                    let _ = write!(
                        s,
                        " {} / {} = {:.2}×",
                        mb(o.peak_rss_bytes),
                        mb(p.peak_rss_bytes),
                        o.peak_rss_bytes as f64 / p.peak_rss_bytes as f64
                    );
                }
                Some(device) => {
                    let _ = write!(
                        s,
                        " ours {} host; PyTorch {} on the device",
                        mb(o.peak_rss_bytes),
                        mb(device)
                    );
                }
            }
        }
    }
    s
}

/// `ddpm bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(!args.batch.is_empty(), "--batch needs at least one size");
    if let Some(&b) = args.batch.iter().find(|&&b| b == 0 || b > MAX_BATCH) {
        bail!("--batch {b} is out of range: use 1..={MAX_BATCH}");
    }
    ensure!(
        args.repeats >= 1,
        "--repeats must be at least 1 (the README's figures use 5)"
    );
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        args.min_repeat_secs.is_finite() && args.min_repeat_secs >= 0.0,
        "--min-repeat-secs must be a number ≥ 0"
    );
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    ensure!(threads >= 1, "--threads must be at least 1");

    let scratch = Scratch(std::env::temp_dir().join(format!("ddpm-bench-{}", std::process::id())));
    fs::create_dir_all(&scratch.0)
        .with_context(|| format!("creating scratch directory {}", scratch.0.display()))?;

    // The model on the CPU: for the parameter count and the forward pass both sides compare.
    let (model_path, model, info, label) = match &args.model {
        Some(path) => {
            let bytes =
                fs::read(path).with_context(|| format!("reading model file {}", path.display()))?;
            let (model, info) = model_file::load(&bytes, &Device::flex())
                .with_context(|| format!("{} is not a usable model file", path.display()))?;
            (path.clone(), model, info, path.display().to_string())
        }
        None => {
            let info = args.preset.info();
            let device = Device::flex();
            device.seed(0);
            let model = info.unet.init(&device)?;
            let path = scratch.0.join("model.safetensors");
            fs::write(&path, model_file::save(&model, &info, StoreDType::F32)?)?;
            let name = args
                .preset
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_string());
            (path, model, info, format!("the {name} preset"))
        }
    };
    if args.ceiling {
        return crate::ceiling::run(&model, &info, &label, &args.batch, args.json.as_deref());
    }
    let u = &info.unet;
    let params = model_file::num_params(&model);
    let config = format!(
        "{label} ({}×{}×{}, {} parameters)",
        u.sample_size,
        u.sample_size,
        u.in_channels,
        group_thousands(params)
    );
    if let Some(p) = args.phases.iter().find(|p| **p == Phase::Sample).copied() {
        ddim(
            &NoiseSchedule::new(&info.schedule)?,
            &info,
            args.sample_steps,
        )
        .with_context(|| format!("--sample-steps for the {} phase", p.name()))?;
    }

    let selected = backend::select(args.backend)
        .with_context(|| format!("benchmarking {config}: backend {:?}", args.backend))?;
    let on_gpu = !selected.name.starts_with("cpu");
    let reference = if args.no_reference {
        Err("--no-reference".to_string())
    } else {
        Reference::find(
            &args.python,
            &scratch.0,
            if on_gpu { "cuda" } else { "cpu" },
            threads,
        )
    };
    let threads_text = format!("{threads} thread{}", if threads == 1 { "" } else { "s" });
    let ours_name = if on_gpu {
        selected.name.clone()
    } else {
        format!("cpu (flex, {threads_text})")
    };
    println!("ddpm bench: {config}");
    println!("  ours: {ours_name}");
    match &reference {
        Ok(r) => println!(
            "  reference: {} on {}, {threads_text}",
            r.versions, r.device
        ),
        Err(why) => println!("  reference: not run ({why}); reporting ours only"),
    }
    let repeats_text = if args.rounds == 1 {
        format!("{} repeats", args.repeats)
    } else {
        format!(
            "{} repeats ({} rounds of {}, alternating the two sides)",
            args.rounds * args.repeats,
            args.rounds,
            args.repeats
        )
    };
    println!(
        "  medians of {repeats_text} after {} warm-up iterations; sampling is DDIM with {} steps; evals/s counts one image through the UNet once",
        args.warmup, args.sample_steps
    );
    let mut check_diff = None;
    if let Ok(r) = &reference {
        let check = scratch.0.join("check.safetensors");
        write_check_file(&model, &info, &check)?;
        let mut c = r.command(&model_path, "check");
        c.arg("--check-file").arg(&check);
        match run_json(c) {
            Ok(v) => {
                let d = v
                    .get("max_abs_diff")
                    .and_then(|d| d.as_f64())
                    .unwrap_or(f64::NAN);
                check_diff = Some(d);
                println!("  same function: max |ours − PyTorch| over one forward pass = {d:.1e}");
                if d.is_nan() || d > 1e-3 {
                    println!(
                        "  warning: the two sides disagree; the ratios below compare different computations"
                    );
                }
            }
            Err(e) => println!("  same function: the check failed: {e}"),
        }
    }
    println!();
    if reference.is_ok() {
        println!(
            "{:<7}{:>6}  {:<18}{:<18}{:>7}   peak RSS ours / PyTorch",
            "phase", "batch", "ours", "PyTorch", "ratio"
        );
    } else {
        println!("{:<7}{:>6}  {:<18}peak RSS", "phase", "batch", "ours");
    }

    let exe = std::env::current_exe().context("locating the ddpm binary")?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &phase in &args.phases {
        for &batch in &args.batch {
            let common = |c: &mut Command| {
                c.args(["--batch", &batch.to_string()])
                    .args(["--repeats", &args.repeats.to_string()])
                    .args(["--warmup", &args.warmup.to_string()])
                    .args(["--min-repeat-secs", &args.min_repeat_secs.to_string()]);
            };
            let ours_command = || {
                let mut c = Command::new(&exe);
                c.arg("bench-worker")
                    .arg("--model")
                    .arg(&model_path)
                    .args(["--phase", phase.name()])
                    .args(["--sample-steps", &args.sample_steps.to_string()])
                    .arg("--backend")
                    .arg(
                        args.backend
                            .to_possible_value()
                            .map_or_else(|| "auto".into(), |v| v.get_name().to_string()),
                    )
                    .env("RAYON_NUM_THREADS", threads.to_string())
                    .env("RUST_BACKTRACE", "0");
                common(&mut c);
                c
            };
            let pytorch_command = |r: &Reference| {
                let mut c = r.command(&model_path, phase.name());
                c.args(["--steps", &args.sample_steps.to_string()]);
                common(&mut c);
                c
            };
            let (mut ours_runs, mut pytorch_runs) = (Vec::new(), Vec::new());
            for _ in 0..args.rounds {
                if ours_runs.last().is_none_or(Result::is_ok) {
                    ours_runs.push(run_case(ours_command()));
                }
                if let Ok(r) = &reference
                    && pytorch_runs.last().is_none_or(Result::is_ok)
                {
                    pytorch_runs.push(run_case(pytorch_command(r)));
                }
            }
            let ours = pool_rounds(ours_runs);
            if let Err(why) = &ours {
                let message = format!(
                    "{} at batch {batch} ({}) on {ours_name}: {why}",
                    config,
                    phase.name()
                );
                failures.push(message);
            }
            let pytorch = reference.is_ok().then(|| pool_rounds(pytorch_runs));
            let items_per_iter = match phase {
                Phase::Train | Phase::Conv | Phase::Silu => batch,
                Phase::Sample => batch * args.sample_steps,
            };
            let row = Row {
                phase,
                batch,
                items_per_iter,
                ours,
                pytorch,
            };
            println!("{}", format_row(&row));
            if let Some(Err(why)) = &row.pytorch {
                println!("    PyTorch could not run it: {why}");
            }
            if let Err(why) = &row.ours {
                println!("    ours could not run it: {why}");
            }
            rows.push(row);
        }
    }

    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "config": config,
            "unet": info.unet,
            "num_params": params,
            "ours": ours_name,
            "reference": reference.as_ref().map(|r| r.versions.clone()).map_err(Clone::clone),
            "threads": threads,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "sample_steps": args.sample_steps,
            "max_abs_diff": check_diff,
            "rows": rows,
        });
        fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} cases could not run:\n  {}",
            failures.len(),
            rows.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn group_thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_pool_their_repeats_and_keep_the_largest_peak() {
        let m = |times: &[f64], peak: u64| Measured {
            per_iter_s: times.to_vec(),
            iters_per_repeat: 2,
            peak_rss_bytes: peak,
            start_rss_bytes: 10,
            peak_device_bytes: None,
        };
        let pooled =
            pool_rounds(vec![Ok(m(&[3.0, 1.0], 50)), Ok(m(&[2.0, 9.0, 4.0], 70))]).unwrap();
        assert_eq!(pooled.per_iter_s, [3.0, 1.0, 2.0, 9.0, 4.0]);
        assert_eq!(median(&pooled.per_iter_s), 3.0);
        assert_eq!(pooled.peak_rss_bytes, 70);
        let failed = pool_rounds(vec![Ok(m(&[1.0], 5)), Err("out of memory".into())]);
        assert_eq!(failed.unwrap_err(), "out of memory");
        assert!(pool_rounds(Vec::new()).is_err());
    }

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(702_753), "702,753");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(999), "999");
    }

    #[test]
    fn presets_are_valid_and_the_cifar_one_matches_the_ddpm_layout() {
        for p in [Preset::FashionMnist, Preset::Cifar] {
            p.info().unet.validate().unwrap();
        }
        let c = Preset::Cifar.info().unet;
        assert_eq!(c.block_out_channels, [32, 64, 64, 64]);
        assert_eq!(c.down_block_types[1], D::AttnDownBlock2D);
        assert_eq!(c.up_block_types[2], U::AttnUpBlock2D);
    }

    #[cfg(unix)]
    #[test]
    fn failures_are_described_in_one_line() {
        use std::os::unix::process::ExitStatusExt;
        let oom = describe_failure(
            ExitStatus::from_raw(6),
            "memory allocation of 123 bytes failed\n",
        );
        assert_eq!(oom, "out of memory (memory allocation of 123 bytes failed)");
        let panic = describe_failure(
            ExitStatus::from_raw(101 << 8),
            "\nthread 'main' panicked at src/x.rs:1:2:\nunsupported op\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        );
        assert_eq!(panic, "exit code 101: unsupported op");
        let killed = describe_failure(ExitStatus::from_raw(9), "");
        assert!(killed.contains("SIGKILL"), "{killed}");
    }
}
