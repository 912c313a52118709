//! The dense cache's attention for many queries at once (a prefill), over
//! f32 / f16 rows read in place, blocked by queries and by keys.
//!
//! Why: burn's fused CPU attention takes the group's query heads stacked
//! along the sequence (`[B, H_kv, G*T, D]`, see `gqa_attention`), so it runs
//! one task per KV head (three on SmolLM2, one on Gemma 3 270M: one core of
//! two), computes every masked score before discarding it, and takes libm's
//! `expf` one score at a time; the tensor path must also build contiguous
//! f32 key and value tensors from the cache's rows first. Profiled on a
//! 2,048-token prefill it was about half of the time. Here a task is one
//! block of [`QUERY_BLOCK`] queries (all heads) against the chunks of keys
//! it can see: chunks wholly after the block's last query, or wholly out
//! of its window, are skipped, and each chunk is the decode kernel's fused
//! pass ([`super::dense_decode::chunk_f16c`]: scores, a chunk-local softmax
//! with a vector exp, weighted values), merged into the block's running
//! result as flash attention does.

use rayon::prelude::*;

use super::dense_decode::HeadView;
use super::math::Heads;
use super::plain_rows::KernelCopy;

/// Queries per task: small enough that a 512-token prefill makes eight
/// tasks for two to four cores and that a block wastes little of its last
/// (diagonal) chunk, large enough that each key chunk read from cache is
/// used by a few hundred query rows.
pub(crate) const QUERY_BLOCK: usize = 64;

/// Attention of `T` queries over per-KV-head keys and values, or `None`
/// where the plain-row kernels do not serve (another CPU, a head width
/// that is not a multiple of eight, rows in a quantised dtype): the caller
/// then takes the tensor path.
///
/// # Shapes
/// - `q`: `[H, T, head_dim]` row-major, RoPE applied; `q_pos`: `[T]`
/// - `kv`: one view per KV head, every head holding the same number of tokens
/// - returns `[H, T, head_dim]`
///
/// Visibility as [`crate::attention::hidden`]; a query that sees no key
/// gets zeros.
pub(crate) fn attend(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    kv: &[HeadView],
    window: Option<usize>,
) -> Option<Vec<f32>> {
    attend_with(
        heads,
        q,
        q_pos,
        kv,
        window,
        KernelCopy::best(heads.head_dim),
    )
}

/// [`attend`] on the kernels' copy `copy` (`None` for `Generic`).
fn attend_with(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    kv: &[HeadView],
    window: Option<usize>,
    copy: KernelCopy,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        if copy == KernelCopy::Generic {
            return None;
        }
        let n = kv.first().map_or(0, |v| v.positions.len());
        if kv.iter().any(|v| v.positions.len() != n) {
            return None;
        }
        let rows = super::dense_decode::plain_views(kv, n, heads.head_dim)?;
        Some(blocked(heads, q, q_pos, kv, &rows, window, copy))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (heads, q, q_pos, kv, window, copy);
        None
    }
}

/// [`attend`] on plain rows: one parallel task per query block.
#[cfg(target_arch = "x86_64")]
fn blocked(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    kv: &[HeadView],
    rows: &[[super::plain_rows::PlainRows; 2]],
    window: Option<usize>,
    copy: KernelCopy,
) -> Vec<f32> {
    use super::math::CHUNK;
    let (h, dh, t) = (heads.n_heads, heads.head_dim, q_pos.len());
    let n = kv.first().map_or(0, |v| v.positions.len());
    // each key chunk's position range over every head
    let spans: Vec<(usize, usize)> = (0..n.div_ceil(CHUNK))
        .map(|c| {
            let toks = c * CHUNK..((c + 1) * CHUNK).min(n);
            kv.iter()
                .flat_map(|v| &v.positions[toks.clone()])
                .fold((usize::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)))
        })
        .collect();
    let blocks: Vec<(usize, Vec<f32>)> = (0..t.div_ceil(QUERY_BLOCK))
        .rev() // late blocks see the most keys: start them first
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|b| {
            let ts = b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(t);
            (
                b,
                block(heads, q, q_pos, ts, kv, rows, &spans, window, copy),
            )
        })
        .collect();
    let mut out = vec![0f32; h * t * dh];
    for (b, o) in blocks {
        let start = b * QUERY_BLOCK;
        let nb = o.len() / (h * dh);
        for (qh, rows) in o.chunks_exact(nb * dh).enumerate() {
            let at = (qh * t + start) * dh;
            out[at..at + nb * dh].copy_from_slice(rows);
        }
    }
    out
}

