//! The Kafka source and sink against a real Kafka-protocol broker (tansu, started by
//! scripts/test.sh), with records produced and read back by an independent client
//! (confluent-kafka, tests/kafka_tool.py).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::{Decimal128Type, Int64Type};

use crate::common::{files, read_ndjson, read_parquet, rows, samples, sluice};

/// The broker the test script started.
pub(crate) fn brokers() -> String {
    std::env::var("SLUICE_TEST_KAFKA").expect(
        "SLUICE_TEST_KAFKA is not set: run the tests with scripts/test.sh, which starts a Kafka-protocol broker",
    )
}

/// Runs tests/kafka_tool.py with the test virtualenv's Python; returns its stdout.
fn tool(args: &[&str]) -> String {
    crate::common::python_tool("kafka_tool.py", args)
}

/// A topic name no other test (or earlier run against the same broker) uses.
pub(crate) fn topic(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

pub(crate) fn create(topic: &str, partitions: usize) {
    create_on(&brokers(), topic, partitions);
}

pub(crate) fn create_on(brokers: &str, topic: &str, partitions: usize) {
    tool(&["create", "--brokers", brokers, "--topic", topic, "--partitions", &partitions.to_string()]);
}

pub(crate) struct Manifest {
    /// order id → amount in cents, for every good record.
    pub good: HashMap<i64, i64>,
    pub bad: Vec<i64>,
}

pub(crate) fn produce(
    topic: &str,
    partitions: usize,
    count: usize,
    start: usize,
    bad_every: usize,
    dir: &Path,
) -> Manifest {
    produce_with(topic, partitions, count, start, bad_every, dir, &[])
}

/// [`produce`] with more arguments of `kafka_tool.py produce` (`--format avro`, ...).
pub(crate) fn produce_with(
    topic: &str,
    partitions: usize,
    count: usize,
    start: usize,
    bad_every: usize,
    dir: &Path,
    extra: &[&str],
) -> Manifest {
    produce_to(&brokers(), topic, partitions, count, start, bad_every, dir, extra)
}

/// [`produce_with`] to another broker than the test script's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn produce_to(
    brokers: &str,
    topic: &str,
    partitions: usize,
    count: usize,
    start: usize,
    bad_every: usize,
    dir: &Path,
    extra: &[&str],
) -> Manifest {
    let manifest = dir.join(format!("manifest-{start}.json"));
    let (p, c, s, e) = (partitions.to_string(), count.to_string(), start.to_string(), bad_every.to_string());
    let mut args = vec![
        "produce",
        "--brokers",
        brokers,
        "--topic",
        topic,
        "--partitions",
        &p,
        "--count",
        &c,
        "--start",
        &s,
        "--bad-every",
        &e,
        "--manifest",
        manifest.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tool(&args);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    Manifest {
        good: v["good"].as_object().unwrap().iter().map(|(k, c)| (k.parse().unwrap(), c.as_i64().unwrap())).collect(),
        bad: v["bad"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect(),
    }
}

/// partition → (committed offset, end offset) of `group` on `topic`.
pub(crate) fn offsets(topic: &str, group: &str) -> BTreeMap<i32, (i64, i64)> {
    offsets_on(&brokers(), topic, group)
}

/// Records in `topic`, all partitions: what was produced, retries included. The test producer
/// runs without idempotence (tansu), so a retried request under load can write a record twice;
/// an exactly-once sink then rightly holds both copies.
pub(crate) fn topic_records(topic: &str) -> i64 {
    offsets(topic, "sluice-test-end-offsets").values().map(|(_, end)| end).sum()
}

/// [`offsets`] on the broker at `brokers`.
pub(crate) fn offsets_on(brokers: &str, topic: &str, group: &str) -> BTreeMap<i32, (i64, i64)> {
    let out = tool(&["offsets", "--brokers", brokers, "--topic", topic, "--group", group]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(p, pair)| (p.parse().unwrap(), (pair[0].as_i64().unwrap(), pair[1].as_i64().unwrap())))
        .collect()
}

pub(crate) fn run_bounded(pipeline: &Path) -> std::process::Output {
    let out = sluice().args(["run", "--bounded", "--no-progress"]).arg(pipeline).output().unwrap();
    assert!(
        out.status.success(),
        "sluice run --bounded failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn order_pipeline(topic: &str, group: &str, out: &Path, extra_sink: &str) -> String {
    format!(
        r#"
[pipeline]
name = "kafka-it"
batch_size = 5000

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
format = {{ type = "json" }}
metadata = ["key", "partition", "offset"]

[sources.orders.schema]
order_id = "bigint not null"
customer = "varchar"
amount = "decimal(10,2) not null"
status = "varchar not null"

[transforms.kept]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, customer, amount, status, _key, _partition, _offset FROM orders WHERE status <> 'cancelled'"

[sinks.lake]
type = "file"
inputs = ["kept"]
path = "{out}/lake"
{extra_sink}

[dead_letter]
type = "file"
path = "{out}/dead"
"#,
        brokers = brokers(),
        out = out.display()
    )
}

/// (order id, amount cents, key) of every row written.
fn lake_rows(dir: &Path) -> Vec<(i64, i64, String)> {
    let mut out = Vec::new();
    for (_, b) in read_parquet(dir) {
        let ids = b.column_by_name("order_id").unwrap().as_primitive::<Int64Type>().clone();
        let amounts = b.column_by_name("amount").unwrap().as_primitive::<Decimal128Type>().clone();
        let keys = b.column_by_name("_key").unwrap().as_string::<i32>().clone();
        for i in 0..b.num_rows() {
            out.push((ids.value(i), amounts.value(i) as i64, keys.value(i).to_string()));
        }
    }
    out
}

#[test]
fn bounded_run_writes_the_good_rows_dead_letters_the_bad_and_commits_the_end_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("orders");
    create(&t, 6);
    let m = produce(&t, 6, 200_000, 1, 100, dir.path());
    assert_eq!(m.bad.len(), 2000);
    let group = format!("{t}-g");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, order_pipeline(&t, &group, dir.path(), "")).unwrap();
    let run = run_bounded(&pipeline);
    let summary = String::from_utf8_lossy(&run.stderr).to_string();

    let got = lake_rows(&dir.path().join("lake"));
    let expected: BTreeMap<i64, i64> =
        m.good.iter().filter(|(id, _)| *id % 4 != 2).map(|(id, cents)| (*id, *cents)).collect(); // status "cancelled" is i % 4 == 2
    assert_eq!(got.len(), expected.len(), "rows written; the run said:\n{summary}");
    let got_map: BTreeMap<i64, i64> = got.iter().map(|(id, c, _)| (*id, *c)).collect();
    assert_eq!(got_map.len(), got.len(), "no duplicates");
    assert_eq!(got_map, expected, "every kept record with its exact amount");
    assert!(got.iter().all(|(id, _, key)| key == &format!("order-{id}")), "keys carried as metadata");
    let sum: i64 = got.iter().map(|(_, c, _)| c).sum();
    assert_eq!(sum, expected.values().sum::<i64>(), "decimal sum exact");

    let dead = read_ndjson(&dir.path().join("dead"));
    assert_eq!(dead.len(), m.bad.len(), "every bad record dead-lettered once");
    let mut dead_keys: Vec<String> = dead.iter().map(|d| d["key"].as_str().unwrap().to_string()).collect();
    dead_keys.sort();
    let mut bad_keys: Vec<String> = m.bad.iter().map(|i| format!("order-{i}")).collect();
    bad_keys.sort();
    assert_eq!(dead_keys, bad_keys);
    for d in &dead {
        let pos = &d["position"];
        assert_eq!(pos["topic"], t.as_str());
        assert!(pos["partition"].as_i64().unwrap() < 6 && pos["offset"].as_i64().is_some(), "{d}");
        assert!(["decode", "convert"].contains(&d["stage"].as_str().unwrap()), "{d}");
        assert!(!d["raw"].as_str().unwrap().is_empty());
    }

    let committed = offsets(&t, &group);
    assert_eq!(committed.len(), 6);
    for (p, (c, end)) in &committed {
        assert_eq!(c, end, "partition {p}: committed offset equals the end offset");
    }

    // A second bounded run finds nothing new to read.
    std::fs::remove_dir_all(dir.path().join("lake")).unwrap();
    run_bounded(&pipeline);
    assert_eq!(rows(&read_parquet(&dir.path().join("lake"))), 0, "positions were resumed from the commits");

    // `sluice reset` rewinds the group; a time before every record is the same as earliest.
    for (to, want_start) in [("earliest", true), ("latest", false), ("2001-01-01T00:00:00Z", true)] {
        let out = sluice().args(["reset", "--to", to]).arg(&pipeline).output().unwrap();
        assert!(out.status.success(), "reset --to {to}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 6, "one line per partition");
        for (p, (c, end)) in offsets(&t, &group) {
            assert_eq!(c, if want_start { 0 } else { end }, "reset --to {to}: partition {p}");
        }
    }
}

#[test]
fn after_kill_9_a_rerun_loses_nothing_and_duplicates_only_what_was_uncommitted() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("crash");
    create(&t, 3);
    let m = produce(&t, 3, 60_000, 1, 0, dir.path());
    let group = format!("{t}-g");
    let pipeline = dir.path().join("p.toml");
    // Small files commit often, so the kill lands between commits.
    std::fs::write(&pipeline, order_pipeline(&t, &group, dir.path(), "rotate = { max_rows = 2000 }")).unwrap();
    let mut child = sluice().args(["run", "--no-progress"]).arg(&pipeline).spawn().unwrap();
    let started = Instant::now();
    loop {
        let written = files(&dir.path().join("lake"), ".parquet").len();
        if written >= 5 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no output after 120 s");
        assert!(child.try_wait().unwrap().is_none(), "sluice exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = offsets(&t, &group);
    let committed: i64 = at_kill.values().map(|(c, _)| (*c).max(0)).sum();
    let total: i64 = at_kill.values().map(|(_, e)| *e).sum();
    assert_eq!(total, 60_000);
    assert!(committed < total, "the kill happened before everything was committed");
    let uncommitted = total - committed;

    run_bounded(&pipeline);
    let got = lake_rows(&dir.path().join("lake"));
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for (id, _, _) in &got {
        *counts.entry(*id).or_default() += 1;
    }
    let expected: Vec<i64> = m.good.keys().copied().filter(|id| id % 4 != 2).collect();
    for id in &expected {
        assert!(counts.contains_key(id), "order {id} lost");
    }
    assert_eq!(counts.len(), expected.len());
    let duplicates = got.len() - counts.len();
    assert!(
        duplicates as i64 <= uncommitted,
        "{duplicates} duplicates, but only {uncommitted} records were uncommitted at the kill"
    );
    assert!(files(&dir.path().join("lake"), ".inprogress").is_empty());
    for (p, (c, end)) in offsets(&t, &group) {
        assert_eq!(c, end, "partition {p} fully committed after the rerun");
    }
}

#[test]
fn kafka_to_kafka_keeps_keys_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (topic("k2k-in"), topic("k2k-out"));
    create(&input, 4);
    create(&output, 2);
    let m = produce(&input, 4, 5000, 1, 0, dir.path());
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"
[pipeline]
name = "k2k"

[sources.orders]
type = "kafka"
brokers = "{b}"
topics = ["{input}"]
format = {{ type = "json" }}
metadata = ["key", "headers", "timestamp"]
schema = {{ order_id = "bigint not null", amount = "decimal(10,2)", status = "varchar" }}

[transforms.big]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, amount * 2 AS doubled, status, _key, _headers FROM orders"

[sinks.out]
type = "kafka"
inputs = ["big"]
brokers = "{b}"
topic = "{output}"
key = "_key"
headers = ["status"]
"#,
            b = brokers()
        ),
    )
    .unwrap();
    run_bounded(&pipeline);
    let expect = m.good.len().to_string();
    let lines = tool(&["read", "--brokers", &brokers(), "--topic", &output, "--expect", &expect]);
    let msgs: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(msgs.len(), m.good.len());
    let mut seen = std::collections::HashSet::new();
    for msg in &msgs {
        let value: serde_json::Value = serde_json::from_str(msg["value"].as_str().unwrap()).unwrap();
        let id = value["order_id"].as_i64().unwrap();
        assert!(seen.insert(id), "order {id} twice");
        assert_eq!(msg["key"], format!("order-{id}"), "{msg}");
        assert_eq!(msg["headers"]["source"], "test", "source header passed through: {msg}");
        let status = ["paid", "shipped", "cancelled", "refunded"][(id % 4) as usize];
        assert_eq!(msg["headers"]["status"], status, "header from a column: {msg}");
        assert!(value.get("status").is_none(), "header columns stay out of the value: {value}");
        let cents = m.good[&id];
        let doubled = (value["doubled"].as_f64().unwrap() * 100.0).round() as i64;
        assert_eq!(doubled, cents * 2, "{value}");
        assert!(value.get("_key").is_none() && value.get("_headers").is_none(), "metadata stays out of the value");
    }
}

