// One sampling worker of ddpm.js: its own instance of the wasm module and of the model, driven by
// messages. Previews and results go back as transferred buffers.
//
//   → { type: "init", id, module }                ← { type: "ready", id } | { type: "error", id, message }
//   → { type: "load", id, bytes, backend }        ← { type: "loaded", id, info } | { type: "error", id, message }
//   → { type: "run", id, method, options, previews }
//                                                 ← { type: "step", id, progress }* then
//                                                   { type: "done", id, out } | { type: "error", id, message, fatal }
//   → { type: "cancel", id }
//
// Any other message is a bug in the caller: the worker throws, and the page sees the worker's
// `error` event (the pool then replaces it).
import init, { Diffusion } from "./ddpm-web.js";

let model = null;
const runs = new Map(); // run id → AbortController

function message(e) {
  return e?.message ?? String(e);
}

const handlers = {
  async init({ id, module }) {
    try {
      await init({ module_or_path: module });
      postMessage({ type: "ready", id });
    } catch (e) {
      postMessage({ type: "error", id, message: message(e) });
    }
  },

  async load({ id, bytes, backend }) {
    try {
      const d = await Diffusion.load(bytes, backend);
      model?.free();
      model = d;
      const info = {
        backend: d.backend(),
        backendNote: d.backendNote(),
        imageSize: d.imageSize,
        channels: d.channels,
        classNames: d.classNames,
        supportsGuidance: d.supportsGuidance,
        trainTimesteps: d.trainTimesteps,
        numParams: d.numParams,
      };
      postMessage({ type: "loaded", id, info });
    } catch (e) {
      postMessage({ type: "error", id, message: message(e) });
    }
  },

  async run({ id, method, options, previews }) {
    const controller = new AbortController();
    runs.set(id, controller);
    const onStep = previews
      ? (progress) => postMessage({ type: "step", id, progress }, [progress.rgba.buffer])
      : undefined;
    try {
      if (!model) throw new Error("no model is loaded");
      const out = await model[method]({ ...options, onStep, signal: controller.signal });
      postMessage({ type: "done", id, out }, [out.rgba.buffer, out.pixels.buffer]);
    } catch (e) {
      // A trap in the wasm code (a panic, running out of memory) leaves this instance unusable.
      postMessage({ type: "error", id, message: message(e), fatal: e instanceof WebAssembly.RuntimeError });
    } finally {
      runs.delete(id);
    }
  },

  cancel({ id }) {
    runs.get(id)?.abort();
  },
};

self.onmessage = ({ data }) => {
  const handler = handlers[data?.type];
  if (!handler) throw new Error(`ddpm worker: unknown message ${JSON.stringify(data?.type)}`);
  handler(data);
};
