//! Building any cache of the project from a spec: the one place that turns
//! a [`CacheSpec`], an artifact and a model's geometry into caches, so a
//! command line, a test and a user's own model all get the same caches.

use std::sync::Arc;

use burn::tensor::Device;
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::RankPolicy;
#[cfg(feature = "snapkv")]
use dynakv_snapkv::SnapKvConfig;

use crate::cache::{
    AttentionCache, CacheGeometry, DenseCache, DynaKvBases, DynaKvCache, KvStorage, LayeredCache,
    Precision,
};
#[cfg(feature = "snapkv")]
use crate::cache::{PrunableCache, SnapKvCache};
use crate::error::CacheError;
use crate::layer_plan::{LayerPlan, LayerScope};
use crate::rope::Rope;
use crate::spec::CacheSpec;

/// Makes fresh caches (one per sequence) of one configuration. DynaKV's
/// bases are uploaded and its policy fitted once, here, and shared by every
/// cache made.
///
/// ```
/// use dynakv_burn::{AttentionCache, CacheFactory, CacheGeometry, CacheSpec, Rope, RopeStyle};
///
/// let device = dynakv_burn::device::default_device();
/// let geometry = CacheGeometry {
///     n_layers: 2,
///     n_heads: 4,
///     n_kv_heads: 2,
///     head_dim: 8,
///     rope_style: RopeStyle::SplitHalves,
/// };
/// let rope = Rope::new(RopeStyle::SplitHalves, 8, 8, 10_000.0, 128, &device).unwrap();
/// let factory = CacheFactory::new(geometry, rope, &device, None, &CacheSpec::dense()).unwrap();
/// let cache = factory.make().unwrap();
/// assert!(cache.is_empty());
///
/// // A RoPE table of the other style is refused, not silently used.
/// let wrong = Rope::new(RopeStyle::Interleaved, 8, 8, 10_000.0, 128, &device).unwrap();
/// assert!(CacheFactory::new(geometry, wrong, &device, None, &CacheSpec::dense()).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct CacheFactory {
    geometry: CacheGeometry,
    rope: Rope,
    storage: KvStorage,
    dynakv: Option<(Arc<DynaKvBases>, Arc<dyn RankPolicy>)>,
    #[cfg(feature = "snapkv")]
    snapkv: Option<SnapKvConfig>,
    spec: CacheSpec,
    /// The caches made hold a sliding window of this many positions (a
    /// group of a planned factory).
    window: Option<usize>,
    /// For a model whose layers differ ([`CacheFactory::for_plan`]).
    plan: Option<Windowed>,
}

/// The layers of a planned factory beyond the spec's cache.
#[derive(Debug, Clone)]
struct Windowed {
    /// One factory of windowed caches per group of windowed layers: the
    /// dense cache, or the spec's with [`LayerScope::All`].
    groups: Vec<CacheFactory>,
    /// Each model layer's (part, layer in the part), part 0 being the
    /// spec's cache of the global layers.
    route: Vec<(usize, usize)>,
}

impl CacheFactory {
    /// A factory for `spec`; storage follows the device's backend
    /// ([`KvStorage::for_device`]). DynaKV needs the calibration `artifact`
    /// (from [`crate::calibrate()`] or `dynakv calibrate`); the dense cache
    /// takes none.
    ///
    /// The artifact's geometry is checked against the model's; that it was
    /// calibrated on this very model file is the model's to check (its
    /// identity, [`dynakv_core::artifact::ModelIdentity::check`]).
    pub fn new(
        geometry: CacheGeometry,
        rope: Rope,
        device: &Device,
        artifact: Option<&Artifact>,
        spec: &CacheSpec,
    ) -> Result<Self, CacheError> {
        Self::with_storage(
            geometry,
            rope,
            device,
            artifact,
            spec,
            KvStorage::for_device(device),
        )
    }

    /// As [`CacheFactory::new`] with an explicit storage.
    pub fn with_storage(
        geometry: CacheGeometry,
        rope: Rope,
        device: &Device,
        artifact: Option<&Artifact>,
        spec: &CacheSpec,
        storage: KvStorage,
    ) -> Result<Self, CacheError> {
        no_dense_layers_for(spec)?;
        Self::build(geometry, rope, device, artifact, spec, storage)
    }

