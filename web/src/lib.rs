//! The wasm module: sample ddpm models in the browser, on WebGPU with a CPU fallback.
//!
//! JavaScript sees one class, `Diffusion`:
//!
//! ```js
//! const d = await Diffusion.load(bytes);             // or Diffusion.load(bytes, "cpu")
//! const out = await d.sample({ n: 16, steps: 25, sampler: "ddim", seed: 7,
//!                              onStep: ({ step, total, rgba }) => draw(rgba) });
//! d.backend();                                       // "webgpu" or "cpu"
//! await d.inpaint({ image, mask, steps: 25, jump: 5, resample: 5 }); // white = regenerate
//! await d.img2img({ image, strength: 0.6 });
//! await d.interpolate({ seeds: [3, 7], n: 8 });
//! ```
//!
//! The same model, seed and sampler give the same numbers as `ddpm sample` (the noise stream
//! is portable and the pipeline is the `ddpm` crate's). Reads from the GPU are asynchronous;
//! the sampling loop yields to the event loop after every step so that the page stays
//! responsive and a run can be cancelled.

use ddpm::noise::SeededNoise;

#[cfg(target_family = "wasm")]
mod api;

/// The `index`-th value (from 0) of the standard normal stream for `seed`, as f32.
///
/// Exported unmangled so that a test can call the raw `.wasm` in node, without JS glue, and
/// check that wasm32 draws the same noise as x86-64 (`tests/wasm/noise_check.mjs`).
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
