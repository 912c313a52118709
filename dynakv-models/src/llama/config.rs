//! Hyperparameters of a model, all read from GGUF metadata (what differs
//! between architectures: [`super::arch`]).

use dynakv_burn::RopeStyle;
use serde::{Deserialize, Serialize};

use super::arch::Arch;
use crate::error::ModelError;
use crate::gguf::GgufFile;

/// How one layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerConfig {
    /// A sliding window of this many positions (a local layer), or `None`.
    pub window: Option<usize>,
    pub rope_base: f64,
}

/// Everything the forward pass needs to know about the architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `general.architecture` as written in the file.
    pub architecture: String,
    /// What it runs as.
    pub arch: Arch,
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
    /// Per layer: window and RoPE base (`rope_base` on every layer of a
    /// model without local layers).
    pub layers: Vec<LayerConfig>,
    /// Final logit soft-capping, `c * tanh(logits / c)`, when the file sets it.
    pub final_softcap: Option<f64>,
}

/// Largest declared context accepted.
const MAX_CONTEXT: usize = 1 << 20;

impl LlamaConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let architecture = gguf.meta_str("general.architecture")?.to_string();
        let Some(kind) = Arch::from_name(&architecture) else {
            let names: Vec<&str> = Arch::NAMES.iter().map(|(n, _)| *n).collect();
            return Err(ModelError::Unsupported(format!(
                "general.architecture = `{architecture}` (supported: {names:?})"
            )));
        };
        let arch = architecture.clone();
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = gguf.meta_u64(&key("block_count"))? as usize;
        let d_model = gguf.meta_u64(&key("embedding_length"))? as usize;
        let d_ff = gguf.meta_u64(&key("feed_forward_length"))? as usize;
        let n_heads = gguf.meta_u64(&key("attention.head_count"))? as usize;
        let n_kv_heads = match gguf.meta(&key("attention.head_count_kv")) {
            Some(_) => gguf.meta_u64(&key("attention.head_count_kv"))? as usize,
            None => n_heads,
        };
        let by_heads = kind.head_size_from_key_length();
        if n_heads == 0
            || n_kv_heads == 0
            || (!by_heads && !d_model.is_multiple_of(n_heads))
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(ModelError::Unsupported(format!(
                "heads: {n_heads} query, {n_kv_heads} KV, d_model {d_model}"
            )));
        }
        let head_dim = match (by_heads, gguf.meta(&key("attention.key_length"))) {
            (true, Some(_)) => gguf.meta_u64(&key("attention.key_length"))? as usize,
            _ => d_model / n_heads,
        };
        if head_dim == 0 || head_dim > 4096 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::Unsupported(format!(
                "{arch}.attention.key_length = {head_dim}: expected an even head size up to 4096"
            )));
        }
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
        // llama and gemma3 weights rotate the whole head (llama.cpp refuses
        // any other n_rot for them): a partial count would run, and be wrong
        if rope_dim != head_dim {
            return Err(ModelError::Unsupported(format!(
                "{arch}.rope.dimension_count = {rope_dim}: a {arch} model rotates the whole head, {head_dim}"
            )));
        }
        // keys and values of one size (the caches' geometry), which is the
        // head size; for llama, d_model / n_heads
        for k in ["attention.key_length", "attention.value_length"] {
            if gguf.meta(&key(k)).is_some() {
                let v = gguf.meta_u64(&key(k))?;
                if v != head_dim as u64 {
                    let expected = if by_heads {
                        "attention.key_length"
                    } else {
                        "d_model / head_count"
                    };
                    return Err(ModelError::Unsupported(format!(
                        "{arch}.{k} = {v}: expected {expected} = {head_dim}"
                    )));
                }
            }
        }
        let layers = layer_configs(gguf, kind, &arch, n_layers, rope_base)?;
        let final_softcap = match gguf.meta(&key("final_logit_softcapping")) {
            Some(_) => {
                let c = gguf.meta_f64(&key("final_logit_softcapping"))?;
                if !(c.is_finite() && c >= 0.0) {
                    return Err(ModelError::Unsupported(format!(
                        "{arch}.final_logit_softcapping = {c}: expected a finite value >= 0"
                    )));
                }
                (c > 0.0).then_some(c)
            }
            None => None,
        };
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
            architecture,
            arch: kind,
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
            layers,
            final_softcap,
        })
    }

    /// How this architecture's GGUF weights pair coordinates for RoPE.
    pub fn rope_style(&self) -> RopeStyle {
        self.arch.rope_style()
    }

    /// Whether some layers have a sliding window.
    pub fn has_windows(&self) -> bool {
        self.layers.iter().any(|l| l.window.is_some())
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

/// Every layer's window and RoPE base.
///
/// Gemma 3 (as llama.cpp reads it): `attention.sliding_window` > 0 makes
/// layers local by `attention.sliding_window_pattern` (a period `n`: layer
/// `l` is local unless `l % n == n - 1`; default 6; or one boolean per
/// layer), local layers at base `rope.freq_base_swa` (default 10,000),
/// global ones at `rope.freq_base`.
fn layer_configs(
    gguf: &GgufFile,
    kind: Arch,
    arch: &str,
    n_layers: usize,
    rope_base: f64,
) -> Result<Vec<LayerConfig>, ModelError> {
    let global = LayerConfig {
        window: None,
        rope_base,
    };
    let key = |k: &str| format!("{arch}.{k}");
    let window = match (kind, gguf.meta(&key("attention.sliding_window"))) {
        (Arch::Gemma3, Some(_)) => gguf.meta_u64(&key("attention.sliding_window"))? as usize,
        _ => 0,
    };
    if window == 0 {
        return Ok(vec![global; n_layers]);
    }
    let pattern_key = key("attention.sliding_window_pattern");
    let local: Vec<bool> = match gguf.meta(&pattern_key) {
        Some(v) => match v.as_array() {
            Some(a) => {
                let flags: Option<Vec<bool>> = a.iter().map(|x| x.as_bool()).collect();
                match flags {
                    Some(f) if f.len() == n_layers => f,
                    _ => {
                        return Err(ModelError::Unsupported(format!(
                            "{pattern_key}: expected {n_layers} booleans"
                        )))
                    }
                }
            }
            None => {
                let n = gguf.meta_u64(&pattern_key)? as usize;
                (0..n_layers).map(|l| n == 0 || l % n < n - 1).collect()
            }
        },
        None => (0..n_layers).map(|l| l % 6 < 5).collect(),
    };
    let swa_base = match gguf.meta(&key("rope.freq_base_swa")) {
        Some(_) => gguf.meta_f64(&key("rope.freq_base_swa"))?,
        None => 10_000.0,
    };
    if !(swa_base.is_finite() && swa_base > 1.0) {
        return Err(ModelError::Unsupported(format!(
            "{arch}.rope.freq_base_swa = {swa_base}: expected a finite base above 1"
        )));
    }
    if local.iter().all(|&l| l) {
        return Err(ModelError::Unsupported(format!(
            "{pattern_key}: every layer is local; a model needs a global layer here"
        )));
    }
    Ok(local
        .into_iter()
        .map(|is_local| match is_local {
            true => LayerConfig {
                window: Some(window),
                rope_base: swa_base,
            },
            false => global,
        })
        .collect())
}