#[test]
fn messages_the_producer_refuses_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (topic("refuse-in"), topic("refuse-out"));
    create(&input, 1);
    create(&output, 1);
    produce(&input, 1, 300, 1, 0, dir.path());
    let pipeline = dir.path().join("p.toml");
    // A 200-byte message cap: the orders with a long customer name do not fit.
    std::fs::write(
        &pipeline,
        format!(
            r#"
[pipeline]
name = "refuse"

[sources.orders]
type = "kafka"
brokers = "{b}"
topics = ["{input}"]
format = {{ type = "string" }}

[transforms.pad]
type = "sql"
inputs = ["orders"]
query = "SELECT CASE WHEN value LIKE '%Zo%' THEN concat(value, repeat('x', 2000)) ELSE value END AS value FROM orders"

[sinks.out]
type = "kafka"
inputs = ["pad"]
brokers = "{b}"
topic = "{output}"
format = "string"
librdkafka_options = {{ "message.max.bytes" = "1000" }}

[dead_letter]
type = "file"
path = "{out}/dead"
"#,
            b = brokers(),
            out = dir.path().display()
        ),
    )
    .unwrap();
    run_bounded(&pipeline);
    let dead = read_ndjson(&dir.path().join("dead"));
    let long = (1..=300).filter(|i| i % 11 == 0).count();
    assert_eq!(dead.len(), long, "{dead:?}");
    assert!(
        dead.iter().all(|d| d["stage"] == "write" && d["error"].as_str().unwrap().contains("too large")),
        "{dead:?}"
    );
    let expect = (300 - long).to_string();
    let lines = tool(&["read", "--brokers", &brokers(), "--topic", &output, "--expect", &expect]);
    assert_eq!(lines.lines().count(), 300 - long);
}

