//! The Rust UNet against diffusers' `UNet2DModel`: the same checkpoint, imported through
//! `ddpm::model_file::import_diffusers`, gives the same output (fixtures written by
//! `tests/fixtures/make_unet_fixtures.py`).

use burn::tensor::{Device, Tensor};
use ddpm::model_file::{self, StoreDType};
use ddpm::unet::UNetConfig;
use ddpm_tests::{int_tensor, max_abs_diff, read_fixture, tensor};

/// Import a fixture directory as `ddpm import` does.
fn import(name: &str, device: &Device) -> (ddpm::unet::UNet, model_file::ModelInfo) {
    let config = String::from_utf8(read_fixture(&format!("unet/{name}/config.json"))).unwrap();
    let weights = read_fixture(&format!("unet/{name}/diffusion_pytorch_model.safetensors"));
    model_file::import_diffusers(&config, None, &weights, device).expect("import")
}

fn check_matches_diffusers(name: &str) {
    let device = Device::flex();
    let (model, info) = import(name, &device);
    let io = read_fixture(&format!("unet/{name}/io.safetensors"));
    let sample: Tensor<4> = tensor(&io, "sample", &device);
    let timesteps: Tensor<1> = tensor(&io, "timesteps", &device);
    let labels = info
        .unet
        .num_class_embeds
        .map(|_| int_tensor(&io, "class_labels", &device));
    let expected: Tensor<4> = tensor(&io, "output", &device);
    let output = model.forward(sample, timesteps, labels);
    let diff = max_abs_diff(output, expected);
    assert!(diff < 1e-4, "{name}: max |ours - diffusers| = {diff}");
}

#[test]
fn gray28_matches_diffusers() {
    check_matches_diffusers("gray28");
}

#[test]
fn rgb16_class_conditional_matches_diffusers() {
    check_matches_diffusers("rgb16_class");
}

#[test]
fn imported_model_survives_a_model_file_round_trip() {
    let device = Device::flex();
    let (model, info) = import("rgb16_class", &device);
    let bytes = model_file::save(&model, &info, StoreDType::F32).unwrap();
    let (reloaded, info2) = model_file::load(&bytes, &device).unwrap();
    assert_eq!(info, info2);
    let io = read_fixture("unet/rgb16_class/io.safetensors");
    let run = |m: &ddpm::unet::UNet| {
        m.forward(
            tensor(&io, "sample", &device),
            tensor(&io, "timesteps", &device),
            Some(int_tensor(&io, "class_labels", &device)),
        )
    };
    assert_eq!(max_abs_diff(run(&model), run(&reloaded)), 0.0);
}

#[test]
fn parameter_counts_equal_diffusers() {
    let text = String::from_utf8(read_fixture("unet/param_counts.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let device = Device::flex();
    let models = json["models"].as_object().unwrap();
    assert!(models.len() >= 2);
    for (name, entry) in models {
        let config = UNetConfig::from_diffusers_json(&entry["config"].to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Parameters are created lazily: counting them allocates nothing.
        let model = config.init(&device).unwrap();
        let ours = model_file::num_params(&model);
        assert_eq!(ours as u64, entry["num_params"].as_u64().unwrap(), "{name}");
    }
}
