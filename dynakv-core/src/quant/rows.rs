//! Rows of one width packed one after another in one format.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kivi::{decode_kivi_row, encode_kivi_block, kivi_block_bytes};
use super::{KvDtype, RowCodec, QBLOCK};

/// Rows of integer codes in blocks (q8_0, q4_0, mixed) read in place
/// ([`PackedRows::code_bytes`]).
#[derive(Debug, Clone)]
pub struct CodeRows<'a> {
    /// Every row's bytes, one after another: `[rows, row_bytes]`.
    pub bytes: &'a [u8],
    pub row_bytes: usize,
    dim: usize,
    /// Whether the first block, and the others, hold 8-bit codes.
    eight: [bool; 2],
}

impl CodeRows<'_> {
    /// Where each block of a row lies (the same in every row), computed,
    /// not stored: a kernel asks for them once per tile of rows.
    pub fn blocks(&self) -> impl Iterator<Item = CodeBlock> + '_ {
        let whole = |eight| {
            2 + CodeBlock {
                at: 0,
                n: QBLOCK,
                eight,
            }
            .code_bytes()
        };
        let (first, rest) = (whole(self.eight[0]), whole(self.eight[1]));
        (0..self.dim.div_ceil(QBLOCK)).map(move |b| CodeBlock {
            at: match b {
                0 => 0,
                _ => first + (b - 1) * rest,
            },
            n: (self.dim - b * QBLOCK).min(QBLOCK),
            eight: self.eight[(b > 0) as usize],
        })
    }
}

/// One block of a row of codes: at byte `at` of the row, its scale (a
/// little-endian f16), then its `n` codes (32, fewer in a row's last block
/// when the width is no multiple of 32). `eight`: one `i8` per byte (q8_0);
/// else 4-bit (q4_0): `ceil(n / 2)` bytes whose low nibbles are codes
/// `0..ceil(n / 2)` and whose high nibbles the rest, each nibble less 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeBlock {
    pub at: usize,
    pub n: usize,
    pub eight: bool,
}

impl CodeBlock {
    /// Bytes of the block's codes, after its scale.
    pub fn code_bytes(&self) -> usize {
        if self.eight {
            self.n
        } else {
            self.n.div_ceil(2)
        }
    }
}

/// Rows of `dim` values packed one after another in one format; `f32` rows
/// stay `f32` so the lossless path reads them without decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedRows {
    codec: RowCodec,
    dim: usize,
    rows: usize,
    data: RowData,
}

#[derive(Debug, Clone, PartialEq)]
enum RowData {
    F32(Vec<f32>),
    /// f16 rows as `f16` values, so a row converts with one SIMD call (F16C
    /// where the CPU has it) instead of value by value.
    F16(Vec<f16>),
    Bytes {
        bytes: Vec<u8>,
        row_bytes: usize,
    },
    /// KIVI: full blocks of [`QBLOCK`] rows, then the open block's rows as
    /// f16 bytes.
    Blocks {
        full: Vec<u8>,
        open: Vec<u8>,
        per_channel: bool,
    },
}

