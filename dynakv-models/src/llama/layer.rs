//! One transformer block: attention through the cache, then a gated MLP
//! (SwiGLU; Gemma 3: GeGLU, with QK-norm and norms after attention and MLP).

use burn::tensor::{Device, Tensor, TensorData};
use dynakv_burn::{AttentionCache, Rope};

use super::config::LlamaConfig;
use super::gate::gated_in_place;
use super::weights::{vector_host, Projection, WeightMode};
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::qmatmul::{matmul_group, Numerics, QuantMatrix};

/// An RMSNorm's weights, as a tensor and on the host (the one-token path).
#[derive(Debug, Clone)]
pub(super) struct Norm {
    weights: Tensor<1>,
    pub(super) host: Vec<f32>,
}

impl Norm {
    pub(super) fn load(
        gguf: &GgufFile,
        name: &str,
        n: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let host = vector_host(gguf, name, n)?;
        let weights = Tensor::from_data(TensorData::new(host.clone(), [n]), device);
        Ok(Self { weights, host })
    }

    /// # Shapes
    /// - `x`: `[T, d]`; returns `[T, d]`
    pub(super) fn apply(&self, x: Tensor<2>, eps: f64) -> Tensor<2> {
        rms_norm(x, &self.weights, eps)
    }

    /// One vector on the host.
    pub(super) fn apply_host(&self, x: &[f32], eps: f64) -> Vec<f32> {
        rms_norm_host(x, &self.host, eps)
    }

    /// Each `d`-wide row of `x` normalised in place (one row: the whole
    /// vector; several: QK-norm's heads).
    fn apply_rows_host(&self, x: &mut [f32], eps: f64) {
        for row in x.chunks_exact_mut(self.host.len()) {
            let scale = rms_scale(row, eps);
            for (v, &g) in row.iter_mut().zip(&self.host) {
                *v = *v * scale * g;
            }
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.host.len() * 4
    }
}

/// Weights of one block.
#[derive(Debug, Clone)]
pub struct Block {
    pub(super) attn_norm: Norm,
    pub(super) wq: Projection,
    pub(super) wk: Projection,
    pub(super) wv: Projection,
    /// Per-head RMSNorm of queries and keys before RoPE (Gemma 3).
    pub(super) q_norm: Option<Norm>,
    pub(super) k_norm: Option<Norm>,
    pub(super) wo: Projection,
    /// RMSNorm of the attention output before the residual add (Gemma 3).
    pub(super) post_attn_norm: Option<Norm>,
    pub(super) ffn_norm: Norm,
    pub(super) w_gate: Projection,
    pub(super) w_up: Projection,
    pub(super) w_down: Projection,
    /// RMSNorm of the MLP output before the residual add (Gemma 3).
    pub(super) post_ffn_norm: Option<Norm>,
}

/// `1 / sqrt(mean(x^2) + eps)`, summed in f64.
fn rms_scale(x: &[f32], eps: f64) -> f32 {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64;
    (1.0 / (ms + eps).sqrt()) as f32
}

/// RMSNorm of one vector on the host (the one-token path).
pub fn rms_norm_host(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let scale = rms_scale(x, eps);
    x.iter().zip(w).map(|(&v, &g)| v * scale * g).collect()
}

/// RMSNorm: `x / sqrt(mean(x^2) + eps) * w`.
///
/// # Shapes
/// - `x`: `[T, d]`, `w`: `[d]`; returns `[T, d]`
pub fn rms_norm(x: Tensor<2>, w: &Tensor<1>, eps: f64) -> Tensor<2> {
    let ms = x.clone().powf_scalar(2.0).mean_dim(1);
    x * (ms + eps).sqrt().recip() * w.clone().unsqueeze::<2>()
}

impl Block {
    pub fn load(
        gguf: &GgufFile,
        i: usize,
        c: &LlamaConfig,
        mode: WeightMode,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let (d, kv) = (c.d_model, c.n_kv_heads * c.head_dim);
        let q = c.n_heads * c.head_dim;
        let p = |name: &str, d_in: usize, d_out: usize| {
            Projection::load(gguf, &n(name), d_in, d_out, mode, device)
        };
        let norm = |name: &str, len: usize| Norm::load(gguf, &n(name), len, device);
        let optional = |on: bool, name: &str, len: usize| on.then(|| norm(name, len)).transpose();
        let a = c.arch;
        Ok(Self {
            attn_norm: norm("attn_norm", d)?,
            wq: p("attn_q", d, q)?,
            wk: p("attn_k", d, kv)?,
            wv: p("attn_v", d, kv)?,
            q_norm: optional(a.qk_norm(), "attn_q_norm", c.head_dim)?,
            k_norm: optional(a.qk_norm(), "attn_k_norm", c.head_dim)?,
            wo: p("attn_output", q, d)?,
            post_attn_norm: optional(a.post_norms(), "post_attention_norm", d)?,
            ffn_norm: norm("ffn_norm", d)?,
            w_gate: p("ffn_gate", d, c.d_ff)?,
            w_up: p("ffn_up", d, c.d_ff)?,
            w_down: p("ffn_down", c.d_ff, d)?,
            post_ffn_norm: optional(a.post_norms(), "post_ffw_norm", d)?,
        })
    }

