//! A fused host kernel for DynaKV decode steps: attention of a few queries
//! over the latent buckets, without building per-bucket tensors.
//!
//! Why: on a CPU the tensor path spends a decode step in small ops (one
//! reconstruction, RoPE table gather, mask and concatenation per bucket) and
//! copies every bucket on each append. Here each cached token is visited once:
//! pre-RoPE keys are reconstructed into one `d`-float buffer, rotated and
//! scored by every query head of the group while the buffer is in L1;
//! post-RoPE keys are scored in latent space against queries projected onto
//! the decoder once per step. Values are summed in latent space and decoded
//! once, as on the tensor path. Token chunks run in parallel (rayon).
//!
//! Everything here is plain `f32` slices, so it is tested against the tensor
//! path ([`crate::DynaKvCache`] with device storage) for exact agreement.

use rayon::prelude::*;

use dynakv_core::artifact::RopePlacement;
use dynakv_core::quant::PackedRows;

use crate::attention::hidden;

use super::latent_codes::{self, KeyCodes};
use super::latent_wide;
use super::math::{avx2_dispatch, axpy, dot, softmax_rows, sum_in_order, CHUNK};
use super::HostRope;

pub(crate) use super::math::Heads;

/// Host copies of one layer's decoders and means.
///
/// # Shapes
/// `dec_k`, `dec_v`: `[d, d]` row-major (row j = latent direction j, columns
/// head-major `h * head_dim + i`); `mean_k`, `mean_v`: `[d]`.
#[derive(Debug, Clone)]
pub(crate) struct HostBasis {
    pub dec_k: Vec<f32>,
    pub mean_k: Vec<f32>,
    pub dec_v: Vec<f32>,
    pub mean_v: Vec<f32>,
}

/// One rank bucket as the kernel reads it.
///
/// # Shapes
/// `lat`: `[n, rank]` rows (f32 read in place; a packed latent format is
/// decoded a tile at a time); `positions`, `ids`: `[n]`.
pub(crate) struct BucketView<'a> {
    pub rank: usize,
    pub lat: &'a PackedRows,
    pub positions: &'a [usize],
    pub ids: &'a [usize],
}

