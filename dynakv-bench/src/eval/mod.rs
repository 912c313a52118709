//! Evaluation commands' logic.

pub mod ppl;
pub mod speed;
