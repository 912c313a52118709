//! Rank levels: the ranks a token may be given. Tokens of equal level share a
//! contiguous bucket, so few levels keep storage compact; rank 0 means the
//! token is not stored at all.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Ascending ranks, the last equal to the full dimension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankLevels {
    levels: Vec<usize>,
}

impl RankLevels {
    /// Multiples of `step` up to `dim`, with 0 (the default: step 8).
    pub fn multiples(step: usize, dim: usize) -> Result<Self, CoreError> {
        if step == 0 || dim == 0 || !dim.is_multiple_of(step) {
            return Err(CoreError::Invalid {
                field: "levels",
                message: format!("step {step} must divide dim {dim}"),
            });
        }
        Self::new((0..=dim / step).map(|i| i * step).collect(), dim)
    }

    /// Explicit levels; must ascend strictly and end at `dim`.
    pub fn new(mut levels: Vec<usize>, dim: usize) -> Result<Self, CoreError> {
        if !levels.contains(&0) {
            levels.insert(0, 0);
        }
        if levels.windows(2).any(|w| w[0] >= w[1]) || levels.last() != Some(&dim) {
            return Err(CoreError::Invalid {
                field: "levels",
                message: format!("{levels:?} must ascend strictly and end at {dim}"),
            });
        }
        Ok(Self { levels })
    }

    pub fn as_slice(&self) -> &[usize] {
        &self.levels
    }

    pub fn full(&self) -> usize {
        *self.levels.last().unwrap_or(&0)
    }

    /// The smallest level that is at least `r` (full when `r` exceeds all).
    pub fn round_up(&self, r: usize) -> usize {
        self.levels
            .iter()
            .copied()
            .find(|&l| l >= r)
            .unwrap_or(self.full())
    }

    /// The level nearest to `r` (ties go up).
    pub fn nearest(&self, r: f64) -> usize {
        let mut best = self.full();
        for &l in &self.levels {
            if (l as f64 - r).abs() <= (best as f64 - r).abs() {
                best = l;
            }
        }
        best
    }

    /// Whether `r` is one of the levels.
    pub fn contains(&self, r: usize) -> bool {
        self.levels.binary_search(&r).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_levels_and_rounding() {
        let l = RankLevels::multiples(8, 192).unwrap();
        assert_eq!(l.as_slice().len(), 25);
        assert_eq!(l.round_up(1), 8);
        assert_eq!(l.round_up(8), 8);
        assert_eq!(l.round_up(500), 192);
        assert_eq!(l.nearest(0.47 * 192.0), 88);
        assert!(l.contains(0) && !l.contains(7));
        assert!(RankLevels::multiples(7, 192).is_err());
        assert!(RankLevels::new(vec![8, 4, 192], 192).is_err());
        assert!(RankLevels::new(vec![8, 64], 192).is_err());
    }
}
