//! AVX2 + FMA + F16C kernels for the f32 numerics: one weight row of the
//! common 32-element formats against one f32 activation row, without writing
//! the dequantised row out.
//!
//! Why intrinsics here: the compiler's vectorisation of the portable
//! dequantise-then-dot code used two-lane loads for the dot product and
//! a software f16 conversion per block (profiled: the kernel took 59% of a
//! decode step). Each block here is unpacked in registers, converted to f32
//! and fused into eight-lane accumulators; the block's scale multiplies the
//! block's partial sum once.
//!
//! Every function needs the CPU features it is compiled for (checked by the
//! caller, [`super::kernel::has_avx2`]) and rows of whole blocks matching
//! `x` (checked by the caller; a shorter slice only stops early).

use std::arch::x86_64::*;

/// Sum of the eight lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Two f16 values at `p` (little-endian) as f32, through F16C. One 32-bit
/// move zeroes the register's other lanes; a 16-bit insert would merge into
/// whatever register the compiler picks (in an AVX-512 kernel it picked an
/// accumulator and chained every block's scale to the previous sum). Shared
/// with `avx512.rs`.
#[inline(always)]
pub(super) unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// 16 nibble codes (`lo` holds the low nibbles as bytes) times 16 activations.
#[inline(always)]
unsafe fn bytes16_dot(q: __m128i, x: *const f32) -> __m256 {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
    _mm256_fmadd_ps(
        b,
        _mm256_loadu_ps(x.add(8)),
        _mm256_mul_ps(a, _mm256_loadu_ps(x)),
    )
}

/// One Q4_0 / Q4_1 block's `sum(q * x)` over its 32 codes.
#[inline(always)]
unsafe fn q4_block(p: *const u8, qoff: usize, xb: *const f32) -> __m256 {
    let mask = _mm_set1_epi8(0x0F);
    let qs = _mm_loadu_si128(p.add(qoff) as *const __m128i);
    let lo = _mm_and_si128(qs, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    _mm256_add_ps(bytes16_dot(lo, xb), bytes16_dot(hi, xb.add(16)))
}

/// Q4_0 / Q4_1 row: `d * q + m` (Q4_0: `m = -8 d`) against `x`; `xsum[b]`
/// is the sum of block `b` of `x`. Two blocks per iteration into separate
/// accumulators, so the loop is not bound by one chain of dependent adds.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4(row: &[u8], x: &[f32], xsum: &[f32], with_min: bool) -> f32 {
    let bb = if with_min { 20 } else { 18 };
    let qoff = bb - 16;
    let nb = (row.len() / bb).min(x.len() / 32).min(xsum.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut min0, mut min1) = (0f32, 0f32);
    let scales = |b: usize| {
        let (d, m) = f16x2(row.as_ptr().add(b * bb));
        (d, if with_min { m } else { -8.0 * d })
    };
    let mut b = 0;
    while b + 2 <= nb {
        let (d0, m0) = scales(b);
        let (d1, m1) = scales(b + 1);
        let s0 = q4_block(row.as_ptr().add(b * bb), qoff, x.as_ptr().add(b * 32));
        let s1 = q4_block(
            row.as_ptr().add((b + 1) * bb),
            qoff,
            x.as_ptr().add(b * 32 + 32),
        );
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), s0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), s1, acc1);
        min0 += m0 * xsum[b];
        min1 += m1 * xsum[b + 1];
        b += 2;
    }
    if b < nb {
        let (d0, m0) = scales(b);
        let s0 = q4_block(row.as_ptr().add(b * bb), qoff, x.as_ptr().add(b * 32));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), s0, acc0);
        min0 += m0 * xsum[b];
    }
    hsum(_mm256_add_ps(acc0, acc1)) + (min0 + min1)
}

/// The fifth bits of 16 codes: byte `j` is `0x10` where bit `first + j` of
/// `qh` is set (`first` 0 or 16).
#[inline(always)]
unsafe fn high_bits16(qh: u32, first: u32) -> __m128i {
    // bytes 0-7 take qh's byte first/8, bytes 8-15 the next one
    let b = (first / 8) as i8;
    let spread = _mm_shuffle_epi8(
        _mm_cvtsi32_si128(qh as i32),
        _mm_set_epi8(
            b + 1,
            b + 1,
            b + 1,
            b + 1,
            b + 1,
            b + 1,
            b + 1,
            b + 1,
            b,
            b,
            b,
            b,
            b,
            b,
            b,
            b,
        ),
    );
    let bit = _mm_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm_cmpeq_epi8(_mm_and_si128(spread, bit), bit);
    _mm_and_si128(set, _mm_set1_epi8(0x10))
}

