//! Matrix products against weights kept in their GGUF block formats.
//!
//! Why: a decode step reads every weight once. Dequantised to f32 at load,
//! SmolLM2's Q4_1 weights are about 540 MB per step; kept as blocks they are
//! about 98 MB, the file's size, and the step is bound by that read. So on
//! CPU backends the model keeps each projection as a [`QuantMatrix`] (bytes
//! shared with the file's map) and multiplies against the blocks: each weight
//! row is dequantised into a buffer that stays in L1 and dotted with the
//! activations ([`Numerics::F32`], the default, as accurate as the f32 model),
//! or the activations are quantised to 8 bits per block and dotted in
//! integers as llama.cpp does ([`Numerics::Q8`], which reproduces llama.cpp's
//! logits on the quantised file). Rows are split over rayon's threads.
//!
//! On CPUs with AVX-512 VNNI the rows are held in tiles of 16
//! (`interleave.rs`) and both numerics run integer kernels there: q8 with
//! one quantised row per token, f32 with three (`q8::digits`: each
//! quantises what the ones before it left over, so their products add up
//! to the f32 product to within f32's rounding; 1.4x-2.2x the f32 row
//! kernels' decode speed, docs/results.md).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(feature = "flex")]
mod dense_gemm;
mod interleave;
mod kernel;
mod q8;

use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::gguf::{dequantize_into, GgmlType, TensorBytes};
use crate::huge_pages::HugeBytes;
use kernel::{Activations, Isa};
pub(crate) use q8::f16_round;

/// How activations meet quantised weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Numerics {
    /// f32 activations against dequantised weight rows: the f32 model's
    /// numbers (up to summation order); on tiles, the activations as three
    /// 8-bit digits per block, the same numbers up to f32's rounding.
    #[default]
    F32,
    /// Activations quantised to 8 bits per block (Q8_0 / Q8_1 / Q8_K by the
    /// weight type) and integer block products, as llama.cpp's CPU backend.
    Q8,
}

impl std::str::FromStr for Numerics {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "q8" => Ok(Self::Q8),
            other => Err(format!("unknown matmul numerics `{other}` (f32 or q8)")),
        }
    }
}

impl std::fmt::Display for Numerics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Q8 => "q8",
        })
    }
}

/// Rows per parallel task: enough work per task to hide scheduling, enough
/// tasks to balance two to sixteen threads on 192..49,152-row matrices.
const ROWS_PER_TASK: usize = 32;

/// A weight matrix of `rows` outputs by `cols` inputs, each row the GGUF
/// blocks of one output (the file's layout: `[out][in]`).
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: TensorBytes,
    /// The rows again in tiles of 16 for the integer kernels (both numerics)
    /// ([`QuantMatrix::with_tiles`]).
    tiles: Option<Arc<interleave::Interleaved>>,
    /// The rows copied onto huge pages, read instead of `bytes`
    /// ([`QuantMatrix::on_huge_pages`]).
    huge: Option<Arc<HugeBytes>>,
}

impl QuantMatrix {
    /// Wraps a tensor's bytes; checks the row length against the block size,
    /// the byte count against the shape, and that every block scale is finite
    /// (a damaged scale is an error naming the row, as the dequantised load's
    /// check names the element).
    pub fn new(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: TensorBytes,
    ) -> Result<Self, ModelError> {
        let bad = |why: String| ModelError::Gguf(format!("tensor `{name}`: {why}"));
        if rows == 0 || cols == 0 {
            return Err(bad(format!("an empty matrix ({rows} x {cols})")));
        }
        let row_bytes = ty
            .bytes_for(cols as u64)
            .ok_or_else(|| bad(format!("rows of {cols} are not whole {ty:?} blocks")))?
            as usize;
        if rows.checked_mul(row_bytes) != Some(bytes.len()) {
            return Err(bad(format!(
                "{} bytes for {rows} rows of {row_bytes}",
                bytes.len()
            )));
        }
        let m = Self {
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
            tiles: None,
            huge: None,
        };
        m.check_finite(name)?;
        Ok(m)
    }

