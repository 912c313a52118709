//! llama.cpp's CPU arithmetic, bit for bit: the operations of a one-token
//! Llama step other than the weight products (those are `qmatmul`'s q8
//! row kernels, already in ggml's order), as ggml computes them on x86
//! with AVX-512 (llama.cpp as vendored in llama-cpp-python 0.3.36, built
//! for the machine it runs on).
//!
//! Why: llama.cpp's logits on a quantised file carry the rounding of every
//! 8-bit activation code, so any last-bit difference upstream of a product
//! (a sum taken in another order, another `expf`) moves some codes and the
//! difference spreads; an engine that rounds "the same way" but sums in its
//! own order agrees with llama.cpp on about 96% of top-1 tokens (as does
//! llama.cpp's own batched path with its one-token path). Matching each
//! operation exactly is what reproduces its numbers
//! ([`super::GgmlReference`]). Each function names the ggml code it follows;
//! the lane counts are those of the AVX-512 build (an AVX2 build sums in
//! eight lanes and has another `expf`, so its last bits differ).
//!
//! Every fused multiply-add here is `f32::mul_add` (one rounding, as the
//! hardware instruction): the same bits with or without FMA hardware. The
//! functions are `#[inline(always)]` so that a caller compiled with FMA
//! (the reference decoder's step) gets the instruction instead of the C
//! library's `fmaf`; their loops are plain loops, as a closure handed to an
//! iterator adapter would be compiled apart from that caller. The
//! RoPE angles call the C library's `powf`, `cosf` and `sinf` (Rust's
//! `f32::powf`, `cos`, `sin` do), as ggml does: equal bits need the same C
//! library as the llama.cpp run compared with (glibc here).

pub(crate) use crate::qmatmul::f16_round;

/// `x * w / sqrt(mean(x^2) + eps)` as `ggml_compute_forward_rms_norm_f32`
/// (then the weight's `ggml_mul`): squares rounded to f32 and summed in f64
/// in order, the mean rounded to f32, `1 / sqrtf(mean + eps)`, then
/// `(x * scale) * w`.
///
/// # Shapes
/// - `x`, `w`: `[d]`; returns `[d]`
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum / x.len().max(1) as f64) as f32;
    let scale = 1.0f32 / (mean + eps).sqrt();
    x.iter().zip(w).map(|(&v, &g)| v * scale * g).collect()
}

