//! What a cache cost, as every JSON result reports it: true bytes, the part
//! that grows per token, and the f16 dense cache users compare against.

use dynakv_core::budget::CacheFootprint;
use serde::Serialize;

/// Mean bytes over windows, each measured at the end of its window.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ByteReport {
    /// Everything held: stored numbers at their real width (block scales
    /// included), per-token metadata, fixed bases.
    pub bytes: f64,
    /// What does not grow with the sequence (DynaKV's bases).
    pub fixed_bytes: f64,
    /// Values and per-token metadata per token of the sequence.
    pub kv_bytes_per_token: f64,
    /// An f16 dense cache of the same tokens (llama.cpp's and vLLM's default).
    pub bytes_f16_dense: f64,
    /// `kv_bytes_per_token` over the f16 dense cache's: the headline fraction.
    pub kv_fraction_f16: f64,
    /// The f32 dense cache of the same tokens (the exact reference).
    pub bytes_full: f64,
    /// Bytes memory really holds for the values (device storage without a
    /// packed type holds f32).
    pub held_value_bytes: f64,
}

/// Sums footprints; [`ByteAccumulator::mean`] averages them.
#[derive(Debug, Clone, Default)]
pub struct ByteAccumulator {
    sum: ByteReport,
    n: usize,
}

impl ByteAccumulator {
    pub fn add(&mut self, f: &CacheFootprint) {
        let s = &mut self.sum;
        s.bytes += f.bytes() as f64;
        s.fixed_bytes += f.fixed_bytes as f64;
        s.kv_bytes_per_token += f.kv_bytes_per_token();
        s.bytes_f16_dense += f.bytes_f16_dense() as f64;
        s.kv_fraction_f16 += f.kv_fraction_of_f16();
        s.bytes_full += f.bytes_full() as f64;
        s.held_value_bytes += f.held_value_bytes as f64;
        self.n += 1;
    }

    pub fn mean(&self) -> ByteReport {
        let k = self.n.max(1) as f64;
        let s = self.sum;
        ByteReport {
            bytes: s.bytes / k,
            fixed_bytes: s.fixed_bytes / k,
            kv_bytes_per_token: s.kv_bytes_per_token / k,
            bytes_f16_dense: s.bytes_f16_dense / k,
            kv_fraction_f16: s.kv_fraction_f16 / k,
            bytes_full: s.bytes_full / k,
            held_value_bytes: s.held_value_bytes / k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_f32_dense_cache_is_two_f16_ones() {
        let mut acc = ByteAccumulator::default();
        acc.add(&CacheFootprint::dense(100, 2, 8));
        acc.add(&CacheFootprint::dense(300, 2, 8));
        let r = acc.mean();
        assert_eq!(r.kv_fraction_f16, 2.0);
        assert_eq!(r.kv_bytes_per_token, (2 * 2 * 8 * 4) as f64);
        assert_eq!(r.bytes, (200 * 2 * 2 * 8 * 4) as f64);
        assert_eq!(r.bytes_f16_dense * 2.0, r.bytes_full);
    }
}
