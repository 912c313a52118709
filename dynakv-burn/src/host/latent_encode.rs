//! A decode step's keys and values projected onto DynaKV's bases on the
//! host, and f16 rows widened to f32.
//!
//! Why: a decode step appends one token per layer. Through burn that is a
//! `[1, d] x [d, d]` product per kind, with f16 encoders widened into a new
//! tensor each time: 7% of a SnapKV + DynaKV decode step at 4k on SmolLM2,
//! against 37k multiply-adds of work. Host storage reads the encoder rows
//! where they are held instead.

use half::f16;

use crate::host::math::axpy;

/// An encoder `[d, d]` row-major as held on the host.
#[derive(Debug, Clone, Copy)]
pub(crate) enum EncoderRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// `(x[i] - mean) · enc` for each of `t` rows.
///
/// # Shapes
/// `x`: `[t, d]`; `mean`: `[d]`; `enc`: `[d, d]` (row `j` = input coordinate
/// `j`); returns `[t, d]`. Nothing is written past what these shapes give:
/// a short `x`, `mean` or encoder ends the sums early (callers pass the
/// shapes they checked).
pub(crate) fn encode_rows(x: &[f32], t: usize, mean: &[f32], enc: EncoderRows<'_>) -> Vec<f32> {
    let mut out = vec![0f32; t * mean.len()];
    encode_into(x, mean, enc, &mut out);
    out
}

crate::host::math::avx2_dispatch! {
    /// `out += (x[i] - mean) · enc` for each row of `out`, compiled for
    /// AVX2 + FMA where the CPU has them (one dispatch for the product).
    fn encode_into / encode_into_avx2 => encode_into_impl(
        x: &[f32], mean: &[f32], enc: EncoderRows<'_>, out: &mut [f32]
    )
}

#[inline(always)]
fn encode_into_impl(x: &[f32], mean: &[f32], enc: EncoderRows<'_>, out: &mut [f32]) {
    let d = mean.len();
    let mut wide = vec![0f32; d];
    // row j of the encoder is read once for all rows (one in decode)
    for j in 0..d {
        let row = match enc {
            EncoderRows::F32(e) => match e.get(j * d..(j + 1) * d) {
                Some(r) => r,
                None => break,
            },
            EncoderRows::F16(e) => match e.get(j * d..(j + 1) * d) {
                Some(r) => {
                    widen_f16(r, &mut wide);
                    &wide[..]
                }
                None => break,
            },
        };
        for (o, xr) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            axpy(o, xr[j] - mean[j], row);
        }
    }
}

/// `dst[i] = src[i]` in f32 for `i < min(len)`: eight at a time with F16C
/// where the CPU has it (the `half` crate's slice conversion calls a
/// function per eight values: 2-4% of a decode step widening f16 bases).
pub(crate) fn widen_f16(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX
        unsafe { widen_f16c(&src[..n], &mut dst[..n]) };
        return;
    }
    for (o, &h) in dst[..n].iter_mut().zip(&src[..n]) {
        *o = h.to_f32();
    }
}

/// # Safety
/// The CPU has F16C and AVX; `src.len() == dst.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= n for both slices
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for i in whole..n {
        dst[i] = src[i].to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::attention_reference::numbers;

    #[test]
    fn widening_equals_the_scalar_conversion() {
        // a vector body and a tail; a destination longer than the source
        let src: Vec<f16> = numbers(37, 3).iter().map(|&v| f16::from_f32(v)).collect();
        let mut got = vec![f32::NAN; 40];
        widen_f16(&src, &mut got);
        for (i, h) in src.iter().enumerate() {
            assert_eq!(got[i].to_bits(), h.to_f32().to_bits(), "{i}");
        }
        assert!(got[37..].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn host_encoding_equals_the_plain_product() {
        let (t, d) = (3, 24);
        let x = numbers(t * d, 1);
        let mean = numbers(d, 2);
        let enc = numbers(d * d, 5);
        let enc16: Vec<f16> = enc.iter().map(|&v| f16::from_f32(v)).collect();
        let enc16_wide: Vec<f32> = enc16.iter().map(|h| h.to_f32()).collect();
        for (rows, wide) in [
            (EncoderRows::F32(&enc), &enc),
            (EncoderRows::F16(&enc16), &enc16_wide),
        ] {
            let got = encode_rows(&x, t, &mean, rows);
            for r in 0..t {
                for c in 0..d {
                    let want: f64 = (0..d)
                        .map(|j| (x[r * d + j] - mean[j]) as f64 * wide[j * d + c] as f64)
                        .sum();
                    let g = got[r * d + c] as f64;
                    assert!(
                        (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{r} {c}: {g} vs {want}"
                    );
                }
            }
        }
    }
}
