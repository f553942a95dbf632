//! kill -9 at random moments, 20 times in a row on one pipeline (Kafka → PostgreSQL, exactly
//! once), then a bounded run: every record is in the table once.

use std::time::{Duration, Instant};

use crate::common::sluice;
use crate::kafka::{create, produce, run_bounded, topic};
use crate::postgres::{psql, schema, url};

#[test]
fn twenty_kill_9s_at_random_moments_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = schema("crashloop");
    let t = topic("crashloop");
    create(&t, 4);
    let m = produce(&t, 4, 100_000, 1, 0, dir.path());
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            r#"
[pipeline]
name = "crash-loop"
batch_size = 2000

[sources.orders]
type = "kafka"
brokers = "{brokers}"
topics = ["{t}"]
group_id = "{t}-g"
format = {{ type = "json" }}
metadata = ["partition", "offset"]
schema = {{ order_id = "bigint not null", customer = "varchar", amount = "decimal(10,2) not null", status = "varchar" }}

[sinks.table]
type = "postgres"
inputs = ["orders"]
url = "{url}"
table = "{s}.orders"
create_table = true
exactly_once = true
batch_rows = 5000
flush_interval = "200ms"
"#,
            brokers = crate::kafka::brokers(),
            url = url()
        ),
    )
    .unwrap();
    // Random moments, from a seed the failure message gives (to replay a schedule).
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let count = || psql(&format!("SELECT count(*) FROM {s}.orders")).parse::<i64>().unwrap_or(0);
    let exists = || psql(&format!("SELECT to_regclass('{s}.orders') IS NOT NULL")) == "t";
    // The first run is killed as soon as its first rows are in: how long that took (start-up,
    // connecting, the first commit) sets the window of the other kills, so on a loaded machine
    // they still land before, during and after the first write rather than all before it.
    let mut counts = Vec::new();
    let mut first_write_ms = 0u64;
    for kill in 1..=20 {
        let mut child = sluice().args(["run", "--no-progress"]).arg(&p).spawn().unwrap();
        let started = Instant::now();
        if kill == 1 {
            while !(exists() && count() > 0) {
                assert!(child.try_wait().unwrap().is_none(), "run 1 exited by itself");
                assert!(started.elapsed() < Duration::from_secs(120), "run 1 wrote nothing in 120 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            first_write_ms = started.elapsed().as_millis() as u64;
        } else {
            let wait = Duration::from_millis(first_write_ms / 4 + next() % (first_write_ms * 2 + 1000));
            while started.elapsed() < wait {
                assert!(child.try_wait().unwrap().is_none(), "run {kill} exited by itself (seed {seed})");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let n = if exists() { count() } else { 0 };
        assert!(counts.last().is_none_or(|&last| n >= last), "rows went down after kill {kill}: {counts:?} then {n}");
        counts.push(n);
    }
    let expected = m.good.len() as i64;
    assert!(
        counts[0] > 0 && counts[0] < expected,
        "the first kill was to land mid-run, after {first_write_ms} ms (seed {seed}): {counts:?}"
    );
    run_bounded(&p);
    assert_eq!(
        psql(&format!("SELECT count(*), count(DISTINCT order_id) FROM {s}.orders")),
        format!("{expected}|{expected}"),
        "every record exactly once after 20 kills (seed {seed}, rows after each kill: {counts:?})"
    );
    let cents: i64 = m.good.values().sum();
    assert_eq!(psql(&format!("SELECT (sum(amount) * 100)::bigint FROM {s}.orders")), cents.to_string());
}
