//! The `ddpm` command end to end, as a user runs it: a tiny training run on a Fashion-MNIST
//! subset (the Debian package's files), resume, sampling in every format, export and the
//! errors a user meets first. CPU backend, tiny shapes.

mod common;

use std::path::Path;
use std::process::Command;

use common::{DDPM, fails, ok, p, read_json, temp_dir, train_args};
use ddpm::noise::SeededNoise;

fn loss_rows(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(String::from)
        .collect()
}

#[test]
fn train_resume_sample_export() {
    let dir = temp_dir("main");
    let run = dir.join("run");
    ok(&train_args(p(&run), "4"));
    for file in [
        "config.json",
        "model.safetensors",
        "loss.csv",
        "loss.png",
        "samples/step-00000004.png",
    ] {
        assert!(run.join(file).is_file(), "missing {file}");
    }
    assert_eq!(loss_rows(&run).len(), 4);
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(checkpoints.len(), 2, "{checkpoints:?}");

    // Continue to 6 steps.
    let text = ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "6",
        "--backend",
        "cpu",
    ]);
    assert!(text.contains("step 4"), "{text}");
    assert_eq!(loss_rows(&run).len(), 6);

    // A training run that is already complete says how to extend it.
    let text = fails(&["train", "--resume", p(&run), "--backend", "cpu"]);
    assert!(text.contains("--steps"), "{text}");

    // Sampling: a grid, a trajectory, raw floats, and raw floats from a given x_T.
    let model = run.join("model.safetensors");
    let grid = dir.join("grid.png");
    sample(&model, &["--n", "4"], &grid);
    let image = image::open(&grid).unwrap();
    assert_eq!((image.width(), image.height()), (2 * 30 + 2, 2 * 30 + 2));

    let frames = dir.join("frames.png");
    sample(&model, &["--n", "2", "--frames", "4"], &frames);
    let image = image::open(&frames).unwrap();
    assert_eq!((image.width(), image.height()), (2 * 30 + 2, 4 * 30 + 2));

    let npy = ["--n", "2", "--seed", "5", "--format", "npy"];
    let a = dir.join("a.npy");
    sample(&model, &npy, &a);
    let va = read_npy(&a);
    assert_eq!(va.len(), 2 * 28 * 28);

    // x_T given as a file: the seed's own x_T reproduces the seeded run exactly, and
    // other noise gives other images.
    let x_t = dir.join("x_t.npy");
    let seeded = SeededNoise::new(5).sample_vec(2 * 28 * 28);
    write_npy(&x_t, &seeded);
    let from_file = dir.join("from_file.npy");
    sample(
        &model,
        &[&npy[..], &["--noise", p(&x_t)]].concat(),
        &from_file,
    );
    assert_eq!(read_npy(&from_file), va);
    write_npy(&x_t, &SeededNoise::new(6).sample_vec(2 * 28 * 28));
    sample(
        &model,
        &[&npy[..], &["--noise", p(&x_t)]].concat(),
        &from_file,
    );
    assert_ne!(read_npy(&from_file), va);

    // Export to f16: about half the size, and it still samples.
    let small = dir.join("web.safetensors");
    ok(&[
        "export",
        "--checkpoint",
        p(&run),
        "--f16",
        "--out",
        p(&small),
    ]);
    let (full, half) = (
        std::fs::metadata(&model).unwrap().len(),
        std::fs::metadata(&small).unwrap().len(),
    );
    assert!(half < full * 6 / 10, "f16 {half} vs f32 {full}");
    let b = dir.join("b.npy");
    sample(&small, &npy, &b);
    let diff = va
        .iter()
        .zip(&read_npy(&b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(diff < 0.05, "f16 export changes samples by {diff}");

    // A timestep spacing recorded at export is the file's default (the same samples as the
    // flag on the plain file, other ones than without it); the flag still overrides it.
    let trailing = dir.join("trailing.safetensors");
    let text = ok(&[
        "export",
        "--checkpoint",
        p(&small),
        "--timestep-spacing",
        "trailing",
        "--out",
        p(&trailing),
    ]);
    assert!(
        text.contains("samples with trailing timestep spacing"),
        "{text}"
    );
    let [by_file, by_flag, by_override] = ["t1.npy", "t2.npy", "t3.npy"].map(|f| dir.join(f));
    sample(&trailing, &npy, &by_file);
    let flag = [&npy[..], &["--timestep-spacing", "trailing"]].concat();
    sample(&small, &flag, &by_flag);
    assert_eq!(read_npy(&by_file), read_npy(&by_flag));
    assert_ne!(read_npy(&by_file), read_npy(&b));
    let leading = [&npy[..], &["--timestep-spacing", "leading"]].concat();
    sample(&trailing, &leading, &by_override);
    assert_eq!(read_npy(&by_override), read_npy(&b));
    // A bad spacing is refused and the file already there is left as it was.
    let before = std::fs::read(&trailing).unwrap();
    let text = fails(&[
        "export",
        "--checkpoint",
        p(&small),
        "--timestep-spacing",
        "middle",
        "--out",
        p(&trailing),
    ]);
    assert!(
        text.contains("unknown timestep spacing \"middle\""),
        "{text}"
    );
    assert_eq!(std::fs::read(&trailing).unwrap(), before);

    // Evaluation: the figures and the reference rows, also as JSON.
    let report = dir.join("eval.json");
    let text = ok(&[
        "eval",
        "--model",
        p(&small),
        "--n",
        "40",
        "--steps",
        "2",
        "--batch-size",
        "20",
        "--backend",
        "cpu",
        "--json",
        p(&report),
    ]);
    assert!(text.contains("not Inception FID"), "{text}");
    let report = read_json(&report);
    let accuracy = report["classifier_test_accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.85, "classifier accuracy {accuracy}");
    let rows: Vec<(String, f64)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["frechet_distance"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().all(|(_, d)| d.is_finite() && *d >= 0.0));
    // Real images are closer to the test set than noise, and a 4-step model is far from it.
    let (real, noise) = (rows[1].1, rows[4].1);
    assert!(real < noise && real < rows[0].1, "{rows:?}");
    // Precision and recall: real training images lie on the test images' manifold and cover
    // it; uniform noise covers none of it (with 40 images the manifolds' k-NN balls are wide,
    // so some noise images still fall inside one).
    let pr = |i: usize| {
        let row = &report["rows"][i];
        (
            row["precision"].as_f64().unwrap(),
            row["recall"].as_f64().unwrap(),
        )
    };
    let (real_p, real_r) = pr(1);
    assert!(real_p > 0.5 && real_r > 0.5, "real images: {:?}", pr(1));
    assert!(
        pr(4).1 < 0.05 && pr(4).0 < real_p,
        "uniform noise: {:?}",
        pr(4)
    );
    for i in 0..5 {
        let (p, r) = pr(i);
        assert!(
            (0.0..=1.0).contains(&p) && (0.0..=1.0).contains(&r),
            "{i}: {p} {r}"
        );
    }
}

/// `ddpm eval` of a class-conditional model (the bundled one): the requested-class rate and a
/// Fréchet distance per class against that class's test images, beside its floor.
#[test]
fn eval_reports_each_class_of_a_conditional_model() {
    let dir = temp_dir("eval-classes");
    let bundled =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/assets/fashion-mnist.safetensors");
    let report = dir.join("eval.json");
    let text = ok(&[
        "eval",
        "--model",
        p(&bundled),
        "--n",
        "30",
        "--steps",
        "2",
        "--batch-size",
        "3",
        "--backend",
        "cpu",
        "--json",
        p(&report),
    ]);
    assert!(text.contains("per-class Fréchet distance"), "{text}");
    let report = read_json(&report);
    let classes = report["per_class"].as_array().unwrap();
    assert_eq!(classes.len(), 10, "{classes:?}");
    for row in classes {
        let (fd, floor) = (
            row["frechet_distance"].as_f64().unwrap(),
            row["floor"].as_f64().unwrap(),
        );
        assert_eq!(row["samples"].as_u64(), Some(3), "{row}");
        // Two DDIM steps draw blurs: farther from the class than its own training images.
        assert!(fd.is_finite() && floor.is_finite() && floor < fd, "{row}");
    }
    let accuracy = report["requested_class_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    // Its 95 % interval from 30 samples: around the rate, inside [0, 1], and wide (at least
    // ±10 points away from the ends: 1.96·√(p(1−p)/30) is 0.14 at p = 0.5).
    let interval = report["requested_class_accuracy_interval95"]
        .as_array()
        .unwrap();
    let (low, high) = (interval[0].as_f64().unwrap(), interval[1].as_f64().unwrap());
    assert!(
        0.0 <= low && low <= accuracy && accuracy <= high && high <= 1.0 && high - low > 0.1,
        "{interval:?} around {accuracy}"
    );
    // Each class was asked for equally often, so the overall rate is the mean of the classes'.
    let by_class = report["requested_class_accuracy_by_class"]
        .as_object()
        .unwrap();
    assert_eq!(by_class.len(), 10, "{by_class:?}");
    let class_mean = by_class.values().map(|a| a.as_f64().unwrap()).sum::<f64>() / 10.0;
    assert!(
        (class_mean - accuracy).abs() < 1e-9,
        "{by_class:?} vs {accuracy}"
    );
    // The classifier on its own training images: what drawing them exactly would score.
    let train_accuracy = report["classifier_train_accuracy"].as_f64().unwrap();
    assert!(
        train_accuracy > 0.85 && train_accuracy <= 1.0,
        "{train_accuracy}"
    );
    assert_eq!(report["train_images_classified"].as_u64(), Some(10_000));
    // The test set holds 1,000 images of each class, so its classes' rates average to its rate.
    let test_by_class = report["classifier_test_accuracy_by_class"]
        .as_object()
        .unwrap();
    assert_eq!(test_by_class.len(), 10, "{test_by_class:?}");
    let test_mean = test_by_class
        .values()
        .map(|a| a.as_f64().unwrap())
        .sum::<f64>()
        / 10.0;
    let test_accuracy = report["classifier_test_accuracy"].as_f64().unwrap();
    assert!(
        (test_mean - test_accuracy).abs() < 1e-9,
        "{test_by_class:?} vs {test_accuracy}"
    );
    let mean = report["per_class_mean"].as_f64().unwrap();
    let expected = classes
        .iter()
        .map(|r| r["frechet_distance"].as_f64().unwrap())
        .sum::<f64>()
        / 10.0;
    assert!((mean - expected).abs() < 1e-9 * expected);
}

/// `ddpm sample` with 3 steps on the CPU, plus `extra` flags.
fn sample(model: &Path, extra: &[&str], out: &Path) {
    let mut args = vec![
        "sample",
        "--model",
        p(model),
        "--steps",
        "3",
        "--backend",
        "cpu",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", p(out)]);
    ok(&args);
}

fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

fn write_npy(path: &Path, values: &[f32]) {
    use npyz::WriterBuilder;
    let mut bytes = Vec::new();
    let mut writer = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&[2, 1, 28, 28])
        .writer(&mut bytes)
        .begin_nd()
        .unwrap();
    writer.extend(values.iter().copied()).unwrap();
    writer.finish().unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn resume_is_exact() {
    let dir = temp_dir("exact");
    let straight = dir.join("straight");
    ok(&train_args(p(&straight), "4"));
    let split = dir.join("split");
    ok(&train_args(p(&split), "2"));
    ok(&[
        "train",
        "--resume",
        p(&split),
        "--steps",
        "4",
        "--backend",
        "cpu",
    ]);
    assert_eq!(loss_rows(&straight), loss_rows(&split));
    // Compare the weights (the data section of the safetensors files), not the metadata,
    // which records the training time.
    let weights = |run: &Path| {
        let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header..].to_vec()
    };
    assert!(
        weights(&straight) == weights(&split),
        "the resumed run's EMA weights differ from the uninterrupted run's"
    );
}

#[test]
fn corrupt_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = temp_dir("corrupt");
    let run = dir.join("run");
    ok(&train_args(p(&run), "4"));
    let newest = run.join("checkpoints/step-00000004");
    std::fs::write(newest.join("optimizer.bpk"), b"garbage").unwrap();
    let text = ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "6",
        "--backend",
        "cpu",
    ]);
    assert!(
        text.contains("skipped corrupt checkpoint") && text.contains("step-00000004"),
        "{text}"
    );
    assert!(text.contains("step 2"), "{text}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = temp_dir("bad");
    let text = fails(&[
        "train",
        "--data",
        "mnist:/nonexistent/mnist",
        "--out",
        p(&dir.join("r1")),
    ]);
    assert!(
        text.contains("/nonexistent/mnist") && text.contains("does not exist"),
        "{text}"
    );

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    let text = fails(&["train", "--resume", p(&empty)]);
    assert!(text.contains("config.json"), "{text}");

    let text = fails(&[
        "train",
        "--data",
        "fashion-mnist",
        "--classes",
        "spaceship",
        "--out",
        p(&dir.join("r2")),
    ]);
    assert!(text.contains("unknown class \"spaceship\""), "{text}");

    let text = fails(&["sample", "--model", p(&dir.join("missing.safetensors"))]);
    assert!(text.contains("missing.safetensors"), "{text}");

    // The bundled model is class-conditional: sampling it without --class names the flag and
    // the classes.
    let bundled =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/assets/fashion-mnist.safetensors");
    let text = fails(&["sample", "--model", p(&bundled), "--backend", "cpu"]);
    assert!(
        text.contains("choose a class with --class") && text.contains("ankle-boot"),
        "{text}"
    );
    // A negative η reaches the sampler's check (not clap's "unexpected argument").
    let text = fails(&[
        "sample",
        "--model",
        p(&bundled),
        "--class",
        "0",
        "--eta",
        "-0.5",
        "--backend",
        "cpu",
    ]);
    assert!(
        text.contains("η (eta) is -0.5") && text.contains("choose a number ≥ 0"),
        "{text}"
    );

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    let text = fails(&["sample", "--model", p(&junk), "--backend", "cpu"]);
    assert!(text.contains("not a usable model file"), "{text}");

    // ddpm eval: too few images, a classifier file that is not one, a model that is not one.
    let text = fails(&["eval", "--model", p(&junk), "--n", "1", "--backend", "cpu"]);
    assert!(text.contains("--n must be at least 2"), "{text}");
    let text = fails(&[
        "eval",
        "--model",
        p(&junk),
        "--classifier",
        p(&junk),
        "--backend",
        "cpu",
    ]);
    assert!(
        text.contains("junk.safetensors") && text.contains("not a classifier"),
        "{text}"
    );
    let text = fails(&["eval", "--model", p(&junk), "--n", "4", "--backend", "cpu"]);
    assert!(text.contains("not a usable model file"), "{text}");
}

#[test]
fn killed_mid_run_still_resumes() {
    let dir = temp_dir("kill");
    let run = dir.join("run");
    let mut args = train_args(p(&run), "400");
    let every = args
        .iter()
        .position(|a| *a == "--checkpoint-every")
        .unwrap()
        + 1;
    args[every] = "1";
    let mut child = Command::new(DDPM)
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 once a few checkpoints exist: the process may be anywhere, including halfway
    // through writing the next one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let count = std::fs::read_dir(run.join("checkpoints"))
            .map(|d| d.count())
            .unwrap_or(0);
        if count >= 3 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // While it runs, a second trainer on the same directory is refused.
    let text = fails(&["train", "--resume", p(&run), "--backend", "cpu"]);
    assert!(text.contains("another `ddpm train` is using"), "{text}");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        "8",
        "--backend",
        "cpu",
    ]);
    assert!(text.contains("resuming"), "{text}");
    assert_eq!(loss_rows(&run).len(), 8);
    assert!(run.join("checkpoints/step-00000008").is_dir());
    // No temporary checkpoint directory is left behind once a later checkpoint is written.
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn ctrl_c_saves_a_checkpoint_then_exits() {
    let dir = temp_dir("sigint");
    let run = dir.join("run");
    let mut args = train_args(p(&run), "400");
    let every = args
        .iter()
        .position(|a| *a == "--checkpoint-every")
        .unwrap()
        + 1;
    args[every] = "1000";
    let child = Command::new(DDPM)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few training steps, then send SIGINT as a terminal's Ctrl-C does.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while loss_rows_if_any(&run) < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("interrupted: saving a checkpoint"), "{text}");
    let saved = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
    assert_eq!(saved, 1, "one checkpoint at the interruption");
    let steps = loss_rows(&run).len();
    assert!((3..400).contains(&steps), "{steps} steps before stopping");
    let text = ok(&[
        "train",
        "--resume",
        p(&run),
        "--steps",
        &(steps + 1).to_string(),
        "--backend",
        "cpu",
    ]);
    assert!(text.contains(&format!("step {steps}")), "{text}");
}

