use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::gguf::dequantize;

/// Every block format the kernels take, with the byte offsets of its f16
/// scales (set to finite values; the rest of each block is random).
const TYPES: [(GgmlType, &[usize]); 11] = [
    (GgmlType::Q4_0, &[0]),
    (GgmlType::Q4_1, &[0, 2]),
    (GgmlType::Q5_0, &[0]),
    (GgmlType::Q5_1, &[0, 2]),
    (GgmlType::Q8_0, &[0]),
    (GgmlType::Q2K, &[80, 82]),
    (GgmlType::Q3K, &[108]),
    (GgmlType::Q4K, &[0, 2]),
    (GgmlType::Q5K, &[0, 2]),
    (GgmlType::Q6K, &[208]),
    (GgmlType::F16, &[]),
];

/// Random blocks for a `rows x cols` matrix of type `t`.
fn random_matrix(t: GgmlType, scales: &[usize], rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (be, bb) = t.block();
    let n_blocks = rows * cols / be;
    let mut b: Vec<u8> = (0..n_blocks * bb).map(|_| rng.random()).collect();
    for blk in b.chunks_exact_mut(bb) {
        if t == GgmlType::F16 {
            let v = f16::from_f32(rng.random_range(-1.0..1.0));
            blk.copy_from_slice(&v.to_le_bytes());
        }
        for &o in scales {
            let v = f16::from_f32(rng.random_range(-0.05..0.05));
            blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    b
}

fn matrix(
    t: GgmlType,
    scales: &[usize],
    rows: usize,
    cols: usize,
    seed: u64,
) -> (QuantMatrix, Vec<f32>) {
    let bytes = random_matrix(t, scales, rows, cols, seed);
    let dense = dequantize(t, &bytes, rows * cols).unwrap();
    let m = QuantMatrix::new("w", t, rows, cols, TensorBytes::from_bytes(&bytes).unwrap()).unwrap();
    (m, dense)
}

fn activations(t: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..t * cols).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// `x W^T` in f64 from dense rows.
fn reference(dense: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let t = x.len() / cols;
    let mut y = vec![0f64; t * rows];
    for k in 0..t {
        for r in 0..rows {
            y[k * rows + r] = (0..cols)
                .map(|i| dense[r * cols + i] as f64 * x[k * cols + i] as f64)
                .sum();
        }
    }
    y
}

fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / scale)
        .fold(0.0, f64::max)
}

/// Rows of an odd number of blocks where the format allows (17 blocks of
/// 32: the kernels' two-block loops end on a single block).
fn cols_for(t: GgmlType) -> usize {
    match t.block().0 {
        256 => 512,
        _ => 544,
    }
}

#[test]
fn f32_numerics_equal_the_dequantised_product_in_every_kernel_copy() {
    for (i, (t, scales)) in TYPES.into_iter().enumerate() {
        let (rows, cols) = (71, cols_for(t)); // odd: the Q8_0 pair kernel leaves a row
        let (m, dense) = matrix(t, scales, rows, cols, 11 + i as u64);
        for n_tok in [1, 3] {
            let x = activations(n_tok, cols, 5);
            let want = reference(&dense, &x, rows, cols);
            for isa in kernel::Isa::available() {
                let got = m.matmul_with(&x, Numerics::F32, isa).unwrap();
                let err = max_rel(&got, &want);
                assert!(err < 1e-5, "{t:?} T={n_tok} {isa:?}: {err}");
            }
        }
    }
}

/// The q8 product by its definition: activations rounded as llama.cpp
/// rounds them, then multiplied in f64 with the dequantised weights.
fn q8_reference(t: GgmlType, dense: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let kind = q8::Q8Kind::for_weights(t).unwrap();
    let blk = if kind == q8::Q8Kind::Q8K { 256 } else { 32 };
    let xq: Vec<f32> = x
        .chunks_exact(cols)
        .flat_map(|r| {
            let q = q8::quantize(kind, r);
            q.qs.iter()
                .enumerate()
                .map(|(i, &c)| c as f32 * q.d[i / blk])
                .collect::<Vec<_>>()
        })
        .collect();
    reference(dense, &xq, rows, cols)
}

