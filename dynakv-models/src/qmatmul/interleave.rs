//! Weight rows regrouped sixteen at a time for integer products on CPUs
//! with AVX-512 VNNI (q8 numerics with one quantised activation row, f32
//! numerics with three digits, `q8::digits`): each 512-bit load holds four
//! codes of sixteen rows, and one `vpdpbusd` adds four products to each of
//! sixteen row sums, so a block of 32 codes for 16 rows costs about 30
//! instructions where the row-major kernels spend about 12 per row.
//!
//! Why: llama.cpp's default on such CPUs repacks Q4_1/Q8_0 weights the same
//! way at load (its AMX buffer type, decoded with AVX512-VNNI) and decodes
//! SmolLM2 about twice as fast as with its own row-major kernels
//! (docs/results.md, "AVX-512 Q4 kernels, and llama.cpp's repacked
//! weights"). The layout is ours, the idea is the one every fast int8 GEMV
//! uses: put the rows in the lanes, not the reduction.
//!
//! Layout, per group of 16 rows and per block of 32 codes (a "tile"):
//! - Q4_1: 256 bytes of codes (four vectors of 64: byte `r * 4 + i` of vector
//!   `j` holds code `8 j + i` of row `r` in its low nibble and code
//!   `8 j + 4 + i` in its high nibble), 16 f16 scales, 16 f16 mins: 320
//!   bytes, the same as 16 GGUF blocks.
//! - Q8_0: 512 bytes of codes (eight vectors: byte `r * 4 + i` of vector `j`
//!   is code `4 j + i` of row `r`), 16 f16 scales, 16 i16 `sum(codes)` (the
//!   product takes unsigned activations `q + 128`, and 128 times this
//!   removes the offset; as i16 rather than the i32 product, 10 MB less on
//!   Gemma 3's 178 MB head): 576 bytes against 544.
//! - Q5_0: the four low bits of each code as Q4_1's 256 bytes; then per
//!   vector `j` two 64-bit masks, bit `r * 4 + i` the fifth bit of code
//!   `8 j + i` (first mask) or `8 j + 4 + i` (second) of row `r`, which the
//!   kernel adds back as 16 with one masked byte add; 16 f16 scales: 352
//!   bytes, the same as 16 GGUF blocks. Codes are taken unsigned (0..31);
//!   the kernel subtracts 16 times the activations' code sum, so the
//!   integer sums are llama.cpp's exactly.
//! - Q4_K (per superblock of 256 codes): the codes as Q4_1's tiles, four
//!   vectors per sub-block of 32 (2,048 bytes), then the eight 6-bit
//!   sub-block scales and the eight mins of the 16 rows unpacked to bytes
//!   (byte `16 s + r`, 128 bytes each), 16 f16 `d`, 16 f16 `dmin`: 2,368
//!   bytes against 2,304. Scales and mins are applied in integers (mins
//!   against Q8_K's sums of 16, paired to 32), as llama.cpp does.
//! - Q6_K (per superblock of 256 codes, not 32): the codes as unsigned
//!   bytes, 0..63 (64 vectors: byte `r * 4 + i` of vector `j` is code
//!   `4 j + i` of row `r`), then the sixteen int8 sub-block scales of the
//!   16 rows (byte `16 s + r`), then 16 f16 scales: 4,384 bytes against
//!   3,360 (1.30x: the six-bit codes are spread to bytes so the kernel
//!   needs no unpacking). The kernel removes 32 times each sub-block's
//!   activation sum (Q8_K's `bsums`) and applies the sub-block scales in
//!   integers, as llama.cpp does.

use crate::gguf::{scale_min_k4, GgmlType};
use crate::huge_pages::HugeBytes;

/// Rows per group (the lanes of one 512-bit vector of i32).
pub(crate) const GROUP: usize = 16;

/// A matrix's rows in tiles (see the module's documentation).
#[derive(Debug)]
pub(crate) struct Interleaved {
    /// Groups one after another, each its row blocks' tiles in order.
    pub(crate) data: HugeBytes,
}

/// Groups tiled between two reports of rows done ([`Interleaved::new`]).
const RELEASE_GROUPS: usize = 64;

