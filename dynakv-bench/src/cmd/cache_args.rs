//! `--cache full|dynakv` and its options, shared by eval and bench commands.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use dynakv_bench::caches::{DynaKvFactory, DynaKvSpec};
use dynakv_burn::AttentionCache;
use dynakv_core::policy::PolicyKind;
use dynakv_models::ModelError;

use super::common::Loaded;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Full,
    Dynakv,
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    #[arg(long, value_enum, default_value_t = CacheKind::Full)]
    pub cache: CacheKind,
    /// Calibration artifact from `dynakv calibrate` (for --cache dynakv).
    #[arg(long)]
    pub artifact: Option<PathBuf>,
    /// uniform | per-layer | energy
    #[arg(long, default_value = "energy")]
    pub policy: String,
    /// Target retained fraction in (0, 1].
    #[arg(long, default_value_t = 0.47)]
    pub budget: f64,
    /// uniform / per-layer: the first N tokens keep full rank (attention sinks).
    #[arg(long, default_value_t = 1)]
    pub sink_tokens: usize,
    /// energy: weight of key error against value error (lagrange rule), or key
    /// threshold as a multiple of the value threshold (threshold rule).
    /// Default tuned on Brown calib windows 40-41 (docs/results.md).
    #[arg(long, default_value_t = 2.0)]
    pub key_factor: f32,
    /// energy: lagrange (water-filling: equal marginal error per dimension over
    /// tokens, layers, K and V) or threshold (equal relative error per token).
    #[arg(long, default_value = "lagrange")]
    pub energy_rule: String,
}

/// Makes fresh caches of the requested kind.
pub enum CacheMaker {
    Full,
    DynaKv(DynaKvFactory),
}

impl CacheArgs {
    pub fn label(&self) -> String {
        match self.cache {
            CacheKind::Full => "full".into(),
            CacheKind::Dynakv => format!("dynakv/{}/{}", self.policy, self.budget),
        }
    }

    pub fn maker(&self, loaded: &Loaded) -> Result<CacheMaker> {
        Ok(match self.cache {
            CacheKind::Full => CacheMaker::Full,
            CacheKind::Dynakv => {
                let Some(path) = &self.artifact else {
                    bail!("--cache dynakv needs --artifact FILE (from `dynakv calibrate`)");
                };
                let spec = DynaKvSpec {
                    policy: self.policy.parse::<PolicyKind>()?,
                    budget: self.budget,
                    sink_tokens: self.sink_tokens,
                    key_factor: self.key_factor,
                    energy_rule: self.energy_rule.parse()?,
                };
                CacheMaker::DynaKv(DynaKvFactory::new(
                    &loaded.model,
                    &loaded.sha256,
                    path,
                    &spec,
                )?)
            }
        })
    }
}

impl CacheMaker {
    pub fn make(&self, loaded: &Loaded) -> Result<Box<dyn AttentionCache>, ModelError> {
        match self {
            CacheMaker::Full => Ok(Box::new(loaded.model.dense_cache()?)),
            CacheMaker::DynaKv(f) => f.make_boxed(&loaded.model),
        }
    }
}
