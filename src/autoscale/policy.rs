//! The scaling policy: a pure function from plain data (the policy's settings, what it decided
//! before, the inputs averaged over a window) to a decision with its reason.
//!
//! ```text
//! demand  = input_rate + lag_records / catch_up_window              (records/s)
//! desired = ceil(demand / (per_replica_rate × target_utilization))
//! ```
//! then raised until the worker holding the hottest shard fits (shards are spread by count, so a
//! hot partition or a shard count that does not divide evenly overloads one worker first),
//! clamped to `[min_replicas, max_replicas]` and to the shard count. Scale-ups are limited to
//! `max(max_step_up, 2 × current)` replicas at a time, need two decisions in a row, go one replica
//! at a time while the sinks are saturated and stop when the last one did not raise the
//! throughput (more workers would only queue on the sink). Scale-downs wait until the last change is
//! `scale_down_stabilization` old and then go to the highest recommendation of that period, in
//! one step. With `scale_to_zero`, no input and no lag for `idle_period` scales to zero.

use serde::{Deserialize, Serialize};

/// Scale-downs plan for this much less utilization than scale-ups.
pub const SCALE_DOWN_HYSTERESIS: f64 = 0.05;

/// Settings of the policy (the coordinator's `--min-replicas` … flags; seconds as `f64`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Seconds in which a backlog should be worked off (the lag term of the demand).
    pub catch_up_window: f64,
    /// Share of a replica's measured rate the policy plans to use, in (0, 1].
    pub target_utilization: f64,
    /// Seconds: no scale-down until the last change is this old, and then not below any
    /// recommendation made in this period.
    pub scale_down_stabilization: f64,
    /// At most `max(max_step_up, 2 × current)` replicas are added by one decision.
    pub max_step_up: u32,
    pub scale_to_zero: bool,
    /// Seconds without input and lag after which `scale_to_zero` applies.
    pub idle_period: f64,
    /// Seconds over which the inputs are averaged.
    pub window: f64,
    /// A scale-up counts as ineffective when the throughput grew by less than this share of what
    /// the added replicas should have brought.
    pub min_scale_up_gain: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_replicas: 1,
            max_replicas: 10,
            catch_up_window: 60.0,
            target_utilization: 0.9,
            scale_down_stabilization: 120.0,
            max_step_up: 4,
            scale_to_zero: false,
            idle_period: 300.0,
            window: 15.0,
            min_scale_up_gain: 0.2,
        }
    }
}

impl Policy {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the setting that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_replicas == 0 {
            return Err("max replicas must be at least 1".into());
        }
        if self.min_replicas > self.max_replicas {
            return Err(format!("min replicas ({}) is above max replicas ({})", self.min_replicas, self.max_replicas));
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            return Err(format!("target utilization must be in (0, 1], not {}", self.target_utilization));
        }
        for (name, v) in [
            ("catch-up window", self.catch_up_window),
            ("window", self.window),
            ("scale-down stabilization", self.scale_down_stabilization),
            ("idle period", self.idle_period),
        ] {
            if !v.is_finite() || v < 0.0 || (name == "catch-up window" && v == 0.0) {
                return Err(format!("{name} must be a positive duration, not {v} s"));
            }
        }
        Ok(())
    }
}

/// What the policy sees, averaged over its window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// Seconds on a monotonic clock.
    pub now: f64,
    /// Records per second arriving at the sources, all shards.
    pub input_rate: f64,
    /// Records per second the workers processed, all together.
    pub throughput: f64,
    /// Records per second one replica can process (measured: rate over busy share), if known.
    pub per_replica_rate: Option<f64>,
    pub lag_records: f64,
    /// The oldest unprocessed record's age, or lag over rate.
    pub lag_seconds: f64,
    /// Per shard: records per second arriving; empty when unknown.
    pub shard_rates: Vec<f64>,
    /// Whether the sinks were busy nearly all the time (see the coordinator's docs).
    pub sink_saturated: bool,
    /// Replicas asked for (the Deployment's `spec.replicas`).
    pub current_replicas: u32,
    /// Replicas registered with the coordinator and running.
    pub ready_replicas: u32,
    pub shards: u32,
}

