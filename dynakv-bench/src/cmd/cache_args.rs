//! `--cache full|dynakv` and its options, shared by eval and bench commands:
//! the command line's spelling of a [`CacheSpec`].

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dynakv_burn::cache::{Precision, DEFAULT_KV, DEFAULT_LATENT};
use dynakv_burn::dynakv_snapkv::{GqaScores, KeepBudget, SnapKvPreset, SnapKvSpec};
use dynakv_burn::{AttentionCache, CacheFactory, CacheSpec, LayerScope, PRESETS};
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::{BudgetHold, EnergyRule, PolicyKind, PolicySpec};
use dynakv_core::quant::{BasisDtype, KvDtype, LatentDtype, LatentScales};
use dynakv_models::llama::LlamaCppKv;
use dynakv_models::ModelError;

use super::common::Loaded;
use super::values;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Full,
    Dynakv,
}

/// The cache flags a preset replaces.
const PRESET_REPLACES: &[&str] = &[
    "cache",
    "policy",
    "budget",
    "recent_full",
    "snapkv",
    "snapkv_capacity",
    "snapkv_preset",
    "snapkv_per_layer",
    "snapkv_layer_max",
    "snapkv_whole",
    "snapkv_on_arrival",
    "kv_dtype",
    "k_dtype",
    "v_dtype",
    "latent_dtype",
    "latent_scales",
    "basis_dtype",
    "no_kv_rotation",
];

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// A named configuration, the best measured at a byte level
    /// (docs/results.md, "The bytes frontier"): bytes-25, bytes-12, bytes-6,
    /// bytes-3 (KV bytes per token as a percentage of an f16 dense cache).
    #[arg(
        long,
        conflicts_with_all = PRESET_REPLACES,
        value_parser = clap::builder::PossibleValuesParser::new(PRESETS.iter().map(|p| p.name)),
    )]
    pub preset: Option<String>,
    #[arg(long, value_enum, default_value_t = CacheKind::Full)]
    pub cache: CacheKind,
    /// Calibration artifact from `dynakv calibrate` (for --cache dynakv).
    #[arg(long)]
    pub artifact: Option<PathBuf>,
    /// auto (the default): the training-free policy `dynakv calibrate`
    /// measured best for the model, recorded in the artifact (energy for
    /// artifacts made before it was recorded).
    #[arg(long, value_enum, default_value_t = PolicyKind::Auto)]
    pub policy: PolicyKind,
    /// Target retained fraction in (0, 1].
    #[arg(value_parser = values::fraction, long, default_value_t = 0.47)]
    pub budget: f64,
    /// uniform / per-layer: the first N tokens keep full rank (attention sinks).
    #[arg(long, default_value_t = 1)]
    pub sink_tokens: usize,
    /// energy: weight of key error against value error (lagrange rule), or key
    /// threshold as a multiple of the value threshold (threshold rule).
    /// Default: the artifact's, chosen by `dynakv calibrate` on held-out calib
    /// windows; 2 for artifacts without one (chosen for SmolLM2 on Brown
    /// calib windows 40-41, docs/results.md).
    #[arg(value_parser = values::positive_f32, long)]
    pub key_factor: Option<f32>,
    /// energy: lagrange (water-filling: equal marginal error per dimension over
    /// tokens, layers, K and V) or threshold (equal relative error per token).
    #[arg(long, value_enum, default_value_t = EnergyRule::Lagrange)]
    pub energy_rule: EnergyRule,
    /// DynaKV: the last N tokens of every append keep full rank, so SnapKV's
    /// window and decoded tokens stay whole (0: off).
    #[arg(long, default_value_t = 0)]
    pub recent_full: usize,
    /// energy / router: hold the budget on the text the cache sees (track:
    /// a running controller, exact at each prefill), never exceed it
    /// (ceiling), or keep the calibration fit's point whatever it gives
    /// (open). Also applies to a preset's DynaKV part.
    #[arg(long, value_enum, default_value_t = BudgetHold::Track)]
    pub budget_hold: BudgetHold,
    /// Shorthand for --budget-hold ceiling: the retained fraction never
    /// exceeds --budget, even over the recent tokens' full rank.
    #[arg(long, conflicts_with = "budget_hold")]
    pub budget_ceiling: bool,
    /// SnapKV at the end of prefill: fraction of prompt tokens removed, in
    /// [0, 1) (kvpress semantics). With --cache dynakv one token set per layer.
    #[arg(value_parser = values::removed_fraction, long, conflicts_with = "snapkv_capacity")]
    pub snapkv: Option<f64>,
    /// SnapKV with a capacity: at most C prompt tokens kept (original semantics).
    #[arg(value_parser = values::at_least_one, long)]
    pub snapkv_capacity: Option<usize>,
    /// SnapKV preset: kvpress (window 64, kernel 5, avg pooling), paper
    /// (window 32, kernel 7, max pooling) or recall (ours: window 32, kernel
    /// 7, forward max pooling, which keeps the tokens after a voted one).
    #[arg(long, value_enum, default_value_t = SnapKvPreset::Kvpress)]
    pub snapkv_preset: SnapKvPreset,
    /// SnapKV keeps one token set per layer (votes averaged over every query
    /// head) even on the full cache; DynaKV always does (joint basis).
    #[arg(long)]
    pub snapkv_per_layer: bool,
    /// SnapKV keeps one token set per layer, each token scored by its
    /// largest score over query heads (ours) instead of the mean.
    #[arg(long)]
    pub snapkv_layer_max: bool,
    /// SnapKV over DynaKV holds each layer's prompt at full rank until SnapKV
    /// prunes it (the paper's order); then this fraction of the kept tokens
    /// (the window, then the highest-scored) keeps full rank and the rest
    /// take the rank policy's ranks (ours; default 0).
    #[arg(long, value_parser = values::unit, conflicts_with = "snapkv_on_arrival")]
    pub snapkv_whole: Option<f64>,
    /// SnapKV over DynaKV: compress the prompt as it arrives, before SnapKV
    /// scores it (what the compositions measured before 2026-11-30 did).
    #[arg(long)]
    pub snapkv_on_arrival: bool,
    /// Full cache: keys and values stored as f16 (the default: f32's PPL at
    /// half the bytes, as llama.cpp's default), f32 (the exact reference),
    /// bf16, or llama.cpp's q8_0 / q4_0 blocks (32 values and an f16 scale).
    #[arg(long, value_enum, default_value_t = DEFAULT_KV)]
    pub kv_dtype: KvDtype,
    /// Full cache: keys only (overrides --kv-dtype).
    #[arg(long, value_enum)]
    pub k_dtype: Option<KvDtype>,
    /// Full cache: values only (overrides --kv-dtype).
    #[arg(long, value_enum)]
    pub v_dtype: Option<KvDtype>,
    /// DynaKV: latent coordinates stored as int8 (the default: f32's PPL at
    /// a quarter of the bytes), f32, f16, int4 or mixed (8-bit then 4-bit).
    #[arg(long, value_enum, default_value_t = DEFAULT_LATENT)]
    pub latent_dtype: LatentDtype,
    /// DynaKV integer latents: scales per token and group of 32 (token) or
    /// per coordinate from calibration (channel).
    #[arg(long, value_enum, default_value_t = LatentScales::Token)]
    pub latent_scales: LatentScales,
    /// DynaKV: bases (encoders and decoders, fixed bytes) held in f16 (half
    /// the bytes, the same PPL) or f32 (exactly as calibrated).
    #[arg(long, value_enum, default_value_t = BasisDtype::F16)]
    pub basis_dtype: BasisDtype,
    /// Full cache in q8_0 / q4_0: store keys and values without the Hadamard
    /// rotation llama.cpp applies by default (its LLAMA_ATTN_ROT_DISABLE=1).
    #[arg(long)]
    pub no_kv_rotation: bool,
    /// Models with sliding-window layers (Gemma 3): the cache on the global
    /// layers only (global, the default: theirs is what grows with the
    /// context) or on every layer, the windowed ones within their windows
    /// (all: DynaKV needs an artifact from `dynakv calibrate --layers all`,
    /// SnapKV one token set per layer).
    #[arg(long, default_value = "global", value_parser = values::parsed::<LayerScope>)]
    pub layers: LayerScope,
}

