//! Convolutions with 1×1 (stride 1, no padding) and 3×3 kernels, one image at a time: the 3×3
//! patches as im2col columns in a per-thread buffer that stays in cache, then one GEMM that
//! writes the image's output straight into the batch tensor, then the bias. For a 1×1 kernel the
//! image itself is the column matrix.
//!
//! Backward, stride 1 with padding 1 (the ResNets' convolutions): the weight gradient is
//! `Σ_b grad_b · rows_b`, with the patches laid out one pixel per row ([`with_rows`]), summed in
//! place per thread; the input gradient is the same convolution of the output gradient with the
//! weight's in and out channels swapped and its kernel turned by 180°.
//!
//! Any other stride or padding of a 3×3 kernel (the downsampling convolutions: stride 2,
//! padding 1 or only on the bottom and right) takes the general path: strided im2col forward;
//! the weight gradient `Σ_b grad_b · columns_bᵀ`; the input gradient as `weightᵀ · grad_b`
//! scattered back onto the image (col2im).

use std::cell::RefCell;
use std::ops::Range;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::Shape;
use rayon::prelude::*;

use super::gemm::{Mat, MatMut, matmul};
use super::output::build;
use super::{
    ConvSpec, contiguous, dims4, f32_tensor, f32s, images_in_parallel, with_thread_buffers,
};

thread_local! {
    /// Each thread's im2col buffer, reused from image to image.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's buffers for [`with_rows`]: the image channels-last, and its patch rows.
    static ROWS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The side of a square kernel `[c_out, c_in, k, k]`.
pub(super) fn kernel_side(weight: &FlexTensor) -> usize {
    dims4(weight)[3]
}

/// How far apart the im2col rows of a `plane`-pixel image are kept. GEMM reads the columns
/// matrix down its rows, one value per row and step; rows a multiple of 1 KiB apart all land in
/// the same few L1 cache sets and evict each other. 32×32 planes are exactly 4 KiB: 16 floats of
/// padding per row took the level-0 forward convolutions of the cifar preset from 33–38 to
/// 45–52 GFLOP/s on one thread (`ddpm bench --phases conv` measures the same shape).
fn column_row_stride(plane: usize) -> usize {
    if plane.is_multiple_of(256) {
        plane + 16
    } else {
        plane
    }
}

/// Calls `f` with one image `[c, h, w]`'s columns, `[c · k², h · w]`.
fn with_columns<R>(
    image: &[f32],
    [c, h, w]: [usize; 3],
    kernel: usize,
    f: impl FnOnce(Mat) -> R,
) -> R {
    if kernel == 1 {
        return f(Mat::row_major(image, c, h * w));
    }
    let stride = column_row_stride(h * w);
    let run = |buffer: &mut Vec<f32>| {
        im2col3x3(image, [c, h, w], buffer, stride);
        f(Mat {
            row_stride: stride,
            ..Mat::row_major(buffer, c * 9, h * w)
        })
    };
    with_thread_buffers(&COLUMNS, run)
}

/// Calls `f` with one image `[c, h, w]`'s patches as rows, `[h · w, k² · c]`: row `y · w + x`
/// holds, for each kernel offset `(ky, kx)` and then each channel, the input under that tap (0
/// outside). This is the layout the weight gradient's product reads without repacking: both its
/// operands then run along the pixels in memory. The columns come out in `(ky, kx, c)` order,
/// not the weight's `(c, ky, kx)`.
fn with_rows<R>(
    image: &[f32],
    [c, h, w]: [usize; 3],
    kernel: usize,
    f: impl FnOnce(Mat) -> R,
) -> R {
    let run = |(hwc, rows): &mut (Vec<f32>, Vec<f32>)| {
        hwc.resize(c * h * w, 0.0);
        pulp::Arch::new().dispatch(ChannelsLast {
            src: image,
            plane: h * w,
            dst: hwc,
        });
        if kernel == 1 {
            return f(Mat::row_major(hwc, h * w, c));
        }
        rows.resize(h * w * 9 * c, 0.0);
        im2row3x3(hwc, [c, h, w], rows);
        f(Mat::row_major(rows, h * w, 9 * c))
    };
    with_thread_buffers(&ROWS, run)
}

simd_kernel! {
    /// `[c, plane]` → `[plane, c]`, eight channels at a time: eight sequential reads and eight
    /// contiguous writes per pixel.
    struct ChannelsLast<'a> { src: &'a [f32], plane: usize, dst: &'a mut [f32] } -> () {
        if plane == 0 {
            return;
        }
        let c = src.len() / plane;
        for first in (0..c).step_by(8) {
            let n = (c - first).min(8);
            let channels = &src[first * plane..(first + n) * plane];
            if n == 8 {
                let lanes: [&[f32]; 8] = std::array::from_fn(|j| &channels[j * plane..(j + 1) * plane]);
                for (p, out) in dst.chunks_exact_mut(c).enumerate() {
                    let out = &mut out[first..first + 8];
                    for j in 0..8 {
                        out[j] = lanes[j][p];
                    }
                }
            } else {
                for (j, channel) in channels.chunks_exact(plane).enumerate() {
                    for (p, &v) in channel.iter().enumerate() {
                        dst[p * c + first + j] = v;
                    }
                }
            }
        }
    }
}

