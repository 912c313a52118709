//! Reference models for dynakv: a GGUF reader, the byte-level BPE tokenizer
//! from GGUF metadata, a Llama-family model whose attention goes through
//! [`dynakv_burn::AttentionCache`], generation, and the fetching of the
//! default model and corpus.
//!
//! ```no_run
//! use dynakv_burn::{AttentionCache, CacheSpec};
//! use dynakv_core::artifact::Artifact;
//! use dynakv_models::{gguf::GgufFile, LlamaModel, TextTokenizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let path = dynakv_models::assets::default_model()?; // fetched on first use
//! let gguf = GgufFile::open(&path)?;
//! let model = LlamaModel::from_gguf(&gguf, &dynakv_burn::device::default_device())?;
//! let tokens = TextTokenizer::from_gguf(&gguf)?.encode("The quick brown fox")?;
//! // DynaKV at 30% of the dimensions, from an artifact of `dynakv calibrate`.
//! let artifact = Artifact::load("pca-pre.safetensors".as_ref())?;
//! model.check_artifact(&artifact, &dynakv_models::assets::sha256_file(&path)?)?;
//! let spec: CacheSpec = "dynakv:energy@0.30".parse()?;
//! let mut cache = model.cache_factory(Some(&artifact), &spec)?.make()?;
//! let logits = model.forward(&tokens, 0, cache.as_mut())?;
//! println!("{:?}, {} bytes cached", logits.dims(), cache.bytes());
//! # Ok(())
//! # }
//! ```

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

pub mod assets;
pub mod corpus;
mod error;
pub mod generate;
pub mod gguf;
pub mod heap;
mod huge_pages;
pub mod llama;
pub mod qmatmul;
pub mod stamp;
pub mod texts;
pub mod tokenizer;

pub use error::ModelError;
pub use llama::{LlamaConfig, LlamaModel};
pub use tokenizer::TextTokenizer;
