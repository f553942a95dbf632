//! Avro values from Kafka: plain bodies against a reader schema file, and the Confluent wire
//! format with writer schemas from a schema registry. Records are written by an independent Avro
//! implementation (fastavro, in tests/kafka_tool.py). No Confluent-compatible registry installs
//! here, so [`Registry`] is an HTTP test server that answers `GET /schemas/ids/{id}` as the
//! registry's API documents it and checks every request it gets.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::AsArray;
use arrow::datatypes::{Decimal128Type, Int64Type};
use base64::Engine;

use crate::common::{read_ndjson, read_parquet, sluice};
use crate::kafka::{brokers, create, offsets, produce_with, topic};

const USER: &str = "registry-key";
const PASSWORD: &str = "registry-secret-5a1c";

/// What `kafka_tool.py produce --schemas-out` wrote.
struct Schemas {
    reader: String,
    ids: HashMap<u32, String>,
}

fn schemas(path: &Path) -> Schemas {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Schemas {
        reader: v["reader"].as_str().unwrap().to_string(),
        ids: v["ids"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.parse().unwrap(), s.as_str().unwrap().to_string()))
            .collect(),
    }
}

/// (path, problems with the request).
type Request = (String, Vec<String>);
type RequestLog = Arc<Mutex<Vec<Request>>>;

/// A schema-registry test server: `GET /schemas/ids/{id}` with the registry's media type,
/// basic auth, 404 with error code 40403 for unknown ids, and 503 for the first `fail_first`
/// requests (a registry restarting). Every request is recorded with what was wrong with it.
struct Registry {
    url: String,
    /// (path, problems with the request).
    requests: RequestLog,
}

