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
//  4. Editing, on both backends: a generated image is picked by clicking it, a mask is painted
//     with the mouse, Inpaint and Vary run; their results equal `ddpm inpaint` / `ddpm img2img`
//     run natively on the same picture and mask (written out as PNGs) within 1e-3, and the
//     module's interpolate equals `ddpm sample --interpolate`. An empty mask
//     returns the image with a note; a file that is not a picture is refused on the page.
import { createServer } from "node:http";
import { execFileSync } from "node:child_process";
import { readFileSync, mkdtempSync, writeFileSync, existsSync } from "node:fs";
import { extname, join, resolve } from "node:path";
import { tmpdir } from "node:os";
import puppeteer from "puppeteer-core";
import { encodePng } from "./png.mjs";

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
const ddpm = process.env.DDPM ?? "target/debug/ddpm";
const model = process.env.DDPM_MODEL ?? "web/assets/fashion-mnist.safetensors";
const work = mkdtempSync(join(tmpdir(), "ddpm-edit-"));

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

// Run `ddpm <args>` natively on the CPU and read its .npy output.
function nativeRun(name, args) {
  const out = join(work, `${name}.npy`);
  execFileSync(ddpm, [...args, "--model", model, "--backend", "cpu", "--format", "npy", "--out", out], { stdio: ["ignore", "ignore", "inherit"] });
  return readNpy(out);
}

// Wait for an editing run started by clicking `button`; returns the page's state afterwards.
async function runEdit(page, button) {
  await page.evaluate(() => { window.ddpmPage.lastEdit = null; window.ddpmPage.error = ""; });
  const start = Date.now();
  await page.click(button);
  await page.waitForFunction(() => window.ddpmPage.running, { timeout: 10_000, polling: 20 }).catch(() => {});
  await page.waitForFunction(() => !window.ddpmPage.running, { timeout: TIMEOUT, polling: 200 });
  const state = await page.evaluate(() => ({ last: window.ddpmPage.lastEdit, error: window.ddpmPage.error, note: window.ddpmPage.note }));
  return { ...state, ms: Date.now() - start };
}

