//! The library's one error type.

use thiserror::Error;

/// Result alias for the `ddpm` crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way the library can refuse an input. Messages say what was wrong, with the numbers.
#[derive(Debug, Error)]
pub enum Error {
    /// A UNet configuration that cannot be built (channel counts, groups, block lists ...).
    #[error("invalid UNet config: {0}")]
    InvalidConfig(String),

    /// A noise schedule that cannot be built (no steps, betas outside (0, 1) ...).
    #[error("invalid noise schedule: {0}")]
    InvalidSchedule(String),

    /// Sampler settings that cannot be used (zero steps, more steps than training steps ...).
    #[error("invalid sampler settings: {0}")]
    InvalidSampler(String),

    /// An input tensor or image whose shape does not fit the model.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A diffusers block or option this crate does not implement.
    #[error("unsupported {what}: {name:?} (supported: {supported})")]
    Unsupported {
        /// What kind of thing (e.g. "down block type").
        what: &'static str,
        /// The name found in the config.
        name: String,
        /// The names that are supported.
        supported: &'static str,
    },

    /// The bytes are not a readable safetensors file (truncated, bad header, bad offsets).
    #[error("not a valid safetensors file: {0}")]
    Safetensors(String),

    /// A safetensors file without our `__metadata__`, or metadata that does not parse.
    #[error("model file metadata: {0}")]
    Metadata(String),

    /// A model file written by a newer (or unknown) format version.
    #[error(
        "model file format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// Version found in the file.
        found: String,
        /// Version this build reads.
        supported: u32,
    },

    /// A weight the model needs is absent from the file.
    #[error("missing tensor {0:?} in model file")]
    MissingTensor(String),

    /// A tensor whose shape differs from what the config implies.
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// Parameter name.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the model needs.
        expected: Vec<usize>,
    },

    /// A tensor stored in a dtype other than F32 / F16 / BF16.
    #[error("tensor {name:?} has dtype {dtype}, expected F32, F16 or BF16")]
    TensorDtype {
        /// Parameter name.
        name: String,
        /// The dtype found.
        dtype: String,
    },

    /// A tensor holding NaN or infinite values.
    #[error("tensor {name:?} holds {count} non-finite value(s) (NaN or Inf)")]
    NonFinite {
        /// Parameter name.
        name: String,
        /// How many values are not finite.
        count: usize,
    },

    /// Tensors in the file that the model does not use.
    #[error("model file has {} tensor(s) the model does not use, e.g. {:?}", .0.len(), .0.first())]
    UnexpectedTensors(Vec<String>),

    /// JSON (diffusers config.json, scheduler_config.json) that cannot be read.
    #[error("{file}: {message}")]
    Json {
        /// Which file.
        file: String,
        /// What serde said.
        message: String,
    },
}
