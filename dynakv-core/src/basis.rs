//! Spectral bases: an encoder/decoder pair per layer and per K/V, ordered so
//! that every prefix of the latent is the best subspace of its size.
//!
//! A basis minimises the expected reconstruction error in a metric `M`:
//! `E[(x - x̂)^T M (x - x̂)]`. With `S = M^{1/2}` and `C_w = S C S = U Λ U^T`
//! (eigenvalues descending), the encoder is `S U` and the decoder `U^T S^{-1}`;
//! `M = I` is plain PCA (the paper's initialisation). The mean is removed before
//! encoding and added back after decoding, so reconstruction at full rank is
//! exact.

use nalgebra::{DMatrix, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::stats::MomentAccumulator;

/// Which metric the basis minimises error in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum BasisKind {
    /// Plain PCA: key/value reconstruction error.
    Pca,
    /// Keys weighted by the query energy of each RoPE pair: score error.
    QueryAware,
    /// Values weighted by the output projection `W_o`: output error.
    OutputAware,
}

impl std::str::FromStr for BasisKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        match s {
            "pca" => Ok(Self::Pca),
            "query-aware" => Ok(Self::QueryAware),
            "output-aware" => Ok(Self::OutputAware),
            o => Err(CoreError::Invalid {
                field: "basis",
                message: format!("`{o}` (expected pca, query-aware or output-aware)"),
            }),
        }
    }
}

/// Encoder/decoder pair with the mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Basis {
    pub dim: usize,
    /// `[dim]`
    pub mean: Vec<f32>,
    /// `[dim, dim]` row-major: `latent = (x - mean) · enc`.
    pub enc: Vec<f32>,
    /// `[dim, dim]` row-major: `x = latent · dec + mean`; row `i` is the
    /// direction of latent coordinate `i`.
    pub dec: Vec<f32>,
    /// Variance captured by each latent coordinate (in the metric), descending.
    pub eigenvalues: Vec<f64>,
}

fn sym(d: usize, v: &[f64]) -> DMatrix<f64> {
    DMatrix::from_row_slice(d, d, v)
}

fn to_row_major_f32(m: &DMatrix<f64>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)] as f32);
        }
    }
    out
}

/// Eigenpairs sorted by descending eigenvalue.
fn sorted_eigen(m: DMatrix<f64>) -> (Vec<f64>, DMatrix<f64>) {
    let d = m.nrows();
    let e = SymmetricEigen::new(m);
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| e.eigenvalues[b].total_cmp(&e.eigenvalues[a]));
    let vals = order.iter().map(|&i| e.eigenvalues[i]).collect();
    let vecs = DMatrix::from_fn(d, d, |r, c| e.eigenvectors[(r, order[c])]);
    (vals, vecs)
}

impl Basis {
    /// Plain PCA of the accumulated vectors.
    pub fn pca(acc: &MomentAccumulator) -> Result<Self, CoreError> {
        let d = acc.dim();
        let mut eye = vec![0.0; d * d];
        (0..d).for_each(|i| eye[i * d + i] = 1.0);
        Self::weighted(acc, &eye)
    }

