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
//!
//! A *saved state* ([`save_state`], `ddpm export --state DIR`) is a run directory cut down to
//! what continuing it needs, small enough to commit: `config.json`, the loss curve thinned to
//! one mean per `log_every` steps, and one checkpoint with the trained weights in f32, the EMA
//! weights in f16 and AdamW's moments in bf16. Loading widens them back to f32, so
//! `ddpm train --resume` reads a saved state like any run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::OptimizerRecord;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, DType, Device, TensorData};
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
    let corrupt_optimizer =
        |e: String| anyhow::anyhow!("{}: optimizer.bpk is corrupt: {e}", dir.display());
    let optimizer_bytes =
        recode_floats(read("optimizer.bpk")?, DType::F32).map_err(corrupt_optimizer)?;
    let optimizer = OptimizerRecord::from_bytes(Bytes::from_bytes_vec(optimizer_bytes))
        .map_err(|e| corrupt_optimizer(format!("{e:?}")))?;
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

/// Re-encode the floating-point tensors of a burnpack buffer (an optimizer or module record) as
/// `to`, keeping names, parameter ids, scalars and metadata. Tensors already in `to`, and
/// integer ones, are kept as they are.
pub fn recode_floats(bytes: Vec<u8>, to: DType) -> std::result::Result<Vec<u8>, String> {
    let reader =
        burn_pack::Reader::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| e.to_string())?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    let mut tensors = Vec::new();
    for tensor in reader.into_tensors().map_err(|e| e.to_string())? {
        let (name, dtype, shape, param_id, bytes) =
            tensor.into_parts().map_err(|e| e.to_string())?;
        let floating = matches!(dtype, DType::F32 | DType::F16 | DType::BF16);
        let (bytes, shape, dtype) = if floating && dtype != to {
            TensorData::from_bytes(bytes, shape, dtype)
                .try_cast(to)
                .map_err(|e| format!("{name}: {e:?}"))?
                .into_parts()
        } else {
            (bytes, shape, dtype)
        };
        tensors.push(burn_pack::Tensor::new(name, dtype, shape, param_id, bytes));
    }
    let mut writer = burn_pack::Writer::new(tensors);
    for (key, value) in &scalars {
        writer = writer.with_scalar(key, *value);
    }
    for (key, value) in &metadata {
        writer = writer.with_metadata(key, value);
    }
    Ok(writer.into_bytes().map_err(|e| e.to_string())?.to_vec())
}

/// Files of a checkpoint directory, in the order they are written.
const CHECKPOINT_FILES: [&str; 4] = [
    "model.bpk",
    "ema.safetensors",
    "optimizer.bpk",
    "state.json",
];

