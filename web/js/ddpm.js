// ddpm.js: the module that pages import. Its `Diffusion` has the wasm module's API (load, sample
// with onStep previews and an AbortSignal, inpaint, img2img, interpolate, the getters) but
// samples in Web Workers: the page's main thread stays free, and on the CPU the batch is split
// across one worker per core. Each worker runs its own instance of the wasm module
// (ddpm-worker.js); image i of a split run gets the noise it would get in the whole run, so the
// pixels do not depend on the number of workers.
//
//   import init, { Diffusion } from "./ddpm.js";
//   await init();                                  // fetch and compile the wasm module once
//   const d = await Diffusion.load(bytes);         // "auto": WebGPU in a worker, else the CPU in all
//   const out = await d.sample({ n: 16, onStep: ({ rgba }) => draw(rgba) });
//
// Where workers cannot start (a Content-Security-Policy without `worker-src`, for example) the
// model runs on the main thread as before, and `backendNote()` says so.
import initWasm, { Diffusion as Core, fitPicture, wasmSimd } from "./ddpm-web.js";

let started = null;

/**
 * Whether this engine runs WebAssembly's relaxed SIMD: a one-function module with
 * `f32x4.relaxed_madd` validates. Then `init` loads `ddpm-web-relaxed.wasm`, the module built
 * with it, whose matrix products use fused multiply-adds.
 */
export const relaxedSimd = (() => {
  try {
    // (func (param v128 v128 v128) (result v128) local.get 0 local.get 1 local.get 2 f32x4.relaxed_madd)
    return WebAssembly.validate(new Uint8Array([
      0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // header
      0x01, 0x08, 0x01, 0x60, 0x03, 0x7b, 0x7b, 0x7b, 0x01, 0x7b, // type: (v128 v128 v128) -> v128
      0x03, 0x02, 0x01, 0x00, // one function of that type
      0x0a, 0x0d, 0x01, 0x0b, 0x00, 0x20, 0x00, 0x20, 0x01, 0x20, 0x02, 0xfd, 0x85, 0x02, 0x0b, // its code
    ]));
  } catch {
    return false;
  }
})();

/** The SIMD of the module `init` started: "relaxed-simd" or "simd128" (null before `init`). */
export let wasmVariant = null;

/**
 * Fetch and compile the wasm module (once; later calls return the same promise). `options.wasm`:
 * where the `.wasm` file is, or its bytes or compiled module (default: `ddpm-web-relaxed.wasm`
 * beside this file where the engine has relaxed SIMD and that file is there, else
 * `ddpm-web_bg.wasm`); `options.worker`: the URL of `ddpm-worker.js` (default: beside this file).
 */
export default function init(options = {}) {
  started ??= (async () => {
    // The workers are sent the compiled module, so that each instantiates it without a compile.
    const module = options.wasm !== undefined ? await compile(options.wasm) : await defaultModule();
    await initWasm({ module_or_path: module });
    wasmVariant = wasmSimd();
    return { module, workerUrl: options.worker ?? new URL("./ddpm-worker.js", import.meta.url) };
  })().catch((e) => {
    started = null;
    throw e;
  });
  return started.then(() => undefined);
}

/** The module beside this file that fits the engine, compiled. */
async function defaultModule() {
  if (relaxedSimd) {
    try {
      return await compile(new URL("./ddpm-web-relaxed.wasm", import.meta.url));
    } catch (e) {
      // Not deployed beside this file (a debug build, a page that copied one module): the other.
      console.info(`ddpm: using ddpm-web_bg.wasm: ${e.message}`);
    }
  }
  return compile(new URL("./ddpm-web_bg.wasm", import.meta.url));
}

/** `source` (a URL, Request, Response, bytes or a compiled module) compiled. */
async function compile(source) {
  if (source instanceof WebAssembly.Module) return source;
  if (ArrayBuffer.isView(source) || source instanceof ArrayBuffer) return WebAssembly.compile(source);
  const response = source instanceof Response ? source : await fetch(source);
  if (!response.ok) throw new Error(`fetching the wasm module failed: HTTP ${response.status} for ${response.url}`);
  if (response.headers.get("content-type")?.startsWith("application/wasm")) {
    return WebAssembly.compileStreaming(response);
  }
  return WebAssembly.compile(await response.arrayBuffer());
}

