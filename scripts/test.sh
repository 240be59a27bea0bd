#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, then checks formatting and
# clippy's lints, runs every Rust test (CPU and wgpu-on-lavapipe), builds the web page and both wasm modules with trunk,
# checks that the wasm build draws the same noise as the native one, and runs the page in
# headless Chromium (WebGPU on SwiftShader, then the CPU fallback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (native, every target; then the wasm-only code)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --profile wasm-release --target wasm32-unknown-unknown --locked \
  --manifest-path web/Cargo.toml -- -D warnings
# The same with relaxed SIMD, as scripts/relaxed-module.sh builds the second module.
RUSTFLAGS="-C target-feature=+simd128,+relaxed-simd" cargo clippy --profile wasm-release \
  --target wasm32-unknown-unknown --locked --manifest-path web/Cargo.toml --target-dir target/relaxed \
  -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked

echo "==> trunk build --release (the page and the wasm modules: plain, and relaxed SIMD by its hook)"
export PATH="$PWD/node_modules/.bin:$PATH" # wasm-opt 132 from npm
cargo fetch --locked                       # trunk builds offline
trunk build --release

echo "==> wasm32 noise equals the native noise"
node tests/wasm/noise_check.mjs target/wasm32-unknown-unknown/wasm-release/ddpm_web.wasm

echo "==> the page in headless Chromium"
tests/browser/run.sh