/// tansu 0.6 implements InitProducerId but not EndTxn: a transactional sink must stop at its first
/// commit with an error that says so, and commit none of the input.
#[test]
fn a_transactional_sink_on_a_broker_without_transactions_stops_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (topic("txn-in"), topic("txn-out"));
    create(&input, 2);
    create(&output, 1);
    produce(&input, 2, 2000, 1, 0, dir.path());
    let group = format!("{input}-g");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            r#"
[pipeline]
name = "txn"
batch_size = 500

[sources.orders]
type = "kafka"
brokers = "{b}"
topics = ["{input}"]
group_id = "{group}"
format = {{ type = "string" }}

[sinks.out]
type = "kafka"
inputs = ["orders"]
brokers = "{b}"
topic = "{output}"
format = "string"
transactional_id = "it-{output}"
transaction_interval = "200ms"
"#,
            b = brokers()
        ),
    )
    .unwrap();
    let out = sluice().args(["run", "--bounded", "--no-progress"]).arg(&pipeline).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "a runtime failure: {err}");
    assert!(
        err.contains("component `out`")
            && err.contains(&format!("transactional_id `it-{output}`"))
            && err.contains("do not support Kafka transactions"),
        "{err}"
    );
    for (p, (committed, end)) in offsets(&input, &group) {
        assert!(committed < 1, "partition {p}: offset {committed} of {end} committed past a failed transaction");
    }
}

