//! Stage `local`: train every layer's routers (and optionally its
//! encoder/decoder pairs) against that layer's exact attention output, with
//! the base model frozen.
//!
//! Per layer and window: the keys and values are projected into the basis,
//! soft-masked by the routers (`x̂ = x̃ ⊙ m`), decoded, and attention over them
//! is compared with exact attention after the output projection W_o:
//! `err = ‖(o − o_ref) W_o‖² / ‖o_ref W_o‖²`. All layers share one budget
//! term: a Lagrange multiplier λ on the soft retained fraction, raised or
//! lowered by dual ascent until the hard retained fraction (masks > τ) meets
//! the target, plus the paper's optional α·R². One λ for every layer and for
//! K and V is the learned version of water-filling: dimensions go where they
//! buy the largest drop in relative error.

use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use dynakv_core::artifact::Artifact;
use dynakv_core::basis::Basis;
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{RouterPolicy, RouterWeights};

use super::capture::LayerInputs;
use crate::attention::{causal_mask, gqa_attention};
use crate::cache::{joint, mat, CacheGeometry};
use crate::error::CacheError;
use crate::rope::Rope;
use crate::router::{cutoff_matrix, Router};

/// Settings of the local stage.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Hard retained fraction to reach.
    pub target: f64,
    pub steps: usize,
    /// Adam learning rate of the routers.
    pub lr: f64,
    /// Basis updates move `lr * bases_scale` per step (0 or `freeze_bases`
    /// keeps the calibrated bases).
    pub bases_scale: f64,
    pub freeze_bases: bool,
    /// Dual-ascent step of λ per step, per unit of retained-fraction gap.
    pub dual_lr: f64,
    /// The paper's α in α·R² (0 disables it).
    pub alpha: f64,
    /// Hard-mask threshold used for the retained fraction during training.
    pub tau: f32,
    /// The first N positions of a window keep every coordinate (their mask
    /// is 1), as the router's `sink=N` keeps them at inference.
    pub sink_tokens: usize,
    pub seed: u64,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            target: 0.30,
            steps: 300,
            lr: 1e-2,
            bases_scale: 1e-2,
            freeze_bases: false,
            dual_lr: 0.05,
            alpha: 0.0,
            tau: 0.1,
            sink_tokens: 1,
            seed: 0,
        }
    }
}

/// Trainable parts of one layer: routers, and additive corrections of the
/// encoder and decoder of K and V (zero at the start, scaled by `bases_scale`).
#[derive(Module, Debug)]
pub struct LayerTrainable {
    pub router_k: Router,
    pub router_v: Router,
    pub enc_k: Param<Tensor<2>>,
    pub dec_k: Param<Tensor<2>>,
    pub enc_v: Param<Tensor<2>>,
    pub dec_v: Param<Tensor<2>>,
}

/// Every layer's trainable parts (one optimizer over all of them).
#[derive(Module, Debug)]
pub struct Trainables {
    pub layers: Vec<LayerTrainable>,
}

/// Frozen per-layer tensors.
struct LayerConst {
    /// `[d, d]` each, `[key, value]`.
    enc: [Tensor<2>; 2],
    dec: [Tensor<2>; 2],
    /// `[1, d]`
    mean: [Tensor<2>; 2],
    /// `[H * D, d_model]`
    wo: Tensor<2>,
}

/// Trained routers `[layer] -> [key, value]` and bases `[layer] -> [(enc,
/// dec) of key, of value]`, as host data.
pub type Exported = (Vec<[RouterWeights; 2]>, Vec<[(Vec<f32>, Vec<f32>); 2]>);

/// One step's numbers, for logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    /// Mean relative output error over layers.
    pub err: f64,
    /// Hard retained fraction (masks > τ) over layers, K and V.
    pub retained: f64,
    pub lambda: f64,
}

/// The local-stage trainer.
pub struct LocalTrainer {
    geometry: CacheGeometry,
    levels: RankLevels,
    rope: Rope,
    cutoffs: Tensor<2>,
    consts: Vec<LayerConst>,
    pub model: Trainables,
    optim: ModuleOptimizer,
    lambda: f64,
    config: LocalConfig,
    step: usize,
    rng: u64,
}

fn zeros_param(d: usize, device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::zeros([d, d], device))
}

