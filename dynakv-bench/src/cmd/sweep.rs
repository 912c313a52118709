//! `dynakv eval sweep`: a grid of caches through `ppl` (and `fidelity` and
//! the long-context suite), one JSON line per cell, and quality-against-memory
//! plots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use dynakv_bench::eval::fidelity::fidelity;
use dynakv_bench::eval::longctx_suite::{kept_cells, summarize, SuiteSpec};
use dynakv_bench::eval::ppl::perplexity;
use dynakv_bench::eval::records::Records;
use dynakv_bench::plot::{bytes_plot, Series};
use dynakv_bench::text::{brown_docs, document_tokens};
use dynakv_burn::cache::{Precision, DEFAULT_LATENT};
use dynakv_burn::dynakv_snapkv::SnapKvPreset;
use dynakv_core::artifact::Artifact;
use dynakv_core::policy::{BudgetHold, EnergyRule, PolicyKind};
use dynakv_core::quant::{BasisDtype, KvDtype, LatentDtype, LatentScales};
use dynakv_models::corpus::Split;
use serde_json::{json, Value};

use super::cache_args::{CacheArgs, CacheKind};
use super::common::{check_writable, progress, ModelArgs};
use super::longctx::{longctx_reference, run_longctx};
use super::values;

#[derive(Args, Debug)]
pub struct SweepArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibrated artifact for the training-free policies.
    #[arg(long)]
    pub artifact: PathBuf,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "uniform,per-layer,energy"
    )]
    pub policies: Vec<PolicyKind>,
    #[arg(long, default_value = "0.47,0.30,0.20")]
    pub budgets: String,
    /// SnapKV ratios: alone on the full cache, and in front of every DynaKV cell.
    #[arg(long, default_value = "")]
    pub snapkv: String,
    /// Trained router artifacts (`dynakv train`), each at its own target.
    #[arg(long)]
    pub router: Vec<PathBuf>,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 1024)]
    pub ctx: usize,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 4)]
    pub windows: usize,
    /// Score only the last N tokens of each window, after a compressing
    /// prefill (the SnapKV protocol, docs/protocol.md).
    #[arg(value_parser = values::at_least_one, long)]
    pub score_last: Option<usize>,
    /// Also measure KL(full ‖ cache) and top-1 agreement (doubles the time).
    #[arg(long)]
    pub fidelity: bool,
    /// JSON lines, one per cell.
    #[arg(long)]
    pub out: PathBuf,
    /// Plot PPL ratio (and KL with --fidelity) against KV bytes per token, as
    /// a fraction of an f16 dense cache (log), here (SVG and PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Skip cells already in --out (measured under the same configuration:
    /// a record of the same cell under another one is an error).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: drop a damaged last line of --out (an interrupted
    /// write) instead of stopping at it.
    #[arg(long, requires = "resume")]
    pub drop_damaged: bool,
    /// SnapKV settings of every SnapKV cell (`dynakv eval ppl --help`).
    #[arg(long, value_enum, default_value_t = SnapKvPreset::Kvpress)]
    pub snapkv_preset: SnapKvPreset,
    #[arg(long)]
    pub snapkv_layer_max: bool,
    /// SnapKV cells over DynaKV compress the prompt as it arrives (as
    /// measured before 2026-11-30) instead of holding it until pruning.
    #[arg(long)]
    pub snapkv_on_arrival: bool,
    /// DynaKV cells: the last N tokens of every append keep full rank.
    #[arg(long, default_value_t = 0)]
    pub recent_full: usize,
    /// DynaKV cells: the budget promise (`dynakv eval ppl --help`).
    #[arg(long, value_enum, default_value_t = BudgetHold::Track)]
    pub budget_hold: BudgetHold,
    /// Also run the long-context suite (`dynakv eval longctx`) at these
    /// prompt lengths; every cell reports its score as a fraction of the
    /// full cache's over the cells the full cache passes.
    #[arg(long, default_value = "")]
    pub longctx_lengths: String,
    #[arg(long, default_value = "passkey,multikey,codeword")]
    pub longctx_tasks: String,
    #[arg(long, default_value = "0.1,0.5,0.9")]
    pub longctx_depths: String,
    #[arg(long, default_value_t = 0)]
    pub longctx_seed: u64,
    /// The question inside the prefill, so SnapKV sees it.
    #[arg(long)]
    pub query_aware: bool,
    #[arg(value_parser = values::unit, long, default_value_t = 0.6)]
    pub keep_threshold: f64,
    /// Full-cache long-context outcomes: read if present, else written.
    #[arg(long)]
    pub longctx_full: Option<PathBuf>,
    /// Storage of the full-cache and SnapKV-alone cells: dtypes for keys and
    /// values (`q8_0`) or keys/values (`q8_0/q4_0`); the f32 full cache is
    /// always the reference cell.
    #[arg(long, default_value = "f32")]
    pub kv_dtypes: String,
    /// Storage of DynaKV cells' latents (int8, the default, f32, f16, int4,
    /// mixed).
    #[arg(long, default_value = DEFAULT_LATENT.name())]
    pub latent_dtypes: String,
    /// Scales of integer latents.
    #[arg(long, value_enum, default_value_t = LatentScales::Token)]
    pub latent_scales: LatentScales,
    /// How DynaKV cells hold their bases.
    #[arg(long, value_enum, default_value_t = BasisDtype::F16)]
    pub basis_dtype: BasisDtype,
}

