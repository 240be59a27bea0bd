//! The UNet's building blocks, named as in diffusers so that checkpoints load by parameter name:
//! sinusoidal timestep embedding, `TimestepEmbedding`, `ResnetBlock2D`, `Attention` (the spatial
//! self-attention of `AttnDownBlock2D` & co.), `Downsample2D`, `Upsample2D`.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Dropout, DropoutConfig, GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::module::{interpolate, layer_norm};
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};

use super::config::TimeScaleShift;

/// Whether `x` is a float32 tensor on burn's CPU backend (with or without autodiff).
#[cfg(feature = "flex-kernels-forward")]
fn on_flex_f32<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == burn::tensor::DType::F32
        && matches!(
            x.device().inner().as_dispatch(),
            burn::backend::DispatchDevice::Flex(_)
        )
}

/// SiLU, `x · sigmoid(x)`, the UNet's activation: burn's, except for float32 tensors on burn's
/// CPU backend, which take the fused kernel of [`super::flex_kernels`] when it is compiled in
/// (feature `flex-kernels-forward`).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex-kernels-forward")]
    if on_flex_f32(&x) {
        use super::flex_kernels::FlexKernels;
        return Tensor::from_dispatch(<burn::backend::Dispatch as FlexKernels>::flex_silu(
            x.into_dispatch(),
        ));
    }
    burn::tensor::activation::silu(x)
}

/// Multi-head scaled dot-product attention, `softmax(q kᵀ / √head_dim) v` for each head: burn's
/// ops, except for float32 tensors on burn's CPU backend, which take [`super::flex_kernels`]'
/// fused kernel when it is compiled in (feature `flex-kernels-forward`).
///
/// # Shapes
/// - q, k, v: `[batch, len, heads · head_dim]`, heads side by side; output: the same
pub fn multi_head_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    #[cfg(feature = "flex-kernels-forward")]
    if on_flex_f32(&q) {
        use super::flex_kernels::FlexKernels;
        return Tensor::from_dispatch(<burn::backend::Dispatch as FlexKernels>::flex_attention(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            heads,
        ));
    }
    multi_head_attention_ops(q, k, v, heads)
}

/// [`multi_head_attention`] in burn's tensor ops: heads split into their own axis, the score
/// matrices, softmax, and heads merged back.
pub(crate) fn multi_head_attention_ops(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
) -> Tensor<3> {
    let [batch, len, inner] = q.dims();
    let head_dim = inner / heads;
    let split = |t: Tensor<3>| t.reshape([batch, len, heads, head_dim]).swap_dims(1, 2);
    let (q, k, v) = (split(q), split(k), split(v)); // [batch, heads, len, head_dim]
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale); // [batch, heads, len, len]
    let weights = burn::tensor::activation::softmax(scores, 3);
    let out = weights.matmul(v); // [batch, heads, len, head_dim]
    out.swap_dims(1, 2).reshape([batch, len, inner])
}

/// `conv.forward(x)`, except that convolutions with bias, 3×3 with any stride and explicit
/// padding or 1×1 with stride 1 and no padding, on float32 tensors on burn's CPU backend take
/// [`super::flex_kernels`]' im2col + GEMM kernels when they are compiled in (feature
/// `flex-kernels-forward`).
pub fn conv_forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex-kernels-forward")]
    if on_flex_f32(&x)
        && let Some(spec) = flex_conv_spec(conv, x.dims())
        && let Some(bias) = &conv.bias
    {
        use super::flex_kernels::FlexKernels;
        return Tensor::from_dispatch(<burn::backend::Dispatch as FlexKernels>::flex_conv(
            x.into_dispatch(),
            conv.weight.val().into_dispatch(),
            bias.val().into_dispatch(),
            spec,
        ));
    }
    conv.forward(x)
}

/// The stride and padding of `conv` on an input of `dims` when [`super::flex_kernels`]' conv
/// kernels compute it: 3×3 with the same stride along both axes and explicit padding (an output
/// of at least one pixel), or 1×1 with stride 1 and no padding; ungrouped, undilated.
#[cfg(feature = "flex-kernels-forward")]
pub(crate) fn flex_conv_spec(
    conv: &Conv2d,
    [_, _, h, w]: [usize; 4],
) -> Option<super::flex_kernels::ConvSpec> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        _ => return None,
    };
    let spec = super::flex_kernels::ConvSpec {
        stride: conv.stride[0],
        padding,
    };
    let supported = conv.stride[0] == conv.stride[1]
        && spec.stride >= 1
        && conv.dilation == [1, 1]
        && conv.groups == 1
        && match conv.kernel_size {
            [3, 3] => spec.output_size(3, [h, w]).iter().all(|&n| n > 0),
            [1, 1] => spec.keeps_size(1),
            _ => false,
        };
    supported.then_some(spec)
}

