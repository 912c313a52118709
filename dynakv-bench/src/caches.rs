//! Building the cache a command asks for: full, or DynaKV with a policy at a budget.

use std::path::Path;
use std::sync::Arc;

use dynakv_burn::dynakv_snapkv::{GqaScores, KeepBudget, SnapKvConfig};
use dynakv_burn::{AttentionCache, DynaKvBases, DynaKvCache, PrunableCache, SnapKvCache};
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::{
    EnergyPolicy, EnergyRule, PerLayerPolicy, PolicyKind, RankPolicy, RecentFull, RouterPolicy,
    UniformPolicy,
};
use dynakv_models::{LlamaModel, ModelError};

use crate::calibrate::{core_err, model_identity};

/// Options of a DynaKV cache.
#[derive(Debug, Clone)]
pub struct DynaKvSpec {
    pub policy: PolicyKind,
    pub budget: f64,
    /// Tokens at the start kept at full rank by `uniform` and `per-layer`.
    pub sink_tokens: usize,
    /// Energy policy: key threshold as a multiple of the value threshold.
    pub key_factor: f32,
    /// Energy policy: threshold or lagrange rule.
    pub energy_rule: EnergyRule,
    /// The last N tokens of every append keep full rank (0: off); see
    /// [`RecentFull`].
    pub recent_full: usize,
}

/// Builds the policy for a budget from an artifact's calibration sample.
pub fn build_policy(
    artifact: &Artifact,
    spec: &DynaKvSpec,
) -> Result<Arc<dyn RankPolicy>, ModelError> {
    let levels = &artifact.header.levels;
    let inner: Arc<dyn RankPolicy> = match spec.policy {
        PolicyKind::Uniform => Arc::new(
            UniformPolicy::for_budget(spec.budget, levels, spec.sink_tokens).map_err(core_err)?,
        ),
        PolicyKind::PerLayer => Arc::new(
            PerLayerPolicy::fit(&artifact.sample, levels, spec.budget, spec.sink_tokens)
                .map_err(core_err)?,
        ),
        PolicyKind::Router => {
            let (Some(info), Some(routers)) = (&artifact.header.router, &artifact.routers) else {
                return Err(ModelError::InvalidInput(
                    "--policy router needs an artifact from `dynakv train`".into(),
                ));
            };
            // The router was trained for one target and its tau fitted on
            // held-out latents the artifact does not keep: other budgets need
            // another training run.
            if (spec.budget - info.target).abs() > 1e-6 {
                return Err(ModelError::InvalidInput(format!(
                    "this router was thresholded for budget {}, not {} (retrain or pass --budget {})",
                    info.target, spec.budget, info.target
                )));
            }
            Arc::new(
                RouterPolicy::new(routers.clone(), levels.clone(), info.tau).map_err(core_err)?,
            )
        }
        PolicyKind::Energy => Arc::new(
            EnergyPolicy::fit(
                &artifact.sample,
                artifact.mean_latents(),
                levels,
                spec.budget,
                spec.key_factor,
                spec.energy_rule,
            )
            .map_err(core_err)?,
        ),
    };
    Ok(match spec.recent_full {
        0 => inner,
        n => Arc::new(RecentFull::new(inner, n, levels.full())),
    })
}

/// A factory of fresh DynaKV caches sharing uploaded bases and a policy.
pub struct DynaKvFactory {
    bases: Arc<DynaKvBases>,
    policy: Arc<dyn RankPolicy>,
}

impl DynaKvFactory {
    /// Loads an artifact, checks it was calibrated for this model, fits the policy.
    pub fn new(
        model: &LlamaModel,
        model_sha256: &str,
        artifact_path: &Path,
        spec: &DynaKvSpec,
    ) -> Result<Self, ModelError> {
        let artifact = Artifact::load(artifact_path).map_err(core_err)?;
        Self::from_artifact(model, model_sha256, &artifact, spec)
    }

    pub fn from_artifact(
        model: &LlamaModel,
        model_sha256: &str,
        artifact: &Artifact,
        spec: &DynaKvSpec,
    ) -> Result<Self, ModelError> {
        artifact
            .header
            .model
            .check(&model_identity(model, model_sha256.to_string()))
            .map_err(core_err)?;
        let bases = Arc::new(DynaKvBases::new(
            artifact,
            model.config.geometry(),
            model.device(),
        )?);
        let policy = build_policy(artifact, spec)?;
        Ok(Self { bases, policy })
    }

    pub fn make(&self, model: &LlamaModel) -> Result<DynaKvCache, ModelError> {
        Ok(DynaKvCache::new(
            model.config.geometry(),
            model.rope().clone(),
            self.bases.clone(),
            self.policy.clone(),
        )?)
    }

    pub fn make_boxed(&self, model: &LlamaModel) -> Result<Box<dyn AttentionCache>, ModelError> {
        Ok(Box::new(self.make(model)?))
    }
}

/// SnapKV on top of a cache: a preset and a budget (ratio or capacity).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapKvSpec {
    /// `kvpress` (w 64, k 5, avg), `paper` (w 32, k 7, max) or `recall`
    /// (w 32, k 7, forward max: ours).
    pub preset: String,
    /// Fraction of prompt tokens removed (kvpress semantics).
    pub ratio: Option<f64>,
    /// Tokens kept (original SnapKV semantics).
    pub capacity: Option<usize>,
    /// A per-layer selection scores a token by its largest score over query
    /// heads instead of the mean ([`GqaScores::LayerMax`]).
    pub layer_max: bool,
}

impl SnapKvSpec {
    /// The SnapKV configuration, or `None` when no budget was asked for.
    /// `per_layer` selects one token set per layer (a DynaKV inner cache).
    pub fn config(&self, per_layer: bool) -> Result<Option<SnapKvConfig>, ModelError> {
        let budget = match (self.ratio, self.capacity) {
            (None, None) => return Ok(None),
            (Some(r), None) => KeepBudget::CompressionRatio(r),
            (None, Some(c)) => KeepBudget::Capacity(c),
            (Some(_), Some(_)) => {
                return Err(ModelError::InvalidInput(
                    "give a SnapKV ratio or a capacity, not both".into(),
                ))
            }
        };
        let mut config = match self.preset.as_str() {
            "kvpress" => SnapKvConfig::kvpress(0.0),
            "paper" => SnapKvConfig::paper(0),
            "recall" => SnapKvConfig::recall(0.0),
            o => {
                return Err(ModelError::InvalidInput(format!(
                    "unknown SnapKV preset `{o}` (expected kvpress, paper or recall)"
                )))
            }
        };
        config.budget = budget;
        if per_layer || self.layer_max {
            config.gqa = if self.layer_max {
                GqaScores::LayerMax
            } else {
                GqaScores::Layer
            };
        }
        config
            .validate()
            .map_err(|e| ModelError::InvalidInput(format!("snapkv: {e}")))?;
        Ok(Some(config))
    }
}

/// Wraps a prunable cache in SnapKV when a configuration is given.
pub fn with_snapkv<C: PrunableCache + 'static>(
    cache: C,
    snapkv: Option<&SnapKvConfig>,
    model: &LlamaModel,
) -> Result<Box<dyn AttentionCache>, ModelError> {
    Ok(match snapkv {
        None => Box::new(cache),
        Some(c) => Box::new(SnapKvCache::new(
            cache,
            c.clone(),
            model.config.geometry(),
            model.rope().clone(),
        )?),
    })
}
