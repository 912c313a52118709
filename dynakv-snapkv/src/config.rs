//! SnapKV configuration: the knobs of the method spec §4, two presets, and
//! validation that names the bad field.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A bad SnapKV configuration or input, naming the field.
#[derive(Debug, Error, PartialEq)]
pub enum SnapKvError {
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("shape mismatch for {what}: {message}")]
    Shape { what: &'static str, message: String },
    #[error("reading scores back from the device: {0}")]
    Data(#[from] burn::tensor::DataError),
}

/// How the pooled votes are smoothed along the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// PyTorch `avg_pool1d(padding = k/2)`: zero padding counts in the divisor
    /// (kvpress).
    Avg,
    /// PyTorch `max_pool1d(padding = k/2)`: padding never wins (original code).
    Max,
    /// Ours: each token takes the largest vote among itself and the `k - 1`
    /// tokens before it, so the tokens that follow a voted token survive with
    /// it. A fact is usually several tokens (a 5-digit number is 5 tokens for
    /// SmolLM2), and the query votes mostly for its first one; copying the
    /// rest needs the successors, which centred pooling keeps only half of.
    Forward,
}

/// How the window queries' attention weights are combined per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vote {
    /// Sum over window queries (the original SnapKV code).
    Sum,
    /// Mean over window queries (kvpress). Same ranking as `Sum`.
    Mean,
}

/// At which granularity tokens are selected when query heads share KV heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GqaScores {
    /// One selection per KV head: pooled scores averaged over the query heads
    /// of its group (kvpress).
    KvHead,
    /// One selection per layer: pooled scores averaged over every query head.
    /// DynaKV's joint basis stores all KV heads of a token together, so a
    /// composed cache needs this.
    Layer,
    /// Ours: one selection per layer, each token scored by its *largest*
    /// pooled score over the query heads. Averaging dilutes the few heads
    /// that retrieve (measured: the per-layer mean halves long-context
    /// recall against per-KV-head selection); the maximum keeps what any
    /// head needs.
    LayerMax,
    /// One selection per query head (the original code, which repeats K/V).
    QueryHead,
}

impl GqaScores {
    /// Whether the selection is one token set for the whole layer.
    pub fn per_layer(self) -> bool {
        matches!(self, Self::Layer | Self::LayerMax)
    }
}

/// How many tokens survive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepBudget {
    /// Fraction of tokens removed, in [0, 1): kept = floor(L (1 - r)) (kvpress).
    CompressionRatio(f64),
    /// At most this many tokens kept; a prompt of at most C tokens is kept whole
    /// (the original code's `max_capacity_prompt`).
    Capacity(usize),
}

/// SnapKV settings (method spec §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapKvConfig {
    /// Observation window: the last `window` queries vote, and the last
    /// `window` tokens are always kept.
    pub window: usize,
    /// Pooling kernel (odd, stride 1, padding kernel / 2).
    pub kernel: usize,
    pub pooling: Pooling,
    pub vote: Vote,
    pub gqa: GqaScores,
    pub budget: KeepBudget,
}

impl SnapKvConfig {
    /// kvpress's `SnapKVPress`: w = 64, k = 5, average pooling, mean vote,
    /// one selection per KV head, budget as a compression ratio.
    pub fn kvpress(compression_ratio: f64) -> Self {
        Self {
            window: 64,
            kernel: 5,
            pooling: Pooling::Avg,
            vote: Vote::Mean,
            gqa: GqaScores::KvHead,
            budget: KeepBudget::CompressionRatio(compression_ratio),
        }
    }

    /// The paper's LongBench configuration: w = 32, k = 7, max pooling, sum
    /// vote, budget as a capacity.
    pub fn paper(capacity: usize) -> Self {
        Self {
            window: 32,
            kernel: 7,
            pooling: Pooling::Max,
            vote: Vote::Sum,
            gqa: GqaScores::KvHead,
            budget: KeepBudget::Capacity(capacity),
        }
    }

    /// Ours, for recall of multi-token facts: the paper's window and sum vote
    /// with forward pooling over 7 tokens ([`Pooling::Forward`]), one
    /// selection per KV head, budget as a compression ratio.
    pub fn recall(compression_ratio: f64) -> Self {
        Self {
            window: 32,
            kernel: 7,
            pooling: Pooling::Forward,
            vote: Vote::Sum,
            gqa: GqaScores::KvHead,
            budget: KeepBudget::CompressionRatio(compression_ratio),
        }
    }

    pub fn validate(&self) -> Result<(), SnapKvError> {
        let bad = |field, message: String| Err(SnapKvError::Invalid { field, message });
        if self.window == 0 {
            return bad("window", "must be at least 1".into());
        }
        if self.kernel.is_multiple_of(2) {
            return bad("kernel", format!("must be odd, got {}", self.kernel));
        }
        match self.budget {
            KeepBudget::CompressionRatio(r) if !(0.0..1.0).contains(&r) => {
                bad("compression_ratio", format!("must be in [0, 1), got {r}"))
            }
            KeepBudget::Capacity(c) if c < self.window => bad(
                "capacity",
                format!("must be at least the window ({}), got {c}", self.window),
            ),
            _ => Ok(()),
        }
    }

    /// Whether a prompt of `n` tokens is left whole: r = 0, n ≤ C, or a prompt
    /// no longer than the window (nothing outside the window to vote on).
    pub fn is_noop(&self, n: usize) -> bool {
        n <= self.window
            || match self.budget {
                KeepBudget::CompressionRatio(r) => r == 0.0,
                KeepBudget::Capacity(c) => n <= c,
            }
    }

    /// Tokens kept out of `n`, window included.
    ///
    /// Ratio: floor(n (1 - r)) as in kvpress; capacity: C. Either way the count
    /// is raised to the window when it would be smaller (kvpress would then
    /// drop window tokens by an arbitrary tie-break; here the window is always
    /// whole and the shortfall is reported by the kept count).
    pub fn n_kept(&self, n: usize) -> usize {
        if self.is_noop(n) {
            return n;
        }
        let kept = match self.budget {
            KeepBudget::CompressionRatio(r) => (n as f64 * (1.0 - r)).floor() as usize,
            KeepBudget::Capacity(c) => c,
        };
        kept.max(self.window).min(n)
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
        for r in [1.0, -0.1, f64::NAN] {
            assert!(matches!(
                SnapKvConfig::kvpress(r).validate(),
                Err(SnapKvError::Invalid {
                    field: "compression_ratio",
                    ..
                })
            ));
        }
        assert!(matches!(
            SnapKvConfig::paper(16).validate(),
            Err(SnapKvError::Invalid {
                field: "capacity",
                ..
            })
        ));
        let mut w = SnapKvConfig::paper(64);
        w.window = 0;
        assert!(w.validate().is_err());
    }

    #[test]
    fn kept_counts() {
        let c = SnapKvConfig::kvpress(0.75);
        assert_eq!(c.n_kept(1000), 250);
        // Never fewer than the window.
        assert_eq!(c.n_kept(100), 64);
        // Prompt within the window: whole.
        assert_eq!(c.n_kept(50), 50);
        assert_eq!(SnapKvConfig::kvpress(0.0).n_kept(337), 337);
        assert_eq!(SnapKvConfig::kvpress(0.875).n_kept(2048), 256);
        let p = SnapKvConfig::paper(1024);
        assert!(p.is_noop(1024));
        assert_eq!(p.n_kept(1000), 1000);
        assert_eq!(p.n_kept(4096), 1024);
    }
}
