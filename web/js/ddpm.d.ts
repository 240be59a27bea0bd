// Types of ddpm.js: the wasm module's `Diffusion`, sampling in Web Workers.
import type {
  BackendName,
  Img2ImgOptions,
  InpaintOptions,
  InterpolateOptions,
  Picture,
  SampleOptions,
  Samples,
  StepProgress,
  TimestepSpacing,
} from "./ddpm-web.js";

export type {
  BackendName,
  Img2ImgOptions,
  InpaintOptions,
  InterpolateOptions,
  Picture,
  SampleOptions,
  Samples,
  StepProgress,
  TimestepSpacing,
};

/** Whether this engine validates WebAssembly's relaxed SIMD (`f32x4.relaxed_madd`). */
export const relaxedSimd: boolean;
/** The SIMD of the module `init` started: "relaxed-simd" or "simd128"; null before `init`. */
export let wasmVariant: "relaxed-simd" | "simd128" | null;

export interface InitOptions {
  /**
   * The `.wasm` file (URL, Response, bytes or compiled module). Default, beside ddpm.js:
   * `ddpm-web-relaxed.wasm` where the engine validates relaxed SIMD and the file is there, else
   * `ddpm-web_bg.wasm`.
   */
  wasm?: string | URL | Request | Response | BufferSource | WebAssembly.Module;
  /** The URL of `ddpm-worker.js`. Default: beside ddpm.js. */
  worker?: string | URL;
}

/** Fetch and compile the wasm module, once. */
export default function init(options?: InitOptions): Promise<void>;

export interface LoadOptions {
  /** Workers that share a run on the CPU (default: `navigator.hardwareConcurrency`; WebGPU uses one; 0 = the main thread). */
  workers?: number;
}

export declare class Diffusion {
  private constructor();
  /** Load a model file (the bytes of a `.safetensors` written by `ddpm`). */
  static load(bytes: Uint8Array, backend?: "auto" | BackendName, options?: LoadOptions): Promise<Diffusion>;
  /** "webgpu" or "cpu". */
  backend(): BackendName;
  /** The backend and where it runs: "WebGPU, in a worker", "CPU (…), 4 workers", "…, on the main thread (…)". */
  backendNote(): string;
  readonly imageSize: number;
  readonly channels: number;
  readonly classNames: string[];
  readonly supportsGuidance: boolean;
  readonly trainTimesteps: number;
  readonly numParams: number;
  /** Workers sharing a run (0 on the main thread). */
  readonly workers: number;
  sample(options?: SampleOptions): Promise<Samples>;
  inpaint(options: InpaintOptions): Promise<Samples>;
  img2img(options: Img2ImgOptions): Promise<Samples>;
  interpolate(options: InterpolateOptions): Promise<Samples>;
  fitImage(picture: Picture): { rgba: Uint8ClampedArray; size: number; note?: string };
  /** Stop the workers and release the model. */
  free(): void;
}
