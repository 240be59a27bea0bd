//! Pictures the trainer writes: sample grids (PNG) and the loss curve.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::Tensor;
use ddpm::model_file::ModelInfo;
use ddpm::pipeline::{GenerateOptions, Generation, to_rgba};
use ddpm::sampler::{SamplerKind, SamplerOptions, build_sampler};
use ddpm::schedule::NoiseSchedule;
use ddpm::unet::UNet;
use image::{Rgba, RgbaImage};

use crate::backend::Selected;

/// Read a tensor back to the host as f32 values, row-major.
pub fn to_vec<const D: usize>(x: Tensor<D>) -> Vec<f32> {
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

/// DDIM with diffusers' defaults and the model's timestep spacing: the sampler of the training
/// grids and of `ddpm bench`.
pub fn ddim(
    schedule: &NoiseSchedule,
    info: &ModelInfo,
    steps: usize,
) -> ddpm::Result<Box<dyn ddpm::sampler::Sampler + Send>> {
    build_sampler(
        SamplerKind::Ddim,
        schedule,
        info.prediction,
        steps,
        &SamplerOptions::default().for_model(info),
    )
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
    backend: &Selected,
    path: &Path,
) -> Result<()> {
    let device = &backend.device;
    let steps = steps.clamp(1, schedule.num_train_timesteps());
    let ddim = || ddim(schedule, info, steps);
    // A class-conditional model draws its classes in turn.
    let classes = info.num_classes();
    let mut images = Vec::new();
    if classes == 0 {
        let options = GenerateOptions {
            n,
            seed,
            ..GenerateOptions::default()
        };
        let generation = Generation::new(model, info, ddim()?, &options, device)?
            .with_batch_threads(backend.batch_threads);
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
            let generation = Generation::new(model, info, ddim()?, &options, device)?
                .with_batch_threads(backend.batch_threads);
            images.extend(tensor_to_rgba(generation.run()));
        }
    }
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    save_png(&grid(&images, info.unet.sample_size, cols), path)
}

/// Draw `text` with the 8×8 basic-Latin bitmap font, top-left corner at (x, y).
fn draw_text(img: &mut RgbaImage, x: i64, y: i64, text: &str, color: Rgba<u8>) {
    for (k, ch) in text.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY
            .get(ch as usize)
            .copied()
            .unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                let (px, py) = (x + 8 * k as i64 + col, y + row as i64);
                if bits >> col & 1 == 1
                    && (0..img.width() as i64).contains(&px)
                    && (0..img.height() as i64).contains(&py)
                {
                    img.put_pixel(px as u32, py as u32, color);
                }
            }
        }
    }
}

/// Tick values for a log axis over [lo, hi] (natural-log units): 1, 2 and 5 times powers of
/// ten, thinned to at most about six.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (a, b) = (lo.exp(), hi.exp());
    let mut ticks = Vec::new();
    for e in (a.log10().floor() as i32)..=(b.log10().ceil() as i32) {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if v >= a && v <= b {
                ticks.push(v);
            }
        }
    }
    let stride = ticks.len().div_ceil(6).max(1);
    ticks.into_iter().step_by(stride).collect()
}

/// Round tick values for a linear axis over [lo, hi]: about five of them.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let mut v = (lo / step).ceil() * step;
    let mut ticks = Vec::new();
    while v <= hi + 1e-9 {
        ticks.push(v);
        v += step;
    }
    ticks
}

/// A loss value as a short label: `0.05`, `0.2`, `1`, `1.5e-3`.
fn loss_label(v: f64) -> String {
    if (1e-2..1e3).contains(&v) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        format!("{v:.0e}")
    }
}

/// Plot the loss against the step (log-scale loss axis with labelled ticks, the raw values as
/// dots and a moving average as a line) as a PNG.
pub fn loss_curve(rows: &[(u64, f64)], path: &Path) -> Result<()> {
    let (w, h) = (640u32, 360u32);
    let (left, right, top, bottom) = (64u32, 16u32, 24u32, 40u32);
    let mut img = RgbaImage::from_pixel(w, h, Rgba([255, 255, 255, 255]));
    let axis = Rgba([0, 0, 0, 255]);
    let grey = Rgba([110, 110, 110, 255]);
    for x in left..w - right {
        img.put_pixel(x, h - bottom, axis);
    }
    for y in top..=h - bottom {
        img.put_pixel(left, y, axis);
    }
    draw_text(&mut img, 4, 6, "loss (log scale)", axis);
    draw_text(
        &mut img,
        (w - right - 8 * 4) as i64,
        (h - 12) as i64,
        "step",
        axis,
    );
    let line = Rgba([200, 40, 40, 255]);
    draw_text(
        &mut img,
        (w - right - 8 * 26) as i64,
        6,
        "dots: loss, red: average",
        line,
    );
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
        let (y_min, y_max) = if y_max - y_min < 1e-6 {
            (y_min - 0.1, y_max + 0.1)
        } else {
            (y_min, y_max)
        };
        let plot_w = (w - left - right) as f64;
        let plot_h = (h - top - bottom) as f64;
        let to_px = |x: f64, y: f64| {
            let px = left as f64 + (x - x_min) / (x_max - x_min) * plot_w;
            let py = top as f64 + (y_max - y) / (y_max - y_min) * plot_h;
            (px, py)
        };
        for v in log_ticks(y_min, y_max) {
            let (_, py) = to_px(x_min, v.ln());
            for x in left - 4..left {
                img.put_pixel(x, py as u32, axis);
            }
            let label = loss_label(v);
            draw_text(
                &mut img,
                left as i64 - 6 - 8 * label.len() as i64,
                py as i64 - 4,
                &label,
                grey,
            );
        }
        for v in linear_ticks(x_min, x_max) {
            let (px, _) = to_px(v, y_min);
            for y in h - bottom..h - bottom + 4 {
                img.put_pixel((px as u32).min(w - 1), y, axis);
            }
            let label = format!("{}", v as u64);
            draw_text(
                &mut img,
                px as i64 - 4 * label.len() as i64,
                (h - bottom + 8) as i64,
                &label,
                grey,
            );
        }
        let raw = Rgba([170, 190, 230, 255]);
        for p in &points {
            let (x, y) = to_px(p.0, p.1);
            img.put_pixel((x as u32).min(w - 1), (y as u32).min(h - 1), raw);
        }
        // Moving average over ~1% of the run.
        let k = (points.len() / 100).max(1);
        let mut prev: Option<(f64, f64)> = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_are_round_values_inside_the_range() {
        let ticks = log_ticks(0.03f64.ln(), 0.9f64.ln());
        let expected = [0.05, 0.1, 0.2, 0.5];
        assert_eq!(ticks.len(), expected.len());
        for (t, e) in ticks.iter().zip(expected) {
            assert!((t - e).abs() < 1e-12, "{ticks:?}");
        }
    }

    #[test]
    fn linear_ticks_are_round_steps() {
        assert_eq!(
            linear_ticks(0.0, 1000.0),
            vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
        );
        assert_eq!(linear_ticks(1.0, 9.0), vec![2.0, 4.0, 6.0, 8.0]);
    }

    #[test]
    fn loss_labels_are_short() {
        assert_eq!(loss_label(0.05), "0.05");
        assert_eq!(loss_label(1.0), "1");
        assert_eq!(loss_label(0.002), "2e-3");
    }
}
