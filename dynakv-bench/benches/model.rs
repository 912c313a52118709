//! The whole model on real text: one decode step at a 4k context and a 2k
//! prefill, with the dense cache and with DynaKV (energy policy) at 0.30, plus
//! SnapKV + DynaKV for the prefill. The artifact is `$DYNAKV_ARTIFACT` (from
//! `dynakv calibrate`) or, without it, a small one calibrated here.
//!
//! `cargo bench -p dynakv-bench --bench model`; `cargo test --benches` runs
//! each case once at toy sizes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::dynakv_snapkv::{SnapKvPreset, SnapKvSpec};
use dynakv_burn::{calibrate, CacheFactory, CacheSpec, CalibrationConfig};
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::{PolicyKind, PolicySpec};
use dynakv_models::corpus::Split;
use dynakv_models::gguf::GgufFile;
use dynakv_models::{LlamaModel, TextTokenizer};

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

struct Setup {
    model: LlamaModel,
    ids: Vec<u32>,
    /// dense, DynaKV energy 0.30, SnapKV kvpress 0.75 + DynaKV energy 0.30
    factories: Vec<(&'static str, CacheFactory)>,
}

fn setup() -> Setup {
    let path = dynakv_models::assets::default_model().expect("model");
    let gguf = GgufFile::open(&path).expect("gguf");
    let tok = TextTokenizer::from_gguf(&gguf).expect("tokenizer");
    let model = LlamaModel::from_gguf(&gguf, &burn::tensor::Device::default()).expect("model");
    let sha = dynakv_models::assets::sha256_file(&path).expect("sha");
    let ids =
        document_tokens(&tok, &brown_docs(Split::Eval, Some(12)).expect("docs")).expect("ids");
    let artifact = match std::env::var("DYNAKV_ARTIFACT") {
        Ok(p) => Artifact::load(std::path::Path::new(&p)).expect("artifact"),
        Err(_) => {
            let calib = document_tokens(&tok, &brown_docs(Split::Calib, Some(2)).expect("docs"))
                .expect("ids");
            let windows: Vec<&[u32]> = calib.chunks_exact(256).collect();
            let cfg = CalibrationConfig {
                stats_windows: 4,
                sample_windows: 2,
                ..CalibrationConfig::default()
            };
            let target = model.calibration_target(&sha, false).expect("target");
            calibrate(
                &target,
                &cfg,
                &windows,
                |w: &&[u32], cache| model.hidden(w, 0, cache).map(|_| ()),
                |_, _| {},
            )
            .expect("calibrate")
        }
    };
    model.check_artifact(&artifact, &sha).expect("identity");
    let energy = CacheSpec::dynakv(PolicySpec::new(PolicyKind::Energy, 0.30));
    let specs = [
        ("dense", CacheSpec::dense()),
        ("dynakv-energy-0.30", energy.clone()),
        (
            "snapkv-0.75+dynakv-energy-0.30",
            energy.with_snapkv(SnapKvSpec::ratio(SnapKvPreset::Kvpress, 0.75)),
        ),
    ];
    let factories = specs
        .into_iter()
        .map(|(label, spec)| {
            let art = spec.dynakv.is_some().then_some(&artifact);
            (label, model.cache_factory(art, &spec).expect("factory"))
        })
        .collect();
    Setup {
        model,
        ids,
        factories,
    }
}

fn model_benches(c: &mut Criterion) {
    let s = setup();
    let (prefill_n, decode_ctx) = if full_run() { (2048, 4096) } else { (64, 128) };
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    for (label, factory) in &s.factories {
        let make = || factory.make().expect("cache");
        let prompt = &s.ids[..prefill_n];
        g.bench_function(
            BenchmarkId::new(format!("prefill/{label}"), prefill_n),
            |b| {
                b.iter(|| {
                    let mut cache = make();
                    s.model
                        .forward_last(prompt, 0, cache.as_mut())
                        .expect("prefill")
                })
            },
        );
    }
    for (label, factory) in s.factories.iter().take(2) {
        let mut cache = factory.make().expect("cache");
        s.model
            .forward_last(&s.ids[..decode_ctx], 0, cache.as_mut())
            .expect("context");
        let mut pos = decode_ctx;
        g.bench_function(
            BenchmarkId::new(format!("decode_step/{label}"), decode_ctx),
            |b| {
                b.iter(|| {
                    let out = s
                        .model
                        .forward_last(&[s.ids[pos]], pos, cache.as_mut())
                        .expect("decode");
                    pos += 1;
                    out.into_data()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, model_benches);
criterion_main!(benches);
