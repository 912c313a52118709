//! Which cache to build, as a user writes it down: the dense cache or
//! DynaKV with a rank policy, optionally under SnapKV pruning.

use std::fmt;
use std::str::FromStr;

use dynakv_core::policy::PolicySpec;
#[cfg(feature = "snapkv")]
use dynakv_snapkv::SnapKvSpec;
use serde::{Deserialize, Serialize};

use crate::cache::Precision;
use crate::error::CacheError;
use crate::layer_plan::LayerScope;

/// A cache configuration: serialisable, parsable, validated before anything
/// is loaded. [`crate::CacheFactory`] builds it.
///
/// The string form joins parts with `+`: `dense`, `dynakv:POLICY` (see
/// [`PolicySpec`]), with the `snapkv` feature `snapkv:SPEC` (see
/// `dynakv_snapkv::SnapKvSpec`), `layers:all` to compress a model's
/// sliding-window layers too (see [`LayerScope`]), and last
/// `store:PRECISION` (see [`Precision`]: `kv=q8_0` for the dense cache,
/// `latent=int4` for DynaKV).
///
/// ```
/// use dynakv_burn::CacheSpec;
///
/// let spec: CacheSpec = "dynakv:energy@0.47,recent=32".parse().unwrap();
/// assert!(spec.dynakv.is_some());
/// assert_eq!(spec.to_string().parse::<CacheSpec>().unwrap(), spec);
/// assert!("dense".parse::<CacheSpec>().unwrap().dynakv.is_none());
/// assert!("dynakv:energy@2".parse::<CacheSpec>().is_err());
/// let q4: CacheSpec = "dense+store:k=q8_0,v=q4_0".parse().unwrap();
/// assert_eq!(q4.to_string(), "dense+store:k=q8_0,v=q4_0");
/// assert!("dense+store:latent=int4".parse::<CacheSpec>().is_err());
/// let all: CacheSpec = "dynakv:uniform@0.3+layers:all".parse().unwrap();
/// assert_eq!(all.layers, dynakv_burn::LayerScope::All);
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSpec {
    /// DynaKV's rank policy; `None` is the dense cache.
    pub dynakv: Option<PolicySpec>,
    /// SnapKV pruning at the end of prefill, over either cache.
    #[cfg(feature = "snapkv")]
    pub snapkv: Option<SnapKvSpec>,
    /// Which layers of a model with sliding-window layers take this cache
    /// (the global ones by default).
    pub layers: LayerScope,
    /// How stored numbers are held (f32 by default). With DynaKV, `k=` /
    /// `v=` / `kv=` set the dense caches of a model's sliding-window layers
    /// (the default `layers:global`); a model without them refuses them.
    pub precision: Precision,
}

impl CacheSpec {
    /// The uncompressed cache.
    pub fn dense() -> Self {
        Self::default()
    }

    /// DynaKV with a rank policy.
    pub fn dynakv(policy: PolicySpec) -> Self {
        Self {
            dynakv: Some(policy),
            ..Self::default()
        }
    }

    /// The same cache under SnapKV pruning.
    #[cfg(feature = "snapkv")]
    pub fn with_snapkv(mut self, snapkv: SnapKvSpec) -> Self {
        self.snapkv = Some(snapkv);
        self
    }

    /// The same cache with other storage precisions.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Whether this is the default dense cache with nothing on top: no
    /// DynaKV, no SnapKV, the default storage (f16 rows; the exact f32
    /// reference is `dense+store:kv=f32`).
    pub fn is_dense(&self) -> bool {
        #[cfg(feature = "snapkv")]
        if self.snapkv.is_some() {
            return false;
        }
        self.dynakv.is_none() && self.precision.is_default()
    }

    /// The same cache on the layers of `scope`.
    pub fn on_layers(mut self, scope: LayerScope) -> Self {
        self.layers = scope;
        self
    }