impl PackedRows {
    pub fn new(codec: RowCodec, dim: usize) -> Self {
        let data = match &codec {
            c if c.is_f32() => RowData::F32(Vec::new()),
            RowCodec::Plain(KvDtype::F16) => RowData::F16(Vec::new()),
            RowCodec::Kivi { per_channel } => RowData::Blocks {
                full: Vec::new(),
                open: Vec::new(),
                per_channel: *per_channel,
            },
            c => RowData::Bytes {
                bytes: Vec::new(),
                row_bytes: c.row_bytes(dim),
            },
        };
        Self {
            codec,
            dim,
            rows: 0,
            data,
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn codec(&self) -> &RowCodec {
        &self.codec
    }

    /// Appends rows.
    ///
    /// # Shapes
    /// - `x`: `[n, dim]` row-major (a partial row is ignored)
    pub fn push(&mut self, x: &[f32]) {
        if self.dim == 0 {
            return;
        }
        let n = x.len() / self.dim;
        match &mut self.data {
            RowData::F32(v) => v.extend_from_slice(&x[..n * self.dim]),
            RowData::F16(v) => {
                let at = v.len();
                v.resize(at + n * self.dim, f16::ZERO);
                v[at..].convert_from_f32_slice(&x[..n * self.dim]);
            }
            RowData::Bytes { bytes, .. } => {
                for row in x.chunks_exact(self.dim) {
                    self.codec.encode(row, bytes);
                }
            }
            RowData::Blocks {
                full,
                open,
                per_channel,
            } => {
                let d = self.dim;
                for row in x[..n * d].chunks_exact(d) {
                    row.iter()
                        .for_each(|v| open.extend(f16::from_f32(*v).to_le_bytes()));
                    if open.len() == 2 * QBLOCK * d {
                        let rows: Vec<f32> = open
                            .chunks_exact(2)
                            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                            .collect();
                        encode_kivi_block(&rows, d, *per_channel, full);
                        open.clear();
                    }
                }
            }
        }
        self.rows += n;
    }

    /// Appends the rows of `other`, which has the same codec and width.
    pub fn append(&mut self, other: &PackedRows) {
        debug_assert!(self.codec == other.codec && self.dim == other.dim);
        match (&mut self.data, &other.data) {
            (RowData::F32(a), RowData::F32(b)) => a.extend_from_slice(b),
            (RowData::F16(a), RowData::F16(b)) => a.extend_from_slice(b),
            (RowData::Bytes { bytes: a, .. }, RowData::Bytes { bytes: b, .. }) => {
                a.extend_from_slice(b)
            }
            // blocks of 32 rows do not concatenate: re-encode
            _ => return self.push(&other.to_f32()),
        }
        self.rows += other.rows;
    }

    /// Rows `first..first + m`, row-major: borrowed for `f32` storage, else
    /// decoded into `buf` (`[m * dim]` at least; f16 in one conversion).
    #[inline]
    pub fn rows<'a>(&'a self, first: usize, m: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let d = self.dim;
        match &self.data {
            RowData::F32(v) => &v[first * d..(first + m) * d],
            RowData::F16(v) => {
                let out = &mut buf[..m * d];
                v[first * d..(first + m) * d].convert_to_f32_slice(out);
                out
            }
            _ => {
                for k in 0..m {
                    self.row(first + k, &mut buf[k * d..(k + 1) * d]);
                }
                &buf[..m * d]
            }
        }
    }

    /// Row `i`: borrowed for `f32` storage, else decoded into `buf`
    /// (`[dim]` at least).
    #[inline]
    pub fn row<'a>(&'a self, i: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let d = self.dim;
        match &self.data {
            RowData::F32(v) => &v[i * d..(i + 1) * d],
            RowData::F16(v) => {
                let out = &mut buf[..d];
                v[i * d..(i + 1) * d].convert_to_f32_slice(out);
                out
            }
            RowData::Bytes { bytes, row_bytes } => {
                let out = &mut buf[..d];
                self.codec
                    .decode(&bytes[i * row_bytes..(i + 1) * row_bytes], out);
                out
            }
            RowData::Blocks {
                full,
                open,
                per_channel,
            } => {
                let out = &mut buf[..d];
                let bb = kivi_block_bytes(d, *per_channel);
                let closed = full.len() / bb.max(1) * QBLOCK;
                if i < closed {
                    let b = i / QBLOCK;
                    decode_kivi_row(&full[b * bb..(b + 1) * bb], i % QBLOCK, *per_channel, out);
                } else {
                    let at = (i - closed) * 2 * d;
                    for (o, b) in out.iter_mut().zip(open[at..at + 2 * d].chunks_exact(2)) {
                        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
                out
            }
        }
    }

    /// Row `i`'s integer codes and block scales ([`RowCodec::decode_codes`]);
    /// `false`, writing nothing, when the rows are not stored as blocks of
    /// codes, `i` is past the last row or `codes` is shorter than a row.
    ///
    /// # Shapes
    /// `codes`: `[dim]` at least; `scales`: `[ceil(dim / 32)]` at least.
    #[inline]
    pub fn row_codes(&self, i: usize, codes: &mut [i8], scales: &mut [f32]) -> bool {
        if i >= self.rows || codes.len() < self.dim {
            return false;
        }
        match &self.data {
            RowData::Bytes { bytes, row_bytes } if self.codec.has_block_codes() => {
                self.codec.decode_codes(
                    &bytes[i * row_bytes..(i + 1) * row_bytes],
                    &mut codes[..self.dim],
                    scales,
                )
            }
            _ => false,
        }
    }

    /// Rows of block codes (q8_0, q4_0, mixed) read in place: the bytes
    /// and where each block lies ([`CodeBlock`]); `None` for another
    /// format.
    ///
    /// Why: [`Self::row_codes`] copies each block's codes and widens each
    /// scale through a call; a decode kernel reading every stored latent of
    /// a layer on every step reads them where they are instead.
    pub fn code_bytes(&self) -> Option<CodeRows<'_>> {
        let RowData::Bytes { bytes, row_bytes } = &self.data else {
            return None;
        };
        if !self.codec.has_block_codes() {
            return None;
        }
        let eight = match self.codec {
            RowCodec::Mixed => [true, false],
            _ => [self.codec == RowCodec::Plain(KvDtype::Q8_0); 2],
        };
        let rows = CodeRows {
            bytes: &bytes[..self.rows * row_bytes],
            row_bytes: *row_bytes,
            dim: self.dim,
            eight,
        };
        // the layout must account for every byte of a row
        let end = rows
            .blocks()
            .last()
            .map_or(0, |b| b.at + 2 + b.code_bytes());
        (end == *row_bytes).then_some(rows)
    }

    /// Whether [`Self::row_codes`] reads these rows.
    pub fn has_block_codes(&self) -> bool {
        matches!(self.data, RowData::Bytes { .. }) && self.codec.has_block_codes()
    }

    /// The `f32` rows themselves, when stored as `f32`.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            RowData::F32(v) => Some(v),
            RowData::F16(_) | RowData::Bytes { .. } | RowData::Blocks { .. } => None,
        }
    }

    /// The `f16` rows themselves, when stored as `f16`: kernels with F16C
    /// read them in place instead of decoding row by row.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match &self.data {
            RowData::F16(v) => Some(v),
            RowData::F32(_) | RowData::Bytes { .. } | RowData::Blocks { .. } => None,
        }
    }

    /// Every row decoded.
    ///
    /// # Shapes
    /// returns `[len, dim]` row-major
    pub fn to_f32(&self) -> Vec<f32> {
        if let RowData::F32(v) = &self.data {
            return v.clone();
        }
        let mut out = vec![0f32; self.rows * self.dim];
        let mut buf = vec![0f32; self.dim];
        for (i, o) in out.chunks_exact_mut(self.dim.max(1)).enumerate() {
            o.copy_from_slice(self.row(i, &mut buf));
        }
        out
    }

    /// The rows `rows`, in that order, without re-encoding (KIVI blocks,
    /// grouped over 32 rows, are decoded and encoded again).
    pub fn gather(&self, rows: &[usize]) -> Self {
        let data = match &self.data {
            RowData::F32(v) => RowData::F32(
                rows.iter()
                    .flat_map(|&i| &v[i * self.dim..(i + 1) * self.dim])
                    .copied()
                    .collect(),
            ),
            RowData::F16(v) => RowData::F16(
                rows.iter()
                    .flat_map(|&i| &v[i * self.dim..(i + 1) * self.dim])
                    .copied()
                    .collect(),
            ),
            RowData::Bytes { bytes, row_bytes } => RowData::Bytes {
                bytes: rows
                    .iter()
                    .flat_map(|&i| &bytes[i * row_bytes..(i + 1) * row_bytes])
                    .copied()
                    .collect(),
                row_bytes: *row_bytes,
            },
            RowData::Blocks { .. } => {
                let mut buf = vec![0f32; self.dim];
                let kept: Vec<f32> = rows
                    .iter()
                    .flat_map(|&i| self.row(i, &mut buf).to_vec())
                    .collect();
                let mut out = Self::new(self.codec.clone(), self.dim);
                out.push(&kept);
                return out;
            }
        };
        Self {
            codec: self.codec.clone(),
            dim: self.dim,
            rows: rows.len(),
            data,
        }
    }

    /// Bytes the rows take in their format (scales included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            RowData::Blocks { full, open, .. } => full.len() + open.len(),
            _ => self.rows * self.codec.row_bytes(self.dim),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::kivi::kivi_block_bytes;
    use super::*;
    use crate::quant::numbers;
    #[test]
    fn packed_rows_gather_and_decode_what_was_pushed() {
        let (dim, n) = (40, 6);
        let x = numbers(dim * n, 9);
        for dtype in KvDtype::ALL {
            let codec = RowCodec::kv(dtype, true);
            let mut rows = PackedRows::new(codec.clone(), dim);
            rows.push(&x[..dim * 2]);
            rows.push(&x[dim * 2..]);
            assert_eq!(rows.len(), n);
            if !dtype.is_token_blocked() {
                assert_eq!(rows.bytes(), n * dtype.row_bytes(dim));
            }
            let all = rows.to_f32();
            let mut buf = vec![0f32; dim];
            for i in 0..n {
                let want = codec.round_trip(&x[i * dim..(i + 1) * dim]);
                assert_eq!(rows.row(i, &mut buf), &want[..]);
                assert_eq!(&all[i * dim..(i + 1) * dim], &want[..]);
            }
            let g = rows.gather(&[4, 1]);
            assert_eq!(g.len(), 2);
            assert_eq!(
                g.row(0, &mut buf).to_vec(),
                rows.row(4, &mut vec![0.0; dim])
            );
            if dtype.is_lossless() {
                assert_eq!(all, x);
            }
        }
    }

    /// Rows of codes read in place, as their layout says, give
    /// `row_codes`' codes and scales: q8_0, q4_0 and mixed, widths ending
    /// mid-block (odd and even tails) and on one; other formats none.
    #[test]
    fn code_rows_read_in_place_equal_their_codes() {
        for codec in [
            RowCodec::Plain(KvDtype::Q8_0),
            RowCodec::Plain(KvDtype::Q4_0),
            RowCodec::Mixed,
        ] {
            for dim in [40, 37, 64, 5] {
                let n = 5;
                let x = numbers(dim * n, dim as u64);
                let mut rows = PackedRows::new(codec.clone(), dim);
                rows.push(&x);
                let c = rows.code_bytes().unwrap();
                assert_eq!(c.bytes.len(), n * c.row_bytes);
                assert_eq!(c.blocks().count(), dim.div_ceil(32));
                let (mut codes, mut scales) = (vec![0i8; dim], vec![0f32; 2]);
                for i in 0..n {
                    assert!(rows.row_codes(i, &mut codes, &mut scales));
                    let row = &c.bytes[i * c.row_bytes..(i + 1) * c.row_bytes];
                    for (b, k) in c.blocks().enumerate() {
                        let scale = f16::from_le_bytes([row[k.at], row[k.at + 1]]);
                        assert_eq!(scale.to_f32(), scales[b]);
                        let body = &row[k.at + 2..];
                        let got: Vec<i8> = if k.eight {
                            body[..k.n].iter().map(|&q| q as i8).collect()
                        } else {
                            let half = k.n.div_ceil(2);
                            let lo = body[..half].iter().map(|&q| (q & 15) as i8 - 8);
                            let hi = body[..k.n - half].iter().map(|&q| (q >> 4) as i8 - 8);
                            lo.chain(hi).collect()
                        };
                        assert_eq!(got, &codes[b * 32..b * 32 + k.n], "{codec:?} {dim}");
                    }
                }
            }
        }
        let mut f16_rows = PackedRows::new(RowCodec::Plain(KvDtype::F16), 8);
        f16_rows.push(&[1.0; 8]);
        assert!(f16_rows.code_bytes().is_none());
    }

    #[test]
    fn kivi_blocks_hold_3_bits_a_value_and_round_to_their_groups() {
        let (dim, n) = (40, 70); // two full blocks and 6 open rows; a short group
        let x = numbers(dim * n, 3);
        for per_channel in [true, false] {
            let mut rows = PackedRows::new(RowCodec::Kivi { per_channel }, dim);
            rows.push(&x[..dim * 33]);
            rows.push(&x[dim * 33..]);
            assert_eq!(rows.len(), n);
            let block = kivi_block_bytes(dim, per_channel);
            assert_eq!(rows.bytes(), 2 * block + 6 * 2 * dim);
            if per_channel {
                assert_eq!(block, 12 * dim, "3 bits a value");
            }
            let mut buf = vec![0f32; dim];
            for i in 0..n {
                let got = rows.row(i, &mut buf).to_vec();
                let want = &x[i * dim..(i + 1) * dim];
                for (c, (a, b)) in got.iter().zip(want).enumerate() {
                    // the group's range over 3 steps, halved, plus f16 rounding
                    let group: Vec<f32> = if i >= 64 {
                        vec![*b]
                    } else if per_channel {
                        (0..32).map(|t| x[((i / 32) * 32 + t) * dim + c]).collect()
                    } else {
                        let g0 = c / 32 * 32;
                        want[g0..(g0 + 32).min(dim)].to_vec()
                    };
                    let (lo, hi) = group
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                            (l.min(v), h.max(v))
                        });
                    let tol = (hi - lo) / 6.0 * 1.02 + 4e-3 * b.abs().max(1.0);
                    assert!(
                        (a - b).abs() <= tol,
                        "{per_channel} row {i} col {c}: {a} vs {b}"
                    );
                }
            }
            // pruning re-encodes the kept rows
            let kept = rows.gather(&[0, 5, 40, 69]);
            assert_eq!(kept.len(), 4);
            assert_eq!(kept.bytes(), 4 * 2 * dim, "an open block again");
            assert_eq!(
                kept.row(3, &mut buf).to_vec(),
                rows.row(69, &mut vec![0.0; dim])
            );
        }
    }
}
