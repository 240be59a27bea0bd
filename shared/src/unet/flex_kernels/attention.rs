//! Multi-head scaled dot-product attention, `softmax(q kᵀ / √d) v` per head, one image at a time
//! with its score matrices in a per-thread buffer that stays in cache. `q`, `k` and `v` are the
//! projections' `[batch, len, heads · d]` outputs: each head is read and written as a strided
//! column block, so heads are never split into a tensor of their own.
//!
//! The forward pass keeps, per row, the log of the softmax denominator; the backward pass
//! recomputes the weights from it instead of keeping `batch · heads · len²` of them, then
//! `dV = Wᵀ dO`, `dW = dO Vᵀ`, `dS = W ⊙ (dW − rowsum(dW ⊙ W)) / √d`, `dQ = dS K`, `dK = dSᵀ Q`.

use std::cell::RefCell;

use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::gemm::{Mat, MatMut, matmul};
use super::{contiguous, exp, f32_tensor, f32s, images_in_parallel, with_thread_buffers};

thread_local! {
    /// Each thread's score buffers, reused from image to image.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with a scratch slice of `n` floats (contents unspecified).
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let run = |buffer: &mut Vec<f32>| {
        if buffer.len() < n {
            buffer.resize(n, 0.0);
        }
        f(&mut buffer[..n])
    };
    with_thread_buffers(&SCRATCH, run)
}

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
struct Heads {
    batch: usize,
    len: usize,
    channels: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

impl Heads {
    fn of(q: &FlexTensor, heads: usize) -> Self {
        let shape = q.layout().shape();
        let (batch, len, channels) = (shape[0], shape[1], shape[2]);
        let head_dim = channels / heads.max(1);
        Self {
            batch,
            len,
            channels,
            heads,
            head_dim,
            scale: (1.0 / (head_dim as f64).sqrt()) as f32,
        }
    }

    /// Elements of one image.
    fn image(&self) -> usize {
        self.len * self.channels
    }

    /// Image `i` of a `[batch, len, channels]` tensor.
    fn image_of<'a>(&self, x: &'a [f32], i: usize) -> &'a [f32] {
        &x[i * self.image()..][..self.image()]
    }

    /// Head `h` of one image's `[len, channels]` block, as a `len × head_dim` view.
    fn view<'a>(&self, image: &'a [f32], h: usize) -> Mat<'a> {
        Mat {
            data: &image[h * self.head_dim..],
            rows: self.len,
            cols: self.head_dim,
            row_stride: self.channels,
            col_stride: 1,
        }
    }

    fn view_mut<'a>(&self, image: &'a mut [f32], h: usize) -> MatMut<'a> {
        MatMut {
            data: &mut image[h * self.head_dim..],
            rows: self.len,
            cols: self.head_dim,
            row_stride: self.channels,
        }
    }

    /// Runs `f(i, parallel)` for every image: one image per rayon thread when there are enough
    /// images (each product on one thread), else one after another with parallel products.
    fn for_each_image<T: Send>(&self, chunks: Vec<T>, f: impl Fn(usize, T, bool) + Sync + Send) {
        if images_in_parallel(self.batch) {
            chunks
                .into_par_iter()
                .enumerate()
                .for_each(|(i, c)| f(i, c, false));
        } else {
            for (i, c) in chunks.into_iter().enumerate() {
                f(i, c, true);
            }
        }
    }
}

/// The attention output `[batch, len, channels]` and each (image, head, row)'s log-sum-exp of
/// its scaled scores.
pub(super) fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    heads: usize,
) -> (FlexTensor, Vec<f32>) {
    let g = Heads::of(q, heads);
    let (q, k, v) = (contiguous(q), contiguous(k), contiguous(v));
    let (qs, ks, vs) = (f32s(&q), f32s(&k), f32s(&v));
    let (image, len) = (g.image(), g.len);
    let mut out = vec![0.0f32; g.batch * image];
    let mut lse = vec![0.0f32; g.batch * g.heads * len];
    if image > 0 {
        let chunks = out
            .chunks_mut(image)
            .zip(lse.chunks_mut(g.heads * len))
            .collect();
        g.for_each_image(
            chunks,
            |i, (out, lse): (&mut [f32], &mut [f32]), parallel| {
                let (qi, ki, vi) = (g.image_of(qs, i), g.image_of(ks, i), g.image_of(vs, i));
                with_scratch(len * len, |scores| {
                    for h in 0..g.heads {
                        let q_k = (g.view(qi, h), g.view(ki, h).t());
                        matmul(
                            MatMut::row_major(scores, len, len),
                            q_k.0,
                            q_k.1,
                            false,
                            parallel,
                        );
                        let lse = &mut lse[h * len..][..len];
                        pulp::Arch::new().dispatch(SoftmaxRows {
                            scores: &mut *scores,
                            scale: g.scale,
                            lse,
                        });
                        let weights = Mat::row_major(scores, len, len);
                        matmul(g.view_mut(out, h), weights, g.view(vi, h), false, parallel);
                    }
                });
            },
        );
    }
    (f32_tensor(out, vec![g.batch, len, g.channels]), lse)
}

