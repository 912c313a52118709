//! DynaKV: every token stores its own number of latent coordinates.
//!
//! On append, keys and values are projected into their layer's basis, the
//! policy picks a rank per token, and latents go into one contiguous bucket per
//! rank level (each bucket `[n, rank]`, so memory really shrinks). Attention
//! takes one of three exact paths, all relying on every rank being a prefix of
//! the same basis:
//! - decode steps on a CPU: the fused host kernel (`latent_decode`);
//! - prefill chunks: every stored key and value rebuilt once (zero-padded
//!   latents times the decoder), then burn's fused attention, as dense;
//! - short chunks on a GPU: scores per key bucket (reconstruct + RoPE for
//!   `pre`, latent dot products for `post`), one softmax over every stored
//!   token, values summed in latent space and decoded once.

use std::sync::Arc;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::budget::CacheFootprint;
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{KvKind, RankPolicy};

use super::latent_decode::{self, BucketView, Heads, HostBasis};
use super::{
    host_rows, joint, mat, AttentionCache, CacheGeometry, KeepPositions, KvStorage, PrunableCache,
    HOST_KERNEL_MAX_QUERIES,
};
use crate::attention::{causal_attention, causal_mask};
use crate::error::CacheError;
use crate::rope::{HostRope, Rope};

/// Bytes of per-token metadata per layer and per K/V: position and token id.
const META_BYTES_PER_TOKEN: usize = 8;

/// One layer's decoders as tensors (for the tensor attention path).
#[derive(Debug, Clone)]
struct Decoders {
    /// Key decoder `[d, d]` (pre) and per KV head `[H_kv, d, D]` (post).
    dec_k: Tensor<2>,
    dec_k_heads: Tensor<3>,
    /// Value decoder `[d, d]` (rebuilt prefill path).
    dec_v: Tensor<2>,
    /// Value decoder per KV head `[H_kv, d, D]` and mean `[H_kv, 1, D]`.
    dec_v_heads: Tensor<3>,
    mean_v_heads: Tensor<3>,
    /// Key mean per KV head `[H_kv, D, 1]` (post: score offset `q · mean`).
    mean_k_heads: Tensor<3>,
}

impl Decoders {
    fn new(host: &HostBasis, geometry: CacheGeometry, device: &Device) -> Self {
        let (d, hk, dh) = (geometry.d_kv(), geometry.n_kv_heads, geometry.head_dim);
        let dec_k = mat(&host.dec_k, d, d, device);
        let dec_v = mat(&host.dec_v, d, d, device);
        let heads = |dec: &Tensor<2>| dec.clone().reshape([d, hk, dh]).swap_dims(0, 1);
        let vec = |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [d]), device);
        Self {
            dec_k_heads: heads(&dec_k),
            dec_v_heads: heads(&dec_v),
            dec_v,
            mean_v_heads: vec(&host.mean_v).reshape([hk, 1, dh]),
            mean_k_heads: vec(&host.mean_k).reshape([hk, dh, 1]),
            dec_k,
        }
    }
}

/// One layer's basis: encoders and means on the device, decoders on the
/// device ([`KvStorage::Device`]) or on the host ([`KvStorage::Host`],
/// read by the host kernel and uploaded for a prefill's tensor path).
#[derive(Debug, Clone)]
struct LayerBasis {
    /// `[d, d]` for keys and values
    enc: [Tensor<2>; 2],
    /// `[d]`
    mean: [Tensor<1>; 2],
    decoders: Option<Decoders>,
    host: HostBasis,
}

/// Chunks with at least this many queries (prefill) rebuild every stored key
/// and value once and run burn's fused attention, as the dense cache does:
/// rebuilding costs `S * d * d` per kind, less than scoring bucket by bucket
/// and summing values in latent space once `9 * T` passes `d`.
const REBUILD_MIN_QUERIES: usize = 32;

/// Bases of every layer, uploaded once and shared by many caches.
#[derive(Debug)]
pub struct DynaKvBases {
    layers: Vec<LayerBasis>,
    placement: RopePlacement,
    levels: RankLevels,
    d_kv: usize,
    fixed_bytes: usize,
    storage: KvStorage,
    geometry: CacheGeometry,
}

