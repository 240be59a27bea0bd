//! The `#[wasm_bindgen]` API (wasm only): `Diffusion.load`, `sample`, `backend` and the model's
//! facts. Errors reach JavaScript as `Error` objects with readable messages.

use std::cell::RefCell;
use std::rc::Rc;

use burn::tensor::Device;
use burn::tensor::wgpu::WgpuBackend;
use ddpm::edit::{self, FittedImage, MaskCover, RePaint, RePaintOptions};
use ddpm::model_file::{self, ModelInfo};
use ddpm::pipeline::{GenerateOptions, Generation, MAX_BATCH, to_rgba};
use ddpm::sampler::{SamplerKind, SamplerOptions, TimestepSpacing, build_sampler};
use ddpm::schedule::NoiseSchedule;
use ddpm::unet::UNet;
use js_sys::{
    Array, Float32Array, Function, Object, Promise, Reflect, Uint8Array, Uint8ClampedArray,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** Which compute backend a `Diffusion` runs on. */
export type BackendName = "webgpu" | "cpu";
/** Samplers: ancestral DDPM, DDIM, DPM-Solver++ (2M). */
export type SamplerName = "ddpm" | "ddim" | "dpm-solver++";
/** Where a run's timesteps lie (diffusers' `timestep_spacing`; Lin et al. 2023, Table 2). */
export type TimestepSpacing = "leading" | "trailing" | "linspace";

export interface SampleOptions {
  /** Number of images (1..=64). Default 16. */
  n?: number;
  /** Denoising steps (model evaluations), 1..=the model's training timesteps. Default 25. */
  steps?: number;
  /** Default "ddim". */
  sampler?: SamplerName;
  /** Default: the model file's own spacing (`ddpm export --timestep-spacing`), else the
   *  sampler's diffusers default ("leading"; "linspace" for DPM-Solver++). "trailing" starts
   *  at the last training timestep. */
  timestepSpacing?: TimestepSpacing;
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
  /** Compute only images start..end of the `n` (the same pixels as in the whole run). */
  imageRange?: [number, number];
}

/** An RGBA picture, such as an `ImageData` or a canvas's `getImageData()`. */
export interface Picture {
  width: number;
  height: number;
  /** width × height × 4 bytes, row by row. */
  data: Uint8ClampedArray | Uint8Array;
}

export interface InpaintOptions {
  /** The picture to complete; center-cropped and resized to the model's size. */
  image: Picture;
  /** Same size as `image`: white (luma ≥ 128) = regenerate, black = keep. */
  mask: Picture;
  /** Number of completions. Default 1. */
  n?: number;
  /** RePaint's reverse steps (without the jumps back up). Default 25. */
  steps?: number;
  /** RePaint's jump length j. Default 5. */
  jump?: number;
  /** How often each jump point is passed (1 = no resampling). Default 5. */
  resample?: number;
  /** 0 = deterministic (default), 1 = DDPM's variance. */
  eta?: number;
  seed?: number;
  classLabel?: number | string;
  guidance?: number;
  every?: number;
  onStep?: (progress: StepProgress) => boolean | void;
  signal?: AbortSignal;
  imageRange?: [number, number];
}

export interface Img2ImgOptions extends SampleOptions {
  /** The picture to vary; center-cropped and resized to the model's size. */
  image: Picture;
  /** How much to change, in (0, 1]. Default 0.6. */
  strength?: number;
}

export interface InterpolateOptions extends SampleOptions {
  /** Two seeds: the row goes from the first seed's image to the second's. */
  seeds: [number, number];
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
  /** What was done to the inputs (cropped, resized, nothing to regenerate ...), if anything. */
  note?: string;
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

/// A string option by its library name (a sampler, a timestep spacing), with the library's error.
fn get_named<T: std::str::FromStr<Err = ddpm::Error>>(
    options: &JsValue,
    key: &str,
) -> Result<Option<T>, JsValue> {
    get(options, key)?
        .map(|v| {
            v.as_string()
                .ok_or_else(|| js_err(format!("option `{key}` must be a string")))?
                .parse::<T>()
                .map_err(js_err)
        })
        .transpose()
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
        // Which of the two CPU builds this is, where it matters.
        let note = if name == "cpu" && cfg!(target_feature = "relaxed-simd") {
            format!("{note}, relaxed SIMD")
        } else {
            note
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

    /// `picture` fitted to the model as the editing methods fit it (center-cropped to a square,
    /// resized by area averaging, converted to the model's channels): `{ rgba, size, note }`,
    /// `rgba` the size×size RGBA result.
    #[wasm_bindgen(js_name = fitImage, unchecked_return_type = "{ rgba: Uint8ClampedArray; size: number; note?: string }")]
    pub fn fit_image(
        &self,
        #[wasm_bindgen(unchecked_param_type = "Picture")] picture: JsValue,
    ) -> Result<Object, JsValue> {
        let unet = &self.inner.info.unet;
        fit_picture(picture, unet.sample_size, unet.in_channels)
    }

    /// Regenerate the white part of `mask` over `image` and keep the rest (RePaint). Resolves
    /// like `sample`; a mask with nothing white gives the image back unchanged, with a `note`.
    #[wasm_bindgen(unchecked_return_type = "Promise<Samples>")]
    pub fn inpaint(
        &self,
        #[wasm_bindgen(unchecked_param_type = "InpaintOptions")] options: JsValue,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move { inpaint(&inner, options).await.map(JsValue::from) })
    }

    /// Vary `image`: noise it to `strength` of the schedule and denoise it again (SDEdit).
    #[wasm_bindgen(unchecked_return_type = "Promise<Samples>")]
    pub fn img2img(
        &self,
        #[wasm_bindgen(unchecked_param_type = "Img2ImgOptions")] options: JsValue,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move { img2img(&inner, options).await.map(JsValue::from) })
    }

    /// A row of `n` images from `seeds[0]`'s image to `seeds[1]`'s (spherical interpolation of
    /// the initial noise; the ends equal those seeds' own images with DDIM at η = 0).
    #[wasm_bindgen(unchecked_return_type = "Promise<Samples>")]
    pub fn interpolate(
        &self,
        #[wasm_bindgen(unchecked_param_type = "InterpolateOptions")] options: JsValue,
    ) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move { interpolate(&inner, options).await.map(JsValue::from) })
    }
}

/// `picture` fitted to a model of `size`×`size` pixels and `channels` channels, as
/// The SIMD this module's CPU path was built with: "relaxed-simd" (`ddpm-web-relaxed.wasm`,
/// matrix products on `f32x4.relaxed_madd`) or "simd128" (`ddpm-web_bg.wasm`, every engine).
#[wasm_bindgen(js_name = wasmSimd)]
pub fn wasm_simd() -> String {
    if cfg!(target_feature = "relaxed-simd") {
        "relaxed-simd"
    } else {
        "simd128"
    }
    .to_string()
}

/// `Diffusion.fitImage` fits it: `{ rgba, size, note }`. For pages whose model lives in a Web
/// Worker (`ddpm.js`), which fit pictures on the main thread.
#[wasm_bindgen(js_name = fitPicture, unchecked_return_type = "{ rgba: Uint8ClampedArray; size: number; note?: string }")]
pub fn fit_picture(
    #[wasm_bindgen(unchecked_param_type = "Picture")] picture: JsValue,
    size: usize,
    channels: usize,
) -> Result<Object, JsValue> {
    let picture = read_picture(&picture, "picture")?;
    let fitted = edit::fit_image(&picture.rgba, picture.width, picture.height, size, channels)
        .map_err(|e| js_err(format!("`picture`: {e}")))?;
    let out = Object::new();
    set(
        &out,
        "rgba",
        rgba_array(&fitted.values, [1, channels, size, size]),
    );
    set(&out, "size", size as f64);
    if let Some(note) = fitted.note {
        set(&out, "note", note);
    }
    Ok(out)
}

struct Parsed {
    kind: SamplerKind,
    spacing: Option<TimestepSpacing>,
    steps: usize,
    eta: f64,
    every: usize,
    generate: GenerateOptions,
    on_step: Option<Function>,
    signal: Option<JsValue>,
}

fn parse(inner: &Inner, options: &JsValue, default_n: usize) -> Result<Parsed, JsValue> {
    let info = &inner.info;
    let n = get_count(options, "n", default_n)?;
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
    let kind = get_named(options, "sampler")?.unwrap_or(SamplerKind::Ddim);
    let spacing = get_named::<TimestepSpacing>(options, "timestepSpacing")?;
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
        spacing,
        steps,
        eta,
        every: get_count(options, "every", 1)?.max(1),
        generate: GenerateOptions {
            n,
            seed,
            class,
            guidance,
            part: image_range(options, n)?,
        },
        on_step,
        signal: get(options, "signal")?,
    })
}

