//! Long-context retrieval on Brown `eval` haystacks: a fact stated once, asked
//! at the end, greedy decoding, exact-match scoring. Deterministic from a
//! seed. An instruction-tuned model is asked in its chat format; a base
//! model (no chat template, e.g. Gemma 3 270M) gets the haystack followed by
//! the start of the sentence that states the fact ("The pass key is"), the
//! completion format ([`PromptFormat`]).
//!
//! Tasks:
//! - `passkey`: "The pass key is 48213. Remember it. 48213 is the pass key."
//!   Asked: the pass key.
//! - `multikey`: four lines "The special number for WORD is N." at different
//!   depths; one WORD is asked.
//! - `codeword` (ours): "The secret code word is WORD. Remember it. WORD is
//!   the secret code word." with WORD an uncommon noun; asked: the code word.
//!   A word, not digits: recall of a token the haystack makes unlikely.
//!
//! An answer is right when the expected number or word appears in the output
//! as a whole token (digits not glued to other digits, letters not glued to
//! letters), case-insensitive.

use dynakv_burn::AttentionCache;
use dynakv_models::generate::{generate_parts, SamplingConfig};
use dynakv_models::tokenizer::chat_prompt;
use dynakv_models::{LlamaModel, ModelError, TextTokenizer};
use serde::{Deserialize, Serialize};

/// A retrieval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Passkey,
    Multikey,
    Codeword,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Self::Passkey => "passkey",
            Self::Multikey => "multikey",
            Self::Codeword => "codeword",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "passkey" => Ok(Self::Passkey),
            "multikey" => Ok(Self::Multikey),
            "codeword" => Ok(Self::Codeword),
            o => Err(ModelError::InvalidInput(format!(
                "task `{o}` (expected passkey, multikey or codeword)"
            ))),
        }
    }
}

const WORDS: [&str; 16] = [
    "lantern", "walrus", "saffron", "quartz", "harpoon", "juniper", "falcon", "marble", "cobalt",
    "thistle", "anchor", "velvet", "orchid", "granite", "meadow", "pepper",
];

/// How a prompt is put to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat<'a> {
    /// An instruction-tuned model's chat turn (ChatML), with its default
    /// system message: the haystack, then the question.
    Chat { system: Option<&'a str> },
    /// A base model: the haystack, a blank line, then the start of the
    /// sentence that states the fact, for the model to complete.
    Completion,
}

impl PromptFormat<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Chat { .. } => "chat",
            Self::Completion => "completion",
        }
    }
}

/// One prompt: the context (haystack with needles), the question (chat) or
/// the cue (completion), the answer.
#[derive(Debug, Clone)]
pub struct Sample {
    pub task: Task,
    pub length: usize,
    pub depth: f64,
    pub context: String,
    pub question: String,
    pub cue: String,
    pub answer: String,
}

/// A small deterministic generator (no dependency for a handful of draws).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Inserts `needle` at the sentence boundary nearest to `depth` of `text`.
fn insert_at(text: &str, depth: f64, needle: &str) -> String {
    let target = (text.len() as f64 * depth.clamp(0.0, 1.0)) as usize;
    let cut = text
        .match_indices(". ")
        .map(|(i, _)| i + 2)
        .min_by_key(|&i| i.abs_diff(target))
        .unwrap_or(if depth < 0.5 { 0 } else { text.len() });
    format!("{} {} {}", &text[..cut].trim_end(), needle, &text[cut..])
        .trim()
        .to_string()
}

/// Whether `expected` appears in `output` as a whole token.
pub fn exact_match(output: &str, expected: &str) -> bool {
    let out = output.to_lowercase();
    let exp = expected.to_lowercase();
    let glued = |c: Option<char>| {
        c.is_some_and(|c| {
            if exp.chars().all(|e| e.is_ascii_digit()) {
                c.is_ascii_digit()
            } else {
                c.is_alphanumeric()
            }
        })
    };
    out.match_indices(&exp).any(|(i, m)| {
        !glued(out[..i].chars().next_back()) && !glued(out[i + m.len()..].chars().next())
    })
}

/// Most tokens an answer may take (greedy, stops earlier at end of turn).
pub const ANSWER_TOKENS: usize = 16;

/// Prompt tokens of a `length` cell: `length`, less room for the answer
/// where `length` reaches the model's context (8k on SmolLM2: 8176).
pub fn prompt_budget(length: usize, context_length: usize) -> usize {
    length.min(context_length.saturating_sub(ANSWER_TOKENS))
}

