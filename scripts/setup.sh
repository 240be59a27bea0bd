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
# node runs the wasm32 build of the portable noise generator.
command -v node >/dev/null 2>&1 || apt_packages+=(nodejs)
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