/// Attention of `T` queries over latent key and value buckets.
///
/// # Shapes
/// - `q`: `[H, T, head_dim]` row-major, RoPE applied; `q_pos`: `[T]`
/// - `keys`, `values`: buckets of `[n_b, rank_b]` latents (joint over KV heads)
/// - `n_ids`: one more than the largest token id stored
/// - returns `[H, T, head_dim]`
///
/// A query sees keys at positions `<=` its own, and within `window` of it
/// when given ([`crate::attention::hidden`]). Every query must see at least
/// one key (the caller guarantees it: a decode step follows its own append).
///
/// `wide`: the AVX-512 token loops ([`latent_wide`]) where the CPU and
/// shapes allow; `false` keeps the portable ones (tests hold the two
/// together). `key_codes`: the key decoder as 8-bit codes; with the wide
/// loops and AVX-512 VNNI, pre-RoPE keys stored as blocks of integer codes
/// (q8_0, q4_0, mixed) are rebuilt from them in integer arithmetic
/// ([`latent_codes`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    heads: Heads,
    placement: RopePlacement,
    basis: &HostBasis,
    rope: &HostRope,
    q: &[f32],
    q_pos: &[usize],
    keys: &[BucketView],
    values: &[BucketView],
    n_ids: usize,
    window: Option<usize>,
    wide: bool,
    key_codes: Option<&KeyCodes>,
) -> Vec<f32> {
    let (h, hk, dh) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let (t, groups, d) = (q_pos.len(), h / hk, hk * dh);
    let ht = h * t;
    let scale = 1.0 / (dh as f32).sqrt();
    // Post-RoPE: queries projected onto the key decoder once per step.
    let q_lat = match placement {
        RopePlacement::Post => Some(project_queries(heads, basis, q, t)),
        RopePlacement::Pre => None,
    };
    // Scores, query-major `[H*T, S]`: each query row's softmax runs over one
    // contiguous row; a token chunk writes its stretch of every row.
    let s_total: usize = keys.iter().map(|b| b.positions.len()).sum();
    let mut scores = vec![f32::NEG_INFINITY; ht * s_total];
    // Pre-RoPE keys rebuilt with AVX-512 where the CPU and shapes allow.
    let wide_keys =
        wide && placement == RopePlacement::Pre && latent_wide::available(heads.head_dim, rope);
    let job = Job {
        heads,
        basis,
        rope,
        q,
        q_pos,
        q_lat: q_lat.as_ref(),
        scale,
        window,
        key_codes: key_codes.filter(|_| wide_keys && latent_codes::available(d)),
    };
    // One parallel region over every (bucket, chunk) pair: a token-wise policy
    // leaves up to `d / 8` small buckets, and a region per bucket would pay
    // its fork-join each time.
    let mut spans = Vec::new();
    for b in keys {
        let n = b.positions.len();
        for first in (0..n).step_by(CHUNK) {
            spans.push((b, first, CHUNK.min(n - first)));
        }
    }
    let mut outs: Vec<Vec<&mut [f32]>> = spans.iter().map(|_| Vec::with_capacity(ht)).collect();
    if s_total > 0 {
        for row in scores.chunks_mut(s_total) {
            let mut rest = row;
            for (o, &(_, _, len)) in outs.iter_mut().zip(&spans) {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                o.push(piece);
                rest = tail;
            }
        }
    }
    spans
        .into_par_iter()
        .zip(outs)
        .for_each(|((b, first, _), mut out)| {
            #[cfg(target_arch = "x86_64")]
            if wide_keys {
                // SAFETY: `available` checked the CPU and the shapes
                unsafe { latent_wide::score_chunk(&job, b, first, &mut out) };
                return;
            }
            let _ = wide_keys;
            score_chunk(&job, b, first, &mut out)
        });
    softmax_rows(&mut scores, s_total);
    // Values: latent sums per query row, then one decode.
    let mut slot = vec![usize::MAX; n_ids];
    let mut s = 0;
    for b in keys {
        for &id in b.ids {
            slot[id] = s;
            s += 1;
        }
    }
    let values_job = ValueJob {
        slot: &slot,
        probs: &scores,
        slots: s_total,
        ht,
        d,
    };
    let wide_values = wide && latent_wide::available_for_values();
    let chunks: Vec<(&BucketView, usize)> = values
        .iter()
        .flat_map(|b| (0..b.positions.len().div_ceil(CHUNK)).map(move |c| (b, c)))
        .collect();
    let parts: Vec<Vec<f32>> = chunks
        .into_par_iter()
        .map(|(b, c)| {
            let mut z = vec![0f32; ht * d];
            let end = ((c + 1) * CHUNK).min(b.positions.len());
            #[cfg(target_arch = "x86_64")]
            if wide_values {
                // SAFETY: the CPU has AVX-512F (checked once above)
                unsafe { latent_wide::value_chunk(&values_job, b, c * CHUNK..end, &mut z) };
                return z;
            }
            let _ = wide_values;
            value_chunk(&values_job, b, c * CHUNK..end, &mut z);
            z
        })
        .collect();
    let z = sum_in_order(parts, ht * d);
    let mut out = vec![0f32; ht * dh];
    for qh in 0..h {
        let kv = qh / groups;
        for ti in 0..t {
            let qi = qh * t + ti;
            let o = &mut out[qi * dh..(qi + 1) * dh];
            o.copy_from_slice(&basis.mean_v[kv * dh..(kv + 1) * dh]);
            for (j, &a) in z[qi * d..(qi + 1) * d].iter().enumerate() {
                if a != 0.0 {
                    axpy(o, a, &basis.dec_v[j * d + kv * dh..j * d + (kv + 1) * dh]);
                }
            }
        }
    }
    out
}

/// What every key chunk reads.
pub(super) struct Job<'a> {
    pub heads: Heads,
    pub basis: &'a HostBasis,
    pub rope: &'a HostRope,
    pub q: &'a [f32],
    pub q_pos: &'a [usize],
    /// Post-RoPE only: projected queries `[H*T, d]` and offsets `[H*T]`.
    pub q_lat: Option<&'a (Vec<f32>, Vec<f32>)>,
    pub scale: f32,
    /// A sliding window hides keys this far behind a query or more.
    pub window: Option<usize>,
    /// The key decoder as 8-bit codes, when the wide kernel may use them.
    pub key_codes: Option<&'a KeyCodes>,
}

