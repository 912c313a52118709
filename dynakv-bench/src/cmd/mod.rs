//! One module per CLI command.

pub mod bench;
pub mod common;
pub mod eval;
pub mod fetch;
pub mod generate;
