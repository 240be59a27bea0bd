//! Golden test: editing against diffusers 0.42 — RePaint inpainting (`RePaintPipeline` and
//! `RePaintScheduler` with guidance) and image-to-image with DDIM, DDPM and DPM-Solver++, on the
//! UNets of `tests/fixtures/unet/`, fed the same noise draws (fixtures written by
//! `tests/fixtures/make_edit_fixtures.py`; see its header).
//!
//! Also: an interpolation's end images equal the two seeds' own runs exactly.

use std::cell::Cell;

use burn::tensor::{Device, Tensor, TensorData};
use ddpm::edit::{RePaint, RePaintOptions};
use ddpm::model_file::{self, ModelInfo};
use ddpm::noise::NoiseSource;
use ddpm::pipeline::{GenerateOptions, Generation};
use ddpm::sampler::{SamplerKind, SamplerOptions, build_sampler};
use ddpm::schedule::NoiseSchedule;
use ddpm::unet::UNet;
use ddpm_tests::{max_abs_diff, named_values, read_fixture, tensor};
use serde::Deserialize;

/// Whole f32 runs against diffusers' f32 runs (our coefficients are f64, rounded once), relative
/// to max(|x|, 1). RePaint's many UNet evaluations (jumps and resampling) compound the f32
/// rounding: the gray28 case measured 1.8e-4 on an AVX-512 machine, where the products and
/// kernels sum in another order than on AVX2 (below 1e-4 there).
const TOLERANCE: f32 = 5e-4;

#[derive(Debug, Deserialize)]
struct Manifest {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    kind: String,
    unet: String,
    n: usize,
    steps: usize,
    #[serde(default)]
    jump: usize,
    #[serde(default)]
    resample: usize,
    #[serde(default)]
    eta: f64,
    #[serde(default)]
    class_label: Option<usize>,
    #[serde(default)]
    null_class: Option<usize>,
    #[serde(default)]
    guidance: Option<f64>,
    #[serde(default)]
    sampler: Option<String>,
    #[serde(default)]
    strength: f64,
    timesteps: Vec<usize>,
}

/// The fixture script's `formula_noise`: draw k is z_i = √2 · sin(12.9898 · i + 78.233 · (k + 1))
/// in f64, rounded to f32. Counts its draws in `draws`.
struct FormulaNoise<'a> {
    draws: &'a Cell<usize>,
}

