//! DynaKV on the real SmolLM2 model: full rank reproduces the dense cache,
//! error shrinks as the budget grows, decoding equals prefill, and bad
//! configurations are clear errors. Calibrates a small artifact in-process.

use std::sync::OnceLock;

use burn::tensor::Tensor;
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::cache::Precision;
use dynakv_burn::device::default_device;
use dynakv_burn::{calibrate, AttentionCache, CacheFactory, CacheSpec, CalibrationConfig};
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::basis::BasisKind;
use dynakv_core::policy::{BudgetHold, EnergyRule, PolicyKind, PolicySpec};
use dynakv_core::quant::{BasisDtype, LatentDtype};
use dynakv_models::corpus::Split;
use dynakv_models::gguf::GgufFile;
use dynakv_models::{LlamaModel, ModelError, TextTokenizer};

struct Setup {
    model: LlamaModel,
    sha: String,
    eval_ids: Vec<u32>,
    pre: Artifact,
    post: Artifact,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let path = dynakv_models::assets::default_model().unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let tok = TextTokenizer::from_gguf(&gguf).unwrap();
        let model = LlamaModel::from_gguf(&gguf, &default_device()).unwrap();
        let sha = dynakv_models::assets::sha256_file(&path).unwrap();
        let calib = document_tokens(&tok, &brown_docs(Split::Calib, Some(2)).unwrap()).unwrap();
        let eval_ids = document_tokens(&tok, &brown_docs(Split::Eval, Some(1)).unwrap()).unwrap();
        let windows: Vec<&[u32]> = calib.chunks_exact(128).collect();
        let target = model.calibration_target(&sha, false).unwrap();
        let art = |rope| {
            let cfg = CalibrationConfig {
                stats_windows: 6,
                sample_windows: 2,
                basis: BasisKind::Pca,
                rope,
                level_step: 8,
            };
            calibrate(
                &target,
                &cfg,
                &windows,
                |w: &&[u32], cache| model.hidden(w, 0, cache).map(|_| ()),
                |_, _| {},
            )
            .unwrap()
        };
        Setup {
            pre: art(RopePlacement::Pre),
            post: art(RopePlacement::Post),
            model,
            sha,
            eval_ids,
        }
    })
}

fn spec(policy: PolicyKind, budget: f64) -> CacheSpec {
    held(policy, budget, BudgetHold::Open)
}

/// f32 latents (the default stores int8): these tests hold DynaKV's
/// arithmetic to float rounding.
fn held(policy: PolicyKind, budget: f64, hold: BudgetHold) -> CacheSpec {
    CacheSpec::dynakv(PolicySpec {
        kind: policy,
        budget,
        sink_tokens: 1,
        key_factor: Some(1.0),
        energy_rule: EnergyRule::Threshold,
        recent_full: 0,
        hold,
    })
    .with_precision(f32_latents())
}

fn f32_latents() -> Precision {
    Precision {
        latent: LatentDtype::F32,
        ..Precision::default()
    }
}

/// What `--cache dynakv --artifact A` does: the model checks the artifact
/// is its own, the factory builds the cache.
fn factory(
    s: &Setup,
    sha: &str,
    artifact: &Artifact,
    spec: &CacheSpec,
) -> Result<CacheFactory, ModelError> {
    s.model.check_artifact(artifact, sha)?;
    s.model.cache_factory(Some(artifact), spec)
}

fn logits(s: &Setup, cache: &mut dyn AttentionCache, ids: &[u32]) -> Tensor<2> {
    s.model.forward(ids, 0, cache).unwrap()
}

/// Logits of `ids` fed one decode step a token.
fn decode_steps(s: &Setup, cache: &mut dyn AttentionCache, ids: &[u32]) -> Tensor<2> {
    let steps: Vec<Tensor<2>> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| s.model.forward(&[t], i, cache).unwrap())
        .collect();
    Tensor::cat(steps, 0)
}

/// Whether the host kernels rebuild keys from integer codes here.
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn max_rel(a: Tensor<2>, b: Tensor<2>) -> f32 {
    let scale: f32 = b.clone().abs().max().into_scalar();
    let d: f32 = (a - b).abs().max().into_scalar();
    d / scale
}

