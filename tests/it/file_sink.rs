//! The file sink: Hive partitions, rotation, formats, atomic files.

use std::collections::BTreeMap;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;

use crate::common::{files, read_parquet, rows, run_pipeline};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_and_rotates_by_rows() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = r#"
[pipeline]
name = "parts"
batch_size = 500

[sources.orders]
type = "generator"
shape = "orders"
count = 20000
shards = 2

[sinks.out]
type = "file"
inputs = ["orders"]
path = "${OUT}/out"
partition_by = ["country"]
rotate = { max_rows = 300 }
compression = "snappy"
"#;
    run_pipeline(pipeline, dir.path()).await.unwrap();
    let batches = read_parquet(&dir.path().join("out"));
    assert_eq!(rows(&batches), 20_000);
    let mut per_file: BTreeMap<_, usize> = BTreeMap::new();
    for (p, b) in &batches {
        *per_file.entry(p.clone()).or_default() += b.num_rows();
        assert!(b.schema().field_with_name("country").is_err());
    }
    let folders: std::collections::BTreeSet<String> =
        per_file.keys().map(|p| p.parent().unwrap().file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(folders.len(), 12, "{folders:?}");
    assert!(folders.contains("country=DE"));
    // Rotation happens after the batch that reaches max_rows, so a file holds < max_rows + batch.
    assert!(per_file.values().all(|&n| n < 300 + 500), "{per_file:?}");
    assert!(per_file.values().filter(|&&n| n >= 300).count() >= 24, "full files were rotated: {per_file:?}");
    assert!(per_file.len() > 48, "rotation made several files per folder and shard: {}", per_file.len());
    // Deterministic names: part-{shard}-{first position}.
    for p in per_file.keys() {
        let name = p.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("part-gen-0-") || name.starts_with("part-gen-1-"), "{name}");
    }
    let mut ids: Vec<i64> =
        batches.iter().flat_map(|(_, b)| b.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=20_000).collect::<Vec<_>>());
    assert!(files(dir.path(), ".inprogress").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_and_gzip_json_outputs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = r#"
[pipeline]
name = "formats"

[sources.clicks]
type = "generator"
shape = "clickstream"
count = 3000

[sinks.csv]
type = "file"
inputs = ["clicks"]
path = "${OUT}/csv"
format = "csv"

[sinks.json]
type = "file"
inputs = ["clicks"]
path = "${OUT}/json"
format = "json"
compression = "gzip"
"#;
    run_pipeline(pipeline, dir.path()).await.unwrap();
    let csv_files = files(&dir.path().join("csv"), ".csv");
    assert_eq!(csv_files.len(), 1);
    let text = std::fs::read_to_string(&csv_files[0]).unwrap();
    assert!(
        text.starts_with("event_id,user_id,session_id,event_type,url,referrer,duration_ms,ts\n"),
        "{}",
        &text[..100]
    );
    assert_eq!(text.lines().count(), 3001);
    let gz = files(&dir.path().join("json"), ".ndjson.gz");
    assert_eq!(gz.len(), 1);
    let mut s = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(std::fs::File::open(&gz[0]).unwrap()), &mut s)
        .unwrap();
    let lines: Vec<serde_json::Value> = s.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3000);
    assert_eq!(lines[0]["event_id"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_csv_and_parquet_files_back() {
    let dir = tempfile::tempdir().unwrap();
    // First write Parquet and CSV with the generator, then read both back as file sources.
    let write = r#"
[pipeline]
name = "w"
[sources.g]
type = "generator"
shape = "orders"
count = 4000
[sinks.pq]
type = "file"
inputs = ["g"]
path = "${OUT}/pq"
[sinks.csv]
type = "file"
inputs = ["g"]
path = "${OUT}/csv"
format = "csv"
"#;
    run_pipeline(write, dir.path()).await.unwrap();
    let read = r#"
[pipeline]
name = "r"
[sources.pq]
type = "file"
path = "${OUT}/pq/*.parquet"
format = { type = "parquet" }
[sources.csv]
type = "file"
path = "${OUT}/csv/*.csv"
format = { type = "csv" }
[sources.csv.schema]
order_id = "bigint not null"
customer_id = "varchar not null"
amount = "decimal(12,2)"
currency = "varchar"
country = "varchar"
status = "varchar"
quantity = "int"
ts = "timestamp"
[transforms.pq_sum]
type = "sql"
inputs = ["pq"]
query = "SELECT count(*) AS n, sum(amount) AS total FROM pq"
[transforms.csv_sum]
type = "sql"
inputs = ["csv"]
query = "SELECT count(*) AS n, sum(amount) AS total FROM csv"
[sinks.a]
type = "file"
inputs = ["pq_sum"]
path = "${OUT}/a"
format = "json"
[sinks.b]
type = "file"
inputs = ["csv_sum"]
path = "${OUT}/b"
format = "json"
"#;
    let summary = run_pipeline(read, dir.path()).await.unwrap();
    assert_eq!(summary.component("pq").unwrap().records_out, 4000);
    assert_eq!(summary.component("csv").unwrap().records_out, 4000);
    let total = |d: &str| -> (u64, String) {
        let rows = crate::common::read_ndjson(&dir.path().join(d));
        (
            rows.iter().map(|r| r["n"].as_u64().unwrap()).sum(),
            rows.iter().map(|r| r["total"].to_string()).collect::<Vec<_>>().join("+"),
        )
    };
    let (na, ta) = total("a");
    let (nb, tb) = total("b");
    assert_eq!((na, nb), (4000, 4000));
    assert_eq!(ta, tb, "the same decimal sums per batch from Parquet and CSV");
}

/// Which columns of the first row group of a generator -> Parquet run are dictionary-encoded,
/// with `dictionary` set to `mode` (left out when empty) and batches of `batch_size` rows.
async fn dictionary_columns(mode: &str, batch_size: usize) -> BTreeMap<String, bool> {
    use parquet::basic::Encoding;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let dir = tempfile::tempdir().unwrap();
    let setting = if mode.is_empty() { String::new() } else { format!("dictionary = \"{mode}\"") };
    let pipeline = format!(
        r#"
[pipeline]
name = "dict"
batch_size = {batch_size}

[sources.orders]
type = "generator"
shape = "orders"
count = 20000

[sinks.out]
type = "file"
inputs = ["orders"]
path = "${{OUT}}/out"
{setting}
"#
    );
    run_pipeline(&pipeline, dir.path()).await.unwrap();
    let parquet_files = files(&dir.path().join("out"), ".parquet");
    assert_eq!(parquet_files.len(), 1);
    let reader = SerializedFileReader::new(std::fs::File::open(&parquet_files[0]).unwrap()).unwrap();
    let row_group = reader.metadata().row_group(0);
    let mut dictionary = BTreeMap::new();
    for col in row_group.columns() {
        let uses = col.encodings().any(|e| matches!(e, Encoding::RLE_DICTIONARY | Encoding::PLAIN_DICTIONARY));
        dictionary.insert(col.column_path().string(), uses);
    }
    dictionary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mostly_distinct_columns_are_written_without_a_dictionary() {
    // `auto`, set or by default.
    for (mode, batch_size) in [("auto", 8192), ("", 8192)] {
        let dictionary = dictionary_columns(mode, batch_size).await;
        // Unique ids and timestamps: plain; a handful of countries and statuses: dictionary.
        let context = format!("dictionary = {mode:?}, batch_size = {batch_size}: {dictionary:?}");
        assert_eq!(dictionary.get("order_id"), Some(&false), "{context}");
        assert_eq!(dictionary.get("ts"), Some(&false), "{context}");
        assert_eq!(dictionary.get("country"), Some(&true), "{context}");
        assert_eq!(dictionary.get("status"), Some(&true), "{context}");
    }
    // `always`: every column starts with a dictionary.
    let dictionary = dictionary_columns("always", 8192).await;
    assert!(dictionary.values().all(|&d| d), "{dictionary:?}");
}