/// A scale-up the policy made, kept to judge whether it helped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleUp {
    pub at: f64,
    pub from: u32,
    pub to: u32,
    pub throughput_before: f64,
    /// When the added replicas were all running.
    pub ready_at: Option<f64>,
    /// The share of the expected throughput gain it brought, once judged.
    pub gain: Option<f64>,
}

/// What the policy carries from one decision to the next.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Recommendations (time, replicas) of the last stabilization period.
    pub recommendations: Vec<(f64, u32)>,
    /// When the replica count last changed (or the first decision was made).
    pub last_change: Option<f64>,
    pub last_scale_up: Option<ScaleUp>,
    /// Since when there has been no input and no lag.
    pub idle_since: Option<f64>,
}

/// One decision: the replica count to run and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub desired: u32,
    pub current: u32,
    /// The recommendation before stabilization, step limits and the saturation hold.
    pub recommended: u32,
    pub reason: String,
    pub inputs: Inputs,
}

impl Decision {
    /// `up`, `down` or `hold`.
    pub fn direction(&self) -> &'static str {
        match self.desired.cmp(&self.current) {
            std::cmp::Ordering::Greater => "up",
            std::cmp::Ordering::Less => "down",
            std::cmp::Ordering::Equal => "hold",
        }
    }
}

/// What the hottest shard needs, when shards are spread by count: the worker holding it holds
/// `ceil(shards / n)` shards, the hottest and average ones for the rest.
enum HotShard {
    /// This many replicas let that worker keep up.
    Fits(u32),
    /// The hottest shard alone is more than one replica can do.
    TooHot,
    /// Even `upper` replicas leave that worker behind.
    AboveCap,
}

fn replicas_for_hot_shard(rates: &[f64], capacity: f64, upper: u32) -> HotShard {
    let s = rates.len();
    let hottest = rates.iter().copied().fold(0.0, f64::max);
    if s == 0 || hottest <= 0.0 {
        return HotShard::Fits(0);
    }
    if hottest > capacity {
        return HotShard::TooHot;
    }
    let rest = if s > 1 { (rates.iter().sum::<f64>() - hottest) / (s - 1) as f64 } else { 0.0 };
    (1..=upper.max(1))
        .find(|&n| hottest + (s.div_ceil(n as usize).saturating_sub(1)) as f64 * rest <= capacity)
        .map_or(HotShard::AboveCap, HotShard::Fits)
}

/// A scale-up not judged within this long (its replicas never all came up, say) is forgotten.
fn pending_timeout(p: &Policy) -> f64 {
    (4.0 * p.window).max(120.0)
}

