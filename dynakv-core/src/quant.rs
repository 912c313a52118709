//! Storage precisions of cached numbers, as bytes: the dense cache's key and
//! value rows (`f32`, `f16`, `bf16`, and llama.cpp's `q8_0` / `q4_0` blocks)
//! and DynaKV's latent rows (`f32`, `f16`, `int8`, `int4`, with scales per
//! token and group or per coordinate).
//!
//! Why here: what a cache costs is decided by these formats, and the row
//! codec is plain arithmetic that every backend and the accounting share.
//! Rows are packed one after another in a [`PackedRows`]; a kernel decodes
//! one row at a time into a small buffer (L1), never the whole cache.
//!
//! Block layouts follow llama.cpp (`ggml-quants.c`), so our q8_0 / q4_0
//! caches hold exactly what llama.cpp's `--cache-type-k/-v q8_0|q4_0` hold:
//! - `q8_0`: per 32 values an f16 scale `d = amax / 127` and 32 `i8` codes
//!   `round(x / d)`; 34 bytes.
//! - `q4_0`: per 32 values an f16 scale `d = m / -8` (`m` the value of
//!   largest magnitude, with its sign) and 16 bytes of 4-bit codes
//!   `min(15, trunc(x / d + 8.5))`, value `j` in the low nibble of byte `j`
//!   and value `j + 16` in the high one; 18 bytes.
//!
//! A row whose length is not a multiple of 32 (a latent of rank 40) ends in a
//! short block of `n` values: `2 + n` bytes (q8_0) or `2 + ceil(n / 2)` (q4_0,
//! value `j` low and `j + ceil(n/2)` high).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Values per quantisation block (llama.cpp's `QK8_0`, `QK4_0`).
pub const QBLOCK: usize = 32;

/// How a dense cache stores keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum KvDtype {
    /// 4 bytes per value (the reference).
    #[default]
    #[serde(rename = "f32")]
    #[cfg_attr(feature = "clap", value(name = "f32"))]
    F32,
    /// 2 bytes per value: llama.cpp's and vLLM's default cache.
    #[serde(rename = "f16")]
    #[cfg_attr(feature = "clap", value(name = "f16"))]
    F16,
    /// 2 bytes per value, f32's exponent range.
    #[serde(rename = "bf16")]
    #[cfg_attr(feature = "clap", value(name = "bf16"))]
    Bf16,
    /// 8.5 bits per value: llama.cpp's `q8_0` blocks.
    #[serde(rename = "q8_0")]
    #[cfg_attr(feature = "clap", value(name = "q8_0"))]
    Q8_0,
    /// 4.5 bits per value: llama.cpp's `q4_0` blocks.
    #[serde(rename = "q4_0")]
    #[cfg_attr(feature = "clap", value(name = "q4_0"))]
    Q4_0,
    /// 3 bits per value, KIVI-style (Liu et al., 2024): 2-bit asymmetric
    /// codes with an f16 scale and minimum per group of 32; keys grouped per
    /// channel over 32 tokens, values per token over 32 channels; the newest
    /// tokens (up to 31, a block not yet full) stay in f16. Host storage only.
    #[serde(rename = "kivi2")]
    #[cfg_attr(feature = "clap", value(name = "kivi2"))]
    Kivi2,
}

impl KvDtype {
    pub const ALL: [KvDtype; 6] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Kivi2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Kivi2 => "kivi2",
        }
    }

    /// Bytes of one row of `n` values, block scales included (kivi2: a row
    /// of a full 32-token block, 12 bytes per 32 values; the f16 rows of the
    /// open block cost more, and [`PackedRows::bytes`] counts them).
    pub fn row_bytes(self, n: usize) -> usize {
        let blocks = |per: fn(usize) -> usize| {
            let full = n / QBLOCK;
            let tail = n % QBLOCK;
            full * (2 + per(QBLOCK)) + if tail > 0 { 2 + per(tail) } else { 0 }
        };
        match self {
            Self::F32 => 4 * n,
            Self::F16 | Self::Bf16 => 2 * n,
            Self::Q8_0 => blocks(|m| m),
            Self::Q4_0 => blocks(|m| m.div_ceil(2)),
            Self::Kivi2 => (12 * n).div_ceil(QBLOCK),
        }
    }

    /// Whether rows are quantised in blocks of 32 tokens (KIVI), which only
    /// host storage holds.
    pub fn is_token_blocked(self) -> bool {
        self == Self::Kivi2
    }

    /// Whether a stored row decodes to exactly what was stored.
    pub fn is_lossless(self) -> bool {
        self == Self::F32
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| CoreError::Invalid {
                field: "kv dtype",
                message: format!("`{s}` (expected f32, f16, bf16, q8_0, q4_0 or kivi2)"),
            })
    }
}