async function editsMatchNative(page, label) {
  const { inputs } = settings;
  // Pick the grid's second image by clicking on it.
  const grid = await page.evaluate(() => {
    const c = document.getElementById("canvas");
    return { width: c.width, height: c.height, size: window.ddpmPage.shown.size, n: window.ddpmPage.shown.n };
  });
  await page.$eval("#canvas", (e) => e.scrollIntoView({ block: "center" }));
  const box = await (await page.$("#canvas")).boundingBox();
  const size = grid.size;
  await page.mouse.click(box.x + (1.5 * size) / grid.width * box.width, box.y + (0.5 * size) / grid.height * box.height);
  const picked = await page.evaluate(() => window.ddpmPage.edit && Array.from(window.ddpmPage.edit.rgba));
  const shown = await page.evaluate((size) => Array.from(window.ddpmPage.shown.rgba.slice(size * size * 4, 2 * size * size * 4)), size);
  check(picked && picked.length === size * size * 4 && picked.every((v, i) => v === shown[i]),
    `${label}: clicking the grid's second image picks it for editing`);
  if (!picked) return;

  // Paint the right third with the mouse, row by row (brush 2 px wide), as a user would after
  // scrolling down to the editor.
  await page.$eval("#edit-mask", (e) => e.scrollIntoView({ block: "center" }));
  const m = await (await page.$("#edit-mask")).boundingBox();
  for (let y = 1; y < size; y += 2) {
    const py = m.y + ((y + 0.5) / size) * m.height;
    await page.mouse.move(m.x + m.width * 0.7, py);
    await page.mouse.down();
    await page.mouse.move(m.x + m.width * 0.98, py, { steps: 8 });
    await page.mouse.up();
  }
  const mask = await page.evaluate(() => Array.from(window.ddpmPage.edit.mask));
  const painted = mask.reduce((a, b) => a + b, 0);
  const outside = mask.filter((v, p) => v && (p % size) < Math.floor(size * 0.7) - 1).length;
  check(painted > size * 4 && outside === 0, `${label}: the mouse paints the mask (${painted} pixels, ${outside} outside the stroke)`);
  writeFileSync(join(work, "image.png"), encodePng(size, size, picked));
  const maskRgba = mask.flatMap((v) => (v ? [255, 255, 255, 255] : [0, 0, 0, 255]));
  writeFileSync(join(work, "mask.png"), encodePng(size, size, maskRgba));
  const common = ["--seed", String(inputs.seed), "--class", String(inputs.class), "--guidance", String(inputs.guidance),
    "--image", join(work, "image.png")];

  // Inpaint.
  await setInputs(page, { "edit-steps": 6, jump: 2, resample: 2 });
  const inpaint = await runEdit(page, "#inpaint");
  check(inpaint.last && !inpaint.error, `${label}: Inpaint finished (${inpaint.ms} ms)${inpaint.error ? `: ${inpaint.error}` : ""}`);
  if (inpaint.last) {
    const want = nativeRun("inpaint", ["inpaint", ...common, "--mask", join(work, "mask.png"), "--steps", "6", "--jump", "2", "--resample", "2"]);
    const diff = maxDiff(inpaint.last.pixels, want);
    check(diff <= 1e-3, `${label}: Inpaint equals ddpm inpaint (max |diff| ${diff.toExponential(2)} ≤ 1e-3)`);
    const moved = mask.filter((v, p) => !v && Math.abs(inpaint.last.rgba[4 * p] - picked[4 * p]) > 1).length;
    check(moved === 0, `${label}: the unpainted pixels are kept (${moved} moved)`);
  }

  // Vary.
  await setInputs(page, { strength: 0.5, steps: 8, sampler: "ddim" });
  const vary = await runEdit(page, "#vary");
  check(vary.last && !vary.error, `${label}: Vary finished (${vary.ms} ms)${vary.error ? `: ${vary.error}` : ""}`);
  if (vary.last) {
    const want = nativeRun("vary", ["img2img", ...common, "--strength", "0.5", "--steps", "8", "--sampler", "ddim"]);
    const diff = maxDiff(vary.last.pixels, want);
    check(diff <= 1e-3, `${label}: Vary equals ddpm img2img (max |diff| ${diff.toExponential(2)} ≤ 1e-3)`);
  }

  // The module's interpolate equals `ddpm sample --interpolate`.
  const row = await page.evaluate(async (inputs) => {
    const out = await window.ddpmPage.model.interpolate({ seeds: [3, 7], n: 3, steps: 4, classLabel: inputs.class, guidance: inputs.guidance });
    return Array.from(out.pixels);
  }, inputs);
  const wantRow = nativeRun("row", ["sample", "--interpolate", "3,7", "--n", "3", "--steps", "4", "--class", String(inputs.class), "--guidance", String(inputs.guidance)]);
  const rowDiff = maxDiff(row, wantRow);
  check(rowDiff <= 1e-3, `${label}: interpolate equals ddpm sample --interpolate (max |diff| ${rowDiff.toExponential(2)} ≤ 1e-3)`);

  // An empty mask gives the image back with a note.
  await page.click("#clear-mask");
  const empty = await runEdit(page, "#inpaint");
  const same = empty.last && empty.last.rgba.every((v, i) => v === picked[i]);
  check(same && /nothing to regenerate/.test(empty.note), `${label}: an empty mask returns the image unchanged ("${empty.note}")`);

  // Uploading a file that is not a picture: a message, the image being edited stays.
  const bad = join(work, "notes.png");
  writeFileSync(bad, "not a picture");
  await page.evaluate(() => { window.ddpmPage.error = ""; });
  await (await page.$("#image-file")).uploadFile(bad);
  await page.waitForFunction(() => window.ddpmPage.error, { timeout: 60_000 });
  const error = await page.evaluate(() => window.ddpmPage.error);
  const still = await page.evaluate(() => Array.from(window.ddpmPage.edit.rgba));
  check(/not a PNG or JPEG image/.test(error) && still.every((v, i) => v === picked[i]),
    `${label}: a file that is not a picture is refused ("${error.replace(/\n/g, " / ")}")`);
  // A real picture uploads (the PNG written above, already the model's size).
  await (await page.$("#image-file")).uploadFile(join(work, "image.png"));
  await page.waitForFunction(() => /editing image\.png/.test(window.ddpmPage.note), { timeout: 60_000 });
  const uploaded = await page.evaluate(() => Array.from(window.ddpmPage.edit.rgba));
  check(uploaded.every((v, i) => v === picked[i]), `${label}: an uploaded PNG becomes the image to edit`);
}

