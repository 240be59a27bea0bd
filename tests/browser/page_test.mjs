// The page end to end in a real browser: Debian's headless Chromium, driven by puppeteer-core.
//
//   node tests/browser/page_test.mjs dist native.npy native-settings.json
//
// `dist` is the output of `trunk build --release`; `native.npy` holds `ddpm sample`'s output for
// the settings in the JSON file (run natively on the CPU from the same bundled model). Checks:
//  1. WebGPU (SwiftShader): the page loads the bundled model, generates, and its raw samples equal
//     the native ones within 1e-3; the canvas shows them (not blank, not noise).
//  2. With WebGPU unavailable the page says it runs on the CPU, and generates the same images.
//  3. A corrupt model file gives a message on the page; generation still works with the
//     previous model. Out-of-range settings give a message; a long run can be cancelled.
import { createServer } from "node:http";
import { readFileSync, mkdtempSync, writeFileSync, existsSync } from "node:fs";
import { extname, join, resolve } from "node:path";
import { tmpdir } from "node:os";
import puppeteer from "puppeteer-core";

const [distArg, npyPath, settingsPath] = process.argv.slice(2);
const dist = resolve(distArg ?? "dist");
const settings = JSON.parse(readFileSync(settingsPath, "utf8"));
const chromium = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TIMEOUT = 600_000;

function readNpy(path) {
  const bytes = readFileSync(path);
  const headerLen = bytes.readUInt16LE(8);
  const header = bytes.subarray(10, 10 + headerLen).toString("latin1");
  if (!header.includes("'<f4'")) throw new Error(`${path}: expected float32, header ${header}`);
  const start = 10 + headerLen;
  const copy = bytes.buffer.slice(bytes.byteOffset + start, bytes.byteOffset + bytes.length);
  return new Float32Array(copy);
}
const native = readNpy(npyPath);

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css" };
const server = createServer((req, res) => {
  const path = join(dist, decodeURIComponent(new URL(req.url, "http://x").pathname));
  const file = path.endsWith("/") ? join(path, "index.html") : path;
  if (!file.startsWith(dist) || !existsSync(file)) {
    res.writeHead(404).end("not found");
    return;
  }
  res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
  res.end(readFileSync(file));
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const url = `http://127.0.0.1:${server.address().port}/`;

let failures = 0;
function check(condition, message) {
  console.log(`${condition ? "ok  " : "FAIL"} ${message}`);
  if (!condition) failures += 1;
}

async function launch(webgpu) {
  const args = [
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    `--user-data-dir=${mkdtempSync(join(tmpdir(), "ddpm-chromium-"))}`,
  ];
  // Without --enable-unsafe-webgpu, Chromium on Linux offers no WebGPU adapter.
  if (webgpu) args.push("--enable-unsafe-webgpu");
  const browser = await puppeteer.launch({ executablePath: chromium, args, protocolTimeout: TIMEOUT });
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warn") console.log(`  [page ${m.type()}] ${m.text()}`);
  });
  page.on("pageerror", (e) => console.log(`  [page exception] ${e.message}`));
  const start = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => window.ddpmPage?.ready, { timeout: TIMEOUT });
  console.log(`  page and model loaded in ${Date.now() - start} ms`);
  return { browser, page, loadMs: Date.now() - start };
}

async function setInputs(page, values) {
  await page.evaluate((values) => {
    for (const [id, v] of Object.entries(values)) document.getElementById(id).value = String(v);
  }, values);
}

async function generate(page) {
  await page.evaluate(() => { window.ddpmPage.last = null; window.ddpmPage.error = ""; });
  const start = Date.now();
  await page.click("#generate");
  await page.waitForFunction(() => window.ddpmPage.last || window.ddpmPage.error || !window.ddpmPage.running,
    { timeout: TIMEOUT, polling: 200 });
  await page.waitForFunction(() => !window.ddpmPage.running, { timeout: TIMEOUT, polling: 200 });
  const state = await page.evaluate(() => ({ last: window.ddpmPage.last, error: window.ddpmPage.error }));
  return { ...state, ms: Date.now() - start };
}

