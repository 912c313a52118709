//! SnapKV's token scores: how much the last `w` queries attend to each earlier
//! token, smoothed along the sequence and aggregated over query heads.
//!
//! The heavy part (window logits against every key, softmax) runs on the burn
//! device; the vote leaves one number per query head and prefix token, small
//! enough that pooling and GQA aggregation run on the host, exactly and
//! testable by hand.

use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Tensor, TensorData};

use crate::config::{GqaScores, Pooling, SnapKvConfig, SnapKvError, Vote};

/// Scores of the prefix tokens (everything before the observation window).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowScores {
    /// One row per KV head, per layer (one row) or per query head.
    pub rows: usize,
    /// Prefix length P = L − w.
    pub prefix: usize,
    /// Row-major `[rows, prefix]`.
    pub data: Vec<f32>,
    pub gqa: GqaScores,
}

impl WindowScores {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.prefix..(r + 1) * self.prefix]
    }
}

/// Votes of the window queries for every prefix token, per query head.
///
/// Logits `q·k / sqrt(D)` of the last `w` queries against all `L` keys, causal
/// inside the window only (window query i sits at position L − w + i), softmax
/// over all keys in f32, then the prefix columns summed or averaged over the
/// window queries. Keys are in prompt order.
///
/// # Shapes
/// - `q_window`: `[1, H, w, D]` (RoPE applied)
/// - `keys`: `[1, H_kv, L, D]` (RoPE applied), L > w
/// - returns `[H, L − w]` (query head h belongs to KV head h / (H / H_kv))
pub fn window_votes(
    q_window: Tensor<4>,
    keys: Tensor<4>,
    vote: Vote,
) -> Result<Tensor<2>, SnapKvError> {
    let [b, h, w, d] = q_window.dims();
    let [bk, hk, l, dk] = keys.dims();
    let shape_err = |message: String| SnapKvError::Shape {
        what: "queries/keys",
        message,
    };
    if b != 1 || bk != 1 {
        return Err(shape_err(format!("batch must be 1, got {b} and {bk}")));
    }
    if d != dk || hk == 0 || !h.is_multiple_of(hk) {
        return Err(shape_err(format!(
            "queries [1, {h}, {w}, {d}] do not group over keys [1, {hk}, {l}, {dk}]"
        )));
    }
    if w == 0 || l <= w {
        return Err(shape_err(format!(
            "{w} window queries need more than {w} keys, got {l}"
        )));
    }
    let g = h / hk;
    let p = l - w;
    let device = q_window.device();
    // Fold the G query heads of each KV head into the rows: [1, Hk, G*w, D].
    let q = q_window.reshape([1, hk, g * w, d]);
    let logits = q.matmul(keys.swap_dims(2, 3)) / (d as f64).sqrt();
    // Row r is window query i = r mod w; it may not see keys j > P + i.
    let mut hide = Vec::with_capacity(g * w * l);
    for _ in 0..g {
        for i in 0..w {
            hide.extend((0..l).map(|j| j > p + i));
        }
    }
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(hide, [1, 1, g * w, l]), &device)
        .expand([1, hk, g * w, l]);
    let weights = softmax(logits.mask_fill(mask, f32::NEG_INFINITY), 3);
    let prefix = weights.narrow(3, 0, p).reshape([hk * g, w, p]);
    let votes = match vote {
        Vote::Sum => prefix.sum_dim(1),
        Vote::Mean => prefix.mean_dim(1),
    };
    Ok(votes.reshape([h, p]))
}

/// 1-D pooling with stride 1 and padding `kernel / 2`, as PyTorch's
/// `avg_pool1d` (zeros counted in the divisor) and `max_pool1d` (padding never
/// wins).
pub fn pool(row: &[f32], kernel: usize, pooling: Pooling) -> Vec<f32> {
    let half = kernel / 2;
    let n = row.len();
    (0..n)
        .map(|i| {
            let (lo, hi) = match pooling {
                Pooling::Forward => ((i + 1).saturating_sub(kernel), i + 1),
                Pooling::Avg | Pooling::Max => (i.saturating_sub(half), (i + half + 1).min(n)),
            };
            let window = &row[lo..hi];
            match pooling {
                Pooling::Avg => window.iter().sum::<f32>() / kernel as f32,
                Pooling::Max | Pooling::Forward => {
                    window.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                }
            }
        })
        .collect()
}