/// The patch rows of a channels-last image `hwc` (`[h · w, c]`) into `rows` (`[h · w, 9 · c]`):
/// per pixel and kernel row `ky`, the three neighbours along x are `3 · c` contiguous values of
/// `hwc` (one copy) away from the borders.
fn im2row3x3(hwc: &[f32], [c, h, w]: [usize; 3], rows: &mut [f32]) {
    for (p, row) in rows.chunks_exact_mut(9 * c).enumerate() {
        let (y, x) = (p / w, p % w);
        for (ky, taps) in row.chunks_exact_mut(3 * c).enumerate() {
            let Some(ny) = (y + ky).checked_sub(1).filter(|&ny| ny < h) else {
                taps.fill(0.0);
                continue;
            };
            let line = &hwc[ny * w * c..(ny + 1) * w * c];
            if x >= 1 && x + 1 < w {
                taps.copy_from_slice(&line[(x - 1) * c..(x + 2) * c]);
                continue;
            }
            for (kx, tap) in taps.chunks_exact_mut(c).enumerate() {
                match (x + kx).checked_sub(1).filter(|&nx| nx < w) {
                    Some(nx) => tap.copy_from_slice(&line[nx * c..(nx + 1) * c]),
                    None => tap.fill(0.0),
                }
            }
        }
    }
}

/// The 3×3 patches of one image `[c, h, w]` (padding 1) as columns `[c · 9, h · w]` in `cols`,
/// rows `stride` (≥ `h · w`) apart: row `c · 9 + ky · 3 + kx` holds `x[c, y + ky − 1, x + kx − 1]` (0 outside) at column
/// `y · w + x`. Row order matches the weight's `[c_out, c_in, 3, 3]` layout, so the convolution
/// is `weight · columns`.
///
/// Each row is the channel's plane shifted by `(ky − 1) · w + kx − 1`: one plane-long copy, zeros
/// where the shift runs off the plane, then the column that wrapped around from the neighbouring
/// image row (x = 0 for kx = 0, x = w − 1 for kx = 2) set to 0. Copying row by row made a
/// `memcpy` call per image row (16 million calls in one sampling run at batch 64), and a fused
/// per-row loop ran on 128-bit registers for the narrow rows of the lower levels.
fn im2col3x3(src: &[f32], [c, h, w]: [usize; 3], cols: &mut Vec<f32>, stride: usize) {
    let plane = h * w;
    // Every element the product reads is written below: resizing only zero-fills when the
    // buffer grows.
    cols.resize(c * 9 * stride, 0.0);
    if plane == 0 {
        return;
    }
    for (channel, rows) in src
        .chunks_exact(plane)
        .zip(cols.chunks_exact_mut(9 * stride))
    {
        for (tap, row) in rows.chunks_exact_mut(stride).enumerate() {
            let row = &mut row[..plane];
            let (ky, kx) = (tap / 3, tap % 3);
            // row[p] = channel[p + shift] where that stays on the plane.
            let shift = (ky as isize - 1) * w as isize + kx as isize - 1;
            let start = (-shift).clamp(0, plane as isize) as usize;
            let end = (plane as isize - shift).clamp(start as isize, plane as isize) as usize;
            row[..start].fill(0.0);
            let from = (start as isize + shift) as usize;
            row[start..end].copy_from_slice(&channel[from..from + (end - start)]);
            row[end..].fill(0.0);
            match kx {
                0 => row.iter_mut().step_by(w).for_each(|v| *v = 0.0),
                2 => row[w - 1..].iter_mut().step_by(w).for_each(|v| *v = 0.0),
                _ => {}
            }
        }
    }
}

