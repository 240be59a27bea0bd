#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for building and testing ddpm-rs. Each step runs
# only when its tool is missing, so a second run does nothing.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }

apt_packages=()
# lavapipe, Mesa's software Vulkan driver: lets the wgpu backend run (and be tested) without a GPU.
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 \
  || apt_packages+=(mesa-vulkan-drivers)
# Fashion-MNIST (60k + 10k images, IDX format): the trainer's default data set and its tests.
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_packages+=(dataset-fashion-mnist)
# node (and npm) run the wasm32 noise check and drive the browser test; npm installs wasm-opt.
command -v node >/dev/null 2>&1 || apt_packages+=(nodejs)
command -v npm >/dev/null 2>&1 || apt_packages+=(npm)
# Chromium runs the page in the browser test (WebGPU on its bundled SwiftShader).
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
# Firefox ESR runs the page too (CPU fallback; puppeteer-core drives it over WebDriver BiDi).
command -v firefox-esr >/dev/null 2>&1 || apt_packages+=(firefox-esr)
# trunk's build needs OpenSSL headers and pkg-config (its native-tls feature).
[ -e /usr/include/openssl/ssl.h ] || apt_packages+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || apt_packages+=(pkg-config)
if [ ${#apt_packages[@]} -gt 0 ]; then
  say "apt-get install ${apt_packages[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  say "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$component"; then
    say "rustup component add $component"
    rustup component add "$component"
  fi
done

# trunk would download wasm-bindgen and wasm-opt; install them locally instead (Trunk.toml pins
# the versions). wasm-bindgen-cli must equal the wasm-bindgen version in Cargo.lock; its own
# lockfile names a crate version the registry lacks, hence no --locked there. trunk 0.21.14 is
# the newest that builds with rustc 1.95.
bindgen_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"
if ! wasm-bindgen --version 2>/dev/null | grep -q " $bindgen_version\b"; then
  say "cargo install wasm-bindgen-cli $bindgen_version (several minutes)"
  cargo install wasm-bindgen-cli --version "=$bindgen_version"
fi
if ! trunk --version 2>/dev/null | grep -q "0.21.14"; then
  say "cargo install trunk 0.21.14 (several minutes)"
  cargo install trunk --version 0.21.14 --locked
fi
# wasm-opt 132 from npm (Debian's binaryen 108 breaks the module), puppeteer-core, and esbuild
# (the package test bundles a page that imports the npm package).
if [ ! -x node_modules/.bin/wasm-opt ] || [ ! -d node_modules/puppeteer-core ] || [ ! -x node_modules/.bin/esbuild ]; then
  say "npm ci (binaryen, puppeteer-core, esbuild)"
  npm ci --no-audit --no-fund --loglevel=error
fi
