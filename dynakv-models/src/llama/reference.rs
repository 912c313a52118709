//! A decoder that reproduces llama.cpp's one-token CPU arithmetic bit for
//! bit on Llama-family files with Q4_1 and Q8_0 weights.
//!
//! Why: issue 13 asks the q8 numerics to reproduce llama.cpp's logits on
//! the quantised file. Rounding the activations as llama.cpp does is not
//! enough: each 8-bit code depends on the last bits of everything before
//! it, so an engine that sums in its own order agrees with llama.cpp on
//! about 96% of top-1 tokens, as llama.cpp's batched path does with its own
//! one-token path (docs/results.md, session 23). This decoder runs every
//! operation of llama.cpp's graph in ggml's order (`ggml_ops.rs`; the
//! weight products on `qmatmul`'s row kernels in q8 numerics), one token
//! at a time as llama.cpp decodes, over its own cache of f32 or f16 rows
//! (llama.cpp's `type_k = type_v`, without flash attention), and with the
//! products a batch takes on llama.cpp's default build where asked
//! ([`LlamaCppRun`]). Compared tensor by tensor with llama.cpp's (its eval
//! callback, `tools/llamacpp_tensors.py`), every intermediate was equal in
//! every bit; the parity tests hold its logits to four llama.cpp runs.
//!
//! It is a reference, not the engine: no compressed caches, no batching,
//! the row kernels rather than the faster tiles.

use super::arch::{Activation, Arch};
use super::ggml_ops;
use super::model::{packed_rows, Embedding, LlamaModel};
use super::weights::Projection;
use crate::error::ModelError;
use crate::gguf::GgmlType;
use crate::qmatmul::{matmul_group_ggml_order, QuantMatrix};

/// Weight formats whose ggml products the row kernels reproduce (checked
/// against llama.cpp on SmolLM2's Q4_1 file: Q4_1 projections, a Q8_0
/// embedding and head).
const EXACT_TYPES: [GgmlType; 2] = [GgmlType::Q4_1, GgmlType::Q8_0];

/// Which of llama.cpp's runs to reproduce: they differ in one product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlamaCppRun {
    /// Decoding one token at a time (llama.cpp's generation; also any batch
    /// on a build with `-DGGML_LLAMAFILE=OFF`).
    #[default]
    OneToken,
    /// A batch of two tokens or more on the default build (llama-perplexity,
    /// prompt processing): llamafile's tiled product sums the
    /// attention-weighted values (and, with an f16 cache, the scores).
    Batched,
}

/// llama.cpp's KV cache type (`type_k` = `type_v`), without flash attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LlamaCppKv {
    /// f32 rows (llama-cpp-python's `type_k = type_v = 0`; the parity
    /// fixture's).
    #[default]
    F32,
    /// f16 rows, llama.cpp's default: keys and values rounded to f16 where
    /// stored, the query and the attention weights rounded to f16 before
    /// their products.
    F16,
}

/// Decodes tokens one at a time with llama.cpp's arithmetic (module docs).
#[derive(Debug)]
pub struct GgmlReference<'m> {
    model: &'m LlamaModel,
    run: LlamaCppRun,
    kv: LlamaCppKv,
    /// Per layer, per position: keys after RoPE, `[kv_heads * head_dim]`.
    keys: Vec<Vec<f32>>,
    /// Per layer, per position: values, `[kv_heads * head_dim]`.
    values: Vec<Vec<f32>>,
    pos: usize,
}