/// The convolution: per image, `weight · columns` (+ bias `[c_out]`). `x` is `[b, c_in, h, w]`
/// and `weight` `[c_out, c_in, k, k]` with k = 1 (stride 1, no padding) or 3.
pub(super) fn conv_forward(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    spec: ConvSpec,
) -> FlexTensor {
    let [b, c_in, h, w] = dims4(x);
    let [c_out, _, kernel, _] = dims4(weight);
    let [ho, wo] = spec.output_size(kernel, [h, w]);
    let (x, weight) = (contiguous(x), contiguous(weight));
    let bias = bias.map(contiguous);
    let (src, bias) = (f32s(&x), bias.as_ref().map(f32s));
    let weight = Mat::row_major(f32s(&weight), c_out, c_in * kernel * kernel);
    let (image, plane) = (c_in * h * w, ho * wo);
    // One image per rayon thread, or one image at a time with each product parallel.
    let images_parallel = images_in_parallel(b);
    let (out, _) = build(
        b * c_out * plane,
        c_out * plane,
        images_parallel,
        |i, dst| {
            let image = &src[i * image..][..image];
            let parallel = !images_parallel;
            if spec.keeps_size(kernel) {
                with_columns(image, [c_in, h, w], kernel, |cols| {
                    dst.push_product(weight, cols, parallel)
                });
            } else {
                with_strided_columns(image, [c_in, h, w], spec, |cols| {
                    dst.push_product(weight, cols, parallel)
                });
            }
            // The bias goes on while the image's output is still in cache.
            if let Some(bias) = bias {
                for (channel, &v) in dst.written_mut().chunks_mut(plane).zip(bias) {
                    for x in channel {
                        *x += v;
                    }
                }
            }
        },
    );
    f32_tensor(out, vec![b, c_out, ho, wo])
}

/// `Σ_i add_image(i, acc)` over the batch's `b` images into a `len`-long sum: the batch is cut
/// into one run of images per thread, each summed in place, then the runs are added in order.
/// `add_image` is told whether its products may spread over the threads (one image at a time).
fn sum_over_images(
    b: usize,
    len: usize,
    add_image: impl Fn(usize, &mut [f32], bool) + Sync,
) -> Vec<f32> {
    let runs = rayon::current_num_threads().clamp(1, b.max(1));
    let per_run = b.div_ceil(runs);
    let parallel = !images_in_parallel(b);
    let partial: Vec<Vec<f32>> = (0..runs)
        .into_par_iter()
        .map(|run| {
            let mut acc = vec![0.0f32; len];
            for i in (run * per_run..b).take(per_run) {
                add_image(i, &mut acc, parallel);
            }
            acc
        })
        .collect();
    let mut partial = partial.into_iter();
    let mut sum = partial.next().unwrap_or_else(|| vec![0.0; len]);
    for part in partial {
        for (s, p) in sum.iter_mut().zip(part) {
            *s += p;
        }
    }
    sum
}

