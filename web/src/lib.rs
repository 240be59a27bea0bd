//! The wasm module: sampling ddpm models in the browser (WebGPU, CPU fallback).
//!
//! For now it exports the portable noise generator as a plain C-ABI function so that a test can
//! check, in node, that wasm32 produces the same numbers as x86-64 (`tests/wasm/noise_check.mjs`).

use ddpm::noise::SeededNoise;

/// The `index`-th value (from 0) of the standard normal stream for `seed`, as f32.
///
/// Exported unmangled so the raw `.wasm` can be called without JS glue.
#[allow(unsafe_code)] // `no_mangle` is an unsafe attribute: the symbol name must be unique.
#[unsafe(no_mangle)]
pub extern "C" fn ddpm_noise_value(seed: u64, index: u32) -> f32 {
    let mut noise = SeededNoise::new(seed);
    let mut value = 0.0;
    for _ in 0..=index {
        value = noise.next_f64() as f32;
    }
    value
}
