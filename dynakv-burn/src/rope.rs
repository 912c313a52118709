//! Rotary position embeddings, in the two layouts models use.
//!
//! Pair `i` rotates by the angle `pos * base^(-2i / n_rot)`; dimensions past
//! `n_rot` are left as they are. Which two coordinates form pair `i` depends
//! on how the weights were laid out ([`RopeStyle`]): llama.cpp's converter
//! permutes the rows of a llama model's W_q and W_k so that pairs are
//! interleaved, `(x[2i], x[2i+1])`; Hugging Face checkpoints and NEOX-style
//! GGUF architectures (Gemma, Qwen, ...) pair the two halves,
//! `(x[i], x[i + n_rot/2])`. Rotating with the wrong layout runs without
//! error and gives a wrong model, so the style is part of a model's
//! [`CacheGeometry`](crate::CacheGeometry), and caches refuse a [`Rope`] of
//! another style.

use std::sync::{Arc, OnceLock};

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::CacheError;
use crate::host::HostRope;

/// Which coordinates RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`: GGUF llama-architecture weights.
    Interleaved,
    /// Pairs `(x[i], x[i + n_rot/2])`: Hugging Face / NEOX layout (GGUF
    /// gemma3, qwen2, ...).
    SplitHalves,
}

impl RopeStyle {
    /// The coordinate paired with coordinate `i` (`i < n_rot`), and whether
    /// `i` is the first of its pair.
    #[inline(always)]
    pub(crate) fn partner(self, i: usize, n_rot: usize) -> (usize, bool) {
        match self {
            Self::Interleaved => (i ^ 1, i.is_multiple_of(2)),
            Self::SplitHalves => {
                let h = n_rot / 2;
                if i < h {
                    (i + h, true)
                } else {
                    (i - h, false)
                }
            }
        }
    }
}

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_positions, head_dim]`, each pair's value at both its coordinates.
    cos: Tensor<2>,
    /// `[max_positions, head_dim]`, signed so that `x*cos + swap(x)*sin` rotates.
    sin: Tensor<2>,
    head_dim: usize,
    n_rot: usize,
    style: RopeStyle,
    max_positions: usize,
    /// The same tables on the host, built on first use and shared by clones
    /// (every cache of a model holds a clone).
    host: Arc<OnceLock<Arc<HostRope>>>,
}

impl Rope {
    /// The device of the tables.
    pub fn device(&self) -> Device {
        self.cos.device()
    }

    /// Which coordinates are rotated together.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Builds the tables; `n_rot` must be even and at most `head_dim`.
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        n_rot: usize,
        base: f64,
        max_positions: usize,
        device: &Device,
    ) -> Result<Self, CacheError> {
        if !n_rot.is_multiple_of(2)
            || n_rot > head_dim
            || !head_dim.is_multiple_of(2)
            || max_positions == 0
        {
            return Err(CacheError::Config(format!(
                "RoPE needs even n_rot <= head_dim and positions > 0 (n_rot {n_rot}, head_dim {head_dim}, positions {max_positions})"
            )));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(CacheError::Config(format!(
                "RoPE base must be finite and > 0, got {base}"
            )));
        }
        let mut cos = vec![1f32; max_positions * head_dim];
        let mut sin = vec![0f32; max_positions * head_dim];
        for p in 0..max_positions {
            for j in 0..n_rot {
                let (partner, first) = style.partner(j, n_rot);
                let i = if first { j } else { partner };
                // pair index: `i / 2` interleaved, `i` split halves
                let pair = match style {
                    RopeStyle::Interleaved => i / 2,
                    RopeStyle::SplitHalves => i,
                };
                let theta = p as f64 * base.powf(-(2.0 * pair as f64) / n_rot as f64);
                let (s, c) = theta.sin_cos();
                cos[p * head_dim + j] = c as f32;
                sin[p * head_dim + j] = s as f32;
            }
        }
        let shape = [max_positions, head_dim];
        Ok(Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            head_dim,
            n_rot,
            style,
            max_positions,
            host: Arc::default(),
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The tables on the host (copied from the device once per model).
    pub(crate) fn host(&self) -> Result<Arc<HostRope>, CacheError> {
        if let Some(h) = self.host.get() {
            return Ok(h.clone());
        }
        let host = |t: &Tensor<2>| t.to_data().try_to_vec::<f32>().map_err(CacheError::from);
        let tables = Arc::new(HostRope::new(
            host(&self.cos)?,
            host(&self.sin)?,
            self.head_dim,
            self.n_rot,
            self.style,
        ));
        Ok(self.host.get_or_init(|| tables).clone())
    }

    /// The cos and sin rows of some positions.
    ///
    /// # Shapes
    /// returns two `[1, 1, T, head_dim]` tensors for `T = positions.len()`.
    pub fn tables(&self, positions: &[usize]) -> Result<(Tensor<4>, Tensor<4>), CacheError> {
        if let Some(&p) = positions.iter().find(|&&p| p >= self.max_positions) {
            return Err(CacheError::PositionOutOfRange {
                pos: p,
                max: self.max_positions,
            });
        }
        let device = self.cos.device();
        let t = positions.len();
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        let (cos, sin) = if contiguous && t > 0 {
            let r = positions[0]..positions[0] + t;
            (
                self.cos.clone().slice([r.clone()]),
                self.sin.clone().slice([r]),
            )
        } else {
            let idx: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [t]), &device);
            (
                self.cos.clone().select(0, idx.clone()),
                self.sin.clone().select(0, idx),
            )
        };
        Ok((
            cos.reshape([1, 1, t, self.head_dim]),
            sin.reshape([1, 1, t, self.head_dim]),
        ))
    }

    /// Rotates `x` at the given positions.
    ///
    /// # Shapes
    /// - `x`: `[B, H, T, head_dim]`
    /// - returns `[B, H, T, head_dim]`
    pub fn apply(&self, x: Tensor<4>, positions: &[usize]) -> Result<Tensor<4>, CacheError> {
        let [b, h, t, d] = x.dims();
        if d != self.head_dim {
            return Err(CacheError::Shape {
                what: "RoPE input",
                got: vec![b, h, t, d],
                expected: vec![b, h, t, self.head_dim],
            });
        }
        if positions.len() != t {
            return Err(CacheError::PositionCount(positions.len(), t));
        }
        let (cos, sin) = self.tables(positions)?;
        Ok(self.rotate_with(x, cos, sin))
    }

    /// Applies precomputed tables (see [`Rope::tables`]): `x * cos +
    /// swap(x) * sin`, where `swap` puts each coordinate's partner in its
    /// place, negated for the first of a pair.
    ///
    /// # Shapes
    /// - `x`: `[B, H, T, D]`; `cos`, `sin`: broadcastable to it, e.g. `[1, 1, T, D]`
    /// - returns `[B, H, T, D]`
    pub fn rotate_with(&self, x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let swapped = match self.style {
            RopeStyle::Interleaved => {
                let pairs = x.clone().reshape([b, h, t, d / 2, 2]);
                let even = pairs.clone().narrow(4, 0, 1);
                let odd = pairs.narrow(4, 1, 1);
                // swap(x)[2i] = -x[2i+1], swap(x)[2i+1] = x[2i]
                Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, t, d])
            }
            RopeStyle::SplitHalves => {
                // swap(x)[i] = -x[i + n/2], swap(x)[i + n/2] = x[i]; past
                // n_rot sin is 0, so those coordinates may hold anything
                let half = self.n_rot / 2;
                let first = x.clone().narrow(3, 0, half);
                let second = x.clone().narrow(3, half, half);
                let mut parts = vec![second.neg(), first];
                if self.n_rot < d {
                    parts.push(x.clone().narrow(3, self.n_rot, d - self.n_rot));
                }
                Tensor::cat(parts, 3)
            }
        };
        x * cos + swapped * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::default_device;

    #[test]
    fn rotates_pairs_by_the_expected_angle() {
        let device = default_device();
        let rope = Rope::new(RopeStyle::Interleaved, 4, 4, 100.0, 8, &device).unwrap();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1f32, 0.0, 1.0, 0.0], [1, 1, 1, 4]),
            &device,
        );
        let y: Vec<f32> = rope
            .apply(x, &[3])
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        // pair 0: angle 3; pair 1: angle 3 * 100^(-1/2) = 0.3
        let expect = [3f32.cos(), 3f32.sin(), 0.3f32.cos(), 0.3f32.sin()];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {expect:?}");
        }
    }

    #[test]
    fn position_zero_is_identity_and_bad_positions_error() {
        let device = default_device();
        let rope = Rope::new(RopeStyle::Interleaved, 4, 2, 10_000.0, 4, &device).unwrap();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![0.5f32, -2.0, 3.0, 4.0], [1, 1, 1, 4]),
            &device,
        );
        let y: Vec<f32> = rope
            .apply(x.clone(), &[0])
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(y, vec![0.5, -2.0, 3.0, 4.0]);
        assert!(matches!(
            rope.apply(x, &[4]),
            Err(CacheError::PositionOutOfRange { .. })
        ));
        assert!(Rope::new(RopeStyle::Interleaved, 4, 3, 1.0, 4, &device).is_err());
        assert!(Rope::new(RopeStyle::SplitHalves, 4, 4, f64::NAN, 4, &device).is_err());
    }

    #[test]
    fn split_halves_rotate_the_two_halves_and_host_equals_tensor() {
        let device = default_device();
        // head_dim 6, n_rot 4: pairs (0, 2) and (1, 3); 4 and 5 untouched
        let rope = Rope::new(RopeStyle::SplitHalves, 6, 4, 100.0, 8, &device).unwrap();
        let x = vec![1f32, 1.0, 0.0, 0.0, 7.0, -7.0];
        let y: Vec<f32> = rope
            .apply(
                Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 1, 1, 6]), &device),
                &[3],
            )
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let expect = [
            3f32.cos(),
            0.3f32.cos(),
            3f32.sin(),
            0.3f32.sin(),
            7.0,
            -7.0,
        ];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{y:?} vs {expect:?}");
        }
        for style in [RopeStyle::Interleaved, RopeStyle::SplitHalves] {
            let rope = Rope::new(style, 6, 4, 100.0, 8, &device).unwrap();
            let t = rope
                .apply(
                    Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 1, 1, 6]), &device),
                    &[5],
                )
                .unwrap()
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            let mut h = x.clone();
            rope.host().unwrap().rotate(&mut h, 5);
            for (a, b) in t.iter().zip(&h) {
                assert!((a - b).abs() < 1e-6, "{style:?}: {t:?} vs {h:?}");
            }
        }
    }
}
