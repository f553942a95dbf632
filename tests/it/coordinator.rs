//! Coordinator and workers as real processes on 127.0.0.1, over a real broker (tansu) into a real
//! PostgreSQL: kill -9, joins, a coordinator restart, a rolling restart and a zombie worker, with
//! a producer running throughout; at the end every record is in the table exactly once.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{free_port, sluice};
use crate::kafka::{brokers, create, produce, topic};
use crate::postgres::{psql, schema, url};

pub(crate) const TOKEN: &str = "test-token-not-a-secret";
const WRONG_TOKEN: &str = "wrong-token-4f2a";

pub(crate) struct Cluster {
    dir: PathBuf,
    pipeline: PathBuf,
    pub(crate) url: String,
    port: u16,
    coordinator: Option<Child>,
    workers: Vec<(String, Child)>,
    /// More flags and environment for `sluice coordinator`.
    coordinator_args: Vec<String>,
    coordinator_env: Vec<(String, String)>,
}

impl Cluster {
    fn new(dir: &Path, pipeline_text: &str) -> Cluster {
        Cluster::with_args(dir, pipeline_text, &[], &[])
    }

    pub(crate) fn with_args(
        dir: &Path,
        pipeline_text: &str,
        coordinator_args: &[&str],
        coordinator_env: &[(&str, &str)],
    ) -> Cluster {
        let pipeline = dir.join("p.toml");
        std::fs::write(&pipeline, pipeline_text).unwrap();
        let port = free_port();
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            pipeline,
            url: format!("http://127.0.0.1:{port}"),
            port,
            coordinator: None,
            workers: Vec::new(),
            coordinator_args: coordinator_args.iter().map(|a| a.to_string()).collect(),
            coordinator_env: coordinator_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        c.start_coordinator();
        c
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log"))).unwrap()
    }

    fn start_coordinator(&mut self) {
        let child = sluice()
            .env("SLUICE_COORDINATOR_TOKEN", TOKEN)
            .env("RUST_LOG", log_filter())
            .args(["coordinator", "--lease-timeout", "3s", "--heartbeat-interval", "500ms", "--refresh-interval", "1s"])
            .arg("--pipeline")
            .arg(&self.pipeline)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.coordinator_args)
            .envs(self.coordinator_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(self.log("coordinator"))
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
    }

    fn start_worker(&mut self, name: &str) {
        let child = sluice()
            .env("SLUICE_COORDINATOR_TOKEN", TOKEN)
            .env("RUST_LOG", log_filter())
            .args(["worker", "--worker", name, "--coordinator", &self.url])
            .arg("--pipeline")
            .arg(&self.pipeline)
            .stdout(Stdio::null())
            .stderr(self.log(name))
            .spawn()
            .unwrap();
        self.workers.push((name.to_string(), child));
    }

    /// SIGTERM to the coordinator (it stops the workers it started first); waits for it.
    pub(crate) fn stop_coordinator(&mut self) -> std::process::ExitStatus {
        let mut c = self.coordinator.take().unwrap();
        let ok = std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        assert!(ok.success());
        c.wait().unwrap()
    }

    fn worker_pid(&self, name: &str) -> u32 {
        self.workers.iter().find(|(n, _)| n == name).unwrap().1.id()
    }

    fn signal(&self, name: &str, sig: &str) {
        let ok = std::process::Command::new("kill").args([sig, &self.worker_pid(name).to_string()]).status().unwrap();
        assert!(ok.success());
    }

