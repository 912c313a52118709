//! KIVI-style 2-bit blocks of 32 rows (Liu et al., 2024): asymmetric codes
//! with an f16 scale and minimum per group, grouped per channel (keys) or
//! per row (values).

use half::f16;

use super::QBLOCK;

/// Bytes of one 2-bit group of `n` values: f16 scale, f16 minimum, codes.
fn kivi_group_bytes(n: usize) -> usize {
    4 + n.div_ceil(4)
}

/// Bytes of one row of a per-row (values) KIVI block.
fn kivi_row_bytes(dim: usize) -> usize {
    (0..dim)
        .step_by(QBLOCK)
        .map(|c| kivi_group_bytes((dim - c).min(QBLOCK)))
        .sum()
}

/// Bytes of one KIVI block of [`QBLOCK`] rows.
pub(super) fn kivi_block_bytes(dim: usize, per_channel: bool) -> usize {
    if per_channel {
        dim * kivi_group_bytes(QBLOCK)
    } else {
        QBLOCK * kivi_row_bytes(dim)
    }
}

/// Asymmetric 2-bit codes of `x` (min and scale from the group itself):
/// appends f16 scale and minimum, returns the codes.
fn kivi_codes(x: impl Iterator<Item = f32> + Clone, out: &mut Vec<u8>) -> Vec<u8> {
    let (mn, mx) = x
        .clone()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let scale = (mx - mn) / 3.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    out.extend(f16::from_f32(scale).to_le_bytes());
    out.extend(f16::from_f32(mn).to_le_bytes());
    x.map(|v| ((v - mn) * inv).round().clamp(0.0, 3.0) as u8)
        .collect()
}

/// Packs 2-bit codes four to a byte, the first in the low bits.
fn pack2(codes: &[u8], out: &mut Vec<u8>) {
    for q in codes.chunks(4) {
        out.push(
            q.iter()
                .enumerate()
                .fold(0u8, |b, (i, &c)| b | (c << (2 * i))),
        );
    }
}

/// Encodes [`QBLOCK`] rows of `dim` values as one KIVI block.
///
/// # Shapes
/// - `rows`: `[QBLOCK, dim]` row-major
pub(super) fn encode_kivi_block(rows: &[f32], dim: usize, per_channel: bool, out: &mut Vec<u8>) {
    if per_channel {
        // all scales first, then each channel's 32 codes (8 bytes)
        let mut codes = Vec::with_capacity(dim * 8);
        for c in 0..dim {
            let q = kivi_codes((0..QBLOCK).map(|t| rows[t * dim + c]), out);
            pack2(&q, &mut codes);
        }
        out.extend(codes);
    } else {
        for row in rows.chunks_exact(dim) {
            for g in row.chunks(QBLOCK) {
                let q = kivi_codes(g.iter().copied(), out);
                pack2(&q, out);
            }
        }
    }
}

/// Decodes row `j` of a KIVI block into `out` (`[dim]`).
pub(super) fn decode_kivi_row(block: &[u8], j: usize, per_channel: bool, out: &mut [f32]) {
    let dim = out.len();
    let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    if per_channel {
        let codes = &block[4 * dim..];
        let (byte, shift) = (j / 4, 2 * (j % 4));
        for (c, o) in out.iter_mut().enumerate() {
            let q = (codes[c * 8 + byte] >> shift) & 3;
            *o = half(block, 4 * c + 2) + half(block, 4 * c) * q as f32;
        }
    } else {
        let mut at = j * kivi_row_bytes(dim);
        for g in out.chunks_mut(QBLOCK) {
            let (scale, mn) = (half(block, at), half(block, at + 2));
            let codes = &block[at + 4..];
            for (i, o) in g.iter_mut().enumerate() {
                let q = (codes[i / 4] >> (2 * (i % 4))) & 3;
                *o = mn + scale * q as f32;
            }
            at += kivi_group_bytes(g.len());
        }
    }
}
