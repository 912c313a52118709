//! Pre-RoPE keys rebuilt from 8- and 4-bit latents with 8-bit integer dot
//! products (AVX-512 VNNI): the decoder held as 8-bit codes with one scale
//! per column, each latent block's codes multiplied by them in integers and
//! scaled once per block.
//!
//! Why: rebuilding a pre-RoPE key costs `rank x d` multiply-adds (about
//! 58 x 192 on SmolLM2 at budget 0.30) against `d` values read for a dense
//! key, and in f32 that product is most of a DynaKV decode step at long
//! context ([`super::latent_wide`]). Latents stored as q8_0 / q4_0 / mixed
//! blocks are integers already; `vpdpbusd` multiplies four 8-bit pairs per
//! 32-bit lane, so one instruction does the work of four f32 FMAs. The
//! decoder, a fixed matrix per layer, is rounded to 8 bits once (per column:
//! `dec[r][c] ~ scale[c] * code`), which adds an error of at most half a
//! step per entry, about a percent of a key, the same order as the 8-bit
//! latents' own rounding; the sums themselves are exact integers.
//!
//! The instruction takes one unsigned operand: the latent codes are loaded
//! plus 128 (a flipped top bit), and each block's integer sum starts at
//! `-128 x` the sum of the decoder codes it meets, kept per column as
//! prefix sums over the decoder's rows, which cancels that offset exactly
//! with no work per token.

#[cfg(target_arch = "x86_64")]
use dynakv_core::quant::CodeRows;
use dynakv_core::quant::{PackedRows, QBLOCK};

/// A layer's pre-RoPE key decoder as 8-bit codes.
///
/// # Shapes
/// `codes`: `[d / 4, d, 4]`: for decoder rows (latent directions)
/// `4g..4g + 4` and column `c`, the four rows' codes, so that one 64-byte
/// load holds sixteen columns' four rows; `scale`: `[d]`, column `c`'s step
/// (`dec[r][c] ~ scale[c] * code`); `prefix`: `[d / 4 + 1, d]`, `128 x` the
/// sum of column `c`'s codes in rows `0..4g`.
#[derive(Debug, Clone)]
pub(crate) struct KeyCodes {
    codes: Vec<i8>,
    scale: Vec<f32>,
    prefix: Vec<i32>,
}

impl KeyCodes {
    /// Codes of a `[d, d]` row-major decoder; `None` when `d` is not a
    /// multiple of 32 (the kernel's column block) or a value is not finite.
    pub(crate) fn new(dec: &[f32], d: usize) -> Option<Self> {
        if d == 0 || !d.is_multiple_of(32) || dec.len() != d * d {
            return None;
        }
        if dec.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let scale: Vec<f32> = (0..d)
            .map(|c| (0..d).fold(0f32, |m, r| m.max(dec[r * d + c].abs())) / 127.0)
            .collect();
        let mut codes = vec![0i8; d * d];
        let mut prefix = vec![0i32; (d / 4 + 1) * d];
        for r in 0..d {
            for c in 0..d {
                let q = match scale[c] {
                    s if s > 0.0 => (dec[r * d + c] / s).round().clamp(-127.0, 127.0),
                    _ => 0.0,
                };
                codes[((r / 4) * d + c) * 4 + r % 4] = q as i8;
            }
        }
        for g in 0..d / 4 {
            for c in 0..d {
                let group: i32 = (0..4).map(|i| codes[(g * d + c) * 4 + i] as i32).sum();
                prefix[(g + 1) * d + c] = prefix[g * d + c] + 128 * group;
            }
        }
        Some(Self {
            codes,
            scale,
            prefix,
        })
    }

    fn d(&self) -> usize {
        self.scale.len()
    }

    /// Bytes held: the codes, scales and prefix sums.
    pub(crate) fn bytes(&self) -> usize {
        self.codes.len() + 4 * (self.scale.len() + self.prefix.len())
    }

    /// The decoder value row `r`, column `c` stands for.
    #[cfg(test)]
    pub(crate) fn value(&self, r: usize, c: usize) -> f32 {
        let d = self.d();
        self.scale[c] * self.codes[((r / 4) * d + c) * 4 + r % 4] as f32
    }
}

/// Tokens rebuilt together (the wide kernel's tile).
pub(crate) const TILE: usize = 6;

