//! `UNetConfig`: the architecture, with the field names of diffusers' `UNet2DModel` config.json
//! so that a diffusers config deserializes into it directly.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A down block: a stack of ResNet blocks, optionally each followed by self-attention, then an
/// optional stride-2 conv downsampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// ResNet blocks only (diffusers `DownBlock2D`).
    DownBlock2D,
    /// ResNet blocks each followed by self-attention (diffusers `AttnDownBlock2D`).
    AttnDownBlock2D,
}

/// An up block: ResNet blocks over the concatenated skip connections, optionally each followed
/// by self-attention, then an optional nearest ×2 upsampler with a conv.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// ResNet blocks only (diffusers `UpBlock2D`).
    UpBlock2D,
    /// ResNet blocks each followed by self-attention (diffusers `AttnUpBlock2D`).
    AttnUpBlock2D,
}

/// How the timestep embedding enters a ResNet block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeScaleShift {
    /// Added to the features after the first conv (Ho et al. 2020).
    #[default]
    Default,
    /// Scale and shift after the second norm (FiLM, Dhariwal & Nichol 2021).
    ScaleShift,
}

/// The UNet architecture (diffusers `UNet2DModel`). Defaults are diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Height and width of the images the model is trained on. Default: 32 (also when a
    /// diffusers config leaves it null).
    #[serde(deserialize_with = "sample_size_or_default")]
    pub sample_size: usize,
    /// Image channels in. Default: 3.
    pub in_channels: usize,
    /// Channels out (the prediction). Default: 3.
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first (`2x - 1`). Default: false.
    pub center_input_sample: bool,
    /// Put the cosines before the sines in the timestep embedding. Default: true.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embedding (`downscale_freq_shift`). Default: 0.
    pub freq_shift: f64,
    /// One entry per resolution, from the input resolution down.
    pub down_block_types: Vec<DownBlockType>,
    /// One entry per resolution, from the lowest resolution up.
    pub up_block_types: Vec<UpBlockType>,
    /// Output channels of each down block (and, reversed, of each up block).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per down block (up blocks have one more). Default: 2.
    pub layers_per_block: usize,
    /// Output scale factor of the middle block's ResNets and attention. Default: 1.
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convs (0 pads right/bottom by one, as diffusers). Default: 1.
    pub downsample_padding: usize,
    /// Dropout inside ResNet blocks during training. Default: 0.
    pub dropout: f64,
    /// Channels per attention head; `None` means one head over all channels. Default: 8.
    pub attention_head_dim: Option<usize>,
    /// GroupNorm groups in ResNet blocks; `None` means `min(block_out_channels[0] / 4, 32)` at
    /// the output. Default: 32.
    pub norm_num_groups: Option<usize>,
    /// GroupNorm groups in attention blocks; `None` means `norm_num_groups`. Default: None.
    pub attn_norm_num_groups: Option<usize>,
    /// GroupNorm epsilon. Default: 1e-5.
    pub norm_eps: f64,
    /// How the time embedding enters ResNet blocks. Default: "default".
    pub resnet_time_scale_shift: TimeScaleShift,
    /// Self-attention in the middle block. Default: true.
    pub add_attention: bool,
    /// Number of class embeddings (a class-conditional model); `None` for unconditional.
    /// Models trained here for classifier-free guidance reserve the last index as the "null" class.
    pub num_class_embeds: Option<usize>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            sample_size: 32,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                DownBlockType::DownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
            ],
            up_block_types: vec![
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::UpBlock2D,
            ],
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            dropout: 0.0,
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: TimeScaleShift::Default,
            add_attention: true,
            num_class_embeds: None,
        }
    }
}

/// The diffusers config keys we read, with what each accepts. Anything else that changes the
/// architecture is refused by [`UNetConfig::from_diffusers_json`].
const FIXED_OPTIONS: &[(&str, &str)] = &[
    ("time_embedding_type", "positional"),
    ("mid_block_type", "UNetMidBlock2D"),
    ("downsample_type", "conv"),
    ("upsample_type", "conv"),
    ("act_fn", "silu"),
];

impl UNetConfig {
    /// A small configuration for 28×28 grayscale images (Fashion-MNIST, MNIST).
    pub fn small_28() -> Self {
        Self {
            sample_size: 28,
            in_channels: 1,
            out_channels: 1,
            down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
            up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            attention_head_dim: Some(32),
            norm_num_groups: Some(8),
            ..Self::default()
        }
    }