/// Makes fresh caches of the requested kind.
pub struct CacheMaker {
    factory: CacheFactory,
}

impl CacheArgs {
    pub fn label(&self) -> String {
        if let Some(p) = &self.preset {
            return match self.hold() {
                BudgetHold::Track => format!("preset/{p}"),
                h => format!("preset/{p}/hold-{h}"),
            };
        }
        let hold = match self.hold() {
            BudgetHold::Track => String::new(),
            h => format!("/hold-{h}"),
        };
        let base = match self.cache {
            CacheKind::Full => "full".into(),
            CacheKind::Dynakv => match self.recent_full {
                0 => format!("dynakv/{}/{}{hold}", self.policy, self.budget),
                n => format!("dynakv/{}/{}/recent{n}{hold}", self.policy, self.budget),
            },
        };
        let layer = match (self.snapkv_layer_max, self.snapkv_per_layer) {
            (true, _) => "/layer-max",
            (false, true) => "/layer",
            _ => "",
        };
        let whole = match (self.snapkv_whole, self.snapkv_on_arrival) {
            (Some(w), _) => format!("/whole{w}"),
            (None, true) => "/arrival".to_string(),
            (None, false) => String::new(),
        };
        let label = match (self.snapkv, self.snapkv_capacity) {
            (Some(r), _) => format!("{base}+snapkv/{}{layer}/r{r}{whole}", self.snapkv_preset),
            (_, Some(c)) => format!("{base}+snapkv/{}{layer}/c{c}{whole}", self.snapkv_preset),
            _ => base,
        };
        let label = match self.layers {
            LayerScope::Global => label,
            LayerScope::All => format!("{label}+layers:all"),
        };
        let p = self.precision();
        if p.is_default() {
            label
        } else {
            format!("{label}+store:{p}")
        }
    }

