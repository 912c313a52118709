//! The long-context suite as one unit, shared by `dynakv eval longctx` and
//! `dynakv eval sweep`: tasks × lengths × depths built from a seed, the
//! full-cache reference (computed once, kept in a file keyed by the suite),
//! and the summary every compressed cache reports: its score over the cells
//! the full cache passes, as a fraction of the full cache's.

use std::path::Path;

use dynakv_burn::AttentionCache;
use dynakv_models::{LlamaModel, ModelError, TextTokenizer};
use serde::Serialize;

use super::longctx::{build_samples, cells, run_sample, Cell, Outcome, PromptFormat, Sample, Task};

/// What a suite asks.
#[derive(Debug, Clone)]
pub struct SuiteSpec {
    pub tasks: Vec<Task>,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub seed: u64,
}

impl SuiteSpec {
    /// Names the prompts: a reference file holds outcomes for one key only.
    pub fn key(&self) -> String {
        let join = |v: Vec<String>| v.join(",");
        format!(
            "tasks={} lengths={} depths={} seed={}",
            join(self.tasks.iter().map(|t| t.name().to_string()).collect()),
            join(self.lengths.iter().map(usize::to_string).collect()),
            join(self.depths.iter().map(f64::to_string).collect()),
            self.seed
        )
    }
}

/// Built prompts of a suite.
#[derive(Debug, Clone)]
pub struct Suite {
    pub key: String,
    pub samples: Vec<Sample>,
}

/// The model, its tokenizer and how it is prompted: what running a prompt needs.
#[derive(Clone, Copy)]
pub struct Runner<'a> {
    pub model: &'a LlamaModel,
    pub tokenizer: &'a TextTokenizer,
    pub format: PromptFormat<'a>,
}

impl Suite {
    /// Haystacks from `stream` (token ids of Brown `eval`); a length past the
    /// model's context is an error.
    pub fn build(runner: Runner<'_>, stream: &[u32], spec: &SuiteSpec) -> Result<Self, ModelError> {
        let context = runner.model.config.context_length;
        if let Some(&l) = spec.lengths.iter().find(|&&l| l > context) {
            return Err(ModelError::InvalidInput(format!(
                "length {l} exceeds the model's context ({context})"
            )));
        }
        let mut samples = Vec::new();
        for &task in &spec.tasks {
            for &length in &spec.lengths {
                samples.extend(build_samples(
                    runner.tokenizer,
                    runner.format,
                    stream,
                    task,
                    length,
                    context,
                    &spec.depths,
                    spec.seed,
                )?);
            }
        }
        // the prompts depend on the model's tokenizer and format too
        let key = format!(
            "{} model={} format={}",
            spec.key(),
            runner.model.config.architecture,
            runner.format.name()
        );
        Ok(Self { key, samples })
    }

