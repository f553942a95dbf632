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
    /// source → shard id → epoch (nested, so a check looks up by `&str` without allocating).
    epochs: HashMap<String, HashMap<String, u64>>,
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
        let mut nested: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for ((source, shard), epoch) in epochs {
            nested.entry(source).or_default().insert(shard, epoch);
        }
        let mut st = self.state.write().unwrap_or_else(|e| e.into_inner());
        st.valid_until = Some(until);
        st.epochs = nested;
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

    /// The epoch at which the worker holds `source/shard`; `read_at`, the epoch of the grant the
    /// data was read under, must be that one when given.
    fn check(&self, source: &str, shard: &str, read_at: Option<u64>) -> Result<u64, String> {
        let st = self.state.read().unwrap_or_else(|e| e.into_inner());
        if st.valid_until.is_none_or(|u| Instant::now() >= u) {
            return Err(format!(
                "this worker's lease with the coordinator has expired; shard {source}/{shard} may belong to another worker now"
            ));
        }
        let held = st.epochs.get(source).and_then(|s| s.get(shard)).copied().ok_or_else(|| {
            format!("shard {source}/{shard} is no longer assigned to this worker (the coordinator moved it)")
        })?;
        match read_at {
            Some(read) if read != held => Err(format!(
                "shard {source}/{shard} was read under the grant of epoch {read}, and this worker holds it at epoch {held} now \
                 (it was granted again after the lease ran out); the new grant reads it again from the committed position"
            )),
            _ => Ok(held),
        }
    }
}

/// `Ok(None)` outside worker mode; `Ok(Some(epoch))` while this worker may commit `shard` (at the
/// epoch of the grant it was read under, [`ShardInfo::epoch`], when that is set); `Err(why)` when
/// it is fenced.
pub fn check(shard: &ShardInfo) -> Result<Option<u64>, String> {
    check_id(&shard.source, &shard.id, shard.epoch)
}

/// [`check`] by (source, shard id, epoch of the grant the data was read under).
pub fn check_id(source: &str, shard: &str, read_at: Option<u64>) -> Result<Option<u64>, String> {
    match get() {
        None => Ok(None),
        Some(f) => {
            let r = f.check(source, shard, read_at).map(Some);
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
        assert!(f.check("s", "t/0", None).is_err(), "no lease yet");
        let epochs = HashMap::from([(("s".to_string(), "t/0".to_string()), 7)]);
        f.update(Instant::now() + Duration::from_secs(60), epochs);
        assert_eq!(f.check("s", "t/0", None), Ok(7));
        let e = f.check("s", "t/1", None).unwrap_err();
        assert!(e.contains("no longer assigned"), "{e}");
        f.update(Instant::now() - Duration::from_millis(1), HashMap::from([(("s".into(), "t/0".into()), 7)]));
        let e = f.check("s", "t/0", None).unwrap_err();
        assert!(e.contains("lease"), "{e}");
        assert!(!f.lease_valid());
    }

    #[test]
    fn data_read_under_an_earlier_grant_is_refused_after_the_shard_is_granted_again() {
        let f = Fence::default();
        let held = |epoch| HashMap::from([(("s".to_string(), "t/0".to_string()), epoch)]);
        f.update(Instant::now() + Duration::from_secs(60), held(7));
        assert_eq!(f.check("s", "t/0", Some(7)), Ok(7), "read under the grant it is held at");
        assert_eq!(f.check("s", "t/0", None), Ok(7), "no grant recorded: any epoch the shard is held at");
        // The lease ran out, another worker held the shard at 8, and it came back at 9.
        f.update(Instant::now() + Duration::from_secs(60), held(9));
        let e = f.check("s", "t/0", Some(7)).unwrap_err();
        assert!(e.contains("epoch 7") && e.contains("epoch 9"), "{e}");
        assert_eq!(f.check("s", "t/0", Some(9)), Ok(9), "the new generation's data still commits");
    }
}
