//! Training data for the local stage: a dense cache that also keeps, for
//! every layer, the RoPE'd queries and the pre-RoPE keys and values it saw.

use burn::tensor::Tensor;

use crate::cache::{AttentionCache, CacheGeometry, CacheWrapper, DenseCache};
use crate::error::CacheError;
use crate::rope::Rope;

/// One layer's inputs to attention over one window.
#[derive(Debug, Clone)]
pub struct LayerInputs {
    /// `[1, H, T, D]`, RoPE applied.
    pub q_rot: Tensor<4>,
    /// `[1, H_kv, T, D]`, before RoPE.
    pub k_pre: Tensor<4>,
    /// `[1, H_kv, T, D]`
    pub v: Tensor<4>,
}

/// Exact attention (a dense cache) that records [`LayerInputs`] per layer.
#[derive(Debug, Clone)]
pub struct CaptureCache {
    inner: DenseCache,
    /// `[layer]`, filled by the prefill of one window.
    pub captured: Vec<Option<LayerInputs>>,
}

impl CaptureCache {
    pub fn new(geometry: CacheGeometry, rope: Rope) -> Result<Self, CacheError> {
        Ok(Self {
            inner: DenseCache::new(geometry, rope)?,
            captured: vec![None; geometry.n_layers],
        })
    }

    /// The captured layers, once every layer has seen the window.
    pub fn into_layers(self) -> Result<Vec<LayerInputs>, CacheError> {
        self.captured
            .into_iter()
            .enumerate()
            .map(|(l, c)| c.ok_or_else(|| CacheError::Config(format!("layer {l} not captured"))))
            .collect()
    }
}

impl CacheWrapper for CaptureCache {
    type Inner = DenseCache;

    fn inner(&self) -> &DenseCache {
        &self.inner
    }

    fn inner_mut(&mut self) -> &mut DenseCache {
        &mut self.inner
    }

    fn wrapped_forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        if let Some(slot) = self.captured.get_mut(layer) {
            *slot = Some(LayerInputs {
                q_rot: q_rot.clone(),
                k_pre: k_pre.clone(),
                v: v.clone(),
            });
        }
        self.inner.forward(layer, q_rot, k_pre, v, positions)
    }

    fn after_reset(&mut self) {
        self.captured.iter_mut().for_each(|c| *c = None);
    }
}
