//! Burn-free host kernels: the fused decode-step attention of the dense and
//! DynaKV caches over host vectors, the dense cache's blocked prefill
//! attention, their shared arithmetic (AVX2 with a
//! portable fallback), and RoPE on the host.
//!
//! Why on the host: a decode step on a CPU attends one query over thousands
//! of stored tokens; burn's tensor path would copy the whole cache into one
//! contiguous tensor per step, while these kernels read the caches' own
//! vectors in place and split the tokens over cores.

#[cfg(test)]
mod attention_reference;
pub(crate) mod dense_decode;
pub(crate) mod dense_prefill;
pub(crate) mod latent_codes;
pub(crate) mod latent_decode;
pub(crate) mod latent_encode;
mod latent_values;
mod latent_wide;
pub(crate) mod math;
pub(crate) mod plain_rows;
mod rope;

pub(crate) use rope::HostRope;
