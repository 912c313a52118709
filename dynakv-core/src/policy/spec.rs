//! A rank policy as configuration: which policy, at which budget, with which
//! options; serialisable, parsable from one string, validated before any
//! artifact is read, and built into a [`RankPolicy`] from an artifact.
//!
//! Why a spec and not the policies themselves: policies are fitted on an
//! artifact's calibration sample, which a command line or a config file does
//! not have at hand; the spec is what a user writes down, the policy what the
//! artifact makes of it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    check_budget, BudgetController, BudgetHold, EnergyPolicy, EnergyRule, Held, PerLayerPolicy,
    PolicyKind, RankPolicy, RecentFull, RouterPolicy, SinkFull, UniformPolicy,
};
use crate::artifact::Artifact;
use crate::error::CoreError;

/// How a DynaKV cache picks each token's rank.
///
/// The default is the best measured training-free configuration
/// (`docs/results.md`) at budget 0.47: [`PolicyKind::Auto`], the policy
/// calibration found best for the model (energy with the lagrange rule on
/// SmolLM2, uniform on Gemma 3), energy for older artifacts.
///
/// ```
/// use dynakv_core::policy::{PolicyKind, PolicySpec};
///
/// let spec: PolicySpec = "energy@0.30,recent=32".parse().unwrap();
/// assert_eq!(spec.kind, PolicyKind::Energy);
/// assert_eq!(spec.budget, 0.30);
/// assert_eq!(spec.recent_full, 32);
/// assert_eq!(spec.to_string().parse::<PolicySpec>().unwrap(), spec);
/// assert!("energy@1.5".parse::<PolicySpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySpec {
    pub kind: PolicyKind,
    /// Target retained fraction of dimensions, in (0, 1].
    pub budget: f64,
    /// `uniform`, `per-layer` and `router`: the first N tokens keep full
    /// rank (attention sinks; the energy rule keeps them by their error).
    pub sink_tokens: usize,
    /// `energy`: weight of key error against value error (lagrange rule), or
    /// the key threshold as a multiple of the value threshold (threshold rule).
    /// `None`: the artifact's (chosen at calibration), else
    /// [`DEFAULT_KEY_FACTOR`].
    pub key_factor: Option<f32>,
    /// `energy`: lagrange (equal marginal error per dimension) or threshold
    /// (equal relative error per token).
    pub energy_rule: EnergyRule,
    /// The last N tokens of every append keep full rank (0: off); see
    /// [`RecentFull`].
    pub recent_full: usize,
    /// `energy` and `router`: whether the budget is held on the text the
    /// cache sees (`track`, the default), never exceeded (`ceiling`), or
    /// left to the calibration fit (`open`); see [`BudgetController`].
    pub hold: BudgetHold,
}

/// The energy rule's key factor when neither the spec nor the artifact
/// names one: the value chosen for SmolLM2 on Brown calib windows 40-41
/// (docs/results.md). Artifacts of `dynakv calibrate` carry their own.
pub const DEFAULT_KEY_FACTOR: f32 = 2.0;

impl Default for PolicySpec {
    fn default() -> Self {
        Self {
            kind: PolicyKind::Auto,
            budget: 0.47,
            sink_tokens: 1,
            key_factor: None,
            energy_rule: EnergyRule::Lagrange,
            recent_full: 0,
            hold: BudgetHold::Track,
        }
    }
}

impl PolicySpec {
    /// A policy of `kind` at `budget`, other options at their defaults.
    pub fn new(kind: PolicyKind, budget: f64) -> Self {
        Self {
            kind,
            budget,
            ..Self::default()
        }
    }

    /// Checks every field on its own (what can be checked without an artifact).
    pub fn validate(&self) -> Result<(), CoreError> {
        check_budget(self.budget)?;
        if let Some(k) = self.key_factor {
            if !(k.is_finite() && k > 0.0) {
                return Err(CoreError::Invalid {
                    field: "key_factor",
                    message: format!("must be finite and > 0, got {k}"),
                });
            }
        }
        Ok(())
    }

    /// The policy that runs with `artifact`: the spec's, or for
    /// [`PolicyKind::Auto`] the artifact's choice (energy without one).
    pub fn kind_for(&self, artifact: &Artifact) -> PolicyKind {
        match self.kind {
            PolicyKind::Auto => artifact.header.policy.unwrap_or(PolicyKind::Energy),
            kind => kind,
        }
    }