/// Bytes of one tile.
pub(crate) fn tile_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_1 => Some(320),
        GgmlType::Q8_0 => Some(576),
        GgmlType::Q5_0 => Some(352),
        GgmlType::Q4K => Some(2368),
        GgmlType::Q6K => Some(4384),
        _ => None,
    }
}

impl Interleaved {
    /// Regroups `rows` rows of GGUF blocks (`row_bytes` each); `None` for a
    /// format without a tile layout or rows not whole groups. `done(start,
    /// len)` is told each stretch of `bytes` once its rows are in tiles (a
    /// few hundred KB at a time), so the caller can give its pages back.
    pub(crate) fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        mut done: impl FnMut(usize, usize),
    ) -> Option<Self> {
        let tb = tile_bytes(ty)?;
        let (be, bb) = ty.block();
        if !rows.is_multiple_of(GROUP) || !cols.is_multiple_of(be) {
            return None;
        }
        let kb = cols / be;
        let row_bytes = kb * bb;
        if bytes.len() != rows * row_bytes {
            return None;
        }
        // on huge pages: a decode step streams every tile once
        let mut reported = 0;
        let data = HugeBytes::filled(rows / GROUP * kb * tb, |data| {
            for (g, group) in data.chunks_exact_mut(kb * tb).enumerate() {
                for (b, tile) in group.chunks_exact_mut(tb).enumerate() {
                    for r in 0..GROUP {
                        let blk = &bytes[(g * GROUP + r) * row_bytes + b * bb..][..bb];
                        match ty {
                            GgmlType::Q4_1 => fill_q4_1(tile, r, blk),
                            GgmlType::Q5_0 => fill_q5_0(tile, r, blk),
                            GgmlType::Q4K => fill_q4_k(tile, r, blk),
                            GgmlType::Q6K => fill_q6_k(tile, r, blk),
                            _ => fill_q8_0(tile, r, blk),
                        }
                    }
                }
                if g + 1 - reported == RELEASE_GROUPS || g + 1 == rows / GROUP {
                    let group_bytes = GROUP * row_bytes;
                    done(reported * group_bytes, (g + 1 - reported) * group_bytes);
                    reported = g + 1;
                }
            }
        })
        .ok()?;
        Some(Self { data })
    }

    /// Bytes held.
    pub(crate) fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Row `r` of a matrix of `cols` columns dequantised from the tiles into
    /// `out` (`cols` values), as `dequantize_into` gives it from the file's
    /// blocks: the file's pages were given back, and reading them would
    /// bring the matrix into memory a second time (an embedding lookup on a
    /// tied table reads one row, a long f32 prefill dequantises every
    /// matrix for burn's GEMM). `false` (and `out` untouched) for a row out
    /// of range or a format without tiles.
    pub(crate) fn row_into(&self, ty: GgmlType, r: usize, cols: usize, out: &mut [f32]) -> bool {
        let (Some(tb), (be, _)) = (tile_bytes(ty), ty.block()) else {
            return false;
        };
        if !cols.is_multiple_of(be) || out.len() < cols {
            return false;
        }
        let kb = cols / be;
        let (g, lane) = (r / GROUP, r % GROUP);
        let Some(group) = self.data.get(g * kb * tb..(g + 1) * kb * tb) else {
            return false;
        };
        let f16_at = |t: &[u8], i: usize| half::f16::from_le_bytes([t[i], t[i + 1]]).to_f32();
        // the 32 four-bit codes of a block (Q4_1, Q5_0, Q4_K's sub-blocks):
        // code `8 j + i` in the low nibble of byte `4 lane + i` of vector
        // `j`, code `8 j + 4 + i` in its high nibble
        let nibbles = |v: &[u8]| {
            let mut c = [0u8; 32];
            for j in 0..4 {
                let b = &v[j * 64 + lane * 4..][..4];
                for i in 0..4 {
                    c[8 * j + i] = b[i] & 0x0F;
                    c[8 * j + 4 + i] = b[i] >> 4;
                }
            }
            c
        };
        for (tile, o) in group.chunks_exact(tb).zip(out.chunks_exact_mut(be)) {
            match ty {
                GgmlType::Q4_1 => {
                    let (d, m) = (f16_at(tile, 256 + 2 * lane), f16_at(tile, 288 + 2 * lane));
                    for (&c, y) in nibbles(tile).iter().zip(o) {
                        *y = c as f32 * d + m;
                    }
                }
                GgmlType::Q5_0 => {
                    let d = f16_at(tile, 320 + 2 * lane);
                    for (k, (&c, y)) in nibbles(tile).iter().zip(o).enumerate() {
                        let mask = 256 + 16 * (k / 8) + 8 * (k % 8 / 4);
                        let bit = lane * 4 + k % 4;
                        let fifth = (tile[mask + bit / 8] >> (bit % 8)) & 1;
                        *y = ((c | fifth << 4) as i32 - 16) as f32 * d;
                    }
                }
                GgmlType::Q4K => {
                    let (d, dmin) = (f16_at(tile, 2304 + 2 * lane), f16_at(tile, 2336 + 2 * lane));
                    for (sb, o) in o.chunks_exact_mut(32).enumerate() {
                        let codes = &tile[4 * sb * 64..];
                        let dl = d * tile[2048 + 16 * sb + lane] as f32;
                        let ml = dmin * tile[2176 + 16 * sb + lane] as f32;
                        for (&c, y) in nibbles(codes).iter().zip(o) {
                            *y = dl * c as f32 - ml;
                        }
                    }
                }
                GgmlType::Q6K => {
                    let d = f16_at(tile, 4352 + 2 * lane);
                    for (k, y) in o.iter_mut().enumerate() {
                        let code = tile[(k / 4) * 64 + lane * 4 + k % 4] as i32 - 32;
                        let sc = tile[4096 + 16 * (k / 16) + lane] as i8;
                        *y = d * sc as f32 * code as f32;
                    }
                }
                _ => {
                    let d = f16_at(tile, 512 + 2 * lane);
                    for (k, y) in o.iter_mut().enumerate() {
                        *y = (tile[(k / 4) * 64 + lane * 4 + k % 4] as i8) as f32 * d;
                    }
                }
            }
        }
        true
    }
}

