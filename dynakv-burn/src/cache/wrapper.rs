//! The shared base of caches that add behaviour around another cache
//! (SnapKV pruning, calibration recording, training capture): they say what
//! they add, and every other method of [`AttentionCache`] is delegated to the
//! inner cache here, once, instead of by each wrapper.

use burn::tensor::Tensor;
use dynakv_core::budget::CacheFootprint;

use super::AttentionCache;
use crate::error::CacheError;

/// A cache that wraps another. Implement the accessors and the hooks you
/// need; [`AttentionCache`] comes with it (a blanket implementation), with
/// storage, length, reset and footprint delegated to the inner cache.
///
/// ```
/// use burn::tensor::Tensor;
/// use dynakv_burn::{AttentionCache, CacheError, CacheWrapper, DenseCache};
///
/// /// Counts the tokens a model appends, and stores them densely.
/// struct Counting {
///     inner: DenseCache,
///     appended: usize,
/// }
///
/// impl CacheWrapper for Counting {
///     type Inner = DenseCache;
///     fn inner(&self) -> &DenseCache {
///         &self.inner
///     }
///     fn inner_mut(&mut self) -> &mut DenseCache {
///         &mut self.inner
///     }
///     fn before_append(
///         &mut self,
///         layer: usize,
///         _k_pre: &Tensor<4>,
///         _v: &Tensor<4>,
///         positions: &[usize],
///     ) -> Result<(), CacheError> {
///         if layer == 0 {
///             self.appended += positions.len();
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait CacheWrapper: Send {
    type Inner: AttentionCache + ?Sized;

    fn inner(&self) -> &Self::Inner;

    fn inner_mut(&mut self) -> &mut Self::Inner;

    /// Sees a layer's new keys and values before the inner cache stores them.
    ///
    /// # Shapes
    /// - `k_pre`, `v`: `[B, H_kv, T, D]`; `positions.len() == T`
    fn before_append(
        &mut self,
        _layer: usize,
        _k_pre: &Tensor<4>,
        _v: &Tensor<4>,
        _positions: &[usize],
    ) -> Result<(), CacheError> {
        Ok(())
    }

    /// Sees a layer's queries before the inner cache attends.
    ///
    /// # Shapes
    /// - `q_rot`: `[B, H, T, D]`; `positions.len() == T`
    fn before_attend(
        &mut self,
        _layer: usize,
        _q_rot: &Tensor<4>,
        _positions: &[usize],
    ) -> Result<(), CacheError> {
        Ok(())
    }

    /// What [`AttentionCache::forward`] does: by default both hooks, then
    /// the inner cache's `forward`. Override to act on the whole step (SnapKV
    /// prunes after its prefill).
    ///
    /// # Shapes
    /// - `q_rot`: `[B, H, T, D]`; `k_pre`, `v`: `[B, H_kv, T, D]`
    /// - returns `[B, H, T, D]`
    fn wrapped_forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        self.before_append(layer, &k_pre, &v, positions)?;
        self.before_attend(layer, &q_rot, positions)?;
        self.inner_mut().forward(layer, q_rot, k_pre, v, positions)
    }

    /// Clears the wrapper's own state after the inner cache was reset.
    fn after_reset(&mut self) {}
}

impl<W: CacheWrapper> AttentionCache for W {
    fn append(
        &mut self,
        layer: usize,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        self.before_append(layer, &k_pre, &v, positions)?;
        self.inner_mut().append(layer, k_pre, v, positions)
    }

    fn attend(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        self.before_attend(layer, &q_rot, positions)?;
        self.inner_mut().attend(layer, q_rot, positions)
    }

    fn forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        self.wrapped_forward(layer, q_rot, k_pre, v, positions)
    }

    fn len(&self, layer: usize) -> usize {
        self.inner().len(layer)
    }

    fn reset(&mut self) {
        self.inner_mut().reset();
        self.after_reset();
    }

    fn footprint(&self) -> CacheFootprint {
        self.inner().footprint()
    }

    fn spec_footprint(&self) -> CacheFootprint {
        self.inner().spec_footprint()
    }
}
