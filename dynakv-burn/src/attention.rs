//! Grouped-query attention without copying keys and values.
//!
//! burn's fused `module::attention` wants equal head counts. Instead of
//! repeating each KV head G = H / H_kv times, the G query heads that share a KV
//! head are folded into the query length: `[B, H, T, D] -> [B, H_kv, G*T, D]`.
//! Causality is by position (`key_pos <= query_pos`), so it works for any set of
//! stored positions, including pruned ones. A sliding window (a query at `p`
//! sees keys at `p - window < k <= p`, llama.cpp's standard SWA) is one more
//! condition on positions.

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
    window_mask(q_pos, k_pos, groups, None, device)
}

/// Whether a query at `q` does not see a key at `k`: a later key, or one a
/// window of `window` positions has left behind.
pub fn hidden(q: usize, k: usize, window: Option<usize>) -> bool {
    k > q || window.is_some_and(|w| q - k >= w)
}

/// [`causal_mask`] with an optional sliding window ([`hidden`]).
///
/// # Shapes
/// returns `[1, 1, G*T, S]` expanded by the caller.
pub fn window_mask(
    q_pos: &[usize],
    k_pos: &[usize],
    groups: usize,
    window: Option<usize>,
    device: &Device,
) -> Option<Tensor<4, Bool>> {
    let q_min = q_pos.iter().copied().min()?;
    let q_max = q_pos.iter().copied().max()?;
    let k_min = k_pos.iter().copied().min()?;
    let k_max = k_pos.iter().copied().max()?;
    if k_max <= q_min && !hidden(q_max, k_min, window) {
        return None;
    }
    let (t, s) = (q_pos.len(), k_pos.len());
    let mut rows = Vec::with_capacity(t * s);
    for &qp in q_pos {
        rows.extend(k_pos.iter().map(|&kp| hidden(qp, kp, window)));
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

/// Queries per block of [`causal_attention`].
pub const CAUSAL_BLOCK: usize = 512;

/// Causal attention by position, in blocks of [`CAUSAL_BLOCK`] queries that
/// each read only the keys they can see. With key positions ascending (a
/// dense or DynaKV cache in token order), a block's visible keys are a
/// prefix, so a long prefill skips the masked upper triangle that the fused
/// kernel would otherwise compute and discard: at 4k tokens, 56% of the score
/// and value products. Falls back to one masked call for short chunks and for
/// positions out of order.
///
/// # Shapes
/// - `q`: `[B, H, T, D]` (RoPE applied), `q_pos.len() == T`
/// - `k`: `[B, H_kv, S, D]` (RoPE applied), `v`: `[B, H_kv, S, Dv]`, `k_pos.len() == S`
/// - returns `[B, H, T, Dv]`
pub fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    q_pos: &[usize],
    k_pos: &[usize],
) -> Tensor<4> {
    windowed_attention(q, k, v, q_pos, k_pos, None)
}

/// [`causal_attention`] with an optional sliding window: a block of
/// queries reads only the keys from its first query's window start to its
/// last query, so a windowed layer's prefill costs O(T * window), not
/// O(T * S). With a window, short chunks (a decode step) are blocked too.
///
/// # Shapes
/// as [`causal_attention`]
pub fn windowed_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    q_pos: &[usize],
    k_pos: &[usize],
    window: Option<usize>,
) -> Tensor<4> {
    let [_, h, t, _] = q.dims();
    let groups = h / k.dims()[1];
    let device = q.device();
    let ascending = |p: &[usize]| p.windows(2).all(|w| w[0] <= w[1]);
    let short = t < 2 * CAUSAL_BLOCK && window.is_none();
    if short || !ascending(q_pos) || !ascending(k_pos) {
        let mask = window_mask(q_pos, k_pos, groups, window, &device);
        return gqa_attention(q, k, v, mask);
    }
    let mut outs = Vec::new();
    for start in (0..t).step_by(CAUSAL_BLOCK) {
        let n = CAUSAL_BLOCK.min(t - start);
        let block_pos = &q_pos[start..start + n];
        let (first, last) = (block_pos[0], block_pos[n - 1]);
        // No visible key at all stays fully masked, as in one masked call.
        let end = k_pos.partition_point(|&p| p <= last).max(1);
        let begin = window.map_or(0, |w| k_pos.partition_point(|&p| p + w <= first));
        let begin = begin.min(end - 1);
        let keys = &k_pos[begin..end];
        let mask = window_mask(block_pos, keys, groups, window, &device);
        outs.push(gqa_attention(
            q.clone().narrow(2, start, n),
            k.clone().narrow(2, begin, end - begin),
            v.clone().narrow(2, begin, end - begin),
            mask,
        ));
    }
    Tensor::cat(outs, 2)
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
        reference_windowed(q, k, v, q_pos, k_pos, None)
    }

    fn reference_windowed(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        q_pos: &[usize],
        k_pos: &[usize],
        window: Option<usize>,
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
                if hidden(qp, kp, window) {
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
    fn blocked_causal_attention_equals_one_masked_call() {
        let device = default_device();
        let (h, h_kv, d) = (4, 2, 8);
        let t = 2 * CAUSAL_BLOCK + 37;
        let rand = |heads, n| {
            Tensor::<4>::random(
                [1, heads, n, d],
                burn::tensor::Distribution::Default,
                &device,
            )
        };
        // a prefill over 5 cached tokens, and one whose keys skip positions (pruned)
        let cached = 5;
        let (q, k, v) = (rand(h, t), rand(h_kv, cached + t), rand(h_kv, cached + t));
        let q_pos: Vec<usize> = (cached..cached + t).collect();
        let dense: Vec<usize> = (0..cached + t).collect();
        let pruned: Vec<usize> = (0..cached + t).map(|i| 2 * i).collect();
        for k_pos in [dense, pruned] {
            let mask = causal_mask(&q_pos, &k_pos, h / h_kv, &device);
            let want = gqa_attention(q.clone(), k.clone(), v.clone(), mask);
            let got = causal_attention(q.clone(), k.clone(), v.clone(), &q_pos, &k_pos);
            let diff: f32 = (got - want).abs().max().into_scalar();
            assert!(diff < 1e-5, "diff {diff}");
        }
    }

    #[test]
    fn windowed_attention_equals_explicit_masked_softmax() {
        let device = default_device();
        let (h, h_kv, d) = (4, 2, 8);
        let rand = |heads, n| {
            Tensor::<4>::random(
                [1, heads, n, d],
                burn::tensor::Distribution::Default,
                &device,
            )
        };
        // a long prefill (blocked), a decode step far past the window, a
        // short chunk, and keys that skip positions
        let long = CAUSAL_BLOCK + 300;
        let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            ((0..long).collect(), (0..long).collect()),
            (vec![900], (0..901).collect()),
            ((40..45).collect(), (0..45).collect()),
            (
                (60..63).collect(),
                (0..60).step_by(2).chain(60..63).collect(),
            ),
        ];
        for window in [1usize, 7, 100] {
            for (q_pos, k_pos) in &cases {
                let (q, k, v) = (
                    rand(h, q_pos.len()),
                    rand(h_kv, k_pos.len()),
                    rand(h_kv, k_pos.len()),
                );
                let want =
                    reference_windowed(q.clone(), k.clone(), v.clone(), q_pos, k_pos, Some(window));
                let got = windowed_attention(q, k, v, q_pos, k_pos, Some(window));
                let diff: f32 = (got - want).abs().max().into_scalar();
                assert!(
                    diff < 1e-5,
                    "window {window}, {} queries: diff {diff}",
                    q_pos.len()
                );
            }
        }
        assert!(hidden(10, 3, Some(7)) && !hidden(10, 4, Some(7)) && hidden(3, 4, None));
    }

    #[test]
    fn no_mask_when_everything_is_visible() {
        let device = default_device();
        assert!(causal_mask(&[9], &[0, 5, 9], 3, &device).is_none());
        assert!(causal_mask(&[4], &[0, 5], 3, &device).is_some());
    }
}