#[test]
fn validate_explains_kafka_settings() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        r#"
[pipeline]
name = "v"

[sources.k]
type = "kafka"
brokers = "127.0.0.1:1"
topics = ["t"]
start = "yesterday"
format = { type = "json" }
schema = { a = "bigint" }

[sinks.out]
type = "blackhole"
inputs = ["k"]
"#,
    )
    .unwrap();
    let out = sluice().arg("validate").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.toml:9") && err.contains("start") && err.contains("RFC 3339"), "{err}");

    std::fs::write(
        &p,
        r#"
[pipeline]
name = "v"

[sources.k]
type = "kafka"
brokers = "127.0.0.1:1"
topics = ["t"]
format = { type = "json" }

[sinks.out]
type = "blackhole"
inputs = ["k"]
"#,
    )
    .unwrap();
    let out = sluice().arg("validate").arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schema") && err.contains("need a schema"), "{err}");

    // Avro: a reader schema that is not there; a `schema` table beside it; group with partitions.
    let base = "[pipeline]\nname = \"v\"\n\n[sinks.out]\ntype = \"blackhole\"\ninputs = [\"k\"]\n\n[sources.k]\ntype = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ntopics = [\"t\"]\n";
    let avsc = dir.path().join("o.avsc");
    std::fs::write(&avsc, r#"{"type":"record","name":"O","fields":[{"name":"a","type":"long"}]}"#).unwrap();
    let cases = [
        (
            "format = { type = \"avro\", schema_file = \"/nonexistent/o.avsc\" }\n".to_string(),
            "cannot read the Avro schema `/nonexistent/o.avsc`",
        ),
        (
            format!(
                "format = {{ type = \"avro\", schema_file = \"{}\" }}\nschema = {{ a = \"bigint\" }}\n",
                avsc.display()
            ),
            "take their columns from `format.schema_file`",
        ),
        (
            "assignment = \"group\"\npartitions = [0]\nformat = { type = \"string\" }\n".to_string(),
            "the consumer group assigns the partitions",
        ),
    ];
    for (extra, want) in cases {
        std::fs::write(&p, format!("{base}{extra}")).unwrap();
        let out = sluice().arg("validate").arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {err}");
        assert!(err.contains(want), "{extra}: {err}");
    }
    // Transactions: need the idempotent producer, and a name.
    let sink = "[pipeline]\nname = \"v\"\n\n[sources.g]\ntype = \"generator\"\nshape = \"orders\"\ncount = 1\n\n[sinks.k]\ntype = \"kafka\"\ninputs = [\"g\"]\nbrokers = \"127.0.0.1:1\"\ntopic = \"t\"\n";
    for (extra, want) in [
        ("transactional_id = \"t1\"\nidempotent = false\n", "transactions need the idempotent producer"),
        ("transactional_id = \" \"\n", "transactional_id"),
        ("transaction_interval = \"1s\"\n", "applies only with `transactional_id`"),
    ] {
        std::fs::write(&p, format!("{sink}{extra}")).unwrap();
        let out = sluice().arg("validate").arg(&p).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {err}");
        assert!(err.contains(want) && err.contains("sinks.k"), "{extra}: {err}");
    }
    std::fs::write(&p, format!("{base}format = {{ type = \"avro\", schema_file = \"{}\" }}\n", avsc.display()))
        .unwrap();
    let out = sluice().arg("validate").arg(&p).output().unwrap();
    assert!(out.status.success(), "a valid Avro source: {}", String::from_utf8_lossy(&out.stderr));

    // Unreachable brokers: a clear runtime error, exit 3, not a hang.
    std::fs::write(
        &p,
        std::fs::read_to_string(&p).unwrap().replace("format = { type = \"json\" }", "format = { type = \"string\" }"),
    )
    .unwrap();
    let started = Instant::now();
    let out = sluice().args(["run", "--no-progress"]).arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("topic `t`") && err.contains("brokers"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn sigterm_mid_stream_commits_what_was_written_so_a_rerun_has_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("term");
    create(&t, 3);
    let m = produce(&t, 3, 60_000, 1, 0, dir.path());
    let group = format!("{t}-g");
    let pipeline = dir.path().join("p.toml");
    std::fs::write(&pipeline, order_pipeline(&t, &group, dir.path(), "rotate = { max_rows = 2000 }")).unwrap();
    let mut child = sluice().args(["run", "--no-progress"]).arg(&pipeline).spawn().unwrap();
    let started = Instant::now();
    while files(&dir.path().join("lake"), ".parquet").len() < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "no output after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "a graceful stop exits 0");
    let committed: i64 = offsets(&t, &group).values().map(|(c, _)| (*c).max(0)).sum();
    assert!(committed > 0, "positions were committed at the stop");

    run_bounded(&pipeline);
    let got = lake_rows(&dir.path().join("lake"));
    let distinct: std::collections::HashSet<i64> = got.iter().map(|(id, _, _)| *id).collect();
    let expected = m.good.keys().filter(|id| *id % 4 != 2).count();
    assert_eq!(distinct.len(), expected, "nothing lost");
    assert_eq!(got.len(), expected, "no duplicates: everything read before the stop was committed");
}

/// Kills (SIGKILL) processes still running when a test fails.
pub(crate) struct KillOnDrop(pub Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for pid in &self.0 {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    }
}

/// Runs `pipeline` unbounded with its log in `log`.
fn spawn_logged(pipeline: &Path, log: &Path) -> std::process::Child {
    let f = std::fs::File::create(log).unwrap();
    sluice().args(["run", "--no-progress"]).arg(pipeline).env("RUST_LOG", "info").stderr(f).spawn().unwrap()
}

fn wait_for(what: &str, limit: Duration, context: &dyn Fn() -> String, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}:\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop(child: &mut std::process::Child, log: &Path) {
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "a graceful stop exits 0:\n{}", std::fs::read_to_string(log).unwrap());
}

