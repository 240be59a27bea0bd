//! `ddpm eval` and `ddpm classifier`: sample quality as a Fréchet distance in the feature space
//! of a small Fashion-MNIST classifier that this tool trains itself.
//!
//! The distance is the Fréchet (2-Wasserstein) distance between Gaussians fitted to the
//! classifier's 128-dimensional penultimate features, as in Heusel et al. 2017, but with this
//! classifier instead of Inception-v3: the numbers are comparable with each other, not with
//! published FIDs. `ddpm eval` prints reference rows next to the model's figure (real training
//! images, blurred and noisy test images, pure noise) so that a reader can judge it.
//!
//! A Fréchet distance mixes fidelity and diversity into one number: a model that draws every
//! class too uniformly can still move its Gaussian closer. Beside it `ddpm eval` reports the
//! improved precision and recall of Kynkäänniemi et al. 2019 in the same features (the share of
//! samples that fall inside the real images' k-NN manifold, and the share of real images that
//! fall inside the samples'), and for class-conditional models the Fréchet distance of each
//! class's samples to that class's test images.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams};
use burn::store::ModuleRecord;
use burn::tensor::activation::relu;
use burn::tensor::{Bytes, Device, Int, Tensor, TensorData};
use clap::Args;
use ddpm::model_file;
use ddpm::noise::SeededNoise;
use ddpm::pipeline::{GenerateOptions, Generation};
use ddpm::sampler::{TimestepSpacing, build_sampler};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

use crate::backend::{self, BackendChoice, Selected};
use crate::checkpoint;
use crate::data::{self, DataSource, ImageSet, Split};
use crate::images;
use crate::sample::SamplerArgs;

/// Side of the images the classifier reads.
const SIDE: usize = 28;
/// Width of the feature vectors.
pub const FEATURES: usize = 128;
/// The committed classifier, trained with `ddpm classifier` (see the README for the command).
const BUNDLED: &[u8] = include_bytes!("../assets/fashion-mnist-classifier.bpk");

/// A small CNN for 28×28 grayscale images: two conv/ReLU/max-pool stages, a 128-unit feature
/// layer, and a linear read-out to the 10 classes.
#[derive(Module, Debug)]
pub struct Classifier {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    features: Linear,
    head: Linear,
}

impl Classifier {
    /// A freshly initialised classifier.
    pub fn new(device: &Device) -> Self {
        let conv = |c_in, c_out| {
            Conv2dConfig::new([c_in, c_out], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            conv1: conv(1, 32),
            conv2: conv(32, 64),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            features: LinearConfig::new(64 * 7 * 7, FEATURES).init(device),
            head: LinearConfig::new(FEATURES, 10).init(device),
        }
    }

    /// The committed classifier.
    pub fn bundled(device: &Device) -> Result<Self> {
        Self::from_bytes(BUNDLED.to_vec(), device)
    }

    /// A classifier from `ddpm classifier`'s output.
    pub fn from_bytes(bytes: Vec<u8>, device: &Device) -> Result<Self> {
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
            .map_err(|e| anyhow::anyhow!("not a classifier written by `ddpm classifier`: {e:?}"))?;
        let model = Self::new(device);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.load_record(record)))
            .map_err(|_| anyhow::anyhow!("the weights do not fit the classifier's layers"))
    }

    /// Penultimate features.
    ///
    /// # Shapes
    /// - x: `[batch, 1, 28, 28]`, pixels in [-1, 1]
    /// - output: `[batch, 128]`
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(relu(self.conv1.forward(x)));
        let x = self.pool.forward(relu(self.conv2.forward(x)));
        relu(self.features.forward(x.flatten(1, 3)))
    }

    /// Class logits, `[batch, 10]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.head.forward(self.features(x))
    }
}

/// Images `[n, 784]` (flattened) as a tensor.
fn batch_tensor(pixels: &[f32], device: &Device) -> Tensor<4> {
    let n = pixels.len() / (SIDE * SIDE);
    Tensor::from_data(TensorData::new(pixels.to_vec(), [n, 1, SIDE, SIDE]), device)
}

/// Features and predicted classes of flattened 28×28 images, in batches.
fn classify(model: &Classifier, pixels: &[f32], device: &Device) -> (Vec<f32>, Vec<usize>) {
    let mut features = Vec::new();
    let mut predicted = Vec::new();
    for chunk in pixels.chunks(256 * SIDE * SIDE) {
        let f = model.features(batch_tensor(chunk, device));
        let logits = images::to_vec(model.head.forward(f.clone()));
        features.extend(images::to_vec(f));
        predicted.extend(logits.chunks_exact(10).map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .unwrap_or(0)
        }));
    }
    (features, predicted)
}

