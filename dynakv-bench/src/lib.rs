//! The dynakv evaluation harness: calibration, perplexity, speed, and (as the
//! issues land) fidelity, long-context retrieval and sweeps. The `dynakv`
//! binary is a thin clap layer over these functions, so tests call the same code.

pub mod eval;
pub mod plot;
pub mod text;
