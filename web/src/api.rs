//! The `#[wasm_bindgen]` API (wasm only): `Diffusion.load`, `sample`, `backend` and the model's
//! facts. Errors reach JavaScript as `Error` objects with readable messages.

use std::cell::RefCell;
use std::rc::Rc;

use burn::tensor::Device;
use burn::tensor::wgpu::WgpuBackend;
use ddpm::model_file::{self, ModelInfo};
use ddpm::pipeline::{GenerateOptions, Generation, MAX_BATCH, to_rgba};
use ddpm::sampler::{SamplerKind, SamplerOptions, build_sampler};
use ddpm::schedule::NoiseSchedule;
use ddpm::unet::UNet;
use js_sys::{Float32Array, Function, Object, Promise, Reflect, Uint8ClampedArray};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** Which compute backend a `Diffusion` runs on. */
export type BackendName = "webgpu" | "cpu";
/** Samplers: ancestral DDPM, DDIM, DPM-Solver++ (2M). */
export type SamplerName = "ddpm" | "ddim" | "dpm-solver++";

export interface SampleOptions {
  /** Number of images (1..=64). Default 16. */
  n?: number;
  /** Denoising steps (model evaluations), 1..=the model's training timesteps. Default 25. */
  steps?: number;
  /** Default "ddim". */
  sampler?: SamplerName;
  /** Seed of the initial noise and every later draw. Default 0. */
  seed?: number;
  /** DDIM's eta (0 = deterministic). Default 0. */
  eta?: number;
  /** Class (index or name) for a class-conditional model. */
  classLabel?: number | string;
  /** Classifier-free guidance scale (1 = none). Default 1. */
  guidance?: number;
  /** Call onStep after every `every` steps (and after the last). Default 1. */
  every?: number;
  /** Progress callback; return `false` to cancel the run. */
  onStep?: (progress: StepProgress) => boolean | void;
  /** Cancels the run when aborted. */
  signal?: AbortSignal;
}

export interface StepProgress {
  step: number;
  total: number;
  /** Mean wall-clock milliseconds per step so far (including read-backs for previews). */
  msPerStep: number;
  n: number;
  size: number;
  /** The current images x_t, `n` RGBA images of size×size, one after another. */
  rgba: Uint8ClampedArray;
}

export interface Samples {
  n: number;
  size: number;
  channels: number;
  /** The raw samples, `[n, channels, size, size]` in [-1, 1]. */
  pixels: Float32Array;
  /** `n` RGBA images of size×size, one after another. */
  rgba: Uint8ClampedArray;
  msPerStep: number;
  backend: BackendName;
}
"#;

/// Most images per call in the browser.
const MAX_IMAGES: usize = 64;

/// The WebGPU device once acquired (the runtime can be initialised only once per page), or why
/// it could not be.
type GpuSlot = Option<Result<(Device, u64), String>>;

thread_local! {
    static WEBGPU: RefCell<GpuSlot> = const { RefCell::new(None) };
}

async fn webgpu() -> Result<(Device, u64), String> {
    if let Some(result) = WEBGPU.with(|slot| slot.borrow().clone()) {
        return result;
    }
    let result = Device::wgpu_options()
        .graphics_api(WgpuBackend::WebGpu)
        .init_with_setup_async()
        .await
        .map(|(device, setup)| {
            let limits = setup.device.limits();
            let max = limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size);
            (device, max)
        })
        .map_err(|e| format!("WebGPU is not available: {e}"));
    WEBGPU.with(|slot| *slot.borrow_mut() = Some(result.clone()));
    result
}

struct Inner {
    model: UNet,
    info: ModelInfo,
    device: Device,
    backend: &'static str,
    /// Largest buffer the adapter allows (WebGPU only).
    max_buffer: Option<u64>,
    note: String,
}

/// A diffusion model loaded on a device, ready to sample.
#[wasm_bindgen]
pub struct Diffusion {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Diffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diffusion")
            .field("backend", &self.inner.backend)
            .field("image_size", &self.inner.info.unet.sample_size)
            .finish()
    }
}

/// `console.warn(message)`.
fn warn(message: &str) {
    let console = Reflect::get(&js_sys::global(), &"console".into()).unwrap_or(JsValue::NULL);
    if let Ok(warn) = Reflect::get(&console, &"warn".into())
        && let Ok(warn) = warn.dyn_into::<Function>()
    {
        let _ = warn.call1(&console, &JsValue::from_str(message));
    }
}