impl DynaKvBases {
    /// Uploads an artifact's bases, checking them against the geometry; the
    /// storage follows the device ([`KvStorage::for_device`]).
    pub fn new(
        artifact: &Artifact,
        geometry: CacheGeometry,
        device: &Device,
    ) -> Result<Self, CacheError> {
        Self::with_storage(artifact, geometry, device, KvStorage::for_device(device))
    }

    /// As [`DynaKvBases::new`] with an explicit latent storage.
    pub fn with_storage(
        artifact: &Artifact,
        geometry: CacheGeometry,
        device: &Device,
        storage: KvStorage,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        let d = geometry.d_kv();
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
            let host = HostBasis {
                dec_k: pair[0].dec.clone(),
                mean_k: pair[0].mean.clone(),
                dec_v: pair[1].dec.clone(),
                mean_v: pair[1].mean.clone(),
            };
            let decoders =
                (storage == KvStorage::Device).then(|| Decoders::new(&host, geometry, device));
            // enc x2, dec x2, means x2, each held once (host or device)
            fixed += 4 * (4 * d * d + 2 * d);
            layers.push(LayerBasis {
                enc,
                mean,
                decoders,
                host,
            });
        }
        Ok(Self {
            layers,
            placement: artifact.header.rope,
            levels: artifact.header.levels.clone(),
            d_kv: d,
            fixed_bytes: fixed,
            storage,
            geometry,
        })
    }

    pub fn storage(&self) -> KvStorage {
        self.storage
    }

    /// One layer's decoders as tensors: the resident ones, or uploaded from
    /// the host copy.
    fn decoders(&self, layer: usize, device: &Device) -> Decoders {
        let b = &self.layers[layer];
        match &b.decoders {
            Some(d) => d.clone(),
            None => Decoders::new(&b.host, self.geometry, device),
        }
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
    lat: Latents,
    positions: Vec<usize>,
    ids: Vec<usize>,
}

/// A bucket's latents, `[n, rank]`, where [`KvStorage`] says.
#[derive(Debug, Clone)]
enum Latents {
    /// Boxed: a tensor handle is much larger than a `Vec`.
    Device(Box<Tensor<2>>),
    /// Row-major.
    Host(Vec<f32>),
}

impl Bucket {
    /// The latents as a tensor (an upload for host storage).
    ///
    /// # Shapes
    /// returns `[n, rank]`
    fn tensor(&self, device: &Device) -> Tensor<2> {
        match &self.lat {
            Latents::Device(t) => (**t).clone(),
            Latents::Host(v) => mat(v, self.positions.len(), self.rank, device),
        }
    }

