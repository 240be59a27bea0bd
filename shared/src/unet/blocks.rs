//! Down, middle and up blocks (diffusers `DownBlock2D` / `AttnDownBlock2D`, `UNetMidBlock2D`,
//! `UpBlock2D` / `AttnUpBlock2D`). A plain block is the attention variant with no attention
//! layers, so one struct serves both and parameter names match diffusers'.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::layers::{Attention, Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};

/// Attention settings of a block: channels per head, norm groups, norm epsilon.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnSettings {
    pub head_dim: Option<usize>,
    pub groups: Option<usize>,
    pub eps: f64,
}

impl AttnSettings {
    fn build(&self, channels: usize, rescale: f64, device: &Device) -> Attention {
        let head_dim = self.head_dim.unwrap_or(channels);
        Attention::new(channels, head_dim, self.groups, self.eps, rescale, device)
    }
}

/// One resolution level on the way down.
#[derive(Module, Debug)]
pub struct DownBlock {
    /// `layers_per_block` ResNet blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// One attention after each ResNet (AttnDownBlock2D) or none (DownBlock2D).
    pub attentions: Vec<Attention>,
    /// The stride-2 conv, absent on the last (lowest-resolution) block.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        c_in: usize,
        c_out: usize,
        layers: usize,
        attention: Option<AttnSettings>,
        downsample_padding: Option<usize>,
        resnet: &ResnetSettings,
        device: &Device,
    ) -> Self {
        let resnets = (0..layers)
            .map(|j| ResnetBlock2D::new(if j == 0 { c_in } else { c_out }, c_out, resnet, device))
            .collect();
        let attentions = match attention {
            Some(a) => (0..layers).map(|_| a.build(c_out, 1.0, device)).collect(),
            None => Vec::new(),
        };
        let downsamplers = downsample_padding
            .map(|p| vec![Downsample2D::new(c_out, p, device)])
            .unwrap_or_default();
        Self {
            resnets,
            attentions,
            downsamplers,
        }
    }

    /// Runs the block, pushing every intermediate output onto `skips` for the up path.
    ///
    /// # Shapes
    /// - x: `[batch, c_in, h, w]`, output: `[batch, c_out, h / 2, w / 2]` (or `h, w` on the last)
    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let mut x = x;
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, temb.clone());
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(x);
            }
            skips.push(x.clone());
        }
        for downsampler in &self.downsamplers {
            x = downsampler.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// The lowest-resolution block: ResNet, (attention, ResNet).
#[derive(Module, Debug)]
pub struct MidBlock {
    /// Two ResNet blocks.
    pub resnets: Vec<ResnetBlock2D>,
    /// The attention between them (absent when `add_attention` is false).
    pub attentions: Vec<Attention>,
}

impl MidBlock {
    pub(crate) fn new(
        channels: usize,
        attention: Option<AttnSettings>,
        resnet: &ResnetSettings,
        device: &Device,
    ) -> Self {
        let rescale = resnet.output_scale_factor;
        Self {
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(channels, channels, resnet, device))
                .collect(),
            attentions: attention
                .map(|a| vec![a.build(channels, rescale, device)])
                .unwrap_or_default(),
        }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]`, output: the same
    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>) -> Tensor<4> {
        let x = self.resnets[0].forward(x, temb.clone());
        let x = match self.attentions.first() {
            Some(attention) => attention.forward(x),
            None => x,
        };
        self.resnets[1].forward(x, temb)
    }
}

/// One resolution level on the way up.
#[derive(Module, Debug)]
pub struct UpBlock {
    /// `layers_per_block + 1` ResNet blocks over `[x, skip]` concatenations.
    pub resnets: Vec<ResnetBlock2D>,
    /// One attention after each ResNet (AttnUpBlock2D) or none (UpBlock2D).
    pub attentions: Vec<Attention>,
    /// The ×2 upsampler, absent on the last (full-resolution) block.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock {
    /// `channels[j]` is (input channels, skip channels) of ResNet `j`.
    pub(crate) fn new(
        channels: &[(usize, usize)],
        c_out: usize,
        attention: Option<AttnSettings>,
        upsample: bool,
        resnet: &ResnetSettings,
        device: &Device,
    ) -> Self {
        let resnets = channels
            .iter()
            .map(|&(c_in, skip)| ResnetBlock2D::new(c_in + skip, c_out, resnet, device))
            .collect();
        let attentions = match attention {
            Some(a) => channels
                .iter()
                .map(|_| a.build(c_out, 1.0, device))
                .collect(),
            None => Vec::new(),
        };
        let upsamplers = if upsample {
            vec![Upsample2D::new(c_out, device)]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            upsamplers,
        }
    }

    /// Runs the block, popping one skip connection per ResNet.
    ///
    /// # Shapes
    /// - x: `[batch, c_prev, h, w]`, output: `[batch, c_out, 2h, 2w]` (or `h, w` on the last)
    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let mut x = x;
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("UNet::forward pushes one skip per up-path ResNet");
            x = Tensor::cat(vec![x, skip], 1); // [batch, c + c_skip, h, w]
            x = resnet.forward(x, temb.clone());
            if let Some(attention) = self.attentions.get(j) {
                x = attention.forward(x);
            }
        }
        for upsampler in &self.upsamplers {
            x = upsampler.forward(x);
        }
        x
    }
}