try {
  // 1. WebGPU.
  {
    const { browser, page } = await launch(true);
    const backend = await page.evaluate(() => window.ddpmPage.model?.backend());
    check(backend === "webgpu", `WebGPU page runs on webgpu (got ${backend})`);
    await sameAsNative(page, "webgpu");
    await editsMatchNative(page, "webgpu");
    await browser.close();
  }
  // 2. CPU fallback, then bad input on the same page.
  {
    const { browser, page } = await launch(false);
    const note = await page.evaluate(() => [window.ddpmPage.model?.backend(), document.getElementById("model").textContent]);
    check(note[0] === "cpu" && /CPU \(WebGPU is not available: no adapter\)/.test(note[1]),
      `without WebGPU the page runs on the CPU and says so ("${note[1]}")`);
    await sameAsNative(page, "cpu");
    await editsMatchNative(page, "cpu");

    // The module's editing methods refuse bad input with readable errors.
    const refusals = await page.evaluate(async () => {
      const d = window.ddpmPage.model;
      const size = d.imageSize;
      const picture = (w, h) => ({ width: w, height: h, data: new Uint8ClampedArray(w * h * 4).fill(255) });
      const image = picture(size, size);
      const attempt = async (f) => { try { await f(); return "resolved"; } catch (e) { return e.message; } };
      return {
        maskSize: await attempt(() => d.inpaint({ image, mask: picture(size + 1, size), classLabel: 0 })),
        jump: await attempt(() => d.inpaint({ image, mask: image, jump: 0, classLabel: 0 })),
        strength: await attempt(() => d.img2img({ image, strength: 1.5, classLabel: 0 })),
        huge: await attempt(() => d.img2img({ image: { width: 9000, height: 2, data: new Uint8ClampedArray(8) }, classLabel: 0 })),
        seeds: await attempt(() => d.interpolate({ seeds: [3], classLabel: 0 })),
        same: await attempt(() => d.interpolate({ seeds: [3, 3], n: 4, classLabel: 0 })),
      };
    });
    check(/mask is 29×28 but the image is 28×28/.test(refusals.maskSize), `inpaint with a mask of another size is refused ("${refusals.maskSize}")`);
    check(/jump length \(0\) must be between 1 and the number of steps/.test(refusals.jump), `jump 0 is refused ("${refusals.jump}")`);
    check(/strength \(1.5\) must be in \(0, 1\]/.test(refusals.strength), `strength 1.5 is refused ("${refusals.strength}")`);
    check(/9000×2 pixels: each side must be 1 to 8192/.test(refusals.huge), `a 9000-pixel picture is refused ("${refusals.huge}")`);
    check(/two seeds/.test(refusals.seeds) && /two seeds/.test(refusals.same), `interpolation needs two different seeds ("${refusals.seeds}"; "${refusals.same}")`);

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

    // The embedding example for editing (examples/edit.html) runs to its end without errors.
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`${url}edit.html`);
    await page.waitForFunction(() => window.ddpmEditDone, { timeout: TIMEOUT, polling: 500 });
    const log = await page.evaluate(() => document.getElementById("log").textContent);
    check(errors.length === 0 && /inpainting/.test(log), `examples/edit.html runs ("${log}")`);
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
