//! The S3 sink and source against a real S3-compatible server (Garage, started by scripts/test.sh),
//! with what sluice wrote read back by an independent client (boto3 + pyarrow, tests/s3_tool.py),
//! through a fault-injecting proxy where the test says so.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{peak_rss_mib, python_tool, read_ndjson, read_parquet, rows, sluice};
use crate::fault_proxy::{FaultProxy, Faults};
use crate::kafka::{create, produce, run_bounded, topic};

/// The S3 endpoint the test script started.
pub(crate) fn endpoint() -> String {
    std::env::var("SLUICE_TEST_S3_ENDPOINT").expect(
        "SLUICE_TEST_S3_ENDPOINT is not set: run the tests with scripts/test.sh, which starts an S3 server (Garage)",
    )
}

fn endpoint_addr() -> SocketAddr {
    endpoint().trim_start_matches("http://").parse().unwrap()
}

/// Runs tests/s3_tool.py; returns its JSON output.
pub(crate) fn tool(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&python_tool("s3_tool.py", args)).unwrap()
}

/// A new bucket with a name no other test uses.
pub(crate) fn bucket(prefix: &str) -> String {
    let name = bucket_name(prefix);
    tool(&["mkbucket", &name]);
    name
}

/// A bucket name no other test uses (not created).
pub(crate) fn bucket_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// `[sinks.ID]` or `[sources.ID]` connection lines for the test server (or a proxy in front of it).
pub(crate) fn connection(bucket: &str, endpoint: &str) -> String {
    format!(
        r#"bucket = "{bucket}"
endpoint = "{endpoint}"
region = "garage"
access_key_id = "${{SLUICE_TEST_S3_KEY_ID}}"
secret_access_key = "${{SLUICE_TEST_S3_SECRET}}""#
    )
}

fn write_pipeline(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join(format!("p-{}.toml", text.len()));
    std::fs::write(&p, text).unwrap();
    p
}

fn generator_to_s3(count: u64, bucket: &str, endpoint: &str, sink_extra: &str, query: &str) -> String {
    format!(
        r#"[pipeline]
name = "s3-it"

[sources.orders]
type = "generator"
shape = "orders"
count = {count}

[transforms.t]
type = "sql"
inputs = ["orders"]
query = "{query}"

[sinks.lake]
type = "s3"
inputs = ["t"]
prefix = "lake"
{conn}
{sink_extra}
"#,
        conn = connection(bucket, endpoint)
    )
}

pub(crate) fn read_back(bucket: &str, prefix: &str) -> serde_json::Value {
    tool(&["read", bucket, prefix, "--id-column", "order_id"])
}

fn run_ok(pipeline: &Path) -> String {
    let out = sluice().args(["run", "--no-progress"]).arg(pipeline).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "sluice run failed ({:?}):\n{stderr}", out.status);
    stderr
}

#[test]
fn parquet_objects_in_multipart_uploads_hold_every_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("sink");
    let p = write_pipeline(
        dir.path(),
        &generator_to_s3(
            600_000,
            &b,
            &endpoint(),
            "part_size = \"5MiB\"\nrotate = { max_rows = 400000 }\ncompression = \"none\"",
            "SELECT * FROM orders",
        ),
    );
    run_ok(&p);
    let got = read_back(&b, "lake/");
    assert_eq!(got["rows"], 600_000);
    assert_eq!(got["unique_ids"], 600_000, "no record twice");
    let files = got["files"].as_object().unwrap();
    assert_eq!(files.len(), 2, "rotated at 400k rows exactly: {files:?}");
    assert_eq!(files["lake/part-gen-0-00000000000000000000.parquet"], 400_000);
    assert_eq!(got["pending_uploads"], 0, "every multipart upload completed");
    let keys = tool(&["keys", &b, "lake/"]);
    assert_eq!(keys.as_array().unwrap().len(), 2, "nothing but the two objects: {keys}");
}