/// Copy a run's configuration, loss log and checkpoint `from` (a checkpoint directory) into a
/// new run directory `out`, which must not hold a run. The copy is made in a temporary
/// directory and renamed into place.
pub fn fork(run: &Path, from: &Path, out: &Path) -> Result<()> {
    let tmp = out.with_file_name(format!(
        ".{}.tmp-fork",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("run")
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).ok();
    }
    let result = (|| -> Result<()> {
        let step_dir = root(&tmp).join(from.file_name().context("checkpoint name")?);
        fs::create_dir_all(&step_dir)
            .with_context(|| format!("creating {}", step_dir.display()))?;
        for name in CHECKPOINT_FILES {
            write_synced(&step_dir.join(name), &read(&from.join(name))?)?;
        }
        write_synced(&tmp.join("config.json"), &read(&run.join("config.json"))?)?;
        if let Ok(loss) = fs::read(run.join("loss.csv")) {
            write_synced(&tmp.join("loss.csv"), &loss)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        fs::remove_dir_all(&tmp).ok();
        return Err(e.context(format!("copying {} into {}", run.display(), out.display())));
    }
    if out.exists() {
        // An empty directory (checked by the caller): replace it.
        fs::remove_dir(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    Ok(())
}

/// What [`save_state`] wrote.
#[derive(Debug)]
pub struct SavedState {
    /// The checkpoint it holds.
    pub step: u64,
    /// Bytes on disk, all files.
    pub bytes: u64,
}

/// Write the compact saved state of run `run` (its newest checkpoint) to `dest`, replacing an
/// earlier saved state there. `dest` must be absent, empty, or a run directory; anything
/// else is refused so that no unrelated files are replaced.
pub fn save_state(run: &Path, dest: &Path, log_every: u64) -> Result<SavedState> {
    let newest = list(run).into_iter().next().with_context(|| {
        format!(
            "{} has no checkpoint to save (expected {}/step-*/)",
            run.display(),
            root(run).display()
        )
    })?;
    if dest.exists() {
        let empty = fs::read_dir(dest)
            .with_context(|| format!("reading {}", dest.display()))?
            .next()
            .is_none();
        ensure_state_dir(dest, empty)?;
    }
    let state: State = serde_json::from_slice(&read(&newest.join("state.json"))?)
        .with_context(|| format!("{}: state.json is corrupt", newest.display()))?;
    let tmp = dest.with_file_name(format!(
        ".{}.tmp-state",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).ok();
    }
    let result = (|| -> Result<u64> {
        let step_dir = root(&tmp).join(name(state.step));
        fs::create_dir_all(&step_dir)
            .with_context(|| format!("creating {}", step_dir.display()))?;
        let mut total = 0u64;
        let mut put = |path: PathBuf, bytes: &[u8]| -> Result<()> {
            total += bytes.len() as u64;
            write_synced(&path, bytes)
        };
        put(
            step_dir.join("model.bpk"),
            &read(&newest.join("model.bpk"))?,
        )?;
        let ema_path = newest.join("ema.safetensors");
        let (ema, info) = model_file::load(&read(&ema_path)?, &Device::flex())
            .with_context(|| format!("{}", ema_path.display()))?;
        put(
            step_dir.join("ema.safetensors"),
            &model_file::save(&ema, &info, StoreDType::F16)?,
        )?;
        let optimizer = recode_floats(read(&newest.join("optimizer.bpk"))?, DType::BF16)
            .map_err(|e| anyhow::anyhow!("{}: optimizer.bpk is corrupt: {e}", newest.display()))?;
        put(step_dir.join("optimizer.bpk"), &optimizer)?;
        put(
            step_dir.join("state.json"),
            &read(&newest.join("state.json"))?,
        )?;
        put(tmp.join("config.json"), &read(&run.join("config.json"))?)?;
        let loss = fs::read_to_string(run.join("loss.csv")).unwrap_or_default();
        put(
            tmp.join("loss.csv"),
            thin_loss_log(&loss, state.step, log_every).as_bytes(),
        )?;
        Ok(total)
    })();
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(e) => {
            fs::remove_dir_all(&tmp).ok();
            return Err(e.context(format!(
                "writing the saved state {} (left as it was)",
                dest.display()
            )));
        }
    };
    // Swap the new state in: the old one is moved aside first and removed only afterwards.
    let old = dest.with_file_name(format!(
        ".{}.old-state",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    if old.exists() {
        fs::remove_dir_all(&old).ok();
    }
    if dest.exists() {
        fs::rename(dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
    }
    if let Err(e) = fs::rename(&tmp, dest) {
        fs::rename(&old, dest).ok();
        return Err(e).with_context(|| format!("renaming into {}", dest.display()));
    }
    fs::remove_dir_all(&old).ok();
    Ok(SavedState {
        step: state.step,
        bytes,
    })
}

/// A saved state may replace `dir` only if it is empty or a run directory.
fn ensure_state_dir(dir: &Path, empty: bool) -> Result<()> {
    if empty || dir.join("config.json").is_file() && root(dir).is_dir() {
        return Ok(());
    }
    bail!(
        "{} exists and is not a run directory (no config.json and checkpoints/): \
         choose another --state directory; nothing was written",
        dir.display()
    )
}

/// The loss log `step,loss,lr` cut to rows at or before `upto`, one row per `every` steps
/// holding the mean loss of those steps (and the learning rate of the last).
pub fn thin_loss_log(text: &str, upto: u64, every: u64) -> String {
    let every = every.max(1);
    let mut out = String::from("step,loss,lr\n");
    let (mut sum, mut count) = (0.0f64, 0u64);
    for line in text.lines().skip(1) {
        let mut parts = line.split(',');
        let (Some(step), Some(loss), Some(lr)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(step), Ok(loss)) = (step.parse::<u64>(), loss.parse::<f64>()) else {
            continue;
        };
        if step > upto {
            break;
        }
        sum += loss;
        count += 1;
        if step % every == 0 || step == upto {
            out.push_str(&format!("{step},{},{lr}\n", sum / count as f64));
            (sum, count) = (0.0, 0);
        }
    }
    out
}