/// The option `imageRange`, `[start, end]`: compute only images start..end of the `n` (the same
/// pixels as in the whole run), as each worker of a split run does.
fn image_range(options: &JsValue, n: usize) -> Result<Option<std::ops::Range<usize>>, JsValue> {
    let Some(value) = get(options, "imageRange")? else {
        return Ok(None);
    };
    let bad = || {
        js_err(format!(
            "option `imageRange` must be [start, end] with 0 ≤ start < end ≤ n ({n})"
        ))
    };
    let pair = Array::is_array(&value)
        .then(|| Array::from(&value))
        .filter(|a| a.length() == 2)
        .ok_or_else(bad)?;
    let at = |i: u32| {
        pair.get(i)
            .as_f64()
            .filter(|v| *v >= 0.0 && v.fract() == 0.0)
            .map(|v| v as usize)
            .ok_or_else(bad)
    };
    let (start, end) = (at(0)?, at(1)?);
    if start >= end || end > n {
        return Err(bad());
    }
    Ok(Some(start..end))
}

impl Parsed {
    /// Images this call computes: its `imageRange`, or all `n`.
    fn count(&self) -> usize {
        self.generate
            .part
            .as_ref()
            .map_or(self.generate.n, |part| part.len())
    }
}

fn cancelled(signal: &Option<JsValue>) -> bool {
    signal.as_ref().is_some_and(|s| {
        Reflect::get(s, &"aborted".into())
            .ok()
            .and_then(|a| a.as_bool())
            .unwrap_or(false)
    })
}

