//! The learned token-wise router (DynaKV's contribution), at inference.
//!
//! Per layer and per K/V, a linear map of the token's latent gives a
//! distribution `p = softmax(latent · W + b)` over the cut-off points (the
//! non-zero rank levels). The soft mask of latent coordinate i is the
//! probability that the cut-off lies beyond it, `m_i = Σ_{j : level_j > i} p_j`:
//! a non-increasing prefix with `m_0 = 1`. Inference keeps the coordinates whose
//! mask exceeds `tau`, so the rank is the largest level whose survival
//! probability `S_j = Σ_{j' ≥ j} p_j'` exceeds `tau`. Training lives in
//! `dynakv-burn` (`train` module); this file only reads trained weights.

use serde::{Deserialize, Serialize};

use super::steer::Steerable;
use super::{KvKind, RankPolicy};
use crate::error::CoreError;
use crate::levels::RankLevels;

/// One router: `logits = latent · w + b`, one logit per non-zero level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterWeights {
    pub dim: usize,
    /// Non-zero rank levels (cut-off points).
    pub choices: usize,
    /// `[dim, choices]` row-major.
    pub w: Vec<f32>,
    /// `[choices]`
    pub b: Vec<f32>,
}

impl RouterWeights {
    /// A router with zero weights (every cut-off equally likely).
    pub fn zeros(dim: usize, choices: usize) -> Self {
        Self {
            dim,
            choices,
            w: vec![0.0; dim * choices],
            b: vec![0.0; choices],
        }
    }

    pub fn check(&self) -> Result<(), CoreError> {
        if self.w.len() != self.dim * self.choices || self.b.len() != self.choices {
            return Err(CoreError::Invalid {
                field: "router",
                message: format!(
                    "weights of {} and {} values for dim {} and {} choices",
                    self.w.len(),
                    self.b.len(),
                    self.dim,
                    self.choices
                ),
            });
        }
        Ok(())
    }

    /// Survival probabilities `S_j = P(cut-off at level j or beyond)`,
    /// `S_0 = 1`, non-increasing.
    pub fn survival(&self, latent: &[f32]) -> Vec<f32> {
        let k = self.choices;
        let mut logits = self.b.clone();
        for (i, &x) in latent.iter().enumerate().take(self.dim) {
            let row = &self.w[i * k..(i + 1) * k];
            for (l, &w) in logits.iter_mut().zip(row) {
                *l += x * w;
            }
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|&l| (l - m).exp()).collect();
        let z: f32 = e.iter().sum();
        let mut s = vec![0f32; k];
        let mut acc = 0f32;
        for j in (0..k).rev() {
            acc += e[j] / z;
            s[j] = acc;
        }
        if let Some(first) = s.first_mut() {
            *first = 1.0;
        }
        s
    }

    /// The largest non-zero level whose survival exceeds `tau` (the number of
    /// leading ones of the hard mask `1[m > tau]`).
    pub fn rank(&self, latent: &[f32], tau: f32, levels: &RankLevels) -> usize {
        let lv = &levels.as_slice()[1..];
        let s = self.survival(latent);
        let j = s.iter().rposition(|&x| x > tau).unwrap_or(0);
        lv[j.min(lv.len() - 1)]
    }

    /// One token's cuts (see [`Steerable`]): the rank is at least level
    /// `i + 1` while some survival from `i` on exceeds `tau`, so the cut is
    /// the largest survival from `i` on (`+inf` for the smallest level, which
    /// every stored token keeps).
    pub fn cuts(&self, latent: &[f32], out: &mut Vec<f32>) {
        let s = self.survival(latent);
        let start = out.len();
        let mut run = f32::NEG_INFINITY;
        out.extend(s.iter().rev().map(|&x| {
            run = run.max(x);
            run
        }));
        out[start..].reverse();
        if let Some(first) = out.get_mut(start) {
            *first = f32::INFINITY;
        }
    }
}

/// Trained routers of every layer and the inference threshold.
#[derive(Debug, Clone)]
pub struct RouterPolicy {
    /// `[layer] -> [key router, value router]`
    pub routers: Vec<[RouterWeights; 2]>,
    pub levels: RankLevels,
    pub tau: f32,
    /// `[layer] -> [key, value]` retained fraction at `tau` on the held-out
    /// calibration latents, when the artifact recorded it.
    pub shares: Option<Vec<[f64; 2]>>,
}

