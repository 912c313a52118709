//! How many bits a cache spends per stored number: the dense cache's key
//! and value dtypes and DynaKV's latent format.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{FloatDType, Tensor, TensorData};
use dynakv_core::quant::{hadamard_rows, BasisDtype, KvDtype, LatentDtype, LatentScales, RowCodec};
use serde::{Deserialize, Serialize};

use super::host_rows;
use crate::error::CacheError;

/// Storage precisions of a cache; the default stores the dense cache's keys
/// and values in f16 (llama.cpp's and vLLM's default), DynaKV's latents as
/// 8-bit codes in q8_0 blocks and its bases in f16: the best measured (f16
/// rows give f32 rows' PPL at half their bytes and decode faster; int8
/// latents give f32 latents' PPL at a quarter of their bytes and decode
/// faster; f16 bases halve the fixed bytes at the same PPL;
/// docs/results.md). `kv=f32` is the exact reference.
/// Written `k=q8_0,v=q4_0` (or `kv=q8_0` for both) for the dense cache and
/// `latent=f32|f16|int4|mixed[,scales=channel][,basis=f32]` for DynaKV.
///
/// Quantised dense keys and values (q8_0, q4_0) are rotated by a Hadamard
/// transform along the head dimension before they are stored, queries and
/// outputs likewise, as llama.cpp does by default since 2026-04 (its
/// `attn_rot`; `LLAMA_ATTN_ROT_DISABLE=1` turns it off there, `rotate=off`
/// here). Attention is unchanged in exact arithmetic; outliers no longer
/// dominate a block's scale.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Hadamard-rotate quantised dense keys and values (llama.cpp's default).
    pub rotate: bool,
    /// How DynaKV's bases (fixed bytes) are held: f16 by default, `basis=f32`
    /// for the bases exactly as calibrated.
    pub basis: BasisDtype,
}

/// DynaKV's latents unless a spec says otherwise.
pub const DEFAULT_LATENT: LatentDtype = LatentDtype::Int8;

/// The dense cache's keys and values unless a spec says otherwise.
pub const DEFAULT_KV: KvDtype = KvDtype::F16;

impl Default for Precision {
    fn default() -> Self {
        Self {
            // same PPL as f32 rows, half the bytes, a faster decode step
            // (docs/results.md, session 21)
            k: DEFAULT_KV,
            v: DEFAULT_KV,
            // same PPL as f32 latents, a quarter of the bytes, integer
            // decode kernels (docs/results.md, session 20)
            latent: DEFAULT_LATENT,
            scales: LatentScales::Token,
            rotate: true,
            // measured equal in PPL at half the fixed bytes (docs/results.md)
            basis: BasisDtype::F16,
        }
    }
}

impl Precision {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The default with the dense cache's rows in f32: what the dense cache
    /// stores when built directly ([`crate::cache::DenseCache::new`]), the
    /// exact reference equivalence tests compare with.
    pub fn f32_rows() -> Self {
        Self {
            k: KvDtype::F32,
            v: KvDtype::F32,
            ..Self::default()
        }
    }

    /// Whether a DynaKV cache (`dynakv`) or a dense one stores what it keeps
    /// in f32: its latents, or its keys and values (f16 bases round the
    /// bases, not what is stored).
    pub fn stores_f32(&self, dynakv: bool) -> bool {
        match dynakv {
            true => self.latent == LatentDtype::F32,
            false => self.k == KvDtype::F32 && self.v == KvDtype::F32,
        }
    }

    /// Whether anything of DynaKV's is set (then the cache must be DynaKV).
    fn sets_latents(&self) -> bool {
        self.latent != DEFAULT_LATENT
            || self.scales != LatentScales::Token
            || self.basis != BasisDtype::F16
    }

    /// Whether anything of the dense cache's is set.
    pub(crate) fn sets_dense(&self) -> bool {
        self.k != DEFAULT_KV || self.v != DEFAULT_KV
    }

