//! burn integration of dynakv: the attention-cache seam between a model and
//! the way it stores past keys and values.
//!
//! A model hands the cache its RoPE'd queries and the new pre-RoPE keys and
//! values; the cache decides how to store them and computes attention over what
//! it stores. Swapping caches never touches model code.

pub mod attention;
pub mod cache;
mod calibrate;
pub mod device;
mod error;
mod factory;
mod host;
pub mod rope;
#[cfg(feature = "train")]
pub mod router;
mod spec;
#[cfg(feature = "train")]
pub mod train;

#[cfg(feature = "snapkv")]
pub use cache::SnapKvCache;
pub use cache::{
    AttentionCache, CacheGeometry, CacheWrapper, DenseCache, DynaKvBases, DynaKvCache,
    KeepPositions, KvStorage, PrunableCache, Recorded, RecordingCache,
};
pub use calibrate::{calibrate, CalibrationConfig, CalibrationTarget};
pub use dynakv_core;
#[cfg(feature = "snapkv")]
pub use dynakv_snapkv;
pub use error::CacheError;
pub use factory::CacheFactory;
pub use rope::{Rope, RopeStyle};
pub use spec::CacheSpec;
