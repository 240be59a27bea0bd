//! Matrix products through the `gemm` crate (the GEMM that flex's own matmul calls), writing
//! into a caller's slice: the convolutions put each image's output straight into the batch
//! tensor, and sum weight gradients in place. `gemm::gemm` takes raw
//! pointers; [`matmul`] and [`product_into`] check every bound first. This module,
//! [`super::relaxed_gemm`] and [`super::output`] are the crate's only `unsafe` code.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

/// Floating-point operations (2·m·n·k per product) of every product through [`raw_gemm`] in this
/// process; [`matmul_flops`] reads it.
static FLOPS: AtomicU64 = AtomicU64::new(0);

/// The floating-point operations the kernels' matrix products have done in this process so far
/// (2·m·n·k per product of m × k by k × n): the convolutions and attention's score products,
/// not burn's own matmuls (the linear layers). The difference over a forward pass is its GEMM
/// work, which `ddpm bench --ceiling` divides by its time.
pub fn matmul_flops() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// A strided view of a float32 matrix: element `(i, j)` is `data[i · row_stride + j · col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, as a view of the same data.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`, with strides that fit pointer offsets.
    fn in_bounds(&self) -> bool {
        let fits = |s: usize| s <= isize::MAX as usize;
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        fits(self.row_stride)
            && fits(self.col_stride)
            && (self.rows - 1)
                .checked_mul(self.row_stride)
                .zip((self.cols - 1).checked_mul(self.col_stride))
                .and_then(|(a, b)| a.checked_add(b))
                .is_some_and(|last| last < self.data.len())
    }
}

