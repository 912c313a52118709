//! The `dynakv train` driver: capture calibration windows, run the local
//! stage, fit τ on held-out calib windows, and write a trained artifact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use dynakv_burn::train::{CaptureCache, LayerInputs, LocalConfig, LocalTrainer, StepStats};
use dynakv_burn::CacheError;
use dynakv_core::artifact::{Artifact, RouterInfo};
use dynakv_models::{LlamaModel, ModelError};

/// What the run used and reached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    pub seconds: f64,
    pub tau: f32,
    pub heldout_retained: f64,
    pub last: Option<StepStatsOut>,
    pub interrupted: bool,
}

/// [`StepStats`] for JSON.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepStatsOut {
    pub step: usize,
    pub loss: f64,
    pub err: f64,
    pub retained: f64,
    pub lambda: f64,
}

impl From<StepStats> for StepStatsOut {
    fn from(s: StepStats) -> Self {
        Self {
            step: s.step,
            loss: s.loss,
            err: s.err,
            retained: s.retained,
            lambda: s.lambda,
        }
    }
}

/// Every layer's attention inputs for consecutive windows of `ctx` tokens.
pub fn capture_windows(
    model: &LlamaModel,
    ids: &[u32],
    ctx: usize,
) -> Result<Vec<Vec<LayerInputs>>, ModelError> {
    ids.chunks_exact(ctx)
        .map(|w| {
            let mut cache = CaptureCache::new(model.config.geometry(), model.rope().clone())?;
            model.hidden(w, 0, &mut cache)?;
            Ok(cache.into_layers()?)
        })
        .collect()
}

/// Training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Per-layer attention-output loss on captured windows.
    Local,
    /// Whole-model KL to the full cache.
    E2e,
}

impl std::str::FromStr for Stage {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "local" => Ok(Self::Local),
            "e2e" => Ok(Self::E2e),
            o => Err(ModelError::InvalidInput(format!(
                "stage `{o}` (expected local or e2e)"
            ))),
        }
    }
}

/// Trains a router (and bases) on `train_ids`, fits τ on `heldout_ids`, and
/// returns the trained artifact. Starts from the artifact's routers when it
/// has them (e2e after local). `stop` ends training early (the state so far
/// is kept); `on_step` sees every step.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &LlamaModel,
    model_sha256: &str,
    artifact: &Artifact,
    train_ids: &[u32],
    heldout_ids: &[u32],
    ctx: usize,
    config: &LocalConfig,
    stage: Stage,
    stop: &AtomicBool,
    mut on_step: impl FnMut(&StepStats),
) -> Result<(Artifact, TrainSummary), ModelError> {
    model.check_artifact(artifact, model_sha256)?;
    let t0 = Instant::now();
    let windows: Vec<&[u32]> = train_ids.chunks_exact(ctx).collect();
    let train = match stage {
        Stage::Local => capture_windows(model, train_ids, ctx)?,
        Stage::E2e => Vec::new(),
    };
    let heldout = capture_windows(model, heldout_ids, ctx)?;
    if windows.is_empty() || heldout.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "need at least one window of {ctx} tokens for training and for held-out text"
        )));
    }
    let wo = (0..model.config.n_layers)
        .map(|l| {
            model
                .wo(l)
                .cloned()
                .ok_or_else(|| ModelError::InvalidInput(format!("no W_o for layer {l}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut trainer = LocalTrainer::new(
        artifact,
        model.config.geometry(),
        model.rope().clone(),
        wo,
        config.clone(),
        model.device(),
    )?;
    let mut last = None;
    let mut interrupted = false;
    let mut rng = config.seed ^ 0x9E37_79B9_7F4A_7C15;
    for _ in 0..config.steps {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let s = match stage {
            Stage::Local => trainer.step(&train)?,
            Stage::E2e => {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let w = windows[(rng >> 33) as usize % windows.len()];
                let full = model.forward(w, 0, &mut model.dense_cache()?)?;
                trainer.e2e_step(
                    |cache| {
                        model
                            .forward(w, 0, cache)
                            .map_err(|e| CacheError::Config(e.to_string()))
                    },
                    full,
                )?
            }
        };
        on_step(&s);
        last = Some(s);
    }
    let lat = trainer.latents(&heldout)?;
    let (policy, heldout_retained) = trainer.fitted_policy(&lat)?;
    let (routers, bases) = trainer.export()?;
    let mut out = artifact.clone();
    for (pair, trained) in out.bases.iter_mut().zip(bases) {
        for (b, (enc, dec)) in pair.iter_mut().zip(trained) {
            b.enc = enc;
            b.dec = dec;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let steps = last.map_or(0, |s| s.step);
    out.routers = Some(routers);
    out.header.router = Some(RouterInfo {
        tau: policy.tau,
        target: config.target,
        stage: match stage {
            Stage::Local => "local".into(),
            Stage::E2e => "e2e".into(),
        },
        steps,
        tokens: windows.len() * ctx,
        seconds,
        trained_bases: !config.freeze_bases && config.bases_scale > 0.0,
        heldout_retained,
        lambda: trainer.lambda(),
    });
    Ok((
        out,
        TrainSummary {
            steps,
            train_tokens: windows.len() * ctx,
            heldout_tokens: heldout.len() * ctx,
            seconds,
            tau: policy.tau,
            heldout_retained,
            last: last.map(Into::into),
            interrupted,
        },
    ))
}
