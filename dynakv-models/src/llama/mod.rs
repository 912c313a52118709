//! The Llama family (Llama, SmolLM, Mistral-style GQA) read from GGUF.

mod config;
mod layer;
mod model;
mod weights;

pub use config::LlamaConfig;
pub use model::{nll_and_top1, LlamaModel};
