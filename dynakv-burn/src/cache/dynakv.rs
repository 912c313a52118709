//! DynaKV: every token stores its own number of latent coordinates.
//!
//! On append, keys and values are projected into their layer's basis, the
//! policy picks a rank per token, and latents go into one contiguous bucket per
//! rank level (each bucket `[n, rank]`, so memory really shrinks). On attend,
//! scores are computed per key bucket (reconstruct + RoPE for `pre`, latent dot
//! products for `post`), one softmax runs over every stored token, and values
//! are summed in latent space and decoded once: exact, because every rank is a
//! prefix of the same basis.

use std::sync::Arc;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::budget::CacheFootprint;
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{KvKind, RankPolicy};

use super::{joint, mat, AttentionCache, CacheGeometry, KeepPositions, PrunableCache};
use crate::attention::causal_mask;
use crate::error::CacheError;
use crate::rope::Rope;

/// Bytes of per-token metadata per layer and per K/V: position and token id.
const META_BYTES_PER_TOKEN: usize = 8;

/// One layer's basis tensors on the device.
#[derive(Debug, Clone)]
struct LayerBasis {
    /// `[d, d]` for keys and values
    enc: [Tensor<2>; 2],
    /// `[d]`
    mean: [Tensor<1>; 2],
    /// Key decoder `[d, d]` (pre) or per KV head `[H_kv, d, D]` (post, as [`Tensor<3>`]).
    dec_k: Tensor<2>,
    dec_k_heads: Tensor<3>,
    /// Value decoder per KV head `[H_kv, d, D]` and mean `[H_kv, 1, D]`.
    dec_v_heads: Tensor<3>,
    mean_v_heads: Tensor<3>,
    /// Key mean per KV head `[H_kv, D, 1]` (post: score offset `q · mean`).
    mean_k_heads: Tensor<3>,
}

/// Bases of every layer, uploaded once and shared by many caches.
#[derive(Debug)]
pub struct DynaKvBases {
    layers: Vec<LayerBasis>,
    placement: RopePlacement,
    levels: RankLevels,
    d_kv: usize,
    fixed_bytes: usize,
}

impl DynaKvBases {
    /// Uploads an artifact's bases, checking them against the geometry.
    pub fn new(
        artifact: &Artifact,
        geometry: CacheGeometry,
        device: &Device,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        let d = geometry.d_kv();
        let (hk, dh) = (geometry.n_kv_heads, geometry.head_dim);
        if artifact.bases.len() != geometry.n_layers {
            return Err(CacheError::Config(format!(
                "artifact has {} layers, the model {}",
                artifact.bases.len(),
                geometry.n_layers
            )));
        }
        let mut layers = Vec::new();
        let mut fixed = 0;
        for pair in &artifact.bases {
            if pair.iter().any(|b| b.dim != d) {
                return Err(CacheError::Config(format!(
                    "basis dim differs from d_kv {d}"
                )));
            }
            let enc = [
                mat(&pair[0].enc, d, d, device),
                mat(&pair[1].enc, d, d, device),
            ];
            let mean = [
                Tensor::from_data(TensorData::new(pair[0].mean.clone(), [d]), device),
                Tensor::from_data(TensorData::new(pair[1].mean.clone(), [d]), device),
            ];
            let dec_k = mat(&pair[0].dec, d, d, device);
            let heads = |dec: &Tensor<2>| dec.clone().reshape([d, hk, dh]).swap_dims(0, 1);
            let dec_k_heads = heads(&dec_k);
            let dec_v_heads = heads(&mat(&pair[1].dec, d, d, device));
            let mean_v_heads = mean[1].clone().reshape([hk, 1, dh]);
            let mean_k_heads = mean[0].clone().reshape([hk, dh, 1]);
            // enc x2, dec x2, means x2 (the per-head views are reshapes of these)
            fixed += 4 * (4 * d * d + 2 * d);
            layers.push(LayerBasis {
                enc,
                mean,
                dec_k,
                dec_k_heads,
                dec_v_heads,
                mean_v_heads,
                mean_k_heads,
            });
        }
        Ok(Self {
            layers,
            placement: artifact.header.rope,
            levels: artifact.header.levels.clone(),
            d_kv: d,
            fixed_bytes: fixed,
        })
    }

