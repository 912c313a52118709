//! DynaKV on a sliding-window layer: attention hides keys a window behind
//! the query, and the tokens no later query can see leave the cache, so a
//! windowed layer's compressed cache stays O(window) as the dense one does.

use super::DynaKvCache;
use crate::error::CacheError;

impl DynaKvCache {
    /// The same cache over a sliding window of `window` positions on every
    /// layer: a query at `p` sees the stored keys at `p - window < k <= p`.
    /// Tokens are dropped on the dense windowed cache's schedule
    /// ([`crate::DenseCache::with_window`]: once a layer spans half a window
    /// more than it needs), with their ids, level codes and positions, so
    /// memory and metadata stay O(window), and the footprint's dense
    /// reference is the windowed dense cache's.
    pub fn with_window(mut self, window: usize) -> Result<Self, CacheError> {
        self.window = Some(crate::cache::check_window(window)?);
        Ok(self)
    }

    /// The sliding window, if any.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// After queries at `positions` attended: forgets a windowed layer's
    /// oldest tokens that no later query can see, once the layer spans more
    /// than a window and a half of token ids.
    pub(super) fn evict(&mut self, layer: usize, positions: &[usize]) -> Result<(), CacheError> {
        let Some(w) = self.window else {
            return Ok(());
        };
        let Some(&last) = positions.iter().max() else {
            return Ok(());
        };
        let store = &self.layers[layer];
        if store.next_id <= w + w.div_ceil(2) {
            return Ok(());
        }
        // a later query at q > last sees keys k > q - w >= last + 1 - w;
        // ids ascend with positions on a windowed layer (appended in order)
        let gone = store
            .positions
            .iter()
            .take_while(|&p| p + w <= last)
            .count();
        if gone == 0 || gone == store.next_id {
            return Ok(());
        }
        let levels = self.bases.levels.clone();
        let store = &mut self.layers[layer];
        for k in 0..2 {
            let index = store.index(k, &levels);
            for (b, ix) in store.buckets[k].iter_mut().zip(&index) {
                let rows: Vec<usize> = (0..ix.ids.len()).filter(|&i| ix.ids[i] >= gone).collect();
                if rows.len() < ix.ids.len() {
                    store.dims[k] -= b.rank * (ix.ids.len() - rows.len());
                    b.keep_rows(&rows);
                }
            }
            store.buckets[k].retain(|b| b.len() > 0);
            store.codes[k].drain(..gone);
        }
        store.positions.drop_first(gone);
        store.next_id -= gone;
        Ok(())
    }
}
