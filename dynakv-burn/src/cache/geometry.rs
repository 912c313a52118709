//! The attention geometry a cache is built for.

use burn::tensor::Tensor;

use crate::error::CacheError;
use crate::rope::{Rope, RopeStyle};

/// Attention geometry of a model, as a cache needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheGeometry {
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// How the model's weights pair coordinates for RoPE. Caches rotate
    /// keys themselves, so they check their [`Rope`] has this style.
    pub rope_style: RopeStyle,
}

impl CacheGeometry {
    /// Checks that query heads group evenly over KV heads.
    pub fn validate(&self) -> Result<(), CacheError> {
        if self.n_layers == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return Err(CacheError::Config(format!("empty geometry {self:?}")));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(CacheError::Config(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            )));
        }
        Ok(())
    }

    /// Checks a RoPE table against the model's style: a cache rotating with
    /// the other layout would run and give wrong attention.
    pub fn check_rope(&self, rope: &Rope) -> Result<(), CacheError> {
        if rope.style() != self.rope_style {
            return Err(CacheError::RopeStyle {
                model: self.rope_style,
                rope: rope.style(),
            });
        }
        Ok(())
    }

    /// Query heads per KV head.
    pub fn groups(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Width of the joint key (or value) vector of one token in one layer.
    pub fn d_kv(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub(crate) fn check_layer(&self, layer: usize) -> Result<(), CacheError> {
        if layer >= self.n_layers {
            return Err(CacheError::LayerOutOfRange {
                layer,
                n_layers: self.n_layers,
            });
        }
        Ok(())
    }

    /// Checks new keys/values `[B, H_kv, T, D]` against the geometry and positions.
    pub(crate) fn check_kv(
        &self,
        k: &Tensor<4>,
        v: &Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        let [b, hk, t, d] = k.dims();
        if hk != self.n_kv_heads || d != self.head_dim {
            return Err(CacheError::Shape {
                what: "keys",
                got: vec![b, hk, t, d],
                expected: vec![b, self.n_kv_heads, t, self.head_dim],
            });
        }
        if v.dims() != [b, hk, t, d] {
            return Err(CacheError::Shape {
                what: "values",
                got: v.dims().to_vec(),
                expected: vec![b, hk, t, d],
            });
        }
        if positions.len() != t {
            return Err(CacheError::PositionCount(positions.len(), t));
        }
        Ok(())
    }

    /// Checks queries `[B, H, T, D]`.
    pub(crate) fn check_q(&self, q: &Tensor<4>, positions: &[usize]) -> Result<(), CacheError> {
        let [b, h, t, d] = q.dims();
        if h != self.n_heads || d != self.head_dim {
            return Err(CacheError::Shape {
                what: "queries",
                got: vec![b, h, t, d],
                expected: vec![b, self.n_heads, t, self.head_dim],
            });
        }
        if positions.len() != t {
            return Err(CacheError::PositionCount(positions.len(), t));
        }
        Ok(())
    }
}