    /// The latent fields alone (k / v rows back to the default): what a DynaKV
    /// cache of a spec whose k= / v= name its model's windowed dense
    /// layers is built with.
    pub(crate) fn latents_only(&self) -> Self {
        Self {
            k: DEFAULT_KV,
            v: DEFAULT_KV,
            ..*self
        }
    }

    /// [`Precision::validate`], and that only the cache kind's own fields
    /// are set: latents for DynaKV (`dynakv`), k / v rows for the dense
    /// cache. One check for specs and for caches built directly.
    pub fn check_for(&self, dynakv: bool) -> Result<(), CacheError> {
        self.validate()?;
        if !dynakv && self.sets_latents() {
            return Err(CacheError::Config(format!(
                "`{self}`: latent formats (latent=, scales=, basis=) are DynaKV's; \
                 the dense cache takes k=, v= or kv="
            )));
        }
        if dynakv && self.sets_dense() {
            return Err(CacheError::Config(format!(
                "`{self}`: DynaKV stores latents (latent=, scales=), not k / v rows"
            )));
        }
        Ok(())
    }

    /// Whether keys and values are stored Hadamard-rotated: quantised, and
    /// rotation on.
    pub fn rotates(&self) -> [bool; 2] {
        let q = |d: KvDtype| self.rotate && matches!(d, KvDtype::Q8_0 | KvDtype::Q4_0);
        [q(self.k), q(self.v)]
    }

