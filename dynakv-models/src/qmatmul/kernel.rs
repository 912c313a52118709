//! The row kernels: for a run of weight rows, each row's products with `T`
//! activation rows, in either numerics.
//!
//! [`rows`] runs the AVX-512 kernels (`avx512.rs`, for Q4_0 and Q4_1 rows
//! in f32 numerics) beside the AVX2 + FMA + F16C ones (`avx2.rs`) when
//! the CPU has them, the AVX2 copy where it has only those (checked at run
//! time, so one binary serves every x86-64 machine) and the portable code
//! otherwise; tests run every copy the CPU allows on every format.

use super::q8::{self, Q8Row};
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

/// Products of weight rows with every activation row: one body for every
/// copy. `AVX2` is true only in [`fast`] and [`fast512`], the copies compiled
/// for AVX2, FMA and F16C (and AVX-512 in the second, where `AVX512` sends
/// Q4_0 and Q4_1 rows to `avx512.rs`), where the products go to `avx2.rs`:
/// fused kernels for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K rows, a
/// dequantised row and an AVX2 dot for the other formats, integer products
/// for q8; the portable copy dequantises each row and dots it, and takes q8
/// in `q8.rs`.
///
/// # Shapes
/// - `weights`: consecutive rows of `row_bytes` bytes (`cols` elements each)
/// - `out`: `[rows, T]` row-major (one row's `T` products together)
/// - `scratch`: at least `cols` floats (one dequantised row)
#[inline(always)]
fn body<const AVX2: bool, const AVX512: bool>(
    t: GgmlType,
    cols: usize,
    row_bytes: usize,
    weights: &[u8],
    x: &Activations<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    let n_tok = match x {
        Activations::F32 { x, .. } => x.len() / cols.max(1),
        Activations::Q8(rows) => rows.len(),
    };
    let w = &mut scratch[..cols];
    let nb = cols / 32;
    let fused =
        AVX2 && matches!(
            t,
            GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q4K
                | GgmlType::Q6K
        ) && matches!(x, Activations::F32 { xsum, .. } if nb > 0 && xsum.len() == nb * n_tok);
    // a decode step's Q8_0 rows (the output head) two at a time
    let mut weights = weights;
    let mut out = out;
    if fused && t == GgmlType::Q8_0 && n_tok == 1 {
        if let Activations::F32 { x, .. } = x {
            let pairs = weights.len() / (2 * row_bytes);
            for (rows, o) in weights
                .chunks_exact(2 * row_bytes)
                .zip(out.chunks_exact_mut(2))
            {
                (o[0], o[1]) = q8_0_pair(&rows[..row_bytes], &rows[row_bytes..], x);
            }
            weights = &weights[pairs * 2 * row_bytes..];
            out = &mut out[pairs * 2..];
        }
    }
    for (row, o) in weights
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(n_tok.max(1)))
    {
        match x {
            Activations::F32 { x, xsum } if fused => {
                let sums = xsum.chunks_exact(nb);
                for ((y, xt), xs) in o.iter_mut().zip(x.chunks_exact(cols)).zip(sums) {
                    *y = fused_f32::<AVX512>(t, row, xt, xs);
                }
            }
            Activations::F32 { x, .. } => {
                dequantize_into(t, row, w);
                for (y, xt) in o.iter_mut().zip(x.chunks_exact(cols)) {
                    *y = dot::<AVX2>(w, xt);
                }
            }
            Activations::Q8(rows) => {
                for (y, xq) in o.iter_mut().zip(rows.iter()) {
                    *y = q8_product::<AVX2>(t, row, xq);
                }
            }
        }
    }
}

