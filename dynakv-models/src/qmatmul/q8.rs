//! The `q8` numerics: activations quantised to 8 bits per block as
//! llama.cpp's CPU backend does before each matrix product, then integer dot
//! products against the weight blocks (`ggml_vec_dot_q4_1_q8_1` and friends).
//!
//! Why: llama.cpp's logits on a quantised file come from exactly these
//! products, so a run that must reproduce them (the parity fixture's top-1
//! agreement) has to round the activations the same way. The default
//! numerics (f32 activations, `kernel.rs`) are more accurate and are what the
//! f32-dequantised reference checks.
//!
//! Rounding follows llama.cpp's x86 path: Q8_0 and Q8_1 scale by `127 / amax`
//! and round half to even, store `d = amax / 127` as f16 (Q8_1 also
//! `s = d * sum(q)` as f16); Q8_K (for K-quants) scales by `-127 / max` (the
//! signed value of largest magnitude), keeps `d` in f32 and the sum of every
//! 16 codes.

use half::f16;

use crate::gguf::{scale_min_k4, GgmlType};

/// The activation format a weight type is multiplied with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Q8Kind {
    /// Blocks of 32: f16 scale, 32 codes (Q4_0, Q5_0, Q8_0 weights).
    Q8_0,
    /// Q8_0 plus the block's scaled code sum (Q4_1 weights: the min term).
    Q8_1,
    /// Blocks of 256: f32 scale, 256 codes, 16 partial sums (K-quants).
    Q8K,
}

impl Q8Kind {
    /// The activation format for a weight type; `None` for float weights
    /// (they take f32 activations in either numerics).
    pub(crate) fn for_weights(t: GgmlType) -> Option<Self> {
        match t {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(Self::Q8_0),
            GgmlType::Q4_1 => Some(Self::Q8_1),
            GgmlType::Q4K | GgmlType::Q6K => Some(Self::Q8K),
            // no integer kernel yet: f32 activations in either numerics
            GgmlType::Q5_1 | GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q5K => None,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
        }
    }

    fn block(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q8K => 256,
        }
    }
}

/// One activation row quantised to 8 bits.
#[derive(Debug, Clone)]
pub(crate) struct Q8Row {
    /// Per block: the scale, as the dot product reads it (f16-rounded for
    /// Q8_0 / Q8_1).
    pub(crate) d: Vec<f32>,
    /// Q8_1: per block `d * sum(codes)` (f16-rounded); empty otherwise.
    pub(crate) s: Vec<f32>,
    /// Code sums: per 16 codes for Q8_K, per block of 32 for Q8_0 / Q8_1
    /// (the Q5_0 tiles' correction).
    pub(crate) bsums: Vec<i32>,
    pub(crate) qs: Vec<i8>,
}

/// `v` rounded half to even, for `|v| <= 2^22` (codes are within 127):
/// adding 1.5 * 2^23 leaves no fraction bits, so the add rounds (the default
/// rounding is to nearest even) and the subtraction is exact. Why not
/// `round_ties_even`: on the x86-64 baseline it is a call to the C
/// library's `rintf` per activation (2.7% of a q8 decode step, profiled);
/// this is two adds and vectorises.
#[inline(always)]
fn round_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// `x` rounded to the nearest f16 (ties to even), as ggml converts.
pub(crate) fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Digits of an activation row in the f32 numerics on tiles ([`digits`]).
pub(crate) const DIGITS: usize = 3;

/// `x` as [`DIGITS`] quantised rows whose dequantised sum is `x` to about
/// f32's precision: each row quantises what the rows before it left over,
/// with its own per-block scale, so each digit adds about 8 bits (the
/// residual after three is at most `amax / 254^3`, about `2^-24` of the
/// block's largest activation, the size of f32's own rounding of it).
/// Scales stay in f32: an f16 scale three digits down would be subnormal.
///
/// Why: the integer tile kernels are several times faster than the f32
/// row kernels, and the products are linear in the activations, so three
/// integer products give the f32 numerics' answer (`mod.rs`).
pub(crate) fn digits(kind: Q8Kind, x: &[f32]) -> Vec<Q8Row> {
    let blk = kind.block();
    let mut rest = x.to_vec();
    let mut rows = Vec::with_capacity(DIGITS);
    for k in 0..DIGITS {
        let row = quantize_with(kind, &rest, false);
        if k + 1 < DIGITS {
            for (b, (rb, qb)) in rest
                .chunks_exact_mut(blk)
                .zip(row.qs.chunks_exact(blk))
                .enumerate()
            {
                let d = row.d[b];
                for (r, &q) in rb.iter_mut().zip(qb) {
                    *r -= d * q as f32;
                }
            }
        }
        rows.push(row);
    }
    rows
}

