//! Plain-`f32` building blocks of the host decode kernels (DynaKV's latent
//! kernel and the dense cache's): work-item size, run-time AVX2 dispatch,
//! head layout, column softmax, dot product and axpy.

use rayon::prelude::*;

/// Tokens per parallel work item: large enough to amortise scheduling, small
/// enough that two cores share a 1k-token cache.
pub(crate) const CHUNK: usize = 128;

/// Defines `$name`, which runs `$imp` compiled for AVX2+FMA (`$avx`) where the
/// CPU has them and the baseline build elsewhere. `$imp` is `#[inline(always)]`
/// so each build vectorises its own copy of the loops.
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* fn $name:ident / $avx:ident => $imp:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports the features `$avx` was compiled for.
                unsafe { $avx($($arg),*) };
                return;
            }
            $imp($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx($($arg: $ty),*) {
            $imp($($arg),*)
        }
    };
}

pub(crate) use avx2_dispatch;

/// Head layout of the layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The sum of equal-length vectors (`[len]` each), added in their order.
///
/// Why: rayon's `reduce` adds parts in a tree shaped by work stealing, so
/// one input could give other last bits from run to run; DynaKV's 8-bit
/// latents are rounded from those bits at the next append, which turned
/// them into different perplexities between identical runs (0.1% over 512
/// decode steps). Parts collected in order and added here give one answer.
pub(crate) fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![0f32; len]);
    for p in parts {
        axpy(&mut total, 1.0, &p);
    }
    total
}

/// Softmax down each column of a slot-major `[S, cols]` matrix, in place.
///
/// Row blocks of [`CHUNK`] run in parallel for each of the three passes
/// (column maxima, exponentials and sums, normalisation): at 4k tokens and 9
/// query rows the 37k exponentials cost as much as the scores themselves.
pub(crate) fn softmax_columns(m: &mut [f32], cols: usize) {
    let block = CHUNK * cols;
    let merge = |f: fn(f32, f32) -> f32| {
        move |mut a: Vec<f32>, b: Vec<f32>| {
            a.iter_mut().zip(&b).for_each(|(x, &y)| *x = f(*x, y));
            a
        }
    };
    let max = m
        .par_chunks(block)
        .map(|blk| {
            let mut mx = vec![f32::NEG_INFINITY; cols];
            for row in blk.chunks(cols) {
                mx.iter_mut().zip(row).for_each(|(a, &x)| *a = a.max(x));
            }
            mx
        })
        .reduce(|| vec![f32::NEG_INFINITY; cols], merge(f32::max));
    let sums: Vec<Vec<f32>> = m
        .par_chunks_mut(block)
        .map(|blk| {
            let mut sum = vec![0f32; cols];
            for row in blk.chunks_mut(cols) {
                for ((x, &mx), s) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
                    *x = if *x == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (*x - mx).exp()
                    };
                    *s += *x;
                }
            }
            sum
        })
        .collect();
    let sum = sum_in_order(sums, cols);
    m.par_chunks_mut(block).for_each(|blk| {
        for row in blk.chunks_mut(cols) {
            row.iter_mut().zip(&sum).for_each(|(x, &s)| *x /= s);
        }
    });
}

/// Softmax along each row of a row-major `[rows, len]` matrix, in place;
/// `-inf` entries become 0 (a row of nothing but `-inf` becomes zeros).
///
/// Rows run in parallel, each one pass for its maximum and one for the
/// exponentials with the dense kernels' vector `exp` where the CPU has
/// AVX2 and FMA: scalar `expf` over the 37k scores of a 4k-token step was
/// a tenth of DynaKV's attention.
pub(crate) fn softmax_rows(m: &mut [f32], len: usize) {
    if len == 0 {
        return;
    }
    m.par_chunks_mut(len).for_each(softmax_row);
}

fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::plain_rows::available(8) {
        // SAFETY: `available` checked AVX2, FMA and F16C
        unsafe { softmax_row_avx2(row) };
        return;
    }
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            (*x - mx).exp()
        };
        sum += *x;
    }
    row.iter_mut().for_each(|x| *x /= sum);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    use super::plain_rows::x86::{exp_shifted_sum, max};
    // SAFETY (both calls): the caller's CPU has AVX2 and FMA
    let mx = unsafe { max(row) };
    if mx == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let sum = unsafe { exp_shifted_sum(row, mx) };
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: one AVX register (two SSE ones) of independent lanes,
    // since the compiler may not reorder a float sum by itself.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_columns_normalise_and_ignore_masked_entries() {
        // two columns, three slots; column 1 masks slot 2
        let mut m = vec![0.0, 1.0, 1.0, 1.0, 2.0, f32::NEG_INFINITY];
        softmax_columns(&mut m, 2);
        let col0: f32 = m.iter().step_by(2).sum();
        let col1: f32 = m.iter().skip(1).step_by(2).sum();
        assert!((col0 - 1.0).abs() < 1e-6 && (col1 - 1.0).abs() < 1e-6);
        assert_eq!(m[5], 0.0);
        assert!((m[1] - m[3]).abs() < 1e-7);
    }

    #[test]
    fn softmax_rows_match_the_plain_formula() {
        // three rows of 300 (vector body and tail); row 1 masks some entries,
        // row 2 is fully masked
        let len = 300;
        let mut m: Vec<f32> = (0..3 * len)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
            .collect();
        for i in (0..len).step_by(3) {
            m[len + i] = f32::NEG_INFINITY;
        }
        m[2 * len..].fill(f32::NEG_INFINITY);
        let orig = m.clone();
        softmax_rows(&mut m, len);
        for r in 0..2 {
            let row = &orig[r * len..(r + 1) * len];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&x| ((x - mx) as f64).exp()).sum();
            for (i, &x) in row.iter().enumerate() {
                let want = ((x - mx) as f64).exp() / z;
                let got = m[r * len + i] as f64;
                assert!(
                    (got - want).abs() < 1e-6 * want.max(1e-3),
                    "{r} {i}: {got} vs {want}"
                );
            }
        }
        assert!(m[2 * len..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn softmax_columns_agree_across_parallel_blocks() {
        // 300 rows: three blocks of CHUNK rows, the maximum in the last one
        let (rows, cols) = (300, 3);
        let mut m: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37) % 101) as f32 / 10.0)
            .collect();
        m[(rows - 1) * cols] = 20.0;
        let orig = m.clone();
        softmax_columns(&mut m, cols);
        for c in 0..cols {
            let col: Vec<f32> = orig.iter().skip(c).step_by(cols).copied().collect();
            let mx = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = col.iter().map(|x| (x - mx).exp()).sum();
            for (r, x) in col.iter().enumerate() {
                let want = (x - mx).exp() / z;
                assert!((m[r * cols + c] - want).abs() < 1e-6, "{r} {c}");
            }
        }
    }
}
