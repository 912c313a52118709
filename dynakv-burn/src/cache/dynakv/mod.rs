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
//!
//! Files: `bases` (the per-layer bases, shared by every cache of a model),
//! `buckets` (rank-bucket storage), `rebuilt` and `by_bucket` (the two tensor
//! attention paths; the host kernel is `crate::host::latent_decode`),
//! `prune` (SnapKV's `retain`), `held` (a prompt held whole until SnapKV
//! has pruned it, then ranked in tiers), `footprint` (accounting).

mod bases;
mod buckets;
mod by_bucket;
mod footprint;
mod held;
mod prune;
mod rebuilt;
#[cfg(test)]
mod tests;
mod window;

pub use bases::DynaKvBases;

use std::sync::Arc;

use burn::tensor::{Tensor, TensorData};
use dynakv_core::artifact::RopePlacement;
use dynakv_core::budget::CacheFootprint;
use dynakv_core::policy::{BudgetController, KvKind, RankPolicy};
use dynakv_core::quant::{LatentDtype, RowCodec};

use crate::cache::{
    host_rows, joint, AttentionCache, CacheGeometry, KvStorage, Precision, HOST_KERNEL_MAX_QUERIES,
};
use crate::error::CacheError;
use crate::host::latent_decode::{self, BucketView, Heads};
use crate::host::latent_encode::encode_rows;
use crate::rope::Rope;
use buckets::{LayerStore, NewLatents};
use held::PromptHold;

/// Chunks with at least this many queries (prefill) rebuild every stored key
/// and value once and run burn's fused attention, as the dense cache does:
/// rebuilding costs `S * d * d` per kind, less than scoring bucket by bucket
/// and summing values in latent space once `9 * T` passes `d`.
const REBUILD_MIN_QUERIES: usize = 32;

/// The DynaKV compressed cache.
#[derive(Debug, Clone)]
pub struct DynaKvCache {
    geometry: CacheGeometry,
    rope: Rope,
    bases: Arc<DynaKvBases>,
    policy: Arc<dyn RankPolicy>,
    layers: Vec<LayerStore>,
    /// Latent row codecs per layer, keys and values (full width; a rank
    /// bucket uses the prefix).
    codecs: Vec<[RowCodec; 2]>,
    precision: Precision,
    /// This sequence's budget promise (`None`: the policy's ranks as they
    /// come); see [`BudgetController`].
    controller: Option<BudgetController>,
    /// A sliding window ([`DynaKvCache::with_window`]).
    window: Option<usize>,
    /// Per layer, where its prompt stands when prompts are held whole for
    /// SnapKV's tiers (`held`); `None`: every append takes the policy's ranks.
    holds: Option<Vec<PromptHold>>,
}

impl DynaKvCache {
    /// Latents in f32, the exact building block equivalence tests compare
    /// with (the bases as they are held); a [`crate::CacheSpec`] stores int8
    /// latents unless it says otherwise ([`Precision::default`]).
    pub fn new(
        geometry: CacheGeometry,
        rope: Rope,
        bases: Arc<DynaKvBases>,
        policy: Arc<dyn RankPolicy>,
    ) -> Result<Self, CacheError> {
        let precision = Precision {
            latent: LatentDtype::F32,
            basis: bases.dtype(),
            ..Precision::default()
        };
        Self::with_precision(geometry, rope, bases, policy, precision)
    }

