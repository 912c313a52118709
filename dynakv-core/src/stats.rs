//! Streaming first and second moments in f64, mergeable across workers.
//!
//! Calibration feeds every token's joint key (or value) vector of a layer into
//! one accumulator; the mean and covariance then define the spectral basis.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Running sum and sum of outer products of `dim`-vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MomentAccumulator {
    dim: usize,
    count: u64,
    sum: Vec<f64>,
    /// Row-major `dim x dim`, upper triangle filled (symmetrised on read).
    outer: Vec<f64>,
}

impl MomentAccumulator {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            count: 0,
            sum: vec![0.0; dim],
            outer: vec![0.0; dim * dim],
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds the rows of a row-major `[n, dim]` matrix.
    pub fn add_rows(&mut self, rows: &[f32]) -> Result<(), CoreError> {
        if self.dim == 0 || !rows.len().is_multiple_of(self.dim) {
            return Err(CoreError::Invalid {
                field: "rows",
                message: format!(
                    "{} values is not a multiple of dim {}",
                    rows.len(),
                    self.dim
                ),
            });
        }
        let d = self.dim;
        for row in rows.chunks_exact(d) {
            let x: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            for i in 0..d {
                self.sum[i] += x[i];
                let xi = x[i];
                let o = &mut self.outer[i * d..(i + 1) * d];
                for j in i..d {
                    o[j] += xi * x[j];
                }
            }
            self.count += 1;
        }
        Ok(())
    }

    /// Combines another accumulator of the same dimension into this one.
    pub fn merge(&mut self, other: &Self) -> Result<(), CoreError> {
        if other.dim != self.dim {
            return Err(CoreError::Invalid {
                field: "dim",
                message: format!("cannot merge dim {} into dim {}", other.dim, self.dim),
            });
        }
        self.count += other.count;
        self.sum
            .iter_mut()
            .zip(&other.sum)
            .for_each(|(a, b)| *a += b);
        self.outer
            .iter_mut()
            .zip(&other.outer)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    pub fn mean(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum.iter().map(|s| s / n).collect()
    }

    /// Second moment `E[x x^T]`, row-major.
    pub fn second_moment(&self) -> Vec<f64> {
        let d = self.dim;
        let n = self.count.max(1) as f64;
        let mut m = vec![0.0; d * d];
        for i in 0..d {
            for j in i..d {
                let v = self.outer[i * d + j] / n;
                m[i * d + j] = v;
                m[j * d + i] = v;
            }
        }
        m
    }

    /// Covariance `E[(x - mu)(x - mu)^T]`, row-major.
    pub fn covariance(&self) -> Vec<f64> {
        let d = self.dim;
        let mu = self.mean();
        let mut c = self.second_moment();
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] -= mu[i] * mu[j];
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_covariance_by_hand() {
        let mut a = MomentAccumulator::new(2);
        a.add_rows(&[1.0, 2.0, 3.0, 6.0]).unwrap();
        assert_eq!(a.mean(), vec![2.0, 4.0]);
        assert_eq!(a.covariance(), vec![1.0, 2.0, 2.0, 4.0]);
        assert!(a.add_rows(&[1.0]).is_err());
    }

    #[test]
    fn merging_equals_one_pass() {
        let data: Vec<f32> = (0..60).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let mut all = MomentAccumulator::new(3);
        all.add_rows(&data).unwrap();
        let mut a = MomentAccumulator::new(3);
        let mut b = MomentAccumulator::new(3);
        a.add_rows(&data[..27]).unwrap();
        b.add_rows(&data[27..]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a, all);
        assert!(a.merge(&MomentAccumulator::new(2)).is_err());
    }
}
