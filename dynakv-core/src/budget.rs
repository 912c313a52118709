//! Memory accounting of a KV cache.
//!
//! Two numbers are reported everywhere a budget is: the paper-comparable
//! retained fraction (stored numbers over what a dense cache stores) and true
//! bytes: stored numbers at their real width (block scales included),
//! per-token metadata and fixed overheads. Headline fractions are of an f16
//! dense cache of the same tokens ([`CacheFootprint::bytes_f16_dense`]), the
//! default of llama.cpp and vLLM.

use serde::{Deserialize, Serialize};

/// Bytes per number of the f32 dense cache (the exact reference).
pub const BYTES_PER_VALUE: usize = 4;

/// Size of a cache in numbers and bytes, and the dense cache on the same tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFootprint {
    /// Key and value numbers stored (latents or dense).
    pub values: u64,
    /// Key and value numbers the dense cache would store for the same tokens.
    pub values_full: u64,
    /// Key and value numbers a dense cache would store for the tokens this
    /// cache still holds (after pruning): DynaKV's own retained fraction is
    /// `values` over this ([`CacheFootprint::retained_kept`]).
    #[serde(default)]
    pub values_kept_full: u64,
    /// Bytes of the stored numbers in their storage format (f16: 2 per
    /// number; q8_0: 34 per 32, scales included).
    pub value_bytes: u64,
    /// Bytes memory really holds for the stored numbers: `value_bytes` on
    /// the host; on a device without a packed type for the format, the
    /// decoded f32 values (4 per number).
    pub held_value_bytes: u64,
    /// Bytes of per-token metadata (positions, ranks, bucket ids).
    pub metadata_bytes: u64,
    /// Bytes that do not grow with tokens (bases, means, thresholds, routers).
    pub fixed_bytes: u64,
    /// Tokens of the sequence the cache has seen (its longest layer).
    pub tokens: u64,
}

impl CacheFootprint {
    /// Dense cache of `tokens` tokens: `2 * n_layers * d_kv` numbers per token.
    pub fn dense(tokens: u64, n_layers: u64, d_kv: u64) -> Self {
        let values = 2 * tokens * n_layers * d_kv;
        let value_bytes = values * BYTES_PER_VALUE as u64;
        Self {
            values,
            values_full: values,
            values_kept_full: values,
            value_bytes,
            held_value_bytes: value_bytes,
            metadata_bytes: 0,
            fixed_bytes: 0,
            tokens,
        }
    }

    /// The paper's retained fraction: stored numbers over dense numbers.
    pub fn retained(&self) -> f64 {
        if self.values_full == 0 {
            return 0.0;
        }
        self.values as f64 / self.values_full as f64
    }

    /// Stored numbers over what a dense cache stores for the tokens kept: a
    /// rank policy's fraction, apart from what pruning dropped (the
    /// retained fraction when nothing was pruned).
    pub fn retained_kept(&self) -> f64 {
        if self.values_kept_full == 0 {
            return self.retained();
        }
        self.values as f64 / self.values_kept_full as f64
    }

    /// All bytes: values at their real width, metadata and fixed overheads.
    pub fn bytes(&self) -> u64 {
        self.value_bytes + self.metadata_bytes + self.fixed_bytes
    }

    /// Bytes that grow with the sequence: values and per-token metadata.
    pub fn kv_bytes(&self) -> u64 {
        self.value_bytes + self.metadata_bytes
    }

    /// [`Self::kv_bytes`] per token of the sequence (0 when empty).
    pub fn kv_bytes_per_token(&self) -> f64 {
        if self.tokens == 0 {
            return 0.0;
        }
        self.kv_bytes() as f64 / self.tokens as f64
    }

    /// Bytes of the f32 dense cache on the same tokens.
    pub fn bytes_full(&self) -> u64 {
        self.values_full * BYTES_PER_VALUE as u64
    }

    /// Bytes of an f16 dense cache on the same tokens: what users compare with.
    pub fn bytes_f16_dense(&self) -> u64 {
        self.values_full * 2
    }

    /// [`Self::kv_bytes`] as a fraction of the f16 dense cache's bytes.
    pub fn kv_fraction_of_f16(&self) -> f64 {
        if self.values_full == 0 {
            return 0.0;
        }
        self.kv_bytes() as f64 / self.bytes_f16_dense() as f64
    }
}

/// Two parts of one sequence's cache (layers, or keys and values): their
/// sizes add up, their token counts do not.
impl std::ops::Add for CacheFootprint {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            values: self.values + o.values,
            values_full: self.values_full + o.values_full,
            values_kept_full: self.values_kept_full + o.values_kept_full,
            value_bytes: self.value_bytes + o.value_bytes,
            held_value_bytes: self.held_value_bytes + o.held_value_bytes,
            metadata_bytes: self.metadata_bytes + o.metadata_bytes,
            fixed_bytes: self.fixed_bytes + o.fixed_bytes,
            tokens: self.tokens.max(o.tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_smollm2_at_8k_is_377_mb() {
        // 30 layers, d_kv 192: the figure quoted in the method spec.
        let f = CacheFootprint::dense(8192, 30, 192);
        assert_eq!(f.bytes(), 377_487_360);
        assert_eq!(f.retained(), 1.0);
        assert_eq!(f.bytes_f16_dense() * 2, f.bytes());
        assert_eq!(f.kv_bytes_per_token(), (2 * 30 * 192 * 4) as f64);
        assert_eq!(f.kv_fraction_of_f16(), 2.0);
        let half = CacheFootprint {
            values: f.values / 2,
            value_bytes: f.value_bytes / 2,
            ..f
        };
        assert_eq!(half.retained(), 0.5);
        let sum = half + half;
        assert_eq!(
            (sum.values, sum.bytes(), sum.tokens),
            (f.values, f.bytes(), 8192)
        );
    }
}
