//! Errors of the model crate.

use thiserror::Error;

/// Everything that can go wrong loading or running a reference model.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GGUF: {0}")]
    Gguf(String),
    #[error("GGUF: tensor `{tensor}` has unsupported ggml type id {type_id}")]
    UnsupportedTensorType { tensor: String, type_id: u32 },
    #[error("GGUF: required metadata `{0}` is missing")]
    MissingMetadata(String),
    #[error("GGUF: required tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        got: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A computed result that is not a finite number (a NaN or an infinity
    /// in the weights, an artifact or the arithmetic): reported, not written.
    #[error("{0} is not finite: not reported as a result")]
    NotFinite(String),
    #[error("asset `{name}`: {message}")]
    Asset { name: String, message: String },
    #[error(transparent)]
    Cache(#[from] dynakv_burn::CacheError),
    #[error(transparent)]
    Core(#[from] dynakv_core::CoreError),
    #[error("reading a tensor back from the device: {0}")]
    Data(#[from] burn::tensor::DataError),
}
