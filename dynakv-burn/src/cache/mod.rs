//! The attention-cache trait: the single seam between a model and KV storage.

mod dense;
mod dynakv;
mod geometry;
mod layered;
mod precision;
mod recording;
#[cfg(feature = "snapkv")]
mod snapkv;
mod storage;
#[cfg(test)]
pub(crate) mod test_support;
mod wrapper;

pub use dense::DenseCache;
pub use dynakv::{DynaKvBases, DynaKvCache};
pub use geometry::CacheGeometry;
pub use layered::{Borrowed, LayeredCache};
pub use precision::{Precision, DEFAULT_KV, DEFAULT_LATENT};
pub use recording::{Recorded, RecordingCache};
#[cfg(feature = "snapkv")]
pub use snapkv::SnapKvCache;
pub use storage::KvStorage;
pub use wrapper::CacheWrapper;

use burn::tensor::{Device, Tensor, TensorData};
use dynakv_core::budget::CacheFootprint;

use crate::error::CacheError;

/// The joint vector of all heads of each token (what DynaKV's bases act on).
///
/// # Shapes
/// - `x`: `[1, H, T, D]`; returns `[T, H * D]`
pub(crate) fn joint(x: Tensor<4>) -> Tensor<2> {
    let [_, h, t, d] = x.dims();
    x.swap_dims(1, 2).reshape([t, h * d])
}

/// A row-major host matrix as a tensor.
///
/// # Shapes
/// returns `[rows, cols]`
pub(crate) fn mat(v: &[f32], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [rows, cols]), device)
}

/// A sliding window's size, refused when 0 (no key would be visible).
pub(crate) fn check_window(window: usize) -> Result<usize, CacheError> {
    if window == 0 {
        return Err(CacheError::Config("a sliding window of 0 positions".into()));
    }
    Ok(window)
}

/// Decode steps with at most this many queries run a host decode kernel
/// (with [`KvStorage::Host`]); longer chunks (a prefill) attend on the
/// blocked host kernel (`host::dense_prefill`) over f32 / f16 rows (DynaKV
/// first rebuilds its keys and values with burn's GEMM), and through burn's
/// attention otherwise.
pub(crate) const HOST_KERNEL_MAX_QUERIES: usize = 4;

/// A tensor's values on the host, row-major.
pub(crate) fn host_rows<const N: usize>(x: &Tensor<N>) -> Result<Vec<f32>, CacheError> {
    x.clone()
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(CacheError::from)
}

/// Stores past keys and values and computes attention over them.
///
/// The model calls [`AttentionCache::forward`] once per layer per step with the
/// new tokens' RoPE'd queries and **pre-RoPE** keys and values; positions are
/// absolute token positions (what RoPE uses), one per new token.
pub trait AttentionCache: Send {
    /// Stores new keys and values of one layer.
    ///
    /// # Shapes
    /// - `k_pre`, `v`: `[B, H_kv, T, D]`; `positions.len() == T`
    fn append(
        &mut self,
        layer: usize,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError>;

    /// Attention of queries over every stored token whose position is at most
    /// the query's.
    ///
    /// # Shapes
    /// - `q_rot`: `[B, H, T, D]`; `positions.len() == T`
    /// - returns `[B, H, T, D]`
    fn attend(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError>;

    /// Append then attend: what a model layer calls. Caches that must see the
    /// full prefill before deciding what to keep (SnapKV) override it.
    ///
    /// # Shapes
    /// - `q_rot`: `[B, H, T, D]`; `k_pre`, `v`: `[B, H_kv, T, D]`
    /// - returns `[B, H, T, D]`
    fn forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        self.append(layer, k_pre, v, positions)?;
        self.attend(layer, q_rot, positions)
    }

    /// Tokens stored for a layer.
    fn len(&self, layer: usize) -> usize;

    /// Whether nothing is stored in layer 0.
    fn is_empty(&self) -> bool {
        self.len(0) == 0
    }

    /// Forgets everything (a new sequence).
    fn reset(&mut self);

    /// Numbers stored against the dense cache's, metadata and fixed bytes.
    fn footprint(&self) -> CacheFootprint;

    /// True bytes: stored numbers, per-token metadata and fixed overheads.
    fn bytes(&self) -> usize {
        self.footprint().bytes() as usize
    }

    /// The footprint of the layers the spec's cache holds: the global
    /// layers of a [`LayeredCache`] (its sliding-window layers are never
    /// compressed), the whole cache otherwise.
    fn spec_footprint(&self) -> CacheFootprint {
        self.footprint()
    }
}

/// Positions a pruning keeps in one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepPositions {
    /// One token set for every KV head (what a joint-basis cache needs).
    Layer(Vec<usize>),
    /// One token set per KV head, all of the same size (kvpress).
    PerKvHead(Vec<Vec<usize>>),
}

/// A cache whose stored tokens can be thinned after the fact (sequence
/// pruning such as SnapKV). Positions keep their original values.
pub trait PrunableCache: AttentionCache {
    /// Whether each KV head may keep its own token set.
    fn per_kv_head(&self) -> bool;

    /// Keeps only the stored tokens at the given positions of one layer.
    /// Every listed position must be stored.
    fn retain(&mut self, layer: usize, keep: &KeepPositions) -> Result<(), CacheError>;

    /// From now on, stores each layer's first append (the prompt) at full
    /// precision until [`PrunableCache::retain_tiered`] ranks it. An error
    /// for a cache that stores every token whole anyway (dense).
    fn hold_prompt_whole(&mut self) -> Result<(), CacheError> {
        Err(CacheError::Config(
            "snapkv whole=: this cache stores every token at full rank; \
             tiers apply to a DynaKV cache"
                .into(),
        ))
    }

    /// [`PrunableCache::retain`] for a prompt held whole: the kept tokens at
    /// the positions in `whole` keep full rank, the others take the cache's
    /// rank policy.
    fn retain_tiered(
        &mut self,
        layer: usize,
        keep: &KeepPositions,
        whole: &[usize],
    ) -> Result<(), CacheError> {
        let _ = (layer, keep, whole);
        self.hold_prompt_whole()
    }
}