#[test]
fn many_open_partitions_under_a_small_budget_spill_instead_of_growing() {
    let dir = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for count in [100_000u64, 500_000] {
        let b = bucket("budget");
        let p = write_pipeline(
            dir.path(),
            &generator_to_s3(
                count,
                &b,
                &endpoint(),
                "partition_by = [\"shard\"]\nbuffer_bytes = \"8MiB\"\nrow_group_bytes = \"1MiB\"\nmax_open_files = 256\npart_size = \"5MiB\"",
                "SELECT order_id, customer_id, amount, status, ts, order_id % 200 AS shard FROM orders",
            )
            .replace("[pipeline]\nname = \"s3-it\"", "[pipeline]\nname = \"s3-it\"\nmemory_budget = \"32MiB\""),
        );
        let stderr = run_ok(&p);
        peaks.push(peak_rss_mib(&stderr));
        let got = read_back(&b, "lake/");
        assert_eq!(got["rows"], count);
        assert_eq!(got["unique_ids"], count);
        let objects = got["files"].as_object().unwrap().len();
        assert!(objects >= 200, "at least one object per partition: {objects}");
        eprintln!("{count} records: {objects} objects");
        assert_eq!(got["pending_uploads"], 0);
    }
    eprintln!("peak RSS with 200 open objects: 100k records {:.1} MiB, 500k records {:.1} MiB", peaks[0], peaks[1]);
    assert!(peaks[1] < peaks[0] * 1.5 + 24.0, "peak RSS grew with input: {peaks:?}");
    // memory_budget 32 + buffer_bytes 8 + 4 uploads × 5 MiB parts + ~1 MiB of Parquet writer
    // state (column writers, zstd contexts) per open file × 200 + the runtime.
    assert!(peaks[1] < 340.0, "peak RSS {} MiB is far above the configured budgets", peaks[1]);
}

#[test]
fn retries_through_cut_connections_and_throttling_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("faults");
    let proxy = FaultProxy::start(
        endpoint_addr(),
        Faults { cut_every: 3, cut_after: 40, slowdown_every: 2, delay: Duration::from_millis(1) },
    );
    let p = write_pipeline(
        dir.path(),
        &generator_to_s3(
            600_000,
            &b,
            &proxy.url(),
            "part_size = \"5MiB\"\nrotate = { max_rows = 100000 }\ncompression = \"none\"\nmax_attempts = 20",
            "SELECT * FROM orders",
        ),
    );
    let started = Instant::now();
    run_ok(&p);
    let cut = proxy.stats.cut.load(std::sync::atomic::Ordering::SeqCst);
    let slow = proxy.stats.slowdowns.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("through the fault proxy in {:?}: {cut} responses cut, {slow} SlowDown answers", started.elapsed());
    assert!(cut >= 3 && slow >= 2, "faults were injected: cut {cut}, slowdown {slow}");
    let got = read_back(&b, "lake/");
    assert_eq!(got["rows"], 600_000);
    assert_eq!(got["unique_ids"], 600_000);
    assert_eq!(got["files"].as_object().unwrap().len(), 6);
    assert_eq!(got["pending_uploads"], 0);
}

#[test]
fn a_failing_pipeline_aborts_its_multipart_upload_and_leaves_no_object() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("abort");
    // Row 500,001 cannot be converted and there is no dead-letter sink: the pipeline stops after
    // the open object has uploaded parts.
    let p = write_pipeline(
        dir.path(),
        &generator_to_s3(
            600_000,
            &b,
            &endpoint(),
            "part_size = \"5MiB\"\ncompression = \"none\"",
            "SELECT *, CAST(CASE WHEN order_id > 500000 THEN 'x' ELSE '1' END AS INT) AS boom FROM orders",
        )
        .replace("[pipeline]\nname = \"s3-it\"", "[pipeline]\nname = \"s3-it\"\nbatch_size = 4096"),
    );
    let out = sluice().args(["run", "--no-progress"]).arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("bad record"), "{stderr}");
    let got = read_back(&b, "lake/");
    assert_eq!(got["rows"], 0, "nothing is visible: {}", got["files"]);
    assert_eq!(tool(&["keys", &b, "lake/"]), serde_json::json!([]));
    assert_eq!(got["pending_uploads"], 0, "the multipart upload was aborted");
}