impl NoiseSource for FormulaNoise<'_> {
    fn gaussian(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let k = (self.draws.get() + 1) as f64;
        let values: Vec<f32> = (0..n)
            .map(|i| (2f64.sqrt() * (12.9898 * i as f64 + 78.233 * k).sin()) as f32)
            .collect();
        self.draws.set(self.draws.get() + 1);
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

fn import(name: &str, device: &Device) -> (UNet, ModelInfo) {
    let config = String::from_utf8(read_fixture(&format!("unet/{name}/config.json"))).unwrap();
    let weights = read_fixture(&format!("unet/{name}/diffusion_pytorch_model.safetensors"));
    model_file::import_diffusers(&config, None, &weights, device).expect("import")
}

/// The manifest's cases of one kind ("repaint", "img2img").
fn cases(kind: &str) -> Vec<Case> {
    let manifest: Manifest =
        serde_json::from_slice(&read_fixture("edit/manifest.json")).expect("manifest");
    manifest
        .cases
        .into_iter()
        .filter(|c| c.kind == kind)
        .collect()
}

/// A run's output against diffusers': the same number of noise draws, and every value within
/// [`TOLERANCE`] relative to max(|x|, 1) (DPM-Solver++ does not clip x̂_0, and the random UNets'
/// outputs reach ~±10 there).
fn check_against_diffusers(fixtures: &[u8], case: &Case, output: Tensor<4>, draws: usize) {
    let expected_draws = named_values(fixtures, &format!("{}/draws", case.name)).0[0] as usize;
    assert_eq!(draws, expected_draws, "{}: noise draws", case.name);
    let expected: Tensor<4> = tensor(fixtures, &format!("{}/output", case.name), &output.device());
    let scale = expected.clone().abs().max().into_scalar::<f32>().max(1.0);
    let diff = max_abs_diff(output, expected) / scale;
    assert!(
        diff < TOLERANCE,
        "{}: max |ours − diffusers| / {scale} = {diff}",
        case.name
    );
}

#[test]
fn repaint_matches_diffusers() {
    let device = Device::flex();
    let fixtures = read_fixture("edit/edit.safetensors");
    let cases = cases("repaint");
    assert_eq!(cases.len(), 2);
    for case in cases {
        let (model, mut info) = import(&case.unet, &device);
        if let Some(null) = case.null_class {
            // A null class makes guidance possible: name the classes before it.
            info.class_names = (0..null).map(|i| format!("class {i}")).collect();
        }
        let schedule = NoiseSchedule::new(&info.schedule).unwrap();
        let options = RePaintOptions {
            steps: case.steps,
            jump_length: case.jump,
            jump_n_sample: case.resample,
            eta: case.eta,
            clip_sample: true,
        };
        let repaint = RePaint::new(&schedule, info.prediction, &options).unwrap();
        assert_eq!(
            repaint.timesteps(),
            case.timesteps,
            "{}: timesteps",
            case.name
        );
        let image: Tensor<4> = tensor(&fixtures, &format!("{}/image", case.name), &device);
        let keep: Tensor<4> = tensor(&fixtures, &format!("{}/mask", case.name), &device);
        let mask = keep.neg().add_scalar(1.0); // ours: 1 = regenerate
        let generate = GenerateOptions {
            n: case.n,
            seed: 0,
            class: case.class_label,
            guidance: case.guidance.unwrap_or(1.0),
            part: None,
        };
        let draws = Cell::new(0);
        let noise = Box::new(FormulaNoise { draws: &draws });
        let generation = Generation::inpaint_with_noise(
            &model, &info, repaint, &generate, image, mask, noise, &device,
        )
        .unwrap();
        check_against_diffusers(&fixtures, &case, generation.run(), draws.get());
    }
}

#[test]
fn img2img_matches_diffusers_timesteps_add_noise_and_steps() {
    let device = Device::flex();
    let fixtures = read_fixture("edit/edit.safetensors");
    let cases = cases("img2img");
    assert_eq!(cases.len(), 3);
    let (model, info) = import("gray28", &device);
    let schedule = NoiseSchedule::new(&info.schedule).unwrap();
    let image: Tensor<4> = tensor(&fixtures, "img2img/image", &device);
    for case in cases {
        let kind: SamplerKind = case.sampler.as_deref().unwrap().parse().unwrap();
        let sampler = build_sampler(
            kind,
            &schedule,
            info.prediction,
            case.steps,
            &SamplerOptions::default(),
        )
        .unwrap();
        let start = ddpm::edit::img2img_start(case.steps, case.strength).unwrap();
        assert_eq!(
            &sampler.timesteps()[start..],
            case.timesteps,
            "{}: timesteps",
            case.name
        );
        let draws = Cell::new(0);
        let noise = Box::new(FormulaNoise { draws: &draws });
        let generate = GenerateOptions {
            n: case.n,
            ..GenerateOptions::default()
        };
        let generation = Generation::img2img_with_noise(
            &model,
            &info,
            sampler,
            &generate,
            image.clone(),
            case.strength,
            noise,
            &device,
        )
        .unwrap();
        assert_eq!(generation.total_steps(), case.timesteps.len());
        check_against_diffusers(&fixtures, &case, generation.run(), draws.get());
    }
}

#[test]
fn interpolation_ends_are_the_two_seeded_runs() {
    let device = Device::flex();
    let (model, info) = import("gray28", &device);
    let schedule = NoiseSchedule::new(&info.schedule).unwrap();
    let ddim = || {
        build_sampler(
            SamplerKind::Ddim,
            &schedule,
            info.prediction,
            4,
            &SamplerOptions::default(),
        )
        .unwrap()
    };
    let options = |n, seed| GenerateOptions {
        n,
        seed,
        ..GenerateOptions::default()
    };
    let row = Generation::interpolate(&model, &info, ddim(), &options(5, 0), (3, 7), &device)
        .unwrap()
        .run();
    let seeded = |seed| {
        Generation::new(&model, &info, ddim(), &options(1, seed), &device)
            .unwrap()
            .run()
    };
    let first = row.clone().narrow(0, 0, 1);
    let last = row.clone().narrow(0, 4, 1);
    assert_eq!(max_abs_diff(first, seeded(3)), 0.0, "seed 3's end");
    assert_eq!(max_abs_diff(last, seeded(7)), 0.0, "seed 7's end");
    // The middle is neither end.
    let middle = row.narrow(0, 2, 1);
    assert!(max_abs_diff(middle.clone(), seeded(3)) > 0.1);
    assert!(max_abs_diff(middle, seeded(7)) > 0.1);
    // One seed, or one image, is refused.
    for (n, seeds) in [(5, (3, 3)), (1, (3, 7))] {
        let e = Generation::interpolate(&model, &info, ddim(), &options(n, 0), seeds, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("two seeds") || e.contains("at least 2"), "{e}");
    }
}

/// Images `1..3` of a 4-image run, computed alone (`GenerateOptions::part`, as one worker of a
/// split run in the browser computes them), are those images of the whole run: for plain
/// ancestral sampling (fresh noise every step), image-to-image, RePaint and an interpolation, and
/// with guidance. The same noise reaches the same images; what remains is float rounding, since a
/// matrix product over 2 images may sum in another order than over 4 (measured: 1.3e-5 at most,
/// 0.002 of a level of an 8-bit pixel).
#[test]
fn a_part_of_a_run_is_those_images_of_the_whole_run() {
    let device = Device::flex();
    let fixtures = read_fixture("edit/edit.safetensors");
    let image: Tensor<4> = tensor(&fixtures, "img2img/image", &device);
    for (unet, class, guidance) in [("gray28", None, 1.0), ("rgb16_class", Some(1), 2.0)] {
        let (model, mut info) = import(unet, &device);
        if let Some(embeds) = info.unet.num_class_embeds {
            // Name all but the last embedding: the last becomes the null class of guidance.
            info.class_names = (1..embeds).map(|c| format!("class {c}")).collect();
        }
        assert!(guidance == 1.0 || info.null_class().is_some());
        let schedule = NoiseSchedule::new(&info.schedule).unwrap();
        let sampler = |kind| {
            build_sampler(
                kind,
                &schedule,
                info.prediction,
                4,
                &SamplerOptions::default(),
            )
            .unwrap()
        };
        let options = |part| GenerateOptions {
            n: 4,
            seed: 11,
            class,
            guidance,
            part,
        };
        let s = info.unet.sample_size;
        let c = info.unet.in_channels;
        let picture = Tensor::<4>::zeros([1, c, s, s], &device).add_scalar(0.25);
        let mut mask_values = vec![0.0f32; s * s];
        mask_values[..s * s / 2].fill(1.0);
        let mask = Tensor::<4>::from_data(TensorData::new(mask_values, [1, 1, s, s]), &device);
        let repaint = || {
            let options = RePaintOptions {
                steps: 4,
                jump_length: 2,
                jump_n_sample: 2,
                eta: 1.0,
                clip_sample: true,
            };
            RePaint::new(&schedule, info.prediction, &options).unwrap()
        };
        let run = |part: Option<std::ops::Range<usize>>, task: &str| {
            let o = options(part);
            let generation = match task {
                "sample" => Generation::new(&model, &info, sampler(SamplerKind::Ddpm), &o, &device),
                "img2img" => Generation::img2img(
                    &model,
                    &info,
                    sampler(SamplerKind::Ddpm),
                    &o,
                    if unet == "gray28" {
                        image.clone()
                    } else {
                        picture.clone()
                    },
                    0.7,
                    &device,
                ),
                "inpaint" => Generation::inpaint(
                    &model,
                    &info,
                    repaint(),
                    &o,
                    picture.clone(),
                    mask.clone(),
                    &device,
                ),
                _ => Generation::interpolate(
                    &model,
                    &info,
                    sampler(SamplerKind::Ddim),
                    &o,
                    (3, 7),
                    &device,
                ),
            };
            generation.unwrap().run()
        };
        for task in ["sample", "img2img", "inpaint", "interpolate"] {
            let whole = run(None, task);
            let part = run(Some(1..3), task);
            assert_eq!(part.dims()[0], 2, "{unet} {task}");
            let diff = max_abs_diff(part, whole.clone().narrow(0, 1, 2));
            assert!(
                diff < 1e-4,
                "{unet} {task}: the part differs from the whole run by {diff}"
            );
            // And the part is not trivially the start of the run.
            assert!(max_abs_diff(whole.clone().narrow(0, 0, 2), whole.narrow(0, 1, 2)) > 1e-3);
        }
    }
    // Parts outside the run, or empty, are refused with the run's size named.
    let (model, info) = import("gray28", &device);
    let schedule = NoiseSchedule::new(&info.schedule).unwrap();
    for part in [3..5, 2..2] {
        let sampler = build_sampler(
            SamplerKind::Ddim,
            &schedule,
            info.prediction,
            4,
            &SamplerOptions::default(),
        )
        .unwrap();
        let options = GenerateOptions {
            n: 4,
            part: Some(part),
            ..GenerateOptions::default()
        };
        let e = Generation::new(&model, &info, sampler, &options, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a part of a run of 4 images"), "{e}");
    }
}
