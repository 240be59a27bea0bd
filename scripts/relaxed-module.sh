#!/usr/bin/env bash
# trunk's post-build hook (Trunk.toml): the second wasm module, `ddpm-web-relaxed.wasm`, beside
# trunk's `ddpm-web_bg.wasm` in the release page. It is the same crate built with WebAssembly's
# relaxed SIMD (`+relaxed-simd`), whose matrix products run on `f32x4.relaxed_madd`
# (shared/src/unet/flex_kernels/relaxed_gemm.rs). `ddpm.js` loads it in engines that validate
# relaxed SIMD and the plain module everywhere else, so neither carries opcodes an engine may
# refuse. Both use the same JavaScript glue (checked here). Debug builds skip it: ddpm.js then
# loads the plain module.
#
# Its cargo build has its own target directory (target/relaxed), as the target features differ.
set -euo pipefail
if [ "${TRUNK_PROFILE:-}" != release ]; then
  echo "relaxed-SIMD module: skipped in a ${TRUNK_PROFILE:-non-trunk} build (ddpm.js loads ddpm-web_bg.wasm)"
  exit 0
fi
staging="${TRUNK_STAGING_DIR:?run by trunk build --release}"
cd "${TRUNK_SOURCE_DIR:-$(dirname "$0")/..}"
echo "==> relaxed-SIMD module: cargo build (target/relaxed)"
RUSTFLAGS="-C target-feature=+simd128,+relaxed-simd" cargo build --profile wasm-release \
  --target wasm32-unknown-unknown --manifest-path web/Cargo.toml --target-dir target/relaxed \
  --locked --offline
out=target/relaxed/bindgen
rm -rf "$out"
wasm-bindgen --target=web --out-dir="$out" --out-name=ddpm-web \
  target/relaxed/wasm32-unknown-unknown/wasm-release/ddpm_web.wasm
if ! cmp -s "$out/ddpm-web.js" "$staging/ddpm-web.js"; then
  echo "error: the relaxed-SIMD module's glue differs from ddpm-web.js (diff $out/ddpm-web.js" \
    "$staging/ddpm-web.js); ddpm.js cannot load both modules with one glue" >&2
  exit 1
fi
# The same wasm-opt level as trunk's (index.html: data-wasm-opt="z").
wasm-opt -Oz --output="$staging/ddpm-web-relaxed.wasm" "$out/ddpm-web_bg.wasm"
echo "relaxed-SIMD module: $(du -h "$staging/ddpm-web-relaxed.wasm" | cut -f1) ddpm-web-relaxed.wasm"