fn js_err(message: impl std::fmt::Display) -> JsValue {
    js_sys::Error::new(&message.to_string()).into()
}

fn get(options: &JsValue, key: &str) -> Result<Option<JsValue>, JsValue> {
    if options.is_undefined() || options.is_null() {
        return Ok(None);
    }
    let value = Reflect::get(options, &JsValue::from_str(key))?;
    Ok((!value.is_undefined() && !value.is_null()).then_some(value))
}

fn get_number(options: &JsValue, key: &str) -> Result<Option<f64>, JsValue> {
    match get(options, key)? {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| js_err(format!("option `{key}` must be a finite number"))),
    }
}

fn get_count(options: &JsValue, key: &str, default: usize) -> Result<usize, JsValue> {
    match get_number(options, key)? {
        None => Ok(default),
        Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(x as usize),
        Some(x) => Err(js_err(format!(
            "option `{key}` must be a whole number, got {x}"
        ))),
    }
}

fn set(object: &Object, key: &str, value: impl Into<JsValue>) {
    // Setting a property on a plain object cannot fail.
    let _ = Reflect::set(object, &JsValue::from_str(key), &value.into());
}

/// Resolve after the browser has had a chance to run other tasks (input, painting).
async fn yield_now() -> Result<(), JsValue> {
    let set_timeout: Function = Reflect::get(&js_sys::global(), &"setTimeout".into())?.into();
    let promise = Promise::new(&mut |resolve, _| {
        let _ = set_timeout.call2(&JsValue::NULL, &resolve, &JsValue::from(0));
    });
    JsFuture::from(promise).await.map(|_| ())
}

fn now_ms() -> f64 {
    Reflect::get(&js_sys::global(), &"performance".into())
        .ok()
        .and_then(|p| {
            let now: Function = Reflect::get(&p, &"now".into()).ok()?.into();
            now.call0(&p).ok()?.as_f64()
        })
        .unwrap_or_else(js_sys::Date::now)
}

async fn read_back(x: &burn::tensor::Tensor<4>) -> Result<Vec<f32>, JsValue> {
    let data = x.clone().into_data_async().await.map_err(|e| {
        js_err(format!(
            "reading the images back from the device failed: {e:?}"
        ))
    })?;
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| js_err(format!("unexpected tensor data: {e:?}")))
}

fn rgba_array(values: &[f32], shape: [usize; 4]) -> Uint8ClampedArray {
    let bytes: Vec<u8> = to_rgba(values, shape).concat();
    Uint8ClampedArray::from(&bytes[..])
}

#[wasm_bindgen]
impl Diffusion {
    /// Load a model file (the bytes of a `.safetensors` written by `ddpm`) on `backend`:
    /// `"auto"` (default: WebGPU when the browser has it, else the CPU), `"webgpu"` or `"cpu"`.
    pub async fn load(
        bytes: Vec<u8>,
        #[wasm_bindgen(unchecked_param_type = "\"auto\" | BackendName | undefined")]
        backend: Option<String>,
    ) -> Result<Diffusion, JsValue> {
        console_error_panic_hook::set_once();
        let wanted = backend.unwrap_or_else(|| "auto".to_string());
        let info = model_file::read_info(&bytes)
            .map_err(|e| js_err(format!("invalid model file: {e}")))?;
        let (device, name, max_buffer, note) = match wanted.as_str() {
            "cpu" => (Device::flex(), "cpu", None, "CPU (chosen)".to_string()),
            "webgpu" | "auto" => match webgpu().await {
                Ok((device, max)) => (device, "webgpu", Some(max), "WebGPU".to_string()),
                Err(why) if wanted == "auto" => {
                    warn(&why);
                    let short = if why.contains("No adapter") || why.contains("no adapter") {
                        "WebGPU is not available: no adapter"
                    } else {
                        "WebGPU is not available: it failed to start (details in the console)"
                    };
                    (Device::flex(), "cpu", None, format!("CPU ({short})"))
                }
                Err(why) => return Err(js_err(why)),
            },
            other => {
                return Err(js_err(format!(
                    "unknown backend \"{other}\": use \"auto\", \"webgpu\" or \"cpu\""
                )));
            }
        };
        if let Some(max) = max_buffer {
            let needed = info.unet.largest_buffer_bytes(1);
            if needed > max {
                return Err(js_err(format!(
                    "this model needs a {} MB buffer even for one image, more than this WebGPU \
                     adapter allows ({} MB): load it with the CPU backend",
                    needed >> 20,
                    max >> 20
                )));
            }
        }
        let (model, info) = model_file::load(&bytes, &device)
            .map_err(|e| js_err(format!("invalid model file: {e}")))?;
        Ok(Diffusion {
            inner: Rc::new(Inner {
                model,
                info,
                device,
                backend: name,
                max_buffer,
                note,
            }),
        })
    }

