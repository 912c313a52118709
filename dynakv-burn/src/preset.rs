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

/// The presets, from most to fewest bytes. Measured with the budget held
/// (`hold=track`, the default), so DynaKV keeps its budget of the tokens
/// SnapKV keeps and a preset's bytes do not depend on the text. The SnapKV
/// presets' figures were measured with the prompt compressed on arrival;
/// held until pruning (the default now, the same ranks after pruning) they
/// measure within 0.003 of them (docs/results.md, "The bytes frontier").
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "bytes-25",
        spec: "dynakv:energy@0.7+store:latent=mixed",
        about: "DynaKV energy 0.70, latents 8-bit then 4-bit: 24.3% of f16 bytes, PPL x1.026 \
                (llama.cpp's q4_0 cache: 28.1%, x1.042)",
    },
    Preset {
        name: "bytes-12",
        spec: "dynakv:energy@0.85,recent=32+snapkv:recall@0.75,gqa=layer-max+store:latent=mixed",
        about: "SnapKV recall 0.75 + DynaKV energy 0.85, mixed latents: 7.3% of f16 bytes, \
                PPL x1.040 (SnapKV recall 0.875 with q8_0: 6.8%, x1.055)",
    },
    Preset {
        name: "bytes-6",
        spec: "dynakv:energy@0.85,recent=32+snapkv:recall@0.875,gqa=layer-max+store:latent=mixed",
        about: "SnapKV recall 0.875 + DynaKV energy 0.85, mixed latents: 3.8% of f16 bytes, \
                PPL x1.067 (SnapKV recall 0.875 with q4_0: 3.7%, x1.089)",
    },
    Preset {
        name: "bytes-3",
        spec: "dynakv:energy@0.7,recent=32+snapkv:recall@0.875,gqa=layer-max+store:latent=int4",
        about: "SnapKV recall 0.875 + DynaKV energy 0.70, int4 latents: 2.7% of f16 bytes, \
                PPL x1.125 (SnapKV recall 0.875 with KIVI 2-bit: 2.5%, x2.17)",
    },
];

impl CacheSpec {
    /// The preset called `name` (see [`PRESETS`]).
    ///
    /// ```
    /// use dynakv_burn::CacheSpec;
    ///
    /// let spec = CacheSpec::preset("bytes-6").unwrap();
    /// assert!(spec.snapkv.is_some() && spec.dynakv.is_some());
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
