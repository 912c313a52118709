//! The attention-weighted sums of value latents stored as blocks of codes
//! (q8_0, q4_0, mixed: int8 latents, the default, int4 and the presets'
//! mixed rows), read where they are stored.
//!
//! Why: a DynaKV decode step sums every stored value latent of a layer
//! once, weighted by each query row's attention (`z += p * latent`). The
//! wide value loop ([`super::latent_wide::value_chunk`]) first decoded a
//! chunk's rows into an f32 buffer (codes widened, scaled and stored), read
//! them back for the sums, and collected the tokens that kept a key into a
//! list; in a profile of a step at 8k those three were more than half of
//! the value side. Here each block of 32 codes is widened and scaled in
//! registers and added into up to [`ROWS`] query rows at once (two vectors
//! each), token after token. The products and their order are the decoded
//! path's, so the sums are the same bits.

use std::ops::Range;

use super::latent_decode::{BucketView, ValueJob};

/// Query rows summed together: two accumulators each, 24 of the 32
/// registers, the block's two vectors and a weight beside them.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 12;

/// Adds tokens `toks` of a value bucket, weighted by each query row's
/// attention, into `z` (`[H*T, d]`), reading the bucket's codes in place:
/// the contract of the wide `value_chunk`. Returns `false`, writing
/// nothing, when the bucket is not stored as blocks of codes, the shapes do
/// not fit, or this CPU lacks AVX-512 BW / VL or F16C.
pub(super) fn value_chunk_codes(
    job: &ValueJob,
    b: &BucketView,
    toks: Range<usize>,
    z: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::latent_codes::in_place() {
        let fits = toks.end <= b.lat.len()
            && toks.end <= b.ids.len()
            && b.rank == b.lat.dim()
            && b.rank <= job.d
            && z.len() >= job.ht * job.d
            && job.probs.len() >= job.ht * job.slots;
        if let Some(rows) = b.lat.code_bytes().filter(|_| fits) {
            // SAFETY: in_place() checked the CPU's features
            unsafe { sums(job, b, &rows, toks, z) };
            return true;
        }
    }
    let _ = (job, b, toks, z);
    false
}

/// Every block of the rows, for groups of up to [`ROWS`] query rows.
///
/// # Safety
/// The CPU has AVX-512F, BW, VL and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn sums(
    job: &ValueJob,
    b: &BucketView,
    rows: &dynakv_core::quant::CodeRows,
    toks: Range<usize>,
    z: &mut [f32],
) {
    use dynakv_core::quant::QBLOCK;
    for (i, blk) in rows.blocks().enumerate() {
        let mut r0 = 0;
        while r0 < job.ht {
            let take = (job.ht - r0).min(ROWS);
            let at = Place { c0: i * QBLOCK, r0 };
            macro_rules! rows_of {
                ($($r:literal)*) => {
                    match take {
                        $($r => block::<$r>(job, b, rows, blk, at, toks.clone(), z),)*
                        _ => unreachable!("1 <= take <= ROWS"),
                    }
                };
            }
            // SAFETY: this function's contract
            unsafe { rows_of!(1 2 3 4 5 6 7 8 9 10 11 12) };
            r0 += take;
        }
    }
}

/// The first latent coordinate of a block and the first query row of a group.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Place {
    c0: usize,
    r0: usize,
}

/// Latent coordinates `c0..c0 + blk.n` of query rows `r0..r0 + R` summed
/// over the tokens that kept a key, in registers.
///
/// # Shapes
/// `z`: `[H*T, d]`; `rows`: `[tokens, row_bytes]`.
///
/// # Safety
/// The CPU has AVX-512F, BW, VL and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
#[inline]
unsafe fn block<const R: usize>(
    job: &ValueJob,
    b: &BucketView,
    rows: &dynakv_core::quant::CodeRows,
    blk: dynakv_core::quant::CodeBlock,
    Place { c0, r0 }: Place,
    toks: Range<usize>,
    z: &mut [f32],
) {
    use super::latent_codes::lanes_mask;
    use std::arch::x86_64::*;
    let d = job.d;
    assert!(r0 + R <= job.ht && c0 + blk.n <= b.rank && b.rank <= d);
    assert!(z.len() >= job.ht * d && job.probs.len() >= job.ht * job.slots);
    let masks = [
        lanes_mask(blk.n.min(16)),
        lanes_mask(blk.n.saturating_sub(16)),
    ];
    let zat = |r: usize, v: usize| (r0 + r) * d + c0 + 16 * v;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (v, a) in row.iter_mut().enumerate() {
            // SAFETY: the live lanes are coordinates c0..c0 + n <= rank <= d
            // of row r0 + r < ht (asserted)
            *a = unsafe { _mm512_maskz_loadu_ps(masks[v], z.as_ptr().add(zat(r, v))) };
        }
    }
    for tok in toks {
        let slot = job.slot[b.ids[tok]];
        if slot == usize::MAX {
            continue;
        }
        assert!(slot < job.slots);
        let row = &rows.bytes[tok * rows.row_bytes..(tok + 1) * rows.row_bytes];
        // SAFETY: this function's contract
        let x = unsafe { widen(row, blk) };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r0 + r < ht and slot < slots (asserted): inside probs
            let w =
                _mm512_set1_ps(unsafe { *job.probs.get_unchecked((r0 + r) * job.slots + slot) });
            for (a, &x) in acc.iter_mut().zip(&x) {
                *a = _mm512_fmadd_ps(w, x, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: as for the loads
            unsafe { _mm512_mask_storeu_ps(z.as_mut_ptr().add(zat(r, v)), masks[v], *a) };
        }
    }
}

