//! `dynakv train`

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::train::{train, LocalConfig, Stage};
use dynakv_core::artifact::Artifact;
use dynakv_models::corpus::Split;

use super::common::{progress, ModelArgs};
use super::values;

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibrated artifact to start from (`dynakv calibrate`).
    #[arg(long)]
    pub artifact: PathBuf,
    /// Where to write the trained artifact.
    #[arg(long)]
    pub out: PathBuf,
    /// Retained fraction to train and threshold for.
    #[arg(value_parser = values::fraction, long)]
    pub target: f64,
    /// local (per-layer attention-output loss on captured windows) or e2e
    /// (whole-model KL to the full cache; start it from a local artifact).
    #[arg(long, value_enum, default_value_t = Stage::Local)]
    pub stage: Stage,
    /// Brown `calib` tokens to train on (from the start of the split).
    #[arg(value_parser = values::at_least_one, long, default_value_t = 8192)]
    pub tokens: usize,
    /// Following `calib` tokens on which tau is fitted to hit the target.
    #[arg(value_parser = values::at_least_one, long, default_value_t = 2048)]
    pub heldout_tokens: usize,
    /// Training window length.
    #[arg(value_parser = values::at_least_one, long, default_value_t = 256)]
    pub ctx: usize,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 300)]
    pub steps: usize,
    /// Adam learning rate of the routers.
    #[arg(value_parser = values::positive, long, default_value_t = 1e-2)]
    pub lr: f64,
    /// Basis corrections move lr * this per step.
    #[arg(value_parser = values::non_negative, long, default_value_t = 1e-2)]
    pub bases_scale: f64,
    /// Keep the calibrated bases; train the routers only.
    #[arg(long)]
    pub freeze_bases: bool,
    /// Dual-ascent step of the budget multiplier.
    #[arg(value_parser = values::non_negative, long, default_value_t = 0.05)]
    pub dual_lr: f64,
    /// The paper's alpha in alpha * R^2.
    #[arg(value_parser = values::non_negative, long, default_value_t = 0.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The first N positions of every window keep full rank in training,
    /// as `sink=N` keeps them at inference (the attention sink, BOS).
    #[arg(long, default_value_t = 1)]
    pub sink_tokens: usize,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let stage = a.stage;
    super::common::check_writable("--out", &a.out)?;
    if !a.artifact.is_file() {
        bail!("--artifact {}: no such file", a.artifact.display());
    }
    let loaded = a.model.load()?;
    let artifact = Artifact::load(&a.artifact)?;
    loaded.model.check_artifact(&artifact, &loaded.sha256)?;
    let docs = brown_docs(Split::Calib, None)?;
    let ids = document_tokens(&loaded.tokenizer, &docs)?;
    let need = a.tokens + a.heldout_tokens;
    if ids.len() < need {
        bail!("Brown calib has {} tokens, {need} asked for", ids.len());
    }
    let (train_ids, heldout_ids) = ids[..need].split_at(a.tokens);
    let config = LocalConfig {
        target: a.target,
        steps: a.steps,
        lr: a.lr,
        bases_scale: a.bases_scale,
        freeze_bases: a.freeze_bases,
        dual_lr: a.dual_lr,
        alpha: a.alpha,
        sink_tokens: a.sink_tokens,
        seed: a.seed,
        ..LocalConfig::default()
    };
    // Ctrl-C stops training after the step in progress; the state so far is
    // thresholded and saved (stopped before the first step, nothing is
    // written). A second Ctrl-C quits at once, writing nothing.
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::Relaxed) {
                eprintln!("\ninterrupted again: quitting, nothing written");
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step (Ctrl-C again to quit at once)");
        })?;
    }
    let bar = progress(
        a.steps as u64,
        "train [{bar:30}] {pos}/{len} steps, ETA {eta} {msg}",
    );
    let model = &loaded.model;
    // the perplexity protocol's windows (docs/protocol.md): BOS first where
    // the model expects it, as every window it will be evaluated on
    let bos = loaded.tokenizer.text_bos();
    let train_stream = dynakv_models::corpus::protocol_stream(train_ids, a.ctx, bos);
    let heldout_stream = dynakv_models::corpus::protocol_stream(heldout_ids, a.ctx, bos);
    let (train_windows, heldout_windows): (Vec<&[u32]>, Vec<&[u32]>) = (
        train_stream.chunks_exact(a.ctx).collect(),
        heldout_stream.chunks_exact(a.ctx).collect(),
    );
    let (trained, summary) = train(
        &model.train_target(),
        &artifact,
        &train_windows,
        &heldout_windows,
        &config,
        stage,
        &stop,
        |w: &&[u32], cache| model.forward(w, 0, model.around(cache)?.as_mut()),
        |s| {
            bar.set_position(s.step as u64);
            bar.set_message(format!(
                "loss {:.4} err {:.4} retained {:.3} lambda {:.3}",
                s.loss, s.err, s.retained, s.lambda
            ));
            if s.step % 10 == 0 {
                tracing::info!(
                    step = s.step,
                    loss = s.loss,
                    err = s.err,
                    retained = s.retained,
                    lambda = s.lambda
                );
            }
        },
    )?;
    bar.finish_and_clear();
    trained.save(&a.out)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    eprintln!(
        "wrote {}: {} steps on {} tokens in {:.0}s{}, tau {:.4} gives retained {:.4} on {} held-out tokens",
        a.out.display(),
        summary.steps,
        summary.train_tokens,
        summary.seconds,
        if summary.interrupted { " (interrupted)" } else { "" },
        summary.tau,
        summary.heldout_retained,
        summary.heldout_tokens
    );
    Ok(())
}
