//! Errors of the cache layer.

use thiserror::Error;

use crate::rope::RopeStyle;

/// Misuse of a cache (wrong layer, shapes or positions), or a configuration
/// that cannot be built. Errors of the crates below keep their type
/// (`#[from]`), so a caller can match on them.
#[derive(Debug, Error)]
pub enum CacheError {
    #[error("layer {layer} out of range (the cache has {n_layers} layers)")]
    LayerOutOfRange { layer: usize, n_layers: usize },
    #[error("shape mismatch for {what}: got {got:?}, expected {expected:?}")]
    Shape {
        what: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("position {pos} is beyond the RoPE table ({max} positions)")]
    PositionOutOfRange { pos: usize, max: usize },
    #[error("{0} positions given for {1} tokens")]
    PositionCount(usize, usize),
    #[error("the model's RoPE style is {model:?}, the RoPE table's {rope:?}")]
    RopeStyle { model: RopeStyle, rope: RopeStyle },
    #[error("invalid cache configuration: {0}")]
    Config(String),
    /// Training stopped (Ctrl-C) before its first step: there is nothing
    /// trained to write, and an artifact saying otherwise would mislead.
    #[error("training was stopped before its first step: nothing trained, nothing written")]
    NothingTrained,
    #[error("reading a tensor back from the device: {0}")]
    Data(#[from] burn::tensor::DataError),
    #[error(transparent)]
    Core(#[from] dynakv_core::CoreError),
    #[cfg(feature = "snapkv")]
    #[error("snapkv: {0}")]
    SnapKv(#[from] dynakv_snapkv::SnapKvError),
}
