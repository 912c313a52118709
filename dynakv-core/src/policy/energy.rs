//! Token-wise and training-free: each token keeps the smallest rank whose
//! reconstruction error, relative to the token's own energy in the basis, is
//! at most a threshold. One threshold per layer and per K/V, fitted on
//! calibration tokens so that the average retained fraction meets the budget.
//! Works online, one token at a time. Attention sinks (small values far from
//! the mean) find full rank by themselves: their relative error stays large.

use serde::{Deserialize, Serialize};

use super::profile::rank_for;
use super::{check_budget, EnergySample, KvKind, RankPolicy, TailProfile};
use crate::error::CoreError;
use crate::levels::RankLevels;

/// How a token's tail-energy profile becomes a rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum EnergyRule {
    /// The smallest level whose relative error is at most `tau`: equal error per token.
    Threshold,
    /// The level minimising `relative error + lambda * rank / d`: water-filling,
    /// equal marginal error per dimension across tokens, layers and K/V.
    Lagrange,
}

impl std::str::FromStr for EnergyRule {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "threshold" => Ok(Self::Threshold),
            "lagrange" => Ok(Self::Lagrange),
            o => Err(CoreError::Invalid {
                field: "energy_rule",
                message: format!("`{o}` (expected threshold or lagrange)"),
            }),
        }
    }
}

/// The rank a rule gives a profile row with parameter `t` (`tau` or `lambda`).
fn rule_rank(rule: EnergyRule, rel: &[f32], t: f32, levels: &RankLevels) -> usize {
    match rule {
        EnergyRule::Threshold => rank_for(rel, t, levels),
        EnergyRule::Lagrange => {
            let lv = levels.as_slice();
            let d = levels.full() as f32;
            let mut best = (f32::INFINITY, levels.full());
            for (i, &e) in rel.iter().enumerate().skip(1) {
                let cost = e + t * lv[i] as f32 / d;
                if cost < best.0 {
                    best = (cost, lv[i]);
                }
            }
            best.1
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnergyPolicy {
    pub rule: EnergyRule,
    /// `[layer] -> [key, value]` threshold (or multiplier, for `lagrange`)
    pub thresholds: Vec<[f32; 2]>,
    /// `[layer] -> [key, value]` mean in latent coordinates (from the bases).
    pub mean_latents: Vec<[Vec<f32>; 2]>,
    pub levels: RankLevels,
}

impl EnergyPolicy {
    /// Fits thresholds so that the mean retained fraction over the sample is
    /// the budget: `tau_K = key_factor * tau`, `tau_V = tau`, bisection on `tau`.
    ///
    /// With `lagrange`, `key_factor` divides the key multiplier instead
    /// (`lambda_K = lambda / key_factor`: key error weighs `key_factor` as much).
    pub fn fit(
        sample: &EnergySample,
        mean_latents: Vec<[Vec<f32>; 2]>,
        levels: &RankLevels,
        budget: f64,
        key_factor: f32,
        rule: EnergyRule,
    ) -> Result<Self, CoreError> {
        check_budget(budget)?;
        if sample.n_tokens() == 0 || sample.rel.len() != mean_latents.len() {
            return Err(CoreError::Invalid {
                field: "calibration",
                message: "sample and bases disagree or are empty".into(),
            });
        }
        if !(key_factor > 0.0 && key_factor.is_finite()) {
            return Err(CoreError::Invalid {
                field: "key_factor",
                message: format!("must be > 0, got {key_factor}"),
            });
        }
        let layers = sample.rel.len();
        let pair = |t: f32| match rule {
            EnergyRule::Threshold => [key_factor * t, t],
            EnergyRule::Lagrange => [t / key_factor, t],
        };
        let retained = |t: f32| -> f64 {
            let mut dims = 0usize;
            for l in 0..layers {
                for (k, &tk) in pair(t).iter().enumerate() {
                    for i in 0..sample.n_tokens() {
                        dims += rule_rank(rule, sample.row(l, k, i), tk, levels);
                    }
                }
            }
            dims as f64 / (2 * layers * sample.n_tokens() * levels.full()) as f64
        };
        // retained falls as tau grows; search log tau.
        let (mut lo, mut hi) = (1e-9f64.ln(), 1e3f64.ln());
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if retained(mid.exp() as f32) > budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let tau = hi.exp() as f32;
        Ok(Self {
            rule,
            thresholds: vec![pair(tau); layers],
            mean_latents,
            levels: levels.clone(),
        })
    }
}

impl RankPolicy for EnergyPolicy {
    fn name(&self) -> &'static str {
        "energy"
    }

    fn ranks(
        &self,
        layer: usize,
        kind: KvKind,
        latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        let k = kind.index();
        let mean = &self.mean_latents[layer][k];
        let tau = self.thresholds[layer][k];
        let d = mean.len();
        latents
            .chunks_exact(d)
            .take(positions.len())
            .map(|l| {
                rule_rank(
                    self.rule,
                    &TailProfile::new(l, mean, &self.levels).rel,
                    tau,
                    &self.levels,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(levels: &RankLevels, latents: &[Vec<f32>], mean: &[f32]) -> EnergySample {
        let rows: Vec<f32> = latents
            .iter()
            .flat_map(|l| TailProfile::new(l, mean, levels).rel)
            .collect();
        EnergySample {
            rel: vec![[rows.clone(), rows]],
            n_levels: levels.as_slice().len(),
            positions: (0..latents.len()).collect(),
        }
    }

    #[test]
    fn fitted_thresholds_meet_the_budget_and_sinks_keep_full_rank() {
        let levels = RankLevels::multiples(2, 8).unwrap();
        let mean = vec![5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        // ordinary tokens: decaying spectra of varying spread
        let mut lat: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                (0..8)
                    .map(|j| (1.0 + (i % 5) as f32) / (1.0 + j as f32).powi(2))
                    .collect()
            })
            .collect();
        // a sink: its uncentred vector is near zero (latent = -mean) plus detail
        let sink = vec![-5.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3];
        lat.push(sink.clone());
        let s = sample(&levels, &lat, &mean);
        for (budget, rule) in [0.3, 0.5]
            .into_iter()
            .flat_map(|b| [(b, EnergyRule::Threshold), (b, EnergyRule::Lagrange)])
        {
            let p = EnergyPolicy::fit(
                &s,
                vec![[mean.clone(), mean.clone()]],
                &levels,
                budget,
                1.0,
                rule,
            )
            .unwrap();
            let flat: Vec<f32> = lat.iter().flatten().copied().collect();
            let pos: Vec<usize> = (0..lat.len()).collect();
            let r = p.ranks(0, KvKind::Value, &flat, &pos);
            let mean_r = r.iter().sum::<usize>() as f64 / (r.len() * 8) as f64;
            assert!(
                (mean_r - budget).abs() < 0.1,
                "{rule:?} budget {budget}: {mean_r}"
            );
            assert_eq!(*r.last().unwrap(), 8, "the sink keeps full rank");
        }
        assert!(EnergyPolicy::fit(
            &s,
            vec![[mean.clone(), mean]],
            &levels,
            1.2,
            1.0,
            EnergyRule::Threshold
        )
        .is_err());
    }
}
