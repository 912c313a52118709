//! A fused host kernel for the dense cache's decode steps: attention of a few
//! queries over keys and values kept in host vectors, one per KV head.
//!
//! Why: burn's fused attention wants contiguous `[B, H_kv, S, D]` keys, so a
//! tensor cache must concatenate (copy) all `S` tokens on every append, which
//! at 4k tokens costs more than the attention itself. Host vectors grow in
//! place, and this kernel reads them directly: per KV head, every key row is
//! loaded once and scored by the query heads of its group, then values are
//! summed with the softmax weights. Token chunks run in parallel (rayon).
//! The dense cache is the baseline every compressed cache is measured
//! against, so it gets the same care as DynaKV's kernel.
//!
//! f32 and f16 rows are read in place by a fused AVX2 + F16C kernel where
//! the CPU has those features (`attend_plain`, [`super::plain_rows`]); rows
//! in a quantised dtype (q8_0, q4_0, ...) are decoded a chunk of tokens at
//! a time into f32 and go through the same kernel (`attend_decoded`: with
//! the generic passes, one row at a time, a q8_0 cache made SmolLM2's
//! whole decode step at 8k tokens twice as slow as the f16 cache's); on
//! other CPUs every dtype takes the generic passes, decoded one row at a
//! time into a `head_dim` buffer that stays in L1.

use dynakv_core::quant::PackedRows;
use rayon::prelude::*;

use crate::attention::hidden;

use super::math::{avx2_dispatch, axpy, dot, softmax_columns, sum_in_order, Heads, CHUNK};
use super::plain_rows::{self, KernelCopy, PlainRows};

/// One KV head's stored tokens as the kernel reads them.
///
/// # Shapes
/// `k` (RoPE applied), `v`: `[n, head_dim]` rows; `positions`: `[n]`.
pub(crate) struct HeadView<'a> {
    pub k: &'a PackedRows,
    pub v: &'a PackedRows,
    pub positions: &'a [usize],
}

/// Attention of `T` queries over per-KV-head keys and values.
///
/// # Shapes
/// - `q`: `[H, T, head_dim]` row-major, RoPE applied; `q_pos`: `[T]`
/// - `kv`: one view per KV head, every head holding the same number of tokens
///   (their positions may differ: a per-head pruning keeps equal counts)
/// - returns `[H, T, head_dim]`
///
/// A query sees keys at positions `<=` its own, and within `window` of it
/// when there is one ([`crate::attention::hidden`]). Every query must see at
/// least one key of every head (a decode step follows its own append).
pub(crate) fn attend(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    kv: &[HeadView],
    window: Option<usize>,
) -> Vec<f32> {
    let copy = KernelCopy::best(heads.head_dim);
    attend_with(heads, q, q_pos, kv, window, copy)
}

/// [`attend`] on the plain-row kernels' copy `copy` where every row is f32
/// or f16, on the generic ones otherwise (or when `copy` is `Generic`).
fn attend_with(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    kv: &[HeadView],
    window: Option<usize>,
    copy: KernelCopy,
) -> Vec<f32> {
    let (h, dh, t) = (heads.n_heads, heads.head_dim, q_pos.len());
    let ht = h * t;
    let n = kv.first().map_or(0, |v| v.positions.len());
    debug_assert!(kv.iter().all(|v| v.positions.len() == n));
    let job = ScoreJob {
        q,
        q_pos,
        kv,
        gt: ht / kv.len().max(1),
        t,
        dh,
        window,
        scale: 1.0 / (dh as f32).sqrt(),
    };
    #[cfg(target_arch = "x86_64")]
    if copy != KernelCopy::Generic {
        return match plain_views(kv, n, dh) {
            Some(rows) => attend_plain(&job, &rows, n, copy),
            None => attend_decoded(&job, n, copy),
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = copy;
    // Scores, slot-major `[n, H*T]` (column `qh * T + ti`, so the query rows
    // of KV head g are the columns `g*G*T .. (g+1)*G*T`): token chunks write
    // disjoint rows, and one softmax and one value pass serve every head.
    let mut scores = vec![0f32; n * ht];
    scores
        .par_chunks_mut(CHUNK * ht)
        .enumerate()
        .for_each(|(c, rows)| score_chunk(&job, c * CHUNK, rows));
    softmax_columns(&mut scores, ht);
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut o = vec![0f32; ht * dh];
            let toks = c * CHUNK..((c + 1) * CHUNK).min(n);
            value_chunk(&job, &scores, toks, &mut o);
            o
        })
        .collect();
    sum_in_order(parts, ht * dh)
}

