//! Test-only references for the host attention kernels.

use super::dense_decode::HeadView;
use super::math::Heads;
use crate::attention::hidden;

/// Deterministic test numbers in [-0.5, 0.5).
pub(crate) fn numbers(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// Attention query by query with explicit loops, in f64 (a query that
/// sees no key gets zeros): what the host kernels are held to.
///
/// # Shapes
/// as `dense_decode::attend`
pub(crate) fn reference(
    heads: Heads,
    q: &[f32],
    q_pos: &[usize],
    kv: &[HeadView],
    window: Option<usize>,
) -> Vec<f32> {
    let (h, dh, t) = (heads.n_heads, heads.head_dim, q_pos.len());
    let groups = h / heads.n_kv_heads;
    let mut out = vec![0f32; h * t * dh];
    for qh in 0..h {
        let view = &kv[qh / groups];
        let (kf, vf) = (view.k.to_f32(), view.v.to_f32());
        for ti in 0..t {
            let qr = &q[(qh * t + ti) * dh..(qh * t + ti + 1) * dh];
            let s: Vec<Option<f64>> = (0..view.positions.len())
                .map(|j| {
                    (!hidden(q_pos[ti], view.positions[j], window)).then(|| {
                        let k = &kf[j * dh..(j + 1) * dh];
                        let d: f64 = qr.iter().zip(k).map(|(a, b)| (a * b) as f64).sum();
                        d / (dh as f64).sqrt()
                    })
                })
                .collect();
            let Some(mx) = s.iter().flatten().copied().reduce(f64::max) else {
                continue;
            };
            let e: Vec<f64> = s
                .iter()
                .map(|x| x.map_or(0.0, |x| (x - mx).exp()))
                .collect();
            let z: f64 = e.iter().sum();
            let o = &mut out[(qh * t + ti) * dh..(qh * t + ti + 1) * dh];
            for (i, x) in o.iter_mut().enumerate() {
                let v: f64 = e
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w * vf[j * dh + i] as f64)
                    .sum();
                *x = (v / z) as f32;
            }
        }
    }
    out
}
