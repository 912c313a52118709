//! The last tokens of every append keep full rank, whatever the inner policy
//! gives them.
//!
//! Why: with SnapKV in front, the observation window (the question and the
//! end of the chat turn, the last `w` prompt tokens) is kept whole by SnapKV
//! because the answer reads it most; a rank policy that then truncates it
//! undoes that. With `n` at least the window, a prefill's window stays whole,
//! and so does every decoded token (a decode step appends one), as SnapKV
//! appends decoded tokens uncompressed. Its cost is `n` tokens per prompt.

use std::sync::Arc;

use super::{KvKind, RankPolicy};

#[derive(Debug, Clone)]
pub struct RecentFull {
    inner: Arc<dyn RankPolicy>,
    recent: usize,
    full: usize,
}

impl RecentFull {
    /// `full` is the full rank (the largest level).
    pub fn new(inner: Arc<dyn RankPolicy>, recent: usize, full: usize) -> Self {
        Self {
            inner,
            recent,
            full,
        }
    }
}

impl RankPolicy for RecentFull {
    fn name(&self) -> &'static str {
        "recent-full"
    }

    fn ranks(
        &self,
        layer: usize,
        kind: KvKind,
        latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        let mut r = self.inner.ranks(layer, kind, latents, positions);
        let from = r.len().saturating_sub(self.recent);
        r[from..].iter_mut().for_each(|x| *x = self.full);
        r
    }

    fn needs_latents(&self) -> bool {
        self.inner.needs_latents()
    }

    fn steerable(&self) -> Option<&dyn super::Steerable> {
        self.inner.steerable()
    }

    fn recent_full(&self) -> usize {
        self.recent.max(self.inner.recent_full())
    }

    fn sink_tokens(&self) -> usize {
        self.inner.sink_tokens()
    }

    fn hold(&self) -> Option<(super::BudgetHold, f64)> {
        self.inner.hold()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::RankTwo as Two;

    #[test]
    fn only_the_last_tokens_of_an_append_get_full_rank() {
        let p = RecentFull::new(Arc::new(Two), 3, 8);
        let pos: Vec<usize> = (10..15).collect();
        assert_eq!(p.ranks(0, KvKind::Key, &[], &pos), vec![2, 2, 8, 8, 8]);
        // a decode step: its one token is recent
        assert_eq!(p.ranks(0, KvKind::Value, &[], &[15]), vec![8]);
        assert!(!p.needs_latents());
        let off = RecentFull::new(Arc::new(Two), 0, 8);
        assert_eq!(off.ranks(0, KvKind::Key, &[], &pos), vec![2; 5]);
    }
}
