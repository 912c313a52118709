//! The device tests run on: the enabled backend's default (`BURN_DEVICE`
//! overrides), so the suite runs on whatever backend the features chose.

#[cfg(test)]
pub(crate) fn test_device() -> burn::tensor::Device {
    burn::tensor::Device::default()
}
