//! `dynakv generate`

use std::io::Write;

use anyhow::Result;
use clap::Args;
use dynakv_models::generate::{generate, SamplingConfig};
use dynakv_models::tokenizer::chat_prompt;

use super::cache_args::CacheArgs;
use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat format as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the chat template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let text = if a.chat {
        let system = a.system.clone().or(loaded.default_system.clone());
        let mut msgs = Vec::new();
        if let Some(s) = &system {
            msgs.push(("system", s.as_str()));
        }
        msgs.push(("user", a.prompt.as_str()));
        chat_prompt(&msgs)
    } else {
        a.prompt.clone()
    };
    let prompt = loaded.tokenizer.encode(&text)?;
    let config = SamplingConfig {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_tokens: a.max_tokens,
    };
    let mut cache = a.cache.maker(&loaded)?.make(&loaded)?;
    let t0 = std::time::Instant::now();
    let mut stdout = std::io::stdout();
    let g = generate(
        &loaded.model,
        &loaded.tokenizer,
        cache.as_mut(),
        &prompt,
        &config,
        |s| {
            let _ = stdout.write_all(s.as_bytes());
            let _ = stdout.flush();
        },
    )?;
    println!();
    let f = cache.footprint();
    eprintln!(
        "[{}: {} prompt tokens, {} generated in {:.2}s{}; cache retained {:.3}, {:.2} MB]",
        a.cache.label(),
        g.prompt_tokens,
        g.tokens.len(),
        t0.elapsed().as_secs_f64(),
        if g.stopped_by_stop_token {
            ", stop token"
        } else {
            ""
        },
        f.retained(),
        f.bytes() as f64 / 1e6
    );
    Ok(())
}
