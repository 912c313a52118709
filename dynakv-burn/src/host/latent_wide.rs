//! The latent decode kernel's two token loops with AVX-512: pre-RoPE keys
//! of a DynaKV bucket rebuilt from their latents, rotated and scored, and
//! the attention-weighted sums of value latents. These are the parts of a
//! DynaKV decode step that grow with the context.
//!
//! Why: a pre-RoPE key has to be rebuilt before RoPE can turn it (rank x d
//! multiply-adds a token: about 58 x 192 = 11k on SmolLM2 at budget 0.30,
//! against 192 for reading a dense key), so this product is most of a
//! DynaKV decode step at long context. The portable kernel in
//! [`super::latent_decode`], compiled for AVX2, keeps four tokens by
//! sixteen columns in registers and multiplies and adds separately (Rust
//! does not contract `a * b + c`). Here sixteen lanes, fused multiply-adds
//! and 32 registers hold [`TILE`] tokens by 64 columns in 24 accumulators
//! while the rank loop streams the decoder, so each decoder vector loaded
//! feeds [`TILE`] FMAs; RoPE and the query dots then run on the rebuilt
//! tile while it sits in L1, each query head's dots with the tile's keys
//! sharing their horizontal sums.
//!
//! Values: each query row's latent sum `z += p * latent` was an axpy per
//! token and row through memory; here up to six rows by four vectors of
//! latent coordinates stay in registers across the chunk's tokens.
//!
//! Sums run in another order than the portable kernel's (and fused), so
//! scores agree to rounding, not bit for bit; the test holds them to the
//! portable kernel's.

#[cfg(target_arch = "x86_64")]
use super::latent_codes::{self, CodeTile};
#[cfg(target_arch = "x86_64")]
use super::latent_decode::{tile_buffer, BucketView, HostBasis, Job, ValueJob};
use super::HostRope;
#[cfg(target_arch = "x86_64")]
use crate::attention::hidden;
use crate::rope::RopeStyle;

/// Tokens rebuilt together: 6 tokens x 4 vectors of accumulators, 4 decoder
/// vectors and a broadcast fill 29 of the 32 registers (the integer
/// rebuild's tile is the same).
#[cfg(target_arch = "x86_64")]
const TILE: usize = latent_codes::TILE;

/// Whether this CPU runs [`score_chunk`] for keys of `d = H_kv * head_dim`
/// values under `rope`: AVX-512F, whole 16-lane vectors per head (32 for
/// split halves, whose halves are vectors too) and RoPE on every coordinate.
pub(crate) fn available(head_dim: usize, rope: &HostRope) -> bool {
    let shape = head_dim > 0
        && head_dim.is_multiple_of(16)
        && rope.rotates_all(head_dim)
        && (rope.style() == RopeStyle::Interleaved || head_dim.is_multiple_of(32));
    #[cfg(target_arch = "x86_64")]
    {
        shape && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = shape;
        false
    }
}