/// How DynaKV stores its latent coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LatentDtype {
    #[default]
    F32,
    F16,
    /// 8-bit codes (with [`LatentScales::Token`]: q8_0 blocks).
    Int8,
    /// 4-bit codes (with [`LatentScales::Token`]: q4_0 blocks).
    Int4,
    /// Mixed precision along the coordinates (as SVDq does): the first 32,
    /// the leading high-variance ones, in q8_0 blocks, the tail in q4_0.
    Mixed,
}

impl LatentDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Mixed => "mixed",
        }
    }

    /// Largest code magnitude of the integer formats.
    fn qmax(self) -> Option<f32> {
        match self {
            Self::Int8 => Some(127.0),
            Self::Int4 => Some(7.0),
            _ => None,
        }
    }
}

impl fmt::Display for LatentDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LatentDtype {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        [Self::F32, Self::F16, Self::Int8, Self::Int4, Self::Mixed]
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| CoreError::Invalid {
                field: "latent dtype",
                message: format!("`{s}` (expected f32, f16, int8, int4 or mixed)"),
            })
    }
}

/// Where the scales of integer latents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LatentScales {
    /// Per token and group of 32 coordinates, an f16 scale stored with the
    /// codes (q8_0 / q4_0 blocks): adapts to every token, 2 bytes a group.
    #[default]
    Token,
    /// Per coordinate, fixed at calibration (`clip * sqrt(eigenvalue)`, the
    /// coordinate's standard deviation): nothing stored per token, as KIVI
    /// does for keys; an outlier token is clipped.
    Channel,
}

impl LatentScales {
    pub fn name(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Channel => "channel",
        }
    }
}

impl fmt::Display for LatentScales {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LatentScales {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "token" => Ok(Self::Token),
            "channel" => Ok(Self::Channel),
            o => Err(CoreError::Invalid {
                field: "latent scales",
                message: format!("`{o}` (expected token or channel)"),
            }),
        }
    }
}

/// Clip of per-coordinate scales, in standard deviations: near the
/// mean-square-optimal clip of a Gaussian at 4 bits (2.55 σ, Banner et al.,
/// ACIQ), wider at 8 bits where rounding error is small and clipping is not.
pub fn channel_clip(dtype: LatentDtype) -> f32 {
    match dtype {
        LatentDtype::Int4 => 2.6,
        _ => 6.0,
    }
}

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

    /// Encodes and decodes a row: the values a cache in this format holds.
    pub fn round_trip(&self, x: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::with_capacity(self.row_bytes(x.len()));
        self.encode(x, &mut bytes);
        let mut out = vec![0f32; x.len()];
        self.decode(&bytes, &mut out);
        out
    }
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

/// Orthonormal Walsh-Hadamard transform of every row of length `n`, in
/// place: `x <- x H / sqrt(n)` (Sylvester order). Its own inverse, and it
/// keeps dot products, so keys and queries rotated alike score the same.
///
/// Why: a rotation spreads a few outlier channels over all of them, so the
/// 4-bit blocks of a q4_0 cache lose far less; llama.cpp rotates Q, K and V
/// this way whenever its KV cache is quantised (its `attn_rot`, 2026-04).
///
/// # Shapes
/// - `x`: `[rows, n]` row-major, `n` a power of two (otherwise untouched)
pub fn hadamard_rows(x: &mut [f32], n: usize) {
    if !n.is_power_of_two() || n < 2 {
        return;
    }
    let norm = 1.0 / (n as f32).sqrt();
    for row in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for block in row.chunks_exact_mut(2 * h) {
                let (a, b) = block.split_at_mut(h);
                for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                    let (s, d) = (*u + *v, *u - *v);
                    *u = s;
                    *v = d;
                }
            }
            h *= 2;
        }
        row.iter_mut().for_each(|v| *v *= norm);
    }
}

/// Rows of `dim` values packed one after another in one format; `f32` rows
/// stay `f32` so the lossless path reads them without decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedRows {
    codec: RowCodec,
    dim: usize,
    rows: usize,
    data: RowData,
}