/// Builds the samples of one task at one prompt length: one per depth,
/// haystacks cut from `stream` (token ids of Brown `eval`) at seeded offsets,
/// each prompt at most [`prompt_budget`] tokens.
#[allow(clippy::too_many_arguments)]
pub fn build_samples(
    tokenizer: &TextTokenizer,
    format: PromptFormat<'_>,
    stream: &[u32],
    task: Task,
    length: usize,
    context_length: usize,
    depths: &[f64],
    seed: u64,
) -> Result<Vec<Sample>, ModelError> {
    let mut rng = Lcg(seed ^ (length as u64) << 8 ^ task as u64);
    let mut out = Vec::new();
    for &depth in depths {
        let (needles, question, cue, answer) = match task {
            Task::Passkey => {
                let key = 10000 + rng.below(90000);
                (
                    vec![(
                        depth,
                        format!("The pass key is {key}. Remember it. {key} is the pass key."),
                    )],
                    "What is the pass key? Answer with the number only.".to_string(),
                    "The pass key is".to_string(),
                    key.to_string(),
                )
            }
            Task::Multikey => {
                let mut words: Vec<&str> = Vec::new();
                while words.len() < 4 {
                    let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                    if !words.contains(&w) {
                        words.push(w);
                    }
                }
                let numbers: Vec<u64> = (0..4).map(|_| 1000 + rng.below(9000)).collect();
                // The asked line sits at `depth`; the others spread around it.
                let others = [0.2, 0.45, 0.7, 0.95];
                let needles = (0..4)
                    .map(|i| {
                        let d = if i == 0 { depth } else { others[i] };
                        (
                            d,
                            format!("The special number for {} is {}.", words[i], numbers[i]),
                        )
                    })
                    .collect();
                (
                    needles,
                    format!(
                        "What is the special number for {}? Answer with the number only.",
                        words[0]
                    ),
                    format!("The special number for {} is", words[0]),
                    numbers[0].to_string(),
                )
            }
            Task::Codeword => {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                (
                    vec![(depth, format!("The secret code word is {w}. Remember it. {w} is the secret code word."))],
                    "What is the secret code word? Answer with one word.".to_string(),
                    "The secret code word is".to_string(),
                    w.to_string(),
                )
            }
        };
        // Overhead of the template, needles and question, then fill with haystack.
        let skeleton = needles
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let probe = prompt_text(format, &skeleton, &question, &cue);
        // + BOS where the model takes one, + a margin for re-tokenisation
        let overhead = tokenizer.encode_text(&probe)?.len() + 8;
        let hay_tokens = prompt_budget(length, context_length)
            .checked_sub(overhead)
            .ok_or_else(|| {
                ModelError::InvalidInput(format!(
                    "length {length} is shorter than the prompt skeleton"
                ))
            })?;
        if stream.len() < hay_tokens {
            return Err(ModelError::InvalidInput("haystack text too short".into()));
        }
        let start = rng.below((stream.len() - hay_tokens) as u64 + 1) as usize;
        let mut context = tokenizer.decode(&stream[start..start + hay_tokens])?;
        let mut sorted = needles.clone();
        sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (d, n) in &sorted {
            context = insert_at(&context, *d, n);
        }
        out.push(Sample {
            task,
            length,
            depth,
            context,
            question,
            cue,
            answer,
        });
    }
    Ok(out)
}

fn prompt_text(format: PromptFormat<'_>, context: &str, question: &str, cue: &str) -> String {
    match format {
        PromptFormat::Chat { system } => {
            let user = format!("{context}\n\n{question}");
            let mut msgs = Vec::new();
            if let Some(s) = system {
                msgs.push(("system", s));
            }
            msgs.push(("user", user.as_str()));
            chat_prompt(&msgs)
        }
        PromptFormat::Completion => format!("{context}\n\n{cue}"),
    }
}

/// Token parts of a sample's prompt: one part (query-aware: the question is
/// in the prefill, inside SnapKV's window) or two (context first, so a cache
/// that compresses at the end of prefill never sees the question); BOS
/// first where the model takes one.
pub fn prompt_parts(
    tokenizer: &TextTokenizer,
    format: PromptFormat<'_>,
    s: &Sample,
    query_aware: bool,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let text = prompt_text(format, &s.context, &s.question, &s.cue);
    let split_after = (!query_aware).then_some(s.context.as_str());
    crate::text::prompt_parts(tokenizer, &text, split_after)
}