avx2_dispatch! {
    /// Scores of one chunk of a key bucket's tokens, starting at token `first`,
    /// into `out` (`[H*T]` rows of the chunk's length).
    fn score_chunk / score_chunk_avx2 => score_chunk_impl(
        job: &Job, b: &BucketView, first: usize, out: &mut [&mut [f32]]
    )
}

#[inline(always)]
fn score_chunk_impl(job: &Job, b: &BucketView, first: usize, out: &mut [&mut [f32]]) {
    let Heads {
        n_heads: h,
        n_kv_heads: hk,
        head_dim: dh,
    } = job.heads;
    let (t, groups, d) = (job.q_pos.len(), h / hk, hk * dh);
    let n = out.first().map_or(0, |r| r.len());
    // Reconstructed keys of a tile (pre-RoPE only; post-RoPE scores latents).
    let mut kbuf = match job.q_lat {
        None => vec![0f32; TILE * d],
        Some(_) => Vec::new(),
    };
    let mut latbuf = tile_buffer(b, TILE);
    let mut i = 0;
    while i < n {
        let m = (n - i).min(TILE);
        let lat = b.lat.rows(first + i, m, &mut latbuf);
        if job.q_lat.is_none() {
            // Pre-RoPE: reconstruct all KV heads of m tokens, then rotate.
            if m == TILE {
                reconstruct::<TILE>(lat, b.rank, job.basis, &mut kbuf);
            } else {
                for k in 0..m {
                    let one = &lat[k * b.rank..(k + 1) * b.rank];
                    reconstruct::<1>(one, b.rank, job.basis, &mut kbuf[k * d..(k + 1) * d]);
                }
            }
            for k in 0..m {
                for g in 0..hk {
                    let x = &mut kbuf[k * d + g * dh..k * d + (g + 1) * dh];
                    job.rope.rotate(x, b.positions[first + i + k]);
                }
            }
        }
        for k in 0..m {
            let pos = b.positions[first + i + k];
            let lat = &lat[k * b.rank..(k + 1) * b.rank];
            for (ti, &qp) in job.q_pos.iter().enumerate() {
                if hidden(qp, pos, job.window) {
                    continue;
                }
                for qh in 0..h {
                    let qi = qh * t + ti;
                    let s = match job.q_lat {
                        None => {
                            let kv = (qh / groups) * dh;
                            let key = &kbuf[k * d + kv..k * d + kv + dh];
                            dot(&job.q[qi * dh..(qi + 1) * dh], key)
                        }
                        Some((ql, off)) => dot(&ql[qi * d..qi * d + b.rank], lat) + off[qi],
                    };
                    out[qi][i + k] = s * job.scale;
                }
            }
        }
        i += m;
    }
}

/// Where `tile` tokens' latents of `b` are decoded when packed (empty for
/// f32 latents, which are read in place).
pub(super) fn tile_buffer(b: &BucketView, tile: usize) -> Vec<f32> {
    match b.lat.as_f32() {
        Some(_) => Vec::new(),
        None => vec![0f32; tile * b.rank],
    }
}

/// Tokens reconstructed together: each decoder row loaded once serves them all.
const TILE: usize = 4;
/// Columns per register block (two AVX registers).
const COLS: usize = 16;

/// `out[k] = mean_k + lat[k] · dec_k[..rank]` for M tokens of one rank,
/// register-blocked: M x COLS accumulators stay in registers while the
/// rank loop streams decoder rows.
///
/// # Shapes
/// `lat`: `[M, rank]`; `out`: `[M, d]`.
#[inline(always)]
fn reconstruct<const M: usize>(lat: &[f32], rank: usize, basis: &HostBasis, out: &mut [f32]) {
    let (dec, mean) = (&basis.dec_k, &basis.mean_k);
    let d = mean.len();
    let mut c0 = 0;
    while c0 + COLS <= d {
        let mut acc = [[0f32; COLS]; M];
        for row in acc.iter_mut() {
            row.copy_from_slice(&mean[c0..c0 + COLS]);
        }
        for j in 0..rank {
            let u = &dec[j * d + c0..j * d + c0 + COLS];
            for (k, row) in acc.iter_mut().enumerate() {
                let a = lat[k * rank + j];
                for (x, &y) in row.iter_mut().zip(u) {
                    *x += a * y;
                }
            }
        }
        for (k, row) in acc.iter().enumerate() {
            out[k * d + c0..k * d + c0 + COLS].copy_from_slice(row);
        }
        c0 += COLS;
    }
    for k in 0..M {
        for c in c0..d {
            out[k * d + c] = mean[c]
                + (0..rank)
                    .map(|j| lat[k * rank + j] * dec[j * d + c])
                    .sum::<f32>();
        }
    }
}

