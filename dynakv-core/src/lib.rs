//! Backend-agnostic KV-cache compression math (no burn): memory accounting
//! today; calibration statistics, spectral bases, rank policies and the
//! artifact format as the DynaKV issues land.

pub mod budget;
mod error;

pub use error::CoreError;
