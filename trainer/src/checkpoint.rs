//! Checkpoints: everything needed to continue a run exactly. One directory per checkpoint,
//! `checkpoints/step-00001000/` holding
//!
//! - `model.bpk`: the trained weights as a burn record (keeps parameter ids, which the
//!   optimizer state refers to),
//! - `ema.safetensors`: the EMA weights in the model-file format,
//! - `optimizer.bpk`: AdamW's moments,
//! - `state.json`: the step and running statistics.
//!
//! A checkpoint is written into a temporary directory, synced, then renamed into place: a crash
//! or a full disk at any moment leaves the previous checkpoints intact. The last `keep` are kept.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::OptimizerRecord;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};
use ddpm::model_file::{self, ModelInfo, StoreDType};
use ddpm::unet::UNet;
use serde::{Deserialize, Serialize};

/// Scalars saved with a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Optimisation steps done.
    pub step: u64,
    /// Seconds of training so far (all sessions).
    pub elapsed_secs: f64,
}

/// A loaded checkpoint.
pub struct Loaded {
    /// Where it was read from.
    pub dir: PathBuf,
    /// The trained model on the (autodiff) device it was loaded to.
    pub model: UNet,
    /// The EMA model on the base device.
    pub ema: UNet,
    /// Optimizer state.
    pub optimizer: OptimizerRecord,
    /// Step and statistics.
    pub state: State,
}

/// The directory holding a run's checkpoints.
pub fn root(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Read a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Write `bytes` to `path` and flush it to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

/// Replace `path` atomically with `bytes` (temp file in the same directory + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    write_synced(&tmp, bytes).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Save a checkpoint and prune old ones.
pub fn save(
    run: &Path,
    model: &UNet,
    ema: &UNet,
    info: &ModelInfo,
    optimizer: OptimizerRecord,
    state: &State,
    keep: usize,
) -> Result<PathBuf> {
    let root = root(run);
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let final_dir = root.join(name(state.step));
    let tmp = root.join(format!(".tmp-{}", name(state.step)));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).ok();
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        let record = model
            .clone()
            .into_record()
            .into_bytes()
            .context("serialising the model")?;
        write_synced(&tmp.join("model.bpk"), &record)?;
        let ema_bytes = model_file::save(ema, info, StoreDType::F32)?;
        write_synced(&tmp.join("ema.safetensors"), &ema_bytes)?;
        let optim = optimizer
            .into_bytes()
            .context("serialising the optimizer state")?;
        write_synced(&tmp.join("optimizer.bpk"), &optim)?;
        write_synced(&tmp.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
        Ok(())
    })();
    if let Err(e) = result {
        fs::remove_dir_all(&tmp).ok();
        return Err(e.context(format!(
            "writing checkpoint {} (earlier checkpoints are untouched)",
            final_dir.display()
        )));
    }
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).ok();
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming into {}", final_dir.display()))?;
    prune(&root, keep);
    Ok(final_dir)
}

/// Checkpoint directories of a run, newest first.
pub fn list(run: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root(run))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_dir()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("step-"))
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// Remove all but the newest `keep` checkpoints, and temporary directories left by a process
/// that was killed while writing one.
fn prune(root: &Path, keep: usize) {
    let run = root.parent().unwrap_or(root);
    for old in list(run).into_iter().skip(keep.max(1)) {
        fs::remove_dir_all(old).ok();
    }
    if let Ok(entries) = fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_dir_all(entry.path()).ok();
            }
        }
    }
}

fn load_one(dir: &Path, info: &ModelInfo, device: &Device, base: &Device) -> Result<Loaded> {
    let read = |name: &str| read(&dir.join(name));
    let state: State = serde_json::from_slice(&read("state.json")?)
        .with_context(|| format!("{}: state.json is corrupt", dir.display()))?;
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(read("model.bpk")?))
        .map_err(|e| anyhow::anyhow!("{}: model.bpk is corrupt: {e:?}", dir.display()))?;
    let model = info.unet.init(device)?;
    let model =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.load_record(record)))
            .map_err(|_| {
                anyhow::anyhow!(
                    "{}: model.bpk does not fit the run's model config",
                    dir.display()
                )
            })?;
    let (ema, _) = model_file::load(&read("ema.safetensors")?, base)
        .with_context(|| format!("{}: ema.safetensors", dir.display()))?;
    let optimizer = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(read("optimizer.bpk")?))
        .map_err(|e| anyhow::anyhow!("{}: optimizer.bpk is corrupt: {e:?}", dir.display()))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        model,
        ema,
        optimizer,
        state,
    })
}

/// Load the newest readable checkpoint; a corrupt one is reported and the previous one tried.
pub fn load_latest(run: &Path, info: &ModelInfo, device: &Device, base: &Device) -> Result<Loaded> {
    let dirs = list(run);
    if dirs.is_empty() {
        bail!(
            "{} has no checkpoint to resume from (expected {}/step-*/)",
            run.display(),
            root(run).display()
        );
    }
    let mut errors: Vec<(PathBuf, anyhow::Error)> = Vec::new();
    for dir in &dirs {
        match load_one(dir, info, device, base) {
            Ok(loaded) => {
                for (bad, e) in &errors {
                    eprintln!(
                        "warning: skipped corrupt checkpoint {}: {e:#}",
                        bad.display()
                    );
                }
                if !errors.is_empty() {
                    eprintln!("resuming from the previous checkpoint {}", dir.display());
                }
                return Ok(loaded);
            }
            Err(e) => errors.push((dir.clone(), e)),
        }
    }
    let (dir, e) = errors.remove(0);
    Err(e.context(format!(
        "no readable checkpoint in {} (newest: {})",
        root(run).display(),
        dir.display()
    )))
}
