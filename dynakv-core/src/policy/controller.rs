//! The budget promise, kept per sequence: a running controller that moves a
//! [`Steerable`] policy's operating point as tokens arrive, so that the
//! retained fraction is the budget on the text the cache sees, not only on
//! the calibration text its point was fitted on.
//!
//! Per layer and K/V (a *lane*) it keeps the dimensions stored so far and the
//! cuts of the last [`WINDOW`] tokens. At each append it picks the point at
//! which the new tokens (with the recent window as reference when the append
//! is short) spend the lane's target, less any excess carried from earlier
//! appends. The targets are the calibration's per-layer shares scaled to the
//! budget, so the fitted allocation across layers and K/V is kept and only
//! its level moves. A prefill of `n` tokens is exact up to one level step;
//! decoded tokens pay back drift over the window. `ceiling` adds a hard cap:
//! no append takes a lane above its target, at the cost of `recent` tokens'
//! full rank when nothing else is left to cut.

use std::collections::VecDeque;

use super::steer::{rank_at, BudgetHold};
use super::{KvKind, RankPolicy};
use crate::error::CoreError;
use crate::levels::RankLevels;

/// Tokens of recent history a short append is steered against.
const WINDOW: usize = 256;
/// Below this many tokens of evidence the fitted point is used as it is.
const MIN_SAMPLE: usize = 32;
/// Single-token appends re-solve the point every this many tokens (solving
/// sorts the window's cuts; in between the lane's last point is reused)...
const RESOLVE_EVERY: u64 = 16;
/// ...or sooner, once the lane is this far from its target (as a fraction
/// of what a dense cache would hold; the promise is 0.01).
const DRIFT: f64 = 0.004;

/// One layer's keys or values.
#[derive(Debug, Clone, Default)]
struct Lane {
    kept: u64,
    tokens: u64,
    /// Cuts of the last unforced tokens, `[rows, levels - 1]` flattened.
    window: VecDeque<f32>,
    point: Option<f32>,
    since_solve: u64,
}

/// Per-sequence state of a budget promise (one per cache).
#[derive(Debug, Clone)]
pub struct BudgetController {
    hold: BudgetHold,
    /// `[layer] -> [key, value]` target retained fraction.
    targets: Vec<[f64; 2]>,
    lanes: Vec<[Lane; 2]>,
    levels: RankLevels,
}

/// How [`solve`] treats the goal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    Nearest,
    AtMost,
}

impl BudgetController {
    /// The controller `policy` asks for, or `None` when there is nothing to
    /// steer: the promise is `open`, or the policy has no operating point
    /// (`uniform` and `per-layer` give fixed ranks, which hold the budget by
    /// construction).
    ///
    /// Errors when the budget is below the smallest non-zero level (every
    /// stored token keeps at least that, so it cannot be held).
    pub fn for_policy(policy: &dyn RankPolicy, n_layers: usize) -> Result<Option<Self>, CoreError> {
        let (Some((hold, budget)), Some(steer)) = (policy.hold(), policy.steerable()) else {
            return Ok(None);
        };
        if hold == BudgetHold::Open {
            return Ok(None);
        }
        let levels = steer.levels().clone();
        let lv = levels.as_slice();
        if lv.len() < 2 {
            return Ok(None);
        }
        let floor = lv[1] as f64 / levels.full() as f64;
        if budget < floor - 1e-12 {
            return Err(CoreError::Invalid {
                field: "budget",
                message: format!(
                    "{budget} is below the smallest level ({} of {} dimensions): every stored token keeps at least that, so `hold={hold}` cannot keep it (use hold=open)",
                    lv[1],
                    levels.full()
                ),
            });
        }
        let shares: Option<Vec<[f64; 2]>> = (0..n_layers)
            .map(|l| {
                Some([
                    steer.fitted_share(l, KvKind::Key)?,
                    steer.fitted_share(l, KvKind::Value)?,
                ])
            })
            .collect();
        let shares = shares.unwrap_or_else(|| vec![[budget; 2]; n_layers]);
        Ok(Some(Self {
            hold,
            targets: scaled_targets(&shares, budget, floor),
            lanes: vec![Default::default(); n_layers],
            levels,
        }))
    }

