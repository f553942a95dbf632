//! `sluice coordinator`: membership, assignment, handover and lag, behind an HTTP API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use indexmap::IndexMap;
use tokio_util::sync::CancellationToken;

use super::tls::Peer;
use super::{
    assign, shard_key, AutoscaleStatus, Grant, HeartbeatRequest, HeartbeatResponse, LeaveRequest, Load, ShardStatus,
    Status, WorkerStatus,
};
use crate::batch::ShardInfo;
use crate::observe::{names, Health};
use crate::source::{ShardLag, Source};
use crate::{Error, Result};

/// Timing of the coordinator.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// A worker without a heartbeat for this long is gone; its shards move.
    pub lease_timeout: Duration,
    /// How often workers send heartbeats (told to them in every answer).
    pub heartbeat_interval: Duration,
    /// How often the sources' shards are listed again (new partitions) and lag is read.
    pub refresh_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            refresh_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
struct Owner {
    worker: String,
    epoch: u64,
    /// Set while the shard is being moved away: the owner's assignment version that drops it.
    revoke_version: Option<u64>,
}

#[derive(Debug)]
struct ShardState {
    info: ShardInfo,
    listed: bool,
    finished: bool,
    owner: Option<Owner>,
    lag: Option<ShardLag>,
    committed: Option<u64>,
    rate: f64,
    last_progress: Instant,
    /// When the shard lost its owner (for handover times in the logs).
    free_since: Option<Instant>,
    /// Records per second arriving (from its end position between two lag reads).
    input_rate: f64,
    prev_end: Option<(u64, Instant)>,
}

#[derive(Debug)]
struct WorkerState {
    name: String,
    last_seen: Instant,
    version: u64,
    applied: u64,
    rate: f64,
    load: Load,
    /// Draining to leave: keeps what it holds until it leaves, is granted nothing.
    leaving: bool,
}

/// The coordinator's state machine, without any I/O (the HTTP handlers and the timer drive it).
#[derive(Debug)]
pub struct Core {
    timing: Timing,
    started: Instant,
    last_stamp: u64,
    listed_once: bool,
    shards: IndexMap<String, ShardState>,
    workers: IndexMap<String, WorkerState>,
    /// Shard → (worker, epoch) from the `last_held` of workers that registered with a lapsed
    /// lease: where unowned shards go in the first assignment after the restart grace.
    hints: HashMap<String, (String, u64)>,
    /// The autoscaler's last decision, for the status.
    autoscale: Option<AutoscaleStatus>,
}

