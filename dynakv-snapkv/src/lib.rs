//! SnapKV sequence pruning with kvpress semantics, on burn tensors.
//!
//! At the end of prefill, the last `w` queries vote for the earlier tokens
//! they attend to; votes are smoothed along the sequence and aggregated over
//! query heads; the top-scored tokens plus the whole window are kept. The
//! crate knows nothing of DynaKV: it returns kept indices, and a cache applies
//! them (see `dynakv-burn`'s `snapkv` feature).
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use dynakv_snapkv::{snapkv, SnapKvSpec};
//!
//! let device = burn::tensor::Device::default();
//! let config = "recall@0.75".parse::<SnapKvSpec>().unwrap().config(false).unwrap();
//! let rand = |shape| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
//! // The window's queries [1, H, w, D] and every prompt key [1, H_kv, L, D] (RoPE'd).
//! let selection = snapkv(rand([1, 4, config.window, 16]), rand([1, 2, 200, 16]), &config).unwrap();
//! assert_eq!(selection.kept.len(), 2); // one token set per KV head
//! assert_eq!(selection.kept[0].len(), 50); // a quarter of 200, window included
//! ```
//!
//! `examples/select_tokens.rs` plants facts in random keys and shows they survive.

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

pub mod config;
mod device;
pub mod score;
pub mod select;
pub mod spec;

pub use config::{GqaScores, KeepBudget, Pooling, SnapKvConfig, SnapKvError, Vote};
pub use score::{aggregate, pool, score, window_votes, WindowScores};
pub use select::{select_top, selection_rows, snapkv, Selection};
pub use spec::{SnapKvPreset, SnapKvSpec};
