//! Post-training of DynaKV's router (and bases) with the base model frozen.
//! `local` (the default stage) fits each layer's compressed attention to its
//! exact attention on captured calibration windows; `e2e` fits the whole
//! model's next-token distributions (KL to the full cache).

pub mod capture;
mod driver;
pub mod e2e;
pub mod local;

pub use capture::{CaptureCache, LayerInputs};
pub use driver::{train, Stage, StepStatsOut, TrainSummary, TrainTarget};
pub use e2e::SoftMaskCache;
pub use local::{LocalConfig, LocalTrainer, StepStats, Trainables};