/// Whether this CPU runs [`value_chunk`] (AVX-512F; any rank).
pub(crate) fn available_for_values() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scores of one chunk of a pre-RoPE key bucket's tokens, starting at token
/// `first`, into `out` (`[H*T]` rows of the chunk's length): the same
/// contract as the portable `score_chunk` for
/// [`RopePlacement::Pre`](dynakv_core::artifact::RopePlacement).
///
/// # Safety
/// [`available`] returned true for this head width and rope.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn score_chunk(job: &Job, b: &BucketView, first: usize, out: &mut [&mut [f32]]) {
    let heads = job.heads;
    let (h, hk, dh) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let (t, groups, d) = (job.q_pos.len(), h / hk, hk * dh);
    let n = out.first().map_or(0, |r| r.len());
    let mut kbuf = vec![0f32; TILE * d];
    // each token's cos and sin rows (`[TILE, 2, head_dim]`)
    let mut turns = vec![0f32; TILE * 2 * dh];
    // latents stored as integer codes meet the decoder's codes; others are
    // decoded to f32 a tile at a time
    let mut codes = job
        .key_codes
        .filter(|_| b.lat.has_block_codes())
        .map(|key| (key, CodeTile::new(b.rank)));
    let mut latbuf = match codes {
        Some(_) => Vec::new(),
        None => tile_buffer(b, TILE),
    };
    let mut i = 0;
    while i < n {
        let m = (n - i).min(TILE);
        let integer = match codes.as_mut() {
            Some((key, tile)) => tile.load(b.lat, first + i, m).then_some((*key, &*tile)),
            None => None,
        };
        let positions = &b.positions[first + i..first + i + m];
        // the tile's rotations, from the rope's small tables (each full row
        // would come from memory)
        for (k, &pos) in positions.iter().enumerate() {
            job.rope
                .row_into(pos, &mut turns[k * 2 * dh..(k + 1) * 2 * dh]);
        }
        let turns = &turns[..m * 2 * dh];
        // interleaved pairs sit inside a 16-lane vector: the integer
        // rebuild rotates them before storing
        let turned = integer.is_some() && job.rope.style() == RopeStyle::Interleaved;
        match integer {
            // SAFETY: `key_codes` is only set where latent_codes::available;
            // `available` checked the rope (whole 16-lane vectors per head)
            Some((key, tile)) => unsafe {
                let turn = turned.then_some((turns, dh));
                latent_codes::rebuild(tile, key, &job.basis.mean_k, &mut kbuf, turn)
            },
            None => {
                let lat = b.lat.rows(first + i, m, &mut latbuf);
                rebuild(lat, m, b.rank, job.basis, &mut kbuf);
            }
        }
        if !turned {
            for (k, row) in turns.chunks_exact(2 * dh).enumerate() {
                for g in 0..hk {
                    rotate(
                        job.rope.style(),
                        row,
                        &mut kbuf[k * d + g * dh..k * d + (g + 1) * dh],
                    );
                }
            }
        }
        // each query head's dots with the tile's keys of its group share
        // their reductions (a short tile's stale rows are dotted too, and
        // their sums dropped)
        for (ti, &qp) in job.q_pos.iter().enumerate() {
            for g in 0..hk {
                let mut j0 = 0;
                while j0 < groups {
                    let take = (groups - j0).min(4);
                    let q0 = ((g * groups + j0) * t + ti) * dh;
                    let keys = (&kbuf[..], g * dh, d);
                    let sums = match take {
                        4 => tile_dots::<4>(&job.q[q0..], t * dh, keys, dh),
                        3 => tile_dots::<3>(&job.q[q0..], t * dh, keys, dh),
                        2 => tile_dots::<2>(&job.q[q0..], t * dh, keys, dh),
                        _ => tile_dots::<1>(&job.q[q0..], t * dh, keys, dh),
                    };
                    for (jj, row) in sums.chunks_exact(TILE).take(take).enumerate() {
                        let qi = (g * groups + j0 + jj) * t + ti;
                        for (k, (&sc, &pos)) in row.iter().zip(positions).enumerate() {
                            if !hidden(qp, pos, job.window) {
                                out[qi][i + k] = sc * job.scale;
                            }
                        }
                    }
                    j0 += take;
                }
            }
        }
        i += m;
    }
}

/// Adds tokens `toks` of a value bucket, weighted by each query row's
/// attention, into `z` (`[H*T, d]`): the same contract as the portable
/// `value_chunk`.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn value_chunk(
    job: &ValueJob,
    b: &BucketView,
    toks: std::ops::Range<usize>,
    z: &mut [f32],
) {
    if super::latent_values::value_chunk_codes(job, b, toks.clone(), z) {
        return;
    }
    let (ht, d, rank) = (job.ht, job.d, b.rank);
    // (row of `lat`, slot) of the tokens that kept a key
    let taken: Vec<(usize, usize)> = toks
        .clone()
        .enumerate()
        .filter_map(|(r, tok)| {
            let sl = job.slot[b.ids[tok]];
            (sl != usize::MAX).then_some((r, sl))
        })
        .collect();
    if taken.is_empty() || rank == 0 {
        return;
    }
    let mut buf = Vec::new();
    let lat = match b.lat.as_f32() {
        Some(v) => &v[toks.start * rank..toks.end * rank],
        None => {
            buf.resize(toks.len() * rank, 0.0);
            // SAFETY: the CPU has AVX-512F (this function's contract)
            match unsafe { latent_codes::decode_rows(b.lat, toks.clone(), &mut buf) } {
                true => &buf[..],
                false => b.lat.rows(toks.start, toks.len(), &mut buf),
            }
        }
    };
    let mut c0 = 0;
    while c0 < rank {
        let mut r0 = 0;
        while r0 < ht {
            let take = (ht - r0).min(6);
            let rows = (r0, take);
            match take {
                6 => weighted::<6>(job, &taken, lat, rank, c0, rows, d, z),
                5 => weighted::<5>(job, &taken, lat, rank, c0, rows, d, z),
                4 => weighted::<4>(job, &taken, lat, rank, c0, rows, d, z),
                3 => weighted::<3>(job, &taken, lat, rank, c0, rows, d, z),
                2 => weighted::<2>(job, &taken, lat, rank, c0, rows, d, z),
                _ => weighted::<1>(job, &taken, lat, rank, c0, rows, d, z),
            }
            r0 += take;
        }
        c0 += 64;
    }
}