    /// Forgets every token (the cache was emptied).
    pub fn reset(&mut self) {
        self.lanes
            .iter_mut()
            .flatten()
            .for_each(|l| *l = Lane::default());
    }

    /// The retained fraction a lane is held to.
    pub fn target(&self, layer: usize, kind: KvKind) -> Option<f64> {
        self.targets.get(layer).map(|t| t[kind.index()])
    }

    /// Bytes of state: the windows of cuts (fixed per cache, not per token).
    pub fn bytes(&self) -> usize {
        let m = self.levels.as_slice().len() - 1;
        self.lanes.len() * 2 * (WINDOW * m * 4 + std::mem::size_of::<Lane>())
    }

    /// Ranks of an append, steered. `policy` must be the one this controller
    /// was made for (its steerable part, recent tokens and promise).
    ///
    /// `latents` is row-major `[n, dim]`; `positions` has `n` entries.
    pub fn ranks(
        &mut self,
        policy: &dyn RankPolicy,
        layer: usize,
        kind: KvKind,
        latents: &[f32],
        positions: &[usize],
    ) -> Vec<usize> {
        let (Some(steer), Some(&target)) = (
            policy.steerable(),
            self.targets.get(layer).map(|t| &t[kind.index()]),
        ) else {
            return policy.ranks(layer, kind, latents, positions);
        };
        let n = positions.len();
        let levels = &self.levels;
        let (lv, d) = (levels.as_slice(), levels.full());
        let m = lv.len() - 1;
        let cuts = steer.cuts(layer, kind, latents, n);
        if n == 0 || cuts.len() != n * m {
            return policy.ranks(layer, kind, latents, positions);
        }
        let lane = &mut self.lanes[layer][kind.index()];
        let n_f = policy.recent_full().min(n);
        let n_u = n - n_f;
        let (new_u, _) = cuts.split_at(n_u * m);
        // Attention sinks at the start of the append keep full rank: their
        // cost is fixed, as the recent tokens' is, and the point is solved
        // over the tokens after them.
        let sinks = policy.sink_tokens();
        let n_s = positions[..n_u].iter().take_while(|&&p| p < sinks).count();
        let free = &new_u[n_s * m..];
        let n_free = n_u - n_s;

        // The point for the unforced tokens.
        let window_rows = lane.window.len() / m;
        let err = lane.kept as f64 - target * lane.tokens as f64 * d as f64;
        // Drift beyond a fraction of the tolerance forces a solve even
        // between the periodic ones.
        let drifting = err.abs() > DRIFT * (lane.tokens * d as u64) as f64;
        let resolve =
            n > 1 || lane.point.is_none() || lane.since_solve >= RESOLVE_EVERY || drifting;
        let point = if n_free == 0 || !resolve {
            lane.point.unwrap_or_else(|| steer.point(layer, kind))
        } else if window_rows + n_free < MIN_SAMPLE {
            steer.point(layer, kind)
        } else {
            // Excess carried from earlier appends is paid back in full by a
            // long append and over a horizon by short ones: an eighth of the
            // sequence so far (a short sequence must correct fast to stay
            // within the tolerance), at most the window.
            let horizon = (lane.tokens as usize / 8).clamp(1, WINDOW);
            let payback = (n as f64 / horizon as f64).min(1.0);
            let goal_new = target * (n * d) as f64 - err * payback - ((n_f + n_s) * d) as f64;
            let per_token = goal_new / n_free as f64;
            let mode = match self.hold {
                BudgetHold::Ceiling => Goal::AtMost,
                _ => Goal::Nearest,
            };
            if n_free >= WINDOW {
                solve(free, per_token * n_free as f64, mode, levels)
            } else {
                let (a, b) = lane.window.as_slices();
                let sample: Vec<f32> = [a, b, free].concat();
                solve(
                    &sample,
                    per_token * (window_rows + n_free) as f64,
                    mode,
                    levels,
                )
            }
        };
        if resolve && n_u > 0 {
            lane.point = Some(point);
            lane.since_solve = 0;
        } else {
            lane.since_solve += 1;
        }
        let mut ranks: Vec<usize> = new_u
            .chunks_exact(m)
            .map(|c| rank_at(c, point, levels))
            .chain(std::iter::repeat_n(d, n_f))
            .collect();
        // A decoded token unlike the window it was steered by can leave a
        // short sequence off its target faster than solves catch up: while
        // drifting, a single token takes the level that lands the lane
        // nearest its target.
        if drifting && n == 1 && n_u == 1 && window_rows + n_u >= MIN_SAMPLE {
            let want = target * ((lane.tokens + 1) * d as u64) as f64 - lane.kept as f64;
            ranks[0] = levels.nearest(want.clamp(lv[1] as f64, d as f64));
        }

        // attention sinks keep full rank (their cost is in the goal above)
        ranks[..n_s].iter_mut().for_each(|r| *r = d);

        if self.hold == BudgetHold::Ceiling {
            let cap = ((target * ((lane.tokens + n as u64) * d as u64) as f64 + 1e-6).floor()
                as i64
                - lane.kept as i64)
                .max(0);
            let total: usize = ranks.iter().sum();
            if total as i64 > cap {
                let fixed = ((n_f + n_s) * d) as i64;
                if n_free > 0 && cap - fixed >= (n_free * lv[1]) as i64 {
                    let p = solve(free, (cap - fixed) as f64, Goal::AtMost, levels);
                    for (r, c) in ranks[n_s..].iter_mut().zip(free.chunks_exact(m)) {
                        *r = rank_at(c, p, levels);
                    }
                } else {
                    // Nothing left to cut but the recent tokens' full rank.
                    let p = solve(&cuts, cap as f64, Goal::AtMost, levels);
                    for (r, c) in ranks.iter_mut().zip(cuts.chunks_exact(m)) {
                        *r = rank_at(c, p, levels);
                    }
                }
            }
        }

        lane.kept += ranks.iter().sum::<usize>() as u64;
        lane.tokens += n as u64;
        lane.window.extend(new_u.iter().copied());
        let excess = lane.window.len().saturating_sub(WINDOW * m);
        lane.window.drain(..excess);
        ranks
    }
}

