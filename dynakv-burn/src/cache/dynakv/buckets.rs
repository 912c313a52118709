//! DynaKV's storage: per layer and kind, one contiguous bucket of latents per
//! rank level, on the device or the host.

use burn::tensor::{Device, Int, Tensor, TensorData};
use dynakv_core::policy::KvKind;
use dynakv_core::quant::PackedRows;

use super::DynaKvCache;
use crate::cache::mat;
use crate::cache::precision::round_trip;
use crate::error::CacheError;
use crate::host::latent_decode::BucketView;

/// Tokens of one rank level.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    pub(super) rank: usize,
    /// `[n, rank]`
    pub(super) lat: Latents,
    pub(super) positions: Vec<usize>,
    pub(super) ids: Vec<usize>,
}

/// A bucket's latents, `[n, rank]`, where [`KvStorage`](crate::KvStorage) says.
#[derive(Debug, Clone)]
pub(super) enum Latents {
    /// Boxed: a tensor handle is much larger than a `Vec`. Values of a
    /// packed latent format are held decoded (f32).
    Device(Box<Tensor<2>>),
    /// Rows in the cache's latent format.
    Host(PackedRows),
}

impl Bucket {
    /// The latents as a tensor (an upload for host storage).
    ///
    /// # Shapes
    /// returns `[n, rank]`
    pub(super) fn tensor(&self, device: &Device) -> Tensor<2> {
        match &self.lat {
            Latents::Device(t) => (**t).clone(),
            Latents::Host(v) => mat(&v.to_f32(), self.positions.len(), self.rank, device),
        }
    }

    pub(super) fn view(&self) -> Option<BucketView<'_>> {
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
    pub(super) fn keep_rows(&mut self, rows: &[usize]) {
        self.lat = match &self.lat {
            Latents::Device(t) => {
                let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                let idx =
                    Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &t.device());
                Latents::Device(Box::new((**t).clone().select(0, idx)))
            }
            Latents::Host(v) => Latents::Host(v.gather(rows)),
        };
        self.positions = rows.iter().map(|&i| self.positions[i]).collect();
        self.ids = rows.iter().map(|&i| self.ids[i]).collect();
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct LayerStore {
    /// `[kind] -> buckets in ascending rank`
    pub(super) buckets: [Vec<Bucket>; 2],
    pub(super) next_id: usize,
    /// Sum of ranks stored, per kind.
    pub(super) dims: [usize; 2],
}

/// One kind's stored latents zero-padded to `d` columns, one row per key
/// slot: `slot_of[id]` is the slot of token `id` (`usize::MAX`: none). A slot
/// whose token stores nothing of this kind (a key without a value) gets a zero
/// row, which decodes to the mean. Exact: every rank is a prefix of the basis.
///
/// # Shapes
/// returns `[slots, d]`
pub(super) fn padded_latents(
    buckets: &[Bucket],
    slot_of: &[usize],
    slots: usize,
    d: usize,
    device: &Device,
) -> Tensor<2> {
    let host: Vec<(&Bucket, &PackedRows)> = buckets
        .iter()
        .filter_map(|b| match &b.lat {
            Latents::Host(lat) => Some((b, lat)),
            Latents::Device(_) => None,
        })
        .collect();
    if host.len() == buckets.len() {
        let mut out = vec![0f32; slots * d];
        let mut buf = vec![0f32; d];
        for (b, lat) in host {
            for (i, &id) in b.ids.iter().enumerate() {
                let j = slot_of[id];
                if j != usize::MAX {
                    out[j * d..j * d + b.rank].copy_from_slice(lat.row(i, &mut buf));
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
    /// Files new tokens into the rank buckets of one kind.
    ///
    /// # Shapes
    /// `lat`: `[n, d]` (device latents) with `host` its row-major copy for
    /// host storage; `ranks`, `positions`: `[n]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn store(
        &mut self,
        layer: usize,
        kind: KvKind,
        lat: Tensor<2>,
        host: Option<&[f32]>,
        ranks: &[usize],
        positions: &[usize],
        first_id: usize,
    ) -> Result<(), CacheError> {
        let device = lat.device();
        let d = self.bases.d_kv;
        let k = kind.index();
        let codec = &self.codecs[layer][k];
        let store = &mut self.layers[layer];
        for &level in self.bases.levels.as_slice().iter().filter(|&&l| l > 0) {
            let rows: Vec<usize> = (0..ranks.len()).filter(|&i| ranks[i] == level).collect();
            if rows.is_empty() {
                continue;
            }
            let codec = codec.prefix(level);
            let part = match host {
                Some(h) => {
                    let mut packed = PackedRows::new(codec, level);
                    for &i in &rows {
                        packed.push(&h[i * d..i * d + level]);
                    }
                    Latents::Host(packed)
                }
                None => {
                    let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                    let idx =
                        Tensor::<1, Int>::from_data(TensorData::new(idx, [rows.len()]), &device);
                    let part = lat.clone().select(0, idx).narrow(1, 0, level);
                    Latents::Device(Box::new(round_trip(part, &codec, false)?))
                }
            };
            let pos: Vec<usize> = rows.iter().map(|&i| positions[i]).collect();
            let ids: Vec<usize> = rows.iter().map(|&i| first_id + i).collect();
            store.dims[k] += level * rows.len();
            match store.buckets[k].iter_mut().find(|b| b.rank == level) {
                Some(b) => {
                    match (&mut b.lat, part) {
                        (Latents::Host(v), Latents::Host(p)) => v.append(&p),
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
        Ok(())
    }
}
