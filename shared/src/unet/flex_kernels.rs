//! The UNet's heavy ops on burn's CPU backend (flex), forward and backward, as a burn backend
//! extension for `Flex` and `Autodiff<Flex>`: each op here has a hand-written backward step.
//!
//! - Convolution, 3×3 (any stride and padding) and 1×1 ([`conv`]): per image, the patches as
//!   im2col columns in a cache-sized buffer, then one GEMM ([`gemm`]) that writes the image's
//!   output straight into the batch tensor, then adds the bias while it is in cache. The weight
//!   gradient is `grad · patch rows` summed over the batch in place; the input gradient is the
//!   same convolution of the output gradient with the kernel turned by 180°. flex's own conv first
//!   transposes the input to NHWC on one thread, and its backward scatters through
//!   `conv_transpose`.
//! - GroupNorm: one parallel pass per (image, group) block each way. burn's `GroupNorm` takes six
//!   element-wise passes forward and differentiates through all of them.
//! - SiLU: flex runs `sigmoid` as a scalar loop over `expf` on the calling thread, then a second
//!   pass for the product, and its autodiff keeps both `x` and `sigmoid(x)`. Here one pass
//!   computes `x / (1 + e^-x)` with a polynomial `exp` that the compiler vectorises (pulp picks
//!   AVX2/AVX-512 at run time), large tensors are split across rayon's threads, and the backward
//!   pass keeps only `x`. Measured in isolation by `ddpm bench --phases silu`.
//! - Multi-head attention ([`attention`]): per image and head, `q kᵀ`, the softmax and `· v` with
//!   the score matrix in cache, reading and writing heads as strided column blocks of the
//!   projections. burn's path splits heads with copies, writes every score matrix of the batch
//!   out between the matmuls, scaling and softmax, and under autodiff decomposes the softmax into
//!   five passes with their own backward steps. The backward pass here recomputes the weights
//!   from each row's log-sum-exp rather than keeping them.
//!
//! Only float32 tensors on the flex device come here ([`super::conv_forward`], [`super::silu`],
//! [`super::multi_head_attention`] and the UNet's GroupNorm check); every other backend and dtype keeps
//! burn's own ops. Each op is tested against burn's, forward and every gradient.

// Without feature `flex-kernels` (the wasm module) the backward kernels go unused.
#![cfg_attr(not(feature = "flex-kernels"), allow(dead_code))]

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, backend_extension};
use burn::tensor::TensorData;
use std::ops::Range;

use output::{Writer, build};

/// Declares a loop kernel compiled for the best SIMD level the CPU has (AVX2 or AVX-512 on x86,
/// picked at run time by pulp): `struct Name { args } -> Output { body }` becomes a struct that
/// implements `pulp::WithSimd` with the body inlined into pulp's target-feature function, run
/// with `pulp::Arch::new().dispatch(Name { .. })`. A closure handed to `dispatch` may instead
/// stay out of line, compiled for the baseline target, where its loops run on 128-bit registers
/// (measured: the GroupNorm and attention loops first ran that way). Bodies use plain loops, so
/// that nothing in them is left to a closure.
macro_rules! simd_kernel {
    (
        $(#[$attr:meta])*
        struct $name:ident<$($lt:lifetime),+> { $($field:ident: $ty:ty),* $(,)? } -> $ret:ty $body:block
    ) => {
        $(#[$attr])*
        struct $name<$($lt),+> {
            $($field: $ty),*
        }

        impl<$($lt),+> pulp::WithSimd for $name<$($lt),+> {
            type Output = $ret;

            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) -> $ret {
                let Self { $($field),* } = self;
                $body
            }
        }
    };
}

mod attention;
#[cfg(feature = "flex-kernels")]
mod backward;
mod conv;
mod gemm;
mod output;
#[cfg(any(test, all(target_arch = "wasm32", target_feature = "relaxed-simd")))]
mod relaxed_gemm;

pub use gemm::matmul_flops;

/// The fused operations as a backend extension: flex has the kernels, `Autodiff<Flex>` adds
/// their backward passes (`backward`, with feature `flex-kernels`; the wasm module takes
/// `flex-kernels-forward`, which has no autodiff).
#[backend_extension(Flex, Autodiff: cfg(feature = "flex-kernels"))]
pub trait FlexKernels: Backend {
    /// `x · sigmoid(x)`, element-wise.
    fn flex_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Multi-head scaled dot-product attention, `softmax(q kᵀ / √d) v` per head: `q`, `k`, `v`
    /// and the output are `[batch, len, heads · d]`.
    fn flex_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
    /// Convolution with bias, 1×1 (stride 1, no padding) or 3×3 with any stride and padding:
    /// `x` `[b, c_in, h, w]`, `weight` `[c_out, c_in, k, k]`, `bias` `[c_out]`.
    fn flex_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        spec: ConvSpec,
    ) -> FloatTensor<Self>;
    /// GroupNorm with a per-channel scale `gamma` and shift `beta` (`[c]`) over `x`
    /// `[b, c, h, w]`, followed by SiLU in the same pass when `silu` is set.
    fn flex_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        norm: GroupNormSpec,
    ) -> FloatTensor<Self>;
}

