//! Running the `ddpm` binary from the integration tests: a fresh temporary directory, a run that
//! must succeed (stdout and stderr returned) or fail without a panic (stderr returned).

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const DDPM: &str = env!("CARGO_BIN_EXE_ddpm");

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ddpm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn ddpm(args: &[&str]) -> Output {
    Command::new(DDPM)
        .args(args)
        .output()
        .expect("running ddpm")
}

pub fn ok(args: &[&str]) -> String {
    let out = ddpm(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ddpm {args:?} failed:\n{text}");
    text
}

pub fn fails(args: &[&str]) -> String {
    let out = ddpm(args);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "ddpm {args:?} should fail");
    assert!(
        !text.contains("panicked"),
        "ddpm {args:?} panicked:\n{text}"
    );
    text
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A tiny run: 64 Fashion-MNIST images, the tiny UNet, batch 8.
pub fn train_args<'a>(out: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        "fashion-mnist",
        "--limit",
        "64",
        "--model",
        "tiny",
        "--batch-size",
        "8",
        "--steps",
        steps,
        "--warmup",
        "2",
        "--checkpoint-every",
        "2",
        "--sample-every",
        "4",
        "--sample-steps",
        "2",
        "--backend",
        "cpu",
        "--out",
        out,
    ]
}

/// `args` with `flags` set: a `--flag value` pair replaces that flag's value or is appended, a
/// lone `--flag` is appended.
pub fn with_flags<'a>(mut args: Vec<&'a str>, flags: &[&'a str]) -> Vec<&'a str> {
    let mut i = 0;
    while i < flags.len() {
        let flag = flags[i];
        let value = flags.get(i + 1).filter(|v| !v.starts_with("--"));
        match (args.iter().position(|a| *a == flag), value) {
            (Some(at), Some(v)) => args[at + 1] = v,
            (Some(_), None) => {}
            (None, _) => {
                args.push(flag);
                args.extend(value);
            }
        }
        i += 1 + value.is_some() as usize;
    }
    args
}

/// A JSON file (a run's `config.json`, an `--json` report).
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