    fn check_finite(&self, name: &str) -> Result<(), ModelError> {
        let bad_row = (0..self.rows).into_par_iter().find_first(|&r| {
            let mut w = vec![0f32; self.cols];
            self.row_into(r, &mut w);
            w.iter().any(|v| !v.is_finite())
        });
        match bad_row {
            Some(r) => Err(ModelError::Gguf(format!(
                "tensor `{name}`: row {r} holds a value that is not finite (a damaged block?)"
            ))),
            None => Ok(()),
        }
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of the blocks (shared with the file's map).
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Adds a copy of the rows in tiles of 16 (`interleave.rs`) where the CPU
    /// has AVX-512 VNNI and the format has a tile layout (Q4_1, Q5_0, Q8_0,
    /// Q4_K, Q6_K); products in either numerics then run on the tiles
    /// (f32 numerics with the activations as digits). The copy is owned
    /// memory (about the matrix's size); the rows' pages of the file's map
    /// are given back as the tiles are made
    /// ([`TensorBytes::release_range`]): products no longer read them, and
    /// rows (an embedding lookup) and whole matrices (a long f32 prefill's
    /// GEMM) are read back from the tiles ([`QuantMatrix::row_into`]).
    pub fn with_tiles(mut self) -> Self {
        if interleave::has_vnni512() {
            // each stretch of rows is given back once tiled, so a large
            // matrix is never held twice (the output head: 178 MB on Gemma 3)
            let bytes = &self.bytes;
            self.tiles =
                interleave::Interleaved::new(self.ty, self.rows, self.cols, bytes, |at, len| {
                    bytes.release_range(at, len);
                })
                .map(Arc::new);
            // and the pages that straddle two stretches
            if self.tiles.is_some() {
                self.bytes.release_pages();
            }
        }
        self
    }

    /// Moves the rows onto huge pages (`huge_pages.rs`: a decode step
    /// streams every row once, and ran faster with the weights on 2 MiB
    /// pages) and gives the file's pages back. A no-op where the system
    /// refuses the memory.
    pub fn on_huge_pages(mut self) -> Self {
        if self.huge.is_none() {
            // copied a stretch at a time, each given back once copied
            const STRETCH: usize = 1 << 20;
            let bytes = &self.bytes;
            self.huge = HugeBytes::filled(bytes.len(), |b| {
                for (i, (to, from)) in b.chunks_mut(STRETCH).zip(bytes.chunks(STRETCH)).enumerate()
                {
                    to.copy_from_slice(from);
                    bytes.release_range(i * STRETCH, from.len());
                }
            })
            .ok()
            .map(Arc::new);
            // and the pages that straddle two stretches
            if self.huge.is_some() {
                self.bytes.release_pages();
            }
        }
        self
    }

    /// The rows' bytes: the huge-page copy where there is one.
    fn row_data(&self) -> &[u8] {
        match &self.huge {
            Some(h) => h,
            None => &self.bytes,
        }
    }

    /// Bytes of the tiled copy (0 without one).
    pub fn tile_bytes(&self) -> usize {
        self.tiles.as_ref().map_or(0, |t| t.byte_len())
    }

    /// One row dequantised into `out` (`out.len() == cols`): an embedding
    /// lookup.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        // a matrix with tiles reads its row there: the file's pages were
        // given back, and faulting them in again would bring the matrix
        // back into memory a page (or a huge page) at a time
        if let Some(t) = &self.tiles {
            if t.row_into(self.ty, r, self.cols, out) {
                return;
            }
        }
        let start = r * self.row_bytes;
        if let Some(b) = self.row_data().get(start..start + self.row_bytes) {
            dequantize_into(self.ty, b, out);
        }
    }

    /// Every row dequantised, `[rows, cols]` row-major (GPU backends and
    /// long f32 prefills hand this to a dense matmul); from the tiles where
    /// there are some ([`QuantMatrix::row_into`]).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut out);
        out
    }

    /// [`Self::dequantize`] into `out` (`[rows, cols]`, every value written).
    fn dequantize_into(&self, out: &mut [f32]) {
        let cols = self.cols.max(1);
        let out = &mut out[..self.rows * self.cols];
        if self.tiles.is_some() {
            out.par_chunks_mut(cols * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(task, o)| {
                    for (i, o) in o.chunks_exact_mut(cols).enumerate() {
                        self.row_into(task * ROWS_PER_TASK + i, o);
                    }
                });
            return;
        }
        out.par_chunks_mut(cols * ROWS_PER_TASK)
            .zip(
                self.row_data()
                    .par_chunks(self.row_bytes.max(1) * ROWS_PER_TASK),
            )
            .for_each(|(o, b)| dequantize_into(self.ty, b, o));
    }

    /// `y = x W^T`: every activation row against every weight row.
    ///
    /// # Shapes
    /// - `x`: `[T, cols]` row-major
    /// - returns `[T, rows]` row-major
    pub fn matmul(&self, x: &[f32], numerics: Numerics) -> Result<Vec<f32>, ModelError> {
        self.matmul_with(x, numerics, Isa::best())
    }

