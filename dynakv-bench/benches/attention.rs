//! One decode step's attention (9 query heads over T cached tokens) and the
//! cost of appending one token: dense cache against DynaKV (pre- and
//! post-RoPE keys) at budgets 0.47, 0.30, 0.20, with one rank bucket
//! (`uniform`) and seven (`spread`, what a token-wise policy produces).

use std::time::{Duration, Instant};

use burn::tensor::Device;
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion};
use dynakv_burn::{AttentionCache, KvStorage};
use dynakv_core::artifact::RopePlacement;

#[path = "support/synthetic.rs"]
mod synthetic;
use synthetic::*;

fn bench_attend<C: AttentionCache>(
    g: &mut BenchmarkGroup<WallTime>,
    label: &str,
    cache: C,
    t: usize,
) {
    let device = Device::default();
    let mut cache = filled(cache, t, &device);
    let q = rand([1, GEOMETRY.n_heads, 1, GEOMETRY.head_dim], &device);
    g.bench_with_input(BenchmarkId::new(label, t), &t, |b, &t| {
        b.iter(|| sync(cache.attend(0, q.clone(), &[t]).expect("attend")))
    });
}

fn decode_attention(c: &mut Criterion) {
    let device = Device::default();
    let lengths: &[usize] = if full_run() {
        &[1024, 4096, 8192]
    } else {
        &[256]
    };
    let mut g = c.benchmark_group("decode_attention");
    g.sample_size(20);
    for &t in lengths {
        for (label, cache) in dense_configs(&device) {
            bench_attend(&mut g, &label, cache, t);
        }
        for (label, placement, policy, storage) in dynakv_configs(&device) {
            bench_attend(
                &mut g,
                &label,
                dynakv(placement, policy, storage, &device),
                t,
            );
        }
        // packed latents, pre-RoPE keys at 0.30 with seven buckets
        let storage = KvStorage::for_device(&device);
        for latent in ["f16", "int8", "int4"] {
            let precision = format!("latent={latent}").parse().expect("precision");
            let cache = dynakv_with(
                RopePlacement::Pre,
                spread(0.30),
                storage,
                precision,
                &device,
            );
            bench_attend(&mut g, &format!("dynakv-pre-spread-0.3-{latent}"), cache, t);
        }
    }
    g.finish();
}

/// Tokens appended one after another to one copy of a filled cache.
const APPEND_RUN: usize = 256;

/// Appending one token to a cache of T tokens (CPU: the backend is eager, so
/// the append's work is inside the timing). Tokens are appended in runs of
/// [`APPEND_RUN`] to one copy of the filled cache (the copy is not timed), so
/// host vectors grow as in a real decode, amortised, and a tensor cache
/// concatenates each time.
fn bench_append<C: AttentionCache + Clone>(
    g: &mut BenchmarkGroup<WallTime>,
    label: &str,
    cache: C,
    t: usize,
) {
    let device = Device::default();
    let cache = filled(cache, t, &device);
    let (hk, dh) = (GEOMETRY.n_kv_heads, GEOMETRY.head_dim);
    let (k, v) = (rand([1, hk, 1, dh], &device), rand([1, hk, 1, dh], &device));
    g.bench_function(BenchmarkId::new(label, t), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(APPEND_RUN);
                let mut c = cache.clone();
                let start = Instant::now();
                for i in 0..n {
                    c.append(0, k.clone(), v.clone(), &[t + i]).expect("append");
                }
                total += start.elapsed();
                left -= n;
            }
            total
        })
    });
}

fn append_one(c: &mut Criterion) {
    let device = Device::default();
    let t = if full_run() { 4096 } else { 256 };
    let mut g = c.benchmark_group("append_one_token");
    g.sample_size(20);
    for (label, cache) in dense_configs(&device) {
        bench_append(&mut g, &label, cache, t);
    }
    for (label, placement, policy, storage) in dynakv_configs(&device) {
        bench_append(
            &mut g,
            &label,
            dynakv(placement, policy, storage, &device),
            t,
        );
    }
    g.finish();
}

criterion_group!(benches, decode_attention, append_one);
criterion_main!(benches);