fn loss_rows_if_any(run: &Path) -> usize {
    std::fs::read_to_string(run.join("loss.csv"))
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

/// A full disk while a checkpoint is written: the run stops with a message naming the problem,
/// the previous checkpoint stays intact, and the run resumes from it once there is room. The
/// disk is a small tmpfs mounted in a private user + mount namespace (`unshare`, no root needed
/// where unprivileged user namespaces are allowed), filled up after the first checkpoint.
#[test]
fn full_disk_keeps_the_previous_checkpoint() {
    let dir = temp_dir("disk-full");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let run = mnt.join("run");
    let first = train_args(p(&run), "2").join(" ");
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=48M tmpfs {mnt} || exit 90
{ddpm} {first} > {dir}/first.log 2>&1 || exit 91
# Leave 1 MiB: enough for the loss log, too little for a checkpoint (several MiB).
avail=$(df --output=avail -k {mnt} | tail -n 1)
dd if=/dev/zero of={mnt}/filler bs=1k count=$((avail - 1024)) 2> /dev/null
{ddpm} train --resume {run} --steps 4 --backend cpu > {dir}/full.log 2>&1
echo $? > {dir}/full.rc
ls {run}/checkpoints > {dir}/after-full.txt
rm {mnt}/filler
{ddpm} train --resume {run} --steps 4 --backend cpu > {dir}/resumed.log 2>&1 || exit 92
ls {run}/checkpoints > {dir}/after-resume.txt
"#,
        mnt = p(&mnt),
        ddpm = DDPM,
        dir = p(&dir),
        run = p(&run),
    );
    let status = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", &script])
        .status()
        .expect("running unshare (util-linux)");
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(
        status.success(),
        "script failed ({status}): {}{}{}",
        log("first.log"),
        log("full.log"),
        log("resumed.log")
    );
    let full = log("full.log");
    assert_ne!(log("full.rc").trim(), "0", "{full}");
    assert!(
        full.contains("No space left on device")
            && full.contains("writing checkpoint")
            && full.contains("earlier checkpoints are untouched")
            && !full.contains("panicked"),
        "{full}"
    );
    assert!(
        log("after-full.txt").contains("step-00000002"),
        "{}",
        log("after-full.txt")
    );
    assert!(!log("after-full.txt").contains(".tmp-"));
    let resumed = log("resumed.log");
    assert!(resumed.contains("step 2"), "{resumed}");
    assert!(log("after-resume.txt").contains("step-00000004"));
}

