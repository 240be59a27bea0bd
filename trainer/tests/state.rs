//! Saved training states (`ddpm export --state`), as a user continues one: the committed state
//! of the bundled model on a fresh checkout, a saved state against the run it came from, the
//! flags that contradict a stored run, a corrupt state and two trainers on one state.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{DDPM, fails, ok, p, read_json, temp_dir, train_args, with_flags};

/// (step, loss) rows of a run's loss log.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    loss_log(run, 1)
}

/// (step, value of `column`) rows of a run's loss log (`step,loss,lr`).
fn loss_log(run: &Path, column: usize) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            // A row being written by a running trainer may be incomplete.
            let parts: Vec<&str> = l.split(',').collect();
            Some((parts[0].parse().ok()?, parts.get(column)?.parse().ok()?))
        })
        .collect()
}

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for (path, bytes) in snapshot(from) {
        let dest = to.join(path.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
}

/// The weights of a model file, by name, as f32.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// A 2-step run of `train_args` at `run` with `flags` added, writing no sample grids.
fn two_steps(run: &Path, flags: &[&str]) {
    let mut flags = flags.to_vec();
    flags.extend(["--sample-every", "0"]);
    ok(&with_flags(train_args(p(run), "2"), &flags));
}

fn newest_checkpoint(run: &Path) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .collect();
    dirs.sort();
    dirs.pop().unwrap()
}

/// The committed state of the bundled model continues for two steps from a fresh checkout,
/// with its optimizer moments and EMA: the committed files are not touched.
#[test]
fn the_committed_state_continues() {
    committed_state_continues("fashion-mnist");
}

/// The same for the committed state of the `small` UNet's run (docs/recipes.md).
#[test]
fn the_committed_small_state_continues() {
    committed_state_continues("fashion-mnist-small");
}

/// The same for the committed state of the AdaGN (`--resnet-time-scale-shift scale-shift`) run
/// of the `tiny` UNet (docs/recipes.md).
#[test]
fn the_committed_adagn_state_continues() {
    committed_state_continues("fashion-mnist-adagn");
}

fn committed_state_continues(name: &str) {
    let state = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../training")
        .join(name);
    assert!(
        state.join("config.json").is_file(),
        "no committed state at {}",
        state.display()
    );
    let before = snapshot(&state);
    let stored = newest_checkpoint(&state);
    let step: u64 = stored.file_name().unwrap().to_str().unwrap()[5..]
        .parse()
        .unwrap();
    let dir = temp_dir(&format!("committed-{name}"));
    let run = dir.join("run");
    let target = (step + 2).to_string();
    let text = ok(&[
        "train",
        "--resume",
        p(&state),
        "--out",
        p(&run),
        "--steps",
        &target,
        "--backend",
        "cpu",
    ]);
    assert!(text.contains(&format!("(step {step})")), "{text}");
    assert_eq!(snapshot(&state), before, "the committed state was changed");
    let rows = losses(&run);
    let new: Vec<f64> = rows.iter().filter(|r| r.0 > step).map(|r| r.1).collect();
    assert_eq!(new.len(), 2, "{rows:?}");
    // The trained model's loss, not a fresh one's (about 1 at initialisation): the recent
    // logged mean is the yardstick.
    let recent = rows.iter().rev().find(|r| r.0 <= step).unwrap().1;
    for loss in &new {
        assert!(
            loss.is_finite() && *loss < 3.0 * recent && *loss < 0.3,
            "loss {loss} after the committed state (recent mean {recent})"
        );
    }
    // Two EMA steps at decay 0.999 barely move the committed EMA weights.
    let ema_before = weights(&stored.join("ema.safetensors"));
    let ema_after = weights(&run.join("model.safetensors"));
    let moved = max_diff(&ema_before, &ema_after);
    assert!(moved < 0.01, "the EMA moved by {moved} in two steps");
}