/// `K` or `K/V` dtypes.
fn kv_pairs(s: &str) -> Result<Vec<(KvDtype, KvDtype)>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            let (k, v) = x.trim().split_once('/').unwrap_or((x.trim(), x.trim()));
            let parse = |d: &str| {
                d.parse::<KvDtype>()
                    .map_err(|e| anyhow::anyhow!("bad --kv-dtypes entry `{x}`: {e}"))
            };
            Ok((parse(k)?, parse(v)?))
        })
        .collect()
}

impl SweepArgs {
    fn longctx_spec(&self) -> Result<Option<SuiteSpec>> {
        let lengths = values::list(&self.longctx_lengths, "length", false, values::at_least_one)?;
        if lengths.is_empty() {
            return Ok(None);
        }
        Ok(Some(SuiteSpec {
            tasks: values::list(&self.longctx_tasks, "task", true, values::parsed)?,
            lengths,
            depths: values::list(&self.longctx_depths, "depth", true, values::unit)?,
            seed: self.longctx_seed,
        }))
    }
}

fn cache(
    a: &SweepArgs,
    kind: CacheKind,
    artifact: Option<&Path>,
    policy: PolicyKind,
    budget: f64,
    snapkv: Option<f64>,
    precision: Precision,
) -> CacheArgs {
    let d = CacheArgs::defaults();
    let dynakv = kind == CacheKind::Dynakv;
    CacheArgs {
        cache: kind,
        artifact: artifact.map(Path::to_path_buf),
        // DynaKV's flags stay at their defaults on the full cache's cells
        policy: if dynakv { policy } else { d.policy },
        budget: if dynakv { budget } else { d.budget },
        key_factor: None,
        energy_rule: EnergyRule::Lagrange,
        recent_full: if dynakv { a.recent_full } else { d.recent_full },
        // the promise is DynaKV's; other cells take the default
        budget_hold: if dynakv { a.budget_hold } else { d.budget_hold },
        snapkv,
        snapkv_preset: a.snapkv_preset,
        snapkv_layer_max: a.snapkv_layer_max,
        snapkv_on_arrival: dynakv && snapkv.is_some() && a.snapkv_on_arrival,
        kv_dtype: precision.k,
        v_dtype: Some(precision.v),
        latent_dtype: precision.latent,
        latent_scales: precision.scales,
        basis_dtype: precision.basis,
        no_kv_rotation: !precision.rotate,
        ..d
    }
}