/// Every head's keys and values as plain f32 / f16 rows, or `None` when a
/// head holds another dtype or fewer than `n` rows of `dh` (the plain-row
/// kernels read rows by pointer, so this is checked once, not per row).
#[cfg(target_arch = "x86_64")]
pub(super) fn plain_views<'a>(
    kv: &'a [HeadView],
    n: usize,
    dh: usize,
) -> Option<Vec<[PlainRows<'a>; 2]>> {
    kv.iter()
        .map(|v| {
            let rows = [PlainRows::of(v.k)?, PlainRows::of(v.v)?];
            rows.iter().all(|r| r.len() >= n * dh).then_some(rows)
        })
        .collect()
}

/// What every token chunk reads.
pub(super) struct ScoreJob<'a> {
    /// `[H*T, D]`
    pub q: &'a [f32],
    pub q_pos: &'a [usize],
    pub kv: &'a [HeadView<'a>],
    /// Query rows per KV head, `G * T`.
    pub gt: usize,
    pub t: usize,
    pub dh: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

avx2_dispatch! {
    /// Scores of every query row against tokens `first..`.
    fn score_chunk / score_chunk_avx2 => score_chunk_impl(
        job: &ScoreJob, first: usize, rows: &mut [f32]
    )
}

#[inline(always)]
fn score_chunk_impl(job: &ScoreJob, first: usize, rows: &mut [f32]) {
    let (dh, t, gt) = (job.dh, job.t, job.gt);
    let ht = gt * job.kv.len();
    let mut buf = vec![0f32; dh];
    for (j, row) in rows.chunks_mut(ht).enumerate() {
        let s = first + j;
        for (g, (view, cols)) in job.kv.iter().zip(row.chunks_mut(gt)).enumerate() {
            let key = view.k.row(s, &mut buf);
            let pos = view.positions[s];
            for (i, out) in cols.iter_mut().enumerate() {
                let r = g * gt + i;
                *out = if hidden(job.q_pos[r % t], pos, job.window) {
                    f32::NEG_INFINITY
                } else {
                    dot(&job.q[r * dh..(r + 1) * dh], key) * job.scale
                };
            }
        }
    }
}

avx2_dispatch! {
    /// `o[r] += p[s, r] * v_g(r)[s]` over the tokens `toks`.
    fn value_chunk / value_chunk_avx2 => value_chunk_impl(
        job: &ScoreJob, probs: &[f32], toks: std::ops::Range<usize>, o: &mut [f32]
    )
}

#[inline(always)]
fn value_chunk_impl(job: &ScoreJob, probs: &[f32], toks: std::ops::Range<usize>, o: &mut [f32]) {
    let (dh, gt) = (job.dh, job.gt);
    let ht = gt * job.kv.len();
    let mut buf = vec![0f32; dh];
    for s in toks {
        let p = &probs[s * ht..(s + 1) * ht];
        for (g, view) in job.kv.iter().enumerate() {
            let value = view.v.row(s, &mut buf);
            for r in g * gt..(g + 1) * gt {
                if p[r] != 0.0 {
                    axpy(&mut o[r * dh..(r + 1) * dh], p[r], value);
                }
            }
        }
    }
}

/// [`attend`] over rows read in place, fused per chunk of tokens: each
/// chunk scores its tokens, takes a softmax relative to its own maximum and
/// sums its values with those weights; the chunks' parts are then merged
/// with one rescaling each (the split used by flash-decoding). One parallel
/// pass per layer instead of five, and the scores never leave the chunk.
///
/// # Shapes
/// returns `[G*T*H_kv, head_dim]`, row `r` the query row `r` of `job.q`
#[cfg(target_arch = "x86_64")]
fn attend_plain(job: &ScoreJob, rows: &[[PlainRows; 2]], n: usize, copy: KernelCopy) -> Vec<f32> {
    let parts: Vec<Part> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let toks = c * CHUNK..((c + 1) * CHUNK).min(n);
            // SAFETY: `copy` is one this CPU runs for this head width
            // (KernelCopy::best or ::available), not Generic
            unsafe { chunk_f16c(job, rows, toks, 0, copy) }
        })
        .collect();
    merged(job, &parts)
}

