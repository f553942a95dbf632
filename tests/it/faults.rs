//! Faults between sluice and its services (Kafka, PostgreSQL, S3), with the fault proxy ([`FaultProxy`]) in front of a
//! server of the test's own: connections dropped, traffic stalled, connections refused (the
//! service is down), every chunk delayed, responses cut part-way, and the server itself killed
//! and restarted mid-run. Each pipeline runs unbounded through all of it, by itself, and its sink
//! ends with every record exactly once. Recovery times are printed (`--nocapture`) and asserted
//! to stay within a bound.
//!
//! Each phase freezes sluice (SIGSTOP) while its records are produced, thaws it and strikes at
//! once, so the fault always meets a backlog in flight, never an idle pipeline.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::sluice;
use crate::fault_proxy::{Control, FaultProxy, Faults};
use crate::garage::Garage;
use crate::kafka::{create, create_on, offsets_on, produce_to, topic, KillOnDrop, Manifest};
use crate::pg_cluster::PgCluster;
use crate::security::start_tansu;

/// Records per phase.
const PER_PHASE: usize = 3000;
/// How long the sink may take to hold a phase's records once its fault is over.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// A fault: its name, and what it does (returns when the fault is over).
type Fault<'a> = (&'static str, Box<dyn Fn() + Sync + 'a>);

/// The proxy faults every service gets.
fn proxy_faults(c: &Control) -> Vec<Fault<'_>> {
    vec![
        ("none (baseline)", Box::new(|| {})),
        (
            "every connection dropped, 5 times 500 ms apart",
            Box::new(move || {
                for _ in 0..5 {
                    c.drop_all();
                    std::thread::sleep(Duration::from_millis(500));
                }
            }),
        ),
        (
            "all traffic stalled for 5 s",
            Box::new(move || {
                c.stall(Duration::from_secs(5));
                std::thread::sleep(Duration::from_secs(5));
            }),
        ),
        (
            "connections refused for 3 s",
            Box::new(move || {
                c.refuse(Duration::from_secs(3));
                std::thread::sleep(Duration::from_secs(3));
            }),
        ),
        (
            "every chunk delayed 100 ms for 4 s",
            Box::new(move || {
                c.delay(Duration::from_millis(100));
                std::thread::sleep(Duration::from_secs(4));
                c.delay(Duration::ZERO);
            }),
        ),
        (
            "a response cut after 20 bytes, 5 times 300 ms apart",
            Box::new(move || {
                for _ in 0..5 {
                    c.cut_next_response(20);
                    std::thread::sleep(Duration::from_millis(300));
                }
            }),
        ),
    ]
}

struct Recovery {
    fault: &'static str,
    /// From the thaw to the end of the fault.
    fault_took: Duration,
    /// From the end of the fault to the sink holding every record of the phase.
    caught_up_after: Duration,
}

/// Sends SIGSTOP or SIGCONT.
fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig}");
}

/// Runs each fault as a phase: freeze sluice, produce the phase's records (`produce(start)` returns
/// their manifest), thaw, strike; then wait until `count()` reaches every good record so far.
fn run_phases(
    child: &mut std::process::Child,
    faults: &[Fault],
    produce: &dyn Fn(usize) -> Manifest,
    count: &dyn Fn() -> Option<i64>,
    held: &dyn Fn() -> Option<Vec<i64>>,
    log: &Path,
) -> (Vec<Recovery>, Manifest) {
    let mut all = Manifest { good: Default::default(), bad: Vec::new() };
    let mut recoveries = Vec::new();
    for (i, (name, fault)) in faults.iter().enumerate() {
        signal(child, "-STOP");
        let m = produce(1 + i * PER_PHASE);
        all.good.extend(m.good);
        signal(child, "-CONT");
        let thawed = Instant::now();
        fault();
        let fault_took = thawed.elapsed();
        let ended = Instant::now();
        let expected = all.good.len() as i64;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "sluice exited ({status}) during the fault \"{name}\":\n{}",
                    std::fs::read_to_string(log).unwrap()
                );
            }
            let n = count();
            if n == Some(expected) {
                break;
            }
            assert!(
                n.is_none_or(|n| n <= expected),
                "the sink holds {n:?} rows, more than the {expected} produced, after \"{name}\""
            );
            assert!(
                ended.elapsed() < RECOVERY_LIMIT,
                "no recovery {RECOVERY_LIMIT:?} after \"{name}\": the sink holds {n:?} of {expected} rows; {}\n{}",
                missing(&all, held),
                std::fs::read_to_string(log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        recoveries.push(Recovery { fault: name, fault_took, caught_up_after: ended.elapsed() });
    }
    (recoveries, all)
}

