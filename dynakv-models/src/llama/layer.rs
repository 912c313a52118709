//! One transformer block: attention through the cache, then a SwiGLU MLP.

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use dynakv_burn::{AttentionCache, Rope};

use super::config::LlamaConfig;
use super::weights::{vector, Projection, WeightMode};
use crate::error::ModelError;
use crate::gguf::GgufFile;

/// Weights of one block.
#[derive(Debug, Clone)]
pub struct Block {
    attn_norm: Tensor<1>,
    wq: Projection,
    wk: Projection,
    wv: Projection,
    wo: Projection,
    ffn_norm: Tensor<1>,
    w_gate: Projection,
    w_up: Projection,
    w_down: Projection,
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
        Ok(Self {
            attn_norm: vector(gguf, &n("attn_norm"), d, device)?,
            wq: p("attn_q", d, q)?,
            wk: p("attn_k", d, kv)?,
            wv: p("attn_v", d, kv)?,
            wo: p("attn_output", q, d)?,
            ffn_norm: vector(gguf, &n("ffn_norm"), d, device)?,
            w_gate: p("ffn_gate", d, c.d_ff)?,
            w_up: p("ffn_up", d, c.d_ff)?,
            w_down: p("ffn_down", c.d_ff, d)?,
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
            + (self.attn_norm.shape().num_elements() + self.ffn_norm.shape().num_elements()) * 4
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
        let [q, k, v]: [Tensor<2>; 3] =
            Projection::forward_group(&[&self.wq, &self.wk, &self.wv], x)?
                .try_into()
                .map_err(|_| ModelError::InvalidInput("q, k, v: three products".into()))?;
        let q = heads(q, c.n_heads);
        let k = heads(k, c.n_kv_heads);
        let v = heads(v, c.n_kv_heads);
        let q = rope.apply(q, positions)?;
        let o = cache.forward(layer, q, k, v, positions)?;
        let o = o.swap_dims(1, 2).reshape([t, c.n_heads * c.head_dim]);
        let h = h + self.wo.forward(o)?;
        let x = rms_norm(h.clone(), &self.ffn_norm, c.rms_eps);
        let [gate, up]: [Tensor<2>; 2] = Projection::forward_group(&[&self.w_gate, &self.w_up], x)?
            .try_into()
            .map_err(|_| ModelError::InvalidInput("gate, up: two products".into()))?;
        let gate = silu(gate);
        Ok(h + self.w_down.forward(gate * up)?)
    }
}
