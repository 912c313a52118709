//! Throughput of the model with a given cache: prefill tokens/s and decode
//! tokens/s at a context length. Median of repeated runs, wall clock.

use std::time::Instant;

use dynakv_burn::AttentionCache;
use dynakv_models::{LlamaModel, ModelError};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct SpeedReport {
    pub what: String,
    pub tokens: usize,
    pub context: usize,
    pub median_s: f64,
    pub tokens_per_s: f64,
    pub reps: usize,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn sync(t: burn::tensor::Tensor<1>) {
    // Reading one value forces the backend to finish the work.
    let _ = t.narrow(0, 0, 1).into_data();
}

/// Prefill of `n` tokens from an empty cache (logits of the last token only).
pub fn prefill(
    model: &LlamaModel,
    ids: &[u32],
    n: usize,
    reps: usize,
    make_cache: &mut dyn FnMut() -> Result<Box<dyn AttentionCache>, ModelError>,
) -> Result<SpeedReport, ModelError> {
    let ids = ids
        .get(..n)
        .ok_or_else(|| ModelError::InvalidInput(format!("need {n} tokens")))?;
    let mut times = Vec::new();
    for r in 0..reps + 1 {
        let mut cache = make_cache()?;
        let t0 = Instant::now();
        sync(model.forward_last(ids, 0, cache.as_mut())?);
        if r > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let m = median(times);
    Ok(SpeedReport {
        what: "prefill".into(),
        tokens: n,
        context: 0,
        median_s: m,
        tokens_per_s: n as f64 / m,
        reps,
    })
}

/// `steps` single-token decode steps after a prefill of `context` tokens.
pub fn decode(
    model: &LlamaModel,
    ids: &[u32],
    context: usize,
    steps: usize,
    reps: usize,
    make_cache: &mut dyn FnMut() -> Result<Box<dyn AttentionCache>, ModelError>,
) -> Result<SpeedReport, ModelError> {
    let need = context + steps;
    let ids = ids
        .get(..need)
        .ok_or_else(|| ModelError::InvalidInput(format!("need {need} tokens")))?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let mut cache = make_cache()?;
        sync(model.forward_last(&ids[..context], 0, cache.as_mut())?);
        let t0 = Instant::now();
        for (i, &t) in ids[context..].iter().enumerate() {
            sync(model.forward_last(&[t], context + i, cache.as_mut())?);
        }
        times.push(t0.elapsed().as_secs_f64());
    }
    let m = median(times);
    Ok(SpeedReport {
        what: "decode".into(),
        tokens: steps,
        context,
        median_s: m,
        tokens_per_s: steps as f64 / m,
        reps,
    })
}

/// Decode steps of two caches measured in turn, step by step.
#[derive(Debug, Clone, Serialize)]
pub struct PairedDecode {
    pub context: usize,
    pub steps: usize,
    /// Median seconds of one step, per cache.
    pub base_median_s: f64,
    pub other_median_s: f64,
    /// Median over steps of `base time / other time` (above 1: `other` is faster).
    pub speed_ratio: f64,
}

/// Both caches are prefilled with the same `context` tokens, then decode the
/// same `steps` tokens alternately, one step each, so that a noisy machine
/// slows both alike; the ratio is the median of the per-step ratios.
pub fn decode_paired(
    model: &LlamaModel,
    ids: &[u32],
    context: usize,
    steps: usize,
    base: &mut dyn AttentionCache,
    other: &mut dyn AttentionCache,
) -> Result<PairedDecode, ModelError> {
    let need = context + steps;
    let ids = ids
        .get(..need)
        .ok_or_else(|| ModelError::InvalidInput(format!("need {need} tokens")))?;
    if steps == 0 {
        return Err(ModelError::InvalidInput(
            "need at least one decode step".into(),
        ));
    }
    base.reset();
    sync(model.forward_last(&ids[..context], 0, base)?);
    other.reset();
    sync(model.forward_last(&ids[..context], 0, other)?);
    let (mut tb, mut to, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &t) in ids[context..].iter().enumerate() {
        let step = |c: &mut dyn AttentionCache| -> Result<f64, ModelError> {
            let t0 = Instant::now();
            sync(model.forward_last(&[t], context + i, c)?);
            Ok(t0.elapsed().as_secs_f64())
        };
        // Alternate which cache goes first.
        let (b, o) = if i % 2 == 0 {
            let b = step(base)?;
            (b, step(other)?)
        } else {
            let o = step(other)?;
            (step(base)?, o)
        };
        tb.push(b);
        to.push(o);
        ratio.push(b / o);
    }
    Ok(PairedDecode {
        context,
        steps,
        base_median_s: median(tb),
        other_median_s: median(to),
        speed_ratio: median(ratio),
    })
}
