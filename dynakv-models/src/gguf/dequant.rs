//! Dequantisation of ggml block formats to f32.
//!
//! Block layouts follow ggml's reference `dequantize_row_*` functions; a
//! committed fixture produced by the `gguf` PyPI package checks every format
//! (`tests/dequant_fixture.rs`).

use half::{bf16, f16};

use super::types::GgmlType;

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` elements of type `t` from `data`.
///
/// Returns an error string when `data` does not hold exactly `n` elements.
pub fn dequantize(t: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let need = t
        .bytes_for(n as u64)
        .ok_or_else(|| format!("{n} elements is not a whole number of {t:?} blocks"))?;
    if need != data.len() as u64 {
        return Err(format!(
            "{t:?} data has {} bytes, {n} elements need {need}",
            data.len()
        ));
    }
    let mut out = vec![0f32; n];
    dequantize_into(t, data, &mut out);
    Ok(out)
}

/// Dequantises whole blocks of `data` into `out`, as many elements as both
/// hold (the caller sizes them: `out.len()` elements need
/// `t.bytes_for(out.len())` bytes). No allocation: the quantised matmul
/// calls it per weight row into a buffer that stays in L1.
#[inline(always)]
pub fn dequantize_into(t: GgmlType, data: &[u8], out: &mut [f32]) {
    let (be, bb) = t.block();
    let blocks = data.chunks_exact(bb).zip(out.chunks_exact_mut(be));
    match t {
        GgmlType::F32 => {
            for (c, o) in blocks {
                o[0] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (c, o) in blocks {
                o[0] = f16_at(c, 0);
            }
        }
        GgmlType::BF16 => {
            for (c, o) in blocks {
                o[0] = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for ((&q, l), h) in b[2..18].iter().zip(lo).zip(hi) {
                    *l = ((q & 0xF) as i32 - 8) as f32 * d;
                    *h = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let (lo, hi) = o.split_at_mut(16);
                for ((&q, l), h) in b[4..20].iter().zip(lo).zip(hi) {
                    *l = (q & 0xF) as f32 * d + m;
                    *h = (q >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let (lo, hi) = o.split_at_mut(16);
                for (j, ((&q, l), h)) in b[6..22].iter().zip(lo).zip(hi).enumerate() {
                    let x0 = (q & 0xF) as u32 | (((qh >> j) & 1) << 4);
                    let x1 = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                    *l = (x0 as i32 - 16) as f32 * d;
                    *h = (x1 as i32 - 16) as f32 * d;
                }
            }
        }
        GgmlType::Q5_1 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let (lo, hi) = o.split_at_mut(16);
                for (j, ((&q, l), h)) in b[8..24].iter().zip(lo).zip(hi).enumerate() {
                    let x0 = (q & 0xF) as u32 | (((qh >> j) & 1) << 4);
                    let x1 = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                    *l = x0 as f32 * d + m;
                    *h = x1 as f32 * d + m;
                }
            }
        }
        GgmlType::Q2K => {
            for (b, o) in blocks {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let d = f16_at(b, 80);
                let dmin = f16_at(b, 82);
                // two halves of 128: 32 bytes of 2-bit values, four shifts,
                // 16 values per scale
                for (half, y) in o.chunks_exact_mut(128).enumerate() {
                    let q = &qs[32 * half..32 * half + 32];
                    for (k, y) in y.chunks_exact_mut(16).enumerate() {
                        let (shift, second) = (2 * (k / 2), k % 2);
                        let sc = scales[8 * half + k];
                        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                        for (l, y) in y.iter_mut().enumerate() {
                            *y = dl * ((q[l + 16 * second] >> shift) & 3) as f32 - ml;
                        }
                    }
                }
            }
        }
        GgmlType::Q3K => {
            for (b, o) in blocks {
                let (hmask, qs) = (&b[0..32], &b[32..96]);
                let scales = q3k_scales(&b[96..108]);
                let d = f16_at(b, 108);
                for (half, y) in o.chunks_exact_mut(128).enumerate() {
                    let q = &qs[32 * half..32 * half + 32];
                    for (k, y) in y.chunks_exact_mut(16).enumerate() {
                        let (shift, second) = (2 * (k / 2), k % 2);
                        // the high bit of sub-block pair k/2 of this half
                        let m = 1u8 << (4 * half + k / 2);
                        let dl = d * (scales[8 * half + k] as i32 - 32) as f32;
                        for (l, y) in y.iter_mut().enumerate() {
                            let i = l + 16 * second;
                            let low = ((q[i] >> shift) & 3) as i32;
                            let high = if hmask[i] & m != 0 { 0 } else { 4 };
                            *y = dl * (low - high) as f32;
                        }
                    }
                }
            }
        }
        GgmlType::Q5K => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
                for (j, o) in o.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                    let q = &qs[32 * j..32 * j + 32];
                    let (lo, hi) = o.split_at_mut(32);
                    for (((&v, &h), l), hi) in q.iter().zip(qh).zip(lo).zip(hi) {
                        let x0 = (v & 0xF) + if h & u1 != 0 { 16 } else { 0 };
                        let x1 = (v >> 4) + if h & u2 != 0 { 16 } else { 0 };
                        *l = d1 * x0 as f32 - m1;
                        *hi = d2 * x1 as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                for (&q, y) in b[2..34].iter().zip(o) {
                    *y = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (j, o) in o.chunks_exact_mut(64).enumerate() {
                    let (sc1, m1) = scale_min_k4(2 * j, scales);
                    let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                    let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
                    let q = &qs[32 * j..32 * j + 32];
                    let (lo, hi) = o.split_at_mut(32);
                    for ((&v, l), h) in q.iter().zip(lo).zip(hi) {
                        *l = d1 * (v & 0xF) as f32 - m1;
                        *h = d2 * (v >> 4) as f32 - m2;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (b, o) in blocks {
                let ql_all = &b[0..128];
                let qh_all = &b[128..192];
                let sc_all = &b[192..208];
                let d = f16_at(b, 208);
                for (half, y) in o.chunks_exact_mut(128).enumerate() {
                    let ql = &ql_all[64 * half..];
                    let qh = &qh_all[32 * half..];
                    let sc = &sc_all[8 * half..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K super-block (stored biased by 32),
/// unpacked from its 12 bytes as ggml's `dequantize_row_q3_K` does.
fn q3k_scales(packed: &[u8]) -> [u8; 16] {
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let aux = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let mut out = [0u8; 16];
    for (o, a) in out.chunks_exact_mut(4).zip(aux) {
        o.copy_from_slice(&a.to_le_bytes());
    }
    out
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K super-block.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_by_hand() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // low nibble 10 -> element 0, high nibble 3 -> element 16
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0], 10.0 * 0.5 - 1.0);
        assert_eq!(y[16], 3.0 * 0.5 - 1.0);
        assert_eq!(y[1], -1.0);
    }

    #[test]
    fn wrong_length_is_an_error() {
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], 31).is_err());
    }
}