/// `assignment = "group"`: one run takes every partition; a second run with the same group joins,
/// the cooperative-sticky assignor moves some partitions to it (the first run commits and lets
/// go), and the records produced after the join are split between the two, none lost or doubled.
#[test]
fn group_assignment_shares_the_partitions_between_runs_and_hands_over_on_a_join() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("grp");
    create(&t, 6);
    let group = format!("{t}-g");
    let mut pipelines = Vec::new();
    for w in ["a", "b"] {
        let out = dir.path().join(w);
        std::fs::create_dir_all(&out).unwrap();
        let text = order_pipeline(&t, &group, &out, "rotate = { max_rows = 500, max_age = \"1s\" }")
            .replace("format = { type = \"json\" }", "assignment = \"group\"\nformat = { type = \"json\" }");
        let p = out.join("p.toml");
        std::fs::write(&p, text).unwrap();
        pipelines.push((p, out.join("log.txt"), out.join("lake")));
    }
    let (tr, gr) = (&t, &group);
    let all_committed = |want: i64| {
        move || {
            let o = offsets(tr, gr);
            o.values().all(|(c, end)| c == end) && o.values().map(|(_, e)| e).sum::<i64>() == want
        }
    };
    let first = produce(&t, 6, 3000, 1, 0, dir.path());
    let log = |i: usize| std::fs::read_to_string(&pipelines[i].1).unwrap_or_default();
    let logs = || format!("first run:\n{}\nsecond run:\n{}", log(0), log(1));
    let mut a = spawn_logged(&pipelines[0].0, &pipelines[0].1);
    let _kill_a = KillOnDrop(vec![a.id()]);
    wait_for("the first run to commit everything", Duration::from_secs(120), &logs, all_committed(3000));
    let mut b = spawn_logged(&pipelines[1].0, &pipelines[1].1);
    let _kill_b = KillOnDrop(vec![b.id()]);
    wait_for("the second run to be given partitions", Duration::from_secs(120), &logs, || {
        log(1).contains("the group assigned partitions")
    });
    assert!(log(0).contains("gave partitions back to the group"), "the first run let partitions go:\n{}", log(0));
    let second = produce(&t, 6, 3000, 3001, 0, dir.path());
    wait_for("both runs to commit everything", Duration::from_secs(120), &logs, all_committed(6000));
    stop(&mut a, &pipelines[0].1);
    stop(&mut b, &pipelines[1].1);

    let (rows_a, rows_b) = (lake_rows(&pipelines[0].2), lake_rows(&pipelines[1].2));
    let kept = |m: &Manifest| m.good.keys().filter(|id| *id % 4 != 2).copied().collect::<Vec<i64>>();
    let mut expected: Vec<i64> = kept(&first).into_iter().chain(kept(&second)).collect();
    expected.sort_unstable();
    let mut got: Vec<i64> = rows_a.iter().chain(&rows_b).map(|(id, _, _)| *id).collect();
    got.sort_unstable();
    assert_eq!(got, expected, "every record once, across the two runs");
    assert!(!rows_b.is_empty(), "the second run read some partitions");
    assert!(rows_b.iter().all(|(id, _, _)| *id > 3000), "the second run joined after the first batch was committed");
    assert!(rows_a.iter().any(|(id, _, _)| *id > 3000), "the first run kept some partitions");
}

