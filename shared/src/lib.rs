//! Denoising diffusion probabilistic models (Ho et al. 2020, arXiv:2006.11239) on burn.
//!
//! Everything the trainer and the browser module share: noise schedules, the forward process and
//! training targets, samplers (DDPM, DDIM, DPM-Solver++), the diffusers-compatible UNet, the model
//! file, and portable seeded noise. No platform code lives here; the backend is whatever device
//! the caller hands in.

pub mod diffusion;
pub mod edit;
pub mod error;
pub mod model_file;
pub mod noise;
pub mod pipeline;
pub mod sampler;
pub mod schedule;
pub mod unet;

pub use error::{Error, Result};
