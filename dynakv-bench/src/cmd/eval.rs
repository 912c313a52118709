//! `dynakv eval ...`

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dynakv_bench::eval::fidelity::fidelity;
use dynakv_bench::eval::ppl::perplexity;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_models::corpus::{Document, Split};

use dynakv_bench::eval::longctx::Outcome;
use dynakv_bench::eval::longctx_suite::{kept_cells, summarize, Runner, Suite, SuiteSpec};
use dynakv_burn::AttentionCache;

use super::cache_args::CacheArgs;
use super::common::{progress, Loaded, ModelArgs};

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity on Brown (or a text file) under the documented protocol.
    Ppl(PplArgs),
    /// KL(full ‖ compressed) of next-token distributions and top-1 agreement
    /// on the same windows as `ppl`.
    Fidelity(PplArgs),
    /// Long-context retrieval (passkey, multikey, codeword) on Brown `eval`
    /// haystacks, scored against the full cache on the same prompts.
    Longctx(LongctxArgs),
    /// A grid of caches through ppl (and fidelity): JSON lines and plots.
    Sweep(super::sweep::SweepArgs),
    /// Ranks a policy gives each token of a text, and mean rank per layer.
    Ranks(super::ranks::RanksArgs),
}

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
    #[arg(long, default_value_t = 0.6)]
    pub keep_threshold: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Corpus {
    Brown,
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[arg(long, value_enum, default_value_t = Corpus::Brown)]
    pub corpus: Corpus,
    /// calib (odd-numbered documents) or eval (even-numbered).
    #[arg(long, default_value = "eval")]
    pub split: String,
    /// Score this text file instead of the corpus.
    #[arg(long)]
    pub text: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub ctx: usize,
    /// Use only the first N documents of the split.
    #[arg(long)]
    pub docs: Option<usize>,
    /// Score at most N windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Skip the first N windows (e.g. the calib windows calibration used).
    #[arg(long, default_value_t = 0)]
    pub skip_windows: usize,
    /// Prefill each window's first ctx − N tokens, let the cache compress
    /// (SnapKV prunes here), then feed and score only the last N tokens.
    #[arg(long)]
    pub score_last: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(a) => ppl(a),
        EvalCommand::Fidelity(a) => fidelity_cmd(a),
        EvalCommand::Longctx(a) => longctx_cmd(a),
        EvalCommand::Sweep(a) => super::sweep::run(a),
        EvalCommand::Ranks(a) => super::ranks::run(a),
    }
}

/// A comma-separated list (empty items skipped), naming `what` on a bad item.
pub(super) fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("bad {what} `{x}`: {e}"))
        })
        .collect()
}

/// The suite of `spec` on Brown `eval` and its full-cache reference: read
/// from `reference` when there, else run (with a progress bar) and written
/// there.
pub(super) fn longctx_reference(
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
        Ok(Box::new(loaded.model.dense_cache()?) as Box<dyn AttentionCache>)
    })?;
    if let Some(p) = reference {
        suite.save_reference(p, &full)?;
    }
    Ok((suite, full))
}

/// Runs the samples `which` of a suite behind a progress bar.
pub(super) fn run_longctx(
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
            tasks: parse_list(&self.tasks, "task")?,
            lengths: parse_list(&self.lengths, "length")?,
            depths: parse_list(&self.depths, "depth")?,
            seed: self.seed,
        })
    }
}

fn longctx_cmd(a: LongctxArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let (suite, full) = longctx_reference(&loaded, &a.spec()?, a.full_results.as_deref())?;
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
            || maker.make(&loaded),
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

/// Token ids of the requested text after skipped windows, and the document count.
fn window_ids(a: &PplArgs, loaded: &super::common::Loaded) -> Result<(Vec<u32>, usize)> {
    let docs = match &a.text {
        Some(p) => vec![Document {
            id: p.display().to_string(),
            text: std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        }],
        None => {
            let split: Split = a.split.parse()?;
            let Corpus::Brown = a.corpus;
            brown_docs(split, a.docs)?
        }
    };
    let ids = document_tokens(&loaded.tokenizer, &docs)?;
    let ids = ids.get(a.skip_windows * a.ctx..).unwrap_or(&[]).to_vec();
    if ids.len() < a.ctx {
        bail!(
            "the text has {} tokens, fewer than one window of --ctx {}",
            ids.len(),
            a.ctx
        );
    }
    Ok((ids, docs.len()))
}

fn window_bar(a: &PplArgs, ids: &[u32], msg: &'static str) -> indicatif::ProgressBar {
    let n_windows = (ids.len() / a.ctx).min(a.max_windows.unwrap_or(usize::MAX));
    let bar = progress(
        n_windows as u64,
        "{msg} [{bar:30}] {pos}/{len} windows, ETA {eta}",
    );
    bar.set_message(msg);
    bar
}

fn fidelity_cmd(a: PplArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let (ids, n_docs) = window_ids(&a, &loaded)?;
    let bar = window_bar(&a, &ids, "fidelity");
    let maker = a.cache.maker(&loaded)?;
    let r = fidelity(
        &loaded.model,
        &ids,
        a.ctx,
        a.max_windows,
        a.score_last,
        || Ok(Box::new(loaded.model.dense_cache()?) as Box<dyn dynakv_burn::AttentionCache>),
        || maker.make(&loaded),
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["cache"] = a.cache.label().into();
        v["docs"] = n_docs.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{}: KL mean {:.4} nats, p95 {:.4}, top-1 agreement {:.4}, retained {:.4} \
             ({} positions, {} windows of {})",
            a.cache.label(),
            r.kl_mean,
            r.kl_p95,
            r.top1_agreement,
            r.retained,
            r.positions,
            r.windows,
            r.ctx
        );
    }
    Ok(())
}

fn ppl(a: PplArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let (ids, n_docs) = window_ids(&a, &loaded)?;
    let bar = window_bar(&a, &ids, "ppl");
    let maker = a.cache.maker(&loaded)?;
    let detail = perplexity(
        &loaded.model,
        &ids,
        a.ctx,
        a.max_windows,
        a.score_last,
        || maker.make(&loaded),
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let r = &detail.report;
    if a.json {
        let mut v = serde_json::to_value(r)?;
        v["cache"] = a.cache.label().into();
        v["docs"] = n_docs.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{}: PPL {:.4}, retained {:.4}, {:.1} MB of {:.1} MB dense  ({} predicted tokens, {} windows of {}, {} docs)",
            a.cache.label(),
            r.ppl,
            r.retained,
            r.bytes / 1e6,
            r.bytes_full / 1e6,
            r.tokens,
            r.windows,
            r.ctx,
            n_docs
        );
    }
    Ok(())
}
