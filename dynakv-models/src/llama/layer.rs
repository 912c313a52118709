//! One transformer block: attention through the cache, then a SwiGLU MLP.

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};
use dynakv_burn::{AttentionCache, Rope};

use super::config::LlamaConfig;
use super::weights::{vector, Projection, WeightMode};
use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::qmatmul::{matmul_group, Numerics, QuantMatrix};

/// Weights of one block.
#[derive(Debug, Clone)]
pub struct Block {
    attn_norm: Tensor<1>,
    /// The norm weights on the host too, for the one-token host path.
    attn_norm_host: Vec<f32>,
    ffn_norm_host: Vec<f32>,
    wq: Projection,
    wk: Projection,
    wv: Projection,
    wo: Projection,
    ffn_norm: Tensor<1>,
    w_gate: Projection,
    w_up: Projection,
    w_down: Projection,
}

/// RMSNorm of one vector on the host (the one-token path).
pub fn rms_norm_host(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len().max(1) as f64;
    let scale = (1.0 / (ms + eps).sqrt()) as f32;
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
        let host =
            |name: &str| -> Result<Vec<f32>, ModelError> { Ok(gguf.tensor_f32(&n(name))?.0) };
        Ok(Self {
            attn_norm: vector(gguf, &n("attn_norm"), d, device)?,
            attn_norm_host: host("attn_norm")?,
            ffn_norm_host: host("ffn_norm")?,
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
        let x = rms_norm_host(h, &self.attn_norm_host, c.rms_eps);
        let mut qkv = matmul_group(&[wq.0, wk.0, wv.0], &x, wq.1)?.into_iter();
        let (Some(mut q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) else {
            return Err(ModelError::InvalidInput("q, k, v: three products".into()));
        };
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
        for (a, b) in h.iter_mut().zip(wo.0.matmul(&o, wo.1)?) {
            *a += b;
        }
        let x = rms_norm_host(h, &self.ffn_norm_host, c.rms_eps);
        let mut gu = matmul_group(&[wg.0, wu.0], &x, wg.1)?.into_iter();
        let (Some(g), Some(u)) = (gu.next(), gu.next()) else {
            return Err(ModelError::InvalidInput("gate, up: two products".into()));
        };
        let a: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        for (h, d) in h.iter_mut().zip(wd.0.matmul(&a, wd.1)?) {
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
