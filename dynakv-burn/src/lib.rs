//! burn integration of dynakv: the attention-cache seam between a model and
//! the way it stores past keys and values.
//!
//! A model hands the cache its RoPE'd queries and the new pre-RoPE keys and
//! values; the cache decides how to store them and computes attention over what
//! it stores. Swapping caches never touches model code.

pub mod attention;
pub mod cache;
pub mod device;
mod error;
pub mod rope;
pub mod router;
pub mod train;

#[cfg(feature = "snapkv")]
pub use cache::SnapKvCache;
pub use cache::{
    AttentionCache, CacheGeometry, DenseCache, DynaKvBases, DynaKvCache, KeepPositions, KvStorage,
    PrunableCache, Recorded, RecordingCache,
};
#[cfg(feature = "snapkv")]
pub use dynakv_snapkv;
pub use error::CacheError;
pub use rope::Rope;