/// The weight gradient, shaped like the weight `[c_out, c_in, k, k]`: `Σ_b grad_b · rows_b`
/// (the patch rows of [`with_rows`]) for a size-keeping convolution, `Σ_b grad_b · columns_bᵀ`
/// otherwise.
pub(super) fn conv_weight_grad(
    x: &FlexTensor,
    grad: &FlexTensor,
    kernel: usize,
    spec: ConvSpec,
) -> FlexTensor {
    let [_, c_in, h, w] = dims4(x);
    let [b, c_out, ho, wo] = dims4(grad);
    let (x, grad) = (contiguous(x), contiguous(grad));
    let (src, dy) = (f32s(&x), f32s(&grad));
    let (image, plane, taps) = (c_in * h * w, ho * wo, c_in * kernel * kernel);
    let grad_of =
        |i: usize| Mat::row_major(&dy[i * c_out * plane..][..c_out * plane], c_out, plane);
    if !spec.keeps_size(kernel) {
        let sum = sum_over_images(b, c_out * taps, |i, acc, parallel| {
            let image = &src[i * image..][..image];
            with_strided_columns(image, [c_in, h, w], spec, |cols| {
                let acc = MatMut::row_major(acc, c_out, taps);
                matmul(acc, grad_of(i), cols.t(), true, parallel)
            })
        });
        return f32_tensor(sum, vec![c_out, c_in, kernel, kernel]);
    }
    // In the patch rows' (ky, kx, c) column order.
    let sum = sum_over_images(b, c_out * taps, |i, acc, parallel| {
        with_rows(&src[i * image..][..image], [c_in, h, w], kernel, |rows| {
            let acc = MatMut::row_major(acc, c_out, taps);
            matmul(acc, grad_of(i), rows, true, parallel)
        })
    });
    // (ky, kx, c) → the weight's (c, ky, kx).
    let k2 = kernel * kernel;
    let mut weight = vec![0.0f32; c_out * taps];
    for (dst, src) in weight.chunks_exact_mut(taps).zip(sum.chunks_exact(taps)) {
        for (tap, values) in src.chunks_exact(c_in).enumerate() {
            for (ci, &v) in values.iter().enumerate() {
                dst[ci * k2 + tap] = v;
            }
        }
    }
    f32_tensor(weight, vec![c_out, c_in, kernel, kernel])
}

/// The weight `[c_out, c_in, k, k]` with its in and out channels swapped and each kernel turned
/// by 180°: `[c_in, c_out, k, k]`, element `(i, o, y, x)` = `weight(o, i, k−1−y, k−1−x)`. One
/// pass of contiguous reads and writes (flex's `swap_dims` + `flip` + copy went through its
/// generic strided iterator, ≈ 9 % of a batch-1 training step of the cifar preset).
fn turned_kernel(weight: &FlexTensor) -> FlexTensor {
    let [c_out, c_in, k, _] = dims4(weight);
    let weight = contiguous(weight);
    let src = f32s(&weight);
    let taps = k * k;
    let mut turned = Vec::with_capacity(src.len());
    for i in 0..c_in {
        for o in 0..c_out {
            let kernel = &src[(o * c_in + i) * taps..][..taps];
            turned.extend(kernel.iter().rev());
        }
    }
    f32_tensor(turned, vec![c_in, c_out, k, k])
}

/// The input gradient for an input `x` (only its shape is read). Size-keeping: the convolution
/// of the output gradient with the weight's in and out channels swapped and its kernel turned by
/// 180°. Otherwise, per image, the patch gradients `weightᵀ · grad` added back onto the pixels
/// they were taken from.
pub(super) fn conv_input_grad(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    spec: ConvSpec,
) -> FlexTensor {
    let [_, c_in, h, w] = dims4(x);
    let [c_out, _, kernel, _] = dims4(weight);
    if spec.keeps_size(kernel) {
        return conv_forward(grad, &turned_kernel(weight), None, spec);
    }
    let [b, _, ho, wo] = dims4(grad);
    let (weight, grad) = (contiguous(weight), contiguous(grad));
    let (weight, dy) = (f32s(&weight), f32s(&grad));
    let (taps, plane) = (c_in * kernel * kernel, ho * wo);
    let weight_t = Mat::row_major(weight, c_out, taps).t();
    let images_parallel = images_in_parallel(b);
    let (dx, _) = build(b * c_in * h * w, c_in * h * w, images_parallel, |i, dst| {
        let g = Mat::row_major(&dy[i * c_out * plane..][..c_out * plane], c_out, plane);
        with_thread_buffers(&COLUMNS, |cols| {
            cols.resize(taps * plane, 0.0);
            let cols_grad = MatMut::row_major(cols, taps, plane);
            matmul(cols_grad, weight_t, g, false, !images_parallel);
            dst.push_filled(c_in * h * w, 0.0);
            col2im_add(cols, [c_in, h, w], spec, dst.written_mut());
        })
    });
    f32_tensor(dx, vec![b, c_in, h, w])
}

