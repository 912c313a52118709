//! SnapKV on top of any prunable cache: the prefill attends over everything
//! the inner cache stores, then the layer's tokens are scored by the last `w`
//! queries and only the winners stay. Decoded tokens are appended as the inner
//! cache decides (DynaKV still compresses them).

use burn::tensor::Tensor;
use dynakv_snapkv::{snapkv, GqaScores, SnapKvConfig};

use super::{CacheGeometry, CacheWrapper, KeepPositions, PrunableCache};
use crate::error::CacheError;
use crate::rope::Rope;

/// Sequence pruning at the end of prefill, then the inner cache's storage.
///
/// The first call of `forward` on an empty layer is the prefill: its output is
/// computed over every prompt token (the pruning changes only what is cached),
/// then its tokens are scored on RoPE'd queries and keys and pruned. With
/// [`GqaScores::KvHead`] each KV head keeps its own tokens (kvpress; dense
/// inner cache only); with [`GqaScores::Layer`] the layer keeps one set (what
/// DynaKV's joint basis needs).
#[derive(Debug, Clone)]
pub struct SnapKvCache<C> {
    inner: C,
    config: SnapKvConfig,
    rope: Rope,
    pruned: Vec<bool>,
    /// Prompt tokens and tokens kept, per layer, of the last pruning.
    kept: Vec<(usize, usize)>,
    /// The inner cache's sliding window ([`SnapKvCache::with_window`]).
    window: Option<usize>,
    /// Fraction of the kept tokens that keep full rank in a rank-reducing
    /// inner cache ([`SnapKvCache::with_whole`]).
    whole: Option<f64>,
}

impl<C: PrunableCache> SnapKvCache<C> {
    pub fn new(
        inner: C,
        config: SnapKvConfig,
        geometry: CacheGeometry,
        rope: Rope,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        geometry.check_rope(&rope)?;
        config.validate()?;
        match config.gqa {
            GqaScores::QueryHead => {
                return Err(CacheError::Config(
                    "snapkv: per-query-head selection needs K/V stored per query head; \
                     use kv-head or layer"
                        .into(),
                ))
            }
            GqaScores::KvHead if !inner.per_kv_head() => return Err(CacheError::Config(
                "snapkv: this cache keeps one token set per layer; use gqa = layer or layer-max"
                    .into(),
            )),
            _ => {}
        }
        Ok(Self {
            inner,
            config,
            rope,
            pruned: vec![false; geometry.n_layers],
            kept: vec![(0, 0); geometry.n_layers],
            window: None,
            whole: None,
        })
    }

    /// Tiers for an inner cache that stores tokens at reduced rank (DynaKV):
    /// it holds each layer's prompt at full rank until pruning; then the
    /// first `fraction` of the kept tokens by the selection's priority (the
    /// window, then the highest scores) keep full rank and the rest take its
    /// rank policy's ranks. An error for an inner cache that stores every
    /// token whole (dense) and for a fraction outside [0, 1].
    pub fn with_whole(mut self, fraction: f64) -> Result<Self, CacheError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(CacheError::Config(format!(
                "snapkv whole= must be in [0, 1], got {fraction}"
            )));
        }
        self.inner.hold_prompt_whole()?;
        self.whole = Some(fraction);
        Ok(self)
    }

    /// Pruning for an inner cache over a sliding window of `window`
    /// positions (a windowed [`crate::DenseCache`] or [`crate::DynaKvCache`]):
    /// only the prompt's last `window` tokens, the ones a later query can
    /// still see, are scored, and the ratio applies to them. One token set
    /// per layer: the window moves over a layer's tokens as one run.
    pub fn with_window(mut self, window: usize) -> Result<Self, CacheError> {
        if !self.config.gqa.per_layer() {
            return Err(CacheError::Config(
                "snapkv on a sliding-window layer keeps one token set per layer: \
                 use gqa = layer or layer-max"
                    .into(),
            ));
        }
        self.window = Some(crate::cache::check_window(window)?);
        Ok(self)
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }

    pub fn config(&self) -> &SnapKvConfig {
        &self.config
    }

    /// Fraction of prompt tokens kept, averaged over layers (1 before pruning).
    pub fn kept_fraction(&self) -> f64 {
        let (n, k) = self
            .kept
            .iter()
            .fold((0, 0), |(n, k), &(a, b)| (n + a, k + b));
        if n == 0 {
            1.0
        } else {
            k as f64 / n as f64
        }
    }
}

