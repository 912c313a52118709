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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnergyPolicy {
    /// `[layer] -> [key threshold, value threshold]`
    pub thresholds: Vec<[f32; 2]>,
    /// `[layer] -> [key, value]` mean in latent coordinates (from the bases).
    pub mean_latents: Vec<[Vec<f32>; 2]>,
    pub levels: RankLevels,
}

impl EnergyPolicy {
    /// Fits thresholds so that the mean retained fraction over the sample is
    /// the budget: `tau_K = key_factor * tau`, `tau_V = tau`, bisection on `tau`.
    pub fn fit(
        sample: &EnergySample,
        mean_latents: Vec<[Vec<f32>; 2]>,
        levels: &RankLevels,
        budget: f64,
        key_factor: f32,
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
        let retained = |tau: f32| -> f64 {
            let t = [key_factor * tau, tau];
            let mut dims = 0usize;
            for l in 0..layers {
                for (k, &tk) in t.iter().enumerate() {
                    for i in 0..sample.n_tokens() {
                        dims += rank_for(sample.row(l, k, i), tk, levels);
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
            thresholds: vec![[key_factor * tau, tau]; layers],
            mean_latents,
            levels: levels.clone(),
        })
    }
}

impl RankPolicy for EnergyPolicy {
    fn name(&self) -> &'static str {
        "energy"
    }

    fn ranks(&self, layer: usize, kind: KvKind, latents: &[f32], positions: &[usize]) -> Vec<usize> {
        let k = kind.index();
        let mean = &self.mean_latents[layer][k];
        let tau = self.thresholds[layer][k];
        let d = mean.len();
        latents
            .chunks_exact(d)
            .take(positions.len())
            .map(|l| TailProfile::new(l, mean, &self.levels).rank_for(tau, &self.levels))
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
            .map(|i| (0..8).map(|j| (1.0 + (i % 5) as f32) / (1.0 + j as f32).powi(2)).collect())
            .collect();
        // a sink: its uncentred vector is near zero (latent = -mean) plus detail
        let sink = vec![-5.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3];
        lat.push(sink.clone());
        let s = sample(&levels, &lat, &mean);
        for budget in [0.3, 0.5] {
            let p = EnergyPolicy::fit(&s, vec![[mean.clone(), mean.clone()]], &levels, budget, 1.0).unwrap();
            let flat: Vec<f32> = lat.iter().flatten().copied().collect();
            let pos: Vec<usize> = (0..lat.len()).collect();
            let r = p.ranks(0, KvKind::Value, &flat, &pos);
            let mean_r = r.iter().sum::<usize>() as f64 / (r.len() * 8) as f64;
            assert!((mean_r - budget).abs() < 0.1, "budget {budget}: {mean_r}");
            assert_eq!(*r.last().unwrap(), 8, "the sink keeps full rank");
        }
        assert!(EnergyPolicy::fit(&s, vec![[mean.clone(), mean]], &levels, 1.2, 1.0).is_err());
    }
}
