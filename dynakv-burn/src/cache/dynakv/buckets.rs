//! DynaKV's storage: per layer and kind, one contiguous bucket of latents per
//! rank level, on the device or the host.

use burn::tensor::{Device, Int, Tensor, TensorData};
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::KvKind;
use dynakv_core::quant::PackedRows;

use super::DynaKvCache;
use crate::cache::mat;
use crate::cache::precision::round_trip;
use crate::error::CacheError;
use crate::host::latent_decode::BucketView;

/// Tokens of one rank level, in token order. Which tokens they are is not
/// stored here: the layer's one-byte level codes say it
/// ([`LayerStore::index`]).
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    pub(super) rank: usize,
    /// `[n, rank]`
    pub(super) lat: Latents,
}

/// Token ids and positions of a bucket's rows, derived (per attention call)
/// from the layer's level codes and position runs; not held.
#[derive(Debug, Clone, Default)]
pub(super) struct BucketIndex {
    pub(super) ids: Vec<usize>,
    pub(super) positions: Vec<usize>,
}

/// Positions of a layer's tokens by id, as runs of consecutive positions:
/// one run for a prefill and the decode steps after it.
#[derive(Debug, Clone, Default)]
pub(super) struct PositionRuns {
    /// `(first id, first position, length)`
    runs: Vec<(usize, usize, usize)>,
}

impl PositionRuns {
    /// Records the positions of ids `first_id..`.
    pub(super) fn push(&mut self, first_id: usize, positions: &[usize]) {
        for (i, &p) in positions.iter().enumerate() {
            match self.runs.last_mut() {
                Some((id0, p0, n)) if *id0 + *n == first_id + i && *p0 + *n == p => *n += 1,
                _ => self.runs.push((first_id + i, p, 1)),
            }
        }
    }

    /// Forgets ids `0..n` and numbers the rest from 0.
    pub(super) fn drop_first(&mut self, n: usize) {
        let mut runs = Vec::with_capacity(self.runs.len());
        for &(id0, p0, len) in &self.runs {
            if id0 + len <= n {
                continue;
            }
            let skip = n.saturating_sub(id0);
            runs.push((id0 + skip - n, p0 + skip, len - skip));
        }
        self.runs = runs;
    }

