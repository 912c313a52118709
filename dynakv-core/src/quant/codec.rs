//! Rows to bytes and back: llama.cpp's q8_0 / q4_0 blocks, f16 / bf16,
//! mixed 8/4-bit rows and per-coordinate integer codes.

use std::sync::Arc;

use half::{bf16, f16};

use super::{channel_clip, KvDtype, LatentDtype, LatentScales, QBLOCK};
use crate::error::CoreError;

/// How rows are turned into bytes and back.
#[derive(Debug, Clone, PartialEq)]
pub enum RowCodec {
    /// Self-contained rows (scales, if any, inside each block).
    Plain(KvDtype),
    /// Integer codes with one fixed scale per coordinate, `[n]`.
    Channel { bits4: bool, scales: Arc<[f32]> },
    /// KIVI 2-bit blocks of 32 rows, grouped per channel (keys) or per row
    /// (values); a lone row (the open block) is f16.
    Kivi { per_channel: bool },
    /// The first block of a row in q8_0, the others in q4_0.
    Mixed,
}

impl RowCodec {
    /// The codec of a dense cache's key (`key`) or value rows in `dtype`.
    pub fn kv(dtype: KvDtype, key: bool) -> Self {
        match dtype {
            KvDtype::Kivi2 => Self::Kivi { per_channel: key },
            d => Self::Plain(d),
        }
    }

    /// The codec of latent rows of `n` coordinates; `stddev` is each
    /// coordinate's standard deviation (from calibration), used by
    /// [`LatentScales::Channel`].
    pub fn latent(
        dtype: LatentDtype,
        scales: LatentScales,
        stddev: &[f32],
    ) -> Result<Self, CoreError> {
        Ok(match (dtype, scales) {
            (LatentDtype::F32, _) => Self::Plain(KvDtype::F32),
            (LatentDtype::F16, _) => Self::Plain(KvDtype::F16),
            (LatentDtype::Int8, LatentScales::Token) => Self::Plain(KvDtype::Q8_0),
            (LatentDtype::Int4, LatentScales::Token) => Self::Plain(KvDtype::Q4_0),
            (LatentDtype::Mixed, LatentScales::Token) => Self::Mixed,
            (LatentDtype::Mixed, LatentScales::Channel) => {
                return Err(CoreError::Invalid {
                    field: "latent scales",
                    message: "mixed latents take token scales (q8_0 / q4_0 blocks)".into(),
                })
            }
            (d, LatentScales::Channel) => {
                let (clip, qmax) = (channel_clip(d), d.qmax().unwrap_or(127.0));
                if let Some(bad) = stddev.iter().find(|s| !s.is_finite() || **s < 0.0) {
                    return Err(CoreError::Invalid {
                        field: "latent scales",
                        message: format!("calibration standard deviation {bad}"),
                    });
                }
                Self::Channel {
                    bits4: d == LatentDtype::Int4,
                    scales: stddev
                        .iter()
                        .map(|s| (clip * s / qmax).max(f32::MIN_POSITIVE))
                        .collect(),
                }
            }
        })
    }

    /// The same codec for the first `n` coordinates only (a rank bucket).
    pub fn prefix(&self, n: usize) -> Self {
        match self {
            Self::Plain(d) => Self::Plain(*d),
            Self::Mixed => Self::Mixed,
            Self::Kivi { per_channel } => Self::Kivi {
                per_channel: *per_channel,
            },
            Self::Channel { bits4, scales } => Self::Channel {
                bits4: *bits4,
                scales: scales[..n.min(scales.len())].into(),
            },
        }
    }

    pub fn row_bytes(&self, n: usize) -> usize {
        match self {
            // a lone KIVI row is f16 (the open block's format)
            Self::Plain(KvDtype::Kivi2) => 2 * n,
            Self::Plain(d) => d.row_bytes(n),
            Self::Kivi { .. } => KvDtype::Kivi2.row_bytes(n),
            Self::Mixed => {
                let lead = n.min(QBLOCK);
                KvDtype::Q8_0.row_bytes(lead) + KvDtype::Q4_0.row_bytes(n - lead)
            }
            Self::Channel { bits4: true, .. } => n.div_ceil(2),
            Self::Channel { bits4: false, .. } => n,
        }
    }

    pub fn is_f32(&self) -> bool {
        *self == Self::Plain(KvDtype::F32)
    }

