//! Bad input on the command line: every out-of-range or inapplicable value
//! ends the process before a model loads, with a non-zero exit code and a
//! first line that names the option and the reason; nothing panics.
//!
//! Runs the release-profile-independent test binary `dynakv` with an empty
//! `DYNAKV_HOME` and a model path that does not exist, so a case that got
//! past its check would fail on the model instead, and the test would see
//! the wrong option named.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let home = std::env::temp_dir().join(format!("dynakv-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dynakv"))
        .args(args)
        .env("DYNAKV_HOME", &home)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run dynakv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MODEL: &str = "/nonexistent/dynakv-test-model.gguf";

#[test]
fn every_bad_option_is_named_before_anything_loads() {
    let cases: &[(&[&str], &str)] = &[
        (&["eval", "ppl", "--ctx", "0"], "--ctx"),
        (&["eval", "ppl", "--ctx", "1"], "--ctx"),
        (&["eval", "ppl", "--matmul", "q4"], "--matmul"),
        (
            &["eval", "ppl", "--weights", "dense", "--matmul", "q8"],
            "--matmul",
        ),
        (&["eval", "ppl", "--weights", "f16"], "--weights"),
        (&["eval", "fidelity", "--ctx", "0"], "--ctx"),
        (&["eval", "ppl", "--max-windows", "0"], "--max-windows"),
        (&["eval", "ppl", "--docs", "0"], "--docs"),
        (&["eval", "ppl", "--llama-cpp", "batched"], "--matmul q8"),
        (
            &["generate", "--llama-cpp", "--prompt", "hi"],
            "--matmul q8",
        ),
        (
            &[
                "generate",
                "--llama-cpp",
                "--matmul",
                "q8",
                "--kv-dtype",
                "q4_0",
                "--prompt",
                "hi",
            ],
            "--kv-dtype f16",
        ),
        (&["eval", "ppl", "--llama-cpp", "fast"], "--llama-cpp"),
        (
            &[
                "eval",
                "ppl",
                "--llama-cpp",
                "one-token",
                "--matmul",
                "q8",
                "--kv-dtype",
                "q8_0",
            ],
            "--kv-dtype f16",
        ),
        (
            &[
                "eval",
                "ppl",
                "--llama-cpp",
                "one-token",
                "--matmul",
                "q8",
                "--snapkv",
                "0.5",
            ],
            "--kv-dtype f16",
        ),
        (
            &[
                "eval",
                "ppl",
                "--llama-cpp",
                "batched",
                "--matmul",
                "q8",
                "--kv-dtype",
                "f32",
                "--score-last",
                "8",
            ],
            "--score-last",
        ),
        (
            &[
                "eval",
                "fidelity",
                "--llama-cpp",
                "batched",
                "--matmul",
                "q8",
                "--kv-dtype",
                "f32",
            ],
            "eval ppl",
        ),
        (&["eval", "ppl", "--score-last", "1024"], "--score-last"),
        (&["eval", "ppl", "--score-last", "0"], "--score-last"),
        (&["eval", "ppl", "--score-chunk", "1"], "--score-last"),
        (
            &["eval", "ppl", "--score-last", "8", "--score-chunk", "0"],
            "--score-chunk",
        ),
        (
            &["eval", "ppl", "--skip-windows", "18446744073709551615"],
            "--skip-windows",
        ),
        (
            &[
                "eval",
                "ppl",
                "--cache",
                "full",
                "--budget",
                "7",
                "--artifact",
                "/nonexistent",
            ],
            "--budget",
        ),
        (&["eval", "ppl", "--budget", "0.3"], "--budget"),
        (
            &["eval", "ppl", "--budget", "NaN", "--cache", "dynakv"],
            "--budget",
        ),
        (&["eval", "ppl", "--artifact", "/nonexistent"], "--artifact"),
        (&["eval", "ppl", "--cache", "dynakv"], "--artifact"),
        (
            &[
                "eval",
                "ppl",
                "--cache",
                "dynakv",
                "--artifact",
                "/nonexistent/a.st",
            ],
            "/nonexistent/a.st",
        ),
        (&["eval", "ppl", "--snapkv", "1"], "--snapkv"),
        (
            &["eval", "ppl", "--snapkv-capacity", "0"],
            "--snapkv-capacity",
        ),
        (&["eval", "ppl", "--basis-dtype", "f32"], "--basis-dtype"),
        (&["eval", "ppl", "--snapkv-whole", "0.5"], "--snapkv-whole"),
        (&["eval", "ppl", "--snapkv-whole", "2"], "--snapkv-whole"),
        (
            &["eval", "ppl", "--snapkv", "0.5", "--snapkv-whole", "0.5"],
            "--snapkv-whole",
        ),
        (
            &["eval", "ppl", "--snapkv-on-arrival"],
            "--snapkv-on-arrival",
        ),
        (&["eval", "longctx", "--depths", "1.5"], "depth"),
        (&["eval", "longctx", "--depths", "NaN"], "depth"),
        (&["eval", "longctx", "--depths", ","], "depth"),
        (&["eval", "longctx", "--lengths", "0"], "length"),
        (&["eval", "longctx", "--tasks", ""], "task"),
        (
            &["eval", "longctx", "--keep-threshold", "2"],
            "--keep-threshold",
        ),
        (&["eval", "sweep", "--windows", "0"], "--windows"),
        (
            &[
                "eval",
                "sweep",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/tmp/o",
                "--budgets",
                "0",
            ],
            "budget",
        ),
        (
            &[
                "eval",
                "sweep",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/tmp/o",
                "--snapkv",
                "1.5",
            ],
            "SnapKV",
        ),
        (
            &[
                "eval",
                "sweep",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/tmp/o",
                "--longctx-lengths",
                "1024",
                "--longctx-depths=-1",
            ],
            "depth",
        ),
        (
            &["eval", "ranks", "--text", "x", "--budget", "0"],
            "--budget",
        ),
        (&["calibrate", "--out", "x", "--ctx", "0"], "--ctx"),
        (&["calibrate", "--out", "x", "--tokens", "0"], "--tokens"),
        (
            &["calibrate", "--out", "x", "--layers", "local"],
            "--layers",
        ),
        (
            &["calibrate", "--out", "x", "--policy-budgets", "0.3,2"],
            "policy budget",
        ),
        (&["eval", "ppl", "--layers", "most"], "--layers"),
        (&["bench", "--reps", "0"], "--reps"),
        (&["bench", "--decode-steps", "0"], "--decode-steps"),
        (&["bench", "--prefill", "512,0"], "--prefill"),
        (
            &["bench", "--paired-base", "dynakv:energy@0.3"],
            "--artifact",
        ),
        (&["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"),
        (
            &["generate", "--prompt", "hi", "--temperature=-1"],
            "--temperature",
        ),
        (
            &["generate", "--prompt", "hi", "--max-tokens", "0"],
            "--max-tokens",
        ),
        (
            &[
                "eval",
                "sweep",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/nonexistent-dir/o.jsonl",
            ],
            "--out /nonexistent-dir/o.jsonl",
        ),
        (
            &[
                "eval",
                "sweep",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/tmp",
                "--resume",
            ],
            "--out /tmp",
        ),
        (&["calibrate", "--out", "/nonexistent-dir/a.st"], "--out"),
        (
            &[
                "eval",
                "longctx",
                "--full-results",
                "/nonexistent-dir/f.json",
            ],
            "--full-results",
        ),
        (
            &[
                "eval",
                "sweep",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/tmp/o",
                "--drop-damaged",
            ],
            "required arguments",
        ),
    ];
    let train = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["train", "--artifact", "/nonexistent/a", "--out", "/tmp/x"];
        v.extend_from_slice(extra);
        v
    };
    let train_cases: Vec<(Vec<&str>, &str)> = vec![
        (train(&["--target", "0"]), "--target"),
        (train(&["--target", "0.3", "--lr", "NaN"]), "--lr"),
        (train(&["--target", "0.3", "--ctx", "0"]), "--ctx"),
        (train(&["--target", "0.3", "--steps", "0"]), "--steps"),
        (train(&["--target", "0.3", "--alpha=-1"]), "--alpha"),
        (
            vec![
                "train",
                "--artifact",
                "/nonexistent/a",
                "--out",
                "/nonexistent-dir/x",
                "--target",
                "0.3",
            ],
            "--out",
        ),
        (train(&["--target", "0.3"]), "--artifact /nonexistent/a"),
    ];
    let all = cases
        .iter()
        .map(|(a, w)| (a.to_vec(), *w))
        .chain(train_cases);
    let mut failures = Vec::new();
    for (args, want) in all {
        let mut args = args.clone();
        // every command loads a model: one that does not exist
        args.push("--model");
        args.push(MODEL);
        let (code, err) = run(&args);
        let first = err.lines().next().unwrap_or("");
        let ok = code != 0
            && code != 101
            && first.starts_with("error:")
            && first.contains(want)
            && !err.contains("panicked");
        if !ok {
            failures.push(format!("{args:?}: exit {code}, stderr: {err}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}