/// Causal attention of a window over itself (positions 0..T), as `[T, H * D]`.
///
/// # Shapes
/// - `q`: `[1, H, T, D]`, `k`, `v`: `[1, H_kv, T, D]`; returns `[T, H * D]`
fn window_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<2> {
    let [_, h, t, d] = q.dims();
    let hk = k.dims()[1];
    let positions: Vec<usize> = (0..t).collect();
    let mask = causal_mask(&positions, &positions, h / hk, &q.device());
    gqa_attention(q, k, v, mask)
        .swap_dims(1, 2)
        .reshape([t, h * d])
}

impl LocalTrainer {
    /// Starts from a calibrated artifact (its bases, and its routers if it
    /// has any). `wo[l]` is layer l's output projection `[H * D, d_model]`.
    pub fn new(
        artifact: &Artifact,
        geometry: CacheGeometry,
        rope: Rope,
        wo: Vec<Tensor<2>>,
        config: LocalConfig,
        device: &Device,
    ) -> Result<Self, CacheError> {
        if !(config.target > 0.0 && config.target <= 1.0) {
            return Err(CacheError::Config(format!(
                "target must be in (0, 1], got {}",
                config.target
            )));
        }
        if artifact.bases.len() != geometry.n_layers || wo.len() != geometry.n_layers {
            return Err(CacheError::Config(
                "artifact, W_o and geometry disagree on layers".into(),
            ));
        }
        let d = geometry.d_kv();
        let levels = artifact.header.levels.clone();
        let choices = levels.as_slice().len() - 1;
        let ad = device.clone().autodiff();
        let mut consts = Vec::new();
        let mut layers = Vec::new();
        for (l, pair) in artifact.bases.iter().enumerate() {
            let t = |b: &Basis| {
                (
                    mat(&b.enc, d, d, device),
                    mat(&b.dec, d, d, device),
                    mat(&b.mean, 1, d, device),
                )
            };
            let (ek, dk, mk) = t(&pair[0]);
            let (ev, dv, mv) = t(&pair[1]);
            consts.push(LayerConst {
                enc: [ek, ev],
                dec: [dk, dv],
                mean: [mk, mv],
                wo: wo[l].clone(),
            });
            let router = |k: usize| {
                let w = artifact
                    .routers
                    .as_ref()
                    .map(|r| r[l][k].clone())
                    .unwrap_or_else(|| RouterWeights::zeros(d, choices));
                Router::from_weights(&w, &ad)
            };
            layers.push(LayerTrainable {
                router_k: router(0)?,
                router_v: router(1)?,
                enc_k: zeros_param(d, &ad),
                dec_k: zeros_param(d, &ad),
                enc_v: zeros_param(d, &ad),
                dec_v: zeros_param(d, &ad),
            });
        }
        Ok(Self {
            geometry,
            cutoffs: cutoff_matrix(&levels, device),
            levels,
            rope,
            consts,
            model: Trainables { layers },
            optim: AdamConfig::new().init(),
            // A later stage resumes the budget pressure where the last one ended.
            lambda: artifact.header.router.as_ref().map_or(0.0, |r| r.lambda),
            rng: config
                .seed
                .wrapping_mul(2862933555777941757)
                .wrapping_add(3037000493),
            config,
            step: 0,
        })
    }

    fn scale(&self) -> f64 {
        if self.config.freeze_bases {
            0.0
        } else {
            self.config.bases_scale
        }
    }

    /// Current encoder and decoder of a layer and kind.
    fn basis(&self, l: usize, k: usize) -> (Tensor<2>, Tensor<2>) {
        let c = &self.consts[l];
        let t = &self.model.layers[l];
        let (de, dd) = if k == 0 {
            (t.enc_k.val(), t.dec_k.val())
        } else {
            (t.enc_v.val(), t.dec_v.val())
        };
        let s = self.scale();
        if s == 0.0 {
            return (c.enc[k].clone(), c.dec[k].clone());
        }
        (c.enc[k].clone() + de * s, c.dec[k].clone() + dd * s)
    }

