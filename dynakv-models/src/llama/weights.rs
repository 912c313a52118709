//! Loading GGUF tensors into burn tensors with the layouts the forward pass wants.

use burn::tensor::{Device, Tensor, TensorData};
use dynakv_burn::KvStorage;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::qmatmul::{Numerics, QuantMatrix};

/// A 1-D tensor (norm weights) of an expected length, on the host.
pub fn vector_host(gguf: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let (data, dims) = gguf.tensor_f32(name)?;
    if dims != [n as u64] {
        return Err(ModelError::TensorShape {
            name: name.into(),
            got: dims,
            expected: vec![n as u64],
        });
    }
    Ok(data)
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

/// How a loaded model holds its projection weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightMode {
    /// Dequantised to f32 tensors at load: what GPU backends run (their
    /// matmuls are fast and their memory holds it).
    Dense,
    /// Kept in the file's block formats, multiplied by the CPU kernels of
    /// [`crate::qmatmul`] in the given numerics: the default on CPU
    /// backends (a decode step reads the file's bytes, not 5x more).
    Packed(Numerics),
}

impl WeightMode {
    /// Packed f32 on a host (CPU) device, dense elsewhere.
    pub fn for_device(device: &Device) -> Self {
        match KvStorage::for_device(device) {
            KvStorage::Host => Self::Packed(Numerics::F32),
            KvStorage::Device => Self::Dense,
        }
    }
}

/// From this many tokens on, an f32-numerics product against packed weights
/// dequantises the matrix and runs burn's matmul (a blocked GEMM) instead of
/// the row kernels. Measured on SmolLM2, 2 threads (`dynakv bench --prefill
/// 2,4,8,16,32,64` with the threshold at 1 and at 100,000): a whole forward
/// pass of 16 tokens 0.142 s in the row kernels against 0.223 s through the
/// GEMM (which first dequantises every matrix: 0.16 s at any length), 32
/// tokens 0.248 s against 0.221 s, 64 tokens 0.491 s against 0.319 s.
pub const PACKED_GEMM_MIN_TOKENS: usize = 32;

/// [`PACKED_GEMM_MIN_TOKENS`] for a matrix with tiles (AVX-512 VNNI CPUs,
/// f32 numerics as three digits): the tiles stay faster for longer.
/// Measured on an AMD EPYC VM, 2 threads (`dynakv bench --prefill
/// 32,...,256` with the GEMM from 32 tokens and never): SmolLM2 32 tokens
/// 550-590 tok/s on the tiles against 367-390 through the GEMM, 64 tokens
/// 580-610 against 606-618, 80 tokens 609-622 against 658-670; Gemma 3 32
/// tokens 500-514 against 221-223, 64 tokens 545-556 against 388-405, 112
/// tokens 525-566 against 617-620.
pub const PACKED_TILES_GEMM_MIN_TOKENS: usize = 64;

/// A projection `x -> x W^T`, dense or packed.
#[derive(Debug, Clone)]
pub enum Projection {
    /// `[in, out]`, so that `x.matmul(w)` computes `x W^T`.
    Dense(Tensor<2>),
    /// `out` rows of `in` inputs, in the file's block format.
    Packed(QuantMatrix, Numerics),
}

impl Projection {
    /// A packed projection in the given numerics, its rows in tiles for
    /// the integer kernels where the CPU has AVX-512 VNNI
    /// ([`QuantMatrix::with_tiles`]; f32 numerics run on them with the
    /// activations as three 8-bit digits); rows that products read in the
    /// file's layout are moved onto huge pages
    /// ([`QuantMatrix::on_huge_pages`]).
    pub fn packed(m: QuantMatrix, numerics: Numerics) -> Self {
        let m = m.with_tiles();
        if m.tile_bytes() > 0 {
            Self::Packed(m, numerics)
        } else {
            Self::Packed(m.on_huge_pages(), numerics)
        }
    }

