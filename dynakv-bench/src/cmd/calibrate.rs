//! `dynakv calibrate`

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::{calibrate, CalibrationConfig, LayerScope};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::basis::BasisKind;
use dynakv_models::corpus::Split;
use dynakv_models::ModelError;

use super::common::{progress, ModelArgs};
use super::heldout_choice::{choose_key_factor, choose_policy};
use super::values;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write the artifact (safetensors with a JSON header).
    #[arg(long)]
    pub out: PathBuf,
    /// Brown `calib` tokens whose statistics define the bases.
    #[arg(value_parser = values::at_least_one, long, default_value_t = 32768)]
    pub tokens: usize,
    /// Further held-out `calib` tokens on which rank policies are fitted.
    #[arg(value_parser = values::at_least_one, long, default_value_t = 2048)]
    pub sample_tokens: usize,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 1024)]
    pub ctx: usize,
    /// pca | query-aware (keys) | output-aware (values)
    #[arg(long, value_enum, default_value_t = BasisKind::Pca)]
    pub basis: BasisKind,
    /// pre (latents of pre-RoPE keys, the paper) | post (latents of rotated keys)
    #[arg(long, value_enum, default_value_t = RopePlacement::Pre)]
    pub rope: RopePlacement,
    /// Rank levels are multiples of this.
    #[arg(value_parser = values::at_least_one, long, default_value_t = 8)]
    pub level_step: usize,
    /// Key factors of the energy rule to score on the held-out sample
    /// windows (energy at --key-factor-budget, PPL of each); the best is
    /// recorded in the artifact and becomes the default of `--policy
    /// energy` with it. `none` skips the search (then the default is 2).
    #[arg(long, default_value = "1,2,4,8,16,32")]
    pub key_factors: String,
    /// The budget at which the key factors are scored.
    #[arg(value_parser = values::fraction, long, default_value_t = 0.30)]
    pub key_factor_budget: f64,
    /// Budgets at which uniform and energy (its chosen key factor) are
    /// scored on the held-out sample windows; the policy with the lower
    /// mean log PPL is recorded in the artifact and is what `--policy
    /// auto` (the default) runs. `none` records none (then auto is energy).
    #[arg(long, default_value = "0.47,0.3,0.2")]
    pub policy_budgets: String,
    /// Layers the artifact covers, on a model with sliding-window layers
    /// (Gemma 3): the global ones (global, the default) or every layer
    /// (all: each group of windowed layers is calibrated as well, over its
    /// window and RoPE base, for caches run with `--layers all`; such an
    /// artifact serves `--layers global` too).
    #[arg(long, default_value = "global", value_parser = values::parsed::<LayerScope>)]
    pub layers: LayerScope,
}

impl CalibrateArgs {
    /// `--policy-budgets`: empty for `none`.
    fn policy_budgets(&self) -> Result<Vec<f64>> {
        none_or_list(&self.policy_budgets, "policy budget", values::fraction)
    }

    /// `--key-factors`: empty for `none`.
    fn key_factors(&self) -> Result<Vec<f32>> {
        none_or_list(&self.key_factors, "key factor", values::positive_f32)
    }
}

/// A comma-separated list of a search, or `none` (no search: empty).
fn none_or_list<T>(s: &str, what: &str, one: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>> {
    if s.trim() == "none" {
        return Ok(Vec::new());
    }
    values::list(s, what, true, one)
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    super::common::check_writable("--out", &a.out)?;
    let key_factors = a.key_factors()?;
    let policy_budgets = a.policy_budgets()?;
    let cfg = CalibrationConfig {
        stats_windows: a.tokens.div_ceil(a.ctx).max(1),
        sample_windows: a.sample_tokens.div_ceil(a.ctx).max(1),
        basis: a.basis,
        rope: a.rope,
        level_step: a.level_step,
    };
    let loaded = a.model.load()?;
    let model = &loaded.model;
    cfg.validate(model.cache_geometry())?;
    let docs = brown_docs(Split::Calib, None)?;
    let ids = document_tokens(&loaded.tokenizer, &docs)?;
    let ids = dynakv_models::corpus::protocol_stream(&ids, a.ctx, loaded.tokenizer.text_bos());
    let windows: Vec<&[u32]> = ids.chunks_exact(a.ctx).collect();
    let t0 = std::time::Instant::now();
    let mut parts = model.cache_parts()?;
    if a.layers == LayerScope::Global {
        parts.truncate(1);
    }
    let output_aware = cfg.basis == BasisKind::OutputAware;
    let mut calibrated = Vec::with_capacity(parts.len());
    for (p, part) in parts.iter().enumerate() {
        let bar = progress(
            0,
            &format!(
                "calibrate part {}/{} [{{bar:30}}] {{pos}}/{{len}} windows, ETA {{eta}}",
                p + 1,
                parts.len()
            ),
        );
        let target = model.calibration_target_of(part, &loaded.sha256, output_aware)?;
        let artifact = calibrate(
            &target,
            &cfg,
            &windows,
            // the recording cache holds the part's layers (the global ones
            // by default); the other layers get fresh caches around it
            |w: &&[u32], cache| {
                model
                    .hidden(w, 0, model.around_part(p, cache)?.as_mut())
                    .map(|_| ())
            },
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .map_err(|e: ModelError| anyhow::anyhow!(e))?;
        bar.finish_and_clear();
        calibrated.push(artifact);
    }
    let artifact = match calibrated.len() {
        1 => calibrated.remove(0),
        _ => {
            let joined: Vec<(&[usize], &Artifact)> = parts
                .iter()
                .map(|p| p.layers.as_slice())
                .zip(&calibrated)
                .collect();
            Artifact::join_layers(&joined, model.config.n_layers)?
        }
    };
    let mut artifact = artifact;
    // the held-out sample windows, on which policies are fitted
    let first = cfg.stats_windows.min(windows.len());
    let heldout = &windows[first..(first + cfg.sample_windows).min(windows.len())];
    if !key_factors.is_empty() {
        artifact.header.key_factor = Some(choose_key_factor(
            model,
            &artifact,
            heldout,
            &key_factors,
            a.key_factor_budget,
            a.layers,
        )?);
    }
    if !policy_budgets.is_empty() {
        artifact.header.policy = Some(choose_policy(
            model,
            &artifact,
            heldout,
            &policy_budgets,
            a.layers,
        )?);
    }
    artifact.save(&a.out)?;
    eprintln!(
        "wrote {} ({} layers, {} calib tokens, {} sample tokens, basis {:?}, rope {:?}) in {:.0}s",
        a.out.display(),
        artifact.header.model.n_layers,
        artifact.header.calib_tokens,
        artifact.header.sample_positions.len(),
        cfg.basis,
        cfg.rope,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