/// `ddpm bench` flags for a fast run of the fashion-mnist preset on the CPU.
fn bench_args<'a>(batches: &'a str, json: &'a str) -> Vec<&'a str> {
    vec![
        "bench",
        "--batch",
        batches,
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--min-repeat-secs",
        "0",
        "--sample-steps",
        "2",
        "--backend",
        "cpu",
        "--threads",
        "1",
        "--json",
        json,
    ]
}

#[test]
fn bench_without_pytorch_still_reports_ours() {
    let dir = temp_dir("bench");
    let json = dir.join("bench.json");
    let mut args = bench_args("1,3", p(&json));
    args.extend(["--python", "/nonexistent/python3"]);
    let text = ok(&args);
    assert!(
        text.contains("reference: not run (could not start") && text.contains("ours only"),
        "{text}"
    );
    let report = read_json(&json);
    assert_eq!(
        report["num_params"], 702_753,
        "the bundled model's size: {report}"
    );
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "train and sample at batch 1 and 3: {report}");
    for row in rows {
        let batch = row["batch"].as_u64().unwrap();
        let expected = if row["phase"] == "train" {
            batch
        } else {
            batch * 2
        };
        assert_eq!(row["items_per_iter"].as_u64(), Some(expected), "{row}");
        let ours = &row["ours"]["Ok"];
        let times = ours["per_iter_s"].as_array().unwrap();
        assert_eq!(times.len(), 2, "{row}");
        assert!(times.iter().all(|t| t.as_f64().unwrap() > 0.0), "{row}");
        assert!(
            ours["peak_rss_bytes"].as_u64().unwrap() > 10_000_000,
            "{row}"
        );
        assert!(row["pytorch"].is_null(), "{row}");
    }
}