impl RouterPolicy {
    pub fn new(
        routers: Vec<[RouterWeights; 2]>,
        levels: RankLevels,
        tau: f32,
    ) -> Result<Self, CoreError> {
        let choices = levels.as_slice().len() - 1;
        for r in routers.iter().flatten() {
            r.check()?;
            if r.choices != choices || r.dim != levels.full() {
                return Err(CoreError::Invalid {
                    field: "router",
                    message: format!(
                        "router for dim {} with {} choices, levels give {} and {choices}",
                        r.dim,
                        r.choices,
                        levels.full()
                    ),
                });
            }
        }
        if !(0.0..1.0).contains(&tau) {
            return Err(CoreError::Invalid {
                field: "tau",
                message: format!("must be in [0, 1), got {tau}"),
            });
        }
        Ok(Self {
            routers,
            levels,
            tau,
            shares: None,
        })
    }

    /// Per-layer retained fractions on the calibration text (from
    /// [`RouterPolicy::shares_at`] at training), which a budget controller
    /// keeps; ignored unless there is one pair per router.
    pub fn with_shares(mut self, shares: Vec<[f64; 2]>) -> Self {
        if shares.len() == self.routers.len() && !shares.is_empty() {
            self.shares = Some(shares);
        }
        self
    }

    /// Retained fraction per layer and K/V on `latents` at `tau`.
    pub fn shares_at(&self, latents: &[[Vec<f32>; 2]], tau: f32) -> Vec<[f64; 2]> {
        let d = self.levels.full();
        latents
            .iter()
            .zip(&self.routers)
            .map(|(pair, routers)| {
                [0, 1].map(|k| {
                    let rows = pair[k].len() / d;
                    let dims: usize = pair[k]
                        .chunks_exact(d)
                        .map(|row| routers[k].rank(row, tau, &self.levels))
                        .sum();
                    dims as f64 / (rows * d).max(1) as f64
                })
            })
            .collect()
    }

    /// Mean retained fraction these routers give a set of latents at `tau`:
    /// `latents[layer][kind]` row-major `[n, dim]`.
    pub fn retained_at(&self, latents: &[[Vec<f32>; 2]], tau: f32) -> f64 {
        let d = self.levels.full();
        let (mut sum, mut n) = (0f64, 0usize);
        for (l, pair) in latents.iter().enumerate() {
            for (k, lat) in pair.iter().enumerate() {
                for row in lat.chunks_exact(d) {
                    sum += self.routers[l][k].rank(row, tau, &self.levels) as f64 / d as f64;
                    n += 1;
                }
            }
        }
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    /// The threshold whose mean retained fraction on `latents` is closest to
    /// `budget` (bisection; retained falls as tau grows).
    pub fn fit_tau(&self, latents: &[[Vec<f32>; 2]], budget: f64) -> f32 {
        let (mut lo, mut hi) = (0f32, 0.999f32);
        for _ in 0..30 {
            let mid = 0.5 * (lo + hi);
            if self.retained_at(latents, mid) > budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (a, b) = (self.retained_at(latents, lo), self.retained_at(latents, hi));
        if (a - budget).abs() <= (b - budget).abs() {
            lo
        } else {
            hi
        }
    }
}

impl RankPolicy for RouterPolicy {
    fn name(&self) -> &'static str {
        "router"
    }

    fn ranks(
        &self,
        layer: usize,
        kind: KvKind,
        latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        let d = self.levels.full();
        let Some(pair) = self.routers.get(layer) else {
            return vec![d; positions.len()];
        };
        let r = &pair[kind.index()];
        latents
            .chunks_exact(d)
            .map(|row| r.rank(row, self.tau, &self.levels))
            .collect()
    }

    fn steerable(&self) -> Option<&dyn Steerable> {
        Some(self)
    }
}

impl Steerable for RouterPolicy {
    fn levels(&self) -> &RankLevels {
        &self.levels
    }

    fn point(&self, _layer: usize, _kind: KvKind) -> f32 {
        self.tau
    }

    fn fitted_share(&self, layer: usize, kind: KvKind) -> Option<f64> {
        self.shares.as_ref()?.get(layer).map(|s| s[kind.index()])
    }

