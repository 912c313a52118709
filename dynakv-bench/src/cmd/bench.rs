//! `dynakv bench`: prefill and decode throughput on Brown `eval` text.

use anyhow::{bail, Result};
use clap::Args;
use dynakv_bench::eval::speed::{decode, decode_paired, prefill, SpeedReport};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::CacheSpec;
use dynakv_models::corpus::Split;

use super::cache_args::CacheArgs;
use super::common::ModelArgs;
use super::values;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Prefill lengths.
    #[arg(value_parser = values::at_least_one, long, value_delimiter = ',', default_values_t = [512usize, 2048])]
    pub prefill: Vec<usize>,
    /// Context for the decode measurement.
    #[arg(value_parser = values::at_least_one, long, default_value_t = 1024)]
    pub decode_ctx: usize,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 32)]
    pub decode_steps: usize,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 3)]
    pub reps: usize,
    #[arg(long)]
    pub json: bool,
    /// Also decode with the dense cache, step for step in turn with the
    /// chosen cache, and report the speed ratio (robust to a noisy machine).
    #[arg(long)]
    pub paired: bool,
    /// The cache the paired run measures against (a cache spec, e.g.
    /// `dynakv:energy@0.3+store:basis=f32`; DynaKV ones take --artifact);
    /// implies --paired. Default: the default dense cache (`dense`, f16
    /// keys and values, as llama.cpp's).
    #[arg(long)]
    pub paired_base: Option<CacheSpec>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    a.cache.check()?;
    if let Some(base) = &a.paired_base {
        base.validate()?;
        if base.dynakv.is_some() && a.cache.artifact.is_none() {
            bail!("--paired-base `{base}` is a DynaKV cache: it needs --artifact FILE");
        }
    }
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
    let mut make = || maker.make();
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
    let base = a.paired_base.clone().unwrap_or_else(CacheSpec::dense);
    let base_label = base.to_string();
    let paired = if a.paired || a.paired_base.is_some() {
        let mut dense: Box<dyn dynakv_burn::AttentionCache> =
            a.cache.maker_for(&loaded, &base)?.make()?;
        let mut other = make()?;
        Some(decode_paired(
            model,
            &ids,
            a.decode_ctx,
            a.decode_steps,
            dense.as_mut(),
            other.as_mut(),
        )?)
    } else {
        None
    };
    if a.json {
        let out = match &paired {
            Some(p) => serde_json::json!({"runs": reports, "paired": p, "paired_base": base_label}),
            None => serde_json::to_value(&reports)?,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for r in &reports {
            println!(
                "{:8} tokens {:5} context {:5}: {:8.1} tokens/s (median of {}, {:.3}s)",
                r.what, r.tokens, r.context, r.tokens_per_s, r.reps, r.median_s
            );
        }
        if let Some(p) = &paired {
            println!(
                "paired decode at context {} ({} steps each, in turn): {base_label} {:.2} ms, {} {:.2} ms, {base_label} / {} = {:.3} (median of per-step ratios)",
                p.context,
                p.steps,
                1e3 * p.base_median_s,
                a.cache.label(),
                1e3 * p.other_median_s,
                a.cache.label(),
                p.speed_ratio
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn run_with(args: &[&str]) -> Result<()> {
        run(Cli::try_parse_from(std::iter::once("dynakv").chain(args.iter().copied()))?.bench)
    }

    #[test]
    fn a_paired_base_is_checked_before_the_model_loads() {
        // a model path that does not exist: these must fail before loading it
        let model = ["--model", "/nonexistent/model.gguf"];
        let err = |extra: &[&str]| {
            let args: Vec<&str> = model.iter().chain(extra).copied().collect();
            run_with(&args).unwrap_err().to_string()
        };
        let e = err(&["--paired-base", "dynakv:energy@0.3"]);
        assert!(e.contains("--artifact"), "{e}");
        let e = err(&["--paired-base", "dynakv:energy@7"]);
        assert!(e.contains("budget") || e.contains("0.3"), "{e}");
        assert!(Cli::try_parse_from(["dynakv", "--paired-base", "densest"]).is_err());
    }
}