/// Milliseconds since the Unix epoch: epochs and versions start from it, so they keep growing
/// across coordinator restarts with no stored state.
fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Core {
    pub fn new(timing: Timing, now: Instant) -> Self {
        Core {
            timing,
            started: now,
            last_stamp: 0,
            listed_once: false,
            shards: IndexMap::new(),
            workers: IndexMap::new(),
            hints: HashMap::new(),
            autoscale: None,
        }
    }

    fn stamp(&mut self) -> u64 {
        self.last_stamp = wall_ms().max(self.last_stamp + 1);
        self.last_stamp
    }

    /// The shards the sources have now (replaces the earlier listing).
    pub fn set_shards(&mut self, listed: Vec<ShardInfo>, now: Instant) {
        let keys: HashSet<String> = listed.iter().map(shard_key).collect();
        for s in listed {
            let key = shard_key(&s);
            let e = self.shards.entry(key.clone()).or_insert_with(|| ShardState {
                info: s.clone(),
                listed: true,
                finished: false,
                owner: None,
                lag: None,
                committed: None,
                rate: 0.0,
                last_progress: now,
                free_since: Some(now),
                input_rate: 0.0,
                prev_end: None,
            });
            e.listed = true;
            // Another version of a shard no one holds (a rewritten object): a finished one is read
            // again. One being read keeps its old version until it is done, so the change shows
            // (and is read) after that.
            if e.info != s && e.owner.is_none() {
                if e.finished {
                    tracing::info!(shard = %key, "shard changed since it finished (rewritten): reading it again");
                }
                e.finished = false;
                e.info = s;
            }
        }
        for (k, s) in self.shards.iter_mut() {
            if !keys.contains(k) {
                s.listed = false;
            }
        }
        // Shards that are gone and held by no one are forgotten.
        self.shards.retain(|_, s| s.listed || s.owner.is_some());
        self.listed_once = true;
    }

    /// Lag read from the sources, by shard key; the input rate of each shard is how far its
    /// end moved since the last read.
    pub fn set_lag(&mut self, lag: HashMap<String, ShardLag>, now: Instant) {
        for (k, l) in lag {
            if let Some(s) = self.shards.get_mut(&k) {
                if let Some((end, at)) = s.prev_end {
                    let dt = now.duration_since(at).as_secs_f64();
                    if dt > 0.0 {
                        s.input_rate = l.end.saturating_sub(end) as f64 / dt;
                    }
                }
                s.prev_end = Some((l.end, now));
                s.lag = Some(l);
            }
        }
    }

    /// What the autoscaler measures now: input rate and lag from the sources, throughput, busy
    /// shares and capacity from the workers' heartbeats.
    pub fn sample(&self, at: f64, now: Instant) -> crate::autoscale::Sample {
        let status = self.status("", now);
        let mut shards = std::collections::BTreeMap::new();
        let mut input_rate = 0.0;
        for (st, (key, s)) in status.shards.iter().zip(&self.shards) {
            if !s.listed || s.finished {
                continue;
            }
            input_rate += s.input_rate;
            shards.insert(key.clone(), (s.input_rate, st.lag_records.unwrap_or(0) as f64));
        }
        // One replica's capacity: all the workers' records over all their busy time (a mean of
        // per-worker estimates would let nearly idle workers, whose estimate is a lower bound,
        // drag it down).
        let (rate, busy) = self
            .workers
            .values()
            .filter(|w| w.rate > 0.0)
            .fold((0.0, 0.0), |(r, b), w| (r + w.rate, b + w.load.busy()));
        let n = self.workers.len().max(1) as f64;
        crate::autoscale::Sample {
            at,
            input_rate,
            throughput: self.workers.values().map(|w| w.rate).sum(),
            per_replica_rate: (busy > 0.0).then(|| rate / busy),
            lag_records: shards.values().map(|(_, l)| l).sum(),
            lag_seconds: status.shards.iter().filter_map(|s| s.lag_seconds).fold(0.0, f64::max),
            shards,
            sink_saturated: !self.workers.is_empty()
                && self.workers.values().map(|w| w.load.sink_busy).sum::<f64>() / n >= SINK_SATURATED,
        }
    }

    /// Workers registered now.
    pub fn worker_count(&self) -> u32 {
        self.workers.len() as u32
    }

    /// Shards that can be assigned (listed, not finished).
    pub fn assignable_shards(&self) -> u32 {
        self.shards.values().filter(|s| s.listed && !s.finished).count() as u32
    }

    /// Whether the start-up grace (one lease, and a first listing) is over.
    pub fn settled(&self, now: Instant) -> bool {
        self.listed_once && now.duration_since(self.started) >= self.timing.lease_timeout
    }

    pub fn set_autoscale(&mut self, a: AutoscaleStatus) {
        self.autoscale = Some(a);
    }

    /// The listed shards, for lag probes.
    pub fn listed(&self) -> Vec<ShardInfo> {
        self.shards.values().filter(|s| s.listed).map(|s| s.info.clone()).collect()
    }

    /// Handles a heartbeat; registers unknown workers and adopts what they hold.
    pub fn heartbeat(&mut self, req: &HeartbeatRequest, now: Instant) -> HeartbeatResponse {
        let id = req.worker_id.clone();
        // Versions and epochs stay above anything a worker has seen, even if this coordinator's
        // clock is behind the one that issued them (a restart on another node).
        let seen =
            req.held.iter().chain(&req.last_held).map(|g| g.epoch).chain([req.applied_version]).max().unwrap_or(0);
        self.last_stamp = self.last_stamp.max(seen);
        if !self.workers.contains_key(&id) {
            let version = self.stamp();
            tracing::info!(worker = %id, held = req.held.len(), last_held = req.last_held.len(), "worker registered");
            self.workers.insert(
                id.clone(),
                WorkerState {
                    name: req.name.clone(),
                    last_seen: now,
                    version,
                    applied: 0,
                    rate: 0.0,
                    load: Load::default(),
                    leaving: false,
                },
            );
            for g in &req.held {
                self.adopt(&id, g, now);
            }
            // Of two workers that held a shard, the later grant (higher epoch) is where it was;
            // at equal epochs, the first to register.
            for g in &req.last_held {
                let hint = self.hints.entry(g.key()).or_insert_with(|| (id.clone(), g.epoch));
                if g.epoch > hint.1 {
                    *hint = (id.clone(), g.epoch);
                }
            }
        }
        {
            let w = self.workers.get_mut(&id).expect("registered above");
            w.last_seen = now;
            w.applied = w.applied.max(req.applied_version);
            w.rate = req.rate;
            w.load = req.load;
            if req.leaving && !w.leaving {
                tracing::info!(worker = %id, "worker is draining to leave: nothing more is granted to it");
            }
            w.leaving |= req.leaving;
        }
        let applied = self.workers[&id].applied;
        // Shards moved away are released once the owner applied the assignment without them.
        for (key, s) in self.shards.iter_mut() {
            if let Some(o) = &s.owner {
                if o.worker == id && o.revoke_version.is_some_and(|r| applied >= r) {
                    tracing::info!(shard = %key, worker = %id, "shard drained and released");
                    s.owner = None;
                    s.free_since = Some(now);
                }
            }
        }
        for key in &req.finished {
            if let Some(s) = self.shards.get_mut(key) {
                if s.owner.as_ref().is_some_and(|o| o.worker == id) {
                    s.finished = true;
                    s.owner = None;
                }
            }
        }
        for r in &req.shards {
            if let Some(s) = self.shards.get_mut(&r.key) {
                if s.owner.as_ref().is_some_and(|o| o.worker == id) {
                    if r.committed != s.committed {
                        s.last_progress = now;
                    }
                    s.committed = r.committed;
                    s.rate = r.rate;
                }
            }
        }
        self.rebalance(now);
        self.response(&id)
    }

    fn adopt(&mut self, worker: &str, g: &Grant, now: Instant) {
        let key = g.key();
        self.last_stamp = self.last_stamp.max(g.epoch);
        let s = self.shards.entry(key.clone()).or_insert_with(|| ShardState {
            info: g.shard.clone(),
            listed: false,
            finished: false,
            owner: None,
            lag: None,
            committed: None,
            rate: 0.0,
            last_progress: now,
            free_since: None,
            input_rate: 0.0,
            prev_end: None,
        });
        match &s.owner {
            Some(o) if o.worker != worker && o.epoch >= g.epoch => {
                tracing::warn!(shard = %key, worker, holder = %o.worker, "a worker reports a shard another holds at a newer epoch; it loses it");
            }
            _ => {
                s.owner = Some(Owner { worker: worker.to_string(), epoch: g.epoch, revoke_version: None });
                s.free_since = None;
            }
        }
    }

    /// A worker leaves after draining: its shards are free at once.
    pub fn leave(&mut self, worker: &str, now: Instant) -> bool {
        if self.workers.shift_remove(worker).is_none() {
            return false;
        }
        tracing::info!(worker, "worker left");
        self.free_shards_of(worker, now);
        self.rebalance(now);
        true
    }

    fn free_shards_of(&mut self, worker: &str, now: Instant) {
        for s in self.shards.values_mut() {
            if s.owner.as_ref().is_some_and(|o| o.worker == worker) {
                s.owner = None;
                s.free_since = Some(now);
            }
        }
    }

    /// Expires leases, then moves shards towards the balanced, sticky assignment.
    pub fn rebalance(&mut self, now: Instant) {
        let lease = self.timing.lease_timeout;
        let expired: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) >= lease)
            .map(|(k, _)| k.clone())
            .collect();
        for w in expired {
            tracing::warn!(worker = %w, "worker missed its heartbeats for the lease timeout: its shards move");
            metrics::counter!(names::COORDINATOR_EXPIRED_WORKERS_TOTAL).increment(1);
            self.workers.shift_remove(&w);
            self.free_shards_of(&w, now);
        }
        metrics::gauge!(names::COORDINATOR_WORKERS).set(self.workers.len() as f64);
        // After a restart, workers re-register within a lease: nothing is granted before that.
        if now.duration_since(self.started) < lease || !self.listed_once {
            return;
        }
        // A worker draining to leave gets nothing; what it holds moves once it has left.
        let mut workers: Vec<String> =
            self.workers.iter().filter(|(_, w)| !w.leaving).map(|(k, _)| k.clone()).collect();
        workers.sort();
        let eligible: Vec<String> =
            self.shards.iter().filter(|(_, s)| s.listed && !s.finished).map(|(k, _)| k.clone()).collect();
        let current: HashMap<String, String> = self
            .shards
            .iter()
            .filter_map(|(k, s)| {
                s.owner.as_ref().filter(|o| o.revoke_version.is_none()).map(|o| (k.clone(), o.worker.clone()))
            })
            .collect();
        // Used once: after a restart, shards whose worker's lease ran out in the meantime go
        // back to it as balance allows.
        let hints: HashMap<String, String> =
            std::mem::take(&mut self.hints).into_iter().map(|(k, (w, _))| (k, w)).collect();
        let target: BTreeMap<String, String> = assign::assign_hinted(&eligible, &workers, &current, &hints);
        let mut changed: HashSet<String> = HashSet::new();
        let mut grants: Vec<(String, String)> = Vec::new();
        let mut revokes: Vec<String> = Vec::new();
        let mut cancels: Vec<String> = Vec::new();
        for (key, s) in &self.shards {
            // Shards no source lists any more are taken back from their owners.
            let to = if s.listed && !s.finished { target.get(key) } else { None };
            match (&s.owner, to) {
                (None, Some(t)) => {
                    grants.push((key.clone(), t.clone()));
                    changed.insert(t.clone());
                }
                (Some(o), t) if o.revoke_version.is_none() && t != Some(&o.worker) => {
                    revokes.push(key.clone());
                    changed.insert(o.worker.clone());
                }
                (Some(o), Some(t)) if o.revoke_version.is_some() && *t == o.worker => {
                    cancels.push(key.clone());
                    changed.insert(o.worker.clone());
                }
                _ => {}
            }
        }
        if changed.is_empty() {
            return;
        }
        metrics::counter!(names::COORDINATOR_REBALANCES_TOTAL).increment(1);
        let mut versions = HashMap::new();
        let mut changed: Vec<String> = changed.into_iter().collect();
        changed.sort();
        for w in changed {
            let v = self.stamp();
            if let Some(ws) = self.workers.get_mut(&w) {
                ws.version = v;
            }
            versions.insert(w, v);
        }
        for key in revokes {
            let s = self.shards.get_mut(&key).expect("listed above");
            if let Some(o) = s.owner.as_mut() {
                o.revoke_version = versions.get(&o.worker).copied();
                tracing::info!(shard = %key, from = %o.worker, "moving shard: draining its owner first");
            }
        }
        for key in cancels {
            if let Some(o) = self.shards.get_mut(&key).and_then(|s| s.owner.as_mut()) {
                o.revoke_version = None;
            }
        }
        for (key, to) in grants {
            let epoch = self.stamp();
            let s = self.shards.get_mut(&key).expect("listed above");
            let waited = s.free_since.take().map(|t| now.duration_since(t));
            s.owner = Some(Owner { worker: to.clone(), epoch, revoke_version: None });
            metrics::counter!(names::COORDINATOR_HANDOVERS_TOTAL).increment(1);
            tracing::info!(shard = %key, to = %to, epoch, unowned_ms = waited.map(|d| d.as_millis() as u64), "shard granted");
        }
    }

    fn response(&self, worker: &str) -> HeartbeatResponse {
        let mut assignment = Vec::new();
        let mut draining = Vec::new();
        for s in self.shards.values() {
            let Some(o) = s.owner.as_ref().filter(|o| o.worker == worker) else { continue };
            let g = Grant { shard: s.info.clone(), epoch: o.epoch };
            if o.revoke_version.is_some() {
                draining.push(g);
            } else {
                assignment.push(g);
            }
        }
        HeartbeatResponse {
            version: self.workers.get(worker).map_or(0, |w| w.version),
            assignment,
            draining,
            lease_timeout_ms: self.timing.lease_timeout.as_millis() as u64,
            heartbeat_interval_ms: self.timing.heartbeat_interval.as_millis() as u64,
        }
    }

    /// The state, with lag per shard (records, and seconds at the measured rate or since the
    /// committed position last moved) and each worker's rate; also exported as metrics.
    pub fn status(&self, pipeline: &str, now: Instant) -> Status {
        let mut shards = Vec::new();
        for (key, s) in &self.shards {
            let committed = s.lag.and_then(|l| l.committed).or(s.committed.map(|c| c + 1));
            let lag_records = s.lag.map(|l| l.end.saturating_sub(committed.unwrap_or(0)));
            let lag_seconds = lag_records.map(|l| {
                if l == 0 {
                    0.0
                } else if s.rate > 0.0 {
                    l as f64 / s.rate
                } else {
                    now.duration_since(s.last_progress).as_secs_f64()
                }
            });
            let state = if s.finished {
                "finished"
            } else {
                match &s.owner {
                    None => "free",
                    Some(o) if o.revoke_version.is_some() => "moving",
                    Some(_) => "assigned",
                }
            };
            if let Some(l) = lag_records {
                let labels = [("source", s.info.source.clone()), ("shard", s.info.id.clone())];
                metrics::gauge!(names::SHARD_LAG_RECORDS, &labels).set(l as f64);
                metrics::gauge!(names::SHARD_LAG_SECONDS, &labels).set(lag_seconds.unwrap_or(0.0));
            }
            shards.push(ShardStatus {
                key: key.clone(),
                state: state.into(),
                owner: s.owner.as_ref().map(|o| o.worker.clone()),
                epoch: s.owner.as_ref().map(|o| o.epoch),
                committed,
                end: s.lag.map(|l| l.end),
                lag_records,
                lag_seconds,
                rate: s.rate,
            });
        }
        let workers = self
            .workers
            .iter()
            .map(|(id, w)| {
                metrics::gauge!(names::WORKER_RATE_RECORDS_PER_SECOND, "worker_id" => id.clone()).set(w.rate);
                WorkerStatus {
                    worker_id: id.clone(),
                    name: w.name.clone(),
                    shards: self.shards.values().filter(|s| s.owner.as_ref().is_some_and(|o| &o.worker == id)).count(),
                    rate: w.rate,
                    last_heartbeat_ms_ago: now.duration_since(w.last_seen).as_millis() as u64,
                    version: w.version,
                    applied_version: w.applied,
                    load: w.load,
                }
            })
            .collect();
        metrics::gauge!(names::COORDINATOR_SHARDS).set(self.shards.len() as f64);
        Status {
            pipeline: pipeline.to_string(),
            lease_timeout_ms: self.timing.lease_timeout.as_millis() as u64,
            workers,
            shards,
            autoscale: self.autoscale.clone(),
        }
    }
}

