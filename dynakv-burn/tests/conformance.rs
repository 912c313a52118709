//! Every cache the factory builds, crossed with every wrapper and policy,
//! on a tiny synthetic attention model (the one of `examples/own_model.rs`,
//! which this test also runs), for both key placements and both storages:
//! each appends, attends, prunes and resets, and reports a footprint that
//! matches what it stores. Full rank equals the dense cache; host storage
//! equals device storage. Runs on whatever backend the features select
//! (`--features wgpu` runs it on a GPU or Mesa's software Vulkan).

#![cfg(feature = "snapkv")]

#[path = "../examples/own_model.rs"]
#[allow(dead_code)]
mod own_model;

use burn::tensor::Tensor;
use dynakv_burn::dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_burn::dynakv_core::budget::CacheFootprint;
use dynakv_burn::{AttentionCache, CacheFactory, CacheSpec, KvStorage};
use own_model::{calibrated, synthetic_text, TinyModel, GEOMETRY};

/// Prompt and decode lengths: the prompt is longer than every SnapKV window.
const PROMPT: usize = 96;
const DECODE: usize = 4;

const SPECS: &[&str] = &[
    "dense",
    "dense+snapkv:kvpress@0.5",
    "dense+snapkv:recall@0.5,gqa=layer-max",
    "dense+snapkv:paper@c48,gqa=layer",
    "dynakv:uniform@1",
    "dynakv:uniform@0.5",
    "dynakv:per-layer@0.5",
    "dynakv:energy@0.5",
    "dynakv:energy@0.3,rule=threshold,key-factor=1",
    "dynakv:energy@0.5,recent=8",
    "dynakv:uniform@1+snapkv:recall@0.5",
    "dynakv:energy@0.5,recent=32+snapkv:recall@0.5,gqa=layer-max",
    "dynakv:per-layer@0.3+snapkv:kvpress@0.5",
    "dense+store:kv=f16",
    "dense+store:kv=bf16",
    "dense+store:k=q8_0,v=q4_0",
    "dense+store:kv=q4_0,rotate=off",
    "dense+store:kv=kivi2",
    "dense+snapkv:recall@0.5+store:k=kivi2,v=q4_0",
    "dense+snapkv:kvpress@0.5+store:kv=q4_0",
    "dynakv:energy@0.5+store:latent=f16",
    "dynakv:energy@0.5+store:latent=f32",
    "dynakv:energy@0.5+store:latent=mixed",
    "dynakv:energy@0.5+store:latent=int4,scales=channel",
    "dynakv:energy@0.5,recent=32+snapkv:recall@0.5,gqa=layer-max+store:latent=int4",
];

struct Setup {
    model: TinyModel,
    artifacts: [Artifact; 2],
    text: Vec<u32>,
}

fn setup() -> Setup {
    let device = dynakv_burn::device::default_device();
    device.seed(11);
    let model = TinyModel::new(&device).unwrap();
    let artifacts =
        [RopePlacement::Pre, RopePlacement::Post].map(|p| calibrated(&model, p).unwrap());
    Setup {
        model,
        artifacts,
        text: synthetic_text(PROMPT + DECODE, 5),
    }
}

/// Prefill then decode steps; the decode outputs `[DECODE, d_model]`.
fn run(s: &Setup, cache: &mut dyn AttentionCache) -> Tensor<2> {
    s.model.forward(&s.text[..PROMPT], 0, cache).unwrap();
    let steps = (PROMPT..PROMPT + DECODE)
        .map(|p| s.model.forward(&s.text[p..p + 1], p, cache).unwrap())
        .collect();
    Tensor::cat(steps, 0)
}

fn max_diff(a: &Tensor<2>, b: &Tensor<2>) -> f32 {
    (a.clone() - b.clone()).abs().max().into_scalar::<f32>()
}

fn factory(s: &Setup, spec: &CacheSpec, placement: usize, storage: KvStorage) -> CacheFactory {
    let artifact = spec.dynakv.is_some().then_some(&s.artifacts[placement]);
    let device = dynakv_burn::device::default_device();
    CacheFactory::with_storage(
        GEOMETRY,
        s.model.rope.clone(),
        &device,
        artifact,
        spec,
        storage,
    )
    .unwrap()
}