    /// Runs the samples `which`, each with a fresh cache, calling `tick`
    /// after each.
    pub fn run(
        &self,
        runner: Runner<'_>,
        which: &[usize],
        query_aware: bool,
        mut make_cache: impl FnMut() -> Result<Box<dyn AttentionCache>, ModelError>,
        mut tick: impl FnMut(),
    ) -> Result<Vec<Outcome>, ModelError> {
        let mut out = Vec::with_capacity(which.len());
        for &i in which {
            let s = self.samples.get(i).ok_or_else(|| {
                ModelError::InvalidInput(format!("no sample {i} in a suite of {}", self.len()))
            })?;
            let mut cache = make_cache()?;
            out.push(run_sample(
                runner.model,
                runner.tokenizer,
                runner.format,
                s,
                query_aware,
                cache.as_mut(),
            )?);
            tick();
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Indices of the samples that fall in `kept` cells.
    pub fn in_cells(&self, kept: &[Cell]) -> Vec<usize> {
        (0..self.samples.len())
            .filter(|&i| {
                let s = &self.samples[i];
                kept.iter()
                    .any(|c| c.task == s.task && c.length == s.length)
            })
            .collect()
    }

    /// Full-cache outcomes stored at `path` for this suite, if the file exists.
    ///
    /// The dense cache is exact, so where the question is prefilled does not
    /// change its answers: one reference serves the query-aware and the
    /// query-agnostic variants.
    pub fn load_reference(&self, path: &Path) -> Result<Option<Vec<Outcome>>, ModelError> {
        if !path.exists() {
            return Ok(None);
        }
        let bad = |e: String| ModelError::InvalidInput(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if v["key"].as_str() != Some(self.key.as_str()) {
            return Err(bad(format!(
                "holds full-cache results for `{}`, not `{}`",
                v["key"], self.key
            )));
        }
        let out: Vec<Outcome> =
            serde_json::from_value(v["outcomes"].clone()).map_err(|e| bad(e.to_string()))?;
        if out.len() != self.len() {
            return Err(bad(format!(
                "holds {} outcomes for {} prompts",
                out.len(),
                self.len()
            )));
        }
        Ok(Some(out))
    }

    /// Writes the full-cache outcomes, all or nothing.
    pub fn save_reference(&self, path: &Path, outcomes: &[Outcome]) -> Result<(), ModelError> {
        let v = serde_json::json!({"key": self.key, "outcomes": outcomes});
        let io = |e: std::io::Error| ModelError::InvalidInput(format!("{}: {e}", path.display()));
        dynakv_core::io::write_bytes_atomically(path, v.to_string().as_bytes()).map_err(io)
    }
}

/// A compressed cache's result against the full cache's.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub keep_threshold: f64,
    /// Every cell of the full cache.
    pub full_cells: Vec<Cell>,
    /// Cells where the full cache scores at least the threshold: the suite.
    pub kept: Vec<Cell>,
    pub dropped: Vec<Cell>,
    /// The compressed cache's cells (kept cells only).
    pub cells: Vec<Cell>,
    /// Mean score over kept cells.
    pub score_full: f64,
    pub score: f64,
    /// `score / score_full`.
    pub relative: f64,
    /// Mean retained fraction over the compressed runs.
    pub retained: f64,
    /// The same, of the spec's layers (a model's global layers when it has
    /// sliding-window ones).
    pub retained_global: f64,
}

/// Splits the full cache's cells at `keep_threshold`.
pub fn kept_cells(full: &[Outcome], keep_threshold: f64) -> (Vec<Cell>, Vec<Cell>) {
    cells(full)
        .into_iter()
        .partition(|c| c.score >= keep_threshold)
}

/// Scores `compressed` (outcomes of the kept cells) against `full`.
pub fn summarize(full: &[Outcome], compressed: &[Outcome], keep_threshold: f64) -> Summary {
    let (kept, dropped) = kept_cells(full, keep_threshold);
    let comp = cells(compressed);
    let mean = |c: &[Cell]| {
        if c.is_empty() {
            f64::NAN
        } else {
            c.iter().map(|x| x.score).sum::<f64>() / c.len() as f64
        }
    };
    let (score_full, score) = (mean(&kept), mean(&comp));
    Summary {
        keep_threshold,
        full_cells: cells(full),
        kept,
        dropped,
        cells: comp,
        score_full,
        score,
        relative: score / score_full,
        retained: compressed.iter().map(|o| o.retained).sum::<f64>()
            / compressed.len().max(1) as f64,
        retained_global: compressed
            .iter()
            .map(|o| o.retained_global.unwrap_or(o.retained))
            .sum::<f64>()
            / compressed.len().max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::longctx::tests::outcome as o;

    #[test]
    fn the_key_names_every_choice() {
        let spec = SuiteSpec {
            tasks: vec![Task::Passkey, Task::Multikey, Task::Codeword],
            lengths: vec![4096],
            depths: vec![0.1, 0.3, 0.5, 0.7, 0.9],
            seed: 0,
        };
        // the key of the references measured so far (docs/results.md)
        assert_eq!(
            spec.key(),
            "tasks=passkey,multikey,codeword lengths=4096 depths=0.1,0.3,0.5,0.7,0.9 seed=0"
        );
    }

    #[test]
    fn only_cells_the_full_cache_passes_count() {
        let full = [
            o(Task::Passkey, 1024, true, 1.0),
            o(Task::Passkey, 1024, true, 1.0),
            o(Task::Multikey, 1024, false, 1.0),
            o(Task::Multikey, 1024, true, 1.0),
            o(Task::Codeword, 1024, true, 1.0),
            o(Task::Codeword, 1024, false, 1.0),
        ];
        // passkey 1.0 and codeword 0.5 pass 0.5; multikey 0.5 too; at 0.6 only passkey
        let comp = [
            o(Task::Passkey, 1024, true, 0.1),
            o(Task::Passkey, 1024, false, 0.2),
        ];
        let s = summarize(&full, &comp, 0.6);
        assert_eq!(s.kept.len(), 1);
        assert_eq!(s.dropped.len(), 2);
        assert_eq!((s.score_full, s.score, s.relative), (1.0, 0.5, 0.5));
        assert!((s.retained - 0.15).abs() < 1e-12);
        let s = summarize(&full, &comp, 0.5);
        assert_eq!(s.kept.len(), 3);
        assert!((s.score_full - 2.0 / 3.0).abs() < 1e-12);
    }
}