#[test]
fn q8_numerics_are_integer_products_of_rounded_activations() {
    for (i, (t, scales)) in TYPES.into_iter().enumerate() {
        if q8::Q8Kind::for_weights(t).is_none() {
            continue;
        }
        let (rows, cols) = (70, cols_for(t));
        let (m, dense) = matrix(t, scales, rows, cols, 31 + i as u64);
        let x = activations(2, cols, 9);
        let want = q8_reference(t, &dense, &x, rows, cols);
        let fast = m.matmul(&x, Numerics::Q8).unwrap();
        let portable = m
            .matmul_with(&x, Numerics::Q8, kernel::Isa::Portable)
            .unwrap();
        // Q4_1's min term uses the f16-rounded code sum, as llama.cpp does
        let tol = if t == GgmlType::Q4_1 { 2e-3 } else { 1e-5 };
        let err = max_rel(&fast, &want);
        assert!(err < tol, "{t:?}: {err}");
        // the same integer sums, floats summed in another order
        let err = max_rel(
            &fast,
            &portable.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        assert!(err < 1e-6, "{t:?}: the two kernels differ by {err}");
        // and q8 stays close to the f32 product (8-bit activations)
        let exact = reference(&dense, &x, rows, cols);
        let err = max_rel(&fast, &exact);
        assert!(err < 3e-2, "{t:?} against f32: {err}");
    }
}

/// `matmul_group_ggml_order` sums as llama.cpp's x86 `ggml_vec_dot_*_q8_*`
/// (eight lanes of four-code sums, one fused multiply-add per lane per
/// block, `hsum_float_8`, Q4_1's min terms summed apart and added last):
/// equal in every bit to that order written out here, and the portable
/// copy equal to the AVX2 one, so the llama.cpp reference decoder gives the
/// same bits on any CPU.
#[test]
fn ggml_order_products_are_llama_cpps_bits_in_every_copy() {
    for (i, t) in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0]
        .into_iter()
        .enumerate()
    {
        let scales: &[usize] = if t == GgmlType::Q4_1 { &[0, 2] } else { &[0] };
        let (rows, cols) = (40, 256);
        let bytes = random_matrix(t, scales, rows, cols, 71 + i as u64);
        let m =
            QuantMatrix::new("w", t, rows, cols, TensorBytes::from_bytes(&bytes).unwrap()).unwrap();
        let x = activations(1, cols, 5 + i as u64);
        let got = matmul_group_ggml_order(&[&m], &x).unwrap().remove(0);
        for isa in kernel::Isa::available()
            .into_iter()
            .filter(|&i| i != kernel::Isa::Avx512)
        {
            let copy = matmul_group_with(&[&m], &x, Numerics::Q8, isa)
                .unwrap()
                .remove(0);
            let same = copy
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{t:?}: the {isa:?} copy sums in another order");
        }
        let xq = q8::quantize(q8::Q8Kind::for_weights(t).unwrap(), &x);
        let (_, bb) = t.block();
        for (r, row) in bytes.chunks_exact(bytes.len() / rows).enumerate() {
            let (mut lanes, mut summs) = ([0f32; 8], 0f32);
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let f = |o: usize| f16::from_le_bytes([blk[o], blk[o + 1]]).to_f32();
                let code = |j: usize| -> i32 {
                    match t {
                        GgmlType::Q8_0 => blk[2 + j] as i8 as i32,
                        _ => {
                            let q = blk[bb - 16 + j % 16];
                            let v = if j < 16 { q & 15 } else { q >> 4 } as i32;
                            if t == GgmlType::Q4_0 {
                                v - 8
                            } else {
                                v
                            }
                        }
                    }
                };
                let dd = f(0) * xq.d[b];
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let s: i32 = (4 * l..4 * l + 4)
                        .map(|j| code(j) * xq.qs[32 * b + j] as i32)
                        .sum();
                    *lane = dd.mul_add(s as f32, *lane);
                }
                if t == GgmlType::Q4_1 {
                    summs += f(2) * xq.s[b];
                }
            }
            let h = [0, 1, 2, 3].map(|k| lanes[k] + lanes[k + 4]);
            let want = (h[0] + h[2]) + (h[1] + h[3]) + summs;
            assert_eq!(got[r].to_bits(), want.to_bits(), "{t:?} row {r}");
        }
    }
}

#[test]
fn float_weights_take_f32_activations_in_q8_numerics() {
    let (m, _) = matrix(GgmlType::F16, &[], 8, 64, 3);
    let x = activations(1, 64, 4);
    assert_eq!(
        m.matmul(&x, Numerics::Q8).unwrap(),
        m.matmul(&x, Numerics::F32).unwrap()
    );
}