/// What every value chunk reads.
pub(super) struct ValueJob<'a> {
    /// Key slot of each token id (`usize::MAX`: no key stored).
    pub slot: &'a [usize],
    /// Attention weights, query-major `[H*T, S]`.
    pub probs: &'a [f32],
    /// `S`, the key slots (the row length of `probs`).
    pub slots: usize,
    pub ht: usize,
    pub d: usize,
}

avx2_dispatch! {
    /// Adds one chunk of a value bucket's latents, weighted by each query
    /// row's attention, into `z` (`[H*T, d]`).
    fn value_chunk / value_chunk_avx2 => value_chunk_impl(
        job: &ValueJob, b: &BucketView, toks: std::ops::Range<usize>, z: &mut [f32]
    )
}

#[inline(always)]
fn value_chunk_impl(job: &ValueJob, b: &BucketView, toks: std::ops::Range<usize>, z: &mut [f32]) {
    let (ht, d) = (job.ht, job.d);
    let mut buf = vec![0f32; b.rank];
    for tok in toks {
        let sl = job.slot[b.ids[tok]];
        if sl == usize::MAX {
            continue;
        }
        let lat = b.lat.row(tok, &mut buf);
        for qi in 0..ht {
            let wq = job.probs[qi * job.slots + sl];
            if wq != 0.0 {
                axpy(&mut z[qi * d..qi * d + b.rank], wq, lat);
            }
        }
    }
}

/// `q · dec_gᵀ` for every query row and `q · mean_g` (post-RoPE scoring).
///
/// # Shapes
/// returns (`[H*T, d]`, `[H*T]`)
fn project_queries(heads: Heads, basis: &HostBasis, q: &[f32], t: usize) -> (Vec<f32>, Vec<f32>) {
    let (h, hk, dh) = (heads.n_heads, heads.n_kv_heads, heads.head_dim);
    let (groups, d) = (h / hk, hk * dh);
    let mut ql = vec![0f32; h * t * d];
    let mut off = vec![0f32; h * t];
    for qh in 0..h {
        let kv = qh / groups;
        for ti in 0..t {
            let qi = qh * t + ti;
            let qv = &q[qi * dh..(qi + 1) * dh];
            for j in 0..d {
                ql[qi * d + j] = dot(qv, &basis.dec_k[j * d + kv * dh..j * d + (kv + 1) * dh]);
            }
            off[qi] = dot(qv, &basis.mean_k[kv * dh..(kv + 1) * dh]);
        }
    }
    (ql, off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_reconstruction_equals_the_plain_product() {
        // d = 40: two register blocks of 16 and a tail of 8
        let (d, rank) = (40, 5);
        let f = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        let basis = HostBasis {
            dec_k: (0..d * d).map(f).collect(),
            mean_k: (0..d).map(|i| f(i + 3)).collect(),
            dec_v: vec![],
            mean_v: vec![],
        };
        let lat: Vec<f32> = (0..TILE * rank).map(|i| f(i + 101)).collect();
        let want: Vec<f32> = (0..TILE * d)
            .map(|x| {
                let (k, c) = (x / d, x % d);
                basis.mean_k[c]
                    + (0..rank)
                        .map(|j| lat[k * rank + j] * basis.dec_k[j * d + c])
                        .sum::<f32>()
            })
            .collect();
        let mut tile = vec![0f32; TILE * d];
        reconstruct::<TILE>(&lat, rank, &basis, &mut tile);
        let mut one = vec![0f32; d];
        reconstruct::<1>(&lat[rank..2 * rank], rank, &basis, &mut one);
        for (a, b) in tile
            .iter()
            .zip(&want)
            .chain(one.iter().zip(&want[d..2 * d]))
        {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn dot_and_axpy_match_the_plain_loops() {
        let a: Vec<f32> = (0..11).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<f32> = (0..11).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-5);
        let mut y = b.clone();
        axpy(&mut y, 2.0, &a);
        for i in 0..11 {
            assert_eq!(y[i], b[i] + 2.0 * a[i]);
        }
    }
}
