//! Memory is bounded by configuration, not by input size: ten times the records, the same peak.
//! (Small sink buffers, so both runs fill them: the bound is what is being checked.)

use crate::common::sluice;

/// Runs generator → SQL → partitioned Parquet over `count` records and returns the peak RSS the
/// run summary reports, in bytes.
fn peak_rss(count: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        format!(
            r#"[pipeline]
name = "mem"
memory_budget = "32MiB"

[sources.orders]
type = "generator"
shape = "orders"
count = {count}

[transforms.t]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, customer_id, amount, country, ts FROM orders WHERE status <> 'cancelled'"

[sinks.lake]
type = "file"
inputs = ["t"]
path = "{}"
partition_by = ["country"]
row_group_bytes = "4MiB"
buffer_bytes = "8MiB"
"#,
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let out = sluice().args(["run", "--no-progress"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    crate::common::peak_rss_mib(&stderr) * 1048576.0
}

#[test]
fn peak_memory_does_not_grow_with_input_size() {
    let small = peak_rss(200_000);
    let large = peak_rss(2_000_000);
    eprintln!("peak RSS: 200k records {:.1} MiB, 2M records {:.1} MiB", small / 1048576.0, large / 1048576.0);
    assert!(large < small * 1.5 + 16.0 * 1048576.0, "peak RSS grew with input: {small} → {large}");
    assert!(large < 400.0 * 1048576.0, "peak RSS {large} is far above the configured budgets");
}
