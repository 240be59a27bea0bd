//! `ddpm bench --ceiling`: how fast the wasm module's CPU fallback could be on this CPU, at best,
//! beside the native binary. Every WebAssembly SIMD instruction works on 128 bits (four f32
//! lanes), while the native kernels use the CPU's widest vectors (AVX-512 or AVX2).
//!
//! It measures, on one thread:
//! - the peak rate of fused multiply-adds with 4, 8 and 16 f32 lanes (12 independent
//!   accumulators, no memory traffic): the ceiling of any code at that width;
//! - one UNet forward pass per batch size (median of 7), and the floating-point operations of
//!   its matrix products, counted by the kernels (`ddpm::unet::flex_kernels::matmul_flops`;
//!   burn's own matmuls, the linear layers, are not counted, so the figure is a lower bound).
//!
//! From them it prints the rate a 4-lane engine would need to run the same matrix products within
//! a given factor of the native forward, as a share of the 4-lane peak. `benches/browser.mjs`
//! reads its `--json` report.
// The peak loops call SIMD intrinsics of the widths the CPU reports.
#![allow(unsafe_code)]

use std::fs;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ddpm::model_file::ModelInfo;
use ddpm::noise::SeededNoise;
use ddpm::unet::UNet;
use ddpm::unet::flex_kernels::matmul_flops;
use serde::Serialize;

use crate::bench::median;

/// Timed forward passes per batch size.
const FORWARDS: usize = 7;

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    const CHAINS: usize = 12;

    /// `unsafe fn $name(iters) -> GFLOP/s`: `iters` rounds of 12 independent FMAs on `$lanes`
    /// lanes, with `$set1` and `$fmadd` of that width, compiled for `$features`.
    macro_rules! fma_peak {
        ($name:ident, $lanes:literal, $features:literal, $set1:ident, $fmadd:ident) => {
            #[doc = concat!("GFLOP/s of `iters` rounds of 12 independent ", $lanes, "-lane FMAs.")]
            ///
            /// # Safety
            #[doc = concat!("The CPU has ", $features, " (checked by the caller).")]
            #[target_feature(enable = $features)]
            unsafe fn $name(iters: u64) -> f64 {
                let (x, y) = ($set1(black_box(0.999)), $set1(black_box(1e-4)));
                let mut acc = [$set1(1.0); CHAINS];
                let start = Instant::now();
                for _ in 0..iters {
                    for a in acc.iter_mut() {
                        *a = $fmadd(*a, x, y);
                    }
                }
                let s = start.elapsed().as_secs_f64();
                black_box(acc);
                (iters * CHAINS as u64 * $lanes * 2) as f64 / s / 1e9
            }
        };
    }
    fma_peak!(lanes4, 4, "avx,fma", _mm_set1_ps, _mm_fmadd_ps);
    fma_peak!(lanes8, 8, "avx2,fma", _mm256_set1_ps, _mm256_fmadd_ps);
    fma_peak!(lanes16, 16, "avx512f", _mm512_set1_ps, _mm512_fmadd_ps);

    /// The median peak GFLOP/s (of 5) at each width the CPU has: `(lanes, GFLOP/s)`.
    pub fn measure() -> Vec<(usize, f64)> {
        let iters = 20_000_000;
        let mut out = Vec::new();
        let repeat = |f: &dyn Fn() -> f64| {
            let runs: Vec<f64> = (0..5).map(|_| f()).collect();
            crate::bench::median(&runs)
        };
        if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx") {
            // SAFETY: FMA and AVX are present (checked above).
            out.push((4, repeat(&|| unsafe { lanes4(iters) })));
        }
        if is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 and FMA are present.
            out.push((8, repeat(&|| unsafe { lanes8(iters) })));
        }
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            out.push((16, repeat(&|| unsafe { lanes16(iters / 2) })));
        }
        out
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod peak {
    /// Only x86-64 is measured.
    pub fn measure() -> Vec<(usize, f64)> {
        Vec::new()
    }
}

