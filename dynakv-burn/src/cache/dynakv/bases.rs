//! DynaKV's per-layer bases: encoders and means on the device, decoders on
//! the device or the host, shared by every cache of a model. With host
//! storage they can be held in f16 ([`BasisDtype::F16`]): half the fixed
//! bytes, widened a layer at a time where they are read.

use std::borrow::Cow;
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor, TensorData};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::levels::RankLevels;
use dynakv_core::quant::BasisDtype;
use half::f16;

use crate::cache::{mat, CacheGeometry, KvStorage};
use crate::error::CacheError;
use crate::host::latent_codes::KeyCodes;
use crate::host::latent_decode::HostBasis;
use crate::host::latent_encode::{widen_f16, EncoderRows};

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

/// One layer's encoders, as held.
#[derive(Debug, Clone)]
enum Encoders {
    /// Device storage: `[d, d]` tensors for keys and values.
    Tensors(Box<[Tensor<2>; 2]>),
    /// Host storage: `[d, d]` row-major for keys and values, read in place by
    /// a decode step ([`LayerBasis::host_encoder`]) and made into a tensor
    /// for a prefill's product.
    F32([Vec<f32>; 2]),
    /// As `F32`, in f16.
    F16([Vec<f16>; 2]),
}

/// One layer's host decoders and means, as held.
#[derive(Debug, Clone)]
enum HostDecoders {
    F32(HostBasis),
    /// Decoders in f16 (`[d, d]` row-major, keys then values), means in f32.
    F16 {
        dec: [Vec<f16>; 2],
        mean: [Vec<f32>; 2],
    },
}

/// One layer's basis: encoders and means on the device, decoders on the
/// device ([`KvStorage::Device`]) or on the host ([`KvStorage::Host`],
/// read by the host kernel and uploaded for a prefill's tensor path).
#[derive(Debug, Clone)]
pub(super) struct LayerBasis {
    enc: Encoders,
    /// `[d]`
    pub(super) mean: [Tensor<1>; 2],
    pub(super) decoders: Option<Decoders>,
    host: HostDecoders,
    /// Standard deviation of each latent coordinate (square roots of the
    /// eigenvalues), for keys and values: per-coordinate latent scales.
    pub(super) stddev: [Vec<f32>; 2],
    /// The key decoder as 8-bit codes, made the first time a decode step
    /// asks ([`LayerBasis::key_codes`]).
    key_codes: OnceLock<Option<KeyCodes>>,
}

impl LayerBasis {
    /// The encoder of keys (`kind` 0) or values (1), `[d, d]`, on `device`.
    pub(super) fn encoder(&self, kind: usize, device: &Device) -> Tensor<2> {
        match &self.enc {
            Encoders::Tensors(t) => t[kind].clone(),
            Encoders::F32(h) => {
                let d = self.host_dim();
                mat(&h[kind], d, d, device)
            }
            Encoders::F16(h) => {
                let d = self.host_dim();
                // the widened copy becomes the tensor's data (no second copy)
                Tensor::from_data(TensorData::new(widen(&h[kind]), [d, d]), device)
            }
        }
    }

    /// The encoder of keys (`kind` 0) or values (1) as held on the host, and
    /// the mean it subtracts; `None` on device storage.
    pub(super) fn host_encoder(&self, kind: usize) -> Option<(EncoderRows<'_>, &[f32])> {
        let rows = match &self.enc {
            Encoders::Tensors(_) => return None,
            Encoders::F32(h) => EncoderRows::F32(&h[kind]),
            Encoders::F16(h) => EncoderRows::F16(&h[kind]),
        };
        let mean = match &self.host {
            HostDecoders::F32(h) => [&h.mean_k, &h.mean_v][kind],
            HostDecoders::F16 { mean, .. } => &mean[kind],
        };
        Some((rows, mean))
    }

