//! Storage precisions of cached numbers, as bytes: the dense cache's key and
//! value rows (`f32`, `f16`, `bf16`, and llama.cpp's `q8_0` / `q4_0` blocks)
//! and DynaKV's latent rows (`f32`, `f16`, `int8`, `int4`, with scales per
//! token and group or per coordinate).
//!
//! Why here: what a cache costs is decided by these formats, and the row
//! codec is plain arithmetic that every backend and the accounting share.
//! Rows are packed one after another in a [`PackedRows`]; a kernel decodes
//! one row at a time into a small buffer (L1), never the whole cache.
//!
//! Block layouts follow llama.cpp (`ggml-quants.c`), so our q8_0 / q4_0
//! caches hold exactly what llama.cpp's `--cache-type-k/-v q8_0|q4_0` hold:
//! - `q8_0`: per 32 values an f16 scale `d = amax / 127` and 32 `i8` codes
//!   `round(x / d)`; 34 bytes.
//! - `q4_0`: per 32 values an f16 scale `d = m / -8` (`m` the value of
//!   largest magnitude, with its sign) and 16 bytes of 4-bit codes
//!   `min(15, trunc(x / d + 8.5))`, value `j` in the low nibble of byte `j`
//!   and value `j + 16` in the high one; 18 bytes.
//!
//! A row whose length is not a multiple of 32 (a latent of rank 40) ends in a
//! short block of `n` values: `2 + n` bytes (q8_0) or `2 + ceil(n / 2)` (q4_0,
//! value `j` low and `j + ceil(n/2)` high).

mod codec;
mod dtype;
mod hadamard;
mod kivi;
mod rows;

pub use codec::RowCodec;
pub use dtype::{channel_clip, BasisDtype, KvDtype, LatentDtype, LatentScales};
pub use hadamard::hadamard_rows;
pub use rows::{CodeBlock, CodeRows, PackedRows};

/// Values per quantisation block (llama.cpp's `QK8_0`, `QK4_0`).
pub const QBLOCK: usize = 32;

/// Deterministic test numbers in [-2, 2).
#[cfg(test)]
pub(crate) fn numbers(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}
