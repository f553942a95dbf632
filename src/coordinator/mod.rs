//! Coordinator and worker mode: `sluice coordinator` shards the sources' partitions across
//! `sluice worker` processes, which register and heartbeat over HTTP (JSON, bearer token).
//!
//! - Membership by leases: a worker that sends no heartbeat for `lease_timeout` is gone.
//! - Assignment: [`assign::assign`], balanced and sticky.
//! - Handover: a shard that moves is first taken out of its owner's assignment (it drains: stops
//!   reading, flushes its sinks, commits) and granted to the new owner, with a new epoch, only once
//!   the old owner reports that it applied that assignment — or once its lease has expired.
//! - Fencing: see [`crate::fence`]; epochs grow with the wall clock (milliseconds), so they keep
//!   growing across coordinator restarts without any stored state.
//! - Restart: the coordinator keeps nothing on disk. Workers keep processing what they hold and
//!   report it in their next heartbeat; the coordinator adopts it, and grants nothing during its
//!   first lease period, so no shard is handed out twice. A worker whose lease ran out before the
//!   coordinator came back has stopped its shards and claims none; it reports them as
//!   `last_held`, and the first assignment after that period puts them back on it (new epochs)
//!   as far as balance allows, so a slow restart does not reshuffle every shard either.

pub mod assign;
pub mod client;
pub mod server;
pub mod tls;
pub mod worker;

use serde::{Deserialize, Serialize};

use crate::batch::ShardInfo;

/// Environment variable holding the shared bearer token of coordinator and workers.
pub const TOKEN_ENV: &str = "SLUICE_COORDINATOR_TOKEN";

/// A shard granted to a worker at an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub shard: ShardInfo,
    pub epoch: u64,
}

impl Grant {
    /// `source/shard id`, the shard's key in the coordinator.
    pub fn key(&self) -> String {
        shard_key(&self.shard)
    }
}

/// `source/shard id`.
pub fn shard_key(s: &ShardInfo) -> String {
    format!("{}/{}", s.source, s.id)
}

/// `POST /v1/heartbeat`: registers the worker when the coordinator does not know it (first call,
/// or after a coordinator restart), renews its lease, and reports what it holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Unique per worker process (`name-random`).
    pub worker_id: String,
    /// The worker's name (the pod name).
    pub name: String,
    /// Version of the newest assignment the worker has applied: its running shards are exactly
    /// that assignment's (every shard taken out of it is drained and committed).
    pub applied_version: u64,
    /// The shards it is reading, with their epochs.
    pub held: Vec<Grant>,
    /// Sent only while its lease has run out (it stopped those shards and claims nothing): the
    /// shards of its last assignment. A restarted coordinator grants them back to it, at new
    /// epochs, when balance allows, instead of dealing every shard out afresh; never adopted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub last_held: Vec<Grant>,
    /// Shards read to their end (files, table ranges): never assigned again by this coordinator.
    pub finished: Vec<String>,
    /// Per shard: committed position and rate (positions per second).
    pub shards: Vec<ShardReport>,
    /// Records (positions) per second over the last heartbeat interval, all shards together.
    pub rate: f64,
    /// The worker got SIGTERM and is draining to leave: no shard is granted to it any more
    /// (otherwise a shard freed by another leaver could land on it between its signal and its
    /// leave, and be drained twice).
    #[serde(default)]
    pub leaving: bool,
    /// How busy it was: what the autoscaler measures a replica's capacity from.
    #[serde(flatten)]
    pub load: Load,
}

/// A worker less than this busy counts as this busy: its capacity is then a lower bound.
pub const MIN_BUSY: f64 = 0.05;

/// How busy a worker was over its last heartbeat interval (flattened into the heartbeat and the
/// status JSON as `cpu_busy`, `sink_busy`, `capacity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Load {
    /// Share of the interval the process used the CPUs it may use (0 to 1).
    pub cpu_busy: f64,
    /// Share of the interval its sinks were blocked on their destinations (0 to 1).
    pub sink_busy: f64,
    /// Records per second it could process: `rate / busy()`, when it processed anything.
    pub capacity: Option<f64>,
}

impl Load {
    pub fn new(rate: f64, cpu_busy: f64, sink_busy: f64) -> Self {
        let mut l = Load { cpu_busy, sink_busy, capacity: None };
        l.capacity = (rate > 0.0).then(|| rate / l.busy());
        l
    }

    /// The busy share that bounds its rate: CPU or sinks, at least [`MIN_BUSY`].
    pub fn busy(&self) -> f64 {
        self.cpu_busy.max(self.sink_busy).max(MIN_BUSY)
    }
}

/// What a worker reports of one shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardReport {
    pub key: String,
    pub committed: Option<u64>,
    pub rate: f64,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Version of this assignment (grows on every change, across restarts too).
    pub version: u64,
    /// The shards to read.
    pub assignment: Vec<Grant>,
    /// Shards being moved away: stop reading them, but their commits still count until the
    /// assignment that drops them is applied.
    pub draining: Vec<Grant>,
    pub lease_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
}

/// `POST /v1/leave`: the worker has drained and committed everything and exits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaveRequest {
    pub worker_id: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub pipeline: String,
    pub lease_timeout_ms: u64,
    pub workers: Vec<WorkerStatus>,
    pub shards: Vec<ShardStatus>,
    /// The autoscaler's last decision (absent before the first one).
    #[serde(default)]
    pub autoscale: Option<AutoscaleStatus>,
}

