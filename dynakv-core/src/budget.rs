//! Memory accounting of a KV cache.
//!
//! Two numbers are reported everywhere a budget is: the paper-comparable
//! retained fraction (stored numbers over what a dense cache stores) and true
//! bytes, which also count per-token metadata and fixed overheads.

use serde::{Deserialize, Serialize};

/// Bytes per stored number (f32).
pub const BYTES_PER_VALUE: usize = 4;

/// Size of a cache in numbers and bytes, and the dense cache on the same tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFootprint {
    /// Key and value numbers stored (latents or dense).
    pub values: u64,
    /// Key and value numbers the dense cache would store for the same tokens.
    pub values_full: u64,
    /// Bytes of per-token metadata (positions, ranks, bucket ids).
    pub metadata_bytes: u64,
    /// Bytes that do not grow with tokens (bases, means, thresholds, routers).
    pub fixed_bytes: u64,
}

impl CacheFootprint {
    /// Dense cache of `tokens` tokens: `2 * n_layers * d_kv` numbers per token.
    pub fn dense(tokens: u64, n_layers: u64, d_kv: u64) -> Self {
        let values = 2 * tokens * n_layers * d_kv;
        Self {
            values,
            values_full: values,
            metadata_bytes: 0,
            fixed_bytes: 0,
        }
    }

    /// The paper's retained fraction: stored numbers over dense numbers.
    pub fn retained(&self) -> f64 {
        if self.values_full == 0 {
            return 0.0;
        }
        self.values as f64 / self.values_full as f64
    }

    /// All bytes: values, metadata and fixed overheads.
    pub fn bytes(&self) -> u64 {
        self.values * BYTES_PER_VALUE as u64 + self.metadata_bytes + self.fixed_bytes
    }

    /// Bytes of the dense cache on the same tokens.
    pub fn bytes_full(&self) -> u64 {
        self.values_full * BYTES_PER_VALUE as u64
    }
}

impl std::ops::Add for CacheFootprint {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            values: self.values + o.values,
            values_full: self.values_full + o.values_full,
            metadata_bytes: self.metadata_bytes + o.metadata_bytes,
            fixed_bytes: self.fixed_bytes + o.fixed_bytes,
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
        let half = CacheFootprint {
            values: f.values / 2,
            ..f
        };
        assert_eq!(half.retained(), 0.5);
        assert_eq!((half + half).values, f.values);
    }
}
