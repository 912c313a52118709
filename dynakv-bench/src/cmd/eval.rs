//! `dynakv eval ...`

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dynakv_bench::eval::fidelity::fidelity;
use dynakv_bench::eval::ppl::perplexity;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_models::corpus::{Document, Split};

use super::cache_args::CacheArgs;
use super::common::{progress, ModelArgs};

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

fn longctx_cmd(a: LongctxArgs) -> Result<()> {
    use dynakv_bench::eval::longctx::{build_samples, cells, run_sample, Outcome, Task};
    let loaded = a.model.load()?;
    let tasks: Vec<Task> = parse_list(&a.tasks, "task")?;
    let lengths: Vec<usize> = parse_list(&a.lengths, "length")?;
    let depths: Vec<f64> = parse_list(&a.depths, "depth")?;
    if let Some(&l) = lengths
        .iter()
        .find(|&&l| l > loaded.model.config.context_length)
    {
        bail!(
            "length {l} exceeds the model's context ({})",
            loaded.model.config.context_length
        );
    }
    let stream = document_tokens(&loaded.tokenizer, &brown_docs(Split::Eval, None)?)?;
    let system = loaded.default_system.as_deref();
    let mut samples = Vec::new();
    for &task in &tasks {
        for &length in &lengths {
            samples.extend(build_samples(
                &loaded.tokenizer,
                system,
                &stream,
                task,
                length,
                loaded.model.config.context_length,
                &depths,
                a.seed,
            )?);
        }
    }
    // The dense cache is exact, so where the question is prefilled does not
    // change its answers: one full-cache reference serves both variants.
    let key = format!(
        "tasks={} lengths={} depths={} seed={}",
        a.tasks, a.lengths, a.depths, a.seed
    );
    let run_all = |label: &str,
                   which: &[usize],
                   make: &dyn Fn() -> Result<Box<dyn dynakv_burn::AttentionCache>>|
     -> Result<Vec<Outcome>> {
        let bar = progress(
            which.len() as u64,
            "{msg} [{bar:30}] {pos}/{len} prompts, ETA {eta}",
        );
        bar.set_message(label.to_string());
        let mut out = Vec::new();
        for &i in which {
            let mut cache = make()?;
            out.push(run_sample(
                &loaded.model,
                &loaded.tokenizer,
                system,
                &samples[i],
                a.query_aware,
                cache.as_mut(),
            )?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(out)
    };
    let all: Vec<usize> = (0..samples.len()).collect();
    let full: Vec<Outcome> = match a.full_results.as_ref().filter(|p| p.exists()) {
        Some(p) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)?;
            if v["key"].as_str() != Some(key.as_str()) {
                bail!(
                    "{} holds full-cache results for `{}`, not `{key}`",
                    p.display(),
                    v["key"]
                );
            }
            let out: Vec<Outcome> = serde_json::from_value(v["outcomes"].clone())?;
            if out.len() != samples.len() {
                bail!(
                    "{} holds {} outcomes for {} prompts",
                    p.display(),
                    out.len(),
                    samples.len()
                );
            }
            out
        }
        None => {
            let out = run_all("full", &all, &|| {
                Ok(Box::new(loaded.model.dense_cache()?) as Box<dyn dynakv_burn::AttentionCache>)
            })?;
            if let Some(p) = &a.full_results {
                let v = serde_json::json!({"key": key, "outcomes": out});
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, serde_json::to_string(&v)?)?;
                std::fs::rename(&tmp, p)?;
            }
            out
        }
    };
    let full_cells = cells(&full);
    let kept: Vec<_> = full_cells
        .iter()
        .filter(|c| c.score >= a.keep_threshold)
        .cloned()
        .collect();
    let dropped: Vec<_> = full_cells
        .iter()
        .filter(|c| c.score < a.keep_threshold)
        .cloned()
        .collect();
    let in_kept = |i: &usize| {
        kept.iter()
            .any(|c| c.task == samples[*i].task && c.length == samples[*i].length)
    };
    let which: Vec<usize> = all.iter().copied().filter(in_kept).collect();
    let compressed = if a.cache.is_full() {
        which.iter().map(|&i| full[i].clone()).collect()
    } else {
        let maker = a.cache.maker(&loaded)?;
        run_all(&a.cache.label(), &which, &|| Ok(maker.make(&loaded)?))?
    };
    let comp_cells = cells(&compressed);
    let mean = |c: &[dynakv_bench::eval::longctx::Cell]| {
        if c.is_empty() {
            f64::NAN
        } else {
            c.iter().map(|x| x.score).sum::<f64>() / c.len() as f64
        }
    };
    let (score_full, score) = (mean(&kept), mean(&comp_cells));
    let retained =
        compressed.iter().map(|o| o.retained).sum::<f64>() / compressed.len().max(1) as f64;
    let report = serde_json::json!({
        "cache": a.cache.label(),
        "query_aware": a.query_aware,
        "key": key,
        "keep_threshold": a.keep_threshold,
        "full_cells": full_cells,
        "kept": kept,
        "dropped": dropped,
        "cells": comp_cells,
        "score_full": score_full,
        "score": score,
        "relative": score / score_full,
        "retained": retained,
        "outcomes": compressed,
    });
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for c in &full_cells {
            let comp = comp_cells
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
            score,
            score_full,
            kept.len(),
            100.0 * score / score_full,
            retained
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
