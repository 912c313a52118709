//! GGUF: the file format of llama.cpp models.
//!
//! The reader memory-maps the file, parses the header, every metadata value and
//! every tensor description, and validates each count and size against the
//! file's length before allocating anything, so a corrupt file is an error that
//! names the field or tensor, never a panic or a huge allocation.

mod dequant;
mod reader;
mod types;

pub use dequant::dequantize;
pub(crate) use dequant::{dequantize_into, scale_min_k4};
pub use reader::{GgufFile, TensorBytes, TensorInfo};
pub use types::{GgmlType, MetaValue};