/// A saved state continues like the run it was saved from: the first step exactly (the weights
/// are kept in f32), the next within bf16's rounding of the moments.
#[test]
fn a_saved_state_continues_like_its_run() {
    let dir = temp_dir("roundtrip");
    let run = dir.join("run");
    let train = |out: &Path, steps: &str| {
        let flags = [
            "--conditional",
            "--ema-decay",
            "0.9",
            "--checkpoint-every",
            "4",
            "--sample-every",
            "0",
            "--log-every",
            "3",
        ];
        ok(&with_flags(train_args(p(out), steps), &flags))
    };
    train(&run, "4");
    let state = dir.join("state");
    let text = ok(&["export", "--checkpoint", p(&run), "--state", p(&state)]);
    assert!(text.contains("at step 4"), "{text}");
    // Smaller than the checkpoint it came from: f16 EMA, bf16 moments.
    let size = |d: &Path| snapshot(d).iter().map(|f| f.1.len()).sum::<usize>();
    let full = size(&newest_checkpoint(&run));
    let compact = size(&newest_checkpoint(&state));
    assert!(compact * 10 < full * 8, "{compact} vs {full} bytes");
    // The loss log is thinned to one mean per --log-every steps (and the last step).
    let thinned = losses(&state);
    let rows = losses(&run);
    assert_eq!(
        thinned.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![3, 4],
        "{thinned:?}"
    );
    let first3 = rows[..3].iter().map(|r| r.1).sum::<f64>() / 3.0;
    assert!((thinned[0].1 - first3).abs() < 1e-9);
    let saved = snapshot(&state);

    let straight = dir.join("straight");
    copy_dir(&run, &straight);
    ok(&[
        "train",
        "--resume",
        p(&straight),
        "--steps",
        "7",
        "--backend",
        "cpu",
    ]);
    let forked = dir.join("forked");
    let text = ok(&[
        "train",
        "--resume",
        p(&state),
        "--out",
        p(&forked),
        "--steps",
        "7",
        "--backend",
        "cpu",
    ]);
    assert!(text.contains("(step 4)"), "{text}");
    assert_eq!(
        snapshot(&state),
        saved,
        "continuing changed the saved state"
    );
    let a = losses(&straight);
    let b = losses(&forked);
    let at = |rows: &[(u64, f64)], s: u64| rows.iter().find(|r| r.0 == s).unwrap().1;
    assert_eq!(
        at(&a, 5),
        at(&b, 5),
        "the first step after the state differs"
    );
    for s in [6, 7] {
        let (x, y) = (at(&a, s), at(&b, s));
        assert!((x - y).abs() <= 1e-3 * x.abs(), "step {s}: {x} vs {y}");
    }
    let ema = max_diff(
        &weights(&straight.join("model.safetensors")),
        &weights(&forked.join("model.safetensors")),
    );
    assert!(ema < 2e-3, "EMA after 3 more steps differs by {ema}");

    // Saving again replaces the state in place: still one checkpoint.
    ok(&["export", "--checkpoint", p(&forked), "--state", p(&state)]);
    let checkpoints = std::fs::read_dir(state.join("checkpoints"))
        .unwrap()
        .count();
    assert_eq!(checkpoints, 1);
    assert!(state.join("checkpoints/step-00000007").is_dir());

    // A directory that is not a run is never replaced.
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("notes.txt"), b"keep me").unwrap();
    let text = fails(&["export", "--checkpoint", p(&run), "--state", p(&docs)]);
    assert!(
        text.contains("is not a run directory") && text.contains("nothing was written"),
        "{text}"
    );
    assert_eq!(std::fs::read(docs.join("notes.txt")).unwrap(), b"keep me");
}