fn sampler_for(
    inner: &Inner,
    p: &Parsed,
) -> Result<Box<dyn ddpm::sampler::Sampler + Send>, JsValue> {
    let info = &inner.info;
    let schedule = NoiseSchedule::new(&info.schedule).map_err(js_err)?;
    let sampler_options = SamplerOptions {
        eta: p.eta,
        timestep_spacing: p.spacing,
        ..SamplerOptions::default()
    }
    .for_model(info)
    .guided(p.generate.guidance);
    build_sampler(
        p.kind,
        &schedule,
        info.prediction,
        p.steps,
        &sampler_options,
    )
    .map_err(js_err)
}

async fn sample(inner: &Inner, options: JsValue) -> Result<Object, JsValue> {
    let p = parse(inner, &options, 16)?;
    let sampler = sampler_for(inner, &p)?;
    let generation = Generation::new(
        &inner.model,
        &inner.info,
        sampler,
        &p.generate,
        &inner.device,
    )
    .map_err(js_err)?;
    drive(inner, generation, &p, None).await
}

/// An RGBA picture handed in from JavaScript.
struct Picture {
    rgba: Vec<u8>,
    width: usize,
    height: usize,
}

/// Read `value` (an ImageData or `{ width, height, data }`; `what` names it in errors), checked
/// from its width and height before its pixels are copied.
fn read_picture(value: &JsValue, what: &str) -> Result<Picture, JsValue> {
    let side = |name: &str| -> Result<usize, JsValue> {
        Reflect::get(value, &name.into())?
            .as_f64()
            .filter(|v| *v >= 0.0 && v.fract() == 0.0)
            .map(|v| v as usize)
            .ok_or_else(|| js_err(format!("`{what}.{name}` must be a whole number of pixels")))
    };
    let (width, height) = (side("width")?, side("height")?);
    edit::check_image_size(width, height).map_err(|e| js_err(format!("`{what}`: {e}")))?;
    let data = Reflect::get(value, &"data".into())?;
    let rgba = if data.is_instance_of::<Uint8ClampedArray>() {
        Uint8ClampedArray::from(data).to_vec()
    } else if data.is_instance_of::<Uint8Array>() {
        Uint8Array::from(data).to_vec()
    } else {
        return Err(js_err(format!(
            "`{what}.data` must be a Uint8ClampedArray of RGBA bytes"
        )));
    };
    Ok(Picture {
        rgba,
        width,
        height,
    })
}

