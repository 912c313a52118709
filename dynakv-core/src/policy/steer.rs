//! Steering a token-wise policy: one operating point per layer and K/V, and
//! the budget promise a cache keeps by moving it.
//!
//! Why: the energy policy's threshold and the router's are fitted on the
//! calibration text, so the retained fraction they give is the budget only
//! on text like it (a router fitted for 0.30 on Brown keeps 0.36 on text
//! unlike it). A per-sequence [`super::BudgetController`] moves the point as
//! tokens arrive so that the fraction is the budget on the text the cache
//! actually sees; this file is what it needs from a policy.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{KvKind, RankPolicy};
use crate::error::CoreError;
use crate::levels::RankLevels;

/// A token-wise policy whose ranks follow one operating point per layer and
/// K/V.
///
/// For each token it gives one *cut* per non-zero level: the token keeps at
/// least level `i` while the operating point is below `cut[i]`. Cuts do not
/// increase along the levels and the first is `+inf` (a stored token keeps
/// at least the smallest non-zero level), so a larger point never keeps more
/// dimensions. The policy's own ranks are [`rank_at`] its fitted point.
pub trait Steerable: Send + Sync + fmt::Debug {
    fn levels(&self) -> &RankLevels;

    /// The fitted operating point of a layer's keys or values.
    fn point(&self, layer: usize, kind: KvKind) -> f32;

    /// The retained fraction the fitted point gives this layer's keys or
    /// values on the calibration text, when the policy knows it: a
    /// controller keeps each layer's share of the budget as calibrated.
    fn fitted_share(&self, layer: usize, kind: KvKind) -> Option<f64>;

    /// Cuts of `n` tokens, row-major `[n, levels - 1]`.
    ///
    /// `latents` is row-major `[n, dim]` in basis order.
    fn cuts(&self, layer: usize, kind: KvKind, latents: &[f32], n: usize) -> Vec<f32>;
}

/// The rank one token's cuts give at operating point `point`: the largest
/// non-zero level whose cut exceeds it (the smallest non-zero level at least).
pub fn rank_at(cuts: &[f32], point: f32, levels: &RankLevels) -> usize {
    let lv = levels.as_slice();
    let above = cuts.iter().take_while(|&&c| c > point).count().max(1);
    lv[above.min(lv.len() - 1)]
}

/// Ranks of every row of `cuts` at `point`.
pub fn ranks_at(cuts: &[f32], point: f32, levels: &RankLevels) -> Vec<usize> {
    let m = levels.as_slice().len() - 1;
    cuts.chunks_exact(m.max(1))
        .map(|c| rank_at(c, point, levels))
        .collect()
}

/// What `--budget` promises on a text unlike the calibration text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BudgetHold {
    /// The fitted operating point, whatever fraction it gives on this text
    /// (the behaviour before the controller; the budget holds on text like
    /// the calibration text only).
    Open,
    /// A running controller moves the point so that every layer's retained
    /// fraction stays at its share of the budget on the text seen so far
    /// (exact at each prefill; decoded tokens pay back drift gradually).
    #[default]
    Track,
    /// As `track`, and no append ever takes the cache above the budget: a
    /// hard ceiling, which overrides `recent` tokens when it must.
    Ceiling,
}

impl FromStr for BudgetHold {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s.trim() {
            "open" => Ok(Self::Open),
            "track" => Ok(Self::Track),
            "ceiling" => Ok(Self::Ceiling),
            o => Err(CoreError::Invalid {
                field: "hold",
                message: format!("`{o}` (expected open, track or ceiling)"),
            }),
        }
    }
}

impl fmt::Display for BudgetHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Track => "track",
            Self::Ceiling => "ceiling",
        })
    }
}

/// A policy with a budget promise: ranks as `inner`'s, and the promise a
/// cache's [`super::BudgetController`] keeps when it steers `inner`.
#[derive(Debug, Clone)]
pub struct Held {
    inner: Arc<dyn RankPolicy>,
    hold: BudgetHold,
    budget: f64,
}

impl Held {
    pub fn new(inner: Arc<dyn RankPolicy>, hold: BudgetHold, budget: f64) -> Self {
        Self {
            inner,
            hold,
            budget,
        }
    }
}

impl RankPolicy for Held {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn ranks(
        &self,
        layer: usize,
        kind: KvKind,
        latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        self.inner.ranks(layer, kind, latents, positions)
    }

    fn needs_latents(&self) -> bool {
        self.inner.needs_latents()
    }

    fn steerable(&self) -> Option<&dyn Steerable> {
        self.inner.steerable()
    }

    fn recent_full(&self) -> usize {
        self.inner.recent_full()
    }

    fn sink_tokens(&self) -> usize {
        self.inner.sink_tokens()
    }
    fn hold(&self) -> Option<(BudgetHold, f64)> {
        Some((self.hold, self.budget))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_is_the_last_level_whose_cut_exceeds_the_point() {
        let levels = RankLevels::multiples(2, 8).unwrap(); // 0 2 4 6 8
        let cuts = [f32::INFINITY, 0.5, 0.3, 0.1];
        assert_eq!(rank_at(&cuts, 0.05, &levels), 8);
        assert_eq!(rank_at(&cuts, 0.2, &levels), 6);
        assert_eq!(rank_at(&cuts, 0.3, &levels), 4);
        assert_eq!(rank_at(&cuts, 0.9, &levels), 2);
        assert_eq!(rank_at(&cuts, f32::INFINITY, &levels), 2);
        assert_eq!(rank_at(&cuts, f32::NEG_INFINITY, &levels), 8);
        assert_eq!(ranks_at(&[cuts, cuts].concat(), 0.2, &levels), vec![6, 6]);
    }

    #[test]
    fn hold_parses_and_prints() {
        for h in [BudgetHold::Open, BudgetHold::Track, BudgetHold::Ceiling] {
            assert_eq!(h.to_string().parse::<BudgetHold>().unwrap(), h);
        }
        assert!("tight".parse::<BudgetHold>().is_err());
    }
}
