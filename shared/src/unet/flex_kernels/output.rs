//! Kernel outputs built without zero-filling them first. `vec![0.0; n]` writes every output once
//! more before the kernel does; measured on cifar training at batch 64, that pass was 10 % of the
//! step. [`build`] hands each task a [`Writer`] over its chunk of uninitialised storage, which
//! only appends, front to back, and checks that the whole chunk was written before the vector
//! takes its length.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::gemm::{Mat, product_into};

/// Appends values to one chunk of a kernel's output, front to back.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    slots: &'a mut [MaybeUninit<f32>],
    written: usize,
}

impl Writer<'_> {
    /// The next `n` slots, counted as written: the caller writes all of them.
    #[inline(always)]
    fn next(&mut self, n: usize) -> &mut [MaybeUninit<f32>] {
        let start = self.written;
        self.written += n;
        &mut self.slots[start..start + n]
    }

    /// Appends `f(x)` for each `x` of `src`.
    #[inline(always)]
    pub fn push_map(&mut self, src: &[f32], f: impl Fn(f32) -> f32) {
        for (d, &x) in self.next(src.len()).iter_mut().zip(src) {
            d.write(f(x));
        }
    }

    /// Appends `f(a, b)` for each pair of `a` and `b` (of equal lengths).
    #[inline(always)]
    pub fn push_map2(&mut self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
        assert_eq!(
            a.len(),
            b.len(),
            "push_map2 over slices of different lengths"
        );
        for ((d, &a), &b) in self.next(a.len()).iter_mut().zip(a).zip(b) {
            d.write(f(a, b));
        }
    }

    /// Appends `n` copies of `value`.
    #[inline(always)]
    pub fn push_filled(&mut self, n: usize, value: f32) {
        for d in self.next(n) {
            d.write(value);
        }
    }

    /// Appends the row-major product `lhs · rhs`.
    pub fn push_product(&mut self, lhs: Mat, rhs: Mat, parallel: bool) {
        product_into(self.next(lhs.rows * rhs.cols), lhs, rhs, parallel);
    }

    /// The values appended so far.
    #[inline(always)]
    pub fn written_mut(&mut self) -> &mut [f32] {
        let written = &mut self.slots[..self.written];
        // SAFETY: every slot before `written` was initialised by a push method (each writes all
        // the slots that `next` counts), and `MaybeUninit<f32>` has `f32`'s layout.
        unsafe { &mut *(written as *mut [MaybeUninit<f32>] as *mut [f32]) }
    }
}

/// A vector of `len` floats made of consecutive `chunk`-sized pieces (the last one may be
/// shorter), piece `i` written by `fill(i, writer)`, on rayon's threads when `parallel`. Also
/// returns what each `fill` returned.
///
/// # Panics
/// If a `fill` leaves its piece partly unwritten, writes past it, or panics.
pub(crate) fn build<T: Send>(
    len: usize,
    chunk: usize,
    parallel: bool,
    fill: impl Fn(usize, &mut Writer) -> T + Sync,
) -> (Vec<f32>, Vec<T>) {
    let mut data: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return (data, Vec::new());
    }
    assert!(chunk > 0, "build: chunks of 0 elements");
    let slots = &mut data.spare_capacity_mut()[..len];
    let run = |(i, slots): (usize, &mut [MaybeUninit<f32>])| {
        let mut writer = Writer { slots, written: 0 };
        let result = fill(i, &mut writer);
        assert_eq!(
            writer.written,
            writer.slots.len(),
            "kernel output piece {i} was not written whole"
        );
        result
    };
    let results = if parallel {
        slots.par_chunks_mut(chunk).enumerate().map(run).collect()
    } else {
        slots.chunks_mut(chunk).enumerate().map(run).collect()
    };
    // SAFETY: the pieces cover the first `len` slots, and each was checked to be written whole
    // (a writer only appends, so `written == len` means every slot of the piece was written).
    unsafe { data.set_len(len) };
    (data, results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_joins_the_pieces_in_order() {
        for parallel in [false, true] {
            let (data, sums) = build(10, 4, parallel, |i, w| {
                let src: Vec<f32> = (0..4).map(|j| (i * 4 + j) as f32).collect();
                let n = (10 - i * 4).min(4);
                w.push_map(&src[..n], |x| x * 2.0);
                w.written_mut().iter().sum::<f32>()
            });
            let want: Vec<f32> = (0..10).map(|x| 2.0 * x as f32).collect();
            assert_eq!(data, want);
            assert_eq!(sums, vec![12.0, 44.0, 34.0]);
        }
    }

    #[test]
    #[should_panic(expected = "not written whole")]
    fn build_refuses_a_partly_written_piece() {
        build(8, 4, false, |_, w| w.push_map(&[1.0; 3], |x| x));
    }

    #[test]
    #[should_panic]
    fn a_writer_cannot_write_past_its_piece() {
        build(8, 4, false, |_, w| w.push_map(&[1.0; 5], |x| x));
    }
}
