//! Every pipeline in `pipelines/` parses, builds and plans; the quickstart also runs.

use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Int64Type};

use crate::common::{files, read_parquet, rows};

#[tokio::test]
async fn every_example_pipeline_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let loaded = sluice::config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            sluice::runtime::build(&loaded).await.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 4, "expected the example pipelines, found {checked}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_writes_partitioned_parquet() {
    let out = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/quickstart.toml")).unwrap();
    // Same pipeline, fewer records, so the debug build stays quick.
    let text = text.replace("count = 1_000_000", "count = 100_000").replace("${SLUICE_OUT:-out}", "${OUT}");
    let summary = crate::common::run_pipeline(&text, out.path()).await.unwrap();
    assert_eq!(summary.component("orders").unwrap().records_out, 100_000);
    assert_eq!(summary.dead_lettered(), 0);
    let lake = out.path().join("quickstart");
    let batches = read_parquet(&lake);
    let n = rows(&batches);
    assert_eq!(n as u64, summary.component("paid").unwrap().records_out);
    assert!((70_000..80_000).contains(&n), "about 3/4 are not cancelled: {n}");
    let (path, first) = &batches[0];
    assert!(
        path.parent().unwrap().file_name().unwrap().to_string_lossy().starts_with("dt=2026-01-"),
        "{}",
        path.display()
    );
    let schema = first.schema();
    assert_eq!(schema.field_with_name("amount").unwrap().data_type(), &DataType::Decimal128(12, 2));
    assert!(schema.field_with_name("dt").is_err(), "partition columns live in folder names");
    let mut ids: Vec<i64> =
        batches.iter().flat_map(|(_, b)| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "no duplicates");
    assert!(files(&lake, ".inprogress").is_empty());
    // Every shard's position was committed to the end.
    assert_eq!(summary.committed, vec![("orders".to_string(), "gen-0".to_string(), Some(99_999))]);
}
