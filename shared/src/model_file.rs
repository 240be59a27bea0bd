//! The model file: one safetensors file holding the UNet weights under diffusers' parameter
//! names and layouts (so `UNet2DModel.load_state_dict` reads it too), with a `__metadata__`
//! entry that describes everything needed to rebuild and sample the model:
//!
//! ```text
//! __metadata__ = { "format": "ddpm-rs", "version": "1", "model": "<ModelInfo as JSON>" }
//! ```
//!
//! Files load from `&[u8]` (the browser has no file system). Every malformed input is a typed
//! [`Error`]; nothing panics, and nothing is allocated beyond what the bytes themselves justify:
//! the architecture named by the metadata must have all its weights present in the file, so its
//! parameter count is checked against the file length before a single parameter is created.

use std::collections::{BTreeMap, HashMap, HashSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::diffusion::PredictionType;
use crate::error::{Error, Result};
use crate::sampler::TimestepSpacing;
use crate::schedule::ScheduleConfig;
use crate::unet::{UNet, UNetConfig};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "ddpm-rs";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;

/// Everything about a model except its weights: stored as JSON in the file's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The UNet architecture.
    pub unet: UNetConfig,
    /// The noise schedule the model was trained with.
    pub schedule: ScheduleConfig,
    /// What the UNet predicts.
    #[serde(default)]
    pub prediction: PredictionType,
    /// Names of the classes of a class-conditional model (index = label). When the model was
    /// trained for classifier-free guidance, `unet.num_class_embeds == class_names.len() + 1`
    /// and the last embedding is the "no class" label.
    #[serde(default)]
    pub class_names: Vec<String>,
    /// Free-form facts about training (data set, steps, seed, time, hardware ...).
    #[serde(default)]
    pub training: BTreeMap<String, serde_json::Value>,
    /// The timestep spacing the model samples with when the caller chooses none, for every
    /// sampler: diffusers' `timestep_spacing` in the model's `scheduler_config.json`. `None`
    /// leaves each sampler its own diffusers default (see [`SamplerOptions::for_model`]).
    ///
    /// [`SamplerOptions::for_model`]: crate::sampler::SamplerOptions::for_model
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
}

impl ModelInfo {
    /// A description of an untrained model with the default schedule and ε-prediction.
    pub fn new(unet: UNetConfig) -> Self {
        Self {
            unet,
            schedule: ScheduleConfig::default(),
            prediction: PredictionType::default(),
            class_names: Vec::new(),
            training: BTreeMap::new(),
            timestep_spacing: None,
        }
    }

    /// Number of real classes of a class-conditional model (0 for an unconditional one): the
    /// named classes, or every class embedding when the file names none.
    pub fn num_classes(&self) -> usize {
        if self.class_names.is_empty() {
            self.unet.num_class_embeds.unwrap_or(0)
        } else {
            self.class_names.len()
        }
    }

    /// The label that means "no class" for classifier-free guidance, if the model has one.
    pub fn null_class(&self) -> Option<usize> {
        let n = self.unet.num_class_embeds?;
        (!self.class_names.is_empty() && n == self.class_names.len() + 1).then_some(n - 1)
    }
}

/// Precision of the stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreDType {
    /// 32-bit floats: a bit-exact round trip.
    #[default]
    F32,
    /// 16-bit floats: half the size, for the web.
    F16,
}

/// One parameter the model expects: its file name and its shape in the file (PyTorch layout:
/// burn's `Linear` stores `[in, out]`, the file `[out, in]`).
#[derive(Debug, Clone)]
struct ParamSlot {
    name: String,
    file_shape: Vec<usize>,
}

