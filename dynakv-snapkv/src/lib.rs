//! SnapKV sequence pruning with kvpress semantics, on burn tensors. Knows
//! nothing of DynaKV. The configuration lands first; scoring and selection
//! follow in the SnapKV issue.

pub mod config;

pub use config::{SnapKvConfig, SnapKvError};
