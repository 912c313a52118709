//! Evaluation commands' logic.

pub mod fidelity;
pub mod longctx;
pub mod ppl;
pub mod speed;
