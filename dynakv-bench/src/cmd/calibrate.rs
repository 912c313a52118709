//! `dynakv calibrate`

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use dynakv_bench::calibrate::{calibrate, model_identity, CalibrateConfig};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_core::artifact::RopePlacement;
use dynakv_core::basis::BasisKind;
use dynakv_models::corpus::Split;

use super::common::{progress, ModelArgs};

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where to write the artifact (safetensors with a JSON header).
    #[arg(long)]
    pub out: PathBuf,
    /// Brown `calib` tokens whose statistics define the bases.
    #[arg(long, default_value_t = 32768)]
    pub tokens: usize,
    /// Further held-out `calib` tokens on which rank policies are fitted.
    #[arg(long, default_value_t = 2048)]
    pub sample_tokens: usize,
    #[arg(long, default_value_t = 1024)]
    pub ctx: usize,
    /// pca | query-aware (keys) | output-aware (values)
    #[arg(long, default_value = "pca")]
    pub basis: String,
    /// pre (latents of pre-RoPE keys, the paper) | post (latents of rotated keys)
    #[arg(long, default_value = "pre")]
    pub rope: String,
    /// Rank levels are multiples of this.
    #[arg(long, default_value_t = 8)]
    pub level_step: usize,
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    let cfg = CalibrateConfig {
        tokens: a.tokens,
        sample_tokens: a.sample_tokens,
        ctx: a.ctx,
        basis: a.basis.parse::<BasisKind>()?,
        rope: a.rope.parse::<RopePlacement>()?,
        level_step: a.level_step,
    };
    let loaded = a.model.load()?;
    let docs = brown_docs(Split::Calib, None)?;
    let ids = document_tokens(&loaded.tokenizer, &docs)?;
    let bar = progress(0, "calibrate [{bar:30}] {pos}/{len} windows, ETA {eta}");
    let t0 = std::time::Instant::now();
    let identity = model_identity(&loaded.model, loaded.sha256.clone());
    let artifact = calibrate(&loaded.model, &ids, identity, &cfg, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
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
