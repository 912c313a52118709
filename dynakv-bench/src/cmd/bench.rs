//! `dynakv bench`: prefill and decode throughput on Brown `eval` text.

use anyhow::Result;
use clap::Args;
use dynakv_bench::eval::speed::{decode, prefill, SpeedReport};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_models::corpus::Split;

use super::cache_args::CacheArgs;
use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Prefill lengths.
    #[arg(long, value_delimiter = ',', default_values_t = [512usize, 2048])]
    pub prefill: Vec<usize>,
    /// Context for the decode measurement.
    #[arg(long, default_value_t = 1024)]
    pub decode_ctx: usize,
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let model = &loaded.model;
    eprintln!("cache: {}", a.cache.label());
    let need = a
        .prefill
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(a.decode_ctx + a.decode_steps);
    let mut docs = brown_docs(Split::Eval, Some(8))?;
    let mut ids = document_tokens(&loaded.tokenizer, &docs)?;
    if ids.len() < need {
        docs = brown_docs(Split::Eval, None)?;
        ids = document_tokens(&loaded.tokenizer, &docs)?;
    }
    let maker = a.cache.maker(&loaded)?;
    let mut make = || maker.make(&loaded);
    let mut reports: Vec<SpeedReport> = Vec::new();
    for &n in &a.prefill {
        reports.push(prefill(model, &ids, n, a.reps, &mut make)?);
    }
    reports.push(decode(
        model,
        &ids,
        a.decode_ctx,
        a.decode_steps,
        a.reps,
        &mut make,
    )?);
    if a.json {
        println!("{}", serde_json::to_string(&reports)?);
    } else {
        for r in &reports {
            println!(
                "{:8} tokens {:5} context {:5}: {:8.1} tokens/s (median of {}, {:.3}s)",
                r.what, r.tokens, r.context, r.tokens_per_s, r.reps, r.median_s
            );
        }
    }
    Ok(())
}