/// A fused f32-numerics row product (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
/// Q6_K); reached only from
/// [`fast`] (`fused` needs `AVX2`).
#[inline(always)]
fn fused_f32<const AVX512: bool>(t: GgmlType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{avx2, avx512};
        // SAFETY: only the AVX2 copies of `body` set `fused`, and they run
        // only where the CPU has AVX2, FMA and F16C; `AVX512` only in the
        // copy that runs where it also has AVX-512F/BW; the slices bound
        // every access.
        unsafe {
            if AVX512 {
                match t {
                    GgmlType::Q4_0 => return avx512::dot_q4(row, x, xsum, false),
                    GgmlType::Q4_1 => return avx512::dot_q4(row, x, xsum, true),
                    _ => {}
                }
            }
            match t {
                GgmlType::Q4_0 => avx2::dot_q4(row, x, xsum, false),
                GgmlType::Q4_1 => avx2::dot_q4(row, x, xsum, true),
                GgmlType::Q5_0 => avx2::dot_q5(row, x, xsum, false),
                GgmlType::Q5_1 => avx2::dot_q5(row, x, xsum, true),
                GgmlType::Q4K => avx2::dot_q4_k(row, x, xsum),
                GgmlType::Q6K => avx2::dot_q6_k(row, x),
                _ => avx2::dot_q8_0(row, x),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (t, row, x, xsum);
        f32::NAN
    }
}

/// Two Q8_0 rows against one activation row; reached only from [`fast`]
/// (`fused` needs `AVX2`).
#[inline(always)]
fn q8_0_pair(ra: &[u8], rb: &[u8], x: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: as for `fused_f32`.
        unsafe { super::avx2::dot_q8_0_pair(ra, rb, x) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ra, rb, x);
        (f32::NAN, f32::NAN)
    }
}

/// The dot product of a dequantised row with activations.
#[inline(always)]
fn dot<const AVX2: bool>(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `AVX2` only in the copy that runs where the CPU has it
        return unsafe { super::avx2::dot_f32(w, x) };
    }
    dot_f32(w, x)
}

/// A q8-numerics row product: AVX2 integer kernels for the 32-element
/// formats in the AVX2 copy, `q8::dot` otherwise.
#[inline(always)]
fn q8_product<const AVX2: bool>(t: GgmlType, row: &[u8], xq: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        use super::avx2;
        // SAFETY: `AVX2` only in the copy that runs where the CPU has it
        unsafe {
            match t {
                GgmlType::Q4_0 => return avx2::dot_q4_q8(row, &xq.d, &xq.s, &xq.qs, false),
                GgmlType::Q4_1 => return avx2::dot_q4_q8(row, &xq.d, &xq.s, &xq.qs, true),
                GgmlType::Q8_0 => return avx2::dot_q8_0_q8(row, &xq.d, &xq.qs),
                _ => {}
            }
        }
    }
    q8::dot(t, row, xq)
}

/// [`body`] compiled for AVX2, FMA and F16C.
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
    body::<true, false>(t, cols, row_bytes, weights, x, out, scratch)
}

/// [`body`] compiled for AVX-512 (F and BW) besides AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn fast512(
    t: GgmlType,
    cols: usize,
    row_bytes: usize,
    weights: &[u8],
    x: &Activations<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
) {
    body::<true, true>(t, cols, row_bytes, weights, x, out, scratch)
}

/// Which copy of the kernels runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The portable code (any CPU).
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512F/BW besides those.
    Avx512,
}

impl Isa {
    /// The fastest copy this CPU runs.
    pub(crate) fn best() -> Self {
        if has_avx512() {
            Self::Avx512
        } else if has_avx2() {
            Self::Avx2
        } else {
            Self::Portable
        }
    }

    /// Every copy this CPU runs (tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|i| match i {
                Self::Portable => true,
                Self::Avx2 => has_avx2(),
                Self::Avx512 => has_avx512(),
            })
            .collect()
    }
}

/// Whether the AVX-512 copy runs on this CPU.
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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

/// Runs the copy `isa` (from [`Isa::best`], or [`Isa::available`] in tests;
/// a copy the CPU lacks falls back to the portable code).
///
/// # Shapes
/// as [`body`]
#[allow(clippy::too_many_arguments)]
pub(crate) fn rows(
    t: GgmlType,
    cols: usize,
    row_bytes: usize,
    weights: &[u8],
    x: &Activations<'_>,
    out: &mut [f32],
    scratch: &mut [f32],
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has every feature the copy was compiled for.
        Isa::Avx512 if has_avx512() => {
            unsafe { fast512(t, cols, row_bytes, weights, x, out, scratch) };
            return;
        }
        Isa::Avx2 if has_avx2() => {
            unsafe { fast(t, cols, row_bytes, weights, x, out, scratch) };
            return;
        }
        _ => {}
    }
    let _ = isa;
    body::<false, false>(t, cols, row_bytes, weights, x, out, scratch)
}
