//! The denoising UNet of Ho et al. 2020 in the layout of diffusers' `UNet2DModel`: a conv stem,
//! down blocks (ResNet + optional self-attention + stride-2 conv), a middle block with attention,
//! up blocks over skip connections, GroupNorm + SiLU + conv head; a sinusoidal timestep embedding
//! through an MLP, plus an optional class embedding. Parameter names equal diffusers', so a
//! diffusers checkpoint loads by name (see [`crate::model_file`]).

mod blocks;
mod config;
#[cfg(feature = "flex-kernels-forward")]
pub mod flex_kernels;
mod layers;

pub use blocks::{DownBlock, MidBlock, UpBlock};
pub use config::{DownBlockType, TimeScaleShift, UNetConfig, UpBlockType};
pub use layers::{
    Attention, Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, conv_forward,
    multi_head_attention, silu, timestep_embedding, timestep_frequencies,
};

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, EmbeddingConfig, GroupNorm};
use burn::tensor::{Device, Int, Tensor};

use crate::error::Result;
use blocks::AttnSettings;
use layers::{ResnetSettings, conv3x3, group_norm, group_norm_silu};

/// The noise-prediction network ε_θ(x_t, t[, y]).
#[derive(Module, Debug)]
pub struct UNet {
    /// 3×3 conv from image channels to `block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// MLP over the sinusoidal timestep embedding.
    pub time_embedding: TimestepEmbedding,
    /// Class embedding added to the time embedding (class-conditional models).
    pub class_embedding: Option<Embedding>,
    /// One block per resolution, high to low.
    pub down_blocks: Vec<DownBlock>,
    /// The lowest-resolution block.
    pub mid_block: MidBlock,
    /// One block per resolution, low to high.
    pub up_blocks: Vec<UpBlock>,
    /// Final norm.
    pub conv_norm_out: GroupNorm,
    /// 3×3 conv to the output channels.
    pub conv_out: Conv2d,
    /// Width of the sinusoidal embedding (`block_out_channels[0]`).
    pub time_proj_dim: usize,
    /// Cosines first in the sinusoidal embedding.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embedding.
    pub freq_shift: f64,
    /// Map inputs from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
}

impl UNetConfig {
    /// Build a randomly initialised UNet on `device`, after [`UNetConfig::validate`].
    pub fn init(&self, device: &Device) -> Result<UNet> {
        self.validate()?;
        let temb = self.time_embed_dim();
        let c0 = self.block_out_channels[0];
        let resnet = ResnetSettings {
            temb_channels: temb,
            groups: self.resnet_groups(),
            eps: self.norm_eps,
            dropout: self.dropout,
            output_scale_factor: 1.0,
            time_scale_shift: self.resnet_time_scale_shift,
        };
        let attn = AttnSettings {
            head_dim: self.attention_head_dim,
            groups: Some(self.resnet_groups()),
            eps: self.norm_eps,
        };
        let levels = self.block_out_channels.len();
        let down_blocks = self
            .down_channels()
            .into_iter()
            .zip(&self.down_block_types)
            .enumerate()
            .map(|(i, ((c_in, c_out), kind))| {
                let attention = (*kind == DownBlockType::AttnDownBlock2D).then_some(attn);
                let downsample = (i + 1 < levels).then_some(self.downsample_padding);
                DownBlock::new(
                    c_in,
                    c_out,
                    self.layers_per_block,
                    attention,
                    downsample,
                    &resnet,
                    device,
                )
            })
            .collect();
        let c_mid = *self.block_out_channels.last().expect("validated non-empty");
        let mid_resnet = ResnetSettings {
            output_scale_factor: self.mid_block_scale_factor,
            ..resnet
        };
        let mid_attn = AttnSettings {
            groups: self.mid_attn_groups(),
            ..attn
        };
        let mid_block = MidBlock::new(
            c_mid,
            self.add_attention.then_some(mid_attn),
            &mid_resnet,
            device,
        );
        let up_blocks = self
            .up_channels()
            .into_iter()
            .zip(&self.up_block_types)
            .enumerate()
            .map(|(i, ((prev, c_out, c_in), kind))| {
                let channels: Vec<(usize, usize)> = (0..=self.layers_per_block)
                    .map(|j| self.up_resnet_channels(j, prev, c_out, c_in))
                    .collect();
                let attention = (*kind == UpBlockType::AttnUpBlock2D).then_some(attn);
                UpBlock::new(&channels, c_out, attention, i + 1 < levels, &resnet, device)
            })
            .collect();
        Ok(UNet {
            conv_in: conv3x3(self.in_channels, c0, device),
            time_embedding: TimestepEmbedding::new(c0, temb, device),
            class_embedding: self
                .num_class_embeds
                .map(|n| EmbeddingConfig::new(n, temb).init(device)),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(self.resnet_groups(), c0, self.norm_eps, device),
            conv_out: conv3x3(c0, self.out_channels, device),
            time_proj_dim: c0,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            center_input_sample: self.center_input_sample,
        })
    }
}

