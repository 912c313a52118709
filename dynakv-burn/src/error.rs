//! Errors of the cache layer.

use thiserror::Error;

/// Misuse of a cache: wrong layer, shapes or positions.
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
    #[error("invalid cache configuration: {0}")]
    Config(String),
}