/// The gradients of `q`, `k` and `v` given the output's `grad`.
pub(super) fn attention_backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    lse: &[f32],
    heads: usize,
    grad: &FlexTensor,
) -> [FlexTensor; 3] {
    let g = Heads::of(q, heads);
    let (q, k, v, dout) = (
        contiguous(q),
        contiguous(k),
        contiguous(v),
        contiguous(grad),
    );
    let (qs, ks, vs, dos) = (f32s(&q), f32s(&k), f32s(&v), f32s(&dout));
    let (image, len) = (g.image(), g.len);
    let mut dq = vec![0.0f32; g.batch * image];
    let mut dk = vec![0.0f32; g.batch * image];
    let mut dv = vec![0.0f32; g.batch * image];
    if image > 0 {
        let chunks = dq
            .chunks_mut(image)
            .zip(dk.chunks_mut(image).zip(dv.chunks_mut(image)))
            .collect();
        g.for_each_image(chunks, |i, (dq, (dk, dv)), parallel| {
            let (qi, ki) = (g.image_of(qs, i), g.image_of(ks, i));
            let (vi, doi) = (g.image_of(vs, i), g.image_of(dos, i));
            with_scratch(2 * len * len, |scratch| {
                let (w, dw) = scratch.split_at_mut(len * len);
                for h in 0..g.heads {
                    let (qh, kh, vh, doh) =
                        (g.view(qi, h), g.view(ki, h), g.view(vi, h), g.view(doi, h));
                    let lse = &lse[(i * g.heads + h) * len..][..len];
                    matmul(MatMut::row_major(w, len, len), qh, kh.t(), false, parallel);
                    pulp::Arch::new().dispatch(WeightsFromLse {
                        scores: &mut *w,
                        scale: g.scale,
                        lse,
                    });
                    let weights = Mat::row_major(w, len, len);
                    matmul(g.view_mut(dv, h), weights.t(), doh, false, parallel);
                    matmul(
                        MatMut::row_major(dw, len, len),
                        doh,
                        vh.t(),
                        false,
                        parallel,
                    );
                    pulp::Arch::new().dispatch(ScoreGradRows {
                        w: &*w,
                        dw: &mut *dw,
                        scale: g.scale,
                        len,
                    });
                    let ds = Mat::row_major(dw, len, len);
                    matmul(g.view_mut(dq, h), ds, kh, false, parallel);
                    matmul(g.view_mut(dk, h), ds.t(), qh, false, parallel);
                }
            });
        });
    }
    let shape = || vec![g.batch, len, g.channels];
    [
        f32_tensor(dq, shape()),
        f32_tensor(dk, shape()),
        f32_tensor(dv, shape()),
    ]
}

/// `Σ a · b` in sixteen lanes, so that the loop vectorises.
#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a` in sixteen lanes.
#[inline(always)]
fn sum16(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let a16 = a.chunks_exact(16);
    let tail: f32 = a16.remainder().iter().sum();
    for x in a16 {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

simd_kernel! {
    /// Each row of `scores` (`lse.len()` rows) becomes `softmax(scale · row)`; `lse` gets
    /// `log Σ exp(scale · row)`.
    struct SoftmaxRows<'a> { scores: &'a mut [f32], scale: f32, lse: &'a mut [f32] } -> () {
        let len = scores.len() / lse.len().max(1);
        for (row, lse) in scores.chunks_mut(len).zip(lse) {
            // Sixteen lanes, and a comparison rather than `f32::max` (whose NaN rule keeps the
            // loop scalar); the scale is positive, so max(scale · s) = scale · max(s).
            let mut lanes = [f32::NEG_INFINITY; 16];
            let split = len / 16 * 16;
            for base in (0..split).step_by(16) {
                for (m, &s) in lanes.iter_mut().zip(&row[base..base + 16]) {
                    *m = if s > *m { s } else { *m };
                }
            }
            let mut max = f32::NEG_INFINITY;
            for &s in lanes.iter().chain(&row[split..]) {
                max = if s > max { s } else { max };
            }
            let max = max * scale;
            for s in row.iter_mut() {
                *s = exp(*s * scale - max);
            }
            let sum = sum16(row);
            let inv = 1.0 / sum;
            for s in row.iter_mut() {
                *s *= inv;
            }
            *lse = max + sum.ln();
        }
    }
}

simd_kernel! {
    /// The softmax weights again from the scores and each row's log-sum-exp.
    struct WeightsFromLse<'a> { scores: &'a mut [f32], scale: f32, lse: &'a [f32] } -> () {
        let len = scores.len() / lse.len().max(1);
        for (row, &lse) in scores.chunks_mut(len).zip(lse) {
            for s in row.iter_mut() {
                *s = exp(*s * scale - lse);
            }
        }
    }
}

simd_kernel! {
    /// The chain rule through the scaled softmax, row by row, in place in `dw`:
    /// `dS = scale · W ⊙ (dW − Σ dW ⊙ W)`.
    struct ScoreGradRows<'a> { w: &'a [f32], dw: &'a mut [f32], scale: f32, len: usize } -> () {
        for (w, d) in w.chunks(len).zip(dw.chunks_mut(len)) {
            let dot = dot16(w, d);
            for (d, &w) in d.iter_mut().zip(w) {
                *d = scale * w * (*d - dot);
            }
        }
    }
}
