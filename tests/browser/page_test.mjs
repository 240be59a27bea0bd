// The page end to end in a real browser: Debian's headless Chromium, driven by puppeteer-core.
//
//   node tests/browser/page_test.mjs dist native.npy native-settings.json [other.safetensors other.npy]
//
// `dist` is the output of `trunk build --release`; `native.npy` holds `ddpm sample`'s output for
// the settings in the JSON file (run natively on the CPU from the same bundled model). Checks:
//  1. WebGPU (SwiftShader): the page loads the bundled model, generates, and its raw samples equal
//     the native ones within 1e-3; the canvas shows them (not blank, not noise).
//  2. With WebGPU unavailable the page says it runs on the CPU, and generates the same images.
//  3. A corrupt model file gives a message on the page; generation still works with the
//     previous model. Out-of-range settings give a message (η too, which the page shows only for
//     DDIM); a long run can be cancelled.
//  4. Editing, on both backends: a generated image is picked by clicking it, a mask is painted
//     with the mouse, Inpaint and Vary run; their results equal `ddpm inpaint` / `ddpm img2img`
//     run natively on the same picture and mask (written out as PNGs) within 1e-3, and the
//     module's interpolate equals `ddpm sample --interpolate`, its timestepSpacing "trailing"
//     `ddpm sample --timestep-spacing trailing` (an unknown spacing is refused). An empty mask
//     returns the image with a note; a file that is not a picture is refused on the page.
//  5. Workers: sampling runs off the main thread (no main-thread task over 50 ms during a
//     20-step run: PerformanceObserver "longtask", and the longest gap between timer ticks);
//     1 and 2 workers give the same pixels; a worker that dies mid-run rejects the run and the
//     next run works; where a Content-Security-Policy forbids workers the page samples on the
//     main thread and says so.
//  6. Firefox ESR (WebDriver BiDi): the CPU fallback (or WebGPU where it has it) equals the
//     native samples, stays responsive, refuses a corrupt file and cancels.
//  7. The two wasm modules: each browser runs the relaxed-SIMD one where relaxed SIMD validates
//     (and its backend note says so), else the plain one; where it runs the relaxed one, the
//     plain one gives the native samples too.
//  8. Another model file chosen on the page (run.sh passes an AdaGN one: scale-shift ResNet
//     blocks, no norm in the middle attention) loads and samples its native images on WebGPU and
//     on the CPU.
import { execFileSync } from "node:child_process";
import { readFileSync, mkdtempSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { tmpdir } from "node:os";
import puppeteer from "puppeteer-core";
import { encodePng } from "./png.mjs";
import { chromiumArgs, serve } from "./serve.mjs";

const [distArg, npyPath, settingsPath, otherModel, otherNpyPath] = process.argv.slice(2);
const dist = resolve(distArg ?? "dist");
const settings = JSON.parse(readFileSync(settingsPath, "utf8"));
const chromium = process.env.CHROMIUM ?? "/usr/bin/chromium";
const firefox = process.env.FIREFOX ?? "/usr/bin/firefox-esr";
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
const otherNative = otherNpyPath ? readNpy(otherNpyPath) : null;
const ddpm = process.env.DDPM ?? "target/debug/ddpm";
const model = process.env.DDPM_MODEL ?? "web/assets/fashion-mnist.safetensors";
const work = mkdtempSync(join(tmpdir(), "ddpm-edit-"));

const server = await serve(dist);
const url = server.url;

let failures = 0;
function check(condition, message) {
  console.log(`${condition ? "ok  " : "FAIL"} ${message}`);
  if (!condition) failures += 1;
}

async function launch(webgpu, kind = "chromium", query = "") {
  let browser;
  if (kind === "firefox") {
    browser = await puppeteer.launch({ browser: "firefox", executablePath: firefox, headless: true, protocolTimeout: TIMEOUT });
  } else {
    const args = chromiumArgs(mkdtempSync(join(tmpdir(), "ddpm-chromium-")), webgpu);
    browser = await puppeteer.launch({ executablePath: chromium, args, protocolTimeout: TIMEOUT });
  }
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warn") console.log(`  [page ${m.type()}] ${m.text()}`);
  });
  page.on("pageerror", (e) => console.log(`  [page exception] ${e.message}`));
  const start = Date.now();
  await page.goto(url + query);
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
async function canvasVsNative(page, n, size, expected = native) {
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
        const v = expected[i * size * size + y * size + x];
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

async function sameAsNative(page, label, expected = native) {
  await setInputs(page, settings.inputs);
  const { last, error, ms } = await generate(page);
  check(!error && last, `${label}: generation finished (${ms} ms)${error ? `: ${error}` : ""}`);
  if (!last) return;
  const diff = maxDiff(last.pixels, expected);
  check(diff <= 1e-3, `${label}: samples equal the native ones (max |diff| ${diff.toExponential(2)} ≤ 1e-3)`);
  const { worst, sd } = await canvasVsNative(page, settings.inputs.n, last.size, expected);
  check(sd > 5 && worst <= 1,
    `${label}: the canvas shows the native images (max ${worst} grey level(s) apart, spread ${sd.toFixed(1)})`);
  const first = await page.evaluate(() => window.ddpmPage.firstStepMs);
  console.log(`  ${label}: ${last.msPerStep.toFixed(1)} ms per step on ${last.backend}; first image ${first?.toFixed(0)} ms after Generate`);
  return last;
}

// The page started the wasm module that fits the browser: the relaxed-SIMD one where relaxed SIMD
// validates, the plain simd128 one elsewhere; the backend note says which on the CPU.
async function moduleChoice(page, label) {
  const { relaxed, variant, note } = await page.evaluate(async () => {
    const ddpm = await import("./ddpm.js");
    return { relaxed: ddpm.relaxedSimd, variant: ddpm.wasmVariant, note: window.ddpmPage.model?.backendNote() };
  });
  const want = relaxed ? "relaxed-simd" : "simd128";
  check(variant === want && /relaxed SIMD/.test(note) === (relaxed && /^CPU/.test(note)),
    `${label}: relaxed SIMD ${relaxed ? "validates" : "does not validate"}, and the page runs the ${variant} module ("${note}")`);
  return relaxed;
}

// The module the page did not choose (the plain one where relaxed SIMD validates), on a page of
// its own: its samples equal the native ones too.
async function otherModule(browser, label, relaxed) {
  const wasm = relaxed ? "ddpm-web_bg.wasm" : "ddpm-web-relaxed.wasm";
  if (!relaxed) {
    console.log(`  ${label}: ${wasm} is not checked (this browser does not validate relaxed SIMD)`);
    return;
  }
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(`${url}no-page-here`); // same origin, no page script
  const i = settings.inputs;
  const out = await page.evaluate(async (wasm, i) => {
    const ddpm = await import("/ddpm.js");
    await ddpm.default({ wasm: new URL(`/${wasm}`, location.href) });
    const bytes = new Uint8Array(await (await fetch("/fashion-mnist.safetensors")).arrayBuffer());
    const d = await ddpm.Diffusion.load(bytes, "cpu");
    const o = await d.sample({ n: i.n, steps: i.steps, sampler: i.sampler, eta: i.eta, seed: i.seed, classLabel: i.class, guidance: i.guidance });
    const note = d.backendNote();
    d.free();
    return { variant: ddpm.wasmVariant, note, pixels: Array.from(o.pixels) };
  }, wasm, i);
  const diff = maxDiff(out.pixels, native);
  check(out.variant === "simd128" && diff <= 1e-3,
    `${label}: the ${out.variant} module (${wasm}) gives the native samples too (max |diff| ${diff.toExponential(2)} ≤ 1e-3; "${out.note}")`);
  await page.close();
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
    const want = nativeRun("vary", ["img2img", ...common, "--strength", "0.5", "--steps", "8", "--sampler", "ddim", "--eta", String(inputs.eta)]);
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

  // The module's timestepSpacing equals `ddpm sample --timestep-spacing`; an unknown one is refused by name.
  const spaced = await page.evaluate(async (inputs) => {
    const model = window.ddpmPage.model;
    const out = await model.sample({ n: 2, steps: 4, sampler: "ddim", seed: 0, classLabel: inputs.class, timestepSpacing: "trailing" });
    let error = "";
    try {
      await model.sample({ n: 1, steps: 4, classLabel: inputs.class, timestepSpacing: "middle" });
    } catch (e) {
      error = String(e.message ?? e);
    }
    return { pixels: Array.from(out.pixels), error };
  }, inputs);
  const wantSpaced = nativeRun("trailing", ["sample", "--n", "2", "--steps", "4", "--sampler", "ddim", "--seed", "0", "--class", String(inputs.class), "--timestep-spacing", "trailing"]);
  const spacedDiff = maxDiff(spaced.pixels, wantSpaced);
  check(spacedDiff <= 1e-3, `${label}: timestepSpacing "trailing" equals ddpm sample --timestep-spacing trailing (max |diff| ${spacedDiff.toExponential(2)} ≤ 1e-3)`);
  check(/unknown timestep spacing "middle" \(expected leading, trailing or linspace\)/.test(spaced.error),
    `${label}: an unknown timestepSpacing is refused ("${spaced.error}")`);

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

// Generate with the page's own defaults, watching the main thread: long tasks
// (PerformanceObserver "longtask", Chromium: tasks over 50 ms) and the longest gap between the
// ticks of a 10 ms timer (both browsers). Returns the worst task and gap in ms.
async function responsive(page, label) {
  await page.evaluate(() => {
    const watch = { tasks: [], gap: 0, on: true };
    window.ddpmWatch = watch;
    if (PerformanceObserver.supportedEntryTypes?.includes("longtask")) {
      watch.observer = new PerformanceObserver((list) => { for (const e of list.getEntries()) watch.tasks.push(e.duration); });
      watch.observer.observe({ type: "longtask" });
    } else {
      watch.tasks = null;
    }
    let last = performance.now();
    const tick = () => {
      const now = performance.now();
      watch.gap = Math.max(watch.gap, now - last - 10);
      last = now;
      if (watch.on) setTimeout(tick, 10);
    };
    setTimeout(tick, 10);
  });
  // Back to the page's own settings (earlier checks changed them).
  const defaults = await page.evaluate(() => {
    window.ddpmPage.firstStepMs = null;
    const out = {};
    for (const id of ["sampler", "eta", "steps", "seed", "n", "class", "guidance", "every"]) {
      const el = document.getElementById(id);
      el.value = el.tagName === "SELECT" ? [...el.options].find((o) => o.defaultSelected)?.value ?? el.value : el.defaultValue;
      out[el.id] = el.value;
    }
    return out;
  });
  const { last, error, ms } = await generate(page);
  const watch = await page.evaluate(() => {
    const w = window.ddpmWatch;
    w.on = false;
    w.observer?.disconnect();
    return { tasks: w.tasks, gap: w.gap, first: window.ddpmPage.firstStepMs };
  });
  check(last && !error, `${label}: the page's default grid (${defaults.n} images, ${defaults.steps} steps, η ${defaults.eta}, guidance ${defaults.guidance}) finished (${ms} ms, first preview after ${watch.first?.toFixed(0)} ms)${error ? `: ${error}` : ""}`);
  const worst = watch.tasks === null ? null : Math.max(0, ...watch.tasks);
  if (watch.tasks !== null) {
    check(watch.tasks.length === 0, `${label}: no main-thread task over 50 ms while sampling (${watch.tasks.length} long tasks, longest ${worst.toFixed(0)} ms)`);
  }
  // Where the browser reports long tasks (Chromium) the timer must keep within the same 50 ms.
  // Firefox has no long-task API: its timer gap also counts the time the OS leaves the main
  // thread waiting while the workers hold every core (24–43 ms measured on 2 quiet cores, 74 ms
  // with another 2-thread process running), so it is held to 100 ms, which still catches
  // sampling on the main thread (788 ms per step there before the workers).
  const bound = watch.tasks === null ? 100 : 50;
  check(watch.gap <= bound, `${label}: the main thread answered a 10 ms timer within ${bound} ms throughout (longest gap ${watch.gap.toFixed(0)} ms)`);
}

// The same seed gives the same pixels with 1 and with 2 workers (ancestral DDPM with guidance,
// so that every step draws fresh noise for each image).
async function workersAgree(page) {
  const outs = await page.evaluate(async () => {
    const { Diffusion } = await import("./ddpm.js");
    const options = { n: 5, steps: 4, sampler: "ddpm", seed: 5, classLabel: 0, guidance: 2 };
    const outs = [];
    for (const workers of [1, 2]) {
      const d = await Diffusion.load(window.ddpmPage.bytes, "cpu", { workers });
      const out = await d.sample(options);
      outs.push({ workers: d.workers, note: d.backendNote(), pixels: Array.from(out.pixels), rgba: Array.from(out.rgba) });
      d.free();
    }
    return outs;
  });
  // The same noise reaches each image whatever the split; a smaller batch may round a matrix
  // product differently (about 1e-5), far below one level of an 8-bit pixel.
  const diff = maxDiff(outs[0].pixels, outs[1].pixels);
  const levels = maxDiff(outs[0].rgba, outs[1].rgba);
  check(outs[0].workers === 1 && outs[1].workers === 2 && diff < 1e-4 && levels <= 1,
    `1 and 2 workers give the same pixels (max |diff| ${diff}, ${levels} levels of 255; "${outs[1].note}")`);
}

// A worker that dies mid-run: the run rejects with a readable Error, and the next run works.
async function workerDies(page) {
  const result = await page.evaluate(async () => {
    const { Diffusion } = await import("./ddpm.js");
    const made = [];
    const Real = window.Worker;
    window.Worker = class extends Real {
      constructor(...args) {
        super(...args);
        made.push(this);
      }
    };
    let d;
    try {
      d = await Diffusion.load(window.ddpmPage.bytes, "cpu", { workers: 2 });
    } finally {
      window.Worker = Real;
    }
    let message = "resolved";
    try {
      // A message the worker does not understand makes it throw: its `error` event, as a crash.
      await d.sample({ n: 4, steps: 1000, sampler: "ddpm", classLabel: 0,
        onStep: ({ step }) => { if (step === 1) made[1].postMessage({ type: "crash" }); } });
    } catch (e) {
      message = e instanceof Error ? e.message : `not an Error: ${e}`;
    }
    const next = await d.sample({ n: 4, steps: 2, classLabel: 0 }).then((o) => `${o.n} images`, (e) => e.message);
    d.free();
    return { message, next, made: made.length };
  });
  check(/a sampling worker stopped/.test(result.message) && result.next === "4 images",
    `a worker that dies mid-run rejects the run ("${result.message}"), and the next run works (${result.next})`);
}

// Where the page's Content-Security-Policy forbids workers, it samples on the main thread.
async function withoutWorkers(browser) {
  const page = await browser.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(`${url}?csp`);
  await page.waitForFunction(() => window.ddpmPage?.ready, { timeout: TIMEOUT });
  const text = await page.evaluate(() => document.getElementById("model").textContent);
  check(/on the main thread \(Web Workers could not start\)/.test(text), `with workers forbidden by the CSP the page says so ("${text}")`);
  await sameAsNative(page, "cpu on the main thread");
  await page.close();
}

// Choose a model file with the page's file input; wait until the page has loaded it or given a
// message, and return the page's model name, message and model line.
async function uploadModel(page, path) {
  await page.evaluate(() => { window.ddpmPage.error = ""; });
  await (await page.$("#file")).uploadFile(path);
  await page.waitForFunction((name) => window.ddpmPage.modelName === name || window.ddpmPage.error,
    { timeout: 60_000 }, basename(path));
  return page.evaluate(() => ({
    loaded: window.ddpmPage.modelName, error: window.ddpmPage.error, text: document.getElementById("model").textContent,
  }));
}

// A truncated model file: a message on the page, and the previous model keeps working.
async function corruptFile(page, label) {
  const bad = join(mkdtempSync(join(tmpdir(), "ddpm-bad-")), "broken.safetensors");
  writeFileSync(bad, readFileSync(join(dist, "fashion-mnist.safetensors")).subarray(0, 5000));
  const { error } = await uploadModel(page, bad);
  check(/Could not load broken\.safetensors: invalid model file/.test(error) && /Still using/.test(error),
    `${label}: a truncated model file gives a message ("${error.replace(/\n/g, " / ")}")`);
  await sameAsNative(page, `${label} after the bad file`);
}

// Another model file chosen with the page's file input replaces the bundled one, and samples the
// images `ddpm sample` draws from it natively.
async function loadsOtherModel(page, label) {
  if (!otherModel) return;
  const name = basename(otherModel);
  const { loaded, error, text } = await uploadModel(page, otherModel);
  check(loaded === name && !error, `${label}: ${name} loads from the file input ("${text}"${error ? `; ${error}` : ""})`);
  if (loaded === name) await sameAsNative(page, `${label} with ${name}`, otherNative);
}

// Cancel a long run.
async function cancelRun(page, label) {
  await setInputs(page, { ...settings.inputs, steps: 1000, sampler: "ddpm" });
  await page.evaluate(() => { window.ddpmPage.error = ""; });
  await page.click("#generate");
  await page.waitForFunction(() => /step [1-9]/.test(document.getElementById("status").textContent), { timeout: TIMEOUT });
  await page.click("#cancel");
  await page.waitForFunction(() => !window.ddpmPage.running, { timeout: 60_000 });
  const status = await page.evaluate(() => [document.getElementById("status").textContent, window.ddpmPage.error]);
  check(status[0] === "cancelled" && !status[1], `${label}: a run can be cancelled (status "${status[0]}")`);
}

try {
  // 1. WebGPU.
  {
    const { browser, page } = await launch(true);
    const backend = await page.evaluate(() => window.ddpmPage.model?.backend());
    const note = await page.evaluate(() => window.ddpmPage.model?.backendNote());
    check(backend === "webgpu" && /in a worker/.test(note), `WebGPU page runs on webgpu, in a worker (got ${backend}: "${note}")`);
    await sameAsNative(page, "webgpu");
    await editsMatchNative(page, "webgpu");
    await loadsOtherModel(page, "webgpu");
    await browser.close();
  }
  // 2. CPU fallback, then bad input on the same page.
  {
    const { browser, page } = await launch(false);
    const note = await page.evaluate(() => [window.ddpmPage.model?.backend(), document.getElementById("model").textContent]);
    check(note[0] === "cpu" && /CPU \(WebGPU is not available: no adapter\)/.test(note[1]),
      `without WebGPU the page runs on the CPU and says so ("${note[1]}")`);
    await sameAsNative(page, "cpu");
    await otherModule(browser, "cpu", await moduleChoice(page, "cpu"));
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

    await corruptFile(page, "cpu");

    // Out-of-range settings.
    await setInputs(page, { ...settings.inputs, n: 0 });
    const zero = await generate(page);
    check(/n = 0: choose 1 to 64/.test(zero.error), `n = 0 is refused ("${zero.error}")`);
    await setInputs(page, { ...settings.inputs, steps: 5000 });
    const many = await generate(page);
    check(/steps = 5000: choose 1 to 1000/.test(many.error), `steps = 5000 is refused ("${many.error}")`);
    // η belongs to DDIM: the page shows it only while DDIM is the sampler.
    const etaShown = async () => page.$eval("#eta-box", (e) => getComputedStyle(e).display !== "none");
    await page.select("#sampler", "dpm-solver++");
    const hiddenForSolver = !(await etaShown());
    await page.select("#sampler", "ddim");
    check(hiddenForSolver && (await etaShown()), "η is offered with DDIM and hidden with DPM-Solver++");
    await setInputs(page, { ...settings.inputs, eta: -0.5 });
    const negative = await generate(page);
    check(/η \(eta\) is -0.5: choose a number ≥ 0/.test(negative.error), `η = -0.5 is refused ("${negative.error}")`);

    await cancelRun(page, "cpu");

    // Off the main thread, on every core.
    await responsive(page, "cpu");
    await workersAgree(page);
    await workerDies(page);
    await withoutWorkers(browser);
    await loadsOtherModel(page, "cpu");

    // The embedding example for editing (examples/edit.html) runs to its end without errors.
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`${url}edit.html`);
    await page.waitForFunction(() => window.ddpmEditDone, { timeout: TIMEOUT, polling: 500 });
    const log = await page.evaluate(() => document.getElementById("log").textContent);
    check(errors.length === 0 && /inpainting/.test(log), `examples/edit.html runs ("${log}")`);
    await browser.close();
  }
  // 3. Firefox ESR.
  {
    const { browser, page } = await launch(false, "firefox");
    const [backend, note] = await page.evaluate(() => [window.ddpmPage.model?.backend(), document.getElementById("model").textContent]);
    check(backend === "cpu" || backend === "webgpu", `Firefox loads the bundled model ("${note}")`);
    await sameAsNative(page, `firefox ${backend}`);
    await otherModule(browser, "firefox", await moduleChoice(page, "firefox"));
    await responsive(page, "firefox");
    await corruptFile(page, "firefox");
    await cancelRun(page, "firefox");
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