    /// [`CacheFactory::with_storage`] without the check that a DynaKV
    /// spec's dense precision has dense layers to go to.
    fn build(
        geometry: CacheGeometry,
        rope: Rope,
        device: &Device,
        artifact: Option<&Artifact>,
        spec: &CacheSpec,
        storage: KvStorage,
    ) -> Result<Self, CacheError> {
        geometry.validate()?;
        geometry.check_rope(&rope)?;
        if rope.device() != *device {
            return Err(CacheError::Config(format!(
                "the RoPE tables are on {:?}, the caches would be on {device:?}",
                rope.device()
            )));
        }
        spec.validate()?;
        let dynakv = match (&spec.dynakv, artifact) {
            (Some(_), None) => {
                return Err(CacheError::Config(
                    "DynaKV needs a calibration artifact".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(CacheError::Config(
                    "an artifact was given for the dense cache, which does not use one".into(),
                ))
            }
            (None, None) => None,
            (Some(policy), Some(artifact)) => {
                check_artifact_geometry(artifact, geometry)?;
                let bases = DynaKvBases::with_dtype(
                    artifact,
                    geometry,
                    device,
                    storage,
                    spec.precision.basis,
                )?;
                Some((Arc::new(bases), policy.build(artifact)?))
            }
        };
        Ok(Self {
            geometry,
            rope,
            storage,
            #[cfg(feature = "snapkv")]
            snapkv: spec
                .snapkv
                .as_ref()
                .map(|s| s.config(dynakv.is_some()))
                .transpose()?,
            dynakv,
            spec: spec.clone(),
            window: None,
            plan: None,
        })
    }

    /// The same factory making caches over a sliding window of `window`
    /// positions on every layer.
    fn windowed(mut self, window: usize) -> Result<Self, CacheError> {
        self.window = Some(crate::cache::check_window(window)?);
        // refused now, not at the first cache made
        self.make()?;
        Ok(self)
    }

    /// A factory for a model whose layers attend differently (`plan`, one
    /// entry per layer of `geometry`): the spec's cache holds the global
    /// layers ([`CacheFactory::geometry`] is theirs), and each group of
    /// windowed layers a cache bounded by its window: the dense cache in
    /// the spec's dense precision, or with [`LayerScope::All`] the spec's
    /// own cache. A uniform plan is the plain factory
    /// ([`CacheFactory::with_storage`]).
    ///
    /// The artifact covers the global layers, or every layer of the model
    /// (`dynakv calibrate --layers all`); each part takes its own layers
    /// of it ([`Artifact::select_layers`]). [`LayerScope::All`] needs the
    /// latter.
    pub fn for_plan(
        plan: &LayerPlan,
        geometry: CacheGeometry,
        device: &Device,
        artifact: Option<&Artifact>,
        spec: &CacheSpec,
        storage: KvStorage,
    ) -> Result<Self, CacheError> {
        if plan.layers.len() != geometry.n_layers {
            return Err(CacheError::Config(format!(
                "a layer plan of {} layers for a model of {}",
                plan.layers.len(),
                geometry.n_layers
            )));
        }
        let split = plan.split()?;
        let global = CacheGeometry {
            n_layers: split.global.len(),
            ..geometry
        };
        // an artifact of every layer, when it is one (on a model with
        // windows: more layers than the global ones)
        let every_layer = artifact.filter(|a| {
            a.header.model.n_layers == geometry.n_layers && split.global.len() < geometry.n_layers
        });
        // borrowed unless the global layers must be taken out of it
        let global_artifact: Option<std::borrow::Cow<'_, Artifact>> = match every_layer {
            Some(a) => Some(std::borrow::Cow::Owned(a.select_layers(&split.global)?)),
            None => artifact.map(std::borrow::Cow::Borrowed),
        };
        if plan.is_uniform() || spec.layers == LayerScope::All {
            no_dense_layers_for(spec)?;
        }
        let mut factory = Self::build(
            global,
            split.rope.clone(),
            device,
            global_artifact.as_deref(),
            spec,
            storage,
        )?;
        if plan.is_uniform() {
            return Ok(factory);
        }
        if spec.layers == LayerScope::All && artifact.is_some() && every_layer.is_none() {
            return Err(CacheError::Config(format!(
                "layers:all needs an artifact calibrated for every layer ({} here; this one \
                 covers {}): `dynakv calibrate --layers all`",
                geometry.n_layers,
                artifact.map_or(0, |a| a.header.model.n_layers)
            )));
        }
        // the windowed layers of a global-layers spec: dense, in its dense
        // precision
        let local_dense = CacheSpec::dense().with_precision(Precision {
            k: spec.precision.k,
            v: spec.precision.v,
            rotate: spec.precision.rotate,
            ..Precision::default()
        });
        let groups = split
            .windows
            .iter()
            .map(|g| {
                let geometry = CacheGeometry {
                    n_layers: g.layers.len(),
                    ..geometry
                };
                let (spec, artifact) = match spec.layers {
                    LayerScope::Global => (&local_dense, None),
                    LayerScope::All => (
                        spec,
                        every_layer
                            .map(|a| a.select_layers(&g.layers))
                            .transpose()?,
                    ),
                };
                Self::build(
                    geometry,
                    g.rope.clone(),
                    device,
                    artifact.as_ref(),
                    spec,
                    storage,
                )?
                .windowed(g.window)
            })
            .collect::<Result<Vec<_>, CacheError>>()?;
        factory.plan = Some(Windowed {
            route: split.route(geometry.n_layers),
            groups,
        });
        Ok(factory)
    }

    /// A fresh, empty cache.
    pub fn make(&self) -> Result<Box<dyn AttentionCache>, CacheError> {
        self.around(self.make_global()?)
    }

    /// The whole model's cache around a given cache for the global layers
    /// (of [`CacheFactory::geometry`]): fresh windowed caches for the other
    /// layers of a factory built [`CacheFactory::for_plan`]; `global`
    /// itself otherwise. Calibration and training run a model over their
    /// own recording caches this way ([`crate::Borrowed`]).
    pub fn around<'a>(
        &self,
        global: Box<dyn AttentionCache + 'a>,
    ) -> Result<Box<dyn AttentionCache + 'a>, CacheError> {
        self.around_part(0, global)
    }

    /// [`CacheFactory::around`] for any part of a planned factory
    /// ([`LayerPlan::parts`]' order: 0 the global layers, then each
    /// windowed group): the given cache holds that part's layers, fresh
    /// caches the others (calibrating the windowed layers' bases).
    pub fn around_part<'a>(
        &self,
        part: usize,
        cache: Box<dyn AttentionCache + 'a>,
    ) -> Result<Box<dyn AttentionCache + 'a>, CacheError> {
        let Some(Windowed { groups, route }) = &self.plan else {
            if part != 0 {
                return Err(CacheError::Config(format!(
                    "part {part} of a cache of one part"
                )));
            }
            return Ok(cache);
        };
        if part > groups.len() {
            return Err(CacheError::Config(format!(
                "part {part} of a cache of {} parts",
                groups.len() + 1
            )));
        }
        let mut cache = Some(cache);
        let mut parts: Vec<Box<dyn AttentionCache + 'a>> = Vec::with_capacity(groups.len() + 1);
        for p in 0..=groups.len() {
            parts.push(match (p == part).then(|| cache.take()).flatten() {
                Some(given) => given,
                None if p == 0 => self.make_global()?,
                None => groups[p - 1].make()?,
            });
        }
        Ok(Box::new(LayeredCache::new(parts, route.clone())?))
    }

    /// The spec's cache for the global layers (every layer, without a plan).
    fn make_global(&self) -> Result<Box<dyn AttentionCache>, CacheError> {
        match &self.dynakv {
            None => {
                let dense = DenseCache::with_precision(
                    self.geometry,
                    self.rope.clone(),
                    self.storage,
                    self.spec.precision,
                )?;
                match self.window {
                    Some(w) => self.finish(dense.with_window(w)?),
                    None => self.finish(dense),
                }
            }
            Some(shared) => {
                let dynakv = self.new_dynakv(shared)?;
                match self.window {
                    Some(w) => self.finish(dynakv.with_window(w)?),
                    None => self.finish(dynakv),
                }
            }
        }
    }

    /// A DynaKV cache over the factory's shared bases and policy.
    fn new_dynakv(
        &self,
        (bases, policy): &(Arc<DynaKvBases>, Arc<dyn RankPolicy>),
    ) -> Result<DynaKvCache, CacheError> {
        DynaKvCache::with_precision(
            self.geometry,
            self.rope.clone(),
            bases.clone(),
            policy.clone(),
            self.spec.precision.latents_only(),
        )
    }

    /// A fresh DynaKV cache as its own type (to read its ranks), for a
    /// DynaKV spec without SnapKV. With a plan it holds the global layers
    /// only: run the model over [`CacheFactory::around`] it.
    pub fn make_dynakv(&self) -> Result<DynaKvCache, CacheError> {
        #[cfg(feature = "snapkv")]
        if self.snapkv.is_some() {
            return Err(CacheError::Config(
                "make_dynakv builds DynaKV alone; this spec has SnapKV on top".into(),
            ));
        }
        let Some(shared) = &self.dynakv else {
            return Err(CacheError::Config("the spec is the dense cache".into()));
        };
        self.new_dynakv(shared)
    }

    #[cfg(feature = "snapkv")]
    fn finish<C: PrunableCache + 'static>(
        &self,
        cache: C,
    ) -> Result<Box<dyn AttentionCache>, CacheError> {
        Ok(match &self.snapkv {
            None => Box::new(cache),
            Some(c) => {
                let mut snap =
                    SnapKvCache::new(cache, c.clone(), self.geometry, self.rope.clone())?;
                // over DynaKV the prompt is held until pruned (the paper's
                // order) unless the spec asks for compression on arrival
                let spec = self.spec.snapkv.as_ref();
                if self.dynakv.is_some() && !spec.is_some_and(|s| s.on_arrival) {
                    snap = snap.with_whole(spec.and_then(|s| s.whole).unwrap_or(0.0))?;
                }
                match self.window {
                    Some(w) => Box::new(snap.with_window(w)?),
                    None => Box::new(snap),
                }
            }
        })
    }

    #[cfg(not(feature = "snapkv"))]
    fn finish<C: AttentionCache + 'static>(
        &self,
        cache: C,
    ) -> Result<Box<dyn AttentionCache>, CacheError> {
        Ok(Box::new(cache))
    }

    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// The geometry of the spec's cache: the model's, or its global
    /// layers' for a factory built [`CacheFactory::for_plan`].
    pub fn geometry(&self) -> CacheGeometry {
        self.geometry
    }

    pub fn storage(&self) -> KvStorage {
        self.storage
    }

    /// DynaKV's shared bases, for a DynaKV spec.
    pub fn bases(&self) -> Option<&Arc<DynaKvBases>> {
        self.dynakv.as_ref().map(|(b, _)| b)
    }
}

/// A DynaKV spec's `k=` / `v=` name the dense caches of a model's
/// sliding-window layers; where every layer takes DynaKV there are none.
fn no_dense_layers_for(spec: &CacheSpec) -> Result<(), CacheError> {
    if spec.dynakv.is_some() && spec.precision.sets_dense() {
        return Err(CacheError::Config(format!(
            "`{}`: with DynaKV, k= / v= set the dense caches of a model's sliding-window \
             layers, and every layer of this cache takes DynaKV",
            spec.precision
        )));
    }
    Ok(())
}

/// The artifact's recorded model geometry against the model's.
fn check_artifact_geometry(artifact: &Artifact, g: CacheGeometry) -> Result<(), CacheError> {
    let m = &artifact.header.model;
    let ours = (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim);
    let theirs = (m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim);
    if ours != theirs {
        return Err(CacheError::Config(format!(
            "the artifact was calibrated for (layers, heads, kv heads, head dim) {theirs:?}, \
             the model has {ours:?}"
        )));
    }
    Ok(())
}