    /// With `--cache full`, DynaKV's flags changed from their defaults are an
    /// error, not silently ignored.
    fn check_no_dynakv_flags(&self) -> Result<()> {
        let d = Self::defaults();
        let mut set = Vec::new();
        if self.policy != d.policy {
            set.push("--policy");
        }
        if self.budget != d.budget {
            set.push("--budget");
        }
        if self.sink_tokens != d.sink_tokens {
            set.push("--sink-tokens");
        }
        if self.key_factor != d.key_factor {
            set.push("--key-factor");
        }
        if self.energy_rule != d.energy_rule {
            set.push("--energy-rule");
        }
        if self.recent_full != d.recent_full {
            set.push("--recent-full");
        }
        if !set.is_empty() {
            bail!(
                "{} apply to --cache dynakv, not the full cache",
                set.join(", ")
            );
        }
        Ok(())
    }

    /// The flags' defaults (what a command line without cache flags gives).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            cache: CacheArgs,
        }
        <Only as clap::Parser>::parse_from(["dynakv"]).cache
    }

    /// The budget promise the flags ask for.
    pub fn hold(&self) -> BudgetHold {
        if self.budget_ceiling {
            BudgetHold::Ceiling
        } else {
            self.budget_hold
        }
    }

    /// The storage precisions the flags ask for (not yet checked against
    /// the cache kind: [`CacheArgs::spec`] does).
    pub fn precision(&self) -> Precision {
        Precision {
            k: self.k_dtype.unwrap_or(self.kv_dtype),
            v: self.v_dtype.unwrap_or(self.kv_dtype),
            latent: self.latent_dtype,
            scales: self.latent_scales,
            rotate: !self.no_kv_rotation,
            basis: self.basis_dtype,
        }
    }

    /// The exact reference: the uncompressed cache in f32, without SnapKV
    /// (what `LlamaModel::dense_cache` builds; the default full cache stores
    /// f16 and is measured like any other).
    pub fn is_full(&self) -> bool {
        self.preset.is_none()
            && self.cache == CacheKind::Full
            && self.snapkv.is_none()
            && self.snapkv_capacity.is_none()
            && self.precision() == Precision::f32_rows()
    }

    /// What the flags ask for, validated (before any model is loaded).
    pub fn spec(&self) -> Result<CacheSpec> {
        let held = self.budget_ceiling || self.budget_hold != BudgetHold::Track;
        if let Some(p) = &self.preset {
            let mut spec = CacheSpec::preset(p)?;
            if held && spec.dynakv.is_none() {
                bail!("--budget-hold/--budget-ceiling apply to DynaKV; preset {p} has none");
            }
            if let Some(d) = &mut spec.dynakv {
                d.hold = self.hold();
            }
            return Ok(spec.on_layers(self.layers));
        }
        if held && self.cache == CacheKind::Full {
            bail!("--budget-hold/--budget-ceiling apply to --cache dynakv");
        }
        if self.cache == CacheKind::Full {
            self.check_no_dynakv_flags()?;
        }
        let dynakv = match self.cache {
            CacheKind::Full => None,
            CacheKind::Dynakv => Some(PolicySpec {
                kind: self.policy,
                budget: self.budget,
                sink_tokens: self.sink_tokens,
                key_factor: self.key_factor,
                energy_rule: self.energy_rule,
                recent_full: self.recent_full,
                hold: self.hold(),
            }),
        };
        let budget = match (self.snapkv, self.snapkv_capacity) {
            (None, None) => None,
            (Some(r), None) => Some(KeepBudget::CompressionRatio(r)),
            (None, Some(c)) => Some(KeepBudget::Capacity(c)),
            (Some(_), Some(_)) => bail!("give --snapkv or --snapkv-capacity, not both"),
        };
        for (given, flag) in [
            (self.snapkv_whole.is_some(), "--snapkv-whole"),
            (self.snapkv_on_arrival, "--snapkv-on-arrival"),
        ] {
            if given && budget.is_none() {
                bail!("{flag} says how SnapKV's kept tokens are ranked: give --snapkv or --snapkv-capacity");
            }
            if given && self.cache == CacheKind::Full {
                bail!("{flag} applies to --cache dynakv: the full cache stores every token whole");
            }
        }
        let gqa = match (self.snapkv_layer_max, self.snapkv_per_layer) {
            (true, _) => Some(GqaScores::LayerMax),
            (false, true) => Some(GqaScores::Layer),
            _ => None,
        };
        let spec = CacheSpec {
            dynakv,
            snapkv: budget.map(|budget| SnapKvSpec {
                preset: self.snapkv_preset,
                budget,
                gqa,
                whole: self.snapkv_whole,
                on_arrival: self.snapkv_on_arrival,
            }),
            layers: self.layers,
            precision: self.precision(),
        };
        spec.validate().map_err(|e| {
            anyhow::anyhow!("{e} (--kv-dtype/--k-dtype/--v-dtype apply to --cache full, --latent-dtype/--latent-scales/--basis-dtype to --cache dynakv)")
        })?;
        Ok(spec)
    }

    /// Checks the flags before a model loads: the spec (returned), and an
    /// artifact given exactly when DynaKV needs one.
    pub fn check(&self) -> Result<CacheSpec> {
        let spec = self.spec()?;
        match (spec.dynakv.is_some(), &self.artifact) {
            (true, None) => {
                bail!("DynaKV (--cache dynakv or its preset) needs --artifact FILE (from `dynakv calibrate`)")
            }
            (false, Some(_)) => bail!("--artifact applies to DynaKV caches only"),
            (_, Some(p)) if !p.is_file() => bail!("--artifact {}: no such file", p.display()),
            _ => Ok(spec),
        }
    }

    /// The llama.cpp KV cache type these flags stand for under
    /// `--llama-cpp` (the reference decoder keeps its own cache): the dense
    /// cache with f16 rows (the default) or f32 rows, nothing else.
    pub fn llama_cpp_kv(&self) -> Result<LlamaCppKv> {
        let spec = self.check()?;
        if spec == CacheSpec::dense() {
            Ok(LlamaCppKv::F16)
        } else if spec == CacheSpec::dense().with_precision(Precision::f32_rows()) {
            Ok(LlamaCppKv::F32)
        } else {
            bail!(
                "--llama-cpp runs llama.cpp's dense cache: --kv-dtype f16 (the default) or f32, and no other cache flags"
            )
        }
    }

    pub fn maker(&self, loaded: &Loaded) -> Result<CacheMaker> {
        let spec = self.check()?;
        self.maker_for(loaded, &spec)
    }

    /// Caches of another `spec`, with these flags' artifact (a DynaKV spec
    /// without `--artifact` is refused).
    pub fn maker_for(&self, loaded: &Loaded, spec: &CacheSpec) -> Result<CacheMaker> {
        if spec.dynakv.is_some() && self.artifact.is_none() {
            bail!("`{spec}` is a DynaKV cache: it needs --artifact FILE");
        }
        // a dense spec (a paired run's base) takes no artifact: none is
        // loaded for it
        let artifact = match self.artifact.as_ref().filter(|_| spec.dynakv.is_some()) {
            Some(path) => {
                let artifact =
                    Artifact::load(path).with_context(|| format!("loading {}", path.display()))?;
                loaded.model.check_artifact(&artifact, &loaded.sha256)?;
                Some(artifact)
            }
            None => None,
        };
        let factory = loaded.model.cache_factory(artifact.as_ref(), spec)?;
        Ok(CacheMaker { factory })
    }
}