#[test]
fn full_rank_matches_the_dense_cache_for_both_placements() {
    let s = setup();
    let ids = &s.eval_ids[..96];
    let want = logits(s, s.model.dense_cache().unwrap().as_mut(), ids);
    // f32 bases: the same attention up to float rounding; f16 bases (the
    // default): each basis entry within 2^-11 relative, measured 4.8e-4 here
    for (basis, tol) in [(BasisDtype::F32, 1e-4), (BasisDtype::F16, 2e-3)] {
        let precision = Precision {
            basis,
            ..f32_latents()
        };
        for art in [&s.pre, &s.post] {
            let sp = spec(PolicyKind::Uniform, 1.0).with_precision(precision);
            let f = factory(s, &s.sha, art, &sp).unwrap();
            let got = logits(s, f.make().unwrap().as_mut(), ids);
            let e = max_rel(got, want.clone());
            assert!(
                e <= tol,
                "{basis} {:?}: max relative error {e}",
                art.header.rope
            );
        }
    }
}

/// SnapKV over DynaKV with tiers (`whole=`): the prompt is held at full
/// rank, so the prefill's last logits are the dense model's even at budget
/// 0.30; after pruning, the first kept tokens by priority keep full rank and
/// the rest rank 0.30, so the footprint holds kept x (F + (1 - F) x 0.30).
#[test]
fn snapkv_tiers_prefill_at_full_rank_then_keep_their_budget() {
    use dynakv_burn::dynakv_snapkv::{GqaScores, SnapKvPreset, SnapKvSpec};
    let s = setup();
    let ids = &s.eval_ids[..160];
    let want = s
        .model
        .forward_last(ids, 0, s.model.dense_cache().unwrap().as_mut())
        .unwrap();
    let tiered = |whole, on_arrival| SnapKvSpec {
        gqa: Some(GqaScores::Layer),
        whole,
        on_arrival,
        ..SnapKvSpec::ratio(SnapKvPreset::Recall, 0.75)
    };
    let art = &s.pre;
    // f32 bases: full-rank reconstruction up to float rounding
    let f32_bases = Precision {
        basis: BasisDtype::F32,
        ..f32_latents()
    };
    // no sink: every kept token outside the whole ones takes rank 0.30
    let base = CacheSpec::dynakv(PolicySpec {
        kind: PolicyKind::Uniform,
        budget: 0.30,
        sink_tokens: 0,
        key_factor: Some(1.0),
        energy_rule: EnergyRule::Threshold,
        recent_full: 0,
        hold: BudgetHold::Open,
    })
    .with_precision(f32_bases);
    let mut cache = factory(
        s,
        &s.sha,
        art,
        &base.clone().with_snapkv(tiered(Some(0.25), false)),
    )
    .unwrap()
    .make()
    .unwrap();
    let got = s.model.forward_last(ids, 0, cache.as_mut()).unwrap();
    let scale: f32 = want.clone().abs().max().into_scalar();
    let e = (got - want.clone()).abs().max().into_scalar::<f32>() / scale;
    assert!(e < 1e-4, "tiered prefill: max relative error {e}");
    // 40 of 160 kept, 10 whole: (10 + 30 x 0.30 rounded to levels) / 160
    let level = |r: f64| (r * 192.0 / 8.0).round() * 8.0 / 192.0;
    let want_retained = (10.0 + 30.0 * level(0.30)) / 160.0;
    let got_retained = cache.footprint().retained();
    assert!(
        (got_retained - want_retained).abs() < 1e-9,
        "retained {got_retained}, want {want_retained}"
    );
    // the default (whole unset) holds the prompt too: the same prefill
    let mut held = factory(
        s,
        &s.sha,
        art,
        &base.clone().with_snapkv(tiered(None, false)),
    )
    .unwrap()
    .make()
    .unwrap();
    let same = s.model.forward_last(ids, 0, held.as_mut()).unwrap();
    let e = (same - want.clone()).abs().max().into_scalar::<f32>() / scale;
    assert!(e < 1e-4, "held prefill: max relative error {e}");
    // compressed on arrival, the prefill attends over truncated latents
    let mut plain = factory(s, &s.sha, art, &base.with_snapkv(tiered(None, true)))
        .unwrap()
        .make()
        .unwrap();
    let other = s.model.forward_last(ids, 0, plain.as_mut()).unwrap();
    let e = (other - want).abs().max().into_scalar::<f32>() / scale;
    assert!(e > 1e-3, "the composition on arrival should differ: {e}");
}

