//! The first tokens of a sequence keep full rank, whatever the inner
//! policy gives them.
//!
//! Why: the first token (BOS) is the attention sink most heads park their
//! weight on; a small error in its key moves every softmax. Uniform and
//! per-layer ranks keep it whole themselves, and the energy rule keeps it
//! by its relative error; a trained router has no such rule and, on Gemma 3,
//! compresses it (docs/results.md: uniform 0.30 without the sink costs
//! x1.79 PPL, with it x1.08).

use std::sync::Arc;

use super::{BudgetHold, KvKind, RankPolicy, Steerable};

#[derive(Debug, Clone)]
pub struct SinkFull {
    inner: Arc<dyn RankPolicy>,
    sinks: usize,
    full: usize,
}

impl SinkFull {
    /// Positions below `sinks` get `full` (the largest level).
    pub fn new(inner: Arc<dyn RankPolicy>, sinks: usize, full: usize) -> Self {
        Self { inner, sinks, full }
    }
}

impl RankPolicy for SinkFull {
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
        let mut r = self.inner.ranks(layer, kind, latents, positions);
        for (x, &p) in r.iter_mut().zip(positions) {
            if p < self.sinks {
                *x = self.full;
            }
        }
        r
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
        self.sinks.max(self.inner.sink_tokens())
    }

    fn hold(&self) -> Option<(BudgetHold, f64)> {
        self.inner.hold()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::RankTwo as Two;

    #[test]
    fn only_the_first_positions_get_full_rank() {
        let p = SinkFull::new(Arc::new(Two), 1, 8);
        assert_eq!(p.ranks(0, KvKind::Key, &[], &[0, 1, 2]), vec![8, 2, 2]);
        assert_eq!(p.ranks(0, KvKind::Value, &[], &[5]), vec![2]);
        assert_eq!(p.name(), "two");
        let off = SinkFull::new(Arc::new(Two), 0, 8);
        assert_eq!(off.ranks(0, KvKind::Key, &[], &[0, 1]), vec![2, 2]);
    }
}
