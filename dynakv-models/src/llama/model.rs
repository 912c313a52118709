//! The whole Llama-family model: embedding, blocks, final norm, output head.

use std::path::Path;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use dynakv_burn::cache::Precision;
use dynakv_burn::{
    AttentionCache, CacheFactory, CacheSpec, CalibrationTarget, KvStorage, LayerAttention,
    LayerPlan, PlanPart, Rope,
};
use dynakv_core::artifact::{Artifact, ModelIdentity};

use super::config::LlamaConfig;
use super::layer::{Block, Norm};
use super::weights::{packed, raw_rows, Projection, WeightMode};
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::qmatmul::QuantMatrix;

/// A loaded model on one device.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub config: LlamaConfig,
    pub(super) embed: Embedding,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: Norm,
    /// `d_model -> vocab` (the embedding when weights are tied)
    pub(super) output: Projection,
    /// The global layers' RoPE tables (every layer's, without local layers).
    rope: Rope,
    /// Each layer's RoPE tables (clones share one table per base).
    ropes: Vec<Rope>,
    device: Device,
    mode: WeightMode,
    /// The output head is the embedding table (no `output.weight`).
    tied: bool,
}

/// The token embedding table, dense or packed like the projections.
#[derive(Debug, Clone)]
pub(super) enum Embedding {
    /// `[vocab, d_model]`
    Dense(Tensor<2>),
    /// `vocab` rows of `d_model`, in the file's block format.
    Packed(QuantMatrix),
}

fn transpose_rows(rows: &[f32], n_rows: usize, row_len: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows.len()];
    for r in 0..n_rows {
        for (i, &x) in rows[r * row_len..(r + 1) * row_len].iter().enumerate() {
            t[i * n_rows + r] = x;
        }
    }
    t
}