/// The recognition rate within each class that occurs in `labels`, in class order.
fn accuracy_by_class(
    predicted: &[usize],
    labels: &[u32],
    class_names: &[String],
) -> Vec<(String, f64)> {
    (0..class_names.len())
        .filter_map(|c| {
            let (predicted, asked): (Vec<usize>, Vec<u32>) = predicted
                .iter()
                .zip(labels)
                .filter(|&(_, &l)| l as usize == c)
                .unzip();
            (!asked.is_empty()).then(|| (class_names[c].clone(), accuracy(&predicted, &asked)))
        })
        .collect()
}

/// Per-class rates as a JSON object keyed by class name.
fn by_name(rates: &[(String, f64)]) -> serde_json::Map<String, serde_json::Value> {
    rates
        .iter()
        .map(|(name, a)| (name.clone(), (*a).into()))
        .collect()
}

fn accuracy(predicted: &[usize], labels: &[u32]) -> f64 {
    let right = predicted
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == **l as usize)
        .count();
    right as f64 / labels.len().max(1) as f64
}

/// The Wilson score interval (Wilson 1927) at 95 % for a rate `rate` observed in `n` trials:
/// where the true rate of the model lies, given that the samples are a random draw of `n`.
/// Unlike the normal approximation it stays inside [0, 1] and is sound near 0 and 1.
fn wilson_interval(rate: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    // The standard normal's 97.5 % quantile.
    const Z: f64 = 1.959_963_984_540_054;
    let n = n as f64;
    let z2 = Z * Z;
    let denominator = 1.0 + z2 / n;
    let centre = (rate + z2 / (2.0 * n)) / denominator;
    let half = Z * (rate * (1.0 - rate) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone)]
pub struct Gaussian {
    mean: DVector<f64>,
    cov: DMatrix<f64>,
}

impl Gaussian {
    /// Fit to `rows` feature vectors of width `dim` (unbiased covariance).
    pub fn fit(features: &[f32], dim: usize) -> Self {
        let n = features.len() / dim;
        let x = DMatrix::from_row_iterator(n, dim, features.iter().map(|&v| v as f64));
        let mean = x.row_mean().transpose();
        let centred = DMatrix::from_fn(n, dim, |i, j| x[(i, j)] - mean[j]);
        let cov = centred.transpose() * &centred / (n.max(2) - 1) as f64;
        Self { mean, cov }
    }
}

/// The square root of a symmetric positive semi-definite matrix (negative round-off
/// eigenvalues are clamped to zero).
fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let sym = (m + m.transpose()) * 0.5;
    let eig = SymmetricEigen::new(sym);
    let roots = eig.eigenvalues.map(|v| v.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// Fréchet distance `‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    let diff = &a.mean - &b.mean;
    let root_a = sqrt_psd(&a.cov);
    let inner = &root_a * &b.cov * &root_a;
    let sym = (&inner + inner.transpose()) * 0.5;
    let cross: f64 = SymmetricEigen::new(sym)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    (diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * cross).max(0.0)
}

/// Squared Euclidean distances between the rows of `a` and the rows of `b` (width `dim`).
fn squared_distances(a: &[f32], b: &[f32], dim: usize) -> Vec<f64> {
    let norms = |x: &[f32]| -> Vec<f64> {
        x.chunks_exact(dim)
            .map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum())
            .collect()
    };
    let (na, nb) = (norms(a), norms(b));
    let mut out = Vec::with_capacity(na.len() * nb.len());
    for (ra, &sa) in a.chunks_exact(dim).zip(&na) {
        for (rb, &sb) in b.chunks_exact(dim).zip(&nb) {
            let dot: f64 = ra.iter().zip(rb).map(|(&x, &y)| x as f64 * y as f64).sum();
            out.push((sa + sb - 2.0 * dot).max(0.0));
        }
    }
    out
}

/// For each row of `x`, the squared distance to its `k`-th nearest other row.
fn knn_radii(x: &[f32], dim: usize, k: usize) -> Vec<f64> {
    let n = x.len() / dim;
    let d = squared_distances(x, x, dim);
    (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i * n + j]).collect();
            let k = k.clamp(1, row.len().max(1));
            if row.is_empty() {
                return 0.0;
            }
            *row.select_nth_unstable_by(k - 1, f64::total_cmp).1
        })
        .collect()
}