    fn view(&self) -> Option<BucketView<'_>> {
        match &self.lat {
            Latents::Host(v) => Some(BucketView {
                rank: self.rank,
                lat: v,
                positions: &self.positions,
                ids: &self.ids,
            }),
            Latents::Device(_) => None,
        }
    }

    /// Keeps the given rows, in order.
    fn keep_rows(&mut self, rows: &[usize]) {
        self.lat = match &self.lat {
            Latents::Device(t) => {
                let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                let idx =
                    Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &t.device());
                Latents::Device(Box::new((**t).clone().select(0, idx)))
            }
            Latents::Host(v) => Latents::Host(
                rows.iter()
                    .flat_map(|&i| &v[i * self.rank..(i + 1) * self.rank])
                    .copied()
                    .collect(),
            ),
        };
        self.positions = rows.iter().map(|&i| self.positions[i]).collect();
        self.ids = rows.iter().map(|&i| self.ids[i]).collect();
    }
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
    /// RoPE tables for the host kernel (host storage only).
    host_rope: Option<Arc<HostRope>>,
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
        let host_rope = match bases.storage {
            KvStorage::Host => Some(rope.host()?),
            KvStorage::Device => None,
        };
        Ok(Self {
            geometry,
            rope,
            bases,
            policy,
            layers: vec![LayerStore::default(); geometry.n_layers],
            host_rope,
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

    /// Files new tokens into the rank buckets of one kind.
    ///
    /// # Shapes
    /// `lat`: `[n, d]` (device latents) with `host` its row-major copy for
    /// host storage; `ranks`, `positions`: `[n]`.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &mut self,
        layer: usize,
        kind: KvKind,
        lat: Tensor<2>,
        host: Option<&[f32]>,
        ranks: &[usize],
        positions: &[usize],
        first_id: usize,
    ) {
        let device = lat.device();
        let d = self.bases.d_kv;
        let store = &mut self.layers[layer];
        let k = kind.index();
        for &level in self.bases.levels.as_slice().iter().filter(|&&l| l > 0) {
            let rows: Vec<usize> = (0..ranks.len()).filter(|&i| ranks[i] == level).collect();
            if rows.is_empty() {
                continue;
            }
            let part = match host {
                Some(h) => Latents::Host(
                    rows.iter()
                        .flat_map(|&i| &h[i * d..i * d + level])
                        .copied()
                        .collect(),
                ),
                None => {
                    let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                    let idx =
                        Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
                    Latents::Device(Box::new(lat.clone().select(0, idx).narrow(1, 0, level)))
                }
            };
            let pos: Vec<usize> = rows.iter().map(|&i| positions[i]).collect();
            let ids: Vec<usize> = rows.iter().map(|&i| first_id + i).collect();
            store.dims[k] += level * rows.len();
            match store.buckets[k].iter_mut().find(|b| b.rank == level) {
                Some(b) => {
                    match (&mut b.lat, part) {
                        (Latents::Host(v), Latents::Host(p)) => v.extend(p),
                        (Latents::Device(t), Latents::Device(p)) => {
                            **t = Tensor::cat(vec![(**t).clone(), *p], 0)
                        }
                        _ => unreachable!("one cache uses one storage"),
                    }
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
                b.keep_rows(&rows);
            }
            buckets.retain(|b| !b.positions.is_empty());
        }
        Ok(())
    }
}

/// One kind's stored latents zero-padded to `d` columns, one row per key
/// slot: `slot_of[id]` is the slot of token `id` (`usize::MAX`: none). A slot
/// whose token stores nothing of this kind (a key without a value) gets a zero
/// row, which decodes to the mean. Exact: every rank is a prefix of the basis.
///
/// # Shapes
/// returns `[slots, d]`
fn padded_latents(
    buckets: &[Bucket],
    slot_of: &[usize],
    slots: usize,
    d: usize,
    device: &Device,
) -> Tensor<2> {
    let host: Vec<(&Bucket, &[f32])> = buckets
        .iter()
        .filter_map(|b| match &b.lat {
            Latents::Host(lat) => Some((b, lat.as_slice())),
            Latents::Device(_) => None,
        })
        .collect();
    if host.len() == buckets.len() {
        let mut out = vec![0f32; slots * d];
        for (b, lat) in host {
            for (i, &id) in b.ids.iter().enumerate() {
                let j = slot_of[id];
                if j != usize::MAX {
                    out[j * d..j * d + b.rank].copy_from_slice(&lat[i * b.rank..(i + 1) * b.rank]);
                }
            }
        }
        // moved, not copied: this matrix is the size of the cache
        return Tensor::from_data(TensorData::new(out, [slots, d]), device);
    }
    let stored: usize = buckets.iter().map(|b| b.ids.len()).sum();
    // the zero row appended last stands for slots without an entry
    let mut rows = vec![stored as i64; slots];
    let mut parts = Vec::new();
    let mut first = 0;
    for b in buckets {
        let n = b.ids.len();
        let lat = b.tensor(device);
        parts.push(if b.rank < d {
            Tensor::cat(vec![lat, Tensor::zeros([n, d - b.rank], device)], 1)
        } else {
            lat
        });
        for (i, &id) in b.ids.iter().enumerate() {
            if slot_of[id] != usize::MAX {
                rows[slot_of[id]] = (first + i) as i64;
            }
        }
        first += n;
    }
    parts.push(Tensor::zeros([1, d], device));
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [slots]), device);
    Tensor::cat(parts, 0).select(0, rows)
}

