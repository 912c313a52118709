//! The whole model on real text: one decode step at a 4k context and a 2k
//! prefill, with the dense cache and with DynaKV (energy policy) at 0.30, plus
//! SnapKV + DynaKV for the prefill. The artifact is `$DYNAKV_ARTIFACT` (from
//! `dynakv calibrate`) or, without it, a small one calibrated here.
//!
//! `cargo bench -p dynakv-bench --bench model`; `cargo test --benches` runs
//! each case once at toy sizes.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dynakv_bench::caches::{with_snapkv, DynaKvFactory, DynaKvSpec};
use dynakv_bench::calibrate::{calibrate, model_identity, CalibrateConfig};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::dynakv_snapkv::{GqaScores, SnapKvConfig};
use dynakv_burn::AttentionCache;
use dynakv_core::artifact::{Artifact, RopePlacement};
use dynakv_core::basis::BasisKind;
use dynakv_core::policy::{EnergyRule, PolicyKind};
use dynakv_models::corpus::Split;
use dynakv_models::gguf::GgufFile;
use dynakv_models::{LlamaModel, TextTokenizer};

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

struct Setup {
    model: LlamaModel,
    ids: Vec<u32>,
    factory: Arc<DynaKvFactory>,
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
            let cfg = CalibrateConfig {
                tokens: 1024,
                sample_tokens: 512,
                ctx: 256,
                basis: BasisKind::Pca,
                rope: RopePlacement::Pre,
                level_step: 8,
            };
            calibrate(
                &model,
                &calib,
                model_identity(&model, sha.clone()),
                &cfg,
                |_, _| {},
            )
            .expect("calibrate")
        }
    };
    let spec = DynaKvSpec {
        policy: PolicyKind::Energy,
        budget: 0.30,
        sink_tokens: 1,
        key_factor: 2.0,
        energy_rule: EnergyRule::Lagrange,
        recent_full: 0,
    };
    let factory =
        Arc::new(DynaKvFactory::from_artifact(&model, &sha, &artifact, &spec).expect("factory"));
    Setup {
        model,
        ids,
        factory,
    }
}

type Maker<'a> = Box<dyn Fn() -> Box<dyn AttentionCache> + 'a>;

fn makers(s: &Setup) -> Vec<(&'static str, Maker<'_>)> {
    let mut snap = SnapKvConfig::kvpress(0.75);
    snap.gqa = GqaScores::Layer;
    vec![
        (
            "dense",
            Box::new(|| Box::new(s.model.dense_cache().expect("dense")) as Box<dyn AttentionCache>),
        ),
        (
            "dynakv-energy-0.30",
            Box::new(|| s.factory.make_boxed(&s.model).expect("dynakv")),
        ),
        (
            "snapkv-0.75+dynakv-energy-0.30",
            Box::new(move || {
                with_snapkv(
                    s.factory.make(&s.model).expect("dynakv"),
                    Some(&snap),
                    &s.model,
                )
                .expect("snapkv")
            }),
        ),
    ]
}

fn model_benches(c: &mut Criterion) {
    let s = setup();
    let (prefill_n, decode_ctx) = if full_run() { (2048, 4096) } else { (64, 128) };
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    for (label, make) in makers(&s) {
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
    for (label, make) in makers(&s).into_iter().take(2) {
        let mut cache = make();
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