/// One query block's attention over the key chunks it can see.
///
/// # Shapes
/// returns `[H, ts.len(), head_dim]`
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn block(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    ts: std::ops::Range<usize>,
    kv: &[HeadView],
    rows: &[[super::plain_rows::PlainRows; 2]],
    spans: &[(usize, usize)],
    window: Option<usize>,
    copy: KernelCopy,
) -> Vec<f32> {
    use super::dense_decode::{chunk_f16c, ScoreJob};
    use super::math::{axpy, CHUNK};
    let (h, dh, t) = (heads.n_heads, heads.head_dim, q_pos.len());
    let nb = ts.len();
    let n = kv.first().map_or(0, |v| v.positions.len());
    // the block's query rows, `[H, nb, dh]`
    let mut qb = Vec::with_capacity(h * nb * dh);
    for qh in 0..h {
        qb.extend_from_slice(&q[(qh * t + ts.start) * dh..(qh * t + ts.end) * dh]);
    }
    let pos = &q_pos[ts];
    let (qmin, qmax) = pos
        .iter()
        .fold((usize::MAX, 0), |(lo, hi), &p| (lo.min(p), hi.max(p)));
    let job = ScoreJob {
        q: &qb,
        q_pos: pos,
        kv,
        gt: h / kv.len().max(1) * nb,
        t: nb,
        dh,
        window,
        scale: 1.0 / (dh as f32).sqrt(),
    };
    let n_rows = h * nb;
    let (mut m, mut l) = (vec![f32::NEG_INFINITY; n_rows], vec![0f32; n_rows]);
    let mut o = vec![0f32; n_rows * dh];
    for (c, &(lo, hi)) in spans.iter().enumerate() {
        // every key after every query, or every key out of every query's window
        let after = lo > qmax;
        let behind = window.is_some_and(|w| qmin >= hi && qmin - hi >= w);
        if after || behind {
            continue;
        }
        let toks = c * CHUNK..((c + 1) * CHUNK).min(n);
        // SAFETY: `copy` is one this CPU runs for this head width, not
        // Generic (attend_with), and `rows` holds `n` tokens per head
        // (plain_views).
        let part = unsafe { chunk_f16c(&job, rows, toks, 0, copy) };
        for r in 0..n_rows {
            let pm = part.m[r];
            if pm == f32::NEG_INFINITY {
                continue;
            }
            let new = m[r].max(pm);
            let (old_f, part_f) = ((m[r] - new).exp(), (pm - new).exp());
            let or = &mut o[r * dh..(r + 1) * dh];
            if old_f != 1.0 {
                or.iter_mut().for_each(|x| *x *= old_f);
            }
            axpy(or, part_f, &part.o[r * dh..(r + 1) * dh]);
            l[r] = l[r] * old_f + part_f * part.l[r];
            m[r] = new;
        }
    }
    for (or, &lr) in o.chunks_exact_mut(dh).zip(&l) {
        if lr > 0.0 {
            or.iter_mut().for_each(|x| *x /= lr);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::attention_reference::{numbers, reference};
    use dynakv_core::quant::{KvDtype, PackedRows, RowCodec};

    #[test]
    fn blocked_prefill_equals_explicit_attention() {
        let heads = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 24,
        };
        let dh = heads.head_dim;
        // the generic copy declines: the caller takes the tensor path
        assert!(attend_with(heads, &[], &[], &[], None, KernelCopy::Generic).is_none());
        let copies: Vec<KernelCopy> = KernelCopy::available(dh)
            .into_iter()
            .filter(|&c| c != KernelCopy::Generic)
            .collect();
        // a prefill of 300 tokens after 65 cached ones: several query blocks
        // and key chunks, a diagonal that cuts chunks, chunks wholly after a
        // block. (a) every head holds positions 0..365: block 0's last
        // query is at 128, where chunk 1 starts, and with a window of 67
        // block 2's first query (193) is exactly 66 past chunk 0's last
        // key, so both skip rules meet their edge. (b) head 0 holds
        // positions 100..465, head 1 every other position below 130, then
        // 65.. (a per-head selection).
        let (cached, t) = (65, 300);
        let n = cached + t;
        let q_pos: Vec<usize> = (cached..n).collect();
        let q = numbers(heads.n_heads * t * dh, 9);
        let contiguous: Vec<usize> = (0..n).collect();
        let shifted: Vec<usize> = (100..100 + n).collect();
        let pruned: Vec<usize> = (0..cached).map(|i| 2 * i).chain(cached..n).collect();
        for (pos0, pos1) in [(&contiguous, &contiguous), (&shifted, &pruned)] {
            for dtype in [KvDtype::F32, KvDtype::F16] {
                let rows = |seed| {
                    let mut r = PackedRows::new(RowCodec::kv(dtype, false), dh);
                    r.push(&numbers(n * dh, seed));
                    r
                };
                let (k0, v0, k1, v1) = (rows(1), rows(2), rows(3), rows(4));
                let kv = [
                    HeadView {
                        k: &k0,
                        v: &v0,
                        positions: pos0,
                    },
                    HeadView {
                        k: &k1,
                        v: &v1,
                        positions: pos1,
                    },
                ];
                for window in [None, Some(67), Some(1)] {
                    let want = reference(heads, &q, &q_pos, &kv, window);
                    for &copy in &copies {
                        let got =
                            attend_with(heads, &q, &q_pos, &kv, window, copy).expect("plain rows");
                        let diff = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(diff < 2e-6, "{dtype:?} {window:?} {copy:?}: {diff}");
                    }
                }
            }
        }
        // a quantised dtype is not served: the tensor path takes it
        let mut k = PackedRows::new(RowCodec::kv(KvDtype::Q8_0, false), dh);
        k.push(&numbers(n * dh, 1));
        let kv = [HeadView {
            k: &k,
            v: &k,
            positions: &contiguous,
        }];
        let one = Heads {
            n_kv_heads: 1,
            ..heads
        };
        for &copy in &copies {
            assert!(attend_with(one, &q, &q_pos, &kv, None, copy).is_none());
        }
    }
}