#[test]
fn every_cache_wrapper_and_policy_conforms() {
    let s = setup();
    let (d_kv, n_layers) = (GEOMETRY.d_kv(), GEOMETRY.n_layers);
    let seen = (PROMPT + DECODE) as u64;
    for name in SPECS {
        let spec: CacheSpec = name.parse().unwrap();
        let placements = if spec.dynakv.is_some() { 2 } else { 1 };
        for placement in 0..placements {
            let mut outs = Vec::new();
            // KIVI's 32-token blocks are host storage only (an error on a device)
            let p = spec.precision;
            let kivi = p.k.is_token_blocked() || p.v.is_token_blocked();
            if kivi {
                let device = dynakv_burn::device::default_device();
                let rope = s.model.rope.clone();
                let on_device = CacheFactory::with_storage(
                    GEOMETRY,
                    rope,
                    &device,
                    None,
                    &spec,
                    KvStorage::Device,
                )
                .and_then(|f| f.make());
                assert!(on_device.is_err(), "{name}: kivi2 on device storage");
            }
            let storages = if kivi {
                [KvStorage::Host, KvStorage::Host]
            } else {
                [KvStorage::Host, KvStorage::Device]
            };
            for storage in storages {
                let ctx = format!("{name} placement {placement} {storage:?}");
                let mut cache = factory(&s, &spec, placement, storage).make().unwrap();
                assert!(cache.is_empty(), "{ctx}");
                let out = run(&s, cache.as_mut());
                let host: Vec<f32> = out.clone().into_data().try_into_vec_as().unwrap();
                assert!(
                    host.iter().all(|x| x.is_finite()),
                    "{ctx}: non-finite output"
                );
                // Tokens stored: pruned by SnapKV, all of them otherwise
                // (DynaKV may drop a token whose key rank is 0).
                let expected = match &spec.snapkv {
                    Some(sk) => {
                        let c = sk.config(spec.dynakv.is_some()).unwrap();
                        c.n_kept(PROMPT) + DECODE
                    }
                    None => PROMPT + DECODE,
                };
                for l in 0..n_layers {
                    let n = cache.len(l);
                    if spec.dynakv.is_some() && spec.snapkv.is_none() {
                        assert!(n <= expected && n > 0, "{ctx}: layer {l} stores {n}");
                    } else {
                        assert_eq!(n, expected, "{ctx}: layer {l}");
                    }
                }
                // The footprint counts every token seen against the dense
                // cache, and exactly what is stored.
                let f = cache.footprint();
                let stored: u64 = (0..n_layers)
                    .map(|l| 2 * (cache.len(l) * d_kv) as u64)
                    .sum();
                assert_eq!(f.values_full, 2 * seen * (d_kv * n_layers) as u64, "{ctx}");
                let full_rank = spec.dynakv.as_ref().is_none_or(|p| p.budget == 1.0);
                if full_rank {
                    assert_eq!(f.values, stored, "{ctx}");
                } else {
                    assert!(f.values < stored, "{ctx}: {} of {stored}", f.values);
                }
                assert_eq!(cache.bytes() as u64, f.bytes(), "{ctx}");
                assert_eq!(f.tokens, seen, "{ctx}");
                // Bytes: f32 is 4 per number; a packed format fewer, and the
                // host holds exactly the packed bytes.
                if spec.precision.stores_f32(spec.dynakv.is_some()) {
                    assert_eq!(f.value_bytes, 4 * f.values, "{ctx}");
                } else {
                    assert!(f.value_bytes < 3 * f.values, "{ctx}: {f:?}");
                }
                match storage {
                    KvStorage::Host => assert_eq!(f.held_value_bytes, f.value_bytes, "{ctx}"),
                    KvStorage::Device => assert_eq!(f.held_value_bytes, 4 * f.values, "{ctx}"),
                }
                // Reset forgets everything, and the same run gives the same numbers.
                cache.reset();
                assert!(cache.is_empty(), "{ctx}");
                assert_eq!(cache.footprint().values_full, 0, "{ctx}");
                let again = run(&s, cache.as_mut());
                assert!(max_diff(&again, &out) <= 1e-6, "{ctx}: reset run differs");
                outs.push(out);
            }
            // Packed formats round: a 1e-6 difference between the two
            // attention paths in one layer can move a value across a
            // rounding boundary in the next one, so they get a step's slack.
            let diff = max_diff(&outs[0], &outs[1]);
            let tol = if spec.precision.stores_f32(spec.dynakv.is_some()) {
                1e-4
            } else {
                5e-2
            };
            assert!(
                diff < tol,
                "{name} placement {placement}: host vs device {diff}"
            );
        }
    }
}