    /// Checks every part on its own, including that SnapKV's granularity
    /// suits the inner cache (DynaKV keeps one token set per layer).
    pub fn validate(&self) -> Result<(), CacheError> {
        if let Some(p) = &self.dynakv {
            p.validate()?;
        }
        // with DynaKV, k= / v= name the dense caches of a model's
        // sliding-window layers (checked against the model by the factory)
        match self.dynakv {
            Some(_) => self.precision.latents_only().check_for(true)?,
            None => self.precision.check_for(false)?,
        }
        #[cfg(feature = "snapkv")]
        if let Some(s) = &self.snapkv {
            s.validate()?;
            s.config(self.dynakv.is_some())?;
            if (s.whole.is_some() || s.on_arrival) && self.dynakv.is_none() {
                return Err(CacheError::Config(
                    "snapkv whole= / arrival: the dense cache stores every token at full \
                     rank; they apply to DynaKV (--cache dynakv)"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dynakv {
            None => f.write_str("dense")?,
            Some(p) => write!(f, "dynakv:{p}")?,
        }
        #[cfg(feature = "snapkv")]
        if let Some(s) = &self.snapkv {
            write!(f, "+snapkv:{s}")?;
        }
        if self.layers != LayerScope::default() {
            write!(f, "+layers:{}", self.layers)?;
        }
        if !self.precision.is_default() {
            write!(f, "+store:{}", self.precision)?;
        }
        Ok(())
    }
}

impl FromStr for CacheSpec {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, CacheError> {
        let mut spec = Self::default();
        let mut inner_seen = false;
        let mut store_seen = false;
        let mut layers_seen = false;
        for part in s.split('+') {
            let (name, arg) = part.split_once(':').unwrap_or((part, ""));
            if store_seen {
                return Err(CacheError::Config(format!(
                    "`{part}` in `{s}`: store:PRECISION comes last"
                )));
            }
            match (name.trim(), inner_seen) {
                ("dense", false) if arg.is_empty() => inner_seen = true,
                ("dynakv", false) => {
                    spec.dynakv = Some(arg.parse()?);
                    inner_seen = true;
                }
                #[cfg(feature = "snapkv")]
                ("snapkv", true) if spec.snapkv.is_none() => spec.snapkv = Some(arg.parse()?),
                ("layers", true) if !layers_seen => {
                    spec.layers = arg.parse()?;
                    layers_seen = true;
                }
                ("store", true) => {
                    spec.precision = arg.parse()?;
                    store_seen = true;
                }
                _ => {
                    return Err(CacheError::Config(format!(
                        "`{part}` in `{s}`: expected dense or dynakv:POLICY, then +snapkv:SPEC, \
                         +layers:global|all, then +store:PRECISION"
                    )))
                }
            }
        }
        if !inner_seen {
            return Err(CacheError::Config(format!(
                "`{s}`: no inner cache (dense or dynakv:POLICY)"
            )));
        }
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        for good in [
            "dense",
            "dynakv:uniform@0.3",
            "dynakv:energy@0.3,recent=32",
            "dense+store:kv=q8_0",
            "dense+store:k=q8_0,v=q4_0",
            "dynakv:energy@0.3+store:latent=int4,scales=channel",
            "dynakv:uniform@0.3+layers:all+store:latent=f32",
            "dynakv:uniform@0.3+store:kv=f32,latent=mixed",
            "dense+store:kv=f32",
        ] {
            let spec: CacheSpec = good.parse().unwrap();
            assert_eq!(spec.to_string(), good);
        }
        for bad in [
            "",
            "dense:x",
            "dense+dense",
            "dynakv:energy@0",
            "fast",
            "dynakv",
            "dense+store:latent=int4",
            "dense+store:kv=q8_0+store:kv=f16",
            "store:kv=q8_0",
            "dense+layers:some",
            "layers:all",
            "dense+layers:all+layers:all",
        ] {
            assert!(bad.parse::<CacheSpec>().is_err(), "{bad}");
        }
        assert!(CacheSpec::dense().is_dense());
        for other in [
            "dense+store:kv=f32",
            "dense+store:kv=q8_0",
            "dynakv:uniform@0.3",
        ] {
            assert!(!other.parse::<CacheSpec>().unwrap().is_dense(), "{other}");
        }
        let json = serde_json::to_string(&CacheSpec::dense()).unwrap();
        assert_eq!(
            serde_json::from_str::<CacheSpec>(&json).unwrap(),
            CacheSpec::dense()
        );
    }

    #[cfg(feature = "snapkv")]
    #[test]
    fn snapkv_on_top_needs_a_granularity_the_inner_cache_has() {
        let spec: CacheSpec = "dynakv:energy@0.47+snapkv:recall@0.875,gqa=layer-max"
            .parse()
            .unwrap();
        assert_eq!(
            spec.to_string(),
            "dynakv:energy@0.47+snapkv:recall@0.875,gqa=layer-max"
        );
        assert!("dense+snapkv:kvpress@0.5".parse::<CacheSpec>().is_ok());
        assert!("dynakv:energy@0.47+snapkv:kvpress@0.5,gqa=kv-head"
            .parse::<CacheSpec>()
            .is_err());
        assert!("snapkv:kvpress@0.5".parse::<CacheSpec>().is_err());
        // tiers: DynaKV only
        let tiered = "dynakv:uniform@0.47+snapkv:recall@0.875,gqa=layer,whole=0.25";
        assert_eq!(tiered.parse::<CacheSpec>().unwrap().to_string(), tiered);
        let err = "dense+snapkv:recall@0.875,whole=0.25"
            .parse::<CacheSpec>()
            .unwrap_err();
        assert!(err.to_string().contains("whole"), "{err}");
    }
}