/// Flags that contradict the stored run, a corrupt state and a second trainer are refused,
/// each with a message naming what is wrong, and nothing is written.
#[test]
fn bad_states_and_flags_are_refused() {
    let dir = temp_dir("bad");
    let run = dir.join("run");
    let flags = ["--limit", "32", "--batch-size", "4", "--sample-every", "0"];
    ok(&with_flags(train_args(p(&run), "2"), &flags));
    let state = dir.join("state");
    ok(&["export", "--checkpoint", p(&run), "--state", p(&state)]);
    let saved = snapshot(&state);
    let out = dir.join("out");
    let resume = |extra: &[&str]| {
        let mut args = vec!["train", "--resume", p(&state), "--out", p(&out)];
        args.extend_from_slice(extra);
        fails(&args)
    };
    for (flags, named) in [
        (&["--model", "small"][..], ["--model small", "tiny"]),
        (&["--image-size", "32"][..], ["--image-size 32", "28"]),
        (
            &["--data", "cifar10:/x"][..],
            ["--data cifar10:/x", "fashion-mnist"],
        ),
        (&["--batch-size", "16"][..], ["--batch-size 16", "4"]),
        (&["--prediction", "v"][..], ["--prediction v", "epsilon"]),
    ] {
        let text = resume(flags);
        assert!(
            text.contains(named[0]) && text.contains(&format!("trained with {}", named[1])),
            "{flags:?}: {text}"
        );
        assert!(text.contains("Nothing was written"), "{text}");
        assert!(!out.exists(), "{flags:?} created {}", out.display());
    }
    // Agreeing flags and run settings are fine.
    ok(&[
        "train",
        "--resume",
        p(&state),
        "--out",
        p(&out),
        "--model",
        "tiny",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--log-every",
        "1",
        "--backend",
        "cpu",
    ]);
    assert_eq!(snapshot(&state), saved);

    // A truncated or corrupt file of the state: the error names it; nothing is created.
    for file in [
        "optimizer.bpk",
        "ema.safetensors",
        "model.bpk",
        "state.json",
    ] {
        let broken = dir.join(format!("broken-{file}"));
        copy_dir(&state, &broken);
        let path = newest_checkpoint(&broken).join(file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let target = dir.join(format!("from-broken-{file}"));
        let text = fails(&[
            "train",
            "--resume",
            p(&broken),
            "--out",
            p(&target),
            "--steps",
            "3",
            "--backend",
            "cpu",
        ]);
        assert!(text.contains(file), "{file}: {text}");
        assert!(!target.exists(), "{file}: {} was created", target.display());
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), bytes.len() / 2, "{file} was touched");
    }
    // A corrupt config.json.
    let broken = dir.join("broken-config");
    copy_dir(&state, &broken);
    std::fs::write(broken.join("config.json"), b"{\"data\": ").unwrap();
    let text = fails(&["train", "--resume", p(&broken), "--out", p(&dir.join("x"))]);
    assert!(
        text.contains("config.json") && text.contains("corrupt"),
        "{text}"
    );

    // Continuing into a directory that holds files is refused.
    let busy = dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"keep").unwrap();
    let text = fails(&["train", "--resume", p(&state), "--out", p(&busy)]);
    assert!(text.contains("is not empty"), "{text}");
    assert_eq!(std::fs::read(busy.join("keep.txt")).unwrap(), b"keep");

    // Two trainers on one state: the second is refused while the first runs.
    let shared = dir.join("shared");
    copy_dir(&state, &shared);
    let mut child = Command::new(DDPM)
        .args([
            "train",
            "--resume",
            p(&shared),
            "--steps",
            "100000",
            "--backend",
            "cpu",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while losses(&shared).last().is_none_or(|r| r.0 <= 2) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = fails(&[
        "train",
        "--resume",
        p(&shared),
        "--steps",
        "100001",
        "--backend",
        "cpu",
    ]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(text.contains("another `ddpm train` is using"), "{text}");
}

/// A resumed run may take a new learning rate and shape, as the bundled model's run switched
/// from a constant rate to cosine decay: from the resumed step on, the logged rates follow the
/// closed form of the new schedule, the steps before keep theirs, and the run's config says so.
/// A rate that is not positive is refused before anything is written.
#[test]
fn a_resumed_run_takes_a_new_learning_rate() {
    let dir = temp_dir("lr");
    let run = dir.join("run");
    two_steps(&run, &[]);
    let fresh = dir.join("fresh");
    let text = fails(&[
        "train",
        "--resume",
        p(&run),
        "--out",
        p(&fresh),
        "--lr",
        "0",
    ]);
    assert!(text.contains("--lr must be a positive number"), "{text}");
    assert!(!fresh.exists());

    let text = ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "6",
        "--lr",
        "1e-3",
        "--lr-schedule",
        "cosine",
        "--backend",
        "cpu",
    ]);
    assert!(
        text.contains(
            "(step 2); learning rate 1.000e-3 at step 2, on a cosine from 1.000e-3 at step 2 to \
             zero at step 6"
        ),
        "{text}"
    );
    let rates = loss_log(&run, 2);
    // Logged step k trained at 0-based step k - 1. Warm-up (2 steps) at the old peak 2e-4,
    // then cosine from the new peak 1e-3 over steps 2..6.
    let expected = |k: u64| -> f64 {
        let s = k - 1;
        if s < 2 {
            2e-4 * (s + 1) as f64 / 2.0
        } else {
            let progress = (s - 2) as f64 / 4.0;
            1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    assert_eq!(
        rates.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );
    for (k, lr) in rates {
        let want = expected(k);
        assert!(
            (lr - want).abs() < 1e-12,
            "step {k}: lr {lr}, expected {want}"
        );
    }
    let config = read_json(&run.join("config.json"));
    assert_eq!(config["lr"], 1e-3);
    assert_eq!(config["lr_schedule"], "cosine");
}

#[test]
fn a_resumed_run_takes_input_perturbation() {
    let dir = temp_dir("perturb");
    let run = dir.join("run");
    two_steps(&run, &[]);
    let before = snapshot(&run);
    let bad = dir.join("bad");
    let text = fails(&[
        "train",
        "--resume",
        p(&run),
        "--out",
        p(&bad),
        "--steps",
        "3",
        "--input-perturbation",
        "2",
    ]);
    assert!(
        text.contains("--input-perturbation must be in [0, 1] (got 2"),
        "{text}"
    );
    assert!(!bad.exists());
    assert_eq!(snapshot(&run), before, "the resumed run was touched");

    // The same step 3 from the same state, without and with the perturbation: only the
    // UNet's input changes, so the loss of that step does.
    let resume = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--resume",
            p(&run),
            "--out",
            p(out),
            "--steps",
            "3",
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    let plain = dir.join("plain");
    let text = resume(&plain, &[]);
    assert!(!text.contains("input perturbation"), "{text}");
    let perturbed = dir.join("perturbed");
    let text = resume(&perturbed, &["--input-perturbation", "0.1"]);
    assert!(
        text.contains("input perturbation γ = 0.1: the UNet sees x_t noised with ε + γ·ξ"),
        "{text}"
    );
    let (a, b) = (losses(&plain), losses(&perturbed));
    assert_eq!(a.len(), 3);
    assert_eq!(a[..2], b[..2], "steps 1 and 2 come from the resumed log");
    assert_ne!(
        a[2].1, b[2].1,
        "the perturbation did not reach the UNet's input"
    );
    let config = read_json(&perturbed.join("config.json"));
    assert_eq!(config["input_perturbation"], 0.1);
    let config = read_json(&plain.join("config.json"));
    assert_eq!(config["input_perturbation"], 0.0);
}

#[test]
fn zero_terminal_snr_trains_and_stays_with_the_run() {
    let dir = temp_dir("ztsnr");
    // ε at zero SNR says nothing about the image: refused before anything is written.
    let eps = dir.join("eps");
    let text = fails(&with_flags(
        train_args(p(&eps), "2"),
        &["--zero-terminal-snr"],
    ));
    assert!(
        text.contains("--zero-terminal-snr needs --prediction v (or sample)"),
        "{text}"
    );
    assert!(!eps.exists());

    let run = dir.join("run");
    two_steps(&run, &["--zero-terminal-snr", "--prediction", "v"]);
    let config = read_json(&run.join("config.json"));
    assert_eq!(config["model"]["schedule"]["rescale_betas_zero_snr"], true);
    assert!(losses(&run).iter().all(|(_, l)| l.is_finite()));
    // The model samples from t = T-1, where x_t is pure noise.
    ok(&[
        "sample",
        "--model",
        p(&run.join("model.safetensors")),
        "--n",
        "1",
        "--steps",
        "2",
        "--timestep-spacing",
        "trailing",
        "--backend",
        "cpu",
        "--out",
        p(&dir.join("grid.png")),
    ]);
    // It stays with the run: agreeing on resume continues, contradicting is refused.
    ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "3",
        "--zero-terminal-snr",
        "--backend",
        "cpu",
    ]);
    assert_eq!(losses(&run).len(), 3);
    let plain = dir.join("plain");
    two_steps(&plain, &["--prediction", "v"]);
    let before = snapshot(&plain);
    let text = fails(&[
        "train",
        "--resume",
        p(&plain),
        "--steps",
        "3",
        "--zero-terminal-snr",
    ]);
    assert!(
        text.contains("--zero-terminal-snr true: the run was trained with false"),
        "{text}"
    );
    assert_eq!(snapshot(&plain), before, "the resumed run was touched");
}

