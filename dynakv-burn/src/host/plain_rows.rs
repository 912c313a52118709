//! Key and value rows read in place where they are stored as `f32` or `f16`,
//! for the decode kernels' AVX2 + F16C copies.
//!
//! Why: the generic kernels decode every row into a buffer through
//! [`PackedRows::row`] (a call and a slice conversion per 64-value row) and
//! dot it with one query at a time; at 1k tokens that made the dense cache's
//! attention cost about as much as SmolLM2's whole weight read per decode
//! step. Here a row is converted into registers once per three query heads
//! of its group (one `vcvtph2ps` per eight values for f16), four rows' dots
//! share one horizontal reduction, and value sums stay in registers. The
//! quantised dtypes keep the generic path.

use dynakv_core::quant::PackedRows;
use half::f16;

/// One head's rows as the fast kernels read them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PlainRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> PlainRows<'a> {
    /// The rows in place, when stored as `f32` or `f16`.
    pub(crate) fn of(rows: &'a PackedRows) -> Option<Self> {
        rows.as_f32()
            .map(Self::F32)
            .or_else(|| rows.as_f16().map(Self::F16))
    }
}

impl PlainRows<'_> {
    /// Values held (rows times width).
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }
}

/// Whether this CPU runs the fast kernels (AVX2, FMA and F16C), for rows of
/// `head_dim` values (whole vectors of eight).
pub(crate) fn available(head_dim: usize) -> bool {
    let shape = head_dim > 0 && head_dim.is_multiple_of(8);
    #[cfg(target_arch = "x86_64")]
    {
        shape
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = shape;
        false
    }
}

/// Which compiled copy of the kernels built on [`x86`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelCopy {
    /// Portable code, rows decoded one at a time (any CPU, any dtype).
    Generic,
    /// AVX2 + FMA + F16C, sixteen vector registers.
    Avx2,
    /// The same eight-lane code where the CPU also has AVX-512F/VL: the
    /// compiler then has 32 vector registers.
    Avx2Wide,
}

impl KernelCopy {
    /// The fastest copy this CPU runs for rows of `head_dim` values.
    pub(crate) fn best(head_dim: usize) -> Self {
        if !available(head_dim) {
            return Self::Generic;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Self::Avx2Wide;
        }
        Self::Avx2
    }

    /// Every copy this CPU runs for rows of `head_dim` values (tests run
    /// them all).
    #[cfg(test)]
    pub(crate) fn available(head_dim: usize) -> Vec<Self> {
        let best = Self::best(head_dim);
        [Self::Generic, Self::Avx2, Self::Avx2Wide]
            .into_iter()
            .filter(|c| match c {
                Self::Generic => true,
                Self::Avx2 => best != Self::Generic,
                Self::Avx2Wide => best == Self::Avx2Wide,
            })
            .collect()
    }
}

