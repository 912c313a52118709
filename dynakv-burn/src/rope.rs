//! Rotary position embeddings as llama.cpp applies them to GGUF llama weights.
//!
//! llama.cpp's converter permutes the rows of W_q and W_k so that rotation acts
//! on interleaved pairs `(x[2i], x[2i+1])` ("normal" RoPE), with angle
//! `pos * base^(-2i / n_rot)`. Dimensions past `n_rot` are left as they are.

use std::sync::{Arc, OnceLock};

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::CacheError;

/// Precomputed cos/sin tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_positions, head_dim]`, each pair's value repeated twice.
    cos: Tensor<2>,
    /// `[max_positions, head_dim]`, signed so that `x*cos + swap(x)*sin` rotates.
    sin: Tensor<2>,
    head_dim: usize,
    max_positions: usize,
    /// The same tables on the host, built on first use and shared by clones
    /// (every cache of a model holds a clone).
    host: Arc<OnceLock<Arc<HostRope>>>,
}

/// RoPE tables on the host, the same numbers as [`Rope`]'s, for kernels that
/// rotate row by row.
///
/// # Shapes
/// `cos`, `sin`: `[max_positions, head_dim]` row-major, each pair's value repeated.
#[derive(Debug)]
pub(crate) struct HostRope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
}

impl HostRope {
    /// Rotates one head's vector in place (interleaved pairs, as llama.cpp).
    /// The caller checks `pos` against the table (the tensor path already
    /// rejected out-of-range positions on append).
    #[inline(always)]
    pub(crate) fn rotate(&self, x: &mut [f32], pos: usize) {
        let row = pos * self.head_dim;
        let (c, s) = (
            &self.cos[row..row + self.head_dim],
            &self.sin[row..row + self.head_dim],
        );
        for i in (0..self.head_dim).step_by(2) {
            let (a, b) = (x[i], x[i + 1]);
            x[i] = a * c[i] - b * s[i];
            x[i + 1] = b * c[i + 1] + a * s[i + 1];
        }
    }
}

impl Rope {
    /// Builds the tables; `n_rot` must be even and at most `head_dim`.
    /// The device of the tables.
    pub fn device(&self) -> Device {
        self.cos.device()
    }

    pub fn new(
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
        let mut cos = vec![1f32; max_positions * head_dim];
        let mut sin = vec![0f32; max_positions * head_dim];
        for p in 0..max_positions {
            for i in 0..n_rot / 2 {
                let theta = p as f64 * base.powf(-(2.0 * i as f64) / n_rot as f64);
                let (s, c) = theta.sin_cos();
                cos[p * head_dim + 2 * i] = c as f32;
                cos[p * head_dim + 2 * i + 1] = c as f32;
                sin[p * head_dim + 2 * i] = s as f32;
                sin[p * head_dim + 2 * i + 1] = s as f32;
            }
        }
        let shape = [max_positions, head_dim];
        Ok(Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            head_dim,
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
        let host = |t: &Tensor<2>| {
            t.to_data()
                .try_to_vec::<f32>()
                .map_err(|e| CacheError::Config(format!("RoPE tables: {e:?}")))
        };
        let tables = Arc::new(HostRope {
            cos: host(&self.cos)?,
            sin: host(&self.sin)?,
            head_dim: self.head_dim,
        });
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
        Ok(Self::rotate_with(x, cos, sin))
    }

    /// Applies precomputed tables (see [`Rope::tables`]).
    ///
    /// # Shapes
    /// - `x`: `[B, H, T, D]`; `cos`, `sin`: broadcastable to it, e.g. `[1, 1, T, D]`
    /// - returns `[B, H, T, D]`
    pub fn rotate_with(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let [b, h, t, d] = x.dims();
        let pairs = x.clone().reshape([b, h, t, d / 2, 2]);
        let even = pairs.clone().narrow(4, 0, 1);
        let odd = pairs.narrow(4, 1, 1);
        // swap(x)[2i] = -x[2i+1], swap(x)[2i+1] = x[2i]
        let swapped = Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, t, d]);
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
        let rope = Rope::new(4, 4, 100.0, 8, &device).unwrap();
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
        let rope = Rope::new(4, 2, 10_000.0, 4, &device).unwrap();
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
        assert!(Rope::new(4, 3, 1.0, 4, &device).is_err());
    }
}
