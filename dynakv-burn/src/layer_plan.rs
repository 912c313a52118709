//! Per-layer attention of a model whose layers differ: a sliding window on
//! some layers, a RoPE base per layer (Gemma 3: five local layers of 512
//! positions at base 10,000 for every global one at base 1,000,000).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::CacheError;
use crate::rope::Rope;

/// Which layers of a model with sliding-window layers a cache spec
/// compresses. The global layers' caches are what grows with the context
/// (the windowed layers' stay O(window)), so they are the default; `All`
/// gives the windowed layers the spec's cache too, within their windows
/// (an artifact calibrated for every layer: `dynakv calibrate --layers
/// all`). On a model without windows both are every layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerScope {
    #[default]
    Global,
    All,
}

impl fmt::Display for LayerScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Global => "global",
            Self::All => "all",
        })
    }
}

impl FromStr for LayerScope {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Self, CacheError> {
        match s.trim() {
            "global" => Ok(Self::Global),
            "all" => Ok(Self::All),
            other => Err(CacheError::Config(format!(
                "layers:{other}: expected layers:global or layers:all"
            ))),
        }
    }
}

/// How one layer attends.
#[derive(Debug, Clone)]
pub struct LayerAttention {
    /// A sliding window of this many positions, or `None` (a global layer).
    pub window: Option<usize>,
    /// The layer's RoPE tables (its base); caches rotate keys with them.
    pub rope: Rope,
}

/// Every layer's attention, in layer order.
///
/// A [`crate::CacheFactory`] built for a plan gives the spec's cache (DynaKV,
/// SnapKV, a quantised dense cache) the global layers, and each group of
/// windowed layers a dense cache bounded by its window
/// ([`crate::DenseCache::with_window`]): the windowed layers' caches are
/// already O(window), the global layers' are what grows.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    pub layers: Vec<LayerAttention>,
}

/// Layers one cache of a planned model holds ([`LayerPlan::parts`]).
#[derive(Debug, Clone)]
pub struct PlanPart {
    /// Model layers, in order: layer `i` of the part's cache is `layers[i]`.
    pub layers: Vec<usize>,
    /// Their RoPE tables (one base for the part).
    pub rope: Rope,
    /// Their sliding window (`None`: the global layers).
    pub window: Option<usize>,
}

/// Windowed layers that share a window and a RoPE base: one dense cache.
#[derive(Debug, Clone)]
pub(crate) struct WindowGroup {
    pub window: usize,
    pub rope: Rope,
    /// Model layers, in order.
    pub layers: Vec<usize>,
}

/// A plan split into the spec's layers and the windowed groups.
#[derive(Debug, Clone)]
pub(crate) struct PlanSplit {
    /// Global layers, in order: layer `i` of the spec's cache is `global[i]`.
    pub global: Vec<usize>,
    /// Their RoPE tables (one base for all of them).
    pub rope: Rope,
    pub windows: Vec<WindowGroup>,
}

impl PlanSplit {
    /// Per model layer: (part, layer within the part), part 0 being the
    /// spec's cache and part `1 + g` window group `g`.
    pub fn route(&self, n_layers: usize) -> Vec<(usize, usize)> {
        let mut route = vec![(0, 0); n_layers];
        for (i, &l) in self.global.iter().enumerate() {
            route[l] = (0, i);
        }
        for (g, group) in self.windows.iter().enumerate() {
            for (i, &l) in group.layers.iter().enumerate() {
                route[l] = (1 + g, i);
            }
        }
        route
    }
}

impl LayerPlan {
    /// Whether every layer attends alike (no window, one RoPE base): such a
    /// model needs no plan.
    pub fn is_uniform(&self) -> bool {
        let Some(first) = self.layers.first() else {
            return true;
        };
        self.layers
            .iter()
            .all(|l| l.window.is_none() && l.rope.base() == first.rope.base())
    }

