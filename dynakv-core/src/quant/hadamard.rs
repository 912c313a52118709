//! The rotation llama.cpp applies to quantised KV caches.

/// Orthonormal Walsh-Hadamard transform of every row of length `n`, in
/// place: `x <- x H / sqrt(n)` (Sylvester order). Its own inverse, and it
/// keeps dot products, so keys and queries rotated alike score the same.
///
/// Why: a rotation spreads a few outlier channels over all of them, so the
/// 4-bit blocks of a q4_0 cache lose far less; llama.cpp rotates Q, K and V
/// this way whenever its KV cache is quantised (its `attn_rot`, 2026-04).
///
/// # Shapes
/// - `x`: `[rows, n]` row-major, `n` a power of two (otherwise untouched)
pub fn hadamard_rows(x: &mut [f32], n: usize) {
    if !n.is_power_of_two() || n < 2 {
        return;
    }
    let norm = 1.0 / (n as f32).sqrt();
    for row in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for block in row.chunks_exact_mut(2 * h) {
                let (a, b) = block.split_at_mut(h);
                for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                    let (s, d) = (*u + *v, *u - *v);
                    *u = s;
                    *v = d;
                }
            }
            h *= 2;
        }
        row.iter_mut().for_each(|v| *v *= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::numbers;
    #[test]
    fn the_hadamard_transform_is_orthonormal_and_its_own_inverse() {
        let n = 64;
        let x = numbers(3 * n, 4);
        let mut y = x.clone();
        hadamard_rows(&mut y, n);
        for r in 0..3 {
            let (a, b) = (&x[r * n..(r + 1) * n], &y[r * n..(r + 1) * n]);
            let na: f32 = a.iter().map(|v| v * v).sum();
            let nb: f32 = b.iter().map(|v| v * v).sum();
            assert!((na - nb).abs() < 1e-3 * na, "norm kept");
        }
        // dot products kept
        let (a, b) = (&x[..n], &x[n..2 * n]);
        let (ra, rb) = (&y[..n], &y[n..2 * n]);
        let d = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f32>();
        assert!((d(a, b) - d(ra, rb)).abs() < 1e-4);
        // one spike spreads evenly: the outlier a q4_0 block would suffer
        let mut spike = vec![0f32; n];
        spike[5] = 8.0;
        hadamard_rows(&mut spike, n);
        assert!(spike.iter().all(|v| (v.abs() - 1.0).abs() < 1e-6));
        hadamard_rows(&mut y, n);
        for (u, v) in x.iter().zip(&y) {
            assert!((u - v).abs() < 1e-5);
        }
        // not a power of two: untouched
        let mut odd = x[..48].to_vec();
        hadamard_rows(&mut odd, 48);
        assert_eq!(odd, &x[..48]);
    }
}