#[test]
fn error_does_not_grow_with_the_budget() {
    let s = setup();
    let ids = &s.eval_ids[..128];
    let want = logits(s, s.model.dense_cache().unwrap().as_mut(), ids);
    for policy in [
        PolicyKind::Uniform,
        PolicyKind::Energy,
        PolicyKind::PerLayer,
    ] {
        let mut last = f32::INFINITY;
        for budget in [0.15, 0.3, 0.6, 1.0] {
            let f = factory(s, &s.sha, &s.pre, &spec(policy, budget)).unwrap();
            let got = logits(s, f.make().unwrap().as_mut(), ids);
            let err: f32 = (got - want.clone()).abs().mean().into_scalar();
            assert!(
                err <= last * 1.02 + 1e-6,
                "{policy:?} at {budget}: {err} > {last}"
            );
            last = err;
        }
    }
}

#[test]
fn step_by_step_decode_equals_prefill() {
    let s = setup();
    let ids = &s.eval_ids[..24];
    for art in [&s.pre, &s.post] {
        let f = factory(s, &s.sha, art, &spec(PolicyKind::Uniform, 0.3)).unwrap();
        let prefill = logits(s, f.make().unwrap().as_mut(), ids);
        let steps = decode_steps(s, f.make().unwrap().as_mut(), ids);
        let e = max_rel(steps, prefill);
        assert!(e <= 1e-4, "{:?}: {e}", art.header.rope);
    }
}

/// Decode steps over 8-bit and mixed latents: on CPUs with AVX-512 VNNI the
/// host kernel rebuilds pre-RoPE keys from the latents' codes against the
/// key decoder rounded to 8 bits, where a prefill rebuilds them in f32; the
/// two stay within the decoder's rounding (about a percent of a key), and
/// far from what a wrong sum would give. Prints the distance.
#[test]
fn step_by_step_decode_over_integer_latents_stays_near_prefill() {
    let s = setup();
    let ids = &s.eval_ids[..40];
    for latent in ["latent=int8", "latent=mixed"] {
        let mut sp = spec(PolicyKind::Uniform, 0.3);
        sp.precision = latent.parse().unwrap();
        let f = factory(s, &s.sha, &s.pre, &sp).unwrap();
        let prefill = logits(s, f.make().unwrap().as_mut(), ids);
        let mut cache = f.make().unwrap();
        let fixed = cache.footprint().fixed_bytes;
        let e = max_rel(decode_steps(s, cache.as_mut(), ids), prefill);
        eprintln!("{latent}: largest logit difference {e:.2e} of the largest logit");
        assert!(e <= 2e-2, "{latent}: {e}");
        // the key decoders' codes, made by the first decode step (once per
        // factory's bases), are counted in the fixed bytes
        let d = s.model.config.n_kv_heads * s.model.config.head_dim;
        let codes = d * d + 4 * d + 4 * (d / 4 + 1) * d;
        let grown = cache.footprint().fixed_bytes - fixed;
        let want = match has_vnni() {
            true => (s.model.config.n_layers * codes) as u64,
            false => 0,
        };
        assert_eq!(grown, want, "{latent}: fixed bytes grew by {grown}");
    }
}

/// The budget promise on a text unlike the Brown calibration text: source
/// code (this repository's own controller). The fitted point alone gives
/// what it gives; `track` holds the budget at the prefill, `ceiling` never
/// exceeds it, token by token too.
#[test]
fn the_budget_holds_on_code_as_on_prose() {
    let s = setup();
    let tok = {
        let path = dynakv_models::assets::default_model().unwrap();
        TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
    };
    let code = tok
        .encode(include_str!("../../dynakv-core/src/policy/controller.rs"))
        .unwrap();
    let (prompt, gen) = (&code[..384], &code[384..416]);
    for (text, ids) in [("prose", &s.eval_ids[..384]), ("code", prompt)] {
        let mut got = Vec::new();
        for hold in [BudgetHold::Open, BudgetHold::Track, BudgetHold::Ceiling] {
            let f = factory(s, &s.sha, &s.pre, &held(PolicyKind::Energy, 0.3, hold)).unwrap();
            let mut cache = f.make().unwrap();
            s.model.forward(ids, 0, cache.as_mut()).unwrap();
            let r = cache.footprint().retained();
            got.push(r);
            match hold {
                BudgetHold::Open => {}
                BudgetHold::Track => assert!((r - 0.3).abs() <= 0.01, "{text} track: {r}"),
                BudgetHold::Ceiling => {
                    assert!((0.29..=0.3 + 1e-9).contains(&r), "{text} ceiling: {r}");
                    for (i, &t) in gen.iter().enumerate() {
                        s.model
                            .forward(&[t], ids.len() + i, cache.as_mut())
                            .unwrap();
                        let r = cache.footprint().retained();
                        assert!(r <= 0.3 + 1e-9, "{text} ceiling, decode step {i}: {r}");
                    }
                }
            }
        }
        println!("{text}: retained open / track / ceiling = {got:?}");
    }
}

