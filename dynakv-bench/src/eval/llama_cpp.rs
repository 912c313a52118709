//! Perplexity as llama.cpp computes it on the quantised file, bit for bit:
//! the windows of the project's protocol decoded by the llama.cpp reference
//! decoder (`dynakv_models::llama::GgmlReference`: q8 numerics, an f16 or
//! f32 cache, every operation in ggml's order), one token at a time.
//!
//! Why: to check an engine against llama.cpp a user needs llama.cpp's own
//! numbers, and `llama-perplexity` on this text would score other windows
//! (it adds BOS and takes its own halves). This reports what llama.cpp's
//! arithmetic gives on our windows; the parity tests hold it to llama.cpp's
//! run on them (`tools/make_parity_fixture.py`) to the last bit.

use dynakv_models::llama::{nll_and_top1_f64, GgmlReference, LlamaCppKv, LlamaCppRun};
use dynakv_models::{LlamaModel, ModelError};
use serde::Serialize;

/// The result `dynakv eval ppl --llama-cpp RUN --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct LlamaCppReport {
    pub ppl: f64,
    pub mean_nll: f64,
    /// Predicted tokens: `windows * (ctx - 1)`.
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    /// `one-token` or `batched`: which of llama.cpp's runs is reproduced.
    pub run: &'static str,
    /// `f16` or `f32`: llama.cpp's KV cache type reproduced.
    pub kv: &'static str,
    /// Positions whose top-1 token is the target (next-token accuracy).
    pub top1_accuracy: f64,
}

/// Scores non-overlapping windows of `ctx` tokens of `ids` (at most
/// `max_windows`), each from an empty cache, with llama.cpp's arithmetic
/// for `run` and a cache of `kv` rows; `progress(windows_done)` after each
/// window.
pub fn llama_cpp_perplexity(
    model: &LlamaModel,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    run: LlamaCppRun,
    kv: LlamaCppKv,
    mut progress: impl FnMut(usize),
) -> Result<LlamaCppReport, ModelError> {
    if ctx < 2 {
        return Err(ModelError::InvalidInput(format!(
            "a window of {ctx} tokens predicts nothing"
        )));
    }
    let mut reference = GgmlReference::new(model)?.with_run(run).with_kv(kv);
    let windows = (ids.len() / ctx).min(max_windows.unwrap_or(usize::MAX));
    if windows == 0 {
        return Err(ModelError::InvalidInput(format!(
            "{} tokens: not one window of {ctx}",
            ids.len()
        )));
    }
    let (mut nll, mut hits) = (0f64, 0usize);
    for (done, w) in ids.chunks_exact(ctx).take(windows).enumerate() {
        reference.reset();
        for (i, &t) in w[..ctx - 1].iter().enumerate() {
            let (n, top1) = nll_and_top1_f64(&reference.step(t)?, w[i + 1]);
            nll += n;
            hits += (top1 == w[i + 1]) as usize;
        }
        progress(done + 1);
    }
    let tokens = windows * (ctx - 1);
    let mean_nll = nll / tokens as f64;
    Ok(LlamaCppReport {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens,
        windows,
        ctx,
        run: match run {
            LlamaCppRun::OneToken => "one-token",
            LlamaCppRun::Batched => "batched",
        },
        kv: match kv {
            LlamaCppKv::F16 => "f16",
            LlamaCppKv::F32 => "f32",
        },
        top1_accuracy: hits as f64 / tokens as f64,
    })
}
