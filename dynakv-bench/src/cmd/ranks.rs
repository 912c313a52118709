//! `dynakv eval ranks`: which tokens a rank policy gives dimensions to, on
//! one text: ranks per token (mean over layers) and mean rank per layer, for
//! keys and values; optional SVG of the per-layer means.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use dynakv_bench::plot::{line_plot, Series};
use dynakv_burn::CacheSpec;
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::{KvKind, PolicyKind, PolicySpec};
use serde_json::json;

use super::common::ModelArgs;
use super::values;

#[derive(Args, Debug)]
pub struct RanksArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Artifacts to compare (each with --policies, in order).
    #[arg(long, num_args = 1.., required = true)]
    pub artifact: Vec<PathBuf>,
    /// One policy per artifact.
    #[arg(long, value_enum, num_args = 1.., required = true)]
    pub policies: Vec<PolicyKind>,
    #[arg(value_parser = values::fraction, long, default_value_t = 0.30)]
    pub budget: f64,
    /// The text whose tokens are ranked (a BOS-like `<|im_start|>` is prepended).
    #[arg(long)]
    pub text: String,
    /// SVG of the mean rank per layer.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(a: RanksArgs) -> Result<()> {
    if a.artifact.len() != a.policies.len() {
        bail!("give one --policies entry per --artifact");
    }
    if let Some(p) = &a.plot {
        super::common::check_writable("--plot", p)?;
    }
    let loaded = a.model.load()?;
    let mut ids = loaded.tokenizer.encode("<|im_start|>")?;
    ids.extend(loaded.tokenizer.encode(&a.text)?);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&t| loaded.tokenizer.decode(&[t]).unwrap_or_default())
        .collect();
    let geo = loaded.model.cache_geometry();
    let mut reports = Vec::new();
    let mut series = Vec::new();
    for (path, policy) in a.artifact.iter().zip(&a.policies) {
        let spec = CacheSpec::dynakv(PolicySpec::new(*policy, a.budget));
        let artifact = Artifact::load(path)?;
        loaded.model.check_artifact(&artifact, &loaded.sha256)?;
        let f = loaded.model.cache_factory(Some(&artifact), &spec)?;
        let mut cache = f.make_dynakv()?;
        loaded
            .model
            .forward_last(&ids, 0, loaded.model.around(&mut cache)?.as_mut())?;
        let n = ids.len();
        let mut per_token = vec![[0f64; 2]; n];
        let mut per_layer = vec![[0f64; 2]; geo.n_layers];
        for (l, layer_mean) in per_layer.iter_mut().enumerate() {
            for (k, kind) in [KvKind::Key, KvKind::Value].into_iter().enumerate() {
                let mut ranks = vec![0usize; n];
                for (id, r) in cache.ranks(l, kind) {
                    ranks[id] = r;
                }
                for (i, &r) in ranks.iter().enumerate() {
                    per_token[i][k] += r as f64 / geo.n_layers as f64;
                    layer_mean[k] += r as f64 / n as f64;
                }
            }
        }
        let name = format!(
            "{policy} ({})",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("?")
        );
        for (k, kind) in ["K", "V"].iter().enumerate() {
            series.push(Series {
                name: format!("{name} {kind}"),
                points: per_layer
                    .iter()
                    .enumerate()
                    .map(|(l, r)| (l as f64, r[k]))
                    .collect(),
            });
        }
        println!(
            "\n{name}: mean rank per token over {} layers (K, V); d_kv = {}",
            geo.n_layers,
            geo.d_kv()
        );
        for (p, r) in pieces.iter().zip(&per_token) {
            println!("{:>16} {:6.1} {:6.1}", format!("{p:?}"), r[0], r[1]);
        }
        reports.push(json!({
            "artifact": path, "policy": policy, "budget": a.budget,
            "tokens": pieces, "per_token": per_token, "per_layer": per_layer,
        }));
    }
    if let Some(p) = &a.plot {
        let caption = std::env::args().collect::<Vec<_>>().join(" ");
        line_plot(
            p,
            "Mean rank per layer",
            ("layer", -0.5, geo.n_layers as f64 - 0.5),
            "mean rank (of 192)",
            &caption,
            &series,
            false,
        )
        .map_err(anyhow::Error::msg)?;
    }
    eprintln!("{}", serde_json::to_string(&reports)?);
    Ok(())
}