#[test]
fn bad_shapes_and_damaged_scales_are_errors() {
    let bytes = random_matrix(GgmlType::Q4_1, &[0, 2], 4, 64, 1);
    let tb = TensorBytes::from_bytes(&bytes).unwrap();
    // rows of 48 are not whole blocks; the byte count must match the shape
    assert!(QuantMatrix::new("w", GgmlType::Q4_1, 4, 48, tb.clone()).is_err());
    assert!(QuantMatrix::new("w", GgmlType::Q4_1, 5, 64, tb.clone()).is_err());
    let empty = TensorBytes::from_bytes(&[]).unwrap();
    assert!(QuantMatrix::new("w", GgmlType::Q4_1, 0, 64, empty.clone()).is_err());
    assert!(QuantMatrix::new("w", GgmlType::Q4_1, 4, 0, empty).is_err());
    let m = QuantMatrix::new("w", GgmlType::Q4_1, 4, 64, tb).unwrap();
    assert!(m.matmul(&[0.0; 63], Numerics::F32).is_err());
    assert!(m.matmul(&[], Numerics::F32).is_err());
    // an Inf scale in row 2 (blocks 4 and 5)
    let mut damaged = bytes.clone();
    damaged[4 * 20..4 * 20 + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
    let err = QuantMatrix::new(
        "blk.0.attn_q.weight",
        GgmlType::Q4_1,
        4,
        64,
        TensorBytes::from_bytes(&damaged).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("row 2"),
        "{err}"
    );
}

#[test]
fn rows_and_full_dequantisation_match_the_reader() {
    let (m, dense) = matrix(GgmlType::Q4K, &[0, 2], 40, 256, 8);
    assert_eq!(m.dequantize(), dense);
    let mut row = vec![0f32; 256];
    m.row_into(17, &mut row);
    assert_eq!(row, dense[17 * 256..18 * 256]);
}

#[test]
fn rows_on_huge_pages_give_the_same_rows_and_products() {
    for (t, scales, rows, cols) in [
        (GgmlType::Q4K, &[0usize, 2][..], 40, 256),
        (GgmlType::Q4_1, &[0, 2][..], 48, 544),
    ] {
        let (m, dense) = matrix(t, scales, rows, cols, 9);
        let moved = m.clone().on_huge_pages();
        assert!(moved.huge.as_ref().is_some_and(|h| h.len() == m.byte_len()));
        assert_eq!(moved.dequantize(), dense, "{t:?}");
        let mut row = vec![0f32; cols];
        moved.row_into(rows - 1, &mut row);
        assert_eq!(row, dense[(rows - 1) * cols..], "{t:?}");
        for numerics in [Numerics::F32, Numerics::Q8] {
            for n_tok in [1, 3] {
                let x = activations(n_tok, cols, 10);
                assert_eq!(
                    moved.matmul(&x, numerics).unwrap(),
                    m.matmul(&x, numerics).unwrap(),
                    "{t:?} {numerics} T={n_tok}"
                );
            }
        }
    }
}

#[test]
fn a_group_equals_its_products_one_by_one() {
    let cols = 512;
    let ms: Vec<QuantMatrix> = [
        (GgmlType::Q4_1, &[0usize, 2][..], 40),
        (GgmlType::Q8_0, &[0][..], 33),
        (GgmlType::Q4K, &[0, 2][..], 7),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (t, sc, rows))| matrix(t, sc, rows, cols, 50 + i as u64).0)
    .collect();
    let refs: Vec<&QuantMatrix> = ms.iter().collect();
    for numerics in [Numerics::F32, Numerics::Q8] {
        for n_tok in [1, 3] {
            let x = activations(n_tok, cols, 77);
            let group = matmul_group(&refs, &x, numerics).unwrap();
            for (m, g) in ms.iter().zip(&group) {
                assert_eq!(&m.matmul(&x, numerics).unwrap(), g, "{numerics} T={n_tok}");
            }
        }
    }
    let (other, _) = matrix(GgmlType::Q8_0, &[0], 4, 256, 1);
    assert!(matmul_group(&[&ms[0], &other], &activations(1, cols, 1), Numerics::F32).is_err());
}