impl LlamaModel {
    /// Loads a GGUF file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, ModelError> {
        let gguf = GgufFile::open(path)?;
        Self::from_gguf(&gguf, device)
    }

    /// Loads a GGUF file's weights the default way for the device
    /// ([`WeightMode::for_device`]: packed on CPU backends, dense on GPUs).
    pub fn from_gguf(gguf: &GgufFile, device: &Device) -> Result<Self, ModelError> {
        Self::from_gguf_with(gguf, device, WeightMode::for_device(device))
    }

    /// Loads a GGUF file's weights in `mode`.
    pub fn from_gguf_with(
        gguf: &GgufFile,
        device: &Device,
        mode: WeightMode,
    ) -> Result<Self, ModelError> {
        let _span = tracing::info_span!("load_model").entered();
        let c = LlamaConfig::from_gguf(gguf)?;
        let out_name = match gguf.tensor("output.weight") {
            Some(_) => "output.weight",
            None => "token_embd.weight",
        };
        let (embed, output) = match mode {
            WeightMode::Dense => {
                let emb_rows = raw_rows(gguf, "token_embd.weight", c.d_model, c.vocab_size)?;
                let output_rows = match out_name {
                    "output.weight" => Some(raw_rows(gguf, out_name, c.d_model, c.vocab_size)?),
                    _ => None,
                };
                let output_t = transpose_rows(
                    output_rows.as_deref().unwrap_or(&emb_rows),
                    c.vocab_size,
                    c.d_model,
                );
                let output =
                    Tensor::from_data(TensorData::new(output_t, [c.d_model, c.vocab_size]), device);
                let embed =
                    Tensor::from_data(TensorData::new(emb_rows, [c.vocab_size, c.d_model]), device);
                (Embedding::Dense(embed), Projection::Dense(output))
            }
            WeightMode::Packed(numerics) => {
                let embed = packed(gguf, "token_embd.weight", c.d_model, c.vocab_size)?;
                match out_name {
                    "output.weight" => (
                        Embedding::Packed(embed),
                        Projection::packed(
                            packed(gguf, out_name, c.d_model, c.vocab_size)?,
                            numerics,
                        ),
                    ),
                    // tied: the table is the head's matrix after its copy
                    // (tiles or huge pages), whose file pages are given back
                    _ => {
                        let output = Projection::packed(embed.clone(), numerics);
                        let table = match &output {
                            Projection::Packed(m, _) => m.clone(),
                            Projection::Dense(_) => embed,
                        };
                        (Embedding::Packed(table), output)
                    }
                }
            }
        };
        let blocks = (0..c.n_layers)
            .map(|i| Block::load(gguf, i, &c, mode, device))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = Norm::load(gguf, "output_norm.weight", c.d_model, device)?;
        let rope = Rope::new(
            c.rope_style(),
            c.head_dim,
            c.rope_dim,
            c.rope_base,
            c.context_length,
            device,
        )?;
        let mut ropes: Vec<Rope> = Vec::with_capacity(c.n_layers);
        for layer in &c.layers {
            let same = ropes
                .iter()
                .chain([&rope])
                .find(|r| r.base() == layer.rope_base)
                .cloned();
            ropes.push(match same {
                Some(r) => r,
                None => Rope::new(
                    c.rope_style(),
                    c.head_dim,
                    c.rope_dim,
                    layer.rope_base,
                    c.context_length,
                    device,
                )?,
            });
        }
        Ok(Self {
            config: c,
            embed,
            blocks,
            norm,
            output,
            rope,
            ropes,
            device: device.clone(),
            mode,
            tied: out_name == "token_embd.weight",
        })
    }

    /// How the weights are held.
    pub fn weight_mode(&self) -> WeightMode {
        self.mode
    }

    /// Bytes the weights hold in memory (packed weights: the file's blocks,
    /// counted once when the output head is the embedding).
    pub fn weight_bytes(&self) -> usize {
        let embed = match &self.embed {
            Embedding::Dense(t) => t.shape().num_elements() * 4,
            Embedding::Packed(m) => m.byte_len(),
        };
        // packed and tied: the head is the embedding's blocks, held once
        let shared = self.tied && matches!(self.embed, Embedding::Packed(_));
        let output = if shared { 0 } else { self.output.bytes() };
        embed + output + self.blocks.iter().map(Block::bytes).sum::<usize>() + self.norm.bytes()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The global layers' RoPE tables (every layer's for a model without
    /// local layers).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// How each layer attends: its window and RoPE tables.
    pub fn layer_plan(&self) -> LayerPlan {
        LayerPlan {
            layers: self
                .config
                .layers
                .iter()
                .zip(&self.ropes)
                .map(|(l, rope)| LayerAttention {
                    window: l.window,
                    rope: rope.clone(),
                })
                .collect(),
        }
    }

    /// Model layers the spec's cache holds (and an artifact covers): every
    /// layer, or the global ones of a model with sliding-window layers.
    pub fn cache_layers(&self) -> Vec<usize> {
        (0..self.config.n_layers)
            .filter(|&l| self.config.layers[l].window.is_none())
            .collect()
    }

    /// The geometry of the spec's cache ([`LlamaModel::cache_layers`]).
    pub fn cache_geometry(&self) -> dynakv_burn::CacheGeometry {
        dynakv_burn::CacheGeometry {
            n_layers: self.cache_layers().len(),
            ..self.config.geometry()
        }
    }

    /// The whole model's cache around `global`, a cache of
    /// [`LlamaModel::cache_geometry`] the caller keeps (calibration's
    /// recording cache, a trainer's): fresh windowed caches for the local
    /// layers; `global` alone for a model without them.
    pub fn around<'a>(
        &self,
        global: &'a mut dyn AttentionCache,
    ) -> Result<Box<dyn AttentionCache + 'a>, ModelError> {
        self.around_part(0, global)
    }

    /// [`LlamaModel::around`] for any of [`LlamaModel::cache_parts`]: the
    /// given cache holds that part's layers, fresh dense caches the others.
    pub fn around_part<'a>(
        &self,
        part: usize,
        cache: &'a mut dyn AttentionCache,
    ) -> Result<Box<dyn AttentionCache + 'a>, ModelError> {
        let cache = Box::new(dynakv_burn::Borrowed(cache));
        if part == 0 && !self.config.has_windows() {
            // one part: nothing to build around it (every calibration
            // window and training step comes through here)
            return Ok(cache);
        }
        Ok(self
            .cache_factory(None, &CacheSpec::dense())?
            .around_part(part, cache)?)
    }

    /// The caches this model's layers are held in: the global layers, then
    /// each group of sliding-window layers sharing a window and a RoPE base
    /// ([`LayerPlan::parts`]); one part of every layer for a model without
    /// windows.
    pub fn cache_parts(&self) -> Result<Vec<PlanPart>, ModelError> {
        if !self.config.has_windows() {
            return Ok(vec![PlanPart {
                layers: (0..self.config.n_layers).collect(),
                rope: self.rope.clone(),
                window: None,
            }]);
        }
        Ok(self.layer_plan().parts()?)
    }

    /// What this model is, as an artifact records and checks it:
    /// architecture, the geometry of the layers an artifact covers
    /// ([`LlamaModel::cache_geometry`]) and the GGUF file's SHA-256.
    pub fn identity(&self, file_sha256: &str) -> ModelIdentity {
        self.identity_of(self.cache_layers().len(), file_sha256)
    }

    /// [`LlamaModel::identity`] of an artifact covering `n_layers` layers.
    fn identity_of(&self, n_layers: usize, file_sha256: &str) -> ModelIdentity {
        let c = &self.config;
        ModelIdentity {
            architecture: c.architecture.clone(),
            n_layers,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            file_sha256: file_sha256.to_string(),
        }
    }

    /// Checks an artifact was calibrated on this model file, for its
    /// global layers or (`dynakv calibrate --layers all`) every layer.
    pub fn check_artifact(&self, artifact: &Artifact, file_sha256: &str) -> Result<(), ModelError> {
        let every = self.config.n_layers;
        let n = match artifact.header.model.n_layers {
            n if n == every => every,
            _ => self.cache_layers().len(),
        };
        Ok(artifact
            .header
            .model
            .check(&self.identity_of(n, file_sha256))?)
    }

    /// What [`dynakv_burn::calibrate()`] needs of this model besides its
    /// forward pass, for the layers an artifact covers by default (the
    /// global ones): `W_o` of every layer is copied to the host only for
    /// the output-aware basis.
    pub fn calibration_target(
        &self,
        file_sha256: &str,
        with_output_proj: bool,
    ) -> Result<CalibrationTarget<'_>, ModelError> {
        self.target_of(
            &self.cache_layers(),
            &self.rope,
            None,
            file_sha256,
            with_output_proj,
        )
    }

    /// [`LlamaModel::calibration_target`] of one of
    /// [`LlamaModel::cache_parts`] (run the model over
    /// [`LlamaModel::around_part`]).
    pub fn calibration_target_of<'a>(
        &'a self,
        part: &'a PlanPart,
        file_sha256: &str,
        with_output_proj: bool,
    ) -> Result<CalibrationTarget<'a>, ModelError> {
        self.target_of(
            &part.layers,
            &part.rope,
            part.window,
            file_sha256,
            with_output_proj,
        )
    }

    fn target_of<'a>(
        &'a self,
        layers: &[usize],
        rope: &'a Rope,
        window: Option<usize>,
        file_sha256: &str,
        with_output_proj: bool,
    ) -> Result<CalibrationTarget<'a>, ModelError> {
        let output_proj = if with_output_proj {
            let rows = layers
                .iter()
                .map(|&l| {
                    let b = &self.blocks[l];
                    b.wo(&self.device)
                        .into_data()
                        .try_into_vec_as::<f32>()
                        .map_err(ModelError::from)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(rows)
        } else {
            None
        };
        Ok(CalibrationTarget {
            geometry: dynakv_burn::CacheGeometry {
                n_layers: layers.len(),
                ..self.config.geometry()
            },
            rope,
            identity: self.identity_of(layers.len(), file_sha256),
            output_proj,
            window,
        })
    }

    /// What [`dynakv_burn::train::train`] needs of this model besides its
    /// forward pass.
    #[cfg(feature = "train")]
    pub fn train_target(&self) -> dynakv_burn::train::TrainTarget<'_> {
        dynakv_burn::train::TrainTarget {
            geometry: self.cache_geometry(),
            rope: &self.rope,
            device: &self.device,
            output_proj: self
                .cache_layers()
                .into_iter()
                .map(|l| self.blocks[l].wo(&self.device))
                .collect(),
        }
    }

    /// A factory of caches of one configuration for this model (storage
    /// follows the model's device). With sliding-window layers, the spec's
    /// cache holds the global layers and each local layer a dense cache
    /// bounded by its window ([`CacheFactory::for_plan`]).
    pub fn cache_factory(
        &self,
        artifact: Option<&Artifact>,
        spec: &CacheSpec,
    ) -> Result<CacheFactory, ModelError> {
        if self.config.has_windows() {
            return Ok(CacheFactory::for_plan(
                &self.layer_plan(),
                self.config.geometry(),
                &self.device,
                artifact,
                spec,
                KvStorage::for_device(&self.device),
            )?);
        }
        Ok(CacheFactory::new(
            self.config.geometry(),
            self.rope.clone(),
            &self.device,
            artifact,
            spec,
        )?)
    }

    /// A fresh full (uncompressed) cache for this model: f32 keys and values
    /// on every layer, local layers bounded by their windows. The exact
    /// reference every compressed cache is measured against; the dense
    /// cache a spec or the CLI builds by default stores f16
    /// ([`Precision::default`]).
    pub fn dense_cache(&self) -> Result<Box<dyn AttentionCache>, ModelError> {
        let spec = CacheSpec::dense().with_precision(Precision::f32_rows());
        Ok(self.cache_factory(None, &spec)?.make()?)
    }

    /// Hidden states after the final norm for new tokens at `start_pos..`.
    ///
    /// # Shapes
    /// returns `[T, d_model]`
    pub fn hidden(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor<2>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("no tokens".into()));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        let end = start_pos + tokens.len();
        if end > self.config.context_length {
            return Err(ModelError::InvalidInput(format!(
                "positions up to {end} exceed the context length {}",
                self.config.context_length
            )));
        }
        if let (Embedding::Packed(table), [token]) = (&self.embed, tokens) {
            // packed weights on a host device: every block runs on host vectors
            if !self.device.is_autodiff() && matches!(self.mode, WeightMode::Packed(_)) {
                return self.hidden_host(table, *token, start_pos, cache);
            }
        }
        let positions: Vec<usize> = (start_pos..end).collect();
        let mut h = match &self.embed {
            Embedding::Dense(table) => {
                let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
                let ids =
                    Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &self.device);
                table.clone().select(0, ids)
            }
            Embedding::Packed(m) => Tensor::from_data(
                TensorData::new(
                    packed_rows(m, tokens, self.config.d_model),
                    [tokens.len(), self.config.d_model],
                ),
                &self.device,
            ),
        };
        if let Some(scale) = self.config.arch.embedding_scale(self.config.d_model) {
            h = h * scale;
        }
        on_worker(|| {
            for (i, block) in self.blocks.iter().enumerate() {
                h = block.forward(i, h, &positions, &self.config, &self.ropes[i], cache)?;
            }
            Ok(self.norm.apply(h, self.config.rms_eps))
        })
    }

    /// [`LlamaModel::hidden`] of one token on host vectors (packed weights
    /// on a host device; see [`Block::forward_host`]).
    ///
    /// # Shapes
    /// returns `[1, d_model]`
    fn hidden_host(
        &self,
        table: &QuantMatrix,
        token: u32,
        pos: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor<2>, ModelError> {
        let d = self.config.d_model;
        let mut h = packed_rows(table, &[token], d);
        if let Some(scale) = self.config.arch.embedding_scale(d) {
            h.iter_mut().for_each(|x| *x *= scale);
        }
        on_worker(|| {
            for (i, block) in self.blocks.iter().enumerate() {
                block.forward_host(i, &mut h, pos, &self.config, &self.ropes[i], cache)?;
            }
            let out = self.norm.apply_host(&h, self.config.rms_eps);
            Ok(Tensor::from_data(
                TensorData::new(out, [1, d]),
                &self.device,
            ))
        })
    }

    /// Logits of every new token.
    ///
    /// # Shapes
    /// returns `[T, vocab]`
    pub fn forward(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor<2>, ModelError> {
        self.head(self.hidden(tokens, start_pos, cache)?)
    }

    /// Logits of hidden states ([`LlamaModel::hidden`]): the output head,
    /// then the final soft-capping where the model has it. Running it on
    /// slices of a long prefill's hidden states keeps the `[T, vocab]`
    /// logits small (Gemma 3's vocabulary: 1 MB per token).
    ///
    /// # Shapes
    /// - `h`: `[T, d_model]`; returns `[T, vocab]`
    pub fn head(&self, h: Tensor<2>) -> Result<Tensor<2>, ModelError> {
        let logits = self.output.forward(h)?;
        Ok(match self.config.final_softcap {
            Some(c) => (logits / c).tanh() * c,
            None => logits,
        })
    }

    /// Logits of the last new token only (generation).
    ///
    /// # Shapes
    /// returns `[vocab]`
    pub fn forward_last(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor<1>, ModelError> {
        let h = self.hidden(tokens, start_pos, cache)?;
        let t = h.dims()[0];
        let last = h.narrow(0, t - 1, 1);
        Ok(self.head(last)?.reshape([self.config.vocab_size]))
    }

    /// Negative log-likelihood of each next token and the model's top-1 guess.
    ///
    /// `tokens[i + 1]` is scored from position `i`; returns `T - 1` pairs.
    pub fn score(
        &self,
        tokens: &[u32],
        cache: &mut dyn AttentionCache,
    ) -> Result<(Vec<f32>, Vec<u32>), ModelError> {
        if tokens.len() < 2 {
            return Err(ModelError::InvalidInput(
                "need at least 2 tokens to score".into(),
            ));
        }
        let logits = self.forward(&tokens[..tokens.len() - 1], 0, cache)?;
        Ok(nll_and_top1(logits, &tokens[1..]))
    }
}

/// The embedding rows of `tokens` from a packed table (ids checked by the
/// caller against the vocabulary).
///
/// # Shapes
/// returns `[tokens.len(), d]` row-major
pub(super) fn packed_rows(table: &QuantMatrix, tokens: &[u32], d: usize) -> Vec<f32> {
    let mut rows = vec![0f32; tokens.len() * d];
    for (&t, row) in tokens.iter().zip(rows.chunks_exact_mut(d)) {
        table.row_into(t as usize, row);
    }
    rows
}

/// Runs `f` on a thread of rayon's global pool, the caller waiting.
///
/// Why: a decode step runs about 120 parallel products. Started from a
/// thread outside the pool, each one hands its work over and sleeps until
/// the pool's threads are done (measured 8-10 us per product on this 2-core
/// machine: a 192-row product took 17.8 us instead of 8.7). Started from a
/// pool thread, the caller works on its own share and the other threads,
/// still spinning from the previous product, pick theirs up at once.
fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `join` from outside the pool runs both closures on pool threads
    rayon::join(f, || ()).0
}

/// The NLL of `target` under one row of logits, in f64, and the row's
/// argmax (the first of equal maxima, as NumPy's): how the parity fixtures
/// score llama.cpp's logits, so equal logits give equal numbers.
///
/// # Shapes
/// - `logits`: `[vocab]`, `target < vocab` (else the NLL is NaN)
pub fn nll_and_top1_f64(logits: &[f32], target: u32) -> (f64, u32) {
    let best = crate::generate::argmax(logits);
    let m = logits
        .get(best as usize)
        .map_or(f64::NEG_INFINITY, |&v| v as f64);
    let lse = m + logits
        .iter()
        .map(|&v| (v as f64 - m).exp())
        .sum::<f64>()
        .ln();
    let at = logits.get(target as usize).map_or(f64::NAN, |&v| v as f64);
    (lse - at, best)
}

/// Per-row NLL of `targets` and the argmax of each row.
///
/// # Shapes
/// - `logits`: `[T, vocab]`, `targets.len() == T`
pub fn nll_and_top1(logits: Tensor<2>, targets: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let t = targets.len();
    let device = logits.device();
    let top1: Vec<i64> = logits
        .clone()
        .argmax(1)
        .into_data()
        .try_into_vec_as::<i64>()
        .unwrap_or_default();
    let idx: Vec<i64> = targets.iter().map(|&x| x as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [t, 1]), &device);
    let lp = log_softmax(logits, 1).gather(1, idx);
    let nll: Vec<f32> = lp
        .neg()
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap_or_default();
    (nll, top1.into_iter().map(|x| x as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::nll_and_top1_f64;

    #[test]
    fn f64_nll_is_log_softmax_and_ties_go_to_the_first() {
        let logits = [1.0, 3.0, 3.0, -2.0];
        let (n, top1) = nll_and_top1_f64(&logits, 1);
        let z = (1f64).exp() + 2.0 * (3f64).exp() + (-2f64).exp();
        assert!((n - (z.ln() - 3.0)).abs() < 1e-12);
        assert_eq!(top1, 1);
        assert!(nll_and_top1_f64(&logits, 9).0.is_nan());
    }
}
