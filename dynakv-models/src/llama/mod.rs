//! The Llama family (Llama, SmolLM, Mistral-style GQA) read from GGUF.

mod config;
mod layer;
mod model;
pub mod weights;

pub use config::LlamaConfig;
pub use model::{nll_and_top1, LlamaModel};
pub use weights::{Projection, WeightMode, PACKED_GEMM_MIN_TOKENS};
