//! Calibration of DynaKV for any model: the caller runs its own forward pass
//! over a [`RecordingCache`], which sees every pre-RoPE key, value and query
//! at the cache seam; this module turns what was recorded into spectral
//! bases and the held-out energy sample that rank policies are fitted on.

use dynakv_core::artifact::{
    Artifact, ArtifactHeader, ModelIdentity, RopePlacement, FORMAT_VERSION,
};
use dynakv_core::basis::{output_metric, query_metric, Basis, BasisKind};
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{EnergySample, TailProfile};
use dynakv_core::CoreError;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheGeometry, Recorded, RecordingCache};
use crate::error::CacheError;
use crate::rope::Rope;

/// What calibration computes and on how much text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalibrationConfig {
    /// Windows whose moments define the bases (the first ones given).
    pub stats_windows: usize,
    /// Further, held-out windows on which rank policies are fitted.
    pub sample_windows: usize,
    pub basis: BasisKind,
    /// Whether the key basis acts before RoPE (the paper) or after it.
    pub rope: RopePlacement,
    /// Rank levels are the multiples of this step up to the full width.
    pub level_step: usize,
}

impl Default for CalibrationConfig {
    /// What `dynakv calibrate` runs and `docs/results.md` measures: PCA
    /// bases of pre-RoPE keys, levels every 8 dimensions; 32 windows of
    /// statistics and 2 held out (1,024 tokens each there).
    fn default() -> Self {
        Self {
            stats_windows: 32,
            sample_windows: 2,
            basis: BasisKind::Pca,
            rope: RopePlacement::Pre,
            level_step: 8,
        }
    }
}

impl CalibrationConfig {
    pub fn validate(&self, geometry: CacheGeometry) -> Result<(), CoreError> {
        let bad = |field, message: String| Err(CoreError::Invalid { field, message });
        if self.stats_windows == 0 {
            return bad("stats_windows", "must be at least 1".into());
        }
        if self.sample_windows == 0 {
            return bad("sample_windows", "must be at least 1".into());
        }
        RankLevels::multiples(self.level_step, geometry.d_kv()).map(|_| ())
    }
}

/// What calibration needs to know of the model besides its forward pass.
#[derive(Debug, Clone)]
pub struct CalibrationTarget<'a> {
    pub geometry: CacheGeometry,
    pub rope: &'a Rope,
    /// Recorded in the artifact, and checked against the model that uses it.
    pub identity: ModelIdentity,
    /// Per layer, the output projection `W_o` as host rows `[n_heads *
    /// head_dim, d_model]` (burn `Linear` layout): needed by the
    /// output-aware value basis only.
    pub output_proj: Option<Vec<Vec<f32>>>,
    /// The layers' sliding window, when they have one (a model's windowed
    /// layers calibrated as one part: [`crate::LayerPlan::parts`]).
    pub window: Option<usize>,
}

impl CalibrationTarget<'_> {
    /// A recording cache of these layers, over their window if any.
    fn recording(
        &self,
        placement: RopePlacement,
        raw_mode: bool,
        recorded: Recorded,
    ) -> Result<RecordingCache, CacheError> {
        let cache = RecordingCache::new(
            self.geometry,
            self.rope.clone(),
            placement,
            raw_mode,
            recorded,
        )?;
        match self.window {
            Some(w) => cache.with_window(w),
            None => Ok(cache),
        }
    }
}