/// One sample's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub task: Task,
    pub length: usize,
    pub depth: f64,
    pub prompt_tokens: usize,
    pub answer: String,
    pub output: String,
    pub correct: bool,
    pub retained: f64,
    /// `retained` of the spec's layers (a model's global layers when it has
    /// sliding-window ones).
    #[serde(default)]
    pub retained_global: Option<f64>,
}

/// Runs one sample with a fresh cache.
pub fn run_sample(
    model: &LlamaModel,
    tokenizer: &TextTokenizer,
    format: PromptFormat<'_>,
    s: &Sample,
    query_aware: bool,
    cache: &mut dyn AttentionCache,
) -> Result<Outcome, ModelError> {
    let parts = prompt_parts(tokenizer, format, s, query_aware)?;
    let refs: Vec<&[u32]> = parts.iter().map(Vec::as_slice).collect();
    let config = SamplingConfig {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_tokens: ANSWER_TOKENS,
    };
    let g = generate_parts(model, tokenizer, cache, &refs, &config, |_| {})?;
    Ok(Outcome {
        task: s.task,
        length: s.length,
        depth: s.depth,
        prompt_tokens: g.prompt_tokens,
        answer: s.answer.clone(),
        correct: exact_match(&g.text, &s.answer),
        output: g.text,
        retained: cache.footprint().retained(),
        retained_global: Some(cache.spec_footprint().retained()),
    })
}

/// Score of one task × length cell.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub task: Task,
    pub length: usize,
    pub n: usize,
    pub correct: usize,
    pub score: f64,
}

/// Groups outcomes into task × length cells (in first-seen order).
pub fn cells(outcomes: &[Outcome]) -> Vec<Cell> {
    let mut out: Vec<Cell> = Vec::new();
    for o in outcomes {
        let i = match out
            .iter()
            .position(|c| c.task == o.task && c.length == o.length)
        {
            Some(i) => i,
            None => {
                out.push(Cell {
                    task: o.task,
                    length: o.length,
                    n: 0,
                    correct: 0,
                    score: 0.0,
                });
                out.len() - 1
            }
        };
        out[i].n += 1;
        out[i].correct += o.correct as usize;
        out[i].score = out[i].correct as f64 / out[i].n as f64;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An outcome of a prompt at depth 0.5, for tests of scoring.
    pub(crate) fn outcome(task: Task, length: usize, correct: bool, retained: f64) -> Outcome {
        Outcome {
            task,
            length,
            depth: 0.5,
            prompt_tokens: 0,
            answer: String::new(),
            output: String::new(),
            correct,
            retained,
            retained_global: None,
        }
    }

    #[test]
    fn exact_match_needs_whole_tokens() {
        assert!(exact_match("The pass key is 48213.", "48213"));
        assert!(!exact_match("482135", "48213"));
        assert!(!exact_match("148213", "48213"));
        assert!(exact_match("Walrus!", "walrus"));
        assert!(!exact_match("walruses", "walrus"));
        assert!(!exact_match("", "1"));
    }

    #[test]
    fn needles_land_at_sentence_boundaries() {
        let text = "One. Two two. Three three three. Four.";
        let s = insert_at(text, 0.5, "NEEDLE.");
        assert!(
            s.contains("two. NEEDLE. Three") || s.contains("three. NEEDLE. Four"),
            "{s}"
        );
        assert!(
            insert_at(text, 0.0, "N.").starts_with("One. N.")
                || insert_at(text, 0.0, "N.").starts_with("N.")
        );
        assert!(insert_at("no boundary", 0.9, "N.").ends_with("N."));
    }

    #[test]
    fn a_cell_at_the_context_length_leaves_room_for_the_answer() {
        assert_eq!(prompt_budget(4096, 8192), 4096);
        assert_eq!(prompt_budget(8176, 8192), 8176);
        assert_eq!(prompt_budget(8192, 8192), 8192 - ANSWER_TOKENS);
        assert_eq!(prompt_budget(100, 10), 0);
    }

    #[test]
    fn cells_group_and_score() {
        let o = |task, length, correct| outcome(task, length, correct, 1.0);
        let c = cells(&[
            o(Task::Passkey, 1024, true),
            o(Task::Passkey, 1024, false),
            o(Task::Codeword, 1024, true),
        ]);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].n, c[0].correct, c[0].score), (2, 1, 0.5));
        assert_eq!(c[1].score, 1.0);
    }
}
