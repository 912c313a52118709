//! SnapKV as a user writes it down: a preset, a budget and a selection
//! granularity; serialisable, parsable from one string, validated, and
//! turned into a full [`SnapKvConfig`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::{GqaScores, KeepBudget, SnapKvConfig, SnapKvError};

/// A named SnapKV configuration (window, kernel, pooling, vote).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SnapKvPreset {
    /// kvpress's `SnapKVPress`: window 64, kernel 5, average pooling, mean vote.
    Kvpress,
    /// The paper's LongBench settings: window 32, kernel 7, max pooling, sum vote.
    Paper,
    /// Ours: window 32, kernel 7, forward max pooling (keeps the tokens after
    /// a voted one, so multi-token facts survive whole), sum vote.
    Recall,
}

impl SnapKvPreset {
    /// The preset's configuration with a budget, one selection per KV head.
    pub fn config(self, budget: KeepBudget) -> SnapKvConfig {
        let mut c = match self {
            Self::Kvpress => SnapKvConfig::kvpress(0.0),
            Self::Paper => SnapKvConfig::paper(0),
            Self::Recall => SnapKvConfig::recall(0.0),
        };
        c.budget = budget;
        c
    }
}

impl fmt::Display for SnapKvPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvpress => "kvpress",
            Self::Paper => "paper",
            Self::Recall => "recall",
        })
    }
}

impl FromStr for SnapKvPreset {
    type Err = SnapKvError;
    fn from_str(s: &str) -> Result<Self, SnapKvError> {
        match s.trim() {
            "kvpress" => Ok(Self::Kvpress),
            "paper" => Ok(Self::Paper),
            "recall" => Ok(Self::Recall),
            o => Err(SnapKvError::Invalid {
                field: "preset",
                message: format!("`{o}` (expected kvpress, paper or recall)"),
            }),
        }
    }
}

impl fmt::Display for GqaScores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::KvHead => "kv-head",
            Self::Layer => "layer",
            Self::LayerMax => "layer-max",
            Self::QueryHead => "query-head",
        })
    }
}

impl FromStr for GqaScores {
    type Err = SnapKvError;
    fn from_str(s: &str) -> Result<Self, SnapKvError> {
        match s.trim() {
            "kv-head" => Ok(Self::KvHead),
            "layer" => Ok(Self::Layer),
            "layer-max" => Ok(Self::LayerMax),
            "query-head" => Ok(Self::QueryHead),
            o => Err(SnapKvError::Invalid {
                field: "gqa",
                message: format!("`{o}` (expected kv-head, layer, layer-max or query-head)"),
            }),
        }
    }
}

/// SnapKV on top of a cache: preset, budget and granularity.
///
/// `gqa` left at `None` selects per KV head (kvpress) where the inner cache
/// allows it, and one set per layer where it does not (DynaKV's joint basis);
/// [`SnapKvSpec::config`] is told which.
///
/// ```
/// use dynakv_snapkv::{GqaScores, KeepBudget, SnapKvPreset, SnapKvSpec};
///
/// let spec: SnapKvSpec = "recall@0.875,gqa=layer-max".parse().unwrap();
/// assert_eq!(spec.preset, SnapKvPreset::Recall);
/// assert_eq!(spec.budget, KeepBudget::CompressionRatio(0.875));
/// let config = spec.config(true).unwrap();
/// assert_eq!((config.window, config.gqa), (32, GqaScores::LayerMax));
/// assert!("paper@c16".parse::<SnapKvSpec>().is_err()); // capacity below the window
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapKvSpec {
    pub preset: SnapKvPreset,
    pub budget: KeepBudget,
    #[serde(default)]
    pub gqa: Option<GqaScores>,
    /// For a cache that stores tokens at reduced rank (DynaKV), which holds
    /// each layer's prompt at full rank until it is pruned (the paper's
    /// order: prune, then compress the kept tokens): this fraction of the
    /// kept tokens, first by [`crate::Selection::priority`] (the window,
    /// then the highest scores), keeps full rank and the rest take the rank
    /// policy's. `None`: 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<f64>,
    /// For such a cache: compress the prompt as it arrives instead, before
    /// SnapKV scores it (what every composition measured before 2026-11-30
    /// did; the prefill then attends over compressed keys and values).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_arrival: bool,
}

impl SnapKvSpec {
    /// A preset at a compression ratio (fraction of prompt tokens removed).
    pub fn ratio(preset: SnapKvPreset, ratio: f64) -> Self {
        Self {
            preset,
            budget: KeepBudget::CompressionRatio(ratio),
            gqa: None,
            whole: None,
            on_arrival: false,
        }
    }