/// Tracks the module path while burn walks a module, and maps it to diffusers' names.
#[derive(Debug, Default)]
struct PathTracker {
    path: Vec<String>,
    parent: Vec<String>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, container: &str) {
        self.path.push(name.to_string());
        self.parent.push(container.to_string());
    }

    fn exit(&mut self) {
        self.path.pop();
        self.parent.pop();
    }

    /// File name and whether the tensor is stored transposed, for the current parameter.
    fn slot(&self) -> (String, bool) {
        let owner = self.parent.last().map(String::as_str).unwrap_or_default();
        let mut path = self.path.clone();
        let mut transposed = false;
        if let Some(last) = path.last_mut() {
            match (owner, last.as_str()) {
                ("Struct:GroupNorm", "gamma") => *last = "weight".into(),
                ("Struct:GroupNorm", "beta") => *last = "bias".into(),
                ("Struct:Linear", "weight") => transposed = true,
                _ => {}
            }
        }
        (path.join("."), transposed)
    }
}

/// Lists the parameters of a module without initialising them.
#[derive(Debug, Default)]
struct SlotCollector {
    tracker: PathTracker,
    slots: Vec<ParamSlot>,
}

impl ModuleVisitor for SlotCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (name, transposed) = self.tracker.slot();
        let mut file_shape = param.lazy_shape().dims::<D>().to_vec();
        if transposed {
            file_shape.reverse();
        }
        self.slots.push(ParamSlot { name, file_shape });
    }
}

fn slots(model: &UNet) -> Vec<ParamSlot> {
    let mut collector = SlotCollector::default();
    model.visit(&mut collector);
    collector.slots
}

/// Number of scalar parameters of a model, without initialising it.
pub fn num_params(model: &UNet) -> usize {
    slots(model)
        .iter()
        .map(|s| s.file_shape.iter().product::<usize>())
        .sum()
}

/// Replaces every parameter with the tensor of the same name from a safetensors file.
struct WeightLoader<'a> {
    tracker: PathTracker,
    tensors: &'a HashMap<String, TensorView<'a>>,
    device: Device,
    error: Option<Error>,
}

impl WeightLoader<'_> {
    fn read<const D: usize>(&self, name: &str, transposed: bool) -> Result<Tensor<D>> {
        let view = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.into()))?;
        let values = to_f32(name, view)?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::NonFinite {
                name: name.into(),
                count: bad,
            });
        }
        let shape: [usize; D] = view.shape().try_into().map_err(|_| Error::TensorShape {
            name: name.into(),
            found: view.shape().to_vec(),
            expected: vec![],
        })?;
        let tensor = Tensor::<D>::from_data(TensorData::new(values, shape), &self.device);
        Ok(if transposed {
            tensor.transpose()
        } else {
            tensor
        })
    }
}

impl ModuleMapper for WeightLoader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let (name, transposed) = self.tracker.slot();
        match self.read::<D>(&name, transposed) {
            Ok(tensor) => {
                let id = param.id;
                param.transform_for_load(tensor, id)
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}

fn to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::TensorDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(values)
}

fn parse(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors(e.to_string()))
}

/// Rename keys of older diffusers checkpoints (the deprecated `AttentionBlock` naming:
/// `query`/`key`/`value`/`proj_attn`) to the current `Attention` names.
fn modern_name(name: &str) -> String {
    const RENAMES: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    for (old, new) in RENAMES {
        if name.contains(".attentions.") && name.contains(old) {
            return name.replacen(old, new, 1);
        }
    }
    name.to_string()
}

