//! Ranks per layer and per K/V, the same for every token (the MatryoshkaKV
//! baseline), found by a greedy search on calibration tokens: starting from
//! full rank, repeatedly lower the (layer, K/V) whose next level down costs the
//! least relative reconstruction error per dimension freed, until the budget
//! is met.

use serde::{Deserialize, Serialize};

use super::{check_budget, EnergySample, KvKind, RankPolicy};
use crate::error::CoreError;
use crate::levels::RankLevels;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PerLayerPolicy {
    /// `[layer] -> [key rank, value rank]`
    pub ranks: Vec<[usize; 2]>,
    pub sink_tokens: usize,
    full: usize,
}

impl PerLayerPolicy {
    pub fn fit(
        sample: &EnergySample,
        levels: &RankLevels,
        budget: f64,
        sink_tokens: usize,
    ) -> Result<Self, CoreError> {
        check_budget(budget)?;
        let n = sample.n_tokens();
        if n == 0 {
            return Err(CoreError::Invalid {
                field: "calibration",
                message: "no calibration tokens".into(),
            });
        }
        let lv = levels.as_slice();
        let top = lv.len() - 1;
        let layers = sample.rel.len();
        // mean relative tail energy at each level index
        let loss: Vec<[Vec<f64>; 2]> = (0..layers)
            .map(|l| {
                [0, 1].map(|k| {
                    (0..lv.len())
                        .map(|i| {
                            (0..n).map(|t| sample.row(l, k, t)[i] as f64).sum::<f64>() / n as f64
                        })
                        .collect()
                })
            })
            .collect();
        let mut idx = vec![[top, top]; layers];
        let target = budget * (2 * layers * levels.full()) as f64;
        let mut total: f64 = (2 * layers * levels.full()) as f64;
        while total > target {
            let mut best: Option<(f64, usize, usize)> = None;
            for (l, pair) in idx.iter().enumerate() {
                for k in 0..2 {
                    let i = pair[k];
                    if i <= 1 {
                        continue; // never below the smallest non-zero level
                    }
                    let cost = (loss[l][k][i - 1] - loss[l][k][i]) / (lv[i] - lv[i - 1]) as f64;
                    if best.is_none_or(|b| cost < b.0) {
                        best = Some((cost, l, k));
                    }
                }
            }
            let Some((_, l, k)) = best else { break };
            let i = idx[l][k];
            total -= (lv[i] - lv[i - 1]) as f64;
            idx[l][k] = i - 1;
        }
        Ok(Self {
            ranks: idx.iter().map(|p| [lv[p[0]], lv[p[1]]]).collect(),
            sink_tokens,
            full: levels.full(),
        })
    }
}

impl RankPolicy for PerLayerPolicy {
    fn name(&self) -> &'static str {
        "per-layer"
    }

    fn needs_latents(&self) -> bool {
        false
    }

    fn ranks(
        &self,
        layer: usize,
        kind: KvKind,
        _latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        let r = self.ranks.get(layer).map_or(self.full, |p| p[kind.index()]);
        positions
            .iter()
            .map(|&p| if p < self.sink_tokens { self.full } else { r })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_meets_the_budget_and_favours_the_costly_layer() {
        let levels = RankLevels::multiples(2, 8).unwrap();
        // layer 0 keys lose little when truncated, layer 0 values a lot
        let cheap = [1.0f32, 0.01, 0.005, 0.001, 0.0];
        let costly = [1.0f32, 0.8, 0.6, 0.3, 0.0];
        let sample = EnergySample {
            rel: vec![[cheap.repeat(3), costly.repeat(3)]],
            n_levels: 5,
            positions: vec![0, 1, 2],
        };
        let p = PerLayerPolicy::fit(&sample, &levels, 0.5, 0).unwrap();
        let [k, v] = p.ranks[0];
        assert_eq!(k + v, 8, "half of 2 x 8 dims");
        assert!(v > k, "values keep more: {k} {v}");
        assert_eq!(p.ranks(0, KvKind::Value, &[], &[5]), vec![v]);
        assert!(PerLayerPolicy::fit(&sample, &levels, 0.0, 0).is_err());
    }
}