impl<'m> GgmlReference<'m> {
    /// Checks that the model is one this decoder reproduces: a Llama-family
    /// architecture with interleaved RoPE on whole heads of a multiple of 64
    /// dimensions, global attention, no soft-capping, and packed Q4_1 or
    /// Q8_0 weights (loaded with `WeightMode::Packed`, either numerics: the
    /// decoder always runs q8).
    pub fn new(model: &'m LlamaModel) -> Result<Self, ModelError> {
        let c = &model.config;
        let unsupported = |why: String| {
            ModelError::Unsupported(format!("the llama.cpp reference decoder: {why}"))
        };
        if c.arch != Arch::Llama || c.arch.activation() != Activation::Silu {
            return Err(unsupported(format!("architecture `{}`", c.architecture)));
        }
        if !ggml_ops::head_dim_supported(c.head_dim) {
            return Err(unsupported(format!(
                "head size {} (a multiple of 64)",
                c.head_dim
            )));
        }
        if c.rope_dim != c.head_dim || !c.rope_dim.is_multiple_of(2) {
            return Err(unsupported(format!(
                "RoPE on {} of {} dimensions",
                c.rope_dim, c.head_dim
            )));
        }
        if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(unsupported(format!(
                "{} heads over {} KV heads",
                c.n_heads, c.n_kv_heads
            )));
        }
        if c.layers.iter().any(|l| l.window.is_some()) || c.final_softcap.is_some() {
            return Err(unsupported("sliding windows or logit soft-capping".into()));
        }
        let exact = |p: &Projection, name: &str| match p {
            Projection::Packed(m, _) if EXACT_TYPES.contains(&m.ggml_type()) => Ok(()),
            Projection::Packed(m, _) => Err(unsupported(format!(
                "{name} is {:?} (reproduced: {EXACT_TYPES:?})",
                m.ggml_type()
            ))),
            Projection::Dense(_) => Err(unsupported(format!(
                "{name} is dequantised (load with packed weights)"
            ))),
        };
        for (i, b) in model.blocks.iter().enumerate() {
            for (p, name) in [
                (&b.wq, "attn_q"),
                (&b.wk, "attn_k"),
                (&b.wv, "attn_v"),
                (&b.wo, "attn_output"),
                (&b.w_gate, "ffn_gate"),
                (&b.w_up, "ffn_up"),
                (&b.w_down, "ffn_down"),
            ] {
                exact(p, &format!("blk.{i}.{name}"))?;
            }
        }
        exact(&model.output, "the output head")?;
        if !matches!(model.embed, Embedding::Packed(_)) {
            return Err(unsupported(
                "the embedding is dequantised (load with packed weights)".into(),
            ));
        }
        Ok(Self {
            model,
            run: LlamaCppRun::OneToken,
            kv: LlamaCppKv::F32,
            keys: vec![Vec::new(); c.n_layers],
            values: vec![Vec::new(); c.n_layers],
            pos: 0,
        })
    }

    /// Reproduces `run` instead of the one-token run.
    pub fn with_run(mut self, run: LlamaCppRun) -> Self {
        self.run = run;
        self
    }

    /// Reproduces llama.cpp with a cache of `kv` rows instead of f32.
    pub fn with_kv(mut self, kv: LlamaCppKv) -> Self {
        self.kv = kv;
        self
    }

    /// The model's context length: positions [`GgmlReference::step`] takes.
    pub fn context_length(&self) -> usize {
        self.model.config.context_length
    }

    /// Positions decoded so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Forgets every position (a new sequence).
    pub fn reset(&mut self) {
        self.keys.iter_mut().for_each(Vec::clear);
        self.values.iter_mut().for_each(Vec::clear);
        self.pos = 0;
    }

    /// Decodes `token` at the next position; returns its logits.
    ///
    /// # Shapes
    /// returns `[vocab]`
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        self.step_as(token, self.run)
    }

    /// [`GgmlReference::step`] with `run`'s arithmetic: the token and the
    /// position checked, the cache as it was if the step fails.
    fn step_as(&mut self, token: u32, run: LlamaCppRun) -> Result<Vec<f32>, ModelError> {
        let model = self.model;
        let c = &model.config;
        if token as usize >= c.vocab_size {
            return Err(ModelError::InvalidInput(format!(
                "token id {token} is outside the vocabulary ({})",
                c.vocab_size
            )));
        }
        if self.pos >= c.context_length {
            return Err(ModelError::InvalidInput(format!(
                "position {} is past the context length {}",
                self.pos, c.context_length
            )));
        }
        let result = self.advance(token, run);
        if result.is_err() {
            // a failed step leaves the cache as it was before it
            let kept = self.pos * c.n_kv_heads * c.head_dim;
            for rows in self.keys.iter_mut().chain(self.values.iter_mut()) {
                rows.truncate(kept);
            }
        }
        result
    }

    /// Feeds a prompt as llama.cpp evaluates one: in batches of `ubatch`
    /// tokens (its `n_ubatch`, 512 by default), a batch of two or more with
    /// [`LlamaCppRun::Batched`]'s arithmetic and a batch of one with
    /// [`LlamaCppRun::OneToken`]'s, whatever [`GgmlReference::with_run`] set
    /// (which still governs [`GgmlReference::step`]); returns the last
    /// token's logits. llama.cpp then decodes each generated token alone.
    ///
    /// # Shapes
    /// returns `[vocab]`
    pub fn prompt(&mut self, tokens: &[u32], ubatch: usize) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() || ubatch == 0 {
            return Err(ModelError::InvalidInput(format!(
                "a prompt of {} tokens in batches of {ubatch}",
                tokens.len()
            )));
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(ubatch) {
            let run = if chunk.len() >= 2 {
                LlamaCppRun::Batched
            } else {
                LlamaCppRun::OneToken
            };
            for &t in chunk {
                logits = self.step_as(t, run)?;
            }
        }
        Ok(logits)
    }

    /// [`GgmlReference::step`] after its checks, compiled with FMA where the
    /// CPU has it (`ggml_ops` inlines into it; the bits are the same either
    /// way, only the C library's `fmaf` is slower).
    fn advance(&mut self, token: u32, run: LlamaCppRun) -> Result<Vec<f32>, ModelError> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has FMA
            return unsafe { self.advance_fma(token, run) };
        }
        self.advance_body(token, run)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "fma")]
    unsafe fn advance_fma(&mut self, token: u32, run: LlamaCppRun) -> Result<Vec<f32>, ModelError> {
        self.advance_body(token, run)
    }

    #[inline(always)]
    fn advance_body(&mut self, token: u32, run: LlamaCppRun) -> Result<Vec<f32>, ModelError> {
        let model = self.model;
        let c = &model.config;
        let Embedding::Packed(table) = &model.embed else {
            return Err(ModelError::InvalidInput("a dequantised embedding".into()));
        };
        let eps = c.rms_eps as f32;
        let how = Self::attention(run, self.kv);
        let mut h = packed_rows(table, &[token], c.d_model);
        // this position's angles, once per RoPE base (one for Llama files)
        let mut rope: Option<(f32, Vec<(f32, f32)>)> = None;
        for (layer, b) in model.blocks.iter().enumerate() {
            let x = ggml_ops::rms_norm(&h, &b.attn_norm.host, eps);
            let [mut q, mut k, v] = products(&[&b.wq, &b.wk, &b.wv], &x)?;
            let base = c.layers[layer].rope_base as f32;
            if rope.as_ref().is_none_or(|(b, _)| *b != base) {
                rope = Some((base, ggml_ops::rope_table(c.rope_dim, self.pos, base)));
            }
            let angles = rope.as_ref().map_or(&[][..], |(_, t)| &t[..]);
            ggml_ops::rope_normal(&mut q, c.head_dim, angles);
            ggml_ops::rope_normal(&mut k, c.head_dim, angles);
            match self.kv {
                LlamaCppKv::F32 => {
                    self.keys[layer].extend_from_slice(&k);
                    self.values[layer].extend_from_slice(&v);
                }
                LlamaCppKv::F16 => {
                    let f16 = ggml_ops::f16_round;
                    self.keys[layer].extend(k.iter().map(|&x| f16(x)));
                    self.values[layer].extend(v.iter().map(|&x| f16(x)));
                }
            }
            let o = ggml_ops::attend(
                &q,
                &self.keys[layer],
                &self.values[layer],
                c.head_dim,
                c.n_kv_heads,
                how,
            );
            let [attn] = products(&[&b.wo], &o)?;
            for (a, x) in h.iter_mut().zip(attn) {
                *a += x;
            }
            let x = ggml_ops::rms_norm(&h, &b.ffn_norm.host, eps);
            let [mut g, u] = products(&[&b.w_gate, &b.w_up], &x)?;
            ggml_ops::swiglu(&mut g, &u);
            let [down] = products(&[&b.w_down], &g)?;
            for (a, x) in h.iter_mut().zip(down) {
                *a += x;
            }
        }
        let x = ggml_ops::rms_norm(&h, &model.norm.host, eps);
        let [logits] = products(&[&model.output], &x)?;
        if let Some(bad) = logits.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "a non-finite logit (token {bad}) at position {}",
                self.pos
            )));
        }
        self.pos += 1;
        Ok(logits)
    }
}