/// `e^x` as one lane of ggml's AVX-512 `ggml_v_expf` (Arm's optimised
/// routine: a degree-5 polynomial after reduction by ln 2 in two parts,
/// scaled by `2^n` with `vscalefps`; 0 below about -104, infinity above
/// about 88.7).
#[inline(always)]
pub(crate) fn expf(x: f32) -> f32 {
    const R: f32 = 12_582_912.0; // 0x1.8p23
    const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
    const C4: f32 = f32::from_bits(0x3c07_2010); // 0x1.0e4020p-7
    const C3: f32 = f32::from_bits(0x3d2b_9f17); // 0x1.573e2ep-5
    const C2: f32 = f32::from_bits(0x3e2a_af33); // 0x1.555e66p-3
    const C1: f32 = f32::from_bits(0x3eff_fedb); // 0x1.fffdb6p-2
    const C0: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1
    let z = x.mul_add(LOG2E, R);
    let n = z - R;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = C4
        .mul_add(b, C3)
        .mul_add(u, C2.mul_add(b, C1))
        .mul_add(u, C0.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    if n.is_nan() {
        return f32::NAN;
    }
    // `vscalefps`: j * 2^n with one rounding (to a subnormal, too); exact in
    // f64 for |n| <= 192, then rounded once
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// `silu(g) * u` in place of `g`, as `ggml_vec_swiglu_f32` with
/// `ggml_v_silu`: `g / (1 + expf(0 - g))`, then the product.
///
/// # Shapes
/// - `g`, `u`: `[d_ff]`
#[inline(always)]
pub(crate) fn swiglu(g: &mut [f32], u: &[f32]) {
    for i in 0..g.len().min(u.len()) {
        g[i] = g[i] / (1.0 + expf(0.0 - g[i])) * u[i];
    }
}

/// RoPE's `(cos, sin)` for each pair of the first `n_dims` dimensions at
/// position `pos`, as ggml's `ggml_rope_cache_init` without scaling:
/// `theta = pos`, multiplied by `powf(base, -2 / n_dims)` pair after pair,
/// libm's `cosf` / `sinf`.
///
/// # Shapes
/// returns `[n_dims / 2]`
pub(crate) fn rope_table(n_dims: usize, pos: usize, base: f32) -> Vec<(f32, f32)> {
    let theta_scale = base.powf(-2.0f32 / n_dims as f32);
    let mut theta = pos as f32;
    let mut table = Vec::with_capacity(n_dims / 2);
    for _ in 0..n_dims / 2 {
        table.push((theta.cos(), theta.sin()));
        theta *= theta_scale;
    }
    table
}

/// Rotates each head of `x` (pairs `(2i, 2i+1)` of the first
/// `2 * table.len()` dimensions) by a [`rope_table`], as ggml's
/// `GGML_ROPE_TYPE_NORMAL`: `rotate_pairs` as the compiler contracted it,
/// `fma(x0, cos, -(x1 sin))` and `fma(x0, sin, x1 cos)`.
///
/// # Shapes
/// - `x`: `[heads, head_dim]` row-major, rotated in place
#[inline(always)]
pub(crate) fn rope_normal(x: &mut [f32], head_dim: usize, table: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..table.len().min(head_dim / 2) {
            let (c, s) = table[i];
            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = x0.mul_add(c, -(x1 * s));
            head[2 * i + 1] = x0.mul_add(s, x1 * c);
        }
    }
}

/// Lanes of one AVX-512 vector of f32.
const LANES: usize = 16;
/// `ggml_vec_dot_f32`'s step: four vectors.
const STEP: usize = 4 * LANES;

/// The sum of sixteen lanes (`a[..16]`) as GCC's `_mm512_reduce_add_ps`:
/// halves, then quarters, then pairs.
#[inline(always)]
fn reduce16(a: &[f32]) -> f32 {
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = a[i + 8] + a[i];
    }
    let mut q = [0f32; 4];
    for i in 0..4 {
        q[i] = t[i + 4] + t[i];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Four accumulators of sixteen lanes reduced as `GGML_F32x16_REDUCE`:
/// `(acc0 + acc2) + (acc1 + acc3)` lane by lane, then [`reduce16`].
#[inline(always)]
fn reduce_accumulators(acc: &[f32; STEP]) -> f32 {
    let mut s = [0f32; LANES];
    for l in 0..LANES {
        s[l] = (acc[l] + acc[2 * LANES + l]) + (acc[LANES + l] + acc[3 * LANES + l]);
    }
    reduce16(&s)
}

/// `ggml_vec_dot_f32` on AVX-512 for `x.len()` a multiple of 64 (checked
/// by the caller): element `i` goes to lane `i % 16` of accumulator
/// `(i % 64) / 16` (here `acc[i % 64]`), each a chain of fused
/// multiply-adds.
#[inline(always)]
fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; STEP];
    for (xs, ys) in x.chunks_exact(STEP).zip(y.chunks_exact(STEP)) {
        for i in 0..STEP {
            acc[i] = xs[i].mul_add(ys[i], acc[i]);
        }
    }
    reduce_accumulators(&acc)
}

/// The order of one of the attention's two products (scores `K q`, or the
/// attention-weighted values) as llama.cpp computes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// `ggml_vec_dot_f32` / `ggml_vec_dot_f16`: four vectors of sixteen
    /// lanes ([`reduce_accumulators`]), as one token at a time.
    VecDot,
    /// llamafile's tiled `tinyBLAS` product, taken for batches of two
    /// tokens or more on a build with llamafile (the default) when its
    /// operands are contiguous: one vector of sixteen lanes (element `i` in
    /// lane `i % 16`), then [`reduce16`].
    TinyBlas,
}

/// How llama.cpp's attention runs: the order of each product, and whether
/// its operands are f16 (an f16 KV cache: the query is rounded to f16 for
/// the scores and the attention weights for the values, as ggml converts
/// the second operand to the cache's type; the cache's rows are rounded
/// where they are stored, by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attention {
    pub(crate) scores: Order,
    pub(crate) values: Order,
    pub(crate) f16: bool,
}

/// The dot product of `x` and `y` (`len` a multiple of 64) in `order`.
#[inline(always)]
fn dot_in(order: Order, x: &[f32], y: &[f32]) -> f32 {
    match order {
        Order::VecDot => dot_f32(x, y),
        Order::TinyBlas => {
            let mut acc = [0f32; LANES];
            for (xs, ys) in x.chunks_exact(LANES).zip(y.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc[l] = xs[l].mul_add(ys[l], acc[l]);
                }
            }
            reduce16(&acc)
        }
    }
}

