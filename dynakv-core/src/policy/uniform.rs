//! Every token of every layer keeps the same rank (Palu / EigenAttention
//! style), optionally with the first tokens kept whole (sink protection).

use super::{check_budget, KvKind, RankPolicy};
use crate::error::CoreError;
use crate::levels::RankLevels;

#[derive(Debug, Clone)]
pub struct UniformPolicy {
    pub rank: usize,
    /// Tokens at positions below this keep full rank.
    pub sink_tokens: usize,
    full: usize,
}

impl UniformPolicy {
    /// The level nearest to `budget * dim`.
    pub fn for_budget(
        budget: f64,
        levels: &RankLevels,
        sink_tokens: usize,
    ) -> Result<Self, CoreError> {
        check_budget(budget)?;
        let rank = levels
            .nearest(budget * levels.full() as f64)
            .max(levels.as_slice()[1]);
        Ok(Self {
            rank,
            sink_tokens,
            full: levels.full(),
        })
    }
}

impl RankPolicy for UniformPolicy {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn needs_latents(&self) -> bool {
        false
    }

    fn ranks(
        &self,
        _layer: usize,
        _kind: KvKind,
        _latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        positions
            .iter()
            .map(|&p| {
                if p < self.sink_tokens {
                    self.full
                } else {
                    self.rank
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_rank_except_sinks() {
        let l = RankLevels::multiples(8, 192).unwrap();
        let p = UniformPolicy::for_budget(0.30, &l, 1).unwrap();
        assert_eq!(p.rank, 56);
        assert_eq!(
            p.ranks(3, KvKind::Value, &[0.0; 192 * 3], &[0, 1, 2]),
            vec![192, 56, 56]
        );
        assert!(UniformPolicy::for_budget(0.0, &l, 1).is_err());
        assert!(UniformPolicy::for_budget(1.5, &l, 1).is_err());
    }
}
