//! Shared fixtures of the cache unit tests: a tiny geometry, a calibrated
//! artifact for it, fixed-rank policies and a chunked driver.

use burn::tensor::{Distribution, Tensor};
use dynakv_core::artifact::{
    Artifact, ArtifactHeader, ModelIdentity, RopePlacement, FORMAT_VERSION,
};
use dynakv_core::basis::{Basis, BasisKind};
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{EnergySample, KvKind, RankPolicy};
use dynakv_core::stats::MomentAccumulator;

use super::{AttentionCache, CacheGeometry};
use crate::device::default_device;
use crate::rope::{Rope, RopeStyle};

pub(crate) const G: CacheGeometry = CacheGeometry {
    n_layers: 2,
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 4,
    rope_style: RopeStyle::Interleaved,
};

/// RoPE tables for [`G`].
pub(crate) fn rope() -> Rope {
    Rope::new(
        RopeStyle::Interleaved,
        4,
        4,
        10_000.0,
        64,
        &default_device(),
    )
    .unwrap()
}

pub(crate) fn artifact(placement: RopePlacement) -> Artifact {
    let d = G.d_kv();
    let mut acc = MomentAccumulator::new(d);
    let mut s = 7u64;
    let rows: Vec<f32> = (0..64 * d)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1 + i % d) as f32 + 0.3
        })
        .collect();
    acc.add_rows(&rows).unwrap();
    let b = Basis::pca(&acc).unwrap();
    Artifact {
        header: ArtifactHeader {
            format_version: FORMAT_VERSION,
            model: ModelIdentity {
                architecture: "test".into(),
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 4,
                file_sha256: String::new(),
            },
            basis: BasisKind::Pca,
            rope: placement,
            levels: RankLevels::multiples(2, d).unwrap(),
            calib_tokens: 64,
            sample_positions: vec![],
            router: None,
            key_factor: None,
            policy: None,
        },
        bases: vec![[b.clone(), b.clone()], [b.clone(), b]],
        sample: EnergySample::default(),
        routers: None,
    }
}

/// Cycles through every level, one token after another.
#[derive(Debug, Default)]
pub(crate) struct Cycle;
impl RankPolicy for Cycle {
    fn name(&self) -> &'static str {
        "cycle"
    }
    fn needs_latents(&self) -> bool {
        false
    }
    fn ranks(&self, _l: usize, kind: KvKind, _lat: &[f32], positions: &[usize]) -> Vec<usize> {
        positions
            .iter()
            .map(|&p| {
                let shift = if kind == KvKind::Key { 0 } else { 3 };
                2 * (1 + (p + shift) % 4)
            })
            .collect()
    }
}

#[derive(Debug)]
pub(crate) struct Fixed(pub usize);
impl RankPolicy for Fixed {
    fn name(&self) -> &'static str {
        "fixed"
    }
    fn needs_latents(&self) -> bool {
        false
    }
    fn ranks(&self, _l: usize, _k: KvKind, _lat: &[f32], positions: &[usize]) -> Vec<usize> {
        vec![self.0; positions.len()]
    }
}

pub(crate) fn rand4(shape: [usize; 4]) -> Tensor<4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &default_device())
}

pub(crate) fn run(
    cache: &mut dyn AttentionCache,
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    chunks: &[usize],
) -> Tensor<4> {
    let mut outs = Vec::new();
    let mut start = 0;
    for &c in chunks {
        let pos: Vec<usize> = (start..start + c).collect();
        let o = cache
            .forward(
                0,
                q.clone().narrow(2, start, c),
                k.clone().narrow(2, start, c),
                v.clone().narrow(2, start, c),
                &pos,
            )
            .unwrap();
        outs.push(o);
        start += c;
    }
    Tensor::cat(outs, 2)
}