#[derive(Debug, Clone, PartialEq)]
enum RowData {
    F32(Vec<f32>),
    /// f16 rows as `f16` values, so a row converts with one SIMD call (F16C
    /// where the CPU has it) instead of value by value.
    F16(Vec<f16>),
    Bytes {
        bytes: Vec<u8>,
        row_bytes: usize,
    },
    /// KIVI: full blocks of [`QBLOCK`] rows, then the open block's rows as
    /// f16 bytes.
    Blocks {
        full: Vec<u8>,
        open: Vec<u8>,
        per_channel: bool,
    },
}

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
fn kivi_block_bytes(dim: usize, per_channel: bool) -> usize {
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
fn encode_kivi_block(rows: &[f32], dim: usize, per_channel: bool, out: &mut Vec<u8>) {
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
fn decode_kivi_row(block: &[u8], j: usize, per_channel: bool, out: &mut [f32]) {
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

impl PackedRows {
    pub fn new(codec: RowCodec, dim: usize) -> Self {
        let data = match &codec {
            c if c.is_f32() => RowData::F32(Vec::new()),
            RowCodec::Plain(KvDtype::F16) => RowData::F16(Vec::new()),
            RowCodec::Kivi { per_channel } => RowData::Blocks {
                full: Vec::new(),
                open: Vec::new(),
                per_channel: *per_channel,
            },
            c => RowData::Bytes {
                bytes: Vec::new(),
                row_bytes: c.row_bytes(dim),
            },
        };
        Self {
            codec,
            dim,
            rows: 0,
            data,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn codec(&self) -> &RowCodec {
        &self.codec
    }

    /// Appends rows.
    ///
    /// # Shapes
    /// - `x`: `[n, dim]` row-major (a partial row is ignored)
    pub fn push(&mut self, x: &[f32]) {
        if self.dim == 0 {
            return;
        }
        let n = x.len() / self.dim;
        match &mut self.data {
            RowData::F32(v) => v.extend_from_slice(&x[..n * self.dim]),
            RowData::F16(v) => {
                let at = v.len();
                v.resize(at + n * self.dim, f16::ZERO);
                v[at..].convert_from_f32_slice(&x[..n * self.dim]);
            }
            RowData::Bytes { bytes, .. } => {
                for row in x.chunks_exact(self.dim) {
                    self.codec.encode(row, bytes);
                }
            }
            RowData::Blocks {
                full,
                open,
                per_channel,
            } => {
                let d = self.dim;
                for row in x[..n * d].chunks_exact(d) {
                    row.iter()
                        .for_each(|v| open.extend(f16::from_f32(*v).to_le_bytes()));
                    if open.len() == 2 * QBLOCK * d {
                        let rows: Vec<f32> = open
                            .chunks_exact(2)
                            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                            .collect();
                        encode_kivi_block(&rows, d, *per_channel, full);
                        open.clear();
                    }
                }
            }
        }
        self.rows += n;
    }

    /// Appends the rows of `other`, which has the same codec and width.
    pub fn append(&mut self, other: &PackedRows) {
        debug_assert!(self.codec == other.codec && self.dim == other.dim);
        match (&mut self.data, &other.data) {
            (RowData::F32(a), RowData::F32(b)) => a.extend_from_slice(b),
            (RowData::F16(a), RowData::F16(b)) => a.extend_from_slice(b),
            (RowData::Bytes { bytes: a, .. }, RowData::Bytes { bytes: b, .. }) => {
                a.extend_from_slice(b)
            }
            // blocks of 32 rows do not concatenate: re-encode
            _ => return self.push(&other.to_f32()),
        }
        self.rows += other.rows;
    }

    /// Row `i`: borrowed for `f32` storage, else decoded into `buf`
    /// (`[dim]` at least).
    #[inline]
    pub fn row<'a>(&'a self, i: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let d = self.dim;
        match &self.data {
            RowData::F32(v) => &v[i * d..(i + 1) * d],
            RowData::F16(v) => {
                let out = &mut buf[..d];
                v[i * d..(i + 1) * d].convert_to_f32_slice(out);
                out
            }
            RowData::Bytes { bytes, row_bytes } => {
                let out = &mut buf[..d];
                self.codec
                    .decode(&bytes[i * row_bytes..(i + 1) * row_bytes], out);
                out
            }
            RowData::Blocks {
                full,
                open,
                per_channel,
            } => {
                let out = &mut buf[..d];
                let bb = kivi_block_bytes(d, *per_channel);
                let closed = full.len() / bb.max(1) * QBLOCK;
                if i < closed {
                    let b = i / QBLOCK;
                    decode_kivi_row(&full[b * bb..(b + 1) * bb], i % QBLOCK, *per_channel, out);
                } else {
                    let at = (i - closed) * 2 * d;
                    for (o, b) in out.iter_mut().zip(open[at..at + 2 * d].chunks_exact(2)) {
                        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
                out
            }
        }
    }

    /// The `f32` rows themselves, when stored as `f32`.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            RowData::F32(v) => Some(v),
            RowData::F16(_) | RowData::Bytes { .. } | RowData::Blocks { .. } => None,
        }
    }

    /// Every row decoded.
    ///
    /// # Shapes
    /// returns `[len, dim]` row-major
    pub fn to_f32(&self) -> Vec<f32> {
        if let RowData::F32(v) = &self.data {
            return v.clone();
        }
        let mut out = vec![0f32; self.rows * self.dim];
        let mut buf = vec![0f32; self.dim];
        for (i, o) in out.chunks_exact_mut(self.dim.max(1)).enumerate() {
            o.copy_from_slice(self.row(i, &mut buf));
        }
        out
    }

    /// The rows `rows`, in that order, without re-encoding (KIVI blocks,
    /// grouped over 32 rows, are decoded and encoded again).
    pub fn gather(&self, rows: &[usize]) -> Self {
        let data = match &self.data {
            RowData::F32(v) => RowData::F32(
                rows.iter()
                    .flat_map(|&i| &v[i * self.dim..(i + 1) * self.dim])
                    .copied()
                    .collect(),
            ),
            RowData::F16(v) => RowData::F16(
                rows.iter()
                    .flat_map(|&i| &v[i * self.dim..(i + 1) * self.dim])
                    .copied()
                    .collect(),
            ),
            RowData::Bytes { bytes, row_bytes } => RowData::Bytes {
                bytes: rows
                    .iter()
                    .flat_map(|&i| &bytes[i * row_bytes..(i + 1) * row_bytes])
                    .copied()
                    .collect(),
                row_bytes: *row_bytes,
            },
            RowData::Blocks { .. } => {
                let mut buf = vec![0f32; self.dim];
                let kept: Vec<f32> = rows
                    .iter()
                    .flat_map(|&i| self.row(i, &mut buf).to_vec())
                    .collect();
                let mut out = Self::new(self.codec.clone(), self.dim);
                out.push(&kept);
                return out;
            }
        };
        Self {
            codec: self.codec.clone(),
            dim: self.dim,
            rows: rows.len(),
            data,
        }
    }

    /// Bytes the rows take in their format (scales included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            RowData::Blocks { full, open, .. } => full.len() + open.len(),
            _ => self.rows * self.codec.row_bytes(self.dim),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn block_sizes_are_llama_cpps() {
        assert_eq!(KvDtype::Q8_0.row_bytes(64), 68);
        assert_eq!(KvDtype::Q4_0.row_bytes(64), 36);
        assert_eq!(KvDtype::F16.row_bytes(64), 128);
        assert_eq!(KvDtype::F32.row_bytes(64), 256);
        // a short last block
        assert_eq!(KvDtype::Q8_0.row_bytes(40), 34 + 10);
        assert_eq!(KvDtype::Q4_0.row_bytes(41), 18 + 2 + 5);
    }

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
    fn packed_rows_gather_and_decode_what_was_pushed() {
        let (dim, n) = (40, 6);
        let x = numbers(dim * n, 9);
        for dtype in KvDtype::ALL {
            let codec = RowCodec::kv(dtype, true);
            let mut rows = PackedRows::new(codec.clone(), dim);
            rows.push(&x[..dim * 2]);
            rows.push(&x[dim * 2..]);
            assert_eq!(rows.len(), n);
            if !dtype.is_token_blocked() {
                assert_eq!(rows.bytes(), n * dtype.row_bytes(dim));
            }
            let all = rows.to_f32();
            let mut buf = vec![0f32; dim];
            for i in 0..n {
                let want = codec.round_trip(&x[i * dim..(i + 1) * dim]);
                assert_eq!(rows.row(i, &mut buf), &want[..]);
                assert_eq!(&all[i * dim..(i + 1) * dim], &want[..]);
            }
            let g = rows.gather(&[4, 1]);
            assert_eq!(g.len(), 2);
            assert_eq!(
                g.row(0, &mut buf).to_vec(),
                rows.row(4, &mut vec![0.0; dim])
            );
            if dtype.is_lossless() {
                assert_eq!(all, x);
            }
        }
    }

    #[test]
    fn the_hadamard_transform_is_orthonormal_and_its_own_inverse() {
        let n = 64;
        let x = numbers(3 * n, 4);
        let mut y = x.clone();
        hadamard_rows(&mut y, n);
        for r in 0..3 {
            let (a, b) = (&x[r * n..(r + 1) * n], &y[r * n..(r + 1) * n]);
            let na: f32 = a.iter().map(|v| v * v).sum();
            let nb: f32 = b.iter().map(|v| v * v).sum();
            assert!((na - nb).abs() < 1e-3 * na, "norm kept");
        }
        // dot products kept
        let (a, b) = (&x[..n], &x[n..2 * n]);
        let (ra, rb) = (&y[..n], &y[n..2 * n]);
        let d = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f32>();
        assert!((d(a, b) - d(ra, rb)).abs() < 1e-4);
        // one spike spreads evenly: the outlier a q4_0 block would suffer
        let mut spike = vec![0f32; n];
        spike[5] = 8.0;
        hadamard_rows(&mut spike, n);
        assert!(spike.iter().all(|v| (v.abs() - 1.0).abs() < 1e-6));
        hadamard_rows(&mut y, n);
        for (u, v) in x.iter().zip(&y) {
            assert!((u - v).abs() < 1e-5);
        }
        // not a power of two: untouched
        let mut odd = x[..48].to_vec();
        hadamard_rows(&mut odd, 48);
        assert_eq!(odd, &x[..48]);
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

    #[test]
    fn kivi_blocks_hold_3_bits_a_value_and_round_to_their_groups() {
        let (dim, n) = (40, 70); // two full blocks and 6 open rows; a short group
        let x = numbers(dim * n, 3);
        for per_channel in [true, false] {
            let mut rows = PackedRows::new(RowCodec::Kivi { per_channel }, dim);
            rows.push(&x[..dim * 33]);
            rows.push(&x[dim * 33..]);
            assert_eq!(rows.len(), n);
            let block = kivi_block_bytes(dim, per_channel);
            assert_eq!(rows.bytes(), 2 * block + 6 * 2 * dim);
            if per_channel {
                assert_eq!(block, 12 * dim, "3 bits a value");
            }
            let mut buf = vec![0f32; dim];
            for i in 0..n {
                let got = rows.row(i, &mut buf).to_vec();
                let want = &x[i * dim..(i + 1) * dim];
                for (c, (a, b)) in got.iter().zip(want).enumerate() {
                    // the group's range over 3 steps, halved, plus f16 rounding
                    let group: Vec<f32> = if i >= 64 {
                        vec![*b]
                    } else if per_channel {
                        (0..32).map(|t| x[((i / 32) * 32 + t) * dim + c]).collect()
                    } else {
                        let g0 = c / 32 * 32;
                        want[g0..(g0 + 32).min(dim)].to_vec()
                    };
                    let (lo, hi) = group
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                            (l.min(v), h.max(v))
                        });
                    let tol = (hi - lo) / 6.0 * 1.02 + 4e-3 * b.abs().max(1.0);
                    assert!(
                        (a - b).abs() <= tol,
                        "{per_channel} row {i} col {c}: {a} vs {b}"
                    );
                }
            }
            // pruning re-encodes the kept rows
            let kept = rows.gather(&[0, 5, 40, 69]);
            assert_eq!(kept.len(), 4);
            assert_eq!(kept.bytes(), 4 * 2 * dim, "an open block again");
            assert_eq!(
                kept.row(3, &mut buf).to_vec(),
                rows.row(69, &mut vec![0.0; dim])
            );
        }
    }

    #[test]
    fn names_parse_back() {
        for d in KvDtype::ALL {
            assert_eq!(d.to_string().parse::<KvDtype>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{d}\""));
        }
        assert!("q5_0".parse::<KvDtype>().is_err());
        assert_eq!("int4".parse::<LatentDtype>().unwrap(), LatentDtype::Int4);
        assert_eq!(
            "channel".parse::<LatentScales>().unwrap(),
            LatentScales::Channel
        );
    }
}