    /// The basis minimising error in the metric `metric` (`[dim, dim]`,
    /// symmetric positive semi-definite, row-major). Directions the metric
    /// ignores are regularised with a small floor so the pair stays invertible.
    pub fn weighted(acc: &MomentAccumulator, metric: &[f64]) -> Result<Self, CoreError> {
        let d = acc.dim();
        if acc.count() < 2 {
            return Err(CoreError::Invalid {
                field: "calibration",
                message: format!("{} vectors is too few for a basis", acc.count()),
            });
        }
        if metric.len() != d * d || metric.iter().any(|v| !v.is_finite()) {
            return Err(CoreError::Invalid {
                field: "metric",
                message: format!("expected {d}x{d} finite values"),
            });
        }
        let (mvals, mvecs) = sorted_eigen(sym(d, metric));
        let top = mvals.first().copied().unwrap_or(1.0).max(1e-30);
        let floor = top * 1e-6;
        let s_diag: Vec<f64> = mvals.iter().map(|&v| v.max(floor).sqrt()).collect();
        let s = &mvecs
            * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(s_diag.clone()))
            * mvecs.transpose();
        let s_inv = &mvecs
            * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(
                s_diag.iter().map(|v| 1.0 / v).collect(),
            ))
            * mvecs.transpose();
        let c = sym(d, &acc.covariance());
        let cw = &s * c * &s;
        let cw = (&cw + cw.transpose()) * 0.5;
        let (vals, u) = sorted_eigen(cw);
        let enc = &s * &u;
        let dec = u.transpose() * s_inv;
        Ok(Self {
            dim: d,
            mean: acc.mean().iter().map(|&v| v as f32).collect(),
            enc: to_row_major_f32(&enc),
            dec: to_row_major_f32(&dec),
            eigenvalues: vals,
        })
    }

    /// Latent of one vector: `(x - mean) · enc`.
    pub fn encode(&self, x: &[f32]) -> Vec<f32> {
        let d = self.dim;
        let c: Vec<f32> = x.iter().zip(&self.mean).map(|(a, m)| a - m).collect();
        (0..d)
            .map(|j| (0..d).map(|i| c[i] * self.enc[i * d + j]).sum())
            .collect()
    }

    /// Reconstruction from the first `latent.len()` coordinates.
    pub fn decode(&self, latent: &[f32]) -> Vec<f32> {
        let d = self.dim;
        let mut x = self.mean.clone();
        for (i, &l) in latent.iter().enumerate() {
            for (j, xj) in x.iter_mut().enumerate() {
                *xj += l * self.dec[i * d + j];
            }
        }
        x
    }

    /// The mean expressed in latent coordinates of the metric (`mean · S U`
    /// with `S U = enc`), used to measure a token's own uncentred energy.
    pub fn mean_latent(&self) -> Vec<f32> {
        let d = self.dim;
        (0..d)
            .map(|j| (0..d).map(|i| self.mean[i] * self.enc[i * d + j]).sum())
            .collect()
    }
}

/// Block-diagonal query-aware metric for joint keys: for each KV head, the
/// mean over its query heads of the energy of each RoPE pair (rotation
/// invariant, so it holds whatever the relative position).
///
/// `q_energy[h][i]` is `E[q_{h,i}^2]` of query head `h`; `groups` query heads
/// share a KV head; returns `[d_kv, d_kv]` row-major.
pub fn query_metric(q_energy: &[Vec<f64>], n_kv_heads: usize, head_dim: usize) -> Vec<f64> {
    let d = n_kv_heads * head_dim;
    let groups = q_energy.len() / n_kv_heads.max(1);
    let mut m = vec![0.0; d * d];
    for g in 0..n_kv_heads {
        for p in 0..head_dim / 2 {
            let mut e = 0.0;
            for q in &q_energy[g * groups..(g + 1) * groups] {
                e += (q[2 * p] + q[2 * p + 1]) / 2.0;
            }
            for i in [2 * p, 2 * p + 1] {
                let k = g * head_dim + i;
                m[k * d + k] = e / groups as f64;
            }
        }
    }
    m
}