/// [`attend`] over rows in a quantised dtype: each chunk of tokens decodes
/// its keys and values to f32 (`PackedRows::rows`, once per row and step,
/// as the generic passes do) and runs the fused kernel of
/// [`attend_plain`] on them.
///
/// # Shapes
/// returns `[G*T*H_kv, head_dim]`, row `r` the query row `r` of `job.q`
#[cfg(target_arch = "x86_64")]
fn attend_decoded(job: &ScoreJob, n: usize, copy: KernelCopy) -> Vec<f32> {
    let dh = job.dh;
    // one chunk's decoded keys and values per head, reused across chunks
    let buffers = || -> Vec<[Vec<f32>; 2]> {
        job.kv
            .iter()
            .map(|_| [vec![0f32; CHUNK * dh], vec![0f32; CHUNK * dh]])
            .collect()
    };
    let parts: Vec<Part> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map_init(buffers, |bufs, c| {
            let toks = c * CHUNK..((c + 1) * CHUNK).min(n);
            let len = toks.len();
            let rows: Vec<[PlainRows; 2]> = job
                .kv
                .iter()
                .zip(bufs.iter_mut())
                .map(|(view, [kb, vb])| {
                    [
                        PlainRows::F32(view.k.rows(toks.start, len, kb)),
                        PlainRows::F32(view.v.rows(toks.start, len, vb)),
                    ]
                })
                .collect();
            // SAFETY: `copy` is one this CPU runs for this head width, not
            // Generic; `rows` hold the chunk's tokens, from `toks.start`
            unsafe { chunk_f16c(job, &rows, toks.clone(), toks.start, copy) }
        })
        .collect();
    merged(job, &parts)
}

/// The chunks' [`Part`]s merged into every query row's attention output,
/// one rescaling each (flash-decoding's merge).
///
/// # Shapes
/// returns `[G*T*H_kv, head_dim]`
#[cfg(target_arch = "x86_64")]
fn merged(job: &ScoreJob, parts: &[Part]) -> Vec<f32> {
    let (dh, ht) = (job.dh, job.gt * job.kv.len());
    let mut out = vec![0f32; ht * dh];
    for (r, o) in out.chunks_exact_mut(dh).enumerate() {
        let m = parts
            .iter()
            .map(|p| p.m[r])
            .fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let mut l = 0f32;
        for p in parts.iter().filter(|p| p.m[r] > f32::NEG_INFINITY) {
            let f = (p.m[r] - m).exp();
            l += f * p.l[r];
            axpy(o, f, &p.o[r * dh..(r + 1) * dh]);
        }
        o.iter_mut().for_each(|x| *x /= l);
    }
    out
}

/// One chunk's share of every query row's attention: its largest visible
/// score `m` (`-inf` when it has none), the sum `l` of `exp(score - m)`, and
/// the values summed with those weights.
#[cfg(target_arch = "x86_64")]
pub(super) struct Part {
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    /// `[rows, head_dim]`
    pub o: Vec<f32>,
}

/// Query rows taken together by the kernels (their accumulators fill the
/// sixteen AVX2 registers).
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 3;

/// [`ROWS`] with 32 vector registers: six query rows' accumulators against
/// four tokens (scores) or four lanes (values) still fit, and each key or
/// value load feeds twice as many products.
#[cfg(target_arch = "x86_64")]
const WIDE_ROWS: usize = 6;