    /// Latents stored in `precision.latent` with `precision.scales` (its
    /// `k` / `v` fields are the dense cache's and must stay at their defaults).
    pub fn with_precision(
        geometry: CacheGeometry,
        rope: Rope,
        bases: Arc<DynaKvBases>,
        policy: Arc<dyn RankPolicy>,
        precision: Precision,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        geometry.check_rope(&rope)?;
        precision.check_for(true)?;
        if precision.basis != bases.dtype() {
            return Err(CacheError::Config(format!(
                "the precision asks for {} bases, the bases given are held as {}",
                precision.basis,
                bases.dtype()
            )));
        }
        if bases.layers.len() != geometry.n_layers || bases.d_kv != geometry.d_kv() {
            return Err(CacheError::Config("bases do not match the geometry".into()));
        }
        if bases.levels.as_slice().len() > 255 {
            return Err(CacheError::Config(format!(
                "{} rank levels: a token's level is one byte (at most 255)",
                bases.levels.as_slice().len()
            )));
        }
        let codecs = bases
            .layers
            .iter()
            .map(|l| {
                let c =
                    |k: usize| RowCodec::latent(precision.latent, precision.scales, &l.stddev[k]);
                Ok([c(0)?, c(1)?])
            })
            .collect::<Result<Vec<_>, CacheError>>()?;
        let controller = BudgetController::for_policy(&*policy, geometry.n_layers)?;
        Ok(Self {
            geometry,
            rope,
            bases,
            policy,
            layers: vec![LayerStore::default(); geometry.n_layers],
            codecs,
            precision,
            controller,
            window: None,
            holds: None,
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Stored `(token id, rank)` pairs of one layer and kind, in token order
    /// (for reports and tests); empty for a layer out of range.
    pub fn ranks(&self, layer: usize, kind: KvKind) -> Vec<(usize, usize)> {
        let Some(store) = self.layers.get(layer) else {
            return Vec::new();
        };
        let levels = self.bases.levels.as_slice();
        store.codes[kind.index()]
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != 0)
            .map(|(id, &c)| (id, levels[c as usize - 1]))
            .collect()
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
            RopePlacement::Pre => {
                // rotated at attend: the tables must cover these positions
                let end = positions.iter().max().map_or(0, |&p| p.saturating_add(1));
                self.rope.reserve(end)?;
                k_pre
            }
            RopePlacement::Post => self.rope.apply(k_pre, positions)?,
        };
        let b = &self.bases.layers[layer];
        let t = positions.len();
        let host = self.bases.storage == KvStorage::Host;
        // a decode step on host storage projects on the host (a product of
        // one row is all tensor overhead); a prefill through burn's GEMM
        let encoders = match (b.host_encoder(0), b.host_encoder(1)) {
            (Some(ek), Some(ev)) if host && t <= HOST_KERNEL_MAX_QUERIES => Some([ek, ev]),
            _ => None,
        };
        let (lat, host_k, host_v) = match encoders {
            Some([(ek, mk), (ev, mv)]) => {
                let (xk, xv) = (host_rows(&joint(k))?, host_rows(&joint(v))?);
                let host_k = encode_rows(&xk, t, mk, ek);
                (None, host_k, encode_rows(&xv, t, mv, ev))
            }
            None => {
                let device = k.device();
                let lat_k =
                    (joint(k) - b.mean[0].clone().unsqueeze()).matmul(b.encoder(0, &device));
                let lat_v =
                    (joint(v) - b.mean[1].clone().unsqueeze()).matmul(b.encoder(1, &device));
                // Host copies: what host storage keeps and what a
                // latent-reading policy reads.
                let (host_k, host_v) = if host || self.policy.needs_latents() {
                    (host_rows(&lat_k)?, host_rows(&lat_v)?)
                } else {
                    (Vec::new(), Vec::new())
                };
                (Some([lat_k, lat_v]), host_k, host_v)
            }
        };
        // a held prompt takes full rank: the policy is not asked
        let held = self.held_ranks(layer, t);
        let reads = held.is_none() && self.policy.needs_latents();
        let (read_k, read_v): (&[f32], &[f32]) = if reads {
            (&host_k, &host_v)
        } else {
            (&[], &[])
        };
        let (rk, mut rv) = match (&mut self.controller, held) {
            (_, Some(full)) => (full.clone(), full),
            (Some(c), None) => (
                c.ranks(&*self.policy, layer, KvKind::Key, read_k, positions),
                c.ranks(&*self.policy, layer, KvKind::Value, read_v, positions),
            ),
            (None, None) => (
                self.policy.ranks(layer, KvKind::Key, read_k, positions),
                self.policy.ranks(layer, KvKind::Value, read_v, positions),
            ),
        };
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
        let [lat_k, lat_v] = match lat {
            Some([lk, lv]) if !host => [
                NewLatents::Device(Box::new(lk)),
                NewLatents::Device(Box::new(lv)),
            ],
            _ => [NewLatents::Host(&host_k), NewLatents::Host(&host_v)],
        };
        self.store(layer, KvKind::Key, lat_k, &rk)?;
        self.store(layer, KvKind::Value, lat_v, &rv)?;
        let store = &mut self.layers[layer];
        store.positions.push(first, positions);
        store.next_id += positions.len();
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
        if self.bases.storage == KvStorage::Host && t <= HOST_KERNEL_MAX_QUERIES {
            // covers every stored position (append reserved them) and the
            // queries'
            let end = positions.iter().max().map_or(0, |&p| p.saturating_add(1));
            let rope = self.rope.host(end)?;
            let index = [0, 1].map(|k| store.index(k, &self.bases.levels));
            let views = |k: usize| -> Vec<BucketView<'_>> {
                store.buckets[k]
                    .iter()
                    .zip(&index[k])
                    .filter_map(|(b, ix)| b.view(ix))
                    .collect()
            };
            let q_host = host_rows(&q_rot.reshape([h * t, dh]))?;
            let out = latent_decode::attend(
                Heads {
                    n_heads: h,
                    n_kv_heads: hk,
                    head_dim: dh,
                },
                self.bases.placement,
                &b.host(),
                &rope,
                &q_host,
                positions,
                &views(0),
                &views(1),
                store.next_id,
                self.window,
                true,
                // made only for keys stored as codes (a copy of the decoder
                // other caches would hold for nothing)
                match self.bases.placement {
                    RopePlacement::Pre if self.codecs[layer][0].has_block_codes() => b.key_codes(),
                    _ => None,
                },
            );
            let out = Tensor::from_data(TensorData::new(out, [1, h, t, dh]), &device);
            self.evict(layer, positions)?;
            return Ok(out);
        }
        let out = if t >= REBUILD_MIN_QUERIES {
            self.attend_rebuilt(layer, q_rot, positions)?
        } else {
            self.attend_by_bucket(layer, q_rot, positions)?
        };
        self.evict(layer, positions)?;
        Ok(out)
    }

    /// Tokens with a stored key (rank-0 and pruned tokens are not stored).
    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.stored(0))
    }

    fn reset(&mut self) {
        self.layers = vec![LayerStore::default(); self.geometry.n_layers];
        if let Some(c) = &mut self.controller {
            c.reset();
        }
        self.rewind_holds();
    }

    fn footprint(&self) -> CacheFootprint {
        self.footprint_now()
    }
}