use crate::autoscale::SINK_SATURATED;

#[derive(Clone)]
struct App {
    core: Arc<Mutex<Core>>,
    token: Arc<str>,
    pipeline: Arc<str>,
    /// Mutual TLS: API calls need a verified client certificate.
    mutual_tls: bool,
}

fn authorized(app: &App, headers: &HeaderMap, peer: Peer, path: &str) -> Result<(), Box<Response>> {
    if app.mutual_tls && !peer.client_cert {
        tracing::warn!(%peer, path, "refused a call without a client certificate (mutual TLS is on)");
        metrics::counter!(names::COORDINATOR_REFUSED_CALLS_TOTAL).increment(1);
        let error = "no client certificate: this coordinator requires one signed by its --tls-client-ca";
        return Err(Box::new((StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": error }))).into_response()));
    }
    let given = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let ok = given
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), app.token.as_bytes()));
    if ok {
        return Ok(());
    }
    let why = if given.is_none() { "no bearer token" } else { "a wrong bearer token" };
    tracing::warn!(%peer, path, "refused a call with {why}");
    metrics::counter!(names::COORDINATOR_REFUSED_CALLS_TOTAL).increment(1);
    Err(Box::new((StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": format!("{why}: send `Authorization: Bearer <token>` with the token of {}", super::TOKEN_ENV) }))).into_response()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn heartbeat(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Result<Json<HeartbeatRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&app, &headers, peer, "/v1/heartbeat") {
        return *r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": e.body_text() }))).into_response()
        }
    };
    if req.worker_id.is_empty() {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": "worker_id is empty" }))).into_response();
    }
    let resp = app.core.lock().unwrap_or_else(|e| e.into_inner()).heartbeat(&req, Instant::now());
    Json(resp).into_response()
}

async fn leave(
    State(app): State<App>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Result<Json<LeaveRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = authorized(&app, &headers, peer, "/v1/leave") {
        return *r;
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": e.body_text() }))).into_response()
        }
    };
    let known = app.core.lock().unwrap_or_else(|e| e.into_inner()).leave(&req.worker_id, Instant::now());
    Json(serde_json::json!({ "left": known })).into_response()
}

