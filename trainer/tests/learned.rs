//! A learned-distribution test: train on a synthetic data set whose distribution is known, then
//! check that samples follow it. Half the 8×8 images are bright on the left and dark on the
//! right, half the other way round. A model trained with correct diffusion math produces
//! images of both modes in about equal numbers; a wrong sign or coefficient anywhere in the
//! forward process, the loss or the sampler produces noise, grey or saturated images instead.

use std::path::Path;
use std::process::Command;

const DDPM: &str = env!("CARGO_BIN_EXE_ddpm");

fn run(args: &[&str]) {
    let out = Command::new(DDPM)
        .args(args)
        .output()
        .expect("running ddpm");
    assert!(
        out.status.success(),
        "ddpm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..64u32 {
        let left_bright = i % 2 == 0;
        let image = image::GrayImage::from_fn(8, 8, |x, _| {
            let bright = (x < 4) == left_bright;
            image::Luma([if bright { 255 } else { 0 }])
        });
        image.save(dir.join(format!("{i:03}.png"))).unwrap();
    }
}

#[test]
fn samples_follow_a_two_mode_distribution() {
    let dir = std::env::temp_dir().join(format!("ddpm-learned-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    write_data(&data);
    let run_dir = dir.join("run");
    let folder = format!("folder:{}", data.display());
    let (out, model, npy) = (
        run_dir.to_str().unwrap().to_string(),
        run_dir.join("model.safetensors"),
        dir.join("samples.npy"),
    );
    run(&[
        "train",
        "--data",
        &folder,
        "--hflip",
        "false",
        "--model",
        "tiny",
        "--batch-size",
        "32",
        "--steps",
        "300",
        "--warmup",
        "20",
        "--lr",
        "2e-3",
        "--ema-decay",
        "0.99",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "300",
        "--backend",
        "cpu",
        "--out",
        &out,
    ]);
    run(&[
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--n",
        "64",
        "--steps",
        "25",
        "--sampler",
        "ddim",
        "--seed",
        "1",
        "--format",
        "npy",
        "--backend",
        "cpu",
        "--out",
        npy.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&npy).unwrap();
    let values: Vec<f32> = npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap();
    assert_eq!(values.len(), 64 * 64);
    let mut left_bright = 0;
    let mut clean = 0;
    for image in values.chunks_exact(64) {
        let (mut left, mut right) = (0.0f32, 0.0f32);
        for (i, v) in image.iter().enumerate() {
            if i % 8 < 4 {
                left += v / 32.0;
            } else {
                right += v / 32.0;
            }
        }
        // A clean sample has one half near +1 and the other near -1: |left - right| ≈ 2.
        if (left - right).abs() > 1.2 {
            clean += 1;
        }
        if left > right {
            left_bright += 1;
        }
    }
    assert!(clean >= 52, "only {clean}/64 samples look like either mode");
    // Binomial(64, 1/2) lies in [20, 44] with probability > 0.997.
    assert!(
        (20..=44).contains(&left_bright),
        "{left_bright}/64 samples are bright on the left: the modes are unbalanced"
    );
}
