//! SnapKV sequence pruning with kvpress semantics, on burn tensors.
//!
//! At the end of prefill, the last `w` queries vote for the earlier tokens
//! they attend to; votes are smoothed along the sequence and aggregated over
//! query heads; the top-scored tokens plus the whole window are kept. The
//! crate knows nothing of DynaKV: it returns kept indices, and a cache applies
//! them (see `dynakv-burn`'s `snapkv` feature).

pub mod config;
mod device;
pub mod score;
pub mod select;
pub mod spec;

pub use config::{GqaScores, KeepBudget, Pooling, SnapKvConfig, SnapKvError, Vote};
pub use score::{aggregate, pool, score, window_votes, WindowScores};
pub use select::{select_top, selection_rows, snapkv, Selection};
pub use spec::{SnapKvPreset, SnapKvSpec};
