//! Backend-agnostic KV-cache compression math (no burn): calibration
//! statistics, spectral bases, rank levels and policies, accounting and the
//! artifact format.
//!
//! ```
//! use dynakv_core::levels::RankLevels;
//! use dynakv_core::policy::{KvKind, PolicySpec, RankPolicy, UniformPolicy};
//!
//! // A policy as a user writes it (validated), and the ranks of a policy.
//! let spec: PolicySpec = "uniform@0.5".parse().unwrap();
//! let levels = RankLevels::multiples(8, 64).unwrap();
//! let policy = UniformPolicy::for_budget(spec.budget, &levels, spec.sink_tokens).unwrap();
//! let ranks = policy.ranks(0, KvKind::Key, &[], &[0, 1, 2]);
//! assert_eq!(ranks[0], 64); // the attention sink keeps full rank
//! assert!(ranks[1..].iter().all(|&r| r == 32));
//! ```

// Input never panics the library or the CLI (docs/architecture.md, "Where
// input is validated"): outside tests these are errors, not warnings.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable
    )
)]

pub mod artifact;
pub mod basis;
pub mod budget;
mod error;
pub mod fuzz;
pub mod io;
pub mod levels;
pub mod policy;
pub mod quant;
pub mod stats;

pub use error::CoreError;
