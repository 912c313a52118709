//! Evaluation commands' logic.

pub mod bytes;
pub mod fidelity;
pub mod llama_cpp;
pub mod longctx;
pub mod longctx_suite;
pub mod ppl;
pub mod records;
pub mod speed;