/// The option `key`, which must be given, read as a picture.
fn picture_option(options: &JsValue, key: &str) -> Result<Picture, JsValue> {
    let value = get(options, key)?.ok_or_else(|| {
        js_err(format!(
            "option `{key}` is missing: give an ImageData (or {{ width, height, data }})"
        ))
    })?;
    read_picture(&value, key)
}

/// `picture` fitted to the model's size and channels.
fn fit(inner: &Inner, picture: &Picture, what: &str) -> Result<FittedImage, JsValue> {
    let unet = &inner.info.unet;
    edit::fit_image(
        &picture.rgba,
        picture.width,
        picture.height,
        unet.sample_size,
        unet.in_channels,
    )
    .map_err(|e| js_err(format!("`{what}`: {e}")))
}

fn number_or(options: &JsValue, key: &str, default: f64) -> Result<f64, JsValue> {
    Ok(get_number(options, key)?.unwrap_or(default))
}

async fn img2img(inner: &Inner, options: JsValue) -> Result<Object, JsValue> {
    let p = parse(inner, &options, 1)?;
    let strength = number_or(&options, "strength", 0.6)?;
    edit::img2img_start(p.steps, strength).map_err(js_err)?;
    let fitted = fit(inner, &picture_option(&options, "image")?, "image")?;
    let image = edit::image_tensor(fitted.values, inner.info.unet.in_channels, &inner.device);
    let sampler = sampler_for(inner, &p)?;
    let generation = Generation::img2img(
        &inner.model,
        &inner.info,
        sampler,
        &p.generate,
        image,
        strength,
        &inner.device,
    )
    .map_err(js_err)?;
    drive(inner, generation, &p, fitted.note).await
}

