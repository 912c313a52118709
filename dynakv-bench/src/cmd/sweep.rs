//! `dynakv eval sweep`: a grid of caches through `ppl` (and `fidelity`), one
//! JSON line per cell, and quality-against-memory plots.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use dynakv_bench::eval::fidelity::fidelity;
use dynakv_bench::eval::ppl::perplexity;
use dynakv_bench::plot::{quality_plot, Series};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_core::artifact::Artifact;
use dynakv_models::corpus::Split;
use serde_json::{json, Value};

use super::cache_args::{CacheArgs, CacheKind};
use super::common::{progress, ModelArgs};
use super::eval::parse_list;

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibrated artifact for the training-free policies.
    #[arg(long)]
    pub artifact: PathBuf,
    #[arg(long, default_value = "uniform,per-layer,energy")]
    pub policies: String,
    #[arg(long, default_value = "0.47,0.30,0.20")]
    pub budgets: String,
    /// SnapKV ratios: alone on the full cache, and in front of every DynaKV cell.
    #[arg(long, default_value = "")]
    pub snapkv: String,
    /// Trained router artifacts (`dynakv train`), each at its own target.
    #[arg(long)]
    pub router: Vec<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub ctx: usize,
    #[arg(long, default_value_t = 4)]
    pub windows: usize,
    /// Score only the last N tokens of each window, after a compressing
    /// prefill (the SnapKV protocol, docs/protocol.md).
    #[arg(long)]
    pub score_last: Option<usize>,
    /// Also measure KL(full ‖ cache) and top-1 agreement (doubles the time).
    #[arg(long)]
    pub fidelity: bool,
    /// JSON lines, one per cell.
    #[arg(long)]
    pub out: PathBuf,
    /// Plot PPL ratio (and KL with --fidelity) against retained fraction here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Skip cells already in --out.
    #[arg(long)]
    pub resume: bool,
}

fn cache(
    kind: CacheKind,
    artifact: Option<&Path>,
    policy: &str,
    budget: f64,
    snapkv: Option<f64>,
) -> CacheArgs {
    CacheArgs {
        cache: kind,
        artifact: artifact.map(Path::to_path_buf),
        policy: policy.into(),
        budget,
        sink_tokens: 1,
        key_factor: 2.0,
        energy_rule: "lagrange".into(),
        snapkv,
        snapkv_capacity: None,
        snapkv_preset: "kvpress".into(),
        snapkv_per_layer: false,
        snapkv_layer_max: false,
    }
}

/// `(label, plot family, cache)` of every cell, the full cache first.
fn cells(a: &SweepArgs) -> Result<Vec<(String, String, CacheArgs)>> {
    let snaps: Vec<f64> = parse_list(&a.snapkv, "SnapKV ratio")?;
    let mut out = vec![(
        "full".to_string(),
        "full".to_string(),
        cache(CacheKind::Full, None, "energy", 1.0, None),
    )];
    for &r in &snaps {
        out.push((
            format!("snapkv/{r}"),
            "snapkv".into(),
            cache(CacheKind::Full, None, "energy", 1.0, Some(r)),
        ));
    }
    let mut dyna = Vec::new();
    for p in a.policies.split(',').filter(|p| !p.is_empty()) {
        for b in parse_list::<f64>(&a.budgets, "budget")? {
            dyna.push((p.to_string(), a.artifact.clone(), b));
        }
    }
    for r in &a.router {
        let art = Artifact::load(r)?;
        let info = art
            .header
            .router
            .with_context(|| format!("{} holds no router", r.display()))?;
        dyna.push(("router".into(), r.clone(), info.target));
    }
    for (p, art, b) in dyna {
        out.push((
            format!("{p}/{b}"),
            p.clone(),
            cache(CacheKind::Dynakv, Some(&art), &p, b, None),
        ));
        for &r in &snaps {
            out.push((
                format!("snapkv/{r}+{p}/{b}"),
                format!("snapkv/{r}+{p}"),
                cache(CacheKind::Dynakv, Some(&art), &p, b, Some(r)),
            ));
        }
    }
    Ok(out)
}