/// The autoscaler's last decision and what it saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    /// `kube`, `process` or `none`.
    pub scaler: String,
    pub desired: u32,
    pub current: u32,
    /// Workers registered.
    pub ready: u32,
    /// `up`, `down` or `hold`.
    pub direction: String,
    pub reason: String,
    pub input_rate: f64,
    pub throughput: f64,
    pub per_replica_rate: Option<f64>,
    pub lag_records: f64,
    pub lag_seconds: f64,
    pub sink_saturated: bool,
    /// Milliseconds since the Unix epoch.
    pub decided_at_ms: u64,
    /// The last error of the scaler, if its last call failed.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub name: String,
    pub shards: usize,
    pub rate: f64,
    pub last_heartbeat_ms_ago: u64,
    pub version: u64,
    pub applied_version: u64,
    #[serde(flatten)]
    pub load: Load,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardStatus {
    pub key: String,
    /// `assigned`, `moving`, `free` or `finished`.
    pub state: String,
    pub owner: Option<String>,
    pub epoch: Option<u64>,
    pub committed: Option<u64>,
    pub end: Option<u64>,
    pub lag_records: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub rate: f64,
}

/// The status as tables, for `sluice status`.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "pipeline {}  lease timeout {} ms", s.pipeline, s.lease_timeout_ms);
    let ww = s
        .workers
        .iter()
        .map(|w| w.worker_id.len())
        .chain(s.shards.iter().filter_map(|x| x.owner.as_ref().map(String::len)))
        .max()
        .unwrap_or(6)
        .max(6);
    let kw = s.shards.iter().map(|x| x.key.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(out, "\n{:<ww$}  {:>6}  {:>10}  LAST HEARTBEAT", "WORKER", "SHARDS", "RATE/s");
    for w in &s.workers {
        let _ = writeln!(
            out,
            "{:<ww$}  {:>6}  {:>10.0}  {} ms ago",
            w.worker_id, w.shards, w.rate, w.last_heartbeat_ms_ago
        );
    }
    let _ = writeln!(
        out,
        "\n{:<kw$}  {:<8}  {:<ww$}  {:>13}  {:>9}  {:>7}  {:>8}",
        "SHARD", "STATE", "OWNER", "EPOCH", "LAG(rec)", "LAG(s)", "RATE/s"
    );
    for sh in &s.shards {
        let _ = writeln!(
            out,
            "{:<kw$}  {:<8}  {:<ww$}  {:>13}  {:>9}  {:>7}  {:>8.0}",
            sh.key,
            sh.state,
            sh.owner.as_deref().unwrap_or("-"),
            sh.epoch.map_or("-".into(), |e| e.to_string()),
            sh.lag_records.map_or("-".into(), |l| l.to_string()),
            sh.lag_seconds.map_or("-".into(), |l| format!("{l:.1}")),
            sh.rate
        );
    }
    let lag: u64 = s.shards.iter().filter_map(|x| x.lag_records).sum();
    let rate: f64 = s.workers.iter().map(|w| w.rate).sum();
    let _ = writeln!(
        out,
        "\n{} workers, {} shards, total lag {lag} records, {rate:.0} records/s",
        s.workers.len(),
        s.shards.len()
    );
    if let Some(a) = &s.autoscale {
        let _ = writeln!(
            out,
            "\nautoscale ({}): {} -> {} replicas ({} running), {}\n  input {:.0} rec/s, throughput {:.0} rec/s, per replica {}, lag {:.0} records / {:.1} s{}\n  {}",
            a.scaler,
            a.current,
            a.desired,
            a.ready,
            a.direction,
            a.input_rate,
            a.throughput,
            a.per_replica_rate.map_or("unmeasured".into(), |r| format!("{r:.0} rec/s")),
            a.lag_records,
            a.lag_seconds,
            if a.sink_saturated { ", sinks saturated" } else { "" },
            a.reason
        );
        if let Some(e) = &a.error {
            let _ = writeln!(out, "  scaler error: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_lines_up_and_sums_lag_and_rates() {
        let s = Status {
            pipeline: "p".into(),
            lease_timeout_ms: 10_000,
            workers: vec![WorkerStatus {
                worker_id: "worker-with-a-long-name-0a1b2c3d".into(),
                shards: 1,
                rate: 1500.0,
                ..Default::default()
            }],
            shards: vec![
                ShardStatus {
                    key: "orders/a-long-topic-name/11".into(),
                    state: "assigned".into(),
                    owner: Some("worker-with-a-long-name-0a1b2c3d".into()),
                    epoch: Some(1_796_167_116_631),
                    lag_records: Some(40),
                    lag_seconds: Some(0.5),
                    rate: 80.0,
                    ..Default::default()
                },
                ShardStatus {
                    key: "orders/t/0".into(),
                    state: "free".into(),
                    lag_records: Some(2),
                    ..Default::default()
                },
            ],
            autoscale: None,
        };
        let text = render_status(&s);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("orders/") || l.starts_with("SHARD")).collect();
        assert_eq!(rows.len(), 3, "{text}");
        let at = rows[0].find("STATE").unwrap();
        assert!(rows[1][at..].starts_with("assigned") && rows[2][at..].starts_with("free"), "{text}");
        assert!(text.contains("1 workers, 2 shards, total lag 42 records, 1500 records/s"), "{text}");
    }
}