    /// `"webgpu"` or `"cpu"`.
    #[wasm_bindgen(unchecked_return_type = "BackendName")]
    pub fn backend(&self) -> String {
        self.inner.backend.to_string()
    }

    /// A sentence on the backend: "WebGPU", or "CPU (WebGPU is not available: …)".
    #[wasm_bindgen(js_name = backendNote)]
    pub fn backend_note(&self) -> String {
        self.inner.note.clone()
    }

    /// Image side in pixels.
    #[wasm_bindgen(getter, js_name = imageSize)]
    pub fn image_size(&self) -> usize {
        self.inner.info.unet.sample_size
    }

    /// Channels per image (1 or 3).
    #[wasm_bindgen(getter)]
    pub fn channels(&self) -> usize {
        self.inner.info.unet.in_channels
    }

    /// Class names of a class-conditional model (empty otherwise).
    #[wasm_bindgen(getter, js_name = classNames)]
    pub fn class_names(&self) -> Vec<String> {
        let n = self.inner.info.num_classes();
        (0..n)
            .map(|i| {
                self.inner
                    .info
                    .class_names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| i.to_string())
            })
            .collect()
    }

    /// Whether classifier-free guidance is possible (the model has a null class).
    #[wasm_bindgen(getter, js_name = supportsGuidance)]
    pub fn supports_guidance(&self) -> bool {
        self.inner.info.null_class().is_some()
    }

    /// Diffusion steps the model was trained with (the most sampling steps possible).
    #[wasm_bindgen(getter, js_name = trainTimesteps)]
    pub fn train_timesteps(&self) -> usize {
        self.inner.info.schedule.num_train_timesteps
    }

    /// Number of parameters.
    #[wasm_bindgen(getter, js_name = numParams)]
    pub fn num_params(&self) -> usize {
        model_file::num_params(&self.inner.model)
    }

    /// Generate images. Resolves to the final samples; rejects with an `Error` on bad options,
    /// on cancellation ("cancelled") or when the device fails.
    #[wasm_bindgen(unchecked_return_type = "Promise<Samples>")]
    pub fn sample(
        &self,
        #[wasm_bindgen(unchecked_param_type = "SampleOptions | undefined")] options: JsValue,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move { sample(&inner, options).await.map(JsValue::from) })
    }
}

struct Parsed {
    kind: SamplerKind,
    steps: usize,
    eta: f64,
    every: usize,
    generate: GenerateOptions,
    on_step: Option<Function>,
    signal: Option<JsValue>,
}