    /// The host decoders and means in f32: borrowed when held in f32,
    /// widened from f16 otherwise (one layer, `2 d^2` numbers).
    pub(super) fn host(&self) -> Cow<'_, HostBasis> {
        match &self.host {
            HostDecoders::F32(h) => Cow::Borrowed(h),
            HostDecoders::F16 { dec, mean } => Cow::Owned(HostBasis {
                dec_k: widen(&dec[0]),
                mean_k: mean[0].clone(),
                dec_v: widen(&dec[1]),
                mean_v: mean[1].clone(),
            }),
        }
    }

    /// The key decoder as 8-bit codes for the integer rebuild of keys held
    /// as blocks of codes ([`KeyCodes`]); made once per layer, from the
    /// decoder as held (f16 or f32). `None` when the width does not suit
    /// the kernel.
    pub(super) fn key_codes(&self) -> Option<&KeyCodes> {
        self.key_codes
            .get_or_init(|| KeyCodes::new(&self.host().dec_k, self.host_dim()))
            .as_ref()
    }

    /// Bytes of the key decoder's codes, once made.
    pub(super) fn key_code_bytes(&self) -> usize {
        self.key_codes
            .get()
            .and_then(Option::as_ref)
            .map_or(0, KeyCodes::bytes)
    }

    fn host_dim(&self) -> usize {
        match &self.host {
            HostDecoders::F32(h) => h.mean_k.len(),
            HostDecoders::F16 { mean, .. } => mean[0].len(),
        }
    }
}

fn widen(x: &[f16]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    widen_f16(x, &mut out);
    out
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
    dtype: BasisDtype,
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
        Self::with_dtype(artifact, geometry, device, storage, BasisDtype::F32)
    }

    /// As [`DynaKvBases::with_storage`], the bases held in `dtype`.
    ///
    /// f16 bases are the artifact's rounded to nearest (means stay f32). On
    /// host storage they are held as f16 and widened where read; on device
    /// storage, where backends differ in f16 support, the rounded values
    /// are held in f32 tensors and counted at 4 bytes (the fixed bytes say
    /// what is held, not what was asked).
    pub fn with_dtype(
        artifact: &Artifact,
        geometry: CacheGeometry,
        device: &Device,
        storage: KvStorage,
        dtype: BasisDtype,
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
        // levels beyond the KV width would index past a latent
        artifact.header.validate()?;
        if artifact.header.levels.full() != d {
            return Err(CacheError::Config(format!(
                "the artifact's rank levels end at {}, the KV width is {d}",
                artifact.header.levels.full()
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
            let rounded = |x: &[f32]| x.iter().map(|&v| dtype.round(v)).collect::<Vec<f32>>();
            let halves = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<f16>>();
            let held_f16 = dtype == BasisDtype::F16 && storage == KvStorage::Host;
            let enc = if held_f16 {
                Encoders::F16([halves(&pair[0].enc), halves(&pair[1].enc)])
            } else if storage == KvStorage::Host {
                Encoders::F32([rounded(&pair[0].enc), rounded(&pair[1].enc)])
            } else {
                Encoders::Tensors(Box::new([
                    mat(&rounded(&pair[0].enc), d, d, device),
                    mat(&rounded(&pair[1].enc), d, d, device),
                ]))
            };
            let mean = [
                Tensor::from_data(TensorData::new(pair[0].mean.clone(), [d]), device),
                Tensor::from_data(TensorData::new(pair[1].mean.clone(), [d]), device),
            ];
            let host = HostBasis {
                dec_k: rounded(&pair[0].dec),
                mean_k: pair[0].mean.clone(),
                dec_v: rounded(&pair[1].dec),
                mean_v: pair[1].mean.clone(),
            };
            let decoders =
                (storage == KvStorage::Device).then(|| Decoders::new(&host, geometry, device));
            let host = if held_f16 {
                HostDecoders::F16 {
                    dec: [halves(&pair[0].dec), halves(&pair[1].dec)],
                    mean: [host.mean_k, host.mean_v],
                }
            } else {
                HostDecoders::F32(host)
            };
            // enc x2, dec x2 (each held once, host or device) and means x2 in f32
            let width = if held_f16 { 2 } else { 4 };
            fixed += width * 4 * d * d + 4 * 2 * d;
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
                key_codes: OnceLock::new(),
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
            dtype,
        })
    }

    /// How the bases were asked to be held (on device storage, f16 values
    /// are held in f32: see [`DynaKvBases::with_dtype`]).
    pub fn dtype(&self) -> BasisDtype {
        self.dtype
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
            None => Decoders::new(&b.host(), self.geometry, device),
        }
    }

    pub fn levels(&self) -> &RankLevels {
        &self.levels
    }

    pub fn placement(&self) -> RopePlacement {
        self.placement
    }
}
