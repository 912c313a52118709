//! `dynakv eval ...`

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use dynakv_bench::eval::fidelity::fidelity;
use dynakv_bench::eval::llama_cpp::llama_cpp_perplexity;
use dynakv_bench::eval::ppl::perplexity;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_models::corpus::{Document, Split};
use dynakv_models::llama::LlamaCppRun;
use dynakv_models::qmatmul::Numerics;
use dynakv_models::texts::TextKind;

use super::cache_args::CacheArgs;
use super::common::{progress, ModelArgs};
use super::values;

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Perplexity on Brown (or a text file) under the documented protocol.
    Ppl(PplArgs),
    /// KL(full ‖ compressed) of next-token distributions and top-1 agreement
    /// on the same windows as `ppl`.
    Fidelity(PplArgs),
    /// Long-context retrieval (passkey, multikey, codeword) on Brown `eval`
    /// haystacks, scored against the full cache on the same prompts.
    Longctx(super::longctx::LongctxArgs),
    /// A grid of caches through ppl (and fidelity): JSON lines and plots.
    Sweep(super::sweep::SweepArgs),
    /// Ranks a policy gives each token of a text, and mean rank per layer.
    Ranks(super::ranks::RanksArgs),
}

/// Which text: Brown (split by `--split`), or a held-out text of another
/// kind (`dynakv_models::texts`; never used for calibration, read whole).
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Corpus {
    Brown,
    /// Mailing-list mail (SpamAssassin easy-ham-1 bodies, npm).
    Mail,
    /// Source code (lodash.js 4.17.21, npm).
    Code,
    /// Shuffled sentences of many registers (nlp-corpus 4.4.0, npm).
    Mixed,
}

impl Corpus {
    /// The held-out text, for every corpus but Brown.
    pub fn held_out(self) -> Option<TextKind> {
        match self {
            Corpus::Brown => None,
            Corpus::Mail => Some(TextKind::Mail),
            Corpus::Code => Some(TextKind::Code),
            Corpus::Mixed => Some(TextKind::Mixed),
        }
    }
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[arg(long, value_enum, default_value_t = Corpus::Brown)]
    pub corpus: Corpus,
    /// Brown only: calib (odd-numbered documents) or eval (even-numbered,
    /// the default).
    #[arg(long)]
    pub split: Option<String>,
    /// Score this text file instead of the corpus.
    #[arg(long)]
    pub text: Option<PathBuf>,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 1024)]
    pub ctx: usize,
    /// Use only the first N documents of the split.
    #[arg(value_parser = values::at_least_one, long)]
    pub docs: Option<usize>,
    /// Score at most N windows.
    #[arg(value_parser = values::at_least_one, long)]
    pub max_windows: Option<usize>,
    /// Skip the first N windows (e.g. the calib windows calibration used).
    #[arg(long, default_value_t = 0)]
    pub skip_windows: usize,
    /// Prefill each window's first ctx − N tokens, let the cache compress
    /// (SnapKV prunes here), then feed and score only the last N tokens.
    #[arg(value_parser = values::at_least_one, long)]
    pub score_last: Option<usize>,
    /// With --score-last: feed the scored tokens in chunks of N (1: one
    /// decode step a token, as generation feeds them, so the caches' decode
    /// kernels compute what is scored; default: one chunk).
    #[arg(value_parser = values::at_least_one, long)]
    pub score_chunk: Option<usize>,
    /// Score with llama.cpp's arithmetic instead of the engine: the
    /// reference decoder reproduces llama.cpp's run on the quantised file
    /// bit for bit, one token at a time (`one-token`, as llama.cpp
    /// generates) or as its default build evaluates a batch (`batched`, as
    /// llama-perplexity does), without flash attention, with an f16 KV
    /// cache (`--kv-dtype f16`, the default in both) or f32. Needs `--matmul
    /// q8`; Llama-family files with Q4_1 / Q8_0 weights.
    #[arg(long, value_enum)]
    pub llama_cpp: Option<LlamaCppArg>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `--llama-cpp`.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum LlamaCppArg {
    OneToken,
    Batched,
}

impl From<LlamaCppArg> for LlamaCppRun {
    fn from(a: LlamaCppArg) -> Self {
        match a {
            LlamaCppArg::OneToken => LlamaCppRun::OneToken,
            LlamaCppArg::Batched => LlamaCppRun::Batched,
        }
    }
}

