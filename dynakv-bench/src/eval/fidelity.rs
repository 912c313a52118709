//! How far a compressed cache moves the model's next-token distributions:
//! KL(full ‖ compressed) per predicted position and top-1 agreement, on the
//! same windows as the perplexity protocol (docs/protocol.md).

use burn::tensor::activation::log_softmax;
use burn::tensor::Tensor;
use dynakv_burn::AttentionCache;
use dynakv_models::{LlamaModel, ModelError};
use serde::Serialize;

use super::bytes::{ByteAccumulator, ByteReport};
use super::ppl::{checked_windows, window_logits};

/// What `dynakv eval fidelity --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct FidelityReport {
    /// Mean over predicted positions of KL(full ‖ compressed), in nats.
    pub kl_mean: f64,
    /// 95th percentile of the per-position KL.
    pub kl_p95: f64,
    pub kl_max: f64,
    /// Fraction of positions where both caches' argmax agree.
    pub top1_agreement: f64,
    pub positions: usize,
    pub windows: usize,
    pub ctx: usize,
    pub score_last: Option<usize>,
    /// Mean retained fraction and true bytes of the compressed cache at the end
    /// of a window; at the compression point with `score_last`.
    pub retained: f64,
    pub retained_prefill: Option<f64>,
    #[serde(flatten)]
    pub bytes: ByteReport,
}

/// Per-row KL(p ‖ q) of two logit matrices.
///
/// # Shapes
/// - `p_logits`, `q_logits`: `[T, V]`; returns `[T]`
pub fn kl_rows(p_logits: Tensor<2>, q_logits: Tensor<2>) -> Tensor<1> {
    let lp = log_softmax(p_logits, 1);
    let lq = log_softmax(q_logits, 1);
    let t = lp.dims()[0];
    (lp.clone().exp() * (lp - lq)).sum_dim(1).reshape([t])
}

/// The `q`-th quantile (nearest rank) of unsorted values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn to_f64(t: Tensor<1>) -> Result<Vec<f64>, ModelError> {
    Ok(t.into_data()
        .try_into_vec_as::<f32>()
        .map_err(ModelError::from)?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Compares a compressed cache with the full one on up to `max_windows`
/// windows of `ctx` tokens.
#[allow(clippy::too_many_arguments)]
pub fn fidelity(
    model: &LlamaModel,
    ids: &[u32],
    ctx: usize,
    max_windows: Option<usize>,
    score_last: Option<usize>,
    score_chunk: Option<usize>,
    mut make_full: impl FnMut() -> Result<Box<dyn AttentionCache>, ModelError>,
    mut make_cache: impl FnMut() -> Result<Box<dyn AttentionCache>, ModelError>,
    mut on_window: impl FnMut(usize, usize),
) -> Result<FidelityReport, ModelError> {
    let wins = checked_windows(model, ids, ctx, max_windows, score_last)?;
    let (mut kls, mut agree) = (Vec::new(), 0usize);
    let (mut retained, mut at_prefill, mut bytes) = (0f64, 0f64, ByteAccumulator::default());
    for (i, w) in wins.iter().enumerate() {
        let _span = tracing::info_span!("fidelity window", i).entered();
        let mut full = make_full()?;
        let (p, _, _) = window_logits(model, w, score_last, score_chunk, full.as_mut())?;
        let mut cache = make_cache()?;
        let (q, _, prefill) = window_logits(model, w, score_last, score_chunk, cache.as_mut())?;
        let same: i64 = p
            .clone()
            .argmax(1)
            .equal(q.clone().argmax(1))
            .int()
            .sum()
            .into_scalar::<i64>();
        agree += same as usize;
        kls.extend(to_f64(kl_rows(p, q))?);
        let f = cache.footprint();
        retained += f.retained();
        at_prefill += prefill.map_or(0.0, |(f, _)| f.retained());
        bytes.add(&f);
        on_window(i + 1, wins.len());
    }
    let k = wins.len() as f64;
    let n = kls.len();
    if let Some(bad) = kls.iter().find(|x| !x.is_finite()) {
        return Err(ModelError::NotFinite(format!("a KL divergence ({bad})")));
    }
    Ok(FidelityReport {
        kl_mean: kls.iter().sum::<f64>() / n as f64,
        kl_p95: quantile(&kls, 0.95),
        kl_max: kls.iter().copied().fold(0.0, f64::max),
        top1_agreement: agree as f64 / n as f64,
        positions: n,
        windows: wins.len(),
        ctx,
        score_last,
        retained: retained / k,
        retained_prefill: score_last.map(|_| at_prefill / k),
        bytes: bytes.mean(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use dynakv_burn::device::default_device;

    #[test]
    fn kl_of_identical_rows_is_zero_and_matches_a_hand_value() {
        let device = default_device();
        let p = Tensor::<2>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 1.0, 2.0], [2, 2]),
            &device,
        );
        let zero = to_f64(kl_rows(p.clone(), p.clone())).unwrap();
        assert!(zero.iter().all(|x| x.abs() < 1e-7));
        // Row [0, 0] vs row [1, 2]: p = (1/2, 1/2), q = softmax(1, 2).
        let q = Tensor::<2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 1.0, 2.0], [2, 2]),
            &device,
        );
        let kl = to_f64(kl_rows(p, q)).unwrap();
        let q0 = 1.0 / (1.0 + 1f64.exp());
        let want = 0.5 * (0.5f64 / q0).ln() + 0.5 * (0.5f64 / (1.0 - q0)).ln();
        assert!((kl[0] - want).abs() < 1e-6, "{} vs {want}", kl[0]);
        assert!(kl[1].abs() < 1e-7);
    }

    #[test]
    fn nearest_rank_quantile() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.95), 19.0);
        assert_eq!(quantile(&v, 1.0), 20.0);
        assert_eq!(quantile(&[3.0], 0.5), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
