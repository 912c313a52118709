//! The one place that picks the burn device, so the same code and tests run on
//! whatever backend the cargo features enabled.

use burn::tensor::Device;

/// The default device of the enabled backend (`BURN_DEVICE` overrides).
///
/// With several backends compiled in, burn prefers GPUs (CUDA, then wgpu) over
/// the CPU (Flex).
pub fn default_device() -> Device {
    Device::default()
}