/// Walks the rows of one image's strided 3×3 columns (the layout of [`with_strided_columns`]):
/// for each channel, tap and output row, `visit(row, line, inside, first)` gets the row's span in
/// the columns, the span of the input line it reads (`None` in the padding), the outputs of the
/// row that read inside that line, and the line's pixel the first of them reads (the rest follow
/// `spec.stride` apart). The columns' gather and col2im's scatter share this walk.
fn for_each_column_row(
    [c, h, w]: [usize; 3],
    spec: ConvSpec,
    mut visit: impl FnMut(Range<usize>, Option<Range<usize>>, Range<usize>, usize),
) {
    let [ho, wo] = spec.output_size(3, [h, w]);
    let plane = ho * wo;
    for channel in 0..c {
        for tap in 0..9 {
            let (inside, first) = spec.inside(tap % 3, 1, w, wo);
            let row_start = (channel * 9 + tap) * plane;
            for oy in 0..ho {
                let row = row_start + oy * wo..row_start + (oy + 1) * wo;
                let line = spec
                    .source(oy, tap / 3, 0, h)
                    .map(|y| channel * h * w + y * w..channel * h * w + (y + 1) * w);
                visit(row, line, inside.clone(), first);
            }
        }
    }
}

/// Calls `f` with one image `[c, h, w]`'s 3×3 patches under `spec` as columns `[c · 9, ho · wo]`
/// (the output size): row `c · 9 + ky · 3 + kx` holds, at column `oy · wo + ox`, the pixel
/// `(oy · stride + ky − top, ox · stride + kx − left)` of channel `c`, or 0 in the padding.
fn with_strided_columns<R>(
    image: &[f32],
    [c, h, w]: [usize; 3],
    spec: ConvSpec,
    f: impl FnOnce(Mat) -> R,
) -> R {
    let [ho, wo] = spec.output_size(3, [h, w]);
    let plane = ho * wo;
    let run = |cols: &mut Vec<f32>| {
        cols.resize(c * 9 * plane, 0.0);
        for_each_column_row([c, h, w], spec, |row, line, inside, first| {
            let out = &mut cols[row];
            let Some(line) = line else {
                out.fill(0.0);
                return;
            };
            out[..inside.start].fill(0.0);
            out[inside.end..].fill(0.0);
            let taken = image[line][first..].iter().step_by(spec.stride);
            for (v, &x) in out[inside].iter_mut().zip(taken) {
                *v = x;
            }
        });
        f(Mat::row_major(cols, c * 9, plane))
    };
    with_thread_buffers(&COLUMNS, run)
}

/// Adds patch gradients `cols` (laid out as [`with_strided_columns`]' columns) onto the pixels
/// they were taken from, in `image` `[c, h, w]`.
fn col2im_add(cols: &[f32], dims: [usize; 3], spec: ConvSpec, image: &mut [f32]) {
    for_each_column_row(dims, spec, |row, line, inside, first| {
        let Some(line) = line else {
            return;
        };
        let taken = image[line][first..].iter_mut().step_by(spec.stride);
        for (x, &g) in taken.zip(&cols[row][inside]) {
            *x += g;
        }
    });
}

/// The gradient summed over batch and pixels: `[c_out]`.
pub(super) fn conv_bias_grad(grad: &FlexTensor) -> FlexTensor {
    let [b, c_out, h, w] = dims4(grad);
    let g = Flex::float_reshape(grad.clone(), Shape::new([b, c_out, h * w]));
    let summed = Flex::float_sum_dim(Flex::float_sum_dim(g, 2), 0);
    Flex::float_reshape(summed, Shape::new([c_out]))
}
