//! `ddpm sample`, `ddpm export`, `ddpm import`: from a model file to pictures or raw floats,
//! and between model-file flavours.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::{Tensor, TensorData};
use clap::{Args, ValueEnum};
use ddpm::model_file::{self, StoreDType};
use ddpm::pipeline::{GenerateOptions, Generation};
use ddpm::sampler::{SamplerKind, SamplerOptions, TimestepSpacing, build_sampler};
use ddpm::schedule::NoiseSchedule;
use npyz::WriterBuilder;

use crate::backend::{self, BackendChoice};
use crate::checkpoint;
use crate::images;

/// Output formats of `ddpm sample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One PNG grid (rows are trajectory frames with --frames).
    Png,
    /// One PNG per image in the directory given by --out.
    Pngs,
    /// The raw final samples as a float32 `.npy` array `[n, channels, h, w]` in [-1, 1].
    Npy,
}

/// The flags every generating command shares (`ddpm sample`, `img2img`, `inpaint`).
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Model file (`model.safetensors` of a run, or an exported / imported file).
    #[arg(long)]
    pub model: PathBuf,
    /// Seed of the initial noise and of every noise draw after it.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Class (name or number) for a class-conditional model.
    #[arg(long)]
    pub class: Option<String>,
    /// Classifier-free guidance scale (1 = none).
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f64,
    /// Save K frames of the denoising trajectory (rows of the grid, noise to image).
    #[arg(long)]
    pub frames: Option<usize>,
    /// Don't clip the predicted x_0 to [-1, 1] at each step.
    #[arg(long)]
    pub no_clip: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "png")]
    pub format: Format,
    /// Output file (png, npy) or directory (pngs).
    #[arg(long, default_value = "samples.png")]
    pub out: PathBuf,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
}

/// The sampler flags of `ddpm sample` and `ddpm img2img`.
#[derive(Debug, Args)]
pub struct SamplerArgs {
    /// Sampler.
    #[arg(long, default_value = "ddim", value_parser = parse_named::<SamplerKind>)]
    pub sampler: SamplerKind,
    /// Number of denoising steps (model evaluations; img2img runs ⌊steps · strength⌋ of them).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// DDIM's η (0 = deterministic, 1 = as noisy as DDPM).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
    /// Which of the T training timesteps the steps visit (diffusers' `timestep_spacing`):
    /// leading (starts below T−1), trailing (starts at T−1) or linspace. Default: the model
    /// file's spacing, else the sampler's diffusers default (leading for ddpm and ddim,
    /// linspace for dpm-solver++).
    #[arg(long, value_parser = parse_named::<TimestepSpacing>)]
    pub timestep_spacing: Option<TimestepSpacing>,
}

impl SamplerArgs {
    /// The sampler options these flags set, with clipping and guidance.
    pub fn options(&self, clip_sample: bool, guidance: f64) -> SamplerOptions {
        SamplerOptions {
            eta: self.eta,
            clip_sample,
            timestep_spacing: self.timestep_spacing,
            ..SamplerOptions::default()
        }
        .guided(guidance)
    }

    /// "50 ddim steps", with [`SamplerArgs::settings`] for the spacing these flags sample
    /// `info`'s model with ([`SamplerOptions::for_model`]).
    pub fn describe(&self, info: &model_file::ModelInfo) -> String {
        let spacing = self.options(true, 1.0).for_model(info).timestep_spacing;
        let settings = self.settings(spacing);
        format!("{} {} steps{settings}", self.steps, self.sampler)
    }

    /// ", η 1, trailing spacing": η, and `spacing` (the one in use: the flag's, else the model
    /// file's), where they are not the defaults.
    pub fn settings(&self, spacing: Option<TimestepSpacing>) -> String {
        let mut text = String::new();
        if self.eta != 0.0 {
            text.push_str(&format!(", η {}", self.eta));
        }
        if let Some(spacing) = spacing {
            text.push_str(&format!(", {spacing} spacing"));
        }
        text
    }
}

