//! Text generation: greedy or temperature / top-p sampling with a seed, stop
//! tokens, and text streamed as it is produced.

use burn::tensor::Tensor;
use dynakv_burn::AttentionCache;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::llama::{GgmlReference, LlamaModel};
use crate::tokenizer::TextTokenizer;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 128,
        }
    }
}

impl SamplingConfig {
    /// Names the bad field.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Chooses one token from logits.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    /// Picks a token id from `[vocab]` logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let t = self.config.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let z: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0;
        let mut mass = 0.0;
        for p in &probs {
            kept += 1;
            mass += p.1;
            if mass >= self.config.top_p {
                break;
            }
        }
        let probs = &probs[..kept];
        let mut r = self.rng.random::<f32>() * mass;
        for p in probs {
            r -= p.1;
            if r <= 0.0 {
                return p.0;
            }
        }
        probs[kept - 1].0
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// What a generation produced.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub stopped_by_stop_token: bool,
}

/// Generates from a prompt, calling `on_text` with each new piece of text.
pub fn generate(
    model: &LlamaModel,
    tokenizer: &TextTokenizer,
    cache: &mut dyn AttentionCache,
    prompt: &[u32],
    config: &SamplingConfig,
    on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    generate_parts(model, tokenizer, cache, &[prompt], config, on_text)
}

/// Generates from a prompt fed in parts, one forward pass each.
///
/// A cache that compresses at the end of its prefill (SnapKV) compresses
/// after the first part: a context fed alone is compressed without seeing the
/// question that follows (query-agnostic); one part holding both is
/// query-aware.
pub fn generate_parts(
    model: &LlamaModel,
    tokenizer: &TextTokenizer,
    cache: &mut dyn AttentionCache,
    parts: &[&[u32]],
    config: &SamplingConfig,
    on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    let mut sampler = Sampler::new(config.clone())?;
    let parts: Vec<&[u32]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(ModelError::InvalidInput("empty prompt".into()));
    }
    cache.reset();
    let prompt_len: usize = parts.iter().map(|p| p.len()).sum();
    let _span = tracing::info_span!("generate", prompt = prompt_len).entered();
    let mut pos = 0;
    let mut last = None;
    for part in &parts {
        last = Some(model.forward_last(part, pos, cache)?);
        pos += part.len();
    }
    let last = last.ok_or_else(|| ModelError::InvalidInput("empty prompt".into()))?;
    let room = model.config.context_length.saturating_sub(pos);
    continue_from(
        to_vec(last)?,
        prompt_len,
        room,
        tokenizer,
        &mut sampler,
        config,
        on_text,
        |next| {
            let logits = to_vec(model.forward_last(&[next], pos, cache)?)?;
            pos += 1;
            Ok(logits)
        },
    )
}

/// Generates as llama.cpp does on the quantised file, to the bit: the
/// prompt through the llama.cpp reference decoder in batches of `ubatch`
/// tokens ([`GgmlReference::prompt`]), each new token decoded alone. With
/// greedy sampling (temperature 0) the tokens are llama.cpp's greedy
/// continuation (the same model, cache type, no flash attention); its own
/// samplers draw differently at other temperatures.
pub fn generate_llama_cpp(
    reference: &mut GgmlReference<'_>,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    ubatch: usize,
    config: &SamplingConfig,
    on_text: impl FnMut(&str),
) -> Result<Generation, ModelError> {
    let mut sampler = Sampler::new(config.clone())?;
    reference.reset();
    let logits = reference.prompt(prompt, ubatch)?;
    let room = reference
        .context_length()
        .saturating_sub(reference.position());
    continue_from(
        logits,
        prompt.len(),
        room,
        tokenizer,
        &mut sampler,
        config,
        on_text,
        |next| reference.step(next),
    )
}

/// The decode loop after a prompt: samples from `logits`, stops at a stop
/// token, `config.max_tokens` or `room` new positions, streams the text
/// (an incomplete UTF-8 sequence held back until its last byte arrives),
/// and gets each next token's logits from `step`.
#[allow(clippy::too_many_arguments)]
fn continue_from(
    mut logits: Vec<f32>,
    prompt_tokens: usize,
    room: usize,
    tokenizer: &TextTokenizer,
    sampler: &mut Sampler,
    config: &SamplingConfig,
    mut on_text: impl FnMut(&str),
    mut step: impl FnMut(u32) -> Result<Vec<f32>, ModelError>,
) -> Result<Generation, ModelError> {
    let mut out = Vec::new();
    let mut emitted = 0usize;
    let mut stopped = false;
    while out.len() < config.max_tokens && out.len() < room {
        let next = sampler.sample(&logits);
        if tokenizer.stop_ids.contains(&next) {
            stopped = true;
            break;
        }
        out.push(next);
        let text = tokenizer.decode(&out)?;
        if !text.ends_with('\u{FFFD}') && text.len() > emitted {
            on_text(&text[emitted..]);
            emitted = text.len();
        }
        logits = step(next)?;
    }
    let text = tokenizer.decode(&out)?;
    if text.len() > emitted {
        on_text(&text[emitted..]);
    }
    Ok(Generation {
        prompt_tokens,
        tokens: out,
        text,
        stopped_by_stop_token: stopped,
    })
}

fn to_vec(t: Tensor<1>) -> Result<Vec<f32>, ModelError> {
    t.into_data()
        .try_into_vec_as::<f32>()
        .map_err(ModelError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(SamplingConfig::default()).unwrap();
        assert_eq!(s.sample(&logits), 1);
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
            max_tokens: 1,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone()).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg).unwrap();
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 2 || t == 0));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 1,
            max_tokens: 1,
        };
        let mut s = Sampler::new(cfg).unwrap();
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 3.0, 1.0]), 1);
        }
    }

    #[test]
    fn bad_configs_are_named() {
        let bad = SamplingConfig {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(Sampler::new(bad)
            .err()
            .unwrap()
            .to_string()
            .contains("top_p"));
        let bad = SamplingConfig {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(Sampler::new(bad)
            .err()
            .unwrap()
            .to_string()
            .contains("temperature"));
    }
}
