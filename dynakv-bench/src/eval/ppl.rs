//! Perplexity under the project's protocol: non-overlapping windows of `ctx`
//! tokens (the last partial window dropped), each scored from an empty cache;
//! PPL = exp(mean NLL over every predicted token of every window).
//!
//! With `score_last = N` (the protocol for caches that compress at the end of
//! prefill, such as SnapKV), each window's first `ctx − N` tokens are one
//! prefill, the cache compresses, and the last N tokens are fed as one more
//! chunk; only those N predictions are scored (the first from the prefill's
//! last logit).

use burn::tensor::Tensor;
use dynakv_burn::dynakv_core::budget::CacheFootprint;
use dynakv_burn::AttentionCache;
use dynakv_models::{LlamaModel, ModelError};
use serde::Serialize;

use super::bytes::{ByteAccumulator, ByteReport};

/// The result `dynakv eval ppl --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct PplReport {
    pub ppl: f64,
    pub mean_nll: f64,
    /// Predicted tokens: `windows * (ctx - 1)`.
    pub tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    /// Tokens in the stream before windowing.
    pub input_tokens: usize,
    /// Mean bytes of the cache at the end of a window.
    #[serde(flatten)]
    pub bytes: ByteReport,
    /// Paper-comparable retained fraction (stored numbers over dense numbers).
    pub retained: f64,
    /// Tokens scored at the end of each window after a separate prefill.
    pub score_last: Option<usize>,
    /// Mean retained fraction right after that prefill (the compression point).
    pub retained_prefill: Option<f64>,
    /// Stored numbers over a dense cache of the tokens kept (DynaKV's own
    /// fraction under SnapKV; `retained` when nothing is pruned), at the end
    /// of a window and right after the prefill.
    pub retained_kept: f64,
    pub retained_kept_prefill: Option<f64>,
    /// `retained` of the layers the spec's cache holds (a model's global
    /// layers when it has sliding-window ones; `retained` otherwise), at the
    /// end of a window and right after the prefill.
    pub retained_global: f64,
    pub retained_global_prefill: Option<f64>,
    /// KV bytes per token there, and as a fraction of an f16 dense cache:
    /// what a cache that compresses at the end of prefill (SnapKV) costs.
    pub kv_bytes_per_token_prefill: Option<f64>,
    pub kv_fraction_f16_prefill: Option<f64>,
}

/// What [`window_logits`] returns: the logits `[scored, vocab]`, the index of
/// the first scored token, and at the compression point (with `score_last`)
/// the whole cache's footprint and the spec's layers'.
pub type WindowLogits = (Tensor<2>, usize, Option<(CacheFootprint, CacheFootprint)>);

/// Logits that predict a window's scored tokens, the index of the first scored
/// token, and the cache's footprint at the compression point (with
/// `score_last`; the whole cache's and the spec's layers').
///
/// Without `score_last` the whole window is one forward pass and tokens
/// `1..T` are scored; with `score_last = N` the first `T − N` tokens are a
/// prefill (the cache compresses there) and the last N tokens, fed as one
/// chunk, or in chunks of `score_chunk` tokens (1: one decode step a token,
/// as generation feeds them, through the caches' decode kernels), are
/// scored.
///
/// # Shapes
/// returns `[scored, vocab]`
pub fn window_logits(
    model: &LlamaModel,
    w: &[u32],
    score_last: Option<usize>,
    score_chunk: Option<usize>,
    cache: &mut dyn AttentionCache,
) -> Result<WindowLogits, ModelError> {
    let t = w.len();
    match score_last {
        None => Ok((model.forward(w, 0, cache)?.narrow(0, 0, t - 1), 1, None)),
        Some(n) => {
            if n == 0 || n >= t {
                return Err(ModelError::InvalidInput(format!(
                    "score-last must be in 1..{t}, got {n}"
                )));
            }
            let split = t - n;
            let first = model.forward_last(&w[..split], 0, cache)?;
            let prefill = (cache.footprint(), cache.spec_footprint());
            let chunk = score_chunk.unwrap_or(n);
            if chunk == 0 {
                return Err(ModelError::InvalidInput(
                    "score-chunk must be at least 1".into(),
                ));
            }
            let mut parts = Vec::new();
            for at in (split..t).step_by(chunk) {
                let end = (at + chunk).min(t);
                parts.push(model.forward(&w[at..end], at, cache)?);
            }
            let rest = Tensor::cat(parts, 0);
            let logits = Tensor::cat(vec![first.unsqueeze::<2>(), rest.narrow(0, 0, n - 1)], 0);
            Ok((logits, split, Some(prefill)))
        }
    }
}

/// Non-overlapping full windows of `ctx` tokens.
pub fn windows(ids: &[u32], ctx: usize) -> Vec<&[u32]> {
    if ctx < 2 {
        return Vec::new();
    }
    ids.chunks_exact(ctx).collect()
}