impl UNet {
    /// Predict the model output (ε, x_0 or v, as trained) for noisy images at timesteps.
    ///
    /// Inputs must fit the config ([`UNetConfig::check_input`]); class labels are required for a
    /// class-conditional model and ignored otherwise.
    ///
    /// # Shapes
    /// - sample: `[batch, in_channels, h, w]`
    /// - timesteps: `[batch]` (float, so fractional times work)
    /// - class_labels: `[batch]`
    /// - output: `[batch, out_channels, h, w]`
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        class_labels: Option<Tensor<1, Int>>,
    ) -> Tensor<4> {
        let [batch, _, _, _] = sample.dims();
        let x = if self.center_input_sample {
            sample.mul_scalar(2.0).sub_scalar(1.0)
        } else {
            sample
        };
        // 1. time (and class) embedding
        let t_emb = timestep_embedding(
            timesteps,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        ); // [batch, c0]
        let mut emb = self.time_embedding.forward(t_emb); // [batch, 4 c0]
        if let (Some(embedding), Some(labels)) = (&self.class_embedding, class_labels) {
            let class_emb = embedding.forward(labels.reshape([batch, 1])); // [batch, 1, 4 c0]
            let [_, _, d] = class_emb.dims();
            emb = emb + class_emb.reshape([batch, d]);
        }
        // 2. stem
        let x = conv_forward(&self.conv_in, x); // [batch, c0, h, w]
        // 3. down
        let mut skips = vec![x.clone()];
        let mut x = x;
        for block in &self.down_blocks {
            x = block.forward(x, emb.clone(), &mut skips);
        }
        // 4. mid
        let mut x = self.mid_block.forward(x, emb.clone()); // [batch, c_last, h / 2^k, w / 2^k]
        // 5. up
        for block in &self.up_blocks {
            x = block.forward(x, emb.clone(), &mut skips);
        }
        // 6. head
        let x = group_norm_silu(&self.conv_norm_out, x);
        conv_forward(&self.conv_out, x) // [batch, out_channels, h, w]
    }

    /// [`UNet::forward`] over up to `parts` slices of the batch at once, one thread each, with
    /// the outputs concatenated in order. Every image gets the same output as in one pass.
    ///
    /// This is for burn's CPU backend (flex): it runs element-wise kernels (GroupNorm, SiLU, the
    /// residual adds) on the calling thread, so a single pass leaves the other cores idle
    /// between convolutions. Two slices on two cores sample about a third faster (`ddpm bench
    /// --phases sample`). On a GPU the work is queued on one device anyway: use `parts = 1`.
    /// wasm32 has no threads here; it always runs one pass.
    pub fn forward_split(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        class_labels: Option<Tensor<1, Int>>,
        parts: usize,
    ) -> Tensor<4> {
        let [batch, _, _, _] = sample.dims();
        if parts.clamp(1, batch.max(1)) == 1 || cfg!(target_arch = "wasm32") {
            return self.forward(sample, timesteps, class_labels);
        }
        let outputs = on_batch_slices(batch, parts, |start, len| {
            self.forward_slice(&sample, &timesteps, class_labels.as_ref(), start, len)
        });
        Tensor::cat(outputs, 0)
    }

    /// [`UNet::forward`] on the batch slice `start..start + len` of the inputs.
    pub fn forward_slice(
        &self,
        sample: &Tensor<4>,
        timesteps: &Tensor<1>,
        class_labels: Option<&Tensor<1, Int>>,
        start: usize,
        len: usize,
    ) -> Tensor<4> {
        self.forward(
            sample.clone().narrow(0, start, len),
            timesteps.clone().narrow(0, start, len),
            class_labels.map(|l| l.clone().narrow(0, start, len)),
        )
    }

    /// Whether the model takes class labels.
    pub fn is_class_conditional(&self) -> bool {
        self.class_embedding.is_some()
    }
}

