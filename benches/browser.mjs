// The CPU fallback in the browser against the native binary, from one run on one machine:
//
//   node benches/browser.mjs [dist] [--ddpm target/release/ddpm] [--steps 10] [--json out.json]
//
// Headless Chromium without WebGPU samples the bundled model (DDIM) at n = 4 with guidance 2 and
// at n = 16 without, on 1 worker and on one worker per core, with each wasm module: the
// relaxed-SIMD one (where Chromium validates it; the page's choice there) and the plain simd128
// one; the median milliseconds per step come from the times between onStep calls (previews on,
// as on the page). Then `ddpm bench`
// times the same forwards natively (an 8- and a 16-image batch, the same model file) on 1 thread
// and on all threads. Prints both and their ratios, and the time the page takes for its default
// grid (Generate pressed, the page's own settings), beside the same grid at η = 0. Needs
// `trunk build --release` output in dist/ and a built `ddpm`. Then `ddpm bench --ceiling` measures what bounds the ratios: one
// core's peak fused multiply-add rate at 4 lanes (the width of every WebAssembly SIMD
// instruction) and at the CPU's widest, and the matrix products' GFLOP per forward; it prints
// them with the rate each side reached.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer from "puppeteer-core";
import { chromiumArgs, serve } from "../tests/browser/serve.mjs";

const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args.splice(i, 2)[1] : fallback;
};
const ddpm = flag("--ddpm", "target/release/ddpm");
const steps = Number(flag("--steps", "10"));
const jsonOut = flag("--json", null);
const dist = args[0] ?? "dist";
const model = join(dist, "fashion-mnist.safetensors");
const cores = cpus().length;

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

// Browser side.
const server = await serve(dist);
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: chromiumArgs(mkdtempSync(join(tmpdir(), "ddpm-bench-")), false),
  protocolTimeout: 600_000,
});
const cases = [
  { name: "n = 4, guidance 2", n: 4, guidance: 2, batch: 8 },
  { name: "n = 16", n: 16, guidance: 1, batch: 16 },
];
const browserMs = {};
let grid;
let chosen;
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(600_000);
  await page.goto(server.url);
  await page.waitForFunction(() => window.ddpmPage?.ready);
  let relaxed;
  ({ relaxed, chosen } = await page.evaluate(async () => {
    const ddpm = await import("./ddpm.js");
    return { relaxed: ddpm.relaxedSimd, chosen: ddpm.wasmVariant };
  }));
  console.log(`Chromium: relaxed SIMD ${relaxed ? "validates" : "does not validate"}; the page runs the ${chosen} module`);
  // The page as a visitor without WebGPU uses it: its own default settings, Generate pressed,
  // until the grid is done (three times; the median).
  const defaults = await page.evaluate(() => ["n", "steps", "guidance", "sampler", "eta"].map((id) => `${id} ${document.getElementById(id).value}`).join(", "));
  const timeGrids = async () => {
    const grids = [];
    for (let i = 0; i < 3; i++) {
      await page.evaluate(() => { window.ddpmPage.firstStepMs = null; window.ddpmPage.last = null; });
      const start = Date.now();
      await page.click("#generate");
      await page.waitForFunction(() => window.ddpmPage.last && !window.ddpmPage.running, { polling: 50 });
      grids.push({ ms: Date.now() - start, first: await page.evaluate(() => window.ddpmPage.firstStepMs) });
    }
    return { ms: median(grids.map((g) => g.ms)), first: median(grids.map((g) => g.first)) };
  };
  grid = { defaults, ...(await timeGrids()) };
  // The reference in the same run: the same grid with DDIM deterministic (η = 0), which draws
  // no noise after the first.
  const defaultEta = await page.$eval("#eta", (e) => e.value);
  await page.$eval("#eta", (e) => { e.value = "0"; });
  grid.eta0 = await timeGrids();
  await page.$eval("#eta", (e, v) => { e.value = v; }, defaultEta);
  // Each wasm module on a page of its own (a module is started once per page): the one the page
  // chose for this browser (relaxed SIMD where it validates) and the plain simd128 one.
  const variants = relaxed ? ["ddpm-web-relaxed.wasm", "ddpm-web_bg.wasm"] : ["ddpm-web_bg.wasm"];
  for (const wasm of variants) {
    const blank = await browser.newPage();
    blank.setDefaultTimeout(600_000);
    await blank.goto(`${server.url}bench-blank`); // same origin, no page script (a 404)
    for (const workers of [1, cores]) {
      for (const c of cases) {
        const { times, variant } = await blank.evaluate(async (c, workers, steps, wasm) => {
          const ddpm = await import("/ddpm.js");
          await ddpm.default({ wasm: new URL(`/${wasm}`, location.href) });
          const bytes = new Uint8Array(await (await fetch("/fashion-mnist.safetensors")).arrayBuffer());
          const d = await ddpm.Diffusion.load(bytes, "cpu", { workers });
          const options = { n: c.n, guidance: c.guidance, classLabel: 0, sampler: "ddim", seed: 1 };
          await d.sample({ ...options, steps: 2 }); // warm-up
          const stamps = [performance.now()];
          await d.sample({ ...options, steps, onStep: () => { stamps.push(performance.now()); } });
          d.free();
          return { times: stamps.slice(1).map((t, i) => t - stamps[i]), variant: ddpm.wasmVariant };
        }, c, workers, steps, wasm);
        // The first interval includes the run's start (messages to the workers).
        browserMs[`${variant}/${c.batch}/${workers}`] = median(times.slice(1));
      }
    }
    await blank.close();
  }
} finally {
  await browser.close();
  server.close();
}

