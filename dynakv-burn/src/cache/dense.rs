//! The uncompressed cache: what every compressed cache is measured against.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use dynakv_core::budget::CacheFootprint;

use super::{AttentionCache, CacheGeometry, KeepPositions, PrunableCache};
use crate::attention::{causal_attention, causal_mask, gqa_attention};
use crate::error::CacheError;
use crate::rope::Rope;

/// Positions of the stored tokens: shared by every KV head until a per-head
/// pruning (SnapKV, kvpress style) gives each head its own token set.
#[derive(Debug, Clone)]
enum StoredPositions {
    Shared(Vec<usize>),
    PerHead(Vec<Vec<usize>>),
}

impl Default for StoredPositions {
    fn default() -> Self {
        Self::Shared(Vec::new())
    }
}

impl StoredPositions {
    fn len(&self) -> usize {
        match self {
            Self::Shared(p) => p.len(),
            Self::PerHead(p) => p.first().map_or(0, Vec::len),
        }
    }

    fn extend(&mut self, new: &[usize]) {
        match self {
            Self::Shared(p) => p.extend_from_slice(new),
            Self::PerHead(p) => p.iter_mut().for_each(|h| h.extend_from_slice(new)),
        }
    }

    /// Causal mask of queries at `q_pos` over the stored keys.
    ///
    /// # Shapes
    /// returns `[1, 1, G*T, S]` (shared) or `[1, H_kv, G*T, S]` (per head).
    fn mask(&self, q_pos: &[usize], groups: usize, device: &Device) -> Option<Tensor<4, Bool>> {
        match self {
            Self::Shared(p) => causal_mask(q_pos, p, groups, device),
            Self::PerHead(heads) => {
                let masks: Vec<Option<Tensor<4, Bool>>> = heads
                    .iter()
                    .map(|p| causal_mask(q_pos, p, groups, device))
                    .collect();
                if masks.iter().all(Option::is_none) {
                    return None;
                }
                let shape = [1, 1, groups * q_pos.len(), self.len()];
                let full = || Tensor::<4, Bool>::full(shape, false, device);
                Some(Tensor::cat(
                    masks.into_iter().map(|m| m.unwrap_or_else(full)).collect(),
                    1,
                ))
            }
        }
    }
}

/// One layer's stored tokens.
#[derive(Debug, Clone, Default)]
struct LayerStore {
    /// `[B, H_kv, S, D]`, RoPE applied.
    k: Option<Tensor<4>>,
    /// `[B, H_kv, S, D]`
    v: Option<Tensor<4>>,
    positions: StoredPositions,
    /// Tokens ever appended (the dense cache on the same tokens stores them all).
    seen: usize,
}

/// Bytes of one stored position (u32) per kept key of a pruned cache.
const POSITION_BYTES: usize = 4;

/// Full-precision keys (RoPE applied on append) and values for every token.
#[derive(Debug, Clone)]
pub struct DenseCache {
    geometry: CacheGeometry,
    rope: Rope,
    layers: Vec<LayerStore>,
}

impl DenseCache {
    pub fn new(geometry: CacheGeometry, rope: Rope) -> Result<Self, CacheError> {
        geometry.validate()?;
        Ok(Self {
            geometry,
            rope,
            layers: vec![LayerStore::default(); geometry.n_layers],
        })
    }

    pub fn geometry(&self) -> CacheGeometry {
        self.geometry
    }

    /// Stored keys (RoPE'd), values and, per KV head, positions of a layer.
    ///
    /// # Shapes
    /// returns `[B, H_kv, S, D]` twice.
    pub fn layer_kv(&self, layer: usize) -> Option<(Tensor<4>, Tensor<4>, Vec<Vec<usize>>)> {
        let l = self.layers.get(layer)?;
        let positions = match &l.positions {
            StoredPositions::Shared(p) => vec![p.clone(); self.geometry.n_kv_heads],
            StoredPositions::PerHead(p) => p.clone(),
        };
        Some((l.k.clone()?, l.v.clone()?, positions))
    }
}

/// Row indices (into `stored`) of the kept positions, in stored order.
fn kept_rows(stored: &[usize], keep: &[usize]) -> Result<Vec<i64>, CacheError> {
    let keep: std::collections::HashSet<usize> = keep.iter().copied().collect();
    let rows: Vec<i64> = (0..stored.len())
        .filter(|&i| keep.contains(&stored[i]))
        .map(|i| i as i64)
        .collect();
    if rows.len() != keep.len() {
        return Err(CacheError::Config(format!(
            "{} positions to keep, {} of them stored",
            keep.len(),
            rows.len()
        )));
    }
    Ok(rows)
}