    /// Number of stride-2 downsamplings: the image side must be divisible by `2^this`.
    pub fn num_downsamples(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }

    /// Dimension of the time embedding MLP output (diffusers: `4 * block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels.first().copied().unwrap_or(0) * 4
    }

    /// An estimate of the largest single f32 buffer a forward pass over `batch` images
    /// allocates, in bytes: the biggest feature map (an up block's input concatenates the skip
    /// connection, up to twice the widest channel count) or the biggest attention score matrix
    /// `[batch·heads, hw, hw]`. WebGPU caps a storage buffer's size per adapter; this is what a
    /// caller compares with that cap before running.
    pub fn largest_buffer_bytes(&self, batch: usize) -> u64 {
        let batch = batch as u64;
        let widest = self.block_out_channels.iter().copied().max().unwrap_or(0) as u64;
        let side = self.sample_size as u64;
        let mut largest = batch * 2 * widest * side * side * 4;
        let heads = |channels: usize| match self.attention_head_dim {
            Some(d) if d > 0 => (channels / d).max(1) as u64,
            _ => 1,
        };
        for (level, (block, &channels)) in self
            .down_block_types
            .iter()
            .zip(&self.block_out_channels)
            .enumerate()
        {
            let s = side >> level;
            if *block == DownBlockType::AttnDownBlock2D {
                largest = largest.max(batch * heads(channels) * (s * s) * (s * s) * 4);
            }
        }
        if self.add_attention {
            let s = side >> self.num_downsamples();
            largest = largest.max(batch * heads(widest as usize) * (s * s) * (s * s) * 4);
        }
        largest
    }

    /// GroupNorm groups used by ResNet blocks.
    pub(crate) fn resnet_groups(&self) -> usize {
        self.norm_num_groups
            .unwrap_or_else(|| (self.block_out_channels[0] / 4).clamp(1, 32))
    }

    /// GroupNorm groups of the middle block's attention (diffusers `UNetMidBlock2D`: none for a
    /// scale-shift model unless `attn_norm_num_groups` is given).
    pub(crate) fn mid_attn_groups(&self) -> Option<usize> {
        self.attn_norm_num_groups.or_else(|| {
            (self.resnet_time_scale_shift == TimeScaleShift::Default).then(|| self.resnet_groups())
        })
    }

    /// Read a diffusers `UNet2DModel` config.json. Block types and options this crate does not
    /// implement are named in the error.
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let json_err = |message: String| Error::Json {
            file: "config.json".into(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| json_err(e.to_string()))?;
        let object = value
            .as_object()
            .ok_or_else(|| json_err("expected a JSON object".into()))?;
        if let Some(class) = object.get("_class_name").and_then(|v| v.as_str())
            && class != "UNet2DModel"
        {
            return Err(Error::Unsupported {
                what: "diffusers model class",
                name: class.into(),
                supported: "UNet2DModel",
            });
        }
        check_names(
            object,
            "down_block_types",
            "down block type",
            "DownBlock2D, AttnDownBlock2D",
        )?;
        check_names(
            object,
            "up_block_types",
            "up block type",
            "UpBlock2D, AttnUpBlock2D",
        )?;
        for (key, supported) in FIXED_OPTIONS {
            if let Some(found) = object.get(*key).and_then(|v| v.as_str())
                && found != *supported
            {
                return Err(Error::Unsupported {
                    what: option_label(key),
                    name: found.into(),
                    supported,
                });
            }
        }
        if object.get("mid_block_type").is_some_and(|v| v.is_null()) {
            return Err(Error::Unsupported {
                what: "mid_block_type",
                name: "null".into(),
                supported: "UNetMidBlock2D",
            });
        }
        for key in ["class_embed_type", "time_embedding_dim"] {
            if object.get(key).is_some_and(|v| !v.is_null()) {
                return Err(Error::Unsupported {
                    what: option_label(key),
                    name: object[key].to_string(),
                    supported: "null",
                });
            }
        }
        // diffusers writes `attention_head_dim` as a number or null; a list is a
        // UNet2DConditionModel habit.
        let config: Self =
            serde_json::from_value(value.clone()).map_err(|e| json_err(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Check everything that would otherwise fail while building or running the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return bad(format!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({levels}) must have the same length",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return bad(format!(
                "in_channels ({}) and out_channels ({}) must be at least 1",
                self.in_channels, self.out_channels
            ));
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block must be at least 1".into());
        }
        if let Some(&c) = self.block_out_channels.iter().find(|&&c| c == 0) {
            return bad(format!("block_out_channels holds {c}"));
        }
        if self.block_out_channels.iter().any(|&c| c > 65_536)
            || self.sample_size > 4096
            || self.layers_per_block > 64
            || levels > 12
        {
            return bad(format!(
                "sizes out of range (block_out_channels {:?}, sample_size {}, layers_per_block {})",
                self.block_out_channels, self.sample_size, self.layers_per_block
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout ({}) must be in [0, 1)", self.dropout));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 || !self.freq_shift.is_finite() {
            return bad(format!(
                "norm_eps ({}) must be > 0 and freq_shift ({}) finite",
                self.norm_eps, self.freq_shift
            ));
        }
        if self.mid_block_scale_factor.is_nan() || self.mid_block_scale_factor <= 0.0 {
            return bad(format!(
                "mid_block_scale_factor ({}) must be > 0",
                self.mid_block_scale_factor
            ));
        }
        if self.time_embed_dim() / 4 < 2 {
            return bad("block_out_channels[0] must be at least 2".into());
        }
        if self.num_class_embeds == Some(0) {
            return bad("num_class_embeds must be at least 1 (or null)".into());
        }
        let groups = self.resnet_groups();
        if groups == 0 || self.mid_attn_groups() == Some(0) {
            return bad("norm_num_groups must be at least 1".into());
        }
        for (name, channels, g) in self.group_norms() {
            if !channels.is_multiple_of(g) {
                return bad(format!(
                    "GroupNorm {name}: num_groups ({g}) must divide channels ({channels})"
                ));
            }
        }
        for (name, channels) in self.attention_layers() {
            let head_dim = self.attention_head_dim.unwrap_or(channels);
            if head_dim == 0 || head_dim > channels {
                return bad(format!(
                    "attention {name}: attention_head_dim ({head_dim}) must be in 1..={channels}"
                ));
            }
        }
        let factor = 1usize << self.num_downsamples();
        if !self.sample_size.is_multiple_of(factor) {
            return bad(format!(
                "sample_size ({}) must be divisible by 2^{} = {factor} (one halving per block after the first)",
                self.sample_size,
                self.num_downsamples()
            ));
        }
        Ok(())
    }

    /// Check an input batch `[batch, channels, height, width]` against this config.
    pub fn check_input(&self, dims: [usize; 4]) -> Result<()> {
        let [batch, channels, height, width] = dims;
        if batch == 0 {
            return Err(Error::InvalidInput("empty batch".into()));
        }
        if channels != self.in_channels {
            return Err(Error::InvalidInput(format!(
                "input has {channels} channels, the model takes {}",
                self.in_channels
            )));
        }
        let factor = 1usize << self.num_downsamples();
        if height == 0
            || width == 0
            || !height.is_multiple_of(factor)
            || !width.is_multiple_of(factor)
        {
            return Err(Error::InvalidInput(format!(
                "image size {height}x{width} is not divisible by the downsampling factor {factor}"
            )));
        }
        Ok(())
    }

    /// Every GroupNorm the model holds: (name, channels, groups).
    fn group_norms(&self) -> Vec<(String, usize, usize)> {
        let g = self.resnet_groups();
        let mut out = Vec::new();
        for (i, (in_c, out_c)) in self.down_channels().into_iter().enumerate() {
            for j in 0..self.layers_per_block {
                let c_in = if j == 0 { in_c } else { out_c };
                out.push((format!("down_blocks.{i}.resnets.{j}.norm1"), c_in, g));
                out.push((format!("down_blocks.{i}.resnets.{j}.norm2"), out_c, g));
            }
        }
        let mid = *self.block_out_channels.last().unwrap_or(&0);
        out.push(("mid_block.resnets.0.norm1".into(), mid, g));
        for (i, (prev, out_c, skip_in)) in self.up_channels().into_iter().enumerate() {
            for j in 0..=self.layers_per_block {
                let (c_in, skip) = self.up_resnet_channels(j, prev, out_c, skip_in);
                out.push((format!("up_blocks.{i}.resnets.{j}.norm1"), c_in + skip, g));
                out.push((format!("up_blocks.{i}.resnets.{j}.norm2"), out_c, g));
            }
        }
        for (name, c) in self.attention_layers() {
            let groups = if name.starts_with("mid_block") {
                self.mid_attn_groups()
            } else {
                Some(g)
            };
            if let Some(groups) = groups {
                out.push((format!("{name}.group_norm"), c, groups));
            }
        }
        out.push((
            "conv_norm_out".into(),
            self.block_out_channels[0],
            self.resnet_groups(),
        ));
        out
    }

    /// Every attention layer: (name, channels).
    fn attention_layers(&self) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for (i, t) in self.down_block_types.iter().enumerate() {
            if *t == DownBlockType::AttnDownBlock2D {
                out.push((
                    format!("down_blocks.{i}.attentions"),
                    self.block_out_channels[i],
                ));
            }
        }
        if self.add_attention {
            let mid = *self.block_out_channels.last().unwrap_or(&0);
            out.push(("mid_block.attentions.0".into(), mid));
        }
        let rev: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        for (i, t) in self.up_block_types.iter().enumerate() {
            if *t == UpBlockType::AttnUpBlock2D {
                out.push((format!("up_blocks.{i}.attentions"), rev[i]));
            }
        }
        out
    }

    /// (in, out) channels of each down block.
    pub(crate) fn down_channels(&self) -> Vec<(usize, usize)> {
        let mut prev = self.block_out_channels[0];
        self.block_out_channels
            .iter()
            .map(|&c| {
                let pair = (prev, c);
                prev = c;
                pair
            })
            .collect()
    }

    /// (prev_output_channel, out_channels, in_channels) of each up block, as diffusers builds them.
    pub(crate) fn up_channels(&self) -> Vec<(usize, usize, usize)> {
        let rev: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let last = rev.len() - 1;
        let mut out_c = rev[0];
        (0..rev.len())
            .map(|i| {
                let prev = out_c;
                out_c = rev[i];
                let in_c = rev[(i + 1).min(last)];
                (prev, out_c, in_c)
            })
            .collect()
    }

    /// Input and skip channels of ResNet `j` in an up block.
    pub(crate) fn up_resnet_channels(
        &self,
        j: usize,
        prev: usize,
        out_c: usize,
        in_c: usize,
    ) -> (usize, usize) {
        let skip = if j == self.layers_per_block {
            in_c
        } else {
            out_c
        };
        let resnet_in = if j == 0 { prev } else { out_c };
        (resnet_in, skip)
    }
}

