//! Calibration: spectral bases from Brown `calib` text, and the held-out
//! energy sample that rank policies are fitted on.

use dynakv_burn::{Recorded, RecordingCache};
use dynakv_core::artifact::{
    Artifact, ArtifactHeader, ModelIdentity, RopePlacement, FORMAT_VERSION,
};
use dynakv_core::basis::{output_metric, query_metric, Basis, BasisKind};
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{EnergySample, TailProfile};
use dynakv_models::{LlamaModel, ModelError};

/// What `dynakv calibrate` does.
#[derive(Debug, Clone)]
pub struct CalibrateConfig {
    /// Tokens whose moments define the bases.
    pub tokens: usize,
    /// Further (held-out) tokens on which policies are fitted.
    pub sample_tokens: usize,
    pub ctx: usize,
    pub basis: BasisKind,
    pub rope: RopePlacement,
    pub level_step: usize,
}

/// A core-math error as a model-layer error (the CLI reports either).
pub fn core_err(e: dynakv_core::CoreError) -> ModelError {
    ModelError::InvalidInput(e.to_string())
}

/// The identity an artifact records and checks.
pub fn model_identity(model: &LlamaModel, file_sha256: String) -> ModelIdentity {
    let c = &model.config;
    ModelIdentity {
        architecture: c.architecture.clone(),
        n_layers: c.n_layers,
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        file_sha256,
    }
}

/// Runs calibration over `ids` (a token stream of the `calib` split).
pub fn calibrate(
    model: &LlamaModel,
    ids: &[u32],
    identity: ModelIdentity,
    cfg: &CalibrateConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Artifact, ModelError> {
    let geo = model.config.geometry();
    let windows: Vec<&[u32]> = ids.chunks_exact(cfg.ctx).collect();
    let n_stats = cfg.tokens.div_ceil(cfg.ctx).max(1);
    let n_sample = cfg.sample_tokens.div_ceil(cfg.ctx).max(1);
    if windows.len() < n_stats + n_sample {
        return Err(ModelError::InvalidInput(format!(
            "calib text has {} windows of {}, need {}",
            windows.len(),
            cfg.ctx,
            n_stats + n_sample
        )));
    }
    let total = n_stats + n_sample;
    let mut recorded = Recorded::new(geo);
    for (i, w) in windows[..n_stats].iter().enumerate() {
        let _span = tracing::info_span!("calibrate_window", i).entered();
        let mut cache = RecordingCache::new(geo, model.rope().clone(), cfg.rope, false, recorded)?;
        model.hidden(w, 0, &mut cache)?;
        recorded = cache.into_recorded();
        progress(i + 1, total);
    }
    let mut bases = Vec::with_capacity(geo.n_layers);
    for l in 0..geo.n_layers {
        let [mk, mv] = &recorded.moments[l];
        let k = match cfg.basis {
            BasisKind::QueryAware => {
                let m = query_metric(&recorded.q_energy(l), geo.n_kv_heads, geo.head_dim);
                Basis::weighted(mk, &m)
            }
            _ => Basis::pca(mk),
        }
        .map_err(core_err)?;
        let v = match cfg.basis {
            BasisKind::OutputAware => {
                let wo = model
                    .wo(l)
                    .ok_or_else(|| ModelError::InvalidInput(format!("no layer {l}")))?
                    .clone()
                    .into_data()
                    .try_into_vec_as::<f32>()
                    .map_err(|e| ModelError::InvalidInput(format!("W_o: {e:?}")))?;
                let m = output_metric(&wo, geo.n_heads, geo.n_kv_heads, geo.head_dim);
                Basis::weighted(mv, &m)
            }
            _ => Basis::pca(mv),
        }
        .map_err(core_err)?;
        bases.push([k, v]);
    }
    // Held-out sample: raw vectors, then tail profiles in the new bases.
    let mut raw = Recorded::new(geo);
    for (i, w) in windows[n_stats..total].iter().enumerate() {
        let mut cache = RecordingCache::new(geo, model.rope().clone(), cfg.rope, true, raw)?;
        model.hidden(w, 0, &mut cache)?;
        raw = cache.into_recorded();
        progress(n_stats + i + 1, total);
    }
    let levels = RankLevels::multiples(cfg.level_step, geo.d_kv()).map_err(core_err)?;
    let d = geo.d_kv();
    let rel = (0..geo.n_layers)
        .map(|l| {
            [0, 1].map(|k| {
                let basis = &bases[l][k];
                let mean_lat = basis.mean_latent();
                raw.raw[l][k]
                    .chunks_exact(d)
                    .flat_map(|x| TailProfile::new(&basis.encode(x), &mean_lat, &levels).rel)
                    .collect()
            })
        })
        .collect();
    let sample = EnergySample {
        rel,
        n_levels: levels.as_slice().len(),
        positions: raw.raw_positions.clone(),
    };
    Ok(Artifact {
        header: ArtifactHeader {
            format_version: FORMAT_VERSION,
            model: identity,
            basis: cfg.basis,
            rope: cfg.rope,
            levels,
            calib_tokens: (n_stats * cfg.ctx) as u64,
            sample_positions: raw.raw_positions,
            router: None,
        },
        bases,
        sample,
        routers: None,
    })
}