/// The share of `points` that lie inside the manifold of `support`: within the k-NN radius of
/// at least one support row.
fn manifold_share(points: &[f32], support: &[f32], radii: &[f64], dim: usize) -> f64 {
    let m = radii.len();
    let d = squared_distances(points, support, dim);
    let inside = d
        .chunks_exact(m)
        .filter(|row| row.iter().zip(radii).any(|(dist, r)| dist <= r))
        .count();
    inside as f64 / (points.len() / dim).max(1) as f64
}

/// Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real` feature
/// rows of width `dim`, with `k`-nearest-neighbour manifolds (the paper uses k = 3).
pub fn precision_recall(real: &[f32], fake: &[f32], dim: usize, k: usize) -> (f64, f64) {
    let precision = manifold_share(fake, real, &knn_radii(real, dim, k), dim);
    let recall = manifold_share(real, fake, &knn_radii(fake, dim, k), dim);
    (precision, recall)
}

/// Neighbours that define the precision/recall manifolds (Kynkäänniemi et al. 2019).
const PR_K: usize = 3;

/// A Gaussian blur of each 28×28 image.
fn blurred(pixels: &[f32], sigma: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(pixels.len());
    for image in pixels.chunks_exact(SIDE * SIDE) {
        let gray = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(
            SIDE as u32,
            SIDE as u32,
            image.to_vec(),
        )
        .expect("28x28 buffer");
        out.extend(image::imageops::blur(&gray, sigma).into_raw());
    }
    out
}

/// `ddpm classifier` flags.
#[derive(Debug, Args)]
pub struct ClassifierArgs {
    /// Fashion-MNIST directory (IDX files).
    #[arg(long, default_value = "fashion-mnist")]
    pub data: DataSource,
    /// Passes over the 60,000 training images.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed for initialisation and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the weights (burn record).
    #[arg(long)]
    pub out: PathBuf,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
}

fn fashion_mnist(source: &DataSource, split: Split) -> Result<ImageSet> {
    let set = data::load(source, split, None, None)?;
    ensure!(
        set.size == SIDE && set.channels == 1 && set.class_names.len() == 10,
        "the evaluation classifier needs 28x28 grayscale images in 10 classes; {source} has \
         {0}x{0}x{1} images in {2} classes",
        set.size,
        set.channels,
        set.class_names.len()
    );
    Ok(set)
}

/// Run `ddpm classifier`: train the evaluation classifier and report its test accuracy.
pub fn train_classifier(args: ClassifierArgs) -> Result<()> {
    ensure!(
        args.epochs > 0 && args.batch_size > 0,
        "--epochs and --batch-size must be > 0"
    );
    let selected = backend::select(args.backend)?;
    let base = selected.device.clone();
    base.seed(args.seed);
    let device = base.clone().autodiff();
    let train = fashion_mnist(&args.data, Split::Train)?;
    let test = fashion_mnist(&args.data, Split::Test)?;
    eprintln!(
        "training the evaluation classifier on {} ({} images, {} epochs)",
        selected.name,
        train.len(),
        args.epochs
    );
    let mut model = Classifier::new(&device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let image_len = SIDE * SIDE;
    for epoch in 0..args.epochs {
        let order = crate::train::permutation(train.len(), args.seed ^ (epoch as u64 + 1));
        let mut total = 0.0;
        let mut batches = 0;
        for chunk in order.chunks(args.batch_size) {
            let mut pixels = Vec::with_capacity(chunk.len() * image_len);
            let mut labels = Vec::with_capacity(chunk.len());
            for &i in chunk {
                pixels.extend_from_slice(train.image(i as usize));
                labels.push(train.labels[i as usize] as i64);
            }
            let x = batch_tensor(&pixels, &device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [chunk.len()]), &device);
            let loss = loss_fn.forward(model.forward(x), y);
            total += loss.clone().into_scalar::<f32>() as f64;
            batches += 1;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(args.lr, model, grads);
        }
        let valid = model.valid();
        let (_, predicted) = classify(&valid, &test.pixels, &base);
        eprintln!(
            "epoch {}: mean loss {:.4}, test accuracy {:.4}",
            epoch + 1,
            total / batches as f64,
            accuracy(&predicted, &test.labels)
        );
    }
    let bytes = model
        .valid()
        .into_record()
        .into_bytes()
        .context("serialising the classifier")?;
    checkpoint::write_atomic(&args.out, &bytes)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `ddpm eval` flags.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model file to evaluate (28×28 grayscale, e.g. trained on Fashion-MNIST).
    #[arg(long)]
    pub model: PathBuf,
    /// Number of generated images (the reference rows use as many real images).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplerArgs,
    /// Classifier-free guidance scale for class-conditional models (1 = none).
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f64,
    /// Seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images generated per forward pass.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Fashion-MNIST directory: the t10k images are the reference.
    #[arg(long, default_value = "fashion-mnist")]
    pub data: DataSource,
    /// Classifier weights from `ddpm classifier` (default: the committed one).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Also write the figures as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
}