/// A writable matrix with rows `row_stride` apart: element `(i, j)` is
/// `data[i · row_stride + j]`, as a block of columns inside a wider row-major matrix.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// `data` as a row-major `rows × cols` matrix.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }

    /// Whether the rows lie inside `data` without overlapping each other.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.row_stride >= self.cols
                && self.row_stride <= isize::MAX as usize
                && (self.rows - 1)
                    .checked_mul(self.row_stride)
                    .and_then(|a| a.checked_add(self.cols))
                    .is_some_and(|end| end <= self.data.len()))
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` with `accumulate`. `parallel` spreads the product over
/// rayon's threads when it is large (`PARALLEL_FLOPS`); callers that already run one product per
/// thread pass `false`.
///
/// # Panics
/// If the shapes disagree or a view reaches outside its slice.
pub(crate) fn matmul(dst: MatMut, lhs: Mat, rhs: Mat, accumulate: bool, parallel: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions {k} and {}", rhs.rows);
    assert!(
        dst.rows == m && dst.cols == n,
        "matmul: output of {m} × {n}"
    );
    assert!(
        dst.in_bounds() && lhs.in_bounds() && rhs.in_bounds(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.row_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: `dst`'s rows were checked to lie inside its exclusively borrowed slice without
    // overlapping; the slice outlives the call.
    unsafe {
        raw_gemm(
            dst.data.as_mut_ptr(),
            dst.row_stride,
            lhs,
            rhs,
            accumulate,
            parallel,
        )
    };
}

/// `dst = lhs · rhs` into storage not yet initialised, row-major `lhs.rows × rhs.cols`: every
/// element of `dst` is written.
///
/// # Panics
/// If the shapes disagree or a view reaches outside its slice.
pub(crate) fn product_into(dst: &mut [MaybeUninit<f32>], lhs: Mat, rhs: Mat, parallel: bool) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions {k} and {}", rhs.rows);
    assert_eq!(dst.len(), m * n, "matmul: output of {m} × {n}");
    assert!(
        lhs.in_bounds() && rhs.in_bounds() && n <= isize::MAX as usize,
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for d in dst.iter_mut() {
            d.write(0.0);
        }
        return;
    }
    // SAFETY: `dst` is an exclusively borrowed, contiguous m × n buffer (checked length); gemm
    // only writes it (`read_dst` is false), every element, and never reads it.
    unsafe { raw_gemm(dst.as_mut_ptr().cast(), n, lhs, rhs, false, parallel) };
}

/// The smallest product (in floating-point operations) spread over several threads when a caller
/// asks for it. Below it the threads' hand-offs cost more than they save: on 2 cores, running the
/// products of a batch-1 training step (up to 19 MFLOP each) on one thread took the cifar preset
/// from 14 to 17 img/s.
const PARALLEL_FLOPS: usize = 1 << 27;

/// `gemm::gemm` for `dst (+)= lhs · rhs` with `dst` row-major, rows `dst_row_stride` apart.
///
/// # Safety
/// `dst` must point to `lhs.rows` rows of `rhs.cols` writable floats, `dst_row_stride` apart,
/// not overlapping each other or the inputs, initialised when `accumulate`; `lhs.cols` equals
/// `rhs.rows`, no dimension is 0, both views lie inside their slices (`in_bounds`) and
/// `dst_row_stride` fits `isize`.
unsafe fn raw_gemm(
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    parallel: bool,
) {
    let flops = 2 * lhs.rows as u64 * lhs.cols as u64 * rhs.cols as u64;
    FLOPS.fetch_add(flops, Ordering::Relaxed);
    // The relaxed-SIMD wasm module: the project's own GEMM on fused multiply-adds; a worker is
    // one thread.
    #[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
    // SAFETY: this function's contract.
    unsafe {
        let _ = parallel;
        super::relaxed_gemm::gemm(dst, dst_row_stride, lhs, rhs, accumulate)
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "relaxed-simd")))]
    {
        let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
        let parallel = parallel && 2 * m * n * k >= PARALLEL_FLOPS;
        let parallelism = if parallel {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the caller's contract above; `lhs` (m × k) and `rhs` (k × n) are shared borrows
        // whose every element offset lies inside their slices, with strides that fit `isize`; f32 is
        // one of the types `gemm::gemm` implements.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_row_stride as isize,
                accumulate,
                lhs.data.as_ptr(),
                lhs.col_stride as isize,
                lhs.row_stride as isize,
                rhs.data.as_ptr(),
                rhs.col_stride as isize,
                rhs.row_stride as isize,
                if accumulate { 1.0f32 } else { 0.0 },
                1.0f32,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product by definition, in f64.
    fn naive(lhs: Mat, rhs: Mat) -> Vec<f64> {
        let mut out = vec![0.0; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                out[i * rhs.cols + j] = (0..lhs.cols)
                    .map(|p| {
                        let a = lhs.data[i * lhs.row_stride + p * lhs.col_stride] as f64;
                        a * rhs.data[p * rhs.row_stride + j * rhs.col_stride] as f64
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn matmul_matches_the_definition_for_strided_views_and_accumulation() {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + seed) * 0.754_877).sin())
                .collect()
        };
        let (m, k, n) = (37, 29, 70);
        let a = values(m * k, 1.0);
        let b = values(k * n, 2.0);
        for (lhs, rhs) in [
            (Mat::row_major(&a, m, k), Mat::row_major(&b, k, n)),
            // The same data read as transposes: a (k × m)ᵀ and b (n × k)ᵀ.
            (Mat::row_major(&a, k, m).t(), Mat::row_major(&b, n, k).t()),
        ] {
            let want = naive(lhs, rhs);
            for parallel in [false, true] {
                let mut dst = vec![f32::NAN; m * n];
                matmul(MatMut::row_major(&mut dst, m, n), lhs, rhs, false, parallel);
                // The same product into the right-hand columns of a wider matrix, twice.
                let mut wide = vec![1.0f32; m * (n + 3)];
                fn columns(wide: &mut [f32], m: usize, n: usize) -> MatMut<'_> {
                    MatMut {
                        data: &mut wide[3..],
                        rows: m,
                        cols: n,
                        row_stride: n + 3,
                    }
                }
                matmul(columns(&mut wide, m, n), lhs, rhs, false, parallel);
                matmul(columns(&mut wide, m, n), lhs, rhs, true, parallel);
                let twice: Vec<f32> = wide.chunks(n + 3).flat_map(|r| r[3..].to_vec()).collect();
                assert!(wide.chunks(n + 3).all(|r| r[..3] == [1.0; 3]));
                for ((&d, &t), &w) in dst.iter().zip(&twice).zip(&want) {
                    assert!((d as f64 - w).abs() < 1e-5, "{d} vs {w}");
                    assert!((t as f64 - 2.0 * w).abs() < 2e-5, "{t} vs 2 × {w}");
                }
            }
        }
    }

    #[test]
    fn a_product_large_enough_to_run_on_several_threads_is_right() {
        let (m, k, n) = (64, 1024, 2048);
        assert!(2 * m * n * k >= PARALLEL_FLOPS);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.618).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.414).cos()).collect();
        let (lhs, rhs) = (Mat::row_major(&a, m, k), Mat::row_major(&b, k, n));
        let mut dst = vec![f32::NAN; m * n];
        matmul(MatMut::row_major(&mut dst, m, n), lhs, rhs, false, true);
        for (i, j) in [(0, 0), (5, 2047), (63, 1000), (31, 17), (40, 1500)] {
            let want: f64 = (0..k)
                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                .sum();
            let got = dst[i * n + j] as f64;
            assert!((got - want).abs() < 1e-3, "({i}, {j}): {got} vs {want}");
        }
    }

    /// A product adds its 2·m·k·n to the count (other tests' products may land in between).
    #[test]
    fn products_are_counted() {
        let (m, k, n) = (3, 5, 7);
        let (a, b) = (vec![1.0f32; m * k], vec![2.0f32; k * n]);
        let mut c = vec![0.0f32; m * n];
        let before = matmul_flops();
        matmul(
            MatMut::row_major(&mut c, m, n),
            Mat::row_major(&a, m, k),
            Mat::row_major(&b, k, n),
            false,
            false,
        );
        assert!(matmul_flops() - before >= (2 * m * k * n) as u64);
        assert_eq!(c, vec![10.0f32; m * n]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn matmul_refuses_overlapping_output_rows() {
        let a = vec![1.0f32; 4];
        let mut dst = vec![0.0f32; 4];
        let out = MatMut {
            data: &mut dst,
            rows: 2,
            cols: 2,
            row_stride: 1,
        };
        matmul(
            out,
            Mat::row_major(&a, 2, 2),
            Mat::row_major(&a, 2, 2),
            false,
            false,
        );
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn matmul_refuses_a_view_past_its_slice() {
        let a = vec![1.0f32; 6];
        let mut dst = vec![0.0f32; 4];
        let lhs = Mat::row_major(&a, 2, 3);
        let rhs = Mat {
            row_stride: 3,
            ..Mat::row_major(&a, 3, 2)
        };
        matmul(MatMut::row_major(&mut dst, 2, 2), lhs, rhs, false, false);
    }
}