/** A worker that could not be started (as opposed to a model it could not load). */
class StartError extends Error {}

/** Milliseconds a new worker may take to instantiate the module before it counts as failed. */
const START_TIMEOUT_MS = 30000;

let nextId = 1;

/** One worker: its own wasm instance and model, and the calls in flight to it. */
class Remote {
  constructor(workerUrl) {
    this.pending = new Map(); // id → { resolve, reject, onStep }
    this.dead = null;
    this.worker = new Worker(workerUrl, { type: "module", name: "ddpm" });
    this.worker.onmessage = ({ data }) => this.receive(data);
    this.worker.onerror = (event) => {
      event.preventDefault?.();
      this.die(event.message || "it failed to start or crashed");
    };
    this.worker.onmessageerror = () => this.die("a message from it could not be read");
  }

  /** A worker with the model loaded; a StartError when the worker itself cannot run. */
  static async start(bytes, backend) {
    const { module, workerUrl } = await started;
    let remote;
    try {
      remote = new Remote(workerUrl);
      let timer;
      const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("it did not start in time")), START_TIMEOUT_MS);
      });
      await Promise.race([remote.call({ type: "init", module }).promise, timeout]).finally(() => clearTimeout(timer));
    } catch (e) {
      remote?.worker.terminate();
      throw new StartError(e?.message ?? String(e));
    }
    try {
      remote.info = await remote.call({ type: "load", bytes, backend }).promise;
    } catch (e) {
      remote.worker.terminate();
      throw e;
    }
    return remote;
  }

  call(message, onStep) {
    const id = nextId++;
    const promise = new Promise((resolve, reject) => {
      if (this.dead) {
        reject(new Error(`a sampling worker stopped: ${this.dead}`));
        return;
      }
      this.pending.set(id, { resolve, reject, onStep });
      this.worker.postMessage({ ...message, id });
    });
    return { id, promise };
  }

  cancel(id) {
    if (this.pending.delete(id) && !this.dead) this.worker.postMessage({ type: "cancel", id });
  }

  receive(data) {
    const call = this.pending.get(data.id);
    if (!call) return; // a cancelled run's last words
    if (data.type === "step") {
      call.onStep?.(data.progress);
      return;
    }
    this.pending.delete(data.id);
    if (data.type === "error") {
      call.reject(new Error(data.message));
      if (data.fatal) this.die(data.message);
    } else {
      call.resolve(data.info ?? data.out ?? null);
    }
  }

  die(reason) {
    if (this.dead) return;
    this.dead = reason;
    this.worker.terminate();
    for (const call of this.pending.values()) call.reject(new Error(`a sampling worker stopped: ${reason}`));
    this.pending.clear();
  }
}

/** `n` images as `k` contiguous ranges whose sizes differ by at most one. */
function split(n, k) {
  const parts = [];
  for (let i = 0, start = 0; i < k && start < n; i++) {
    const end = start + Math.ceil((n - start) / (k - i));
    parts.push([start, end]);
    start = end;
  }
  return parts;
}

const DEFAULT_N = { sample: 16, inpaint: 1, img2img: 1, interpolate: 8 };

/** A diffusion model loaded in Web Workers (or on the main thread where workers cannot run). */
export class Diffusion {
  #remotes = [];
  #core = null;
  #info;
  #bytes;
  #note;

  constructor(secret) {
    if (secret?.remotes === undefined && secret?.core === undefined) {
      throw new Error("use `await Diffusion.load(bytes)` to create a Diffusion");
    }
    this.#remotes = secret.remotes ?? [];
    this.#core = secret.core ?? null;
    this.#info = secret.info;
    this.#bytes = secret.bytes;
    this.#note = secret.note;
  }