    /// [`QuantMatrix::matmul`] on a chosen copy of the kernels.
    fn matmul_with(&self, x: &[f32], numerics: Numerics, isa: Isa) -> Result<Vec<f32>, ModelError> {
        let mut out = matmul_group_with(&[self], x, numerics, isa)?;
        Ok(out.pop().unwrap_or_default())
    }
}

/// Several matrices of the same input width against the same activations,
/// in one parallel pass: a block's q, k and v projections, or its gate and
/// up, wake the threads once instead of once per matrix (a decode step runs
/// 211 products on SmolLM2, most of them small).
///
/// # Shapes
/// - `x`: `[T, cols]` row-major
/// - returns one `[T, rows_i]` row-major output per matrix
pub fn matmul_group(
    ms: &[&QuantMatrix],
    x: &[f32],
    numerics: Numerics,
) -> Result<Vec<Vec<f32>>, ModelError> {
    matmul_group_with(ms, x, numerics, Isa::best())
}

/// [`matmul_group`] in q8 numerics summed in ggml's order: the row
/// kernels (AVX2's, or the portable code, which sums in the same eight
/// lanes), never the tiles, whose sums run in another order. For Q4_1 and
/// Q8_0 weights the products are then bit for bit those of llama.cpp's x86
/// `ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0`
/// (`llama::GgmlReference`).
///
/// # Shapes
/// as [`matmul_group`]
pub(crate) fn matmul_group_ggml_order(
    ms: &[&QuantMatrix],
    x: &[f32],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let isa = if kernel::has_avx2() {
        Isa::Avx2
    } else {
        Isa::Portable
    };
    matmul_group_with(ms, x, Numerics::Q8, isa)
}

fn matmul_group_with(
    ms: &[&QuantMatrix],
    x: &[f32],
    numerics: Numerics,
    isa: Isa,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let Some(cols) = ms.first().map(|m| m.cols) else {
        return Ok(Vec::new());
    };
    if ms.iter().any(|m| m.cols != cols) {
        return Err(ModelError::InvalidInput(
            "a product group needs matrices of one input width".into(),
        ));
    }
    if cols == 0 || !x.len().is_multiple_of(cols) || x.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "{} activations are not rows of {cols}",
            x.len()
        )));
    }
    let t = x.len() / cols;
    // matrices with tiles take the tile kernel, one token at a time against
    // each group's tiles while they sit in L1: in q8 numerics always, in
    // f32 numerics with the activations as digits (`q8::digits`) unless one
    // is not finite (the f32 kernels carry it into the products)
    let use_tiles = isa == Isa::Avx512
        && interleave::has_vnni512()
        && (numerics == Numerics::Q8 || x.iter().all(|v| v.is_finite()));
    fn tiled(m: &QuantMatrix, on: bool) -> Option<&interleave::Interleaved> {
        m.tiles.as_deref().filter(|_| on)
    }
    // the quantised activations a matrix takes: q8 rows of the weight
    // type's kind in q8 numerics (float weights take f32 in either
    // numerics, as in llama.cpp), digits where f32 numerics run on tiles
    let kind_of = |m: &QuantMatrix| {
        let kind = q8::Q8Kind::for_weights(m.ty)?;
        match numerics {
            Numerics::Q8 => Some(kind),
            Numerics::F32 => tiled(m, use_tiles).map(|_| kind),
        }
    };
    let digits = match numerics {
        Numerics::Q8 => 1,
        Numerics::F32 => q8::DIGITS,
    };
    // made once per kind: `digits` rows per token, token after token
    let mut quantised: Vec<(q8::Q8Kind, Vec<q8::Q8Row>)> = Vec::new();
    for kind in ms.iter().filter_map(|m| kind_of(m)) {
        if !quantised.iter().any(|(k, _)| *k == kind) {
            let rows = match numerics {
                Numerics::Q8 => x
                    .chunks_exact(cols)
                    .map(|r| q8::quantize(kind, r))
                    .collect(),
                Numerics::F32 => x
                    .chunks_exact(cols)
                    .flat_map(|r| q8::digits(kind, r))
                    .collect(),
            };
            quantised.push((kind, rows));
        }
    }
    let sums = if ms.iter().any(|m| kind_of(m).is_none()) {
        kernel::block_sums(x, cols)
    } else {
        Vec::new()
    };
    let acts: Vec<Activations<'_>> = ms
        .iter()
        .map(|m| {
            let rows = kind_of(m).and_then(|kind| quantised.iter().find(|(k, _)| *k == kind));
            match rows {
                Some((_, rows)) => Activations::Q8(rows),
                None => Activations::F32 { x, xsum: &sums },
            }
        })
        .collect();
    // each quantised row's codes plus 128, where a tiled Q8_0 matrix needs
    // them
    let offsets: Vec<Vec<u8>> = quantised
        .iter()
        .find(|(k, _)| *k == q8::Q8Kind::Q8_0)
        .filter(|_| {
            ms.iter()
                .any(|m| m.ty == GgmlType::Q8_0 && tiled(m, use_tiles).is_some())
        })
        .map(|(_, rows)| {
            rows.iter()
                .map(|r| interleave::offset_codes(&r.qs))
                .collect()
        })
        .unwrap_or_default();
    // [rows_i, T] per matrix, split into tasks of ROWS_PER_TASK rows
    let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows * t]).collect();
    let mut tasks = Vec::new();
    for (i, (m, out)) in ms.iter().zip(outs.iter_mut()).enumerate() {
        let (w_chunk, is_tiled, w) = match tiled(m, use_tiles) {
            Some(it) => (
                ROWS_PER_TASK / interleave::GROUP * it.data.len() / (m.rows / interleave::GROUP),
                true,
                &it.data[..],
            ),
            None => (ROWS_PER_TASK * m.row_bytes, false, m.row_data()),
        };
        for (o, w) in out.chunks_mut(ROWS_PER_TASK * t).zip(w.chunks(w_chunk)) {
            tasks.push((i, is_tiled, w, o));
        }
    }
    tasks.into_par_iter().for_each_init(
        || vec![0f32; cols],
        |scratch, (i, is_tiled, w, out)| {
            let m = ms[i];
            if is_tiled {
                tile_rows(m, w, &acts[i], digits, &offsets, out);
            } else {
                kernel::rows(m.ty, cols, m.row_bytes, w, &acts[i], out, scratch, isa)
            }
        },
    );
    if t == 1 {
        return Ok(outs);
    }
    Ok(ms
        .iter()
        .zip(outs)
        .map(|(m, by_row)| transposed(&by_row, m.rows, t))
        .collect())
}

