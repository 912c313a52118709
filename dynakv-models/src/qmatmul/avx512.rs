//! AVX-512 kernels for the f32 numerics of the 4-bit formats a decode step
//! spends most of its time in (Q4_0, Q4_1): one weight row against one f32
//! activation row, sixteen lanes a block half.
//!
//! Why a second copy beside `avx2.rs`: profiled on a 2-core Sapphire Rapids
//! machine (`perf record` on a SmolLM2 decode), the AVX2 Q4_1 kernel took 52%
//! of a step and ran at about 12 cycles per block of 32 weights while the
//! step's 98 MB of blocks streamed from cache at a small part of the bandwidth
//! available (two threads read 98 MB at about 48 GB/s there): the kernel was
//! bound by instructions, most of them the eight-lane widening of 32 codes
//! (four byte-to-int conversions and a byte shift per block, all on one
//! port). Here a block is one 16-byte load widened once to sixteen 32-bit
//! lanes, its low and high nibbles split with a mask and a shift, so a block
//! costs about half the instructions: a Q4_1 product of 1,536 x 576 went from
//! 136-161 to 103-109 us on one thread (`cargo bench -p dynakv-bench --bench
//! qmatmul`, alternating runs). A Q8_0 row written the same way was slower
//! than the AVX2 kernel that takes two rows per activation load (the output
//! head: 4.0-4.2 against 2.7-3.1 ms), so Q8_0 stays there.
//!
//! Every function needs the CPU features it is compiled for (checked by the
//! caller, [`super::kernel::has_avx512`]) and rows of whole blocks matching
//! `x` (checked by the caller; a shorter slice only stops early).

use std::arch::x86_64::*;

use super::avx2::f16x2;

/// One Q4_0 / Q4_1 block's `sum(q * x)` over its 32 codes (16 bytes at `q`:
/// code `j` in the low nibble of byte `j`, code `16 + j` in its high nibble).
#[inline(always)]
unsafe fn q4_block(q: *const u8, xb: *const f32) -> __m512 {
    let codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q as *const __m128i));
    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(codes, _mm512_set1_epi32(0x0F)));
    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(codes, 4));
    _mm512_fmadd_ps(
        hi,
        _mm512_loadu_ps(xb.add(16)),
        _mm512_mul_ps(lo, _mm512_loadu_ps(xb)),
    )
}

/// Q4_0 / Q4_1 row: `d * q + m` (Q4_0: `m = -8 d`) against `x`; `xsum[b]`
/// is the sum of block `b` of `x`. Two blocks per iteration into separate
/// accumulators, so the loop is not one chain of dependent adds.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4(row: &[u8], x: &[f32], xsum: &[f32], with_min: bool) -> f32 {
    let bb = if with_min { 20 } else { 18 };
    let qoff = bb - 16;
    let nb = (row.len() / bb).min(x.len() / 32).min(xsum.len());
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let (mut min0, mut min1) = (0f32, 0f32);
    let p = row.as_ptr();
    let xp = x.as_ptr();
    let mut b = 0;
    while b < nb {
        let pb = p.add(b * bb);
        let (d, m) = f16x2(pb);
        let m = if with_min { m } else { -8.0 * d };
        acc0 = _mm512_fmadd_ps(
            _mm512_set1_ps(d),
            q4_block(pb.add(qoff), xp.add(b * 32)),
            acc0,
        );
        min0 += m * xsum[b];
        if b + 1 < nb {
            let pb = pb.add(bb);
            let (d, m) = f16x2(pb);
            let m = if with_min { m } else { -8.0 * d };
            let s = q4_block(pb.add(qoff), xp.add(b * 32 + 32));
            acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc1);
            min1 += m * xsum[b + 1];
        }
        b += 2;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (min0 + min1)
}