    pub fn levels(&self) -> &RankLevels {
        &self.levels
    }

    pub fn placement(&self) -> RopePlacement {
        self.placement
    }
}

/// Tokens of one rank level.
#[derive(Debug, Clone)]
struct Bucket {
    rank: usize,
    /// `[n, rank]`
    lat: Tensor<2>,
    positions: Vec<usize>,
    ids: Vec<usize>,
}

#[derive(Debug, Clone, Default)]
struct LayerStore {
    /// `[kind] -> buckets in ascending rank`
    buckets: [Vec<Bucket>; 2],
    next_id: usize,
    /// Sum of ranks stored, per kind.
    dims: [usize; 2],
}

/// The DynaKV compressed cache.
#[derive(Debug, Clone)]
pub struct DynaKvCache {
    geometry: CacheGeometry,
    rope: Rope,
    bases: Arc<DynaKvBases>,
    policy: Arc<dyn RankPolicy>,
    layers: Vec<LayerStore>,
}

impl DynaKvCache {
    pub fn new(
        geometry: CacheGeometry,
        rope: Rope,
        bases: Arc<DynaKvBases>,
        policy: Arc<dyn RankPolicy>,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        if bases.layers.len() != geometry.n_layers || bases.d_kv != geometry.d_kv() {
            return Err(CacheError::Config("bases do not match the geometry".into()));
        }
        Ok(Self {
            geometry,
            rope,
            bases,
            policy,
            layers: vec![LayerStore::default(); geometry.n_layers],
        })
    }

    /// Numbers stored, metadata and fixed bytes, against the dense cache.
    fn footprint_now(&self) -> CacheFootprint {
        let mut f = CacheFootprint {
            fixed_bytes: self.bases.fixed_bytes as u64,
            ..Default::default()
        };
        for l in &self.layers {
            let n = l.next_id as u64;
            f.values += (l.dims[0] + l.dims[1]) as u64;
            f.values_full += 2 * n * self.geometry.d_kv() as u64;
            let stored: usize = l.buckets.iter().flatten().map(|b| b.positions.len()).sum();
            f.metadata_bytes += (stored * META_BYTES_PER_TOKEN) as u64;
        }
        f
    }

    /// Stored ranks of one layer and kind, in token order (for reports and tests).
    pub fn ranks(&self, layer: usize, kind: KvKind) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = self.layers[layer].buckets[kind.index()]
            .iter()
            .flat_map(|b| b.ids.iter().map(move |&i| (i, b.rank)))
            .collect();
        out.sort();
        out
    }

    fn store(
        &mut self,
        layer: usize,
        kind: KvKind,
        lat: Tensor<2>,
        ranks: &[usize],
        positions: &[usize],
        first_id: usize,
    ) {
        let device = lat.device();
        let store = &mut self.layers[layer];
        let k = kind.index();
        for &level in self.bases.levels.as_slice().iter().filter(|&&l| l > 0) {
            let rows: Vec<usize> = (0..ranks.len()).filter(|&i| ranks[i] == level).collect();
            if rows.is_empty() {
                continue;
            }
            let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
            let part = lat.clone().select(0, idx).narrow(1, 0, level);
            let pos: Vec<usize> = rows.iter().map(|&i| positions[i]).collect();
            let ids: Vec<usize> = rows.iter().map(|&i| first_id + i).collect();
            store.dims[k] += level * rows.len();
            match store.buckets[k].iter_mut().find(|b| b.rank == level) {
                Some(b) => {
                    b.lat = Tensor::cat(vec![b.lat.clone(), part], 0);
                    b.positions.extend(pos);
                    b.ids.extend(ids);
                }
                None => {
                    store.buckets[k].push(Bucket {
                        rank: level,
                        lat: part,
                        positions: pos,
                        ids,
                    });
                    store.buckets[k].sort_by_key(|b| b.rank);
                }
            }
        }
    }
}

impl PrunableCache for DynaKvCache {
    fn per_kv_head(&self) -> bool {
        false
    }