#[test]
fn tiles_give_the_row_kernels_products_in_both_numerics() {
    // 48 rows: three groups of 16; 17 blocks a row (3 superblocks for Q6_K)
    for (t, scales, cols) in [
        (GgmlType::Q4_1, &[0usize, 2][..], 544),
        (GgmlType::Q8_0, &[0][..], 544),
        (GgmlType::Q5_0, &[0][..], 544),
        (GgmlType::Q6K, &[208][..], 768),
        (GgmlType::Q4K, &[0, 2][..], 768),
    ] {
        let (m, dense) = matrix(t, scales, 48, cols, 61);
        let tiled = m.clone().with_tiles();
        assert_eq!(tiled.tile_bytes() > 0, interleave::has_vnni512(), "{t:?}");
        let x = activations(1, cols, 62);
        let rows = m.matmul(&x, Numerics::Q8).unwrap();
        let tiles = tiled.matmul(&x, Numerics::Q8).unwrap();
        // the same integer sums, floats summed in another order
        let err = max_rel(&tiles, &rows.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(err < 1e-5, "{t:?}: {err}");
        // f32 numerics on the tiles (three digits of activations) are the
        // f32 product: as close to f64 as the f32 row kernels, where one
        // digit (q8) is not
        let want = reference(&dense, &x, 48, cols);
        for (n_tok, x) in [(1, &x), (3, &activations(3, cols, 64))] {
            let want = reference(&dense, x, 48, cols);
            let digits = max_rel(&tiled.matmul(x, Numerics::F32).unwrap(), &want);
            let f32_rows = max_rel(&m.matmul(x, Numerics::F32).unwrap(), &want);
            // both about 1e-7 here; two digits would be about 1e-5
            assert!(
                digits < 5e-7 && digits < 3.0 * f32_rows.max(1e-7),
                "{t:?} T={n_tok}: digits {digits}, f32 rows {f32_rows}"
            );
        }
        assert!(max_rel(&tiles, &want) > 1e-4, "{t:?}: one digit is q8");
        // a value that is not finite reaches the products, as in the rows
        let mut bad = x.clone();
        bad[5] = f32::NAN;
        let y = tiled.matmul(&bad, Numerics::F32).unwrap();
        assert!(y.iter().all(|v| v.is_nan()), "{t:?}");
        // rows and whole matrices read back from the tiles (the file's pages
        // were given back) are the file's, to the bit
        if tiled.tile_bytes() > 0 {
            let mut got = vec![0f32; cols];
            for r in [0, 17, 47] {
                tiled.row_into(r, &mut got);
                assert_eq!(got, dense[r * cols..(r + 1) * cols], "{t:?} row {r}");
            }
            assert_eq!(tiled.dequantize(), dense, "{t:?}");
        }
        // several tokens (a prefill) do, each token's outputs in its row
        let x3 = activations(3, cols, 63);
        let rows = m.matmul(&x3, Numerics::Q8).unwrap();
        let tiles = tiled.matmul(&x3, Numerics::Q8).unwrap();
        let err = max_rel(&tiles, &rows.iter().map(|&v| v as f64).collect::<Vec<_>>());
        assert!(err < 1e-5, "{t:?}, three tokens: {err}");
    }
    // rows that are not whole groups, and formats without tiles, keep none
    let (m, _) = matrix(GgmlType::Q4_1, &[0, 2], 40, 64, 1);
    assert_eq!(m.with_tiles().tile_bytes(), 0);
    let (m, _) = matrix(GgmlType::Q5K, &[0, 2], 32, 256, 1);
    assert_eq!(m.with_tiles().tile_bytes(), 0);
}

#[test]
fn the_tiled_transpose_moves_every_element() {
    // whole and partial tiles both ways, and a single row or column
    for (rows, cols) in [(70, 45), (32, 64), (1, 40), (40, 1), (3, 3)] {
        let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let y = transposed(&x, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(y[c * rows + r], x[r * cols + c], "{rows}x{cols} at {r},{c}");
            }
        }
    }
}

/// The long-prefill GEMM on dequantised rows against the f64 product, for
/// tiled and untiled formats, with the kept buffer reused across a larger
/// and then a smaller matrix (a stale tail must not leak in), and a bad
/// activation length as an error.
#[cfg(feature = "flex")]
#[test]
fn the_dequantised_gemm_equals_the_product() {
    let shapes = [
        (GgmlType::Q4_1, 97, 544),
        (GgmlType::Q6K, 40, 512),
        (GgmlType::Q8_0, 33, 96),
    ];
    for (i, (t, rows, cols)) in shapes.into_iter().enumerate() {
        let scales = TYPES.iter().find(|(ty, _)| *ty == t).unwrap().1;
        let (m, dense) = matrix(t, scales, rows, cols, 40 + i as u64);
        let m = m.with_tiles();
        for n_tok in [1, 70] {
            let x = activations(n_tok, cols, 9);
            let got = m.matmul_dequantised(&x).unwrap();
            assert_eq!(got.len(), n_tok * rows);
            let err = max_rel(&got, &reference(&dense, &x, rows, cols));
            assert!(err < 1e-5, "{t:?} T={n_tok}: {err}");
        }
        assert!(m.matmul_dequantised(&activations(1, cols + 1, 9)).is_err());
    }
}