/// Square tiles of [`transposed`]: a tile's rows and columns both stay in
/// L1 (a scalar transpose of a 2,048-token product, writing one column at
/// a time, was 13% of a q8 prefill).
const TRANSPOSE_TILE: usize = 32;

/// `x` (`[rows, cols]` row-major) as `[cols, rows]` row-major, a tile at a
/// time, tiles split over threads by column stripes.
///
/// # Shapes
/// - `x`: `[rows, cols]`; returns `[cols, rows]`
fn transposed(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return y;
    }
    // each task owns TRANSPOSE_TILE output rows (input columns)
    y.par_chunks_mut(TRANSPOSE_TILE * rows)
        .enumerate()
        .for_each(|(stripe, out)| {
            let c0 = stripe * TRANSPOSE_TILE;
            let nc = out.len() / rows;
            for r0 in (0..rows).step_by(TRANSPOSE_TILE) {
                let r1 = (r0 + TRANSPOSE_TILE).min(rows);
                for c in 0..nc {
                    let o = &mut out[c * rows + r0..c * rows + r1];
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = x[(r0 + i) * cols + c0 + c];
                    }
                }
            }
        });
    y
}

/// Groups of tiles against quantised activation rows (`acts` is
/// [`Activations::Q8`], `digits` rows per token whose products add up:
/// one in q8 numerics, [`q8::DIGITS`] in f32; `offsets[k]` row k's codes
/// plus 128 where a Q8_0 matrix needs them): each group's tiles meet every
/// token before the next group is read.
///
/// # Shapes
/// - `tiles`: whole groups of `m`'s tiles; `out`: `[16 per group, T]`
fn tile_rows(
    m: &QuantMatrix,
    tiles: &[u8],
    acts: &Activations<'_>,
    digits: usize,
    offsets: &[Vec<u8>],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let (Activations::Q8(xs), Some(tb)) = (acts, interleave::tile_bytes(m.ty)) {
        let (kb, t) = (m.cols / m.ty.block().0, xs.len() / digits.max(1));
        let mut y = [0f32; interleave::GROUP];
        for (g, o) in tiles
            .chunks_exact(kb * tb)
            .zip(out.chunks_exact_mut(interleave::GROUP * t))
        {
            for k in 0..t {
                let rows = k * digits..(k + 1) * digits;
                let offset = offsets.get(rows.clone()).unwrap_or(&[]);
                // SAFETY: tiles are made only where `has_vnni512` holds, and
                // the caller checked it again; the kernel bounds every
                // access by the slices.
                unsafe { interleave::group_product(m.ty, kb, g, &xs[rows], offset, &mut y) };
                for (r, &v) in y.iter().enumerate() {
                    o[r * t + k] = v;
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, tiles, acts, digits, offsets, out);
}

#[cfg(test)]
mod tests;