/// Tokens ahead whose latents [`weighted`] asks the memory for.
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 8;

/// Latent coordinates `c0..c0 + 64` (fewer at the rank's end, masked) of
/// query rows `r0..r0 + R` summed over `taken` tokens in registers.
///
/// # Shapes
/// `lat`: `[tokens, rank]`; `z`: `[H*T, d]`, `rank <= d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn weighted<const R: usize>(
    job: &ValueJob,
    taken: &[(usize, usize)],
    lat: &[f32],
    rank: usize,
    c0: usize,
    (r0, rows): (usize, usize),
    d: usize,
    z: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(rows == R && r0 + R <= job.ht && rank <= d && c0 < rank);
    assert!(z.len() >= job.ht * d && job.probs.len() >= job.ht * job.slots);
    // lanes of each of the four vectors inside the rank
    let masks: [__mmask16; 4] = std::array::from_fn(|v| {
        let start = c0 + 16 * v;
        let n = rank.saturating_sub(start).min(16);
        ((1u32 << n) - 1) as __mmask16
    });
    let zrow = |r: usize, v: usize| (r0 + r) * d + c0 + 16 * v;
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (v, a) in row.iter_mut().enumerate() {
            if masks[v] != 0 {
                // SAFETY: the vector starts inside row r0 + r's first rank <= d
                // columns and its live lanes stay there
                *a = unsafe { _mm512_maskz_loadu_ps(masks[v], z.as_ptr().add(zrow(r, v))) };
            }
        }
    }
    for (i, &(t, slot)) in taken.iter().enumerate() {
        assert!((t + 1) * rank <= lat.len() && slot < job.slots);
        // The latents stream from memory once a step (too many for the
        // caches at long context); the hardware prefetcher alone left the
        // loads waiting.
        if let Some(&(ahead, _)) = taken.get(i + PREFETCH) {
            let row = lat[ahead * rank + c0..].as_ptr();
            for line in (0..(rank - c0).min(64)).step_by(16) {
                // SAFETY: `c0 + line < rank`: inside token `ahead`'s row
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.add(line) as *const i8) };
            }
        }
        let mut x = [_mm512_setzero_ps(); 4];
        for (v, x) in x.iter_mut().enumerate() {
            if masks[v] != 0 {
                // SAFETY: the vector starts inside token t's row of rank values
                // and its live lanes stay there
                *x = unsafe {
                    _mm512_maskz_loadu_ps(masks[v], lat.as_ptr().add(t * rank + c0 + 16 * v))
                };
            }
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: r0 + r < ht and slot < slots (asserted): inside probs
            let w = unsafe { *job.probs.get_unchecked((r0 + r) * job.slots + slot) };
            let w = _mm512_set1_ps(w);
            for (a, &x) in row.iter_mut().zip(&x) {
                *a = _mm512_fmadd_ps(w, x, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            if masks[v] != 0 {
                // SAFETY: as for the loads
                unsafe { _mm512_mask_storeu_ps(z.as_mut_ptr().add(zrow(r, v)), masks[v], *a) };
            }
        }
    }
}