/// Row operations on eight-lane vectors. Each is `#[inline(always)]` so it
/// compiles inside its caller's `#[target_feature(enable = "avx2,fma,f16c")]`
/// function; calling one elsewhere needs those features (see [`available`]).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::PlainRows;

    /// Eight values of row `i` from lane `c` on (`d` values per row).
    ///
    /// # Safety
    /// AVX2 and F16C; `(i + 1) * d <= len` and `8 * (c + 1) <= d`, which
    /// the callers' loops keep (`d = 8 * lanes`, `c < lanes`).
    #[inline(always)]
    unsafe fn lane(rows: PlainRows, i: usize, d: usize, c: usize) -> __m256 {
        match rows {
            PlainRows::F32(v) => _mm256_loadu_ps(v.as_ptr().add(i * d + 8 * c)),
            PlainRows::F16(v) => _mm256_cvtph_ps(_mm_loadu_si128(
                v.as_ptr().add(i * d + 8 * c) as *const __m128i
            )),
        }
    }

    /// `R` queries' dot products with the four rows `i..i + 4`:
    /// `out[r][j] = q_r . row(i + j)`, query `r` at `qs[r * 8 lanes..]`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; rows `i..i + 4` exist, the rows are `8 * lanes`
    /// wide and `qs` holds `R` queries of that width.
    // indices, not iterators: each loop walks one axis of a two-axis
    // accumulator block that must stay in registers
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub(crate) unsafe fn dots4<const R: usize>(
        rows: PlainRows,
        i: usize,
        lanes: usize,
        qs: &[f32],
    ) -> [[f32; 4]; R] {
        let d = 8 * lanes;
        let qs = &qs[..R * d];
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        // no closures below: they would not inherit the caller's target
        // features, and the intrinsics in them would stay calls
        let mut q = [_mm256_setzero_ps(); R];
        for c in 0..lanes {
            for (r, q) in q.iter_mut().enumerate() {
                *q = _mm256_loadu_ps(qs.as_ptr().add(r * d + 8 * c));
            }
            for j in 0..4 {
                let k = lane(rows, i + j, d, c);
                for r in 0..R {
                    acc[r][j] = _mm256_fmadd_ps(q[r], k, acc[r][j]);
                }
            }
        }
        let mut out = [[0f32; 4]; R];
        for (o, [a, b, c, e]) in out.iter_mut().zip(acc) {
            let ab = _mm256_hadd_ps(a, b);
            let ce = _mm256_hadd_ps(c, e);
            let all = _mm256_hadd_ps(ab, ce);
            let s = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
            _mm_storeu_ps(o.as_mut_ptr(), s);
        }
        out
    }

    /// `q . row(i)`, one row at a time (a chunk's last rows).
    ///
    /// # Safety
    /// As [`dots4`] for the one row and one query.
    #[inline(always)]
    pub(crate) unsafe fn dot1(rows: PlainRows, i: usize, lanes: usize, q: &[f32]) -> f32 {
        let d = 8 * lanes;
        let q = &q[..d];
        let mut acc = _mm256_setzero_ps();
        for c in 0..lanes {
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.as_ptr().add(8 * c)),
                lane(rows, i, d, c),
                acc,
            );
        }
        hsum(acc)
    }

    /// Lanes `c0..c0 + W` of `R` weighted sums of rows: for each `r < R`,
    /// `out[r] = sum_j ws[r * n + j] * row(first + j)` over `n` rows, written
    /// to `outs[r * 8 lanes + 8 c0..]`. The `R x W` accumulators stay in
    /// registers while the rows stream by.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; rows `first..first + n` exist and are `8 * lanes`
    /// wide, `c0 + W <= lanes`, `ws` holds `R * n` weights and `outs` `R`
    /// rows of `8 * lanes`.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub(crate) unsafe fn weighted_rows<const R: usize, const W: usize>(
        rows: PlainRows,
        first: usize,
        n: usize,
        lanes: usize,
        c0: usize,
        ws: &[f32],
        outs: &mut [f32],
    ) {
        let d = 8 * lanes;
        let (ws, outs) = (&ws[..R * n], &mut outs[..R * d]);
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        let mut w = [_mm256_setzero_ps(); R];
        for j in 0..n {
            for (r, w) in w.iter_mut().enumerate() {
                *w = _mm256_set1_ps(ws[r * n + j]);
            }
            for c in 0..W {
                let v = lane(rows, first + j, d, c0 + c);
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(w[r], v, acc[r][c]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, v) in a.iter().enumerate() {
                _mm256_storeu_ps(outs.as_mut_ptr().add(r * d + 8 * (c0 + c)), *v);
            }
        }
    }

    /// The largest value of `x` (`-inf` when empty).
    ///
    /// # Safety
    /// AVX2.
    #[inline(always)]
    pub(crate) unsafe fn max(x: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            m = _mm256_max_ps(m, _mm256_loadu_ps(c.as_ptr()));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .iter()
            .chain(tail)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// `x = exp(x - m)` in place (`-inf` entries become 0), returning the
    /// sum of the new values. `m` is finite and at least every entry.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[inline(always)]
    pub(crate) unsafe fn exp_shifted_sum(x: &mut [f32], m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut sum = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            let e = exp(_mm256_sub_ps(v, mv));
            let e = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, ninf), e);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for v in chunks.into_remainder() {
            *v = if *v == f32::NEG_INFINITY {
                0.0
            } else {
                (*v - m).exp()
            };
            total += *v;
        }
        total
    }

    /// `e^x` lane by lane for `x <= 0` (larger inputs are clamped at 88):
    /// Cephes' `expf` scheme, `2^n * p(r)` with `x = n ln 2 + r`,
    /// `|r| <= ln 2 / 2` and a degree-7 polynomial; within 2 ulp of libm's
    /// `expf` above -87 and a tiny positive value below, where the caller's
    /// weights vanish beside the maximum's 1.
    #[inline(always)]
    unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // r = x - n ln 2, with ln 2 split so n * hi is exact
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let c = |v: f32| _mm256_set1_ps(v);
        let mut p = c(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, c(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, c(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, c(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, c(0.166_666_65));
        p = _mm256_fmadd_ps(p, r, c(0.5));
        p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, c(1.0)));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_vector_exp_matches_libm_where_softmax_weights_live() {
            if !super::super::available(8) {
                return;
            }
            let xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.0043).collect();
            let mut got = xs.clone();
            // SAFETY: the features were checked above.
            let sum = unsafe { exp_shifted_sum(&mut got, 0.0) };
            let mut want_sum = 0f64;
            for (x, g) in xs.iter().zip(&got) {
                let want = x.exp();
                want_sum += want as f64;
                assert!(
                    (g - want).abs() <= 3.0 * f32::EPSILON * want,
                    "{x}: {g} vs {want}"
                );
            }
            assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-5);
            // masked entries vanish, and a shift keeps values at or below 1
            let mut x = [
                f32::NEG_INFINITY,
                2.0,
                1.0,
                f32::NEG_INFINITY,
                0.5,
                2.0,
                -300.0,
                1.5,
                2.0,
            ];
            let sum = unsafe { exp_shifted_sum(&mut x, 2.0) };
            assert_eq!(x[0], 0.0);
            assert_eq!(x[3], 0.0);
            assert!((x[1] - 1.0).abs() < 1e-7 && x[6] < 1e-30);
            let want: f32 = [2.0f32, 1.0, 0.5, 2.0, 1.5, 2.0]
                .iter()
                .map(|v| (v - 2.0).exp())
                .sum();
            assert!((sum - want).abs() < 1e-6);
        }
    }
}
