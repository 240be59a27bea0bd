#!/usr/bin/env bash
# The browser test: a native reference sample from the bundled model, then the built page in
# headless Chromium and Firefox ESR (tests/browser/page_test.mjs; it also loads another model
# file, an AdaGN one, with the page's file input), then the npm package bundled into an
# embedder's page (tests/browser/package_test.mjs). Needs `trunk build --release` output in
# dist/, target/debug/ddpm, node_modules (npm ci), /usr/bin/chromium and /usr/bin/firefox-esr.
set -euo pipefail
cd "$(dirname "$0")/../.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The page's settings and the same ones for `ddpm sample` (class 0 = the first class; η = 0.5,
# the page's default, so DDIM's own noise is drawn as natively).
cat > "$work/settings.json" <<JSON
{ "inputs": { "sampler": "ddim", "eta": 0.5, "steps": 4, "seed": 3, "n": 4, "class": 0, "guidance": 2, "every": 1 } }
JSON
# `ddpm sample` with those settings: native_sample MODEL OUT.npy
native_sample() {
  target/debug/ddpm sample --model "$1" --sampler ddim --eta 0.5 --steps 4 \
    --seed 3 --n 4 --class 0 --guidance 2 --backend cpu --format npy --out "$2"
}
native_sample web/assets/fashion-mnist.safetensors "$work/native.npy"
# A model file with AdaGN ResNet blocks (--resnet-time-scale-shift scale-shift), from the committed
# state of that run, for the page's file input; and its native sample.
target/debug/ddpm export --checkpoint training/fashion-mnist-adagn --f16 --out "$work/adagn.safetensors"
native_sample "$work/adagn.safetensors" "$work/adagn.npy"
node tests/browser/page_test.mjs dist "$work/native.npy" "$work/settings.json" \
  "$work/adagn.safetensors" "$work/adagn.npy"
scripts/package.sh
node tests/browser/package_test.mjs pkg "$work/native.npy" "$work/settings.json" dist/fashion-mnist.safetensors
