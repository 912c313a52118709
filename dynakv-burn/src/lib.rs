//! burn integration of dynakv: the attention-cache seam between a model and
//! the way it stores past keys and values.
//!
//! A model hands the cache its RoPE'd queries and the new pre-RoPE keys and
//! values; the cache decides how to store them and computes attention over what
//! it stores. Swapping caches never touches model code.
//!
//! To use the caches in your own model: state its [`CacheGeometry`] (with
//! its [`RopeStyle`]), call [`AttentionCache::forward`] once per layer, get
//! an artifact from [`calibrate()`] (your forward pass over a
//! [`RecordingCache`]), and build caches from a [`CacheSpec`] with a
//! [`CacheFactory`]. `examples/own_model.rs` does all four in one file.
//!
//! ```
//! use burn::tensor::{Distribution, Tensor};
//! use dynakv_burn::{AttentionCache, CacheFactory, CacheGeometry, CacheSpec, Rope, RopeStyle};
//!
//! let device = dynakv_burn::device::default_device();
//! let geometry = CacheGeometry {
//!     n_layers: 1,
//!     n_heads: 4,
//!     n_kv_heads: 2,
//!     head_dim: 8,
//!     rope_style: RopeStyle::Interleaved,
//! };
//! let rope = Rope::new(RopeStyle::Interleaved, 8, 8, 10_000.0, 256, &device).unwrap();
//! let factory = CacheFactory::new(geometry, rope, &device, None, &CacheSpec::dense()).unwrap();
//! let mut cache = factory.make().unwrap();
//! // One layer's prefill of 5 tokens: queries [1, H, T, D], keys/values [1, H_kv, T, D].
//! let rand = |shape| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
//! let positions = [0, 1, 2, 3, 4];
//! let out = cache
//!     .forward(0, rand([1, 4, 5, 8]), rand([1, 2, 5, 8]), rand([1, 2, 5, 8]), &positions)
//!     .unwrap();
//! assert_eq!(out.dims(), [1, 4, 5, 8]);
//! assert_eq!(cache.len(0), 5);
//! ```
//!
//! Features: `flex` (CPU, default), `wgpu`, `cuda` pick burn's backend;
//! `snapkv` adds SnapKV pruning over any cache; `train` adds router training
//! (and with it burn's autodiff and optimisers); `clap` derives
//! `clap::ValueEnum` on the enums a command line takes.

// Input never panics the library or the CLI (docs/architecture.md, "Where
// input is validated"): outside tests these are errors, not warnings.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable
    )
)]

pub mod attention;
pub mod cache;
mod calibrate;
pub mod device;
mod error;
mod factory;
mod host;
mod layer_plan;
#[cfg(feature = "snapkv")]
pub mod preset;
pub mod rope;
#[cfg(feature = "train")]
pub mod router;
mod spec;
#[cfg(feature = "train")]
pub mod train;

#[cfg(feature = "snapkv")]
pub use cache::SnapKvCache;
pub use cache::{
    AttentionCache, Borrowed, CacheGeometry, CacheWrapper, DenseCache, DynaKvBases, DynaKvCache,
    KeepPositions, KvStorage, LayeredCache, Precision, PrunableCache, Recorded, RecordingCache,
};
pub use calibrate::{calibrate, CalibrationConfig, CalibrationTarget};
pub use dynakv_core;
#[cfg(feature = "snapkv")]
pub use dynakv_snapkv;
pub use error::CacheError;
pub use factory::CacheFactory;
pub use layer_plan::{LayerAttention, LayerPlan, LayerScope, PlanPart};
#[cfg(feature = "snapkv")]
pub use preset::{Preset, PRESETS};
pub use rope::{Rope, RopeStyle};
pub use spec::CacheSpec;
