//! Helpers shared by the cross-crate tests: where the fixtures are and how to read them.

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Read a fixture file, panicking with its path if it is missing.
pub fn read_fixture(rel: &str) -> Vec<u8> {
    let path = fixture(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A tensor from a safetensors file as f32 values (F32 or I64 storage) and its shape.
pub fn named_values(bytes: &[u8], name: &str) -> (Vec<f32>, Vec<usize>) {
    let file = SafeTensors::deserialize(bytes).expect("valid safetensors");
    let view = file
        .tensor(name)
        .unwrap_or_else(|_| panic!("no tensor {name}"));
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    (values, view.shape().to_vec())
}

/// A float tensor of rank `D` from a safetensors file.
pub fn tensor<const D: usize>(bytes: &[u8], name: &str, device: &Device) -> Tensor<D> {
    let (values, shape) = named_values(bytes, name);
    let shape: [usize; D] = shape.try_into().expect("rank");
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// An int tensor of rank 1 from a safetensors file.
pub fn int_tensor(bytes: &[u8], name: &str, device: &Device) -> Tensor<1, Int> {
    let (values, shape) = named_values(bytes, name);
    let values: Vec<i64> = values.into_iter().map(|v| v as i64).collect();
    Tensor::from_data(TensorData::new(values, [shape[0]]), device)
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a: Vec<f32> = a
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    let b: Vec<f32> = b
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