    /// Checks the parts against each other.
    pub fn validate(&self) -> Result<(), CacheError> {
        if self.scales == LatentScales::Channel
            && !matches!(self.latent, LatentDtype::Int8 | LatentDtype::Int4)
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
        if self.k == self.v && self.k != DEFAULT_KV {
            parts.push(format!("kv={}", self.k));
        } else {
            if self.k != DEFAULT_KV {
                parts.push(format!("k={}", self.k));
            }
            if self.v != DEFAULT_KV {
                parts.push(format!("v={}", self.v));
            }
        }
        if self.latent != DEFAULT_LATENT {
            parts.push(format!("latent={}", self.latent));
        }
        if self.scales != LatentScales::Token {
            parts.push(format!("scales={}", self.scales));
        }
        if !self.rotate {
            parts.push("rotate=off".into());
        }
        if self.basis != BasisDtype::F16 {
            parts.push(format!("basis={}", self.basis));
        }
        if parts.is_empty() {
            parts.push(format!("kv={DEFAULT_KV}"));
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
                    "`{item}` in `{s}`: expected KEY=VALUE (k, v, kv, latent, scales, basis, rotate)"
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
                "basis" => p.basis = value.parse()?,
                "rotate" => {
                    p.rotate = match value {
                        "on" => true,
                        "off" => false,
                        o => {
                            return Err(CacheError::Config(format!(
                                "rotate=`{o}` in `{s}`: expected on or off"
                            )))
                        }
                    }
                }
                o => {
                    return Err(CacheError::Config(format!(
                        "`{o}` in `{s}`: expected k, v, kv, latent, scales, basis or rotate"
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
///
/// With `rotate`, rows are Hadamard-rotated before and after, so the values
/// are those a rotated cache attends with once queries and outputs are
/// rotated too (the rotations cancel).
pub(crate) fn round_trip<const N: usize>(
    x: Tensor<N>,
    codec: &RowCodec,
    rotate: bool,
) -> Result<Tensor<N>, CacheError> {
    if codec.is_f32() {
        return Ok(x);
    }
    // f16 rows (the dense default): rounded where the tensor lives, a cast
    // there and back (round to nearest even, as the codec), without a trip
    // through host memory on every append. Not bf16: wgpu on Mesa's
    // llvmpipe casts "bf16" as f16 (the test below caught it).
    if *codec == RowCodec::Plain(KvDtype::F16) {
        return Ok(x.cast(FloatDType::F16).cast(FloatDType::F32));
    }
    let shape = x.shape();
    let n = x.dims()[N - 1];
    let device = x.device();
    let mut rows = host_rows(&x)?;
    if rotate {
        hadamard_rows(&mut rows, n);
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.chunks_exact(n.max(1)) {
        out.extend(codec.round_trip(row));
    }
    if rotate {
        hadamard_rows(&mut out, n);
    }
    Ok(Tensor::from_data(TensorData::new(out, shape), &device))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device storage's rounding (f16: a cast on the tensor's device; bf16:
    /// through the host) gives the codec's values bit for bit (round to
    /// nearest even, ties included), subnormals within the smallest normal
    /// (a GPU may flush them).
    #[test]
    fn device_rounding_of_f16_and_bf16_rows_equals_the_codec() {
        let device = crate::device::default_device();
        // ties between f16 neighbours at 1.0 (2^-11 apart) and at 1024,
        // values either side, large and tiny ones
        let mut x: Vec<f32> = vec![
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            -(1.0 + 2f32.powi(-11)),
            1024.5,
            1025.5,
            65504.0,
            3.0e-5,
            -7.0e-6,
            0.0,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
        ];
        x.extend((0..53).map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 7 - 3)));
        let n = x.len();
        for (dtype, smallest_normal) in [(KvDtype::F16, 6.104e-5), (KvDtype::Bf16, 1.2e-38)] {
            let codec = RowCodec::kv(dtype, true);
            let want = codec.round_trip(&x);
            let t = Tensor::<2>::from_data(TensorData::new(x.clone(), [1, n]), &device);
            let got = host_rows(&round_trip(t, &codec, false).unwrap()).unwrap();
            for ((g, w), v) in got.iter().zip(&want).zip(&x) {
                if w.abs() >= smallest_normal {
                    assert_eq!(g.to_bits(), w.to_bits(), "{dtype}: {v} -> {g}, codec {w}");
                } else {
                    assert!(
                        (g - w).abs() <= smallest_normal,
                        "{dtype}: {v} -> {g}, codec {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn parses_prints_and_rejects() {
        for good in [
            "kv=q8_0",
            "kv=f32",
            "k=q8_0,v=q4_0",
            "k=f32",
            "v=q4_0",
            "latent=int4",
            "latent=f32",
            "scales=channel",
            "kv=q4_0,rotate=off",
            "latent=mixed,basis=f32",
            "basis=f32",
        ] {
            let p: Precision = good.parse().unwrap();
            assert_eq!(p.to_string(), good);
        }
        assert!("kv=f16".parse::<Precision>().unwrap().is_default());
        assert!("basis=f16".parse::<Precision>().unwrap().is_default());
        assert_eq!(Precision::default().to_string(), "kv=f16");
        // the default stores the dense cache's rows in f16, DynaKV's
        // latents in int8; f32 rows are named
        let p = Precision::default();
        assert!(!p.stores_f32(false) && !p.stores_f32(true));
        let f32_rows: Precision = "kv=f32".parse().unwrap();
        assert_eq!(f32_rows, Precision::f32_rows());
        assert_eq!(f32_rows.to_string(), "kv=f32");
        assert!(f32_rows.stores_f32(false) && !f32_rows.is_default());
        let f32_latents: Precision = "latent=f32".parse().unwrap();
        assert!(f32_latents.stores_f32(true));
        // int8 latents are the default, so a spec need not name them
        assert!("latent=int8".parse::<Precision>().unwrap().is_default());
        assert_eq!(
            "latent=int8,scales=channel".parse::<Precision>().unwrap(),
            "scales=channel".parse().unwrap()
        );
        for bad in [
            "",
            "kv",
            "kv=q3",
            "latent=f16,scales=channel",
            "latent=mixed,scales=channel",
            "dtype=f16",
            "basis=int8",
        ] {
            assert!(bad.parse::<Precision>().is_err(), "{bad}");
        }
    }
}
