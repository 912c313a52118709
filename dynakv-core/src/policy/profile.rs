//! Per-token tail energy in a basis: what a rank costs in reconstruction error.

use serde::{Deserialize, Serialize};

use crate::levels::RankLevels;

/// For one token: the error left at each level, relative to the token's own
/// (uncentred) energy in the basis metric.
///
/// `rel[i]` = `sum_{j >= level_i} latent_j^2 / ||latent + mean_latent||^2`.
/// Truncation pulls a token towards the mean; a token far from the mean and
/// small in norm (an attention sink's value) has a large relative error at
/// every rank below full, so it keeps its dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct TailProfile {
    pub rel: Vec<f32>,
}

impl TailProfile {
    pub fn new(latent: &[f32], mean_latent: &[f32], levels: &RankLevels) -> Self {
        let own: f32 = latent
            .iter()
            .zip(mean_latent)
            .map(|(l, m)| (l + m) * (l + m))
            .sum::<f32>()
            .max(1e-30);
        // suffix sums of squared latents
        let d = latent.len();
        let mut tail = vec![0f32; d + 1];
        for j in (0..d).rev() {
            tail[j] = tail[j + 1] + latent[j] * latent[j];
        }
        let rel = levels
            .as_slice()
            .iter()
            .map(|&l| tail[l.min(d)] / own)
            .collect();
        Self { rel }
    }
}

/// Tail profiles of calibration tokens, per layer and per K/V, used to fit
/// thresholds and per-layer ranks to a budget.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EnergySample {
    /// `[layer][kind] -> tokens x levels` relative tail energies, row-major.
    pub rel: Vec<[Vec<f32>; 2]>,
    pub n_levels: usize,
    /// Positions of the sampled tokens (same for every layer).
    pub positions: Vec<usize>,
}

impl EnergySample {
    pub fn n_tokens(&self) -> usize {
        self.positions.len()
    }

    pub fn row(&self, layer: usize, kind: usize, token: usize) -> &[f32] {
        &self.rel[layer][kind][token * self.n_levels..(token + 1) * self.n_levels]
    }
}