async fn inpaint(inner: &Inner, options: JsValue) -> Result<Object, JsValue> {
    let p = parse(inner, &options, 1)?;
    let info = &inner.info;
    let schedule = NoiseSchedule::new(&info.schedule).map_err(js_err)?;
    let repaint_options = RePaintOptions {
        steps: p.steps,
        jump_length: get_count(&options, "jump", 5)?,
        jump_n_sample: get_count(&options, "resample", 5)?,
        eta: p.eta,
        clip_sample: true,
    };
    let repaint = RePaint::new(&schedule, info.prediction, &repaint_options).map_err(js_err)?;
    let picture = picture_option(&options, "image")?;
    let fitted = fit(inner, &picture, "image")?;
    let mask = picture_option(&options, "mask")?;
    let mask = edit::fit_mask(
        &mask.rgba,
        mask.width,
        mask.height,
        (picture.width, picture.height),
        info.unet.sample_size,
    )
    .map_err(js_err)?;
    let image = edit::image_tensor(fitted.values, info.unet.in_channels, &inner.device);
    let mut notes: Vec<String> = fitted.note.into_iter().collect();
    match mask.cover {
        MaskCover::Nothing => {
            notes
                .push("the mask has nothing to regenerate: the image is returned unchanged".into());
            let images = image.repeat_dim(0, p.count());
            let values = read_back(&images).await?;
            let note = Some(notes.join("; "));
            return Ok(result(inner, &values, p.count(), 0.0, note));
        }
        MaskCover::Everything => notes.push(
            "the mask covers the whole image: nothing is kept, this is plain sampling".into(),
        ),
        MaskCover::Part => {}
    }
    let mask = edit::image_tensor(mask.values, 1, &inner.device);
    let generation = Generation::inpaint(
        &inner.model,
        info,
        repaint,
        &p.generate,
        image,
        mask,
        &inner.device,
    )
    .map_err(js_err)?;
    let note = (!notes.is_empty()).then(|| notes.join("; "));
    drive(inner, generation, &p, note).await
}

async fn interpolate(inner: &Inner, options: JsValue) -> Result<Object, JsValue> {
    let p = parse(inner, &options, 8)?;
    let seeds = get(&options, "seeds")?
        .filter(Array::is_array)
        .map(|value| Array::from(&value))
        .filter(|a| a.length() == 2)
        .ok_or_else(|| js_err("option `seeds` must be two seeds, e.g. [3, 7]"))?;
    let seed = |i: u32| {
        seeds
            .get(i)
            .as_f64()
            .filter(|v| *v >= 0.0 && v.fract() == 0.0)
            .map(|v| v as u64)
            .ok_or_else(|| js_err("option `seeds` must hold two whole numbers ≥ 0"))
    };
    let sampler = sampler_for(inner, &p)?;
    let generation = Generation::interpolate(
        &inner.model,
        &inner.info,
        sampler,
        &p.generate,
        (seed(0)?, seed(1)?),
        &inner.device,
    )
    .map_err(js_err)?;
    drive(inner, generation, &p, None).await
}

/// Run a generation step by step: previews through `onStep`, a yield to the event loop after
/// every step, cancellation; resolves to the final images.
async fn drive(
    inner: &Inner,
    mut generation: Generation<'_>,
    p: &Parsed,
    note: Option<String>,
) -> Result<Object, JsValue> {
    let info = &inner.info;
    let total = generation.total_steps();
    let (s, c) = (info.unet.sample_size, info.unet.in_channels);
    let shape = [p.count(), c, s, s];
    let start = now_ms();
    while generation.step() {
        let done = generation.steps_done();
        if let Some(callback) = &p.on_step
            && (done.is_multiple_of(p.every) || done == total)
        {
            let values = read_back(generation.sample()).await?;
            let progress = Object::new();
            set(&progress, "step", done as f64);
            set(&progress, "total", total as f64);
            set(&progress, "msPerStep", (now_ms() - start) / done as f64);
            set(&progress, "n", p.count() as f64);
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
    Ok(result(inner, &values, p.count(), ms_per_step, note))
}

/// The object a run resolves to (`Samples` in the TypeScript types).
fn result(
    inner: &Inner,
    values: &[f32],
    n: usize,
    ms_per_step: f64,
    note: Option<String>,
) -> Object {
    let info = &inner.info;
    let (s, c) = (info.unet.sample_size, info.unet.in_channels);
    let out = Object::new();
    set(&out, "n", n as f64);
    set(&out, "size", s as f64);
    set(&out, "channels", c as f64);
    set(&out, "rgba", rgba_array(values, [n, c, s, s]));
    set(&out, "pixels", Float32Array::from(values));
    set(&out, "msPerStep", ms_per_step);
    set(&out, "backend", inner.backend);
    if let Some(note) = note {
        set(&out, "note", note);
    }
    out
}
