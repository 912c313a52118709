//! Pruning a DynaKV cache: dropped tokens leave their rank buckets.

use super::DynaKvCache;
use crate::cache::{KeepPositions, PrunableCache};
use crate::error::CacheError;

impl PrunableCache for DynaKvCache {
    fn per_kv_head(&self) -> bool {
        false
    }

    /// Drops every token not kept from the rank buckets of both K and V.
    fn retain(&mut self, layer: usize, keep: &KeepPositions) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        let KeepPositions::Layer(keep) = keep else {
            return Err(CacheError::Config(
                "DynaKvCache stores all KV heads of a token together (joint basis): \
                 it needs one token set per layer"
                    .into(),
            ));
        };
        let keep: std::collections::HashSet<usize> = keep.iter().copied().collect();
        let levels = &self.bases.levels;
        let store = &mut self.layers[layer];
        for k in 0..2 {
            let index = store.index(k, levels);
            for (b, ix) in store.buckets[k].iter_mut().zip(&index) {
                let rows: Vec<usize> = (0..ix.positions.len())
                    .filter(|&i| keep.contains(&ix.positions[i]))
                    .collect();
                if rows.len() == ix.positions.len() {
                    continue;
                }
                store.dims[k] -= b.rank * (ix.positions.len() - rows.len());
                for (i, &id) in ix.ids.iter().enumerate() {
                    if !keep.contains(&ix.positions[i]) {
                        store.codes[k][id] = 0;
                    }
                }
                b.keep_rows(&rows);
            }
            store.buckets[k].retain(|b| b.len() > 0);
        }
        Ok(())
    }
}
