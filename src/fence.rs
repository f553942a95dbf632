//! Fencing in worker mode: a worker may commit positions of a shard, or make sink writes for it
//! visible, only while its lease with the coordinator is live and the coordinator still grants it
//! that shard at the epoch it holds.
//!
//! The coordinator expires a worker `lease_timeout` after the last heartbeat it *received*; the
//! worker counts its lease from the moment it *sent* that heartbeat, less a margin, so its lease
//! always ends first. A worker that was paused (SIGSTOP, a long GC-like stall, a network
//! partition) finds its lease over when it resumes and refuses its own late writes; the heartbeat
//! that renews it also brings the new assignment, which drops the shards that moved, in one step.
//!
//! `sluice run` installs no fence: every check passes. Sinks with a transactional store add a
//! check the store enforces (the PostgreSQL sink's epoch column in `sluice_offsets`).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use crate::batch::ShardInfo;

/// The worker's lease and the epoch of every shard it may still commit.
#[derive(Debug, Default)]
pub struct Fence {
    state: RwLock<State>,
}

#[derive(Debug, Default)]
struct State {
    valid_until: Option<Instant>,
    /// (source, shard id) → epoch.
    epochs: HashMap<(String, String), u64>,
}

static FENCE: OnceLock<Arc<Fence>> = OnceLock::new();

/// Installs the process's fence (worker mode); returns it. Idempotent.
pub fn install() -> Arc<Fence> {
    FENCE.get_or_init(Arc::default).clone()
}

fn get() -> Option<&'static Arc<Fence>> {
    FENCE.get()
}

impl Fence {
    /// Renews the lease until `until` and replaces the shards that may commit, in one step.
    pub fn update(&self, until: Instant, epochs: HashMap<(String, String), u64>) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.valid_until = Some(until);
        st.epochs = epochs;
    }

    /// Ends the lease now (the worker left, or gave up on the coordinator).
    pub fn revoke_all(&self) {
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.valid_until = None;
        st.epochs.clear();
    }

    /// Whether the lease is live.
    pub fn lease_valid(&self) -> bool {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        st.valid_until.is_some_and(|u| Instant::now() < u)
    }

    fn check(&self, source: &str, shard: &str) -> Result<u64, String> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        if st.valid_until.is_none_or(|u| Instant::now() >= u) {
            return Err(format!(
                "this worker's lease with the coordinator has expired; shard {source}/{shard} may belong to another worker now"
            ));
        }
        st.epochs.get(&(source.to_string(), shard.to_string())).copied().ok_or_else(|| {
            format!("shard {source}/{shard} is no longer assigned to this worker (the coordinator moved it)")
        })
    }
}

/// `Ok(None)` outside worker mode; `Ok(Some(epoch))` while this worker may commit `shard`;
/// `Err(why)` when it is fenced.
pub fn check(shard: &ShardInfo) -> Result<Option<u64>, String> {
    check_id(&shard.source, &shard.id)
}

/// [`check`] by (source, shard id).
pub fn check_id(source: &str, shard: &str) -> Result<Option<u64>, String> {
    match get() {
        None => Ok(None),
        Some(f) => {
            let r = f.check(source, shard).map(Some);
            if r.is_err() {
                metrics::counter!(crate::observe::names::FENCED_TOTAL, "component" => source.to_string()).increment(1);
            }
            r
        }
    }
}

/// Whether fencing is on (worker mode).
pub fn active() -> bool {
    get().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fence_refuses_after_its_lease_and_for_shards_it_lost() {
        let f = Fence::default();
        assert!(f.check("s", "t/0").is_err(), "no lease yet");
        let epochs = HashMap::from([(("s".to_string(), "t/0".to_string()), 7)]);
        f.update(Instant::now() + Duration::from_secs(60), epochs);
        assert_eq!(f.check("s", "t/0"), Ok(7));
        let e = f.check("s", "t/1").unwrap_err();
        assert!(e.contains("no longer assigned"), "{e}");
        f.update(Instant::now() - Duration::from_millis(1), HashMap::from([(("s".into(), "t/0".into()), 7)]));
        let e = f.check("s", "t/0").unwrap_err();
        assert!(e.contains("lease"), "{e}");
        assert!(!f.lease_valid());
    }
}
