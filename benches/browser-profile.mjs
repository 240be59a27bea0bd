// Where a CPU-fallback worker spends its time: Chromium's sampling profiler on the sampling
// worker, self time per wasm function, during a 10-step DDIM run on 1 worker.
//
//   node benches/browser-profile.mjs DIR [n] [guidance]        # defaults: 4 images, guidance 2
//
// DIR is a copy of dist/ whose module keeps its function names: trunk's wasm-opt drops them, so
// run wasm-bindgen on cargo's output instead, e.g.
//   wasm-bindgen --target web --out-name ddpm-web --out-dir DIR \
//     target/wasm32-unknown-unknown/wasm-release/ddpm_web.wasm
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import puppeteer from "puppeteer-core";
import { chromiumArgs, serve } from "../tests/browser/serve.mjs";
const dist = process.argv[2];
if (!dist) throw new Error("usage: node benches/browser-profile.mjs DIR [n] [guidance]");
const batchN = Number(process.argv[3] ?? 4), guidance = Number(process.argv[4] ?? 2);
const server = await serve(dist);
const browser = await puppeteer.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: chromiumArgs(mkdtempSync(join(tmpdir(), "p-")), false), protocolTimeout: 600000 });
const workers = [];
const page = await browser.newPage();
page.on("workercreated", (w) => workers.push(w));
await page.goto(server.url);
await page.waitForFunction(() => window.ddpmPage?.ready);
await page.evaluate(async () => {
  const { Diffusion } = await import("./ddpm.js");
  window.dd = await Diffusion.load(window.ddpmPage.bytes, "cpu", { workers: 1 });
  await window.dd.sample({ n: 4, guidance: 2, classLabel: 0, sampler: "ddim", seed: 1, steps: 2 });
});
const sessions = [];
for (const w of workers) { const c = w.client; try { await c.send("Profiler.enable"); await c.send("Profiler.setSamplingInterval", { interval: 200 }); await c.send("Profiler.start"); sessions.push(c); } catch (e) {} }
const t = await page.evaluate(async (n, g) => { const t0 = performance.now(); await window.dd.sample({ n, guidance: g, classLabel: 0, sampler: "ddim", seed: 1, steps: 10 }); return performance.now() - t0; }, batchN, guidance);
console.log("sample ms", t.toFixed(0), "workers", workers.length, "profiled", sessions.length);
const self = new Map(); let total = 0;
for (const c of sessions) {
  const { profile } = await c.send("Profiler.stop");
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  for (let i = 0; i < profile.samples.length; i++) {
    const n = byId.get(profile.samples[i]); const dt = profile.timeDeltas[i] ?? 0;
    const name = n.callFrame.functionName || n.callFrame.url || "(anon)";
    if (name === "(idle)") continue; // workers waiting for work
    self.set(name, (self.get(name) ?? 0) + dt); total += dt;
  }
}
console.log(`busy: ${(total / 1000).toFixed(0)} ms in all; self time per function:`);
const rows = [...self].sort((a, b) => b[1] - a[1]).slice(0, 40);
for (const [name, us] of rows) console.log((100 * us / total).toFixed(1).padStart(5), "%", (us / 1000).toFixed(0).padStart(6), "ms", name.slice(0, 150));
await browser.close(); server.close();