/// One query head's attention over `n` cached rows, as llama.cpp's graph
/// without flash attention: scores `K q`, `ggml_soft_max_ext` (scores
/// times `scale`, minus their
/// maximum, [`expf`], the sum in f64 of each sixteen lanes'
/// [`reduce16`], then each times `f32(1 / sum)`), and the values summed
/// over the positions, each product in the order `how` says, with f16
/// operands where it says (llama.cpp pads the positions to 256 with zero
/// weights; zeros add nothing, so padding to 64 is the same).
///
/// # Shapes
/// - `q`: `[head_dim]`; `keys`, `values`: `n` rows of `stride`, this head's
///   `head_dim` values at `offset`; `out`: `[head_dim]`
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_head(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    scale: f32,
    how: Attention,
    probs: &mut Vec<f32>,
    acc: &mut Vec<f32>,
    out: &mut [f32],
) {
    let dh = q.len();
    let n = keys.len() / stride;
    probs.clear();
    probs.resize(n.div_ceil(LANES) * LANES, 0.0);
    let q16: Vec<f32>;
    let q = if how.f16 {
        q16 = q.iter().map(|&v| f16_round(v)).collect();
        &q16[..]
    } else {
        q
    };
    let mut max = f32::NEG_INFINITY;
    for t in 0..n {
        let k = &keys[t * stride + offset..t * stride + offset + dh];
        probs[t] = dot_in(how.scores, k, q) * scale;
        max = max.max(probs[t]);
    }
    for p in probs[..n].iter_mut() {
        *p = expf(*p - max);
    }
    let mut sum = 0f64;
    for c in probs.chunks_exact(LANES) {
        sum += reduce16(c) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for p in probs.iter_mut() {
        *p *= inv;
        if how.f16 {
            *p = f16_round(*p);
        }
    }
    // value sums: output dimension `j` accumulates position `t` in lane
    // `t % cells` (64: four vectors; 16: one), positions in order
    let cells = match how.values {
        Order::VecDot => STEP,
        Order::TinyBlas => LANES,
    };
    acc.clear();
    acc.resize(cells * dh, 0.0);
    for t in 0..n {
        let p = probs[t];
        let v = &values[t * stride + offset..t * stride + offset + dh];
        let cell = &mut acc[(t % cells) * dh..(t % cells + 1) * dh];
        for j in 0..dh {
            cell[j] = v[j].mul_add(p, cell[j]);
        }
    }
    // the lanes reduced as [`reduce_accumulators`] / [`reduce16`] do, for
    // every output dimension at once (rows of `dh`): the same additions,
    // vectorised along the dimensions instead of gathered per dimension
    let row = |c: usize| &acc[c * dh..(c + 1) * dh];
    let mut lanes = vec![0f32; LANES * dh];
    for (l, lane) in lanes.chunks_exact_mut(dh).enumerate() {
        match how.values {
            Order::VecDot => {
                let (a0, a1, a2, a3) = (
                    row(l),
                    row(LANES + l),
                    row(2 * LANES + l),
                    row(3 * LANES + l),
                );
                for j in 0..dh {
                    lane[j] = (a0[j] + a2[j]) + (a1[j] + a3[j]);
                }
            }
            Order::TinyBlas => lane.copy_from_slice(row(l)),
        }
    }
    // halves, then quarters, in place: lane i += lane i + half
    for half in [8, 4] {
        let (low, high) = lanes.split_at_mut(half * dh);
        for (a, b) in low.iter_mut().zip(&high[..half * dh]) {
            *a += *b;
        }
    }
    let (l0, l1, l2, l3) = (
        &lanes[..dh],
        &lanes[dh..2 * dh],
        &lanes[2 * dh..3 * dh],
        &lanes[3 * dh..4 * dh],
    );
    for (((o, a), b), (c, d)) in out.iter_mut().zip(l0).zip(l2).zip(l1.iter().zip(l3)) {
        *o = (a + b) + (c + d);
    }
}

/// Every query head's attention ([`attend_head`]); query head `h` reads
/// key-value head `h / (heads / kv_heads)`, as ggml's broadcast.
///
/// # Shapes
/// - `q`: `[heads, head_dim]`; `keys`, `values`: `[n, kv_heads, head_dim]`;
///   returns `[heads, head_dim]`
#[inline(always)]
pub(crate) fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    kv_heads: usize,
    how: Attention,
) -> Vec<f32> {
    let heads = q.len() / head_dim;
    let group = heads / kv_heads.max(1);
    let stride = kv_heads * head_dim;
    let scale = 1.0f32 / (head_dim as f32).sqrt();
    let mut out = vec![0f32; q.len()];
    let (mut probs, mut acc) = (Vec::new(), Vec::new());
    for h in 0..heads {
        let offset = (h / group.max(1)) * head_dim;
        let (qh, oh) = (
            &q[h * head_dim..(h + 1) * head_dim],
            &mut out[h * head_dim..(h + 1) * head_dim],
        );
        attend_head(
            qh, keys, values, stride, offset, scale, how, &mut probs, &mut acc, oh,
        );
    }
    out
}

