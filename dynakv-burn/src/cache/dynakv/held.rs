//! A prompt held whole until SnapKV has pruned it, then ranked in tiers.
//!
//! Why: composed with SnapKV, a prompt's tokens used to be compressed as
//! they arrived, before SnapKV knew which of them the question reads; at a
//! few percent of the cache the needle's keys were truncated with the rest
//! (docs/results.md, long context). Held whole, the prompt is attended at
//! full rank during prefill (as SnapKV over the dense cache is), SnapKV
//! scores it, and only then do the kept tokens take their ranks: the first
//! by SnapKV's priority (its window, then the highest scores) keep full
//! rank, the others the ranks the policy planned for them over the whole
//! prompt. Memory during prefill is the full-rank prompt's, as for SnapKV
//! over the dense cache.

use dynakv_core::policy::KvKind;

use super::prune::layer_keep_set;
use super::DynaKvCache;
use crate::cache::KeepPositions;
use crate::error::CacheError;

/// Where a layer's prompt stands when the cache holds prompts whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PromptHold {
    /// Nothing appended yet: the next append is the prompt.
    Waiting,
    /// The prompt is stored at full rank, waiting for its tiers.
    Holding,
    /// Ranked: later appends take the policy's ranks.
    Ranked,
}

impl DynaKvCache {
    /// From now on (and after every reset) each layer's first append is
    /// stored at full rank until [`DynaKvCache::rank_held_prompt`].
    pub(super) fn hold_prompts(&mut self) {
        self.holds = Some(vec![PromptHold::Waiting; self.geometry.n_layers]);
    }

    /// Whether `layer` holds a prompt at full rank, waiting for its tiers.
    pub(super) fn holds_prompt(&self, layer: usize) -> bool {
        self.holds.as_ref().and_then(|h| h.get(layer)) == Some(&PromptHold::Holding)
    }

    /// Full ranks for `n` tokens when this append is a held prompt (the
    /// layer moves to holding), `None` otherwise.
    pub(super) fn held_ranks(&mut self, layer: usize, n: usize) -> Option<Vec<usize>> {
        let hold = self.holds.as_mut()?.get_mut(layer)?;
        match hold {
            PromptHold::Waiting => {
                *hold = PromptHold::Holding;
                Some(vec![self.bases.levels.full(); n])
            }
            PromptHold::Holding => Some(vec![self.bases.levels.full(); n]),
            PromptHold::Ranked => None,
        }
    }

    /// Puts every layer back to waiting for its prompt (on reset).
    pub(super) fn rewind_holds(&mut self) {
        if let Some(h) = &mut self.holds {
            h.iter_mut().for_each(|s| *s = PromptHold::Waiting);
        }
    }

    /// Prunes and ranks a held prompt: every held token is first ranked as
    /// it would have been on arrival (through the budget controller, whose
    /// window of cuts then holds the whole prompt, not only the kept tokens
    /// SnapKV favours), then the tokens not in `keep` are dropped, the kept
    /// ones at the positions in `whole` take full rank and the others their
    /// planned rank, and, without whole tokens, the budget is restored as
    /// after any pruning ([`DynaKvCache::rerank_to_budget`]). A token whose
    /// key gets rank 0 stores no value.
    pub(super) fn rank_held_prompt(
        &mut self,
        layer: usize,
        keep: &KeepPositions,
        whole: &[usize],
    ) -> Result<(), CacheError> {
        if !self.holds_prompt(layer) {
            return Err(CacheError::Config(format!(
                "layer {layer} holds no prompt to rank (the cache was not told to hold \
                 prompts whole, or this layer's prompt is ranked already)"
            )));
        }
        let (full, d) = (self.bases.levels.full(), self.bases.d_kv);
        let positions: Vec<usize> = self.layers[layer].positions.iter().collect();
        let n_ids = self.layers[layer].next_id;
        let kept = layer_keep_set(keep)?;
        let whole: std::collections::HashSet<usize> = whole.iter().copied().collect();
        let mut by_id: [(Vec<f32>, Vec<usize>); 2] = Default::default();
        for kind in [KvKind::Key, KvKind::Value] {
            // the ranks every held token would have taken on arrival
            let (ids, rows) = self.stored_rows(layer, kind)?;
            let pos: Vec<usize> = ids.iter().map(|&id| positions[id]).collect();
            let read: &[f32] = if self.policy.needs_latents() {
                &rows
            } else {
                &[]
            };
            let planned = match &mut self.controller {
                Some(c) => c.ranks(&*self.policy, layer, kind, read, &pos),
                None => self.policy.ranks(layer, kind, read, &pos),
            };
            if planned.len() != ids.len() || planned.iter().any(|&r| !self.bases.levels.contains(r))
            {
                return Err(CacheError::Config(
                    "the rank policy returned ranks that are not levels, or not one per token"
                        .into(),
                ));
            }
            // SnapKV's selection: the kept tokens at their planned ranks,
            // the whole ones at full rank, the others dropped (rank 0)
            let mut all = vec![0f32; n_ids * d];
            let mut ranks = vec![0usize; n_ids];
            for (j, (&id, r)) in ids.iter().zip(planned).enumerate() {
                let p = positions[id];
                if kept.contains(&p) {
                    all[id * d..(id + 1) * d].copy_from_slice(&rows[j * d..(j + 1) * d]);
                    ranks[id] = if whole.contains(&p) { full } else { r };
                }
            }
            by_id[kind.index()] = (all, ranks);
        }
        let [(all_k, rk), (all_v, mut rv)] = by_id;
        for (v, &k) in rv.iter_mut().zip(&rk) {
            if k == 0 {
                *v = 0;
            }
        }
        self.refile(layer, KvKind::Key, all_k, &rk)?;
        self.refile(layer, KvKind::Value, all_v, &rv)?;
        if let Some(h) = self.holds.as_mut().and_then(|h| h.get_mut(layer)) {
            *h = PromptHold::Ranked;
        }
        // 4. a held budget, as after any pruning; whole tokens are on top of
        // it, so with them the controller keeps the prompt's account
        if whole.is_empty() {
            self.rerank_to_budget(layer)?;
        }
        Ok(())
    }
}
