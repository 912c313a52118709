//! The row kernels: for a run of weight rows, each row's products with `T`
//! activation rows, in either numerics.
//!
//! [`rows`] runs the AVX2 + FMA + F16C kernels (`avx2.rs`) when the CPU has
//! them (checked at run time, so one binary serves every x86-64 machine)
//! and the portable code otherwise; tests run both on every format.

use super::q8::{self, Q8Row};
use super::Numerics;
use crate::gguf::{dequantize_into, GgmlType};

/// Partial sums of the portable dot product.
const LANES: usize = 16;

/// `sum(a[i] * b[i])` in `LANES` partial sums: the portable kernel's dot.
#[inline(always)]
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// What the rows are multiplied with.
pub(crate) enum Activations<'a> {
    /// `x`: `[T, cols]` row-major; `xsum`: `[T, cols / 32]`, the sum of each
    /// block of 32 (the min term of Q4_0 / Q4_1 rows), empty when `cols` is
    /// not a multiple of 32.
    F32 { x: &'a [f32], xsum: &'a [f32] },
    /// One quantised row per token.
    Q8(&'a [Q8Row]),
}

/// Sums of each block of 32 activations, `[T, cols / 32]` (empty when rows
/// are not whole blocks of 32).
pub(crate) fn block_sums(x: &[f32], cols: usize) -> Vec<f32> {
    if cols == 0 || !cols.is_multiple_of(32) {
        return Vec::new();
    }
    x.chunks_exact(32).map(|b| b.iter().sum()).collect()
}

/// Products of weight rows with every activation row.
///
/// # Shapes
/// - `weights`: consecutive rows of `row_bytes` bytes (`cols` elements each)
/// - `out`: `[rows, T]` row-major (one row's `T` products together)
/// - `scratch`: at least `cols` floats (one dequantised row)
#[inline(always)]
fn portable(
    t: GgmlType,
    cols: usize,
    row_bytes: usize,
    weights: &[u8],
    x: &Activations<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let n_tok = n_tokens(x, cols);
    let w = &mut scratch[..cols];
    for (row, o) in weights
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(n_tok.max(1)))
    {
        match x {
            Activations::F32 { x, .. } => {
                dequantize_into(t, row, w);
                for (y, xt) in o.iter_mut().zip(x.chunks_exact(cols)) {
                    *y = dot_f32(w, xt);
                }
            }
            Activations::Q8(rows) => {
                for (y, xq) in o.iter_mut().zip(rows.iter()) {
                    *y = q8::dot(t, row, xq);
                }
            }
        }
    }
}

fn n_tokens(x: &Activations<'_>, cols: usize) -> usize {
    match x {
        Activations::F32 { x, .. } => x.len() / cols.max(1),
        Activations::Q8(rows) => rows.len(),
    }
}

/// [`portable`] with AVX2: fused kernels for Q4_0, Q4_1 and Q8_0 rows, a
/// dequantised row and an AVX2 dot for the other formats, the same integer
/// code (compiled for AVX2) for q8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn fast(
    t: GgmlType,
    cols: usize,
    row_bytes: usize,
    weights: &[u8],
    x: &Activations<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    use super::avx2;
    let n_tok = n_tokens(x, cols);
    let w = &mut scratch[..cols];
    let nb = cols / 32;
    for (row, o) in weights
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(n_tok.max(1)))
    {
        match x {
            Activations::F32 { x, xsum } => {
                let fused = nb > 0 && xsum.len() == nb * n_tok;
                match t {
                    GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 if fused => {
                        let sums = xsum.chunks_exact(nb);
                        for ((y, xt), xs) in o.iter_mut().zip(x.chunks_exact(cols)).zip(sums) {
                            // SAFETY: this function runs only where the CPU
                            // has AVX2, FMA and F16C; the slices bound every
                            // access.
                            *y = unsafe {
                                match t {
                                    GgmlType::Q4_0 => avx2::dot_q4(row, xt, xs, false),
                                    GgmlType::Q4_1 => avx2::dot_q4(row, xt, xs, true),
                                    _ => avx2::dot_q8_0(row, xt),
                                }
                            };
                        }
                    }
                    _ => {
                        dequantize_into(t, row, w);
                        for (y, xt) in o.iter_mut().zip(x.chunks_exact(cols)) {
                            // SAFETY: as above
                            *y = unsafe { avx2::dot_f32(w, xt) };
                        }
                    }
                }
            }
            Activations::Q8(rows) => {
                for (y, xq) in o.iter_mut().zip(rows.iter()) {
                    // SAFETY: as above
                    *y = unsafe {
                        match t {
                            GgmlType::Q4_0 => avx2::dot_q4_q8(row, &xq.d, &xq.s, &xq.qs, false),
                            GgmlType::Q4_1 => avx2::dot_q4_q8(row, &xq.d, &xq.s, &xq.qs, true),
                            GgmlType::Q8_0 => avx2::dot_q8_0_q8(row, &xq.d, &xq.qs),
                            _ => q8::dot(t, row, xq),
                        }
                    };
                }
            }
        }
    }
}

/// Whether the AVX2 copy runs on this CPU.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs the fastest kernel this CPU allows (`portable` forces the portable
/// one, for tests that compare the two).
///
/// # Shapes
/// as [`portable`]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows(
    t: GgmlType,
    cols: usize,
    row_bytes: usize,
    weights: &[u8],
    x: &Activations<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
    force_portable: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if !force_portable && has_avx2() {
        // SAFETY: the CPU has every feature the kernel was compiled for.
        unsafe { fast(t, cols, row_bytes, weights, x, out, scratch) };
        return;
    }
    let _ = force_portable;
    portable(t, cols, row_bytes, weights, x, out, scratch)
}

/// The numerics a product runs in, for a weight type: q8 only where the
/// weights are quantised (float weights take f32 activations in llama.cpp too).
pub(crate) fn effective(numerics: Numerics, t: GgmlType) -> Numerics {
    match q8::Q8Kind::for_weights(t) {
        Some(_) => numerics,
        None => Numerics::F32,
    }
}