/// Row `r`'s Q4_1 block (`d`, `m`, 16 bytes of nibbles: code `k < 16` low
/// nibble of byte `k`, code `16 + k` its high nibble) into a tile.
fn fill_q4_1(tile: &mut [u8], r: usize, blk: &[u8]) {
    let code = |k: usize| (blk[4 + (k & 15)] >> (4 * (k >> 4))) & 0x0F;
    for j in 0..4 {
        for i in 0..4 {
            tile[j * 64 + r * 4 + i] = code(8 * j + i) | (code(8 * j + 4 + i) << 4);
        }
    }
    tile[256 + 2 * r..258 + 2 * r].copy_from_slice(&blk[0..2]);
    tile[288 + 2 * r..290 + 2 * r].copy_from_slice(&blk[2..4]);
}

/// Row `r`'s Q5_0 block (`d`, 32 bits of fifth bits `qh`, 16 bytes of
/// nibbles: code `k` is nibble `k` (low nibbles first) plus 16 times bit `k`
/// of `qh`) into a tile.
fn fill_q5_0(tile: &mut [u8], r: usize, blk: &[u8]) {
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let nibble = |k: usize| (blk[6 + (k & 15)] >> (4 * (k >> 4))) & 0x0F;
    let fifth = |k: usize| (qh >> k) & 1 == 1;
    for j in 0..4 {
        for i in 0..4 {
            let (a, b) = (8 * j + i, 8 * j + 4 + i);
            tile[j * 64 + r * 4 + i] = nibble(a) | (nibble(b) << 4);
            let bit = r * 4 + i;
            if fifth(a) {
                tile[256 + 16 * j + bit / 8] |= 1 << (bit % 8);
            }
            if fifth(b) {
                tile[264 + 16 * j + bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    tile[320 + 2 * r..322 + 2 * r].copy_from_slice(&blk[0..2]);
}

/// Row `r`'s Q4_K superblock (f16 `d`, f16 `dmin`, 12 bytes of 6-bit
/// scales and mins, 128 bytes of nibbles: for `j < 4`, bytes `32 j ..` hold
/// sub-block `2 j` in their low nibbles and `2 j + 1` in their high ones)
/// into a tile.
fn fill_q4_k(tile: &mut [u8], r: usize, blk: &[u8]) {
    let qs = &blk[16..144];
    let code = |k: usize| {
        let (sb, l) = (k / 32, k % 32);
        (qs[32 * (sb / 2) + l] >> (4 * (sb % 2))) & 0x0F
    };
    for sb in 0..8 {
        for j in 0..4 {
            for i in 0..4 {
                let (a, b) = (32 * sb + 8 * j + i, 32 * sb + 8 * j + 4 + i);
                tile[(4 * sb + j) * 64 + r * 4 + i] = code(a) | (code(b) << 4);
            }
        }
        let (sc, m) = scale_min_k4(sb, &blk[4..16]);
        tile[2048 + 16 * sb + r] = sc;
        tile[2176 + 16 * sb + r] = m;
    }
    tile[2304 + 2 * r..2306 + 2 * r].copy_from_slice(&blk[0..2]);
    tile[2336 + 2 * r..2338 + 2 * r].copy_from_slice(&blk[2..4]);
}

/// Row `r`'s Q6_K superblock (128 bytes of low nibbles `ql`, 64 of high
/// bit pairs `qh`, 16 int8 scales, f16 `d`; ggml's order: in each half of
/// 128 codes, code `l`, `l + 32`, `l + 64`, `l + 96` for `l < 32` take
/// `ql[l]` low, `ql[l + 32]` low, `ql[l]` high, `ql[l + 32]` high and bit
/// pairs 0, 1, 2, 3 of `qh[l]`) into a tile.
fn fill_q6_k(tile: &mut [u8], r: usize, blk: &[u8]) {
    let (ql_all, qh_all, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
    let mut u = [0u8; 256];
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let y = &mut u[128 * half..128 * half + 128];
        for l in 0..32 {
            y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    for (k, &code) in u.iter().enumerate() {
        tile[(k / 4) * 64 + r * 4 + k % 4] = code;
    }
    for (s, &v) in sc.iter().enumerate() {
        tile[4096 + 16 * s + r] = v;
    }
    tile[4352 + 2 * r..4354 + 2 * r].copy_from_slice(&blk[208..210]);
}

/// Row `r`'s Q8_0 block (`d`, 32 signed codes) into a tile.
fn fill_q8_0(tile: &mut [u8], r: usize, blk: &[u8]) {
    let mut sum = 0i32;
    for j in 0..8 {
        for i in 0..4 {
            let c = blk[2 + 4 * j + i];
            tile[j * 64 + r * 4 + i] = c;
            sum += c as i8 as i32;
        }
    }
    tile[512 + 2 * r..514 + 2 * r].copy_from_slice(&blk[0..2]);
    // 32 codes in -128..=127: the sum fits in an i16
    tile[544 + 2 * r..546 + 2 * r].copy_from_slice(&(sum as i16).to_le_bytes());
}

/// Whether this CPU runs the tile kernels.
pub(crate) fn has_vnni512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::kernel::has_avx512()
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One group's 16 products with quantised activation rows `xs` whose
/// products add up: one row in q8 numerics, [`super::q8::DIGITS`] digits in
/// f32 ([`super::q8::digits`]); `xu[k]` is row `k`'s codes plus 128 where
/// the tiles are Q8_0's. Digits of Q4_1 and Q8_0 tiles (SmolLM2's
/// projections, both models' output heads) share each tile load
/// ([`fused_digits`]); other formats add up one product per digit.
/// Needs [`has_vnni512`].
///
/// # Shapes
/// - `tiles`: `kb` tiles (blocks or superblocks) of one group; `out`: 16
///   outputs
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn group_product(
    ty: GgmlType,
    kb: usize,
    tiles: &[u8],
    xs: &[super::q8::Q8Row],
    xu: &[Vec<u8>],
    out: &mut [f32],
) {
    const D: usize = super::q8::DIGITS;
    if xs.len() == D && matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
        fused_digits::<D>(ty, kb, tiles, xs, xu, out);
        return;
    }
    let Some(out) = out.get_mut(..GROUP) else {
        return;
    };
    let mut y = [0f32; GROUP];
    out.fill(0.0);
    for (k, x) in xs.iter().enumerate() {
        let offsets = xu.get(k).map_or(&[][..], |v| &v[..]);
        one_row_product(ty, kb, tiles, x, offsets, &mut y);
        for (o, v) in out.iter_mut().zip(y) {
            *o += v;
        }
    }
}

/// One group's 16 products with one quantised activation row `x` (Q8_1 for
/// Q4_1 tiles: its codes, scales and sums; Q8_0 for Q8_0 tiles: its scales,
/// with `xu` its codes plus 128 as bytes; Q8_0 for Q5_0 tiles: its codes,
/// scales and block code sums; Q8_K for Q4_K and Q6_K tiles: its codes,
/// scales and sums of 16). Needs [`has_vnni512`].
///
/// # Shapes
/// - `tiles`: `kb` tiles (blocks or superblocks) of one group; `out`: 16
///   outputs
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn one_row_product(
    ty: GgmlType,
    kb: usize,
    tiles: &[u8],
    x: &super::q8::Q8Row,
    xu: &[u8],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (qs, d, s) = (&x.qs, &x.d, &x.s);
    let Some(tb) = tile_bytes(ty) else { return };
    let kb = kb.min(tiles.len() / tb).min(d.len());
    if out.len() < GROUP {
        return;
    }
    let (mut acc, mut acc_min) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    if ty == GgmlType::Q4_1 {
        let kb = kb.min(s.len()).min(qs.len() / 32);
        let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
        for b in 0..kb {
            let t = tiles.as_ptr().add(b * tb);
            let [sum] = nibble_sums(t, [qs.as_ptr().add(b * 32) as *const i32], low, high);
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(256) as *const __m256i));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(288) as *const __m256i));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[b]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc);
            // the mins in a chain of their own
            acc_min = _mm512_fmadd_ps(mw, _mm512_set1_ps(s[b]), acc_min);
        }
    } else if ty == GgmlType::Q4K {
        let kb = kb.min(qs.len() / 256).min(x.bsums.len() / 16);
        let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
        for (b, &db) in d.iter().enumerate().take(kb) {
            let t = tiles.as_ptr().add(b * tb);
            let xq = qs.as_ptr().add(b * 256) as *const i32;
            let (mut isum, mut msum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for sb in 0..8 {
                let [sum] = nibble_sums(t.add(4 * sb * 64), [xq.add(8 * sb)], low, high);
                let sc =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(t.add(2048 + 16 * sb) as *const __m128i));
                let mn =
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(t.add(2176 + 16 * sb) as *const __m128i));
                let xs = x.bsums[b * 16 + 2 * sb] + x.bsums[b * 16 + 2 * sb + 1];
                isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(sum, sc));
                msum = _mm512_add_epi32(msum, _mm512_mullo_epi32(mn, _mm512_set1_epi32(xs)));
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(2304) as *const __m256i));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(2336) as *const __m256i));
            let dy = _mm512_set1_ps(db);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, dy), acc);
            // the mins in a chain of their own, subtracted at the end
            acc_min = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(mw, dy), acc_min);
        }
        acc_min = _mm512_sub_ps(_mm512_setzero_ps(), acc_min);
    } else if ty == GgmlType::Q6K {
        let kb = kb.min(qs.len() / 256).min(x.bsums.len() / 16);
        for (b, &db) in d.iter().enumerate().take(kb) {
            let t = tiles.as_ptr().add(b * tb);
            let xq = qs.as_ptr().add(b * 256) as *const i32;
            let mut isum = _mm512_setzero_si512();
            for s in 0..16 {
                let mut sums = _mm512_setzero_si512();
                for v in 0..4 {
                    let j = 4 * s + v;
                    let w = _mm512_loadu_si512(t.add(64 * j) as *const _);
                    let xb = _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(j)));
                    sums = _mm512_dpbusd_epi32(sums, w, xb);
                }
                // codes were taken as 0..63: remove 32 * the sub-block's
                // activation sum, then apply its scale, in integers
                let sums = _mm512_sub_epi32(sums, _mm512_set1_epi32(32 * x.bsums[b * 16 + s]));
                let sc =
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(t.add(4096 + 16 * s) as *const __m128i));
                isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(sums, sc));
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(4352) as *const __m256i));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(db));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
        }
    } else if ty == GgmlType::Q5_0 {
        let sums = &x.bsums;
        let kb = kb.min(qs.len() / 32).min(sums.len());
        let (low, sixteen) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(16));
        for b in 0..kb {
            let t = tiles.as_ptr().add(b * tb);
            let x = qs.as_ptr().add(b * 32) as *const i32;
            let (mut lo_sum, mut hi_sum) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for j in 0..4 {
                let v = _mm512_loadu_si512(t.add(j * 64) as *const _);
                let m_lo = std::ptr::read_unaligned(t.add(256 + 16 * j) as *const u64);
                let m_hi = std::ptr::read_unaligned(t.add(264 + 16 * j) as *const u64);
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                // the fifth bit back as 16 where its mask bit is set
                let lo = _mm512_mask_add_epi8(lo, m_lo, lo, sixteen);
                let hi = _mm512_mask_add_epi8(hi, m_hi, hi, sixteen);
                let xl = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(2 * j)));
                let xh = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(2 * j + 1)));
                lo_sum = _mm512_dpbusd_epi32(lo_sum, lo, xl);
                hi_sum = _mm512_dpbusd_epi32(hi_sum, hi, xh);
            }
            // codes were taken as 0..31: remove 16 * sum(x codes)
            let sum = _mm512_sub_epi32(
                _mm512_add_epi32(lo_sum, hi_sum),
                _mm512_set1_epi32(16 * sums[b]),
            );
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(320) as *const __m256i));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(d[b]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc);
        }
    } else {
        let kb = kb.min(xu.len() / 32);
        for (b, &db) in d.iter().enumerate().take(kb) {
            let t = tiles.as_ptr().add(b * tb);
            let x = xu.as_ptr().add(b * 32) as *const i32;
            let mut sums = [_mm512_setzero_si512(); 4];
            for j in 0..8 {
                let w = _mm512_loadu_si512(t.add(j * 64) as *const _);
                let xb = _mm512_set1_epi32(std::ptr::read_unaligned(x.add(j)));
                sums[j % 4] = _mm512_dpbusd_epi32(sums[j % 4], xb, w);
            }
            let comp = offset_correction(t);
            let sum = _mm512_sub_epi32(
                _mm512_add_epi32(
                    _mm512_add_epi32(sums[0], sums[1]),
                    _mm512_add_epi32(sums[2], sums[3]),
                ),
                comp,
            );
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(512) as *const __m256i));
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(db));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc);
        }
    }
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(acc, acc_min));
}

