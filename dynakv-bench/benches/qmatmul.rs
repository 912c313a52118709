//! Products against the default model's packed weights (one token, as a
//! decode step runs them): each projection shape of a block and the output
//! head, in f32 and q8 numerics, on the file's rows and on the tiles the
//! model uses on AVX-512 VNNI CPUs, beside burn's matmul on the same weights
//! dequantised to f32; and every projection of the model in a row (the
//! matrix work of one decode step).
//!
//! `cargo bench -p dynakv-bench --bench qmatmul`; `cargo test --benches`
//! runs each case once.

use burn::tensor::{Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dynakv_models::gguf::GgufFile;
use dynakv_models::llama::weights::packed;
use dynakv_models::qmatmul::{Numerics, QuantMatrix};

fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

struct Setup {
    /// (name, matrix) for block 0's projections and the head
    shapes: Vec<(String, QuantMatrix)>,
    /// every projection of the model, then the head
    all: Vec<QuantMatrix>,
}

fn setup() -> Setup {
    let path = dynakv_models::assets::default_model().expect("model");
    let gguf = GgufFile::open(&path).expect("gguf");
    let c = dynakv_models::LlamaConfig::from_gguf(&gguf).expect("config");
    let (d, q, kv) = (c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let names = [
        ("attn_q", d, q),
        ("attn_k", d, kv),
        ("attn_v", d, kv),
        ("attn_output", q, d),
        ("ffn_gate", d, c.d_ff),
        ("ffn_up", d, c.d_ff),
        ("ffn_down", c.d_ff, d),
    ];
    let m = |name: &str, d_in, d_out| packed(&gguf, name, d_in, d_out).expect("packed");
    let mut shapes: Vec<(String, QuantMatrix)> = names
        .iter()
        .map(|&(n, i, o)| (n.to_string(), m(&format!("blk.0.{n}.weight"), i, o)))
        .collect();
    let head = m("token_embd.weight", d, c.vocab_size);
    shapes.push(("head".into(), head.clone()));
    let mut all: Vec<QuantMatrix> = (0..c.n_layers)
        .flat_map(|l| {
            names
                .iter()
                .map(move |&(n, i, o)| (format!("blk.{l}.{n}.weight"), i, o))
        })
        .map(|(n, i, o)| m(&n, i, o))
        .collect();
    all.push(head);
    Setup { shapes, all }
}

fn activations(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let device = burn::tensor::Device::default();
    let mut g = c.benchmark_group("matvec");
    if !full_run() {
        g.sample_size(10);
    }
    for (name, m) in &s.shapes {
        let x = activations(m.cols());
        let id = format!("{name} {}x{} {:?}", m.rows(), m.cols(), m.ggml_type());
        for numerics in [Numerics::F32, Numerics::Q8] {
            g.bench_with_input(
                BenchmarkId::new(format!("packed-{numerics}"), &id),
                &x,
                |b, x| b.iter(|| m.matmul(x, numerics).expect("matmul")),
            );
        }
        // what the model runs on CPUs with AVX-512 VNNI, in both numerics
        // (f32 as three digits; elsewhere the same as packed-f32 / -q8)
        let tiled = m.clone().with_tiles();
        for numerics in [Numerics::F32, Numerics::Q8] {
            g.bench_with_input(
                BenchmarkId::new(format!("packed-{numerics}-tiles"), &id),
                &x,
                |b, x| b.iter(|| tiled.matmul(x, numerics).expect("matmul")),
            );
        }
        let w = Tensor::<2>::from_data(
            TensorData::new(m.dequantize(), [m.rows(), m.cols()]),
            &device,
        )
        .transpose();
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [1, m.cols()]), &device);
        g.bench_with_input(BenchmarkId::new("dense-f32-burn", &id), &xt, |b, xt| {
            b.iter(|| {
                xt.clone()
                    .matmul(w.clone())
                    .into_data()
                    .try_into_vec::<f32>()
                    .expect("data")
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("decode_step_projections");
    if !full_run() {
        g.sample_size(10);
    }
    let tiled: Vec<QuantMatrix> = s.all.iter().map(|m| m.clone().with_tiles()).collect();
    for (name, numerics, mats) in [
        ("packed-f32", Numerics::F32, &s.all),
        ("packed-q8", Numerics::Q8, &s.all),
        ("packed-f32-tiles", Numerics::F32, &tiled),
        ("packed-q8-tiles", Numerics::Q8, &tiled),
    ] {
        g.bench_function(name, |b| {
            let xs: Vec<Vec<f32>> = mats.iter().map(|m| activations(m.cols())).collect();
            b.iter(|| {
                for (m, x) in mats.iter().zip(&xs) {
                    m.matmul(x, numerics).expect("matmul");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