#[test]
fn bench_names_the_config_and_backend_when_a_case_runs_out_of_memory() {
    let dir = temp_dir("bench-oom");
    let json = dir.join("bench.json");
    let mut args = bench_args("2,512", p(&json));
    args.extend(["--preset", "cifar", "--phases", "train", "--no-reference"]);
    // 3 GB of address space: enough for the driver and batch 2, not for batch 512's activations.
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -v 3000000 && exec "$0" "$@""#)
        .arg(DDPM)
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("1 of 2 cases could not run")
            && stderr.contains("the cifar preset (32×32×3")
            && stderr.contains("at batch 512 (train) on cpu (flex, 1 thread)")
            && stderr.contains("out of memory"),
        "{stderr}"
    );
    // The case that fits is still measured and reported.
    assert!(stdout.contains("train       2  "), "{stdout}");
}

/// A 28×28 grayscale picture (a bright rectangle on black, a garment-like blob) and masks.
fn write_gray_png(path: &Path, width: u32, height: u32, f: impl Fn(u32, u32) -> u8) {
    let img = image::GrayImage::from_fn(width, height, |x, y| image::Luma([f(x, y)]));
    img.save(path).unwrap();
}

fn edit_args<'a>(command: &'a str, model: &'a str, image: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        command,
        "--model",
        model,
        "--image",
        image,
        "--class",
        "trouser",
        "--seed",
        "5",
        "--backend",
        "cpu",
        "--format",
        "npy",
        "--out",
        out,
    ]
}

