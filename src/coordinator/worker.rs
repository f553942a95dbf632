//! `sluice worker`: registers with the coordinator, heartbeats, and runs the pipeline over the
//! shards it is granted.
//!
//! The worker runs the pipeline in *generations*: one run over one assignment. When the
//! assignment changes, the running generation stops reading, flushes its sinks and commits (the
//! graceful stop of `sluice run`), and the next generation starts with the new shards. Only then
//! does the worker report the new assignment as applied, which is what lets the coordinator grant
//! the shards it gave up to their new owners.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::{Grant, HeartbeatRequest, HeartbeatResponse, ShardReport};
use crate::batch::ShardInfo;
use crate::config::LoadedPipeline;
use crate::fence::Fence;
use crate::observe::{names, Health};
use crate::runtime::{RunOptions, ShardRegistry};
use crate::{Error, Result};

/// Options of [`run`].
pub struct WorkerOptions {
    pub client: Client,
    /// The worker's name (the pod name); its id adds a random suffix.
    pub name: String,
    pub health: Health,
    /// Fired by SIGTERM: drain, commit, leave, return.
    pub stop: CancellationToken,
    /// CPUs the worker may use (default: what the process sees).
    pub cpus: Option<f64>,
}

/// What the heartbeat reports, updated by the generation loop.
#[derive(Default)]
struct Report {
    applied_version: u64,
    held: Vec<Grant>,
    /// The last assignment applied, kept when its shards stop because the lease ran out.
    last_held: Vec<Grant>,
    finished: Vec<String>,
    registry: Option<ShardRegistry>,
    last: HashMap<String, (Option<u64>, Instant)>,
    /// CPU seconds, sink busy microseconds and when, at the last heartbeat.
    last_busy: Option<(f64, u64, Instant)>,
    /// CPUs the worker may use.
    cpus: f64,
    /// SIGTERM came: draining to leave.
    leaving: bool,
}

/// The CPUs this process sees (cgroup CPU limits included).
fn visible_cpus() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

impl Report {
    /// `lease_valid`: a worker whose lease ran out claims nothing (after a coordinator restart a
    /// zombie must not re-register the shards another worker holds now).
    fn request(&mut self, worker_id: &str, name: &str, lease_valid: bool) -> HeartbeatRequest {
        let now = Instant::now();
        let mut shards = Vec::new();
        let mut rate = 0.0;
        if let Some(reg) = &self.registry {
            let progress = reg.lock().map(|r| r.clone()).unwrap_or_default();
            // Only the shards of this generation stay (a worker is granted S3 objects for as
            // long as it lives: keeping every key it ever held grew with them).
            let mut last = HashMap::with_capacity(progress.len());
            for p in progress {
                let key = super::shard_key(p.shard());
                let committed = p.committed();
                let r = match self.last.get(&key) {
                    Some((Some(prev), at)) => {
                        let dt = now.duration_since(*at).as_secs_f64().max(1e-3);
                        committed.map_or(0.0, |c| c.saturating_sub(*prev) as f64 / dt)
                    }
                    _ => 0.0,
                };
                rate += r;
                last.insert(key.clone(), (committed, now));
                shards.push(ShardReport { key, committed, rate: r });
            }
            self.last = last;
        }
        let (cpu, sink) = (crate::observe::process_cpu_seconds(), crate::observe::sink_busy_micros());
        let (cpu_busy, sink_busy) = match self.last_busy.replace((cpu, sink, now)) {
            Some((c0, s0, at)) => {
                let wall = now.duration_since(at).as_secs_f64().max(1e-3);
                (((cpu - c0) / wall / self.cpus).clamp(0.0, 1.0), ((sink - s0) as f64 / 1e6 / wall).clamp(0.0, 1.0))
            }
            None => (0.0, 0.0),
        };
        HeartbeatRequest {
            load: super::Load::new(rate, cpu_busy, sink_busy),
            worker_id: worker_id.to_string(),
            name: name.to_string(),
            applied_version: self.applied_version,
            held: if lease_valid { self.held.clone() } else { Vec::new() },
            last_held: if lease_valid { Vec::new() } else { self.last_held.clone() },
            finished: self.finished.clone(),
            shards,
            rate,
            leaving: self.leaving,
        }
    }
}