/// Load weights named as diffusers names them into a freshly built model, checking that every
/// parameter is present with the right shape and finite values and that nothing is left over.
pub fn load_weights(config: &UNetConfig, weights: &[u8], device: &Device) -> Result<UNet> {
    let file = parse(weights)?;
    let model = config.init(device)?;
    let expected = slots(&model);
    let needed: usize = expected
        .iter()
        .map(|s| s.file_shape.iter().product::<usize>())
        .sum();
    // Two bytes per parameter is the smallest storage accepted (f16/bf16): a config that needs
    // more weights than the file could hold is refused before anything is allocated.
    if needed.saturating_mul(2) > weights.len() {
        return Err(Error::InvalidConfig(format!(
            "the config needs {needed} parameters but the file holds only {} bytes",
            weights.len()
        )));
    }
    let tensors: HashMap<String, TensorView<'_>> = file
        .iter()
        .map(|(name, view)| (modern_name(name), view))
        .collect();
    for slot in &expected {
        let view = tensors
            .get(&slot.name)
            .ok_or_else(|| Error::MissingTensor(slot.name.clone()))?;
        if view.shape() != slot.file_shape.as_slice() {
            return Err(Error::TensorShape {
                name: slot.name.clone(),
                found: view.shape().to_vec(),
                expected: slot.file_shape.clone(),
            });
        }
    }
    let known: HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(Error::UnexpectedTensors(unexpected));
    }
    let mut loader = WeightLoader {
        tracker: PathTracker::default(),
        tensors: &tensors,
        device: device.clone(),
        error: None,
    };
    let model = model.map(&mut loader);
    match loader.error {
        Some(e) => Err(e),
        None => Ok(model),
    }
}

/// Read only the description of a model file.
pub fn read_info(bytes: &[u8]) -> Result<ModelInfo> {
    let (_, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors(e.to_string()))?;
    let meta = metadata.metadata().as_ref().ok_or_else(|| {
        Error::Metadata("no __metadata__: not a ddpm-rs model file (a diffusers checkpoint needs `ddpm import`)".into())
    })?;
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        Some(f) => {
            return Err(Error::Metadata(format!(
                "format is {f:?}, expected {FORMAT:?}"
            )));
        }
        None => {
            return Err(Error::Metadata(
                "no \"format\" key: not a ddpm-rs model file".into(),
            ));
        }
    }
    let version = meta
        .get("version")
        .ok_or_else(|| Error::Metadata("no \"version\" key".into()))?;
    if version.parse::<u32>() != Ok(VERSION) {
        return Err(Error::UnsupportedVersion {
            found: version.clone(),
            supported: VERSION,
        });
    }
    let model = meta
        .get("model")
        .ok_or_else(|| Error::Metadata("no \"model\" key".into()))?;
    let info: ModelInfo = serde_json::from_str(model)
        .map_err(|e| Error::Metadata(format!("\"model\" is not a valid description: {e}")))?;
    info.unet.validate()?;
    Ok(info)
}

/// Load a model file: its description and the UNet on `device`.
pub fn load(bytes: &[u8], device: &Device) -> Result<(UNet, ModelInfo)> {
    let info = read_info(bytes)?;
    let model = load_weights(&info.unet, bytes, device)?;
    Ok((model, info))
}

/// Collects parameter values for saving (reads tensors back to the host: native backends only).
struct WeightCollector {
    tracker: PathTracker,
    dtype: StoreDType,
    tensors: Vec<(String, OwnedTensor)>,
}

/// A tensor ready for safetensors serialisation.
#[derive(Debug)]
struct OwnedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl ModuleVisitor for WeightCollector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.tracker.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.tracker.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (name, transposed) = self.tracker.slot();
        let mut tensor = param.val();
        if transposed {
            tensor = tensor.transpose();
        }
        let shape = tensor.dims().to_vec();
        let values: Vec<f32> = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("converted to f32");
        let (dtype, data) = match self.dtype {
            StoreDType::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            StoreDType::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        };
        self.tensors
            .push((name, OwnedTensor { dtype, shape, data }));
    }
}

/// Serialise a model and its description. Reads the weights back to the host, so it is for
/// native backends (the trainer), not WebGPU.
pub fn save(model: &UNet, info: &ModelInfo, dtype: StoreDType) -> Result<Vec<u8>> {
    let mut collector = WeightCollector {
        tracker: PathTracker::default(),
        dtype,
        tensors: Vec::new(),
    };
    model.visit(&mut collector);
    let description = serde_json::to_string(info)
        .map_err(|e| Error::Metadata(format!("cannot describe the model: {e}")))?;
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), VERSION.to_string()),
        ("model".to_string(), description),
    ]);
    let tensors: Vec<(&str, &OwnedTensor)> = collector
        .tensors
        .iter()
        .map(|(name, t)| (name.as_str(), t))
        .collect();
    let bytes = safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| Error::Safetensors(e.to_string()))?;
    canonical_header(bytes)
}