/// What every cell of this run is measured under: the model file
/// (SHA-256), the text's length and the protocol's settings.
fn protocol(a: &SweepArgs, model_sha256: &str, eval_tokens: usize) -> Result<Value> {
    let longctx = match a.longctx_spec()? {
        Some(spec) => json!({
            "tasks": format!("{:?}", spec.tasks),
            "lengths": spec.lengths,
            "depths": spec.depths,
            "seed": spec.seed,
            "query_aware": a.query_aware,
            "keep_threshold": a.keep_threshold,
        }),
        None => Value::Null,
    };
    Ok(json!({
        "model_sha256": model_sha256,
        "text": "brown eval",
        "text_tokens": eval_tokens,
        "ctx": a.ctx,
        "windows": a.windows,
        "score_last": a.score_last,
        "fidelity": a.fidelity,
        "longctx": longctx,
    }))
}

/// Everything a cell's result depends on, recorded with it and compared on
/// `--resume`: the run's [`protocol`], the cache spec and the artifact file
/// (SHA-256, hashed once per file).
fn cell_config(
    protocol: &Value,
    cell: &CacheArgs,
    hashes: &mut HashMap<PathBuf, String>,
) -> Result<Value> {
    let spec = cell.spec()?;
    let artifact = match &cell.artifact {
        Some(p) if spec.dynakv.is_some() => {
            if !hashes.contains_key(p) {
                let h = dynakv_models::assets::sha256_file(p)
                    .with_context(|| format!("hashing {}", p.display()))?;
                hashes.insert(p.clone(), h);
            }
            Value::from(hashes[p].clone())
        }
        _ => Value::Null,
    };
    let mut config = protocol.clone();
    config["spec"] = spec.to_string().into();
    config["artifact_sha256"] = artifact;
    Ok(config)
}

/// A cell label's storage part: `""` for the default precision (f32 rows,
/// int8 latents), else `/kv=q8_0`, `/k=q8_0,v=q4_0`, `/latent=f32` (the
/// precision as a spec writes it).
/// A cell label's storage suffix: empty where `p` is `reference`.
fn suffix(p: Precision, reference: Precision) -> String {
    if p == reference {
        String::new()
    } else {
        format!("/{p}")
    }
}

/// `(label, plot family, cache)` of every cell, the full cache first.
fn cells(a: &SweepArgs) -> Result<Vec<(String, String, CacheArgs)>> {
    let snaps = values::list(&a.snapkv, "SnapKV ratio", false, values::removed_fraction)?;
    let mut out = vec![(
        "full".to_string(),
        "full".to_string(),
        cache(
            a,
            CacheKind::Full,
            None,
            PolicyKind::Energy,
            1.0,
            None,
            Precision::f32_rows(),
        ),
    )];
    let kvs: Vec<Precision> = kv_pairs(&a.kv_dtypes)?
        .into_iter()
        .map(|(k, v)| Precision {
            k,
            v,
            ..Precision::default()
        })
        .collect();
    // channel scales apply to integer latents only
    let latents: Vec<Precision> = values::list(
        &a.latent_dtypes,
        "latent dtype",
        false,
        values::parsed::<LatentDtype>,
    )?
    .into_iter()
    .map(|latent| Precision {
        latent,
        scales: match latent {
            LatentDtype::Int8 | LatentDtype::Int4 => a.latent_scales,
            _ => LatentScales::Token,
        },
        basis: a.basis_dtype,
        ..Precision::default()
    })
    .collect();
    // full and SnapKV cells are named against the f32 reference, DynaKV
    // cells against the default latents
    for &st in &kvs {
        let sfx = suffix(st, Precision::f32_rows());
        if !sfx.is_empty() {
            out.push((
                format!("full{sfx}"),
                "full (dtypes)".into(),
                cache(a, CacheKind::Full, None, PolicyKind::Energy, 1.0, None, st),
            ));
        }
        for &r in &snaps {
            out.push((
                format!("snapkv/{r}{sfx}"),
                format!("snapkv{sfx}"),
                cache(
                    a,
                    CacheKind::Full,
                    None,
                    PolicyKind::Energy,
                    1.0,
                    Some(r),
                    st,
                ),
            ));
        }
    }
    let mut dyna = Vec::new();
    for &p in &a.policies {
        for b in values::list(&a.budgets, "budget", false, values::fraction)? {
            dyna.push((p, a.artifact.clone(), b));
        }
    }
    for r in &a.router {
        let art = Artifact::load(r)?;
        let info = art
            .header
            .router
            .with_context(|| format!("{} holds no router", r.display()))?;
        dyna.push((PolicyKind::Router, r.clone(), info.target));
    }
    for (p, art, b) in dyna {
        for &st in &latents {
            let sfx = suffix(st, Precision::default());
            out.push((
                format!("{p}/{b}{sfx}"),
                format!("{p}{sfx}"),
                cache(a, CacheKind::Dynakv, Some(&art), p, b, None, st),
            ));
            for &r in &snaps {
                out.push((
                    format!("snapkv/{r}+{p}/{b}{sfx}"),
                    format!("snapkv/{r}+{p}{sfx}"),
                    cache(a, CacheKind::Dynakv, Some(&art), p, b, Some(r), st),
                ));
            }
        }
    }
    Ok(out)
}

