//! Rows that fail inside SQL at run time are isolated and dead-lettered; the rest flows.

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;

use crate::common::{read_ndjson, read_parquet, run_pipeline};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn division_by_zero_rows_go_to_the_dead_letter_sink() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = r#"
[pipeline]
name = "div"
batch_size = 500

[sources.orders]
type = "generator"
shape = "orders"
count = 5000

[transforms.ratio]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, 1000 / (order_id % 100) AS ratio FROM orders"

[sinks.out]
type = "file"
inputs = ["ratio"]
path = "${OUT}/out"

[dead_letter]
type = "file"
path = "${OUT}/dlq"
"#;
    let summary = run_pipeline(pipeline, dir.path()).await.unwrap();
    let batches = read_parquet(&dir.path().join("out"));
    let mut ids: Vec<i64> =
        batches.iter().flat_map(|(_, b)| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
    ids.sort_unstable();
    let expected: Vec<i64> = (1..=5000).filter(|i| i % 100 != 0).collect();
    assert_eq!(ids, expected);
    let dead = read_ndjson(&dir.path().join("dlq"));
    let mut dead_ids: Vec<u64> = dead.iter().map(|d| d["position"]["index"].as_u64().unwrap() + 1).collect();
    dead_ids.sort_unstable();
    assert_eq!(dead_ids, (1..=50).map(|i| i * 100).collect::<Vec<u64>>());
    for d in &dead {
        assert_eq!(d["stage"], "transform");
        assert_eq!(d["component"], "ratio");
        assert!(d["error"].as_str().unwrap().to_lowercase().contains("divide by zero"), "{d}");
        let row: serde_json::Value = serde_json::from_str(d["raw"].as_str().unwrap()).unwrap();
        assert_eq!(row["order_id"].as_u64().unwrap(), d["position"]["index"].as_u64().unwrap() + 1);
    }
    assert_eq!(summary.dead_lettered(), 50);
}
