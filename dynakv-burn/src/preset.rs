//! Named cache configurations: at each byte level users ask about, the
//! configuration that measured best (docs/results.md, "The bytes
//! frontier"), so one name gets the frontier without knowing eight flags.

use crate::error::CacheError;
use crate::spec::CacheSpec;

/// A named configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    /// A [`CacheSpec`] string.
    pub spec: &'static str,
    /// What it is and what it measured (KV bytes per token as a fraction of
    /// an f16 dense cache; PPL ratio on Brown `eval`, ctx 1,024, the last
    /// 512 tokens scored after a compressing prefill).
    pub about: &'static str,
}

/// The presets, from most to fewest bytes.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "bytes-25",
        spec: "dense+snapkv:recall@0.5+store:kv=q8_0",
        about: "SnapKV recall keeping half the prompt, q8_0 storage: 27% of f16 bytes, PPL x1.010",
    },
    Preset {
        name: "bytes-12",
        spec: "dense+snapkv:recall@0.75+store:kv=q8_0",
        about: "SnapKV recall keeping a quarter of the prompt, q8_0 storage: 14% of f16 bytes, PPL x1.028",
    },
    Preset {
        name: "bytes-6",
        spec: "dense+snapkv:recall@0.875+store:kv=q8_0",
        about: "SnapKV recall keeping an eighth of the prompt, q8_0 storage: 6.8% of f16 bytes, PPL x1.055",
    },
    Preset {
        name: "bytes-3",
        spec: "dense+snapkv:recall@0.875+store:kv=q4_0",
        about: "SnapKV recall keeping an eighth of the prompt, q4_0 storage: 3.7% of f16 bytes, PPL x1.089",
    },
];

impl CacheSpec {
    /// The preset called `name` (see [`PRESETS`]).
    ///
    /// ```
    /// use dynakv_burn::CacheSpec;
    ///
    /// let spec = CacheSpec::preset("bytes-6").unwrap();
    /// assert!(spec.snapkv.is_some());
    /// assert!(CacheSpec::preset("bytes-0").is_err());
    /// ```
    pub fn preset(name: &str) -> Result<CacheSpec, CacheError> {
        match PRESETS.iter().find(|p| p.name == name) {
            Some(p) => p.spec.parse(),
            None => Err(CacheError::Config(format!(
                "no preset `{name}` (expected {})",
                PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_round_trips() {
        for p in PRESETS {
            let spec = CacheSpec::preset(p.name).unwrap();
            assert_eq!(spec.to_string(), p.spec, "{}", p.name);
        }
    }
}
