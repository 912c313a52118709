//! What a DynaKV cache costs: numbers stored against the dense cache's,
//! per-token metadata and the bases' fixed bytes.

use dynakv_core::budget::CacheFootprint;

use super::DynaKvCache;

/// Bytes of per-token metadata per layer and per K/V: position and token id.
const META_BYTES_PER_TOKEN: usize = 8;

impl DynaKvCache {
    /// Numbers stored, metadata and fixed bytes, against the dense cache.
    pub(super) fn footprint_now(&self) -> CacheFootprint {
        let mut f = CacheFootprint {
            fixed_bytes: self.bases.fixed_bytes as u64,
            ..Default::default()
        };
        for l in &self.layers {
            let n = l.next_id as u64;
            f.values += (l.dims[0] + l.dims[1]) as u64;
            f.values_full += 2 * n * self.geometry.d_kv() as u64;
            let stored: usize = l.buckets.iter().flatten().map(|b| b.positions.len()).sum();
            f.metadata_bytes += (stored * META_BYTES_PER_TOKEN) as u64;
        }
        f
    }
}