/// [`group_product`] for `D` digits of Q4_1 or Q8_0 tiles: each vector of
/// codes is loaded (and its nibbles split) once and meets every digit, the
/// digits' integer sums are scaled and added in f32 (each sum is exact in
/// f32: below 2^24), then scaled by the rows' `d` once.
///
/// # Shapes
/// as [`group_product`], `xs` and (Q8_0) `xu` at least `D` rows
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn fused_digits<const D: usize>(
    ty: GgmlType,
    kb: usize,
    tiles: &[u8],
    xs: &[super::q8::Q8Row],
    xu: &[Vec<u8>],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let Some(tb) = tile_bytes(ty) else { return };
    if xs.len() < D || out.len() < GROUP {
        return;
    }
    let mut kb = kb.min(tiles.len() / tb);
    for x in &xs[..D] {
        kb = kb.min(x.d.len()).min(x.qs.len() / 32);
    }
    let (mut acc, mut acc_min) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    if ty == GgmlType::Q4_1 {
        for x in &xs[..D] {
            kb = kb.min(x.s.len());
        }
        let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0xF0u8 as i8));
        for b in 0..kb {
            let t = tiles.as_ptr().add(b * tb);
            let xp: [*const i32; D] =
                std::array::from_fn(|k| xs[k].qs.as_ptr().add(b * 32) as *const i32);
            let sums = nibble_sums::<D>(t, xp, low, high);
            let (mut f, mut s) = (_mm512_setzero_ps(), 0f32);
            for k in 0..D {
                f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[k]), _mm512_set1_ps(xs[k].d[b]), f);
                s += xs[k].s[b];
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(256) as *const __m256i));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(288) as *const __m256i));
            acc = _mm512_fmadd_ps(f, dw, acc);
            // the mins in a chain of their own
            acc_min = _mm512_fmadd_ps(mw, _mm512_set1_ps(s), acc_min);
        }
    } else {
        if xu.len() < D {
            return;
        }
        for u in &xu[..D] {
            kb = kb.min(u.len() / 32);
        }
        for b in 0..kb {
            let t = tiles.as_ptr().add(b * tb);
            let xp: [*const i32; D] =
                std::array::from_fn(|k| xu[k].as_ptr().add(b * 32) as *const i32);
            let mut sums = [[_mm512_setzero_si512(); 2]; D];
            for j in 0..8 {
                let w = _mm512_loadu_si512(t.add(j * 64) as *const _);
                for k in 0..D {
                    let xb = _mm512_set1_epi32(std::ptr::read_unaligned(xp[k].add(j)));
                    sums[k][j % 2] = _mm512_dpbusd_epi32(sums[k][j % 2], xb, w);
                }
            }
            // each digit's activations were offset by 128: remove it
            let comp = offset_correction(t);
            let mut f = _mm512_setzero_ps();
            for k in 0..D {
                let sum = _mm512_sub_epi32(_mm512_add_epi32(sums[k][0], sums[k][1]), comp);
                f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xs[k].d[b]), f);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(t.add(512) as *const __m256i));
            acc = _mm512_fmadd_ps(f, dw, acc);
        }
    }
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(acc, acc_min));
}

