//! Where a cache keeps its keys and values.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

/// Where a cache keeps its numbers, and so how it attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvStorage {
    /// burn tensors on the device; attention by tensor ops (GPUs).
    Device,
    /// Host vectors: decode steps run a fused host kernel and appends are
    /// amortised O(1); prefill chunks upload and use the tensor path (CPUs).
    Host,
}

impl KvStorage {
    /// `Host` for burn's CPU backend (Flex, with this crate's `flex`
    /// feature), `Device` for every other backend (GPUs through wgpu or
    /// CUDA). An autodiff device counts as the device it wraps.
    pub fn for_device(device: &Device) -> Self {
        #[cfg(feature = "flex")]
        if device.clone().inner() == Device::flex() {
            return Self::Host;
        }
        let _ = device;
        Self::Device
    }
}
