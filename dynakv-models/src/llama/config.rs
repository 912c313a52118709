//! Hyperparameters of a Llama-family model, all read from GGUF metadata.

use dynakv_burn::RopeStyle;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// Everything the forward pass needs to know about the architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Dimensions of each head that RoPE rotates.
    pub rope_dim: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub context_length: usize,
    pub vocab_size: usize,
}

/// Largest declared context accepted: RoPE tables are sized by it.
const MAX_CONTEXT: usize = 1 << 20;

/// Architectures whose GGUF layout this forward pass implements.
const SUPPORTED: &[&str] = &["llama", "mistral"];

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let arch = gguf.meta_str("general.architecture")?.to_string();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "general.architecture = `{arch}` (supported: {SUPPORTED:?})"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = gguf.meta_u64(&key("block_count"))? as usize;
        let d_model = gguf.meta_u64(&key("embedding_length"))? as usize;
        let d_ff = gguf.meta_u64(&key("feed_forward_length"))? as usize;
        let n_heads = gguf.meta_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = match gguf.meta(&key("attention.head_count_kv")) {
            Some(_) => gguf.meta_u64(&key("attention.head_count_kv"))? as usize,
            None => n_heads,
        };
        if n_heads == 0
            || n_kv_heads == 0
            || !d_model.is_multiple_of(n_heads)
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(ModelError::Unsupported(format!(
                "heads: {n_heads} query, {n_kv_heads} KV, d_model {d_model}"
            )));
        }
        let head_dim = d_model / n_heads;
        let rope_dim = match gguf.meta(&key("rope.dimension_count")) {
            Some(_) => gguf.meta_u64(&key("rope.dimension_count"))? as usize,
            None => head_dim,
        };
        let rope_base = match gguf.meta(&key("rope.freq_base")) {
            Some(_) => gguf.meta_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        let rms_eps = gguf.meta_f64(&key("attention.layer_norm_rms_epsilon"))?;
        let context_length = gguf.meta_u64(&key("context_length"))? as usize;
        let embd = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        if embd.dims.len() != 2 || embd.dims[0] as usize != d_model {
            return Err(ModelError::TensorShape {
                name: "token_embd.weight".into(),
                got: embd.dims.clone(),
                expected: vec![d_model as u64, 0],
            });
        }
        let vocab_size = embd.dims[1] as usize;
        if n_layers == 0 || n_layers > 1024 || context_length == 0 {
            return Err(ModelError::Unsupported(format!(
                "block_count {n_layers}, context_length {context_length}"
            )));
        }
        if context_length > MAX_CONTEXT {
            return Err(ModelError::Unsupported(format!(
                "{arch}.context_length = {context_length} (at most {MAX_CONTEXT})"
            )));
        }
        // the tensors must agree with block_count: every block present, none beyond
        for l in [n_layers - 1, n_layers] {
            let name = format!("blk.{l}.attn_q.weight");
            if gguf.tensor(&name).is_some() != (l < n_layers) {
                return Err(ModelError::Unsupported(format!(
                    "{arch}.block_count = {n_layers}, but tensor `{name}` is {}",
                    if l < n_layers { "missing" } else { "present" }
                )));
            }
        }
        // llama-architecture weights rotate the whole head (llama.cpp refuses
        // any other n_rot for them): a partial count would run, and be wrong
        if rope_dim != head_dim {
            return Err(ModelError::Unsupported(format!(
                "{arch}.rope.dimension_count = {rope_dim}: a llama-architecture model rotates the whole head, {head_dim}"
            )));
        }
        // head sizes other than d_model / n_heads are another architecture
        for k in ["attention.key_length", "attention.value_length"] {
            if gguf.meta(&key(k)).is_some() {
                let v = gguf.meta_u64(&key(k))?;
                if v != head_dim as u64 {
                    return Err(ModelError::Unsupported(format!(
                        "{arch}.{k} = {v}: expected d_model / head_count = {head_dim}"
                    )));
                }
            }
        }
        if !(rope_base.is_finite() && rope_base > 1.0) {
            return Err(ModelError::Unsupported(format!(
                "{arch}.rope.freq_base = {rope_base}: expected a finite base above 1"
            )));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(ModelError::Unsupported(format!(
                "{arch}.attention.layer_norm_rms_epsilon = {rms_eps}: expected a finite value in (0, 1)"
            )));
        }
        Ok(Self {
            architecture: arch,
            n_layers,
            d_model,
            d_ff,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_base,
            rms_eps,
            context_length,
            vocab_size,
        })
    }

    /// How this architecture's GGUF weights pair coordinates for RoPE:
    /// llama.cpp's converter permutes W_q and W_k of llama-family models
    /// into interleaved pairs.
    pub fn rope_style(&self) -> RopeStyle {
        RopeStyle::Interleaved
    }

    /// The cache geometry this model needs.
    pub fn geometry(&self) -> dynakv_burn::CacheGeometry {
        dynakv_burn::CacheGeometry {
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            rope_style: self.rope_style(),
        }
    }
}