/// The decision for `inputs`, and the state to pass to the next one.
pub fn decide(p: &Policy, state: &State, i: &Inputs) -> (Decision, State) {
    let mut s = state.clone();
    let now = i.now;
    let current = i.current_replicas;
    let upper = p.max_replicas.min(i.shards.max(1));
    // Zero only by scale-to-zero after the idle period, whatever --min-replicas says.
    let floor = p.min_replicas.max(1).min(upper);
    let idle = i.input_rate <= 1e-9 && i.lag_records <= 0.0;
    s.idle_since = if idle { Some(state.idle_since.unwrap_or(now)) } else { None };
    let last_change = *s.last_change.get_or_insert(now);

    let demand = i.input_rate + i.lag_records / p.catch_up_window;
    let idle_long = p.scale_to_zero && idle && s.idle_since.is_some_and(|t| now - t >= p.idle_period);
    // The recommendation, with why.
    let (mut recommended, mut why) = if idle_long {
        (0, format!("no input and no lag for {:.0} s: scale to zero", p.idle_period))
    } else {
        match i.per_replica_rate.filter(|r| *r > 0.0) {
            Some(rate) => {
                let capacity = rate * p.target_utilization;
                let mut by_total = (demand / capacity).ceil() as u32;
                // Hysteresis: fewer replicas only when they would run at most
                // `target_utilization - 0.05`, so that noise around a boundary does not flap.
                let down = rate * (p.target_utilization - SCALE_DOWN_HYSTERESIS).max(0.05);
                if by_total < current {
                    by_total = by_total.max(((demand / down).ceil() as u32).min(current));
                }
                let mut why = format!(
                    "demand {demand:.0} rec/s (input {:.0} + lag {:.0} / {:.0} s) over {capacity:.0} rec/s per replica ({rate:.0} × {:.2})",
                    i.input_rate, i.lag_records, p.catch_up_window, p.target_utilization
                );
                // The worker with the hottest shard needs only keep up: its headroom is the
                // other workers'.
                let n = match replicas_for_hot_shard(&i.shard_rates, rate, upper) {
                    HotShard::Fits(hot) if hot > by_total => {
                        why.push_str(&format!("; {hot} so that the worker with the hottest shard keeps up"));
                        hot
                    }
                    HotShard::Fits(_) => by_total,
                    HotShard::TooHot => {
                        why.push_str(
                            "; the hottest shard alone needs more than one replica: more replicas do not help it",
                        );
                        by_total
                    }
                    HotShard::AboveCap => {
                        why.push_str(&format!("; the worker with the hottest shard falls behind even with {upper}"));
                        upper
                    }
                };
                (n, why)
            }
            None if idle => (floor, "no rate measured yet, and no input and no lag".to_string()),
            // Nothing measured yet (no worker ran): one replica for any work, one more while the
            // lag is older than the catch-up window.
            None if current == 0 => {
                let n = u32::from(demand > 0.0);
                (n, "no rate measured yet: one replica to measure it".to_string())
            }
            None if i.lag_seconds > p.catch_up_window && i.ready_replicas >= current => {
                (current + 1, format!("no rate measured yet and the lag is {:.0} s: one more", i.lag_seconds))
            }
            None => (current, "no rate measured yet".to_string()),
        }
    };
    let lower = if idle_long { 0 } else { floor };
    let clamped = recommended.clamp(lower, upper);
    if clamped != recommended {
        why.push_str(&format!("; clamped to {clamped} (min {floor}, max {}, {} shards)", p.max_replicas, i.shards));
        recommended = clamped;
    }
    // A scale-up needs two recommendations above the current count in a row (one noisy
    // measurement or a trend seen in half a window moves nothing), except from zero.
    let confirmed = current == 0 || s.recommendations.last().is_some_and(|(_, r)| *r > current);
    s.recommendations.retain(|(t, _)| now - t < p.scale_down_stabilization);
    s.recommendations.push((now, recommended));

    // Did the last scale-up help? Judged one window after its replicas were all running.
    if let Some(up) = s.last_scale_up.as_mut() {
        if up.ready_at.is_none() && i.ready_replicas >= up.to {
            up.ready_at = Some(now);
        }
        if up.gain.is_none() && up.from > 0 && up.ready_at.is_some_and(|t| now - t >= p.window) {
            let expected = up.throughput_before * (f64::from(up.to) / f64::from(up.from) - 1.0);
            // Nothing to compare with (no throughput before): counted as a scale-up that helped.
            up.gain = Some(if expected > 0.0 { (i.throughput - up.throughput_before) / expected } else { 1.0 });
        }
    }
    if s.last_scale_up.as_ref().is_some_and(|u| u.gain.is_none() && now - u.at > pending_timeout(p)) {
        s.last_scale_up = None;
    }
    let ineffective =
        s.last_scale_up.as_ref().and_then(|u| u.gain.map(|g| (g, u))).filter(|(g, _)| *g < p.min_scale_up_gain);

    let (desired, reason) = if current > upper {
        // Above the cap (lowered max, fewer shards): no stabilization, straight to the cap.
        (upper, format!("{why}: {current} is above the cap of {upper}: scale down to it"))
    } else if recommended > current {
        let pending = s.last_scale_up.as_ref().filter(|u| u.gain.is_none() && u.from > 0);
        match ineffective {
            _ if i.sink_saturated && pending.is_some() => (
                current,
                format!("{why}; held at {current}: the sinks are saturated, waiting to see what the last scale-up brought"),
            ),
            _ if !confirmed => (current, format!("{why}; held at {current} until the next decision confirms the scale-up")),
            Some((g, u)) if i.sink_saturated => (
                current,
                format!(
                    "{why}; held at {current}: the sinks are saturated and the last scale-up ({} -> {}) brought {:.0}% of the throughput it should have",
                    u.from,
                    u.to,
                    g * 100.0
                ),
            ),
            _ => {
                // With saturated sinks, one replica at a time: each is judged before the next.
                let step = if i.sink_saturated { 1 } else { p.max_step_up.max(2 * current).max(1) };
                // The step limit never keeps the count below the minimum.
                let to = recommended.min(current + step).max(lower.min(recommended));
                let mut r = format!("{why}: scale up {current} -> {to}");
                if to < recommended {
                    r.push_str(&format!(" (at most {step} at a time)"));
                }
                s.last_scale_up =
                    Some(ScaleUp { at: now, from: current, to, throughput_before: i.throughput, ready_at: None, gain: None });
                (to, r)
            }
        }
    } else if recommended < current {
        let since = now - last_change;
        let highest = s.recommendations.iter().map(|(_, r)| *r).max().unwrap_or(recommended);
        if since < p.scale_down_stabilization {
            (
                current,
                format!(
                    "{why}; held at {current}: the last change was {since:.0} s ago, scale-down waits {:.0} s",
                    p.scale_down_stabilization
                ),
            )
        } else if highest >= current {
            (
                current,
                format!(
                    "{why}; held at {current}: {highest} was recommended within the last {:.0} s",
                    p.scale_down_stabilization
                ),
            )
        } else if recommended < highest && since < 4.0 * p.scale_down_stabilization {
            // Still falling: one step to where it settles rather than a staircase.
            (
                current,
                format!(
                    "{why}; held at {current}: the recommendation is still falling ({highest} within the last {:.0} s)",
                    p.scale_down_stabilization
                ),
            )
        } else {
            (
                highest,
                format!(
                    "{why}: scale down {current} -> {highest} (the highest recommendation of the last {:.0} s)",
                    p.scale_down_stabilization
                ),
            )
        }
    } else {
        (current, format!("{why}: hold at {current}"))
    };
    if desired != current {
        s.last_change = Some(now);
    }
    if desired < current {
        s.last_scale_up = None;
    }
    (Decision { desired, current, recommended, reason, inputs: i.clone() }, s)
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn inputs(now: f64, input: f64, lag: f64, current: u32) -> Inputs {
        Inputs {
            now,
            input_rate: input,
            throughput: input,
            per_replica_rate: Some(10_000.0),
            lag_records: lag,
            lag_seconds: lag / input.max(1.0),
            shard_rates: vec![],
            sink_saturated: false,
            current_replicas: current,
            ready_replicas: current,
            shards: 12,
        }
    }

    /// Two decisions a second apart on the same inputs (a scale-up needs two in a row).
    fn twice(p: &Policy, s: &State, i: &Inputs) -> (Decision, State) {
        let (_, s) = decide(p, s, i);
        decide(p, &s, &Inputs { now: i.now + 1.0, ..i.clone() })
    }

    #[test]
    fn a_scale_up_needs_two_recommendations_in_a_row() {
        let p = Policy::default();
        let (d, s) = decide(&p, &State::default(), &inputs(0.0, 30_000.0, 0.0, 1));
        assert_eq!((d.recommended, d.desired), (4, 1), "{}", d.reason);
        assert!(d.reason.contains("until the next decision confirms"), "{}", d.reason);
        // The next one is lower again (a blip): nothing moves.
        let (d, s) = decide(&p, &s, &inputs(10.0, 5_000.0, 0.0, 1));
        assert_eq!(d.desired, 1, "{}", d.reason);
        let (d, s) = decide(&p, &s, &inputs(20.0, 30_000.0, 0.0, 1));
        assert_eq!(d.desired, 1, "{}", d.reason);
        let (d, _) = decide(&p, &s, &inputs(30.0, 30_000.0, 0.0, 1));
        assert_eq!(d.desired, 4, "{}", d.reason);
    }

    #[test]
    fn sizes_from_rates_and_lag() {
        let p = Policy { target_utilization: 0.8, catch_up_window: 60.0, ..Policy::default() };
        // 30k/s at 8k/s per replica: 4.
        let (d, _) = twice(&p, &State::default(), &inputs(0.0, 30_000.0, 0.0, 4));
        assert_eq!((d.recommended, d.desired), (4, 4), "{}", d.reason);
        // Plus 1.2M lag over 60 s = 20k/s more: 50k / 8k = 7 (6.25 up).
        let (d, _) = twice(&p, &State::default(), &inputs(0.0, 30_000.0, 1_200_000.0, 4));
        assert_eq!((d.recommended, d.desired), (7, 7), "{}", d.reason);
        assert!(d.reason.contains("scale up 4 -> 7"), "{}", d.reason);
    }

    #[test]
    fn a_hot_shard_or_an_uneven_split_asks_for_more() {
        let p = Policy { target_utilization: 1.0, max_replicas: 12, ..Policy::default() };
        // 12 shards of 2k/s, 10k/s per replica: 24k/10k = 3 by total, and with 3 workers of 4
        // shards (8k each) the split fits.
        let mut i = inputs(0.0, 24_000.0, 0.0, 3);
        i.shard_rates = vec![2_000.0; 12];
        assert_eq!(decide(&p, &State::default(), &i).0.recommended, 3);
        // One hot shard at 7k/s and 11 at 1k: 18k/10k = 2 by total, but the worker holding
        // the hot one must have at most 3 more: ceil(12/n) <= 4 -> n = 3.
        i.shard_rates = std::iter::once(7_000.0).chain([1_000.0; 11]).collect();
        i.input_rate = 18_000.0;
        let (d, _) = decide(&p, &State::default(), &i);
        assert_eq!(d.recommended, 3, "{}", d.reason);
        assert!(d.reason.contains("hottest shard keeps up"), "{}", d.reason);
        // A shard hotter than a replica: no help from more replicas, said so.
        i.shard_rates[0] = 12_000.0;
        let (d, _) = decide(&p, &State::default(), &i);
        assert!(d.reason.contains("hottest shard alone"), "{}", d.reason);
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_period_then_takes_one_step() {
        let p = Policy { scale_down_stabilization: 120.0, target_utilization: 1.0, ..Policy::default() };
        let (d, s) = twice(&p, &State::default(), &inputs(0.0, 80_000.0, 0.0, 2));
        assert_eq!(d.desired, 6, "at most max(4, 2 × 2) more: {}", d.reason);
        let (d, s) = decide(&p, &s, &inputs(15.0, 80_000.0, 0.0, 6));
        assert_eq!(d.desired, 8);
        let mut s = s;
        let mut t = 30.0;
        // Load drops to 20k: held for 120 s after the last change, then straight to 3 (2 would
        // run at 100%, above the 95% a scale-down may plan for).
        loop {
            let (d, next) = decide(&p, &s, &inputs(t, 20_000.0, 0.0, 8));
            s = next;
            if t - 15.0 < 120.0 {
                assert_eq!(d.desired, 8, "at {t}: {}", d.reason);
            } else {
                assert_eq!(d.desired, 3, "at {t}: {}", d.reason);
                assert!(d.reason.contains("scale down 8 -> 3"), "{}", d.reason);
                break;
            }
            t += 15.0;
        }
    }

    #[test]
    fn no_scale_up_while_the_sinks_are_saturated_and_the_last_one_did_not_help() {
        let p = Policy { window: 30.0, target_utilization: 1.0, ..Policy::default() };
        let mut i = inputs(0.0, 20_000.0, 0.0, 1);
        i.throughput = 8_000.0;
        i.per_replica_rate = Some(8_000.0);
        // Saturated sinks: one replica at a time.
        i.sink_saturated = true;
        let (d, s) = twice(&p, &State::default(), &i);
        assert_eq!(d.desired, 2, "{}", d.reason);
        i.current_replicas = 2;
        i.now = 5.0;
        let (d, s) = decide(&p, &s, &i);
        assert_eq!(d.desired, 2, "waits for the judgement: {}", d.reason);
        assert!(d.reason.contains("waiting to see what the last scale-up brought"), "{}", d.reason);
        // The replicas run, a window passes, the throughput stayed at 8k (the sink's limit).
        i.ready_replicas = 2;
        i.per_replica_rate = Some(4_000.0);
        i.now = 10.0;
        let (_, s) = decide(&p, &s, &i);
        i.now = 45.0;
        let (d, s) = decide(&p, &s, &i);
        assert_eq!(d.desired, 2, "{}", d.reason);
        assert!(d.reason.contains("sinks are saturated and the last scale-up (1 -> 2) brought 0%"), "{}", d.reason);
        // The sink recovers: scaling up is allowed again.
        i.sink_saturated = false;
        i.now = 60.0;
        let (d, _) = decide(&p, &s, &i);
        assert!(d.desired > 2, "{}", d.reason);
    }

    #[test]
    fn scales_to_zero_only_when_allowed_and_idle_for_the_period() {
        let p = Policy { scale_to_zero: true, idle_period: 300.0, min_replicas: 1, ..Policy::default() };
        let mut s = State::default();
        let mut t = 0.0;
        let mut last = 1;
        while t <= 600.0 {
            let (d, next) = decide(&p, &s, &inputs(t, 0.0, 0.0, last));
            s = next;
            if t < 300.0 {
                assert_eq!(d.desired, 1, "at {t}: {}", d.reason);
            }
            last = d.desired;
            t += 15.0;
        }
        assert_eq!(last, 0);
        // Work arrives: back to at least one at once (from zero, no confirmation is needed).
        let (d, _) = decide(&p, &s, &inputs(t, 100.0, 500.0, 0));
        assert_eq!(d.desired, 1, "{}", d.reason);
        // Without scale_to_zero, min_replicas holds.
        let p = Policy { scale_to_zero: false, ..p };
        assert_eq!(decide(&p, &State::default(), &inputs(1000.0, 0.0, 0.0, 1)).0.desired, 1);
    }

    /// Seeded random inputs: never above the shard count or max, never below min (unless scaled
    /// to zero when allowed and idle), scale-ups within the step limit, no scale-down within the
    /// stabilization period after a change, and a scale-down never below a recommendation of
    /// that period (except down to a lowered cap).
    #[test]
    fn property_bounds_and_stabilization_hold_for_random_inputs() {
        let mut rng = SmallRng::seed_from_u64(7);
        for case in 0..400 {
            let min = rng.random_range(0..4);
            let p = Policy {
                min_replicas: min,
                max_replicas: rng.random_range(min.max(1)..20),
                catch_up_window: rng.random_range(5.0..300.0),
                target_utilization: rng.random_range(0.3..1.0),
                scale_down_stabilization: rng.random_range(0.0..400.0),
                max_step_up: rng.random_range(1..6),
                scale_to_zero: rng.random_bool(0.3),
                idle_period: rng.random_range(0.0..200.0),
                ..Policy::default()
            };
            let shards = rng.random_range(1..40);
            let mut s = State::default();
            let mut current = rng.random_range(0..5);
            let mut t = 0.0;
            let mut changes: Vec<f64> = vec![0.0];
            for _ in 0..200 {
                t += rng.random_range(1.0..30.0);
                let idle = rng.random_bool(0.2);
                let i = Inputs {
                    now: t,
                    input_rate: if idle { 0.0 } else { rng.random_range(0.0..200_000.0) },
                    throughput: rng.random_range(0.0..100_000.0),
                    per_replica_rate: rng.random_bool(0.9).then(|| rng.random_range(100.0..50_000.0)),
                    lag_records: if idle { 0.0 } else { rng.random_range(0.0..5_000_000.0) },
                    lag_seconds: rng.random_range(0.0..600.0),
                    shard_rates: (0..shards).map(|_| rng.random_range(0.0..20_000.0)).collect(),
                    sink_saturated: rng.random_bool(0.3),
                    current_replicas: current,
                    ready_replicas: rng.random_range(0..=current),
                    shards,
                };
                let (d, next) = decide(&p, &s, &i);
                let upper = p.max_replicas.min(shards);
                let floor = p.min_replicas.max(1).min(upper);
                assert!(d.desired <= upper, "case {case}: above the cap: {d:?}");
                if d.desired != current {
                    assert!(
                        d.desired >= floor || (p.scale_to_zero && d.desired == 0 && idle),
                        "case {case}: below min: {d:?}"
                    );
                }
                if d.desired > current {
                    // The step limit (one at a time with saturated sinks), never below the floor.
                    let step = if i.sink_saturated { 1 } else { p.max_step_up.max(2 * current).max(1) };
                    assert!(d.desired <= (current + step).max(floor), "case {case}: step: {d:?}");
                }
                if d.desired < current && current <= upper {
                    let last = *changes.last().unwrap();
                    assert!(
                        t - last >= p.scale_down_stabilization,
                        "case {case}: scale-down {t} s, last change {last} s: {d:?}"
                    );
                    for (rt, r) in &next.recommendations {
                        assert!(t - rt >= p.scale_down_stabilization || *r <= d.desired, "case {case}: {d:?}");
                    }
                }
                if d.desired != current {
                    changes.push(t);
                }
                current = d.desired;
                s = next;
            }
        }
    }
}