impl BudgetController {
    /// After tokens were dropped (SnapKV prunes at the end of prefill): the
    /// lane now holds `ranks`, one per stored token in token order, and is
    /// synced to them. When they spend more than the lane's target (the
    /// kept tokens are the ones that mattered, and had higher ranks), ranks
    /// are lowered (never raised: truncated coordinates are gone) until the
    /// lane is back at its target; the last `recent` tokens keep theirs
    /// unless the ceiling needs them. Returns the new ranks, or `None` when
    /// nothing changes.
    ///
    /// `latents` gives the stored tokens' latents as stored, row-major
    /// `[n, dim]` (zero beyond each token's rank); it is called only when
    /// ranks must come down.
    pub fn after_prune<'l, E>(
        &mut self,
        policy: &dyn RankPolicy,
        layer: usize,
        kind: KvKind,
        ranks: &[usize],
        latents: impl FnOnce() -> Result<&'l [f32], E>,
    ) -> Result<Option<Vec<usize>>, E> {
        let (Some(steer), Some(target)) = (
            policy.steerable(),
            self.targets.get(layer).map(|t| t[kind.index()]),
        ) else {
            return Ok(None);
        };
        let levels = &self.levels;
        let (lv, d) = (levels.as_slice(), levels.full());
        let m = lv.len() - 1;
        let n = ranks.len();
        let lane = &mut self.lanes[layer][kind.index()];
        let total: usize = ranks.iter().sum();
        lane.kept = total as u64;
        lane.tokens = n as u64;
        let goal = target * (n * d) as f64;
        let over = match self.hold {
            BudgetHold::Open => return Ok(None),
            // within half the promised tolerance: leave the stored rows be
            BudgetHold::Track => total as f64 - goal > 0.005 * (n * d) as f64,
            BudgetHold::Ceiling => total as f64 > (goal + 1e-6).floor(),
        };
        if !over || n == 0 {
            return Ok(None);
        }
        let mut cuts = steer.cuts(layer, kind, latents()?, n);
        if cuts.len() != n * m {
            return Ok(None);
        }
        // A token can only go down: levels above its rank are out of reach.
        for (row, &r) in cuts.chunks_exact_mut(m).zip(ranks) {
            for (j, c) in row.iter_mut().enumerate() {
                if lv[j + 1] > r {
                    *c = f32::NEG_INFINITY;
                }
            }
        }
        let mode = match self.hold {
            BudgetHold::Ceiling => Goal::AtMost,
            _ => Goal::Nearest,
        };
        let goal = match mode {
            Goal::AtMost => (goal + 1e-6).floor(),
            Goal::Nearest => goal,
        };
        let n_f = policy.recent_full().min(n);
        let n_u = n - n_f;
        let fixed: usize = ranks[n_u..].iter().sum();
        let mut new = ranks.to_vec();
        let rows = if n_u > 0 && goal - fixed as f64 >= (n_u * lv[1]) as f64 {
            n_u
        } else {
            // Nothing left to cut but the recent tokens.
            n
        };
        let left = goal - ranks[rows..].iter().sum::<usize>() as f64;
        let p = solve(&cuts[..rows * m], left, mode, levels);
        for (r, c) in new.iter_mut().zip(cuts.chunks_exact(m)).take(rows) {
            *r = rank_at(c, p, levels);
        }
        lane.kept = new.iter().sum::<usize>() as u64;
        Ok(Some(new))
    }
}