/// Whether [`attend`] reproduces ggml for heads of this size (its dot
/// products run whole steps of 64; ggml sums a remainder apart).
pub(crate) fn head_dim_supported(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(STEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_within_two_ulps_of_exp_and_saturates() {
        for i in -2000..=1770 {
            let x = i as f32 * 0.05;
            let want = (x as f64).exp();
            let got = expf(x) as f64;
            if want > f32::MIN_POSITIVE as f64 {
                let ulp = (want as f32).to_bits() as i64 - (got as f32).to_bits() as i64;
                assert!(ulp.abs() <= 2, "expf({x}) = {got}, exp = {want}");
            }
        }
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }

    #[test]
    fn rms_norm_has_unit_mean_square() {
        let x: Vec<f32> = (0..576).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let y = rms_norm(&x, &vec![1.0; 576], 1e-5);
        let ms = y.iter().map(|v| (v * v) as f64).sum::<f64>() / 576.0;
        assert!((ms - 1.0).abs() < 1e-4, "{ms}");
    }

    #[test]
    fn rope_rotates_pairs_by_position_times_frequency() {
        let (dh, base) = (64, 10_000f32);
        let x: Vec<f32> = (0..2 * dh)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
            .collect();
        for pos in [0usize, 1, 17, 1000] {
            let mut y = x.clone();
            rope_normal(&mut y, dh, &rope_table(dh, pos, base));
            for h in 0..2 {
                for i in 0..dh / 2 {
                    let a = pos as f64 * (base as f64).powf(-2.0 * i as f64 / dh as f64);
                    let (x0, x1) = (x[h * dh + 2 * i] as f64, x[h * dh + 2 * i + 1] as f64);
                    let want = [x0 * a.cos() - x1 * a.sin(), x0 * a.sin() + x1 * a.cos()];
                    // the angle is f32 and the frequency a product of f32
                    // factors: about 1e-7 relative error times the angle
                    let tol = 1e-5 * (1.0 + a);
                    for (k, w) in want.iter().enumerate() {
                        let got = y[h * dh + 2 * i + k] as f64;
                        assert!((got - w).abs() < tol, "pos {pos} pair {i}: {got} vs {w}");
                    }
                }
            }
        }
    }

    /// Against a plain f64 attention: the lane order changes only the
    /// last bits.
    #[test]
    fn attention_equals_softmax_weighted_values() {
        let (dh, heads, kv) = (64, 6, 2);
        for n in [1usize, 5, 16, 63, 64, 65, 200] {
            let f = |i: usize, s: f32| (i as f32 * s).sin() * 2.0;
            let q: Vec<f32> = (0..heads * dh).map(|i| f(i, 0.31)).collect();
            let k: Vec<f32> = (0..n * kv * dh).map(|i| f(i, 0.17)).collect();
            let v: Vec<f32> = (0..n * kv * dh).map(|i| f(i, 0.07)).collect();
            for (scores, values) in [
                (Order::VecDot, Order::VecDot),
                (Order::VecDot, Order::TinyBlas),
                (Order::TinyBlas, Order::TinyBlas),
            ] {
                let how = Attention {
                    scores,
                    values,
                    f16: false,
                };
                let got = attend(&q, &k, &v, dh, kv, how);
                for h in 0..heads {
                    let g = h / (heads / kv);
                    let s: Vec<f64> = (0..n)
                        .map(|t| {
                            (0..dh)
                                .map(|j| q[h * dh + j] as f64 * k[(t * kv + g) * dh + j] as f64)
                                .sum::<f64>()
                                / (dh as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..dh {
                        let want: f64 = (0..n)
                            .map(|t| e[t] / z * v[(t * kv + g) * dh + j] as f64)
                            .sum();
                        let d = (got[h * dh + j] as f64 - want).abs();
                        assert!(
                            d < 1e-5,
                            "n {n} head {h} dim {j}: {} vs {want}",
                            got[h * dh + j]
                        );
                    }
                }
            }
        }
    }

    /// The lane structure is ggml's: a sum whose order matters (one large
    /// term cancelled in a later lane group) comes out as the lanes give it.
    #[test]
    fn dot_sums_in_lane_order() {
        let mut x = vec![0f32; 128];
        let y = vec![1f32; 128];
        x[0] = 1e8; // lane 0 of accumulator 0, first step
        x[1] = 1.0; // lane 1 of accumulator 0
        x[64] = -1e8; // lane 0 of accumulator 0, second step: cancels x[0]
                      // in order 1e8 + 1 - 1e8 would lose the 1; lane by lane it stays
        assert_eq!(dot_f32(&x, &y), 1.0);
        x[1] = 0.0;
        x[16] = 1.0; // lane 0 of accumulator 1: added after the cancellation
        assert_eq!(dot_f32(&x, &y), 1.0);
        x[16] = 0.0;
        x[64] = 0.0;
        x[8] = 1.0; // lane 8 of accumulator 0: meets 1e8 in the first halving
        assert_eq!(dot_f32(&x, &y), 1e8);
    }
}