#[test]
fn scale_shift_blocks_train_and_stay_with_the_run() {
    let dir = temp_dir("scale-shift");
    let plain = dir.join("plain");
    two_steps(&plain, &[]);
    let run = dir.join("run");
    two_steps(&run, &["--resnet-time-scale-shift", "scale-shift"]);
    let config = read_json(&run.join("config.json"));
    assert_eq!(
        config["model"]["unet"]["resnet_time_scale_shift"],
        "scale_shift"
    );
    assert!(losses(&run).iter().all(|(_, l)| l.is_finite()));
    // Each ResNet block's timestep projection gives a scale and a shift per channel: twice the
    // additive block's outputs. As in diffusers, the middle block's attention then has no group
    // norm of its own; every other weight is the same size.
    let a = weights(&plain.join("model.safetensors"));
    let b: std::collections::BTreeMap<_, _> = weights(&run.join("model.safetensors"))
        .into_iter()
        .collect();
    let mut projections = 0;
    let mut missing = Vec::new();
    for (name, va) in &a {
        match b.get(name) {
            None => missing.push(name.as_str()),
            Some(vb) if name.contains("time_emb_proj") => {
                projections += 1;
                assert_eq!(vb.len(), 2 * va.len(), "{name}");
            }
            Some(vb) => assert_eq!(vb.len(), va.len(), "{name}"),
        }
    }
    assert_eq!(
        missing,
        [
            "mid_block.attentions.0.group_norm.bias",
            "mid_block.attentions.0.group_norm.weight"
        ]
    );
    assert_eq!(a.len(), b.len() + 2);
    assert_eq!(
        projections,
        2 * 8,
        "weight and bias of the tiny UNet's 8 ResNet blocks"
    );

    // Agreeing on resume continues (--model names the preset, whatever the blocks).
    ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "3",
        "--model",
        "tiny",
        "--resnet-time-scale-shift",
        "scale-shift",
        "--backend",
        "cpu",
    ]);
    assert_eq!(losses(&run).len(), 3);
    // Contradicting it is refused, and nothing is touched.
    let before = snapshot(&run);
    let text = fails(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "4",
        "--resnet-time-scale-shift",
        "default",
    ]);
    assert!(
        text.contains("--resnet-time-scale-shift default: the run was trained with scale-shift"),
        "{text}"
    );
    assert_eq!(snapshot(&run), before, "the resumed run was touched");
    // --init keeps its model's blocks; asking for others is refused before anything is written.
    let tuned = dir.join("tuned");
    let text = fails(&with_flags(
        train_args(p(&tuned), "2"),
        &[
            "--init",
            p(&plain.join("model.safetensors")),
            "--resnet-time-scale-shift",
            "scale-shift",
        ],
    ));
    assert!(
        text.contains("--resnet-time-scale-shift scale-shift: the --init model")
            && text.contains("was built with default"),
        "{text}"
    );
    assert!(!tuned.exists());
}