impl DynaKvCache {
    /// Prefill path: every stored key and value rebuilt once in token order
    /// (`padded latents · decoder + mean`, RoPE for `pre`), then burn's fused
    /// attention, so a prefill chunk costs what the dense cache's does plus
    /// two `[S, d] x [d, d]` products.
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`
    /// - returns `[1, H, T, D]`
    fn attend_rebuilt(
        &self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        let g = self.geometry;
        let (hk, dh, d) = (g.n_kv_heads, g.head_dim, g.d_kv());
        let device = q_rot.device();
        let store = &self.layers[layer];
        let b = &self.bases.layers[layer];
        let mut slots: Vec<(usize, usize)> = store.buckets[0]
            .iter()
            .flat_map(|bk| bk.ids.iter().copied().zip(bk.positions.iter().copied()))
            .collect();
        slots.sort_unstable();
        let mut slot_of = vec![usize::MAX; store.next_id];
        for (j, &(id, _)) in slots.iter().enumerate() {
            slot_of[id] = j;
        }
        let k_pos: Vec<usize> = slots.iter().map(|&(_, p)| p).collect();
        let s_len = k_pos.len();
        let dec = self.bases.decoders(layer, &device);
        let rebuild = |kind: usize, dec: Tensor<2>| -> Tensor<4> {
            (padded_latents(&store.buckets[kind], &slot_of, s_len, d, &device).matmul(dec)
                + b.mean[kind].clone().unsqueeze())
            .reshape([1, s_len, hk, dh])
            .swap_dims(1, 2)
        };
        let keys = rebuild(0, dec.dec_k);
        let keys = match self.bases.placement {
            RopePlacement::Pre => self.rope.apply(keys, &k_pos)?,
            RopePlacement::Post => keys,
        };
        let values = rebuild(1, dec.dec_v);
        Ok(causal_attention(q_rot, keys, values, positions, &k_pos))
    }
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
        // Host copies: what host storage keeps and what a latent-reading policy reads.
        let need_host = self.bases.storage == KvStorage::Host || self.policy.needs_latents();
        let (host_k, host_v) = if need_host {
            (host_rows(&lat_k)?, host_rows(&lat_v)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let reads = self.policy.needs_latents();
        let (read_k, read_v): (&[f32], &[f32]) = if reads {
            (&host_k, &host_v)
        } else {
            (&[], &[])
        };
        let rk = self.policy.ranks(layer, KvKind::Key, read_k, positions);
        let mut rv = self.policy.ranks(layer, KvKind::Value, read_v, positions);
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
        let host = self.bases.storage == KvStorage::Host;
        let (hk, hv) = (host.then_some(&host_k[..]), host.then_some(&host_v[..]));
        self.store(layer, KvKind::Key, lat_k, hk, &rk, positions, first);
        self.store(layer, KvKind::Value, lat_v, hv, &rv, positions, first);
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
        let (hk, dh) = (g.n_kv_heads, g.head_dim);
        let [bsz, h, t, _] = q_rot.dims();
        let device = q_rot.device();
        let store = &self.layers[layer];
        let b = &self.bases.layers[layer];
        if store.buckets[0].is_empty() || store.buckets[1].is_empty() {
            return Err(CacheError::Config(format!(
                "attend on layer {layer} with nothing stored"
            )));
        }
        if bsz != 1 {
            return Err(CacheError::Config(
                "DynaKvCache supports batch size 1".into(),
            ));
        }
        if let (Some(rope), true) = (&self.host_rope, t <= HOST_KERNEL_MAX_QUERIES) {
            let views = |k: usize| -> Vec<BucketView<'_>> {
                store.buckets[k].iter().filter_map(Bucket::view).collect()
            };
            let q_host = host_rows(&q_rot.reshape([h * t, dh]))?;
            let out = latent_decode::attend(
                Heads {
                    n_heads: h,
                    n_kv_heads: hk,
                    head_dim: dh,
                },
                self.bases.placement,
                &b.host,
                rope,
                &q_host,
                positions,
                &views(0),
                &views(1),
                store.next_id,
            );
            return Ok(Tensor::from_data(
                TensorData::new(out, [1, h, t, dh]),
                &device,
            ));
        }
        if t >= REBUILD_MIN_QUERIES {
            return self.attend_rebuilt(layer, q_rot, positions);
        }
        self.attend_by_bucket(layer, q_rot, positions)
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

impl DynaKvCache {
    /// Short chunks on the device: scores per key bucket (reconstruct + RoPE
    /// for `pre`, latent dot products for `post`), one softmax over every
    /// stored token, values summed in latent space and decoded once.
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`
    /// - returns `[1, H, T, D]`
    fn attend_by_bucket(
        &self,
        layer: usize,
        q_rot: Tensor<4>,
        positions: &[usize],
    ) -> Result<Tensor<4>, CacheError> {
        let g = self.geometry;
        let (hk, dh, groups) = (g.n_kv_heads, g.head_dim, g.groups());
        let [bsz, h, t, _] = q_rot.dims();
        let device = q_rot.device();
        let store = &self.layers[layer];
        let b = &self.bases.layers[layer];
        let dec = self.bases.decoders(layer, &device);
        let q = q_rot.reshape([bsz, hk, groups * t, dh]);
        // Scores per key bucket, in key-bucket order.
        let mut scores = Vec::new();
        let mut k_pos = Vec::new();
        let mut k_ids = Vec::new();
        for bk in &store.buckets[0] {
            let n = bk.positions.len();
            let s = match self.bases.placement {
                RopePlacement::Pre => {
                    let keys = bk
                        .tensor(&device)
                        .matmul(dec.dec_k.clone().narrow(0, 0, bk.rank))
                        + b.mean[0].clone().unsqueeze();
                    let keys = keys.reshape([1, n, hk, dh]).swap_dims(1, 2);
                    let keys = self.rope.apply(keys, &bk.positions)?;
                    q.clone().matmul(keys.swap_dims(2, 3))
                }
                RopePlacement::Post => {
                    // q · (lat · dec_g + mean_g) = (q · dec_g^T) · lat + q · mean_g
                    let dk = dec
                        .dec_k_heads
                        .clone()
                        .narrow(1, 0, bk.rank)
                        .unsqueeze::<4>(); // [1,Hk,r,D]
                    let q_lat = q.clone().matmul(dk.swap_dims(2, 3)); // [1,Hk,GT,r]
                    let lat = bk.tensor(&device).unsqueeze::<4>(); // [1,1,n,r]
                    let off = q.clone().matmul(dec.mean_k_heads.clone().unsqueeze::<4>()); // [1,Hk,GT,1]
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
        // Values: every stored value in key-slot order, zero past its rank and
        // for a key without a value, then one product and one decode. The
        // gather moves the small `[S, d]` value matrix, not the `[.., G*T, S]`
        // weights once per bucket.
        let mut slot_of = vec![usize::MAX; store.next_id];
        for (j, &id) in k_ids.iter().enumerate() {
            slot_of[id] = j;
        }
        let values = padded_latents(&store.buckets[1], &slot_of, s_len, g.d_kv(), &device);
        let out = weights
            .matmul(values.unsqueeze::<4>())
            .matmul(dec.dec_v_heads.clone().unsqueeze::<4>())
            + dec.mean_v_heads.clone().unsqueeze::<4>();
        Ok(out.reshape([bsz, h, t, dh]))
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
            rand4([1, 4, 40, 4]),
            rand4([1, 2, 40, 4]),
            rand4([1, 2, 40, 4]),
        );
        let mut dense = DenseCache::new(G, rope.clone()).unwrap();
        let want = run(&mut dense, &q, &k, &v, &[40]);
        for placement in [RopePlacement::Pre, RopePlacement::Post] {
            let bases = Arc::new(DynaKvBases::new(&artifact(placement), G, &device).unwrap());
            // one rebuilt prefill, decode steps only, short chunks then a
            // rebuilt chunk over cached tokens
            for chunks in [vec![40], vec![1; 40], vec![3, 1, 6, 30]] {
                let mut c =
                    DynaKvCache::new(G, rope.clone(), bases.clone(), Arc::new(Fixed(8))).unwrap();
                let got = run(&mut c, &q, &k, &v, &chunks);
                let diff: f32 = (got - want.clone()).abs().max().into_scalar();
                assert!(diff < 1e-4, "{placement:?} {chunks:?}: {diff}");
            }
        }
    }

    #[test]
    fn the_host_kernel_equals_the_tensor_path_at_every_rank_mix() {
        let device = default_device();
        let rope = Rope::new(4, 4, 10_000.0, 64, &device).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 12, 4]),
            rand4([1, 2, 12, 4]),
            rand4([1, 2, 12, 4]),
        );
        for placement in [RopePlacement::Pre, RopePlacement::Post] {
            let make = |storage| {
                let bases = Arc::new(
                    DynaKvBases::with_storage(&artifact(placement), G, &device, storage).unwrap(),
                );
                DynaKvCache::new(G, rope.clone(), bases, Arc::new(Cycle)).unwrap()
            };
            // short chunks (2, 4: host kernel with a causal mask), a long one
            // (5: tensor path over host latents), a decode step
            let chunks = [2, 4, 5, 1];
            let mut dev = make(KvStorage::Device);
            let mut host = make(KvStorage::Host);
            assert!(host.host_rope.is_some() && dev.host_rope.is_none());
            let want = run(&mut dev, &q, &k, &v, &chunks);
            let got = run(&mut host, &q, &k, &v, &chunks);
            let diff: f32 = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "{placement:?}: {diff}");
            // Pruning keeps them equal.
            let keep = KeepPositions::Layer(vec![0, 2, 3, 7, 11]);
            for c in [&mut dev, &mut host] {
                c.retain(0, &keep).unwrap();
            }
            let q_last = q.clone().narrow(2, 11, 1);
            let a = dev.attend(0, q_last.clone(), &[11]).unwrap();
            let b = host.attend(0, q_last, &[11]).unwrap();
            let diff: f32 = (a - b).abs().max().into_scalar();
            assert!(diff < 1e-5, "{placement:?} pruned: {diff}");
            assert_eq!(dev.footprint(), host.footprint());
        }
    }

    /// Keys cycle through the levels; odd tokens keep a key but no value.
    #[derive(Debug)]
    struct NoOddValues;
    impl RankPolicy for NoOddValues {
        fn name(&self) -> &'static str {
            "no-odd-values"
        }
        fn needs_latents(&self) -> bool {
            false
        }
        fn ranks(&self, l: usize, kind: KvKind, lat: &[f32], positions: &[usize]) -> Vec<usize> {
            let cycle = Cycle.ranks(l, kind, lat, positions);
            let no_value = |p: usize| kind == KvKind::Value && p % 2 == 1;
            (positions.iter().zip(cycle))
                .map(|(&p, r)| if no_value(p) { 0 } else { r })
                .collect()
        }
    }

    #[test]
    fn the_rebuilt_prefill_path_equals_scoring_by_bucket() {
        let device = default_device();
        let rope = Rope::new(4, 4, 10_000.0, 64, &device).unwrap();
        let (q, k, v) = (
            rand4([1, 4, 14, 4]),
            rand4([1, 2, 14, 4]),
            rand4([1, 2, 14, 4]),
        );
        for placement in [RopePlacement::Pre, RopePlacement::Post] {
            for storage in [KvStorage::Device, KvStorage::Host] {
                let bases = Arc::new(
                    DynaKvBases::with_storage(&artifact(placement), G, &device, storage).unwrap(),
                );
                let mut c =
                    DynaKvCache::new(G, rope.clone(), bases, Arc::new(NoOddValues)).unwrap();
                // a chunk, a pruning, then a chunk whose queries see cached tokens
                let first: Vec<usize> = (0..9).collect();
                c.append(
                    0,
                    k.clone().narrow(2, 0, 9),
                    v.clone().narrow(2, 0, 9),
                    &first,
                )
                .unwrap();
                c.retain(0, &KeepPositions::Layer(vec![0, 1, 2, 4, 5, 7, 8]))
                    .unwrap();
                let second: Vec<usize> = (9..14).collect();
                c.append(
                    0,
                    k.clone().narrow(2, 9, 5),
                    v.clone().narrow(2, 9, 5),
                    &second,
                )
                .unwrap();
                let q2 = q.clone().narrow(2, 9, 5);
                let a = c.attend_rebuilt(0, q2.clone(), &second).unwrap();
                let b = c.attend_by_bucket(0, q2, &second).unwrap();
                let diff: f32 = (a - b).abs().max().into_scalar();
                assert!(diff < 1e-5, "{placement:?} {storage:?}: {diff}");
            }
        }
    }

    #[test]
    fn cpu_devices_get_host_storage() {
        // The default test backend is Flex unless a GPU feature is on.
        #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
        assert_eq!(KvStorage::for_device(&default_device()), KvStorage::Host);
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
