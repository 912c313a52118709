//! The short-chunk device attention path: scores per key bucket, one
//! softmax, values summed in latent space and decoded once.

use burn::tensor::activation::softmax;
use burn::tensor::Tensor;
use dynakv_core::artifact::RopePlacement;

use super::buckets::padded_latents;
use super::DynaKvCache;
use crate::attention::window_mask;
use crate::error::CacheError;

impl DynaKvCache {
    /// Short chunks on the device: scores per key bucket (reconstruct + RoPE
    /// for `pre`, latent dot products for `post`), one softmax over every
    /// stored token, values summed in latent space and decoded once.
    ///
    /// # Shapes
    /// - `q_rot`: `[1, H, T, D]`
    /// - returns `[1, H, T, D]`
    pub(super) fn attend_by_bucket(
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
        let index = [0, 1].map(|k| store.index(k, &self.bases.levels));
        for (bk, ix) in store.buckets[0].iter().zip(&index[0]) {
            let n = bk.len();
            let s = match self.bases.placement {
                RopePlacement::Pre => {
                    let keys = bk
                        .tensor(&device)
                        .matmul(dec.dec_k.clone().narrow(0, 0, bk.rank))
                        + b.mean[0].clone().unsqueeze();
                    let keys = keys.reshape([1, n, hk, dh]).swap_dims(1, 2);
                    let keys = self.rope.apply(keys, &ix.positions)?;
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
            k_pos.extend_from_slice(&ix.positions);
            k_ids.extend_from_slice(&ix.ids);
        }
        let scores = Tensor::cat(scores, 3) / (dh as f64).sqrt();
        let s_len = k_pos.len();
        let scores = match window_mask(positions, &k_pos, groups, self.window, &device) {
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
        let values = padded_latents(
            &store.buckets[1],
            &index[1],
            &slot_of,
            s_len,
            g.d_kv(),
            &device,
        );
        let out = weights
            .matmul(values.unsqueeze::<4>())
            .matmul(dec.dec_v_heads.clone().unsqueeze::<4>())
            + dec.mean_v_heads.clone().unsqueeze::<4>();
        Ok(out.reshape([bsz, h, t, dh]))
    }
}
