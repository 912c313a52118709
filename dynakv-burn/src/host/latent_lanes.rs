//! Pre-RoPE keys stored as integer codes, rebuilt, rotated and scored
//! sixteen tokens at a time with the tokens in the vector lanes.
//!
//! Why: the token-major kernels ([`super::latent_codes::rebuild`] with
//! [`super::latent_wide`]) hold a tile's keys as rows, sixteen coordinates
//! of one token to a vector. Every query dot then ends in a horizontal sum
//! (shuffles), each score is written alone, and RoPE needs each token's cos
//! and sin rows with every pair's numbers at both its coordinates. A
//! profile of a DynaKV int8 step at 8k on SmolLM2 put as much time in that
//! work around the rebuild as in the rebuild's integer products. Here a
//! vector holds one coordinate of sixteen tokens: the integer products are
//! the same count (`vpdpbusd` with the tokens' codes as the unsigned operand
//! and one decoder word broadcast), a pair is turned with two products per
//! coordinate against the sixteen tokens' cos and sin, a query dot is one
//! FMA per coordinate with the query broadcast, and sixteen scores are
//! stored at once. The rotated keys are bit for bit those of the
//! token-major integer rebuild (the same products in the same order);
//! the dots are summed in another order.

use std::arch::x86_64::*;

use super::latent_codes::{CodeTile, KeyCodes};
use super::latent_decode::{BucketView, Job};
use crate::attention::hidden;
use crate::rope::RopeStyle;
use dynakv_core::quant::QBLOCK;

/// Tokens scored together: one per lane.
pub(crate) const LANES: usize = 16;

/// Column pairs rebuilt together: eight columns' integer sums and f32
/// totals, the codes' vector and a block's scales fill 18 registers.
const UNIT: usize = 4;

/// Whether this CPU runs [`score_chunk`]: AVX-512F and VNNI (the integer
/// rebuild's), for keys whose decoder [`KeyCodes`] holds.
pub(crate) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

/// The columns of every RoPE pair of `d = hk * head_dim` key coordinates,
/// with the pair's index within its head: `(first, second, pair)`, pairs
/// in order and each pair's heads together (they share its cos and sin).
fn pair_columns(style: RopeStyle, hk: usize, dh: usize) -> Vec<(usize, usize, usize)> {
    let half = dh / 2;
    (0..half)
        .flat_map(|i| {
            (0..hk).map(move |g| match style {
                RopeStyle::Interleaved => (g * dh + 2 * i, g * dh + 2 * i + 1, i),
                RopeStyle::SplitHalves => (g * dh + i, g * dh + half + i, i),
            })
        })
        .collect()
}

/// What one tile's rotated keys are built from.
struct TileKeys<'a> {
    key: &'a KeyCodes,
    mean: &'a [f32],
    /// [`pair_columns`], whole units of [`UNIT`]
    pairs: &'a [(usize, usize, usize)],
    /// [`KeyCodes::block_offsets`] for the tile's rank
    offsets: &'a [i32],
    head_dim: usize,
}

/// Scratch for one tile, laid out with tokens in lanes.
///
/// # Shapes
/// `codes`: `[groups, LANES]` words (token `k`'s codes `4g..4g + 4` at
/// `g * LANES + k`); `scales`: `[blocks, LANES]`; `turns`: `[2, head_dim
/// / 2, LANES]` (each pair's cos, then sin); `rows`: `[LANES, 2, head_dim
/// / 2]`, the turns as [`super::HostRope::pairs_into`] gives them;
/// `keys`: `[d, LANES]`, rotated.
#[derive(Default)]
struct Lanes {
    codes: Vec<i32>,
    scales: Vec<f32>,
    turns: Vec<f32>,
    rows: Vec<f32>,
    keys: Vec<f32>,
}