/// Quantises one activation row (`x.len()` a multiple of the block, checked
/// by the caller against the weight's row length).
pub(crate) fn quantize(kind: Q8Kind, x: &[f32]) -> Q8Row {
    quantize_with(kind, x, true)
}

/// [`quantize`], with Q8_0 / Q8_1 scales and sums rounded to f16 as
/// llama.cpp stores them (`f16_scales`) or kept in f32 ([`digits`]).
fn quantize_with(kind: Q8Kind, x: &[f32], f16_scales: bool) -> Q8Row {
    let round = |v: f32| if f16_scales { f16_round(v) } else { v };
    let blk = kind.block();
    let nb = x.len() / blk;
    let mut row = Q8Row {
        d: Vec::with_capacity(nb),
        s: Vec::new(),
        bsums: Vec::new(),
        qs: vec![0; nb * blk],
    };
    for (xb, qb) in x.chunks_exact(blk).zip(row.qs.chunks_exact_mut(blk)) {
        match kind {
            Q8Kind::Q8_0 | Q8Kind::Q8_1 => {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                let mut sum = 0i32;
                for (q, &v) in qb.iter_mut().zip(xb) {
                    let c = round_even_small(v * id) as i32;
                    *q = c as i8;
                    sum += c;
                }
                let d = amax / 127.0;
                row.d.push(round(d));
                row.bsums.push(sum);
                if kind == Q8Kind::Q8_1 {
                    row.s.push(round(d * sum as f32));
                }
            }
            Q8Kind::Q8K => {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in xb {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                if amax == 0.0 {
                    row.d.push(0.0);
                    row.bsums.extend([0; 16]);
                    continue;
                }
                let iscale = -127.0 / max;
                for (q, &v) in qb.iter_mut().zip(xb) {
                    *q = (round_even_small(iscale * v) as i32).min(127) as i8;
                }
                row.bsums.extend(
                    qb.chunks_exact(16)
                        .map(|g| g.iter().map(|&q| q as i32).sum::<i32>()),
                );
                row.d.push(1.0 / iscale);
            }
        }
    }
    row
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Sum of products of four codes (one lane of `vpdpbusd`).
#[inline(always)]
fn idot4(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .take(4)
        .map(|(&x, &y)| x as i32 * y as i32)
        .sum()
}

/// The sum of eight lanes as ggml's `hsum_float_8`: halves, then pairs.
#[inline(always)]
fn hsum8(v: &[f32; 8]) -> f32 {
    let r: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (r[0] + r[2]) + (r[1] + r[3])
}

/// The dot product of one weight row (`row`: its blocks) with a quantised
/// activation row of the matching kind ([`Q8Kind::for_weights`]).
#[inline(always)]
pub(crate) fn dot(t: GgmlType, row: &[u8], x: &Q8Row) -> f32 {
    let (_, bb) = t.block();
    let mut sum = 0f32;
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
            // llama.cpp's x86 order (`ggml_vec_dot_q4_1_q8_1` and friends):
            // each block's eight sums of four code products scaled into
            // eight lanes by fused multiply-adds, the min terms apart
            let (mut lanes, mut summs) = ([0f32; 8], 0f32);
            let mut a = [0i8; 32];
            for (i, (b, qy)) in row.chunks_exact(bb).zip(x.qs.chunks_exact(32)).enumerate() {
                let dx = f16_at(b, 0);
                match t {
                    GgmlType::Q4_0 => {
                        let (lo, hi) = a.split_at_mut(16);
                        for ((&q, l), h) in b[2..18].iter().zip(lo).zip(hi) {
                            *l = (q & 0xF) as i8 - 8;
                            *h = (q >> 4) as i8 - 8;
                        }
                    }
                    GgmlType::Q4_1 => {
                        let (lo, hi) = a.split_at_mut(16);
                        for ((&q, l), h) in b[4..20].iter().zip(lo).zip(hi) {
                            *l = (q & 0xF) as i8;
                            *h = (q >> 4) as i8;
                        }
                    }
                    GgmlType::Q5_0 => {
                        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                        let (lo, hi) = a.split_at_mut(16);
                        for (j, ((&q, l), h)) in b[6..22].iter().zip(lo).zip(hi).enumerate() {
                            *l = ((q & 0xF) as u32 | (((qh >> j) & 1) << 4)) as i8 - 16;
                            *h = ((q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4)) as i8 - 16;
                        }
                    }
                    _ => {
                        for (o, &q) in a.iter_mut().zip(&b[2..34]) {
                            *o = q as i8;
                        }
                    }
                }
                let dd = dx * x.d[i];
                for (l, acc) in lanes.iter_mut().enumerate() {
                    *acc = dd.mul_add(idot4(&a[4 * l..4 * l + 4], &qy[4 * l..]) as f32, *acc);
                }
                if t == GgmlType::Q4_1 {
                    summs += f16_at(b, 2) * x.s[i];
                }
            }
            sum = hsum8(&lanes) + summs;
        }
        GgmlType::Q4K | GgmlType::Q6K => {
            let mut a = [0i8; 256];
            // scale of each group of 16 codes (Q4_K: per 32, repeated)
            let mut sc = [0i32; 16];
            for (i, (b, qy)) in row.chunks_exact(bb).zip(x.qs.chunks_exact(256)).enumerate() {
                let dy = x.d[i];
                let mut min_term = 0f32;
                let dx = if t == GgmlType::Q4K {
                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                    let scales = &b[4..16];
                    let qs = &b[16..144];
                    let mut mins = 0i32;
                    for j in 0..4 {
                        let (s1, m1) = scale_min_k4(2 * j, scales);
                        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                        let q = &qs[32 * j..32 * j + 32];
                        let out = &mut a[64 * j..64 * j + 64];
                        let (lo, hi) = out.split_at_mut(32);
                        for ((&v, l), h) in q.iter().zip(lo).zip(hi) {
                            *l = (v & 0xF) as i8;
                            *h = (v >> 4) as i8;
                        }
                        sc[4 * j] = s1 as i32;
                        sc[4 * j + 1] = s1 as i32;
                        sc[4 * j + 2] = s2 as i32;
                        sc[4 * j + 3] = s2 as i32;
                        let bs = &x.bsums[16 * i + 4 * j..16 * i + 4 * j + 4];
                        mins += m1 as i32 * (bs[0] + bs[1]) + m2 as i32 * (bs[2] + bs[3]);
                    }
                    min_term = dmin * dy * mins as f32;
                    d
                } else {
                    let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
                    for half in 0..2 {
                        let ql = &ql_all[64 * half..64 * half + 64];
                        let qh = &qh_all[32 * half..32 * half + 32];
                        let y = &mut a[128 * half..128 * half + 128];
                        for l in 0..32 {
                            y[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                            y[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                            y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                            y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                        }
                        // groups of 16: l / 16 + {0, 2, 4, 6} within the half
                        for (g, s) in sc[8 * half..8 * half + 8].iter_mut().enumerate() {
                            *s = sc_all[8 * half + g] as i8 as i32;
                        }
                    }
                    f16_at(b, 208)
                };
                let mut sumi = 0i32;
                for ((g, qg), s) in a.chunks_exact(16).zip(qy.chunks_exact(16)).zip(sc) {
                    let p: i32 = g.iter().zip(qg).map(|(&u, &v)| u as i32 * v as i32).sum();
                    sumi += s * p;
                }
                sum += dx * dy * sumi as f32 - min_term;
            }
        }
        // these take f32 activations (`Q8Kind::for_weights` is `None`)
        GgmlType::F32
        | GgmlType::F16
        | GgmlType::BF16
        | GgmlType::Q5_1
        | GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q5K => {}
    }
    sum
}

#[cfg(test)]
mod round_tests {
    use super::round_even_small;

    #[test]
    fn small_rounding_is_round_half_to_even() {
        // every quarter step in the codes' range, ties included, and values
        // just beside the ties
        for i in -600..=600 {
            for v in [i as f32 / 4.0, i as f32 / 4.0 + 1e-4, i as f32 / 4.0 - 1e-4] {
                assert_eq!(round_even_small(v), v.round_ties_even(), "{v}");
            }
        }
        assert_eq!(round_even_small(2.5), 2.0);
        assert_eq!(round_even_small(-3.5), -4.0);
    }
}