#[test]
fn bad_configurations_are_clear_errors() {
    let s = setup();
    for budget in [0.0, -0.1, 1.5, f64::NAN] {
        let err = factory(s, &s.sha, &s.pre, &spec(PolicyKind::Energy, budget))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("budget"), "{err}");
    }
    let err = factory(s, "0000", &s.pre, &spec(PolicyKind::Uniform, 0.5))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("file_sha256"), "{err}");
    assert!("median".parse::<PolicyKind>().is_err());
}

#[test]
fn a_trained_router_round_trips_and_drives_the_cache() {
    use dynakv_burn::train::{train, LocalConfig, Stage};
    use std::sync::atomic::AtomicBool;
    let s = setup();
    let config = LocalConfig {
        target: 0.3,
        steps: 2,
        ..LocalConfig::default()
    };
    let ids = &s.eval_ids[..384];
    let target = s.model.train_target();
    let windows = |ids: &'static [u32]| ids.chunks_exact(128).collect::<Vec<_>>();
    let forward = |w: &&[u32], cache: &mut dyn AttentionCache| s.model.forward(w, 0, cache);
    let (trained, summary) = train(
        &target,
        &s.pre,
        &windows(&ids[..256]),
        &windows(&ids[256..]),
        &config,
        Stage::Local,
        &AtomicBool::new(false),
        forward,
        |_| {},
    )
    .unwrap();
    assert_eq!(summary.steps, 2);
    assert!((summary.heldout_retained - 0.3).abs() < 0.1, "{summary:?}");
    // Save and load keep the routers and the training record.
    let path =
        std::env::temp_dir().join(format!("dynakv-router-{}.safetensors", std::process::id()));
    trained.save(&path).unwrap();
    let back = Artifact::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(back.routers, trained.routers);
    assert_eq!(back.header.router, trained.header.router);
    // `--policy router` builds from it; a budget it was not thresholded for is an error.
    let f = factory(s, &s.sha, &back, &spec(PolicyKind::Router, 0.3)).unwrap();
    let mut cache = f.make().unwrap();
    s.model
        .forward(&s.eval_ids[..64], 0, cache.as_mut())
        .unwrap();
    let r = cache.footprint().retained();
    assert!(r > 0.0 && r < 1.0, "{r}");
    // Training recorded each layer's share; a held router keeps the budget.
    let info = back.header.router.as_ref().unwrap();
    assert_eq!(info.shares.len(), back.bases.len());
    let f = factory(
        s,
        &s.sha,
        &back,
        &held(PolicyKind::Router, 0.3, BudgetHold::Track),
    )
    .unwrap();
    let mut cache = f.make().unwrap();
    s.model
        .forward(&s.eval_ids[..64], 0, cache.as_mut())
        .unwrap();
    let r = cache.footprint().retained();
    assert!((r - 0.3).abs() <= 0.01, "held router: {r}");
    assert!(factory(s, &s.sha, &back, &spec(PolicyKind::Router, 0.5)).is_err());
    // One e2e step (whole-model KL) continues from the local artifact.
    let (e2e, summary) = train(
        &target,
        &back,
        &windows(&ids[..128]),
        &windows(&ids[256..]),
        &LocalConfig { steps: 1, ..config },
        Stage::E2e,
        &AtomicBool::new(false),
        forward,
        |st| assert!(st.err.is_finite() && st.err >= 0.0, "{st:?}"),
    )
    .unwrap();
    assert_eq!(summary.steps, 1);
    assert_eq!(e2e.header.router.as_ref().unwrap().stage, "e2e");
    // Stopped before the first step: an error, not a "trained" artifact.
    let err = train(
        &target,
        &s.pre,
        &windows(&ids[..256]),
        &windows(&ids[256..]),
        &config,
        Stage::Local,
        &AtomicBool::new(true),
        forward,
        |_| {},
    )
    .expect_err("stopped before any step")
    .to_string();
    assert!(err.contains("nothing trained"), "{err}");
    // An artifact without a router cannot serve `--policy router`.
    assert!(factory(s, &s.sha, &s.pre, &spec(PolicyKind::Router, 0.3)).is_err());
}
