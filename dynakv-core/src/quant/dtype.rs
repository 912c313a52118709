//! The storage formats a user names: the dense cache's dtypes and DynaKV's
//! latent formats and scales.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::QBLOCK;
use crate::error::CoreError;

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
    pub(super) fn qmax(self) -> Option<f32> {
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

/// How DynaKV holds its bases (encoders and decoders, per layer and K/V):
/// fixed bytes that do not grow with the sequence, but at 1k tokens the f32
/// bases of a 30-layer model outweigh a 4%-of-f16 cache several times over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BasisDtype {
    /// 4 bytes per number, as calibrated.
    #[default]
    F32,
    /// 2 bytes per number: the bases rounded to f16 (means stay f32), widened
    /// a layer at a time where a kernel reads them.
    F16,
}

impl BasisDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    /// Bytes per held number.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    /// `x` as this dtype holds it (f16: rounded to nearest).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

impl fmt::Display for BasisDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BasisDtype {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            o => Err(CoreError::Invalid {
                field: "basis dtype",
                message: format!("`{o}` (expected f32 or f16)"),
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

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!("f16".parse::<BasisDtype>().unwrap(), BasisDtype::F16);
        assert!("bf16".parse::<BasisDtype>().is_err());
        assert_eq!(BasisDtype::F16.round(1.0 + 1e-4), 1.0);
        assert_eq!(BasisDtype::F32.round(1.0 + 1e-4), 1.0 + 1e-4);
    }
}
