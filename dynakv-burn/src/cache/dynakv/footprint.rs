//! What a DynaKV cache costs: numbers stored against the dense cache's,
//! per-token metadata (one level byte per token, layer and K/V, and the
//! layer's position runs) and the bases' fixed bytes.

use dynakv_core::budget::{CacheFootprint, BYTES_PER_VALUE};

use super::buckets::Latents;
use super::DynaKvCache;

impl DynaKvCache {
    /// Numbers stored, metadata and fixed bytes, against the dense cache.
    pub(super) fn footprint_now(&self) -> CacheFootprint {
        let mut f = CacheFootprint {
            // the bases (and the key decoders' 8-bit codes, once a decode
            // step has made them), and the budget controller's windows of cuts
            fixed_bytes: (self.bases.fixed_bytes
                + self
                    .bases
                    .layers
                    .iter()
                    .map(|l| l.key_code_bytes())
                    .sum::<usize>()
                + self.controller.as_ref().map_or(0, |c| c.bytes()))
                as u64,
            ..Default::default()
        };
        for (li, l) in self.layers.iter().enumerate() {
            let n = l.next_id as u64;
            f.values += (l.dims[0] + l.dims[1]) as u64;
            f.values_full += 2 * n * self.geometry.d_kv() as u64;
            // a token is kept while its key is (a value without a key is not)
            f.values_kept_full += 2 * l.stored(0) as u64 * self.geometry.d_kv() as u64;
            f.tokens = f.tokens.max(n);
            for (k, buckets) in l.buckets.iter().enumerate() {
                for b in buckets {
                    let rows = b.len();
                    let bytes = (rows * self.codecs[li][k].row_bytes(b.rank)) as u64;
                    f.value_bytes += bytes;
                    f.held_value_bytes += match &b.lat {
                        Latents::Host(p) => p.bytes() as u64,
                        Latents::Device(_) => (rows * b.rank * BYTES_PER_VALUE) as u64,
                    };
                }
            }
            // one level byte per token and kind, and the position runs
            f.metadata_bytes += (l.codes[0].len() + l.codes[1].len() + l.positions.bytes()) as u64;
        }
        f
    }
}
