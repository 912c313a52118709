//! The real default model, loaded once per test binary.
#![allow(dead_code)] // each test binary uses part of it

use std::sync::OnceLock;

use dynakv_burn::device::default_device;
use dynakv_models::gguf::GgufFile;
use dynakv_models::llama::WeightMode;
use dynakv_models::qmatmul::Numerics;
use dynakv_models::{LlamaModel, TextTokenizer};

pub struct Real {
    pub model: LlamaModel,
    pub tokenizer: TextTokenizer,
}

pub fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let path = dynakv_models::assets::default_model().expect("fetch the default model");
        let gguf = GgufFile::open(&path).expect("open GGUF");
        Real {
            tokenizer: TextTokenizer::from_gguf(&gguf).expect("tokenizer"),
            model: LlamaModel::from_gguf(&gguf, &default_device()).expect("model"),
        }
    })
}

/// The real default model with packed weights in q8 numerics (activations
/// quantised as llama.cpp quantises them), loaded once per test binary.
pub fn real_q8() -> &'static LlamaModel {
    static REAL: OnceLock<LlamaModel> = OnceLock::new();
    REAL.get_or_init(|| {
        let path = dynakv_models::assets::default_model().expect("fetch the default model");
        let gguf = GgufFile::open(&path).expect("open GGUF");
        LlamaModel::from_gguf_with(&gguf, &default_device(), WeightMode::Packed(Numerics::Q8))
            .expect("model")
    })
}
