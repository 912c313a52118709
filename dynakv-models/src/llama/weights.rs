//! Loading GGUF tensors into burn tensors with the layouts the forward pass wants.

use burn::tensor::{Device, Tensor, TensorData};

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// A 1-D tensor (norm weights) of an expected length.
///
/// # Shapes
/// returns `[n]`
pub fn vector(
    gguf: &GgufFile,
    name: &str,
    n: usize,
    device: &Device,
) -> Result<Tensor<1>, ModelError> {
    let (data, dims) = gguf.tensor_f32(name)?;
    if dims != [n as u64] {
        return Err(ModelError::TensorShape {
            name: name.into(),
            got: dims,
            expected: vec![n as u64],
        });
    }
    Ok(Tensor::from_data(TensorData::new(data, [n]), device))
}

/// A projection matrix stored by GGUF as `out` rows of `in` values, returned as
/// `[in, out]` so that `x.matmul(w)` computes `x W^T` (burn's Linear layout).
///
/// # Shapes
/// returns `[d_in, d_out]`
pub fn linear(
    gguf: &GgufFile,
    name: &str,
    d_in: usize,
    d_out: usize,
    device: &Device,
) -> Result<Tensor<2>, ModelError> {
    let rows = raw_rows(gguf, name, d_in, d_out)?;
    let mut t = vec![0f32; d_in * d_out];
    for o in 0..d_out {
        let row = &rows[o * d_in..(o + 1) * d_in];
        for (i, &x) in row.iter().enumerate() {
            t[i * d_out + o] = x;
        }
    }
    Ok(Tensor::from_data(TensorData::new(t, [d_in, d_out]), device))
}

/// The raw `[rows][row_len]` data of a 2-D tensor (an embedding table).
pub fn raw_rows(
    gguf: &GgufFile,
    name: &str,
    row_len: usize,
    rows: usize,
) -> Result<Vec<f32>, ModelError> {
    let (data, dims) = gguf.tensor_f32(name)?;
    if dims != [row_len as u64, rows as u64] {
        return Err(ModelError::TensorShape {
            name: name.into(),
            got: dims,
            expected: vec![row_len as u64, rows as u64],
        });
    }
    Ok(data)
}
