//! Pictures the trainer writes: sample grids (PNG) and the loss curve.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{Device, Tensor};
use ddpm::model_file::ModelInfo;
use ddpm::pipeline::{GenerateOptions, Generation, to_rgba};
use ddpm::sampler::{SamplerKind, SamplerOptions, build_sampler};
use ddpm::schedule::NoiseSchedule;
use ddpm::unet::UNet;
use image::{Rgba, RgbaImage};

/// Read a tensor back to the host as f32 values, row-major.
pub fn to_vec(x: Tensor<4>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// Read a `[n, c, h, w]` tensor in [-1, 1] back as RGBA images.
pub fn tensor_to_rgba(x: Tensor<4>) -> Vec<Vec<u8>> {
    let shape = x.dims();
    to_rgba(&to_vec(x), shape)
}

/// Lay out equal-sized RGBA images in a grid with `cols` columns and a 2-pixel gutter.
pub fn grid(images: &[Vec<u8>], side: usize, cols: usize) -> RgbaImage {
    let cols = cols.max(1).min(images.len().max(1));
    let rows = images.len().div_ceil(cols);
    let pad = 2;
    let width = (cols * (side + pad) + pad) as u32;
    let height = (rows * (side + pad) + pad) as u32;
    let mut out = RgbaImage::from_pixel(width, height, Rgba([255, 255, 255, 255]));
    for (i, image) in images.iter().enumerate() {
        let (r, c) = (i / cols, i % cols);
        let (x0, y0) = (pad + c * (side + pad), pad + r * (side + pad));
        for y in 0..side {
            for x in 0..side {
                let p = &image[(y * side + x) * 4..(y * side + x) * 4 + 4];
                out.put_pixel(
                    (x0 + x) as u32,
                    (y0 + y) as u32,
                    Rgba([p[0], p[1], p[2], p[3]]),
                );
            }
        }
    }
    out
}

/// Save an image as PNG, atomically.
pub fn save_png(image: &RgbaImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .context("encoding PNG")?;
    crate::checkpoint::write_atomic(path, &bytes)
}

/// Sample `n` images with DDIM and save them as a grid (the trainer's progress pictures).
#[allow(clippy::too_many_arguments)]
pub fn sample_grid(
    model: &UNet,
    info: &ModelInfo,
    schedule: &NoiseSchedule,
    steps: usize,
    n: usize,
    seed: u64,
    device: &Device,
    path: &Path,
) -> Result<()> {
    let steps = steps.clamp(1, schedule.num_train_timesteps());
    let ddim = || {
        build_sampler(
            SamplerKind::Ddim,
            schedule,
            info.prediction,
            steps,
            &SamplerOptions::default(),
        )
    };
    // A class-conditional model draws its classes in turn.
    let classes = info.num_classes();
    let mut images = Vec::new();
    if classes == 0 {
        let options = GenerateOptions {
            n,
            seed,
            ..GenerateOptions::default()
        };
        let generation = Generation::new(model, info, ddim()?, &options, device)?;
        images = tensor_to_rgba(generation.run());
    } else {
        let per_class = n.div_ceil(classes).max(1);
        for class in 0..classes {
            let options = GenerateOptions {
                n: per_class,
                seed: seed + class as u64,
                class: Some(class),
                ..GenerateOptions::default()
            };
            let generation = Generation::new(model, info, ddim()?, &options, device)?;
            images.extend(tensor_to_rgba(generation.run()));
        }
    }
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    save_png(&grid(&images, info.unet.sample_size, cols), path)
}

/// Plot the loss (log scale, with a moving average) as a PNG.
pub fn loss_curve(rows: &[(u64, f64)], path: &Path) -> Result<()> {
    let (w, h, margin) = (640u32, 360u32, 40u32);
    let mut img = RgbaImage::from_pixel(w, h, Rgba([255, 255, 255, 255]));
    let axis = Rgba([0, 0, 0, 255]);
    for x in margin..w - 10 {
        img.put_pixel(x, h - margin, axis);
    }
    for y in 10..h - margin {
        img.put_pixel(margin, y, axis);
    }
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter(|(_, l)| *l > 0.0 && l.is_finite())
        .map(|&(s, l)| (s as f64, l.ln()))
        .collect();
    if points.len() >= 2 {
        let (x_min, x_max) = (
            points[0].0,
            points[points.len() - 1].0.max(points[0].0 + 1.0),
        );
        let (y_min, y_max) = points
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let y_span = (y_max - y_min).max(1e-6);
        let to_px = |x: f64, y: f64| {
            let px = margin as f64 + (x - x_min) / (x_max - x_min) * (w - margin - 10) as f64;
            let py = 10.0 + (y_max - y) / y_span * (h - margin - 10) as f64;
            (px, py)
        };
        let raw = Rgba([170, 190, 230, 255]);
        for p in &points {
            let (x, y) = to_px(p.0, p.1);
            img.put_pixel(x as u32 % w, (y as u32).min(h - 1), raw);
        }
        // Moving average over ~1% of the run.
        let k = (points.len() / 100).max(1);
        let mut prev: Option<(f64, f64)> = None;
        let line = Rgba([200, 40, 40, 255]);
        for i in (0..points.len()).step_by(k) {
            let window = &points[i.saturating_sub(k)..(i + k).min(points.len())];
            let mean = window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64;
            let (x, y) = to_px(points[i].0, mean);
            if let Some((x0, y0)) = prev {
                let n = ((x - x0).abs().max((y - y0).abs()) as usize).max(1);
                for j in 0..=n {
                    let t = j as f64 / n as f64;
                    let (px, py) = (x0 + (x - x0) * t, y0 + (y - y0) * t);
                    if px >= 0.0 && py >= 0.0 && (px as u32) < w && (py as u32) < h {
                        img.put_pixel(px as u32, py as u32, line);
                    }
                }
            }
            prev = Some((x, y));
        }
    }
    save_png(&img, path)
}
