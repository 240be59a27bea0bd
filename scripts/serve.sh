#!/usr/bin/env bash
# The main job on its embedded default: build the web page and its wasm module with trunk and
# serve it on http://127.0.0.1:8080 with the bundled Fashion-MNIST model. Open the address in a
# browser with WebGPU (Chrome, Edge, Firefox 141+, Safari 26) or without (the page falls back to
# the CPU), press Generate and watch noise turn into clothes.
#
#   scripts/serve.sh               # release build (first build ~20 min on 2 cores)
#   PORT=9000 scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/node_modules/.bin:$PATH" # wasm-opt 132 from npm
cargo fetch --locked                       # trunk builds offline
exec trunk serve --release --port "${PORT:-8080}"