impl FlexKernels for Flex {
    fn flex_silu(x: FlexTensor) -> FlexTensor {
        silu_forward(&x)
    }

    fn flex_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, heads: usize) -> FlexTensor {
        attention::attention_forward(&q, &k, &v, heads).0
    }

    fn flex_conv(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        spec: ConvSpec,
    ) -> FlexTensor {
        conv::conv_forward(&x, &weight, Some(&bias), spec)
    }

    fn flex_group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        norm: GroupNormSpec,
    ) -> FlexTensor {
        group_norm_forward(&x, &gamma, &beta, norm).0
    }
}

/// A convolution's stride (the same along both axes) and padding, `[top, left, bottom, right]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    /// Step between output pixels, in input pixels.
    pub stride: usize,
    /// Zero rows and columns around the input: top, left, bottom, right.
    pub padding: [usize; 4],
}

impl ConvSpec {
    /// Whether a `kernel`-sided convolution keeps the image size (stride 1, padding `k / 2` on
    /// every side): the case of the stride-1 kernels.
    pub fn keeps_size(self, kernel: usize) -> bool {
        self.stride == 1 && self.padding == [kernel / 2; 4]
    }

    /// The output size of a `kernel`-sided convolution of an `[h, w]` image (0 where the padded
    /// image is smaller than the kernel).
    pub fn output_size(self, kernel: usize, [h, w]: [usize; 2]) -> [usize; 2] {
        let [top, left, bottom, right] = self.padding;
        let side = |n: usize, before: usize, after: usize| {
            (n + before + after)
                .checked_sub(kernel)
                .map_or(0, |d| d / self.stride.max(1) + 1)
        };
        [side(h, top, bottom), side(w, left, right)]
    }

    /// The input index that output index `o` reads at kernel offset `k` along `axis` (0: rows,
    /// 1: columns) of an input `n` long, or `None` in the padding.
    #[inline(always)]
    fn source(self, o: usize, k: usize, axis: usize, n: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.padding[axis])
            .filter(|&i| i < n)
    }

    /// The outputs (of `n_out`) that read inside an input `n` long at kernel offset `k` along
    /// `axis`, a contiguous run, and the input index the first of them reads.
    #[inline(always)]
    fn inside(self, k: usize, axis: usize, n: usize, n_out: usize) -> (Range<usize>, usize) {
        let (s, pad) = (self.stride.max(1), self.padding[axis]);
        // o · s + k − pad ∈ [0, n)  ⇔  o ∈ [⌈(pad − k) / s⌉, ⌊(n − 1 + pad − k) / s⌋].
        let end = (n + pad)
            .checked_sub(k + 1)
            .map_or(0, |d| (d / s + 1).min(n_out));
        let start = pad.saturating_sub(k).div_ceil(s).min(end);
        (start..end, (start * s + k).saturating_sub(pad).min(n))
    }
}

