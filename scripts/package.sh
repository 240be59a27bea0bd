#!/usr/bin/env bash
# The npm package for embedders, from the output of `trunk build --release` (dist/): pkg/ holds
# package.json, ddpm.js (the Diffusion class, sampling in Web Workers), ddpm-worker.js, the
# wasm-bindgen glue (ddpm-web.js), the two wasm modules (plain simd128, and relaxed SIMD for the
# engines that validate it) and the TypeScript types.
#
#   scripts/package.sh            # then, in your project: npm install /path/to/ddpm-rs/pkg
set -euo pipefail
cd "$(dirname "$0")/.."
for f in ddpm-web_bg.wasm ddpm-web-relaxed.wasm; do
  [ -f "dist/$f" ] || { echo "dist/ has no $f: run \`trunk build --release\` first" >&2; exit 1; }
done
version="$(awk -F'"' '/^\[workspace.package\]/ { p = 1 } p && /^version/ { print $2; exit }' Cargo.toml)"
rm -rf pkg
mkdir pkg
cp dist/ddpm.js dist/ddpm-worker.js dist/ddpm.d.ts dist/ddpm-web.js dist/ddpm-web.d.ts dist/ddpm-web_bg.wasm \
  dist/ddpm-web-relaxed.wasm pkg/
cat > pkg/package.json <<JSON
{
  "name": "ddpm-web",
  "version": "$version",
  "description": "Sample ddpm-rs diffusion models in the browser: WebGPU, or the CPU on every core, in Web Workers",
  "license": "MIT OR Apache-2.0",
  "type": "module",
  "main": "ddpm.js",
  "module": "ddpm.js",
  "types": "ddpm.d.ts",
  "exports": {
    ".": { "types": "./ddpm.d.ts", "default": "./ddpm.js" },
    "./ddpm-worker.js": "./ddpm-worker.js",
    "./ddpm-web.js": "./ddpm-web.js",
    "./ddpm-web_bg.wasm": "./ddpm-web_bg.wasm",
    "./ddpm-web-relaxed.wasm": "./ddpm-web-relaxed.wasm"
  },
  "files": ["ddpm.js", "ddpm.d.ts", "ddpm-worker.js", "ddpm-web.js", "ddpm-web.d.ts", "ddpm-web_bg.wasm", "ddpm-web-relaxed.wasm"],
  "sideEffects": false
}
JSON
cat > pkg/README.md <<'MD'
# ddpm-web

Sample ddpm-rs models in the browser: WebGPU when the browser
has it, else the CPU with the batch split across one Web Worker per core.

```js
import init, { Diffusion } from "ddpm-web";
await init();
const d = await Diffusion.load(modelBytes);
const out = await d.sample({ n: 16, steps: 25, classLabel: 0, onStep: ({ rgba }) => draw(rgba) });
```

`ddpm.js` finds the worker script, the glue and the wasm module beside itself
(`new URL(…, import.meta.url)`). A bundler that copies such assets (Vite, webpack 5) needs
nothing more; with esbuild, copy `ddpm-worker.js`, `ddpm-web.js`, `ddpm-web_bg.wasm` and
`ddpm-web-relaxed.wasm` next to the bundle, or pass their URLs: `init({ wasm, worker })`.
`ddpm-web-relaxed.wasm` is the same module built with relaxed SIMD (fused multiply-adds), which
`init` picks where the engine validates it; without it beside ddpm.js, `init` uses the other.
MD
echo "pkg/: ddpm-web $version ($(du -sh pkg | cut -f1))"