/// Calibrates DynaKV bases and the policy sample.
///
/// `forward` runs the caller's model over one window with the given cache
/// (a prefill from position 0); the first `stats_windows` windows feed the
/// moments, the next `sample_windows` the held-out sample. Errors of the
/// forward pass come back as they are; the caller's error type takes ours.
///
/// ```
/// use burn::tensor::{Distribution, Tensor};
/// use dynakv_burn::dynakv_core::artifact::ModelIdentity;
/// use dynakv_burn::*;
///
/// let device = device::default_device();
/// let geometry = CacheGeometry {
///     n_layers: 1,
///     n_heads: 2,
///     n_kv_heads: 1,
///     head_dim: 8,
///     rope_style: RopeStyle::SplitHalves,
/// };
/// let rope = Rope::new(RopeStyle::SplitHalves, 8, 8, 10_000.0, 64, &device).unwrap();
/// let identity = ModelIdentity {
///     architecture: "toy".into(),
///     n_layers: 1,
///     n_heads: 2,
///     n_kv_heads: 1,
///     head_dim: 8,
///     file_sha256: String::new(),
/// };
/// let target = CalibrationTarget { geometry, rope: &rope, identity, output_proj: None, window: None };
/// let config = CalibrationConfig { stats_windows: 3, sample_windows: 1, ..Default::default() };
/// // A "model" whose one layer sees random queries, keys and values.
/// let windows = [0u64, 1, 2, 3];
/// let forward = |_w: &u64, cache: &mut RecordingCache| -> Result<(), CacheError> {
///     let rand = |h| Tensor::<4>::random([1, h, 16, 8], Distribution::Normal(0.0, 1.0), &device);
///     let positions: Vec<usize> = (0..16).collect();
///     cache.forward(0, rand(2), rand(1), rand(1), &positions)?;
///     Ok(())
/// };
/// let artifact = calibrate(&target, &config, &windows, forward, |_, _| {}).unwrap();
/// assert_eq!(artifact.header.calib_tokens, 48);
/// assert_eq!(artifact.bases.len(), 1);
/// ```
///
/// # Errors
/// Too few windows, a bad configuration, a missing `W_o` for the
/// output-aware basis, or whatever `forward` returns.
pub fn calibrate<W, E>(
    target: &CalibrationTarget<'_>,
    config: &CalibrationConfig,
    windows: &[W],
    mut forward: impl FnMut(&W, &mut RecordingCache) -> Result<(), E>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Artifact, E>
where
    E: From<CacheError>,
{
    let geo = target.geometry;
    let core = |e: CoreError| E::from(CacheError::from(e));
    geo.validate()?;
    geo.check_rope(target.rope)?;
    config.validate(geo).map_err(core)?;
    let (n_stats, n_sample) = (config.stats_windows, config.sample_windows);
    let total = n_stats + n_sample;
    if windows.len() < total {
        return Err(core(CoreError::Invalid {
            field: "windows",
            message: format!("{} windows given, calibration needs {total}", windows.len()),
        }));
    }
    if config.basis == BasisKind::OutputAware
        && target
            .output_proj
            .as_ref()
            .is_none_or(|w| w.len() != geo.n_layers)
    {
        return Err(core(CoreError::Invalid {
            field: "output_proj",
            message: "the output-aware basis needs W_o of every layer".into(),
        }));
    }
    let mut recorded = Recorded::new(geo);
    for (i, w) in windows[..n_stats].iter().enumerate() {
        let _span = tracing::info_span!("calibrate_window", i).entered();
        let mut cache = target.recording(config.rope, false, recorded)?;
        forward(w, &mut cache)?;
        recorded = cache.into_recorded();
        progress(i + 1, total);
    }
    if recorded.q_count == 0 {
        return Err(core(CoreError::Invalid {
            field: "windows",
            message: "the forward pass recorded nothing (did it use the cache?)".into(),
        }));
    }
    let calib_tokens = recorded.moments[0][0].count();
    let mut bases = Vec::with_capacity(geo.n_layers);
    for l in 0..geo.n_layers {
        let [mk, mv] = &recorded.moments[l];
        let k = match config.basis {
            BasisKind::QueryAware => {
                let m = query_metric(&recorded.q_energy(l), geo.n_kv_heads, geo.head_dim);
                Basis::weighted(mk, &m)
            }
            _ => Basis::pca(mk),
        }
        .map_err(core)?;
        let v = match (config.basis, &target.output_proj) {
            (BasisKind::OutputAware, Some(wo)) => {
                let m = output_metric(&wo[l], geo.n_heads, geo.n_kv_heads, geo.head_dim);
                Basis::weighted(mv, &m)
            }
            _ => Basis::pca(mv),
        }
        .map_err(core)?;
        bases.push([k, v]);
    }
    // Held-out sample: raw vectors, then tail profiles in the new bases.
    let mut raw = Recorded::new(geo);
    for (i, w) in windows[n_stats..total].iter().enumerate() {
        let mut cache = target.recording(config.rope, true, raw)?;
        forward(w, &mut cache)?;
        raw = cache.into_recorded();
        progress(n_stats + i + 1, total);
    }
    let levels = RankLevels::multiples(config.level_step, geo.d_kv()).map_err(core)?;
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
            model: target.identity.clone(),
            basis: config.basis,
            rope: config.rope,
            levels,
            calib_tokens,
            sample_positions: raw.raw_positions,
            router: None,
            key_factor: None,
            policy: None,
        },
        bases,
        sample,
        routers: None,
    })
}
