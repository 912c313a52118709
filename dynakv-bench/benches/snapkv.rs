//! SnapKV scoring of one layer (9 query heads, window 64, kernel 5) at the
//! end of a 2k and an 8k prefill.

use burn::tensor::Device;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dynakv_snapkv::{snapkv, SnapKvConfig};

#[path = "support/synthetic.rs"]
mod synthetic;
use synthetic::*;

fn scoring(c: &mut Criterion) {
    let device = Device::default();
    let lengths: &[usize] = if full_run() { &[2048, 8192] } else { &[256] };
    let config = SnapKvConfig::kvpress(0.75);
    let mut g = c.benchmark_group("snapkv_score_layer");
    g.sample_size(20);
    for &l in lengths {
        let q = rand(
            [1, GEOMETRY.n_heads, config.window, GEOMETRY.head_dim],
            &device,
        );
        let k = rand([1, GEOMETRY.n_kv_heads, l, GEOMETRY.head_dim], &device);
        g.bench_with_input(BenchmarkId::new("kvpress", l), &l, |b, _| {
            b.iter(|| snapkv(q.clone(), k.clone(), &config).expect("snapkv"))
        });
    }
    g.finish();
}

criterion_group!(benches, scoring);
criterion_main!(benches);
