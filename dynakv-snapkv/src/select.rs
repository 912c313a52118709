//! Which tokens survive: the top-scored prefix tokens plus the whole window.

use burn::tensor::Tensor;

use crate::config::{GqaScores, SnapKvConfig, SnapKvError};
use crate::score::{score, WindowScores};

/// Kept token indices (into the prompt, ascending) for each selection row:
/// one per KV head, one per layer, or one per query head (see [`GqaScores`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub kept: Vec<Vec<usize>>,
    /// Prompt length the selection was made from.
    pub total: usize,
    pub gqa: GqaScores,
    /// The same kept indices per row in the order they matter: the window's
    /// tokens from the last one back, then the prefix tokens by descending
    /// score. A cache that stores tokens at reduced rank keeps the first of
    /// them whole ([`Selection::first_by_priority`]).
    pub priority: Vec<Vec<usize>>,
}

impl Selection {
    /// Everything kept (a no-op selection).
    pub fn all(rows: usize, total: usize, gqa: GqaScores) -> Self {
        Self {
            kept: vec![(0..total).collect(); rows],
            total,
            gqa,
            priority: vec![(0..total).rev().collect(); rows],
        }
    }

    /// The first `n` kept indices of a row by priority, ascending (all of
    /// them when `n` is at least the kept count; none for a row out of range).
    pub fn first_by_priority(&self, row: usize, n: usize) -> Vec<usize> {
        let mut first: Vec<usize> = self
            .priority
            .get(row)
            .map(|p| p.iter().take(n).copied().collect())
            .unwrap_or_default();
        first.sort_unstable();
        first
    }

    /// Kept tokens per row (every row keeps the same number).
    pub fn n_kept(&self) -> usize {
        self.kept.first().map_or(0, Vec::len)
    }

    /// Fraction of the prompt's tokens kept.
    pub fn kept_fraction(&self) -> f64 {
        if self.total == 0 {
            return 1.0;
        }
        self.n_kept() as f64 / self.total as f64
    }
}

/// Top-(n_kept − w) prefix tokens of every row plus the `w` window tokens,
/// sorted ascending. Ties go to the earlier token; NaN scores rank last.
pub fn select_top(
    scores: &WindowScores,
    total: usize,
    n_kept: usize,
) -> Result<Selection, SnapKvError> {
    let p = scores.prefix;
    if scores.data.len() != scores.rows * p || total < p {
        return Err(SnapKvError::Shape {
            what: "scores",
            message: format!(
                "{} scores for {} rows of {p} prefix tokens, prompt of {total}",
                scores.data.len(),
                scores.rows
            ),
        });
    }
    let window = total.saturating_sub(p);
    let from_prefix = n_kept.saturating_sub(window).min(p);
    let mut priority = Vec::with_capacity(scores.rows);
    let kept = (0..scores.rows)
        .map(|r| {
            let row = scores.row(r);
            let mut order: Vec<usize> = (0..p).collect();
            order.sort_by(|&a, &b| {
                let (x, y) = (row[a], row[b]);
                match (x.is_nan(), y.is_nan()) {
                    (true, false) => std::cmp::Ordering::Greater,
                    (false, true) => std::cmp::Ordering::Less,
                    _ => y.total_cmp(&x).then(a.cmp(&b)),
                }
            });
            let mut keep: Vec<usize> = order[..from_prefix].to_vec();
            priority.push((p..total).rev().chain(keep.iter().copied()).collect());
            keep.sort_unstable();
            keep.extend(p..total);
            keep
        })
        .collect();
    Ok(Selection {
        kept,
        total,
        gqa: scores.gqa,
        priority,
    })
}

/// Rows a selection has for a geometry.
pub fn selection_rows(gqa: GqaScores, n_heads: usize, n_kv_heads: usize) -> usize {
    match gqa {
        GqaScores::KvHead => n_kv_heads,
        GqaScores::Layer | GqaScores::LayerMax => 1,
        GqaScores::QueryHead => n_heads,
    }
}