impl CacheMaker {
    pub fn make(&self) -> Result<Box<dyn AttentionCache>, ModelError> {
        Ok(self.factory.make()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cache: CacheArgs,
    }

    fn spec(args: &[&str]) -> Result<CacheSpec> {
        Cli::try_parse_from(std::iter::once("dynakv").chain(args.iter().copied()))?
            .cache
            .spec()
    }

    #[test]
    fn the_budget_promise_flags_apply_to_dynakv_only() {
        let hold = |args: &[&str]| spec(args).unwrap().dynakv.unwrap().hold;
        assert_eq!(hold(&["--cache", "dynakv"]), BudgetHold::Track);
        assert_eq!(
            hold(&["--cache", "dynakv", "--budget-ceiling"]),
            BudgetHold::Ceiling
        );
        assert_eq!(
            hold(&["--preset", "bytes-6", "--budget-hold", "open"]),
            BudgetHold::Open
        );
        assert_eq!(hold(&["--preset", "bytes-6"]), BudgetHold::Track);
        for bad in [
            &["--budget-ceiling"][..],
            &["--budget-hold", "open"],
            &[
                "--cache",
                "dynakv",
                "--budget-ceiling",
                "--budget-hold",
                "track",
            ],
            &["--cache", "dynakv", "--budget-hold", "loose"],
        ] {
            assert!(spec(bad).is_err(), "{bad:?}");
        }
        assert!(spec(&[]).unwrap().dynakv.is_none());
    }

    #[test]
    fn dynakv_flags_on_the_full_cache_are_errors() {
        for (args, names) in [
            (&["--budget", "0.3"][..], "--budget"),
            (
                &["--policy", "uniform", "--recent-full", "8"],
                "--policy, --recent-full",
            ),
            (&["--key-factor", "1"], "--key-factor"),
        ] {
            let e = spec(args).unwrap_err().to_string();
            assert!(e.contains(names) && e.contains("--cache dynakv"), "{e}");
        }
        // their defaults, given explicitly, change nothing
        assert!(spec(&["--budget", "0.47"]).is_ok());
        // out of range values are refused by the parser, naming the option
        for (args, name) in [
            (&["--budget", "7"][..], "--budget"),
            (&["--budget", "NaN"], "--budget"),
            (&["--snapkv", "1"], "--snapkv"),
            (&["--snapkv-capacity", "0"], "--snapkv-capacity"),
            (&["--key-factor=-1"], "--key-factor"),
        ] {
            let e = spec(args).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn bases_are_f16_by_default_and_the_flag_is_dynakvs() {
        let basis = |args: &[&str]| spec(args).unwrap().precision.basis;
        assert_eq!(basis(&["--cache", "dynakv"]), BasisDtype::F16);
        assert_eq!(basis(&["--preset", "bytes-6"]), BasisDtype::F16);
        assert_eq!(
            basis(&["--cache", "dynakv", "--basis-dtype", "f32"]),
            BasisDtype::F32
        );
        assert!(spec(&["--basis-dtype", "f32"]).is_err());
        assert!(spec(&["--preset", "bytes-6", "--basis-dtype", "f32"]).is_err());
        assert!(spec(&["--cache", "dynakv", "--basis-dtype", "bf16"]).is_err());
    }
}