pub fn run(a: SweepArgs) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let loaded = a.model.load()?;
    let ids = document_tokens(&loaded.tokenizer, &brown_docs(Split::Eval, None)?)?;
    let cells = cells(&a)?;
    let mut done: Vec<Value> = Vec::new();
    if a.resume && a.out.exists() {
        for line in std::fs::read_to_string(&a.out)?.lines() {
            done.push(serde_json::from_str(line)?);
        }
    } else if a.out.exists() {
        anyhow::bail!("{} exists: pass --resume to continue it", a.out.display());
    }
    let finished: HashSet<String> = done
        .iter()
        .filter_map(|v| v["label"].as_str().map(String::from))
        .collect();
    let todo: Vec<_> = cells.iter().filter(|c| !finished.contains(&c.0)).collect();
    let bar = progress(
        todo.len() as u64,
        "sweep [{bar:30}] {pos}/{len} cells, ETA {eta} {msg}",
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.out)?;
    for (label, family, args) in todo {
        bar.set_message(label.clone());
        let maker = args.maker(&loaded)?;
        let p = perplexity(
            &loaded.model,
            &ids,
            a.ctx,
            Some(a.windows),
            a.score_last,
            || maker.make(&loaded),
            |_, _| {},
        )?;
        let mut v = json!({
            "label": label,
            "family": family,
            "cache": args.label(),
            "ppl": p.report.ppl,
            "tokens": p.report.tokens,
            "retained": p.report.retained,
            "retained_prefill": p.report.retained_prefill,
            "bytes": p.report.bytes,
            "bytes_full": p.report.bytes_full,
            "ctx": a.ctx,
            "windows": a.windows,
            "score_last": a.score_last,
            "command": command,
        });
        if a.fidelity {
            let f = fidelity(
                &loaded.model,
                &ids,
                a.ctx,
                Some(a.windows),
                a.score_last,
                || Ok(Box::new(loaded.model.dense_cache()?) as Box<dyn dynakv_burn::AttentionCache>),
                || maker.make(&loaded),
                |_, _| {},
            )?;
            v["kl_mean"] = f.kl_mean.into();
            v["kl_p95"] = f.kl_p95.into();
            v["top1_agreement"] = f.top1_agreement.into();
        }
        writeln!(file, "{}", serde_json::to_string(&v)?)?;
        file.flush()?;
        done.push(v);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let full = done
        .iter()
        .find(|v| v["label"] == "full")
        .and_then(|v| v["ppl"].as_f64())
        .context("no full-cache cell")?;
    let x = |v: &Value| {
        v["retained_prefill"]
            .as_f64()
            .or(v["retained"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let series_of = |metric: &dyn Fn(&Value) -> Option<f64>| -> Vec<Series> {
        let mut out: Vec<Series> = Vec::new();
        for v in done.iter().filter(|v| v["label"] != "full") {
            let fam = v["family"].as_str().unwrap_or("?").to_string();
            let Some(y) = metric(v) else { continue };
            match out.iter_mut().find(|s| s.name == fam) {
                Some(s) => s.points.push((x(v), y)),
                None => out.push(Series {
                    name: fam,
                    points: vec![(x(v), y)],
                }),
            }
        }
        out
    };
    println!("| cell | retained | PPL | ratio | KL mean | top-1 | true MB |");
    println!("|---|---|---|---|---|---|---|");
    for v in &done {
        let ppl = v["ppl"].as_f64().unwrap_or(f64::NAN);
        let opt = |k: &str| v[k].as_f64().map_or("–".to_string(), |x| format!("{x:.4}"));
        println!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} |",
            v["label"].as_str().unwrap_or("?"),
            x(v),
            ppl,
            ppl / full,
            opt("kl_mean"),
            opt("top1_agreement"),
            v["bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    if let Some(path) = &a.plot {
        let ratio = series_of(&|v| v["ppl"].as_f64().map(|p| p / full));
        quality_plot(
            path,
            "Brown eval: perplexity against KV memory",
            "PPL ratio to the full cache",
            &command,
            &ratio,
            true,
        )
        .map_err(anyhow::Error::msg)?;
        if a.fidelity {
            let kl = series_of(&|v| v["kl_mean"].as_f64());
            let p = path.with_file_name(format!(
                "{}-kl.svg",
                path.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep")
            ));
            quality_plot(
                &p,
                "Brown eval: KL(full || cache) against KV memory",
                "mean KL, nats",
                &command,
                &kl,
                true,
            )
            .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}