/// Block-diagonal output-aware metric for joint values: for KV head `g`,
/// `sum over its query heads h of W_o[h] W_o[h]^T`, where `W_o[h]` is the
/// `[head_dim, d_model]` slice of `W_o` (`[n_heads * head_dim, d_model]`,
/// row-major) that multiplies head `h`'s output.
pub fn output_metric(wo: &[f32], n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Vec<f64> {
    let d = n_kv_heads * head_dim;
    let d_model = wo.len() / (n_heads * head_dim).max(1);
    let groups = n_heads / n_kv_heads.max(1);
    let mut m = vec![0.0; d * d];
    for h in 0..n_heads {
        let g = h / groups;
        for a in 0..head_dim {
            let ra = &wo[(h * head_dim + a) * d_model..(h * head_dim + a + 1) * d_model];
            for b in 0..head_dim {
                let rb = &wo[(h * head_dim + b) * d_model..(h * head_dim + b + 1) * d_model];
                let dot: f64 = ra.iter().zip(rb).map(|(x, y)| *x as f64 * *y as f64).sum();
                m[(g * head_dim + a) * d + g * head_dim + b] += dot;
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, d: usize) -> (MomentAccumulator, Vec<f32>) {
        // Correlated data with a non-zero mean and decaying scales.
        let mut rows = Vec::new();
        let mut s = 12345u64;
        for _ in 0..n {
            let mut z = Vec::new();
            for _ in 0..d {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                z.push(((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) as f32);
            }
            for i in 0..d {
                let mixed = z[i] * (d - i) as f32 + if i > 0 { 0.5 * z[i - 1] } else { 0.0 } + 3.0;
                rows.push(mixed);
            }
        }
        let mut acc = MomentAccumulator::new(d);
        acc.add_rows(&rows).unwrap();
        (acc, rows)
    }

    #[test]
    fn full_rank_reconstructs_exactly_and_error_shrinks_with_rank() {
        let d = 6;
        let (acc, rows) = sample(200, d);
        for metric in [
            None,
            Some(vec![
                2.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0,
                0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0,
                0.0, 0.0, 0.0, 0.1,
            ]),
        ] {
            let b = match &metric {
                None => Basis::pca(&acc).unwrap(),
                Some(m) => Basis::weighted(&acc, m).unwrap(),
            };
            let x = &rows[..d];
            let lat = b.encode(x);
            let full = b.decode(&lat);
            for (a, c) in x.iter().zip(&full) {
                assert!((a - c).abs() < 1e-3, "{x:?} vs {full:?}");
            }
            // mean error over the data does not grow with rank
            let mut last = f64::INFINITY;
            for r in 0..=d {
                let mut err = 0.0;
                for row in rows.chunks_exact(d) {
                    let l = b.encode(row);
                    let y = b.decode(&l[..r]);
                    let e: Vec<f64> = row.iter().zip(&y).map(|(a, c)| (a - c) as f64).collect();
                    err += match &metric {
                        None => e.iter().map(|v| v * v).sum::<f64>(),
                        Some(m) => (0..d)
                            .map(|i| (0..d).map(|j| e[i] * m[i * d + j] * e[j]).sum::<f64>())
                            .sum(),
                    };
                }
                assert!(err <= last + 1e-6, "rank {r}: {err} > {last}");
                last = err;
            }
        }
        assert!(b_is_sorted(&Basis::pca(&acc).unwrap()));
    }

    fn b_is_sorted(b: &Basis) -> bool {
        b.eigenvalues.windows(2).all(|w| w[0] >= w[1])
    }

    #[test]
    fn too_little_data_is_an_error() {
        let mut acc = MomentAccumulator::new(2);
        acc.add_rows(&[1.0, 2.0]).unwrap();
        assert!(Basis::pca(&acc).is_err());
        assert!("nope".parse::<BasisKind>().is_err());
    }

    #[test]
    fn metrics_are_block_diagonal() {
        let q = vec![vec![1.0, 3.0, 2.0, 2.0]; 4]; // 4 query heads, head_dim 4
        let m = query_metric(&q, 2, 4);
        assert_eq!(m[0], 2.0);
        assert_eq!(m[8 + 1], 2.0);
        assert_eq!(m[1], 0.0);
        let wo: Vec<f32> = (0..4 * 4 * 3).map(|i| i as f32 * 0.1).collect(); // [16, 3]
        let m = output_metric(&wo, 4, 2, 4);
        assert_eq!(m[4], 0.0); // head 0 block does not touch head 1 block
        assert!(m[0] > 0.0);
    }
}