fn option_label(key: &str) -> &'static str {
    match key {
        "time_embedding_type" => "time_embedding_type",
        "mid_block_type" => "mid_block_type",
        "downsample_type" => "downsample_type",
        "upsample_type" => "upsample_type",
        "act_fn" => "act_fn",
        "class_embed_type" => "class_embed_type",
        _ => "time_embedding_dim",
    }
}

fn check_names(
    object: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    what: &'static str,
    supported: &'static str,
) -> Result<()> {
    let Some(list) = object.get(key).and_then(|v| v.as_array()) else {
        return Ok(());
    };
    for name in list {
        let name = name.as_str().unwrap_or_default();
        if !supported.split(", ").any(|s| s == name) {
            return Err(Error::Unsupported {
                what,
                name: name.into(),
                supported,
            });
        }
    }
    Ok(())
}

/// diffusers writes `sample_size` as a number, a `[height, width]` pair or null.
fn sample_size_or_default<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        One(usize),
        Pair([usize; 2]),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(UNetConfig::default().sample_size),
        Some(Size::One(s)) => Ok(s),
        Some(Size::Pair([h, w])) if h == w => Ok(h),
        Some(Size::Pair([h, w])) => Err(serde::de::Error::custom(format!(
            "sample_size [{h}, {w}]: only square images are supported"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_buffer_is_a_feature_map_or_an_attention_matrix() {
        // small_28: the widest map is an up block's input, 2·64 channels at 28×28 (401,408 B);
        // attention at 14×14 with 2 heads needs 2·196²·4 = 307,328 B.
        let small = UNetConfig::small_28();
        assert_eq!(small.largest_buffer_bytes(1), 2 * 64 * 28 * 28 * 4);
        assert_eq!(small.largest_buffer_bytes(10), 10 * 2 * 64 * 28 * 28 * 4);
        // Attention at full resolution on 64×64 images: 4 heads · 4096² · 4 B per image.
        let big = UNetConfig {
            sample_size: 64,
            down_block_types: vec![DownBlockType::AttnDownBlock2D, DownBlockType::DownBlock2D],
            up_block_types: vec![UpBlockType::UpBlock2D, UpBlockType::AttnUpBlock2D],
            block_out_channels: vec![32, 64],
            attention_head_dim: Some(8),
            ..UNetConfig::default()
        };
        assert_eq!(big.largest_buffer_bytes(2), 2 * 4 * 4096 * 4096 * 4);
    }
}