fn parse(inner: &Inner, options: &JsValue) -> Result<Parsed, JsValue> {
    let info = &inner.info;
    let n = get_count(options, "n", 16)?;
    if !(1..=MAX_IMAGES.min(MAX_BATCH)).contains(&n) {
        return Err(js_err(format!("n = {n}: choose 1 to {MAX_IMAGES} images")));
    }
    let t_max = info.schedule.num_train_timesteps;
    let steps = get_count(options, "steps", 25.min(t_max))?;
    if !(1..=t_max).contains(&steps) {
        return Err(js_err(format!(
            "steps = {steps}: choose 1 to {t_max} (the model's training timesteps)"
        )));
    }
    let kind = match get(options, "sampler")? {
        None => SamplerKind::Ddim,
        Some(v) => v
            .as_string()
            .ok_or_else(|| js_err("option `sampler` must be a string"))?
            .parse::<SamplerKind>()
            .map_err(js_err)?,
    };
    let seed = get_count(options, "seed", 0)? as u64;
    let eta = get_number(options, "eta")?.unwrap_or(0.0);
    let guidance = get_number(options, "guidance")?.unwrap_or(1.0);
    let classes = info.num_classes();
    let class = match get(options, "classLabel")? {
        None if classes > 0 => {
            return Err(js_err(
                "this model is class-conditional: give `classLabel` (a class index or name)",
            ));
        }
        None => None,
        Some(_) if classes == 0 => {
            return Err(js_err(
                "this model is not class-conditional: leave `classLabel` out",
            ));
        }
        Some(v) => Some(if let Some(i) = v.as_f64() {
            if i < 0.0 || i.fract() != 0.0 || i as usize >= classes {
                return Err(js_err(format!(
                    "classLabel {i} is not a class index (0..{classes})"
                )));
            }
            i as usize
        } else {
            let name = v.as_string().unwrap_or_default();
            info.class_names
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| {
                    js_err(format!(
                        "classLabel \"{name}\" is not one of the model's classes: {}",
                        info.class_names.join(", ")
                    ))
                })?
        }),
    };
    if guidance != 1.0 && info.null_class().is_none() {
        return Err(js_err(
            "guidance needs a class-conditional model trained with label dropout; use 1",
        ));
    }
    if let Some(max) = inner.max_buffer {
        let batch = if guidance != 1.0 { 2 * n } else { n };
        let needed = info.unet.largest_buffer_bytes(batch);
        if needed > max {
            return Err(js_err(format!(
                "{n} images need a {} MB buffer, more than this WebGPU adapter allows ({} MB): \
                 generate fewer images or use the CPU backend",
                needed >> 20,
                max >> 20
            )));
        }
    }
    let on_step = get(options, "onStep")?
        .map(|f| {
            f.dyn_into::<Function>()
                .map_err(|_| js_err("option `onStep` must be a function"))
        })
        .transpose()?;
    Ok(Parsed {
        kind,
        steps,
        eta,
        every: get_count(options, "every", 1)?.max(1),
        generate: GenerateOptions {
            n,
            seed,
            class,
            guidance,
        },
        on_step,
        signal: get(options, "signal")?,
    })
}

fn cancelled(signal: &Option<JsValue>) -> bool {
    signal.as_ref().is_some_and(|s| {
        Reflect::get(s, &"aborted".into())
            .ok()
            .and_then(|a| a.as_bool())
            .unwrap_or(false)
    })
}

async fn sample(inner: &Inner, options: JsValue) -> Result<Object, JsValue> {
    let p = parse(inner, &options)?;
    let info = &inner.info;
    let schedule = NoiseSchedule::new(&info.schedule).map_err(js_err)?;
    let sampler_options = SamplerOptions {
        eta: p.eta,
        ..SamplerOptions::default()
    };
    let sampler = build_sampler(
        p.kind,
        &schedule,
        info.prediction,
        p.steps,
        &sampler_options,
    )
    .map_err(js_err)?;
    let mut generation =
        Generation::new(&inner.model, info, sampler, &p.generate, &inner.device).map_err(js_err)?;
    let total = generation.total_steps();
    let (s, c) = (info.unet.sample_size, info.unet.in_channels);
    let shape = [p.generate.n, c, s, s];
    let start = now_ms();
    while generation.step() {
        let done = generation.steps_done();
        if let Some(callback) = &p.on_step
            && (done % p.every == 0 || done == total)
        {
            let values = read_back(generation.sample()).await?;
            let progress = Object::new();
            set(&progress, "step", done as f64);
            set(&progress, "total", total as f64);
            set(&progress, "msPerStep", (now_ms() - start) / done as f64);
            set(&progress, "n", p.generate.n as f64);
            set(&progress, "size", s as f64);
            set(&progress, "rgba", rgba_array(&values, shape));
            let answer = callback.call1(&JsValue::NULL, &progress)?;
            if answer.as_bool() == Some(false) {
                return Err(js_err("cancelled"));
            }
        }
        yield_now().await?;
        if cancelled(&p.signal) {
            return Err(js_err("cancelled"));
        }
    }
    let values = read_back(generation.sample()).await?;
    let ms_per_step = (now_ms() - start) / total.max(1) as f64;
    let out = Object::new();
    set(&out, "n", p.generate.n as f64);
    set(&out, "size", s as f64);
    set(&out, "channels", c as f64);
    set(&out, "rgba", rgba_array(&values, shape));
    set(&out, "pixels", Float32Array::from(&values[..]));
    set(&out, "msPerStep", ms_per_step);
    set(&out, "backend", inner.backend);
    Ok(out)
}
