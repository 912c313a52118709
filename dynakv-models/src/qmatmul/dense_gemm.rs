//! f32 products of long prefills against packed weights on the CPU backend:
//! the matrix dequantised into a buffer that each thread keeps between
//! calls, then one `gemm` call (the crate burn's CPU backend multiplies
//! with), without a burn tensor in between.
//!
//! Why: through burn, every prefill product dequantised into a freshly
//! allocated, zeroed vector (page faults and a memset per matrix), made a
//! tensor of it and multiplied by its transpose; on Gemma 3 at 512 tokens
//! the faults, zeroing and copies were about 8% of a profile's samples,
//! and the prefill runs about 1.3x as fast this way (docs/results.md,
//! session 18). The numbers are the same: the same dequantised rows and the
//! same `gemm` kernels.

use std::cell::RefCell;

use super::QuantMatrix;
use crate::error::ModelError;

/// The largest matrix (in values, 32 MB) whose buffer a thread keeps: every
/// projection of the reference models; an output head over a large
/// vocabulary (Gemma 3's is 671 MB in f32) gets a buffer of its own that is
/// freed after the product.
const KEPT_MAX: usize = 8 << 20;

thread_local! {
    /// The dequantised matrix of the last call on this thread, reused so its
    /// pages stay mapped (it grows to the largest matrix multiplied here).
    static DEQUANTISED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl QuantMatrix {
    /// `y = x W^T` in f32 through a dense GEMM of the dequantised rows.
    ///
    /// # Shapes
    /// - `x`: `[T, cols]` row-major
    /// - returns `[T, rows]` row-major
    pub fn matmul_dequantised(&self, x: &[f32]) -> Result<Vec<f32>, ModelError> {
        let cols = self.cols;
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(ModelError::InvalidInput(format!(
                "activations of {} values are not rows of {cols}",
                x.len()
            )));
        }
        let t = x.len() / cols;
        if self.rows * cols > KEPT_MAX {
            // an output head over a whole window (evaluation): not kept
            return Ok(self.gemm_with(x, t, &mut Vec::new()));
        }
        DEQUANTISED.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buf) => Ok(self.gemm_with(x, t, &mut buf)),
            // re-entered on this thread: a buffer of its own
            Err(_) => Ok(self.gemm_with(x, t, &mut Vec::new())),
        })
    }

    fn gemm_with(&self, x: &[f32], t: usize, buf: &mut Vec<f32>) -> Vec<f32> {
        let (rows, cols) = (self.rows, self.cols);
        if buf.len() < rows * cols {
            buf.resize(rows * cols, 0.0);
        }
        self.dequantize_into(buf);
        if t == 0 || rows == 0 {
            return vec![0f32; t * rows];
        }
        // written whole by the GEMM (not zeroed first: a prefill's output
        // is megabytes)
        let mut out: Vec<f32> = Vec::with_capacity(t * rows);
        // dst [t, rows] = lhs [t, cols] x rhs [cols, rows], where
        // rhs[k, n] = W[n, k] = buf[n * cols + k]
        // SAFETY: every pointer covers the extent its strides address: out's
        // capacity is t * rows, x holds t * cols, buf at least rows * cols
        // values; dst is not read (read_dst false) and overlaps nothing.
        unsafe {
            gemm::gemm(
                t,
                rows,
                cols,
                out.as_mut_ptr(),
                1,
                rows as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                buf.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
            // SAFETY: the GEMM wrote all t * rows values (read_dst false)
            out.set_len(t * rows);
        }
        out
    }
}
