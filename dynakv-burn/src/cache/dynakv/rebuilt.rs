//! The prefill attention path: every stored key and value rebuilt once, then
//! the dense cache's blocked host kernel (host storage on a CPU it serves)
//! or burn's fused attention.

use burn::tensor::{Tensor, TensorData};
use dynakv_core::artifact::RopePlacement;
use dynakv_core::quant::{KvDtype, PackedRows, RowCodec};

use super::buckets::padded_latents;
use super::DynaKvCache;
use crate::attention::windowed_attention;
use crate::cache::{host_rows, KvStorage};
use crate::error::CacheError;
use crate::host::dense_decode::HeadView;
use crate::host::dense_prefill;
use crate::host::math::Heads;
use crate::host::plain_rows::KernelCopy;

impl DynaKvCache {
    /// Prefill path: every stored key and value rebuilt once in token order
    /// (`padded latents · decoder + mean`, RoPE for `pre`), then the dense
    /// cache's attention ([`Self::attend_on_host`], else burn's fused
    /// attention), so a prefill chunk costs what the dense cache's does plus
    /// two `[S, d] x [d, d]` products.
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`
    /// - returns `[1, H, T, D]`
    pub(super) fn attend_rebuilt(
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
        let index = [0, 1].map(|k| store.index(k, &self.bases.levels));
        let mut slots: Vec<(usize, usize)> = index[0]
            .iter()
            .flat_map(|ix| ix.ids.iter().copied().zip(ix.positions.iter().copied()))
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
            (padded_latents(
                &store.buckets[kind],
                &index[kind],
                &slot_of,
                s_len,
                d,
                &device,
            )
            .matmul(dec)
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
        if let Some(out) = self.attend_on_host(&q_rot, &keys, &values, positions, &k_pos)? {
            return Ok(out);
        }
        Ok(windowed_attention(
            q_rot,
            keys,
            values,
            positions,
            &k_pos,
            self.window,
        ))
    }

    /// The rebuilt keys and values through the dense cache's blocked prefill
    /// kernel ([`dense_prefill`]: one task per query block, invisible key
    /// chunks skipped), or `None` where it does not serve (device storage,
    /// a batch, a CPU or head width without the plain-row kernels). burn's
    /// attention stacks a group's query heads into one task per KV head
    /// and scores every masked key.
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`; `keys`, `values`: `[1, H_kv, S, D]`
    /// - returns `[1, H, T, D]`
    fn attend_on_host(
        &self,
        q_rot: &Tensor<4>,
        keys: &Tensor<4>,
        values: &Tensor<4>,
        positions: &[usize],
        k_pos: &[usize],
    ) -> Result<Option<Tensor<4>>, CacheError> {
        let [bsz, h, t, dh] = q_rot.dims();
        let hk = self.geometry.n_kv_heads;
        if self.bases.storage != KvStorage::Host
            || bsz != 1
            || KernelCopy::best(dh) == KernelCopy::Generic
        {
            return Ok(None);
        }
        let (q, k, v) = (host_rows(q_rot)?, host_rows(keys)?, host_rows(values)?);
        let s = k_pos.len();
        let head_rows = |x: &[f32], i: usize| {
            let mut r = PackedRows::new(RowCodec::Plain(KvDtype::F32), dh);
            r.push(&x[i * s * dh..(i + 1) * s * dh]);
            r
        };
        let ks: Vec<PackedRows> = (0..hk).map(|i| head_rows(&k, i)).collect();
        let vs: Vec<PackedRows> = (0..hk).map(|i| head_rows(&v, i)).collect();
        let views: Vec<HeadView> = ks
            .iter()
            .zip(&vs)
            .map(|(k, v)| HeadView {
                k,
                v,
                positions: k_pos,
            })
            .collect();
        let heads = Heads {
            n_heads: h,
            n_kv_heads: hk,
            head_dim: dh,
        };
        Ok(
            dense_prefill::attend(heads, &q, positions, &views, self.window)
                .map(|out| Tensor::from_data(TensorData::new(out, [1, h, t, dh]), &q_rot.device())),
        )
    }
}