/// One batch size's native forward.
#[derive(Debug, Serialize)]
struct Forward {
    batch: usize,
    /// Median milliseconds of one forward pass on one thread.
    forward_ms: f64,
    /// GFLOP of the kernels' matrix products in one forward pass.
    matmul_gflop: f64,
}

/// The `--json` report.
#[derive(Debug, Serialize)]
struct Report {
    /// Peak GFLOP/s by vector width in f32 lanes ("4", "8", "16"), where the CPU has it.
    peak_gflops_by_lanes: serde_json::Map<String, serde_json::Value>,
    forwards: Vec<Forward>,
}

/// One forward pass of `batch` seeded-noise images at t = 500 (labels cycling through the
/// classes of a conditional model), on the calling thread's pool: the median time of
/// [`FORWARDS`] after two untimed ones, and the matrix products' GFLOP per pass.
fn time_forward(model: &UNet, info: &ModelInfo, batch: usize) -> Forward {
    let device = Device::flex();
    let u = &info.unet;
    let shape = [batch, u.in_channels, u.sample_size, u.sample_size];
    let x = Tensor::<4>::from_data(
        TensorData::new(
            SeededNoise::new(0).sample_vec(shape.iter().product()),
            shape,
        ),
        &device,
    );
    let t = Tensor::<1>::from_data(TensorData::new(vec![500.0f32; batch], [batch]), &device);
    let classes = info.num_classes();
    let labels = (classes > 0).then(|| {
        let l: Vec<i64> = (0..batch).map(|i| (i % classes) as i64).collect();
        Tensor::<1, Int>::from_data(TensorData::new(l, [batch]), &device)
    });
    let forward = || {
        let y = model.forward(x.clone(), t.clone(), labels.clone());
        let _ = y.into_data();
    };
    forward();
    forward();
    let before = matmul_flops();
    let times: Vec<f64> = (0..FORWARDS)
        .map(|_| {
            let start = Instant::now();
            forward();
            start.elapsed().as_secs_f64()
        })
        .collect();
    Forward {
        batch,
        forward_ms: median(&times) * 1e3,
        matmul_gflop: (matmul_flops() - before) as f64 / FORWARDS as f64 / 1e9,
    }
}

/// Measure the peaks and each batch's forward on one thread; print them (and write `json`).
pub fn run(
    model: &UNet,
    info: &ModelInfo,
    label: &str,
    batches: &[usize],
    json: Option<&Path>,
) -> Result<()> {
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .context("setting up a one-thread pool")?;
    let (peaks, forwards) = one.install(|| {
        let peaks = peak::measure();
        let forwards: Vec<Forward> = batches
            .iter()
            .map(|&b| time_forward(model, info, b))
            .collect();
        (peaks, forwards)
    });

    println!("one thread; f32 fused multiply-adds, 12 independent chains, median of 5:");
    if peaks.is_empty() {
        println!("  (peak rates are measured on x86-64 only)");
    }
    for (lanes, g) in &peaks {
        println!(
            "  {lanes:>2} lanes ({:>3}-bit): {g:6.1} GFLOP/s",
            lanes * 32
        );
    }
    let p4 = peaks.iter().find(|(lanes, _)| *lanes == 4).map(|&(_, g)| g);
    for f in &forwards {
        let s = f.forward_ms / 1e3;
        println!(
            "native forward of {} images ({label}): {:.1} ms (median of {FORWARDS}); its matrix \
             products: {:.2} GFLOP, {:.1} GFLOP/s",
            f.batch,
            f.forward_ms,
            f.matmul_gflop,
            f.matmul_gflop / s
        );
        if let Some(p4) = p4 {
            for factor in [1.5, 2.0, 3.0] {
                let need = f.matmul_gflop / (factor * s);
                println!(
                    "  within {factor}× of it, the matrix products alone need {need:5.1} GFLOP/s: \
                     {:3.0} % of the 4-lane peak",
                    100.0 * need / p4
                );
            }
        }
    }
    if let Some(path) = json {
        let report = Report {
            peak_gflops_by_lanes: peaks
                .iter()
                .map(|(lanes, g)| (lanes.to_string(), (*g).into()))
                .collect(),
            forwards,
        };
        fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