/// `out[k] = mean_k + lat[k] · dec_k[..rank]` for `m <= TILE` tokens:
/// column blocks of four vectors while they last, then single vectors.
///
/// # Shapes
/// `lat`: `[m, rank]`; `out`: `[>= m, d]`, `d` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rebuild(lat: &[f32], m: usize, rank: usize, basis: &HostBasis, out: &mut [f32]) {
    let d = basis.mean_k.len();
    let mut c0 = 0;
    while c0 + 64 <= d {
        match m {
            TILE => block::<TILE, 4>(lat, rank, basis, c0, out),
            _ => (0..m)
                .for_each(|k| block::<1, 4>(&lat[k * rank..], rank, basis, c0, &mut out[k * d..])),
        }
        c0 += 64;
    }
    while c0 < d {
        match m {
            TILE => block::<TILE, 1>(lat, rank, basis, c0, out),
            _ => (0..m)
                .for_each(|k| block::<1, 1>(&lat[k * rank..], rank, basis, c0, &mut out[k * d..])),
        }
        c0 += 16;
    }
}

/// Columns `c0..c0 + 16 V` of `M` rebuilt keys, `M x V` accumulators kept
/// in registers across the rank loop.
///
/// # Shapes
/// `lat`: `[M, rank]` (row `k` at `k * rank`); `out`: `[M, d]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn block<const M: usize, const V: usize>(
    lat: &[f32],
    rank: usize,
    basis: &HostBasis,
    c0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (dec, mean) = (&basis.dec_k, &basis.mean_k);
    let d = mean.len();
    assert!(lat.len() >= (M - 1) * rank + rank && out.len() >= (M - 1) * d + c0 + 16 * V);
    assert!(dec.len() >= rank * d && c0 + 16 * V <= d);
    let mut acc = [[_mm512_setzero_ps(); V]; M];
    for row in acc.iter_mut() {
        for (v, a) in row.iter_mut().enumerate() {
            // SAFETY: c0 + 16 V <= d = mean.len() (asserted)
            *a = unsafe { _mm512_loadu_ps(mean.as_ptr().add(c0 + 16 * v)) };
        }
    }
    for j in 0..rank {
        let mut u = [_mm512_setzero_ps(); V];
        for (v, x) in u.iter_mut().enumerate() {
            // SAFETY: j < rank, c0 + 16 V <= d, dec holds rank * d values
            *x = unsafe { _mm512_loadu_ps(dec.as_ptr().add(j * d + c0 + 16 * v)) };
        }
        for (k, row) in acc.iter_mut().enumerate() {
            // SAFETY: k < M, j < rank: inside lat (asserted)
            let a = _mm512_set1_ps(unsafe { *lat.get_unchecked(k * rank + j) });
            for (x, &y) in row.iter_mut().zip(&u) {
                *x = _mm512_fmadd_ps(a, y, *x);
            }
        }
    }
    for (k, row) in acc.iter().enumerate() {
        for (v, a) in row.iter().enumerate() {
            // SAFETY: (M - 1) d + c0 + 16 V <= out.len() (asserted)
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(k * d + c0 + 16 * v), *a) };
        }
    }
}

/// RoPE on one head's vector, sixteen lanes at a time: `row` holds each
/// pair's cos and sin at both its coordinates
/// ([`HostRope::row_into`]), so an interleaved pair is `x * cos -/+
/// swap(x) * sin` (one `fmaddsub`), split halves two FMAs per half-vector
/// pair.
///
/// # Shapes
/// `x`: `[head_dim]`, a multiple of 16 (32 for split halves); `row`:
/// `[2, head_dim]`, cos then sin.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rotate(style: RopeStyle, row: &[f32], x: &mut [f32]) {
    use std::arch::x86_64::*;
    let dh = x.len();
    let (c, s) = row.split_at(dh);
    assert!(s.len() == dh && dh.is_multiple_of(16));
    let (xp, cp, sp) = (x.as_mut_ptr(), c.as_ptr(), s.as_ptr());
    match style {
        RopeStyle::Interleaved => {
            for i in (0..dh).step_by(16) {
                // SAFETY: i + 16 <= dh, the length of x, c and s (asserted)
                unsafe {
                    let v = _mm512_loadu_ps(xp.add(i));
                    let swapped = _mm512_permute_ps::<0b1011_0001>(v);
                    let t = _mm512_mul_ps(swapped, _mm512_loadu_ps(sp.add(i)));
                    let r = _mm512_fmaddsub_ps(v, _mm512_loadu_ps(cp.add(i)), t);
                    _mm512_storeu_ps(xp.add(i), r);
                }
            }
        }
        RopeStyle::SplitHalves => {
            let half = dh / 2;
            assert!(half.is_multiple_of(16));
            for i in (0..half).step_by(16) {
                // SAFETY: i + half + 16 <= dh (asserted)
                unsafe {
                    let (lo, hi) = (
                        _mm512_loadu_ps(xp.add(i)),
                        _mm512_loadu_ps(xp.add(i + half)),
                    );
                    let lo_r = _mm512_fmsub_ps(
                        lo,
                        _mm512_loadu_ps(cp.add(i)),
                        _mm512_mul_ps(hi, _mm512_loadu_ps(sp.add(i))),
                    );
                    let hi_r = _mm512_fmadd_ps(
                        hi,
                        _mm512_loadu_ps(cp.add(i + half)),
                        _mm512_mul_ps(lo, _mm512_loadu_ps(sp.add(i + half))),
                    );
                    _mm512_storeu_ps(xp.add(i), lo_r);
                    _mm512_storeu_ps(xp.add(i + half), hi_r);
                }
            }
        }
    }
}