    /// The position of every id, in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.runs.iter().flat_map(|&(_, p0, n)| p0..p0 + n)
    }

    /// Bytes held: three words per run.
    pub(super) fn bytes(&self) -> usize {
        self.runs.len() * 3 * std::mem::size_of::<usize>()
    }
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
            Latents::Host(v) => mat(&v.to_f32(), v.len(), self.rank, device),
        }
    }

    /// Rows stored.
    pub(super) fn len(&self) -> usize {
        match &self.lat {
            Latents::Device(t) => t.dims()[0],
            Latents::Host(v) => v.len(),
        }
    }

    pub(super) fn view<'a>(&'a self, ix: &'a BucketIndex) -> Option<BucketView<'a>> {
        match &self.lat {
            Latents::Host(v) => Some(BucketView {
                rank: self.rank,
                lat: v,
                positions: &ix.positions,
                ids: &ix.ids,
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
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct LayerStore {
    /// `[kind] -> buckets in ascending rank`
    pub(super) buckets: [Vec<Bucket>; 2],
    /// `[kind] -> one byte per token id`: 0 when nothing is stored, else one
    /// more than the index of its rank among the levels (the only per-token
    /// metadata held).
    pub(super) codes: [Vec<u8>; 2],
    pub(super) positions: PositionRuns,
    pub(super) next_id: usize,
    /// Sum of ranks stored, per kind.
    pub(super) dims: [usize; 2],
}

/// The level code of a rank (0: nothing stored).
pub(super) fn level_code(levels: &RankLevels, rank: usize) -> u8 {
    match levels.as_slice().iter().position(|&l| l == rank) {
        Some(i) if rank > 0 => (i + 1) as u8,
        _ => 0,
    }
}

impl LayerStore {
    /// Ids and positions of every bucket's rows of one kind, in bucket order.
    pub(super) fn index(&self, kind: usize, levels: &RankLevels) -> Vec<BucketIndex> {
        let buckets = &self.buckets[kind];
        let mut slot_of_code = [usize::MAX; 256];
        for (j, b) in buckets.iter().enumerate() {
            slot_of_code[level_code(levels, b.rank) as usize] = j;
        }
        let mut out: Vec<BucketIndex> = buckets
            .iter()
            .map(|b| BucketIndex {
                ids: Vec::with_capacity(b.len()),
                positions: Vec::with_capacity(b.len()),
            })
            .collect();
        for ((id, &c), pos) in self.codes[kind]
            .iter()
            .enumerate()
            .zip(self.positions.iter())
        {
            if let Some(ix) = out.get_mut(slot_of_code[c as usize]).filter(|_| c != 0) {
                ix.ids.push(id);
                ix.positions.push(pos);
            }
        }
        out
    }

    /// Tokens stored of one kind.
    pub(super) fn stored(&self, kind: usize) -> usize {
        self.buckets[kind].iter().map(Bucket::len).sum()
    }
}

/// [`padded_latents`] as host rows, row-major `[slots, d]`, when every
/// bucket is on the host (`None` otherwise).
pub(super) fn padded_host_rows(
    buckets: &[Bucket],
    index: &[BucketIndex],
    slot_of: &[usize],
    slots: usize,
    d: usize,
) -> Option<Vec<f32>> {
    if buckets.iter().any(|b| matches!(b.lat, Latents::Device(_))) {
        return None;
    }
    let mut out = vec![0f32; slots * d];
    let mut buf = vec![0f32; d];
    for (b, ix) in buckets.iter().zip(index) {
        let Latents::Host(lat) = &b.lat else {
            return None;
        };
        for (i, &id) in ix.ids.iter().enumerate() {
            let j = slot_of[id];
            if j != usize::MAX {
                out[j * d..j * d + b.rank].copy_from_slice(lat.row(i, &mut buf));
            }
        }
    }
    Some(out)
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
    index: &[BucketIndex],
    slot_of: &[usize],
    slots: usize,
    d: usize,
    device: &Device,
) -> Tensor<2> {
    if let Some(out) = padded_host_rows(buckets, index, slot_of, slots, d) {
        // moved, not copied: this matrix is the size of the cache
        return Tensor::from_data(TensorData::new(out, [slots, d]), device);
    }
    let stored: usize = buckets.iter().map(Bucket::len).sum();
    // the zero row appended last stands for slots without an entry
    let mut rows = vec![stored as i64; slots];
    let mut parts = Vec::new();
    let mut first = 0;
    for (b, ix) in buckets.iter().zip(index) {
        let n = b.len();
        let lat = b.tensor(device);
        parts.push(if b.rank < d {
            Tensor::cat(vec![lat, Tensor::zeros([n, d - b.rank], device)], 1)
        } else {
            lat
        });
        for (i, &id) in ix.ids.iter().enumerate() {
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

/// New tokens' full-width latents, where the storage keeps them.
pub(super) enum NewLatents<'a> {
    /// Host storage: `[n, d]` row-major.
    Host(&'a [f32]),
    /// Device storage: `[n, d]`.
    Device(Box<Tensor<2>>),
}

impl DynaKvCache {
    /// Files new tokens into the rank buckets of one kind and records their
    /// level codes.
    ///
    /// # Shapes
    /// `lat`: `[n, d]`; `ranks`: `[n]`.
    pub(super) fn store(
        &mut self,
        layer: usize,
        kind: KvKind,
        lat: NewLatents<'_>,
        ranks: &[usize],
    ) -> Result<(), CacheError> {
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
            let part = match &lat {
                NewLatents::Host(h) => {
                    let mut packed = PackedRows::new(codec, level);
                    for &i in &rows {
                        packed.push(&h[i * d..i * d + level]);
                    }
                    Latents::Host(packed)
                }
                NewLatents::Device(lat) => {
                    let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
                    let idx = Tensor::<1, Int>::from_data(
                        TensorData::new(idx, [rows.len()]),
                        &lat.device(),
                    );
                    let part = lat.clone().select(0, idx).narrow(1, 0, level);
                    Latents::Device(Box::new(round_trip(part, &codec, false)?))
                }
            };
            store.dims[k] += level * rows.len();
            match store.buckets[k].iter_mut().find(|b| b.rank == level) {
                Some(b) => match (&mut b.lat, part) {
                    (Latents::Host(v), Latents::Host(p)) => v.append(&p),
                    (Latents::Device(t), Latents::Device(p)) => {
                        **t = Tensor::cat(vec![(**t).clone(), *p], 0)
                    }
                    _ => {
                        return Err(CacheError::Config(
                            "one cache mixes host and device latents".into(),
                        ))
                    }
                },
                None => {
                    store.buckets[k].push(Bucket {
                        rank: level,
                        lat: part,
                    });
                    store.buckets[k].sort_by_key(|b| b.rank);
                }
            }
        }
        let levels = &self.bases.levels;
        store.codes[k].extend(ranks.iter().map(|&r| level_code(levels, r)));
        Ok(())
    }
}
