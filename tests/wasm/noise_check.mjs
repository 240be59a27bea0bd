// Checks that the wasm32 build of the portable noise generator gives bit-identical values to the
// ones committed in tests/fixtures/noise.json (which the native test checks on x86-64).
//
//   node tests/wasm/noise_check.mjs target/wasm32-unknown-unknown/debug/ddpm_web.wasm
import { readFileSync } from "node:fs";

const [wasmPath] = process.argv.slice(2);
const fixture = JSON.parse(
  readFileSync(new URL("../fixtures/noise.json", import.meta.url), "utf8"),
);
const module = await WebAssembly.compile(readFileSync(wasmPath));
// The raw module may import JS glue symbols; none is called by the noise function.
const imports = {};
for (const { module: m, name, kind } of WebAssembly.Module.imports(module)) {
  imports[m] ??= {};
  if (kind === "function") {
    imports[m][name] = () => {
      throw new Error(`unexpected call to import ${m}.${name}`);
    };
  }
}
const { exports } = await WebAssembly.instantiate(module, imports);

const bits = (x) => {
  const b = new DataView(new ArrayBuffer(4));
  b.setFloat32(0, x, true);
  return b.getUint32(0, true).toString(16).padStart(8, "0");
};
let passed = 0;
let failed = 0;
for (const { seed, start, bits: expected } of fixture.streams) {
  expected.forEach((want, i) => {
    const got = bits(exports.ddpm_noise_value(BigInt(seed), start + i));
    if (got === want) passed += 1;
    else {
      failed += 1;
      console.error(`seed ${seed} index ${start + i}: wasm ${got}, expected ${want}`);
    }
  });
}
console.log(`wasm noise: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