/// `ddpm sample` flags.
#[derive(Debug, Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub sampling: SamplerArgs,
    /// Number of images (with --interpolate: points from one seed to the other).
    #[arg(long, default_value_t = 16)]
    pub n: usize,
    /// Start from this x_T (`.npy`, float32, `[n, channels, h, w]`) instead of seeded noise.
    #[arg(long, conflicts_with = "interpolate")]
    pub noise: Option<PathBuf>,
    /// One row from seed A's image to seed B's (`A,B`): --n points on the great circle between
    /// the two seeds' x_T, decoded by the sampler (deterministic with DDIM at η = 0).
    #[arg(long, value_name = "A,B", value_parser = parse_seed_pair)]
    pub interpolate: Option<(u64, u64)>,
}

/// A flag value by its `ddpm` name (a sampler, a timestep spacing), with the library's error.
fn parse_named<T: std::str::FromStr<Err = ddpm::Error>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: ddpm::Error| e.to_string())
}

fn parse_seed_pair(s: &str) -> Result<(u64, u64), String> {
    let seeds: Vec<&str> = s.split(',').map(str::trim).collect();
    let parse = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{v:?} is not a seed (a whole number ≥ 0)"))
    };
    match seeds.as_slice() {
        [a, b] => Ok((parse(a)?, parse(b)?)),
        _ => Err(format!(
            "give two seeds separated by a comma, e.g. --interpolate 3,7 (got {s:?})"
        )),
    }
}

/// Read a float32 `.npy` array of rank 4.
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, [usize; 4])> {
    let bytes = checkpoint::read(path)?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .with_context(|| format!("{}: not a .npy file", path.display()))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let shape: [usize; 4] = shape.clone().try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: shape {shape:?} is not [n, channels, height, width]",
            path.display()
        )
    })?;
    let values: Vec<f32> = npy
        .into_vec::<f32>()
        .with_context(|| format!("{}: expected float32 data", path.display()))?;
    ensure!(
        values.len() == shape.iter().product::<usize>(),
        "{}: truncated data",
        path.display()
    );
    ensure!(
        values.iter().all(|v| v.is_finite()),
        "{}: holds NaN or infinite values",
        path.display()
    );
    Ok((values, shape))
}

/// Write a float32 `.npy` array.
pub fn write_npy(path: &Path, values: &[f32], shape: &[usize]) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut writer = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&shape.iter().map(|&d| d as u64).collect::<Vec<_>>())
            .writer(&mut bytes)
            .begin_nd()?;
        writer.extend(values.iter().copied())?;
        writer.finish()?;
    }
    checkpoint::write_atomic(path, &bytes)
}

/// The model's noise schedule, after checking that `steps` sampling steps fit in it.
pub(crate) fn schedule_for(info: &model_file::ModelInfo, steps: usize) -> Result<NoiseSchedule> {
    let schedule = NoiseSchedule::new(&info.schedule)?;
    ensure!(
        (1..=schedule.num_train_timesteps()).contains(&steps),
        "--steps {steps} must be between 1 and the model's {} training timesteps",
        schedule.num_train_timesteps()
    );
    Ok(schedule)
}

/// A model file loaded for a generating command, with the class it was asked for.
pub(crate) struct Loaded {
    pub model: ddpm::unet::UNet,
    pub info: model_file::ModelInfo,
    pub selected: backend::Selected,
    pub class: Option<usize>,
}

impl Loaded {
    /// Read the model file, check `--class` against it, and load it on the chosen backend.
    pub fn open(args: &OutputArgs) -> Result<Self> {
        let bytes = checkpoint::read(&args.model)?;
        let info = model_file::read_info(&bytes)
            .with_context(|| format!("{} is not a usable model file", args.model.display()))?;
        let class = match &args.class {
            None if info.unet.num_class_embeds.is_some() => {
                let known = match info.class_names.as_slice() {
                    [] => format!("0 to {}", info.num_classes().saturating_sub(1)),
                    names => names.join(", "),
                };
                bail!(
                    "{} is class-conditional: choose a class with --class (a name or number: {known})",
                    args.model.display()
                );
            }
            None => None,
            Some(c) => Some(
                crate::data::class_index(&info.class_names, c).with_context(|| {
                    if info.class_names.is_empty() {
                        format!("unknown class {c:?}: the model has no class names")
                    } else {
                        format!(
                            "unknown class {c:?}: the model knows {}",
                            info.class_names.join(", ")
                        )
                    }
                })?,
            ),
        };
        let selected = backend::select(args.backend)?;
        let (model, _) = model_file::load(&bytes, &selected.device)
            .with_context(|| format!("loading {}", args.model.display()))?;
        Ok(Self {
            model,
            info,
            selected,
            class,
        })
    }