/// Tokens `toks`' [`Part`] of every query row of `job`: scores, a softmax
/// relative to the chunk's own maximum, and the weighted values. Token `s`
/// is row `s - row_base` of `rows` (0 for rows read in place; the chunk's
/// first token for a chunk decoded on its own).
///
/// # Shapes
/// returns parts of `job.gt * H_kv` rows
///
/// # Safety
/// `copy` is not `Generic` and is one this CPU runs for this head width
/// ([`KernelCopy::best`]); `rows` hold at least `toks.end - row_base`
/// tokens, `row_base <= toks.start`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn chunk_f16c(
    job: &ScoreJob,
    rows: &[[PlainRows; 2]],
    toks: std::ops::Range<usize>,
    row_base: usize,
    copy: KernelCopy,
) -> Part {
    if copy == KernelCopy::Avx2Wide {
        chunk_wide(job, rows, toks, row_base)
    } else {
        chunk_narrow(job, rows, toks, row_base)
    }
}

/// [`chunk_body`] for AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_narrow(
    job: &ScoreJob,
    rows: &[[PlainRows; 2]],
    toks: std::ops::Range<usize>,
    row_base: usize,
) -> Part {
    chunk_body::<ROWS>(job, rows, toks, row_base)
}

/// [`chunk_body`] where the CPU also has AVX-512F/VL: the same eight-lane
/// code, but the compiler has 32 vector registers instead of 16, so it
/// takes [`WIDE_ROWS`] query rows at a time without spilling accumulators
/// to the stack (three rows spilled with 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn chunk_wide(
    job: &ScoreJob,
    rows: &[[PlainRows; 2]],
    toks: std::ops::Range<usize>,
    row_base: usize,
) -> Part {
    chunk_body::<WIDE_ROWS>(job, rows, toks, row_base)
}

/// The body of [`chunk_f16c`], compiled inside each copy, `ROWS_N` query
/// rows at a time (at most six).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn chunk_body<const ROWS_N: usize>(
    job: &ScoreJob,
    rows: &[[PlainRows; 2]],
    toks: std::ops::Range<usize>,
    row_base: usize,
) -> Part {
    use plain_rows::x86::{exp_shifted_sum, max, weighted_rows};
    let (dh, t, gt) = (job.dh, job.t, job.gt);
    let lanes = dh / 8;
    let ht = gt * job.kv.len();
    // `first` indexes `rows`; positions are indexed by `toks`
    let (first, len) = (toks.start - row_base, toks.len());
    // scores, query-major: row r's weights are contiguous for the softmax
    let mut s = vec![0f32; ht * len];
    let mut part = Part {
        m: vec![f32::NEG_INFINITY; ht],
        l: vec![0f32; ht],
        o: vec![0f32; ht * dh],
    };
    for (g, (view, &[k, v])) in job.kv.iter().zip(rows).enumerate() {
        let group = g * gt..(g + 1) * gt;
        let mut r = group.start;
        while r < group.end {
            let take = (group.end - r).min(ROWS_N);
            let qs = &job.q[r * dh..(r + take) * dh];
            let out = &mut s[r * len..(r + take) * len];
            match take {
                6 => scores::<6>(k, first, len, lanes, qs, job.scale, out),
                5 => scores::<5>(k, first, len, lanes, qs, job.scale, out),
                4 => scores::<4>(k, first, len, lanes, qs, job.scale, out),
                3 => scores::<3>(k, first, len, lanes, qs, job.scale, out),
                2 => scores::<2>(k, first, len, lanes, qs, job.scale, out),
                _ => scores::<1>(k, first, len, lanes, qs, job.scale, out),
            }
            r += take;
        }
        let positions = &view.positions[toks.clone()];
        for r in group.clone() {
            let row = &mut s[r * len..(r + 1) * len];
            let qpos = job.q_pos[r % t];
            for (x, &pos) in row.iter_mut().zip(positions) {
                if hidden(qpos, pos, job.window) {
                    *x = f32::NEG_INFINITY;
                }
            }
            let m = max(row);
            if m == f32::NEG_INFINITY {
                row.fill(0.0);
            } else {
                part.m[r] = m;
                part.l[r] = exp_shifted_sum(row, m);
            }
        }
        let mut r = group.start;
        while r < group.end {
            let take = (group.end - r).min(ROWS_N);
            let ws = &s[r * len..(r + take) * len];
            let out = &mut part.o[r * dh..(r + take) * dh];
            let mut c0 = 0;
            while c0 < lanes {
                let wide = lanes - c0 >= 4;
                match (take, wide) {
                    (6, true) => weighted_rows::<6, 4>(v, first, len, lanes, c0, ws, out),
                    (5, true) => weighted_rows::<5, 4>(v, first, len, lanes, c0, ws, out),
                    (4, true) => weighted_rows::<4, 4>(v, first, len, lanes, c0, ws, out),
                    (3, true) => weighted_rows::<3, 4>(v, first, len, lanes, c0, ws, out),
                    (2, true) => weighted_rows::<2, 4>(v, first, len, lanes, c0, ws, out),
                    (_, true) => weighted_rows::<1, 4>(v, first, len, lanes, c0, ws, out),
                    (6, false) => weighted_rows::<6, 1>(v, first, len, lanes, c0, ws, out),
                    (5, false) => weighted_rows::<5, 1>(v, first, len, lanes, c0, ws, out),
                    (4, false) => weighted_rows::<4, 1>(v, first, len, lanes, c0, ws, out),
                    (3, false) => weighted_rows::<3, 1>(v, first, len, lanes, c0, ws, out),
                    (2, false) => weighted_rows::<2, 1>(v, first, len, lanes, c0, ws, out),
                    (_, false) => weighted_rows::<1, 1>(v, first, len, lanes, c0, ws, out),
                }
                c0 += if wide { 4 } else { 1 };
            }
            r += take;
        }
    }
    part
}

