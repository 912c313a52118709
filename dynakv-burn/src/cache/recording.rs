//! A dense cache that also records what calibration needs: per layer, the
//! moments of the joint key vector (pre- or post-RoPE) and of the joint value
//! vector, the energy of each query head's dimensions, and optionally the raw
//! vectors themselves (for fitting rank policies on held-out tokens).

use burn::tensor::Tensor;
use dynakv_core::artifact::RopePlacement;
use dynakv_core::stats::MomentAccumulator;

use super::{host_rows, joint, CacheGeometry, CacheWrapper, DenseCache};
use crate::error::CacheError;
use crate::rope::Rope;

/// Statistics gathered by a [`RecordingCache`].
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `[layer] -> [key, value]`
    pub moments: Vec<[MomentAccumulator; 2]>,
    /// `[layer][query head][dim]` sums of squared query entries.
    pub q_sq: Vec<Vec<Vec<f64>>>,
    pub q_count: u64,
    /// `[layer] -> [key rows, value rows]`, row-major `[n, d_kv]`, when raw recording is on.
    pub raw: Vec<[Vec<f32>; 2]>,
    pub raw_positions: Vec<usize>,
}

impl Recorded {
    pub fn new(g: CacheGeometry) -> Self {
        let d = g.d_kv();
        Self {
            moments: (0..g.n_layers)
                .map(|_| [MomentAccumulator::new(d), MomentAccumulator::new(d)])
                .collect(),
            q_sq: vec![vec![vec![0.0; g.head_dim]; g.n_heads]; g.n_layers],
            q_count: 0,
            raw: vec![[Vec::new(), Vec::new()]; g.n_layers],
            raw_positions: Vec::new(),
        }
    }

    /// Mean squared query entry per layer, head and dimension.
    pub fn q_energy(&self, layer: usize) -> Vec<Vec<f64>> {
        let n = self.q_count.max(1) as f64;
        self.q_sq[layer]
            .iter()
            .map(|h| h.iter().map(|s| s / n).collect())
            .collect()
    }
}

/// Wraps a dense cache (attention is exact) and records statistics.
pub struct RecordingCache {
    inner: DenseCache,
    rope: Rope,
    placement: RopePlacement,
    /// Accumulate moments (the basis pass) or keep raw vectors (the sample pass).
    raw_mode: bool,
    pub recorded: Recorded,
}

impl RecordingCache {
    pub fn new(
        geometry: CacheGeometry,
        rope: Rope,
        placement: RopePlacement,
        raw_mode: bool,
        recorded: Recorded,
    ) -> Result<Self, CacheError> {
        Ok(Self {
            inner: DenseCache::new(geometry, rope.clone())?,
            rope,
            placement,
            raw_mode,
            recorded,
        })
    }

    /// The same recording over a sliding window of `window` positions
    /// (calibrating a model's windowed layers: they attend as the model
    /// does, and every appended token is recorded).
    pub fn with_window(mut self, window: usize) -> Result<Self, CacheError> {
        self.inner = self.inner.with_window(window)?;
        Ok(self)
    }

    /// Hands back what was recorded.
    pub fn into_recorded(self) -> Recorded {
        self.recorded
    }
}

impl CacheWrapper for RecordingCache {
    type Inner = DenseCache;

    fn inner(&self) -> &DenseCache {
        &self.inner
    }

    fn inner_mut(&mut self) -> &mut DenseCache {
        &mut self.inner
    }

    fn before_append(
        &mut self,
        layer: usize,
        k_pre: &Tensor<4>,
        v: &Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        self.inner.geometry().check_layer(layer)?;
        let k = match self.placement {
            RopePlacement::Pre => k_pre.clone(),
            RopePlacement::Post => self.rope.apply(k_pre.clone(), positions)?,
        };
        let kr = host_rows(&joint(k))?;
        let vr = host_rows(&joint(v.clone()))?;
        if self.raw_mode {
            let r = &mut self.recorded.raw[layer];
            r[0].extend_from_slice(&kr);
            r[1].extend_from_slice(&vr);
            if layer == 0 {
                self.recorded.raw_positions.extend_from_slice(positions);
            }
        } else {
            let m = &mut self.recorded.moments[layer];
            m[0].add_rows(&kr)?;
            m[1].add_rows(&vr)?;
        }
        Ok(())
    }

    fn before_attend(
        &mut self,
        layer: usize,
        q_rot: &Tensor<4>,
        _positions: &[usize],
    ) -> Result<(), CacheError> {
        self.inner.geometry().check_layer(layer)?;
        if !self.raw_mode {
            let [_, h, t, d] = q_rot.dims();
            let sq = host_rows(&q_rot.clone().powf_scalar(2.0).sum_dim(2).reshape([h, d]))?;
            for (hh, row) in self.recorded.q_sq[layer].iter_mut().enumerate() {
                for (i, s) in row.iter_mut().enumerate() {
                    *s += sq[hh * d + i] as f64;
                }
            }
            if layer == 0 {
                self.recorded.q_count += t as u64;
            }
        }
        Ok(())
    }
}