/// `f(start, len)` for up to `parts` consecutive slices of a batch of `batch` images, in order,
/// each slice on its own thread ([`UNet::forward_split`], the trainer's gradients): rayon's
/// workers with the CPU kernels, else one scoped thread per slice. wasm32 has no threads here:
/// the slices run one after another.
pub fn on_batch_slices<T: Send>(
    batch: usize,
    parts: usize,
    f: impl Fn(usize, usize) -> T + Sync,
) -> Vec<T> {
    let chunk = batch.div_ceil(parts.clamp(1, batch.max(1))).max(1);
    let slices = (0..batch)
        .step_by(chunk)
        .map(move |start| (start, chunk.min(batch - start)));
    if chunk >= batch || cfg!(target_arch = "wasm32") {
        return slices.map(|(start, len)| f(start, len)).collect();
    }
    // On rayon's pool, where the CPU kernels split their own work: a slice's kernels then run on
    // its worker, and an idle worker steals from the other slices. On threads outside the pool,
    // every kernel call was handed to the pool's workers and waited for them: with the trainer's
    // main thread in the pool (2 threads), the two slices' kernels queued on one worker and a
    // cifar training step at batch 16 ran at one thread's speed.
    #[cfg(feature = "flex-kernels-forward")]
    {
        use rayon::prelude::*;
        let slices: Vec<_> = slices.collect();
        slices
            .into_par_iter()
            .with_max_len(1)
            .map(|(start, len)| f(start, len))
            .collect()
    }
    #[cfg(not(feature = "flex-kernels-forward"))]
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = slices
            .map(|(start, len)| scope.spawn(move || f(start, len)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn forward_shape(config: &UNetConfig, batch: usize) -> [usize; 4] {
        let device = Device::flex();
        let model = config.init(&device).unwrap();
        let s = config.sample_size;
        let x = Tensor::<4>::zeros([batch, config.in_channels, s, s], &device);
        let t = Tensor::<1>::from_data(TensorData::new(vec![10.0f32; batch], [batch]), &device);
        let labels = config
            .num_class_embeds
            .map(|_| Tensor::<1, Int>::zeros([batch], &device));
        model.forward(x, t, labels).dims()
    }

    #[test]
    fn output_shape_28x28x1() {
        let config = UNetConfig::small_28();
        assert_eq!(forward_shape(&config, 2), [2, 1, 28, 28]);
    }

    #[test]
    fn output_shape_32x32x3_class_conditional() {
        let config = UNetConfig {
            sample_size: 32,
            block_out_channels: vec![16, 32, 32],
            down_block_types: vec![
                DownBlockType::DownBlock2D,
                DownBlockType::AttnDownBlock2D,
                DownBlockType::AttnDownBlock2D,
            ],
            up_block_types: vec![
                UpBlockType::AttnUpBlock2D,
                UpBlockType::AttnUpBlock2D,
                UpBlockType::UpBlock2D,
            ],
            layers_per_block: 1,
            norm_num_groups: Some(8),
            num_class_embeds: Some(11),
            ..UNetConfig::default()
        };
        assert_eq!(forward_shape(&config, 1), [1, 3, 32, 32]);
    }

    #[test]
    fn output_shape_64x64x3() {
        let config = UNetConfig {
            sample_size: 64,
            block_out_channels: vec![8, 16, 16, 32],
            layers_per_block: 1,
            norm_num_groups: Some(4),
            resnet_time_scale_shift: TimeScaleShift::ScaleShift,
            ..UNetConfig::default()
        };
        assert_eq!(forward_shape(&config, 1), [1, 3, 64, 64]);
    }

    #[test]
    fn frequencies_match_closed_form() {
        let f = timestep_frequencies(8, 1.0);
        // exp(-ln(1e4) * i / 3) for i = 0..4: 1, 10^(-4/3), 10^(-8/3), 1e-4
        let expected = [1.0, 10f64.powf(-4.0 / 3.0), 10f64.powf(-8.0 / 3.0), 1e-4];
        for (a, b) in f.iter().zip(expected) {
            assert!((*a as f64 - b).abs() < 1e-7 * b.max(1e-3), "{a} vs {b}");
        }
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let groups = UNetConfig {
            block_out_channels: vec![30, 64],
            ..UNetConfig::small_28()
        };
        let msg = groups.validate().unwrap_err().to_string();
        assert!(
            msg.contains("num_groups (8) must divide channels (30)"),
            "{msg}"
        );
        let size = UNetConfig {
            sample_size: 30,
            block_out_channels: vec![32, 64, 64],
            down_block_types: vec![DownBlockType::DownBlock2D; 3],
            up_block_types: vec![UpBlockType::UpBlock2D; 3],
            ..UNetConfig::small_28()
        };
        let msg = size.validate().unwrap_err().to_string();
        assert!(
            msg.contains("sample_size (30) must be divisible by 2^2 = 4"),
            "{msg}"
        );
        let mismatch = UNetConfig {
            up_block_types: vec![UpBlockType::UpBlock2D],
            ..UNetConfig::small_28()
        };
        assert!(mismatch.init(&Device::flex()).is_err());
        let json = r#"{"_class_name":"UNet2DModel","down_block_types":["DownBlock2D","CrossAttnDownBlock2D"]}"#;
        let msg = UNetConfig::from_diffusers_json(json)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"CrossAttnDownBlock2D\""), "{msg}");
        let json = r#"{"_class_name":"UNet2DModel","downsample_type":"resnet"}"#;
        let msg = UNetConfig::from_diffusers_json(json)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("downsample_type") && msg.contains("resnet"),
            "{msg}"
        );
    }

    #[test]
    fn split_forward_gives_each_image_its_one_pass_output() {
        let config = UNetConfig {
            num_class_embeds: Some(3),
            ..UNetConfig::small_28()
        };
        let device = Device::flex();
        let model = config.init(&device).unwrap();
        let batch = 5;
        let mut noise = crate::noise::SeededNoise::new(7);
        let x = Tensor::<4>::from_data(
            TensorData::new(noise.sample_vec(batch * 28 * 28), [batch, 1, 28, 28]),
            &device,
        );
        let t = Tensor::<1>::from_data(
            TensorData::new(vec![3.0f32, 250.0, 999.0, 40.0, 600.0], [batch]),
            &device,
        );
        let labels =
            Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 0, 1], [batch]), &device);
        let one: Vec<f32> = model
            .forward(x.clone(), t.clone(), Some(labels.clone()))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        // Uneven slices (3 + 2, 2 + 2 + 1) and more threads than images.
        for parts in [2, 3, 8] {
            let split: Vec<f32> = model
                .forward_split(x.clone(), t.clone(), Some(labels.clone()), parts)
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(split.len(), one.len());
            let diff = one
                .iter()
                .zip(&split)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-5, "{parts} slices: max |diff| {diff}");
        }
    }

    #[test]
    fn check_input_names_the_problem() {
        let config = UNetConfig::small_28();
        assert!(config.check_input([2, 1, 28, 28]).is_ok());
        let msg = config.check_input([2, 1, 27, 28]).unwrap_err().to_string();
        assert!(msg.contains("27x28") && msg.contains("factor 2"), "{msg}");
        let msg = config.check_input([2, 3, 28, 28]).unwrap_err().to_string();
        assert!(msg.contains("3 channels"), "{msg}");
    }
}