/// Which produced records the sink lacks (at most 20 ids), for a failure message.
fn missing(all: &Manifest, held: &dyn Fn() -> Option<Vec<i64>>) -> String {
    let Some(held) = held() else { return "the sink could not be read".into() };
    let held: std::collections::HashSet<i64> = held.into_iter().collect();
    let mut gone: Vec<i64> = all.good.keys().filter(|id| !held.contains(id)).copied().collect();
    gone.sort_unstable();
    format!("{} missing, first ids: {:?}", gone.len(), &gone[..gone.len().min(20)])
}

fn report(service: &str, recoveries: &[Recovery]) {
    eprintln!("faults between sluice and {service} ({PER_PHASE} records a phase):");
    for r in recoveries {
        eprintln!(
            "  {:<55} fault {:>6.2} s, every record in the sink {:>6.2} s after it",
            r.fault,
            r.fault_took.as_secs_f64(),
            r.caught_up_after.as_secs_f64()
        );
    }
}

/// Runs `pipeline` unbounded through every fault ([`run_phases`]), stops it (exit 0) and prints the
/// recoveries; returns every good record produced, and sluice's log.
fn run_through(
    pipeline: &Path,
    faults: &[Fault],
    produce: &dyn Fn(usize) -> Manifest,
    count: &dyn Fn() -> Option<i64>,
    held: &dyn Fn() -> Option<Vec<i64>>,
    service: &str,
) -> (Manifest, String) {
    let log = pipeline.with_file_name("sluice.log");
    let mut child = spawn(pipeline, &log);
    let _guard = KillOnDrop(vec![child.id()]);
    let (recoveries, all) = run_phases(&mut child, faults, produce, count, held, &log);
    stop(child, &log);
    report(service, &recoveries);
    (all, std::fs::read_to_string(&log).unwrap())
}

fn spawn(pipeline: &Path, log: &Path) -> std::process::Child {
    let f = std::fs::File::create(log).unwrap();
    // SLUICE_TEST_RUST_LOG (e.g. `sluice=debug`) looks closer at a failing run.
    let filter = std::env::var("SLUICE_TEST_RUST_LOG").unwrap_or_else(|_| "warn".to_string());
    sluice().args(["run", "--no-progress"]).arg(pipeline).env("RUST_LOG", filter).stderr(f).spawn().unwrap()
}

/// Stops sluice with SIGTERM; it must exit 0.
fn stop(mut child: std::process::Child, log: &Path) {
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0:\n{}", std::fs::read_to_string(log).unwrap());
}

/// What the proxy did: connections dropped, connections refused, responses cut (printed too).
fn fault_counts(proxy: &FaultProxy) -> (usize, usize, usize) {
    use std::sync::atomic::Ordering::SeqCst;
    let (c, s) = (&proxy.control, &proxy.stats);
    let counts = (c.dropped.load(SeqCst), c.refused.load(SeqCst), s.cut.load(SeqCst));
    eprintln!("  proxy: {} connections dropped, {} refused, {} responses cut", counts.0, counts.1, counts.2);
    counts
}

