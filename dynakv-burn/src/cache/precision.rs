//! How many bits a cache spends per stored number: the dense cache's key
//! and value dtypes and DynaKV's latent format.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{Tensor, TensorData};
use dynakv_core::quant::{KvDtype, LatentDtype, LatentScales, RowCodec};
use serde::{Deserialize, Serialize};

use super::host_rows;
use crate::error::CacheError;

/// Storage precisions of a cache; the default stores everything in f32 (the
/// exact reference). Written `k=q8_0,v=q4_0` (or `kv=q8_0` for both) for the
/// dense cache and `latent=int4[,scales=channel]` for DynaKV.
///
/// ```
/// use dynakv_burn::cache::Precision;
/// use dynakv_core::quant::KvDtype;
///
/// let p: Precision = "kv=q8_0".parse().unwrap();
/// assert_eq!((p.k, p.v), (KvDtype::Q8_0, KvDtype::Q8_0));
/// assert_eq!(p.to_string(), "kv=q8_0");
/// assert!("latent=int3".parse::<Precision>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Precision {
    /// The dense cache's keys (RoPE applied).
    pub k: KvDtype,
    /// The dense cache's values.
    pub v: KvDtype,
    /// DynaKV's latent coordinates (keys and values).
    pub latent: LatentDtype,
    /// Where integer latents' scales come from.
    pub scales: LatentScales,
}

impl Precision {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether anything of DynaKV's is set (then the cache must be DynaKV).
    pub fn sets_latents(&self) -> bool {
        self.latent != LatentDtype::F32 || self.scales != LatentScales::Token
    }

    /// Whether anything of the dense cache's is set.
    pub fn sets_dense(&self) -> bool {
        self.k != KvDtype::F32 || self.v != KvDtype::F32
    }

    /// Checks the parts against each other.
    pub fn validate(&self) -> Result<(), CacheError> {
        if self.scales == LatentScales::Channel
            && matches!(self.latent, LatentDtype::F32 | LatentDtype::F16)
        {
            return Err(CacheError::Config(format!(
                "scales=channel needs integer latents (latent=int8 or int4), not {}",
                self.latent
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.k == self.v && self.k != KvDtype::F32 {
            parts.push(format!("kv={}", self.k));
        } else {
            if self.k != KvDtype::F32 {
                parts.push(format!("k={}", self.k));
            }
            if self.v != KvDtype::F32 {
                parts.push(format!("v={}", self.v));
            }
        }
        if self.latent != LatentDtype::F32 {
            parts.push(format!("latent={}", self.latent));
        }
        if self.scales != LatentScales::Token {
            parts.push(format!("scales={}", self.scales));
        }
        if parts.is_empty() {
            parts.push("kv=f32".into());
        }
        f.write_str(&parts.join(","))
    }
}

impl FromStr for Precision {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, CacheError> {
        let mut p = Self::default();
        for item in s.split(',').map(str::trim) {
            let Some((key, value)) = item.split_once('=') else {
                return Err(CacheError::Config(format!(
                    "`{item}` in `{s}`: expected KEY=VALUE (k, v, kv, latent, scales)"
                )));
            };
            match key {
                "k" => p.k = value.parse()?,
                "v" => p.v = value.parse()?,
                "kv" => {
                    p.k = value.parse()?;
                    p.v = p.k;
                }
                "latent" => p.latent = value.parse()?,
                "scales" => p.scales = value.parse()?,
                o => {
                    return Err(CacheError::Config(format!(
                        "`{o}` in `{s}`: expected k, v, kv, latent or scales"
                    )))
                }
            }
        }
        p.validate()?;
        Ok(p)
    }
}

/// The values a cache in `codec` holds for `x`, on `x`'s device: each row
/// along the last axis encoded and decoded (through the host). For device
/// storage, where burn has no packed type for the format: the device then
/// holds these values in f32, and the footprint says so
/// (`held_value_bytes`).
///
/// # Shapes
/// - `x`: `[.., n]`; returns the same shape
pub(crate) fn round_trip<const N: usize>(
    x: Tensor<N>,
    codec: &RowCodec,
) -> Result<Tensor<N>, CacheError> {
    if codec.is_f32() {
        return Ok(x);
    }
    let shape = x.shape();
    let n = x.dims()[N - 1];
    let device = x.device();
    let rows = host_rows(&x)?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.chunks_exact(n.max(1)) {
        out.extend(codec.round_trip(row));
    }
    Ok(Tensor::from_data(TensorData::new(out, shape), &device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_rejects() {
        for good in ["kv=q8_0", "k=q8_0,v=q4_0", "latent=int4", "latent=int8,scales=channel"] {
            let p: Precision = good.parse().unwrap();
            assert_eq!(p.to_string(), good);
        }
        assert!("kv=f32".parse::<Precision>().unwrap().is_default());
        for bad in ["", "kv", "kv=q3", "latent=f16,scales=channel", "dtype=f16"] {
            assert!(bad.parse::<Precision>().is_err(), "{bad}");
        }
    }
}