impl<C: PrunableCache> CacheWrapper for SnapKvCache<C> {
    type Inner = C;

    fn inner(&self) -> &C {
        &self.inner
    }

    fn inner_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// The first call on an empty layer is the prefill: attend over every
    /// prompt token, then prune the layer.
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`; `k_pre`, `v`: `[1, H_kv, T, D]`
    /// - returns `[1, H, T, D]`
    fn wrapped_forward(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        let prefill = self.pruned.get(layer) == Some(&false) && self.inner.len(layer) == 0;
        let out = self
            .inner
            .forward(layer, q_rot.clone(), k_pre.clone(), v, positions)?;
        if !prefill {
            return Ok(out);
        }
        self.pruned[layer] = true;
        // a windowed layer scores the tokens a later query can see: the
        // prompt's last `window`
        let tail = self.window.map_or(0, |w| positions.len().saturating_sub(w));
        let (positions, k_pre) = (
            &positions[tail..],
            k_pre.narrow(2, tail, positions.len() - tail),
        );
        let t = positions.len();
        let n_whole = |n: usize, f: f64| ((n as f64 * f).round() as usize).min(n);
        if self.config.is_noop(t) {
            self.kept[layer] = (t, t);
            if let Some(f) = self.whole {
                // nothing pruned: the last tokens keep full rank
                let whole = &positions[t - n_whole(t, f)..];
                let keep = KeepPositions::Layer(positions.to_vec());
                self.inner.retain_tiered(layer, &keep, whole)?;
            }
            return Ok(out);
        }
        let w = self.config.window;
        let _span = tracing::debug_span!("snapkv", layer, t).entered();
        let keys = self.rope.apply(k_pre, positions)?;
        let t_q = q_rot.dims()[2];
        let q_obs = q_rot.narrow(2, t_q - w, w);
        let selection = snapkv(q_obs, keys, &self.config)?;
        let to_pos = |row: &Vec<usize>| row.iter().map(|&i| positions[i]).collect::<Vec<_>>();
        let keep = if self.config.gqa.per_layer() {
            KeepPositions::Layer(to_pos(&selection.kept[0]))
        } else {
            KeepPositions::PerKvHead(selection.kept.iter().map(to_pos).collect())
        };
        match self.whole {
            Some(f) => {
                let whole = to_pos(&selection.first_by_priority(0, n_whole(selection.n_kept(), f)));
                self.inner.retain_tiered(layer, &keep, &whole)?;
            }
            None => self.inner.retain(layer, &keep)?,
        }
        self.kept[layer] = (t, selection.n_kept());
        Ok(out)
    }

    fn after_reset(&mut self) {
        self.pruned.iter_mut().for_each(|p| *p = false);
        self.kept.iter_mut().for_each(|k| *k = (0, 0));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::tensor::activation::softmax;
    use burn::tensor::{Int, TensorData};
    use dynakv_core::artifact::RopePlacement;
    use dynakv_snapkv::{KeepBudget, Pooling, Vote};

    use super::*;
    use crate::cache::test_support::{artifact, rand4, rope, Fixed, G};
    use crate::cache::AttentionCache;
    use crate::cache::{DenseCache, DynaKvBases, DynaKvCache};
    use crate::device::default_device;

    fn config(gqa: GqaScores, ratio: f64) -> SnapKvConfig {
        SnapKvConfig {
            window: 3,
            kernel: 3,
            pooling: Pooling::Avg,
            vote: Vote::Mean,
            gqa,
            budget: KeepBudget::CompressionRatio(ratio),
        }
    }

    /// Attention of `q` (at `q_pos`) over the kept tokens of each KV head,
    /// computed head by head with explicit gathers: the reference.
    ///
    /// # Shapes
    /// - `q`: `[1, H, T, D]` RoPE'd; `k_rot`, `v`: `[1, H_kv, L, D]`
    fn reference(
        q: Tensor<4>,
        k_rot: Tensor<4>,
        v: Tensor<4>,
        kept: &[Vec<usize>],
        q_pos: &[usize],
    ) -> Tensor<4> {
        let [_, h, t, d] = q.dims();
        let g = h / G.n_kv_heads;
        let device = q.device();
        let outs: Vec<Tensor<4>> = (0..h)
            .map(|head| {
                let kv = head / g;
                let rows = &kept[kv];
                let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
                let kh = k_rot.clone().narrow(1, kv, 1).select(2, idx.clone());
                let vh = v.clone().narrow(1, kv, 1).select(2, idx);
                let qh = q.clone().narrow(1, head, 1);
                let mut bias = Vec::new();
                for &qp in q_pos {
                    bias.extend(
                        rows.iter()
                            .map(|&kp| if kp > qp { f32::NEG_INFINITY } else { 0.0 }),
                    );
                }
                let bias =
                    Tensor::<4>::from_data(TensorData::new(bias, [1, 1, t, rows.len()]), &device);
                let s = qh.matmul(kh.swap_dims(2, 3)) / (d as f64).sqrt() + bias;
                softmax(s, 3).matmul(vh)
            })
            .collect();
        Tensor::cat(outs, 1)
    }

    /// Random queries, keys and values of `n` tokens at positions `0..n`,
    /// and the keys RoPE'd.
    ///
    /// # Shapes
    /// - `q`: `[1, 4, n, 4]`; `k`, `v`, `k_rot`: `[1, 2, n, 4]`
    fn inputs(n: usize) -> (Tensor<4>, Tensor<4>, Tensor<4>, Vec<usize>, Tensor<4>) {
        let (q, k, v) = (
            rand4([1, 4, n, 4]),
            rand4([1, 2, n, 4]),
            rand4([1, 2, n, 4]),
        );
        let pos: Vec<usize> = (0..n).collect();
        let k_rot = rope().apply(k.clone(), &pos).unwrap();
        (q, k, v, pos, k_rot)
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Prefill of `l` tokens, then a decode step and a 3-token chunk; checks
    /// every output against the per-head reference over the kept tokens.
    fn check_against_reference(cache: &mut dyn AttentionCache, gqa: GqaScores, cfg: &SnapKvConfig) {
        let (l, extra) = (12, 4);
        let n = l + extra;
        let (q, k, v) = (
            rand4([1, 4, n, 4]),
            rand4([1, 2, n, 4]),
            rand4([1, 2, n, 4]),
        );
        let rope = rope();
        let pos: Vec<usize> = (0..n).collect();
        let k_rot = rope.apply(k.clone(), &pos).unwrap();
        // Prefill: attends over everything.
        let all: Vec<Vec<usize>> = vec![(0..n).collect(); 2];
        let out = cache
            .forward(
                0,
                q.clone().narrow(2, 0, l),
                k.clone().narrow(2, 0, l),
                v.clone().narrow(2, 0, l),
                &pos[..l],
            )
            .unwrap();
        let want = reference(
            q.clone().narrow(2, 0, l),
            k_rot.clone(),
            v.clone(),
            &all,
            &pos[..l],
        );
        assert!(max_diff(out, want) < 1e-5);
        // What SnapKV keeps, computed directly.
        let sel = snapkv(
            q.clone().narrow(2, l - cfg.window, cfg.window),
            k_rot.clone().narrow(2, 0, l),
            cfg,
        )
        .unwrap();
        let mut kept: Vec<Vec<usize>> = match gqa {
            GqaScores::Layer => vec![sel.kept[0].clone(); 2],
            _ => sel.kept.clone(),
        };
        assert_eq!(cache.len(0), kept[0].len());
        // One decode step, then a 3-token chunk (causal inside it).
        for (start, len) in [(l, 1), (l + 1, 3)] {
            kept.iter_mut().for_each(|r| r.extend(start..start + len));
            let got = cache
                .forward(
                    0,
                    q.clone().narrow(2, start, len),
                    k.clone().narrow(2, start, len),
                    v.clone().narrow(2, start, len),
                    &pos[start..start + len],
                )
                .unwrap();
            let want = reference(
                q.clone().narrow(2, start, len),
                k_rot.clone(),
                v.clone(),
                &kept,
                &pos[start..start + len],
            );
            let diff = max_diff(got, want);
            assert!(diff < 1e-5, "{gqa:?} at {start}: {diff}");
        }
    }

    #[test]
    fn pruned_dense_cache_attends_over_exactly_the_kept_tokens() {
        for gqa in [GqaScores::KvHead, GqaScores::Layer] {
            let cfg = config(gqa, 0.5);
            let mut c =
                SnapKvCache::new(DenseCache::new(G, rope()).unwrap(), cfg.clone(), G, rope())
                    .unwrap();
            check_against_reference(&mut c, gqa, &cfg);
            assert!((c.kept_fraction() - 0.5).abs() < 1e-12);
        }
    }

    #[test]
    fn full_rank_dynakv_with_snapkv_equals_the_pruned_dense_cache() {
        let device = default_device();
        for placement in [RopePlacement::Pre, RopePlacement::Post] {
            let bases = Arc::new(DynaKvBases::new(&artifact(placement), G, &device).unwrap());
            let inner = DynaKvCache::new(G, rope(), bases, Arc::new(Fixed(8))).unwrap();
            let cfg = config(GqaScores::Layer, 0.5);
            let mut c = SnapKvCache::new(inner, cfg.clone(), G, rope()).unwrap();
            check_against_reference(&mut c, GqaScores::Layer, &cfg);
        }
    }

    /// SnapKV over a rank-2 DynaKV cache with tiers: the prompt is attended
    /// at full rank (the dense prefill), the first kept tokens by priority
    /// keep full rank and the others the policy's rank 2, decoded tokens take
    /// rank 2, and a reset holds the next prompt again.
    #[test]
    fn tiers_hold_the_prompt_whole_then_rank_the_kept_tokens() {
        use dynakv_core::policy::KvKind;
        let device = default_device();
        let (l, n) = (12, 13);
        let (q, k, v, pos, k_rot) = inputs(n);
        let cfg = config(GqaScores::Layer, 0.5);
        let sel = snapkv(
            q.clone().narrow(2, l - cfg.window, cfg.window),
            k_rot.clone().narrow(2, 0, l),
            &cfg,
        )
        .unwrap();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let inner = DynaKvCache::new(G, rope(), bases, Arc::new(Fixed(2))).unwrap();
        // 6 kept: round(6 * 0.8) = 5 whole, the window's 3 and the 2 best
        let mut c = SnapKvCache::new(inner, cfg.clone(), G, rope())
            .unwrap()
            .with_whole(0.8)
            .unwrap();
        for round in 0..2 {
            let prefill = |c: &mut SnapKvCache<DynaKvCache>| {
                c.forward(
                    0,
                    q.clone().narrow(2, 0, l),
                    k.clone().narrow(2, 0, l),
                    v.clone().narrow(2, 0, l),
                    &pos[..l],
                )
                .unwrap()
            };
            let out = prefill(&mut c);
            let all = vec![(0..l).collect::<Vec<_>>(); 2];
            let want = reference(
                q.clone().narrow(2, 0, l),
                k_rot.clone(),
                v.clone(),
                &all,
                &pos[..l],
            );
            assert!(
                max_diff(out, want) < 1e-5,
                "round {round}: prefill not at full rank"
            );
            let whole = sel.first_by_priority(0, 5);
            assert_eq!(whole.len(), 5);
            assert!((l - 3..l).all(|p| whole.contains(&p)), "{whole:?}");
            for kind in [KvKind::Key, KvKind::Value] {
                let ranks = c.inner().ranks(0, kind);
                let kept: Vec<usize> = ranks.iter().map(|&(id, _)| id).collect();
                assert_eq!(kept, sel.kept[0], "round {round}");
                for &(id, r) in &ranks {
                    assert_eq!(r, if whole.contains(&id) { 8 } else { 2 }, "token {id}");
                }
            }
            // a decoded token takes the policy's rank
            c.forward(
                0,
                q.clone().narrow(2, l, 1),
                k.clone().narrow(2, l, 1),
                v.clone().narrow(2, l, 1),
                &pos[l..l + 1],
            )
            .unwrap();
            assert_eq!(c.inner().ranks(0, KvKind::Key).last(), Some(&(l, 2)));
            c.reset();
        }
        // a prompt no longer than the window is not pruned, still tiered:
        // round(3 * 0.8) = 2 last tokens whole
        c.forward(
            1,
            q.clone().narrow(2, 0, 3),
            k.clone().narrow(2, 0, 3),
            v.clone().narrow(2, 0, 3),
            &pos[..3],
        )
        .unwrap();
        assert_eq!(
            c.inner().ranks(1, KvKind::Key),
            vec![(0, 2), (1, 8), (2, 8)]
        );
    }

    #[test]
    fn tiers_need_a_rank_reducing_cache_and_a_fraction() {
        let dense = DenseCache::new(G, rope()).unwrap();
        let snap = SnapKvCache::new(dense, config(GqaScores::Layer, 0.5), G, rope()).unwrap();
        let err = snap.with_whole(0.5).unwrap_err();
        assert!(err.to_string().contains("DynaKV"), "{err}");
        let device = default_device();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let inner = DynaKvCache::new(G, rope(), bases, Arc::new(Fixed(2))).unwrap();
        let snap = SnapKvCache::new(inner, config(GqaScores::Layer, 0.5), G, rope()).unwrap();
        assert!(snap.clone().with_whole(1.5).is_err());
        assert!(snap.with_whole(f64::NAN).is_err());
    }

    #[test]
    fn footprint_counts_the_pruned_tokens_against_all_seen() {
        let cfg = config(GqaScores::KvHead, 0.75);
        let mut c = SnapKvCache::new(DenseCache::new(G, rope()).unwrap(), cfg, G, rope()).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 16, 4]),
            rand4([1, 2, 16, 4]),
            rand4([1, 2, 16, 4]),
        );
        let pos: Vec<usize> = (0..16).collect();
        for layer in 0..G.n_layers {
            c.forward(layer, q.clone(), k.clone(), v.clone(), &pos)
                .unwrap();
        }
        let f = c.footprint();
        assert_eq!(f.values_full, (2 * 16 * G.d_kv() * G.n_layers) as u64);
        assert!((f.retained() - 0.25).abs() < 1e-12, "{}", f.retained());
        assert!(f.metadata_bytes > 0);
        // r = 0 changes nothing.
        let mut c0 = SnapKvCache::new(
            DenseCache::new(G, rope()).unwrap(),
            config(GqaScores::KvHead, 0.0),
            G,
            rope(),
        )
        .unwrap();
        let mut d = DenseCache::new(G, rope()).unwrap();
        let a = c0
            .forward(0, q.clone(), k.clone(), v.clone(), &pos)
            .unwrap();
        let b = d.forward(0, q, k, v, &pos).unwrap();
        assert_eq!(max_diff(a, b), 0.0);
        assert_eq!(c0.len(0), 16);
        c.reset();
        assert_eq!(c.len(0), 0);
        assert_eq!(c.kept_fraction(), 1.0);
    }

    #[test]
    fn selections_the_cache_cannot_store_are_errors() {
        let device = default_device();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let inner = DynaKvCache::new(G, rope(), bases, Arc::new(Fixed(8))).unwrap();
        let err = SnapKvCache::new(inner, config(GqaScores::KvHead, 0.5), G, rope()).unwrap_err();
        assert!(err.to_string().contains("layer"), "{err}");
        let dense = DenseCache::new(G, rope()).unwrap();
        assert!(
            SnapKvCache::new(dense.clone(), config(GqaScores::QueryHead, 0.5), G, rope()).is_err()
        );
        assert!(SnapKvCache::new(dense, config(GqaScores::Layer, 1.0), G, rope()).is_err());
    }

    /// On a sliding-window layer SnapKV scores the prompt's last `window`
    /// tokens (the ones later queries see) and keeps its share of them;
    /// decoding then attends over the kept tokens and the new ones within
    /// the window; a full-rank DynaKV inner cache gives the dense one's
    /// outputs; the footprint's reference is the windowed dense cache.
    #[test]
    fn a_windowed_layer_prunes_within_its_window() {
        let device = default_device();
        let (l, window, n) = (20, 8, 40);
        let (q, k, v, pos, k_rot) = inputs(n);
        let cfg = config(GqaScores::Layer, 0.5);
        let dense = DenseCache::new(G, rope())
            .unwrap()
            .with_window(window)
            .unwrap();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let dynakv = DynaKvCache::new(G, rope(), bases, Arc::new(Fixed(8)))
            .unwrap()
            .with_window(window)
            .unwrap();
        let mut caches: Vec<Box<dyn AttentionCache>> = vec![
            Box::new(
                SnapKvCache::new(dense.clone(), cfg.clone(), G, rope())
                    .unwrap()
                    .with_window(window)
                    .unwrap(),
            ),
            Box::new(
                SnapKvCache::new(dynakv, cfg.clone(), G, rope())
                    .unwrap()
                    .with_window(window)
                    .unwrap(),
            ),
        ];
        // what SnapKV keeps of the last `window` prompt tokens
        let sel = snapkv(
            q.clone().narrow(2, l - cfg.window, cfg.window),
            k_rot.clone().narrow(2, l - window, window),
            &cfg,
        )
        .unwrap();
        let mut kept: Vec<usize> = sel.kept[0].iter().map(|&i| l - window + i).collect();
        assert_eq!(kept.len(), window / 2);
        let mut outs = vec![Vec::new(); 2];
        for (c, out) in caches.iter_mut().zip(&mut outs) {
            c.forward(
                0,
                q.clone().narrow(2, 0, l),
                k.clone().narrow(2, 0, l),
                v.clone().narrow(2, 0, l),
                &pos[..l],
            )
            .unwrap();
            assert_eq!(c.len(0), window / 2);
            // counted against the windowed dense cache's span
            let f = c.footprint();
            assert_eq!(f.values_full, (window * 2 * G.d_kv()) as u64);
            assert_eq!(f.values * 2, f.values_full);
            for p in l..n {
                let step = |x: &Tensor<4>| x.clone().narrow(2, p, 1);
                out.push(c.forward(0, step(&q), step(&k), step(&v), &[p]).unwrap());
            }
            // bounded by the window and a half; the pruned tokens have left it
            assert!(c.len(0) <= window + window.div_ceil(2), "{}", c.len(0));
            let f = c.footprint();
            assert_eq!(f.values, f.values_full);
            assert!(f.values_full <= ((window + window.div_ceil(2)) * 2 * G.d_kv()) as u64);
        }
        for (i, p) in (l..n).enumerate() {
            kept.push(p);
            let visible: Vec<usize> = kept.iter().copied().filter(|&k| k + window > p).collect();
            let want = reference(
                q.clone().narrow(2, p, 1),
                k_rot.clone(),
                v.clone(),
                &[visible.clone(), visible],
                &[p],
            );
            for (which, out) in outs.iter().enumerate() {
                let diff = max_diff(out[i].clone(), want.clone());
                assert!(diff < 1e-4, "cache {which} at {p}: {diff}");
            }
        }
        // one token set per KV head cannot follow a window
        let err = SnapKvCache::new(dense, config(GqaScores::KvHead, 0.5), G, rope())
            .unwrap()
            .with_window(window)
            .unwrap_err();
        assert!(err.to_string().contains("layer"), "{err}");
    }
}
