//! How fast the wasm module's CPU fallback could be on this CPU, at best, beside the native
//! binary: every WebAssembly SIMD instruction works on 128 bits (four f32 lanes), while the
//! native kernels use the CPU's widest vectors (AVX-512 or AVX2).
//!
//! It measures, on one thread:
//! - the peak rate of fused multiply-adds with 4, 8 and 16 f32 lanes (12 independent
//!   accumulators, no memory traffic): the ceiling of any code at that width;
//! - one UNet forward pass of the native binary (median of 7), and the floating-point operations
//!   of its matrix products, counted by the kernels (`ddpm::unet::flex_kernels::matmul_flops`;
//!   burn's own matmuls, the linear layers, are not counted, so the figure is a lower bound).
//!
//! From them it prints the rate a 4-lane engine would need to run the same matrix products within
//! a given factor of the native forward, as a share of the 4-lane peak.
//!
//!   cargo run --release -p ddpm-trainer --example simd_ceiling -- [MODEL] [BATCH] [--json]
//!
//! MODEL defaults to the bundled `web/assets/fashion-mnist.safetensors`, BATCH to 8 (the browser
//! benchmark's 4 images with guidance). `--json` prints the figures as one JSON object instead
//! (`benches/browser.mjs` reads it).
// The peak loops call SIMD intrinsics of the widths the CPU reports.
#![allow(unsafe_code)]

use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ddpm::model_file;
use ddpm::noise::SeededNoise;
use ddpm::unet::flex_kernels::matmul_flops;

/// The `ddpm` binary's allocator and setting (`trainer/src/main.rs`), so the forward pass runs
/// as it does there: without them a quarter of it went to faulting in freed pages again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

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

    /// The median peak GFLOP/s at each width the CPU has: `(lanes, GFLOP/s)`.
    pub fn measure() -> Vec<(usize, f64)> {
        let iters = 20_000_000;
        let mut out = Vec::new();
        let repeat = |f: &dyn Fn() -> f64| super::median((0..5).map(|_| f()).collect());
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

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    args.retain(|a| a != "--json");
    let mut args = args.into_iter();
    let model_path = args
        .next()
        .unwrap_or_else(|| "web/assets/fashion-mnist.safetensors".into());
    let batch: usize = match args.next() {
        Some(b) => b
            .parse()
            .with_context(|| format!("BATCH must be a positive whole number, not {b:?}"))?,
        None => 8,
    };
    anyhow::ensure!(batch > 0, "BATCH must be a positive whole number, not 0");
    // SAFETY: as in trainer/src/main.rs: one integer into mimalloc's option table (15 is
    // `mi_option_purge_delay`; -1 never returns freed memory to the OS).
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .context("setting up one thread")?;

    let peaks = peak::measure();
    let bytes =
        std::fs::read(&model_path).with_context(|| format!("reading model file {model_path}"))?;
    let device = Device::flex();
    let (model, info) = model_file::load(&bytes, &device)?;
    let u = &info.unet;
    let shape = [batch, u.in_channels, u.sample_size, u.sample_size];
    let mut noise = SeededNoise::new(0);
    let x = Tensor::<4>::from_data(
        TensorData::new(noise.sample_vec(shape.iter().product()), shape),
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
    let times: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            forward();
            start.elapsed().as_secs_f64()
        })
        .collect();
    let gflop = (matmul_flops() - before) as f64 / 7.0 / 1e9;
    let s = median(times);
    if json {
        let peaks: serde_json::Map<String, serde_json::Value> = peaks
            .iter()
            .map(|(lanes, g)| (lanes.to_string(), (*g).into()))
            .collect();
        let report = serde_json::json!({
            "peak_gflops_by_lanes": peaks,
            "batch": batch,
            "forward_ms": s * 1e3,
            "matmul_gflop": gflop,
        });
        println!("{report}");
        return Ok(());
    }
    println!("one thread; f32 fused multiply-adds, 12 independent chains, median of 5:");
    for (lanes, g) in &peaks {
        println!(
            "  {lanes:>2} lanes ({:>3}-bit): {g:6.1} GFLOP/s",
            lanes * 32
        );
    }
    println!(
        "native forward of {batch} images ({model_path}): {:.1} ms (median of 7); its matrix products: {gflop:.2} GFLOP, {:.1} GFLOP/s",
        s * 1e3,
        gflop / s
    );
    if let Some(&(_, p4)) = peaks.iter().find(|(lanes, _)| *lanes == 4) {
        for factor in [1.5, 2.0, 3.0] {
            let need = gflop / (factor * s);
            println!(
                "  within {factor}× of it, the matrix products alone need {need:5.1} GFLOP/s: {:3.0} % of the 4-lane peak",
                100.0 * need / p4
            );
        }
    }
    Ok(())
}