    /// The caches a planned model holds, in a [`crate::LayeredCache`]'s
    /// part order: the global layers first, then each group of windowed
    /// layers that share a window and a RoPE base.
    pub fn parts(&self) -> Result<Vec<PlanPart>, CacheError> {
        let split = self.split()?;
        let global = PlanPart {
            layers: split.global,
            rope: split.rope,
            window: None,
        };
        Ok(std::iter::once(global)
            .chain(split.windows.into_iter().map(|g| PlanPart {
                layers: g.layers,
                rope: g.rope,
                window: Some(g.window),
            }))
            .collect())
    }

    /// The global layers and the windowed groups; the global layers must
    /// share one RoPE base (a cache rotates with one table).
    pub(crate) fn split(&self) -> Result<PlanSplit, CacheError> {
        let global: Vec<usize> = (0..self.layers.len())
            .filter(|&l| self.layers[l].window.is_none())
            .collect();
        let Some(&first) = global.first() else {
            return Err(CacheError::Config(
                "every layer has a sliding window: there is no global layer for the cache".into(),
            ));
        };
        let rope = self.layers[first].rope.clone();
        if let Some(&l) = global
            .iter()
            .find(|&&l| self.layers[l].rope.base() != rope.base())
        {
            return Err(CacheError::Config(format!(
                "global layers {first} and {l} have RoPE bases {} and {}: one cache rotates with one",
                rope.base(),
                self.layers[l].rope.base()
            )));
        }
        let mut windows: Vec<WindowGroup> = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let Some(window) = layer.window else {
                continue;
            };
            if window == 0 {
                return Err(CacheError::Config(format!(
                    "layer {l} has a sliding window of 0 positions"
                )));
            }
            match windows
                .iter_mut()
                .find(|g| g.window == window && g.rope.base() == layer.rope.base())
            {
                Some(g) => g.layers.push(l),
                None => windows.push(WindowGroup {
                    window,
                    rope: layer.rope.clone(),
                    layers: vec![l],
                }),
            }
        }
        Ok(PlanSplit {
            global,
            rope,
            windows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::default_device;
    use crate::rope::RopeStyle;
    use burn::tensor::Tensor;

    fn rope(base: f64) -> Rope {
        Rope::new(RopeStyle::SplitHalves, 4, 4, base, 64, &default_device()).unwrap()
    }

    #[test]
    fn gemma_like_plans_split_into_global_and_windowed_groups() {
        // layers 0, 1, 3 local (window 8, base 10k), 2 and 4 global (1e6)
        let plan = LayerPlan {
            layers: [Some(8), Some(8), None, Some(8), None]
                .into_iter()
                .map(|window| LayerAttention {
                    window,
                    rope: rope(if window.is_some() { 1e4 } else { 1e6 }),
                })
                .collect(),
        };
        assert!(!plan.is_uniform());
        let s = plan.split().unwrap();
        assert_eq!(s.global, vec![2, 4]);
        assert_eq!(s.rope.base(), 1e6);
        assert_eq!(s.windows.len(), 1);
        assert_eq!(s.windows[0].layers, vec![0, 1, 3]);
        assert_eq!(s.route(5), vec![(1, 0), (1, 1), (0, 0), (1, 2), (0, 1)]);
        let parts = plan.parts().unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].layers.clone(), parts[0].window),
            (vec![2, 4], None)
        );
        assert_eq!(
            (parts[1].layers.clone(), parts[1].window),
            (vec![0, 1, 3], Some(8))
        );
        assert_eq!(parts[1].rope.base(), 1e4);
        // global layers with two bases, or none at all, are refused
        let mut two = plan.clone();
        two.layers[2].rope = rope(5e5);
        assert!(two.split().is_err());
        let mut none = plan;
        none.layers.iter_mut().for_each(|l| l.window = Some(8));
        assert!(none.split().is_err());
    }

    /// A factory built for a plan whose windows cover the whole sequence
    /// gives the dense cache's attention on every layer; a short window
    /// changes the windowed layers only.
    #[test]
    fn a_planned_cache_with_windows_wider_than_the_text_equals_the_dense_cache() {
        use crate::cache::test_support::{rand4, G};
        use crate::{CacheFactory, CacheGeometry, CacheSpec, KvStorage};
        let device = default_device();
        let g = CacheGeometry {
            n_layers: 3,
            rope_style: RopeStyle::SplitHalves,
            ..G
        };
        let plan = |window| LayerPlan {
            layers: [Some(window), None, Some(window)]
                .into_iter()
                .map(|window| LayerAttention {
                    window,
                    rope: rope(1e4),
                })
                .collect(),
        };
        let dense = CacheSpec::dense();
        let mk = |p: &LayerPlan| {
            CacheFactory::for_plan(p, g, &device, None, &dense, KvStorage::Host)
                .unwrap()
                .make()
                .unwrap()
        };
        // host storage as the planned ones (device storage holds f16 rows
        // as f32 tensors: other held bytes)
        let mut plain =
            CacheFactory::with_storage(g, rope(1e4), &device, None, &dense, KvStorage::Host)
                .unwrap()
                .make()
                .unwrap();
        let (mut wide, mut narrow) = (mk(&plan(64)), mk(&plan(3)));
        let n = 12;
        let (q, k, v) = (
            rand4([1, 4, n, 4]),
            rand4([1, 2, n, 4]),
            rand4([1, 2, n, 4]),
        );
        // a prefill of 6 tokens, then one token at a time
        let chunks: Vec<Vec<usize>> = std::iter::once((0..6).collect())
            .chain((6..n).map(|p| vec![p]))
            .collect();
        let mut diffs = [[0f32; 3]; 2];
        for pos in &chunks {
            let (s0, len) = (pos[0], pos.len());
            let args = || {
                (
                    q.clone().narrow(2, s0, len),
                    k.clone().narrow(2, s0, len),
                    v.clone().narrow(2, s0, len),
                )
            };
            let [wide_diffs, narrow_diffs] = &mut diffs;
            for (layer, (wide_d, narrow_d)) in wide_diffs.iter_mut().zip(narrow_diffs).enumerate() {
                let run = |c: &mut Box<dyn crate::AttentionCache>| {
                    let (a, b, d) = args();
                    c.forward(layer, a, b, d, pos).unwrap()
                };
                let want = run(&mut plain);
                let gap = |x: Tensor<4>| -> f32 { (x - want.clone()).abs().max().into_scalar() };
                *wide_d = wide_d.max(gap(run(&mut wide)));
                *narrow_d = narrow_d.max(gap(run(&mut narrow)));
            }
        }
        assert!(diffs[0].iter().all(|&d| d < 1e-5), "{diffs:?}");
        // the window changes layers 0 and 2, not the global layer 1
        assert!(
            diffs[1][1] < 1e-5 && diffs[1][0] > 1e-3 && diffs[1][2] > 1e-3,
            "{diffs:?}"
        );
        assert_eq!(wide.footprint(), plain.footprint());
        assert!(narrow.footprint().values < plain.footprint().values);
    }

    /// `layers:all` gives the windowed layers the spec's cache within their
    /// windows: at full rank it attends as the planned dense cache; below
    /// it the windowed layers hold less than dense ones while the global
    /// layer holds what it holds under the default scope. The artifact must
    /// cover every layer; one of every layer also serves the default scope.
    #[test]
    fn all_layers_take_the_spec_within_their_windows() {
        use crate::cache::test_support::{artifact, rand4, G};
        use crate::{CacheFactory, CacheGeometry, CacheSpec, KvStorage};
        use dynakv_core::artifact::{Artifact, RopePlacement};
        let device = default_device();
        let g = CacheGeometry {
            n_layers: 3,
            rope_style: RopeStyle::SplitHalves,
            ..G
        };
        let plan = LayerPlan {
            layers: [Some(5), None, Some(5)]
                .into_iter()
                .map(|window| LayerAttention {
                    window,
                    rope: rope(1e4),
                })
                .collect(),
        };
        let two = artifact(RopePlacement::Pre);
        let one = two.select_layers(&[0]).unwrap();
        let every = Artifact::join_layers(&[(&[0, 1], &two), (&[2], &one)], 3).unwrap();
        let make = |artifact: Option<&Artifact>, spec: &str| {
            let spec: CacheSpec = spec.parse().unwrap();
            CacheFactory::for_plan(&plan, g, &device, artifact, &spec, KvStorage::Host)
                .and_then(|f| f.make())
        };
        let mut dense = make(None, "dense+store:kv=f32").unwrap();
        let mut full_rank = make(
            Some(&every),
            "dynakv:uniform@1+layers:all+store:latent=f32,basis=f32",
        )
        .unwrap();
        let mut all = make(Some(&every), "dynakv:uniform@0.5+layers:all").unwrap();
        let mut global = make(Some(&every), "dynakv:uniform@0.5").unwrap();
        let n = 14;
        let (q, k, v) = (
            rand4([1, 4, n, 4]),
            rand4([1, 2, n, 4]),
            rand4([1, 2, n, 4]),
        );
        let mut worst = 0f32;
        for (s0, len) in [(0, 8), (8, 1), (9, 1), (10, 4)] {
            let pos: Vec<usize> = (s0..s0 + len).collect();
            for layer in 0..3 {
                let run = |c: &mut Box<dyn crate::AttentionCache>| {
                    let x = |t: &Tensor<4>| t.clone().narrow(2, s0, len);
                    c.forward(layer, x(&q), x(&k), x(&v), &pos).unwrap()
                };
                let want = run(&mut dense);
                let got = run(&mut full_rank);
                worst = worst.max((got - want).abs().max().into_scalar());
                run(&mut all);
                run(&mut global);
            }
        }
        assert!(worst < 1e-4, "{worst}");
        assert_eq!(
            full_rank.footprint().values_full,
            dense.footprint().values_full
        );
        assert!(all.footprint().values < global.footprint().values);
        assert_eq!(all.spec_footprint().values, global.spec_footprint().values);
        // k= / v= of a DynaKV spec set the windowed layers' dense caches
        // (global scope); with every layer DynaKV there are none to set
        let prefill = |spec: &str| {
            let mut c = make(Some(&every), spec).unwrap();
            let pos: Vec<usize> = (0..8).collect();
            let x = |t: &Tensor<4>| t.clone().narrow(2, 0, 8);
            for layer in 0..3 {
                c.forward(layer, x(&q), x(&k), x(&v), &pos).unwrap();
            }
            c
        };
        let f16 = prefill("dynakv:uniform@0.5");
        let f32 = prefill("dynakv:uniform@0.5+store:kv=f32");
        assert!(f16.footprint().value_bytes < f32.footprint().value_bytes);
        assert_eq!(f16.spec_footprint(), f32.spec_footprint());
        assert!(make(Some(&every), "dynakv:uniform@0.5+layers:all+store:kv=f32").is_err());
        let spec: CacheSpec = "dynakv:uniform@0.5+store:kv=f32".parse().unwrap();
        assert!(CacheFactory::new(
            G,
            crate::cache::test_support::rope(),
            &device,
            Some(&two),
            &spec
        )
        .is_err());
        // an artifact of the global layer alone serves the default scope only
        assert!(make(Some(&one), "dynakv:uniform@0.5").is_ok());
        let Err(err) = make(Some(&one), "dynakv:uniform@0.5+layers:all") else {
            panic!("layers:all took an artifact of the global layer alone");
        };
        assert!(err.to_string().contains("every layer"), "{err}");
    }
}