impl Lanes {
    /// Sized for `tile`'s rows and keys of `d` values in heads of `head_dim`
    /// (every entry is written before it is read).
    fn fit(&mut self, tile: &CodeTile, d: usize, head_dim: usize) {
        self.codes.resize(tile.stride / 4 * LANES, 0);
        self.scales.resize(tile.blocks * LANES, 0.0);
        self.turns.resize(head_dim * LANES, 0.0);
        self.rows.resize(head_dim * LANES, 0.0);
        self.keys.resize(d * LANES, 0.0);
    }
}

/// One thread's tile, buffers and tables, kept from chunk to chunk.
///
/// Why: a decode step scores a few thousand chunks (every bucket of every
/// layer, 128 tokens at most each); building them for each chunk (22 KB
/// zeroed on SmolLM2) was a tenth of this kernel's time.
#[derive(Default)]
struct Scratch {
    tile: Option<CodeTile>,
    lanes: Lanes,
    offsets: Vec<i32>,
    /// [`pair_columns`] and the `(style, hk, head_dim)` it was built for
    pairs: Vec<(usize, usize, usize)>,
    pairs_for: Option<(RopeStyle, usize, usize)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Scores of one chunk of a key bucket stored as blocks of codes, starting
/// at token `first`, into `out` (`[H*T]` rows of the chunk's length): the
/// contract of [`super::latent_wide::score_chunk`]. Returns `false`,
/// writing nothing, when the bucket's rows are not codes of its rank.
///
/// # Safety
/// [`available`] returned true; `key` is the decoder of keys of `job`'s
/// heads; [`super::latent_wide::available`] returned true for `job`'s
/// rope (whole 16-lane vectors per head, every coordinate rotated).
#[target_feature(enable = "avx512f,avx512vnni")]
pub(crate) unsafe fn score_chunk(
    job: &Job,
    key: &KeyCodes,
    b: &BucketView,
    first: usize,
    out: &mut [&mut [f32]],
) -> bool {
    SCRATCH.with_borrow_mut(|scratch| {
        // SAFETY: this function's contract
        unsafe { score_chunk_with(job, key, b, first, out, scratch) }
    })
}

/// [`score_chunk`] with this thread's scratch.
///
/// # Safety
/// As for [`score_chunk`].
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn score_chunk_with(
    job: &Job,
    key: &KeyCodes,
    b: &BucketView,
    first: usize,
    out: &mut [&mut [f32]],
    scratch: &mut Scratch,
) -> bool {
    let heads = job.heads;
    let (h, hk, dh) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let (groups, d) = (h / hk, hk * dh);
    let n = out.first().map_or(0, |r| r.len());
    if key.d() != d || b.rank > d || !b.lat.has_block_codes() || b.lat.dim() != b.rank {
        return false;
    }
    let Scratch {
        tile,
        lanes,
        offsets,
        pairs,
        pairs_for,
    } = scratch;
    let tile = match tile {
        Some(t) if t.rank() == b.rank => t,
        _ => tile.insert(CodeTile::with_rows(b.rank, LANES)),
    };
    let style = job.rope.style();
    if *pairs_for != Some((style, hk, dh)) {
        *pairs = pair_columns(style, hk, dh);
        *pairs_for = Some((style, hk, dh));
    }
    assert!(pairs.len().is_multiple_of(UNIT) && dh.is_multiple_of(LANES));
    key.block_offsets_into(tile.stride / 4, offsets);
    lanes.fit(tile, d, dh);
    let keys = TileKeys {
        key,
        mean: &job.basis.mean_k,
        pairs,
        offsets,
        head_dim: dh,
    };
    let mut i = 0;
    while i < n {
        let m = (n - i).min(LANES);
        let positions = &b.positions[first + i..first + i + m];
        assert!(tile.load(b.lat, first + i, m));
        // SAFETY: this function's contract (the CPU; `d` the decoder's)
        unsafe { keys.tile(tile, positions, job.rope, lanes) };
        for (ti, &qp) in job.q_pos.iter().enumerate() {
            // the tile's tokens this query sees
            let seen = positions
                .iter()
                .enumerate()
                .filter(|&(_, &pos)| !hidden(qp, pos, job.window))
                .fold(0u16, |m, (k, _)| m | 1 << k);
            if seen == 0 {
                continue;
            }
            for g in 0..hk {
                let mut j0 = 0;
                while j0 < groups {
                    let take = (groups - j0).min(4);
                    let rows = (g * groups + j0, take, ti);
                    let at = (i, seen);
                    // SAFETY: as above; the rows are query heads of KV head g
                    unsafe {
                        match take {
                            4 => dots::<4>(job, &lanes.keys, g, rows, at, out),
                            3 => dots::<3>(job, &lanes.keys, g, rows, at, out),
                            2 => dots::<2>(job, &lanes.keys, g, rows, at, out),
                            _ => dots::<1>(job, &lanes.keys, g, rows, at, out),
                        }
                    }
                    j0 += take;
                }
            }
        }
        i += m;
    }
    true
}

impl TileKeys<'_> {
    /// The tile's keys rebuilt and rotated into `lanes.keys`: its codes and
    /// scales turned to tokens in lanes, each token's cos and sin rows
    /// built and turned likewise, then a [`UNIT`] of pairs at a time.
    ///
    /// # Safety
    /// The CPU has AVX-512F and VNNI; `tile` holds rows of this decoder's
    /// width or less and `positions` (`[1, LANES]`) are inside the rope.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile(
        &self,
        tile: &CodeTile,
        positions: &[usize],
        rope: &super::HostRope,
        lanes: &mut Lanes,
    ) {
        let (s, nb, dh) = (tile.stride, tile.blocks, self.head_dim);
        let groups = s / 4;
        assert!(tile.codes.len() == LANES * s && tile.scales.len() == LANES * nb);
        assert!(lanes.codes.len() == groups * LANES && lanes.scales.len() == nb * LANES);
        assert!(!positions.is_empty() && positions.len() <= LANES);
        // the codes, a word (four codes) per lane
        for g0 in (0..groups).step_by(LANES) {
            let mask = super::latent_codes::lanes_mask((groups - g0).min(LANES));
            // SAFETY: the masked words of row k are its groups g0.. < groups
            let rows: [__m512; LANES] = std::array::from_fn(|k| unsafe {
                let at = tile.codes.as_ptr().add(k * s + 4 * g0) as *const i32;
                _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, at))
            });
            let cols = transpose(&rows);
            for (j, c) in cols.iter().enumerate().take(groups - g0) {
                // SAFETY: (g0 + j) < groups: a whole row of LANES words
                unsafe {
                    let at = lanes.codes.as_mut_ptr().add((g0 + j) * LANES) as *mut f32;
                    _mm512_storeu_ps(at, *c);
                }
            }
        }
        for blk in 0..nb {
            for k in 0..LANES {
                lanes.scales[blk * LANES + k] = tile.scales[k * nb + blk];
            }
        }
        // each token's turns, then the same transpose (lanes past the
        // tile's tokens turn by its first position: their keys are not
        // scored)
        assert!(lanes.rows.len() == LANES * dh && lanes.turns.len() == dh * LANES);
        for k in 0..LANES {
            let pos = positions.get(k).copied().unwrap_or(positions[0]);
            rope.pairs_into(pos, &mut lanes.rows[k * dh..(k + 1) * dh]);
        }
        for c0 in (0..dh).step_by(LANES) {
            // SAFETY: c0 + LANES <= dh (a multiple of 16): inside row k
            let rows: [__m512; LANES] = std::array::from_fn(|k| unsafe {
                _mm512_loadu_ps(lanes.rows.as_ptr().add(k * dh + c0))
            });
            for (j, c) in transpose(&rows).iter().enumerate() {
                // SAFETY: c0 + j < dh: inside turns
                unsafe { _mm512_storeu_ps(lanes.turns.as_mut_ptr().add((c0 + j) * LANES), *c) };
            }
        }
        for unit in self.pairs.chunks_exact(UNIT) {
            // SAFETY: this function's contract
            unsafe { self.unit(unit, groups, lanes) };
        }
    }

    /// Keys of [`UNIT`] pairs' columns for the tile's tokens: per latent
    /// block, integer sums of the codes with the decoder's (starting at
    /// the block's offset) scaled by each token's block scale into f32;
    /// then the decoder column's scale and the mean; then each pair turned
    /// by its tokens' cos and sin. The same operations, in the same order,
    /// as [`super::latent_codes::rebuild`] with its rotation.
    ///
    /// # Safety
    /// As for [`Self::tile`].
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[inline]
    unsafe fn unit(&self, unit: &[(usize, usize, usize)], groups: usize, lanes: &mut Lanes) {
        const C: usize = 2 * UNIT;
        let key = self.key;
        let d = key.d();
        let half = self.head_dim / 2;
        let nb = groups.div_ceil(QBLOCK / 4);
        assert!(unit.len() == UNIT && groups <= d / 4 && self.offsets.len() == nb * d);
        assert!(lanes.keys.len() == d * LANES && lanes.turns.len() == 2 * half * LANES);
        let cols: [usize; C] = std::array::from_fn(|j| match j % 2 {
            0 => unit[j / 2].0,
            _ => unit[j / 2].1,
        });
        assert!(cols.iter().all(|&c| c < d) && unit.iter().all(|p| p.2 < half));
        let (codes, words) = (lanes.codes.as_ptr(), key.codes.as_ptr() as *const i32);
        let mut f = [_mm512_setzero_ps(); C];
        for blk in 0..nb {
            let (g0, g1) = (blk * QBLOCK / 4, ((blk + 1) * QBLOCK / 4).min(groups));
            let mut acc: [__m512i; C] =
                std::array::from_fn(|j| _mm512_set1_epi32(self.offsets[blk * d + cols[j]]));
            for g in g0..g1 {
                // SAFETY: g < groups: inside the tile's words; g < d / 4 and
                // every column < d: inside the decoder's `[d / 4, d]` words
                unsafe {
                    let x = _mm512_loadu_si512(codes.add(g * LANES) as *const _);
                    for (a, &c) in acc.iter_mut().zip(&cols) {
                        let w = _mm512_set1_epi32(std::ptr::read_unaligned(words.add(g * d + c)));
                        *a = _mm512_dpbusd_epi32(*a, x, w);
                    }
                }
            }
            // SAFETY: blk < nb: a whole row of scales
            let sc = unsafe { _mm512_loadu_ps(lanes.scales.as_ptr().add(blk * LANES)) };
            for (x, &a) in f.iter_mut().zip(&acc) {
                *x = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(a), *x);
            }
        }
        let x: [__m512; C] = std::array::from_fn(|j| {
            let (sc, m) = (key.scale[cols[j]], self.mean[cols[j]]);
            _mm512_fmadd_ps(_mm512_set1_ps(sc), f[j], _mm512_set1_ps(m))
        });
        let (turns, out) = (lanes.turns.as_ptr(), lanes.keys.as_mut_ptr());
        for (u, &(lo, hi, pair)) in unit.iter().enumerate() {
            // SAFETY: pair < half: inside turns; lo, hi < d: inside keys
            unsafe {
                let c = _mm512_loadu_ps(turns.add(pair * LANES));
                let s = _mm512_loadu_ps(turns.add((half + pair) * LANES));
                let (a, b) = (x[2 * u], x[2 * u + 1]);
                let y_lo = _mm512_fmsub_ps(a, c, _mm512_mul_ps(b, s));
                let y_hi = _mm512_fmadd_ps(b, c, _mm512_mul_ps(a, s));
                _mm512_storeu_ps(out.add(lo * LANES), y_lo);
                _mm512_storeu_ps(out.add(hi * LANES), y_hi);
            }
        }
    }
}