/// Dots of `J` query rows (row `j` at `q[j * q_stride..]`) with the
/// [`TILE`] keys of one head in `kbuf` (key `k` at `k * d + off`), `head_dim`
/// values each; returns them row-major `[J, TILE]` in the first `J * TILE`
/// entries. The `J x TILE` accumulators stay in registers and are reduced
/// eight at a time ([`hsum8`]) instead of one horizontal sum per dot.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn tile_dots<const J: usize>(
    q: &[f32],
    q_stride: usize,
    (kbuf, off, d): (&[f32], usize, usize),
    head_dim: usize,
) -> [f32; 32] {
    use std::arch::x86_64::*;
    assert!(J <= 4 && head_dim.is_multiple_of(16));
    assert!(q.len() >= (J - 1) * q_stride + head_dim);
    assert!(kbuf.len() >= (TILE - 1) * d + off + head_dim);
    let mut acc = [[_mm512_setzero_ps(); TILE]; J];
    for v in (0..head_dim).step_by(16) {
        // SAFETY: v + 16 <= head_dim: inside each key and query row (asserted)
        let keys: [__m512; TILE] =
            std::array::from_fn(|k| unsafe { _mm512_loadu_ps(kbuf.as_ptr().add(k * d + off + v)) });
        for (j, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above
            let qv = unsafe { _mm512_loadu_ps(q.as_ptr().add(j * q_stride + v)) };
            for (a, &kv) in row.iter_mut().zip(&keys) {
                *a = _mm512_fmadd_ps(qv, kv, *a);
            }
        }
    }
    let mut flat = [_mm512_setzero_ps(); 32];
    for (j, row) in acc.iter().enumerate() {
        flat[j * TILE..(j + 1) * TILE].copy_from_slice(row);
    }
    let mut sums = [0f32; 32];
    for c in 0..(J * TILE).div_ceil(8) {
        let block: [__m512; 8] = std::array::from_fn(|i| flat[c * 8 + i]);
        // SAFETY: c * 8 + 8 <= 32 = sums.len()
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr().add(c * 8), hsum8(&block)) };
    }
    sums
}

