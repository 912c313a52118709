//! Decoder transformers read from GGUF: the Llama family (Llama, SmolLM,
//! Mistral-style GQA) and Gemma 3; what differs is in [`arch`].

pub mod arch;
mod config;
mod gate;
mod ggml_ops;
mod layer;
mod model;
mod reference;
pub mod weights;

pub use arch::{Activation, Arch};
pub use config::{LayerConfig, LlamaConfig};
pub use model::{nll_and_top1, nll_and_top1_f64, LlamaModel};
pub use reference::{GgmlReference, LlamaCppKv, LlamaCppRun};
pub use weights::{Projection, WeightMode, PACKED_GEMM_MIN_TOKENS, PACKED_TILES_GEMM_MIN_TOKENS};
