//! One module per CLI command.

pub mod bench;
pub mod cache_args;
pub mod calibrate;
pub mod common;
pub mod eval;
pub mod fetch;
pub mod generate;
mod heldout_choice;
pub mod longctx;
pub mod ranks;
pub mod sweep;
pub mod train;
pub mod values;