/// A GroupNorm's settings: group count, epsilon, and whether SiLU follows in the same pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormSpec {
    /// Channel groups; they divide the channel count.
    pub groups: usize,
    /// Added to the variance.
    pub epsilon: f64,
    /// Apply SiLU to the normalised output.
    pub silu: bool,
}

/// What the GroupNorm backward step needs: the input, gamma and beta, the settings and each
/// (image, group)'s mean and 1/σ.
#[derive(Clone, Debug)]
struct GroupNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    norm: GroupNormSpec,
    stats: Vec<[f32; 2]>,
}

/// GroupNorm, one (image, group) block per task: mean and variance in two passes over the
/// cache-hot block, then `x · scale + shift` per channel (and SiLU). Returns the output and each
/// block's mean and 1/σ.
fn group_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    norm: GroupNormSpec,
) -> (FlexTensor, Vec<[f32; 2]>) {
    let GroupNormSpec {
        groups,
        epsilon,
        silu,
    } = norm;
    let [b, c, h, w] = dims4(x);
    let x = contiguous(x);
    let (gamma, beta) = (contiguous(gamma), contiguous(beta));
    let (src, gamma, beta) = (f32s(&x), f32s(&gamma), f32s(&beta));
    let plane = h * w;
    let per_group = c / groups;
    let block = per_group * plane;
    let (out, stats) = build(b * c * plane, block, true, |i, dst| {
        let channels = (i % groups) * per_group..(i % groups + 1) * per_group;
        pulp::Arch::new().dispatch(GroupNormBlock {
            src: &src[i * block..][..block],
            dst,
            gamma: &gamma[channels.clone()],
            beta: &beta[channels],
            plane,
            epsilon,
            silu,
        })
    });
    (f32_tensor(out, vec![b, c, h, w]), stats)
}

simd_kernel! {
    /// One (image, group) block of GroupNorm: its mean and 1/σ, and `x · scale + shift` per
    /// channel, or SiLU of that, appended to `dst`.
    struct GroupNormBlock<'a, 'b> {
        src: &'a [f32],
        dst: &'a mut Writer<'b>,
        gamma: &'a [f32],
        beta: &'a [f32],
        plane: usize,
        epsilon: f64,
        silu: bool,
    } -> [f32; 2] {
        let n = src.len() as f64;
        let mean = sum_f64(src, |v| v as f64) / n;
        let var = sum_f64(src, |v| {
            let d = v as f64 - mean;
            d * d
        }) / n;
        let rstd = 1.0 / (var + epsilon).sqrt();
        for ci in 0..gamma.len() {
            let scale = gamma[ci] as f64 * rstd;
            let shift = beta[ci] as f64 - mean * scale;
            let (scale, shift) = (scale as f32, shift as f32);
            let x = &src[ci * plane..(ci + 1) * plane];
            if silu {
                dst.push_map(x, |s| {
                    let y = s * scale + shift;
                    y / (1.0 + exp(-y))
                });
            } else {
                dst.push_map(x, |s| s * scale + shift);
            }
        }
        [mean as f32, rstd as f32]
    }
}

/// `Σ f(x)` over `xs` in f64, in eight lanes so that the loop vectorises.
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&x| f(x)).sum::<f64>()
}

