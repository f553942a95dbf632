//! The fuzz corpora (fuzz/corpus/<target>/, and fuzz/regressions/<target>/ for inputs that once
//! crashed), replayed through the fuzz targets' entry points (`sluice::fuzzing`) as an ordinary
//! test: no fuzz build in CI. Each input is also replayed cut at every length (up to 512 bytes,
//! then at 257 points) and with bytes replaced at 64 places, a small deterministic sweep that
//! reaches the error paths of truncated and corrupted records.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in [root.join("corpus").join(target), root.join("regressions").join(target)] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            out.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    out.sort();
    out
}

fn variants(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![data.to_vec()];
    let cuts: Vec<usize> =
        if data.len() <= 512 { (0..data.len()).collect() } else { (0..=256).map(|i| i * data.len() / 256).collect() };
    out.extend(cuts.into_iter().map(|n| data[..n].to_vec()));
    if !data.is_empty() {
        for i in 0..64usize {
            let at = i.wrapping_mul(2_654_435_761) % data.len();
            for byte in [0x00, 0xff, b'\n', b'"', data[at].wrapping_add(1)] {
                let mut v = data.to_vec();
                v[at] = byte;
                out.push(v);
            }
        }
    }
    out
}

#[test]
fn every_fuzz_corpus_input_and_its_cuts_and_corruptions_run_clean() {
    let mut total = 0;
    for (target, run) in sluice::fuzzing::TARGETS {
        let files = inputs(target);
        assert!(!files.is_empty(), "no corpus for the fuzz target `{target}` (fuzz/make_seeds.py writes one)");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            for (k, v) in variants(&data).into_iter().enumerate() {
                total += 1;
                if catch_unwind(AssertUnwindSafe(|| run(&v))).is_err() {
                    let crash = std::env::temp_dir().join(format!("sluice-fuzz-{target}-crash"));
                    std::fs::write(&crash, &v).unwrap();
                    panic!(
                        "fuzz target `{target}` panicked on variant {k} of {} (input saved to {}; add it under \
                         fuzz/regressions/{target}/)",
                        file.display(),
                        crash.display()
                    );
                }
            }
        }
    }
    assert!(total > 1000, "only {total} inputs replayed");
}
