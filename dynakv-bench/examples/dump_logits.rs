//! Writes the logits of the first N tokens of the parity fixture's first
//! window, as JSON rows, for checks outside Rust (`tools/q8_emulation.py`
//! compares the q8 numerics with a NumPy emulation of llama.cpp's
//! `vec_dot_q4_1_q8_1` and with llama.cpp itself).
//!
//! `cargo run --release -p dynakv-bench --example dump_logits -- q8 8 /tmp/ours-q8.json`

use anyhow::{bail, Context, Result};
use dynakv_models::gguf::GgufFile;
use dynakv_models::llama::WeightMode;
use dynakv_models::qmatmul::Numerics;
use dynakv_models::LlamaModel;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [numerics, n, out] = args.as_slice() else {
        bail!("usage: dump_logits f32|q8 N OUT.json");
    };
    let numerics: Numerics = numerics.parse().map_err(anyhow::Error::msg)?;
    let n: usize = n.parse().context("N")?;
    let fixture: serde_json::Value = serde_json::from_str(include_str!(
        "../../dynakv-models/tests/fixtures/parity.json"
    ))?;
    let ids: Vec<u32> = fixture["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .take(n)
        .map(|v| v.as_u64().map(|x| x as u32).context("token"))
        .collect::<Result<_>>()?;
    let gguf = GgufFile::open(&dynakv_models::assets::default_model()?)?;
    let model = LlamaModel::from_gguf_with(
        &gguf,
        &burn::tensor::Device::default(),
        WeightMode::Packed(numerics),
    )?;
    let mut cache = model.dense_cache()?;
    let logits: Vec<f32> = model
        .forward(&ids, 0, cache.as_mut())?
        .into_data()
        .try_into_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let rows: Vec<&[f32]> = logits.chunks_exact(logits.len() / ids.len()).collect();
    dynakv_core::io::write_bytes_atomically(
        out.as_ref(),
        serde_json::to_string(&rows)?.as_bytes(),
    )?;
    Ok(())
}