/// `R` query rows' scaled scores against rows `first..first + len` of `k`,
/// four tokens at a time.
///
/// # Safety
/// As [`plain_rows::x86::dots4`]; `out` holds `R * len` scores.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores<const R: usize>(
    k: PlainRows,
    first: usize,
    len: usize,
    lanes: usize,
    qs: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    use plain_rows::x86::{dot1, dots4};
    let dh = 8 * lanes;
    let mut j = 0;
    while j + 4 <= len {
        let d = dots4::<R>(k, first + j, lanes, qs);
        for (r, d) in d.iter().enumerate() {
            for (jj, v) in d.iter().enumerate() {
                out[r * len + j + jj] = v * scale;
            }
        }
        j += 4;
    }
    for j in j..len {
        for r in 0..R {
            out[r * len + j] = dot1(k, first + j, lanes, &qs[r * dh..]) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::attention_reference::{numbers, reference};
    use dynakv_core::quant::{KvDtype, RowCodec};

    #[test]
    fn the_kernel_equals_explicit_attention_across_chunks_and_pruned_heads() {
        let heads = Heads {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 40,
        };
        let dh = heads.head_dim;
        // 300 tokens span three work chunks; head 1 was pruned to every other
        // position (a per-head SnapKV selection); two queries, the first at a
        // position that masks the last keys.
        let n = 300;
        let pos0: Vec<usize> = (0..n).collect();
        let pos1: Vec<usize> = (0..n).map(|i| 2 * i).collect();
        // every dtype: packed rows are decoded one at a time, and attention
        // over them equals explicit attention over the decoded values
        // (head_dim 40: a full q8_0 / q4_0 block and a short one)
        for dtype in KvDtype::ALL {
            let rows = |seed| {
                let mut r = PackedRows::new(RowCodec::kv(dtype, seed % 2 == 1), dh);
                r.push(&numbers(n * dh, seed));
                r
            };
            let (k0, v0, k1, v1) = (rows(1), rows(2), rows(3), rows(4));
            let kv = [
                HeadView {
                    k: &k0,
                    v: &v0,
                    positions: &pos0,
                },
                HeadView {
                    k: &k1,
                    v: &v1,
                    positions: &pos1,
                },
            ];
            check(heads, &kv);
        }
    }

    fn check(heads: Heads, kv: &[HeadView]) {
        let dh = heads.head_dim;
        let q_pos = [450, 598];
        let q = numbers(heads.n_heads * q_pos.len() * dh, 5);
        // causal, and a sliding window that hides the older keys
        // every copy of the kernel this CPU runs
        for window in [None, Some(200)] {
            let want = reference(heads, &q, &q_pos, kv, window);
            for copy in KernelCopy::available(dh) {
                let got = attend_with(heads, &q, &q_pos, kv, window, copy);
                let diff = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-5, "{window:?}, {copy:?}: {diff}");
            }
        }
    }
}