/// Rewrite the JSON header with its keys sorted, so that the same model always gives the same
/// bytes (the safetensors crate writes metadata in hash-map order). Tensor offsets are relative
/// to the end of the header, so the data section is kept as it is.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |e: &dyn std::fmt::Display| Error::Safetensors(e.to_string());
    let n = u64::from_le_bytes(bytes[..8].try_into().map_err(|e| bad(&e))?) as usize;
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(&e))?;
    fn sort(value: &mut serde_json::Value) {
        if let serde_json::Value::Object(map) = value {
            map.sort_keys();
            map.values_mut().for_each(sort);
        }
    }
    sort(&mut header);
    let mut text = serde_json::to_vec(&header).map_err(|e| bad(&e))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Import a diffusers `UNet2DModel` (its `config.json`, `diffusion_pytorch_model.safetensors`
/// and, when present, the pipeline's `scheduler_config.json`) as a model and its description.
pub fn import_diffusers(
    config_json: &str,
    scheduler_json: Option<&str>,
    weights: &[u8],
    device: &Device,
) -> Result<(UNet, ModelInfo)> {
    let unet = UNetConfig::from_diffusers_json(config_json)?;
    let mut info = ModelInfo::new(unet);
    if let Some(text) = scheduler_json {
        let json_err = |e: serde_json::Error| Error::Json {
            file: "scheduler_config.json".into(),
            message: e.to_string(),
        };
        info.schedule = serde_json::from_str(text).map_err(json_err)?;
        let value: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
        if let Some(p) = value.get("prediction_type") {
            info.prediction = serde_json::from_value(p.clone()).map_err(json_err)?;
        }
        if let Some(s) = value.get("timestep_spacing") {
            info.timestep_spacing = serde_json::from_value(s.clone()).map_err(json_err)?;
        }
    }
    info.training
        .insert("source".into(), serde_json::json!("diffusers import"));
    let model = load_weights(&info.unet, weights, device)?;
    Ok((model, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::{DownBlockType, UpBlockType};

    fn tiny_config() -> UNetConfig {
        UNetConfig {
            sample_size: 8,
            in_channels: 1,
            out_channels: 1,
            down_block_types: vec![DownBlockType::DownBlock2D, DownBlockType::AttnDownBlock2D],
            up_block_types: vec![UpBlockType::AttnUpBlock2D, UpBlockType::UpBlock2D],
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            attention_head_dim: Some(8),
            norm_num_groups: Some(4),
            num_class_embeds: Some(3),
            ..UNetConfig::default()
        }
    }

    fn tiny_file(dtype: StoreDType) -> (UNet, ModelInfo, Vec<u8>) {
        let device = Device::flex();
        let mut info = ModelInfo::new(tiny_config());
        info.class_names = vec!["a".into(), "b".into()];
        let model = info.unet.init(&device).unwrap();
        let bytes = save(&model, &info, dtype).unwrap();
        (model, info, bytes)
    }

    /// Rewrite a valid file: `edit` may change the metadata and the list of tensors.
    fn rewrite(
        bytes: &[u8],
        edit: impl FnOnce(&mut HashMap<String, String>, &mut Vec<(String, OwnedTensor)>),
    ) -> Vec<u8> {
        let file = SafeTensors::deserialize(bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
        let mut meta = meta.metadata().clone().unwrap();
        let mut tensors: Vec<(String, OwnedTensor)> = file
            .iter()
            .map(|(name, v)| {
                let t = OwnedTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                };
                (name.to_string(), t)
            })
            .collect();
        edit(&mut meta, &mut tensors);
        let refs: Vec<(&str, &OwnedTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize(refs, Some(meta)).unwrap()
    }

    fn load_err(bytes: &[u8]) -> Error {
        match load(bytes, &Device::flex()) {
            Ok(_) => panic!("a bad file loaded"),
            Err(e) => e,
        }
    }

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let (_, info, bytes) = tiny_file(StoreDType::F32);
        let (model, info2) = load(&bytes, &Device::flex()).unwrap();
        assert_eq!(info, info2);
        assert_eq!(info2.null_class(), Some(2));
        let again = save(&model, &info2, StoreDType::F32).unwrap();
        assert_eq!(bytes, again);
    }

    #[test]
    fn f16_round_trip_is_within_half_precision() {
        let (model, info, bytes32) = tiny_file(StoreDType::F32);
        let bytes16 = save(&model, &info, StoreDType::F16).unwrap();
        assert!(bytes16.len() < bytes32.len() * 6 / 10);
        let (reloaded, _) = load(&bytes16, &Device::flex()).unwrap();
        let back = save(&reloaded, &info, StoreDType::F32).unwrap();
        let (a, b) = (
            SafeTensors::deserialize(&bytes32).unwrap(),
            SafeTensors::deserialize(&back).unwrap(),
        );
        let mut checked = 0;
        for (name, view) in a.iter() {
            let x = to_f32(name, &view).unwrap();
            let y = to_f32(name, &b.tensor(name).unwrap()).unwrap();
            for (u, v) in x.iter().zip(&y) {
                // f16 keeps 11 significant bits: relative error ≤ 2^-11 (normal range).
                assert!(
                    (u - v).abs() <= u.abs() * 4.9e-4 + 6e-8,
                    "{name}: {u} vs {v}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, num_params(&model));
    }

    /// A model's timestep spacing survives its file; a file that names none (every file written
    /// before the field existed) reads as none; `import_diffusers` takes it from the scheduler
    /// config, as diffusers' pipelines do, and names that file when the value is unknown.
    #[test]
    fn timestep_spacing_is_stored_and_imported() {
        let (model, mut info, bytes) = tiny_file(StoreDType::F32);
        assert_eq!(read_info(&bytes).unwrap().timestep_spacing, None);
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert!(!meta.metadata().as_ref().unwrap()["model"].contains("timestep_spacing"));
        info.timestep_spacing = Some(TimestepSpacing::Trailing);
        let with = save(&model, &info, StoreDType::F32).unwrap();
        assert_eq!(read_info(&with).unwrap(), info);

        let config = serde_json::to_string(&info.unet).unwrap();
        let import = |scheduler: &str| {
            import_diffusers(&config, Some(scheduler), &bytes, &Device::flex()).map(|(_, i)| i)
        };
        let imported = import(r#"{"num_train_timesteps": 1000, "timestep_spacing": "linspace"}"#);
        assert_eq!(
            imported.unwrap().timestep_spacing,
            Some(TimestepSpacing::Linspace)
        );
        assert_eq!(import("{}").unwrap().timestep_spacing, None);
        let err = import(r#"{"timestep_spacing": "middle"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("middle"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        for len in [0, 5, 8, 100, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                matches!(load_err(&bytes[..len]), Error::Safetensors(_)),
                "len {len}"
            );
        }
    }

    #[test]
    fn oversized_or_wrong_header_length() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        for n in [u64::MAX, 1 << 40, bytes.len() as u64] {
            let mut bad = bytes.clone();
            bad[..8].copy_from_slice(&n.to_le_bytes());
            let e = load_err(&bad);
            assert!(matches!(e, Error::Safetensors(_)), "{n}: {e}");
        }
    }

    #[test]
    fn header_that_is_not_json() {
        let mut bad = 16u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"this is not json");
        assert!(matches!(load_err(&bad), Error::Safetensors(_)));
    }

    #[test]
    fn file_without_our_metadata() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |meta, _| {
            meta.remove("format");
        });
        assert!(matches!(load_err(&bad), Error::Metadata(_)));
        let bad = rewrite(&bytes, |meta, _| {
            meta.insert("model".into(), "{\"unet\": 3}".into());
        });
        assert!(matches!(load_err(&bad), Error::Metadata(_)));
    }

    #[test]
    fn unknown_format_version() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |meta, _| {
            meta.insert("version".into(), "2".into());
        });
        let e = load_err(&bad);
        assert!(matches!(e, Error::UnsupportedVersion { .. }), "{e}");
        assert!(e.to_string().contains("version 2"));
    }

    #[test]
    fn missing_tensor() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |_, tensors| {
            tensors.retain(|(n, _)| n != "mid_block.attentions.0.to_q.weight");
        });
        match load_err(&bad) {
            Error::MissingTensor(n) => assert_eq!(n, "mid_block.attentions.0.to_q.weight"),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn tensor_of_the_wrong_shape() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |_, tensors| {
            let (_, t) = tensors
                .iter_mut()
                .find(|(n, _)| n == "conv_in.bias")
                .unwrap();
            t.shape = vec![2, 4];
        });
        match load_err(&bad) {
            Error::TensorShape {
                name,
                found,
                expected,
            } => {
                assert_eq!(name, "conv_in.bias");
                assert_eq!((found, expected), (vec![2, 4], vec![8]));
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn tensor_of_the_wrong_dtype() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |_, tensors| {
            let (_, t) = tensors
                .iter_mut()
                .find(|(n, _)| n == "conv_in.bias")
                .unwrap();
            t.dtype = Dtype::I32;
        });
        assert!(matches!(load_err(&bad), Error::TensorDtype { .. }));
    }

    #[test]
    fn non_finite_weights() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        for value in [f32::NAN, f32::INFINITY] {
            let bad = rewrite(&bytes, |_, tensors| {
                let (_, t) = tensors
                    .iter_mut()
                    .find(|(n, _)| n == "up_blocks.0.resnets.1.conv2.weight")
                    .unwrap();
                t.data[4..8].copy_from_slice(&value.to_le_bytes());
            });
            match load_err(&bad) {
                Error::NonFinite { name, count } => {
                    assert_eq!(
                        (name.as_str(), count),
                        ("up_blocks.0.resnets.1.conv2.weight", 1)
                    )
                }
                e => panic!("{e}"),
            }
        }
    }

    #[test]
    fn extra_tensor() {
        let (_, _, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |_, tensors| {
            let extra = OwnedTensor {
                dtype: Dtype::F32,
                shape: vec![1],
                data: vec![0; 4],
            };
            tensors.push(("decoder.weight".into(), extra));
        });
        assert!(matches!(load_err(&bad), Error::UnexpectedTensors(_)));
    }

    #[test]
    fn config_whose_groups_do_not_divide_channels() {
        let (_, info, bytes) = tiny_file(StoreDType::F32);
        let bad = rewrite(&bytes, |meta, _| {
            let mut info = info.clone();
            info.unet.norm_num_groups = Some(3);
            meta.insert("model".into(), serde_json::to_string(&info).unwrap());
        });
        let e = load_err(&bad);
        assert!(e.to_string().contains("num_groups (3) must divide"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_refused_before_allocating() {
        let (_, info, bytes) = tiny_file(StoreDType::F32);
        // ~7e11 parameters (2.8 TB): refused from the file length alone.
        let bad = rewrite(&bytes, |meta, _| {
            let mut info = info.clone();
            info.unet.block_out_channels = vec![65_536, 65_536];
            info.unet.norm_num_groups = Some(32);
            info.unet.attention_head_dim = Some(64);
            meta.insert("model".into(), serde_json::to_string(&info).unwrap());
        });
        let e = load_err(&bad);
        assert!(
            matches!(e, Error::InvalidConfig(ref m) if m.contains("parameters but the file holds only")),
            "{e}"
        );
    }

    #[test]
    fn old_diffusers_attention_names_are_renamed() {
        assert_eq!(
            modern_name("mid_block.attentions.0.proj_attn.weight"),
            "mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            modern_name("down_blocks.1.attentions.0.query.bias"),
            "down_blocks.1.attentions.0.to_q.bias"
        );
        assert_eq!(modern_name("conv_in.weight"), "conv_in.weight");
    }
}