    /// Appends the bytes of one row.
    pub fn encode(&self, x: &[f32], out: &mut Vec<u8>) {
        match self {
            Self::Plain(KvDtype::F32) => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Self::Plain(KvDtype::F16 | KvDtype::Kivi2) | Self::Kivi { .. } => x
                .iter()
                .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
            Self::Plain(KvDtype::Bf16) => x
                .iter()
                .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
            Self::Plain(KvDtype::Q8_0) => x.chunks(QBLOCK).for_each(|b| encode_q8_0(b, out)),
            Self::Plain(KvDtype::Q4_0) => x.chunks(QBLOCK).for_each(|b| encode_q4_0(b, out)),
            Self::Mixed => {
                for (i, b) in x.chunks(QBLOCK).enumerate() {
                    match i {
                        0 => encode_q8_0(b, out),
                        _ => encode_q4_0(b, out),
                    }
                }
            }
            Self::Channel { bits4, scales } => {
                let code = |j: usize, lo: f32, hi: f32| (x[j] / scales[j]).round().clamp(lo, hi);
                if *bits4 {
                    let half = x.len().div_ceil(2);
                    let nibble = |j: usize| (code(j, -8.0, 7.0) + 8.0) as u8;
                    for j in 0..half {
                        let hi = if j + half < x.len() {
                            nibble(j + half)
                        } else {
                            8
                        };
                        out.push(nibble(j) | (hi << 4));
                    }
                } else {
                    (0..x.len()).for_each(|j| out.push(code(j, -127.0, 127.0) as i8 as u8));
                }
            }
        }
    }

