//! `--cache full|dynakv` and its options, shared by eval and bench commands.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use dynakv_bench::caches::{with_snapkv, DynaKvFactory, DynaKvSpec, SnapKvSpec};
use dynakv_burn::dynakv_snapkv::SnapKvConfig;
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
    /// DynaKV: the last N tokens of every append keep full rank, so SnapKV's
    /// window and decoded tokens stay whole (0: off).
    #[arg(long, default_value_t = 0)]
    pub recent_full: usize,
    /// SnapKV at the end of prefill: fraction of prompt tokens removed, in
    /// [0, 1) (kvpress semantics). With --cache dynakv one token set per layer.
    #[arg(long, conflicts_with = "snapkv_capacity")]
    pub snapkv: Option<f64>,
    /// SnapKV with a capacity: at most C prompt tokens kept (original semantics).
    #[arg(long)]
    pub snapkv_capacity: Option<usize>,
    /// SnapKV preset: kvpress (window 64, kernel 5, avg pooling), paper
    /// (window 32, kernel 7, max pooling) or recall (ours: window 32, kernel
    /// 7, forward max pooling, which keeps the tokens after a voted one).
    #[arg(long, default_value = "kvpress")]
    pub snapkv_preset: String,
    /// SnapKV keeps one token set per layer (votes averaged over every query
    /// head) even on the full cache; DynaKV always does (joint basis).
    #[arg(long)]
    pub snapkv_per_layer: bool,
    /// SnapKV keeps one token set per layer, each token scored by its
    /// largest score over query heads (ours) instead of the mean.
    #[arg(long)]
    pub snapkv_layer_max: bool,
}

/// Makes fresh caches of the requested kind.
pub struct CacheMaker {
    kind: MakerKind,
    snapkv: Option<SnapKvConfig>,
}

enum MakerKind {
    Full,
    DynaKv(DynaKvFactory),
}

impl CacheArgs {
    pub fn label(&self) -> String {
        let base = match self.cache {
            CacheKind::Full => "full".into(),
            CacheKind::Dynakv => match self.recent_full {
                0 => format!("dynakv/{}/{}", self.policy, self.budget),
                n => format!("dynakv/{}/{}/recent{n}", self.policy, self.budget),
            },
        };
        let layer = match (self.snapkv_layer_max, self.snapkv_per_layer) {
            (true, _) => "/layer-max",
            (false, true) => "/layer",
            _ => "",
        };
        match (self.snapkv, self.snapkv_capacity) {
            (Some(r), _) => format!("{base}+snapkv/{}{layer}/r{r}", self.snapkv_preset),
            (_, Some(c)) => format!("{base}+snapkv/{}{layer}/c{c}", self.snapkv_preset),
            _ => base,
        }
    }

    /// The uncompressed cache, without SnapKV.
    pub fn is_full(&self) -> bool {
        self.cache == CacheKind::Full && self.snapkv.is_none() && self.snapkv_capacity.is_none()
    }

    fn snapkv_spec(&self) -> SnapKvSpec {
        SnapKvSpec {
            preset: self.snapkv_preset.clone(),
            ratio: self.snapkv,
            capacity: self.snapkv_capacity,
            layer_max: self.snapkv_layer_max,
        }
    }

    pub fn maker(&self, loaded: &Loaded) -> Result<CacheMaker> {
        let per_layer = self.cache == CacheKind::Dynakv || self.snapkv_per_layer;
        let snapkv = self.snapkv_spec().config(per_layer)?;
        let kind = match self.cache {
            CacheKind::Full => MakerKind::Full,
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
                    recent_full: self.recent_full,
                };
                MakerKind::DynaKv(DynaKvFactory::new(
                    &loaded.model,
                    &loaded.sha256,
                    path,
                    &spec,
                )?)
            }
        };
        Ok(CacheMaker { kind, snapkv })
    }
}

impl CacheMaker {
    pub fn make(&self, loaded: &Loaded) -> Result<Box<dyn AttentionCache>, ModelError> {
        let model = &loaded.model;
        let snapkv = self.snapkv.as_ref();
        match &self.kind {
            MakerKind::Full => with_snapkv(model.dense_cache()?, snapkv, model),
            MakerKind::DynaKv(f) => with_snapkv(f.make(model)?, snapkv, model),
        }
    }
}