    fn cuts(&self, layer: usize, kind: KvKind, latents: &[f32], n: usize) -> Vec<f32> {
        let d = self.levels.full();
        let m = self.levels.as_slice().len() - 1;
        let mut out = Vec::with_capacity(n * m);
        match self.routers.get(layer) {
            Some(pair) => {
                for row in latents.chunks_exact(d).take(n) {
                    pair[kind.index()].cuts(row, &mut out);
                }
            }
            // No router: full rank at any point.
            None => out.resize(n * m, f32::INFINITY),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> RankLevels {
        RankLevels::multiples(2, 8).unwrap() // 0, 2, 4, 6, 8: four choices
    }

    #[test]
    fn survival_is_a_non_increasing_prefix_starting_at_one() {
        let mut r = RouterWeights::zeros(8, 4);
        r.w[5] = 0.7;
        r.b = vec![0.3, -1.0, 2.0, 0.1];
        let s = r.survival(&[1.0, -2.0, 0.5, 0.0, 3.0, 1.0, 0.0, 0.2]);
        assert_eq!(s[0], 1.0);
        assert!(s.windows(2).all(|w| w[0] >= w[1] - 1e-7), "{s:?}");
        assert!(s[3] > 0.0);
    }

    #[test]
    fn hard_rank_is_where_the_mask_crosses_tau() {
        // Uniform p over 4 choices: survival 1, 0.75, 0.5, 0.25.
        let r = RouterWeights::zeros(8, 4);
        let x = [0.0; 8];
        assert_eq!(r.rank(&x, 0.1, &levels()), 8);
        assert_eq!(r.rank(&x, 0.3, &levels()), 6);
        assert_eq!(r.rank(&x, 0.6, &levels()), 4);
        assert_eq!(r.rank(&x, 0.8, &levels()), 2);
        // A router sure of the smallest level.
        let mut sure = RouterWeights::zeros(8, 4);
        sure.b = vec![20.0, 0.0, 0.0, 0.0];
        assert_eq!(sure.rank(&x, 0.1, &levels()), 2);
    }

    #[test]
    fn cuts_give_the_hard_ranks_at_every_tau() {
        let mut r = RouterWeights::zeros(8, 4);
        r.w[3] = 0.9;
        r.w[14] = -1.3;
        r.b = vec![0.2, -0.4, 0.8, 0.1];
        let p = RouterPolicy::new(vec![[r.clone(), r.clone()]], levels(), 0.4).unwrap();
        for i in 0..50 {
            let x: Vec<f32> = (0..8)
                .map(|j| ((i * 7 + j * 3) % 11) as f32 / 3.0 - 1.5)
                .collect();
            let cuts = p.cuts(0, KvKind::Key, &x, 1);
            for tau in [0.0f32, 0.05, 0.2, 0.4, 0.6, 0.9, 0.99] {
                assert_eq!(
                    super::super::steer::rank_at(&cuts, tau, &levels()),
                    r.rank(&x, tau, &levels()),
                    "token {i} tau {tau}: {cuts:?}"
                );
            }
        }
        let lat = vec![[vec![0.5f32; 16], vec![-0.5f32; 16]]];
        let shares = p.shares_at(&lat, 0.4);
        assert_eq!(shares.len(), 1);
        let p = p.with_shares(shares.clone());
        assert_eq!(p.fitted_share(0, KvKind::Value), Some(shares[0][1]));
    }

    #[test]
    fn tau_fit_hits_the_budget_and_bad_weights_are_errors() {
        let r = RouterWeights::zeros(8, 4);
        let p = RouterPolicy::new(vec![[r.clone(), r.clone()]], levels(), 0.1).unwrap();
        let lat = vec![[vec![0.0f32; 16], vec![0.0f32; 16]]];
        let tau = p.fit_tau(&lat, 0.5);
        assert!((p.retained_at(&lat, tau) - 0.5).abs() < 1e-9, "{tau}");
        let mut bad = r.clone();
        bad.b.pop();
        assert!(RouterPolicy::new(vec![[bad, r.clone()]], levels(), 0.1).is_err());
        assert!(RouterPolicy::new(vec![[r.clone(), r]], levels(), 1.0).is_err());
    }
}