/// Selects rows along the sequence axis.
///
/// # Shapes
/// - `x`: `[B, H, S, D]`; returns `[B, H, rows, D]`
fn select_seq(x: Tensor<4>, rows: &[i64]) -> Tensor<4> {
    let idx =
        Tensor::<1, Int>::from_data(TensorData::new(rows.to_vec(), [rows.len()]), &x.device());
    x.select(2, idx)
}

impl PrunableCache for DenseCache {
    fn per_kv_head(&self) -> bool {
        true
    }

    fn retain(&mut self, layer: usize, keep: &KeepPositions) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        let hk = self.geometry.n_kv_heads;
        let store = &mut self.layers[layer];
        // Clones are cheap handles; the store changes only once all succeeded.
        let (Some(k), Some(v)) = (store.k.clone(), store.v.clone()) else {
            return Err(CacheError::Config(format!("retain on empty layer {layer}")));
        };
        let heads: Vec<Vec<usize>> = match &store.positions {
            StoredPositions::Shared(p) => vec![p.clone(); hk],
            StoredPositions::PerHead(p) => p.clone(),
        };
        let (k, v, positions) = match keep {
            KeepPositions::Layer(keep) => {
                if let StoredPositions::PerHead(_) = store.positions {
                    return Err(CacheError::Config(
                        "one token set per layer after a per-head pruning".into(),
                    ));
                }
                let rows = kept_rows(&heads[0], keep)?;
                let pos = rows.iter().map(|&i| heads[0][i as usize]).collect();
                (
                    select_seq(k, &rows),
                    select_seq(v, &rows),
                    StoredPositions::Shared(pos),
                )
            }
            KeepPositions::PerKvHead(keep) => {
                if keep.len() != hk || keep.iter().any(|r| r.len() != keep[0].len()) {
                    return Err(CacheError::Config(format!(
                        "per-head selection needs {hk} rows of equal length"
                    )));
                }
                let (mut ks, mut vs, mut ps) = (Vec::new(), Vec::new(), Vec::new());
                for (h, keep_h) in keep.iter().enumerate() {
                    let rows = kept_rows(&heads[h], keep_h)?;
                    ks.push(select_seq(k.clone().narrow(1, h, 1), &rows));
                    vs.push(select_seq(v.clone().narrow(1, h, 1), &rows));
                    ps.push(rows.iter().map(|&i| heads[h][i as usize]).collect());
                }
                (
                    Tensor::cat(ks, 1),
                    Tensor::cat(vs, 1),
                    StoredPositions::PerHead(ps),
                )
            }
        };
        store.k = Some(k);
        store.v = Some(v);
        store.positions = positions;
        Ok(())
    }
}

fn cat_seq(old: Option<Tensor<4>>, new: Tensor<4>) -> Tensor<4> {
    match old {
        Some(old) => Tensor::cat(vec![old, new], 2),
        None => new,
    }
}

impl AttentionCache for DenseCache {
    fn append(
        &mut self,
        layer: usize,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        self.geometry.check_kv(&k_pre, &v, positions)?;
        let k = self.rope.apply(k_pre, positions)?;
        let store = &mut self.layers[layer];
        store.k = Some(cat_seq(store.k.take(), k));
        store.v = Some(cat_seq(store.v.take(), v));
        store.positions.extend(positions);
        store.seen += positions.len();
        Ok(())
    }

    fn attend(
        &mut self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        self.geometry.check_layer(layer)?;
        self.geometry.check_q(&q_rot, positions)?;
        let store = &self.layers[layer];
        let (Some(k), Some(v)) = (store.k.clone(), store.v.clone()) else {
            return Err(CacheError::Config(format!(
                "attend on layer {layer} before anything was appended"
            )));
        };
        if let StoredPositions::Shared(k_pos) = &store.positions {
            return Ok(causal_attention(q_rot, k, v, positions, k_pos));
        }
        let mask = store
            .positions
            .mask(positions, self.geometry.groups(), &q_rot.device());
        Ok(gqa_attention(q_rot, k, v, mask))
    }

    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.positions.len())
    }

    fn reset(&mut self) {
        self.layers = vec![LayerStore::default(); self.geometry.n_layers];
    }

    fn footprint(&self) -> CacheFootprint {
        let elems = |t: &Option<Tensor<4>>| t.as_ref().map_or(0, |t| t.shape().num_elements());
        let values: usize = self.layers.iter().map(|l| elems(&l.k) + elems(&l.v)).sum();
        let seen: usize = self.layers.iter().map(|l| l.seen).sum();
        let pruned = self.layers.iter().any(|l| l.positions.len() < l.seen);
        CacheFootprint {
            values: values as u64,
            values_full: (2 * seen * self.geometry.d_kv()) as u64,
            // A pruned cache must remember which positions it kept.
            metadata_bytes: if pruned {
                (values / (2 * self.geometry.head_dim) * POSITION_BYTES) as u64
            } else {
                0
            },
            fixed_bytes: 0,
        }
    }
}