pub fn run(a: SweepArgs) -> Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let cells = cells(&a)?;
    a.longctx_spec()?;
    check_writable("--out", &a.out)?;
    if let Some(p) = &a.plot {
        check_writable("--plot", p)?;
        check_writable("--plot", &p.with_extension("png"))?;
    }
    if let Some(p) = &a.longctx_full {
        check_writable("--longctx-full", p)?;
    }
    for (_, _, c) in &cells {
        c.check()?;
    }
    let loaded = a.model.load()?;
    let ids = document_tokens(&loaded.tokenizer, &brown_docs(Split::Eval, None)?)?;
    let ids = dynakv_models::corpus::protocol_stream(&ids, a.ctx, loaded.tokenizer.text_bos());
    if a.out.exists() && !a.resume {
        anyhow::bail!("{} exists: pass --resume to continue it", a.out.display());
    }
    let mut records = Records::read(&a.out, a.drop_damaged)?;
    let protocol = protocol(&a, &loaded.sha256, ids.len())?;
    let mut hashes = HashMap::new();
    let mut todo = Vec::new();
    for cell in &cells {
        let config = cell_config(&protocol, &cell.2, &mut hashes)?;
        if !records.finished(&cell.0, &config)? {
            todo.push((cell, config));
        }
    }
    let longctx = match a.longctx_spec()? {
        Some(spec) if !todo.is_empty() => Some(longctx_reference(
            &loaded,
            &spec,
            a.longctx_full.as_deref(),
        )?),
        _ => None,
    };
    let bar = progress(
        todo.len() as u64,
        "sweep [{bar:30}] {pos}/{len} cells, ETA {eta} {msg}",
    );
    for ((label, family, args), config) in todo {
        bar.set_message(label.clone());
        let maker = args.maker(&loaded)?;
        let p = perplexity(
            &loaded.model,
            &ids,
            a.ctx,
            Some(a.windows),
            a.score_last,
            None,
            || maker.make(),
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
            "bytes": p.report.bytes.bytes,
            "fixed_bytes": p.report.bytes.fixed_bytes,
            "kv_bytes_per_token": p.report.bytes.kv_bytes_per_token,
            "bytes_f16_dense": p.report.bytes.bytes_f16_dense,
            "kv_fraction_f16": p.report.bytes.kv_fraction_f16,
            "kv_fraction_f16_prefill": p.report.kv_fraction_f16_prefill,
            "kv_bytes_per_token_prefill": p.report.kv_bytes_per_token_prefill,
            "bytes_full": p.report.bytes.bytes_full,
            "ctx": a.ctx,
            "windows": a.windows,
            "score_last": a.score_last,
            "command": command,
            "config": config,
        });
        if a.fidelity {
            let f = fidelity(
                &loaded.model,
                &ids,
                a.ctx,
                Some(a.windows),
                a.score_last,
                None,
                || loaded.model.dense_cache(),
                || maker.make(),
                |_, _| {},
            )?;
            v["kl_mean"] = f.kl_mean.into();
            v["kl_p95"] = f.kl_p95.into();
            v["top1_agreement"] = f.top1_agreement.into();
        }
        if let Some((suite, full)) = &longctx {
            let (kept, _) = kept_cells(full, a.keep_threshold);
            let which = suite.in_cells(&kept);
            let outcomes = if args.is_full() {
                which.iter().map(|&i| full[i].clone()).collect()
            } else {
                run_longctx(suite, loaded.runner(), label, &which, a.query_aware, || {
                    maker.make()
                })?
            };
            let s = summarize(full, &outcomes, a.keep_threshold);
            v["longctx_key"] = suite.key.clone().into();
            v["longctx_query_aware"] = a.query_aware.into();
            v["longctx_kept"] = serde_json::to_value(&s.kept)?;
            v["longctx_cells"] = serde_json::to_value(&s.cells)?;
            v["longctx_score"] = s.score.into();
            v["longctx_score_full"] = s.score_full.into();
            v["longctx_relative"] = s.relative.into();
            v["longctx_retained"] = s.retained.into();
        }
        records.append(v)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let done: Vec<Value> = records.values().cloned().collect();
    let full = done
        .iter()
        .find(|v| v["label"] == "full")
        .and_then(|v| v["ppl"].as_f64())
        .context("no full-cache cell")?;
    let retained = |v: &Value| {
        v["retained_prefill"]
            .as_f64()
            .or(v["retained"].as_f64())
            .unwrap_or(f64::NAN)
    };
    // Plots: quality against KV bytes per token, as a fraction of f16 dense,
    // at the compression point (the end of prefill) when there is one.
    let x = |v: &Value| {
        v["kv_fraction_f16_prefill"]
            .as_f64()
            .or(v["kv_fraction_f16"].as_f64())
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
    println!(
        "| cell | retained | KV bytes / f16 dense | PPL | ratio | KL mean | top-1 | long-context | true MB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for v in &done {
        let ppl = v["ppl"].as_f64().unwrap_or(f64::NAN);
        let opt = |k: &str| v[k].as_f64().map_or("–".to_string(), |x| format!("{x:.4}"));
        println!(
            "| {} | {:.3} | {:.2}% | {:.3} | {:.3} | {} | {} | {} | {:.2} |",
            v["label"].as_str().unwrap_or("?"),
            retained(v),
            100.0 * x(v),
            ppl,
            ppl / full,
            opt("kl_mean"),
            opt("top1_agreement"),
            opt("longctx_relative"),
            v["bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    if let Some(path) = &a.plot {
        let ratio = series_of(&|v| v["ppl"].as_f64().map(|p| p / full));
        bytes_plot(
            path,
            "Brown eval: perplexity against KV memory",
            "PPL ratio to the full cache",
            &command,
            &ratio,
            true,
        )
        .map_err(anyhow::Error::msg)?;
        if done.iter().any(|v| v["longctx_relative"].is_number()) {
            let lc = series_of(&|v| v["longctx_relative"].as_f64());
            bytes_plot(
                &sibling(path, "longctx"),
                "Long-context retrieval (Brown eval haystacks) against KV memory",
                "score as a fraction of the full cache's",
                &command,
                &lc,
                false,
            )
            .map_err(anyhow::Error::msg)?;
        }
        if a.fidelity {
            let kl = series_of(&|v| v["kl_mean"].as_f64());
            bytes_plot(
                &sibling(path, "kl"),
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

/// `dir/NAME-suffix.svg` beside `dir/NAME.svg`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    path.with_file_name(format!(
        "{}-{suffix}.svg",
        path.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep")
    ))
}