  /**
   * Load a model file (the bytes of a `.safetensors` written by `ddpm`) on `backend`: "auto"
   * (default: WebGPU when the browser has it, else the CPU), "webgpu" or "cpu". `options.workers`:
   * how many workers share a run on the CPU (default `navigator.hardwareConcurrency`; WebGPU uses
   * one; 0 runs on the main thread).
   */
  static async load(bytes, backend = "auto", options = {}) {
    await init();
    const wanted = options?.workers ?? globalThis.navigator?.hardwareConcurrency ?? 1;
    if (!Number.isInteger(wanted) || wanted < 0 || wanted > 64) {
      throw new Error(`option \`workers\` must be a whole number from 0 to 64, got ${wanted}`);
    }
    const onMainThread = async (why) => {
      const core = await Core.load(bytes, backend ?? undefined);
      const info = describe(core);
      const note = why ? `${info.backendNote}, on the main thread (${why})` : `${info.backendNote}, on the main thread`;
      return new Diffusion({ core, info, note });
    };
    if (wanted === 0) return onMainThread(null);
    const copy = new Uint8Array(bytes); // kept to restart a worker that dies
    let first;
    try {
      first = await Remote.start(copy, backend ?? "auto");
    } catch (e) {
      if (!(e instanceof StartError)) throw e;
      console.warn(`ddpm: sampling on the main thread: a Web Worker could not start: ${e.message}`);
      return onMainThread("Web Workers could not start");
    }
    const remotes = [first];
    if (first.info.backend === "cpu" && wanted > 1) {
      const more = await Promise.allSettled(Array.from({ length: wanted - 1 }, () => Remote.start(copy, "cpu")));
      for (const r of more) if (r.status === "fulfilled") remotes.push(r.value);
    }
    const info = first.info;
    const note = remotes.length > 1 ? `${info.backendNote}, ${remotes.length} workers` : `${info.backendNote}, in a worker`;
    return new Diffusion({ remotes, info, bytes: copy, note });
  }

  /** "webgpu" or "cpu". */
  backend() {
    return this.#info.backend;
  }

  /** A sentence on the backend and where it runs: "WebGPU, in a worker", "CPU (…), 4 workers". */
  backendNote() {
    return this.#note;
  }

  /** Image side in pixels. */
  get imageSize() {
    return this.#info.imageSize;
  }

  /** Channels per image (1 or 3). */
  get channels() {
    return this.#info.channels;
  }