fn source(brokers: &str, topic: &str) -> String {
    format!(
        r#"
[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{topic}-g"
format = {{ type = "json" }}
schema = {{ order_id = "bigint not null", customer = "varchar", amount = "decimal(10,2) not null", status = "varchar" }}
"#
    )
}

fn sink(url: &str, table: &str) -> String {
    format!(
        r#"
[sinks.table]
type = "postgres"
inputs = ["orders"]
url = "{url}"
table = "{table}"
create_table = true
exactly_once = true
batch_rows = 500
flush_interval = "100ms"
"#
    )
}

/// The ids in psql's output, one a line.
fn ids(out: &str) -> Vec<i64> {
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Checks the table holds every good record once, with the right amounts.
fn check_exactly_once(psql: &dyn Fn(&str) -> String, table: &str, m: &Manifest) {
    let n = m.good.len();
    assert_eq!(
        psql(&format!("SELECT count(*), count(DISTINCT order_id) FROM {table}")),
        format!("{n}|{n}"),
        "every record exactly once"
    );
    let cents: i64 = m.good.values().sum();
    assert_eq!(psql(&format!("SELECT (sum(amount) * 100)::bigint FROM {table}")), cents.to_string());
}

#[test]
fn kafka_source_recovers_from_every_fault_and_a_broker_restart_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    // A broker of this test's own (sqlite engine: it keeps its data over a restart), advertising
    // the proxy, so every connection sluice makes to it, after bootstrap too, goes through it.
    let port = crate::common::free_port();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)), Faults::default());
    let broker = Mutex::new(Some(start_tansu(dir.path(), port, proxy.addr, false)));
    let brokers = proxy.addr.to_string();
    let t = topic("faults-kafka");
    create_on(&brokers, &t, 4);
    let s = crate::postgres::schema("faults_kafka");
    let table = format!("{s}.orders");
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[pipeline]\nname = \"kafka-faults\"\n{}{}",
            source(&brokers, &t),
            sink(&crate::postgres::url(), &table)
        ),
    )
    .unwrap();
    let mut faults = proxy_faults(&proxy.control);
    faults.push((
        "broker killed, restarted 2 s later",
        Box::new(|| {
            drop(broker.lock().unwrap().take());
            std::thread::sleep(Duration::from_secs(2));
            *broker.lock().unwrap() = Some(start_tansu(dir.path(), port, proxy.addr, false));
        }),
    ));
    let produce = |start| produce_to(&brokers, &t, 4, PER_PHASE, start, 0, dir.path(), &[]);
    let count = || {
        let exists = crate::postgres::psql(&format!("SELECT to_regclass('{table}') IS NOT NULL")) == "t";
        Some(if exists { crate::postgres::psql(&format!("SELECT count(*) FROM {table}")).parse().unwrap() } else { 0 })
    };
    let held = || Some(ids(&crate::postgres::psql(&format!("SELECT order_id FROM {table}"))));
    let (all, _log) = run_through(&p, &faults, &produce, &count, &held, "Kafka");
    check_exactly_once(&crate::postgres::psql, &table, &all);
    let (dropped, refused, cut) = fault_counts(&proxy);
    assert!(
        dropped >= 5 && refused >= 1 && cut >= 1,
        "the faults happened: {dropped} dropped, {refused} refused, {cut} cut"
    );
}

/// A stop while the broker is down: the final commit cannot reach the group coordinator until the
/// broker is back (librdkafka keeps the request; a "waiting for coordinator" failure is tried
/// again, see `commit_error_passes`), then sluice exits 0 with every offset committed, so a rerun
/// reads nothing again.
#[test]
fn a_stop_while_the_broker_is_down_commits_once_it_is_back_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut broker = Some(start_tansu(dir.path(), port, addr, false));
    let brokers = addr.to_string();
    let t = topic("commit-retry");
    create_on(&brokers, &t, 2);
    let m = produce_to(&brokers, &t, 2, 1000, 1, 0, dir.path(), &[]);
    let lake = dir.path().join("lake");
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[pipeline]\nname = \"commit-retry\"\n{}\n[sinks.lake]\ntype = \"file\"\ninputs = [\"orders\"]\npath = {:?}\nformat = \"json\"\nrotate = {{ max_rows = 500, max_age = \"1s\" }}\n",
            source(&brokers, &t),
            lake.to_str().unwrap()
        ),
    )
    .unwrap();
    let log = dir.path().join("sluice.log");
    let mut child = spawn(&p, &log);
    let _guard = KillOnDrop(vec![child.id()]);
    let lines = || -> usize {
        crate::common::files(&lake, ".ndjson").iter().map(|f| std::fs::read_to_string(f).unwrap().lines().count()).sum()
    };
    let started = Instant::now();
    while lines() < m.good.len() {
        assert!(started.elapsed() < Duration::from_secs(60), "only {} of {} rows after 60 s", lines(), m.good.len());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(broker.take());
    signal(&child, "-TERM");
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        child.try_wait().unwrap().is_none(),
        "sluice exited before the broker was back:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    broker = Some(start_tansu(dir.path(), port, addr, false));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "exits 0 once committed:\n{}", std::fs::read_to_string(&log).unwrap());
    let retries =
        std::fs::read_to_string(&log).unwrap().matches("committing the final offsets failed, retrying").count();
    eprintln!(
        "stopped {:.1} s after SIGTERM, the broker down for the first 4 s; final commit retried {retries} times",
        stopped.elapsed().as_secs_f64()
    );
    let offsets = offsets_on(&brokers, &t, &format!("{t}-g"));
    assert_eq!(offsets.len(), 2);
    for (partition, (committed, end)) in offsets {
        assert_eq!(committed, end, "partition {partition}: every offset committed");
    }
    assert_eq!(lines(), m.good.len(), "each record written once");
    drop(broker);
}