/// Scores of `J` query heads of KV head `g` (`(first head, J, query
/// position)`) with the tile's rotated keys, stored scaled into their rows
/// of `out` at `i` for the tokens of `seen`.
///
/// # Safety
/// The CPU has AVX-512F; `keys` is `[d, LANES]`; the heads belong to KV
/// head `g`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dots<const J: usize>(
    job: &Job,
    keys: &[f32],
    g: usize,
    (qh0, rows, ti): (usize, usize, usize),
    (i, seen): (usize, u16),
    out: &mut [&mut [f32]],
) {
    let (dh, t) = (job.heads.head_dim, job.q_pos.len());
    assert!(rows == J && keys.len() >= (g + 1) * dh * LANES);
    let q: [&[f32]; J] = std::array::from_fn(|j| {
        let qi = (qh0 + j) * t + ti;
        &job.q[qi * dh..(qi + 1) * dh]
    });
    let (q, k0) = (q.map(|q| q.as_ptr()), keys[g * dh * LANES..].as_ptr());
    let mut acc = [_mm512_setzero_ps(); J];
    for c in 0..dh {
        // SAFETY: c < dh: inside each query row and KV head g's keys
        unsafe {
            let k = _mm512_loadu_ps(k0.add(c * LANES));
            for (a, q) in acc.iter_mut().zip(&q) {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(c)), k, *a);
            }
        }
    }
    let scale = _mm512_set1_ps(job.scale);
    for (j, a) in acc.iter().enumerate() {
        let row = &mut out[(qh0 + j) * t + ti];
        // the lanes stored: the tokens seen, all inside the chunk's row
        let inside = super::latent_codes::lanes_mask(row.len().saturating_sub(i).min(LANES));
        // SAFETY: the mask keeps the stores to row[i..row.len()]
        unsafe {
            _mm512_mask_storeu_ps(
                row.as_mut_ptr().add(i),
                seen & inside,
                _mm512_mul_ps(*a, scale),
            )
        };
    }
}