/// One Q5_0 / Q5_1 block's `sum(q * x)` over its 32 five-bit codes (low
/// nibbles at `qoff`, high bits at `hoff`).
#[inline(always)]
unsafe fn q5_block(p: *const u8, hoff: usize, qoff: usize, xb: *const f32) -> __m256 {
    let mask = _mm_set1_epi8(0x0F);
    let qh = std::ptr::read_unaligned(p.add(hoff) as *const u32);
    let qs = _mm_loadu_si128(p.add(qoff) as *const __m128i);
    let lo = _mm_or_si128(_mm_and_si128(qs, mask), high_bits16(qh, 0));
    let hi = _mm_or_si128(
        _mm_and_si128(_mm_srli_epi16(qs, 4), mask),
        high_bits16(qh, 16),
    );
    _mm256_add_ps(bytes16_dot(lo, xb), bytes16_dot(hi, xb.add(16)))
}

/// Q5_0 / Q5_1 row: `d * q + m` (Q5_0: `m = -16 d`) against `x`; `xsum[b]`
/// is the sum of block `b` of `x`. As [`dot_q4`], two blocks per iteration.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q5(row: &[u8], x: &[f32], xsum: &[f32], with_min: bool) -> f32 {
    let (bb, hoff) = if with_min { (24, 4) } else { (22, 2) };
    let qoff = hoff + 4;
    let nb = (row.len() / bb).min(x.len() / 32).min(xsum.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut min0, mut min1) = (0f32, 0f32);
    let scales = |b: usize| {
        let (d, m) = f16x2(row.as_ptr().add(b * bb));
        (d, if with_min { m } else { -16.0 * d })
    };
    let block = |b: usize| q5_block(row.as_ptr().add(b * bb), hoff, qoff, x.as_ptr().add(b * 32));
    let mut b = 0;
    while b + 2 <= nb {
        let (d0, m0) = scales(b);
        let (d1, m1) = scales(b + 1);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), block(b), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), block(b + 1), acc1);
        min0 += m0 * xsum[b];
        min1 += m1 * xsum[b + 1];
        b += 2;
    }
    if b < nb {
        let (d0, m0) = scales(b);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), block(b), acc0);
        min0 += m0 * xsum[b];
    }
    hsum(_mm256_add_ps(acc0, acc1)) + (min0 + min1)
}

/// 16 signed codes times 16 activations.
#[inline(always)]
unsafe fn signed16_dot(q: __m128i, x: *const f32) -> __m256 {
    let a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    let b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
    _mm256_fmadd_ps(
        b,
        _mm256_loadu_ps(x.add(8)),
        _mm256_mul_ps(a, _mm256_loadu_ps(x)),
    )
}

/// Q4_K row (super-blocks of 256: eight sub-blocks of 32 with 6-bit scales
/// and mins) against `x`: `d * sc * q - dmin * m` per sub-block, the mins
/// taken through `xsum` (sums of 32-element blocks of `x`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_k(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let nb = (row.len() / 144).min(x.len() / 256).min(xsum.len() / 8);
    let mask = _mm_set1_epi8(0x0F);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut mins = 0f32;
    for b in 0..nb {
        let p = row.as_ptr().add(b * 144);
        let (d, dmin) = f16x2(p);
        let scales = std::slice::from_raw_parts(p.add(4), 12);
        let xb = x.as_ptr().add(b * 256);
        let xs = &xsum[b * 8..b * 8 + 8];
        for j in 0..4 {
            let (sc1, m1) = crate::gguf::scale_min_k4(2 * j, scales);
            let (sc2, m2) = crate::gguf::scale_min_k4(2 * j + 1, scales);
            let q0 = _mm_loadu_si128(p.add(16 + 32 * j) as *const __m128i);
            let q1 = _mm_loadu_si128(p.add(16 + 32 * j + 16) as *const __m128i);
            let x0 = xb.add(64 * j);
            let lo = _mm256_add_ps(
                bytes16_dot(_mm_and_si128(q0, mask), x0),
                bytes16_dot(_mm_and_si128(q1, mask), x0.add(16)),
            );
            let hi = _mm256_add_ps(
                bytes16_dot(_mm_and_si128(_mm_srli_epi16(q0, 4), mask), x0.add(32)),
                bytes16_dot(_mm_and_si128(_mm_srli_epi16(q1, 4), mask), x0.add(48)),
            );
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1 as f32), lo, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * sc2 as f32), hi, acc1);
            mins += dmin * (m1 as f32 * xs[2 * j] + m2 as f32 * xs[2 * j + 1]);
        }
    }
    hsum(_mm256_add_ps(acc0, acc1)) - mins
}

