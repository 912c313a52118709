//! What differs between the architectures this forward pass runs, in one
//! place. Everything else (the block's order of operations, the caches,
//! the packed weights) is shared; `config.rs` reads the per-architecture
//! metadata these features name.
//!
//! | | llama / mistral | gemma3 |
//! |---|---|---|
//! | RoPE pairs | interleaved (converter-permuted W_q, W_k) | split halves (NEOX) |
//! | head size | d_model / heads | `attention.key_length` |
//! | QK-norm (RMS per head, before RoPE) | no | yes |
//! | norms after attention and FFN | no | yes |
//! | FFN gate | SiLU | GELU, tanh approximation |
//! | embeddings | as stored | scaled by sqrt(d_model) |
//! | layers | all global | sliding window on 5 of 6 (local RoPE base 10,000) |
//! | output head | `output.weight` or tied | tied |

use dynakv_burn::RopeStyle;
use serde::{Deserialize, Serialize};

/// An architecture the forward pass implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// `llama` and `mistral` GGUF files.
    Llama,
    /// `gemma3` GGUF files.
    Gemma3,
}

/// The FFN's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU).
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GeGLU, as llama.cpp's `ggml_gelu`).
    GeluTanh,
}

impl Arch {
    /// `general.architecture` values and what they run as.
    pub const NAMES: &[(&str, Arch)] = &[
        ("llama", Arch::Llama),
        ("mistral", Arch::Llama),
        ("gemma3", Arch::Gemma3),
    ];

    /// The architecture of a `general.architecture` value.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, a)| a)
    }

    /// How the GGUF weights pair coordinates for RoPE: llama.cpp's
    /// converter permutes W_q and W_k of llama-family models into
    /// interleaved pairs; Gemma keeps the halves.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Interleaved,
            Arch::Gemma3 => RopeStyle::SplitHalves,
        }
    }

    /// Whether the head size is read from `attention.key_length` (else it
    /// is `d_model / heads`, and a key length must agree with it).
    pub fn head_size_from_key_length(self) -> bool {
        self == Arch::Gemma3
    }

    /// RMSNorm of each query and key head before RoPE.
    pub fn qk_norm(self) -> bool {
        self == Arch::Gemma3
    }

    /// RMSNorm of the attention and FFN outputs before each residual add.
    pub fn post_norms(self) -> bool {
        self == Arch::Gemma3
    }

    pub fn activation(self) -> Activation {
        match self {
            Arch::Llama => Activation::Silu,
            Arch::Gemma3 => Activation::GeluTanh,
        }
    }

    /// The factor token embeddings are multiplied by.
    pub fn embedding_scale(self, d_model: usize) -> Option<f32> {
        match self {
            Arch::Llama => None,
            // llama.cpp: ggml_scale(inpL, sqrtf(n_embd))
            Arch::Gemma3 => Some((d_model as f32).sqrt()),
        }
    }
}

impl Activation {
    /// The activation of one number (the host paths' form, `gate.rs`).
    pub fn apply(self, x: f32) -> f32 {
        super::gate::activate(self, x)
    }

    /// The activation of a tensor.
    ///
    /// # Shapes
    /// any; returns the same shape
    pub fn apply_tensor<const D: usize>(
        self,
        x: burn::tensor::Tensor<D>,
    ) -> burn::tensor::Tensor<D> {
        match self {
            Activation::Silu => burn::tensor::activation::silu(x),
            Activation::GeluTanh => {
                let inner = (x.clone().powi_scalar(3) * 0.044_715 + x.clone()) * 0.797_884_6;
                x * (inner.tanh() + 1.0) * 0.5
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_on_tensors_equals_the_scalar_form() {
        let xs = [-6.0f32, -1.5, -0.3, 0.0, 0.2, 1.0, 3.5, 9.0];
        let device = dynakv_burn::device::default_device();
        for act in [Activation::Silu, Activation::GeluTanh] {
            let t = burn::tensor::Tensor::<1>::from_floats(xs, &device);
            let got = act
                .apply_tensor(t)
                .into_data()
                .try_into_vec::<f32>()
                .unwrap();
            for (x, g) in xs.iter().zip(got) {
                assert!((act.apply(*x) - g).abs() < 1e-5, "{act:?}({x})");
            }
        }
        // known values of the tanh approximation
        assert!((Activation::GeluTanh.apply(1.0) - 0.841_192).abs() < 1e-5);
        assert!(Activation::GeluTanh.apply(-6.0).abs() < 1e-6);
        assert_eq!(Arch::from_name("mistral"), Some(Arch::Llama));
        assert_eq!(Arch::from_name("gemma2"), None);
    }
}
