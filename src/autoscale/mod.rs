//! Lag-based autoscaling of the workers: the policy ([`policy::decide`], a pure function), the
//! window that averages what the coordinator measures into its inputs, the scalers that apply
//! a decision (`kube`, `process`, `none`), and a deterministic simulator ([`sim`]) that replays
//! load traces through the policy and through KEDA's formula under the HPA.

pub mod policy;
pub mod scaler;
pub mod sim;

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use policy::{decide, Decision, Inputs, Policy, State};

/// Sinks count as saturated when the workers' sinks were blocked on their destinations this
/// share of the time, on average.
pub const SINK_SATURATED: f64 = 0.9;

/// One measurement, taken every refresh by the coordinator (every second by the simulator).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds on a monotonic clock.
    pub at: f64,
    /// Records per second arriving, all shards.
    pub input_rate: f64,
    /// Records per second processed, all workers.
    pub throughput: f64,
    /// Records per second one replica can process, from the workers' rates and busy shares.
    pub per_replica_rate: Option<f64>,
    pub lag_records: f64,
    pub lag_seconds: f64,
    /// Per shard key: (input records per second, lag in records).
    pub shards: BTreeMap<String, (f64, f64)>,
    pub sink_saturated: bool,
}

/// The samples of the last `window` seconds, averaged into the policy's [`Inputs`].
#[derive(Debug, Clone, Default)]
pub struct Window {
    samples: VecDeque<Sample>,
    last_rate: Option<f64>,
}

impl Window {
    /// Adds a sample and forgets those more than `keep` seconds older than it, so the window
    /// stays bounded while nobody reads its inputs (the coordinator not settled, the scaler
    /// failing to read the replica count: one sample a second, each with every shard, kept).
    pub fn push(&mut self, s: Sample, keep: f64) {
        if s.per_replica_rate.is_some() {
            self.last_rate = s.per_replica_rate;
        }
        while self.samples.front().is_some_and(|old| s.at - old.at > keep) {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The means over the last `policy.window` seconds (the rate per replica keeps its last
    /// measured value when no worker measured one in the window).
    pub fn inputs(&mut self, p: &Policy, now: f64, current_replicas: u32, ready_replicas: u32, shards: u32) -> Inputs {
        while self.samples.front().is_some_and(|s| now - s.at > p.window) {
            self.samples.pop_front();
        }
        let n = self.samples.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Sample) -> f64| self.samples.iter().map(f).sum::<f64>() / n;
        let rates: Vec<f64> = self.samples.iter().filter_map(|s| s.per_replica_rate).collect();
        let per_replica_rate =
            if rates.is_empty() { self.last_rate } else { Some(rates.iter().sum::<f64>() / rates.len() as f64) };
        let mut per_shard: BTreeMap<&str, (f64, f64, f64)> = BTreeMap::new();
        for s in &self.samples {
            for (k, (rate, lag)) in &s.shards {
                let e = per_shard.entry(k.as_str()).or_default();
                e.0 += rate;
                e.1 += lag;
                e.2 += 1.0;
            }
        }
        let shard_rates = per_shard.values().map(|(r, _, c)| r / c).collect();
        let saturated = self.samples.iter().filter(|s| s.sink_saturated).count() as f64;
        Inputs {
            now,
            input_rate: mean(&|s| s.input_rate),
            throughput: mean(&|s| s.throughput),
            per_replica_rate,
            lag_records: mean(&|s| s.lag_records),
            lag_seconds: mean(&|s| s.lag_seconds),
            shard_rates,
            sink_saturated: !self.samples.is_empty() && saturated * 2.0 >= n,
            current_replicas,
            ready_replicas,
            shards,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_nobody_reads_keeps_only_its_last_seconds() {
        let policy = Policy::default();
        let mut w = Window::default();
        for i in 0..10_000u32 {
            let shards = (0..50).map(|p| (format!("orders/{p}"), (f64::from(i), 0.0))).collect();
            w.push(Sample { at: f64::from(i), input_rate: f64::from(i), shards, ..Sample::default() }, policy.window);
        }
        // One sample a second over the window, its ends included.
        assert_eq!(w.samples.len(), policy.window as usize + 1, "window of {}s", policy.window);
        let inputs = w.inputs(&policy, 9_999.0, 1, 1, 50);
        let expected = (9_999.0 + (9_999.0 - policy.window)) / 2.0;
        assert!((inputs.input_rate - expected).abs() < 1e-9, "{} vs {expected}", inputs.input_rate);
    }
}