    /// Drops every token not kept from the rank buckets of both K and V.
    fn retain(&mut self, layer: usize, keep: &KeepPositions) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        let KeepPositions::Layer(keep) = keep else {
            return Err(CacheError::Config(
                "DynaKvCache stores all KV heads of a token together (joint basis): \
                 it needs one token set per layer"
                    .into(),
            ));
        };
        let keep: std::collections::HashSet<usize> = keep.iter().copied().collect();
        let store = &mut self.layers[layer];
        for (k, buckets) in store.buckets.iter_mut().enumerate() {
            for b in buckets.iter_mut() {
                let rows: Vec<usize> = (0..b.positions.len())
                    .filter(|&i| keep.contains(&b.positions[i]))
                    .collect();
                if rows.len() == b.positions.len() {
                    continue;
                }
                store.dims[k] -= b.rank * (b.positions.len() - rows.len());
                let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                let idx = Tensor::<1, Int>::from_data(
                    TensorData::new(idx, [rows.len()]),
                    &b.lat.device(),
                );
                b.lat = b.lat.clone().select(0, idx);
                b.positions = rows.iter().map(|&i| b.positions[i]).collect();
                b.ids = rows.iter().map(|&i| b.ids[i]).collect();
            }
            buckets.retain(|b| !b.positions.is_empty());
        }
        Ok(())
    }
}

fn policy_ranks(
    policy: &dyn RankPolicy,
    layer: usize,
    kind: KvKind,
    lat: &Tensor<2>,
    positions: &[usize],
) -> Result<Vec<usize>, CacheError> {
    let data = if policy.needs_latents() {
        lat.clone()
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| CacheError::Config(format!("latents: {e:?}")))?
    } else {
        Vec::new()
    };
    Ok(policy.ranks(layer, kind, &data, positions))
}