// Native side: the same model file, the same batches, DDIM steps timed by `ddpm bench`.
const nativeMs = {};
for (const threads of [1, cores]) {
  const out = join(mkdtempSync(join(tmpdir(), "ddpm-bench-")), "bench.json");
  execFileSync(ddpm, ["bench", "--model", model, "--phases", "sample", "--batch", "8,16", "--backend", "cpu",
    "--threads", String(threads), "--sample-steps", String(steps), "--no-reference", "--json", out], { stdio: ["ignore", "ignore", "inherit"] });
  const report = JSON.parse(readFileSync(out, "utf8"));
  for (const row of report.rows.filter((r) => r.phase === "sample" && r.ours?.Ok)) {
    // One iteration is a whole DDIM run of `steps` UNet evaluations.
    nativeMs[`${row.batch}/${threads}`] = median(row.ours.Ok.per_iter_s) * 1000 / steps;
  }
}

const cpu = execFileSync("lscpu", { encoding: "utf8" }).match(/Model name:\s*(.*)/)?.[1] ?? "unknown CPU";
console.log(`CPU: ${cpu}, ${cores} cores; DDIM ${steps} steps, median ms per step`);
console.log("| forward | module | browser, 1 worker | native, 1 thread | ratio | browser, " + `${cores} workers | native, ${cores} threads | ratio |`);
console.log("|---|---|---|---|---|---|---|---|");
const rows = [];
for (const variant of ["relaxed-simd", "simd128"]) {
  for (const c of cases) {
    if (browserMs[`${variant}/${c.batch}/1`] === undefined) continue;
    const row = { case: c.name, batch: c.batch, module: variant };
    const cells = [`${c.batch} images (${c.name})`, variant];
    for (const k of [1, cores]) {
      const b = browserMs[`${variant}/${c.batch}/${k}`];
      const n = nativeMs[`${c.batch}/${k}`];
      Object.assign(row, { [`browser_${k}`]: b, [`native_${k}`]: n });
      cells.push(b.toFixed(0), n?.toFixed(0) ?? "?", n ? (b / n).toFixed(2) : "?");
    }
    rows.push(row);
    console.log(`| ${cells.join(" | ")} |`);
  }
}
console.log(`the page's default grid without WebGPU (${grid.defaults}; ${cores} workers, the ${chosen} module): ` +
  `${(grid.ms / 1000).toFixed(1)} s from Generate to the finished grid, first preview after ${grid.first.toFixed(0)} ms (median of 3); ` +
  `at η = 0 ${(grid.eta0.ms / 1000).toFixed(1)} s and ${grid.eta0.first.toFixed(0)} ms (ratio ${(grid.ms / grid.eta0.ms).toFixed(2)})`);

// What bounds the ratios: the 4-lane peak against the rates reached.
const ceilingOut = join(mkdtempSync(join(tmpdir(), "ddpm-bench-")), "ceiling.json");
execFileSync(ddpm, ["bench", "--ceiling", "--model", model, "--batch", cases.map((c) => c.batch).join(","),
  "--json", ceilingOut], { stdio: ["ignore", "ignore", "inherit"] });
const ceiling = JSON.parse(readFileSync(ceilingOut, "utf8"));
const peaks = ceiling.peak_gflops_by_lanes;
if (peaks[4] !== undefined) {
  const widest = Math.max(...Object.keys(peaks).map(Number));
  console.log(`one core's peak f32 FMA rate: ${Object.entries(peaks).map(([l, g]) => `${l} lanes ${g.toFixed(1)}`).join(", ")} GFLOP/s`);
  for (const c of cases) {
    const gflop = ceiling.forwards.find((f) => f.batch === c.batch).matmul_gflop;
    const share = (ms, peak) => `${(gflop / ms).toFixed(1)} GFLOP/s (${((100 * gflop / ms) / peak).toFixed(0)} % of the peak)`;
    const native = nativeMs[`${c.batch}/1`];
    const parts = [`${c.batch} images: matrix products ${gflop.toFixed(2)} GFLOP per forward; native 1 thread ${share(native / 1000, peaks[widest])} at ${widest} lanes`];
    for (const variant of ["relaxed-simd", "simd128"]) {
      const b = browserMs[`${variant}/${c.batch}/1`];
      if (b !== undefined) parts.push(`${variant} 1 worker ${share(b / 1000, peaks[4])} at 4 lanes`);
    }
    const need = gflop / (1.5 * native / 1000);
    parts.push(`within 1.5× of native the products alone need ${need.toFixed(1)} GFLOP/s, ${(100 * need / peaks[4]).toFixed(0)} % of the 4-lane peak`);
    console.log(parts.join("; "));
  }
}
if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ cpu, cores, steps, chosen, rows, grid, ceiling }, null, 2));
