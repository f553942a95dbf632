//! A file pipeline over messy NDJSON: exactly the good rows that pass the filter reach Parquet
//! (decimal sums exact), and exactly the bad ones reach the dead-letter file.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Decimal128Type, Int64Type};

use crate::common::{read_ndjson, read_parquet, run_pipeline};

const N: u64 = 20_000;

/// What the generator of the messy file knows about each line.
struct Expected {
    /// order_id → amount in cents, for good rows with amount >= 10.00.
    passing: Vec<(i64, i128)>,
    /// Line numbers of bad records.
    bad_lines: BTreeSet<u64>,
    /// Line numbers that are blank (skipped, neither good nor bad).
    blank_lines: u64,
}

fn lcg(state: &mut u64) -> u64 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *state >> 33
}

fn write_messy(path: &std::path::Path) -> Expected {
    let mut s = 12345u64;
    let mut text = String::new();
    let mut exp = Expected { passing: vec![], bad_lines: BTreeSet::new(), blank_lines: 0 };
    let names = ["Zoë", "Jürgen", "Søren", "李雷", "Ólafur", "plain"];
    let mut line = 0u64;
    for id in 1..=N as i64 {
        line += 1;
        let r = lcg(&mut s) % 1000;
        let cents = (lcg(&mut s) % 5_000_000) as i128; // 0.00 .. 49999.99
        let amount = format!("{}.{:02}", cents / 100, cents % 100);
        let name = names[(lcg(&mut s) % 6) as usize];
        match r {
            // 1% broken JSON.
            0..=4 => {
                writeln!(text, "{{\"order_id\": {id}, \"amount\": \"{amount}\", \"customer\": \"{name}\"").unwrap();
                exp.bad_lines.insert(line);
            }
            5..=9 => {
                writeln!(text, "not json at all {id} {name}").unwrap();
                exp.bad_lines.insert(line);
            }
            // 1% wrong-typed values.
            10..=14 => {
                writeln!(text, "{{\"order_id\": {id}, \"amount\": \"abc\", \"customer\": \"{name}\"}}").unwrap();
                exp.bad_lines.insert(line);
            }
            15..=19 => {
                writeln!(text, "{{\"order_id\": \"id-{id}\", \"amount\": \"{amount}\", \"customer\": \"{name}\"}}")
                    .unwrap();
                exp.bad_lines.insert(line);
            }
            // Null and missing `not null` field.
            20..=22 => {
                writeln!(text, "{{\"order_id\": null, \"amount\": \"{amount}\"}}").unwrap();
                exp.bad_lines.insert(line);
            }
            23..=25 => {
                writeln!(text, "{{\"amount\": \"{amount}\", \"customer\": \"{name}\"}}").unwrap();
                exp.bad_lines.insert(line);
            }
            // Null amount (nullable): good, filtered out by the SQL.
            26..=60 => writeln!(text, "{{\"order_id\": {id}, \"amount\": null, \"customer\": \"{name}\"}}").unwrap(),
            // Missing nullable fields and extra fields: good.
            61..=100 => {
                writeln!(
                    text,
                    "{{\"order_id\": {id}, \"amount\": {amount}, \"extra\": {{\"deep\": [1, 2]}}, \"more\": true}}"
                )
                .unwrap();
                if cents >= 1000 {
                    exp.passing.push((id, cents));
                }
            }
            _ => {
                writeln!(text, "{{\"customer\": \"{name}\", \"order_id\": {id}, \"amount\": \"{amount}\", \"ts\": \"2026-02-03T04:05:06\"}}").unwrap();
                if cents >= 1000 {
                    exp.passing.push((id, cents));
                }
            }
        }
        if r == 999 {
            text.push('\n');
            line += 1;
            exp.blank_lines += 1;
        }
    }
    std::fs::write(path, text).unwrap();
    exp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messy_ndjson_splits_exactly_into_good_rows_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("messy.ndjson");
    let exp = write_messy(&input);
    let pipeline = format!(
        r#"
[pipeline]
name = "messy"
batch_size = 1000

[sources.orders]
type = "file"
path = "{}"
format = {{ type = "json" }}

[sources.orders.schema]
order_id = "bigint not null"
amount = "decimal(12,2)"
customer = "varchar"
ts = "timestamp"

[transforms.big]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, amount, customer, ts FROM orders WHERE amount >= 10"

[sinks.lake]
type = "file"
inputs = ["big"]
path = "${{OUT}}/lake"

[dead_letter]
type = "file"
path = "${{OUT}}/dlq"
"#,
        input.display()
    );
    let summary = run_pipeline(&pipeline, dir.path()).await.unwrap();

    let batches = read_parquet(&dir.path().join("lake"));
    let mut got: Vec<(i64, i128)> = Vec::new();
    let mut non_ascii = 0;
    for (_, b) in &batches {
        let ids = b.column(0).as_primitive::<Int64Type>();
        let amounts = b.column(1).as_primitive::<Decimal128Type>();
        let customers = b.column(2).as_string::<i32>();
        for i in 0..b.num_rows() {
            got.push((ids.value(i), amounts.value(i)));
            if customers.is_valid(i) && !customers.value(i).is_ascii() {
                non_ascii += 1;
            }
        }
    }
    got.sort_unstable();
    assert_eq!(got.len(), exp.passing.len());
    assert_eq!(got, exp.passing, "exactly the good rows that pass the filter");
    let sum: i128 = got.iter().map(|g| g.1).sum();
    let expected_sum: i128 = exp.passing.iter().map(|g| g.1).sum();
    assert_eq!(sum, expected_sum, "decimal sums are exact");
    assert!(non_ascii > 1000, "non-ASCII text survives: {non_ascii}");

    let dead = read_ndjson(&dir.path().join("dlq"));
    let lines: BTreeSet<u64> = dead.iter().map(|d| d["position"]["line"].as_u64().unwrap()).collect();
    assert_eq!(dead.len(), exp.bad_lines.len(), "each bad record dead-lettered once");
    assert_eq!(lines, exp.bad_lines, "exactly the bad lines");
    let raw_text = std::fs::read_to_string(&input).unwrap();
    let raw_lines: Vec<&str> = raw_text.lines().collect();
    for d in &dead {
        let line = d["position"]["line"].as_u64().unwrap() as usize;
        assert_eq!(d["raw"].as_str().unwrap(), raw_lines[line - 1], "raw bytes kept");
        assert_eq!(d["raw_encoding"], "utf8");
        assert_eq!(d["component"], "orders");
        assert_eq!(d["position"]["file"], input.display().to_string());
        assert!(matches!(d["stage"].as_str().unwrap(), "decode" | "convert"), "{d}");
        assert!(!d["error"].as_str().unwrap().is_empty());
    }
    let abc = dead.iter().find(|d| d["raw"].as_str().unwrap().contains("\"abc\"")).unwrap();
    assert_eq!(abc["stage"], "convert", "{abc}");
    assert_eq!(summary.component("orders").unwrap().dead_lettered as usize, exp.bad_lines.len());
    let good_read = summary.component("orders").unwrap().records_out;
    assert_eq!(
        good_read + exp.bad_lines.len() as u64 + exp.blank_lines,
        line_count(&raw_text),
        "every line accounted for"
    );
    // All positions committed to the last line once both sinks made their files durable.
    assert_eq!(summary.committed[0].2, Some(line_count(&raw_text)));
}