#[test]
fn edit_commands_inpaint_vary_and_interpolate() {
    let dir = temp_dir("edit");
    let bundled =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/assets/fashion-mnist.safetensors");
    let model = p(&bundled);
    let image = dir.join("image.png");
    write_gray_png(&image, 28, 28, |x, y| {
        if (8..20).contains(&x) && (3..25).contains(&y) {
            220
        } else {
            10
        }
    });
    let right = dir.join("right.png");
    write_gray_png(&right, 28, 28, |x, _| if x >= 14 { 255 } else { 0 });
    let pixel = |v: u8| v as f32 / 127.5 - 1.0;
    let original: Vec<f32> = (0..28 * 28)
        .map(|i| {
            let (x, y) = (i % 28, i / 28);
            pixel(if (8..20).contains(&x) && (3..25).contains(&y) {
                220
            } else {
                10
            })
        })
        .collect();

    // Inpainting: the kept (left) half is the picture exactly, the right half is new.
    let out = dir.join("inpaint.npy");
    let mut args = edit_args("inpaint", model, p(&image), p(&out));
    args.extend([
        "--mask",
        p(&right),
        "--steps",
        "10",
        "--jump",
        "3",
        "--resample",
        "2",
    ]);
    ok(&args);
    let x = read_npy(&out);
    assert_eq!(x.len(), 28 * 28, "one image of the model's size");
    let (mut kept, mut changed) = (0f32, 0f32);
    for i in 0..28 * 28 {
        let d = (x[i] - original[i]).abs();
        if i % 28 < 14 {
            kept = kept.max(d)
        } else {
            changed = changed.max(d)
        }
    }
    assert!(kept < 1e-5, "kept pixels moved by {kept}");
    assert!(
        changed > 0.1,
        "the regenerated half is the picture ({changed})"
    );

    // --n 3 gives three completions; with --frames a trajectory grid (PNG).
    let grid = dir.join("grid.png");
    let mut args = edit_args("inpaint", model, p(&image), p(&grid));
    let format = args.iter().position(|a| *a == "npy").unwrap();
    args[format] = "png";
    args.extend([
        "--mask",
        p(&right),
        "--steps",
        "6",
        "--jump",
        "2",
        "--resample",
        "2",
        "--n",
        "3",
        "--frames",
        "4",
    ]);
    ok(&args);
    let png = image::open(&grid).unwrap();
    assert_eq!((png.width(), png.height()), (3 * 30 + 2, 4 * 30 + 2));

    // Image-to-image: a small strength stays near the picture, strength 1 goes far from it.
    let distance = |strength: &str| {
        let out = dir.join(format!("vary-{strength}.npy"));
        let mut args = edit_args("img2img", model, p(&image), p(&out));
        args.extend(["--strength", strength, "--steps", "20"]);
        ok(&args);
        let x = read_npy(&out);
        x.iter()
            .zip(&original)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / x.len() as f32
    };
    let (near, far) = (distance("0.1"), distance("1"));
    assert!(
        near < 0.1 && far > 2.0 * near,
        "mean |Δ|: strength 0.1 {near}, strength 1 {far}"
    );

    // Interpolation: the row's ends are the two seeds' own images.
    let row = dir.join("row.npy");
    sample(
        &bundled,
        &[
            "--class",
            "bag",
            "--interpolate",
            "3,7",
            "--n",
            "5",
            "--format",
            "npy",
        ],
        &row,
    );
    let row = read_npy(&row);
    for (seed, at) in [("3", 0), ("7", 4)] {
        let one = dir.join(format!("seed{seed}.npy"));
        sample(
            &bundled,
            &[
                "--class", "bag", "--seed", seed, "--n", "1", "--format", "npy",
            ],
            &one,
        );
        assert_eq!(
            &row[at * 784..(at + 1) * 784],
            &read_npy(&one)[..],
            "seed {seed}"
        );
    }

    // Notes: nothing to regenerate, everything to regenerate, a non-square picture.
    let black = dir.join("black.png");
    write_gray_png(&black, 28, 28, |_, _| 0);
    let same = dir.join("same.npy");
    let mut args = edit_args("inpaint", model, p(&image), p(&same));
    args.extend(["--mask", p(&black)]);
    let text = ok(&args);
    assert!(text.contains("nothing is regenerated"), "{text}");
    assert!(
        read_npy(&same)
            .iter()
            .zip(&original)
            .all(|(a, b)| (a - b).abs() < 1e-6)
    );
    let white = dir.join("white.png");
    write_gray_png(&white, 28, 28, |_, _| 255);
    let mut args = edit_args("inpaint", model, p(&image), p(&same));
    args.extend([
        "--mask",
        p(&white),
        "--steps",
        "4",
        "--jump",
        "2",
        "--resample",
        "1",
    ]);
    assert!(ok(&args).contains("plain sampling"));
    let wide = dir.join("wide.png");
    write_gray_png(&wide, 56, 40, |x, _| (x * 4) as u8);
    let mut args = edit_args("img2img", model, p(&wide), p(&same));
    args.extend(["--steps", "4"]);
    let text = ok(&args);
    assert!(
        text.contains("center-cropped 56×40 to 40×40") && text.contains("resized 40×40 to 28×28"),
        "{text}"
    );

    // Bad input: each is refused with what was wrong, and nothing is written.
    let untouched = dir.join("untouched.npy");
    let small_mask = dir.join("small-mask.png");
    write_gray_png(&small_mask, 20, 20, |_, _| 255);
    let huge = dir.join("huge.png");
    write_gray_png(&huge, 9000, 1, |_, _| 0);
    let text_file = dir.join("notes.png");
    std::fs::write(&text_file, "this is not a picture").unwrap();
    let inpaint = |extra: &[&str]| {
        let mut args = edit_args("inpaint", model, p(&image), p(&untouched));
        args.extend_from_slice(extra);
        fails(&args)
    };
    let text = inpaint(&["--mask", p(&small_mask)]);
    assert!(
        text.contains("is 20×20 but the image") && text.contains("28×28"),
        "{text}"
    );
    for (flag, value) in [("--jump", "0"), ("--jump", "51"), ("--resample", "0")] {
        let text = inpaint(&["--mask", p(&right), flag, value]);
        assert!(
            text.contains("between 1 and the number of steps (50)"),
            "{flag} {value}: {text}"
        );
    }
    let vary = |image: &Path, strength: &str| {
        let mut args = edit_args("img2img", model, p(image), p(&untouched));
        let flag = format!("--strength={strength}");
        args.push(&flag);
        fails(&args)
    };
    for strength in ["0", "1.5", "-1"] {
        assert!(
            vary(&image, strength).contains("must be in (0, 1]"),
            "strength {strength}"
        );
    }
    assert!(vary(&text_file, "0.5").contains("is not a PNG or JPEG image"));
    let text = vary(&huge, "0.5");
    assert!(
        text.contains("9000×1") && text.contains("1 to 8192"),
        "{text}"
    );
    for seeds in ["3", "3,3", "a,b"] {
        let text = fails(&[
            "sample",
            "--model",
            model,
            "--class",
            "bag",
            "--interpolate",
            seeds,
            "--backend",
            "cpu",
            "--out",
            p(&untouched),
        ]);
        assert!(
            text.contains("two seeds") || text.contains("not a seed"),
            "{seeds}: {text}"
        );
    }
    assert!(!untouched.exists(), "a refused command wrote its output");
}

