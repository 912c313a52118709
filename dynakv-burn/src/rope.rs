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

use std::sync::{Arc, RwLock};

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

/// The smallest table built: short prompts do not rebuild it on every token.
const MIN_TABLE_POSITIONS: usize = 512;

/// cos/sin tables for positions `0..len`, built for the positions used so
/// far and grown (to the next power of two, at most the limit) when a later
/// position needs it.
///
/// Why by use: a GGUF declares its context (32k for Gemma 3, up to 2^20 here),
/// and tables sized by the declaration cost memory for positions most runs
/// never reach (2^20 positions of a 64-wide head are 512 MB on each of the
/// device and the host).
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    n_rot: usize,
    style: RopeStyle,
    base: f64,
    /// Positions beyond this are errors ([`CacheError::PositionOutOfRange`]).
    max_positions: usize,
    device: Device,
    /// The tables built so far, shared by clones (every cache of a model holds
    /// a clone), replaced by longer ones on growth.
    tables: Arc<RwLock<Option<Arc<RopeTables>>>>,
}

/// One build of the tables.
#[derive(Debug)]
struct RopeTables {
    /// `[len, head_dim]`, each pair's value at both its coordinates.
    cos: Tensor<2>,
    /// `[len, head_dim]`, signed so that `x*cos + swap(x)*sin` rotates.
    sin: Tensor<2>,
    /// Positions covered.
    len: usize,
    /// The same tables on the host, for kernels that rotate row by row.
    host: Arc<HostRope>,
}