/// The latent codes of up to [`TILE`] tokens of one bucket, laid out for
/// the kernel.
///
/// # Shapes
/// `codes`: `[TILE, stride]`, each code plus 128 (`stride = rank` rounded
/// up to 4, padded with 128, a code of 0); `scales`: `[TILE, blocks]`,
/// `blocks = ceil(rank / 32)`.
#[derive(Debug)]
pub(crate) struct CodeTile {
    rank: usize,
    stride: usize,
    blocks: usize,
    codes: Vec<u8>,
    scales: Vec<f32>,
    /// Whether this CPU reads rows of codes in place ([`in_place`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    in_place: bool,
    /// One row's signed codes, as decoded. (Flipping the top bits in the
    /// kernel instead, as each group is broadcast, read about 4% slower in
    /// two alternating criterion rounds: the broadcast then no longer
    /// comes straight from memory.)
    row: Vec<i8>,
}

impl CodeTile {
    pub(crate) fn new(rank: usize) -> Self {
        let (stride, blocks) = (rank.div_ceil(4) * 4, rank.div_ceil(QBLOCK));
        Self {
            rank,
            stride,
            blocks,
            codes: vec![128; TILE * stride],
            scales: vec![0.0; TILE * blocks],
            in_place: in_place(),
            row: vec![0; rank],
        }
    }

    /// Loads rows `first..first + m` (`m <= TILE`) of `lat`; the tile's
    /// other rows become zero (their keys come out as the mean). Returns
    /// `false` when `lat` is not stored as blocks of codes of this rank.
    pub(crate) fn load(&mut self, lat: &PackedRows, first: usize, m: usize) -> bool {
        if lat.dim() != self.rank || m > TILE || !lat.has_block_codes() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(rows) = lat.code_bytes().filter(|_| self.in_place) {
            if first + m <= lat.len() {
                // SAFETY: in_place() checked the features; the rows exist
                unsafe { self.load_in_place(&rows, first, m) };
                return true;
            }
        }
        let (r, s, nb) = (self.rank, self.stride, self.blocks);
        for k in 0..TILE {
            let codes = &mut self.codes[k * s..k * s + r];
            let scales = &mut self.scales[k * nb..(k + 1) * nb];
            if k < m && lat.row_codes(first + k, &mut self.row, scales) {
                for (c, &q) in codes.iter_mut().zip(&self.row) {
                    *c = q as u8 ^ 0x80;
                }
            } else {
                codes.fill(128);
                scales.fill(0.0);
            }
        }
        true
    }
}

/// Whether this CPU reads rows of codes (q8_0 / q4_0 / mixed: int8
/// latents, the default, int4, mixed) in place: masked byte loads (AVX-512
/// BW and VL) and F16C for the block scales.
///
/// Why: [`PackedRows::row_codes`] copies each block's codes (a `memcpy`
/// call per block) and widens each scale through a call, and the tile
/// copies them again; every stored latent of a layer goes through here on
/// every decode step.
pub(super) fn in_place() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A q8_0 / q4_0 block's scale, its two bytes as stored (a little-endian f16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c")]
#[inline]
pub(super) fn block_scale(lo: u8, hi: u8) -> f32 {
    use std::arch::x86_64::*;
    let bits = i32::from(u16::from_le_bytes([lo, hi]));
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

#[cfg(target_arch = "x86_64")]
impl CodeTile {
    /// [`CodeTile::load`] of rows `first..first + m` read in place
    /// ([`PackedRows::code_bytes`]): each block's codes loaded under a
    /// mask (4-bit ones split into their nibbles), offset by 128 and stored
    /// into the tile.
    ///
    /// # Safety
    /// [`in_place`] returned true.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_in_place(&mut self, c: &CodeRows, first: usize, m: usize) {
        use std::arch::x86_64::*;
        // the rows' width is the tile's rank (`load` checked), so their
        // blocks are the tile's `nb`
        let (r, s, nb) = (self.rank, self.stride, self.blocks);
        let (flip, low, nibble_offset) = (
            _mm256_set1_epi8(i8::MIN),
            _mm_set1_epi8(15),
            // a nibble q holds the code q - 8, stored plus 128
            _mm_set1_epi8(120),
        );
        for k in 0..TILE {
            let codes = &mut self.codes[k * s..k * s + r];
            let scales = &mut self.scales[k * nb..(k + 1) * nb];
            if k >= m {
                codes.fill(128);
                scales.fill(0.0);
                continue;
            }
            let row = &c.bytes[(first + k) * c.row_bytes..(first + k + 1) * c.row_bytes];
            for (b, (scale, blk)) in scales.iter_mut().zip(c.blocks()).enumerate() {
                let (at, n, out, body) = (blk.at, blk.n, b * QBLOCK, blk.code_bytes());
                assert!(at + 2 + body <= row.len() && out + n <= codes.len());
                *scale = block_scale(row[at], row[at + 1]);
                // SAFETY: the masks keep the loads to the block's bytes and
                // the stores to codes' lanes out..out + n (asserted)
                unsafe {
                    let src = row.as_ptr().add(at + 2) as *const i8;
                    let dst = codes.as_mut_ptr().add(out) as *mut i8;
                    if blk.eight {
                        let mask = u32::MAX >> (QBLOCK - n);
                        let x = _mm256_maskz_loadu_epi8(mask, src);
                        _mm256_mask_storeu_epi8(dst, mask, _mm256_xor_si256(x, flip));
                    } else {
                        let lo_mask = lanes_mask(body);
                        let x = _mm_maskz_loadu_epi8(lo_mask, src);
                        let lo = _mm_add_epi8(_mm_and_si128(x, low), nibble_offset);
                        let hi = _mm_srli_epi16::<4>(x);
                        let hi = _mm_add_epi8(_mm_and_si128(hi, low), nibble_offset);
                        _mm_mask_storeu_epi8(dst, lo_mask, lo);
                        _mm_mask_storeu_epi8(dst.add(body), lanes_mask(n - body), hi);
                    }
                }
            }
        }
    }
}