/// Floating-point operations of the matrix products in one forward pass of one image through
/// the fashion-mnist preset (the tiny UNet: levels of 32 and 64 channels at 28×28 and 14×14,
/// one ResNet per level, two on the way up, attention with two heads of 32 at 14×14), counted
/// layer by layer: 2 · (multiply-adds) of every convolution (3×3, and the 1×1 shortcuts where a
/// ResNet changes its channels) and of attention's two products (QKᵀ and the weighted values).
fn tiny_forward_flops() -> u64 {
    // 2 · c_out · c_in · k² · side², for a convolution with `side`×`side` outputs.
    let conv = |c_out: u64, c_in: u64, k: u64, side: u64| 2 * c_out * c_in * k * k * side * side;
    // A ResNet block: two 3×3 convolutions and a 1×1 shortcut when the channels change.
    let resnet = |c_in: u64, c_out: u64, side: u64| {
        conv(c_out, c_in, 3, side)
            + conv(c_out, c_out, 3, side)
            + if c_in == c_out {
                0
            } else {
                conv(c_out, c_in, 1, side)
            }
    };
    // QKᵀ and A·V over 14×14 = 196 positions, 2 heads of 32 channels.
    let attention = 2 * (2 * 196 * 196 * 32 * 2);
    let down = conv(32, 1, 3, 28) // conv_in
        + resnet(32, 32, 28) + conv(32, 32, 3, 14) // level 0 and its stride-2 downsample
        + resnet(32, 64, 14) + attention; // level 1
    let mid = 2 * resnet(64, 64, 14) + attention;
    // The way up concatenates the skip connections: 64 + 64, then 64 + 32 at 14×14, then the
    // nearest-neighbour upsample's 3×3 convolution; 64 + 32, then 32 + 32 at 28×28.
    let up = resnet(128, 64, 14)
        + resnet(96, 64, 14)
        + 2 * attention
        + conv(64, 64, 3, 28)
        + resnet(96, 32, 28)
        + resnet(64, 32, 28)
        + conv(1, 32, 3, 28); // conv_out
    down + mid + up
}

