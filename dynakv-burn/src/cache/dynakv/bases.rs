//! DynaKV's per-layer bases: encoders and means on the device, decoders on
//! the device or the host, shared by every cache of a model.

use burn::tensor::{Device, Tensor, TensorData};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::levels::RankLevels;

use crate::cache::{mat, CacheGeometry, KvStorage};
use crate::error::CacheError;
use crate::host::latent_decode::HostBasis;

/// One layer's decoders as tensors (for the tensor attention path).
#[derive(Debug, Clone)]
pub(super) struct Decoders {
    /// Key decoder `[d, d]` (pre) and per KV head `[H_kv, d, D]` (post).
    pub(super) dec_k: Tensor<2>,
    pub(super) dec_k_heads: Tensor<3>,
    /// Value decoder `[d, d]` (rebuilt prefill path).
    pub(super) dec_v: Tensor<2>,
    /// Value decoder per KV head `[H_kv, d, D]` and mean `[H_kv, 1, D]`.
    pub(super) dec_v_heads: Tensor<3>,
    pub(super) mean_v_heads: Tensor<3>,
    /// Key mean per KV head `[H_kv, D, 1]` (post: score offset `q · mean`).
    pub(super) mean_k_heads: Tensor<3>,
}

impl Decoders {
    pub(super) fn new(host: &HostBasis, geometry: CacheGeometry, device: &Device) -> Self {
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
pub(super) struct LayerBasis {
    /// `[d, d]` for keys and values
    pub(super) enc: [Tensor<2>; 2],
    /// `[d]`
    pub(super) mean: [Tensor<1>; 2],
    pub(super) decoders: Option<Decoders>,
    pub(super) host: HostBasis,
    /// Standard deviation of each latent coordinate (square roots of the
    /// eigenvalues), for keys and values: per-coordinate latent scales.
    pub(super) stddev: [Vec<f32>; 2],
}

/// Bases of every layer, uploaded once and shared by many caches.
#[derive(Debug)]
pub struct DynaKvBases {
    pub(super) layers: Vec<LayerBasis>,
    pub(super) placement: RopePlacement,
    pub(super) levels: RankLevels,
    pub(super) d_kv: usize,
    pub(super) fixed_bytes: usize,
    pub(super) storage: KvStorage,
    pub(super) geometry: CacheGeometry,
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
            let stddev = [&pair[0], &pair[1]].map(|b| {
                b.eigenvalues
                    .iter()
                    .map(|e| e.max(0.0).sqrt() as f32)
                    .collect()
            });
            layers.push(LayerBasis {
                enc,
                mean,
                decoders,
                host,
                stddev,
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
    pub(super) fn decoders(&self, layer: usize, device: &Device) -> Decoders {
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