    /// Loads a GGUF matrix of `d_out` rows of `d_in` values in `mode`.
    pub fn load(
        gguf: &GgufFile,
        name: &str,
        d_in: usize,
        d_out: usize,
        mode: WeightMode,
        device: &Device,
    ) -> Result<Self, ModelError> {
        match mode {
            WeightMode::Dense => Ok(Self::Dense(linear(gguf, name, d_in, d_out, device)?)),
            WeightMode::Packed(numerics) => {
                Ok(Self::packed(packed(gguf, name, d_in, d_out)?, numerics))
            }
        }
    }

    /// `x W^T`.
    ///
    /// # Shapes
    /// - `x`: `[T, in]`; returns `[T, out]`
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>, ModelError> {
        match self {
            Self::Packed(m, n) if row_kernels(m, *n, &x) => {
                let mut y = packed_products(&[m], *n, x)?;
                y.pop()
                    .ok_or_else(|| ModelError::InvalidInput("one product".into()))
            }
            #[cfg(feature = "flex")]
            Self::Packed(m, _) if host_gemm(&x) => {
                let [t, _] = x.dims();
                let device = x.device();
                let xs = x.into_data().try_into_vec::<f32>()?;
                let y = m.matmul_dequantised(&xs)?;
                Ok(Tensor::from_data(
                    TensorData::new(y, [t, m.rows()]),
                    &device,
                ))
            }
            _ => {
                let device = x.device();
                Ok(x.matmul(self.dense(&device)))
            }
        }
    }

    /// Several projections of the same input: packed ones that the row
    /// kernels would run one by one run as one group
    /// ([`crate::qmatmul::matmul_group`]: the threads wake once).
    ///
    /// # Shapes
    /// - `x`: `[T, in]`; returns one `[T, out_i]` per projection
    pub fn forward_group(ps: &[&Self], x: Tensor<2>) -> Result<Vec<Tensor<2>>, ModelError> {
        let packed: Option<Vec<(&QuantMatrix, Numerics)>> = ps
            .iter()
            .map(|p| match p {
                Self::Packed(m, n) => Some((m, *n)),
                Self::Dense(_) => None,
            })
            .collect();
        match packed {
            Some(ms)
                if ms
                    .iter()
                    .all(|(m, n)| *n == ms[0].1 && row_kernels(m, *n, &x)) =>
            {
                let mats: Vec<&QuantMatrix> = ms.iter().map(|(m, _)| *m).collect();
                packed_products(&mats, ms[0].1, x)
            }
            _ => ps.iter().map(|p| p.forward(x.clone())).collect(),
        }
    }

    /// The weights as a dense `[in, out]` tensor (dequantised when packed):
    /// calibration and training read `W_o` this way.
    ///
    /// # Shapes
    /// returns `[in, out]`
    pub fn dense(&self, device: &Device) -> Tensor<2> {
        match self {
            Self::Dense(w) => w.clone(),
            Self::Packed(m, _) => Tensor::<2>::from_data(
                TensorData::new(m.dequantize(), [m.rows(), m.cols()]),
                device,
            )
            .transpose(),
        }
    }

    /// Bytes the weights hold in memory (packed: shared with the file's map).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.shape().num_elements() * 4,
            Self::Packed(m, _) => m.byte_len(),
        }
    }
}

/// Whether a product against packed weights runs in the row kernels: q8
/// numerics always, f32 below [`PACKED_GEMM_MIN_TOKENS`] tokens
/// ([`PACKED_TILES_GEMM_MIN_TOKENS`] on tiles; longer f32 prefills run a
/// GEMM on the dequantised matrix, faster there: SmolLM2 512 tokens 800-850
/// tok/s through burn's GEMM against 455-475 on the tiles, and the direct
/// [`QuantMatrix::matmul_dequantised`] of the CPU backend is faster again);
/// never on an autodiff device, where gradients must flow through `x` (e2e
/// training; the kernels work on host copies) and burn's matmul takes the
/// dequantised matrix instead.
fn row_kernels(m: &QuantMatrix, numerics: Numerics, x: &Tensor<2>) -> bool {
    let gemm_from = match m.tile_bytes() {
        0 => PACKED_GEMM_MIN_TOKENS,
        _ => PACKED_TILES_GEMM_MIN_TOKENS,
    };
    !x.device().is_autodiff() && (numerics == Numerics::Q8 || x.dims()[0] < gemm_from)
}

