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
        let store = &mut self.layers[layer];
        for (k, buckets) in store.buckets.iter_mut().enumerate() {
            for b in buckets.iter_mut() {
                let rows: Vec<usize> = (0..b.positions.len())
                    .filter(|&i| keep.contains(&b.positions[i]))
                    .collect();
                if rows.len() == b.positions.len() {
                    continue;
                }
                store.dims[k] -= b.rank * (b.positions.len() - rows.len());
                b.keep_rows(&rows);
            }
            buckets.retain(|b| !b.positions.is_empty());
        }
        Ok(())
    }
}
