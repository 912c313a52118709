//! Backend-agnostic KV-cache compression math (no burn): calibration
//! statistics, spectral bases, rank levels and policies, accounting and the
//! artifact format.

pub mod artifact;
pub mod basis;
pub mod budget;
mod error;
pub mod levels;
pub mod policy;
pub mod stats;

pub use error::CoreError;