/// The windows a run scores, after checking `ctx` against the model and
/// `score_last` against `ctx`: shared by `ppl` and `fidelity`.
pub fn checked_windows<'a>(
    model: &LlamaModel,
    ids: &'a [u32],
    ctx: usize,
    max_windows: Option<usize>,
    score_last: Option<usize>,
) -> Result<Vec<&'a [u32]>, ModelError> {
    if ctx < 2 || ctx > model.config.context_length {
        return Err(ModelError::InvalidInput(format!(
            "ctx must be in 2..={}, got {ctx}",
            model.config.context_length
        )));
    }
    if let Some(n) = score_last {
        if n == 0 || n >= ctx {
            return Err(ModelError::InvalidInput(format!(
                "score-last must be in 1..{ctx}, got {n}"
            )));
        }
    }
    let mut wins = windows(ids, ctx);
    wins.truncate(max_windows.unwrap_or(usize::MAX));
    if wins.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "the text has {} tokens: not one window of {ctx}",
            ids.len()
        )));
    }
    Ok(wins)
}

/// Per-window NLLs and top-1 guesses (for parity checks) and the report.
pub struct PplDetail {
    pub report: PplReport,
    /// For each window: NLL of tokens 1..ctx.
    pub nll: Vec<Vec<f32>>,
    /// For each window: argmax at positions 0..ctx-1.
    pub top1: Vec<Vec<u32>>,
}

/// Scores a token stream.
///
/// `make_cache` gives a fresh cache per window (its footprint also gives the
/// dense bytes of the same tokens); `on_window` reports progress.
#[allow(clippy::too_many_arguments)]
pub fn perplexity(
    model: &LlamaModel,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    score_last: Option<usize>,
    score_chunk: Option<usize>,
    mut make_cache: impl FnMut() -> Result<Box<dyn AttentionCache>, ModelError>,
    mut on_window: impl FnMut(usize, usize),
) -> Result<PplDetail, ModelError> {
    let wins = checked_windows(model, ids, ctx, max_windows, score_last)?;
    let (mut sum, mut n) = (0f64, 0usize);
    let (mut bytes, mut retained, mut at_prefill) = (ByteAccumulator::default(), 0f64, 0f64);
    let (mut kept, mut kept_prefill) = (0f64, 0f64);
    let (mut global, mut global_prefill) = (0f64, 0f64);
    let mut bytes_prefill = ByteAccumulator::default();
    let mut all_nll = Vec::new();
    let mut all_top1 = Vec::new();
    for (i, w) in wins.iter().enumerate() {
        let _span = tracing::info_span!("window", i).entered();
        let mut cache = make_cache()?;
        let (logits, first_target, prefill) =
            window_logits(model, w, score_last, score_chunk, cache.as_mut())?;
        if let Some((f, g)) = &prefill {
            at_prefill += f.retained();
            kept_prefill += f.retained_kept();
            global_prefill += g.retained();
            bytes_prefill.add(f);
        }
        let (nll, top1) = dynakv_models::llama::nll_and_top1(logits, &w[first_target..]);
        let f = cache.footprint();
        bytes.add(&f);
        retained += f.retained();
        kept += f.retained_kept();
        global += cache.spec_footprint().retained();
        sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        n += nll.len();
        all_nll.push(nll);
        all_top1.push(top1);
        on_window(i + 1, wins.len());
    }
    let mean = sum / n as f64;
    if !mean.exp().is_finite() {
        return Err(ModelError::NotFinite(format!(
            "the perplexity (mean NLL {mean} over {n} tokens)"
        )));
    }
    let k = wins.len() as f64;
    Ok(PplDetail {
        report: PplReport {
            ppl: mean.exp(),
            mean_nll: mean,
            tokens: n,
            windows: wins.len(),
            ctx,
            input_tokens: ids.len(),
            bytes: bytes.mean(),
            retained: retained / k,
            score_last,
            retained_prefill: score_last.map(|_| at_prefill / k),
            retained_kept: kept / k,
            retained_kept_prefill: score_last.map(|_| kept_prefill / k),
            retained_global: global / k,
            retained_global_prefill: score_last.map(|_| global_prefill / k),
            kv_bytes_per_token_prefill: score_last.map(|_| bytes_prefill.mean().kv_bytes_per_token),
            kv_fraction_f16_prefill: score_last.map(|_| bytes_prefill.mean().kv_fraction_f16),
        },
        nll: all_nll,
        top1: all_top1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_the_partial_tail() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 4);
        assert_eq!(w.len(), 2);
        assert_eq!(w[1], &[4, 5, 6, 7]);
        assert!(windows(&ids, 1).is_empty());
        assert!(windows(&ids, 11).is_empty());
    }
}