/// SnapKV on one layer at the end of prefill: scores, then selection.
///
/// `q_window` holds the RoPE'd queries of the last `min(w, L)` prompt tokens;
/// a prompt of at most `w` tokens, r = 0, or L ≤ C keeps everything.
///
/// # Shapes
/// - `q_window`: `[1, H, min(w, L), D]`, `keys`: `[1, H_kv, L, D]`, both RoPE'd
pub fn snapkv(
    q_window: Tensor<4>,
    keys: Tensor<4>,
    config: &SnapKvConfig,
) -> Result<Selection, SnapKvError> {
    config.validate()?;
    let [_, h, _, _] = q_window.dims();
    let [_, hk, l, _] = keys.dims();
    if hk == 0 || !h.is_multiple_of(hk) {
        return Err(SnapKvError::Shape {
            what: "queries/keys",
            message: format!("{h} query heads do not group over {hk} KV heads"),
        });
    }
    if config.is_noop(l) {
        return Ok(Selection::all(
            selection_rows(config.gqa, h, hk),
            l,
            config.gqa,
        ));
    }
    let scores = score(q_window, keys, config)?;
    select_top(&scores, l, config.n_kept(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeepBudget, Pooling};
    use crate::device::test_device;
    use burn::tensor::Distribution;
    use proptest::prelude::*;

    fn scores(rows: Vec<Vec<f32>>) -> WindowScores {
        WindowScores {
            rows: rows.len(),
            prefix: rows[0].len(),
            data: rows.concat(),
            gqa: GqaScores::KvHead,
        }
    }

    #[test]
    fn keeps_top_prefix_plus_window_ascending() {
        // P = 5, window 2 (total 7), keep 4: two best prefix tokens + window.
        let s = scores(vec![
            vec![0.1, 0.9, 0.3, 0.8, 0.0],
            vec![0.5, 0.1, 0.1, 0.1, 0.6],
        ]);
        let sel = select_top(&s, 7, 4).unwrap();
        assert_eq!(sel.kept[0], vec![1, 3, 5, 6]);
        assert_eq!(sel.kept[1], vec![0, 4, 5, 6]);
        assert!((sel.kept_fraction() - 4.0 / 7.0).abs() < 1e-12);
        // A prompt shorter than the scored prefix is an error, not a panic.
        assert!(select_top(&s, 3, 2).is_err());
    }

    #[test]
    fn ties_go_to_the_earlier_token_and_nan_ranks_last() {
        let s = scores(vec![vec![0.5, f32::NAN, 0.5, 0.5, 0.2]]);
        assert_eq!(select_top(&s, 6, 3).unwrap().kept[0], vec![0, 2, 5]);
        assert_eq!(select_top(&s, 6, 5).unwrap().kept[0], vec![0, 2, 3, 4, 5]);
    }

    #[test]
    fn kept_below_the_window_keeps_the_window_only() {
        // n_kept (1) < window (2): the window is whole, nothing from the prefix.
        let s = scores(vec![vec![0.9, 0.8, 0.7]]);
        assert_eq!(select_top(&s, 5, 1).unwrap().kept[0], vec![3, 4]);
    }

    #[test]
    fn noop_cases_keep_everything() {
        let device = test_device();
        let q = Tensor::<4>::random([1, 4, 4, 8], Distribution::Default, &device);
        let k = Tensor::<4>::random([1, 2, 10, 8], Distribution::Default, &device);
        let mut c = SnapKvConfig::kvpress(0.0);
        c.window = 4;
        let sel = snapkv(q.clone(), k.clone(), &c).unwrap();
        assert_eq!(sel.kept, vec![(0..10).collect::<Vec<_>>(); 2]);
        // Prompt no longer than the window: whole, whatever the ratio.
        c.budget = KeepBudget::CompressionRatio(0.9);
        let short = Tensor::<4>::random([1, 2, 3, 8], Distribution::Default, &device);
        let sel = snapkv(q.clone().narrow(2, 0, 3), short, &c).unwrap();
        assert_eq!(sel.kept[0], vec![0, 1, 2]);
        // Capacity at least the prompt.
        c.budget = KeepBudget::Capacity(10);
        c.gqa = GqaScores::Layer;
        let sel = snapkv(q, k, &c).unwrap();
        assert_eq!(sel.kept.len(), 1);
        assert_eq!(sel.n_kept(), 10);
    }

    #[test]
    fn a_key_every_window_query_attends_to_is_kept() {
        // Window queries all point at key 3 (and nowhere else): pooling spreads
        // its vote over keys 2..=4, which survive under every pooling and GQA
        // mode.
        let device = test_device();
        let (h, hk, w, l, d) = (4, 2, 2, 12, 4);
        let mut k = vec![0f32; hk * l * d];
        let mut q = vec![0f32; h * w * d];
        for kv in 0..hk {
            k[(kv * l + 3) * d] = 10.0;
        }
        for x in q.chunks_mut(d) {
            x[0] = 10.0;
        }
        let q = Tensor::<4>::from_data(burn::tensor::TensorData::new(q, [1, h, w, d]), &device);
        let k = Tensor::<4>::from_data(burn::tensor::TensorData::new(k, [1, hk, l, d]), &device);
        for pooling in [Pooling::Avg, Pooling::Max] {
            for gqa in [GqaScores::KvHead, GqaScores::Layer, GqaScores::QueryHead] {
                let c = SnapKvConfig {
                    window: w,
                    kernel: 3,
                    pooling,
                    vote: crate::config::Vote::Sum,
                    gqa,
                    budget: KeepBudget::Capacity(5),
                };
                let sel = snapkv(q.clone(), k.clone(), &c).unwrap();
                assert_eq!(sel.kept.len(), selection_rows(gqa, h, hk));
                for row in &sel.kept {
                    assert_eq!(row, &[2, 3, 4, 10, 11], "{pooling:?} {gqa:?}");
                }
            }
        }
    }

    proptest! {
        /// The kept prefix is exactly a top-k set of the returned scores.
        #[test]
        fn kept_prefix_is_a_top_k_of_the_scores(
            rows in prop::collection::vec(prop::collection::vec(-10f32..10.0, 1..40), 1..4),
            window in 0usize..6,
            extra in 0usize..40,
        ) {
            let p = rows.iter().map(Vec::len).min().unwrap();
            let rows: Vec<Vec<f32>> = rows.into_iter().map(|r| r[..p].to_vec()).collect();
            let s = scores(rows.clone());
            let total = p + window;
            let n_kept = (window + extra).min(total);
            let sel = select_top(&s, total, n_kept).unwrap();
            for (r, kept) in sel.kept.iter().enumerate() {
                prop_assert!(kept.windows(2).all(|x| x[0] < x[1]));
                prop_assert_eq!(kept.len(), n_kept);
                let prefix: Vec<usize> = kept.iter().copied().filter(|&i| i < p).collect();
                prop_assert_eq!(kept.len() - prefix.len(), window);
                let min_kept = prefix.iter().map(|&i| rows[r][i]).fold(f32::INFINITY, f32::min);
                for i in (0..p).filter(|i| !prefix.contains(i)) {
                    prop_assert!(rows[r][i] <= min_kept);
                }
                // priority: the same tokens, the window's first (last token
                // first), then the prefix by non-increasing score
                let pr = &sel.priority[r];
                let mut sorted = pr.clone();
                sorted.sort_unstable();
                prop_assert_eq!(&sorted, kept);
                let want_window: Vec<usize> = (p..total).rev().collect();
                prop_assert_eq!(&pr[..window], &want_window[..]);
                prop_assert!(pr[window..].windows(2).all(|x| rows[r][x[0]] >= rows[r][x[1]]));
                let top = sel.first_by_priority(r, window + 1);
                prop_assert_eq!(top.len(), (window + 1).min(n_kept));
                prop_assert!(top.iter().all(|i| kept.contains(i)));
            }
        }
    }
}
