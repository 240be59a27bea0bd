//! The same UNet on the CPU backend (flex) and on wgpu agree. Without a GPU, wgpu runs on
//! lavapipe (Mesa's software Vulkan driver, `apt-get install mesa-vulkan-drivers`), so the GPU
//! code path — WGSL shaders through naga, burn's CubeCL kernels — is exercised in CI.
//! Shapes stay tiny: lavapipe compiles every kernel on the CPU.

use burn::tensor::{Device, Int, Tensor, TensorData};
use ddpm::model_file::{self, ModelInfo, StoreDType};
use ddpm::noise::SeededNoise;
use ddpm::unet::{DownBlockType, UNetConfig, UpBlockType};
use ddpm_tests::max_abs_diff;

#[test]
fn unet_forward_agrees_on_flex_and_wgpu() {
    // Autotuning would benchmark every kernel variant on the software rasteriser: keep it short.
    // Safe: this binary holds a single test, so no other thread reads the environment yet.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    let gpu = Device::wgpu_options().init().expect(
        "no wgpu adapter: install a Vulkan driver (lavapipe: apt-get install mesa-vulkan-drivers)",
    );
    let cpu = Device::flex();
    let config = UNetConfig {
        sample_size: 8,
        in_channels: 3,
        out_channels: 3,
        down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
        up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        attention_head_dim: Some(8),
        norm_num_groups: Some(4),
        num_class_embeds: Some(4),
        ..UNetConfig::default()
    };
    let info = ModelInfo::new(config);
    let model = info.unet.init(&cpu).unwrap();
    let bytes = model_file::save(&model, &info, StoreDType::F32).unwrap();
    let (gpu_model, _) = model_file::load(&bytes, &gpu).unwrap();

    let shape = [2, 3, 8, 8];
    let x = SeededNoise::new(3).sample_vec(shape.iter().product());
    let run = |m: &ddpm::unet::UNet, device: &Device| {
        let x = Tensor::<4>::from_data(TensorData::new(x.clone(), shape), device);
        let t = Tensor::<1>::from_data(TensorData::new(vec![5.0f32, 901.0], [2]), device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 3], [2]), device);
        m.forward(x, t, Some(y))
    };
    let on_cpu = run(&model, &cpu);
    let on_gpu = run(&gpu_model, &gpu).to_device(&cpu);
    let diff = max_abs_diff(on_cpu.clone(), on_gpu);
    assert!(diff < 1e-4, "max |flex - wgpu| = {diff}");
    // And the output is not trivially zero.
    let scale: f32 = on_cpu.abs().max().into_scalar();
    assert!(scale > 0.1, "output scale {scale}");
}