/// `sluice_kafka_lag_records` per partition: unread records while a backlog is read, 0 once it
/// is. (It came from librdkafka's statistics before, whose consumer_lag counts from an offset
/// store sluice does not use: the gauge was never published.)
#[test]
fn lag_records_gauge_counts_the_backlog_per_partition_and_falls_to_zero() {
    use crate::common::{free_port, http_get};
    let dir = tempfile::tempdir().unwrap();
    let t = topic("lag");
    create(&t, 2);
    let m = produce(&t, 2, 40_000, 1, 0, dir.path());
    let pipeline = dir.path().join("p.toml");
    let text = order_pipeline(&t, &format!("{t}-g"), dir.path(), "rotate = { max_rows = 5000 }")
        .replace("batch_size = 5000", "batch_size = 500");
    std::fs::write(&pipeline, text).unwrap();
    let port = free_port();
    let log = dir.path().join("sluice.log");
    let mut child = sluice()
        .args(["run", "--no-progress", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .arg(&pipeline)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(vec![child.id()]);
    // partition → every value the gauge showed, and the records consumed so far.
    let scrape = || -> Option<(BTreeMap<String, f64>, f64)> {
        let (code, body) = http_get(port, "/metrics")?;
        (code == 200).then_some(())?;
        let of_topic = format!("topic=\"{t}\"");
        let mut lag = BTreeMap::new();
        for (labels, value) in samples(&body, "sluice_kafka_lag_records").filter(|(l, _)| l.contains(&of_topic)) {
            lag.insert(labels.split("partition=\"").nth(1)?.split('"').next()?.to_string(), value);
        }
        let consumed = samples(&body, "sluice_kafka_consumed_records_total")
            .filter(|(l, _)| l.contains(&of_topic))
            .map(|(_, v)| v)
            .sum();
        Some((lag, consumed))
    };
    let total = (m.good.len() + m.bad.len()) as f64;
    let mut peak = 0.0f64;
    let started = Instant::now();
    let last = loop {
        if let Some((lag, consumed)) = scrape() {
            for v in lag.values() {
                assert!(*v <= total, "lag {v} above the {total} records produced");
                peak = peak.max(*v);
            }
            if consumed >= total && lag.len() == 2 && lag.values().all(|v| *v == 0.0) {
                break lag;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the lag gauge did not reach 0 on both partitions in 120 s (last: {:?}):\n{}",
            scrape(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(last.keys().map(String::as_str).collect::<Vec<_>>(), ["0", "1"]);
    assert!(peak > 0.0, "the gauge never showed the backlog of {total} records");
    stop(&mut child, &log);
}