async fn status(State(app): State<App>, ConnectInfo(peer): ConnectInfo<Peer>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&app, &headers, peer, "/v1/status") {
        return *r;
    }
    let s = app.core.lock().unwrap_or_else(|e| e.into_inner()).status(&app.pipeline, Instant::now());
    Json(s).into_response()
}

/// The autoscaler of [`serve`].
pub struct AutoscaleOptions {
    pub policy: crate::autoscale::Policy,
    /// How often a decision is made (inputs are sampled every second).
    pub interval: Duration,
    pub scaler: Arc<dyn crate::autoscale::scaler::Scaler>,
}

/// Options of [`serve`].
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    pub token: String,
    pub timing: Timing,
    pub pipeline: String,
    pub sources: Vec<(String, Arc<dyn Source>)>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub health: Health,
    pub stop: CancellationToken,
    pub autoscale: AutoscaleOptions,
    /// HTTPS (see [`super::tls::ServerTls::config`]); `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether `tls` requires client certificates (for the log line).
    pub mutual_tls: bool,
}

/// Serves the coordinator API (and `/healthz`, `/readyz`, `/metrics`) until `stop` fires.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(opts: CoordinatorOptions) -> Result<()> {
    let core = Arc::new(Mutex::new(Core::new(opts.timing, Instant::now())));
    let app = App {
        core: core.clone(),
        token: opts.token.into(),
        pipeline: opts.pipeline.clone().into(),
        mutual_tls: opts.mutual_tls,
    };
    let handle = opts.metrics.clone();
    let health = opts.health.clone();
    let router = axum::Router::new()
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/leave", post(leave))
        .route("/v1/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = health.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
        .route("/metrics", get(move || std::future::ready(handle.as_ref().map(|h| h.render()).unwrap_or_default())))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| Error::Metrics { addr: opts.listen.to_string(), message: format!("cannot listen: {e}") })?;
    let scheme = match (&opts.tls, opts.mutual_tls) {
        (None, _) => "http",
        (Some(_), false) => "https",
        (Some(_), true) => "https, client certificates required",
    };
    tracing::info!(addr = %opts.listen, scheme, pipeline = %opts.pipeline, lease_timeout = ?opts.timing.lease_timeout, "coordinator listening");
    let listener = super::tls::Listener::new(listener, opts.tls.clone());

    // The timer: leases expire and shards move even when no heartbeat arrives; shards and lag
    // are read from the sources every refresh interval.
    let refresher = {
        let (core, stop, sources, timing, health) =
            (core.clone(), opts.stop.clone(), opts.sources.clone(), opts.timing, opts.health.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut last_refresh: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if last_refresh.is_none_or(|t| t.elapsed() >= timing.refresh_interval) {
                    last_refresh = Some(Instant::now());
                    refresh(&core, &sources).await;
                    health.set_ready(true);
                }
                core.lock().unwrap_or_else(|e| e.into_inner()).rebalance(Instant::now());
            }
        })
    };
    // The autoscaler; on stop it first stops the workers it started (they drain and leave
    // through this server), then the server stops.
    let http_stop = CancellationToken::new();
    let autoscaler = tokio::spawn(autoscale_loop(core.clone(), opts.autoscale, opts.stop.clone(), http_stop.clone()));
    let served = axum::serve(listener, router.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(http_stop.cancelled_owned())
        .await;
    refresher.abort();
    autoscaler.abort();
    served.map_err(|e| Error::Internal { component: "coordinator".into(), message: e.to_string() })
}

