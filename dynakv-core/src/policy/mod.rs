//! Rank policies: how many latent coordinates each token keeps, per layer and
//! for keys and values separately. All policies take a target retained
//! fraction (the budget) when they are built; the learned router plugs in
//! behind the same trait.

mod controller;
mod energy;
mod per_layer;
mod profile;
mod recent;
mod router;
mod sink;
mod spec;
mod steer;
mod uniform;

pub use controller::BudgetController;
pub use energy::{EnergyPolicy, EnergyRule};
pub use per_layer::PerLayerPolicy;
pub use profile::{EnergySample, TailProfile};
pub use recent::RecentFull;
pub use router::{RouterPolicy, RouterWeights};
pub use sink::SinkFull;
pub use spec::{PolicySpec, DEFAULT_KEY_FACTOR};
pub use steer::{rank_at, ranks_at, BudgetHold, Held, Steerable};
pub use uniform::UniformPolicy;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvKind {
    Key,
    Value,
}

impl KvKind {
    pub fn index(self) -> usize {
        match self {
            KvKind::Key => 0,
            KvKind::Value => 1,
        }
    }
}

/// Chooses ranks for new tokens of one layer, online (one call per append).
pub trait RankPolicy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;

    /// One rank (a level) per token.
    ///
    /// `latents` is row-major `[n, dim]` in basis order; `positions` has `n` entries.
    fn ranks(&self, layer: usize, kind: KvKind, latents: &[f32], positions: &[usize])
        -> Vec<usize>;

    /// Whether [`RankPolicy::ranks`] reads the latents (if not, a cache need
    /// not copy them off the device).
    fn needs_latents(&self) -> bool {
        true
    }

    /// The policy's operating point, for a [`BudgetController`] to move
    /// (`None`: ranks that do not follow one, as `uniform`'s).
    fn steerable(&self) -> Option<&dyn Steerable> {
        None
    }

    /// Tokens at the end of each append that keep full rank whatever the
    /// operating point ([`RecentFull`]).
    fn recent_full(&self) -> usize {
        0
    }

    /// Tokens at the start of a sequence (positions below this) that keep
    /// full rank whatever the operating point ([`SinkFull`]).
    fn sink_tokens(&self) -> usize {
        0
    }

    /// The promise a cache keeps for this policy, and its budget ([`Held`];
    /// `None`: the ranks as they come).
    fn hold(&self) -> Option<(BudgetHold, f64)> {
        None
    }
}

/// Checks a budget (retained fraction) is in (0, 1].
pub fn check_budget(budget: f64) -> Result<(), CoreError> {
    if !(budget > 0.0 && budget <= 1.0) {
        return Err(CoreError::Invalid {
            field: "budget",
            message: format!("must be in (0, 1], got {budget}"),
        });
    }
    Ok(())
}

/// Which policy, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PolicyKind {
    Uniform,
    PerLayer,
    Energy,
    /// The learned router stored in a trained artifact (`dynakv train`).
    Router,
    /// The training-free policy `dynakv calibrate` measured best for the
    /// artifact's model on held-out calib windows (its header's `policy`);
    /// energy for an artifact without one.
    Auto,
}

impl std::str::FromStr for PolicyKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "uniform" => Ok(Self::Uniform),
            "per-layer" => Ok(Self::PerLayer),
            "energy" => Ok(Self::Energy),
            "router" => Ok(Self::Router),
            "auto" => Ok(Self::Auto),
            o => Err(CoreError::Invalid {
                field: "policy",
                message: format!("`{o}` (expected auto, uniform, per-layer, energy or router)"),
            }),
        }
    }
}

/// Rank 2 for every token: the inner policy of the wrapper tests.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct RankTwo;

#[cfg(test)]
impl RankPolicy for RankTwo {
    fn name(&self) -> &'static str {
        "two"
    }
    fn ranks(&self, _: usize, _: KvKind, _: &[f32], positions: &[usize]) -> Vec<usize> {
        vec![2; positions.len()]
    }
    fn needs_latents(&self) -> bool {
        false
    }
}
