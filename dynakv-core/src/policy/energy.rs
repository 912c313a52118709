//! Token-wise and training-free: each token keeps the smallest rank whose
//! reconstruction error, relative to the token's own energy in the basis, is
//! at most a threshold. One threshold per layer and per K/V, fitted on
//! calibration tokens so that the average retained fraction meets the budget.
//! Works online, one token at a time. Attention sinks (small values far from
//! the mean) find full rank by themselves: their relative error stays large.

use serde::{Deserialize, Serialize};

use super::steer::{rank_at, Steerable};
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

/// The cuts of one token's profile row under a rule (see [`Steerable`]): the
/// token keeps at least level `i + 1` while the parameter (`tau` or `lambda`)
/// is below `cut[i]`.
///
/// `threshold`: the rank is the smallest non-zero level whose relative error
/// is at most `tau`, so level `i + 1` is kept while every smaller non-zero
/// level's error exceeds `tau`: `cut[i] = min(rel[1..=i])`.
///
/// `lagrange`: the rank minimises `rel[j] + lambda * lv[j] / d` (ties to the
/// smaller level). As `lambda` grows the minimiser walks down the lower
/// convex hull of the points `(lv[j], rel[j])`, leaving hull vertex `b` for
/// the previous vertex `a` where their costs cross,
/// `lambda = (rel[a] - rel[b]) * d / (lv[b] - lv[a])`; every level between
/// `a` (exclusive) and `b` (inclusive) has that cut. O(levels) per token.
fn profile_cuts(rule: EnergyRule, rel: &[f32], levels: &RankLevels, out: &mut Vec<f32>) {
    let lv = levels.as_slice();
    let m = lv.len() - 1;
    let start = out.len();
    out.push(f32::INFINITY);
    match rule {
        EnergyRule::Threshold => {
            let mut prev = f32::INFINITY;
            for &r in &rel[1..m] {
                prev = prev.min(r);
                out.push(prev);
            }
        }
        EnergyRule::Lagrange => {
            let d = levels.full() as f64;
            let pt = |j: usize| (lv[j] as f64, rel[j] as f64);
            // lower hull of levels 1..=m, by ascending level
            let mut hull: Vec<usize> = Vec::with_capacity(m);
            for j in 1..=m {
                while hull.len() >= 2 {
                    let (o, a, b) = (pt(hull[hull.len() - 2]), pt(hull[hull.len() - 1]), pt(j));
                    if (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0) <= 0.0 {
                        hull.pop();
                    } else {
                        break;
                    }
                }
                hull.push(j);
            }
            for w in hull.windows(2) {
                let (a, b) = (pt(w[0]), pt(w[1]));
                let cut = ((a.1 - b.1) * d / (b.0 - a.0)) as f32;
                // levels w[0]+1 ..= w[1]; out[i - 1] is level index i
                out.extend(std::iter::repeat_n(cut, w[1] - w[0]));
            }
            // non-increasing, as a hull's crossings are (rounding aside)
            let mut prev = f32::INFINITY;
            for c in &mut out[start..] {
                prev = prev.min(*c);
                *c = prev;
            }
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
    /// `[layer] -> [key, value]` retained fraction on the calibration sample
    /// at the fitted thresholds (each layer's share of the budget).
    #[serde(default)]
    pub shares: Vec<[f64; 2]>,
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
        let n = sample.n_tokens();
        let m = levels.as_slice().len() - 1;
        let pair = |t: f32| match rule {
            EnergyRule::Threshold => [key_factor * t, t],
            EnergyRule::Lagrange => [t / key_factor, t],
        };
        // Cuts of every sampled token, once: `[layer][kind] -> [n, m]`.
        let cuts: Vec<[Vec<f32>; 2]> = (0..layers)
            .map(|l| {
                [0, 1].map(|k| {
                    let mut c = Vec::with_capacity(n * m);
                    for i in 0..n {
                        profile_cuts(rule, sample.row(l, k, i), levels, &mut c);
                    }
                    c
                })
            })
            .collect();
        let share = |l: usize, k: usize, t: f32| -> f64 {
            let dims: usize = cuts[l][k]
                .chunks_exact(m)
                .map(|c| rank_at(c, t, levels))
                .sum();
            dims as f64 / (n * levels.full()) as f64
        };
        let retained = |t: f32| -> f64 {
            let p = pair(t);
            let s: f64 = (0..layers)
                .map(|l| share(l, 0, p[0]) + share(l, 1, p[1]))
                .sum();
            s / (2 * layers) as f64
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
        let p = pair(tau);
        Ok(Self {
            rule,
            thresholds: vec![p; layers],
            mean_latents,
            levels: levels.clone(),
            shares: (0..layers)
                .map(|l| [share(l, 0, p[0]), share(l, 1, p[1])])
                .collect(),
        })
    }

    /// Cuts of `n` tokens' latents, row-major `[n, levels - 1]`.
    fn token_cuts(&self, layer: usize, kind: KvKind, latents: &[f32], n: usize) -> Vec<f32> {
        let mean = &self.mean_latents[layer][kind.index()];
        let d = mean.len();
        let mut out = Vec::with_capacity(n * (self.levels.as_slice().len() - 1));
        for l in latents.chunks_exact(d).take(n) {
            let rel = TailProfile::new(l, mean, &self.levels).rel;
            profile_cuts(self.rule, &rel, &self.levels, &mut out);
        }
        out
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
        let cuts = self.token_cuts(layer, kind, latents, positions.len());
        super::ranks_at(&cuts, self.point(layer, kind), &self.levels)
    }

    fn steerable(&self) -> Option<&dyn Steerable> {
        Some(self)
    }
}

impl Steerable for EnergyPolicy {
    fn levels(&self) -> &RankLevels {
        &self.levels
    }

    fn point(&self, layer: usize, kind: KvKind) -> f32 {
        self.thresholds[layer][kind.index()]
    }

    fn fitted_share(&self, layer: usize, kind: KvKind) -> Option<f64> {
        self.shares.get(layer).map(|s| s[kind.index()])
    }

    fn cuts(&self, layer: usize, kind: KvKind, latents: &[f32], n: usize) -> Vec<f32> {
        self.token_cuts(layer, kind, latents, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules as first written, one token at a time.
    fn direct_rank(rule: EnergyRule, rel: &[f32], t: f32, levels: &RankLevels) -> usize {
        let lv = levels.as_slice();
        match rule {
            EnergyRule::Threshold => (1..lv.len())
                .find(|&i| rel[i] <= t)
                .map_or(levels.full(), |i| lv[i]),
            EnergyRule::Lagrange => {
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

    #[test]
    fn cuts_give_the_rules_ranks_at_every_point() {
        let levels = RankLevels::multiples(8, 64).unwrap();
        let mean = vec![0.5f32; 64];
        let mut s = 12345u32;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20_000) as f32 / 10_000.0 - 1.0
        };
        let (mut agree, mut total) = (0, 0);
        for tok in 0..300 {
            let lat: Vec<f32> = (0..64)
                .map(|j| next() * 3.0 / (1.0 + (j as f32) * (tok % 7) as f32 * 0.1))
                .collect();
            let rel = TailProfile::new(&lat, &mean, &levels).rel;
            for rule in [EnergyRule::Threshold, EnergyRule::Lagrange] {
                let mut cuts = Vec::new();
                profile_cuts(rule, &rel, &levels, &mut cuts);
                assert!(cuts.windows(2).all(|w| w[0] >= w[1]), "{cuts:?}");
                for t in [1e-4f32, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0] {
                    total += 1;
                    let want = direct_rank(rule, &rel, t, &levels);
                    let got = rank_at(&cuts, t, &levels);
                    // Threshold cuts are the profile itself: exact. The
                    // lagrange bound may round the other way at a tie.
                    if rule == EnergyRule::Threshold {
                        assert_eq!(got, want, "{rule:?} t={t}");
                    }
                    agree += usize::from(got == want);
                }
            }
        }
        assert!(agree as f64 >= 0.999 * total as f64, "{agree} of {total}");
    }

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