    /// Attention of one layer over soft-masked K/V: the output `[T, H * D]`,
    /// the soft retained fraction (mean of both masks) and the number of
    /// coordinates the hard masks keep (a device scalar: the training loop
    /// reads all layers' counts once per step, not once per layer).
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`; `k_pre`, `v`: `[1, H_kv, T, D]`, positions 0..T
    pub(crate) fn compressed_attention(
        &self,
        l: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<2>, Tensor<1>, Tensor<1>), CacheError> {
        let [_, hk, t, dh] = k_pre.dims();
        let positions: Vec<usize> = (0..t).collect();
        let c = &self.consts[l];
        let tr = &self.model.layers[l];
        let mut recon = Vec::new();
        let mut soft = Vec::new();
        let mut hard = Vec::new();
        for (k, raw) in [k_pre, v].into_iter().enumerate() {
            let (enc, dec) = self.basis(l, k);
            let lat = (joint(raw) - c.mean[k].clone()).matmul(enc);
            let router = if k == 0 { &tr.router_k } else { &tr.router_v };
            let m = router.soft_mask(lat.clone().detach(), self.cutoffs.clone());
            let m = self.with_sinks(m);
            // The mask is a non-increasing prefix: its entries above τ are
            // the hard rank's leading ones.
            hard.push(
                m.clone()
                    .detach()
                    .greater_elem(self.config.tau)
                    .float()
                    .sum(),
            );
            soft.push(m.clone().mean());
            let rec = (lat * m).matmul(dec) + c.mean[k].clone();
            recon.push(rec.reshape([1, t, hk, dh]).swap_dims(1, 2));
        }
        let v_hat = recon
            .pop()
            .ok_or_else(|| CacheError::Config("no values".into()))?;
        let k_hat = recon
            .pop()
            .ok_or_else(|| CacheError::Config("no keys".into()))?;
        let k_hat = self.rope.apply(k_hat, &positions)?;
        let o = window_attention(q_rot, k_hat, v_hat);
        Ok((
            o,
            (soft[0].clone() + soft[1].clone()) / 2.0,
            Tensor::cat(hard, 0).sum(),
        ))
    }

    /// `mask` with its first `sink_tokens` rows (positions) set to 1.
    ///
    /// # Shapes
    /// - `mask`: `[T, d]`; returns `[T, d]`
    fn with_sinks(&self, mask: Tensor<2>) -> Tensor<2> {
        let [t, _] = mask.dims();
        let n = self.config.sink_tokens.min(t);
        if n == 0 {
            return mask;
        }
        let rows: Vec<f32> = (0..t).map(|i| if i < n { 1.0 } else { 0.0 }).collect();
        let sink = Tensor::<2>::from_data(TensorData::new(rows, [t, 1]), &mask.device());
        mask * (sink.clone().neg() + 1.0) + sink
    }

    /// Loss terms of one layer on one window: relative output error, soft
    /// retained fraction (mean of both masks), hard-kept coordinates.
    fn layer_terms(
        &self,
        l: usize,
        x: &LayerInputs,
    ) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>), CacheError> {
        let t = x.k_pre.dims()[2];
        let positions: Vec<usize> = (0..t).collect();
        let wo = self.consts[l].wo.clone();
        let (o, r_soft, hard) =
            self.compressed_attention(l, x.q_rot.clone(), x.k_pre.clone(), x.v.clone())?;
        let y = o.matmul(wo.clone());
        let k_ref = self.rope.apply(x.k_pre.clone(), &positions)?;
        let y_ref = window_attention(x.q_rot.clone(), k_ref, x.v.clone())
            .matmul(wo)
            .detach();
        let energy = y_ref.clone().powf_scalar(2.0).sum();
        let err = (y - y_ref).powf_scalar(2.0).sum() / energy;
        Ok((err, r_soft, hard))
    }

    /// Loss, mean relative error and hard retained fraction on one window
    /// (`[layer]` inputs), with the current λ.
    fn window_loss(&self, w: &[LayerInputs]) -> Result<(Tensor<1>, Tensor<1>, f64), CacheError> {
        let n = self.geometry.n_layers;
        if w.len() < n {
            return Err(CacheError::Config(format!(
                "a window has {} layers, not {n}",
                w.len()
            )));
        }
        let t = w[0].k_pre.dims()[2];
        let (mut errs, mut softs, mut hard) = (Vec::new(), Vec::new(), Vec::new());
        for (l, x) in w.iter().enumerate().take(n) {
            let (e, s, h) = self.layer_terms(l, x)?;
            errs.push(e);
            softs.push(s);
            hard.push(h);
        }
        let kept = Tensor::cat(hard, 0).sum().into_scalar::<f32>() as f64;
        let retained = kept / (n * 2 * t * self.geometry.d_kv()) as f64;
        let err = Tensor::cat(errs, 0).mean();
        let r_soft = Tensor::cat(softs, 0).mean();
        let loss = err.clone()
            + r_soft.clone() * self.lambda
            + r_soft.powf_scalar(2.0) * self.config.alpha;
        Ok((loss, err, retained))
    }

    /// The loss terms on one window without training (for tests and logs).
    pub fn evaluate(&self, w: &[LayerInputs]) -> Result<StepStats, CacheError> {
        let (loss, err, retained) = self.window_loss(w)?;
        Ok(StepStats {
            step: self.step,
            loss: loss.into_scalar::<f32>() as f64,
            err: err.into_scalar::<f32>() as f64,
            retained,
            lambda: self.lambda,
        })
    }

    /// One optimisation step on one window (`windows[i][layer]`, picked by
    /// the seeded generator).
    pub fn step(&mut self, windows: &[Vec<LayerInputs>]) -> Result<StepStats, CacheError> {
        if windows.is_empty() {
            return Err(CacheError::Config("no training windows".into()));
        }
        self.rng = self
            .rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = &windows[(self.rng >> 33) as usize % windows.len()];
        let (loss, err, retained) = self.window_loss(w)?;
        self.apply(loss, err, retained)
    }

    /// Backward pass, optimizer step and dual update for a computed loss.
    pub(crate) fn apply(
        &mut self,
        loss: Tensor<1>,
        err: Tensor<1>,
        retained: f64,
    ) -> Result<StepStats, CacheError> {
        let grads = loss.backward();
        let grads = GradientsParams::from_grads(grads, &self.model);
        let model = std::mem::replace(&mut self.model, Trainables { layers: Vec::new() });
        self.model = self.optim.step(self.config.lr, model, grads);
        // Dual ascent: more pressure while over budget, less while under.
        self.lambda =
            (self.lambda + self.config.dual_lr * (retained - self.config.target)).max(0.0);
        self.step += 1;
        let scalar = |x: Tensor<1>| -> f64 { x.into_scalar::<f32>() as f64 };
        Ok(StepStats {
            step: self.step,
            loss: scalar(loss),
            err: scalar(err),
            retained,
            lambda: self.lambda,
        })
    }

    /// Current routers and bases as host data: `([layer] -> [k, v] routers,
    /// [layer] -> [k, v] (enc, dec))`.
    pub fn export(&self) -> Result<Exported, CacheError> {
        let read = |t: Tensor<2>| {
            t.into_data()
                .try_into_vec_as::<f32>()
                .map_err(CacheError::from)
        };
        let mut routers = Vec::new();
        let mut bases = Vec::new();
        for (l, tr) in self.model.layers.iter().enumerate() {
            routers.push([tr.router_k.to_weights()?, tr.router_v.to_weights()?]);
            let (ek, dk) = self.basis(l, 0);
            let (ev, dv) = self.basis(l, 1);
            bases.push([(read(ek)?, read(dk)?), (read(ev)?, read(dv)?)]);
        }
        Ok((routers, bases))
    }

    /// Latents of held-out windows under the current bases, for the τ fit:
    /// `[layer] -> [key, value]` row-major `[n, d]`.
    pub fn latents(&self, windows: &[Vec<LayerInputs>]) -> Result<Vec<[Vec<f32>; 2]>, CacheError> {
        let n = self.geometry.n_layers;
        let mut out = vec![[Vec::new(), Vec::new()]; n];
        for w in windows {
            for (l, x) in w.iter().enumerate().take(n) {
                for (k, raw) in [x.k_pre.clone(), x.v.clone()].into_iter().enumerate() {
                    let (enc, _) = self.basis(l, k);
                    let lat = (joint(raw) - self.consts[l].mean[k].clone()).matmul(enc);
                    let v = lat
                        .detach()
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .map_err(CacheError::from)?;
                    out[l][k].extend(v);
                }
            }
        }
        Ok(out)
    }

    /// A policy from the current routers with τ fitted on `heldout` latents
    /// to hit the target.
    pub fn fitted_policy(
        &self,
        heldout: &[[Vec<f32>; 2]],
    ) -> Result<(RouterPolicy, f64), CacheError> {
        let (routers, _) = self.export()?;
        let mut policy = RouterPolicy::new(routers, self.levels.clone(), self.config.tau)?;
        policy.tau = policy.fit_tau(heldout, self.config.target);
        let retained = policy.retained_at(heldout, policy.tau);
        Ok((policy, retained))
    }

    pub(crate) fn geometry(&self) -> CacheGeometry {
        self.geometry
    }

    pub(crate) fn alpha(&self) -> f64 {
        self.config.alpha
    }

    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    pub fn levels(&self) -> &RankLevels {
        &self.levels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_support::{artifact, rand4, rope, G};
    use crate::device::default_device;
    use burn::tensor::Distribution;
    use dynakv_core::artifact::RopePlacement;

    fn setup(config: LocalConfig) -> (LocalTrainer, Vec<Vec<LayerInputs>>) {
        let device = default_device();
        let rope = rope();
        let wo: Vec<Tensor<2>> = (0..G.n_layers)
            .map(|_| Tensor::random([16, 8], Distribution::Normal(0.0, 0.5), &device))
            .collect();
        let trainer =
            LocalTrainer::new(&artifact(RopePlacement::Pre), G, rope, wo, config, &device).unwrap();
        let window: Vec<LayerInputs> = (0..G.n_layers)
            .map(|_| LayerInputs {
                q_rot: rand4([1, 4, 12, 4]),
                k_pre: rand4([1, 2, 12, 4]),
                v: rand4([1, 2, 12, 4]),
            })
            .collect();
        (trainer, vec![window])
    }

    /// The first `sink_tokens` positions keep every coordinate in training,
    /// as the router's `sink=N` keeps them at inference.
    #[test]
    fn sink_positions_keep_their_whole_mask() {
        let device = default_device();
        let half = Tensor::<2>::ones([4, 3], &device) * 0.5;
        let (t, _) = setup(LocalConfig {
            sink_tokens: 2,
            ..LocalConfig::default()
        });
        let rows = t
            .with_sinks(half.clone())
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        assert_eq!(rows, [[1.0; 3], [1.0; 3], [0.5; 3], [0.5; 3]].concat());
        let (off, _) = setup(LocalConfig {
            sink_tokens: 0,
            ..LocalConfig::default()
        });
        let rows = off
            .with_sinks(half)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        assert_eq!(rows, vec![0.5; 12]);
    }

    #[test]
    fn one_step_reduces_the_loss_on_a_fixed_batch() {
        for freeze_bases in [true, false] {
            let (mut t, data) = setup(LocalConfig {
                lr: 1e-2,
                dual_lr: 0.0,
                freeze_bases,
                bases_scale: 0.1,
                ..LocalConfig::default()
            });
            let before = t.evaluate(&data[0]).unwrap();
            t.step(&data).unwrap();
            let after = t.evaluate(&data[0]).unwrap();
            assert!(
                after.loss < before.loss,
                "{freeze_bases}: {} -> {}",
                before.loss,
                after.loss
            );
        }
    }

    #[test]
    fn dual_ascent_drives_the_retained_fraction_down_to_the_target() {
        let (mut t, data) = setup(LocalConfig {
            target: 0.4,
            lr: 5e-2,
            dual_lr: 2.0,
            ..LocalConfig::default()
        });
        let start = t.evaluate(&data[0]).unwrap().retained;
        for _ in 0..60 {
            t.step(&data).unwrap();
        }
        let end = t.evaluate(&data[0]).unwrap();
        assert!(start > 0.6, "{start}");
        assert!(
            end.retained < start && end.retained < 0.6,
            "{start} -> {}",
            end.retained
        );
        assert!(t.lambda() > 0.0);
        // The τ fit on the same latents hits the target closely.
        let lat = t.latents(&data).unwrap();
        let (policy, retained) = t.fitted_policy(&lat).unwrap();
        assert!(
            (retained - 0.4).abs() < 0.15,
            "{retained} at tau {}",
            policy.tau
        );
    }
}