    /// Decodes one row of `out.len()` values from its bytes.
    #[inline]
    pub fn decode(&self, bytes: &[u8], out: &mut [f32]) {
        match self {
            Self::Plain(KvDtype::F32) => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Self::Plain(KvDtype::F16 | KvDtype::Kivi2) | Self::Kivi { .. } => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Self::Plain(KvDtype::Bf16) => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            Self::Plain(KvDtype::Q8_0) => {
                let mut at = 0;
                for o in out.chunks_mut(QBLOCK) {
                    at += decode_q8_0(&bytes[at..], o);
                }
            }
            Self::Plain(KvDtype::Q4_0) => {
                let mut at = 0;
                for o in out.chunks_mut(QBLOCK) {
                    at += decode_q4_0(&bytes[at..], o);
                }
            }
            Self::Mixed => {
                let mut at = 0;
                for (i, o) in out.chunks_mut(QBLOCK).enumerate() {
                    at += match i {
                        0 => decode_q8_0(&bytes[at..], o),
                        _ => decode_q4_0(&bytes[at..], o),
                    };
                }
            }
            Self::Channel {
                bits4: false,
                scales,
            } => {
                for ((v, &q), s) in out.iter_mut().zip(bytes).zip(scales.iter()) {
                    *v = s * (q as i8) as f32;
                }
            }
            Self::Channel {
                bits4: true,
                scales,
            } => {
                let half = out.len().div_ceil(2);
                let (lo, hi) = out.split_at_mut(half);
                for (j, (v, &q)) in lo.iter_mut().zip(bytes).enumerate() {
                    *v = scales[j] * ((q & 15) as i32 - 8) as f32;
                }
                for (j, (v, &q)) in hi.iter_mut().zip(bytes).enumerate() {
                    *v = scales[half + j] * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
    }

    /// Whether rows in this codec are blocks of 32 integer codes with one
    /// scale each (q8_0, q4_0 and mixed): what [`Self::decode_codes`] reads.
    pub fn has_block_codes(&self) -> bool {
        matches!(
            self,
            Self::Plain(KvDtype::Q8_0 | KvDtype::Q4_0) | Self::Mixed
        )
    }

    /// One row's integer codes and block scales, without multiplying them
    /// out: value `j` is `scales[j / 32] * codes[j]`, the same `f32` number
    /// [`Self::decode`] gives. For kernels that multiply the codes by integer
    /// weights (8-bit dot products) and scale once per block.
    ///
    /// # Shapes
    /// `codes`: `[n]`, the row's width; `scales`: `[ceil(n / 32)]` at least.
    /// Returns `false`, writing nothing, for codecs without block codes
    /// ([`Self::has_block_codes`]), too few bytes for `n` values or too few
    /// scales.
    pub fn decode_codes(&self, bytes: &[u8], codes: &mut [i8], scales: &mut [f32]) -> bool {
        let n = codes.len();
        if !self.has_block_codes()
            || bytes.len() < self.row_bytes(n)
            || scales.len() < n.div_ceil(QBLOCK)
        {
            return false;
        }
        let mut at = 0;
        for (i, (o, s)) in codes.chunks_mut(QBLOCK).zip(scales.iter_mut()).enumerate() {
            *s = f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
            let eight = match self {
                Self::Mixed => i == 0,
                c => *c == Self::Plain(KvDtype::Q8_0),
            };
            at += 2;
            at += if eight {
                q8_0_codes(&bytes[at..], o)
            } else {
                q4_0_codes(&bytes[at..], o)
            };
        }
        true
    }

    /// Encodes and decodes a row: the values a cache in this format holds.
    pub fn round_trip(&self, x: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::with_capacity(self.row_bytes(x.len()));
        self.encode(x, &mut bytes);
        let mut out = vec![0f32; x.len()];
        self.decode(&bytes, &mut out);
        out
    }
}

/// One q8_0 block's codes (after its scale) into `o` (`[n <= 32]`);
/// returns the bytes read. `bytes` holds the block's `n` codes. (A copy
/// through a fixed-size array built the block on the stack byte by byte;
/// this loop becomes one `memcpy`, which measured no slower.)
#[inline]
fn q8_0_codes(bytes: &[u8], o: &mut [i8]) -> usize {
    let n = o.len();
    for (c, &q) in o.iter_mut().zip(&bytes[..n]) {
        *c = q as i8;
    }
    n
}

/// One q4_0 block's codes (after its scale) into `o` (`[n <= 32]`): low
/// nibbles are the first half, high nibbles the second, less 8. Returns the
/// bytes read. A whole block goes through fixed-size arrays, so the
/// compiler unpacks it in full vectors (row reads are a tenth of a decode
/// step over 4-bit latents; the open-length loops ran four bytes at a time).
#[inline]
fn q4_0_codes(bytes: &[u8], o: &mut [i8]) -> usize {
    const HALF: usize = QBLOCK / 2;
    if let (Ok(whole), Some(packed)) = (
        <&mut [i8; QBLOCK]>::try_from(&mut *o),
        bytes.first_chunk::<HALF>(),
    ) {
        let (lo, hi) = whole.split_at_mut(HALF);
        for j in 0..HALF {
            lo[j] = (packed[j] & 15) as i8 - 8;
            hi[j] = (packed[j] >> 4) as i8 - 8;
        }
        return HALF;
    }
    let half = o.len().div_ceil(2);
    let packed = &bytes[..half];
    let (lo, hi) = o.split_at_mut(half);
    for (c, &q) in lo.iter_mut().zip(packed) {
        *c = (q & 15) as i8 - 8;
    }
    for (c, &q) in hi.iter_mut().zip(packed) {
        *c = (q >> 4) as i8 - 8;
    }
    half
}

/// Decodes one q8_0 block into `o` (`[n <= 32]`); returns the bytes read.
#[inline]
fn decode_q8_0(bytes: &[u8], o: &mut [f32]) -> usize {
    let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
    let n = o.len();
    for (v, &q) in o.iter_mut().zip(&bytes[2..2 + n]) {
        *v = d * (q as i8) as f32;
    }
    2 + n
}

/// Decodes one q4_0 block into `o` (`[n <= 32]`); returns the bytes read.
#[inline]
fn decode_q4_0(bytes: &[u8], o: &mut [f32]) -> usize {
    let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
    let half = o.len().div_ceil(2);
    let codes = &bytes[2..2 + half];
    let (lo, hi) = o.split_at_mut(half);
    for (v, &q) in lo.iter_mut().zip(codes) {
        *v = d * ((q & 15) as i32 - 8) as f32;
    }
    for (v, &q) in hi.iter_mut().zip(codes) {
        *v = d * ((q >> 4) as i32 - 8) as f32;
    }
    2 + half
}

/// llama.cpp's `quantize_row_q8_0_ref` for one block.
fn encode_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// llama.cpp's `quantize_row_q4_0_ref` for one block.
fn encode_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    let code = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    let half = x.len().div_ceil(2);
    for j in 0..half {
        let hi = x.get(j + half).map_or(8, |&v| code(v));
        out.push(code(x[j]) | (hi << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::numbers;
    #[test]
    fn q8_0_and_q4_0_follow_llama_cpps_reference_on_a_worked_block() {
        // values 0..32 scaled: q8_0 has d = 31/127, q4_0 has d = 31 / -8
        let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
        let mut b = Vec::new();
        encode_q8_0(&x, &mut b);
        assert_eq!(b.len(), 34);
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        assert_eq!(d, f16::from_f32(31.0 / 127.0).to_f32());
        assert_eq!(b[2 + 31] as i8, 127);
        assert_eq!(b[2 + 1] as i8, (127.0f32 / 31.0).round() as i8);
        let mut b = Vec::new();
        encode_q4_0(&x, &mut b);
        assert_eq!(b.len(), 18);
        // largest magnitude 31 -> d = -31/8, code of 31 = trunc(-8 + 8.5) = 0,
        // code of 0 = 8; value 0 low nibble of byte 0, value 16 high nibble
        assert_eq!(b[2] & 15, 8);
        assert_eq!(b[2 + 15] >> 4, 0);
        let mut out = vec![0f32; 32];
        RowCodec::Plain(KvDtype::Q4_0).decode(&b, &mut out);
        assert_eq!((out[0], out[31]), (0.0, 31.0));
    }

    #[test]
    fn every_format_round_trips_within_its_step() {
        for n in [64, 40, 7, 33] {
            let x = numbers(n, n as u64);
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (codec, tol) in [
                (RowCodec::Plain(KvDtype::F32), 0.0),
                (RowCodec::Plain(KvDtype::F16), amax * 1e-3),
                (RowCodec::Plain(KvDtype::Bf16), amax * 8e-3),
                (RowCodec::Plain(KvDtype::Q8_0), amax / 127.0 * 0.51),
                (RowCodec::Plain(KvDtype::Q4_0), amax / 8.0 * 1.01),
                (RowCodec::Mixed, amax / 8.0 * 1.01),
            ] {
                let mut bytes = Vec::new();
                codec.encode(&x, &mut bytes);
                assert_eq!(bytes.len(), codec.row_bytes(n), "{codec:?} {n}");
                let y = codec.round_trip(&x);
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() <= tol, "{codec:?} n={n}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn channel_scales_clip_outliers_and_keep_the_rest_within_a_step() {
        let stddev = vec![1.0f32, 0.5, 0.25, 2.0, 1.0];
        for dtype in [LatentDtype::Int8, LatentDtype::Int4] {
            let c = RowCodec::latent(dtype, LatentScales::Channel, &stddev).unwrap();
            let RowCodec::Channel { scales, .. } = &c else {
                panic!("channel codec")
            };
            let x = [0.3f32, -0.2, 0.1, 1.5, 100.0];
            let y = c.round_trip(&x);
            for j in 0..4 {
                assert!((x[j] - y[j]).abs() <= scales[j] * 0.51, "{dtype} {j}");
            }
            // the outlier is clipped to the largest code
            assert!(y[4] < 100.0 && y[4] > 0.0);
            assert_eq!(
                c.row_bytes(5),
                if dtype == LatentDtype::Int4 { 3 } else { 5 }
            );
        }
        assert!(RowCodec::latent(LatentDtype::Int4, LatentScales::Channel, &[f32::NAN]).is_err());
    }

    #[test]
    fn block_codes_times_their_scales_are_the_decoded_values() {
        // 70 values: two full blocks and a short one of 6 (odd lengths
        // split nibbles unevenly)
        let x = numbers(70, 3);
        for codec in [
            RowCodec::Plain(KvDtype::Q8_0),
            RowCodec::Plain(KvDtype::Q4_0),
            RowCodec::Mixed,
        ] {
            for n in [70, 37, 5] {
                let mut bytes = Vec::new();
                codec.encode(&x[..n], &mut bytes);
                let mut want = vec![0f32; n];
                codec.decode(&bytes, &mut want);
                let (mut codes, mut scales) = (vec![0i8; n], vec![0f32; n.div_ceil(QBLOCK)]);
                assert!(codec.decode_codes(&bytes, &mut codes, &mut scales));
                for (j, w) in want.iter().enumerate() {
                    let got = scales[j / QBLOCK] * codes[j] as f32;
                    assert_eq!(got, *w, "{codec:?} n {n} value {j}");
                }
            }
        }
        let mut bytes = Vec::new();
        RowCodec::Plain(KvDtype::F16).encode(&x[..8], &mut bytes);
        let (mut codes, mut scales) = ([0i8; 8], [0f32; 1]);
        assert!(!RowCodec::Plain(KvDtype::F16).decode_codes(&bytes, &mut codes, &mut scales));
        // too few scales or bytes for the values asked: refused, not cut short
        let q8 = RowCodec::Plain(KvDtype::Q8_0);
        let mut bytes = Vec::new();
        q8.encode(&x[..40], &mut bytes);
        let (mut codes, mut one) = (vec![0i8; 40], [0f32; 1]);
        assert!(!q8.decode_codes(&bytes, &mut codes, &mut one));
        assert!(!q8.decode_codes(&bytes[..30], &mut codes, &mut [0f32; 2]));
        assert!(q8.decode_codes(&bytes, &mut codes, &mut [0f32; 2]));
        assert!(!RowCodec::Plain(KvDtype::F16).has_block_codes());
    }

    #[test]
    fn mixed_rows_keep_the_leading_block_at_8_bits() {
        let x = numbers(64, 12);
        let c = RowCodec::latent(LatentDtype::Mixed, LatentScales::Token, &[]).unwrap();
        assert_eq!(c.row_bytes(64), 34 + 18);
        assert_eq!(c.row_bytes(20), 22, "a short row is one q8_0 block");
        let y = c.round_trip(&x);
        let q8 = RowCodec::Plain(KvDtype::Q8_0).round_trip(&x[..32]);
        let q4 = RowCodec::Plain(KvDtype::Q4_0).round_trip(&x[32..]);
        assert_eq!(&y[..32], &q8[..]);
        assert_eq!(&y[32..], &q4[..]);
        assert!(RowCodec::latent(LatentDtype::Mixed, LatentScales::Channel, &[1.0]).is_err());
    }
}