fn line_count(text: &str) -> u64 {
    text.lines().count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_sink_the_first_bad_record_stops_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, "{\"id\": 1}\n{\"id\": 2}\n{\"id\": \"two\"}\n{\"id\": 4}\n").unwrap();
    let pipeline = format!(
        r#"
[pipeline]
name = "strict"
[sources.in]
type = "file"
path = "{}"
format = {{ type = "json" }}
schema = {{ id = "bigint" }}
[sinks.out]
type = "file"
inputs = ["in"]
path = "${{OUT}}/out"
"#,
        input.display()
    );
    let err = run_pipeline(&pipeline, dir.path()).await.unwrap_err().to_string();
    assert!(err.contains(&format!("{}:3", input.display())), "names file and line: {err}");
    assert!(err.contains("`in`"), "names the component: {err}");
    assert!(err.contains("dead_letter"), "says what to do: {err}");
    assert!(crate::common::files(&dir.path().join("out"), ".parquet").is_empty(), "nothing written past the failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_line_is_dead_lettered_and_reading_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.ndjson");
    let huge = format!("{{\"id\": 2, \"pad\": \"{}\"}}", "x".repeat(sluice::source::file::MAX_RECORD_BYTES + 10));
    std::fs::write(&input, format!("{{\"id\": 1}}\n{huge}\n{{\"id\": 3}}\n")).unwrap();
    let pipeline = format!(
        r#"
[pipeline]
name = "big"
[sources.in]
type = "file"
path = "{}"
format = {{ type = "json" }}
schema = {{ id = "bigint" }}
[sinks.out]
type = "file"
inputs = ["in"]
path = "${{OUT}}/out"
format = "json"
[dead_letter]
type = "file"
path = "${{OUT}}/dlq"
"#,
        input.display()
    );
    run_pipeline(&pipeline, dir.path()).await.unwrap();
    let good: Vec<i64> = read_ndjson(&dir.path().join("out")).iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(good, vec![1, 3]);
    let dead = read_ndjson(&dir.path().join("dlq"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["position"]["line"], 2);
    assert!(dead[0]["error"].as_str().unwrap().contains("record longer than"), "{}", dead[0]["error"]);
    assert_eq!(dead[0]["raw"].as_str().unwrap().len(), 4096);
}
