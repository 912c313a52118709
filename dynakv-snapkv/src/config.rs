//! SnapKV configuration with validation.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A bad SnapKV configuration, naming the field.
#[derive(Debug, Error, PartialEq)]
pub enum SnapKvError {
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// How the pooled votes are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Avg,
    Max,
}

/// SnapKV settings (method spec §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapKvConfig {
    /// Observation window: the last `window` queries vote.
    pub window: usize,
    /// Pooling kernel (odd).
    pub kernel: usize,
    pub pooling: Pooling,
    /// Fraction of tokens removed, in [0, 1).
    pub compression_ratio: f64,
}

impl SnapKvConfig {
    /// kvpress defaults: w = 64, k = 5, average pooling.
    pub fn kvpress(compression_ratio: f64) -> Self {
        Self {
            window: 64,
            kernel: 5,
            pooling: Pooling::Avg,
            compression_ratio,
        }
    }

    pub fn validate(&self) -> Result<(), SnapKvError> {
        if self.window == 0 {
            return Err(SnapKvError::Invalid {
                field: "window",
                message: "must be at least 1".into(),
            });
        }
        if self.kernel.is_multiple_of(2) {
            return Err(SnapKvError::Invalid {
                field: "kernel",
                message: format!("must be odd, got {}", self.kernel),
            });
        }
        if !(0.0..1.0).contains(&self.compression_ratio) {
            return Err(SnapKvError::Invalid {
                field: "compression_ratio",
                message: format!("must be in [0, 1), got {}", self.compression_ratio),
            });
        }
        Ok(())
    }

    /// Tokens kept out of `n` (kvpress: floor(n (1 - r))), never fewer than the window.
    pub fn n_kept(&self, n: usize) -> usize {
        let kept = (n as f64 * (1.0 - self.compression_ratio)).floor() as usize;
        kept.max(self.window.min(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut c = SnapKvConfig::kvpress(0.5);
        assert!(c.validate().is_ok());
        c.kernel = 4;
        assert!(matches!(
            c.validate(),
            Err(SnapKvError::Invalid {
                field: "kernel",
                ..
            })
        ));
        let c = SnapKvConfig::kvpress(1.0);
        assert!(matches!(
            c.validate(),
            Err(SnapKvError::Invalid {
                field: "compression_ratio",
                ..
            })
        ));
    }

    #[test]
    fn kept_counts() {
        let c = SnapKvConfig::kvpress(0.75);
        assert_eq!(c.n_kept(1000), 250);
        assert_eq!(c.n_kept(100), 64);
        assert_eq!(SnapKvConfig::kvpress(0.0).n_kept(37), 37);
    }
}
