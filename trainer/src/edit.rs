//! `ddpm img2img` and `ddpm inpaint`: edit a picture with a model (SDEdit and RePaint, from
//! `ddpm::edit`), with `ddpm sample`'s output flags.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use clap::Args;
use ddpm::edit::{self, MaskCover, RePaint, RePaintOptions};
use ddpm::model_file::ModelInfo;
use ddpm::pipeline::Generation;
use image::{ImageFormat, ImageReader};

use crate::checkpoint;
use crate::sample::{self, Loaded, OutputArgs, SamplerArgs};

/// `ddpm img2img` flags.
#[derive(Debug, Args)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// The picture to vary (PNG or JPEG; center-cropped and resized to the model's size).
    #[arg(long)]
    pub image: PathBuf,
    /// How much to change, in (0, 1]: the image is noised to this fraction of the schedule and
    /// denoised from there (1 = ignore the image, small = stay close to it).
    #[arg(long, default_value_t = 0.6)]
    pub strength: f64,
    /// Number of variations (a grid).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplerArgs,
}

/// `ddpm inpaint` flags.
#[derive(Debug, Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    pub output: OutputArgs,
    /// The picture to complete (PNG or JPEG; center-cropped and resized to the model's size).
    #[arg(long)]
    pub image: PathBuf,
    /// The mask, the same size as the image: white = regenerate, black = keep.
    #[arg(long)]
    pub mask: PathBuf,
    /// RePaint's jump length j: steps taken back up at each jump.
    #[arg(long, default_value_t = 10)]
    pub jump: usize,
    /// RePaint's resampling count r: how often each jump point is passed (1 = no resampling).
    #[arg(long, default_value_t = 10)]
    pub resample: usize,
    /// Number of completions (a grid).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Reverse steps (model evaluations without the jumps back up).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// η of RePaint's step (0 = deterministic as diffusers' default, 1 = DDPM's variance).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eta: f64,
}

/// A picture read from disk: its size from the header first (absurd sizes are refused before
/// decoding), then its RGBA pixels.
struct Picture {
    rgba: Vec<u8>,
    width: usize,
    height: usize,
}

fn read_picture(path: &Path, what: &str) -> Result<Picture> {
    let bytes = checkpoint::read(path)?;
    let reader = ImageReader::new(Cursor::new(&bytes[..]))
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        _ => bail!(
            "{} is not a PNG or JPEG image: give the {what} as .png or .jpg",
            path.display()
        ),
    }
    let (w, h) = reader
        .into_dimensions()
        .with_context(|| format!("{}: unreadable image header", path.display()))?;
    edit::check_image_size(w as usize, h as usize)
        .with_context(|| format!("{} is too large to edit", path.display()))?;
    let image = ImageReader::new(Cursor::new(&bytes[..]))
        .with_guessed_format()?
        .decode()
        .with_context(|| format!("decoding {}", path.display()))?;
    Ok(Picture {
        rgba: image.to_rgba8().into_raw(),
        width: w as usize,
        height: h as usize,
    })
}

/// The picture at `path` fitted to the model, as a `[1, c, s, s]` tensor, and its size on disk
/// (width, height); says what was done to fit it.
fn read_image(
    path: &Path,
    info: &ModelInfo,
    device: &Device,
) -> Result<(Tensor<4>, (usize, usize))> {
    let picture = read_picture(path, "image")?;
    let c = info.unet.in_channels;
    let fitted = edit::fit_image(
        &picture.rgba,
        picture.width,
        picture.height,
        info.unet.sample_size,
        c,
    )?;
    if let Some(note) = &fitted.note {
        eprintln!("note: {}: {note}", path.display());
    }
    let size = (picture.width, picture.height);
    Ok((edit::image_tensor(fitted.values, c, device), size))
}

/// Run `ddpm img2img`.
pub fn img2img(args: Img2ImgArgs) -> Result<()> {
    let out = &args.output;
    // The strength first: a bad one fails before the model and image are read.
    let sampling = &args.sampling;
    edit::img2img_start(sampling.steps.max(1), args.strength)?;
    let loaded = Loaded::open(out)?;
    let device = &loaded.selected.device;
    let (image, _) = read_image(&args.image, &loaded.info, device)?;
    let sampler = loaded.sampler(sampling, out)?;
    let generate = loaded.generate_options(out, args.n);
    let generation = Generation::img2img(
        &loaded.model,
        &loaded.info,
        sampler,
        &generate,
        image,
        args.strength,
        device,
    )?
    .with_batch_threads(loaded.selected.batch_threads);
    let what = format!(
        "{} of {} {} steps (strength {})",
        generation.total_steps(),
        sampling.steps,
        sampling.sampler,
        args.strength
    );
    sample::finish(generation, &loaded, out, &what, false)
}

/// Run `ddpm inpaint`.
pub fn inpaint(args: InpaintArgs) -> Result<()> {
    let out = &args.output;
    let loaded = Loaded::open(out)?;
    let info = &loaded.info;
    let device = &loaded.selected.device;
    let schedule = sample::schedule_for(info, args.steps)?;
    let options = RePaintOptions {
        steps: args.steps,
        jump_length: args.jump,
        jump_n_sample: args.resample,
        eta: args.eta,
        clip_sample: !out.no_clip,
    };
    let repaint = RePaint::new(&schedule, info.prediction, &options).with_context(|| {
        format!(
            "--steps {}, --jump {}, --resample {}, --eta {}: RePaint cannot run these",
            args.steps, args.jump, args.resample, args.eta
        )
    })?;
    let (image, size) = read_image(&args.image, info, device)?;
    let mask_picture = read_picture(&args.mask, "mask")?;
    let mask = edit::fit_mask(
        &mask_picture.rgba,
        mask_picture.width,
        mask_picture.height,
        size,
        info.unet.sample_size,
    )
    .with_context(|| {
        format!(
            "the mask {} does not fit the image {}",
            args.mask.display(),
            args.image.display()
        )
    })?;
    match mask.cover {
        MaskCover::Nothing => {
            eprintln!(
                "note: the mask {} has no white pixels, so nothing is regenerated: writing the \
                 image unchanged",
                args.mask.display()
            );
            let image = image.repeat_dim(0, args.n.max(1));
            return sample::write_images(out, info, Vec::new(), image, false);
        }
        MaskCover::Everything => eprintln!(
            "note: the mask {} is white everywhere, so nothing of the image is kept: this is \
             plain sampling (with RePaint's schedule)",
            args.mask.display()
        ),
        MaskCover::Part => {}
    }
    let mask = edit::image_tensor(mask.values, 1, device);
    let generate = loaded.generate_options(out, args.n);
    let generation =
        Generation::inpaint(&loaded.model, info, repaint, &generate, image, mask, device)?
            .with_batch_threads(loaded.selected.batch_threads);
    let what = format!(
        "{} RePaint moves ({} steps, jump {}, resample {})",
        generation.total_steps(),
        args.steps,
        args.jump,
        args.resample
    );
    sample::finish(generation, &loaded, out, &what, false)
}
