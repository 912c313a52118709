//! Options and loading shared by commands.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use dynakv_burn::device::default_device;
use dynakv_models::assets::KnownModel;
use dynakv_models::gguf::GgufFile;
use dynakv_models::llama::WeightMode;
use dynakv_models::qmatmul::Numerics;
use dynakv_models::{LlamaModel, TextTokenizer};

/// A progress bar with the CLI's style (`template` as indicatif's, with
/// `{bar:30}`, `{pos}`, `{len}`, `{eta}`, `{msg}`).
pub fn progress(len: u64, template: &str) -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    )
}

/// Refuses an output the run could not write, before the run: `flag` names
/// the option in the error.
pub fn check_writable(flag: &str, path: &Path) -> Result<()> {
    dynakv_core::io::check_writable(path)
        .map_err(|e| anyhow::anyhow!("{flag} {}: cannot write there ({e})", path.display()))
}

/// `--model PATH`: any llama-family GGUF; the default model is fetched if absent.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model by name, fetched on first use (`smollm2-135m`, the default:
    /// SmolLM2-135M-Instruct Q4_1; `gemma3-270m`: Gemma 3 270M Q4_K_M), or
    /// the path of a GGUF file of a supported architecture (llama, mistral,
    /// gemma3; `./NAME` for a file that has a model's name).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// How the projection weights are held: packed (the file's block
    /// formats, multiplied by CPU kernels; the default on CPU backends) or
    /// dense (dequantised to f32 at load; the default on GPU backends).
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Activations against packed weights: f32 (as accurate as the f32
    /// model; the default) or q8 (quantised to 8 bits per block, as
    /// llama.cpp's CPU backend does: its logits, and faster). On AVX-512
    /// VNNI CPUs both run integer kernels on a tiled copy of
    /// Q4_1/Q5_0/Q8_0/Q4_K/Q6_K weights that replaces the file's rows in
    /// memory, f32 with the activations as three 8-bit digits.
    #[arg(long, default_value = "f32", value_parser = super::values::parsed::<Numerics>)]
    pub matmul: Numerics,
}

/// `--weights`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsArg {
    Packed,
    Dense,
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    pub model: LlamaModel,
    pub tokenizer: TextTokenizer,
    /// The chat template's default system message, if it has one.
    pub default_system: Option<String>,
    /// Whether the file has a chat template (an instruction-tuned model);
    /// base models are prompted in the completion format.
    pub chat: bool,
    /// SHA-256 of the GGUF file (artifacts record and check it).
    pub sha256: String,
}

impl Loaded {
    /// What the long-context suite needs to run a prompt.
    pub fn runner(&self) -> dynakv_bench::eval::longctx_suite::Runner<'_> {
        use dynakv_bench::eval::longctx::PromptFormat;
        dynakv_bench::eval::longctx_suite::Runner {
            model: &self.model,
            tokenizer: &self.tokenizer,
            format: match self.chat {
                true => PromptFormat::Chat {
                    system: self.default_system.as_deref(),
                },
                false => PromptFormat::Completion,
            },
        }
    }
}

impl ModelArgs {
    pub fn path(&self) -> Result<PathBuf> {
        let known = match &self.model {
            None => KnownModel::Smollm2,
            Some(p) => match p.to_str().and_then(KnownModel::from_name) {
                Some(m) => m,
                None => return Ok(p.clone()),
            },
        };
        known
            .ensure()
            .with_context(|| format!("fetching the model {}", known.name()))
    }

    /// The weight mode these flags ask for on `device`; `--matmul q8` needs
    /// packed weights.
    pub fn weight_mode(&self, device: &burn::tensor::Device) -> Result<WeightMode> {
        let packed = match self.weights {
            Some(WeightsArg::Packed) => true,
            Some(WeightsArg::Dense) => false,
            None => matches!(WeightMode::for_device(device), WeightMode::Packed(_)),
        };
        match (packed, self.matmul) {
            (true, n) => Ok(WeightMode::Packed(n)),
            (false, Numerics::F32) => Ok(WeightMode::Dense),
            (false, Numerics::Q8) => {
                bail!("--matmul q8 needs packed weights (--weights packed, on a CPU backend)")
            }
        }
    }

    pub fn load(&self) -> Result<Loaded> {
        let mode = self.weight_mode(&default_device())?;
        let path = self.path()?;
        let gguf = GgufFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let tokenizer = TextTokenizer::from_gguf(&gguf)?;
        let model = LlamaModel::from_gguf_with(&gguf, &default_device(), mode)?;
        let chat = gguf.meta("tokenizer.chat_template").is_some();
        let default_system = gguf
            .meta("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .and_then(default_system_message);
        let sha256 = dynakv_models::assets::sha256_file(&path)?;
        // the parsed metadata and the load's transient buffers are freed:
        // give their pages back (dynakv_models::heap)
        drop(gguf);
        dynakv_models::heap::release_free_heap();
        Ok(Loaded {
            model,
            tokenizer,
            default_system,
            chat,
            sha256,
        })
    }
}

/// The system message a ChatML template inserts when none is given, read from
/// the template text (`'<|im_start|>system\n...<|im_end|>`).
fn default_system_message(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
    let rest = &template[start..];
    let end = rest.find("<|im_end|>")?;
    Some(rest[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_default_system_message() {
        let t = "{% if x %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}";
        assert_eq!(
            default_system_message(t).as_deref(),
            Some("You are helpful")
        );
        assert_eq!(default_system_message("{{ x }}"), None);
    }
}