/// GroupNorm's gradients. With `x̂ = (x − μ)/σ` and `ĝ = dy · γ`, per block:
/// `dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)) / σ`; `dγ = Σ dy · x̂` and `dβ = Σ dy` per channel.
fn group_norm_backward(
    state: &GroupNormState,
    grad: &FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [b, c, h, w] = dims4(&state.x);
    let x = contiguous(&state.x);
    let (gamma, beta) = (contiguous(&state.gamma), contiguous(&state.beta));
    let grad = contiguous(grad);
    let (src, dy) = (f32s(&x), f32s(&grad));
    let (gamma, beta) = (f32s(&gamma), f32s(&beta));
    let groups = state.norm.groups;
    let plane = h * w;
    let per_group = c / groups;
    let block = per_group * plane;
    let mut dgamma = vec![0.0f64; c];
    let mut dbeta = vec![0.0f64; c];
    // Per (image, group) block: the input gradient, and each channel's Σ dy and Σ dy · x̂.
    let (dx, sums) = build(b * c * plane, block, true, |i, dst| {
        let channels = (i % groups) * per_group..(i % groups + 1) * per_group;
        let mut sums = vec![[0.0f64; 2]; per_group];
        pulp::Arch::new().dispatch(GroupNormGradBlock {
            src: &src[i * block..][..block],
            dy: &dy[i * block..][..block],
            dst,
            gamma: &gamma[channels.clone()],
            beta: &beta[channels],
            plane,
            stats: state.stats[i],
            silu: state.norm.silu,
            sums: &mut sums,
        });
        sums
    });
    for (i, block_sums) in sums.iter().enumerate() {
        let first = (i % groups) * per_group;
        for (ci, [s_dy, s_dyx]) in block_sums.iter().enumerate() {
            dbeta[first + ci] += s_dy;
            dgamma[first + ci] += s_dyx;
        }
    }
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<_>>();
    (
        f32_tensor(dx, vec![b, c, h, w]),
        f32_tensor(to_f32(dgamma), vec![c]),
        f32_tensor(to_f32(dbeta), vec![c]),
    )
}

simd_kernel! {
    /// One (image, group) block of GroupNorm's backward pass: `dst` gets the input gradient and
    /// `sums` each channel's `Σ dy` and `Σ dy · x̂`. With `silu`, `dy` is first taken through SiLU
    /// at the normalised values, recomputed as in the forward pass.
    struct GroupNormGradBlock<'a, 'b> {
        src: &'a [f32],
        dy: &'a [f32],
        dst: &'a mut Writer<'b>,
        gamma: &'a [f32],
        beta: &'a [f32],
        plane: usize,
        stats: [f32; 2],
        silu: bool,
        sums: &'a mut [[f64; 2]],
    } -> () {
        let [mean, rstd] = stats;
        let n = src.len() as f64;
        // `dst` first holds the gradient at the GroupNorm output.
        if silu {
            for ci in 0..gamma.len() {
                let scale = gamma[ci] as f64 * rstd as f64;
                let shift = beta[ci] as f64 - mean as f64 * scale;
                let (scale, shift) = (scale as f32, shift as f32);
                let range = ci * plane..(ci + 1) * plane;
                dst.push_map2(&src[range.clone()], &dy[range], |x, g| {
                    let y = x * scale + shift;
                    let s = 1.0 / (1.0 + exp(-y));
                    g * s * (1.0 + y * (1.0 - s))
                });
            }
        } else {
            dst.push_map(dy, |g| g);
        }
        let dst = dst.written_mut();
        let (mut mean_g, mut mean_gx) = (0.0f64, 0.0f64);
        for ci in 0..gamma.len() {
            let range = ci * plane..(ci + 1) * plane;
            let (x, g) = (&src[range.clone()], &dst[range]);
            let s_dy = sum_f64(g, |g| g as f64);
            let mut acc = [0.0f64; 8];
            let split = x.len() / 8 * 8;
            for base in (0..split).step_by(8) {
                for lane in 0..8 {
                    let (x, g) = (x[base + lane], g[base + lane]);
                    acc[lane] += (g * (x - mean) * rstd) as f64;
                }
            }
            let mut s_dyx = 0.0f64;
            for j in split..x.len() {
                s_dyx += (g[j] * (x[j] - mean) * rstd) as f64;
            }
            for a in acc {
                s_dyx += a;
            }
            sums[ci] = [s_dy, s_dyx];
            mean_g += gamma[ci] as f64 * s_dy / n;
            mean_gx += gamma[ci] as f64 * s_dyx / n;
        }
        let (mean_g, mean_gx) = (mean_g as f32, mean_gx as f32);
        for (ci, &g) in gamma.iter().enumerate() {
            let range = ci * plane..(ci + 1) * plane;
            for (d, &x) in dst[range.clone()].iter_mut().zip(&src[range]) {
                let xhat = (x - mean) * rstd;
                *d = (*d * g - mean_g - xhat * mean_gx) * rstd;
            }
        }
    }
}