/// Whether a product that the row kernels leave to a GEMM runs on the host
/// ([`QuantMatrix::matmul_dequantised`]): burn's CPU backend, no autodiff
/// (gradients need burn's matmul).
#[cfg(feature = "flex")]
fn host_gemm(x: &Tensor<2>) -> bool {
    let device = x.device();
    !device.is_autodiff()
        && dynakv_burn::KvStorage::for_device(&device) == dynakv_burn::KvStorage::Host
}

/// Packed matrices against `x` in the row kernels, one tensor per matrix.
///
/// # Shapes
/// - `x`: `[T, in]`; returns one `[T, rows_i]` per matrix
fn packed_products(
    mats: &[&QuantMatrix],
    numerics: Numerics,
    x: Tensor<2>,
) -> Result<Vec<Tensor<2>>, ModelError> {
    let [t, _] = x.dims();
    let device = x.device();
    let xs = x.into_data().try_into_vec::<f32>()?;
    let ys = crate::qmatmul::matmul_group(mats, &xs, numerics)?;
    Ok(ys
        .into_iter()
        .zip(mats)
        .map(|(y, m)| Tensor::from_data(TensorData::new(y, [t, m.rows()]), &device))
        .collect())
}

/// A GGUF matrix of `d_out` rows of `d_in` values, kept packed.
pub fn packed(
    gguf: &GgufFile,
    name: &str,
    d_in: usize,
    d_out: usize,
) -> Result<QuantMatrix, ModelError> {
    let info = gguf
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    if info.dims != [d_in as u64, d_out as u64] {
        return Err(ModelError::TensorShape {
            name: name.into(),
            got: info.dims.clone(),
            expected: vec![d_in as u64, d_out as u64],
        });
    }
    QuantMatrix::new(name, info.ggml_type, d_out, d_in, gguf.tensor_shared(info))
}

#[cfg(all(test, feature = "train"))]
mod tests {
    use super::*;
    use crate::gguf::TensorBytes;
    use half::f16;

    /// Packed products on an autodiff device go through burn's matmul, so
    /// e2e training's gradients reach the activations (the row kernels run
    /// on host copies and would cut them).
    #[test]
    fn packed_products_keep_gradients_on_autodiff_devices() {
        let (rows, cols) = (4, 32);
        let mut block = vec![0u8; 34];
        block[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        for (i, q) in block[2..].iter_mut().enumerate() {
            *q = (i as i8 - 16) as u8;
        }
        let bytes: Vec<u8> = (0..rows).flat_map(|_| block.clone()).collect();
        let m = QuantMatrix::new(
            "w",
            crate::gguf::GgmlType::Q8_0,
            rows,
            cols,
            TensorBytes::from_bytes(&bytes).unwrap(),
        )
        .unwrap();
        let device = dynakv_burn::device::default_device().autodiff();
        for numerics in [Numerics::F32, Numerics::Q8] {
            let p = Projection::Packed(m.clone(), numerics);
            let x = Tensor::<2>::ones([1, cols], &device).require_grad();
            let grads = p.forward(x.clone()).unwrap().sum().backward();
            let g: Vec<f32> = x.grad(&grads).unwrap().into_data().try_into_vec().unwrap();
            // d(sum_r w_r . x)/dx_i = sum_r w_ri = 4 * 0.5 * (i - 16)
            for (i, v) in g.iter().enumerate() {
                assert_eq!(*v, 2.0 * (i as f32 - 16.0), "{numerics}");
            }
        }
    }
}
