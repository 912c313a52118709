//! Plain-`f32` building blocks of the host decode kernels (DynaKV's latent
//! kernel and the dense cache's): work-item size, run-time AVX2 dispatch,
//! head layout, column softmax, dot product and axpy.

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

/// Softmax down each column of a slot-major `[S, cols]` matrix, in place.
pub(crate) fn softmax_columns(m: &mut [f32], cols: usize) {
    let mut max = vec![f32::NEG_INFINITY; cols];
    for row in m.chunks(cols) {
        for (mx, &x) in max.iter_mut().zip(row) {
            *mx = mx.max(x);
        }
    }
    let mut sum = vec![0f32; cols];
    for row in m.chunks_mut(cols) {
        for ((x, &mx), s) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
            *x = if *x == f32::NEG_INFINITY {
                0.0
            } else {
                (*x - mx).exp()
            };
            *s += *x;
        }
    }
    for row in m.chunks_mut(cols) {
        for (x, &s) in row.iter_mut().zip(&sum) {
            *x /= s;
        }
    }
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
}