    /// The energy rule's key factor: the spec's, else the artifact's
    /// (chosen at calibration), else [`DEFAULT_KEY_FACTOR`].
    pub fn key_factor_with(&self, artifact: Option<f32>) -> f32 {
        self.key_factor.or(artifact).unwrap_or(DEFAULT_KEY_FACTOR)
    }

    /// Fits the policy on an artifact's calibration sample (or reads its
    /// trained router), wrapped in [`RecentFull`] when asked.
    pub fn build(&self, artifact: &Artifact) -> Result<Arc<dyn RankPolicy>, CoreError> {
        self.validate()?;
        let levels = &artifact.header.levels;
        let inner: Arc<dyn RankPolicy> = match self.kind_for(artifact) {
            PolicyKind::Auto => {
                return Err(CoreError::Invalid {
                    field: "policy",
                    message: "the artifact names `auto` as its policy".into(),
                })
            }
            PolicyKind::Uniform => Arc::new(UniformPolicy::for_budget(
                self.budget,
                levels,
                self.sink_tokens,
            )?),
            PolicyKind::PerLayer => Arc::new(PerLayerPolicy::fit(
                &artifact.sample,
                levels,
                self.budget,
                self.sink_tokens,
            )?),
            PolicyKind::Energy => Arc::new(EnergyPolicy::fit(
                &artifact.sample,
                artifact.mean_latents(),
                levels,
                self.budget,
                self.key_factor_with(artifact.header.key_factor),
                self.energy_rule,
            )?),
            PolicyKind::Router => {
                let (Some(info), Some(routers)) = (&artifact.header.router, &artifact.routers)
                else {
                    return Err(CoreError::Invalid {
                        field: "policy",
                        message: "router needs an artifact from `dynakv train`".into(),
                    });
                };
                // The router was trained for one target and its tau fitted on
                // held-out latents the artifact does not keep: other budgets
                // need another training run.
                if (self.budget - info.target).abs() > 1e-6 {
                    return Err(CoreError::Invalid {
                        field: "budget",
                        message: format!(
                            "this router was thresholded for budget {}, not {} (retrain, or use budget {})",
                            info.target, self.budget, info.target
                        ),
                    });
                }
                let router = Arc::new(
                    RouterPolicy::new(routers.clone(), levels.clone(), info.tau)?
                        .with_shares(info.shares.clone()),
                );
                match self.sink_tokens {
                    0 => router,
                    n => Arc::new(SinkFull::new(router, n, levels.full())),
                }
            }
        };
        let recent: Arc<dyn RankPolicy> = match self.recent_full {
            0 => inner,
            n => Arc::new(RecentFull::new(inner, n, levels.full())),
        };
        let policy: Arc<dyn RankPolicy> = match self.hold {
            BudgetHold::Open => recent,
            hold => Arc::new(Held::new(recent, hold, self.budget)),
        };
        // What a cache will make of it, checked now (a budget below the
        // smallest level cannot be held).
        BudgetController::for_policy(&*policy, artifact.bases.len())?;
        Ok(policy)
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uniform => "uniform",
            Self::PerLayer => "per-layer",
            Self::Energy => "energy",
            Self::Router => "router",
            Self::Auto => "auto",
        })
    }
}

impl fmt::Display for EnergyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Threshold => "threshold",
            Self::Lagrange => "lagrange",
        })
    }
}

/// `KIND@BUDGET[,recent=N][,sink=N][,key-factor=F][,rule=lagrange|threshold][,hold=open|track|ceiling]`;
/// options left out keep their defaults.
impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = Self::default();
        write!(f, "{}@{}", self.kind, self.budget)?;
        if self.recent_full != d.recent_full {
            write!(f, ",recent={}", self.recent_full)?;
        }
        if self.sink_tokens != d.sink_tokens {
            write!(f, ",sink={}", self.sink_tokens)?;
        }
        if let Some(k) = self.key_factor {
            write!(f, ",key-factor={k}")?;
        }
        if self.energy_rule != d.energy_rule {
            write!(f, ",rule={}", self.energy_rule)?;
        }
        if self.hold != d.hold {
            write!(f, ",hold={}", self.hold)?;
        }
        Ok(())
    }
}