/// One block of a row as two vectors of `scale * code` (lanes past the
/// block's `n` codes are 0): the numbers
/// [`PackedRows::rows`](dynakv_core::quant::PackedRows::rows) gives.
///
/// # Safety
/// The CPU has AVX-512F, BW, VL and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
#[inline]
unsafe fn widen(row: &[u8], blk: dynakv_core::quant::CodeBlock) -> [std::arch::x86_64::__m512; 2] {
    use super::latent_codes::{block_scale, lanes_mask};
    use std::arch::x86_64::*;
    let (at, n, body) = (blk.at, blk.n, blk.code_bytes());
    assert!((1..=32).contains(&n) && at + 2 + body <= row.len());
    let scale = _mm512_set1_ps(block_scale(row[at], row[at + 1]));
    let src = row[at + 2..].as_ptr() as *const i8;
    // the block's 32 codes as bytes
    // SAFETY: the masked loads read the block's `body` bytes (asserted)
    let codes = unsafe {
        if blk.eight {
            _mm256_maskz_loadu_epi8(u32::MAX >> (32 - n), src)
        } else {
            let (low, eight) = (_mm_set1_epi8(15), _mm_set1_epi8(8));
            let q = _mm_maskz_loadu_epi8(lanes_mask(body), src);
            let lo = _mm_sub_epi8(_mm_and_si128(q, low), eight);
            let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(q), low), eight);
            if n == 32 {
                _mm256_set_m128i(hi, lo)
            } else {
                // a row's shorter last block: the high nibbles follow the
                // low ones at `body`, inside the first vector
                let mut all = [0i8; 32];
                _mm_mask_storeu_epi8(all.as_mut_ptr(), lanes_mask(body), lo);
                _mm_mask_storeu_epi8(all.as_mut_ptr().add(body), lanes_mask(n - body), hi);
                _mm256_loadu_si256(all.as_ptr() as *const __m256i)
            }
        }
    };
    let to_f32 = |q: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), scale);
    [
        to_f32(_mm256_castsi256_si128(codes)),
        to_f32(_mm256_extracti128_si256::<1>(codes)),
    ]
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use dynakv_core::quant::{KvDtype, PackedRows, RowCodec};

    /// The sums against the decoded rows' products added in token order
    /// with one rounding each (as the kernel's FMAs): bit for bit, for every
    /// code format, ranks with short last blocks (4-bit ones split
    /// unevenly), query rows past one group of [`ROWS`], a token without a
    /// key slot and sums that start from earlier chunks' values.
    #[test]
    fn sums_read_from_codes_equal_the_decoded_rows_products() {
        if !crate::host::latent_codes::in_place() {
            eprintln!("no AVX-512 BW / VL: skipped");
            return;
        }
        let f = |i: usize| ((i * 7919) % 61) as f32 / 30.0 - 1.0;
        let d = 80;
        for codec in [
            RowCodec::Plain(KvDtype::Q8_0),
            RowCodec::Plain(KvDtype::Q4_0),
            RowCodec::Mixed,
        ] {
            for rank in [5, 21, 32, 37, 64, 80] {
                for ht in [1, 9, 13] {
                    let n = 11;
                    let mut lat = PackedRows::new(codec.clone(), rank);
                    lat.push(&(0..n * rank).map(|i| f(i + rank)).collect::<Vec<_>>());
                    // ids 3..3 + n; id 7 has no key slot
                    let ids: Vec<usize> = (3..3 + n).collect();
                    let slots = n + 2;
                    let slot: Vec<usize> = (0..3 + n)
                        .map(|id| match id {
                            7 => usize::MAX,
                            _ => (id * 5) % slots,
                        })
                        .collect();
                    let probs: Vec<f32> = (0..ht * slots).map(|i| f(i + 3).abs()).collect();
                    let job = ValueJob {
                        slot: &slot,
                        probs: &probs,
                        slots,
                        ht,
                        d,
                    };
                    let view = BucketView {
                        rank,
                        lat: &lat,
                        positions: &ids,
                        ids: &ids,
                    };
                    let start: Vec<f32> = (0..ht * d).map(|i| f(i + 17)).collect();
                    let mut got = start.clone();
                    assert!(value_chunk_codes(&job, &view, 2..n, &mut got));
                    let mut buf = vec![0f32; n * rank];
                    let rows = lat.rows(0, n, &mut buf);
                    let mut want = start;
                    for tok in 2..n {
                        let sl = slot[ids[tok]];
                        if sl == usize::MAX {
                            continue;
                        }
                        for qi in 0..ht {
                            let w = probs[qi * slots + sl];
                            for j in 0..rank {
                                let z = &mut want[qi * d + j];
                                *z = w.mul_add(rows[tok * rank + j], *z);
                            }
                        }
                    }
                    assert_eq!(got, want, "{codec:?} rank {rank} rows {ht}");
                }
            }
        }
        // f32 rows are not codes: nothing written
        let lat = PackedRows::new(RowCodec::Plain(KvDtype::F32), 4);
        let job = ValueJob {
            slot: &[],
            probs: &[],
            slots: 0,
            ht: 1,
            d: 4,
        };
        let view = BucketView {
            rank: 4,
            lat: &lat,
            positions: &[],
            ids: &[],
        };
        assert!(!value_chunk_codes(&job, &view, 0..0, &mut [0.0; 4]));
    }
}