async fn autoscale_loop(
    core: Arc<Mutex<Core>>,
    opts: AutoscaleOptions,
    stop: CancellationToken,
    http_stop: CancellationToken,
) {
    use crate::autoscale::{decide, State, Window};
    // The server stops even if this loop panics.
    let _stop_server = http_stop.drop_guard();
    let start = Instant::now();
    let mut window = Window::default();
    let mut state = State::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_decision: Option<Instant> = None;
    let scaler = opts.scaler;
    tracing::info!(scaler = scaler.name(), policy = ?opts.policy, interval = ?opts.interval, "autoscaler started");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let t = now.duration_since(start).as_secs_f64();
        let (sample, settled, ready, shards) = {
            let c = core.lock().unwrap_or_else(|e| e.into_inner());
            (c.sample(t, now), c.settled(now), c.worker_count(), c.assignable_shards())
        };
        window.push(sample, opts.policy.window);
        if !settled || last_decision.is_some_and(|d| now.duration_since(d) < opts.interval) {
            continue;
        }
        last_decision = Some(now);
        // A scaler call that hangs (an unreachable API server) must not hold up a shutdown.
        let current = tokio::select! {
            _ = stop.cancelled() => break,
            c = scaler.current() => c,
        };
        let current = match current {
            Ok(Some(n)) => n,
            Ok(None) => ready,
            Err(e) => {
                tracing::warn!(scaler = scaler.name(), "cannot read the replica count (no decision this time): {e}");
                metrics::counter!(names::AUTOSCALE_ERRORS_TOTAL).increment(1);
                let mut c = core.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(a) = c.autoscale.as_mut() {
                    a.error = Some(e.to_string());
                }
                continue;
            }
        };
        let inputs = window.inputs(&opts.policy, t, current, ready, shards);
        let (d, next) = decide(&opts.policy, &state, &inputs);
        metrics::gauge!(names::DESIRED_REPLICAS).set(f64::from(d.desired));
        metrics::counter!(names::AUTOSCALE_DECISIONS_TOTAL, "direction" => d.direction()).increment(1);
        if let Some(r) = inputs.per_replica_rate {
            metrics::gauge!(names::AUTOSCALE_PER_REPLICA_RATE).set(r);
        }
        metrics::gauge!(names::AUTOSCALE_INPUT_RATE).set(inputs.input_rate);
        let mut error = None;
        if d.desired != d.current {
            tracing::info!(scaler = scaler.name(), from = d.current, to = d.desired, input_rate = inputs.input_rate, lag_records = inputs.lag_records, per_replica_rate = ?inputs.per_replica_rate, "autoscale: {}", d.reason);
            let scaled = tokio::select! {
                _ = stop.cancelled() => break,
                r = scaler.scale(d.desired) => r,
            };
            match scaled {
                Ok(()) => state = next,
                Err(e) => {
                    tracing::warn!(
                        scaler = scaler.name(),
                        "scaling to {} failed (tried again at the next decision): {e}",
                        d.desired
                    );
                    metrics::counter!(names::AUTOSCALE_ERRORS_TOTAL).increment(1);
                    error = Some(e.to_string());
                    // The state must not believe in a change that did not happen: only the
                    // recommendation history moves on.
                    state.recommendations = next.recommendations;
                    state.idle_since = next.idle_since;
                }
            }
        } else {
            state = next;
            tracing::info!(scaler = scaler.name(), replicas = d.current, "autoscale: {}", d.reason);
        }
        core.lock().unwrap_or_else(|e| e.into_inner()).set_autoscale(AutoscaleStatus {
            scaler: scaler.name().to_string(),
            desired: d.desired,
            current: d.current,
            ready,
            direction: d.direction().to_string(),
            reason: d.reason.clone(),
            input_rate: inputs.input_rate,
            throughput: inputs.throughput,
            per_replica_rate: inputs.per_replica_rate,
            lag_records: inputs.lag_records,
            lag_seconds: inputs.lag_seconds,
            sink_saturated: inputs.sink_saturated,
            decided_at_ms: wall_ms(),
            error,
        });
    }
    scaler.shutdown().await;
}