impl Registry {
    fn start(schemas: HashMap<u32, String>, fail_first: usize) -> Registry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests: RequestLog = Arc::default();
        let log = requests.clone();
        let schemas = Arc::new(schemas);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let (log, schemas) = (log.clone(), schemas.clone());
                std::thread::spawn(move || serve(conn, &schemas, &log, fail_first));
            }
        });
        Registry { url, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answers the requests of one (keep-alive) connection.
fn serve(conn: std::net::TcpStream, schemas: &HashMap<u32, String>, log: &Mutex<Vec<Request>>, fail_first: usize) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut out = conn;
    let auth = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")));
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let path = parts.get(1).copied().unwrap_or("").to_string();
        let mut problems = Vec::new();
        if parts.first() != Some(&"GET") {
            problems.push(format!("method {:?}, not GET", parts.first()));
        }
        if !parts.get(2).is_some_and(|v| v.starts_with("HTTP/1.")) {
            problems.push(format!("not an HTTP/1.x request line: {line:?}"));
        }
        if !headers.get("accept").is_some_and(|a| a.contains("application/vnd.schemaregistry.v1+json")) {
            problems.push(format!("Accept {:?} does not ask for the registry's media type", headers.get("accept")));
        }
        let authorized = headers.get("authorization") == Some(&auth);
        if !authorized {
            problems.push("missing or wrong basic auth".into());
        }
        let id: Option<u32> = path.strip_prefix("/schemas/ids/").and_then(|i| i.parse().ok());
        if id.is_none() {
            problems.push(format!("path {path} is not /schemas/ids/{{id}}"));
        }
        let seen = {
            let mut l = log.lock().unwrap();
            l.push((path.clone(), problems.clone()));
            l.len()
        };
        let (status, body) = if !authorized {
            ("401 Unauthorized", serde_json::json!({"error_code": 401, "message": "Unauthorized"}))
        } else if seen <= fail_first {
            (
                "503 Service Unavailable",
                serde_json::json!({"error_code": 50003, "message": "Error while forwarding the request"}),
            )
        } else {
            match id.and_then(|i| schemas.get(&i)) {
                Some(s) => ("200 OK", serde_json::json!({ "schema": s })),
                None => (
                    "404 Not Found",
                    serde_json::json!({"error_code": 40403, "message": format!("Schema {} not found", id.unwrap_or(0))}),
                ),
            }
        };
        let body = body.to_string();
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn pipeline(topic: &str, group: &str, schema_file: &Path, registry: &str, out: &Path) -> String {
    format!(
        r#"
[pipeline]
name = "avro-it"

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
format = {{ type = "avro", schema_file = "{schema}"{registry} }}
metadata = ["key", "offset"]

[transforms.kept]
type = "sql"
inputs = ["orders"]
query = "SELECT order_id, customer, amount, status, _key FROM orders WHERE status <> 'cancelled'"

[sinks.lake]
type = "file"
inputs = ["kept"]
path = "{out}/lake"

[dead_letter]
type = "file"
path = "{out}/dead"
"#,
        brokers = brokers(),
        schema = schema_file.display(),
        out = out.display()
    )
}

/// order id → (amount cents, customer, key) of every row written.
fn lake(dir: &Path) -> BTreeMap<i64, (i64, String, String)> {
    let mut out = BTreeMap::new();
    for (_, b) in read_parquet(dir) {
        let ids = b.column_by_name("order_id").unwrap().as_primitive::<Int64Type>().clone();
        let amounts = b.column_by_name("amount").unwrap().as_primitive::<Decimal128Type>().clone();
        let customers = b.column_by_name("customer").unwrap().as_string::<i32>().clone();
        let keys = b.column_by_name("_key").unwrap().as_binary::<i32>().clone();
        for i in 0..b.num_rows() {
            let key = String::from_utf8(keys.value(i).to_vec()).unwrap();
            let prev = out.insert(ids.value(i), (amounts.value(i) as i64, customers.value(i).to_string(), key));
            assert!(prev.is_none(), "order {} written twice", ids.value(i));
        }
    }
    out
}

fn run(pipeline: &Path) -> String {
    let out = sluice()
        .args(["run", "--bounded", "--no-progress"])
        .arg(pipeline)
        .env("REGISTRY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "sluice run --bounded failed ({:?}):\n{stderr}", out.status);
    stderr
}

fn check_output(dir: &Path, m: &crate::kafka::Manifest) {
    let got = lake(&dir.join("lake"));
    // status "cancelled" is i % 4 == 2.
    let expected: BTreeMap<i64, i64> = m.good.iter().filter(|(id, _)| *id % 4 != 2).map(|(i, c)| (*i, *c)).collect();
    assert_eq!(got.len(), expected.len(), "rows written");
    let amounts: BTreeMap<i64, i64> = got.iter().map(|(i, (c, _, _))| (*i, *c)).collect();
    assert_eq!(amounts, expected, "every kept record with its exact decimal amount");
    for (id, (_, customer, key)) in &got {
        assert_eq!(key, &format!("order-{id}"));
        let want = if id % 11 == 0 { "Zoë ünïcode".to_string() } else { format!("c{}", id % 97) };
        assert_eq!(customer, &want, "order {id}");
    }
}

#[test]
fn plain_avro_bodies_decode_against_the_schema_file_and_bad_ones_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("avro");
    create(&t, 3);
    let schemas_out = dir.path().join("schemas.json");
    let m = produce_with(
        &t,
        3,
        3000,
        1,
        50,
        dir.path(),
        &["--format", "avro", "--schemas-out", schemas_out.to_str().unwrap()],
    );
    assert_eq!(m.bad.len(), 60);
    let schema_file = dir.path().join("order.avsc");
    std::fs::write(&schema_file, schemas(&schemas_out).reader).unwrap();
    let group = format!("{t}-g");
    let p = dir.path().join("p.toml");
    std::fs::write(&p, pipeline(&t, &group, &schema_file, "", dir.path())).unwrap();
    let v = sluice().arg("validate").arg(&p).output().unwrap();
    assert!(v.status.success(), "validate: {}", String::from_utf8_lossy(&v.stderr));
    run(&p);
    check_output(dir.path(), &m);
    let dead = read_ndjson(&dir.path().join("dead"));
    assert_eq!(dead.len(), m.bad.len(), "every truncated body dead-lettered once");
    for d in &dead {
        assert_eq!(d["stage"], "decode", "{d}");
        assert!(d["error"].as_str().unwrap().contains("ends before the Avro record does"), "{d}");
        assert_eq!(d["position"]["topic"], t.as_str());
    }
    for (p, (c, end)) in offsets(&t, &group) {
        assert_eq!(c, end, "partition {p}: committed to the end");
    }
}

#[test]
fn confluent_avro_resolves_writer_schemas_from_the_registry_and_dead_letters_unknown_ids() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("avro-cf");
    create(&t, 4);
    let schemas_out = dir.path().join("schemas.json");
    let m = produce_with(
        &t,
        4,
        6000,
        1,
        40,
        dir.path(),
        &["--format", "confluent", "--schemas-out", schemas_out.to_str().unwrap()],
    );
    assert_eq!(m.bad.len(), 150);
    let s = schemas(&schemas_out);
    let schema_file = dir.path().join("order.avsc");
    std::fs::write(&schema_file, &s.reader).unwrap();
    // The first two requests get 503: sluice retries.
    let registry = Registry::start(s.ids, 2);
    let reg = format!(
        r#", schema_registry = {{ url = "{}", username = "{USER}", password = "${{REGISTRY_PASSWORD}}" }}"#,
        registry.url
    );
    let group = format!("{t}-g");
    let p = dir.path().join("p.toml");
    std::fs::write(&p, pipeline(&t, &group, &schema_file, &reg, dir.path())).unwrap();
    let v = sluice().arg("validate").arg(&p).env("REGISTRY_PASSWORD", PASSWORD).output().unwrap();
    assert!(v.status.success(), "validate: {}", String::from_utf8_lossy(&v.stderr));
    assert!(registry.requests().is_empty(), "validate runs offline");
    let log = run(&p);
    assert!(!log.contains(PASSWORD), "the registry password is not logged");

    // Version 2 (an extra field) is read with the reader schema: same columns, same values.
    check_output(dir.path(), &m);
    let names: Vec<String> =
        read_parquet(&dir.path().join("lake"))[0].1.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["order_id", "customer", "amount", "status", "_key"]);

    let dead = read_ndjson(&dir.path().join("dead"));
    assert_eq!(dead.len(), m.bad.len(), "every bad record dead-lettered once");
    let count = |needle: &str| dead.iter().filter(|d| d["error"].as_str().unwrap().contains(needle)).count();
    let (truncated, unknown, magic) = (
        count("ends before the Avro record does"),
        count("schema id 99 is not in the registry"),
        count("magic byte 0"),
    );
    assert_eq!(truncated + unknown + magic, dead.len(), "{dead:?}");
    assert!(truncated >= 40 && unknown >= 40 && magic >= 40, "{truncated} {unknown} {magic}");
    for d in &dead {
        let text = d["raw"].as_str().unwrap();
        let raw = match d["raw_encoding"].as_str().unwrap() {
            "base64" => base64::engine::general_purpose::STANDARD.decode(text).unwrap(),
            _ => text.as_bytes().to_vec(),
        };
        let error = d["error"].as_str().unwrap();
        if error.contains("schema id 99") {
            assert_eq!(raw[..5], [0, 0, 0, 0, 99], "the original bytes: {d}");
        } else if error.contains("magic byte") {
            assert_eq!(raw[0], 7, "the original bytes: {d}");
        }
    }

    let requests = registry.requests();
    let problems: Vec<_> = requests.iter().filter(|(_, p)| !p.is_empty()).collect();
    assert!(problems.is_empty(), "requests the registry API would not take: {problems:?}");
    let mut paths: Vec<&str> = requests.iter().map(|(p, _)| p.as_str()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths, ["/schemas/ids/1", "/schemas/ids/2", "/schemas/ids/99"], "each id is fetched, then cached");
    assert_eq!(requests.len(), 3 + 2, "one request per id plus the two retried 503s: {requests:?}");
    for (p, (c, end)) in offsets(&t, &group) {
        assert_eq!(c, end, "partition {p}: committed to the end");
    }
}