impl Rope {
    /// The device of the tables.
    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// Which coordinates are rotated together.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Checks the geometry; `n_rot` must be even and at most `head_dim`,
    /// `max_positions` is the limit on positions (the model's context). No
    /// table is built until a position is used.
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
        Ok(Self {
            head_dim,
            n_rot,
            style,
            base,
            max_positions,
            device: device.clone(),
            tables: Arc::default(),
        })
    }

    /// The frequency base.
    pub fn base(&self) -> f64 {
        self.base
    }

    /// The limit on positions.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Positions the tables cover now (grows with use, never beyond
    /// [`Rope::max_positions`]).
    pub fn built_positions(&self) -> usize {
        self.current().map_or(0, |t| t.len)
    }

    fn current(&self) -> Option<Arc<RopeTables>> {
        // a poisoned lock still holds complete tables: they are replaced whole
        self.tables
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tables covering positions `0..end`, grown if needed.
    fn covering(&self, end: usize) -> Result<Arc<RopeTables>, CacheError> {
        if end > self.max_positions {
            return Err(CacheError::PositionOutOfRange {
                pos: end - 1,
                max: self.max_positions,
            });
        }
        if let Some(now) = self.current().filter(|t| t.len >= end) {
            return Ok(now);
        }
        let mut slot = self.tables.write().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(t) if t.len >= end => Ok(t.clone()),
            _ => {
                let len = end
                    .max(MIN_TABLE_POSITIONS)
                    .next_power_of_two()
                    .min(self.max_positions);
                let built = Arc::new(self.build(len));
                *slot = Some(built.clone());
                Ok(built)
            }
        }
    }

    /// Makes the tables cover every position below `end`; an error if `end`
    /// passes the limit. Caches call it for positions they store without
    /// rotating, so that later host kernels find them in the tables.
    pub fn reserve(&self, end: usize) -> Result<(), CacheError> {
        self.covering(end).map(|_| ())
    }

    /// Builds the tables for positions `0..len`.
    fn build(&self, len: usize) -> RopeTables {
        let (head_dim, n_rot, style) = (self.head_dim, self.n_rot, self.style);
        let mut cos = vec![1f32; len * head_dim];
        let mut sin = vec![0f32; len * head_dim];
        for p in 0..len {
            for j in 0..n_rot {
                let (partner, first) = style.partner(j, n_rot);
                let i = if first { j } else { partner };
                // pair index: `i / 2` interleaved, `i` split halves
                let pair = match style {
                    RopeStyle::Interleaved => i / 2,
                    RopeStyle::SplitHalves => i,
                };
                let theta = p as f64 * self.base.powf(-(2.0 * pair as f64) / n_rot as f64);
                let (s, c) = theta.sin_cos();
                cos[p * head_dim + j] = c as f32;
                sin[p * head_dim + j] = s as f32;
            }
        }
        let shape = [len, head_dim];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos.clone(), shape), &self.device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), shape), &self.device),
            len,
            host: Arc::new(HostRope::new(cos, sin, head_dim, n_rot, style)),
        }
    }

    /// The tables on the host, covering every position below `end` and
    /// every position used so far (through [`Rope::tables`], [`Rope::apply`]
    /// or [`Rope::reserve`]).
    pub(crate) fn host(&self, end: usize) -> Result<Arc<HostRope>, CacheError> {
        Ok(self.covering(end.max(1))?.host.clone())
    }

    /// Rotates, on the host, every head of one token at `pos` in place: a
    /// model's one-token decode step on host vectors (no tensor per head).
    ///
    /// # Shapes
    /// - `x`: `[n_heads * head_dim]`, head after head
    pub fn rotate_host(&self, x: &mut [f32], pos: usize) -> Result<(), CacheError> {
        if !x.len().is_multiple_of(self.head_dim) {
            return Err(CacheError::Shape {
                what: "RoPE host input",
                got: vec![x.len()],
                expected: vec![self.head_dim],
            });
        }
        let tables = self.covering(pos.saturating_add(1))?;
        for head in x.chunks_exact_mut(self.head_dim) {
            tables.host.rotate(head, pos);
        }
        Ok(())
    }

    /// The cos and sin rows of some positions.
    ///
    /// # Shapes
    /// returns two `[1, 1, T, head_dim]` tensors for `T = positions.len()`.
    pub fn tables(&self, positions: &[usize]) -> Result<(Tensor<4>, Tensor<4>), CacheError> {
        let end = positions.iter().max().map_or(1, |&p| p.saturating_add(1));
        let built = self.covering(end)?;
        let (cos_all, sin_all) = (&built.cos, &built.sin);
        let t = positions.len();
        let contiguous = positions.windows(2).all(|w| w[1] == w[0] + 1);
        let (cos, sin) = if contiguous && t > 0 {
            let r = positions[0]..positions[0] + t;
            (
                cos_all.clone().slice([r.clone()]),
                sin_all.clone().slice([r]),
            )
        } else {
            let idx: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [t]), &self.device);
            (
                cos_all.clone().select(0, idx.clone()),
                sin_all.clone().select(0, idx),
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
    fn tables_grow_with_use_up_to_the_limit() {
        let device = default_device();
        // a declared context of 2^20 positions allocates nothing up front
        let rope = Rope::new(RopeStyle::Interleaved, 4, 4, 100.0, 1 << 20, &device).unwrap();
        assert_eq!(rope.built_positions(), 0);
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1f32, 0.0, 1.0, 0.0], [1, 1, 1, 4]),
            &device,
        );
        rope.apply(x.clone(), &[3]).unwrap();
        assert_eq!(rope.built_positions(), MIN_TABLE_POSITIONS);
        // a later position grows the shared tables (clones see it) to the
        // next power of two, and the angle is the one a fresh table gives
        let clone = rope.clone();
        let y: Vec<f32> = clone
            .apply(x.clone(), &[1000])
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(rope.built_positions(), 1024);
        let (a, b) = (1000f64, 1000f64 * 0.1);
        let expect = [a.cos(), a.sin(), b.cos(), b.sin()];
        for (got, want) in y.iter().zip(expect) {
            assert!((*got as f64 - want).abs() < 1e-5, "{y:?} vs {expect:?}");
        }
        let mut h = vec![1f32, 0.0, 1.0, 0.0];
        rope.host(1001).unwrap().rotate(&mut h, 1000);
        assert_eq!(h, y);
        // the public host rotation: every head of a token, the same numbers
        let mut x2 = vec![1f32, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        rope.rotate_host(&mut x2, 1000).unwrap();
        assert_eq!(x2, [y.clone(), y.clone()].concat());
        assert!(rope.rotate_host(&mut [0.0; 3], 0).is_err());
        assert!(rope.rotate_host(&mut x2, 1 << 20).is_err());
        // the limit holds, and a table never grows past it
        let small = Rope::new(RopeStyle::Interleaved, 4, 4, 100.0, 600, &device).unwrap();
        small.reserve(599 + 1).unwrap();
        assert_eq!(small.built_positions(), 600);
        assert!(matches!(
            small.reserve(601),
            Err(CacheError::PositionOutOfRange { pos: 600, max: 600 })
        ));
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
            rope.host(6).unwrap().rotate(&mut h, 5);
            for (a, b) in t.iter().zip(&h) {
                assert!((a - b).abs() < 1e-6, "{style:?}: {t:?} vs {h:?}");
            }
        }
    }
}