function maxDiff(a, b) {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

// The canvas against the native samples quantised as the page does ((v + 1) · 127.5, rounded),
// laid out in the page's grid: the largest difference in grey levels, and the spread of the
// canvas (a blank canvas has none).
async function canvasVsNative(page, n, size) {
  const canvas = await page.evaluate(() => {
    const c = document.getElementById("canvas");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    return { width: c.width, height: c.height, red: Array.from(d.filter((_, i) => i % 4 === 0)) };
  });
  const cols = Math.ceil(Math.sqrt(n));
  let worst = 0;
  for (let i = 0; i < n; i++) {
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const v = native[i * size * size + y * size + x];
        const want = Math.floor((Math.min(1, Math.max(-1, v)) + 1) * 127.5 + 0.5);
        const px = (i % cols) * size + x;
        const py = Math.floor(i / cols) * size + y;
        const got = canvas.red[py * canvas.width + px];
        worst = Math.max(worst, got === undefined ? 255 : Math.abs(got - want));
      }
    }
  }
  const mean = canvas.red.reduce((a, b) => a + b, 0) / canvas.red.length;
  const sd = Math.sqrt(canvas.red.reduce((a, b) => a + (b - mean) ** 2, 0) / canvas.red.length);
  return { worst, sd };
}

async function sameAsNative(page, label) {
  await setInputs(page, settings.inputs);
  const { last, error, ms } = await generate(page);
  check(!error && last, `${label}: generation finished (${ms} ms)${error ? `: ${error}` : ""}`);
  if (!last) return;
  const diff = maxDiff(last.pixels, native);
  check(diff <= 1e-3, `${label}: samples equal the native ones (max |diff| ${diff.toExponential(2)} ≤ 1e-3)`);
  const { worst, sd } = await canvasVsNative(page, settings.inputs.n, last.size);
  check(sd > 5 && worst <= 1,
    `${label}: the canvas shows the native images (max ${worst} grey level(s) apart, spread ${sd.toFixed(1)})`);
  const first = await page.evaluate(() => window.ddpmPage.firstStepMs);
  console.log(`  ${label}: ${last.msPerStep.toFixed(1)} ms per step on ${last.backend}; first image ${first?.toFixed(0)} ms after Generate`);
  return last;
}

try {
  // 1. WebGPU.
  {
    const { browser, page } = await launch(true);
    const backend = await page.evaluate(() => window.ddpmPage.model?.backend());
    check(backend === "webgpu", `WebGPU page runs on webgpu (got ${backend})`);
    await sameAsNative(page, "webgpu");
    await browser.close();
  }
  // 2. CPU fallback, then bad input on the same page.
  {
    const { browser, page } = await launch(false);
    const note = await page.evaluate(() => [window.ddpmPage.model?.backend(), document.getElementById("model").textContent]);
    check(note[0] === "cpu" && /CPU \(WebGPU is not available: no adapter\)/.test(note[1]),
      `without WebGPU the page runs on the CPU and says so ("${note[1]}")`);
    await sameAsNative(page, "cpu");

    // A corrupt model file: a message, and the previous model still works.
    const bad = join(mkdtempSync(join(tmpdir(), "ddpm-bad-")), "broken.safetensors");
    writeFileSync(bad, readFileSync(join(dist, "fashion-mnist.safetensors")).subarray(0, 5000));
    const input = await page.$("#file");
    await input.uploadFile(bad);
    await page.waitForFunction(() => window.ddpmPage.error, { timeout: 60_000 });
    const error = await page.evaluate(() => window.ddpmPage.error);
    check(/Could not load broken\.safetensors: invalid model file/.test(error) && /Still using/.test(error),
      `a truncated model file gives a message ("${error.replace(/\n/g, " / ")}")`);
    await sameAsNative(page, "cpu after the bad file");

    // Out-of-range settings.
    await setInputs(page, { ...settings.inputs, n: 0 });
    const zero = await generate(page);
    check(/n = 0: choose 1 to 64/.test(zero.error), `n = 0 is refused ("${zero.error}")`);
    await setInputs(page, { ...settings.inputs, steps: 5000 });
    const many = await generate(page);
    check(/steps = 5000: choose 1 to 1000/.test(many.error), `steps = 5000 is refused ("${many.error}")`);

    // Cancel a long run.
    await setInputs(page, { ...settings.inputs, steps: 1000, sampler: "ddpm" });
    await page.evaluate(() => { window.ddpmPage.error = ""; });
    await page.click("#generate");
    await page.waitForFunction(() => /step [1-9]/.test(document.getElementById("status").textContent), { timeout: TIMEOUT });
    await page.click("#cancel");
    await page.waitForFunction(() => !window.ddpmPage.running, { timeout: 60_000 });
    const status = await page.evaluate(() => [document.getElementById("status").textContent, window.ddpmPage.error]);
    check(status[0] === "cancelled" && !status[1], `a run can be cancelled (status "${status[0]}")`);
    await browser.close();
  }
} finally {
  server.close();
}
if (failures) {
  console.error(`${failures} browser check(s) failed`);
  process.exit(1);
}
console.log("all browser checks passed");
