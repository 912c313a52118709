//! The dynakv evaluation harness: calibration, perplexity, speed, and (as the
//! issues land) fidelity, long-context retrieval and sweeps. The `dynakv`
//! binary is a thin clap layer over these functions, so tests call the same code.

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

pub mod eval;
pub mod plot;
pub mod text;