/// Calls `f` with this thread's buffers in `key`, reused from call to call. A thread that
/// re-enters while waiting on a parallel product (rayon may hand it other work meanwhile) gets
/// fresh buffers instead.
fn with_thread_buffers<T: Default + 'static, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffers) => f(&mut buffers),
        Err(_) => f(&mut T::default()),
    })
}

/// The four dimensions of a rank-4 tensor.
fn dims4(x: &FlexTensor) -> [usize; 4] {
    let shape = x.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

fn f32_tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// Elements per parallel task: small tensors stay on the calling thread.
const CHUNK: usize = 1 << 15;

/// A contiguous float32 copy-free view, or a contiguous copy when the layout is strided.
fn contiguous(x: &FlexTensor) -> FlexTensor {
    if x.as_slice::<f32>().is_some() {
        x.clone()
    } else {
        x.to_contiguous()
    }
}

/// The values of a float32 tensor made contiguous by [`contiguous`]. Only float32 tensors come
/// to these kernels (checked by the routing in `unet::layers`).
fn f32s(x: &FlexTensor) -> &[f32] {
    x.as_slice::<f32>()
        .expect("the CPU kernels take contiguous float32 tensors")
}

/// Whether a batch runs one image per rayon thread (each product on its own thread) rather
/// than one image at a time with each product spread over the threads.
fn images_in_parallel(batch: usize) -> bool {
    batch >= rayon::current_num_threads()
}

fn silu_forward(x: &FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let src = f32s(&x);
    let (out, _) = build(src.len(), CHUNK, src.len() > CHUNK, |i, out| {
        let x = &src[i * CHUNK..src.len().min((i + 1) * CHUNK)];
        pulp::Arch::new().dispatch(SiluSlice { x, out })
    });
    FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
}

fn silu_backward(x: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let x = contiguous(x);
    let grad = contiguous(grad);
    let (src, g) = (f32s(&x), f32s(&grad));
    assert_eq!(src.len(), g.len(), "SiLU gradient shape");
    let (out, _) = build(src.len(), CHUNK, src.len() > CHUNK, |i, out| {
        let chunk = i * CHUNK..src.len().min((i + 1) * CHUNK);
        let (x, g) = (&src[chunk.clone()], &g[chunk]);
        pulp::Arch::new().dispatch(SiluGradSlice { x, g, out })
    });
    FlexTensor::from_data(TensorData::new(out, x.layout().shape().clone()))
}

simd_kernel! {
    /// `x / (1 + e^-x)` over a slice.
    struct SiluSlice<'a, 'b> { x: &'a [f32], out: &'a mut Writer<'b> } -> () {
        out.push_map(x, |v| v / (1.0 + exp(-v)));
    }
}

simd_kernel! {
    /// `g · s · (1 + x (1 − s))` with `s = sigmoid(x)`: the chain rule through SiLU.
    struct SiluGradSlice<'a, 'b> { x: &'a [f32], g: &'a [f32], out: &'a mut Writer<'b> } -> () {
        out.push_map2(x, g, |v, g| {
            let s = 1.0 / (1.0 + exp(-v));
            g * s * (1.0 + v * (1.0 - s))
        });
    }
}

/// `e^y` for float32 without branches, so that loops over it vectorise.
///
/// Range reduction `y = n ln 2 + r` with `|r| ≤ ln 2 / 2`, then Cephes' `expf` polynomial for
/// `e^r` and `2^n` built from its exponent bits. `y` is clamped to [-87, 88], where `e^y` stays
/// a normal float; NaN in gives a number out, which the callers' products with `x` turn back
/// into NaN. Relative error ≤ 2.5e-7 (tested against `f64::exp`).
#[inline(always)]
pub(crate) fn exp(y: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let y = y.clamp(-87.0, 88.0);
    let t = y * LOG2E + ROUND;
    let n = t - ROUND;
    let r = y - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // The integer n sits in t's low mantissa bits, offset by ROUND's.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits((n_bits.wrapping_add(127)) << 23);
    e_r * two_n
}

#[cfg(all(test, feature = "flex-kernels"))]
mod tests {
    use burn::tensor::{Device, Tensor};

    use super::*;

    /// Values over SiLU's whole range, extremes and a strided view included.
    fn input(device: &Device) -> Tensor<4> {
        // 43,200 values: two parallel chunks of `CHUNK` and a shorter last one.
        let mut v: Vec<f32> = (0..2 * 3 * 80 * 90)
            .map(|i| ((i as f32) * 0.618_034).sin() * 12.0)
            .collect();
        v[..6].copy_from_slice(&[0.0, -0.0, 100.0, -100.0, 88.5, -88.5]);
        Tensor::<4>::from_data(TensorData::new(v, [2, 3, 80, 90]), device)
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let a = a.into_data().try_to_vec::<f32>().unwrap();
        let b = b.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn silu_equals_burns_forward_and_backward() {
        let device = Device::flex().autodiff();
        // Large enough for the parallel chunks; the permuted copy is a strided view.
        for x in [input(&device), input(&device).permute([0, 2, 3, 1])] {
            let w = x.clone().cos().detach(); // an arbitrary upstream gradient
            let x1 = x.clone().detach().require_grad();
            let ours = crate::unet::silu(x1.clone());
            let x2 = x.detach().require_grad();
            let burns = burn::tensor::activation::silu(x2.clone());
            assert!(max_diff(ours.clone(), burns.clone()) <= 2e-6 * 100.0);
            let g1 = x1.grad(&(ours * w.clone()).sum().backward()).unwrap();
            let g2 = x2.grad(&(burns * w).sum().backward()).unwrap();
            let diff = max_diff(Tensor::from_inner(g1), Tensor::from_inner(g2));
            assert!(diff <= 1e-5, "gradient max |diff| {diff}");
        }
        // Without autodiff, and NaN stays NaN.
        let plain = Device::flex();
        let y = crate::unet::silu(Tensor::<1>::from_floats([f32::NAN, 1.0], &plain));
        let y = y.into_data().try_to_vec::<f32>().unwrap();
        assert!(y[0].is_nan());
        assert!((y[1] - 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn attention_equals_burns_forward_and_gradients() {
        use crate::unet::layers::{multi_head_attention, multi_head_attention_ops};

        let device = Device::flex().autodiff();
        let mut noise = crate::noise::SeededNoise::new(11);
        // (batch, len, heads, head_dim): several images per thread, one image (each product
        // spread over the threads), one head, and the bundled model's 14×14 level.
        for (b, len, heads, d) in [
            (3, 20, 2, 8),
            (1, 196, 2, 32),
            (4, 33, 1, 16),
            (2, 49, 4, 4),
        ] {
            let shape = [b, len, heads * d];
            let n = b * len * heads * d;
            // Scaled so that some weights are near 1 and others near 0.
            let mut tensor = || {
                Tensor::<3>::from_data(TensorData::new(noise.sample_vec(n), shape), &device)
                    .mul_scalar(2.0)
            };
            let (q, k, v, up) = (tensor(), tensor(), tensor(), tensor());
            let run = |fast: bool| {
                let [q, k, v] = [&q, &k, &v].map(|t| t.clone().detach().require_grad());
                let y = if fast {
                    multi_head_attention(q.clone(), k.clone(), v.clone(), heads)
                } else {
                    multi_head_attention_ops(q.clone(), k.clone(), v.clone(), heads)
                };
                let grads = (y.clone() * up.clone()).sum().backward();
                let grad = |t: &Tensor<3>| Tensor::<3>::from_inner(t.grad(&grads).unwrap());
                [y.clone(), grad(&q), grad(&k), grad(&v)]
            };
            let ours = run(true);
            let burns = run(false);
            for (name, (a, r)) in ["output", "q gradient", "k gradient", "v gradient"]
                .iter()
                .zip(ours.into_iter().zip(burns))
            {
                let scale = r.clone().abs().max().into_scalar::<f32>().max(1.0);
                let (a, r) = (a.unsqueeze::<4>(), r.unsqueeze::<4>());
                let diff = max_diff(a, r);
                assert!(
                    diff <= 1e-5 * scale,
                    "b {b}, len {len}, {heads} × {d}: {name} max |diff| {diff} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn conv_equals_burns_forward_and_gradients() {
        use burn::module::{Module, Param};
        use burn::nn::PaddingConfig2d;
        use burn::nn::conv::Conv2dConfig;

        let device = Device::flex().autodiff();
        let mut noise = crate::noise::SeededNoise::new(5);
        // Odd sizes, one channel in (the stem), one image (each product spread over the
        // threads) and batches of one image per thread; 3×3 and 1×1 (the ResNet shortcut); a
        // 16×16 plane, whose im2col rows are padded apart; stride 2 with padding on every side
        // or only bottom and right (the downsampling convolutions), on even and odd sizes.
        let same = PaddingConfig2d::Explicit(1, 1, 1, 1);
        let bottom_right = PaddingConfig2d::Explicit(0, 0, 1, 1);
        for (k, stride, padding, b, c_in, c_out, h, w) in [
            (3, 1, same.clone(), 3, 4, 5, 7, 9),
            (3, 1, same.clone(), 2, 3, 4, 16, 16),
            (3, 1, same.clone(), 2, 1, 8, 28, 28),
            (3, 1, same.clone(), 1, 16, 16, 14, 14),
            (3, 1, same.clone(), 4, 16, 16, 14, 14),
            (1, 1, PaddingConfig2d::Valid, 3, 6, 5, 7, 9),
            (1, 1, PaddingConfig2d::Valid, 1, 16, 8, 14, 14),
            (3, 2, bottom_right.clone(), 3, 4, 6, 8, 8),
            (3, 2, bottom_right, 2, 5, 3, 7, 9),
            (3, 2, same.clone(), 1, 6, 6, 9, 6),
            (3, 2, same, 4, 3, 5, 10, 10),
            (3, 1, PaddingConfig2d::Valid, 2, 3, 4, 6, 5),
        ] {
            let conv = Conv2dConfig::new([c_in, c_out], [k, k])
                .with_stride([stride, stride])
                .with_padding(padding)
                .init(&device);
            let spec = crate::unet::layers::flex_conv_spec(&conv, [b, c_in, h, w]);
            assert!(
                spec.is_some(),
                "{k}×{k} stride {stride} is not routed to the kernels"
            );
            let [ho, wo] = spec.unwrap().output_size(k, [h, w]);
            let n = b * c_in * h * w;
            let x = Tensor::<4>::from_data(
                TensorData::new(noise.sample_vec(n), [b, c_in, h, w]),
                &device,
            );
            let up = Tensor::<4>::from_data(
                TensorData::new(noise.sample_vec(b * c_out * ho * wo), [b, c_out, ho, wo]),
                &device,
            );
            let run = |fast: bool| {
                let conv = conv.clone().fork(&device);
                let x = x.clone().detach().require_grad();
                let y = if fast {
                    crate::unet::conv_forward(&conv, x.clone())
                } else {
                    conv.forward(x.clone())
                };
                let grads = (y.clone() * up.clone()).sum().backward();
                let weight: &Param<Tensor<4>> = &conv.weight;
                let gx = Tensor::<4>::from_inner(x.grad(&grads).unwrap());
                let gw = Tensor::<4>::from_inner(weight.val().grad(&grads).unwrap());
                let bias = conv.bias.as_ref().unwrap().val();
                let gb = Tensor::<1>::from_inner(bias.grad(&grads).unwrap());
                (y, gx, gw, gb)
            };
            let (y1, gx1, gw1, gb1) = run(true);
            let (y2, gx2, gw2, gb2) = run(false);
            let case = format!("{k}×{k} stride {stride}, b {b}, c {c_in}→{c_out}, {h}×{w}");
            // Relative to the reference's largest entry: the weight and bias gradients are sums
            // over b · h · w products, accumulated in a different order.
            let check = |name: &str, ours: Tensor<4>, burns: Tensor<4>| {
                let scale = burns.clone().abs().max().into_scalar::<f32>().max(1.0);
                let d = max_diff(ours, burns);
                assert!(
                    d <= 1e-5 * scale,
                    "{case}: {name} max |diff| {d} (scale {scale})"
                );
            };
            check("output", y1, y2);
            check("input gradient", gx1, gx2);
            check("weight gradient", gw1, gw2);
            check(
                "bias gradient",
                gb1.reshape([1, 1, 1, c_out]),
                gb2.reshape([1, 1, 1, c_out]),
            );
        }
    }

    #[test]
    fn group_norm_equals_burns_forward_and_gradients() {
        use burn::module::{Module, Param};
        use burn::nn::GroupNormConfig;

        let device = Device::flex().autodiff();
        let mut noise = crate::noise::SeededNoise::new(9);
        let (b, c, h, w, groups) = (3, 12, 5, 7, 4);
        let mut norm = GroupNormConfig::new(groups, c)
            .with_epsilon(1e-5)
            .init(&device);
        let vector = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [c]), &device);
        norm.gamma = Some(Param::from_tensor(vector(noise.sample_vec(c))));
        norm.beta = Some(Param::from_tensor(vector(noise.sample_vec(c))));
        // Off-centre and scaled, so that the mean and variance matter.
        let x = Tensor::<4>::from_data(
            TensorData::new(noise.sample_vec(b * c * h * w), [b, c, h, w]),
            &device,
        )
        .mul_scalar(3.0)
        .add_scalar(1.5);
        let up = Tensor::<4>::from_data(
            TensorData::new(noise.sample_vec(b * c * h * w), [b, c, h, w]),
            &device,
        );
        // Plain, and followed by SiLU in the same pass.
        for silu in [false, true] {
            let run = |fast: bool| {
                let norm = norm.clone().fork(&device);
                let x = x.clone().detach().require_grad();
                let y = match (fast, silu) {
                    (true, false) => crate::unet::layers::group_norm_forward(&norm, x.clone()),
                    (true, true) => crate::unet::layers::group_norm_silu(&norm, x.clone()),
                    (false, false) => norm.forward(x.clone()),
                    (false, true) => burn::tensor::activation::silu(norm.forward(x.clone())),
                };
                let grads = (y.clone() * up.clone()).sum().backward();
                let gx = Tensor::<4>::from_inner(x.grad(&grads).unwrap());
                let grad_of = |p: &Option<Param<Tensor<1>>>| {
                    let g = p.as_ref().unwrap().val().grad(&grads).unwrap();
                    Tensor::<1>::from_inner(g).reshape([1, 1, 1, c])
                };
                (y, gx, grad_of(&norm.gamma), grad_of(&norm.beta))
            };
            let (y1, gx1, gg1, gb1) = run(true);
            let (y2, gx2, gg2, gb2) = run(false);
            for (name, ours, burns) in [
                ("output", y1, y2),
                ("input gradient", gx1, gx2),
                ("gamma gradient", gg1, gg2),
                ("beta gradient", gb1, gb2),
            ] {
                let scale = burns.clone().abs().max().into_scalar::<f32>().max(1.0);
                let d = max_diff(ours, burns);
                assert!(
                    d <= 1e-5 * scale,
                    "silu {silu}: {name}: max |diff| {d} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn exp_matches_f64_within_a_few_ulp() {
        let mut worst = 0.0f64;
        let mut y = -87.0f32;
        while y <= 88.0 {
            let want = (y as f64).exp();
            let got = exp(y) as f64;
            worst = worst.max(((got - want) / want).abs());
            y += 0.001_3;
        }
        assert!(worst <= 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }
}