    /// The full configuration; `per_layer_only` says the inner cache keeps
    /// one token set per layer (then `None` means [`GqaScores::Layer`]).
    pub fn config(&self, per_layer_only: bool) -> Result<SnapKvConfig, SnapKvError> {
        let mut c = self.preset.config(self.budget);
        c.gqa = match (self.gqa, per_layer_only) {
            (Some(g), _) => g,
            (None, true) => GqaScores::Layer,
            (None, false) => GqaScores::KvHead,
        };
        if per_layer_only && !c.gqa.per_layer() {
            return Err(SnapKvError::Invalid {
                field: "gqa",
                message: format!(
                    "`{}` selects per head, and this cache keeps one token set per layer \
                     (use layer or layer-max)",
                    c.gqa
                ),
            });
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the spec on its own (as for a cache that allows any granularity).
    pub fn validate(&self) -> Result<(), SnapKvError> {
        if let Some(w) = self.whole {
            if !(0.0..=1.0).contains(&w) {
                return Err(SnapKvError::Invalid {
                    field: "whole",
                    message: format!("must be in [0, 1], got {w}"),
                });
            }
            if self.on_arrival {
                return Err(SnapKvError::Invalid {
                    field: "whole",
                    message: "tiers need the prompt held until pruning; drop `arrival`".into(),
                });
            }
        }
        self.config(false).map(|_| ())
    }
}

/// `PRESET@RATIO` or `PRESET@cCAPACITY`, then `,gqa=G`, `,whole=F` and
/// `,arrival` if not the defaults.
impl fmt::Display for SnapKvSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.budget {
            KeepBudget::CompressionRatio(r) => write!(f, "{}@{r}", self.preset)?,
            KeepBudget::Capacity(c) => write!(f, "{}@c{c}", self.preset)?,
        }
        if let Some(g) = self.gqa {
            write!(f, ",gqa={g}")?;
        }
        if let Some(w) = self.whole {
            write!(f, ",whole={w}")?;
        }
        if self.on_arrival {
            write!(f, ",arrival")?;
        }
        Ok(())
    }
}

/// Parses what `Display` writes; the result is validated.
impl FromStr for SnapKvSpec {
    type Err = SnapKvError;
    fn from_str(s: &str) -> Result<Self, SnapKvError> {
        let bad = |field, message: String| SnapKvError::Invalid { field, message };
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (preset, budget) = head.split_once('@').ok_or_else(|| {
            bad(
                "budget",
                format!("`{head}`: expected PRESET@RATIO or PRESET@cN"),
            )
        })?;
        let budget = budget.trim();
        let budget = match budget.strip_prefix('c') {
            Some(c) => KeepBudget::Capacity(
                c.parse()
                    .map_err(|e| bad("capacity", format!("`{c}`: {e}")))?,
            ),
            None => KeepBudget::CompressionRatio(
                budget
                    .parse()
                    .map_err(|e| bad("compression_ratio", format!("`{budget}`: {e}")))?,
            ),
        };
        let mut spec = Self {
            preset: preset.parse()?,
            budget,
            gqa: None,
            whole: None,
            on_arrival: false,
        };
        for opt in parts {
            if opt.trim() == "arrival" {
                spec.on_arrival = true;
                continue;
            }
            match opt.split_once('=') {
                Some(("gqa", g)) => spec.gqa = Some(g.parse()?),
                Some(("whole", w)) => {
                    spec.whole = Some(
                        w.trim()
                            .parse()
                            .map_err(|e| bad("whole", format!("`{w}`: {e}")))?,
                    )
                }
                _ => {
                    return Err(bad(
                        "snapkv",
                        format!("unknown option `{opt}` (expected gqa=G, whole=F or arrival)"),
                    ))
                }
            }
        }
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pooling;

    #[test]
    fn parses_round_trips_and_serialises() {
        for s in [
            "kvpress@0.5",
            "paper@c1024",
            "recall@0.875,gqa=layer-max",
            "recall@0.875,gqa=layer,whole=0.25",
            "recall@0.875,gqa=layer,arrival",
        ] {
            let spec: SnapKvSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<SnapKvSpec>(&json).unwrap(), spec);
        }
        let c = SnapKvSpec::ratio(SnapKvPreset::Recall, 0.5)
            .config(false)
            .unwrap();
        assert_eq!((c.pooling, c.gqa), (Pooling::Forward, GqaScores::KvHead));
    }

    #[test]
    fn granularity_follows_the_inner_cache() {
        let spec = SnapKvSpec::ratio(SnapKvPreset::Kvpress, 0.5);
        assert_eq!(spec.config(true).unwrap().gqa, GqaScores::Layer);
        let per_head = SnapKvSpec {
            gqa: Some(GqaScores::KvHead),
            ..spec
        };
        assert!(per_head.config(true).is_err());
        assert!(per_head.config(false).is_ok());
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (bad, field) in [
            ("kvpress", "budget"),
            ("kvpress@1.0", "compression_ratio"),
            ("kvpress@NaN", "compression_ratio"),
            ("kvpress@cx", "capacity"),
            ("paper@c8", "capacity"),
            ("fast@0.5", "preset"),
            ("kvpress@0.5,gqa=row", "gqa"),
            ("kvpress@0.5,window=3", "snapkv"),
            ("recall@0.5,whole=1.5", "whole"),
            ("recall@0.5,whole=NaN", "whole"),
            ("recall@0.5,whole=x", "whole"),
            ("recall@0.5,whole=0.5,arrival", "whole"),
        ] {
            match bad.parse::<SnapKvSpec>() {
                Err(SnapKvError::Invalid { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
