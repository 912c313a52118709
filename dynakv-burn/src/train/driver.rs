//! The training driver for any model: capture windows through the caller's
//! forward pass, run the local or e2e stage, fit tau on held-out windows,
//! and return a trained artifact.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use dynakv_core::artifact::{Artifact, RouterInfo};
use serde::{Deserialize, Serialize};

use super::{CaptureCache, LayerInputs, LocalConfig, LocalTrainer, StepStats};
use crate::cache::{AttentionCache, CacheGeometry, DenseCache};
use crate::error::CacheError;
use crate::rope::Rope;

/// What the run used and reached.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Copy, Serialize)]
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

/// What training needs of a model besides its forward pass.
#[derive(Debug, Clone)]
pub struct TrainTarget<'a> {
    pub geometry: CacheGeometry,
    pub rope: &'a Rope,
    pub device: &'a Device,
    /// Per layer, the output projection `W_o` `[n_heads * head_dim, d_model]`
    /// (the local stage's loss is the attention output after it).
    pub output_proj: Vec<Tensor<2>>,
}

/// Every layer's attention inputs for each window, through `forward`.
fn capture_windows<W, E: From<CacheError>>(
    target: &TrainTarget<'_>,
    windows: &[W],
    forward: &impl Fn(&W, &mut dyn AttentionCache) -> Result<Tensor<2>, E>,
) -> Result<Vec<Vec<LayerInputs>>, E> {
    windows
        .iter()
        .map(|w| {
            let mut cache = CaptureCache::new(target.geometry, target.rope.clone())?;
            forward(w, &mut cache)?;
            Ok(cache.into_layers()?)
        })
        .collect()
}

/// Training stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Stage {
    /// Per-layer attention-output loss on captured windows.
    Local,
    /// Whole-model KL to the full cache.
    E2e,
}

impl std::str::FromStr for Stage {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, CacheError> {
        match s {
            "local" => Ok(Self::Local),
            "e2e" => Ok(Self::E2e),
            o => Err(CacheError::Config(format!(
                "stage `{o}` (expected local or e2e)"
            ))),
        }
    }
}

/// Trains a router (and bases) on `train_windows`, fits tau on
/// `heldout_windows` (token ids), and returns the trained artifact. Starts from the
/// artifact's routers when it has them (e2e after local). `forward` runs the
/// caller's model over one window (a prefill from position 0) with the given
/// cache and returns its logits `[T, vocab]` (the e2e stage compares them
/// with the dense cache's); its errors come back as they are. `stop` ends
/// training early (the state so far is kept); `on_step` sees every step.
///
/// The artifact must have been calibrated on this model: the caller checks
/// its identity.
#[allow(clippy::too_many_arguments)]
pub fn train<W: AsRef<[u32]>, E: From<CacheError>>(
    target: &TrainTarget<'_>,
    artifact: &Artifact,
    train_windows: &[W],
    heldout_windows: &[W],
    config: &LocalConfig,
    stage: Stage,
    stop: &AtomicBool,
    forward: impl Fn(&W, &mut dyn AttentionCache) -> Result<Tensor<2>, E>,
    mut on_step: impl FnMut(&StepStats),
) -> Result<(Artifact, TrainSummary), E> {
    let t0 = Instant::now();
    if train_windows.is_empty() || heldout_windows.is_empty() {
        return Err(CacheError::Config(
            "need at least one window for training and one held out".into(),
        )
        .into());
    }
    let train = match stage {
        Stage::Local => capture_windows(target, train_windows, &forward)?,
        Stage::E2e => Vec::new(),
    };
    let heldout = capture_windows(target, heldout_windows, &forward)?;
    let mut trainer = LocalTrainer::new(
        artifact,
        target.geometry,
        target.rope.clone(),
        target.output_proj.clone(),
        config.clone(),
        target.device,
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
                let w = &train_windows[(rng >> 33) as usize % train_windows.len()];
                let mut dense = DenseCache::new(target.geometry, target.rope.clone())?;
                let full = forward(w, &mut dense)?;
                trainer.e2e_step(|cache| forward(w, cache), full)?
            }
        };
        on_step(&s);
        last = Some(s);
    }
    if last.is_none() && config.steps > 0 {
        return Err(CacheError::NothingTrained.into());
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
    let tokens = |ws: &[W]| ws.iter().map(|w| w.as_ref().len()).sum::<usize>();
    let train_tokens = tokens(train_windows);
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
        tokens: train_tokens,
        seconds,
        trained_bases: !config.freeze_bases && config.bases_scale > 0.0,
        heldout_retained,
        lambda: trainer.lambda(),
        shares: policy.shares_at(&lat, policy.tau),
    });
    Ok((
        out,
        TrainSummary {
            steps,
            train_tokens,
            heldout_tokens: tokens(heldout_windows),
            seconds,
            tau: policy.tau,
            heldout_retained,
            last: last.map(Into::into),
            interrupted,
        },
    ))
}
