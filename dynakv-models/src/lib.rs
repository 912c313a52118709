//! Reference models for dynakv: a GGUF reader, the byte-level BPE tokenizer
//! from GGUF metadata, a Llama-family model whose attention goes through
//! [`dynakv_burn::AttentionCache`], generation, and the fetching of the
//! default model and corpus.

pub mod assets;
pub mod corpus;
mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod tokenizer;

pub use error::ModelError;
pub use llama::{LlamaConfig, LlamaModel};
pub use tokenizer::TextTokenizer;