/// A 3×3 convolution with padding 1 (or `padding` on every side).
pub(crate) fn conv3x3(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

/// GroupNorm; the config was validated, so `groups` divides `channels`.
pub(crate) fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// `norm.forward(x)` computed with burn's fused `layer_norm` over `[batch, groups, rest]`, then
/// the per-channel scale and shift. Same function as `GroupNorm::forward`, which takes six
/// element-wise passes (mean, centre, square, mean, divide, affine); on the CPU backend each of
/// those runs on one thread, while flex's `layer_norm` is one parallel pass. Under autodiff,
/// burn differentiates `layer_norm` through its own decomposition. With feature `flex-kernels`,
/// float32 tensors on the CPU backend take [`super::flex_kernels`]' GroupNorm, which has its own
/// backward pass.
pub(crate) fn group_norm_forward(norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex-kernels-forward")]
    if let Some(y) = flex_group_norm(norm, &x, false) {
        return y;
    }
    let [batch, channels, height, width] = x.dims();
    let groups = norm.num_groups;
    let rest = channels / groups * height * width;
    let ones = Tensor::<1>::ones([rest], &x.device());
    let y = layer_norm(x.reshape([batch, groups, rest]), ones, None, norm.epsilon)
        .reshape([batch, channels, height, width]);
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => {
            y * gamma.val().reshape([1, channels, 1, 1]) + beta.val().reshape([1, channels, 1, 1])
        }
        _ => y,
    }
}

/// `silu(group_norm_forward(norm, x))`, in one pass forward and backward on the CPU backend
/// with feature `flex-kernels`.
pub(crate) fn group_norm_silu(norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex-kernels-forward")]
    if let Some(y) = flex_group_norm(norm, &x, true) {
        return y;
    }
    silu(group_norm_forward(norm, x))
}

/// [`super::flex_kernels`]' GroupNorm (then SiLU when `silu`), for float32 tensors on the CPU
/// backend with an affine norm; `None` elsewhere.
#[cfg(feature = "flex-kernels-forward")]
fn flex_group_norm(norm: &GroupNorm, x: &Tensor<4>, silu: bool) -> Option<Tensor<4>> {
    use super::flex_kernels::{FlexKernels, GroupNormSpec};
    let (Some(gamma), Some(beta)) = (&norm.gamma, &norm.beta) else {
        return None;
    };
    on_flex_f32(x).then(|| {
        Tensor::from_dispatch(<burn::backend::Dispatch as FlexKernels>::flex_group_norm(
            x.clone().into_dispatch(),
            gamma.val().into_dispatch(),
            beta.val().into_dispatch(),
            GroupNormSpec {
                groups: norm.num_groups,
                epsilon: norm.epsilon,
                silu,
            },
        ))
    })
}

/// Frequencies of the sinusoidal timestep embedding, computed in f32 in the same order of
/// operations as diffusers' `get_timestep_embedding` so that the embeddings agree bit for bit
/// in all but rare last-ulp cases: `exp(-ln(10000) * i / (half - shift))`.
pub fn timestep_frequencies(dim: usize, freq_shift: f64) -> Vec<f32> {
    let half = dim / 2;
    let log_max_period = -(10_000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    (0..half)
        .map(|i| {
            let exponent = log_max_period * i as f32 / denominator;
            (exponent as f64).exp() as f32
        })
        .collect()
}

/// Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' `Timesteps` module.
///
/// # Shapes
/// - timesteps: `[batch]`
/// - output: `[batch, dim]`
pub fn timestep_embedding(
    timesteps: Tensor<1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<2> {
    let device = timesteps.device();
    let [batch] = timesteps.dims();
    let freqs = timestep_frequencies(dim, freq_shift);
    let half = freqs.len();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = timesteps.reshape([batch, 1]) * freqs.reshape([1, half]); // [batch, half]
    let (first, second) = if flip_sin_to_cos {
        (args.clone().cos(), args.sin())
    } else {
        (args.clone().sin(), args.cos())
    };
    let emb = Tensor::cat(vec![first, second], 1); // [batch, 2 * half]
    if dim % 2 == 1 {
        let pad = Tensor::zeros([batch, 1], &device);
        Tensor::cat(vec![emb, pad], 1)
    } else {
        emb
    }
}

/// Two-layer MLP on the sinusoidal embedding (diffusers `TimestepEmbedding`).
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// `[in_dim] → [time_embed_dim]`
    pub linear_1: Linear,
    /// `[time_embed_dim] → [time_embed_dim]`
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// Build with the given input and output widths.
    pub fn new(in_dim: usize, out_dim: usize, device: &Device) -> Self {
        Self {
            linear_1: LinearConfig::new(in_dim, out_dim).init(device),
            linear_2: LinearConfig::new(out_dim, out_dim).init(device),
        }
    }

    /// # Shapes
    /// - input: `[batch, in_dim]`, output: `[batch, out_dim]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.linear_1.forward(x);
        let x = silu(x);
        self.linear_2.forward(x)
    }
}