/// The lane sums of eight vectors, in order: each folded to eight lanes,
/// then three rounds of pairwise adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn hsum8(v: &[std::arch::x86_64::__m512; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let fold = |x: __m512| {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
        _mm256_add_ps(_mm512_castps512_ps256(x), hi)
    };
    let a: [__m256; 8] = std::array::from_fn(|i| fold(v[i]));
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // per 128-bit half: [s0, s1, s2, s3] of vectors 0-3 (u0), 4-7 (u1)
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    )
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The rotation, rebuild and dot against plain loops, for both RoPE
    /// styles, a full tile and a short one, ranks that are not vector
    /// multiples, and `d` with a single-vector column tail (80 = 64 + 16).
    #[test]
    fn rebuilt_rotated_keys_equal_the_plain_loops() {
        let f = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        for (style, dh, hk) in [
            (RopeStyle::Interleaved, 16, 5),
            (RopeStyle::Interleaved, 64, 3),
            (RopeStyle::SplitHalves, 32, 2),
            (RopeStyle::SplitHalves, 256, 1),
        ] {
            let d = dh * hk;
            let rope = test_rope(style, dh, 40);
            if !available(dh, &rope) {
                eprintln!("no AVX-512F: skipped");
                return;
            }
            let basis = HostBasis {
                dec_k: (0..d * d).map(f).collect(),
                mean_k: (0..d).map(|i| f(i + 3)).collect(),
                dec_v: vec![],
                mean_v: vec![],
            };
            for (m, rank) in [(TILE, 7), (TILE, d), (2, 5)] {
                let lat: Vec<f32> = (0..m * rank).map(|i| f(i + 101)).collect();
                let mut got = vec![0f32; TILE * d];
                // SAFETY: available() said AVX-512F is here
                unsafe { rebuild(&lat, m, rank, &basis, &mut got) };
                for k in 0..m {
                    let pos = 3 + 5 * k;
                    let mut want: Vec<f32> = (0..d)
                        .map(|c| {
                            basis.mean_k[c]
                                + (0..rank)
                                    .map(|j| lat[k * rank + j] * basis.dec_k[j * d + c])
                                    .sum::<f32>()
                        })
                        .collect();
                    let mut row = vec![0f32; 2 * dh];
                    rope.row_into(pos, &mut row);
                    for g in 0..hk {
                        rope.rotate(&mut want[g * dh..(g + 1) * dh], pos);
                        let x = &mut got[k * d + g * dh..k * d + (g + 1) * dh];
                        // SAFETY: as above
                        unsafe { rotate(rope.style(), &row, x) };
                    }
                    let tol = 1e-5 * (rank as f32).max(1.0);
                    for (c, (a, w)) in got[k * d..(k + 1) * d].iter().zip(&want).enumerate() {
                        assert!(
                            (a - w).abs() < tol,
                            "{style:?} m {m} rank {rank} [{k},{c}]: {a} vs {w}"
                        );
                    }
                    let q: Vec<f32> = (0..dh).map(|i| f(i + 7)).collect();
                    let plain: f32 = q.iter().zip(&want[..dh]).map(|(x, y)| x * y).sum();
                    // SAFETY: as above
                    let fast = unsafe { tile_dots::<1>(&q, dh, (&got, 0, d), dh)[k] };
                    assert!((fast - plain).abs() < tol * dh as f32, "{fast} vs {plain}");
                }
            }
        }
    }

    /// The whole latent attention with the wide loops against the portable
    /// ones: pre-RoPE keys, query heads sharing a KV head in groups of 3, 4
    /// and 5, two query positions (the earlier one hides the
    /// last tokens), buckets of f32, int8 and mixed latents with ranks that
    /// are not vector multiples, a value bucket missing a token's key slot, a
    /// sliding window; both RoPE styles; the code buckets' keys rebuilt in
    /// f32 and in integers from the decoder's codes.
    #[test]
    fn wide_attention_equals_the_portable_kernel() {
        use super::super::latent_codes::KeyCodes;
        use super::super::latent_decode::{attend, Heads};
        use dynakv_core::artifact::RopePlacement;
        use dynakv_core::quant::{KvDtype, PackedRows, RowCodec};
        let f = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        // groups of 3, 4 and 5 query heads per KV head (5: a block of four
        // and one more)
        for (style, h, hk, dh, window) in [
            (RopeStyle::Interleaved, 6, 2, 32, None),
            (RopeStyle::SplitHalves, 4, 1, 64, Some(45)),
            (RopeStyle::Interleaved, 10, 2, 16, None),
        ] {
            let d = hk * dh;
            // positions past the rope's fine table (`FINE`): the kernels
            // rotate by rows rebuilt from its two small tables
            let rope = test_rope(style, dh, 256);
            if !available(dh, &rope) {
                eprintln!("no AVX-512F: skipped");
                return;
            }
            let mut basis = HostBasis {
                dec_k: (0..d * d).map(|i| f(i) * 0.3).collect(),
                mean_k: (0..d).map(|i| f(i + 3) * 0.1).collect(),
                dec_v: (0..d * d).map(|i| f(i + 5)).collect(),
                mean_v: (0..d).map(|i| f(i + 9)).collect(),
            };
            // the key decoder made exactly what its 8-bit codes stand for,
            // so that the integer rebuild of the code buckets is held to
            // the portable kernel to rounding
            let codes = KeyCodes::new(&basis.dec_k, d).expect("d is a multiple of 32");
            basis.dec_k = (0..d * d).map(|i| codes.value(i / d, i % d)).collect();
            let codes = KeyCodes::new(&basis.dec_k, d).expect("as above");
            // ids 0..40 over three buckets; positions 5 x ids
            let split = [
                (0..17, 7, RowCodec::Plain(KvDtype::F32)),
                (17..30, 40.min(d - 3), RowCodec::Plain(KvDtype::Q8_0)),
                (30..40, d, RowCodec::Mixed),
            ];
            let lat: Vec<(PackedRows, Vec<usize>, Vec<usize>)> = split
                .iter()
                .map(|(ids, rank, codec)| {
                    let mut rows = PackedRows::new(codec.clone(), *rank);
                    for id in ids.clone() {
                        let x: Vec<f32> = (0..*rank).map(|j| f(id * 31 + j) * 0.5).collect();
                        rows.push(&x);
                    }
                    (
                        rows,
                        ids.clone().collect(),
                        ids.clone().map(|i| 5 * i).collect(),
                    )
                })
                .collect();
            let keys: Vec<BucketView> = split
                .iter()
                .zip(&lat)
                .map(|((_, rank, _), (rows, ids, positions))| BucketView {
                    rank: *rank,
                    lat: rows,
                    positions,
                    ids,
                })
                .collect();
            // token 5 has no key: the values' slot lookup must skip it
            let no5: Vec<usize> = (0..17).filter(|&i| i != 5).collect();
            let no5_positions: Vec<usize> = no5.iter().map(|i| 5 * i).collect();
            let mut k0 = PackedRows::new(RowCodec::Plain(KvDtype::F32), 7);
            for &id in &no5 {
                let x: Vec<f32> = (0..7).map(|j| f(id * 31 + j) * 0.5).collect();
                k0.push(&x);
            }
            let mut keys_no5: Vec<BucketView> = keys.iter().map(|b| BucketView { ..*b }).collect();
            keys_no5[0] = BucketView {
                rank: 7,
                lat: &k0,
                positions: &no5_positions,
                ids: &no5,
            };
            let heads = Heads {
                n_heads: h,
                n_kv_heads: hk,
                head_dim: dh,
            };
            let q_pos = [175, 195];
            let q: Vec<f32> = (0..h * q_pos.len() * dh).map(|i| f(i + 77)).collect();
            for ks in [&keys, &keys_no5] {
                let run = |wide, key_codes| {
                    attend(
                        heads,
                        RopePlacement::Pre,
                        &basis,
                        &rope,
                        &q,
                        &q_pos,
                        ks,
                        &keys,
                        40,
                        window,
                        wide,
                        key_codes,
                    )
                };
                let plain = run(false, None);
                let scale = plain.iter().fold(0f32, |m, x| m.max(x.abs()));
                for key_codes in [None, Some(&codes)] {
                    let fast = run(true, key_codes);
                    for (i, (a, b)) in fast.iter().zip(&plain).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "{style:?} codes {} [{i}]: {a} vs {b}",
                            key_codes.is_some()
                        );
                    }
                }
            }
        }
    }

    /// Tables as [`crate::Rope`] lays them out: each pair's angle at both of
    /// its coordinates.
    fn test_rope(style: RopeStyle, dh: usize, positions: usize) -> HostRope {
        let (mut cos, mut sin) = (vec![0f32; positions * dh], vec![0f32; positions * dh]);
        for p in 0..positions {
            for i in 0..dh / 2 {
                let angle = p as f32 * 10_000f32.powf(-2.0 * i as f32 / dh as f32);
                let cols = match style {
                    RopeStyle::Interleaved => [2 * i, 2 * i + 1],
                    RopeStyle::SplitHalves => [i, i + dh / 2],
                };
                for c in cols {
                    cos[p * dh + c] = angle.cos();
                    sin[p * dh + c] = angle.sin();
                }
            }
        }
        HostRope::new(cos, sin, dh, dh, style)
    }
}