#[test]
fn bench_ceiling_counts_the_forwards_matrix_products() {
    let dir = temp_dir("bench-ceiling");
    let json = dir.join("ceiling.json");
    let text = ok(&["bench", "--ceiling", "--batch", "1,3", "--json", p(&json)]);
    assert!(text.contains("native forward of 3 images"), "{text}");
    let report = read_json(&json);
    let forwards = report["forwards"].as_array().unwrap();
    assert_eq!(forwards.len(), 2, "{report}");
    for (forward, batch) in forwards.iter().zip([1u64, 3]) {
        assert_eq!(forward["batch"].as_u64(), Some(batch), "{report}");
        let flops = forward["matmul_gflop"].as_f64().unwrap() * 1e9;
        let expected = (batch * tiny_forward_flops()) as f64;
        assert!(
            (flops - expected).abs() < 1.0,
            "batch {batch}: {flops} counted, {expected} by the layers"
        );
        assert!(forward["forward_ms"].as_f64().unwrap() > 0.0, "{report}");
    }
    let peaks = report["peak_gflops_by_lanes"].as_object().unwrap();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx") {
        assert!(peaks.contains_key("4"), "{report}");
    }
    assert!(
        peaks.values().all(|g| g.as_f64().unwrap() > 0.0),
        "{report}"
    );

    // The other timing flags do not apply to it.
    let text = fails(&["bench", "--ceiling", "--backend", "cpu"]);
    assert!(
        text.contains("--ceiling") && text.contains("--backend"),
        "{text}"
    );
}
