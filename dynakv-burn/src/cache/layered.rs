//! One cache per group of layers, behind the one cache a model sees.

use burn::tensor::Tensor;
use dynakv_core::budget::CacheFootprint;

use super::{AttentionCache, CacheWrapper};
use crate::error::CacheError;

/// Routes each model layer to a part: a model whose layers attend
/// differently (Gemma 3's sliding-window and global layers, with their own
/// RoPE bases) holds one cache per kind of layer, each built for its own
/// layers (layer `i` of a part is the `i`-th model layer routed to it).
///
/// The footprint is the parts' sum: every layer is counted, so retained
/// fractions and bytes are of the whole model's cache.
pub struct LayeredCache<'a> {
    parts: Vec<Box<dyn AttentionCache + 'a>>,
    /// Per model layer: (part, layer within the part).
    route: Vec<(usize, usize)>,
}

impl std::fmt::Debug for LayeredCache<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredCache")
            .field("parts", &self.parts.len())
            .field("route", &self.route)
            .finish()
    }
}

impl<'a> LayeredCache<'a> {
    /// `route[l] = (p, i)`: model layer `l` is layer `i` of `parts[p]`;
    /// every part's layers `0..n` must each be routed to exactly once.
    pub fn new(
        parts: Vec<Box<dyn AttentionCache + 'a>>,
        route: Vec<(usize, usize)>,
    ) -> Result<Self, CacheError> {
        let mut seen: Vec<Vec<bool>> = vec![Vec::new(); parts.len()];
        for (l, &(p, i)) in route.iter().enumerate() {
            let Some(layers) = seen.get_mut(p) else {
                return Err(CacheError::Config(format!(
                    "layer {l} is routed to part {p} of {}",
                    parts.len()
                )));
            };
            if layers.len() <= i {
                layers.resize(i + 1, false);
            }
            if std::mem::replace(&mut layers[i], true) {
                return Err(CacheError::Config(format!(
                    "layer {i} of part {p} is routed to twice"
                )));
            }
        }
        for (p, layers) in seen.iter().enumerate() {
            if layers.is_empty() || layers.iter().any(|&s| !s) {
                return Err(CacheError::Config(format!(
                    "part {p}'s layers are not all routed to ({layers:?})"
                )));
            }
        }
        Ok(Self { parts, route })
    }

    fn part(
        &mut self,
        layer: usize,
    ) -> Result<(&mut (dyn AttentionCache + 'a), usize), CacheError> {
        let &(p, i) = self.route.get(layer).ok_or(CacheError::LayerOutOfRange {
            layer,
            n_layers: self.route.len(),
        })?;
        Ok((self.parts[p].as_mut(), i))
    }
}

impl AttentionCache for LayeredCache<'_> {
    fn append(
        &mut self,
        layer: usize,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        let (part, i) = self.part(layer)?;
        part.append(i, k_pre, v, positions)
    }

    fn attend(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        let (part, i) = self.part(layer)?;
        part.attend(i, q_rot, positions)
    }

    fn forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        let (part, i) = self.part(layer)?;
        part.forward(i, q_rot, k_pre, v, positions)
    }

    fn len(&self, layer: usize) -> usize {
        self.route
            .get(layer)
            .map_or(0, |&(p, i)| self.parts[p].len(i))
    }

    fn reset(&mut self) {
        self.parts.iter_mut().for_each(|p| p.reset());
    }

    fn footprint(&self) -> CacheFootprint {
        self.parts
            .iter()
            .map(|p| p.footprint())
            .fold(CacheFootprint::default(), |a, b| a + b)
    }

    /// Part 0, the spec's cache (a factory's global layers).
    fn spec_footprint(&self) -> CacheFootprint {
        self.parts
            .first()
            .map_or_else(CacheFootprint::default, |p| p.spec_footprint())
    }
}

/// A cache borrowed for a while: a part of a [`LayeredCache`] that the
/// caller keeps (calibration's recording cache, a trainer's). Everything is
/// delegated ([`CacheWrapper`]).
pub struct Borrowed<'a>(pub &'a mut dyn AttentionCache);

impl<'a> CacheWrapper for Borrowed<'a> {
    type Inner = dyn AttentionCache + 'a;

    fn inner(&self) -> &Self::Inner {
        &*self.0
    }

    fn inner_mut(&mut self) -> &mut Self::Inner {
        &mut *self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_support::{rand4, rope, G};
    use crate::cache::{CacheGeometry, DenseCache};

    fn one_layer() -> CacheGeometry {
        CacheGeometry { n_layers: 1, ..G }
    }

    #[test]
    fn layers_routed_to_parts_equal_one_cache_per_layer() {
        let rope = rope();
        // model layers 0 and 1 go to parts 1 and 0: each a one-layer cache
        let parts = || -> Vec<Box<dyn AttentionCache>> {
            vec![
                Box::new(DenseCache::new(one_layer(), rope.clone()).unwrap()),
                Box::new(DenseCache::new(one_layer(), rope.clone()).unwrap()),
            ]
        };
        let mut layered = LayeredCache::new(parts(), vec![(1, 0), (0, 0)]).unwrap();
        let mut whole = DenseCache::new(G, rope.clone()).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 5, 4]),
            rand4([1, 2, 5, 4]),
            rand4([1, 2, 5, 4]),
        );
        let pos: Vec<usize> = (0..5).collect();
        for layer in 0..2 {
            let a = layered
                .forward(layer, q.clone(), k.clone(), v.clone(), &pos)
                .unwrap();
            let b = whole
                .forward(layer, q.clone(), k.clone(), v.clone(), &pos)
                .unwrap();
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(diff < 1e-6);
        }
        assert_eq!(layered.footprint(), whole.footprint());
        // part 0 holds model layer 1
        assert_eq!(
            layered.spec_footprint().values * 2,
            whole.footprint().values
        );
        assert_eq!(layered.len(1), 5);
        assert!(layered.forward(2, q, k, v, &pos).is_err());
        layered.reset();
        assert!(layered.is_empty());
        // bad routes: a missing part, a layer twice, a layer never routed
        assert!(LayeredCache::new(parts(), vec![(2, 0), (0, 0)]).is_err());
        assert!(LayeredCache::new(parts(), vec![(0, 0), (0, 0)]).is_err());
        assert!(LayeredCache::new(parts(), vec![(0, 0)]).is_err());
    }
}
