//! `dynakv calibrate`

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::{calibrate, CalibrationConfig};
use dynakv_core::artifact::RopePlacement;
use dynakv_core::basis::BasisKind;
use dynakv_models::corpus::Split;
use dynakv_models::ModelError;

use super::common::{progress, ModelArgs};
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
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    super::common::check_writable("--out", &a.out)?;
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
    let bar = progress(0, "calibrate [{bar:30}] {pos}/{len} windows, ETA {eta}");
    let t0 = std::time::Instant::now();
    let target = model.calibration_target(&loaded.sha256, cfg.basis == BasisKind::OutputAware)?;
    let artifact = calibrate(
        &target,
        &cfg,
        &windows,
        // the recording cache holds the layers an artifact covers; local
        // layers (Gemma 3) get windowed caches around it
        |w: &&[u32], cache| {
            model
                .hidden(w, 0, model.around(cache)?.as_mut())
                .map(|_| ())
        },
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .map_err(|e: ModelError| anyhow::anyhow!(e))?;
    bar.finish_and_clear();
    artifact.save(&a.out)?;
    eprintln!(
        "wrote {} ({} calib tokens, {} sample tokens, basis {:?}, rope {:?}) in {:.0}s",
        a.out.display(),
        artifact.header.calib_tokens,
        artifact.header.sample_positions.len(),
        cfg.basis,
        cfg.rope,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