/// Settings shared by every ResNet block of a model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetSettings {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub dropout: f64,
    pub output_scale_factor: f64,
    pub time_scale_shift: TimeScaleShift,
}

/// Pre-activation ResNet block with a timestep embedding (diffusers `ResnetBlock2D`):
/// GroupNorm → SiLU → conv → (+ time) → GroupNorm → SiLU → dropout → conv, plus a 1×1 shortcut
/// when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    /// Norm before the first conv.
    pub norm1: GroupNorm,
    /// First 3×3 conv.
    pub conv1: Conv2d,
    /// Projection of the time embedding to the block's channels (×2 for scale-shift).
    pub time_emb_proj: Linear,
    /// Norm before the second conv.
    pub norm2: GroupNorm,
    /// Dropout before the second conv.
    pub dropout: Dropout,
    /// Second 3×3 conv.
    pub conv2: Conv2d,
    /// 1×1 conv on the skip path when in and out channels differ.
    pub conv_shortcut: Option<Conv2d>,
    /// `output = (input + h) / output_scale_factor`.
    pub output_scale_factor: f64,
    /// Whether the time embedding is a scale and shift (FiLM) rather than a bias.
    pub scale_shift: bool,
}

impl ResnetBlock2D {
    pub(crate) fn new(c_in: usize, c_out: usize, s: &ResnetSettings, device: &Device) -> Self {
        let scale_shift = s.time_scale_shift == TimeScaleShift::ScaleShift;
        let temb_out = if scale_shift { 2 * c_out } else { c_out };
        Self {
            norm1: group_norm(s.groups, c_in, s.eps, device),
            conv1: conv3x3(c_in, c_out, device),
            time_emb_proj: LinearConfig::new(s.temb_channels, temb_out).init(device),
            norm2: group_norm(s.groups, c_out, s.eps, device),
            dropout: DropoutConfig::new(s.dropout).init(),
            conv2: conv3x3(c_out, c_out, device),
            conv_shortcut: (c_in != c_out)
                .then(|| Conv2dConfig::new([c_in, c_out], [1, 1]).init(device)),
            output_scale_factor: s.output_scale_factor,
            scale_shift,
        }
    }

    /// # Shapes
    /// - x: `[batch, c_in, h, w]`, temb: `[batch, temb_channels]`
    /// - output: `[batch, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>, temb: Tensor<2>) -> Tensor<4> {
        let input = x.clone();
        let h = group_norm_silu(&self.norm1, x);
        let h = conv_forward(&self.conv1, h); // [batch, c_out, h, w]
        let [batch, channels, _, _] = h.dims();
        let temb = self.time_emb_proj.forward(silu(temb)); // [batch, c_out or 2 c_out]
        let h = if self.scale_shift {
            let temb = temb.reshape([batch, 2 * channels, 1, 1]);
            let scale = temb.clone().narrow(1, 0, channels);
            let shift = temb.narrow(1, channels, channels);
            let h = group_norm_forward(&self.norm2, h);
            silu(h.clone() * scale + h + shift)
        } else {
            let h = h + temb.reshape([batch, channels, 1, 1]);
            group_norm_silu(&self.norm2, h)
        };
        let h = self.dropout.forward(h);
        let h = conv_forward(&self.conv2, h);
        let input = match &self.conv_shortcut {
            Some(conv) => conv_forward(conv, input),
            None => input,
        };
        let out = input + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.output_scale_factor)
        }
    }
}

