//! The gated FFN's activation, `act(gate) * up`, on host rows.
//!
//! Why: on the CPU backend burn's element-wise operations call the C
//! library's `expf`, `tanhf` and `powf` one number at a time. Profiled on a
//! Gemma 3 prefill of 512 tokens (`perf record` on `dynakv bench --model
//! gemma3-270m --prefill 512`), GELU's `powf` (for `x^3`), `tanhf` and its
//! `expm1f` took 15% of the samples, about as much as every packed-weight
//! product of the decode steps. Both activations are `x * sigmoid(a x')`
//! (GELU's tanh form: `0.5 (1 + tanh(u)) = sigmoid(2u)`), so one
//! vectorisable exponential serves both: range reduction by ln 2 and
//! Cephes' degree-6 polynomial, within 2e-7 relative of `exp` (tested), with
//! no branch and no call, so the loop compiles to eight-lane AVX2 where the
//! CPU has it and four-lane SSE2 otherwise.

use super::arch::Activation;

/// `e^x` for `x` clamped to [-87, 88] (the normal f32 range), without a
/// call: `2^n p(r)`, `n = round(x / ln 2)`, `r = x - n ln 2`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so that n * LN2_HI is exact
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding 1.5 * 2^23 rounds to an integer and leaves it in the low bits
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^n from n's bits: the low mantissa bits of `shifted` hold n + 2^22
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127).wrapping_shl(23))
}

/// `x * sigmoid(a * y)`.
#[inline(always)]
fn times_sigmoid(x: f32, ay: f32) -> f32 {
    x / (1.0 + exp(-ay))
}

/// One number through the activation (`sigmoid`-form GELU, see the module
/// docs).
#[inline(always)]
pub(super) fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => times_sigmoid(x, x),
        Activation::GeluTanh => {
            // 2 * sqrt(2 / pi)
            const TWO_C: f32 = 1.595_769;
            times_sigmoid(x, TWO_C * (x + 0.044_715 * x * x * x))
        }
    }
}

#[inline(always)]
fn gated_body(act: Activation, gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = activate(act, *g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gated_avx2(act: Activation, gate: &mut [f32], up: &[f32]) {
    gated_body(act, gate, up)
}

/// `gate[i] = act(gate[i]) * up[i]` (the shorter length wins).
pub fn gated_in_place(act: Activation, gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the copy was compiled for
        unsafe { gated_avx2(act, gate, up) };
        return;
    }
    gated_body(act, gate, up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_2e7_of_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        // saturates instead of overflowing: finite at the ends
        assert!(exp(-1e4) > 0.0 && exp(-1e4) < 1e-37);
        assert!(exp(1e4).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn activations_match_their_definitions() {
        let gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x * x * x)).tanh())
        };
        let silu = |x: f64| x / (1.0 + (-x).exp());
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 * 0.0037)
            .chain([-1e4, -90.0, 90.0, 1e4, 0.0])
            .collect();
        for (act, f) in [
            (Activation::GeluTanh, &gelu as &dyn Fn(f64) -> f64),
            (Activation::Silu, &silu),
        ] {
            let up: Vec<f32> = xs.iter().map(|&x| 1.0 + 0.1 * x.abs().min(10.0)).collect();
            let mut got = xs.clone();
            gated_in_place(act, &mut got, &up);
            let mut portable = xs.clone();
            gated_body(act, &mut portable, &up);
            for ((&x, (&g, &p)), &u) in xs.iter().zip(got.iter().zip(&portable)).zip(&up) {
                let want = f(x as f64) * u as f64;
                let err = (g as f64 - want).abs();
                assert!(
                    err <= 1e-6 * want.abs().max(1.0),
                    "{act:?}({x}) * {u}: {g} vs {want}"
                );
                assert!(
                    (g - p).abs() <= 1e-6 * g.abs().max(1.0),
                    "{act:?}({x}): the copies differ"
                );
            }
        }
    }
}
