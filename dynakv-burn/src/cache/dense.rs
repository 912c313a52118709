//! The uncompressed cache: what every compressed cache is measured against.

use burn::tensor::Tensor;
use dynakv_core::budget::CacheFootprint;

use super::{AttentionCache, CacheGeometry};
use crate::attention::{causal_mask, gqa_attention};
use crate::error::CacheError;
use crate::rope::Rope;

/// One layer's stored tokens.
#[derive(Debug, Clone, Default)]
struct LayerStore {
    /// `[B, H_kv, S, D]`, RoPE applied.
    k: Option<Tensor<4>>,
    /// `[B, H_kv, S, D]`
    v: Option<Tensor<4>>,
    positions: Vec<usize>,
}

/// Full-precision keys (RoPE applied on append) and values for every token.
#[derive(Debug, Clone)]
pub struct DenseCache {
    geometry: CacheGeometry,
    rope: Rope,
    layers: Vec<LayerStore>,
}

impl DenseCache {
    pub fn new(geometry: CacheGeometry, rope: Rope) -> Result<Self, CacheError> {
        geometry.validate()?;
        Ok(Self {
            geometry,
            rope,
            layers: vec![LayerStore::default(); geometry.n_layers],
        })
    }

    pub fn geometry(&self) -> CacheGeometry {
        self.geometry
    }

    /// Stored keys (RoPE'd), values and positions of a layer.
    ///
    /// # Shapes
    /// returns `[B, H_kv, S, D]` twice.
    pub fn layer_kv(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>, &[usize])> {
        let l = self.layers.get(layer)?;
        Some((l.k.clone()?, l.v.clone()?, &l.positions))
    }
}

fn cat_seq(old: Option<Tensor<4>>, new: Tensor<4>) -> Tensor<4> {
    match old {
        Some(old) => Tensor::cat(vec![old, new], 2),
        None => new,
    }
}

impl AttentionCache for DenseCache {
    fn append(
        &mut self,
        layer: usize,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        self.geometry.check_kv(&k_pre, &v, positions)?;
        let k = self.rope.apply(k_pre, positions)?;
        let store = &mut self.layers[layer];
        store.k = Some(cat_seq(store.k.take(), k));
        store.v = Some(cat_seq(store.v.take(), v));
        store.positions.extend_from_slice(positions);
        Ok(())
    }

    fn attend(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        self.geometry.check_layer(layer)?;
        self.geometry.check_q(&q_rot, positions)?;
        let store = &self.layers[layer];
        let (Some(k), Some(v)) = (store.k.clone(), store.v.clone()) else {
            return Err(CacheError::Config(format!(
                "attend on layer {layer} before anything was appended"
            )));
        };
        let mask = causal_mask(
            positions,
            &store.positions,
            self.geometry.groups(),
            &q_rot.device(),
        );
        Ok(gqa_attention(q_rot, k, v, mask))
    }

    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.positions.len())
    }

    fn reset(&mut self) {
        self.layers = vec![LayerStore::default(); self.geometry.n_layers];
    }

    fn footprint(&self) -> CacheFootprint {
        let values: usize = self
            .layers
            .iter()
            .map(|l| {
                let elems =
                    |t: &Option<Tensor<4>>| t.as_ref().map_or(0, |t| t.shape().num_elements());
                elems(&l.k) + elems(&l.v)
            })
            .sum();
        CacheFootprint {
            values: values as u64,
            values_full: values as u64,
            metadata_bytes: 0,
            fixed_bytes: 0,
        }
    }
}
