//! The learned router as a burn module, for training: a linear map of a
//! token's latent to a distribution over cut-off points (the non-zero rank
//! levels), and the soft prefix mask it implies. Inference reads the exported
//! weights through `dynakv_core::policy::RouterPolicy`, which applies the same
//! maths on the host.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::RouterWeights;

use crate::error::CacheError;

/// `p = softmax(latent · W + b)` over the non-zero rank levels.
#[derive(Module, Debug)]
pub struct Router {
    pub linear: Linear,
}

impl Router {
    /// From stored weights (zeros give every cut-off the same probability).
    pub fn from_weights(w: &RouterWeights, device: &Device) -> Result<Self, CacheError> {
        w.check()?;
        let weight =
            Tensor::<2>::from_data(TensorData::new(w.w.clone(), [w.dim, w.choices]), device);
        let bias = Tensor::<1>::from_data(TensorData::new(w.b.clone(), [w.choices]), device);
        Ok(Self {
            linear: Linear {
                weight: Param::from_tensor(weight),
                bias: Some(Param::from_tensor(bias)),
            },
        })
    }

    /// The weights, for the artifact.
    pub fn to_weights(&self) -> Result<RouterWeights, CacheError> {
        let read = |t: Tensor<2>| {
            t.into_data()
                .try_into_vec_as::<f32>()
                .map_err(CacheError::from)
        };
        let [dim, choices] = self.linear.weight.val().dims();
        let w = read(self.linear.weight.val())?;
        let b = match &self.linear.bias {
            Some(b) => read(b.val().unsqueeze())?,
            None => vec![0.0; choices],
        };
        Ok(RouterWeights { dim, choices, w, b })
    }

    /// Cut-off probabilities.
    ///
    /// # Shapes
    /// - `latent`: `[T, d]`; returns `[T, K]`
    pub fn probs(&self, latent: Tensor<2>) -> Tensor<2> {
        softmax(self.linear.forward(latent), 1)
    }

    /// Soft prefix mask `m_i = Σ_{j : level_j > i} p_j` (`m_0 = 1`,
    /// non-increasing).
    ///
    /// # Shapes
    /// - `latent`: `[T, d]`, `cutoffs`: from [`cutoff_matrix`] `[K, d]`;
    ///   returns `[T, d]`
    pub fn soft_mask(&self, latent: Tensor<2>, cutoffs: Tensor<2>) -> Tensor<2> {
        self.probs(latent).matmul(cutoffs)
    }
}

/// `M[j, i] = 1` when non-zero level j is above coordinate i, so that
/// `probs · M` is the soft mask.
///
/// # Shapes
/// returns `[K, d]`
pub fn cutoff_matrix(levels: &RankLevels, device: &Device) -> Tensor<2> {
    let lv = &levels.as_slice()[1..];
    let d = levels.full();
    let data: Vec<f32> = lv
        .iter()
        .flat_map(|&l| (0..d).map(move |i| if l > i { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(data, [lv.len(), d]), device)
}

/// Ranks of a soft mask's hard version `1[m > tau]`: its number of leading ones.
///
/// # Shapes
/// - `mask`: `[T, d]`; returns `T` ranks
pub fn hard_ranks(mask: Tensor<2>, tau: f32) -> Result<Vec<usize>, CacheError> {
    let [t, d] = mask.dims();
    let v = mask
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(CacheError::from)?;
    Ok((0..t)
        .map(|r| {
            v[r * d..(r + 1) * d]
                .iter()
                .take_while(|&&m| m > tau)
                .count()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::default_device;
    use burn::tensor::Distribution;

    fn router(levels: &RankLevels, device: &Device) -> Router {
        let d = levels.full();
        let k = levels.as_slice().len() - 1;
        let mut w = RouterWeights::zeros(d, k);
        let mut s = 3u64;
        for x in w.w.iter_mut().chain(w.b.iter_mut()) {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            *x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0;
        }
        Router::from_weights(&w, device).unwrap()
    }

    #[test]
    fn soft_mask_is_a_non_increasing_prefix_from_one() {
        let device = default_device();
        let levels = RankLevels::multiples(4, 16).unwrap();
        let r = router(&levels, &device);
        let x = Tensor::<2>::random([5, 16], Distribution::Normal(0.0, 1.0), &device);
        let m = r.soft_mask(x, cutoff_matrix(&levels, &device));
        let v = m.into_data().try_into_vec_as::<f32>().unwrap();
        for row in v.chunks(16) {
            assert!((row[0] - 1.0).abs() < 1e-6, "{row:?}");
            assert!(row.windows(2).all(|w| w[1] <= w[0] + 1e-6), "{row:?}");
            assert!(row[15] > 0.0);
        }
    }

    #[test]
    fn hard_ranks_match_the_host_policy_and_weights_round_trip() {
        let device = default_device();
        let levels = RankLevels::multiples(4, 16).unwrap();
        let r = router(&levels, &device);
        let x = Tensor::<2>::random([7, 16], Distribution::Normal(0.0, 2.0), &device);
        let host = r.to_weights().unwrap();
        let xs = x.clone().into_data().try_into_vec_as::<f32>().unwrap();
        for tau in [0.05f32, 0.1, 0.5] {
            let ranks =
                hard_ranks(r.soft_mask(x.clone(), cutoff_matrix(&levels, &device)), tau).unwrap();
            for (row, &rank) in xs.chunks(16).zip(&ranks) {
                assert_eq!(rank, host.rank(row, tau, &levels), "tau {tau}");
                assert!(levels.contains(rank));
            }
        }
        let back = Router::from_weights(&host, &device)
            .unwrap()
            .to_weights()
            .unwrap();
        assert_eq!(back, host);
    }
}
