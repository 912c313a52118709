//! `dynakv generate`

use std::io::Write;

use anyhow::Result;
use clap::Args;
use dynakv_models::generate::{generate, SamplingConfig};
use dynakv_models::tokenizer::chat_prompt;

use super::common::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
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
    let mut cache = loaded.model.dense_cache()?;
    let t0 = std::time::Instant::now();
    let mut stdout = std::io::stdout();
    let g = generate(&loaded.model, &loaded.tokenizer, &mut cache, &prompt, &config, |s| {
        let _ = stdout.write_all(s.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    eprintln!(
        "[{} prompt tokens, {} generated in {:.2}s{}]",
        g.prompt_tokens,
        g.tokens.len(),
        t0.elapsed().as_secs_f64(),
        if g.stopped_by_stop_token { ", stop token" } else { "" }
    );
    Ok(())
}