/// The mask of the first `lanes` of sixteen (`lanes <= 16`).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn lanes_mask(lanes: usize) -> u16 {
    ((1u32 << lanes) - 1) as u16
}

/// Whether this CPU runs [`rebuild`] for keys of `d` values.
pub(crate) fn available(d: usize) -> bool {
    let shape = d > 0 && d.is_multiple_of(32);
    #[cfg(target_arch = "x86_64")]
    {
        shape
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = shape;
        false
    }
}

/// `out[k] = mean + Σ_r lat[k][r] * dec[r]` for the tile's [`TILE`] tokens,
/// the decoder read as its codes: per column block of 32, each latent
/// block's integer sums (four code pairs per lane and instruction) are
/// scaled by the block's scale into f32, and the total by the column's.
///
/// `turn`: the first tokens' interleaved RoPE rows (`[m, 2, head_dim]`,
/// cos then sin, as [`super::HostRope::row_into`] gives them) and the head
/// width: those keys are rotated in registers before they are stored (one
/// pass over them saved); the other keys are stored as rebuilt.
///
/// # Shapes
/// `mean`: `[d]`; `out`: `[TILE, d]`; positions `[<= TILE]`.
///
/// # Safety
/// [`available`] returned true for `d`; with `turn`, its rows are
/// interleaved and its head width is a multiple of 16 dividing `d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
pub(crate) unsafe fn rebuild(
    tile: &CodeTile,
    key: &KeyCodes,
    mean: &[f32],
    out: &mut [f32],
    turn: Option<(&[f32], usize)>,
) {
    use std::arch::x86_64::*;
    let d = key.d();
    let (s, nb, groups) = (tile.stride, tile.blocks, tile.stride / 4);
    assert!(mean.len() == d && out.len() >= TILE * d && d.is_multiple_of(32));
    assert!(tile.stride <= d && key.codes.len() == d * d);
    assert!(tile.codes.len() == TILE * s && tile.scales.len() == TILE * nb);
    assert!(key.prefix.len() == (d / 4 + 1) * d);
    let (cp, tp, pp) = (key.codes.as_ptr(), tile.codes.as_ptr(), key.prefix.as_ptr());
    for c0 in (0..d).step_by(32) {
        let mut f = [[_mm512_setzero_ps(); 2]; TILE];
        for b in 0..nb {
            let (g0, g1) = (b * QBLOCK / 4, ((b + 1) * QBLOCK / 4).min(groups));
            // -128 x the decoder codes these groups hold, per column
            // SAFETY: g0 < g1 <= d / 4 and c0 + 32 <= d: inside prefix
            let start: [__m512i; 2] = std::array::from_fn(|v| unsafe {
                let at = |g: usize| pp.add(g * d + c0 + 16 * v) as *const _;
                _mm512_sub_epi32(_mm512_loadu_si512(at(g0)), _mm512_loadu_si512(at(g1)))
            });
            let mut acc = [start; TILE];
            for g in g0..g1 {
                // SAFETY: g < groups <= d / 4 and c0 + 32 <= d: inside codes
                let u = unsafe {
                    let at = cp.add((g * d + c0) * 4);
                    [
                        _mm512_loadu_si512(at as *const _),
                        _mm512_loadu_si512(at.add(64) as *const _),
                    ]
                };
                for (k, a) in acc.iter_mut().enumerate() {
                    // SAFETY: 4 g + 4 <= stride: inside token k's codes
                    let x =
                        unsafe { std::ptr::read_unaligned(tp.add(k * s + 4 * g) as *const i32) };
                    let x = _mm512_set1_epi32(x);
                    a[0] = _mm512_dpbusd_epi32(a[0], x, u[0]);
                    a[1] = _mm512_dpbusd_epi32(a[1], x, u[1]);
                }
            }
            for (k, (fk, ak)) in f.iter_mut().zip(&acc).enumerate() {
                let sc = _mm512_set1_ps(tile.scales[k * nb + b]);
                for (x, &a) in fk.iter_mut().zip(ak) {
                    *x = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(a), *x);
                }
            }
        }
        // SAFETY: c0 + 32 <= d = mean.len() = scale.len()
        let (m, sc) = unsafe {
            (
                [
                    _mm512_loadu_ps(mean.as_ptr().add(c0)),
                    _mm512_loadu_ps(mean.as_ptr().add(c0 + 16)),
                ],
                [
                    _mm512_loadu_ps(key.scale.as_ptr().add(c0)),
                    _mm512_loadu_ps(key.scale.as_ptr().add(c0 + 16)),
                ],
            )
        };
        for (k, fk) in f.iter().enumerate() {
            let row = turn.and_then(|(rows, dh)| {
                let row = rows.get(k * 2 * dh..(k + 1) * 2 * dh)?;
                Some(row.split_at(dh))
            });
            for (v, &x) in fk.iter().enumerate() {
                let mut y = _mm512_fmadd_ps(sc[v], x, m[v]);
                if let Some((c, sn)) = row {
                    // this vector's coordinates within its head
                    let j = (c0 + 16 * v) % c.len();
                    assert!(j + 16 <= c.len() && c.len() == sn.len());
                    // SAFETY: j + 16 <= head_dim, the rows' length (asserted)
                    let (cv, sv) = unsafe {
                        (
                            _mm512_loadu_ps(c.as_ptr().add(j)),
                            _mm512_loadu_ps(sn.as_ptr().add(j)),
                        )
                    };
                    let swapped = _mm512_permute_ps::<0b1011_0001>(y);
                    y = _mm512_fmaddsub_ps(y, cv, _mm512_mul_ps(swapped, sv));
                }
                // SAFETY: k < TILE, c0 + 16 v + 16 <= d: inside out
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(k * d + c0 + 16 * v), y) };
            }
        }
    }
}