    /// The `GenerateOptions` for `n` images.
    pub fn generate_options(&self, args: &OutputArgs, n: usize) -> GenerateOptions {
        GenerateOptions {
            n,
            seed: args.seed,
            class: self.class,
            guidance: args.guidance,
            part: None,
        }
    }

    /// A sampler for the model, with the output flags' clipping and guidance.
    pub fn sampler(
        &self,
        args: &SamplerArgs,
        out: &OutputArgs,
    ) -> Result<Box<dyn ddpm::sampler::Sampler + Send>> {
        let schedule = schedule_for(&self.info, args.steps)?;
        let options = args
            .options(!out.no_clip, out.guidance)
            .for_model(&self.info);
        Ok(build_sampler(
            args.sampler,
            &schedule,
            self.info.prediction,
            args.steps,
            &options,
        )?)
    }
}

/// Run a generation to the end, keeping `--frames` states, and write the output; `what` names
/// the run in the summary line ("16 images, 50 ddim steps"). With `layout_row`, a single-frame
/// PNG puts every image in one row (an interpolation) instead of a square grid.
pub(crate) fn finish(
    mut generation: Generation<'_>,
    loaded: &Loaded,
    args: &OutputArgs,
    what: &str,
    layout_row: bool,
) -> Result<()> {
    let total = generation.total_steps();
    let frames = args.frames.unwrap_or(0);
    ensure!(
        frames <= total + 1,
        "--frames {frames} is more than the {} states of a {total}-step run",
        total + 1
    );
    // Which states to keep: evenly spaced from the start (state 0) to x_0 (state `total`).
    let keep: Vec<usize> = match frames {
        0 | 1 => vec![total],
        k => (0..k)
            .map(|i| ((i * total) as f64 / (k - 1) as f64).round() as usize)
            .collect(),
    };
    let mut kept = Vec::new();
    let bar = indicatif::ProgressBar::new(total as u64);
    let start = std::time::Instant::now();
    for state in 0..=total {
        if keep.contains(&state) {
            kept.push(generation.sample().clone());
        }
        if state < total {
            generation.step();
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let last = generation.sample().clone();
    let shape = last.dims();
    eprintln!(
        "{} images, {what} on {} in {:.1} s",
        shape[0],
        loaded.selected.name,
        start.elapsed().as_secs_f64()
    );
    write_images(args, &loaded.info, kept, last, layout_row || keep.len() > 1)
}

/// Write the final images (and the kept frames, one row each) in `args.format`.
pub(crate) fn write_images(
    args: &OutputArgs,
    info: &model_file::ModelInfo,
    kept: Vec<Tensor<4>>,
    last: Tensor<4>,
    rows: bool,
) -> Result<()> {
    let shape = last.dims();
    match args.format {
        Format::Npy => {
            let values = images::to_vec(last);
            write_npy(&args.out, &values, &shape)?;
        }
        Format::Pngs => {
            fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            let side = info.unet.sample_size;
            for (i, rgba) in images::tensor_to_rgba(last).into_iter().enumerate() {
                let image = image::RgbaImage::from_raw(side as u32, side as u32, rgba)
                    .expect("size matches");
                images::save_png(&image, &args.out.join(format!("{i:05}.png")))?;
            }
        }
        Format::Png => {
            let images: Vec<Vec<u8>> = if kept.len() > 1 {
                // One row per frame, one column per image.
                kept.into_iter().flat_map(images::tensor_to_rgba).collect()
            } else {
                images::tensor_to_rgba(last)
            };
            let cols = if rows {
                shape[0]
            } else {
                (shape[0] as f64).sqrt().ceil() as usize
            };
            images::save_png(
                &images::grid(&images, info.unet.sample_size, cols),
                &args.out,
            )?;
        }
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Run `ddpm sample`.
pub fn run(args: SampleArgs) -> Result<()> {
    let out = &args.output;
    let loaded = Loaded::open(out)?;
    let sampling = &args.sampling;
    let sampler = loaded.sampler(sampling, out)?;
    let generate = loaded.generate_options(out, args.n);
    let device = &loaded.selected.device;
    let (model, info) = (&loaded.model, &loaded.info);
    let generation = match (&args.noise, args.interpolate) {
        (Some(path), _) => {
            let (values, shape) = read_npy(path)?;
            let x_t = Tensor::<4>::from_data(TensorData::new(values, shape), device);
            Generation::from_noise(model, info, sampler, &generate, x_t, device)
        }
        (None, Some(seeds)) => {
            let stochastic = sampling.sampler == SamplerKind::Ddpm
                || (sampling.sampler == SamplerKind::Ddim && sampling.eta != 0.0);
            if stochastic {
                eprintln!(
                    "note: {} {}draws fresh noise at every step, so the row's ends are not \
                     exactly seeds {} and {}; DDIM with η = 0 decodes deterministically",
                    sampling.sampler,
                    if sampling.sampler == SamplerKind::Ddim {
                        "with η > 0 "
                    } else {
                        ""
                    },
                    seeds.0,
                    seeds.1
                );
            }
            Generation::interpolate(model, info, sampler, &generate, seeds, device)
        }
        (None, None) => Generation::new(model, info, sampler, &generate, device),
    }?
    .with_batch_threads(loaded.selected.batch_threads);
    let what = sampling.describe(&loaded.info);
    finish(generation, &loaded, out, &what, args.interpolate.is_some())
}

/// `ddpm export` flags.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run directory (its newest checkpoint's EMA weights), a checkpoint directory, or a
    /// model file.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Store the weights as float16 (half the size; for the web page).
    #[arg(long, conflicts_with = "state")]
    pub f16: bool,
    /// Output model file.
    #[arg(long, required_unless_present = "state")]
    pub out: Option<PathBuf>,
    /// Instead of a model file, write the run's compact saved state to this directory (f32
    /// weights, f16 EMA, bf16 optimizer moments, thinned loss log), replacing an earlier saved
    /// state there. `ddpm train --resume DIR --out RUN` continues it.
    #[arg(long, conflicts_with = "out")]
    pub state: Option<PathBuf>,
    /// Record in the model file the timestep spacing it samples with when none is asked for
    /// (diffusers' `timestep_spacing` in a scheduler config): leading, trailing or linspace.
    /// `ddpm sample`, `eval`, the edit commands and the page then use it for every sampler;
    /// their own `--timestep-spacing` still overrides it. Default: keep the source's.
    #[arg(long, conflicts_with = "state", value_parser = parse_named::<TimestepSpacing>)]
    pub timestep_spacing: Option<TimestepSpacing>,
}

fn export_source(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.join("ema.safetensors").is_file() {
        return Ok(path.join("ema.safetensors"));
    }
    if let Some(newest) = checkpoint::list(path).first() {
        return Ok(newest.join("ema.safetensors"));
    }
    if path.join("model.safetensors").is_file() {
        return Ok(path.join("model.safetensors"));
    }
    bail!(
        "{} is neither a model file, a checkpoint, nor a run directory with checkpoints",
        path.display()
    )
}

/// Save a model file (f16 or f32 weights) atomically; returns its bytes.
fn write_model(
    model: &ddpm::unet::UNet,
    info: &model_file::ModelInfo,
    f16: bool,
    out: &Path,
) -> Result<Vec<u8>> {
    let dtype = if f16 {
        StoreDType::F16
    } else {
        StoreDType::F32
    };
    let bytes = model_file::save(model, info, dtype)?;
    checkpoint::write_atomic(out, &bytes)?;
    Ok(bytes)
}

/// Run `ddpm export`.
pub fn export(args: ExportArgs) -> Result<()> {
    if let Some(dest) = &args.state {
        let run = &args.checkpoint;
        let config = fs::read(run.join("config.json")).with_context(|| {
            format!(
                "--state needs a run directory: {} has no readable config.json",
                run.display()
            )
        })?;
        let log_every = serde_json::from_slice::<serde_json::Value>(&config)
            .ok()
            .and_then(|c| c["log_every"].as_u64())
            .unwrap_or(100);
        let saved = checkpoint::save_state(run, dest, log_every)?;
        println!(
            "wrote the saved state of {} at step {} to {} ({:.2} MB); continue it with \
             `ddpm train --resume {} --out RUN`",
            run.display(),
            saved.step,
            dest.display(),
            saved.bytes as f64 / 1e6,
            dest.display()
        );
        return Ok(());
    }
    let out_path = args
        .out
        .as_deref()
        .expect("clap requires --out without --state");
    let source = export_source(&args.checkpoint)?;
    let bytes = checkpoint::read(&source)?;
    let device = burn::tensor::Device::flex();
    let (model, mut info) = model_file::load(&bytes, &device)
        .with_context(|| format!("{} is not a usable model file", source.display()))?;
    if args.timestep_spacing.is_some() {
        info.timestep_spacing = args.timestep_spacing;
    }
    let out = write_model(&model, &info, args.f16, out_path)?;
    let spacing = info
        .timestep_spacing
        .map(|s| format!(", samples with {s} timestep spacing"))
        .unwrap_or_default();
    println!(
        "wrote {} ({:.2} MB, {} parameters, {}{spacing}) from {}",
        out_path.display(),
        out.len() as f64 / 1e6,
        model_file::num_params(&model),
        if args.f16 { "f16" } else { "f32" },
        source.display()
    );
    Ok(())
}

/// `ddpm import` flags.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A diffusers `UNet2DModel` directory (config.json + diffusion_pytorch_model.safetensors),
    /// or a pipeline directory with a `unet/` (and `scheduler/`) inside.
    #[arg(long)]
    pub diffusers: PathBuf,
    /// Store the weights as float16.
    #[arg(long)]
    pub f16: bool,
    /// Names of the classes of a class-conditional UNet, in label order (comma-separated), or
    /// `fashion-mnist` for its ten. With one class embedding more than names, the last
    /// embedding is the null class that classifier-free guidance needs.
    #[arg(long, value_delimiter = ',')]
    pub class_names: Vec<String>,
    /// Output model file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Run `ddpm import`.
pub fn import(args: ImportArgs) -> Result<()> {
    let root = &args.diffusers;
    let unet_dir = if root.join("unet/config.json").is_file() {
        root.join("unet")
    } else {
        root.clone()
    };
    let config_path = unet_dir.join("config.json");
    let config = fs::read_to_string(&config_path).with_context(|| {
        format!(
            "reading {} (a diffusers UNet2DModel directory?)",
            config_path.display()
        )
    })?;
    let weights_path = unet_dir.join("diffusion_pytorch_model.safetensors");
    let weights = fs::read(&weights_path).with_context(|| {
        format!(
            "reading {} (only safetensors weights are supported)",
            weights_path.display()
        )
    })?;
    let scheduler = [
        root.join("scheduler/scheduler_config.json"),
        unet_dir.join("scheduler_config.json"),
        root.join("scheduler_config.json"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .map(|p| fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
    .transpose()?;
    let device = burn::tensor::Device::flex();
    let (model, mut info) =
        model_file::import_diffusers(&config, scheduler.as_deref(), &weights, &device)
            .with_context(|| format!("importing {}", unet_dir.display()))?;
    if !args.class_names.is_empty() {
        let names: Vec<String> = if args.class_names == ["fashion-mnist"] {
            crate::data::FASHION_MNIST_CLASSES
                .iter()
                .map(|c| c.to_string())
                .collect()
        } else {
            args.class_names.clone()
        };
        let embeds = info.unet.num_class_embeds.with_context(|| {
            format!(
                "--class-names: {} is unconditional (no num_class_embeds); drop the flag",
                unet_dir.display()
            )
        })?;
        ensure!(
            names.len() == embeds || names.len() + 1 == embeds,
            "--class-names gives {} names but the UNet has {embeds} class embeddings: give \
             {embeds} names, or {} when the last embedding is the null class",
            names.len(),
            embeds - 1
        );
        info.class_names = names;
    }
    write_model(&model, &info, args.f16, &args.out)?;
    println!(
        "wrote {} ({} parameters, {}x{}x{} images, {} schedule, {:?} prediction)",
        args.out.display(),
        model_file::num_params(&model),
        info.unet.sample_size,
        info.unet.sample_size,
        info.unet.in_channels,
        serde_json::to_value(info.schedule.beta_schedule)?
            .as_str()
            .unwrap_or("?"),
        info.prediction
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use ddpm::schedule::{NoiseSchedule, ScheduleConfig};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sampling: SamplerArgs,
    }

    /// The timesteps a sampler built from these flags visits, T = 1000.
    fn timesteps(flags: &[&str]) -> Vec<usize> {
        timesteps_for(flags, None)
    }

    /// The same for a model file that records `spacing` as its own.
    fn timesteps_for(flags: &[&str], spacing: Option<TimestepSpacing>) -> Vec<usize> {
        let args = Cli::try_parse_from(std::iter::once("ddpm").chain(flags.iter().copied()))
            .unwrap()
            .sampling;
        let schedule = NoiseSchedule::new(&ScheduleConfig::default()).unwrap();
        let mut info = model_file::ModelInfo::new(Default::default());
        info.timestep_spacing = spacing;
        build_sampler(
            args.sampler,
            &schedule,
            Default::default(),
            args.steps,
            &args.options(true, 1.0).for_model(&info),
        )
        .unwrap()
        .timesteps()
        .to_vec()
    }

    /// `--timestep-spacing` reaches the sampler: with T = 1000 and 4 steps, leading spacing is
    /// 750, 500, 250, 0 (DDIM's and DDPM's default), trailing 999, 749, 499, 249 and linspace
    /// round(999·k/3); Lin et al. 2023, Table 2.
    #[test]
    fn timestep_spacing_flag_picks_the_timesteps() {
        let leading = vec![750, 500, 250, 0];
        let trailing = vec![999, 749, 499, 249];
        let linspace = vec![999, 666, 333, 0];
        for sampler in ["ddim", "ddpm"] {
            let base = ["--sampler", sampler, "--steps", "4"];
            assert_eq!(timesteps(&base), leading, "{sampler}");
            let with = |spacing| timesteps(&[&base[..], &["--timestep-spacing", spacing]].concat());
            assert_eq!(with("leading"), leading, "{sampler}");
            assert_eq!(with("trailing"), trailing, "{sampler}");
            assert_eq!(with("linspace"), linspace, "{sampler}");
        }
        // DPM-Solver++'s linspace takes N + 1 points and drops the last (diffusers'
        // DPMSolverMultistepScheduler).
        let dpm = ["--sampler", "dpm-solver++", "--steps", "4"];
        assert_eq!(timesteps(&dpm), vec![999, 749, 500, 250]);
        let err = Cli::try_parse_from(["ddpm", "--timestep-spacing", "middle"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(
                "unknown timestep spacing \"middle\" (expected leading, trailing or linspace)"
            ),
            "{err}"
        );
    }

    /// A model file's own spacing replaces every sampler's diffusers default, and
    /// `--timestep-spacing` still overrides it.
    #[test]
    fn the_model_files_spacing_is_the_default() {
        let trailing = Some(TimestepSpacing::Trailing);
        // DPM-Solver++'s leading spacing takes N + 1 points and drops the last, as diffusers'.
        for (sampler, leading) in [
            ("ddim", [750, 500, 250, 0]),
            ("ddpm", [750, 500, 250, 0]),
            ("dpm-solver++", [800, 600, 400, 200]),
        ] {
            let base = ["--sampler", sampler, "--steps", "4"];
            assert_eq!(
                timesteps_for(&base, trailing),
                [999, 749, 499, 249],
                "{sampler}"
            );
            let flag = [&base[..], &["--timestep-spacing", "leading"]].concat();
            assert_eq!(timesteps_for(&flag, trailing), leading, "{sampler}");
        }
    }

    /// The label of a run names η and the spacing only where they are not the defaults; a
    /// spacing the model file names is named too.
    #[test]
    fn describe_names_the_settings_that_differ() {
        let mut info = model_file::ModelInfo::new(Default::default());
        let parse = |flags: &[&str], info: &model_file::ModelInfo| {
            Cli::try_parse_from(std::iter::once("ddpm").chain(flags.iter().copied()))
                .unwrap()
                .sampling
                .describe(info)
        };
        assert_eq!(parse(&[], &info), "50 ddim steps");
        assert_eq!(
            parse(&["--eta", "1", "--timestep-spacing", "trailing"], &info),
            "50 ddim steps, η 1, trailing spacing"
        );
        info.timestep_spacing = Some(TimestepSpacing::Linspace);
        assert_eq!(parse(&[], &info), "50 ddim steps, linspace spacing");
        assert_eq!(
            parse(&["--timestep-spacing", "leading"], &info),
            "50 ddim steps, leading spacing"
        );
    }
}
