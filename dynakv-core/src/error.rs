//! Errors of the core crate.

use thiserror::Error;

/// A bad configuration or input to the compression math.
#[derive(Debug, Error)]
pub enum CoreError {
    #[error("invalid `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}