impl GgmlReference<'_> {
    /// The attention's arithmetic for this run and cache type: one token at
    /// a time, both products are `ggml_vec_dot_*`; in a batch, llamafile
    /// takes the values' product, and with an f16 cache the scores' too
    /// (ggml converts the query to f16 into a contiguous buffer first; with
    /// f32 the permuted query is not contiguous, and llamafile declines).
    fn attention(run: LlamaCppRun, kv: LlamaCppKv) -> ggml_ops::Attention {
        use ggml_ops::Order::{TinyBlas, VecDot};
        let f16 = kv == LlamaCppKv::F16;
        let (scores, values) = match (run, f16) {
            (LlamaCppRun::OneToken, _) => (VecDot, VecDot),
            (LlamaCppRun::Batched, false) => (VecDot, TinyBlas),
            (LlamaCppRun::Batched, true) => (TinyBlas, TinyBlas),
        };
        ggml_ops::Attention {
            scores,
            values,
            f16,
        }
    }
}

/// The packed products of one activation vector, in ggml's order.
fn products<const N: usize>(ps: &[&Projection; N], x: &[f32]) -> Result<[Vec<f32>; N], ModelError> {
    let ms: Vec<&QuantMatrix> = ps
        .iter()
        .map(|p| match p {
            Projection::Packed(m, _) => Ok(m),
            Projection::Dense(_) => {
                Err(ModelError::InvalidInput("a dequantised projection".into()))
            }
        })
        .collect::<Result<_, _>>()?;
    matmul_group_ggml_order(&ms, x)?
        .try_into()
        .map_err(|_| ModelError::InvalidInput(format!("{N} products")))
}