impl PplArgs {
    /// The flags, checked before the model loads.
    fn check(&self) -> Result<()> {
        self.cache.check()?;
        if self.llama_cpp.is_some() {
            if self.model.matmul != Numerics::Q8 {
                bail!("--llama-cpp reproduces llama.cpp's quantised products: give --matmul q8");
            }
            self.cache.llama_cpp_kv()?;
            if self.score_last.is_some() {
                bail!("--llama-cpp scores whole windows: drop --score-last");
            }
        }
        let other = self.text.is_some() || self.corpus.held_out().is_some();
        if self.split.is_some() && other {
            bail!("--split applies to --corpus brown only");
        }
        if self.text.is_some() && self.corpus.held_out().is_some() {
            bail!("give --text or --corpus, not both");
        }
        if self.ctx < 2 {
            bail!("--ctx {}: a window needs at least 2 tokens", self.ctx);
        }
        if self.skip_windows.checked_mul(self.ctx).is_none() {
            bail!(
                "--skip-windows {} with --ctx {}: more tokens than can be counted",
                self.skip_windows,
                self.ctx
            );
        }
        if self.score_chunk.is_some() && self.score_last.is_none() {
            bail!(
                "--score-chunk applies to the tokens --score-last N scores: give --score-last too"
            );
        }
        if let Some(n) = self.score_last {
            if n >= self.ctx {
                bail!(
                    "--score-last {n} must be below --ctx {}: the rest is the prompt",
                    self.ctx
                );
            }
        }
        Ok(())
    }
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Ppl(a) => ppl(a),
        EvalCommand::Fidelity(a) => fidelity_cmd(a),
        EvalCommand::Longctx(a) => super::longctx::run(a),
        EvalCommand::Sweep(a) => super::sweep::run(a),
        EvalCommand::Ranks(a) => super::ranks::run(a),
    }
}

/// Token ids of the requested text after skipped windows, and the document count.
fn window_ids(a: &PplArgs, loaded: &super::common::Loaded) -> Result<(Vec<u32>, usize)> {
    let docs = match &a.text {
        Some(p) => vec![Document {
            id: p.display().to_string(),
            text: std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        }],
        None => match a.corpus.held_out() {
            Some(kind) => {
                let mut docs = kind.documents()?;
                if let Some(n) = a.docs {
                    docs.truncate(n);
                }
                docs
            }
            None => brown_docs(
                a.split.as_deref().unwrap_or("eval").parse::<Split>()?,
                a.docs,
            )?,
        },
    };
    let ids = document_tokens(&loaded.tokenizer, &docs)?;
    let total = ids.len();
    let bos = loaded.tokenizer.text_bos();
    // checked in `check`
    let skip = a.skip_windows * dynakv_models::corpus::text_per_window(a.ctx, bos);
    let ids = dynakv_models::corpus::protocol_stream(ids.get(skip..).unwrap_or(&[]), a.ctx, bos);
    if ids.len() < a.ctx {
        bail!(
            "the text has {total} tokens; after --skip-windows {} ({skip} tokens) fewer than one window of --ctx {} remain",
            a.skip_windows,
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
    a.check()?;
    if a.llama_cpp.is_some() {
        bail!("--llama-cpp applies to `eval ppl`");
    }
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
        a.score_chunk,
        || loaded.model.dense_cache(),
        || maker.make(),
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
    a.check()?;
    let loaded = a.model.load()?;
    let (ids, n_docs) = window_ids(&a, &loaded)?;
    if let Some(run) = a.llama_cpp {
        return llama_cpp_ppl(&a, &loaded, &ids, n_docs, run.into());
    }
    let bar = window_bar(&a, &ids, "ppl");
    let maker = a.cache.maker(&loaded)?;
    let detail = perplexity(
        &loaded.model,
        &ids,
        a.ctx,
        a.max_windows,
        a.score_last,
        a.score_chunk,
        || maker.make(),
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let r = &detail.report;
    if a.json {
        let mut v = serde_json::to_value(r)?;
        v["cache"] = a.cache.label().into();
        v["docs"] = n_docs.into();
        v["score_chunk"] = a.score_chunk.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{}: PPL {:.4}, retained {:.4}, {:.2} MB ({:.1}% of an f16 dense cache per token, {:.1} B/token; f16 dense {:.2} MB)  ({} predicted tokens, {} windows of {}, {} docs)",
            a.cache.label(),
            r.ppl,
            r.retained,
            r.bytes.bytes / 1e6,
            100.0 * r.bytes.kv_fraction_f16,
            r.bytes.kv_bytes_per_token,
            r.bytes.bytes_f16_dense / 1e6,
            r.tokens,
            r.windows,
            r.ctx,
            n_docs
        );
    }
    Ok(())
}

/// `dynakv eval ppl --llama-cpp RUN`.
fn llama_cpp_ppl(
    a: &PplArgs,
    loaded: &super::common::Loaded,
    ids: &[u32],
    n_docs: usize,
    run: LlamaCppRun,
) -> Result<()> {
    let kv = a.cache.llama_cpp_kv()?;
    let bar = window_bar(a, ids, "llama.cpp ppl");
    let r = llama_cpp_perplexity(&loaded.model, ids, a.ctx, a.max_windows, run, kv, |done| {
        bar.set_position(done as u64)
    })?;
    bar.finish_and_clear();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["engine"] = "llama.cpp reference".into();
        v["docs"] = n_docs.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "llama.cpp ({}, q8, {} cache): PPL {:.4}, top-1 accuracy {:.4} ({} predicted tokens, {} windows of {}, {} docs)",
            r.run, r.kv, r.ppl, r.top1_accuracy, r.tokens, r.windows, r.ctx, n_docs
        );
    }
    Ok(())
}