/// Spatial multi-head self-attention with a residual connection (diffusers `Attention` as built
/// by `AttnDownBlock2D`, `UNetMidBlock2D` and `AttnUpBlock2D`).
#[derive(Module, Debug)]
pub struct Attention {
    /// Norm over the channels before the projections (absent in the middle block of a
    /// scale-shift model without `attn_norm_num_groups`, as in diffusers).
    pub group_norm: Option<GroupNorm>,
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (diffusers keeps it in a list with a dropout: `to_out.0`).
    pub to_out: Vec<Linear>,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// `output = (attention + input) / rescale_output_factor`.
    pub rescale_output_factor: f64,
}

impl Attention {
    pub(crate) fn new(
        channels: usize,
        head_dim: usize,
        groups: Option<usize>,
        eps: f64,
        rescale_output_factor: f64,
        device: &Device,
    ) -> Self {
        let heads = channels / head_dim;
        let inner = heads * head_dim;
        Self {
            group_norm: groups.map(|g| group_norm(g, channels, eps, device)),
            to_q: LinearConfig::new(channels, inner).init(device),
            to_k: LinearConfig::new(channels, inner).init(device),
            to_v: LinearConfig::new(channels, inner).init(device),
            to_out: vec![LinearConfig::new(inner, channels).init(device)],
            heads,
            head_dim,
            rescale_output_factor,
        }
    }

    /// # Shapes
    /// - x: `[batch, channels, h, w]`, output: the same
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, channels, height, width] = x.dims();
        let len = height * width;
        let residual = x.clone();
        let x = match &self.group_norm {
            Some(norm) => group_norm_forward(norm, x),
            None => x,
        };
        let x = x.reshape([batch, channels, len]).swap_dims(1, 2); // [batch, len, channels]
        let q = self.to_q.forward(x.clone()); // [batch, len, heads · head_dim]
        let k = self.to_k.forward(x.clone());
        let v = self.to_v.forward(x);
        let out = multi_head_attention(q, k, v, self.heads);
        let out = self.to_out[0].forward(out); // [batch, len, channels]
        let out = out
            .swap_dims(1, 2)
            .reshape([batch, channels, height, width]);
        let out = out + residual;
        if self.rescale_output_factor == 1.0 {
            out
        } else {
            out.div_scalar(self.rescale_output_factor)
        }
    }
}

/// Stride-2 3×3 conv (diffusers `Downsample2D` with `use_conv=True`).
#[derive(Module, Debug)]
pub struct Downsample2D {
    /// The strided conv.
    pub conv: Conv2d,
}

impl Downsample2D {
    pub(crate) fn new(channels: usize, padding: usize, device: &Device) -> Self {
        // diffusers pads right and bottom by one when `downsample_padding` is 0.
        let padding = if padding == 0 {
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            PaddingConfig2d::Explicit(padding, padding, padding, padding)
        };
        let conv = Conv2dConfig::new([channels, channels], [3, 3])
            .with_stride([2, 2])
            .with_padding(padding)
            .init(device);
        Self { conv }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]`, output: `[batch, c, h / 2, w / 2]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv_forward(&self.conv, x)
    }
}

/// Nearest-neighbour ×2 upsampling followed by a 3×3 conv (diffusers `Upsample2D`).
#[derive(Module, Debug)]
pub struct Upsample2D {
    /// The conv after upsampling.
    pub conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: conv3x3(channels, channels, device),
        }
    }

    /// # Shapes
    /// - x: `[batch, c, h, w]`, output: `[batch, c, 2h, 2w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let x = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
        );
        conv_forward(&self.conv, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;

    #[test]
    fn fused_group_norm_equals_burn_group_norm() {
        let device = Device::flex();
        let mut noise = crate::noise::SeededNoise::new(3);
        let mut norm = group_norm(4, 8, 1e-5, &device);
        let vector = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [8]), &device);
        norm.gamma = Some(Param::from_tensor(vector(noise.sample_vec(8))));
        norm.beta = Some(Param::from_tensor(vector(noise.sample_vec(8))));
        // Off-centre, scaled input so that the mean and variance matter.
        let x = Tensor::<4>::from_data(
            TensorData::new(noise.sample_vec(2 * 8 * 3 * 5), [2, 8, 3, 5]),
            &device,
        )
        .mul_scalar(3.0)
        .add_scalar(1.5);
        let expected: Vec<f32> = norm
            .forward(x.clone())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let fused: Vec<f32> = group_norm_forward(&norm, x)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let diff = expected
            .iter()
            .zip(&fused)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-5, "max |diff| {diff}");
        let spread = expected.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(
            spread > 1.0,
            "the check needs a non-trivial output ({spread})"
        );
    }
}