    /// The output projection as a dense `[H*D, d_model]` tensor, for
    /// output-aware value bases (dequantised when the weights are packed).
    pub fn wo(&self, device: &Device) -> Tensor<2> {
        self.wo.dense(device)
    }

    /// Bytes of this block's weights in memory.
    pub fn bytes(&self) -> usize {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
        .iter()
        .map(|p| p.bytes())
        .sum::<usize>()
            + [
                Some(&self.attn_norm),
                Some(&self.ffn_norm),
                self.q_norm.as_ref(),
                self.k_norm.as_ref(),
                self.post_attn_norm.as_ref(),
                self.post_ffn_norm.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(Norm::bytes)
            .sum::<usize>()
    }

    /// The projections as packed matrices with their numerics, when every
    /// one is packed (the one-token host path needs them all).
    fn packed(&self) -> Option<[(&QuantMatrix, Numerics); 7]> {
        fn p(w: &Projection) -> Option<(&QuantMatrix, Numerics)> {
            match w {
                Projection::Packed(m, n) => Some((m, *n)),
                Projection::Dense(_) => None,
            }
        }
        Some([
            p(&self.wq)?,
            p(&self.wk)?,
            p(&self.wv)?,
            p(&self.wo)?,
            p(&self.w_gate)?,
            p(&self.w_up)?,
            p(&self.w_down)?,
        ])
    }

    /// One token through the block on host vectors: the packed products,
    /// the norms, RoPE and SwiGLU without a tensor each, the cache through
    /// its tensor interface (three tensors in, one out).
    ///
    /// Why: a decode step ran about 40 burn operations per layer on tensors
    /// of one token, each with its dispatch and allocation (docs/results.md,
    /// "Quantised weights on the CPU"). Numbers equal [`Block::forward`]'s up
    /// to summation order (the step-by-step decode test holds both to 1e-4).
    ///
    /// # Shapes
    /// - `h`: `[d_model]`, updated in place
    pub fn forward_host(
        &self,
        layer: usize,
        h: &mut [f32],
        pos: usize,
        c: &LlamaConfig,
        rope: &Rope,
        cache: &mut dyn AttentionCache,
    ) -> Result<(), ModelError> {
        // the model's device: its RoPE tables and caches live there
        let device = &rope.device();
        let [wq, wk, wv, wo, wg, wu, wd] = self
            .packed()
            .ok_or_else(|| ModelError::InvalidInput("the host path needs packed weights".into()))?;
        let x = self.attn_norm.apply_host(h, c.rms_eps);
        let mut qkv = matmul_group(&[wq.0, wk.0, wv.0], &x, wq.1)?.into_iter();
        let (Some(mut q), Some(mut k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(ModelError::InvalidInput("q, k, v: three products".into()));
        };
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            qn.apply_rows_host(&mut q, c.rms_eps);
            kn.apply_rows_host(&mut k, c.rms_eps);
        }
        rope.rotate_host(&mut q, pos)?;
        let dh = c.head_dim;
        let t = |data: Vec<f32>, heads: usize| {
            Tensor::<4>::from_data(TensorData::new(data, [1, heads, 1, dh]), device)
        };
        let o = cache.forward(
            layer,
            t(q, c.n_heads),
            t(k, c.n_kv_heads),
            t(v, c.n_kv_heads),
            &[pos],
        )?;
        let o = o.into_data().try_into_vec::<f32>()?;
        let mut attn = wo.0.matmul(&o, wo.1)?;
        if let Some(n) = &self.post_attn_norm {
            n.apply_rows_host(&mut attn, c.rms_eps);
        }
        for (a, b) in h.iter_mut().zip(attn) {
            *a += b;
        }
        let x = self.ffn_norm.apply_host(h, c.rms_eps);
        let mut gu = matmul_group(&[wg.0, wu.0], &x, wg.1)?.into_iter();
        let (Some(g), Some(u)) = (gu.next(), gu.next()) else {
            return Err(ModelError::InvalidInput("gate, up: two products".into()));
        };
        let mut a = g;
        gated_in_place(c.arch.activation(), &mut a, &u);
        let mut down = wd.0.matmul(&a, wd.1)?;
        if let Some(n) = &self.post_ffn_norm {
            n.apply_rows_host(&mut down, c.rms_eps);
        }
        for (h, d) in h.iter_mut().zip(down) {
            *h += d;
        }
        Ok(())
    }

    /// Runs the block on the hidden states of new tokens.
    ///
    /// # Shapes
    /// - `h`: `[T, d_model]`; `positions.len() == T`; returns `[T, d_model]`
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        h: Tensor<2>,
        positions: &[usize],
        c: &LlamaConfig,
        rope: &Rope,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor<2>, ModelError> {
        let t = h.dims()[0];
        let x = self.attn_norm.apply(h.clone(), c.rms_eps);
        let heads = |y: Tensor<2>, n: usize| y.reshape([1, t, n, c.head_dim]).swap_dims(1, 2);
        let [q, k, v]: [Tensor<2>; 3] =
            Projection::forward_group(&[&self.wq, &self.wk, &self.wv], x)?
                .try_into()
                .map_err(|_| ModelError::InvalidInput("q, k, v: three products".into()))?;
        // QK-norm: RMSNorm of each head's `head_dim` values
        let per_head = |y: Tensor<2>, n: usize, norm: &Norm| {
            norm.apply(y.reshape([t * n, c.head_dim]), c.rms_eps)
                .reshape([t, n * c.head_dim])
        };
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (per_head(q, c.n_heads, qn), per_head(k, c.n_kv_heads, kn)),
            _ => (q, k),
        };
        let q = heads(q, c.n_heads);
        let k = heads(k, c.n_kv_heads);
        let v = heads(v, c.n_kv_heads);
        let q = rope.apply(q, positions)?;
        let o = cache.forward(layer, q, k, v, positions)?;
        let o = o.swap_dims(1, 2).reshape([t, c.n_heads * c.head_dim]);
        let mut attn = self.wo.forward(o)?;
        if let Some(n) = &self.post_attn_norm {
            attn = n.apply(attn, c.rms_eps);
        }
        let h = h + attn;
        let x = self.ffn_norm.apply(h.clone(), c.rms_eps);
        let [gate, up]: [Tensor<2>; 2] = Projection::forward_group(&[&self.w_gate, &self.w_up], x)?
            .try_into()
            .map_err(|_| ModelError::InvalidInput("gate, up: two products".into()))?;
        let act = c.arch.activation();
        let gated = if self.packed().is_some() && !gate.device().is_autodiff() {
            // CPU weights: one vectorised pass on the host (`gate.rs`)
            let shape = gate.dims();
            let mut g = gate.into_data().try_into_vec::<f32>()?;
            let u = up.into_data().try_into_vec::<f32>()?;
            gated_in_place(act, &mut g, &u);
            Tensor::from_data(TensorData::new(g, shape), &h.device())
        } else {
            act.apply_tensor(gate) * up
        };
        let mut down = self.w_down.forward(gated)?;
        if let Some(n) = &self.post_ffn_norm {
            down = n.apply(down, c.rms_eps);
        }
        Ok(h + down)
    }
}
