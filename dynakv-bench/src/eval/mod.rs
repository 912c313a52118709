//! Evaluation commands' logic.

pub mod fidelity;
pub mod ppl;
pub mod speed;