/// A Q8_0 tile's 16 rows' `128 * sum(codes)` (stored as i16 sums at byte
/// 544): what the activations' offset of 128 added to each row's sum.
///
/// # Safety
/// AVX-512F/BW; a whole Q8_0 tile (576 bytes) readable at `t`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn offset_correction(t: *const u8) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let sums = _mm512_cvtepi16_epi32(_mm256_loadu_si256(t.add(544) as *const __m256i));
    _mm512_slli_epi32::<7>(sums)
}

/// Sixteen rows' integer sums over 32 four-bit codes (four vectors at `t`,
/// Q4_1's tile layout) against each of `N` rows of 32 activation codes
/// (`x[k]`, eight groups of four: one token, or one token's digits), each
/// vector loaded and split once for all of them. High nibbles stay in place
/// (16 x the code) and their sum is shifted down once, exactly: one
/// instruction a vector instead of two.
///
/// # Safety
/// AVX-512F/BW/VNNI; 256 bytes readable at `t`, 32 at each `x[k]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibble_sums<const N: usize>(
    t: *const u8,
    x: [*const i32; N],
    low: std::arch::x86_64::__m512i,
    high: std::arch::x86_64::__m512i,
) -> [std::arch::x86_64::__m512i; N] {
    use std::arch::x86_64::*;
    let (mut lo_sum, mut hi_sum) = ([_mm512_setzero_si512(); N], [_mm512_setzero_si512(); N]);
    for j in 0..4 {
        let v = _mm512_loadu_si512(t.add(j * 64) as *const _);
        let (vl, vh) = (_mm512_and_si512(v, low), _mm512_and_si512(v, high));
        for k in 0..N {
            let xl = _mm512_set1_epi32(std::ptr::read_unaligned(x[k].add(2 * j)));
            let xh = _mm512_set1_epi32(std::ptr::read_unaligned(x[k].add(2 * j + 1)));
            lo_sum[k] = _mm512_dpbusd_epi32(lo_sum[k], vl, xl);
            hi_sum[k] = _mm512_dpbusd_epi32(hi_sum[k], vh, xh);
        }
    }
    std::array::from_fn(|k| _mm512_add_epi32(lo_sum[k], _mm512_srai_epi32::<4>(hi_sum[k])))
}

/// The codes plus 128, as the Q8_0 tiles' unsigned operand.
pub(crate) fn offset_codes(qs: &[i8]) -> Vec<u8> {
    qs.iter().map(|&q| (q as i16 + 128) as u8).collect()
}
