//! The matrix product of the wasm module built with relaxed SIMD (`+relaxed-simd`): a packed
//! GEMM whose micro-kernel accumulates with `f32x4.relaxed_madd`, which engines on CPUs with
//! fused multiply-add run as one instruction. gemm's simd128 micro-kernels, the product of the
//! plain `simd128` module, multiply and add separately; a worker spends about three quarters of
//! its time in them (benches/browser-profile.mjs).
//!
//! Blocking as in GotoBLAS: `KC` of the inner dimension at a time, the right-hand side packed in
//! panels of `NR` columns, the left-hand side in `MC`-row blocks of `MR`-row panels; the
//! micro-kernel keeps an `MR × NR` tile of the row-major output in eight registers. Built
//! natively only for its tests, on four plain lanes with the same packing and loops.
#![allow(unsafe_code)]

use super::gemm::Mat;
use lanes::F4;

/// Rows of a micro-tile: one broadcast value each per step of the inner dimension.
const MR: usize = 4;
/// Columns of a micro-tile: two 4-lane vectors.
const NR: usize = 8;
/// Inner-dimension block: a packed `KC × NR` panel (8 KiB) stays in L1.
const KC: usize = 256;
/// Rows per packed left-hand block (`MC × KC`, 64 KiB).
const MC: usize = 64;

#[cfg(all(target_arch = "wasm32", target_feature = "relaxed-simd"))]
mod lanes {
    use core::arch::wasm32::{f32x4_relaxed_madd, f32x4_splat, v128, v128_load, v128_store};

    /// Four f32 lanes in a wasm SIMD register.
    #[derive(Clone, Copy)]
    pub(super) struct F4(v128);

    impl F4 {
        #[inline(always)]
        pub fn splat(x: f32) -> Self {
            Self(f32x4_splat(x))
        }

        /// # Safety
        /// `p` points to four readable floats.
        #[inline(always)]
        pub unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract; v128.load has no alignment requirement.
            Self(unsafe { v128_load(p.cast()) })
        }

        /// # Safety
        /// `p` points to four writable floats.
        #[inline(always)]
        pub unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller's contract.
            unsafe { v128_store(p.cast(), self.0) }
        }

        /// `self + a · b`, fused where the engine's CPU can.
        #[inline(always)]
        pub fn madd(self, a: Self, b: Self) -> Self {
            Self(f32x4_relaxed_madd(a.0, b.0, self.0))
        }
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "relaxed-simd")))]
mod lanes {
    /// Four f32 lanes, for the native tests of the packing and the loops.
    #[derive(Clone, Copy)]
    pub(super) struct F4([f32; 4]);

    impl F4 {
        pub fn splat(x: f32) -> Self {
            Self([x; 4])
        }

        /// # Safety
        /// `p` points to four readable floats.
        pub unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller's contract.
            Self(unsafe { p.cast::<[f32; 4]>().read_unaligned() })
        }

        /// # Safety
        /// `p` points to four writable floats.
        pub unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller's contract.
            unsafe { p.cast::<[f32; 4]>().write_unaligned(self.0) }
        }

        pub fn madd(self, a: Self, b: Self) -> Self {
            Self(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], self.0[i])))
        }
    }
}

/// `dst (+)= lhs · rhs`, `dst` row-major with rows `dst_row_stride` apart.
///
/// # Safety
/// As `super::gemm::raw_gemm`: `dst` holds `lhs.rows` rows of `rhs.cols` writable floats,
/// `dst_row_stride` apart, not overlapping the inputs and initialised when `accumulate`;
/// `lhs.cols` equals `rhs.rows`; both views lie inside their slices; no dimension is 0.
pub(super) unsafe fn gemm(
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let (lhs_rs, lhs_cs, rhs_rs, rhs_cs) = (
        lhs.row_stride,
        lhs.col_stride,
        rhs.row_stride,
        rhs.col_stride,
    );
    let (lhs, rhs) = (lhs.data.as_ptr(), rhs.data.as_ptr());
    let n_panels = n.div_ceil(NR);
    let mut packed_rhs = vec![0.0f32; KC.min(k) * n_panels * NR];
    let mut packed_lhs = vec![0.0f32; KC.min(k) * MC.min(m).next_multiple_of(MR)];
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        // The right-hand rows pc..pc + kc, as panels of NR columns: row p of panel jp is
        // rhs[pc + p][jp·NR ..][..NR], zero past column n.
        for jp in 0..n_panels {
            let panel = &mut packed_rhs[jp * kc * NR..][..kc * NR];
            let cols = NR.min(n - jp * NR);
            for (p, row) in panel.chunks_exact_mut(NR).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j < cols {
                        // SAFETY: row pc + p < k and column jp·NR + j < n: inside `rhs`.
                        unsafe { *rhs.add((pc + p) * rhs_rs + (jp * NR + j) * rhs_cs) }
                    } else {
                        0.0
                    };
                }
            }
        }
        for ic in (0..m).step_by(MC) {
            let mc = MC.min(m - ic);
            let m_panels = mc.div_ceil(MR);
            // The left-hand rows ic..ic + mc, columns pc..pc + kc, as panels of MR rows:
            // step p of panel ip holds lhs[ic + ip·MR ..][..MR][pc + p], zero past row m.
            for ip in 0..m_panels {
                let panel = &mut packed_lhs[ip * kc * MR..][..kc * MR];
                let rows = MR.min(mc - ip * MR);
                for (p, step) in panel.chunks_exact_mut(MR).enumerate() {
                    for (i, x) in step.iter_mut().enumerate() {
                        *x = if i < rows {
                            // SAFETY: row ic + ip·MR + i < m and column pc + p < k.
                            unsafe { *lhs.add((ic + ip * MR + i) * lhs_rs + (pc + p) * lhs_cs) }
                        } else {
                            0.0
                        };
                    }
                }
            }
            let add = accumulate || pc > 0;
            for jp in 0..n_panels {
                let b = &packed_rhs[jp * kc * NR..][..kc * NR];
                let cols = NR.min(n - jp * NR);
                for ip in 0..m_panels {
                    let a = &packed_lhs[ip * kc * MR..][..kc * MR];
                    let rows = MR.min(mc - ip * MR);
                    // SAFETY: rows ic + ip·MR .. + rows < m, columns jp·NR .. + cols <= n.
                    let tile = unsafe { dst.add((ic + ip * MR) * dst_row_stride + jp * NR) };
                    // SAFETY: the tile lies inside `dst` (above); `a` and `b` hold kc steps.
                    unsafe { micro_kernel(kc, a, b, tile, dst_row_stride, rows, cols, add) };
                }
            }
        }
    }
}

