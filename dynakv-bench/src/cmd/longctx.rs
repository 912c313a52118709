//! `dynakv eval longctx`, and the suite runs `eval sweep` shares.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use dynakv_bench::eval::longctx::Outcome;
use dynakv_bench::eval::longctx_suite::{kept_cells, summarize, Runner, Suite, SuiteSpec};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::AttentionCache;
use dynakv_models::corpus::Split;

use super::cache_args::CacheArgs;
use super::common::{progress, Loaded, ModelArgs};
use super::values;

#[derive(Args, Debug)]
pub struct LongctxArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[arg(long, default_value = "passkey,multikey,codeword")]
    pub tasks: String,
    /// Prompt lengths in tokens.
    #[arg(long, default_value = "1024,2048,4096,8192")]
    pub lengths: String,
    /// Needle depths (fraction of the haystack); one sample per depth.
    #[arg(long, default_value = "0.1,0.5,0.9")]
    pub depths: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Question inside the prefill (SnapKV's window sees it); default:
    /// context prefilled alone, question after.
    #[arg(long)]
    pub query_aware: bool,
    /// Full-cache outcomes for the same prompts: read if present, else
    /// computed and written there (they are the reference of every run).
    #[arg(long)]
    pub full_results: Option<PathBuf>,
    /// Cells where the full cache scores below this are dropped.
    #[arg(value_parser = values::unit, long, default_value_t = 0.6)]
    pub keep_threshold: f64,
    #[arg(long)]
    pub json: bool,
}

/// The suite of `spec` on Brown `eval` and its full-cache reference: read
/// from `reference` when there, else run (with a progress bar) and written
/// there.
pub fn longctx_reference(
    loaded: &Loaded,
    spec: &SuiteSpec,
    reference: Option<&Path>,
) -> Result<(Suite, Vec<Outcome>)> {
    let runner = loaded.runner();
    let stream = document_tokens(&loaded.tokenizer, &brown_docs(Split::Eval, None)?)?;
    let suite = Suite::build(runner, &stream, spec)?;
    if let Some(out) = reference
        .map(|p| suite.load_reference(p))
        .transpose()?
        .flatten()
    {
        return Ok((suite, out));
    }
    let all: Vec<usize> = (0..suite.len()).collect();
    let full = run_longctx(&suite, runner, "full", &all, false, || {
        loaded.model.dense_cache()
    })?;
    if let Some(p) = reference {
        suite.save_reference(p, &full)?;
    }
    Ok((suite, full))
}

/// Runs the samples `which` of a suite behind a progress bar.
pub fn run_longctx(
    suite: &Suite,
    runner: Runner<'_>,
    label: &str,
    which: &[usize],
    query_aware: bool,
    make: impl FnMut() -> Result<Box<dyn AttentionCache>, dynakv_models::ModelError>,
) -> Result<Vec<Outcome>> {
    let bar = progress(
        which.len() as u64,
        "{msg} [{bar:30}] {pos}/{len} prompts, ETA {eta}",
    );
    bar.set_message(label.to_string());
    let out = suite.run(runner, which, query_aware, make, || bar.inc(1))?;
    bar.finish_and_clear();
    Ok(out)
}

impl LongctxArgs {
    fn spec(&self) -> Result<SuiteSpec> {
        Ok(SuiteSpec {
            tasks: values::list(&self.tasks, "task", true, values::parsed)?,
            lengths: values::list(&self.lengths, "length", true, values::at_least_one)?,
            depths: values::list(&self.depths, "depth", true, values::unit)?,
            seed: self.seed,
        })
    }
}

pub fn run(a: LongctxArgs) -> Result<()> {
    a.cache.check()?;
    let spec = a.spec()?;
    if let Some(p) = &a.full_results {
        super::common::check_writable("--full-results", p)?;
    }
    let loaded = a.model.load()?;
    let (suite, full) = longctx_reference(&loaded, &spec, a.full_results.as_deref())?;
    let (kept, _) = kept_cells(&full, a.keep_threshold);
    let which = suite.in_cells(&kept);
    let compressed = if a.cache.is_full() {
        which.iter().map(|&i| full[i].clone()).collect()
    } else {
        let maker = a.cache.maker(&loaded)?;
        let label = a.cache.label();
        run_longctx(
            &suite,
            loaded.runner(),
            &label,
            &which,
            a.query_aware,
            || maker.make(),
        )?
    };
    let s = summarize(&full, &compressed, a.keep_threshold);
    if a.json {
        let mut report = serde_json::to_value(&s)?;
        report["cache"] = a.cache.label().into();
        report["query_aware"] = a.query_aware.into();
        report["key"] = suite.key.clone().into();
        report["outcomes"] = serde_json::to_value(&compressed)?;
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for c in &s.full_cells {
            let comp = s
                .cells
                .iter()
                .find(|x| x.task == c.task && x.length == c.length);
            println!(
                "{:?} @ {}: full {}/{}{}",
                c.task,
                c.length,
                c.correct,
                c.n,
                match comp {
                    Some(x) => format!(", {} {}/{}", a.cache.label(), x.correct, x.n),
                    None => " (dropped: full cache below the threshold)".into(),
                }
            );
        }
        println!(
            "{}: score {:.3} vs full {:.3} over {} kept cells = {:.1}% of full, retained {:.3}",
            a.cache.label(),
            s.score,
            s.score_full,
            s.kept.len(),
            100.0 * s.relative,
            s.retained
        );
    }
    Ok(())
}