#[test]
fn postgres_sink_recovers_from_every_fault_and_a_server_restart_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = PgCluster::start(None);
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], cluster.port)), Faults::default());
    let t = topic("faults-pg");
    create(&t, 4);
    let table = "public.orders";
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "[pipeline]\nname = \"pg-faults\"\n{}{}",
            source(&crate::kafka::brokers(), &t),
            sink(&cluster.url_via(proxy.addr.port()), table)
        ),
    )
    .unwrap();
    let mut faults = proxy_faults(&proxy.control);
    faults.push((
        "server killed (-m immediate), restarted 2 s later",
        Box::new(|| {
            cluster.kill();
            std::thread::sleep(Duration::from_secs(2));
            cluster.start_again();
            cluster.wait_ready(Duration::from_secs(30));
        }),
    ));
    let produce = |start| crate::kafka::produce(&t, 4, PER_PHASE, start, 0, dir.path());
    let count = || {
        let exists = cluster.try_psql(&format!("SELECT to_regclass('{table}') IS NOT NULL"))?;
        if exists != "t" {
            return Some(0);
        }
        cluster.try_psql(&format!("SELECT count(*) FROM {table}"))?.parse().ok()
    };
    let held = || cluster.try_psql(&format!("SELECT order_id FROM {table}")).map(|out| ids(&out));
    let (all, log) = run_through(&p, &faults, &produce, &count, &held, "PostgreSQL");
    check_exactly_once(&|sql| cluster.psql(sql), table, &all);
    let (dropped, refused, cut) = fault_counts(&proxy);
    // The pool opens connections lazily: a drop finds only those open at that moment.
    assert!(dropped >= 2 && cut >= 1, "the faults happened: {dropped} dropped, {refused} refused, {cut} cut");
    let retries = log.matches("retrying in").count();
    assert!(retries > 0, "the sink retried through the faults (no retry logged)");
}

#[test]
fn s3_sink_recovers_from_every_fault_and_a_server_restart_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = crate::s3::bucket_name("faults");
    let garage = Mutex::new(Garage::start(&b));
    let (endpoint, port) = {
        let g = garage.lock().unwrap();
        (g.endpoint(), g.port)
    };
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)), Faults::default());
    let t = topic("faults-s3");
    create(&t, 4);
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            r#"[pipeline]
name = "s3-faults"
{source}metadata = ["partition", "offset"]

[sinks.lake]
type = "s3"
inputs = ["orders"]
prefix = "faults"
exactly_once = true
rotate = {{ max_rows = 1000, max_age = "1s" }}
{conn}
"#,
            source = source(&crate::kafka::brokers(), &t),
            conn = crate::s3::connection(&b, &proxy.url())
        ),
    )
    .unwrap();
    let mut faults = proxy_faults(&proxy.control);
    faults.push((
        "server killed (SIGKILL), restarted 2 s later",
        Box::new(|| {
            let mut g = garage.lock().unwrap();
            g.kill();
            std::thread::sleep(Duration::from_secs(2));
            g.start_again();
        }),
    ));
    let produce = |start| crate::kafka::produce(&t, 4, PER_PHASE, start, 0, dir.path());
    // While the server restarts the check cannot read it: "not known yet" (`None`) to the polls,
    // an error only at the end.
    let try_read = || {
        let out = crate::common::try_python_tool_env(
            "s3_tool.py",
            &["read", &b, "faults/", "--id-column", "order_id"],
            &[("SLUICE_TEST_S3_ENDPOINT", &endpoint)],
        );
        out.map(|out| serde_json::from_str::<serde_json::Value>(&out).unwrap())
    };
    let read = || try_read().unwrap_or_else(|e| panic!("{e}"));
    let count = || try_read().ok()?["rows"].as_i64();
    let held = || try_read().ok()?["ids"].as_array().map(|a| a.iter().filter_map(serde_json::Value::as_i64).collect());
    let (all, _log) = run_through(&p, &faults, &produce, &count, &held, "S3 (Garage)");
    let got = read();
    let mut ids: Vec<i64> = got["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    ids.sort_unstable();
    let mut want: Vec<i64> = all.good.keys().copied().collect();
    want.sort_unstable();
    assert!(ids == want, "every record exactly once: {} rows, {} expected", ids.len(), want.len());
    assert_eq!(got["pending_uploads"], 0, "no multipart upload left behind");
    let (dropped, refused, cut) = fault_counts(&proxy);
    assert!(dropped >= 1 && cut >= 1, "the faults happened: {dropped} dropped, {refused} refused, {cut} cut");
}
