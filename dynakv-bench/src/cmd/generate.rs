//! `dynakv generate`

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use dynakv_bench::text::prompt_parts;
use dynakv_models::generate::{generate_llama_cpp, generate_parts, Generation, SamplingConfig};
use dynakv_models::llama::GgmlReference;
use dynakv_models::qmatmul::Numerics;
use dynakv_models::tokenizer::chat_prompt;

use super::cache_args::CacheArgs;
use super::common::ModelArgs;
use super::values;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The prompt text (the question, when --context is given).
    #[arg(long)]
    pub prompt: String,
    /// A document placed before the prompt. By default it is prefilled alone,
    /// so a cache that compresses at the end of prefill (SnapKV) does so
    /// without seeing the question (query-agnostic).
    #[arg(long)]
    pub context: Option<std::path::PathBuf>,
    /// Prefill context and question together: SnapKV's window sees the question.
    #[arg(long, requires = "context")]
    pub query_aware: bool,
    /// Wrap the prompt in the model's chat format as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the chat template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(value_parser = values::at_least_one, long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(value_parser = values::non_negative_f32, long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(value_parser = values::fraction_f32, long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generate with llama.cpp's arithmetic instead of the engine: the
    /// reference decoder takes the prompt in batches of 512 tokens (llama.cpp's
    /// default `n_ubatch`) and each new token alone, as llama.cpp does, so
    /// greedy decoding gives llama.cpp's tokens (its samplers draw
    /// differently at other temperatures). Needs `--matmul q8`; the cache is
    /// llama.cpp's f16 (default) or, with `--kv-dtype f32`, f32, without
    /// flash attention; Llama-family files with Q4_1 / Q8_0 weights.
    #[arg(long)]
    pub llama_cpp: bool,
}

/// llama.cpp's default `n_ubatch`: the batches a prompt is evaluated in.
const LLAMA_CPP_UBATCH: usize = 512;

pub fn run(a: GenerateArgs) -> Result<()> {
    a.cache.check()?;
    let llama_cpp_kv = if a.llama_cpp {
        if a.model.matmul != Numerics::Q8 {
            bail!("--llama-cpp reproduces llama.cpp's quantised products: give --matmul q8");
        }
        Some(a.cache.llama_cpp_kv()?)
    } else {
        None
    };
    let loaded = a.model.load()?;
    let context = match &a.context {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let user = match &context {
        Some(c) => format!("{}\n\n{}", c.trim_end(), a.prompt),
        None => a.prompt.clone(),
    };
    let text = if a.chat {
        let system = a.system.clone().or(loaded.default_system.clone());
        let mut msgs = Vec::new();
        if let Some(s) = &system {
            msgs.push(("system", s.as_str()));
        }
        msgs.push(("user", user.as_str()));
        chat_prompt(&msgs)
    } else {
        user.clone()
    };
    // Split after the context unless the question should be inside SnapKV's window.
    let split_after = context
        .as_deref()
        .map(str::trim_end)
        .filter(|_| !a.query_aware);
    let parts = prompt_parts(&loaded.tokenizer, &text, split_after)?;
    let config = SamplingConfig {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        max_tokens: a.max_tokens,
    };
    let t0 = std::time::Instant::now();
    if let Some(kv) = llama_cpp_kv {
        let mut reference = GgmlReference::new(&loaded.model)?.with_kv(kv);
        let prompt: Vec<u32> = parts.concat();
        let g = generate_llama_cpp(
            &mut reference,
            &loaded.tokenizer,
            &prompt,
            LLAMA_CPP_UBATCH,
            &config,
            print_piece,
        )?;
        println!();
        eprintln!(
            "[llama.cpp reference (q8, {kv:?} cache): {}]",
            summary(&g, t0)
        );
        return Ok(());
    }
    let mut cache = a.cache.maker(&loaded)?.make()?;
    let parts: Vec<&[u32]> = parts.iter().map(Vec::as_slice).collect();
    let g = generate_parts(
        &loaded.model,
        &loaded.tokenizer,
        cache.as_mut(),
        &parts,
        &config,
        print_piece,
    )?;
    println!();
    let f = cache.footprint();
    eprintln!(
        "[{}: {}; cache retained {:.3}, {:.2} MB]",
        a.cache.label(),
        summary(&g, t0),
        f.retained(),
        f.bytes() as f64 / 1e6
    );
    Ok(())
}

/// Writes a piece of generated text as it arrives.
fn print_piece(s: &str) {
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(s.as_bytes());
    let _ = stdout.flush();
}

/// "N prompt tokens, M generated in Ts[, stop token]".
fn summary(g: &Generation, t0: std::time::Instant) -> String {
    format!(
        "{} prompt tokens, {} generated in {:.2}s{}",
        g.prompt_tokens,
        g.tokens.len(),
        t0.elapsed().as_secs_f64(),
        if g.stopped_by_stop_token {
            ", stop token"
        } else {
            ""
        }
    )
}