/// One `MR × NR` tile: `tile (+)= a · b` over `kc` steps of packed panels, writing the
/// `rows × cols` part that lies inside the output.
///
/// # Safety
/// `tile` points to `rows` rows of `cols` writable floats, `row_stride` apart (initialised when
/// `add`); `a` holds `kc · MR` floats and `b` `kc · NR`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn micro_kernel(
    kc: usize,
    a: &[f32],
    b: &[f32],
    tile: *mut f32,
    row_stride: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    debug_assert!(a.len() == kc * MR && b.len() == kc * NR);
    let mut acc = [[F4::splat(0.0); 2]; MR];
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for p in 0..kc {
        // SAFETY: p < kc, so a[p·MR..][..MR] and b[p·NR..][..NR] are inside the panels.
        unsafe {
            let b0 = F4::load(b.add(p * NR));
            let b1 = F4::load(b.add(p * NR + 4));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = F4::splat(*a.add(p * MR + i));
                row[0] = row[0].madd(ai, b0);
                row[1] = row[1].madd(ai, b1);
            }
        }
    }
    if rows == MR && cols == NR {
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: a full tile: row i has NR writable floats at tile + i·row_stride.
            unsafe {
                let out = tile.add(i * row_stride);
                let (mut r0, mut r1) = (row[0], row[1]);
                if add {
                    r0 = r0.madd(F4::load(out), F4::splat(1.0));
                    r1 = r1.madd(F4::load(out.add(4)), F4::splat(1.0));
                }
                r0.store(out);
                r1.store(out.add(4));
            }
        }
    } else {
        let mut full = [0.0f32; MR * NR];
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: `full` holds MR rows of NR floats.
            unsafe {
                row[0].store(full.as_mut_ptr().add(i * NR));
                row[1].store(full.as_mut_ptr().add(i * NR + 4));
            }
        }
        for (i, values) in full.chunks_exact(NR).take(rows).enumerate() {
            for (j, &v) in values.iter().take(cols).enumerate() {
                // SAFETY: i < rows, j < cols: inside the tile.
                unsafe {
                    let out = tile.add(i * row_stride + j);
                    *out = if add { *out + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gemm` against the product by definition (f64), for shapes that cross every block and
    /// panel edge, strided (transposed) inputs, a wider output row and accumulation.
    #[test]
    fn packed_product_matches_the_definition() {
        let value =
            |i: usize, seed: usize| ((i * 7919 + seed * 104_729) % 1009) as f32 / 504.5 - 1.0;
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 9),
            (67, 300, 17),
            (130, 513, 8),
            (4, 256, 16),
        ] {
            for &(transpose_lhs, accumulate) in &[(false, false), (true, true)] {
                let lhs: Vec<f32> = (0..m * k).map(|i| value(i, 1)).collect();
                let rhs: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
                let (lhs_rs, lhs_cs) = if transpose_lhs { (1, m) } else { (k, 1) };
                let stride = n + 3;
                let initial: Vec<f32> = (0..m * stride).map(|i| value(i, 3)).collect();
                let mut dst = initial.clone();
                // SAFETY: every view lies inside its vector; dst has m rows of `stride` floats.
                unsafe {
                    gemm(
                        dst.as_mut_ptr(),
                        stride,
                        Mat {
                            data: &lhs,
                            rows: m,
                            cols: k,
                            row_stride: lhs_rs,
                            col_stride: lhs_cs,
                        },
                        Mat::row_major(&rhs, k, n),
                        accumulate,
                    )
                };
                for i in 0..m {
                    for j in 0..stride {
                        let got = dst[i * stride + j] as f64;
                        let want = if j < n {
                            let sum: f64 = (0..k)
                                .map(|p| {
                                    lhs[i * lhs_rs + p * lhs_cs] as f64 * rhs[p * n + j] as f64
                                })
                                .sum();
                            sum + if accumulate {
                                initial[i * stride + j] as f64
                            } else {
                                0.0
                            }
                        } else {
                            initial[i * stride + j] as f64 // past column n: untouched
                        };
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}×{k}×{n} ({transpose_lhs}, {accumulate}) at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
