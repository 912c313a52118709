//! Grouped-query attention without copying keys and values.
//!
//! burn's fused `module::attention` wants equal head counts. Instead of
//! repeating each KV head G = H / H_kv times, the G query heads that share a KV
//! head are folded into the query length: `[B, H, T, D] -> [B, H_kv, G*T, D]`.
//! Causality is by position (`key_pos <= query_pos`), so it works for any set of
//! stored positions, including pruned ones.

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

/// A `[G*T, S]` mask (true = hidden) for queries at `q_pos` over keys at
/// `k_pos`, repeated for the G query heads folded into the rows; `None` when
/// every key is visible to every query (the usual decode step).
///
/// # Shapes
/// returns `[1, 1, G*T, S]` expanded by the caller.
pub fn causal_mask(
    q_pos: &[usize],
    k_pos: &[usize],
    groups: usize,
    device: &Device,
) -> Option<Tensor<4, Bool>> {
    let q_min = q_pos.iter().copied().min()?;
    let k_max = k_pos.iter().copied().max()?;
    if k_max <= q_min {
        return None;
    }
    let (t, s) = (q_pos.len(), k_pos.len());
    let mut rows = Vec::with_capacity(t * s);
    for &qp in q_pos {
        rows.extend(k_pos.iter().map(|&kp| kp > qp));
    }
    let mut data = Vec::with_capacity(groups * t * s);
    for _ in 0..groups {
        data.extend_from_slice(&rows);
    }
    Some(Tensor::from_data(
        TensorData::new(data, [1, 1, groups * t, s]),
        device,
    ))
}

/// Softmax attention of H query heads over H_kv key/value heads.
///
/// # Shapes
/// - `q`: `[B, H, T, D]` (RoPE applied)
/// - `k`: `[B, H_kv, S, D]` (RoPE applied), `v`: `[B, H_kv, S, Dv]`
/// - `mask`: from [`causal_mask`], `[1, 1, G*T, S]`
/// - returns `[B, H, T, Dv]`
pub fn gqa_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4, Bool>>,
) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let [_, h_kv, s, _] = k.dims();
    let dv = v.dims()[3];
    let g = h / h_kv;
    let q = q.reshape([b, h_kv, g * t, d]);
    let mask = mask.map(|m| m.expand([b, h_kv, g * t, s]));
    let out = attention(q, k, v, mask, None, AttentionModuleOptions::default());
    out.reshape([b, h, t, dv])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::default_device;
    use burn::tensor::activation::softmax;

    /// Reference: repeat K/V per query head, explicit masked softmax.
    fn reference(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        q_pos: &[usize],
        k_pos: &[usize],
    ) -> Tensor<4> {
        let [b, h, t, d] = q.dims();
        let [_, h_kv, s, _] = k.dims();
        let g = h / h_kv;
        let k = k
            .unsqueeze_dim::<5>(2)
            .repeat_dim(2, g)
            .reshape([b, h, s, d]);
        let v = v
            .unsqueeze_dim::<5>(2)
            .repeat_dim(2, g)
            .reshape([b, h, s, d]);
        let scores = q.matmul(k.swap_dims(2, 3)) / (d as f64).sqrt();
        let mut bias = vec![0f32; t * s];
        for (i, &qp) in q_pos.iter().enumerate() {
            for (j, &kp) in k_pos.iter().enumerate() {
                if kp > qp {
                    bias[i * s + j] = f32::NEG_INFINITY;
                }
            }
        }
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [1, 1, t, s]), &scores.device());
        softmax(scores + bias, 3).matmul(v)
    }

    #[test]
    fn folded_gqa_equals_repeated_heads() {
        let device = default_device();
        let (b, h, h_kv, t, s, d) = (1, 6, 2, 3, 5, 8);
        let q = Tensor::<4>::random([b, h, t, d], burn::tensor::Distribution::Default, &device);
        let k = Tensor::<4>::random(
            [b, h_kv, s, d],
            burn::tensor::Distribution::Default,
            &device,
        );
        let v = Tensor::<4>::random(
            [b, h_kv, s, d],
            burn::tensor::Distribution::Default,
            &device,
        );
        // keys at 0..5, queries at 2..5 (a prefill continuing a cache), and a pruned set
        for (q_pos, k_pos) in [
            (vec![2usize, 3, 4], vec![0usize, 1, 2, 3, 4]),
            (vec![7, 8, 9], vec![0, 3, 7, 8, 9]),
        ] {
            let mask = causal_mask(&q_pos, &k_pos, h / h_kv, &device);
            let got = gqa_attention(q.clone(), k.clone(), v.clone(), mask);
            let want = reference(q.clone(), k.clone(), v.clone(), &q_pos, &k_pos);
            let diff: f32 = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "diff {diff}");
        }
    }

    #[test]
    fn no_mask_when_everything_is_visible() {
        let device = default_device();
        assert!(causal_mask(&[9], &[0, 5, 9], 3, &device).is_none());
        assert!(causal_mask(&[4], &[0, 5], 3, &device).is_some());
    }
}