#[test]
fn an_unreachable_endpoint_or_a_missing_bucket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(
        dir.path(),
        &generator_to_s3(1000, "no-such-bucket-sluice", &endpoint(), "", "SELECT * FROM orders"),
    );
    let out = sluice().args(["run", "--no-progress"]).arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no-such-bucket-sluice") && stderr.contains("does not exist"), "{stderr}");

    // Nothing listens on port 9 (discard) here.
    let p = write_pipeline(
        dir.path(),
        &generator_to_s3(1000, "some-bucket", "http://127.0.0.1:9", "max_attempts = 2", "SELECT * FROM orders"),
    );
    let out = sluice().args(["run", "--no-progress"]).arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("cannot reach s3://some-bucket at http://127.0.0.1:9"), "{stderr}");
    assert!(!stderr.contains(&std::env::var("SLUICE_TEST_S3_SECRET").unwrap()), "the secret never shows");
}

#[test]
fn validate_explains_s3_settings() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("part_size = \"1MiB\"", "part_size"),
        ("time_column = \"status\"", "time_column"),
        ("upload_concurrency = 0", "upload_concurrency"),
    ] {
        let p =
            write_pipeline(dir.path(), &generator_to_s3(10, "valid-name", &endpoint(), extra, "SELECT * FROM orders"));
        let out = sluice().arg("validate").arg(&p).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {stderr}");
        assert!(stderr.contains(key), "{extra}: the error names `{key}`: {stderr}");
    }
    // The source's positions may not cover the objects it lists.
    for (extra, want) in
        [("state_prefix = \"in\"", "holds the listed prefix `in/`"), ("state_prefix = \"/\"", "must not be empty")]
    {
        let p = write_pipeline(dir.path(), &source_pipeline("valid-name", dir.path(), extra));
        let out = sluice().arg("validate").arg(&p).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra}: {stderr}");
        assert!(stderr.contains("sources.events.state_prefix") && stderr.contains(want), "{extra}: {stderr}");
    }
}