/// Generate `n` images (classes in turn for a class-conditional model); returns the flattened
/// pixels, the requested classes and the timestep spacing used (the flag's, else the model's).
fn generate(
    args: &EvalArgs,
    model_path: &Path,
    backend: &Selected,
) -> Result<(Vec<f32>, Vec<u32>, Option<TimestepSpacing>)> {
    let device = &backend.device;
    let bytes = checkpoint::read(model_path)?;
    let (model, info) = model_file::load(&bytes, device)
        .with_context(|| format!("{} is not a usable model file", model_path.display()))?;
    let u = &info.unet;
    ensure!(
        u.sample_size == SIDE && u.in_channels == 1,
        "{}: ddpm eval measures 28x28 grayscale models (its classifier is trained on \
         Fashion-MNIST); this model makes {1}x{1}x{2} images",
        model_path.display(),
        u.sample_size,
        u.in_channels
    );
    let schedule = crate::sample::schedule_for(&info, args.sampling.steps)?;
    let classes = info.num_classes();
    let sampler_options = args.sampling.options(true, args.guidance).for_model(&info);
    let mut pixels = Vec::with_capacity(args.n * SIDE * SIDE);
    let mut requested = Vec::new();
    let mut done = 0;
    let bar = indicatif::ProgressBar::new(args.n as u64).with_style(
        indicatif::ProgressStyle::with_template("sampling {bar:30} {pos}/{len} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    let mut batch_index = 0u64;
    while done < args.n {
        let b = args.batch_size.min(args.n - done);
        // One class per batch keeps guidance a single 2b forward pass.
        let class = (classes > 0).then(|| batch_index as usize % classes);
        let options = GenerateOptions {
            n: b,
            seed: args.seed.wrapping_add(batch_index),
            class,
            guidance: args.guidance,
            part: None,
        };
        let sampler = build_sampler(
            args.sampling.sampler,
            &schedule,
            info.prediction,
            args.sampling.steps,
            &sampler_options,
        )?;
        let generation = Generation::new(&model, &info, sampler, &options, device)?
            .with_batch_threads(backend.batch_threads);
        pixels.extend(images::to_vec(generation.run()));
        if let Some(c) = class {
            requested.extend(std::iter::repeat_n(c as u32, b));
        }
        done += b;
        batch_index += 1;
        bar.set_position(done as u64);
    }
    bar.finish_and_clear();
    Ok((pixels, requested, sampler_options.timestep_spacing))
}

/// One line of the report.
#[derive(Debug, serde::Serialize)]
struct Row {
    name: String,
    frechet_distance: f64,
    precision: f64,
    recall: f64,
}

/// One class's figures for a class-conditional model.
#[derive(Debug, serde::Serialize)]
struct ClassRow {
    class: String,
    samples: usize,
    /// The class's samples against the class's test images.
    frechet_distance: f64,
    /// As many of the class's training images against its test images (the floor).
    floor: f64,
}

/// Per-class Fréchet distances: the samples that asked for class c against the test images of
/// class c, next to the same number of class-c training images (the floor at that size).
fn per_class_distances(
    sample_features: &[f32],
    requested: &[u32],
    test_features: &[f32],
    test: &ImageSet,
    train_features: &[f32],
    train: &ImageSet,
) -> Vec<ClassRow> {
    let rows_of = |features: &[f32], labels: &[u32], class: u32, limit: usize| -> Vec<f32> {
        features
            .chunks_exact(FEATURES)
            .zip(labels)
            .filter(|(_, l)| **l == class)
            .take(limit)
            .flat_map(|(row, _)| row.iter().copied())
            .collect()
    };
    (0..test.class_names.len() as u32)
        .filter_map(|c| {
            let mine = rows_of(sample_features, requested, c, usize::MAX);
            let n = mine.len() / FEATURES;
            if n < 2 {
                return None;
            }
            let reference = Gaussian::fit(
                &rows_of(test_features, &test.labels, c, usize::MAX),
                FEATURES,
            );
            let real = rows_of(train_features, &train.labels, c, n);
            Some(ClassRow {
                class: test.class_names[c as usize].clone(),
                samples: n,
                frechet_distance: frechet_distance(&Gaussian::fit(&mine, FEATURES), &reference),
                floor: frechet_distance(&Gaussian::fit(&real, FEATURES), &reference),
            })
        })
        .collect()
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// Run `ddpm eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    ensure!(
        args.n >= 2,
        "--n must be at least 2 (a covariance needs two images)"
    );
    ensure!(args.batch_size > 0, "--batch-size must be > 0");
    let selected = backend::select(args.backend)?;
    let device = selected.device.clone();
    let classifier = match &args.classifier {
        Some(path) => Classifier::from_bytes(checkpoint::read(path)?, &device)
            .with_context(|| format!("{}", path.display()))?,
        None => Classifier::bundled(&device)?,
    };
    let test = fashion_mnist(&args.data, Split::Test)?;
    let train = fashion_mnist(&args.data, Split::Train)?;
    let (test_features, test_predicted) = classify(&classifier, &test.pixels, &device);
    let test_accuracy = accuracy(&test_predicted, &test.labels);
    let reference = Gaussian::fit(&test_features, FEATURES);
    eprintln!(
        "classifier: {:.2}% accuracy on the {} t10k images; features from {}",
        100.0 * test_accuracy,
        test.len(),
        selected.name
    );

    let (samples, requested, spacing) = generate(&args, &args.model, &selected)?;
    let n = args.n;
    let (sample_features, sample_predicted) = classify(&classifier, &samples, &device);
    // Precision and recall against as many test images as there are samples.
    let real_features = &test_features[..n.min(test.len()) * FEATURES];
    let score = |name: String, features: &[f32]| {
        let (precision, recall) = precision_recall(real_features, features, FEATURES, PR_K);
        Row {
            name,
            frechet_distance: frechet_distance(&Gaussian::fit(features, FEATURES), &reference),
            precision,
            recall,
        }
    };

    // Training images: the first n for the floor row, and enough of each class for the
    // per-class floors.
    let train_used = train.len().min(n.max(10_000));
    let (train_features, train_predicted) = classify(
        &classifier,
        &train.pixels[..train_used * SIDE * SIDE],
        &device,
    );
    // What a model that drew its training images exactly would score on class recognition.
    let train_accuracy = accuracy(&train_predicted, &train.labels[..train_used]);
    let some_test = &test.pixels[..n.min(test.len()) * SIDE * SIDE];
    let mut noisy = some_test.to_vec();
    let noise = SeededNoise::new(args.seed).sample_vec(noisy.len());
    for (p, z) in noisy.iter_mut().zip(noise) {
        *p = (*p + 0.5 * z).clamp(-1.0, 1.0);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let pure_noise: Vec<f32> = {
        use rand_core::Rng;
        (0..n * SIDE * SIDE)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
            .collect()
    };
    let mut rows = vec![
        score(
            format!(
                "model: {} ({} {} steps{}{})",
                args.model.display(),
                args.sampling.sampler,
                args.sampling.steps,
                args.sampling.settings(spacing),
                if requested.is_empty() {
                    String::new()
                } else {
                    format!(", guidance {}", args.guidance)
                }
            ),
            &sample_features,
        ),
        score(
            "real: training images (the floor)".into(),
            &train_features[..n.min(train_used) * FEATURES],
        ),
    ];
    let refs: [(&str, &[f32]); 3] = [
        (
            "test images blurred (Gaussian σ=1)",
            &blurred(some_test, 1.0),
        ),
        ("test images + noise (σ=0.5)", &noisy),
        ("uniform noise (a ceiling)", &pure_noise),
    ];
    for (name, pixels) in refs {
        rows.push(score(
            name.to_string(),
            &classify(&classifier, pixels, &device).0,
        ));
    }

    println!(
        "Fréchet distance to the {} Fashion-MNIST test images, in the features of ddpm's \
         Fashion-MNIST classifier (not Inception FID), with improved precision and recall \
         (k = {PR_K}) against {} of them; {n} images per row:",
        test.len(),
        real_features.len() / FEATURES
    );
    println!("  {:>9}  {:>9}  {:>6}", "distance", "precision", "recall");
    for row in &rows {
        println!(
            "  {:>9.3}  {:>9.3}  {:>6.3}  {}",
            row.frechet_distance, row.precision, row.recall, row.name
        );
    }
    let mut histogram = [0usize; 10];
    for &p in &sample_predicted {
        histogram[p] += 1;
    }
    println!(
        "classes the classifier sees in the samples: {}",
        (0..10)
            .map(|c| format!("{} {}", test.class_names[c], histogram[c]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let class_accuracy = (!requested.is_empty()).then(|| {
        let a = accuracy(&sample_predicted, &requested);
        let (low, high) = wilson_interval(a, requested.len());
        println!(
            "requested class recognised in {:.1}% of the samples (95% interval for this model: {:.1}-{:.1}%; the classifier recognises {:.1}% of the first {train_used} training images' classes, {:.1}% of the test images')",
            100.0 * a,
            100.0 * low,
            100.0 * high,
            100.0 * train_accuracy,
            100.0 * test_accuracy
        );
        a
    });
    let class_accuracy_interval = class_accuracy.map(|a| {
        let (low, high) = wilson_interval(a, requested.len());
        [low, high]
    });
    let per_class_recognised = accuracy_by_class(&sample_predicted, &requested, &test.class_names);
    // The same rate for each class's real test images: what a model that drew new images of
    // the class exactly as the data set does would score there.
    let test_by_class = accuracy_by_class(&test_predicted, &test.labels, &test.class_names);
    if !per_class_recognised.is_empty() {
        println!(
            "recognised per requested class (in brackets: the class's test images): {}",
            per_class_recognised
                .iter()
                .map(|(name, a)| {
                    let real = test_by_class
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(f64::NAN, |(_, r)| *r);
                    format!("{name} {:.0}% ({:.0}%)", 100.0 * a, 100.0 * real)
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let per_class = per_class_distances(
        &sample_features,
        &requested,
        &test_features,
        &test,
        &train_features,
        &train,
    );
    if !per_class.is_empty() {
        println!(
            "per-class Fréchet distance (each class's samples against its {} test images; the floor: as many of its training images):",
            test.len() / test.class_names.len().max(1)
        );
        for row in &per_class {
            println!(
                "  {:>9.3}  (floor {:>7.3}, {} samples)  {}",
                row.frechet_distance, row.floor, row.samples, row.class
            );
        }
        println!(
            "  {:>9.3}  (floor {:>7.3})  mean over classes",
            mean(per_class.iter().map(|r| r.frechet_distance)),
            mean(per_class.iter().map(|r| r.floor))
        );
    }
    if let Some(path) = &args.json {
        let report = serde_json::json!({
            "n": n,
            "sampler": args.sampling.sampler.to_string(),
            "steps": args.sampling.steps,
            "eta": args.sampling.eta,
            "timestep_spacing": spacing.map(TimestepSpacing::name),
            "guidance": args.guidance,
            "classifier_test_accuracy": test_accuracy,
            "classifier_train_accuracy": train_accuracy,
            "classifier_test_accuracy_by_class": by_name(&test_by_class),
            "train_images_classified": train_used,
            "rows": rows,
            "class_histogram": histogram,
            "requested_class_accuracy": class_accuracy,
            "requested_class_accuracy_interval95": class_accuracy_interval,
            "requested_class_accuracy_by_class": by_name(&per_class_recognised),
            "precision_recall_k": PR_K,
            "per_class": per_class,
            "per_class_mean": (!per_class.is_empty())
                .then(|| mean(per_class.iter().map(|r| r.frechet_distance))),
            "per_class_floor_mean": (!per_class.is_empty())
                .then(|| mean(per_class.iter().map(|r| r.floor))),
        });
        checkpoint::write_atomic(path, &serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_intervals_match_newcombes_table() {
        // Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table II,
        // method 3 (the score interval without continuity correction), to its four decimals.
        for (k, n, low, high) in [
            (81, 263, 0.2553, 0.3662),
            (15, 148, 0.0624, 0.1605),
            (0, 20, 0.0, 0.1611),
            (1, 29, 0.0061, 0.1718),
        ] {
            let (l, h) = wilson_interval(k as f64 / n as f64, n);
            assert!(
                (l - low).abs() < 5e-5 && (h - high).abs() < 5e-5,
                "{k}/{n}: {l:.5}-{h:.5}, expected {low}-{high}"
            );
        }
        // What `ddpm eval --n 1000` reports: 87.6 % is known to about ±2 points.
        let (l, h) = wilson_interval(0.876, 1000);
        assert!(
            (l - 0.8541).abs() < 5e-5 && (h - 0.8950).abs() < 5e-5,
            "{l} {h}"
        );
    }

    fn gaussian(mean: &[f64], cov: &[f64]) -> Gaussian {
        let d = mean.len();
        Gaussian {
            mean: DVector::from_column_slice(mean),
            cov: DMatrix::from_row_slice(d, d, cov),
        }
    }

    #[test]
    fn identical_gaussians_are_at_distance_zero() {
        let a = gaussian(&[1.0, -2.0], &[2.0, 0.5, 0.5, 1.0]);
        assert!(frechet_distance(&a, &a).abs() < 1e-12);
    }

    #[test]
    fn diagonal_covariances_match_the_closed_form() {
        // For commuting covariances the distance is ‖Δμ‖² + Σ (√a_i − √b_i)².
        let a = gaussian(
            &[0.0, 1.0, 2.0],
            &[4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 9.0],
        );
        let b = gaussian(
            &[1.0, 1.0, 0.0],
            &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 4.0],
        );
        let expected = (1.0 + 0.0 + 4.0) + (1.0 + 0.0 + 1.0);
        assert!((frechet_distance(&a, &b) - expected).abs() < 1e-12);
    }

    #[test]
    fn non_commuting_covariances_match_the_two_by_two_formula() {
        // For 2×2 PSD M: tr √M = √(tr M + 2 √det M). With A = I, √A B √A = B.
        let a = gaussian(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0]);
        let b = gaussian(&[0.0, 0.0], &[2.0, 0.7, 0.7, 1.5]);
        let (tr, det): (f64, f64) = (3.5, 2.0 * 1.5 - 0.49);
        let expected = 2.0 + 3.5 - 2.0 * (tr + 2.0 * det.sqrt()).sqrt();
        assert!((frechet_distance(&a, &b) - expected).abs() < 1e-12);
        // Symmetric in its arguments.
        assert!((frechet_distance(&b, &a) - expected).abs() < 1e-10);
    }

    #[test]
    fn precision_and_recall_match_hand_counts() {
        // Real points 0, 1, 2, 3 on a line: with k = 1 each has radius 1. Of the samples 0.5
        // and 10 only 0.5 is within a radius: precision 1/2. The samples' own radii (k = 1)
        // are 9.5, and every real point is within 9.5 of 0.5: recall 1.
        let real = [0.0, 1.0, 2.0, 3.0];
        let fake = [0.5, 10.0];
        assert_eq!(precision_recall(&real, &fake, 1, 1), (0.5, 1.0));
        // Samples packed around one real point: all precise, but they cover only the real
        // points within their tiny radii (0 and 0.05 → just the point 0): recall 1/4.
        let packed = [0.0, 0.02, 0.05];
        assert_eq!(precision_recall(&real, &packed, 1, 1), (1.0, 0.25));
        // In two dimensions, with k = 2: real corners of the unit square have radius 1 (two
        // neighbours at distance 1); the centre is inside, (3, 3) is not.
        let square = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let (p, _) = precision_recall(&square, &[0.5, 0.5, 3.0, 3.0, 0.4, 0.6], 2, 2);
        assert!((p - 2.0 / 3.0).abs() < 1e-12, "{p}");
        // A set against itself.
        assert_eq!(precision_recall(&square, &square, 2, 1), (1.0, 1.0));
    }

    #[test]
    fn fitted_gaussian_matches_the_sample_moments() {
        // Rows (1, 2), (3, 2), (5, 8): mean (3, 4); covariance [[4, 6], [6, 12]].
        let g = Gaussian::fit(&[1.0, 2.0, 3.0, 2.0, 5.0, 8.0], 2);
        assert_eq!(g.mean.as_slice(), &[3.0, 4.0]);
        assert_eq!(g.cov.as_slice(), &[4.0, 6.0, 6.0, 12.0]);
    }
}
