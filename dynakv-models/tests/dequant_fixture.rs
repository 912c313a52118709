//! Every supported ggml block format against the independent `gguf` PyPI
//! package's `dequantize` (fixture: tools/make_dequant_fixture.py).

use dynakv_models::gguf::{dequantize, GgmlType};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_format_matches_the_gguf_package() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/dequant.json")).unwrap();
    let types = [
        ("F32", GgmlType::F32),
        ("F16", GgmlType::F16),
        ("BF16", GgmlType::BF16),
        ("Q4_0", GgmlType::Q4_0),
        ("Q4_1", GgmlType::Q4_1),
        ("Q8_0", GgmlType::Q8_0),
        ("Q4_K", GgmlType::Q4K),
        ("Q6_K", GgmlType::Q6K),
        ("Q5_0", GgmlType::Q5_0),
        ("Q5_1", GgmlType::Q5_1),
        ("Q2_K", GgmlType::Q2K),
        ("Q3_K", GgmlType::Q3K),
        ("Q5_K", GgmlType::Q5K),
    ];
    for (name, t) in types {
        let case = &fixture[name];
        let n = case["n"].as_u64().unwrap() as usize;
        let bytes = hex(case["hex"].as_str().unwrap());
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = dequantize(t, &bytes, n).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let tol = 1e-6 * w.abs().max(1.0);
            assert!((g - w).abs() <= tol, "{name}[{i}]: got {g}, want {w}");
        }
    }
}