/// Q6_K row (super-blocks of 256: sixteen groups of 16 with signed 8-bit
/// scales, codes of 4 low and 2 high bits biased by 32) against `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6_k(row: &[u8], x: &[f32]) -> f32 {
    let nb = (row.len() / 210).min(x.len() / 256);
    let (low4, high2, bias) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(0x30), _mm_set1_epi8(32));
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for b in 0..nb {
        let p = row.as_ptr().add(b * 210);
        let d = f16x2(p.add(206)).1;
        for half in 0..2 {
            let (ql, qh) = (p.add(64 * half), p.add(128 + 32 * half));
            let sc = p.add(192 + 8 * half) as *const i8;
            let xh = x.as_ptr().add(b * 256 + 128 * half);
            // l0: the first or second 16 of the 32 columns of a quarter
            for (g, l0) in [0usize, 16].into_iter().enumerate() {
                let a = _mm_loadu_si128(ql.add(l0) as *const __m128i);
                let c = _mm_loadu_si128(ql.add(32 + l0) as *const __m128i);
                let h = _mm_loadu_si128(qh.add(l0) as *const __m128i);
                let codes = [
                    _mm_or_si128(
                        _mm_and_si128(a, low4),
                        _mm_and_si128(_mm_slli_epi16(h, 4), high2),
                    ),
                    _mm_or_si128(
                        _mm_and_si128(c, low4),
                        _mm_and_si128(_mm_slli_epi16(h, 2), high2),
                    ),
                    _mm_or_si128(
                        _mm_and_si128(_mm_srli_epi16(a, 4), low4),
                        _mm_and_si128(h, high2),
                    ),
                    _mm_or_si128(
                        _mm_and_si128(_mm_srli_epi16(c, 4), low4),
                        _mm_and_si128(_mm_srli_epi16(h, 2), high2),
                    ),
                ];
                for (k, q) in codes.into_iter().enumerate() {
                    let s = d * *sc.add(g + 2 * k) as f32;
                    let dot = signed16_dot(_mm_sub_epi8(q, bias), xh.add(32 * k + l0));
                    if k % 2 == 0 {
                        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s), dot, acc0);
                    } else {
                        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s), dot, acc1);
                    }
                }
            }
        }
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// One Q8_0 block's `sum(q * x)`.
#[inline(always)]
unsafe fn q8_block(p: *const u8, xb: *const f32) -> __m256 {
    let f = |k: usize| {
        let q = _mm_loadl_epi64(p.add(2 + 8 * k) as *const __m128i);
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    };
    let a = _mm256_fmadd_ps(
        f(1),
        _mm256_loadu_ps(xb.add(8)),
        _mm256_mul_ps(f(0), _mm256_loadu_ps(xb)),
    );
    let b = _mm256_fmadd_ps(
        f(3),
        _mm256_loadu_ps(xb.add(24)),
        _mm256_mul_ps(f(2), _mm256_loadu_ps(xb.add(16))),
    );
    _mm256_add_ps(a, b)
}