/// Rows `rows` of `lat` decoded to f32 from their codes, sixteen values at
/// a time (`scale * code`, the numbers [`PackedRows::rows`] gives); `false`,
/// writing nothing, when `lat` is not stored as blocks of codes or the rows
/// or `out` do not fit.
///
/// Why: a DynaKV step sums every value latent once; the row decoder in
/// `dynakv-core` is built for any CPU and converted them value by value.
/// Where the CPU reads codes in place (AVX-512 BW / VL and F16C) the sums
/// read them without decoding first ([`super::latent_values`]); this is
/// the path of the other AVX-512 CPUs.
///
/// # Shapes
/// `out`: `[rows.len(), dim]` at least.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn decode_rows(
    lat: &PackedRows,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> bool {
    use std::arch::x86_64::*;
    let r = lat.dim();
    if !lat.has_block_codes() || out.len() < rows.len() * r || rows.end > lat.len() {
        return false;
    }
    // codes padded to whole 16-byte loads
    let mut codes = vec![0i8; r.div_ceil(16) * 16];
    let mut scales = vec![0f32; r.div_ceil(QBLOCK)];
    for (k, i) in rows.enumerate() {
        if !lat.row_codes(i, &mut codes[..r], &mut scales) {
            return false;
        }
        let o = &mut out[k * r..(k + 1) * r];
        for j in (0..r).step_by(16) {
            let lanes = (r - j).min(16);
            let mask = ((1u32 << lanes) - 1) as __mmask16;
            // SAFETY: j + 16 <= codes.len(); the store keeps to o's lanes
            unsafe {
                let q = _mm_loadu_si128(codes.as_ptr().add(j) as *const __m128i);
                let x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                let x = _mm512_mul_ps(x, _mm512_set1_ps(scales[j / QBLOCK]));
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), mask, x);
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynakv_core::quant::{KvDtype, RowCodec};

    fn numbers(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919) % 61) as f32 / 30.0 - 1.0)
            .collect()
    }

    #[test]
    fn rows_decoded_from_codes_equal_the_row_decoder() {
        if !available(32) {
            eprintln!("no AVX-512 VNNI: skipped");
            return;
        }
        for codec in [
            RowCodec::Plain(KvDtype::Q8_0),
            RowCodec::Plain(KvDtype::Q4_0),
            RowCodec::Mixed,
        ] {
            for rank in [5, 37, 64] {
                let mut rows = PackedRows::new(codec.clone(), rank);
                rows.push(&numbers(4 * rank, rank + 1));
                let mut want = vec![0f32; 3 * rank];
                rows.rows(1, 3, &mut want);
                let mut got = vec![f32::NAN; 3 * rank];
                // SAFETY: available() said AVX-512F is here
                assert!(unsafe { decode_rows(&rows, 1..4, &mut got) });
                assert_eq!(got, want, "{codec:?} rank {rank}");
            }
        }
        let f32_rows = PackedRows::new(RowCodec::Plain(KvDtype::F32), 8);
        // SAFETY: as above
        assert!(!unsafe { decode_rows(&f32_rows, 0..0, &mut []) });
    }

    #[test]
    fn decoder_codes_are_within_half_a_step() {
        let d = 64;
        let mut dec = numbers(d * d, 1);
        dec[5] = 0.0; // a column whose largest value sits elsewhere
        for c in 0..d {
            dec[c * d + 7] = 0.0; // column 7: all zero, scale 0
        }
        let key = KeyCodes::new(&dec, d).expect("d = 64");
        for r in 0..d {
            for c in 0..d {
                let err = (key.value(r, c) - dec[r * d + c]).abs();
                assert!(err <= key.scale[c] * 0.5 + 1e-7, "[{r},{c}] {err}");
            }
        }
        assert_eq!(key.scale[7], 0.0);
        assert!(
            KeyCodes::new(&dec[..48 * 48], 48).is_none(),
            "48 is no multiple of 32"
        );
        dec[3] = f32::NAN;
        assert!(KeyCodes::new(&dec, d).is_none());
    }

    /// The integer kernel against the same sum in f64 over the decoder's
    /// and the latents' codes: q8_0, q4_0 and mixed rows, ranks that end
    /// mid-group and mid-block, a short tile.
    #[test]
    fn integer_rebuild_equals_the_sum_of_its_codes() {
        let d = 96;
        if !available(d) {
            eprintln!("no AVX-512 VNNI: skipped");
            return;
        }
        let key = KeyCodes::new(&numbers(d * d, 3), d).expect("d = 96");
        let mean = numbers(d, 11);
        for codec in [
            RowCodec::Plain(KvDtype::Q8_0),
            RowCodec::Plain(KvDtype::Q4_0),
            RowCodec::Mixed,
        ] {
            for (rank, m) in [(58, TILE), (96, TILE), (7, 2), (33, 5)] {
                let mut rows = PackedRows::new(codec.clone(), rank);
                let x = numbers(9 * rank, rank);
                rows.push(&x);
                let mut tile = CodeTile::new(rank);
                assert!(tile.load(&rows, 2, m));
                let mut got = vec![0f32; TILE * d];
                // SAFETY: available() said so
                unsafe { rebuild(&tile, &key, &mean, &mut got, None) };
                let mut buf = vec![0f32; rank];
                for k in 0..TILE {
                    let lat = match k < m {
                        true => rows.row(2 + k, &mut buf).to_vec(),
                        false => vec![0.0; rank],
                    };
                    for c in 0..d {
                        let want = mean[c] as f64
                            + (0..rank)
                                .map(|r| lat[r] as f64 * key.value(r, c) as f64)
                                .sum::<f64>();
                        let got = got[k * d + c] as f64;
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{codec:?} rank {rank} [{k},{c}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
        let f32_rows = PackedRows::new(RowCodec::Plain(KvDtype::F32), 8);
        assert!(
            !CodeTile::new(8).load(&f32_rows, 0, 0),
            "f32 rows have no codes"
        );
    }
}
