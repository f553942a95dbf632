//! The command line: `validate` errors for each kind of broken pipeline, exit codes, graceful
//! shutdown on SIGTERM, and the metrics / health server.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{free_port, http_get, read_parquet, rows, samples, sluice};

const BASE: &str = r#"[pipeline]
name = "v"

[sources.orders]
type = "generator"
shape = "orders"
count = 10

[transforms.clean]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, amount FROM orders"

[sinks.out]
type = "blackhole"
inputs = ["clean"]
"#;

fn validate(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, text).unwrap();
    let out = sluice().arg("validate").arg(&path).env_remove("NOT_SET_ANYWHERE").output().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap(), msg.replace(&path.display().to_string(), "p.toml"))
}

#[test]
fn validate_accepts_a_good_pipeline() {
    let (code, msg) = validate(BASE);
    assert_eq!(code, 0, "{msg}");
    assert!(msg.contains("pipeline `v` is valid"), "{msg}");
    assert!(msg.contains("clean: order_id bigint, amount decimal(12,2)"), "{msg}");
}

#[test]
fn validate_pinpoints_each_kind_of_broken_pipeline() {
    let cases: Vec<(String, &[&str])> = vec![
        // Unknown key.
        (
            BASE.replace("count = 10", "count = 10\ncolour = \"red\""),
            &["p.toml:", "sources.orders", "unknown field `colour`"],
        ),
        // Wrong value type.
        (BASE.replace("count = 10", "count = \"ten\""), &["p.toml:7:", "invalid type"]),
        // Dangling input.
        (
            BASE.replace("inputs = [\"clean\"]", "inputs = [\"cleen\"]"),
            &["p.toml:16:", "sinks.out.inputs", "unknown input `cleen`", "clean"],
        ),
        // A cycle.
        (
            BASE.replace("inputs = [\"orders\"]", "inputs = [\"again\"]")
                + "\n[transforms.again]\ntype = \"sql\"\ninputs = [\"clean\"]\nquery = \"SELECT * FROM clean\"\n",
            &["cycle", "clean", "again"],
        ),
        // SQL that does not plan: an unknown column.
        (
            BASE.replace("SELECT order_id, amount", "SELECT order_id, amount_usd"),
            &["p.toml:12:", "transforms.clean.query", "amount_usd", "order_id bigint"],
        ),
        // A missing environment variable.
        (
            BASE.replace("name = \"v\"", "name = \"${NOT_SET_ANYWHERE}\""),
            &["p.toml:2:", "pipeline.name", "NOT_SET_ANYWHERE", "is not set"],
        ),
        // An unknown component type.
        (BASE.replace("type = \"blackhole\"", "type = \"kafkaa\""), &["p.toml:", "unknown variant `kafkaa`"]),
        // A bad schema type.
        (
            BASE.replace(
                "type = \"generator\"\nshape = \"orders\"\ncount = 10",
                "type = \"file\"\npath = \"Cargo.toml\"\nformat = { type = \"json\" }\nschema = { id = \"bigintt\" }",
            ),
            &["sources.orders.schema", "unknown column type `bigintt`"],
        ),
        // An exactly-once sink fed by two paths from one source.
        (
            BASE.replace("type = \"blackhole\"\ninputs = [\"clean\"]", "type = \"file\"\npath = \"x\"\nexactly_once = true\ninputs = [\"clean\", \"big\"]")
                + "\n[transforms.big]\ntype = \"sql\"\ninputs = [\"orders\"]\nquery = \"SELECT order_id, amount FROM orders WHERE amount > 100\"\n",
            &["p.toml:18:", "sinks.out.inputs", "exactly_once", "`orders`'s records arrive by 2 paths"],
        ),
        // An exactly-once sink after a Kafka source in a consumer group (no broker needed to validate).
        (
            BASE.replace(
                "type = \"generator\"\nshape = \"orders\"\ncount = 10",
                "type = \"kafka\"\nbrokers = \"127.0.0.1:1\"\ntopics = [\"t\"]\ngroup_id = \"g\"\nassignment = \"group\"\nformat = { type = \"json\" }\nschema = { order_id = \"bigint\", amount = \"decimal(12,2)\" }",
            )
            .replace("type = \"blackhole\"", "type = \"file\"\npath = \"x\"\nexactly_once = true"),
            &["sinks.out.exactly_once", "source `orders` uses assignment = \"group\"", "assignment = \"assign\""],
        ),
        // A partition column that does not exist.
        (
            BASE.replace("type = \"blackhole\"", "type = \"file\"\npath = \"x\"\npartition_by = [\"dt\"]"),
            &["sinks.out.partition_by", "`dt`", "order_id"],
        ),
    ];
    for (text, expected) in cases {
        let (code, msg) = validate(&text);
        assert_eq!(code, 1, "expected exit 1 for:\n{text}\ngot:\n{msg}");
        for e in expected {
            assert!(msg.contains(e), "expected `{e}` in:\n{msg}");
        }
    }
}

