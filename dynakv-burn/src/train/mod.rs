//! Post-training of DynaKV's router (and bases) with the base model frozen.
//! `local` (the default stage) fits each layer's compressed attention to its
//! exact attention on captured calibration windows.

pub mod capture;
pub mod local;

pub use capture::{CaptureCache, LayerInputs};
pub use local::{LocalConfig, LocalTrainer, StepStats, Trainables};