/// Pooled votes aggregated over query heads.
///
/// `votes` is row-major `[H, P]`; query head h belongs to KV head h / (H / H_kv).
pub fn aggregate(
    votes: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    kernel: usize,
    pooling: Pooling,
    gqa: GqaScores,
) -> Result<WindowScores, SnapKvError> {
    if n_heads == 0
        || n_kv_heads == 0
        || !n_heads.is_multiple_of(n_kv_heads)
        || !votes.len().is_multiple_of(n_heads)
    {
        return Err(SnapKvError::Shape {
            what: "votes",
            message: format!(
                "{} votes for {n_heads} query heads over {n_kv_heads} KV heads",
                votes.len()
            ),
        });
    }
    let p = votes.len() / n_heads;
    let pooled: Vec<Vec<f32>> = votes
        .chunks(p.max(1))
        .take(n_heads)
        .map(|r| pool(r, kernel, pooling))
        .collect();
    let mean_of = |heads: &[Vec<f32>]| -> Vec<f32> {
        let k = heads.len() as f32;
        (0..p)
            .map(|j| heads.iter().map(|r| r[j]).sum::<f32>() / k)
            .collect()
    };
    let rows: Vec<Vec<f32>> = match gqa {
        GqaScores::QueryHead => pooled,
        GqaScores::Layer => vec![mean_of(&pooled)],
        GqaScores::LayerMax => vec![(0..p)
            .map(|j| {
                pooled
                    .iter()
                    .map(|r| r[j])
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect()],
        GqaScores::KvHead => pooled.chunks(n_heads / n_kv_heads).map(mean_of).collect(),
    };
    Ok(WindowScores {
        rows: rows.len(),
        prefix: p,
        data: rows.concat(),
        gqa,
    })
}

/// The full scorer: window votes on the device, pooling and aggregation on the
/// host.
///
/// # Shapes
/// - `q_window`: `[1, H, w, D]`, `keys`: `[1, H_kv, L, D]`, both RoPE'd, L > w
pub fn score(
    q_window: Tensor<4>,
    keys: Tensor<4>,
    config: &SnapKvConfig,
) -> Result<WindowScores, SnapKvError> {
    config.validate()?;
    let [_, h, w, _] = q_window.dims();
    let hk = keys.dims()[1];
    if w != config.window {
        return Err(SnapKvError::Shape {
            what: "window queries",
            message: format!("config.window is {}, got {w} queries", config.window),
        });
    }
    let votes = window_votes(q_window, keys, config.vote)?
        .into_data()
        .try_into_vec_as::<f32>()?;
    aggregate(&votes, h, hk, config.kernel, config.pooling, config.gqa)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::test_device;
    use burn::tensor::Distribution;

    #[test]
    fn avg_pool_counts_padding_at_both_edges() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        // k = 3: [0+1+2, 1+2+3, 2+3+4, 3+4+5, 4+5+0] / 3
        let got = pool(&x, 3, Pooling::Avg);
        let want = [1.0, 2.0, 3.0, 4.0, 3.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // k = 5 on a 2-element row: every output divides by 5.
        assert_eq!(pool(&[5.0, 10.0], 5, Pooling::Avg), vec![3.0, 3.0]);
        // k = 1 is the identity.
        assert_eq!(pool(&x, 1, Pooling::Avg), x.to_vec());
    }

    #[test]
    fn max_pool_ignores_padding() {
        let x = [-3.0, -1.0, -2.0, -5.0];
        assert_eq!(pool(&x, 3, Pooling::Max), vec![-1.0, -1.0, -1.0, -2.0]);
        assert_eq!(pool(&x, 7, Pooling::Max), vec![-1.0; 4]);
    }

    #[test]
    fn forward_pool_carries_a_vote_to_the_tokens_after_it() {
        // A vote at index 1 reaches indices 1..=3 with k = 3, never index 0.
        let x = [0.0, 9.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(
            pool(&x, 3, Pooling::Forward),
            vec![0.0, 9.0, 9.0, 9.0, 0.0, 1.0]
        );
        assert_eq!(pool(&x, 1, Pooling::Forward), x.to_vec());
    }

    #[test]
    fn aggregation_modes() {
        // 4 query heads over 2 KV heads, P = 2, kernel 1 (no smoothing).
        let votes = [1.0, 0.0, 3.0, 0.0, 0.0, 2.0, 0.0, 6.0];
        let kv = aggregate(&votes, 4, 2, 1, Pooling::Avg, GqaScores::KvHead).unwrap();
        assert_eq!((kv.rows, kv.prefix), (2, 2));
        assert_eq!(kv.data, vec![2.0, 0.0, 0.0, 4.0]);
        let layer = aggregate(&votes, 4, 2, 1, Pooling::Avg, GqaScores::Layer).unwrap();
        assert_eq!(layer.data, vec![1.0, 2.0]);
        let layer_max = aggregate(&votes, 4, 2, 1, Pooling::Avg, GqaScores::LayerMax).unwrap();
        assert_eq!((layer_max.rows, layer_max.data), (1, vec![3.0, 6.0]));
        let per_q = aggregate(&votes, 4, 2, 1, Pooling::Avg, GqaScores::QueryHead).unwrap();
        assert!(aggregate(&votes, 4, 0, 1, Pooling::Avg, GqaScores::KvHead).is_err());
        assert!(aggregate(&votes, 3, 1, 1, Pooling::Avg, GqaScores::KvHead).is_err());
        assert_eq!(per_q.rows, 4);
        assert_eq!(per_q.row(3), &[0.0, 6.0]);
    }

    /// Reference in plain loops: repeat K per query head, masked softmax.
    fn reference_votes(
        q: &[f32],
        k: &[f32],
        h: usize,
        hk: usize,
        w: usize,
        l: usize,
        d: usize,
    ) -> Vec<f32> {
        let g = h / hk;
        let p = l - w;
        let mut out = vec![0f32; h * p];
        for head in 0..h {
            let kv = head / g;
            for i in 0..w {
                let qi = &q[(head * w + i) * d..(head * w + i + 1) * d];
                let visible = p + i + 1;
                let logits: Vec<f32> = (0..visible)
                    .map(|j| {
                        let kj = &k[(kv * l + j) * d..(kv * l + j + 1) * d];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = logits.iter().map(|x| (x - m).exp()).sum();
                for j in 0..p {
                    out[head * p + j] += (logits[j] - m).exp() / z;
                }
            }
        }
        out
    }

    #[test]
    fn votes_match_a_loop_reference_with_the_in_window_causal_mask() {
        let device = test_device();
        let (h, hk, w, l, d) = (6, 2, 3, 8, 4);
        let q = Tensor::<4>::random([1, h, w, d], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<4>::random([1, hk, l, d], Distribution::Normal(0.0, 1.0), &device);
        let qv = q
            .clone()
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 data");
        let kv = k
            .clone()
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 data");
        let want = reference_votes(&qv, &kv, h, hk, w, l, d);
        let sum = window_votes(q.clone(), k.clone(), Vote::Sum).unwrap();
        let got = sum.into_data().try_into_vec_as::<f32>().expect("f32 data");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let mean = window_votes(q, k, Vote::Mean).unwrap();
        let got = mean.into_data().try_into_vec_as::<f32>().expect("f32 data");
        for (g, wv) in got.iter().zip(&want) {
            assert!((g - wv / w as f32).abs() < 1e-5);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let device = test_device();
        let q = Tensor::<4>::zeros([1, 6, 4, 8], &device);
        // Window as long as the prompt.
        let k = Tensor::<4>::zeros([1, 2, 4, 8], &device);
        assert!(window_votes(q.clone(), k, Vote::Mean).is_err());
        // Heads that do not group.
        let k = Tensor::<4>::zeros([1, 4, 10, 8], &device);
        assert!(window_votes(q.clone(), k, Vote::Mean).is_err());
        // Window that disagrees with the config.
        let k = Tensor::<4>::zeros([1, 2, 10, 8], &device);
        assert!(score(q, k, &SnapKvConfig::kvpress(0.5)).is_err());
    }
}
