#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, then checks formatting, runs
# every Rust test (CPU and wgpu-on-lavapipe), builds the library for wasm32 and checks that the
# wasm build draws the same noise as the native one.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo test"
cargo test --workspace --locked

echo "==> wasm32 build of the library and the web module"
cargo build -p ddpm-web --target wasm32-unknown-unknown --locked
node tests/wasm/noise_check.mjs target/wasm32-unknown-unknown/debug/ddpm_web.wasm
