//! The uncompressed cache: what every compressed cache is measured against.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use dynakv_core::budget::CacheFootprint;
use dynakv_core::quant::{hadamard_rows, PackedRows, RowCodec};

use super::precision::round_trip;
use super::{
    host_rows, AttentionCache, CacheGeometry, KeepPositions, KvStorage, Precision, PrunableCache,
    HOST_KERNEL_MAX_QUERIES,
};
use crate::attention::{gqa_attention, window_mask, windowed_attention};
use crate::error::CacheError;
use crate::host::dense_decode::{self, HeadView};
use crate::host::dense_prefill;
use crate::host::math::Heads;
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
    fn mask(
        &self,
        q_pos: &[usize],
        groups: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Option<Tensor<4, Bool>> {
        match self {
            Self::Shared(p) => window_mask(q_pos, p, groups, window, device),
            Self::PerHead(heads) => {
                let masks: Vec<Option<Tensor<4, Bool>>> = heads
                    .iter()
                    .map(|p| window_mask(q_pos, p, groups, window, device))
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

/// A layer's keys (RoPE applied) and values, where the cache keeps them.
#[derive(Debug, Clone)]
enum Kv {
    /// `[B, H_kv, S, D]` each (boxed: two tensor handles outweigh two `Vec`s).
    Device {
        k: Box<Tensor<4>>,
        v: Box<Tensor<4>>,
    },
    /// Per KV head, `[S_h, D]` rows in the cache's dtypes; every head holds
    /// as many tokens.
    Host {
        k: Vec<PackedRows>,
        v: Vec<PackedRows>,
    },
}

impl Kv {
    /// Stored numbers of keys and of values.
    fn elements(&self) -> [usize; 2] {
        match self {
            Self::Device { k, v } => [k.shape().num_elements(), v.shape().num_elements()],
            Self::Host { k, v } => {
                let n = |x: &Vec<PackedRows>| x.iter().map(|r| r.len() * r.dim()).sum();
                [n(k), n(v)]
            }
        }
    }

    /// The keys and values as tensors (an upload for host storage, rows
    /// rotated back where `rotated` says they were stored rotated).
    ///
    /// # Shapes
    /// returns `[1, H_kv, S, D]` twice (`[B, ..]` for device storage).
    fn tensors(
        &self,
        head_dim: usize,
        rotated: [bool; 2],
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        match self {
            Self::Device { k, v } => ((**k).clone(), (**v).clone()),
            Self::Host { k, v } => {
                let up = |heads: &Vec<PackedRows>, rotated: bool| {
                    let s = heads.first().map_or(0, PackedRows::len);
                    let mut data: Vec<f32> = heads.iter().flat_map(PackedRows::to_f32).collect();
                    if rotated {
                        hadamard_rows(&mut data, head_dim);
                    }
                    Tensor::from_data(TensorData::new(data, [1, heads.len(), s, head_dim]), device)
                };
                (up(k, rotated[0]), up(v, rotated[1]))
            }
        }
    }
}

/// New keys and values as a store takes them.
enum NewKv {
    /// `[H_kv * T * D]` rows each, rotated where the precision says.
    Host(Vec<f32>, Vec<f32>),
    /// `[B, H_kv, T, D]` each, the values the format keeps (boxed: tensor
    /// handles outweigh two `Vec`s).
    Device(Box<(Tensor<4>, Tensor<4>)>),
}

/// One layer's stored tokens.
#[derive(Debug, Clone, Default)]
struct LayerStore {
    kv: Option<Kv>,
    positions: StoredPositions,
    /// Tokens ever appended (the dense cache on the same tokens stores them all).
    seen: usize,
    /// A windowed layer's span `(first, end)` of positions: every position
    /// appended since the window last moved (the windowed dense reference
    /// holds one token per position; a pruning stores fewer).
    span: Option<(usize, usize)>,
}

/// Bytes of one stored position (u32) per kept key of a pruned cache.
const POSITION_BYTES: usize = 4;

/// Keys (RoPE applied on append) and values for every token, in f32 or in
/// the dtypes of a [`Precision`] (`f16`, `bf16`, llama.cpp's `q8_0` / `q4_0`
/// blocks; the host kernel decodes one row at a time, never the whole cache).
///
/// With [`KvStorage::Host`] (the CPU default) keys and values live in host
/// vectors that grow in place, and decode steps run a fused host kernel
/// (`dense_decode`); a tensor cache must copy all `S` tokens on every append,
/// since burn's attention wants contiguous keys. Prefill chunks use burn's
/// attention either way.
#[derive(Debug, Clone)]
pub struct DenseCache {
    geometry: CacheGeometry,
    rope: Rope,
    storage: KvStorage,
    /// Row codecs of keys and values.
    codecs: [RowCodec; 2],
    /// Keys, values stored Hadamard-rotated ([`Precision::rotates`]).
    rotate: [bool; 2],
    layers: Vec<LayerStore>,
    /// A sliding window: a query at `p` sees keys at `p - window < k <= p`,
    /// and keys no later query can see are dropped ([`DenseCache::with_window`]).
    window: Option<usize>,
}

impl DenseCache {
    /// Host rows of new keys (`kind` 0) or values (1) as they are stored:
    /// rotated when the precision says so.
    ///
    /// # Shapes
    /// - `x`: `[1, H_kv, T, D]`; returns `[H_kv * T * D]`
    fn host_rows_stored(&self, x: &Tensor<4>, kind: usize) -> Result<Vec<f32>, CacheError> {
        let mut rows = host_rows(x)?;
        if self.rotate[kind] {
            hadamard_rows(&mut rows, self.geometry.head_dim);
        }
        Ok(rows)
    }

    /// New keys or values as device storage holds them: the values the
    /// format keeps, decoded (and rotated back).
    fn device_stored(&self, x: Tensor<4>, kind: usize) -> Result<Tensor<4>, CacheError> {
        round_trip(x, &self.codecs[kind], self.rotate[kind])
    }

    /// Storage as [`KvStorage::for_device`] picks for the RoPE tables' device.
    pub fn new(geometry: CacheGeometry, rope: Rope) -> Result<Self, CacheError> {
        let storage = KvStorage::for_device(&rope.device());
        Self::with_storage(geometry, rope, storage)
    }

    /// Keys and values in f32, the exact reference equivalence tests compare
    /// with; a [`crate::CacheSpec`] stores f16 unless it says otherwise
    /// ([`Precision::default`]).
    pub fn with_storage(
        geometry: CacheGeometry,
        rope: Rope,
        storage: KvStorage,
    ) -> Result<Self, CacheError> {
        Self::with_precision(geometry, rope, storage, Precision::f32_rows())
    }

    /// Keys and values stored in `precision.k` / `precision.v` (its latent
    /// fields are DynaKV's and must be left at their defaults).
    pub fn with_precision(
        geometry: CacheGeometry,
        rope: Rope,
        storage: KvStorage,
        precision: Precision,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        geometry.check_rope(&rope)?;
        precision.check_for(false)?;
        if storage == KvStorage::Device
            && (precision.k.is_token_blocked() || precision.v.is_token_blocked())
        {
            return Err(CacheError::Config(format!(
                "`{precision}`: kivi2 quantises blocks of 32 tokens, which only host \
                 storage (the CPU backend) holds"
            )));
        }
        Ok(Self {
            geometry,
            rope,
            storage,
            codecs: [
                RowCodec::kv(precision.k, true),
                RowCodec::kv(precision.v, false),
            ],
            rotate: precision.rotates(),
            layers: vec![LayerStore::default(); geometry.n_layers],
            window: None,
        })
    }

    /// The same cache over a sliding window of `window` positions (the
    /// local layers of Gemma 3, Mistral's SWA): a query at `p` sees keys at
    /// `p - window < k <= p`. Memory stays O(window): once a layer holds
    /// half a window more than it needs, the keys no later query can see
    /// are dropped (llama.cpp's SWA cache likewise holds the window plus a
    /// batch). Its footprint counts what it holds as its own dense
    /// reference: a windowed layer is never compressed, and the dense cache
    /// a user compares with is windowed too.
    pub fn with_window(mut self, window: usize) -> Result<Self, CacheError> {
        self.window = Some(crate::cache::check_window(window)?);
        Ok(self)
    }

    /// The sliding window, if any.
    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// After queries at `positions` attended: drops a windowed layer's
    /// keys that no later query can see, once its span of positions is half
    /// a window more than needed (amortised: a copy of the kept window every
    /// `window / 2` steps). The span, not the tokens stored, sets the
    /// schedule, so a layer pruned by SnapKV moves its window as the
    /// unpruned one does.
    fn evict(&mut self, layer: usize, positions: &[usize]) -> Result<(), CacheError> {
        let Some(w) = self.window else {
            return Ok(());
        };
        let (Some(&last), Some((first, end))) = (positions.iter().max(), self.layers[layer].span)
        else {
            return Ok(());
        };
        if end - first <= w + w.div_ceil(2) {
            return Ok(());
        }
        // a later query at q > last sees keys k > q - w >= last + 1 - w
        let cut = (last + 1).saturating_sub(w);
        if cut <= first {
            return Ok(());
        }
        self.layers[layer].span = Some((cut, end));
        let StoredPositions::Shared(stored) = &self.layers[layer].positions else {
            return Err(CacheError::Config(format!(
                "layer {layer} has a sliding window and a token set per KV head: \
                 a windowed layer takes one token set per layer"
            )));
        };
        let keep: Vec<usize> = stored.iter().copied().filter(|&p| p >= cut).collect();
        if keep.len() == stored.len() || keep.is_empty() {
            return Ok(());
        }
        self.retain(layer, &KeepPositions::Layer(keep))
    }

    pub fn geometry(&self) -> CacheGeometry {
        self.geometry
    }

    pub fn storage(&self) -> KvStorage {
        self.storage
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
        let (k, v) =
            l.kv.as_ref()?
                .tensors(self.geometry.head_dim, self.rotate, &self.rope.device());
        Some((k, v, positions))
    }
}

/// Row indices (into `stored`) of the kept positions, in stored order.
fn kept_rows(stored: &[usize], keep: &[usize]) -> Result<Vec<usize>, CacheError> {
    let keep: std::collections::HashSet<usize> = keep.iter().copied().collect();
    let rows: Vec<usize> = (0..stored.len())
        .filter(|&i| keep.contains(&stored[i]))
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
fn select_seq(x: Tensor<4>, rows: &[usize]) -> Tensor<4> {
    let n = rows.len();
    let rows: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &x.device());
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
        let Some(kv) = &store.kv else {
            return Err(CacheError::Config(format!("retain on empty layer {layer}")));
        };
        let heads: Vec<Vec<usize>> = match &store.positions {
            StoredPositions::Shared(p) => vec![p.clone(); hk],
            StoredPositions::PerHead(p) => p.clone(),
        };
        // Rows kept per head, and the positions they leave; the store changes
        // only once all succeeded.
        let (rows, positions): (Vec<Vec<usize>>, StoredPositions) = match keep {
            KeepPositions::Layer(keep) => {
                if let StoredPositions::PerHead(_) = store.positions {
                    return Err(CacheError::Config(
                        "one token set per layer after a per-head pruning".into(),
                    ));
                }
                let rows = kept_rows(&heads[0], keep)?;
                let pos = rows.iter().map(|&i| heads[0][i]).collect();
                (vec![rows; hk], StoredPositions::Shared(pos))
            }
            KeepPositions::PerKvHead(keep) => {
                if keep.len() != hk || keep.iter().any(|r| r.len() != keep[0].len()) {
                    return Err(CacheError::Config(format!(
                        "per-head selection needs {hk} rows of equal length"
                    )));
                }
                let rows = (0..hk)
                    .map(|h| kept_rows(&heads[h], &keep[h]))
                    .collect::<Result<Vec<_>, _>>()?;
                let pos = (0..hk)
                    .map(|h| rows[h].iter().map(|&i| heads[h][i]).collect())
                    .collect();
                (rows, StoredPositions::PerHead(pos))
            }
        };
        let kv = match kv {
            Kv::Device { k, v } => {
                let per_head = |x: &Tensor<4>| {
                    Tensor::cat(
                        (0..hk)
                            .map(|h| select_seq(x.clone().narrow(1, h, 1), &rows[h]))
                            .collect(),
                        1,
                    )
                };
                Kv::Device {
                    k: Box::new(per_head(k)),
                    v: Box::new(per_head(v)),
                }
            }
            Kv::Host { k, v } => Kv::Host {
                k: (0..hk).map(|h| k[h].gather(&rows[h])).collect(),
                v: (0..hk).map(|h| v[h].gather(&rows[h])).collect(),
            },
        };
        store.kv = Some(kv);
        store.positions = positions;
        Ok(())
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
        let (hk, dh, t) = (
            self.geometry.n_kv_heads,
            self.geometry.head_dim,
            positions.len(),
        );
        // Host rows or device tensors as stored, computed before the store
        // changes (an error leaves it as it was).
        let host = match &self.layers[layer].kv {
            Some(kv) => matches!(kv, Kv::Host { .. }),
            None => self.storage == KvStorage::Host,
        };
        let new = if host {
            if k.dims()[0] != 1 {
                return Err(CacheError::Config(
                    "DenseCache with host storage supports batch size 1".into(),
                ));
            }
            NewKv::Host(self.host_rows_stored(&k, 0)?, self.host_rows_stored(&v, 1)?)
        } else {
            NewKv::Device(Box::new((
                self.device_stored(k, 0)?,
                self.device_stored(v, 1)?,
            )))
        };
        let codecs = &self.codecs;
        let store = &mut self.layers[layer];
        store.kv = Some(match new {
            NewKv::Host(k_rows, v_rows) => {
                let (mut ks, mut vs) = match store.kv.take() {
                    Some(Kv::Host { k, v }) => (k, v),
                    _ => {
                        let empty = |c: &RowCodec| vec![PackedRows::new(c.clone(), dh); hk];
                        (empty(&codecs[0]), empty(&codecs[1]))
                    }
                };
                for h in 0..hk {
                    ks[h].push(&k_rows[h * t * dh..(h + 1) * t * dh]);
                    vs[h].push(&v_rows[h * t * dh..(h + 1) * t * dh]);
                }
                Kv::Host { k: ks, v: vs }
            }
            NewKv::Device(kv) => match (store.kv.take(), *kv) {
                (Some(Kv::Device { k: old_k, v: old_v }), (k, v)) => Kv::Device {
                    k: Box::new(Tensor::cat(vec![*old_k, k], 2)),
                    v: Box::new(Tensor::cat(vec![*old_v, v], 2)),
                },
                (_, (k, v)) => Kv::Device {
                    k: Box::new(k),
                    v: Box::new(v),
                },
            },
        });
        store.positions.extend(positions);
        store.seen += positions.len();
        if let (Some(_), Some(&lo), Some(&hi)) =
            (self.window, positions.iter().min(), positions.iter().max())
        {
            store.span = Some(match store.span {
                Some((first, end)) => (first.min(lo), end.max(hi + 1)),
                None => (lo, hi + 1),
            });
        }
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
        let store = &self.layers[layer];
        let Some(kv) = &store.kv else {
            return Err(CacheError::Config(format!(
                "attend on layer {layer} before anything was appended"
            )));
        };
        let [bsz, h, t, dh] = q_rot.dims();
        if let Kv::Host { k, v } = kv {
            // a decode step on the fused decode kernel; a longer chunk (a
            // prefill) on the blocked one where the rows are plain, else
            // on the tensor path below
            let decode = t <= HOST_KERNEL_MAX_QUERIES;
            if decode && bsz != 1 {
                return Err(CacheError::Config(
                    "DenseCache with host storage supports batch size 1".into(),
                ));
            }
            if bsz == 1 {
                let heads: Vec<&[usize]> = match &store.positions {
                    StoredPositions::Shared(p) => vec![p.as_slice(); g.n_kv_heads],
                    StoredPositions::PerHead(p) => p.iter().map(Vec::as_slice).collect(),
                };
                let views: Vec<HeadView> = (0..g.n_kv_heads)
                    .map(|i| HeadView {
                        k: &k[i],
                        v: &v[i],
                        positions: heads[i],
                    })
                    .collect();
                let device = q_rot.device();
                let mut q = host_rows(&q_rot)?;
                if self.rotate[0] {
                    hadamard_rows(&mut q, dh);
                }
                let heads = Heads {
                    n_heads: h,
                    n_kv_heads: g.n_kv_heads,
                    head_dim: dh,
                };
                let out = if decode {
                    Some(dense_decode::attend(
                        heads,
                        &q,
                        positions,
                        &views,
                        self.window,
                    ))
                } else {
                    dense_prefill::attend(heads, &q, positions, &views, self.window)
                };
                if let Some(mut out) = out {
                    if self.rotate[1] {
                        hadamard_rows(&mut out, dh);
                    }
                    let out = Tensor::from_data(TensorData::new(out, [1, h, t, dh]), &device);
                    self.evict(layer, positions)?;
                    return Ok(out);
                }
            }
        }
        let (k, v) = kv.tensors(dh, self.rotate, &q_rot.device());
        let out = match &store.positions {
            StoredPositions::Shared(k_pos) => {
                windowed_attention(q_rot, k, v, positions, k_pos, self.window)
            }
            per_head => {
                let mask = per_head.mask(positions, g.groups(), self.window, &q_rot.device());
                gqa_attention(q_rot, k, v, mask)
            }
        };
        self.evict(layer, positions)?;
        Ok(out)
    }

    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.positions.len())
    }

    fn reset(&mut self) {
        self.layers = vec![LayerStore::default(); self.geometry.n_layers];
    }

    fn footprint(&self) -> CacheFootprint {
        let dh = self.geometry.head_dim;
        let (mut values, mut value_bytes) = (0usize, 0usize);
        for kv in self.layers.iter().filter_map(|l| l.kv.as_ref()) {
            let [k, v] = kv.elements();
            values += k + v;
            value_bytes += match kv {
                Kv::Host { k, v } => k.iter().chain(v).map(PackedRows::bytes).sum(),
                Kv::Device { .. } => {
                    (k / dh) * self.codecs[0].row_bytes(dh)
                        + (v / dh) * self.codecs[1].row_bytes(dh)
                }
            };
        }
        // a windowed cache's reference is the windowed dense cache: one
        // token per position of the span (see `with_window`)
        let reference = |l: &LayerStore| match (self.window, l.span) {
            (None, _) => l.seen,
            (Some(_), Some((first, end))) => end - first,
            (Some(_), None) => 0,
        };
        let values_full =
            2 * self.geometry.d_kv() * self.layers.iter().map(reference).sum::<usize>();
        // a window's positions are a run unless a pruning thinned them
        let pruned = self.layers.iter().any(|l| {
            matches!(l.positions, StoredPositions::PerHead(_)) || l.positions.len() < reference(l)
        });
        let held_value_bytes = match self.storage {
            KvStorage::Host => value_bytes,
            KvStorage::Device => values * dynakv_core::budget::BYTES_PER_VALUE,
        };
        CacheFootprint {
            values: values as u64,
            values_full: values_full as u64,
            // every kept row is whole
            values_kept_full: values as u64,
            value_bytes: value_bytes as u64,
            held_value_bytes: held_value_bytes as u64,
            // A pruned cache must remember which positions it kept.
            metadata_bytes: if pruned {
                (values / (2 * dh) * POSITION_BYTES) as u64
            } else {
                0
            },
            fixed_bytes: 0,
            tokens: self.layers.iter().map(|l| l.seen).max().unwrap_or(0) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_support::{rand4, rope, run, G};

    fn caches() -> (DenseCache, DenseCache) {
        let rope = rope();
        (
            DenseCache::with_storage(G, rope.clone(), KvStorage::Device).unwrap(),
            DenseCache::with_storage(G, rope, KvStorage::Host).unwrap(),
        )
    }

    fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn host_storage_equals_device_storage_through_decode_and_pruning() {
        let (q, k, v) = (
            rand4([1, 4, 16, 4]),
            rand4([1, 2, 16, 4]),
            rand4([1, 2, 16, 4]),
        );
        // a prefill chunk (tensor path), decode steps of 1 and 3 queries
        // (host kernel, with a causal mask inside the chunk), one more chunk
        let chunks = [8, 1, 3, 4];
        let (mut dev, mut host) = caches();
        let want = run(&mut dev, &q, &k, &v, &chunks);
        let got = run(&mut host, &q, &k, &v, &chunks);
        assert!(max_diff(got, want) < 1e-5);
        assert_eq!(dev.footprint(), host.footprint());
        // per-head pruning (kvpress), then a decode step over it
        let keep = KeepPositions::PerKvHead(vec![vec![0, 3, 5, 15], vec![1, 2, 9, 15]]);
        for c in [&mut dev, &mut host] {
            c.retain(0, &keep).unwrap();
        }
        let q_last = q.clone().narrow(2, 15, 1);
        let a = dev.attend(0, q_last.clone(), &[15]).unwrap();
        let b = host.attend(0, q_last, &[15]).unwrap();
        assert!(max_diff(a, b) < 1e-5);
        assert_eq!(dev.footprint(), host.footprint());
        let (kd, vd, pd) = dev.layer_kv(0).unwrap();
        let (kh, vh, ph) = host.layer_kv(0).unwrap();
        assert_eq!(pd, ph);
        assert!(max_diff(kd, kh) < 1e-6 && max_diff(vd, vh) < 1e-6);
        // one token set per layer after a per-head pruning is an error on both
        let layer = KeepPositions::Layer(vec![15]);
        assert!(dev.retain(0, &layer).is_err() && host.retain(0, &layer).is_err());
    }

    #[test]
    fn a_windowed_cache_equals_windowed_attention_over_every_key_and_stays_bounded() {
        let n = 40;
        let (q, k, v) = (
            rand4([1, 4, n, 4]),
            rand4([1, 2, n, 4]),
            rand4([1, 2, n, 4]),
        );
        let pos: Vec<usize> = (0..n).collect();
        let rope = rope();
        let window = 6;
        // the reference: every key kept, the window only in the mask
        let want = crate::attention::windowed_attention(
            q.clone(),
            rope.apply(k.clone(), &pos).unwrap(),
            v.clone(),
            &pos,
            &pos,
            Some(window),
        );
        // a prefill longer than the window, decode steps (host kernel),
        // short chunks of 2-3 queries (host kernel with masks), a long chunk
        let chunks = [9, 1, 1, 1, 3, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 13];
        assert_eq!(chunks.iter().sum::<usize>(), n);
        for storage in [KvStorage::Host, KvStorage::Device] {
            let mut c = DenseCache::with_storage(G, rope.clone(), storage)
                .unwrap()
                .with_window(window)
                .unwrap();
            let got = run(&mut c, &q, &k, &v, &chunks);
            assert!(max_diff(got, want.clone()) < 1e-5, "{storage:?}");
            // never more than the window and a half, plus the last chunk
            assert!(c.len(0) <= window + window.div_ceil(2) + 13, "{}", c.len(0));
            let f = c.footprint();
            assert_eq!(f.values, f.values_full);
            assert_eq!(f.values as usize, c.len(0) * 2 * G.d_kv());
        }
        // decode alone keeps it within a window and a half
        let mut c = DenseCache::with_storage(G, rope, KvStorage::Host)
            .unwrap()
            .with_window(window)
            .unwrap();
        run(&mut c, &q, &k, &v, &[1; 40]);
        assert!(c.len(0) <= window + window.div_ceil(2), "{}", c.len(0));
        assert!(DenseCache::new(G, crate::cache::test_support::rope())
            .unwrap()
            .with_window(0)
            .is_err());
    }

    #[test]
    fn cpu_devices_get_host_storage() {
        #[cfg(not(any(feature = "wgpu", feature = "cuda")))]
        {
            let rope = rope();
            assert_eq!(DenseCache::new(G, rope).unwrap().storage(), KvStorage::Host);
        }
    }
}
