//! What `dynakv calibrate` chooses for a model on its held-out calib
//! windows (the windows rank policies are fitted on, never Brown `eval`):
//! the energy rule's key factor, and the training-free policy that
//! `--policy auto` (the default) runs.
//!
//! Why per model: how much key error costs against value error, and
//! whether per-token energy says anything at all, depend on the model
//! (Gemma 3's QK-normed keys need far more key weight than SmolLM2's, and
//! uniform ranks beat energy there: docs/results.md), so a default fixed on
//! one model is wrong on the next.

use anyhow::{bail, Result};
use dynakv_burn::{CacheSpec, LayerScope};
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::{PolicyKind, PolicySpec};
use dynakv_models::llama::LlamaModel;

/// PPL of `spec` over `windows` (each a prefill from position 0).
fn heldout_ppl(
    model: &LlamaModel,
    artifact: &Artifact,
    windows: &[&[u32]],
    spec: &CacheSpec,
) -> Result<f64> {
    let factory = model.cache_factory(Some(artifact), spec)?;
    let (mut nll, mut n) = (0f64, 0usize);
    for w in windows {
        let mut cache = factory.make()?;
        let (x, _) = model.score(w, cache.as_mut())?;
        nll += x.iter().map(|&v| v as f64).sum::<f64>();
        n += x.len();
    }
    let ppl = (nll / n.max(1) as f64).exp();
    if !ppl.is_finite() {
        bail!("`{spec}`: the held-out PPL is not finite");
    }
    Ok(ppl)
}

/// The energy rule's key factor with the lowest held-out PPL at `budget`.
pub fn choose_key_factor(
    model: &LlamaModel,
    artifact: &Artifact,
    windows: &[&[u32]],
    factors: &[f32],
    budget: f64,
    layers: LayerScope,
) -> Result<f32> {
    let mut best: Option<(f32, f64)> = None;
    for &kf in factors {
        let spec = CacheSpec::dynakv(PolicySpec {
            key_factor: Some(kf),
            ..PolicySpec::new(PolicyKind::Energy, budget)
        })
        .on_layers(layers);
        let ppl = heldout_ppl(model, artifact, windows, &spec)?;
        eprintln!("key factor {kf}: energy@{budget} held-out PPL {ppl:.3}");
        if best.is_none_or(|(_, b)| ppl < b) {
            best = Some((kf, ppl));
        }
    }
    let (kf, ppl) = best.ok_or_else(|| anyhow::anyhow!("no key factor to choose from"))?;
    eprintln!("key factor {kf} chosen (PPL {ppl:.3}); recorded in the artifact");
    Ok(kf)
}

/// Uniform or energy (with the artifact's key factor), whichever has the
/// lower mean log PPL over `budgets` on the held-out windows.
pub fn choose_policy(
    model: &LlamaModel,
    artifact: &Artifact,
    windows: &[&[u32]],
    budgets: &[f64],
    layers: LayerScope,
) -> Result<PolicyKind> {
    let mut best: Option<(PolicyKind, f64)> = None;
    for kind in [PolicyKind::Energy, PolicyKind::Uniform] {
        let mut log_ppl = 0.0;
        for &budget in budgets {
            let spec = CacheSpec::dynakv(PolicySpec::new(kind, budget)).on_layers(layers);
            let ppl = heldout_ppl(model, artifact, windows, &spec)?;
            eprintln!("{kind}@{budget}: held-out PPL {ppl:.3}");
            log_ppl += ppl.ln() / budgets.len() as f64;
        }
        if best.is_none_or(|(_, b)| log_ppl < b) {
            best = Some((kind, log_ppl));
        }
    }
    let (kind, log_ppl) = best.ok_or_else(|| anyhow::anyhow!("no policy to choose from"))?;
    eprintln!(
        "policy {kind} chosen (geometric mean PPL {:.3} over budgets {budgets:?}); recorded in the artifact",
        log_ppl.exp()
    );
    Ok(kind)
}
