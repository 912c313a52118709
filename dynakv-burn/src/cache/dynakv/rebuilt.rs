//! The prefill attention path: every stored key and value rebuilt once, then
//! burn's fused attention.

use burn::tensor::Tensor;
use dynakv_core::artifact::RopePlacement;

use super::buckets::padded_latents;
use super::DynaKvCache;
use crate::attention::windowed_attention;
use crate::error::CacheError;

impl DynaKvCache {
    /// Prefill path: every stored key and value rebuilt once in token order
    /// (`padded latents · decoder + mean`, RoPE for `pre`), then burn's fused
    /// attention, so a prefill chunk costs what the dense cache's does plus
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
        Ok(windowed_attention(
            q_rot,
            keys,
            values,
            positions,
            &k_pos,
            self.window,
        ))
    }
}