    fn wait_worker(&mut self, name: &str) -> std::process::ExitStatus {
        let i = self.workers.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut child) = self.workers.remove(i);
        child.wait().unwrap()
    }

    pub(crate) fn status(&self) -> Option<serde_json::Value> {
        let out = sluice()
            .env("SLUICE_COORDINATOR_TOKEN", TOKEN)
            .args(["status", "--json", "--coordinator", &self.url])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// shard key → owner name (the worker id without its random suffix), once every shard of
    /// `shards` is assigned and owners hold `counts` shards (sorted), within `limit`.
    fn wait_balanced(&self, shards: usize, counts: &[usize], limit: Duration) -> (Duration, Vec<(String, String)>) {
        let start = Instant::now();
        loop {
            if let Some(s) = self.status() {
                let list = s["shards"].as_array().unwrap();
                let assigned: Vec<(String, String)> = list
                    .iter()
                    .filter(|x| x["state"] == "assigned")
                    .map(|x| {
                        let owner = x["owner"].as_str().unwrap();
                        (x["key"].as_str().unwrap().to_string(), owner.rsplit_once('-').unwrap().0.to_string())
                    })
                    .collect();
                let mut per: std::collections::BTreeMap<&str, usize> = Default::default();
                for (_, o) in &assigned {
                    *per.entry(o.as_str()).or_default() += 1;
                }
                let mut got: Vec<usize> = per.values().copied().collect();
                got.sort_unstable();
                let live: Vec<String> =
                    s["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect();
                if assigned.len() == shards && got == counts && assigned.iter().all(|(_, o)| live.contains(o)) {
                    let mut a = assigned;
                    a.sort();
                    return (start.elapsed(), a);
                }
            }
            assert!(
                start.elapsed() < limit,
                "not balanced as {counts:?} within {limit:?}: {}",
                serde_json::to_string_pretty(&self.status()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The kernel's view of a worker process and its threads (state and what each waits in), for
    /// a failure message.
    fn process_state(&self, name: &str) -> String {
        let pid = self.worker_pid(name);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let state = status.lines().find(|l| l.starts_with("State:")).unwrap_or("State: (gone)");
        let mut out = format!("pid {pid} {state}\n");
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stat = read("stat");
            let st = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("?").to_string();
            out.push_str(&format!(
                "  {} {} {st} {}\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan")
            ));
        }
        out
    }

    /// The last `n` lines of a log.
    fn log_tail(&self, name: &str, n: usize) -> String {
        let all = self.logs(name);
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub(crate) fn logs(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every worker's log, each under its name.
    fn worker_logs(&self) -> String {
        self.workers.iter().map(|(w, _)| format!("--- {w}\n{}\n", self.logs(w))).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = &mut self.coordinator {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The coordinator's and workers' log filter, or `SLUICE_TEST_RUST_LOG` to look closer at a
/// failing run. The Kafka source at debug: a failure that lost a record then shows whether a
/// partition's read skipped an offset ("offset gap") and where each commit landed.
fn log_filter() -> String {
    std::env::var("SLUICE_TEST_RUST_LOG").unwrap_or_else(|_| "sluice=info,sluice::source::kafka=debug".to_string())
}

pub(crate) fn pg_pipeline(name: &str, t: &str, table: &str) -> String {
    pipeline(name, t, &pg_pipeline_sink(table))
}

fn pg_pipeline_sink(table: &str) -> String {
    pg_sink(table, r#"flush_interval = "300ms""#)
}

/// An exactly-once PostgreSQL sink into `table`, with `flush` (its flush settings).
fn pg_sink(table: &str, flush: &str) -> String {
    format!(
        r#"
[sinks.pg]
type = "postgres"
inputs = ["orders"]
url = "{url}"
table = "{table}"
create_table = true
exactly_once = true
{flush}
"#,
        url = url()
    )
}

fn pipeline(name: &str, t: &str, sink: &str) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"
batch_size = 500

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{t}"]
group_id = "{t}-g"
format = {{ type = "json" }}
max_wait = "100ms"

[sources.orders.schema]
order_id = "bigint not null"
customer = "varchar"
amount = "decimal(10,2) not null"
status = "varchar not null"
{sink}
"#,
        brokers = brokers(),
    )
}

/// Produces records `next..` in chunks until stopped; returns how many it produced.
struct Producer {
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Producer {
    fn start(t: &str, partitions: usize, first: usize, chunk: usize, dir: &Path) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicUsize::new(first - 1));
        let (t, dir, s, p) = (t.to_string(), dir.to_path_buf(), stop.clone(), produced.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let start = p.load(Ordering::SeqCst) + 1;
                produce(&t, partitions, chunk, start, 0, &dir);
                p.fetch_add(chunk, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Producer { stop, produced, handle: Some(handle) }
    }

    /// Stops after the chunk in flight; returns the last id produced (ids are 1..=n).
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap();
        self.produced.load(Ordering::SeqCst)
    }
}

pub(crate) fn count(table: &str) -> i64 {
    if psql(&format!("SELECT to_regclass('{table}') IS NOT NULL")) != "t" {
        return 0;
    }
    psql(&format!("SELECT count(*) FROM {table}")).parse().unwrap_or(0)
}

/// (rows, distinct order ids) in `table`; (0, 0) before it exists.
fn rows_and_distinct(table: &str) -> (i64, i64) {
    if count(table) == 0 {
        return (0, 0);
    }
    let r = psql(&format!("SELECT count(*) || ' ' || count(DISTINCT order_id) FROM {table}"));
    let mut p = r.split(' ').map(|x| x.parse::<i64>().unwrap());
    (p.next().unwrap(), p.next().unwrap())
}

/// Waits until `table` holds `n` rows; `explain` adds to the failure message.
fn wait_rows(table: &str, n: i64, limit: Duration, explain: impl Fn() -> String) {
    let start = Instant::now();
    while count(table) < n {
        assert!(start.elapsed() < limit, "only {} of {n} rows after {limit:?}{}", count(table), explain());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a stall looks like once ids 1..=`last` were produced: the missing ids per partition, the
/// coordinator's view, and the live workers' logs.
fn stall_report(c: &Cluster, table: &str, last: i64) -> String {
    format!(
        "; by partition: {}\nstatus: {}\n{}",
        missing_by_partition(table, last, 12),
        serde_json::to_string_pretty(&c.status()).unwrap_or_default(),
        c.worker_logs()
    )
}

/// The ids of 1..=`last` that `table` lacks, per partition (id i is in partition i % `partitions`):
/// how many and the lowest.
fn missing_by_partition(table: &str, last: i64, partitions: i64) -> String {
    psql(&format!(
        "SELECT coalesce(string_agg(p || ': ' || n || ' missing from id ' || lo, ', '), 'none') FROM (SELECT i % {partitions} AS p, count(*) AS n, min(i) AS lo \
         FROM generate_series(1, {last}) i WHERE NOT EXISTS (SELECT 1 FROM {table} WHERE order_id = i) GROUP BY 1 ORDER BY 1) m"
    ))
}

fn moved(a: &[(String, String)], b: &[(String, String)]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x.0 == y.0 && x.1 != y.1).count()
}

#[test]
fn workers_share_a_topic_and_survive_kill_join_coordinator_and_rolling_restarts_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("coord");
    create(&t, 12);
    let table = format!("{}.orders", schema("coord"));
    // A second sink without exactly-once: at-least-once, its duplicates are reported.
    let alo = format!("{}.orders_alo", schema("coordalo"));
    let sinks = format!(
        "{}\n[sinks.alo]\ntype = \"postgres\"\ninputs = [\"orders\"]\nurl = \"{}\"\ntable = \"{alo}\"\ncreate_table = true\nflush_interval = \"300ms\"\n",
        pg_pipeline_sink(&table),
        url()
    );
    let mut c = Cluster::new(dir.path(), &pipeline("coord", &t, &sinks));
    for w in ["w1", "w2", "w3"] {
        c.start_worker(w);
    }
    let producer = Producer::start(&t, 12, 1, 1200, dir.path());
    let (took, three) = c.wait_balanced(12, &[4, 4, 4], Duration::from_secs(60));
    eprintln!("3 workers balanced 4/4/4 after {took:?}");
    wait_rows(&table, 1000, Duration::from_secs(60), String::new);
    // Lag per shard (from the broker) and each worker's rate (from its heartbeats).
    let start = Instant::now();
    loop {
        let st = c.status().unwrap();
        let lagged = st["shards"].as_array().unwrap().iter().filter(|x| x["lag_records"].is_u64()).count();
        let rates = st["workers"].as_array().unwrap().iter().filter(|w| w["rate"].as_f64().unwrap() > 0.0).count();
        if lagged == 12 && rates > 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no lag or rates in the status: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let table_out =
        sluice().env("SLUICE_COORDINATOR_TOKEN", TOKEN).args(["status", "--coordinator", &c.url]).output().unwrap();
    let text = String::from_utf8_lossy(&table_out.stdout);
    assert!(text.contains("3 workers, 12 shards, total lag"), "{text}");
    assert!(text.contains(&format!("orders/{t}/11")), "{text}");
    eprintln!("{text}");

    // kill -9 one worker: its four partitions resume elsewhere within the lease (3 s) + a few.
    c.signal("w1", "-KILL");
    c.wait_worker("w1");
    let (took, two) = c.wait_balanced(12, &[6, 6], Duration::from_secs(3 + 7));
    eprintln!("after kill -9 of w1, its shards resumed elsewhere in {took:?}");
    assert_eq!(moved(&three, &two), 4, "only w1's four shards moved: {three:?} -> {two:?}");

    // A 4th worker (w4) and a 3rd (w5) join: only the shards needed move.
    c.start_worker("w4");
    let (took, with4) = c.wait_balanced(12, &[4, 4, 4], Duration::from_secs(30));
    eprintln!("w4 joined: balanced in {took:?}");
    assert_eq!(moved(&two, &with4), 4, "two from each of w2 and w3: {two:?} -> {with4:?}");
    c.start_worker("w5");
    let (took, with5) = c.wait_balanced(12, &[3, 3, 3, 3], Duration::from_secs(30));
    eprintln!("w5 joined: balanced in {took:?}");
    assert_eq!(moved(&with4, &with5), 3, "one from each: {with4:?} -> {with5:?}");

    // The coordinator restarts (kill -9): data keeps flowing, and nothing moves. First wait
    // until rows flow again after the join's handover (the new generations are running).
    let start = Instant::now();
    loop {
        let a = count(&table);
        std::thread::sleep(Duration::from_millis(300));
        if count(&table) > a {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no rows flowing after w5 joined");
    }
    let before = count(&table);
    let mut coord = c.coordinator.take().unwrap();
    coord.kill().unwrap();
    coord.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let during = count(&table);
    c.start_coordinator();
    let (took, after) = c.wait_balanced(12, &[3, 3, 3, 3], Duration::from_secs(20));
    eprintln!("coordinator restarted: workers re-registered in {took:?}; rows {before} -> {during} while it was down");
    assert_eq!(after, with5, "a coordinator restart moves no shard");
    assert!(during > before, "rows kept flowing while the coordinator was down ({before} -> {during})");

    // Down longer than the lease (3 s): the workers stop their shards and come back claiming
    // none, with their last assignment as a hint; the shards go back where they were.
    let lapsed_before = c.worker_logs().matches("lease lost").count();
    let mut coord = c.coordinator.take().unwrap();
    coord.kill().unwrap();
    coord.wait().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    c.start_coordinator();
    let (took, again) = c.wait_balanced(12, &[3, 3, 3, 3], Duration::from_secs(30));
    let lapsed = c.worker_logs().matches("lease lost").count() - lapsed_before;
    eprintln!("coordinator down 5 s: {lapsed} leases ran out, balanced again in {took:?}");
    assert!(lapsed >= 4, "every worker's lease ran out while the coordinator was down:\n{}", c.worker_logs());
    assert_eq!(again, with5, "a restart slower than the leases moves no shard either");

    // A rolling restart: SIGTERM each worker in turn (it drains, commits, leaves), then a
    // replacement joins.
    for (old, new) in [("w2", "w6"), ("w3", "w7"), ("w4", "w8"), ("w5", "w9")] {
        c.signal(old, "-TERM");
        let code = c.wait_worker(old);
        assert!(code.success(), "{old} exited {code:?} after SIGTERM:\n{}", c.logs(old));
        c.start_worker(new);
        let (took, _) = c.wait_balanced(12, &[3, 3, 3, 3], Duration::from_secs(30));
        eprintln!("rolling restart {old} -> {new}: balanced again in {took:?}");
    }

    let last = producer.finish() as i64;
    wait_rows(&table, last, Duration::from_secs(120), || stall_report(&c, &table, last));
    // Caught up: the coordinator sees no lag left on any shard.
    let start = Instant::now();
    loop {
        let st = c.status().unwrap();
        let lag: u64 = st["shards"].as_array().unwrap().iter().map(|x| x["lag_records"].as_u64().unwrap_or(1)).sum();
        if lag == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "lag {lag} left after the end: {st}");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        psql(&format!("SELECT count(*), count(DISTINCT order_id), min(order_id), max(order_id) FROM {table}")),
        format!("{last}|{last}|1|{last}"),
        "every produced record exactly once"
    );
    wait_rows(&alo, last, Duration::from_secs(60), || stall_report(&c, &alo, last));
    let (rows, distinct) = {
        let r = psql(&format!("SELECT count(*) || ' ' || count(DISTINCT order_id) FROM {alo}"));
        let mut p = r.split(' ').map(|x| x.parse::<i64>().unwrap());
        (p.next().unwrap(), p.next().unwrap())
    };
    assert_eq!(distinct, last, "the at-least-once sink has every record");
    eprintln!("{last} records produced; the at-least-once sink holds {rows} rows: {} duplicates", rows - distinct);
}

/// (rows, distinct order ids) in the sink.
type Rows = dyn Fn() -> (i64, i64);

fn wait_sink(rows: &Rows, n: i64, limit: Duration, explain: impl Fn() -> String) {
    let start = Instant::now();
    while rows().0 < n {
        assert!(start.elapsed() < limit, "only {:?} of {n} rows after {limit:?}{}", rows(), explain());
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A worker paused past its lease (SIGSTOP) loses its shards; when it resumes (SIGCONT) with
/// records read and not yet written, its writes and commits are refused: the sink ends with
/// every record once.
/// `missing` says which ids of 1..=n the sink lacks (for the failure message).
fn zombie(name: &str, sink: &str, rows: &Rows, missing: &dyn Fn(i64) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let t = topic(name);
    create(&t, 4);
    let mut c = Cluster::new(dir.path(), &pipeline(name, &t, sink));
    c.start_worker("z1");
    c.start_worker("z2");
    let producer = Producer::start(&t, 4, 1, 800, dir.path());
    c.wait_balanced(4, &[2, 2], Duration::from_secs(60));
    wait_sink(rows, 1500, Duration::from_secs(60), || c.worker_logs());

    // Paused past its lease: its shards move to z2, which writes on.
    c.signal("z1", "-STOP");
    let (took, _) = c.wait_balanced(4, &[4], Duration::from_secs(15));
    eprintln!("{name}: z1 stopped; its shards moved after {took:?}");
    let moved_at = rows().0;
    wait_sink(rows, moved_at + 1500, Duration::from_secs(60), || c.worker_logs());
    c.signal("z1", "-CONT");
    let start = Instant::now();
    while !c.logs("z1").contains("fenced") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "z1 never reported a refused write:\n{}\n--- z1's process\n{}--- coordinator (last 60 lines)\n{}",
            c.logs("z1"),
            c.process_state("z1"),
            c.log_tail("coordinator", 60)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for l in c.logs("z1").lines().filter(|l| l.contains("fenced")).take(3) {
        eprintln!("{name}: z1 after SIGCONT: {l}");
    }
    c.wait_balanced(4, &[2, 2], Duration::from_secs(30));
    let last = producer.finish() as i64;
    wait_sink(rows, last, Duration::from_secs(120), || {
        format!("; missing (id i is in partition i % 4): {}\n{}", missing(last), c.worker_logs())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rows(), (last, last), "no duplicate from the zombie, nothing lost");
}

/// A worker paused past its lease gets its shards back at new epochs (the worker that took them
/// over left meanwhile) while the generation that read under the old grants still holds rows it
/// has not written. Those rows were written by the other worker too; writing them with the new
/// epochs would add duplicates. The fence refuses them because they were read under the old
/// grants; the new generation reads on from the stored positions.
#[test]
fn a_worker_granted_its_shards_again_refuses_what_it_read_under_the_old_grants() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("regrant");
    create(&t, 4);
    let table = format!("{}.orders", schema("regrant"));
    // Written only at 1,000 buffered rows or when a generation stops, never on a timer: the
    // rows a worker holds when it is paused stay unwritten until its generation drains.
    let sink = pg_sink(&table, "batch_rows = 1000\nflush_interval = \"1h\"");
    let rows = || rows_and_distinct(&table);
    let mut c = Cluster::new(dir.path(), &pipeline("regrant", &t, &sink));
    c.start_worker("r1");
    c.start_worker("r2");
    let (_, owners) = c.wait_balanced(4, &[2, 2], Duration::from_secs(60));
    let n = 3000;
    produce(&t, 4, n, 1, 0, dir.path());
    // Each worker reads 1,500 records in batches of at most 500: one write of 1,000 or more, and
    // the rest held.
    wait_rows(&table, 2000, Duration::from_secs(60), || c.worker_logs());
    std::thread::sleep(Duration::from_secs(1));
    let r1_partitions: Vec<i64> =
        owners.iter().filter(|(_, o)| o == "r1").map(|(k, _)| k.rsplit('/').next().unwrap().parse().unwrap()).collect();
    let held_by_r1 = |p: &[i64]| -> i64 {
        let list = p.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let written: i64 =
            psql(&format!("SELECT count(*) FROM {table} WHERE order_id % 4 IN ({list})")).parse().unwrap();
        (n as i64) / 2 - written
    };
    let held = held_by_r1(&r1_partitions);
    assert!(held > 0 && held < 1000, "r1 should hold some rows unwritten, holds {held} ({:?} written)", rows());

    c.signal("r1", "-STOP");
    c.wait_balanced(4, &[4], Duration::from_secs(15));
    // r2 takes r1's partitions from their stored positions. More records make it write: once
    // every id of the first lot is in the table, it has written the rows r1 holds.
    produce(&t, 4, n, n + 1, 0, dir.path());
    let first_lot = || -> i64 { psql(&format!("SELECT count(*) FROM {table} WHERE order_id <= {n}")).parse().unwrap() };
    let start = Instant::now();
    while first_lot() < n as i64 {
        assert!(start.elapsed() < Duration::from_secs(60), "r2 wrote {} of the first {n} records", first_lot());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Then it leaves, writing all it read.
    c.signal("r2", "-TERM");
    assert!(c.wait_worker("r2").success());
    let (written, distinct) = rows();
    assert_eq!(written, distinct, "r2 wrote every record once before r1 resumed");

    c.signal("r1", "-CONT");
    let start = Instant::now();
    while !c.logs("r1").contains("fenced") {
        assert!(start.elapsed() < Duration::from_secs(20), "r1 never refused a write:\n{}", c.logs("r1"));
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_balanced(4, &[4], Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let (written, distinct) = rows();
    assert_eq!(written - distinct, 0, "r1 wrote the {held} rows it held under its old grants again\n{}", c.logs("r1"));
    let logs = c.logs("r1");
    assert!(
        logs.contains("was read under the grant of epoch"),
        "r1's refusal was not the one for an earlier grant:\n{logs}"
    );
    // Stopped gracefully, r1 writes nothing more: every record once.
    c.signal("r1", "-TERM");
    assert!(c.wait_worker("r1").success());
    let all = 2 * n as i64;
    assert_eq!(rows(), (all, all));
}

#[test]
fn a_zombie_worker_cannot_commit_or_write_to_postgres_after_its_lease() {
    let table = format!("{}.orders", schema("zombie"));
    let rows = {
        let table = table.clone();
        move || rows_and_distinct(&table)
    };
    let sink = pg_pipeline_sink(&table);
    let missing = move |n: i64| missing_by_partition(&table, n, 4);
    zombie("zombie-pg", &sink, &rows, &missing);
}

#[test]
fn a_zombie_worker_cannot_publish_objects_to_s3_after_its_lease() {
    let b = crate::s3::bucket("zombie");
    let sink = format!(
        r#"
[sinks.lake]
type = "s3"
inputs = ["orders"]
prefix = "z"
format = "json"
exactly_once = true
rotate = {{ max_rows = 400 }}
{}
"#,
        crate::s3::connection(&b, &crate::s3::endpoint())
    );
    let ids = move || -> Vec<i64> {
        let got = crate::s3::read_back(&b, "z/");
        got["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
    };
    let rows = {
        let ids = ids.clone();
        move || {
            let ids = ids();
            let distinct: std::collections::HashSet<i64> = ids.iter().copied().collect();
            (ids.len() as i64, distinct.len() as i64)
        }
    };
    let missing = move |n: i64| {
        let have: std::collections::HashSet<i64> = ids().into_iter().collect();
        let lacking: Vec<i64> = (1..=n).filter(|i| !have.contains(i)).collect();
        match lacking.len() {
            0 => "none".to_string(),
            k => format!("{k}, from {:?}", &lacking[..k.min(20)]),
        }
    };
    zombie("zombie-s3", &sink, &rows, &missing);
}

/// `[sources.events]` (NDJSON objects under `in/` of `bucket`) into `table` by a PostgreSQL sink
/// that is not exactly-once, so records the source reads twice show up as duplicates; `more`
/// adds components.
fn s3_events_pipeline(name: &str, bucket: &str, table: &str, more: &str) -> String {
    format!(
        r#"
[pipeline]
name = "{name}"

[sources.events]
type = "s3"
prefix = "in/"
format = {{ type = "json" }}
{conn}

[sources.events.schema]
order_id = "bigint not null"
name = "varchar"

[sinks.pg]
type = "postgres"
inputs = ["events"]
url = "{url}"
table = "{table}"
create_table = true
flush_interval = "200ms"
{more}"#,
        conn = crate::s3::connection(bucket, &crate::s3::endpoint()),
        url = url()
    )
}

/// Object `in/o-{i}.ndjson` with order ids `first..first + 1000`.
fn put_object(dir: &Path, bucket: &str, i: i64, first: i64) {
    let lines: Vec<String> = (first..first + 1000).map(|n| format!(r#"{{"order_id": {n}, "name": "n{n}"}}"#)).collect();
    crate::s3::put_lines(dir, bucket, &format!("in/o-{i}.ndjson"), &lines);
}

/// Waits until `n` objects are marked done under the pipeline `name`'s state and `table` holds
/// `rows` rows.
fn wait_done(c: &Cluster, bucket: &str, name: &str, table: &str, n: usize, rows: i64) {
    let markers =
        || crate::s3::tool(&["keys", bucket, &format!("_sluice/{name}/events/done/")]).as_array().unwrap().len();
    let start = Instant::now();
    while markers() < n || count(table) < rows {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{} of {n} objects marked done, {} of {rows} rows: {}\n{}",
            markers(),
            count(table),
            serde_json::to_string_pretty(&c.status()).unwrap_or_default(),
            c.worker_logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn workers_keep_each_objects_position_apart_and_a_restarted_coordinator_grants_only_new_objects() {
    let dir = tempfile::tempdir().unwrap();
    let b = crate::s3::bucket("coords3");
    let s = schema("coords3");
    let table = format!("{s}.events");
    let put = |i: i64| put_object(dir.path(), &b, i, i * 1000 + 1);
    for i in 0..6 {
        put(i);
    }
    let mut c = Cluster::new(dir.path(), &s3_events_pipeline(&s, &b, &table, ""));
    c.start_worker("s1");
    c.start_worker("s2");
    // Done markers are written once an object's every record is committed.
    wait_done(&c, &b, &s, &table, 6, 6000);
    assert_eq!(rows_and_distinct(&table), (6000, 6000));
    for w in ["s1", "s2"] {
        assert!(c.logs(w).contains("running the assigned shards"), "{w} read no object:\n{}", c.logs(w));
    }
    // An object rewritten after it finished (another ETag) is read again, once; the first
    // version's marker is deleted once two listings have not found that version.
    put_object(dir.path(), &b, 0, 100_001);
    let etag = crate::s3::tool(&["etag", &b, "in/o-0.ndjson"]);
    let new_marker = format!("_sluice/{s}/events/done/{}/in/o-0.ndjson", etag.as_str().unwrap());
    let markers = || -> Vec<String> {
        let keys = crate::s3::tool(&["keys", &b, &format!("_sluice/{s}/events/done/")]);
        keys.as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect()
    };
    let start = Instant::now();
    while !markers().contains(&new_marker) {
        assert!(start.elapsed() < Duration::from_secs(90), "no marker {new_marker}: {:?}", markers());
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_done(&c, &b, &s, &table, 6, 7000);
    assert!(c.logs("coordinator").contains("shard changed since it finished"), "{}", c.logs("coordinator"));

    // The coordinator restarts (kill -9): it lists only the objects not marked done, so the two
    // added meanwhile are read and the six done ones are not read again.
    let mut coord = c.coordinator.take().unwrap();
    coord.kill().unwrap();
    coord.wait().unwrap();
    let before = c.logs("coordinator").len();
    put(6);
    put(7);
    c.start_coordinator();
    wait_done(&c, &b, &s, &table, 8, 9000);
    std::thread::sleep(Duration::from_secs(3)); // three listings: anything granted again would show
    assert_eq!(rows_and_distinct(&table), (9000, 9000), "every record once\n{}", c.worker_logs());
    let markers = markers();
    assert_eq!(markers.len(), 8, "one per object, o-0's for its second version: {markers:?}");
    assert!(markers.contains(&new_marker), "{markers:?}");
    // Not only unread (a worker would skip a done object): not granted at all.
    let logs = c.logs("coordinator");
    let since = &logs[before..];
    let granted: Vec<&str> = since.lines().filter(|l| l.contains("shard granted")).collect();
    assert!(granted.iter().any(|l| l.contains("in/o-6.ndjson")), "o-6 was not granted:\n{since}");
    for i in 0..6 {
        let key = format!("in/o-{i}.ndjson");
        assert!(
            !granted.iter().any(|l| l.contains(&key)),
            "{key}, done before the restart, was granted again:\n{since}"
        );
    }
}

#[test]
fn an_object_done_while_its_generation_runs_on_is_not_read_again_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let b = crate::s3::bucket("regrant");
    let s = schema("regrant");
    let table = format!("{s}.events");
    put_object(dir.path(), &b, 0, 1);
    // A slow generator keeps the worker's generation running after the object is read, so the
    // object is marked done but not yet reported finished when the next object changes the
    // assignment.
    let ticks = r#"
[sources.ticks]
type = "generator"
shape = "orders"
count = 100000000
rate = 50

[sinks.nowhere]
type = "blackhole"
inputs = ["ticks"]
"#;
    let mut c = Cluster::new(dir.path(), &s3_events_pipeline(&s, &b, &table, ticks));
    c.start_worker("g1");
    wait_done(&c, &b, &s, &table, 1, 1000);
    // As a worker stopped between writing the marker and deleting the progress object leaves it:
    // the marker wins over it.
    let etag = crate::s3::tool(&["etag", &b, "in/o-0.ndjson"]);
    let stale = dir.path().join("stale.json");
    std::fs::write(&stale, format!(r#"{{"etag": {etag}, "committed": 600}}"#)).unwrap();
    crate::s3::tool(&["put", &b, &format!("_sluice/{s}/events/progress/in/o-0.ndjson"), stale.to_str().unwrap()]);
    put_object(dir.path(), &b, 1, 1001);
    wait_done(&c, &b, &s, &table, 2, 2000);
    let logs = c.logs("g1");
    assert!(logs.contains("assignment changed"), "the new object did not restart the generation:\n{logs}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rows_and_distinct(&table), (2000, 2000), "o-0 was read again (in part)\n{}", c.logs("g1"));
}

#[test]
fn calls_without_the_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let t = topic("auth");
    create(&t, 1);
    let c = Cluster::new(dir.path(), &pg_pipeline("auth", &t, "public.never_written"));
    let start = Instant::now();
    while c.status().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator never answered:\n{}",
            c.logs("coordinator")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for token in ["", WRONG_TOKEN] {
        let out = sluice()
            .env("SLUICE_COORDINATOR_TOKEN", if token.is_empty() { " " } else { token })
            .args(["status", "--coordinator", &c.url])
            .output()
            .unwrap();
        assert!(!out.status.success(), "a call with token `{token}` was let in");
    }
    // Without any Authorization header, straight over TCP.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    let body =
        r#"{"worker_id":"intruder","name":"x","applied_version":0,"held":[],"finished":[],"shards":[],"rate":0}"#;
    write!(
        s,
        "POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let logs = c.logs("coordinator");
    assert!(logs.contains("refused a call with no bearer token"), "{logs}");
    assert!(logs.contains("refused a call with a wrong bearer token"), "{logs}");
    assert!(!logs.contains(WRONG_TOKEN) && !logs.contains(TOKEN), "a token in the logs:\n{logs}");
    let st = c.status().unwrap();
    assert!(st["workers"].as_array().unwrap().is_empty(), "the intruder registered: {st}");
    // Probes and metrics need no token.
    for (path, want) in
        [("/healthz", "ok"), ("/readyz", "ready"), ("/metrics", "sluice_coordinator_refused_calls_total")]
    {
        // `/readyz` turns ready once the shards were listed the first time.
        let start = Instant::now();
        loop {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", c.port)).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            if answer.starts_with("HTTP/1.1 200") && answer.contains(want) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{path}: {answer}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn table_key_ranges_are_shards_read_once_by_workers_and_then_finished() {
    let dir = tempfile::tempdir().unwrap();
    let s = schema("coordpg");
    psql(&format!(
        "CREATE TABLE {s}.src (id bigint PRIMARY KEY, name text); \
         INSERT INTO {s}.src SELECT g, 'n' || g FROM generate_series(1, 40000) g"
    ));
    let text = format!(
        r#"
[pipeline]
# Unique per run: exactly-once positions in sluice_offsets are keyed by pipeline and shard, and
# the shards of equal tables are equal.
name = "{s}"

[sources.src]
type = "postgres"
url = "{url}"
table = "{s}.src"
shards = 6

[sinks.copy]
type = "postgres"
inputs = ["src"]
url = "{url}"
table = "{s}.copy"
create_table = true
exactly_once = true
"#,
        url = url()
    );
    let mut c = Cluster::new(dir.path(), &text);
    c.start_worker("p1");
    c.start_worker("p2");
    let start = Instant::now();
    loop {
        let st = c.status();
        let finished = st
            .as_ref()
            .map_or(0, |st| st["shards"].as_array().unwrap().iter().filter(|x| x["state"] == "finished").count());
        if finished == 6 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "not every range finished: {}\n{}",
            serde_json::to_string_pretty(&st).unwrap_or_default(),
            c.logs("p1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = c.status().unwrap();
    let owners: std::collections::HashSet<&str> =
        st["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(owners.len(), 2, "both workers stayed registered: {st}");
    assert_eq!(
        psql(&format!("SELECT count(*), count(DISTINCT id), sum(id) FROM {s}.copy")),
        format!("40000|40000|{}", 40000i64 * 40001 / 2),
        "every row of the table once"
    );
    // Both workers read ranges.
    for w in ["p1", "p2"] {
        assert!(c.logs(w).contains("running the assigned shards"), "{w} ran nothing:\n{}", c.logs(w));
    }
}