#[test]
fn an_unreachable_registry_stops_the_run_with_its_url_and_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("avro-down");
    create(&t, 1);
    let schemas_out = dir.path().join("schemas.json");
    produce_with(
        &t,
        1,
        50,
        1,
        0,
        dir.path(),
        &["--format", "confluent", "--schemas-out", schemas_out.to_str().unwrap()],
    );
    let schema_file = dir.path().join("order.avsc");
    std::fs::write(&schema_file, schemas(&schemas_out).reader).unwrap();
    // A port nothing listens on.
    let port = crate::common::free_port();
    let reg = format!(r#", schema_registry = {{ url = "http://127.0.0.1:{port}", timeout = "1s" }}"#);
    let group = format!("{t}-g");
    let p = dir.path().join("p.toml");
    std::fs::write(&p, pipeline(&t, &group, &schema_file, &reg, dir.path())).unwrap();
    let out = sluice().args(["run", "--bounded", "--no-progress"]).arg(&p).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run must fail: {stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}/schemas/ids/")), "names the registry: {stderr}");
    assert!(read_ndjson(&dir.path().join("dead")).is_empty(), "the records are not at fault: nothing dead-lettered");
    for (p, (c, _)) in offsets(&t, &group) {
        assert!(c < 1, "partition {p}: nothing committed ({c})");
    }
}