/// Per-lane targets: the calibration shares scaled by one factor so their
/// mean is the budget, none below `floor` (the smallest level's fraction)
/// nor above 1.
fn scaled_targets(shares: &[[f64; 2]], budget: f64, floor: f64) -> Vec<[f64; 2]> {
    let mean_at = |c: f64| -> f64 {
        let s: f64 = shares
            .iter()
            .flatten()
            .map(|&x| (c * x).clamp(floor, 1.0))
            .sum();
        s / (2 * shares.len()).max(1) as f64
    };
    let total: f64 = shares.iter().flatten().sum();
    if !(total > 0.0 && total.is_finite()) {
        return vec![[budget; 2]; shares.len()];
    }
    // mean_at is non-decreasing in c: bisect for the budget.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while mean_at(hi) < budget && hi < 1e12 {
        hi *= 2.0;
    }
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mean_at(mid) > budget {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    shares
        .iter()
        .map(|p| p.map(|x| (lo * x).clamp(floor, 1.0)))
        .collect()
}

/// The operating point at which the rows of `cuts` (`[rows, levels - 1]`)
/// keep a total of dimensions nearest to `goal` (or the most not above it).
///
/// Every row keeps the smallest non-zero level; level `j + 1` adds
/// `lv[j + 1] - lv[j]` dimensions while the point is below `cut[j]`. Sorting
/// the cuts gives the total as a step function of the point.
fn solve(cuts: &[f32], goal: f64, mode: Goal, levels: &RankLevels) -> f32 {
    let lv = levels.as_slice();
    let m = lv.len() - 1;
    let rows = cuts.len() / m.max(1);
    let mut pairs: Vec<(f32, usize)> = cuts
        .chunks_exact(m)
        .flat_map(|c| (1..m).map(move |j| (c[j], lv[j + 1] - lv[j])))
        .filter(|(c, _)| !c.is_nan())
        .collect();
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let mut dims = (rows * lv[1]) as f64;
    // Candidate: no pair taken (the point above every cut).
    let mut best = (f32::INFINITY, dims);
    let better = |cand: f64, best: f64| match mode {
        Goal::Nearest => (cand - goal).abs() < (best - goal).abs(),
        Goal::AtMost => cand <= goal && (best > goal || cand > best),
    };
    let mut i = 0;
    while i < pairs.len() {
        let c = pairs[i].0;
        while i < pairs.len() && pairs[i].0 == c {
            dims += pairs[i].1 as f64;
            i += 1;
        }
        // Every pair with cut >= c is in: the point is the next cut down.
        let point = pairs.get(i).map_or(f32::NEG_INFINITY, |p| p.0);
        if better(dims, best.1) {
            best = (point, dims);
        }
        if mode == Goal::AtMost && dims > goal {
            break;
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Steerable;

    /// A steerable policy whose cuts are given per token: rows of `[inf, a, a/2, a/4]`
    /// for a token "size" a read from the latent's first coordinate.
    #[derive(Debug)]
    struct Toy {
        levels: RankLevels,
        point: f32,
        share: Option<[f64; 2]>,
        recent: usize,
        hold: BudgetHold,
        budget: f64,
    }

    impl Steerable for Toy {
        fn levels(&self) -> &RankLevels {
            &self.levels
        }
        fn point(&self, _: usize, _: KvKind) -> f32 {
            self.point
        }
        fn fitted_share(&self, _: usize, kind: KvKind) -> Option<f64> {
            self.share.map(|s| s[kind.index()])
        }
        fn cuts(&self, _: usize, _: KvKind, latents: &[f32], n: usize) -> Vec<f32> {
            latents
                .chunks_exact(8)
                .take(n)
                .flat_map(|l| [f32::INFINITY, l[0], l[0] / 2.0, l[0] / 4.0])
                .collect()
        }
    }

    impl RankPolicy for Toy {
        fn name(&self) -> &'static str {
            "toy"
        }
        fn ranks(&self, l: usize, k: KvKind, latents: &[f32], p: &[usize]) -> Vec<usize> {
            super::super::steer::ranks_at(
                &self.cuts(l, k, latents, p.len()),
                self.point,
                &self.levels,
            )
        }
        fn steerable(&self) -> Option<&dyn Steerable> {
            Some(self)
        }
        fn recent_full(&self) -> usize {
            self.recent
        }
        fn hold(&self) -> Option<(BudgetHold, f64)> {
            Some((self.hold, self.budget))
        }
    }

    fn toy(hold: BudgetHold, budget: f64) -> Toy {
        Toy {
            levels: RankLevels::multiples(2, 8).unwrap(), // 0 2 4 6 8
            point: 1.0,
            share: None,
            recent: 0,
            hold,
            budget,
        }
    }

    /// Token sizes from a simple generator; `scale` shifts the text's
    /// statistics away from the "calibration" the fitted point suits.
    fn text(n: usize, scale: f32, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .flat_map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s % 10_000) as f32 / 10_000.0;
                let mut row = [0f32; 8];
                row[0] = scale * (0.2 + 3.0 * u * u);
                row
            })
            .collect()
    }

    fn retained(kept: &[usize], d: usize) -> f64 {
        kept.iter().sum::<usize>() as f64 / (kept.len() * d) as f64
    }

    #[test]
    fn open_loop_drifts_and_track_holds_a_prefill_exactly() {
        for scale in [0.5f32, 1.0, 3.0] {
            let lat = text(600, scale, 7);
            let pos: Vec<usize> = (0..600).collect();
            let open = toy(BudgetHold::Open, 0.5);
            let drift = retained(&open.ranks(0, KvKind::Key, &lat, &pos), 8);
            let p = toy(BudgetHold::Track, 0.5);
            let mut c = BudgetController::for_policy(&p, 1).unwrap().unwrap();
            let r = retained(&c.ranks(&p, 0, KvKind::Key, &lat, &pos), 8);
            assert!((r - 0.5).abs() < 0.01, "scale {scale}: track {r}");
            if scale != 1.0 {
                assert!((drift - 0.5).abs() > 0.05, "scale {scale}: open {drift}");
            }
        }
        let open = toy(BudgetHold::Open, 0.5);
        assert!(BudgetController::for_policy(&open, 1).unwrap().is_none());
    }

    /// Sinks keep full rank and their cost is paid within the same prefill:
    /// a short prompt still lands on the budget (and under the ceiling).
    #[test]
    fn sinks_keep_full_rank_within_the_budget() {
        for hold in [BudgetHold::Track, BudgetHold::Ceiling] {
            let p = crate::policy::SinkFull::new(std::sync::Arc::new(toy(hold, 0.3)), 2, 8);
            let mut c = BudgetController::for_policy(&p, 1).unwrap().unwrap();
            let lat = text(64, 1.0, 5);
            let pos: Vec<usize> = (0..64).collect();
            let r = c.ranks(&p, 0, KvKind::Key, &lat, &pos);
            assert_eq!(&r[..2], &[8, 8], "{hold}");
            let kept = retained(&r, 8);
            assert!((kept - 0.3).abs() <= 0.01, "{hold}: {kept}");
            if hold == BudgetHold::Ceiling {
                assert!(kept <= 0.3 + 1e-9, "{kept}");
            }
        }
    }

    #[test]
    fn decoding_token_by_token_stays_within_a_hundredth() {
        for hold in [BudgetHold::Track, BudgetHold::Ceiling] {
            let p = toy(hold, 0.4);
            let mut c = BudgetController::for_policy(&p, 2).unwrap().unwrap();
            let prompt = text(300, 1.0, 3);
            let mut kept: Vec<usize> =
                c.ranks(&p, 1, KvKind::Value, &prompt, &(0..300).collect::<Vec<_>>());
            // The generated text drifts: its tokens are three times larger.
            let gen = text(700, 3.0, 11);
            for (i, row) in gen.chunks_exact(8).enumerate() {
                let r = c.ranks(&p, 1, KvKind::Value, row, &[300 + i]);
                kept.extend(r);
                let now = retained(&kept, 8);
                if hold == BudgetHold::Ceiling {
                    assert!(now <= 0.4 + 1e-9, "{hold} at {i}: {now}");
                }
            }
            let end = retained(&kept, 8);
            assert!((end - 0.4).abs() <= 0.01, "{hold}: {end}");
        }
    }

    #[test]
    fn a_short_prompt_and_a_short_answer_stay_within_a_hundredth() {
        let p = toy(BudgetHold::Track, 0.47);
        let mut c = BudgetController::for_policy(&p, 1).unwrap().unwrap();
        let prompt = text(34, 1.0, 21);
        let mut kept = c.ranks(&p, 0, KvKind::Key, &prompt, &(0..34).collect::<Vec<_>>());
        // Generated tokens unlike the prompt (smaller: fewer dimensions at
        // the prompt's point).
        let gen = text(40, 0.4, 8);
        for (i, row) in gen.chunks_exact(8).enumerate() {
            kept.extend(c.ranks(&p, 0, KvKind::Key, row, &[34 + i]));
            if i >= 8 {
                let now = retained(&kept, 8);
                assert!(
                    (now - 0.47).abs() <= 0.01 + 2.0 / (8.0 * kept.len() as f64),
                    "step {i}: {now}"
                );
            }
        }
    }

    #[test]
    fn ceiling_overrides_recent_tokens_only_when_it_must() {
        let mut p = toy(BudgetHold::Ceiling, 0.3);
        p.recent = 4;
        let mut c = BudgetController::for_policy(&p, 1).unwrap().unwrap();
        let lat = text(100, 1.0, 5);
        let r = c.ranks(&p, 0, KvKind::Key, &lat, &(0..100).collect::<Vec<_>>());
        assert!(retained(&r, 8) <= 0.3 + 1e-9);
        assert_eq!(
            &r[96..],
            &[8, 8, 8, 8],
            "room left: the recent tokens keep full rank"
        );
        // Single decoded tokens are all recent: the ceiling caps them.
        let mut all = r;
        for i in 0..50 {
            all.extend(c.ranks(&p, 0, KvKind::Key, &lat[..8], &[100 + i]));
            assert!(retained(&all, 8) <= 0.3 + 1e-9, "at {i}");
        }
        // Track lets them through: their full rank is what `recent` asks.
        p.hold = BudgetHold::Track;
        let mut t = BudgetController::for_policy(&p, 1).unwrap().unwrap();
        t.ranks(&p, 0, KvKind::Key, &lat, &(0..100).collect::<Vec<_>>());
        assert_eq!(t.ranks(&p, 0, KvKind::Key, &lat[..8], &[100]), vec![8]);
    }

    #[test]
    fn after_pruning_ranks_only_fall_back_to_the_target() {
        let p = toy(BudgetHold::Track, 0.5);
        let mut c = BudgetController::for_policy(&p, 1).unwrap().unwrap();
        let lat = text(200, 1.0, 9);
        let r = c.ranks(&p, 0, KvKind::Key, &lat, &(0..200).collect::<Vec<_>>());
        // Keep the 50 tokens with the highest ranks (what pruning keeps).
        let mut order: Vec<usize> = (0..200).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(r[i]));
        let mut kept: Vec<usize> = order[..50].to_vec();
        kept.sort();
        let kept_lat: Vec<f32> = kept
            .iter()
            .flat_map(|&i| lat[i * 8..i * 8 + 8].to_vec())
            .collect();
        let kept_r: Vec<usize> = kept.iter().map(|&i| r[i]).collect();
        assert!(retained(&kept_r, 8) > 0.6);
        let kept_rows = || Ok::<_, ()>(&kept_lat[..]);
        let new = c
            .after_prune(&p, 0, KvKind::Key, &kept_r, kept_rows)
            .unwrap()
            .unwrap();
        assert!(
            (retained(&new, 8) - 0.5).abs() <= 0.01,
            "{}",
            retained(&new, 8)
        );
        assert!(new.iter().zip(&kept_r).all(|(a, b)| a <= b));
        // At the target already: nothing to do.
        assert!(c
            .after_prune(&p, 0, KvKind::Key, &new, kept_rows)
            .unwrap()
            .is_none());
    }

    #[test]
    fn layer_shares_are_kept_and_scaled_to_the_budget() {
        let mut p = toy(BudgetHold::Track, 0.5);
        p.share = Some([0.3, 0.6]);
        let c = BudgetController::for_policy(&p, 3).unwrap().unwrap();
        let (k, v) = (
            c.target(0, KvKind::Key).unwrap(),
            c.target(0, KvKind::Value).unwrap(),
        );
        assert!(
            (k + v - 1.0).abs() < 1e-9 && (v / k - 2.0).abs() < 1e-9,
            "{k} {v}"
        );
        // The floor: nothing below the smallest level (2 of 8).
        p.share = Some([0.01, 0.6]);
        let c = BudgetController::for_policy(&p, 1).unwrap().unwrap();
        assert!(c.target(0, KvKind::Key).unwrap() >= 0.25 - 1e-12);
        assert!(
            (c.target(0, KvKind::Key).unwrap() + c.target(0, KvKind::Value).unwrap() - 1.0).abs()
                < 1e-9
        );
        // A budget below the smallest level cannot be held.
        assert!(BudgetController::for_policy(&toy(BudgetHold::Track, 0.2), 1).is_err());
    }

    #[test]
    fn solve_finds_the_nearest_and_the_largest_not_above() {
        let levels = RankLevels::multiples(2, 8).unwrap();
        // Two tokens: cuts [inf, 4, 2, 1] and [inf, 3, 1.5, 0.75].
        let cuts = [f32::INFINITY, 4.0, 2.0, 1.0, f32::INFINITY, 3.0, 1.5, 0.75];
        let total =
            |p: f32| -> usize { cuts.chunks_exact(4).map(|c| rank_at(c, p, &levels)).sum() };
        for goal in 4..=16 {
            let near = total(solve(&cuts, goal as f64, Goal::Nearest, &levels));
            assert!(
                (near as i64 - goal as i64).abs() <= 1,
                "goal {goal}: {near}"
            );
            let under = total(solve(&cuts, goal as f64, Goal::AtMost, &levels));
            assert!(under <= goal && goal - under < 2, "goal {goal}: {under}");
        }
        assert_eq!(total(solve(&cuts, 0.0, Goal::AtMost, &levels)), 4);
        assert_eq!(total(solve(&cuts, 99.0, Goal::Nearest, &levels)), 16);
    }
}