/// A 16 x 16 transpose: lane `k` of vector `j` of the result is lane `j` of
/// row `k`.
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose(r: &[__m512; 16]) -> [__m512; 16] {
    // pairs of rows interleaved: a[2p] holds columns 4L, 4L+1 of rows 2p,
    // 2p+1 in lane group L; a[2p+1] columns 4L+2, 4L+3
    let a: [__m512; 16] = std::array::from_fn(|x| {
        let p = x / 2;
        match x % 2 {
            0 => _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]),
            _ => _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]),
        }
    });
    // b[4q + e], lane group L: rows 4q..4q+4 of column 4L + e
    let b: [__m512; 16] = std::array::from_fn(|x| {
        let (q, e) = (x / 4, x % 4);
        let (lo, hi) = (
            _mm512_castps_pd(a[4 * q + e / 2]),
            _mm512_castps_pd(a[4 * q + 2 + e / 2]),
        );
        _mm512_castpd_ps(match e % 2 {
            0 => _mm512_unpacklo_pd(lo, hi),
            _ => _mm512_unpackhi_pd(lo, hi),
        })
    });
    // result 4L + e: lane group L of b[e], b[4 + e], b[8 + e], b[12 + e]
    let mut out = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let c0 = _mm512_shuffle_f32x4::<0x44>(b[e], b[4 + e]);
        let c1 = _mm512_shuffle_f32x4::<0x44>(b[8 + e], b[12 + e]);
        let c2 = _mm512_shuffle_f32x4::<0xEE>(b[e], b[4 + e]);
        let c3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + e], b[12 + e]);
        out[e] = _mm512_shuffle_f32x4::<0x88>(c0, c1);
        out[4 + e] = _mm512_shuffle_f32x4::<0xDD>(c0, c1);
        out[8 + e] = _mm512_shuffle_f32x4::<0x88>(c2, c3);
        out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(c2, c3);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_lane() {
        if !available() {
            eprintln!("no AVX-512F / VNNI: skipped");
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: available() checked AVX-512F
        let got = unsafe {
            let rows: [__m512; 16] =
                std::array::from_fn(|k| _mm512_loadu_ps(m.as_ptr().add(16 * k)));
            transpose(&rows)
        };
        for (j, v) in got.iter().enumerate() {
            let mut lanes = [0f32; 16];
            // SAFETY: as above
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *v) };
            for (k, &x) in lanes.iter().enumerate() {
                assert_eq!(x, m[16 * k + j], "result {j} lane {k}");
            }
        }
    }
}