/// Parses what [`PolicySpec`]'s `Display` writes; a missing `@BUDGET` keeps
/// the default budget. The result is validated.
impl FromStr for PolicySpec {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default().trim();
        let (kind, budget) = match head.split_once('@') {
            Some((k, b)) => (k, Some(b)),
            None => (head, None),
        };
        let mut spec = Self {
            kind: kind.parse()?,
            ..Self::default()
        };
        if let Some(b) = budget {
            spec.budget = parse_field("budget", b)?;
        }
        for opt in parts {
            let (key, value) = opt.split_once('=').ok_or_else(|| CoreError::Invalid {
                field: "policy",
                message: format!("option `{opt}` is not KEY=VALUE"),
            })?;
            match key.trim() {
                "recent" => spec.recent_full = parse_field("recent_full", value)?,
                "sink" => spec.sink_tokens = parse_field("sink_tokens", value)?,
                "key-factor" => spec.key_factor = Some(parse_field("key_factor", value)?),
                "rule" => spec.energy_rule = value.trim().parse()?,
                "hold" => spec.hold = value.trim().parse()?,
                o => {
                    return Err(CoreError::Invalid {
                        field: "policy",
                        message: format!(
                            "unknown option `{o}` (expected recent, sink, key-factor, rule or hold)"
                        ),
                    })
                }
            }
        }
        spec.validate()?;
        Ok(spec)
    }
}

fn parse_field<T: FromStr>(field: &'static str, s: &str) -> Result<T, CoreError>
where
    T::Err: fmt::Display,
{
    s.trim().parse().map_err(|e: T::Err| CoreError::Invalid {
        field,
        message: format!("`{s}`: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_option_and_round_trips() {
        let s: PolicySpec =
            "uniform@0.3,recent=8,sink=4,key-factor=1.5,rule=threshold,hold=ceiling"
                .parse()
                .unwrap();
        assert_eq!(
            s,
            PolicySpec {
                kind: PolicyKind::Uniform,
                budget: 0.3,
                sink_tokens: 4,
                key_factor: Some(1.5),
                energy_rule: EnergyRule::Threshold,
                recent_full: 8,
                hold: BudgetHold::Ceiling,
            }
        );
        assert_eq!(s.to_string().parse::<PolicySpec>().unwrap(), s);
        assert_eq!("auto".parse::<PolicySpec>().unwrap(), PolicySpec::default());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PolicySpec>(&json).unwrap(), s);
    }

    #[test]
    fn the_key_factor_is_the_specs_then_the_artifacts_then_the_default() {
        let plain: PolicySpec = "energy@0.3".parse().unwrap();
        assert_eq!(plain.key_factor, None);
        assert!(!plain.to_string().contains("key-factor"));
        assert_eq!(plain.key_factor_with(Some(16.0)), 16.0);
        assert_eq!(plain.key_factor_with(None), DEFAULT_KEY_FACTOR);
        let set: PolicySpec = "energy@0.3,key-factor=4".parse().unwrap();
        assert_eq!(set.key_factor_with(Some(16.0)), 4.0);
    }

    /// `auto` (the default) runs the artifact's recorded policy, energy
    /// without one; an artifact cannot name auto or the router.
    #[test]
    fn auto_runs_the_policy_the_artifact_names() {
        let (mut artifact, _, _) = crate::artifact::tests::tiny();
        let auto: PolicySpec = "auto@0.5".parse().unwrap();
        assert_eq!(auto.to_string(), "auto@0.5");
        assert_eq!(PolicySpec::default().kind, PolicyKind::Auto);
        artifact.header.policy = Some(PolicyKind::Uniform);
        assert_eq!(auto.kind_for(&artifact), PolicyKind::Uniform);
        assert_eq!(auto.build(&artifact).unwrap().name(), "uniform");
        artifact.header.policy = None;
        assert_eq!(auto.kind_for(&artifact), PolicyKind::Energy);
        let energy: PolicySpec = "energy@0.5".parse().unwrap();
        artifact.header.policy = Some(PolicyKind::Uniform);
        assert_eq!(energy.kind_for(&artifact), PolicyKind::Energy);
        for bad in [PolicyKind::Auto, PolicyKind::Router] {
            artifact.header.policy = Some(bad);
            assert!(artifact.header.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_specs_name_the_field() {
        for (bad, field) in [
            ("energy@0", "budget"),
            ("energy@NaN", "budget"),
            ("energy@x", "budget"),
            ("magic@0.3", "policy"),
            ("energy@0.3,recent", "policy"),
            ("energy@0.3,depth=3", "policy"),
            ("energy@0.3,key-factor=-1", "key_factor"),
            ("energy@0.3,rule=fast", "energy_rule"),
            ("energy@0.3,hold=soft", "hold"),
        ] {
            match bad.parse::<PolicySpec>() {
                Err(CoreError::Invalid { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
