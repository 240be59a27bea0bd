// The npm package (pkg/, from scripts/package.sh) as an embedder uses it: `npm install` it into
// a new project, bundle a page that imports it with esbuild, serve the bundle with the
// package's worker, glue and wasm modules beside it, and sample in headless Chromium (CPU, two
// workers, the relaxed-SIMD module there). The samples equal the native ones within 1e-3.
//
//   node tests/browser/package_test.mjs pkg native.npy native-settings.json model.safetensors
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import puppeteer from "puppeteer-core";
import { chromiumArgs, serve } from "./serve.mjs";

const [pkgArg, npyPath, settingsPath, modelPath] = process.argv.slice(2);
const pkg = resolve(pkgArg);
const esbuild = resolve("node_modules/.bin/esbuild");
const { inputs } = JSON.parse(readFileSync(settingsPath, "utf8"));

function readNpy(path) {
  const bytes = readFileSync(path);
  const headerLen = bytes.readUInt16LE(8);
  const start = 10 + headerLen;
  return new Float32Array(bytes.buffer.slice(bytes.byteOffset + start, bytes.byteOffset + bytes.length));
}
const native = readNpy(npyPath);

// A new project that depends on the package.
const project = mkdtempSync(join(tmpdir(), "ddpm-embedder-"));
writeFileSync(join(project, "package.json"), JSON.stringify({ name: "embedder", private: true, type: "module" }));
execFileSync("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error", pkg], { cwd: project, stdio: "inherit" });
writeFileSync(join(project, "main.js"), `
import init, { Diffusion } from "ddpm-web";
const inputs = ${JSON.stringify(inputs)};
try {
  await init();
  const bytes = new Uint8Array(await (await fetch("model.safetensors")).arrayBuffer());
  const d = await Diffusion.load(bytes, "cpu", { workers: 2 });
  let previews = 0;
  const out = await d.sample({ n: inputs.n, steps: inputs.steps, sampler: inputs.sampler, eta: inputs.eta, seed: inputs.seed,
    classLabel: inputs.class, guidance: inputs.guidance, onStep: () => { previews += 1; } });
  window.result = { pixels: Array.from(out.pixels), workers: d.workers, note: d.backendNote(), previews };
} catch (e) {
  window.result = { error: e.message ?? String(e) };
}
`);
const out = join(project, "out");
mkdirSync(out);
execFileSync(esbuild, ["main.js", "--bundle", "--format=esm", `--outfile=${join(out, "app.js")}`, "--log-level=warning"],
  { cwd: project, stdio: "inherit" });
// The assets that ddpm.js finds beside itself (here: beside the bundle).
const installed = join(project, "node_modules", "ddpm-web");
for (const f of ["ddpm-worker.js", "ddpm-web.js", "ddpm-web_bg.wasm", "ddpm-web-relaxed.wasm"]) copyFileSync(join(installed, f), join(out, f));
copyFileSync(modelPath, join(out, "model.safetensors"));
writeFileSync(join(out, "index.html"), `<!doctype html><meta charset="utf-8"><script type="module" src="app.js"></script>`);

const server = await serve(out);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: chromiumArgs(mkdtempSync(join(tmpdir(), "ddpm-chromium-")), false),
});
let ok = false;
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.log(`  [page exception] ${e.message}`));
  await page.goto(server.url);
  await page.waitForFunction(() => window.result, { timeout: 300_000 });
  const result = await page.evaluate(() => window.result);
  if (result.error) {
    console.log(`FAIL the bundled page could not sample: ${result.error}`);
  } else {
    let diff = result.pixels.length === native.length ? 0 : Infinity;
    for (let i = 0; i < native.length && diff !== Infinity; i++) diff = Math.max(diff, Math.abs(result.pixels[i] - native[i]));
    ok = diff <= 1e-3 && result.workers === 2 && result.previews === inputs.steps && /relaxed SIMD/.test(result.note);
    console.log(`${ok ? "ok  " : "FAIL"} npm install + esbuild: a page importing "ddpm-web" samples the native images ` +
      `(max |diff| ${diff.toExponential(2)} ≤ 1e-3; ${result.workers} workers, ${result.previews} previews; "${result.note}")`);
  }
} finally {
  await browser.close();
  server.close();
}
if (!ok) process.exit(1);