/// Q8_0 row against `x`, two blocks per iteration.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let nb = (row.len() / 34).min(x.len() / 32);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut b = 0;
    while b + 2 <= nb {
        let (p0, p1) = (row.as_ptr().add(b * 34), row.as_ptr().add(b * 34 + 34));
        let (d0, _) = f16x2(p0);
        let (d1, _) = f16x2(p1);
        let s0 = q8_block(p0, x.as_ptr().add(b * 32));
        let s1 = q8_block(p1, x.as_ptr().add(b * 32 + 32));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0), s0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), s1, acc1);
        b += 2;
    }
    if b < nb {
        let p0 = row.as_ptr().add(b * 34);
        let (d0, _) = f16x2(p0);
        acc0 = _mm256_fmadd_ps(
            _mm256_set1_ps(d0),
            q8_block(p0, x.as_ptr().add(b * 32)),
            acc0,
        );
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// Two Q8_0 rows against one `x` (a decode step's single token): each
/// activation load serves both rows, and the two rows' chains are
/// independent.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_pair(ra: &[u8], rb: &[u8], x: &[f32]) -> (f32, f32) {
    let nb = (ra.len() / 34).min(rb.len() / 34).min(x.len() / 32);
    let (mut acc_a, mut acc_b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let f = |p: *const u8, k: usize| {
        let q = _mm_loadl_epi64(p.add(2 + 8 * k) as *const __m128i);
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    };
    for b in 0..nb {
        let (pa, pb) = (ra.as_ptr().add(b * 34), rb.as_ptr().add(b * 34));
        let xb = x.as_ptr().add(b * 32);
        let (mut sa, mut sb) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for k in 0..4 {
            let xv = _mm256_loadu_ps(xb.add(8 * k));
            sa = _mm256_fmadd_ps(f(pa, k), xv, sa);
            sb = _mm256_fmadd_ps(f(pb, k), xv, sb);
        }
        acc_a = _mm256_fmadd_ps(_mm256_set1_ps(f16x2(pa).0), sa, acc_a);
        acc_b = _mm256_fmadd_ps(_mm256_set1_ps(f16x2(pb).0), sb, acc_b);
    }
    (hsum(acc_a), hsum(acc_b))
}

/// `sum(a[i] * b[i])` in four eight-lane accumulators.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, s) in acc.iter_mut().enumerate() {
            *s = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8 * k)),
                _mm256_loadu_ps(pb.add(i + 8 * k)),
                *s,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let mut tail = 0f32;
    while i < n {
        tail += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    )) + tail
}

/// Sum of products of 32 unsigned bytes `x` with 32 signed bytes `y`, as
/// eight f32 lanes (maddubs then madd: no overflow for codes below 64).
#[inline(always)]
unsafe fn mul_sum_u8_i8(x: __m256i, y: __m256i) -> __m256 {
    let dot16 = _mm256_maddubs_epi16(x, y);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, _mm256_set1_epi16(1)))
}

/// The same for two signed byte vectors (the sign moved onto `y`).
#[inline(always)]
unsafe fn mul_sum_i8_i8(x: __m256i, y: __m256i) -> __m256 {
    mul_sum_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// 16 bytes of nibbles as 32 codes: low nibbles first, then high nibbles.
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    let qs = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// q8 numerics, Q4_0 / Q4_1 row against 8-bit activations (`d`, `s`: per
/// block scale and, for Q4_1, scaled code sum; `qs`: codes), in llama.cpp's
/// order: eight-lane accumulator of `d_x d_y sum(q_x q_y)`, the min terms
/// summed apart.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_q8(row: &[u8], d: &[f32], s: &[f32], qs: &[i8], with_min: bool) -> f32 {
    let bb = if with_min { 20 } else { 18 };
    let nb = (row.len() / bb).min(d.len()).min(qs.len() / 32);
    let nb = if with_min { nb.min(s.len()) } else { nb };
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    for b in 0..nb {
        let p = row.as_ptr().add(b * bb);
        let (dx, m) = f16x2(p);
        let qy = _mm256_loadu_si256(qs.as_ptr().add(32 * b) as *const __m256i);
        let qx = nibbles32(p.add(bb - 16));
        let xy = if with_min {
            summs += m * s[b];
            mul_sum_u8_i8(qx, qy)
        } else {
            mul_sum_i8_i8(_mm256_sub_epi8(qx, _mm256_set1_epi8(8)), qy)
        };
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * d[b]), xy, acc);
    }
    hsum(acc) + summs
}

/// q8 numerics, Q8_0 row against 8-bit activations.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0_q8(row: &[u8], d: &[f32], qs: &[i8]) -> f32 {
    let nb = (row.len() / 34).min(d.len()).min(qs.len() / 32);
    let mut acc = _mm256_setzero_ps();
    for (b, &dy) in d.iter().enumerate().take(nb) {
        let p = row.as_ptr().add(b * 34);
        let (dx, _) = f16x2(p);
        let qx = _mm256_loadu_si256(p.add(2) as *const __m256i);
        let qy = _mm256_loadu_si256(qs.as_ptr().add(32 * b) as *const __m256i);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dx * dy), mul_sum_i8_i8(qx, qy), acc);
    }
    hsum(acc)
}