#[test]
fn kafka_to_s3_exactly_once_survives_kill_9_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("eo");
    create(&t, 3);
    let m = produce(&t, 3, 60_000, 1, 0, dir.path());
    let b = bucket("eo");
    let pipeline = write_pipeline(
        dir.path(),
        &format!(
            r#"[pipeline]
name = "eo-it"
batch_size = 3000

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{t}"]
group_id = "{t}-g"
format = {{ type = "json" }}
metadata = ["partition", "offset"]

[sources.orders.schema]
order_id = "bigint not null"
customer = "varchar"
amount = "decimal(10,2) not null"
status = "varchar not null"

[sinks.lake]
type = "s3"
inputs = ["orders"]
prefix = "eo"
exactly_once = true
partition_by = ["status"]
rotate = {{ max_rows = 1500 }}
{conn}
"#,
            brokers = crate::kafka::brokers(),
            conn = connection(&b, &endpoint())
        ),
    );
    let mut child = sluice().args(["run", "--no-progress"]).arg(&pipeline).spawn().unwrap();
    let started = Instant::now();
    loop {
        let n = tool(&["keys", &b, "eo/"]).as_array().unwrap().len();
        if n >= 6 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no objects after 120 s");
        assert!(child.try_wait().unwrap().is_none(), "sluice exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL, mid-stream
    child.wait().unwrap();
    let before = read_back(&b, "eo/");
    assert!(before["rows"].as_u64().unwrap() < 60_000, "killed before the end");

    run_bounded(&pipeline);
    let got = read_back(&b, "eo/");
    let ids: Vec<i64> = got["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for id in &ids {
        *counts.entry(*id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(twice.is_empty(), "records written twice after the replay, e.g. {twice:?}");
    assert_eq!(counts.len(), m.good.len(), "every record once");
    assert_eq!(ids.len(), 60_000);
    for (key, n) in got["files"].as_object().unwrap() {
        assert!(n.as_u64().unwrap() <= 1500, "{key} holds {n} rows");
    }
}

/// Writes `lines` as an object (gzip-compressed when the key ends in `.gz`).
pub(crate) fn put_lines(dir: &Path, bucket: &str, key: &str, lines: &[String]) {
    let local = dir.join(key.replace('/', "_"));
    let text = lines.join("\n") + "\n";
    if key.ends_with(".gz") {
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&local).unwrap(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap();
    } else {
        std::fs::write(&local, text).unwrap();
    }
    tool(&["put", bucket, key, local.to_str().unwrap()]);
}

fn source_pipeline(bucket: &str, out: &Path, extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "s3-source-it"

[sources.events]
type = "s3"
prefix = "in/"
format = {{ type = "json" }}
{conn}
{extra}

[sources.events.schema]
id = "bigint not null"
name = "varchar"

[sinks.out]
type = "file"
inputs = ["events"]
path = "{out}/out"
format = "json"

[dead_letter]
type = "file"
path = "{out}/dead"
"#,
        conn = connection(bucket, &endpoint()),
        out = out.display()
    )
}

fn ids_in(dir: &Path) -> Vec<i64> {
    let mut ids: Vec<i64> = read_ndjson(dir).iter().map(|v| v["id"].as_i64().unwrap()).collect();
    ids.sort();
    ids
}

#[test]
fn s3_source_reads_each_object_once_across_runs_and_dead_letters_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("src");
    let lines =
        |from: i64, to: i64| (from..to).map(|i| format!(r#"{{"id": {i}, "name": "n{i}"}}"#)).collect::<Vec<_>>();
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(0, 5000));
    let mut with_bad = lines(5000, 6000);
    with_bad[2] = "{not json".into();
    put_lines(dir.path(), &b, "in/b.ndjson.gz", &with_bad);
    put_lines(dir.path(), &b, "other/c.ndjson", &lines(9000, 9100));

    let run = |name: &str| {
        let out = dir.path().join(name);
        std::fs::create_dir_all(&out).unwrap();
        let p = write_pipeline(&out, &source_pipeline(&b, &out, ""));
        run_bounded(&p);
        out
    };
    let first = run("run1");
    let ids = ids_in(&first.join("out"));
    let expected: Vec<i64> = (0..6000).filter(|i| *i != 5002).collect();
    assert_eq!(ids, expected, "both objects under the prefix, nothing from other/");
    let dead = read_ndjson(&first.join("dead"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["position"]["file"], format!("s3://{b}/in/b.ndjson.gz"), "{}", dead[0]);
    assert_eq!(dead[0]["position"]["line"], 3, "{}", dead[0]);

    // A done marker per object (and no progress object left): a second run reads nothing.
    let second = run("run2");
    assert!(ids_in(&second.join("out")).is_empty(), "nothing is read twice");
    let keys = tool(&["keys", &b, "_sluice/"]);
    let keys: Vec<&str> = keys.as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    let mut marked: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("_sluice/s3-source-it/events/done/"))
        .filter_map(|rest| rest.split_once('/').map(|(_etag, key)| key))
        .collect();
    marked.sort_unstable();
    assert_eq!(marked, ["in/a.ndjson", "in/b.ndjson.gz"], "one done marker per object: {keys:?}");
    assert_eq!(keys.len(), 2, "nothing but the markers: {keys:?}");

    // A new object is read by the next run, alone.
    put_lines(dir.path(), &b, "in/d.ndjson", &lines(7000, 7100));
    let third = run("run3");
    assert_eq!(ids_in(&third.join("out")), (7000..7100).collect::<Vec<_>>());
}

#[test]
fn s3_source_resumes_after_the_committed_position_unless_the_object_changed() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("resume");
    let lines =
        |from: i64, to: i64| (from..to).map(|i| format!(r#"{{"id": {i}, "name": "n{i}"}}"#)).collect::<Vec<_>>();
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(0, 1000));
    put_lines(dir.path(), &b, "in/b.ndjson", &lines(1000, 1500));
    // As a run stopped mid-object leaves them: 400 lines of a committed; b's for other content.
    let etag = tool(&["etag", &b, "in/a.ndjson"]);
    let progress = |key: &str, etag: &str, committed: u64| {
        let local = dir.path().join(format!("progress-{committed}.json"));
        std::fs::write(&local, format!(r#"{{"etag": "{etag}", "committed": {committed}}}"#)).unwrap();
        tool(&["put", &b, &format!("_sluice/s3-source-it/events/progress/{key}"), local.to_str().unwrap()]);
    };
    progress("in/a.ndjson", etag.as_str().unwrap(), 400);
    progress("in/b.ndjson", "0123456789abcdef0123456789abcdef", 300);
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    run_bounded(&write_pipeline(&out, &source_pipeline(&b, &out, "")));
    let want: Vec<i64> = (400..1500).collect();
    assert_eq!(ids_in(&out.join("out")), want, "a from line 401, b (rewritten since) from its start");
    let keys = tool(&["keys", &b, "_sluice/"]);
    let keys: Vec<&str> = keys.as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert!(keys.iter().all(|k| k.contains("/events/done/")), "progress objects are gone once done: {keys:?}");
    assert_eq!(keys.len(), 2, "{keys:?}");
}

#[test]
fn s3_source_moves_an_earlier_builds_state_object_to_per_object_state() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("legacy");
    let lines =
        |from: i64, to: i64| (from..to).map(|i| format!(r#"{{"id": {i}, "name": "n{i}"}}"#)).collect::<Vec<_>>();
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(0, 300));
    put_lines(dir.path(), &b, "in/b.ndjson", &lines(300, 800));
    put_lines(dir.path(), &b, "in/c.ndjson", &lines(800, 900));
    let etag = |key: &str| tool(&["etag", &b, key]).as_str().unwrap().to_string();
    // As earlier builds wrote it: quoted ETags as listed; a done, b committed to line 200, c listed only.
    let legacy = serde_json::json!({"version": 1, "objects": {
        "in/a.ndjson": {"etag": format!("\"{}\"", etag("in/a.ndjson")), "committed": 300, "end": 300},
        "in/b.ndjson": {"etag": format!("\"{}\"", etag("in/b.ndjson")), "committed": 200},
        "in/c.ndjson": {"etag": format!("\"{}\"", etag("in/c.ndjson"))},
    }});
    let local = dir.path().join("legacy.json");
    std::fs::write(&local, legacy.to_string()).unwrap();
    tool(&["put", &b, "_sluice/s3-source-it/events.json", local.to_str().unwrap()]);
    let out = dir.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    let p = write_pipeline(&out, &source_pipeline(&b, &out, ""));
    let run =
        sluice().env("RUST_LOG", "sluice=info").args(["run", "--bounded", "--no-progress"]).arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "{stderr}");
    let want: Vec<i64> = (500..900).collect();
    assert_eq!(ids_in(&out.join("out")), want, "a skipped, b from line 201, c whole");
    assert!(stderr.contains("moved the positions of 2 objects"), "{stderr}");
    let keys = tool(&["keys", &b, "_sluice/"]);
    let keys: Vec<&str> = keys.as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert!(!keys.contains(&"_sluice/s3-source-it/events.json"), "the old state object is gone: {keys:?}");
    assert_eq!(keys.len(), 3, "a done marker per object: {keys:?}");
}

#[test]
fn s3_source_reads_fresh_objects_with_one_get_and_one_marker_each() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("requests");
    let n = 20;
    for i in 0..n {
        let lines: Vec<String> = (i * 50..(i + 1) * 50).map(|id| format!(r#"{{"id": {id}, "name": "n"}}"#)).collect();
        put_lines(dir.path(), &b, &format!("in/o-{i:02}.ndjson"), &lines);
    }
    let proxy = FaultProxy::start(endpoint_addr(), Faults::default());
    let text = source_pipeline(&b, dir.path(), "").replace(&endpoint(), &proxy.url());
    assert!(text.contains(&proxy.url()), "{text}");
    run_bounded(&write_pipeline(dir.path(), &text));
    assert_eq!(ids_in(&dir.path().join("out")), (0..n * 50).collect::<Vec<_>>());
    // Listings (objects, done markers, progress objects) and the look for an earlier build's
    // state object, then per object its GET and its done marker's PUT; a progress object only if
    // the once-a-second writer caught one mid-read. Worker mode adds a HEAD of the object and of
    // its marker and a GET of its progress, which a `sluice run` does without.
    let responses = proxy.stats.responses.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("{responses} responses for {n} objects");
    assert!(responses as i64 >= 2 * n, "fewer responses than objects read and marked: {responses}");
    assert!(responses as i64 <= 2 * n + 10, "{responses} requests for {n} fresh objects");
}

#[test]
fn dead_letters_can_go_to_a_bucket_too() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("dlq");
    let mut lines: Vec<String> = (0..1000).map(|i| format!(r#"{{"id": {i}, "name": "n"}}"#)).collect();
    lines[10] = "{broken".into();
    lines[20] = r#"{"id": "not a number"}"#.into();
    put_lines(dir.path(), &b, "in/a.ndjson", &lines);
    let text = source_pipeline(&b, dir.path(), "").replace(
        &format!("[dead_letter]\ntype = \"file\"\npath = \"{}/dead\"", dir.path().display()),
        &format!("[dead_letter]\ntype = \"s3\"\nprefix = \"dead\"\n{}", connection(&b, &endpoint())),
    );
    assert!(text.contains("prefix = \"dead\""), "{text}");
    run_bounded(&write_pipeline(dir.path(), &text));
    assert_eq!(ids_in(&dir.path().join("out")).len(), 998);
    let dead = tool(&["read", &b, "dead/"]);
    assert_eq!(dead["rows"], 2, "both bad records in the bucket: {}", dead["files"]);
    let keys = tool(&["keys", &b, "dead/"]);
    assert!(keys.as_array().unwrap().iter().all(|k| k.as_str().unwrap().ends_with(".ndjson")), "{keys}");
}

#[test]
fn s3_source_polls_for_new_objects_until_stopped_and_forgets_deleted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("poll");
    let lines = |from: i64, to: i64| (from..to).map(|i| format!(r#"{{"id": {i}, "name": "n"}}"#)).collect::<Vec<_>>();
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(0, 100));
    let p = write_pipeline(
        dir.path(),
        &source_pipeline(&b, dir.path(), "poll_interval = \"300ms\"")
            .replace("format = \"json\"", "format = \"json\"\nrotate = { max_age = \"1s\" }"),
    );
    let mut child = sluice().args(["run", "--no-progress"]).arg(&p).spawn().unwrap();
    let _kill = crate::kafka::KillOnDrop(vec![child.id()]);
    let wait_for = |n: usize| {
        let started = Instant::now();
        while ids_in(&dir.path().join("out")).len() < n {
            assert!(started.elapsed() < Duration::from_secs(60), "fewer than {n} records after 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(100);
    put_lines(dir.path(), &b, "in/b.ndjson", &lines(100, 150));
    wait_for(150);
    // The done markers: one per object, until its object is gone from two listings.
    let markers = || -> Vec<String> {
        let keys = tool(&["keys", &b, "_sluice/"]);
        keys.as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .filter(|k| k.contains("/done/"))
            .collect()
    };
    let wait_markers = |want: &[&str]| {
        let started = Instant::now();
        loop {
            let got = markers();
            if got.len() == want.len() && want.iter().all(|w| got.iter().any(|g| g.ends_with(w))) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "markers {got:?}, not for {want:?}, after 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_markers(&["/in/a.ndjson", "/in/b.ndjson"]);
    tool(&["delete", &b, "in/a.ndjson"]);
    wait_markers(&["/in/b.ndjson"]);
    // b is not read again, and a new object still is.
    put_lines(dir.path(), &b, "in/c.ndjson", &lines(150, 170));
    wait_for(170);
    wait_markers(&["/in/b.ndjson", "/in/c.ndjson"]);
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "graceful stop exits 0: {exit:?}");
    assert_eq!(ids_in(&dir.path().join("out")), (0..170).collect::<Vec<_>>());
}

#[test]
fn parquet_objects_written_by_the_sink_read_back_through_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("pq");
    let p = write_pipeline(
        dir.path(),
        &generator_to_s3(50_000, &b, &endpoint(), "rotate = { max_rows = 20000 }", "SELECT * FROM orders")
            .replace("prefix = \"lake\"", "prefix = \"in\""),
    );
    run_ok(&p);
    let out = dir.path().join("back");
    let p = write_pipeline(
        dir.path(),
        &format!(
            r#"[pipeline]
name = "pq-back"

[sources.lake]
type = "s3"
prefix = "in/"
format = {{ type = "parquet" }}
{conn}

[sinks.out]
type = "file"
inputs = ["lake"]
path = "{out}"
"#,
            conn = connection(&b, &endpoint()),
            out = out.display()
        ),
    );
    run_bounded(&p);
    let batches = read_parquet(&out);
    assert_eq!(rows(&batches), 50_000);
    let schema = batches[0].1.schema();
    assert!(schema.field_with_name("amount").is_ok() && schema.field_with_name("ts").is_ok(), "{schema:?}");
}

/// An object rewritten under its key (another ETag) is read again from its first line; the
/// exactly-once sinks must take its rows for new ones, not for the old version's at the same
/// positions (they kept their state per key and skipped them).
#[test]
fn exactly_once_sinks_write_every_row_of_a_rewritten_object() {
    let dir = tempfile::tempdir().unwrap();
    let b = bucket("rewrite");
    let table = format!("{}.events", crate::postgres::schema("rewrite"));
    let lines =
        |from: i64, to: i64| (from..to).map(|i| format!(r#"{{"id": {i}, "name": "n{i}"}}"#)).collect::<Vec<_>>();
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(0, 30));
    let p = write_pipeline(
        dir.path(),
        &format!(
            r#"[pipeline]
name = "{b}"

[sources.events]
type = "s3"
prefix = "in/"
format = {{ type = "json" }}
poll_interval = "300ms"
schema = {{ id = "bigint not null", name = "varchar" }}
{conn}

[sinks.lake]
type = "s3"
inputs = ["events"]
prefix = "lake"
exactly_once = true
rotate = {{ max_age = "1s" }}
{conn}

[sinks.pg]
type = "postgres"
inputs = ["events"]
url = "{url}"
table = "{table}"
create_table = true
exactly_once = true
flush_interval = "200ms"
"#,
            conn = connection(&b, &endpoint()),
            url = crate::postgres::url(),
        ),
    );
    let lake = || -> Vec<i64> {
        let got = tool(&["read", &b, "lake/", "--id-column", "id"]);
        let mut ids: Vec<i64> = got["ids"].as_array().map_or(vec![], |a| a.iter().filter_map(|v| v.as_i64()).collect());
        ids.sort_unstable();
        ids
    };
    let table_ids = || -> Vec<i64> {
        // The sink creates the table with its first rows.
        if crate::postgres::psql(&format!("SELECT to_regclass('{table}') IS NULL")) == "t" {
            return vec![];
        }
        let out = crate::postgres::psql(&format!("SELECT id FROM {table} ORDER BY id"));
        out.lines().map(|l| l.parse().unwrap()).collect()
    };
    let want = |ranges: &[(i64, i64)]| -> Vec<i64> { ranges.iter().flat_map(|&(a, z)| a..z).collect() };
    let wait_for = |expected: &[i64]| {
        let started = Instant::now();
        loop {
            let (l, t) = (lake(), table_ids());
            if l == expected && t == expected {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "after 60 s the S3 sink holds {} rows, the table {}, of {} (missing from S3: {:?})",
                l.len(),
                t.len(),
                expected.len(),
                expected.iter().filter(|i| !l.contains(i)).take(10).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut child = sluice().args(["run", "--no-progress"]).arg(&p).spawn().unwrap();
    let _kill = crate::kafka::KillOnDrop(vec![child.id()]);
    wait_for(&want(&[(0, 30)]));
    // Rewritten once the run knows the first version done (its marker written, then a poll that
    // lists it done; before that, a rewritten object waits for the next run, as documented).
    let started = Instant::now();
    while !tool(&["keys", &b, "_sluice/"]).as_array().unwrap().iter().any(|k| {
        let k = k.as_str().unwrap();
        k.contains("/done/") && k.ends_with("/in/a.ndjson")
    }) {
        assert!(started.elapsed() < Duration::from_secs(60), "no done marker for in/a.ndjson after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    // Rewritten while the run polls: 50 new rows at positions 1-50, 1-30 of which the old
    // version's rows already held.
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(100, 150));
    wait_for(&want(&[(0, 30), (100, 150)]));
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success(), "graceful stop exits 0");
    // Rewritten between runs, shorter: read again whole by the next run.
    put_lines(dir.path(), &b, "in/a.ndjson", &lines(200, 210));
    run_bounded(&p);
    wait_for(&want(&[(0, 30), (100, 150), (200, 210)]));
}