impl AttentionCache for DynaKvCache {
    fn append(
        &mut self,
        layer: usize,
        k_pre: Tensor<4>,
        v: Tensor<4>,
        positions: &[usize],
    ) -> Result<(), CacheError> {
        self.geometry.check_layer(layer)?;
        self.geometry.check_kv(&k_pre, &v, positions)?;
        if k_pre.dims()[0] != 1 {
            return Err(CacheError::Config(
                "DynaKvCache supports batch size 1".into(),
            ));
        }
        let k = match self.bases.placement {
            RopePlacement::Pre => k_pre,
            RopePlacement::Post => self.rope.apply(k_pre, positions)?,
        };
        let b = &self.bases.layers[layer];
        let lat_k = (joint(k) - b.mean[0].clone().unsqueeze()).matmul(b.enc[0].clone());
        let lat_v = (joint(v) - b.mean[1].clone().unsqueeze()).matmul(b.enc[1].clone());
        let rk = policy_ranks(self.policy.as_ref(), layer, KvKind::Key, &lat_k, positions)?;
        let mut rv = policy_ranks(
            self.policy.as_ref(),
            layer,
            KvKind::Value,
            &lat_v,
            positions,
        )?;
        for r in rk.iter().chain(&rv) {
            if !self.bases.levels.contains(*r) {
                return Err(CacheError::Config(format!(
                    "policy returned rank {r}, not a level"
                )));
            }
        }
        // A token without a key is never attended: its value would be dead weight.
        for (v, &k) in rv.iter_mut().zip(&rk) {
            if k == 0 {
                *v = 0;
            }
        }
        let first = self.layers[layer].next_id;
        self.store(layer, KvKind::Key, lat_k, &rk, positions, first);
        self.store(layer, KvKind::Value, lat_v, &rv, positions, first);
        self.layers[layer].next_id += positions.len();
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
        let g = self.geometry;
        let (hk, dh, groups) = (g.n_kv_heads, g.head_dim, g.groups());
        let [bsz, h, t, _] = q_rot.dims();
        let device = q_rot.device();
        let store = &self.layers[layer];
        let b = &self.bases.layers[layer];
        if store.buckets[0].is_empty() || store.buckets[1].is_empty() {
            return Err(CacheError::Config(format!(
                "attend on layer {layer} with nothing stored"
            )));
        }
        let q = q_rot.reshape([bsz, hk, groups * t, dh]);
        // Scores per key bucket, in key-bucket order.
        let mut scores = Vec::new();
        let mut k_pos = Vec::new();
        let mut k_ids = Vec::new();
        for bk in &store.buckets[0] {
            let n = bk.positions.len();
            let s = match self.bases.placement {
                RopePlacement::Pre => {
                    let keys = bk.lat.clone().matmul(b.dec_k.clone().narrow(0, 0, bk.rank))
                        + b.mean[0].clone().unsqueeze();
                    let keys = keys.reshape([1, n, hk, dh]).swap_dims(1, 2);
                    let keys = self.rope.apply(keys, &bk.positions)?;
                    q.clone().matmul(keys.swap_dims(2, 3))
                }
                RopePlacement::Post => {
                    // q · (lat · dec_g + mean_g) = (q · dec_g^T) · lat + q · mean_g
                    let dec = b.dec_k_heads.clone().narrow(1, 0, bk.rank).unsqueeze::<4>(); // [1,Hk,r,D]
                    let q_lat = q.clone().matmul(dec.swap_dims(2, 3)); // [1,Hk,GT,r]
                    let lat = bk.lat.clone().unsqueeze::<4>(); // [1,1,n,r]
                    let off = q.clone().matmul(b.mean_k_heads.clone().unsqueeze::<4>()); // [1,Hk,GT,1]
                    q_lat.matmul(lat.swap_dims(2, 3)) + off
                }
            };
            scores.push(s);
            k_pos.extend_from_slice(&bk.positions);
            k_ids.extend_from_slice(&bk.ids);
        }
        let scores = Tensor::cat(scores, 3) / (dh as f64).sqrt();
        let s_len = k_pos.len();
        let scores = match causal_mask(positions, &k_pos, groups, &device) {
            Some(m) => scores.mask_fill(m.expand([bsz, hk, groups * t, s_len]), f32::NEG_INFINITY),
            None => scores,
        };
        let weights = softmax(scores, 3);
        // Values: gather each value bucket's weights, sum latents, decode once.
        let mut slot = vec![0usize; store.next_id];
        for (j, &id) in k_ids.iter().enumerate() {
            slot[id] = j;
        }
        let d = g.d_kv();
        let mut z: Option<Tensor<4>> = None;
        for bv in &store.buckets[1] {
            let idx: Vec<i64> = bv.ids.iter().map(|&id| slot[id] as i64).collect();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [bv.ids.len()]), &device);
            let w = weights.clone().select(3, idx);
            let part = w.matmul(bv.lat.clone().unsqueeze::<4>()); // [1,Hk,GT,r]
            let part = if bv.rank < d {
                let pad = Tensor::zeros([bsz, hk, groups * t, d - bv.rank], &device);
                Tensor::cat(vec![part, pad], 3)
            } else {
                part
            };
            z = Some(match z {
                Some(z) => z + part,
                None => part,
            });
        }
        let z = z.ok_or_else(|| CacheError::Config("no value buckets".into()))?;
        let out = z.matmul(b.dec_v_heads.clone().unsqueeze::<4>())
            + b.mean_v_heads.clone().unsqueeze::<4>();
        Ok(out.reshape([bsz, h, t, dh]))
    }

    /// Tokens with a stored key (rank-0 and pruned tokens are not stored).
    fn len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .map_or(0, |l| l.buckets[0].iter().map(|b| b.positions.len()).sum())
    }

    fn reset(&mut self) {
        self.layers = vec![LayerStore::default(); self.geometry.n_layers];
    }

    fn footprint(&self) -> CacheFootprint {
        self.footprint_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_support::{artifact, rand4, run, Cycle, Fixed, G};
    use crate::cache::DenseCache;
    use crate::device::default_device;

    #[test]
    fn full_rank_equals_dense_for_both_placements_and_any_chunking() {
        let device = default_device();
        let rope = Rope::new(4, 4, 10_000.0, 64, &device).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 10, 4]),
            rand4([1, 2, 10, 4]),
            rand4([1, 2, 10, 4]),
        );
        let mut dense = DenseCache::new(G, rope.clone()).unwrap();
        let want = run(&mut dense, &q, &k, &v, &[10]);
        for placement in [RopePlacement::Pre, RopePlacement::Post] {
            let bases = Arc::new(DynaKvBases::new(&artifact(placement), G, &device).unwrap());
            for chunks in [vec![10], vec![1; 10], vec![3, 1, 6]] {
                let mut c =
                    DynaKvCache::new(G, rope.clone(), bases.clone(), Arc::new(Fixed(8))).unwrap();
                let got = run(&mut c, &q, &k, &v, &chunks);
                let diff: f32 = (got - want.clone()).abs().max().into_scalar();
                assert!(diff < 1e-4, "{placement:?} {chunks:?}: {diff}");
            }
        }
    }

    #[test]
    fn buckets_track_every_level_across_appends() {
        let device = default_device();
        let rope = Rope::new(4, 4, 10_000.0, 64, &device).unwrap();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let mut c = DynaKvCache::new(G, rope, bases, Arc::new(Cycle)).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 13, 4]),
            rand4([1, 2, 13, 4]),
            rand4([1, 2, 13, 4]),
        );
        let out = run(&mut c, &q, &k, &v, &[5, 1, 1, 6]);
        let vals: Vec<f32> = out.into_data().try_into_vec_as::<f32>().unwrap();
        assert!(vals.iter().all(|x| x.is_finite()));
        let kr = c.ranks(0, KvKind::Key);
        let vr = c.ranks(0, KvKind::Value);
        assert_eq!(kr.len(), 13);
        for (i, &(id, r)) in kr.iter().enumerate() {
            assert_eq!((id, r), (i, 2 * (1 + i % 4)));
            assert_eq!(vr[i], (i, 2 * (1 + (i + 3) % 4)));
        }
        assert_eq!(c.layers[0].buckets[0].len(), 4, "one bucket per level");
        let f = c.footprint();
        let dims: usize = kr.iter().chain(&vr).map(|x| x.1).sum();
        assert_eq!(f.values as usize, dims);
        assert_eq!(f.values_full as usize, 2 * 13 * 8);
        c.reset();
        assert_eq!(c.len(0), 0);
    }

    /// Keys of odd positions get rank 0 (dropped), values always rank 8.
    #[derive(Debug)]
    struct DropOddKeys;
    impl RankPolicy for DropOddKeys {
        fn name(&self) -> &'static str {
            "drop-odd-keys"
        }
        fn needs_latents(&self) -> bool {
            false
        }
        fn ranks(&self, _l: usize, kind: KvKind, _lat: &[f32], positions: &[usize]) -> Vec<usize> {
            positions
                .iter()
                .map(|&p| {
                    if kind == KvKind::Key && p % 2 == 1 {
                        0
                    } else {
                        8
                    }
                })
                .collect()
        }
    }

    #[test]
    fn a_token_without_a_key_stores_no_value_and_is_not_attended() {
        let device = default_device();
        let rope = Rope::new(4, 4, 10_000.0, 64, &device).unwrap();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let mut c = DynaKvCache::new(G, rope.clone(), bases, Arc::new(DropOddKeys)).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 6, 4]),
            rand4([1, 2, 6, 4]),
            rand4([1, 2, 6, 4]),
        );
        let pos: Vec<usize> = (0..6).collect();
        c.append(0, k.clone(), v.clone(), &pos).unwrap();
        let values: Vec<usize> = c
            .ranks(0, KvKind::Value)
            .iter()
            .map(|&(id, _)| id)
            .collect();
        assert_eq!(values, vec![0, 2, 4]);
        assert_eq!(c.len(0), 3);
        // Attention equals a dense cache holding the even tokens only.
        let q_last = q.narrow(2, 5, 1);
        let got = c.attend(0, q_last.clone(), &[5]).unwrap();
        let mut dense = DenseCache::new(G, rope).unwrap();
        let even = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 4], [3]), &device);
        dense
            .append(0, k.select(2, even.clone()), v.select(2, even), &[0, 2, 4])
            .unwrap();
        let want = dense.attend(0, q_last, &[5]).unwrap();
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn a_rank_that_is_not_a_level_is_an_error() {
        let device = default_device();
        let rope = Rope::new(4, 4, 10_000.0, 64, &device).unwrap();
        let bases = Arc::new(DynaKvBases::new(&artifact(RopePlacement::Pre), G, &device).unwrap());
        let mut c = DynaKvCache::new(G, rope, bases, Arc::new(Fixed(3))).unwrap();
        let err = c
            .append(0, rand4([1, 2, 2, 4]), rand4([1, 2, 2, 4]), &[0, 1])
            .unwrap_err();
        assert!(err.to_string().contains("not a level"), "{err}");
        let other = CacheGeometry {
            n_kv_heads: 1,
            n_heads: 2,
            ..G
        };
        assert!(DynaKvBases::new(&artifact(RopePlacement::Pre), other, &device).is_err());
    }
}
