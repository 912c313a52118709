//! One transformer block: attention through the cache, then a SwiGLU MLP.

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use dynakv_burn::{AttentionCache, Rope};

use super::config::LlamaConfig;
use super::weights::{linear, vector};
use crate::error::ModelError;
use crate::gguf::GgufFile;

/// Weights of one block, projections as `[in, out]`.
#[derive(Debug, Clone)]
pub struct Block {
    attn_norm: Tensor<1>,
    wq: Tensor<2>,
    wk: Tensor<2>,
    wv: Tensor<2>,
    wo: Tensor<2>,
    ffn_norm: Tensor<1>,
    w_gate: Tensor<2>,
    w_up: Tensor<2>,
    w_down: Tensor<2>,
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
        device: &Device,
    ) -> Result<Self, ModelError> {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let (d, kv) = (c.d_model, c.n_kv_heads * c.head_dim);
        let q = c.n_heads * c.head_dim;
        Ok(Self {
            attn_norm: vector(gguf, &n("attn_norm"), d, device)?,
            wq: linear(gguf, &n("attn_q"), d, q, device)?,
            wk: linear(gguf, &n("attn_k"), d, kv, device)?,
            wv: linear(gguf, &n("attn_v"), d, kv, device)?,
            wo: linear(gguf, &n("attn_output"), q, d, device)?,
            ffn_norm: vector(gguf, &n("ffn_norm"), d, device)?,
            w_gate: linear(gguf, &n("ffn_gate"), d, c.d_ff, device)?,
            w_up: linear(gguf, &n("ffn_up"), d, c.d_ff, device)?,
            w_down: linear(gguf, &n("ffn_down"), c.d_ff, d, device)?,
        })
    }

    /// The output projection `[H*D, d_model]`, for output-aware value bases.
    pub fn wo(&self) -> &Tensor<2> {
        &self.wo
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
        let x = rms_norm(h.clone(), &self.attn_norm, c.rms_eps);
        let heads = |y: Tensor<2>, n: usize| y.reshape([1, t, n, c.head_dim]).swap_dims(1, 2);
        let q = heads(x.clone().matmul(self.wq.clone()), c.n_heads);
        let k = heads(x.clone().matmul(self.wk.clone()), c.n_kv_heads);
        let v = heads(x.matmul(self.wv.clone()), c.n_kv_heads);
        let q = rope.apply(q, positions)?;
        let o = cache.forward(layer, q, k, v, positions)?;
        let o = o.swap_dims(1, 2).reshape([t, c.n_heads * c.head_dim]);
        let h = h + o.matmul(self.wo.clone());
        let x = rms_norm(h.clone(), &self.ffn_norm, c.rms_eps);
        let gate = silu(x.clone().matmul(self.w_gate.clone()));
        let up = x.matmul(self.w_up.clone());
        Ok(h + (gate * up).matmul(self.w_down.clone()))
    }
}