#[test]
fn full_rank_equals_the_dense_cache_with_and_without_snapkv() {
    let s = setup();
    for (dense, dynakv) in [
        ("dense", "dynakv:uniform@1"),
        (
            "dense+snapkv:recall@0.5,gqa=layer",
            "dynakv:uniform@1+snapkv:recall@0.5",
        ),
    ] {
        let storage = KvStorage::for_device(&dynakv_burn::device::default_device());
        let want = run(
            &s,
            factory(&s, &dense.parse().unwrap(), 0, storage)
                .make()
                .unwrap()
                .as_mut(),
        );
        // f32 latents and bases as calibrated: the same attention up to
        // float rounding; bases in f16 (the default): within their rounding
        for (store, tol) in [
            ("+store:latent=f32,basis=f32", 1e-4),
            ("+store:latent=f32", 2e-3),
        ] {
            for placement in 0..2 {
                let spec = format!("{dynakv}{store}").parse().unwrap();
                let got = run(
                    &s,
                    factory(&s, &spec, placement, storage)
                        .make()
                        .unwrap()
                        .as_mut(),
                );
                let scale = want.clone().abs().max().into_scalar::<f32>();
                let diff = max_diff(&got, &want) / scale;
                assert!(diff < tol, "{dynakv}{store} placement {placement}: {diff}");
            }
        }
    }
}

/// The decode outputs and footprint of a fresh cache of `name` (pre-RoPE
/// artifact) after the standard run.
fn run_spec(s: &Setup, name: &str, storage: KvStorage) -> (Tensor<2>, CacheFootprint) {
    let mut c = factory(s, &name.parse().unwrap(), 0, storage)
        .make()
        .unwrap();
    let out = run(s, c.as_mut());
    (out, c.footprint())
}

#[test]
fn compression_lowers_the_bytes_and_keeps_the_output_close() {
    let s = setup();
    let storage = KvStorage::for_device(&dynakv_burn::device::default_device());
    let make = |name: &str| run_spec(&s, name, storage);
    let (dense, fd) = make("dense");
    let (half, fh) = make("dynakv:energy@0.5");
    assert!(fh.retained() < 0.75, "{}", fh.retained());
    assert!(fh.values < fd.values);
    // Keys near an 8-dimensional subspace: half the dimensions lose little.
    let rel = max_diff(&half, &dense) / dense.abs().max().into_scalar::<f32>();
    assert!(rel < 0.2, "{rel}");
}

#[test]
fn fewer_bits_cost_fewer_bytes_and_more_error_in_order() {
    let s = setup();
    let storage = KvStorage::for_device(&dynakv_burn::device::default_device());
    let make = |name: &str| run_spec(&s, name, storage);
    // KIVI (2-bit) last, where the storage can hold it
    let kivi = match storage {
        KvStorage::Host => "dense+store:kv=kivi2",
        KvStorage::Device => "dense+store:kv=q4_0",
    };
    for ladder in [
        &[
            "dense",
            "dense+store:kv=f16",
            "dense+store:kv=q8_0",
            "dense+store:kv=q4_0",
            kivi,
        ][..],
        &[
            "dynakv:energy@0.5+store:latent=f32",
            "dynakv:energy@0.5+store:latent=f16",
            "dynakv:energy@0.5",
            "dynakv:energy@0.5+store:latent=int4",
        ][..],
    ] {
        let (reference, fr) = make(ladder[0]);
        let scale = reference.clone().abs().max().into_scalar::<f32>();
        let (mut last_err, mut last_bytes) = (0f32, fr.value_bytes);
        for name in &ladder[1..] {
            let (out, f) = make(name);
            let err = max_diff(&out, &reference) / scale;
            assert!(f.value_bytes <= last_bytes, "{name}: {f:?}");
            assert!(
                err >= last_err && err < 0.2,
                "{name}: {err} after {last_err}"
            );
            // the same numbers stored (a token-wise policy sees slightly
            // other inputs in the second layer)
            assert!(f.values.abs_diff(fr.values) * 50 <= fr.values, "{name}");
            (last_err, last_bytes) = (err, f.value_bytes);
        }
        assert!(
            last_err > 0.0,
            "{}: the packed formats changed nothing",
            ladder[3]
        );
    }
}

#[test]
fn the_example_runs() {
    own_model::main().unwrap();
}

/// The suite above ran where the features say: a GPU backend (wgpu, CUDA)
/// when one is compiled in, with device storage; the CPU (Flex) with host
/// storage otherwise. `--nocapture` prints the device.
#[test]
fn the_backend_is_the_one_the_features_select() {
    let device = dynakv_burn::device::default_device();
    let storage = KvStorage::for_device(&device);
    println!("default device: {device:?}, storage: {storage:?}");
    let gpu = cfg!(any(feature = "wgpu", feature = "cuda"));
    assert_eq!(storage == KvStorage::Device, gpu, "{device:?}");
}