async fn refresh(core: &Arc<Mutex<Core>>, sources: &[(String, Arc<dyn Source>)]) {
    let mut all = Vec::new();
    let mut ok = true;
    for (id, src) in sources {
        match src.list_shards().await {
            Ok(shards) => all.extend(shards),
            Err(e) => {
                ok = false;
                tracing::warn!(source = %id, "listing the shards failed (kept the last listing): {e}");
            }
        }
    }
    if ok {
        core.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_shards(all.iter().map(|s| (**s).clone()).collect(), Instant::now());
    }
    let mut lag = HashMap::new();
    for (id, src) in sources {
        let shards: Vec<Arc<ShardInfo>> = all.iter().filter(|s| &s.source == id).cloned().collect();
        match src.lag(&shards).await {
            Ok(l) => lag.extend(l.into_iter().map(|(shard, v)| (format!("{id}/{shard}"), v))),
            Err(e) => tracing::debug!(source = %id, "reading the lag failed: {e}"),
        }
    }
    let mut core = core.lock().unwrap_or_else(|e| e.into_inner());
    core.set_lag(lag, Instant::now());
    let _ = core.status("", Instant::now()); // refreshes the lag gauges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::ShardKind;

    fn shard(i: i32) -> ShardInfo {
        ShardInfo {
            source: "orders".into(),
            id: format!("t/{i}"),
            kind: ShardKind::Partition { topic: "t".into(), partition: i },
            epoch: None,
        }
    }

    fn hb(id: &str, applied: u64, held: &[Grant]) -> HeartbeatRequest {
        HeartbeatRequest {
            worker_id: id.into(),
            name: id.into(),
            applied_version: applied,
            held: held.to_vec(),
            ..Default::default()
        }
    }

    const T: Timing = Timing {
        lease_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(2),
        refresh_interval: Duration::from_secs(5),
    };

    #[test]
    fn a_moved_shard_is_granted_only_after_its_owner_drained_it() {
        let t0 = Instant::now();
        let mut c = Core::new(T, t0);
        c.set_shards((0..4).map(shard).collect(), t0);
        let t1 = t0 + Duration::from_secs(11); // past the start-up grace
        let a = c.heartbeat(&hb("a", 0, &[]), t1);
        assert_eq!(a.assignment.len(), 4, "the only worker takes every shard");
        let a = c.heartbeat(&hb("a", a.version, &a.assignment), t1);
        // b joins: two shards must move from a, but a still holds them.
        let b = c.heartbeat(&hb("b", 0, &[]), t1);
        assert!(b.assignment.is_empty(), "nothing is granted before a drained: {b:?}");
        let a2 = c.heartbeat(&hb("a", a.version, &a.assignment), t1);
        assert_eq!((a2.assignment.len(), a2.draining.len()), (2, 2));
        assert!(a2.version > a.version);
        // a applied the new assignment (drained): b gets the two, with newer epochs.
        c.heartbeat(&hb("a", a2.version, &a2.assignment), t1);
        let b = c.heartbeat(&hb("b", 0, &[]), t1);
        assert_eq!(b.assignment.len(), 2);
        let old: HashMap<String, u64> = a.assignment.iter().map(|g| (g.key(), g.epoch)).collect();
        for g in &b.assignment {
            assert!(g.epoch > old[&g.key()], "the new owner's epoch is newer");
        }
    }

    /// Three workers get SIGTERM at once (the process scaler stops several): a's leave frees its
    /// shards while b and c still drain; they must go to d, never to b or c.
    #[test]
    fn shards_freed_by_a_leaver_go_only_to_workers_that_are_not_draining() {
        let t0 = Instant::now();
        let mut c = Core::new(T, t0);
        c.set_shards((0..8).map(shard).collect(), t0);
        let t1 = t0 + Duration::from_secs(11);
        let mut held: HashMap<&str, HeartbeatResponse> = HashMap::new();
        for _ in 0..3 {
            for w in ["a", "b", "c", "d"] {
                let prev = held.get(w).map_or((0, Vec::new()), |r| (r.version, r.assignment.clone()));
                held.insert(w, c.heartbeat(&hb(w, prev.0, &prev.1), t1));
            }
        }
        assert!(held.values().all(|r| r.assignment.len() == 2), "balanced first: {held:?}");
        for w in ["a", "b", "c"] {
            let r = &held[w];
            let req = HeartbeatRequest { leaving: true, ..hb(w, r.version, &r.assignment) };
            c.heartbeat(&req, t1);
        }
        assert!(c.leave("a", t1));
        let d = c.heartbeat(&hb("d", held["d"].version, &held["d"].assignment), t1);
        for w in ["b", "c"] {
            let r = &held[w];
            let again = c.heartbeat(&HeartbeatRequest { leaving: true, ..hb(w, r.version, &r.assignment) }, t1);
            assert!(again.assignment.len() <= 2, "{w} is granted nothing new: {again:?}");
            for g in &again.assignment {
                assert!(r.assignment.iter().any(|h| h.key() == g.key()), "{w} got {g:?} while draining");
            }
        }
        assert_eq!(d.assignment.len(), 4, "d has its own two and a's two: {d:?}");
    }

    #[test]
    fn an_object_rewritten_after_it_finished_is_granted_again_and_one_being_read_waits() {
        let object = |key: &str, etag: &str| ShardInfo {
            source: "lake".into(),
            id: key.into(),
            kind: ShardKind::File { path: format!("s3://b/{key}"), version: Some(etag.into()) },
            epoch: None,
        };
        let t0 = Instant::now();
        let mut c = Core::new(T, t0);
        c.set_shards(vec![object("a", "e1"), object("b", "e1")], t0);
        let t1 = t0 + Duration::from_secs(11);
        let w = c.heartbeat(&hb("w", 0, &[]), t1);
        let w = c.heartbeat(&hb("w", w.version, &w.assignment), t1);
        assert_eq!(w.assignment.len(), 2);
        // a is read to its end and reported; b is still being read.
        let done = HeartbeatRequest { finished: vec!["lake/a".into()], ..hb("w", w.version, &w.assignment) };
        let w = c.heartbeat(&done, t1);
        assert_eq!(w.assignment.iter().map(Grant::key).collect::<Vec<_>>(), ["lake/b"]);
        // Both are rewritten.
        c.set_shards(vec![object("a", "e2"), object("b", "e2")], t1);
        let w = c.heartbeat(&hb("w", w.version, &w.assignment), t1);
        let w = c.heartbeat(&hb("w", w.version, &w.assignment), t1);
        let versions: Vec<(String, ShardKind)> = w.assignment.iter().map(|g| (g.key(), g.shard.kind.clone())).collect();
        assert_eq!(
            versions,
            [("lake/a".into(), object("a", "e2").kind), ("lake/b".into(), object("b", "e1").kind)],
            "a again at e2; b kept at e1 while held"
        );
        // b finishes (its old content): the next listing hands it out again at e2.
        let done = HeartbeatRequest { finished: vec!["lake/b".into()], ..hb("w", w.version, &w.assignment) };
        let w = c.heartbeat(&done, t1);
        c.set_shards(vec![object("a", "e2"), object("b", "e2")], t1);
        let w = c.heartbeat(&hb("w", w.version, &w.assignment), t1);
        let w = c.heartbeat(&hb("w", w.version, &w.assignment), t1);
        assert!(w.assignment.iter().any(|g| g.key() == "lake/b" && g.shard.kind == object("b", "e2").kind), "{w:?}");
        // The same listing again changes nothing for a finished object.
        let done =
            HeartbeatRequest { finished: vec!["lake/a".into(), "lake/b".into()], ..hb("w", w.version, &w.assignment) };
        let w = c.heartbeat(&done, t1);
        c.set_shards(vec![object("a", "e2"), object("b", "e2")], t1);
        let w = c.heartbeat(&hb("w", w.version, &w.assignment), t1);
        assert!(w.assignment.is_empty(), "{w:?}");
    }

    #[test]
    fn partitions_added_to_a_topic_are_granted_at_the_next_listing_and_nothing_else_moves() {
        let t0 = Instant::now();
        let mut c = Core::new(T, t0);
        c.set_shards((0..4).map(shard).collect(), t0);
        let t1 = t0 + Duration::from_secs(11);
        let a = c.heartbeat(&hb("a", 0, &[]), t1);
        let b = c.heartbeat(&hb("b", 0, &[]), t1);
        let a = c.heartbeat(&hb("a", a.version, &a.assignment), t1);
        let a = c.heartbeat(&hb("a", a.version, &a.assignment), t1);
        let b = c.heartbeat(&hb("b", b.version, &b.assignment), t1);
        assert_eq!((a.assignment.len(), b.assignment.len()), (2, 2));
        c.set_shards((0..6).map(shard).collect(), t1);
        let a2 = c.heartbeat(&hb("a", a.version, &a.assignment), t1);
        let b2 = c.heartbeat(&hb("b", b.version, &b.assignment), t1);
        assert_eq!((a2.assignment.len(), b2.assignment.len()), (3, 3), "{a2:?} {b2:?}");
        assert!(a2.draining.is_empty() && b2.draining.is_empty(), "no shard moved");
        for g in a.assignment.iter().chain(&b.assignment) {
            assert!(a2.assignment.contains(g) || b2.assignment.contains(g), "{g:?} kept with its epoch");
        }
    }

    #[test]
    fn a_dead_worker_loses_its_shards_after_the_lease_and_a_restarted_coordinator_adopts() {
        let t0 = Instant::now();
        let mut c = Core::new(T, t0);
        c.set_shards((0..4).map(shard).collect(), t0);
        let t1 = t0 + Duration::from_secs(11);
        let a = c.heartbeat(&hb("a", 0, &[]), t1);
        let a = c.heartbeat(&hb("a", a.version, &a.assignment), t1);
        let b = c.heartbeat(&hb("b", 0, &[]), t1);
        assert!(b.assignment.is_empty());
        // a dies (no more heartbeats); b keeps beating: after the lease, b has everything.
        let mut t = t1;
        let mut got = Vec::new();
        while t < t1 + Duration::from_secs(12) {
            t += Duration::from_secs(2);
            got = c.heartbeat(&hb("b", 0, &[]), t).assignment;
        }
        assert_eq!(got.len(), 4, "b took a's shards after a's lease");
        // The coordinator restarts: b re-registers with what it holds; nothing moves or is
        // granted twice, and epochs are kept.
        let t2 = t + Duration::from_secs(1);
        let mut c2 = Core::new(T, t2);
        c2.set_shards((0..4).map(shard).collect(), t2);
        let again = c2.heartbeat(&hb("b", 0, &got), t2);
        assert_eq!(again.assignment, got, "adopted as held");
        let zombie = c2.heartbeat(&hb("a", 0, &a.assignment), t2);
        assert!(zombie.assignment.is_empty(), "a zombie's older epochs lose: {zombie:?}");
    }

    #[test]
    fn a_restarted_coordinator_puts_shards_back_on_workers_whose_lease_ran_out() {
        // Four workers held 12 shards, 3 each, in an order a fresh deal would not give (shard i
        // on the (3 - i mod 4)th worker); the coordinator was down longer than their leases, so
        // they stopped the shards and register claiming none, with their last assignment.
        let workers = ["a", "b", "c", "d"];
        let owner_before = |i: i32| workers[3 - (i % 4) as usize];
        // Granted by a coordinator whose clock was a minute ahead of this one's.
        let old = wall_ms() + 60_000;
        let t0 = Instant::now();
        let mut c = Core::new(T, t0);
        c.set_shards((0..12).map(shard).collect(), t0);
        let t1 = t0 + Duration::from_secs(1);
        for w in workers {
            let mut last_held: Vec<Grant> =
                (0..12).filter(|&i| owner_before(i) == w).map(|i| Grant { shard: shard(i), epoch: old }).collect();
            if w == "a" {
                // a held shard 0 before d did (an older grant): d's later grant wins.
                last_held.push(Grant { shard: shard(0), epoch: old - 1 });
            }
            let r = c.heartbeat(&HeartbeatRequest { last_held, ..hb(w, 0, &[]) }, t1);
            assert!(r.assignment.is_empty(), "nothing is granted in the first lease: {r:?}");
        }
        for w in workers {
            let r = c.heartbeat(&hb(w, 0, &[]), t0 + Duration::from_secs(6));
            assert!(r.assignment.is_empty(), "nothing is granted in the first lease: {r:?}");
        }
        // Past the first lease, the first heartbeats get the shards back where they were.
        let t2 = t0 + Duration::from_secs(11);
        let mut owner_after = BTreeMap::new();
        for w in workers {
            for g in c.heartbeat(&hb(w, 0, &[]), t2).assignment {
                assert!(g.epoch > old, "granted at an epoch above the old grants': {g:?}");
                owner_after.insert(g.shard.id.clone(), w);
            }
        }
        let expected: BTreeMap<String, &str> = (0..12).map(|i| (shard(i).id, owner_before(i))).collect();
        assert_eq!(owner_after, expected, "every shard back on the worker that held it");
        assert!(c.hints.is_empty(), "hints are used once: {:?}", c.hints);
    }
}
