//! Stage `e2e`: the whole frozen model runs with soft-masked K/V in every
//! layer, and the routers and bases learn from the model's own output:
//! `KL(full-cache logits ‖ compressed logits)` plus the budget term of the
//! local stage (one dual-ascent λ). Short by design: each step is a full
//! forward and backward pass of the model over one window.

use burn::tensor::activation::log_softmax;
use burn::tensor::Tensor;
use dynakv_core::budget::CacheFootprint;

use super::local::{LocalTrainer, StepStats};
use crate::cache::AttentionCache;
use crate::error::CacheError;

/// An attention cache for one training prefill: every layer's attention runs
/// over the trainer's soft-masked reconstruction of its keys and values.
pub struct SoftMaskCache<'a> {
    trainer: &'a LocalTrainer,
    soft: Vec<Tensor<1>>,
    hard: Vec<Tensor<1>>,
    kept_of: usize,
}

impl<'a> SoftMaskCache<'a> {
    pub fn new(trainer: &'a LocalTrainer) -> Self {
        Self {
            trainer,
            soft: Vec::new(),
            hard: Vec::new(),
            kept_of: 0,
        }
    }
}

impl AttentionCache for SoftMaskCache<'_> {
    fn append(
        &mut self,
        _layer: usize,
        _k: Tensor<4>,
        _v: Tensor<4>,
        _positions: &[usize],
    ) -> Result<(), CacheError> {
        Err(CacheError::Config(
            "SoftMaskCache serves one training prefill through forward()".into(),
        ))
    }

    fn attend(
        &mut self,
        _layer: usize,
        _q: Tensor<4>,
        _positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        Err(CacheError::Config(
            "SoftMaskCache serves one training prefill through forward()".into(),
        ))
    }

    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`; `k_pre`, `v`: `[1, H_kv, T, D]`; positions 0..T
    /// - returns `[1, H, T, D]`
    fn forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        if positions.first().is_some_and(|&p| p != 0) {
            return Err(CacheError::Config(
                "SoftMaskCache needs the window from position 0".into(),
            ));
        }
        let g = self.trainer.geometry();
        g.check_layer(layer)?;
        let [_, h, t, d] = q_rot.dims();
        let (o, soft, hard) = self.trainer.compressed_attention(layer, q_rot, k_pre, v)?;
        self.soft.push(soft);
        self.hard.push(hard);
        self.kept_of += 2 * t * g.d_kv();
        Ok(o.reshape([1, t, h, d]).swap_dims(1, 2))
    }

    fn len(&self, _layer: usize) -> usize {
        0
    }

    fn reset(&mut self) {
        self.soft.clear();
        self.hard.clear();
        self.kept_of = 0;
    }

    fn footprint(&self) -> CacheFootprint {
        CacheFootprint::default()
    }
}

/// Mean over rows of `KL(softmax(p) ‖ softmax(q))`.
///
/// # Shapes
/// - `p_logits`, `q_logits`: `[T, V]`
fn mean_kl(p_logits: Tensor<2>, q_logits: Tensor<2>) -> Tensor<1> {
    let lp = log_softmax(p_logits, 1);
    let lq = log_softmax(q_logits, 1);
    (lp.clone().exp() * (lp - lq)).sum_dim(1).mean()
}

impl LocalTrainer {
    /// Loss of the e2e stage on one window: `run` feeds the window through
    /// the model with the given cache and returns its logits `[T, V]`;
    /// `full_logits` are the full cache's on the same window.
    /// Errors of `run` (the caller's model) come back as they are.
    fn e2e_loss<E: From<CacheError>>(
        &self,
        run: impl FnOnce(&mut dyn AttentionCache) -> Result<Tensor<2>, E>,
        full_logits: Tensor<2>,
    ) -> Result<(Tensor<1>, Tensor<1>, f64), E> {
        let mut cache = SoftMaskCache::new(self);
        let logits = run(&mut cache)?;
        if cache.soft.is_empty() {
            return Err(CacheError::Config("the model never called the cache".into()).into());
        }
        let kl = mean_kl(full_logits.detach(), logits);
        let r_soft = Tensor::cat(cache.soft, 0).mean();
        let kept = Tensor::cat(cache.hard, 0).sum().into_scalar::<f32>() as f64;
        let retained = kept / cache.kept_of as f64;
        let loss =
            kl.clone() + r_soft.clone() * self.lambda() + r_soft.powf_scalar(2.0) * self.alpha();
        Ok((loss, kl, retained))
    }

    /// The e2e loss terms without training (`err` is the KL).
    pub fn e2e_evaluate<E: From<CacheError>>(
        &self,
        run: impl FnOnce(&mut dyn AttentionCache) -> Result<Tensor<2>, E>,
        full_logits: Tensor<2>,
    ) -> Result<StepStats, E> {
        let (loss, kl, retained) = self.e2e_loss(run, full_logits)?;
        Ok(StepStats {
            step: 0,
            loss: loss.into_scalar::<f32>() as f64,
            err: kl.into_scalar::<f32>() as f64,
            retained,
            lambda: self.lambda(),
        })
    }

    /// One e2e optimisation step; `err` in the stats is the KL.
    pub fn e2e_step<E: From<CacheError>>(
        &mut self,
        run: impl FnOnce(&mut dyn AttentionCache) -> Result<Tensor<2>, E>,
        full_logits: Tensor<2>,
    ) -> Result<StepStats, E> {
        let (loss, kl, retained) = self.e2e_loss(run, full_logits)?;
        Ok(self.apply(loss, kl, retained)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_support::{artifact, rand4, rope, G};
    use crate::cache::DenseCache;
    use crate::device::default_device;
    use crate::train::LocalConfig;
    use burn::tensor::Distribution;
    use dynakv_core::artifact::RopePlacement;

    #[test]
    fn an_e2e_step_reduces_the_kl_of_a_toy_model() {
        let device = default_device();
        let rope = rope();
        let wo: Vec<Tensor<2>> = (0..G.n_layers)
            .map(|_| Tensor::random([16, 8], Distribution::Normal(0.0, 0.5), &device))
            .collect();
        let config = LocalConfig {
            lr: 1e-2,
            dual_lr: 0.0,
            ..LocalConfig::default()
        };
        let mut trainer = LocalTrainer::new(
            &artifact(RopePlacement::Pre),
            G,
            rope.clone(),
            wo,
            config,
            &device,
        )
        .unwrap();
        let t = 10;
        let inputs: Vec<_> = (0..G.n_layers)
            .map(|_| {
                (
                    rand4([1, 4, t, 4]),
                    rand4([1, 2, t, 4]),
                    rand4([1, 2, t, 4]),
                )
            })
            .collect();
        let head = Tensor::<2>::random([16, 12], Distribution::Normal(0.0, 1.0), &device);
        let pos: Vec<usize> = (0..t).collect();
        // A toy "model": the sum of both layers' attention outputs, projected.
        let toy = |cache: &mut dyn AttentionCache| -> Result<Tensor<2>, CacheError> {
            let mut acc: Option<Tensor<4>> = None;
            for (l, (q, k, v)) in inputs.iter().enumerate() {
                let o = cache.forward(l, q.clone(), k.clone(), v.clone(), &pos)?;
                acc = Some(match acc {
                    Some(a) => a + o,
                    None => o,
                });
            }
            let o = acc.unwrap();
            Ok(o.swap_dims(1, 2).reshape([t, 16]).matmul(head.clone()))
        };
        let full = toy(&mut DenseCache::new(G, rope).unwrap()).unwrap();
        let before = trainer.e2e_evaluate(toy, full.clone()).unwrap();
        trainer.e2e_step(toy, full.clone()).unwrap();
        let after = trainer.e2e_evaluate(toy, full).unwrap();
        assert!(before.err > 0.0);
        assert!(
            after.loss < before.loss,
            "{} -> {}",
            before.loss,
            after.loss
        );
    }
}