#[test]
fn run_exit_codes_distinguish_config_and_runtime_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[pipeline]\nname = 1\n").unwrap();
    assert_eq!(sluice().args(["run", "--no-progress"]).arg(&bad).status().unwrap().code(), Some(1));
    let strict = dir.path().join("strict.toml");
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, "{\"id\": \"x\"}\n").unwrap();
    std::fs::write(
        &strict,
        format!("[pipeline]\nname = \"s\"\n[sources.i]\ntype = \"file\"\npath = \"{}\"\nformat = {{ type = \"json\" }}\nschema = {{ id = \"bigint\" }}\n[sinks.o]\ntype = \"blackhole\"\ninputs = [\"i\"]\n", input.display()),
    )
    .unwrap();
    let out = sluice().args(["run", "--no-progress"]).arg(&strict).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sluice().arg("frobnicate").status().unwrap().code(), Some(2));
    let help = sluice().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--metrics-addr") && help.contains("--log-format"), "{help}");
}

#[test]
fn sigterm_stops_gracefully_with_complete_files_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("endless.toml");
    let out = dir.path().join("out");
    std::fs::write(
        &path,
        format!(
            "[pipeline]\nname = \"endless\"\n[sources.g]\ntype = \"generator\"\nshape = \"clickstream\"\nrate = 20000\n[sinks.o]\ntype = \"file\"\ninputs = [\"g\"]\npath = \"{}\"\n",
            out.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut child = sluice()
        .args(["run", "--no-progress", "--log-format", "json", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        if let Some((200, body)) = http_get(port, "/metrics") {
            if body.contains("sluice_component_sent_records_total") {
                break body;
            }
        }
        assert!(Instant::now() < deadline, "metrics never appeared");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(metrics.contains("pipeline=\"endless\""), "{metrics}");
    assert!(metrics.contains("component=\"g\""), "{metrics}");
    // Process gauges, set at each scrape: plausible values, not just names.
    let gauge = |name: &str| -> f64 {
        let (_, value) = samples(&metrics, name).next().unwrap_or_else(|| panic!("no {name}: {metrics}"));
        value
    };
    let rss = gauge("sluice_process_resident_memory_bytes");
    assert!((1e6..4e9).contains(&rss), "resident memory {rss}");
    assert!(gauge("sluice_process_open_fds") >= 3.0 && gauge("sluice_process_threads") >= 2.0, "{metrics}");
    assert!(gauge("sluice_runtime_alive_tasks") >= 1.0, "{metrics}");
    assert_eq!(http_get(port, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(port, "/readyz").unwrap().0, 200);
    std::thread::sleep(Duration::from_millis(1500));
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(exit.code(), Some(0), "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with('{') && l.contains("\"level\"")), "JSON logs: {stderr}");
    let batches = read_parquet(Path::new(&out));
    let n = rows(&batches);
    assert!(n >= 10_000, "the records read before the stop were written: {n}");
    assert!(crate::common::files(&out, ".inprogress").is_empty());
}

/// `SLUICE_JSON_FAST_PATH=0` decodes JSON with arrow-json alone: the same rows come out either
/// way, and the log says which way it ran.
#[test]
fn the_json_fast_path_can_be_turned_off_and_changes_nothing_but_speed() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.ndjson");
    let mut text = String::new();
    for i in 0..3000 {
        text.push_str(&format!(
            "{{\"id\":{i},\"amount\":{}.{:02},\"name\":\"n\\u00e9{i}\",\"ts\":\"2026-01-01T00:00:{:02}.5\"}}\n",
            i % 500,
            i % 100,
            i % 60
        ));
        if i % 700 == 0 {
            text.push_str("{\"id\":\"bad\"}\n");
        }
    }
    std::fs::write(&input, text).unwrap();
    let mut outputs = Vec::new();
    for fast in ["1", "0"] {
        let out_dir = dir.path().join(format!("out-{fast}"));
        let pipeline = dir.path().join(format!("p-{fast}.toml"));
        std::fs::write(
            &pipeline,
            format!(
                r#"[pipeline]
name = "fast-{fast}"
batch_size = 500

[sources.in]
type = "file"
path = "{}"
format = {{ type = "json" }}

[sources.in.schema]
id = "bigint not null"
amount = "decimal(10,2)"
name = "varchar"
ts = "timestamp"

[sinks.out]
type = "file"
inputs = ["in"]
path = "{}/lake"

[dead_letter]
type = "file"
path = "{}/dlq"
"#,
                input.display(),
                out_dir.display(),
                out_dir.display()
            ),
        )
        .unwrap();
        let out = sluice()
            .args(["run", "--no-progress"])
            .arg(&pipeline)
            .env("SLUICE_JSON_FAST_PATH", fast)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stderr.contains("without the fast path"), fast == "0", "{stderr}");
        let batches: Vec<_> = read_parquet(&out_dir.join("lake")).into_iter().map(|(_, b)| b).collect();
        let dead: Vec<_> = crate::common::read_ndjson(&out_dir.join("dlq"))
            .into_iter()
            .map(|d| (d["position"].to_string(), d["stage"].to_string(), d["error"].to_string(), d["raw"].to_string()))
            .collect();
        outputs.push((batches, dead));
    }
    assert_eq!(outputs[0].0.iter().map(|b| b.num_rows()).sum::<usize>(), 3000);
    assert_eq!(outputs[0].1.len(), 5, "the bad lines, dead-lettered");
    assert_eq!(outputs[0], outputs[1], "the same rows and bad records either way");
}