/// The shards of an assignment by source, each carrying the epoch of its grant: the fence refuses
/// what a generation read once the worker holds the shard at another epoch.
fn shards_by_source(assignment: &[Grant]) -> HashMap<String, Vec<Arc<ShardInfo>>> {
    let mut by_source: HashMap<String, Vec<Arc<ShardInfo>>> = HashMap::new();
    for g in assignment {
        let shard = ShardInfo { epoch: Some(g.epoch), ..g.shard.clone() };
        by_source.entry(g.shard.source.clone()).or_default().push(Arc::new(shard));
    }
    by_source
}

fn grant_set(g: &[Grant]) -> HashSet<(String, u64)> {
    g.iter().map(|g| (g.key(), g.epoch)).collect()
}

/// Runs the worker until `opts.stop` fires.
///
/// # Errors
/// A pipeline that does not build (a configuration error); runtime failures of a generation are
/// logged and the generation is started again.
pub async fn run(loaded: LoadedPipeline, opts: WorkerOptions) -> Result<()> {
    let suffix: u32 = rand::random();
    let worker_id = format!("{}-{suffix:08x}", opts.name);
    let fence = crate::fence::install();
    // Checked once before anything is asked of the coordinator.
    drop(crate::runtime::build(&loaded).await?);
    tracing::info!(worker = %worker_id, coordinator = %opts.client.base(), "worker starting");

    let cpus = opts.cpus.filter(|c| *c > 0.0).unwrap_or_else(visible_cpus);
    let report = Arc::new(Mutex::new(Report { cpus, ..Report::default() }));
    let (latest_tx, mut latest) = watch::channel::<Option<HeartbeatResponse>>(None);
    let lease_lost = Arc::new(Notify::new());
    let beat_now = Arc::new(Notify::new());
    let beats_stop = CancellationToken::new();
    let beats = tokio::spawn(heartbeats(
        opts.client.clone(),
        worker_id.clone(),
        opts.name.clone(),
        report.clone(),
        fence.clone(),
        latest_tx,
        lease_lost.clone(),
        beat_now.clone(),
        beats_stop.clone(),
    ));

    let mut failures = 0u32;
    let result: Result<()> = loop {
        // Wait for an assignment.
        let current = loop {
            if let Some(a) = latest.borrow_and_update().clone() {
                break Some(a);
            }
            tokio::select! {
                _ = opts.stop.cancelled() => break None,
                r = latest.changed() => if r.is_err() { break None },
            }
        };
        let Some(current) = current else { break Ok(()) };
        if !fence.lease_valid() {
            // Lost while the last generation ran: wait until a heartbeat renews it (the answer
            // may be the same as before, so the watch alone would not tell).
            tokio::select! {
                _ = opts.stop.cancelled() => break Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            }
        }
        {
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            r.applied_version = current.version;
            r.held = current.assignment.clone();
            // Not emptied by a restarted coordinator's first answer (it grants nothing at first):
            // if it dies too, the next one still learns where the shards were.
            if !current.assignment.is_empty() {
                r.last_held = current.assignment.clone();
            }
        }
        beat_now.notify_one();
        if current.assignment.is_empty() {
            opts.health.set_ready(true);
            tokio::select! {
                _ = opts.stop.cancelled() => break Ok(()),
                _ = latest.changed() => continue,
            }
        }
        let assigned = shards_by_source(&current.assignment);
        let pipeline = match crate::runtime::build(&loaded).await {
            Ok(p) => p,
            Err(e) => break Err(e.into()),
        };
        let registry: ShardRegistry = Arc::default();
        report.lock().unwrap_or_else(|e| e.into_inner()).registry = Some(registry.clone());
        let gen_stop = CancellationToken::new();
        metrics::counter!(names::WORKER_GENERATIONS_TOTAL).increment(1);
        metrics::gauge!(names::WORKER_SHARDS).set(current.assignment.len() as f64);
        tracing::info!(worker = %worker_id, shards = current.assignment.len(), version = current.version, "running the assigned shards");
        let mut run = tokio::spawn(pipeline.run(RunOptions {
            stop: gen_stop.clone(),
            progress: false,
            health: opts.health.clone(),
            bounded: false,
            assigned: Some(assigned),
            shard_registry: Some(registry),
        }));
        let running = grant_set(&current.assignment);
        let mut stopping = false;
        let mut leaving = false;
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = opts.stop.cancelled(), if !leaving => {
                    tracing::info!(worker = %worker_id, "stopping: draining the shards before leaving");
                    leaving = true;
                    gen_stop.cancel();
                    report.lock().unwrap_or_else(|e| e.into_inner()).leaving = true;
                    beat_now.notify_one();
                }
                c = latest.changed(), if !stopping => {
                    if c.is_err() { gen_stop.cancel(); stopping = true; continue; }
                    let next = latest.borrow().clone();
                    if let Some(next) = next {
                        if grant_set(&next.assignment) != running {
                            tracing::info!(worker = %worker_id, "assignment changed: draining, then starting over");
                            stopping = true;
                            gen_stop.cancel();
                        } else {
                            report.lock().unwrap_or_else(|e| e.into_inner()).applied_version = next.version;
                        }
                    }
                }
                _ = lease_lost.notified() => {
                    tracing::warn!(worker = %worker_id, "lease lost: stopping the shards (commits are refused until the coordinator answers again)");
                    stopping = true;
                    gen_stop.cancel();
                }
            }
        };
        // Every shard was read to its end: reported until the coordinator drops them.
        let done = matches!(&outcome, Ok(Ok(summary)) if !summary.stopped && !stopping && !leaving);
        {
            let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
            r.held.clear();
            r.registry = None;
            if done {
                r.finished = current.assignment.iter().map(Grant::key).collect();
            }
        }
        beat_now.notify_one();
        match outcome {
            Ok(Ok(_)) => failures = 0,
            Ok(Err(e)) => {
                failures += 1;
                let wait = Duration::from_millis(500 * u64::from(failures.min(10)));
                tracing::error!(worker = %worker_id, "the shards' run failed (starting again in {wait:?}): {e}");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = opts.stop.cancelled() => leaving = true,
                }
            }
            Err(e) => break Err(Error::Internal { component: "worker".into(), message: e.to_string() }),
        }
        if leaving || opts.stop.is_cancelled() {
            break Ok(());
        }
        // A finished generation waits for the next assignment change.
        if done {
            tokio::select! {
                _ = opts.stop.cancelled() => break Ok(()),
                _ = latest.changed() => {}
            }
        }
    };
    beats_stop.cancel();
    let _ = beats.await;
    fence.revoke_all();
    opts.health.set_ready(false);
    match opts.client.leave(&worker_id).await {
        Ok(()) => tracing::info!(worker = %worker_id, "left the coordinator"),
        Err(e) => {
            tracing::warn!(worker = %worker_id, "could not tell the coordinator that it leaves (its lease will expire): {e}")
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn heartbeats(
    client: Client,
    worker_id: String,
    name: String,
    report: Arc<Mutex<Report>>,
    fence: Arc<Fence>,
    latest: watch::Sender<Option<HeartbeatResponse>>,
    lease_lost: Arc<Notify>,
    beat_now: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut interval = Duration::from_secs(2);
    let mut lease = Duration::from_secs(10);
    let mut had_lease = false;
    let mut last_ok = Instant::now();
    loop {
        let req = report.lock().unwrap_or_else(|e| e.into_inner()).request(&worker_id, &name, fence.lease_valid());
        let sent = Instant::now();
        match client.heartbeat(&req).await {
            Ok(resp) => {
                interval = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
                lease = Duration::from_millis(resp.lease_timeout_ms.max(100));
                // The lease counts from the send, less a margin for the writes a check lets
                // through: it ends before the coordinator's, which counts from the receipt.
                let margin = (lease / 5).max(interval / 2).min(lease / 2);
                let mut epochs = HashMap::new();
                for g in resp.assignment.iter().chain(&resp.draining) {
                    epochs.insert((g.shard.source.clone(), g.shard.id.clone()), g.epoch);
                }
                fence.update(sent + lease - margin, epochs);
                // Finished shards are reported until the coordinator has dropped them.
                {
                    let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                    let granted: HashSet<String> =
                        resp.assignment.iter().chain(&resp.draining).map(Grant::key).collect();
                    r.finished.retain(|k| granted.contains(k));
                }
                had_lease = true;
                last_ok = Instant::now();
                metrics::gauge!(names::WORKER_LEASE_VALID).set(1.0);
                latest.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&resp);
                    *cur = Some(resp);
                    changed
                });
            }
            Err(e) => {
                tracing::warn!(worker = %worker_id, "heartbeat failed: {e}");
                if had_lease && !fence.lease_valid() {
                    metrics::gauge!(names::WORKER_LEASE_VALID).set(0.0);
                    lease_lost.notify_waiters();
                    had_lease = false;
                }
                if last_ok.elapsed() > lease * 3 {
                    tracing::warn!(worker = %worker_id, "no answer from the coordinator for {:?}", last_ok.elapsed());
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            _ = beat_now.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::ShardKind;

    #[test]
    fn the_heartbeat_remembers_only_the_shards_of_the_running_generation() {
        let progress = |id: &str| {
            let shard =
                Arc::new(ShardInfo { source: "objects".into(), id: id.into(), kind: ShardKind::Sequence, epoch: None });
            crate::batch::ShardProgress::new(
                shard,
                Arc::new(crate::batch::RecordingCommitter::default()),
                Arc::new(std::sync::atomic::AtomicBool::new(false)),
            )
        };
        let mut report = Report { cpus: 1.0, ..Report::default() };
        for generation in 0..100 {
            let registry: ShardRegistry =
                Arc::new(Mutex::new(vec![progress(&format!("a-{generation}")), progress("kept")]));
            report.registry = Some(registry);
            let request = report.request("w-1", "w", true);
            assert_eq!(request.shards.len(), 2);
        }
        let mut keys: Vec<_> = report.last.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.iter().any(|k| k.ends_with("a-99")) && keys.iter().any(|k| k.ends_with("kept")), "{keys:?}");
        // Between generations (no registry) the last positions are kept for the next one's rates.
        report.registry = None;
        report.request("w-1", "w", true);
        assert_eq!(report.last.len(), 2);
    }

    #[test]
    fn each_assigned_shard_carries_the_epoch_of_its_grant() {
        let grant = |source: &str, id: &str, epoch| Grant {
            shard: ShardInfo { source: source.into(), id: id.into(), kind: ShardKind::Sequence, epoch: None },
            epoch,
        };
        let by_source = shards_by_source(&[grant("a", "gen-0", 3), grant("a", "gen-1", 5), grant("b", "t/0", 8)]);
        let epochs = |source: &str| -> Vec<(String, Option<u64>)> {
            by_source[source].iter().map(|s| (s.id.clone(), s.epoch)).collect()
        };
        assert_eq!(epochs("a"), [("gen-0".to_string(), Some(3)), ("gen-1".to_string(), Some(5))]);
        assert_eq!(epochs("b"), [("t/0".to_string(), Some(8))]);
        // On the wire a shard has no epoch of its own: the grant carries it.
        let wire = serde_json::to_value(grant("a", "gen-0", 3)).unwrap();
        assert_eq!(wire["shard"].get("epoch"), None, "{wire}");
        assert_eq!(wire["epoch"], 3);
    }
}