  /** Class names of a class-conditional model (empty otherwise). */
  get classNames() {
    return [...this.#info.classNames];
  }

  /** Whether classifier-free guidance is possible (the model has a null class). */
  get supportsGuidance() {
    return this.#info.supportsGuidance;
  }

  /** Diffusion steps the model was trained with (the most sampling steps possible). */
  get trainTimesteps() {
    return this.#info.trainTimesteps;
  }

  /** Number of parameters. */
  get numParams() {
    return this.#info.numParams;
  }

  /** Workers that share a run (0 on the main thread). */
  get workers() {
    return this.#remotes.length;
  }

  /** Generate images (see `SampleOptions` and `Samples` in ddpm-web.d.ts). */
  sample(options) {
    return this.#run("sample", options);
  }

  /** Regenerate the white part of `mask` over `image` and keep the rest (RePaint). */
  inpaint(options) {
    return this.#run("inpaint", options);
  }

  /** Vary `image`: noise it to `strength` of the schedule and denoise it again (SDEdit). */
  img2img(options) {
    return this.#run("img2img", options);
  }

  /** A row of `n` images from `seeds[0]`'s image to `seeds[1]`'s. */
  interpolate(options) {
    return this.#run("interpolate", options);
  }

  /** `picture` fitted to the model as the editing methods fit it: `{ rgba, size, note }`. */
  fitImage(picture) {
    return this.#core ? this.#core.fitImage(picture) : fitPicture(picture, this.imageSize, this.channels);
  }

  /** Stop the workers and release the model. */
  free() {
    for (const remote of this.#remotes) remote.die("freed");
    this.#remotes = [];
    this.#core?.free();
    this.#core = null;
  }

  /** Replace workers that died since the last run. */
  async #revive() {
    for (let i = 0; i < this.#remotes.length; i++) {
      if (this.#remotes[i].dead && this.#remotes[i].dead !== "freed") {
        this.#remotes[i] = await Remote.start(this.#bytes, this.#info.backend);
      }
    }
  }

  async #run(method, options) {
    if (this.#core) return this.#core[method](options);
    if (this.#remotes.length === 0) throw new Error("this Diffusion has been freed");
    const { onStep, signal, ...rest } = options ?? {};
    if (onStep !== undefined && onStep !== null && typeof onStep !== "function") {
      throw new Error("option `onStep` must be a function");
    }
    if (signal?.aborted) throw new Error("cancelled");
    await this.#revive();
    const n = rest.n ?? DEFAULT_N[method];
    const whole = rest.imageRange !== undefined || !Number.isInteger(n) || n < 2 || n > 64;
    const parts = whole ? [null] : split(n, this.#remotes.length);
    const t0 = performance.now();
    const steps = parts.map(() => 0);
    let shown = 0;
    let preview = null;
    let stop;
    const stopped = new Promise((_, reject) => {
      stop = (error) => reject(error);
    });
    stopped.catch(() => {}); // a stop after the run has ended goes nowhere
    const calls = parts.map((range, i) => {
      const remote = this.#remotes[i];
      const partOptions = range ? { ...rest, n, imageRange: range } : rest;
      const progress = (p) => {
        if (!range) {
          if (onStep?.(p) === false) stop(new Error("cancelled"));
          return;
        }
        const one = p.size * p.size * 4;
        preview ??= new Uint8ClampedArray(n * one);
        preview.set(p.rgba, range[0] * one);
        steps[i] = p.step;
        const step = Math.min(...steps);
        if (step > shown) {
          shown = step;
          const msPerStep = (performance.now() - t0) / step;
          const answer = onStep({ step, total: p.total, msPerStep, n, size: p.size, rgba: preview.slice() });
          if (answer === false) stop(new Error("cancelled"));
        }
      };
      const call = remote.call(
        { type: "run", method, options: partOptions, previews: Boolean(onStep) },
        onStep ? progress : undefined,
      );
      return { remote, ...call };
    });
    const abort = () => stop(new Error("cancelled"));
    signal?.addEventListener?.("abort", abort, { once: true });
    try {
      const outs = await Promise.race([Promise.all(calls.map((c) => c.promise)), stopped]);
      return merge(outs, parts, n);
    } catch (e) {
      for (const c of calls) c.remote.cancel(c.id);
      throw e;
    } finally {
      signal?.removeEventListener?.("abort", abort);
    }
  }
}

/** The getters' values of a wasm `Diffusion`. */
function describe(core) {
  return {
    backend: core.backend(),
    backendNote: core.backendNote(),
    imageSize: core.imageSize,
    channels: core.channels,
    classNames: core.classNames,
    supportsGuidance: core.supportsGuidance,
    trainTimesteps: core.trainTimesteps,
    numParams: core.numParams,
  };
}

/** The parts' samples as one run's. */
function merge(outs, parts, n) {
  if (parts.length === 1) return outs[0];
  const { size, channels, backend } = outs[0];
  const pixels = new Float32Array(n * channels * size * size);
  const rgba = new Uint8ClampedArray(n * size * size * 4);
  outs.forEach((out, i) => {
    pixels.set(out.pixels, parts[i][0] * channels * size * size);
    rgba.set(out.rgba, parts[i][0] * size * size * 4);
  });
  const msPerStep = Math.max(...outs.map((out) => out.msPerStep));
  const merged = { n, size, channels, pixels, rgba, msPerStep, backend };
  const note = outs.find((out) => out.note)?.note;
  if (note) merged.note = note;
  return merged;
}
