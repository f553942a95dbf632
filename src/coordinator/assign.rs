//! The assignment of shards to workers: a pure function, balanced and sticky.
//!
//! Balanced: the number of shards of any two workers differs by at most one. Sticky: a shard
//! stays with its current owner whenever balance allows, so a join or a leave moves only the
//! shards it must. The moves are minimal: with `n` shards over `w` workers every worker may hold
//! `⌊n/w⌋` shards and `n mod w` of them one more; those extra places go to the workers that already
//! hold the most, so the only shards that move are the ones above a worker's quota, plus the
//! shards without a (live) owner.

use std::collections::{BTreeMap, HashMap};

/// Assigns every shard in `shards` to one of `workers` (both in a stable order; an empty result
/// when there are no workers). `current` maps shards to their owners now; owners that are not in
/// `workers` (gone) and shards that are not in `shards` (gone) are ignored.
pub fn assign(shards: &[String], workers: &[String], current: &HashMap<String, String>) -> BTreeMap<String, String> {
    assign_hinted(shards, workers, current, &HashMap::new())
}

/// [`assign`], with `hints` saying where shards without a live owner were before (a coordinator
/// restart outlasted their worker's lease). A hint only picks the worker of such a shard when
/// that worker has room, and breaks ties for the larger quotas; it never moves an owned shard.
pub fn assign_hinted(
    shards: &[String],
    workers: &[String],
    current: &HashMap<String, String>,
    hints: &HashMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if workers.is_empty() {
        return out;
    }
    let (n, w) = (shards.len(), workers.len());
    let (base, extra) = (n / w, n % w);
    // What each live worker holds now, in shard order.
    let mut kept: Vec<Vec<&String>> = vec![Vec::new(); w];
    let index: HashMap<&str, usize> = workers.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    let mut free: Vec<&String> = Vec::new();
    for s in shards {
        match current.get(s).and_then(|o| index.get(o.as_str())) {
            Some(&i) => kept[i].push(s),
            None => free.push(s),
        }
    }
    // Where the free shards were: hinted to a live worker.
    let hinted_to = |s: &String| hints.get(s).and_then(|o| index.get(o.as_str())).copied();
    let mut hinted = vec![0usize; w];
    for i in free.iter().filter_map(|s| hinted_to(s)) {
        hinted[i] += 1;
    }
    // The `extra` larger quotas go to the workers holding the most (ties: the most hinted, then
    // the earlier worker).
    let mut by_held: Vec<usize> = (0..w).collect();
    by_held.sort_by_key(|&i| (std::cmp::Reverse(kept[i].len()), std::cmp::Reverse(hinted[i]), i));
    let mut quota = vec![base; w];
    for &i in by_held.iter().take(extra) {
        quota[i] += 1;
    }
    let mut count = vec![0usize; w];
    for i in 0..w {
        let keep = kept[i].len().min(quota[i]);
        for s in kept[i].drain(..).enumerate().filter_map(|(k, s)| {
            if k < keep {
                Some(s)
            } else {
                free.push(s);
                None
            }
        }) {
            out.insert(s.clone(), workers[i].clone());
            count[i] += 1;
        }
    }
    // The rest, in shard order: back to its hinted worker while it has room, else to the worker
    // with the most room left (ties: the earlier).
    free.sort_by_key(|s| shards.iter().position(|x| x == *s));
    free.retain(|s| match hinted_to(s) {
        Some(i) if count[i] < quota[i] => {
            out.insert((*s).clone(), workers[i].clone());
            count[i] += 1;
            false
        }
        _ => true,
    });
    for s in free {
        let i = (0..w).filter(|&i| count[i] < quota[i]).max_by_key(|&i| (quota[i] - count[i], std::cmp::Reverse(i)));
        let Some(i) = i else { break };
        out.insert(s.clone(), workers[i].clone());
        count[i] += 1;
    }
    out
}

/// The fewest shards any balanced assignment must move from `current` (a shard without a live
/// owner counts as moved): what [`assign`] achieves.
pub fn minimal_moves(shards: &[String], workers: &[String], current: &HashMap<String, String>) -> usize {
    if workers.is_empty() {
        return 0;
    }
    let (n, w) = (shards.len(), workers.len());
    let (base, extra) = (n / w, n % w);
    let mut held: Vec<usize> =
        workers.iter().map(|id| shards.iter().filter(|s| current.get(*s) == Some(id)).count()).collect();
    held.sort_unstable_by(|a, b| b.cmp(a));
    let owned: usize = held.iter().sum();
    let kept: usize = held.iter().enumerate().map(|(k, &h)| h.min(base + usize::from(k < extra))).sum();
    (n - owned) + (owned - kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn ids(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn counts(a: &BTreeMap<String, String>, workers: &[String]) -> Vec<usize> {
        workers.iter().map(|w| a.values().filter(|o| *o == w).count()).collect()
    }

    fn moved(a: &BTreeMap<String, String>, current: &HashMap<String, String>) -> usize {
        a.iter().filter(|(s, o)| current.get(*s) != Some(*o)).count()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            shards: usize,
            workers: &'static [&'static str],
            current: &'static [(&'static str, &'static str)],
            counts: &'static [usize],
            moved: usize,
        }
        let cases = [
            Case { name: "first worker takes all", shards: 4, workers: &["a"], current: &[], counts: &[4], moved: 4 },
            Case {
                name: "12 over 3",
                shards: 12,
                workers: &["a", "b", "c"],
                current: &[],
                counts: &[4, 4, 4],
                moved: 12,
            },
            Case {
                name: "a 4th joins: 3 shards move, one from each",
                shards: 12,
                workers: &["a", "b", "c", "d"],
                current: &[
                    ("s0", "a"),
                    ("s1", "a"),
                    ("s2", "a"),
                    ("s3", "a"),
                    ("s4", "b"),
                    ("s5", "b"),
                    ("s6", "b"),
                    ("s7", "b"),
                    ("s8", "c"),
                    ("s9", "c"),
                    ("s10", "c"),
                    ("s11", "c"),
                ],
                counts: &[3, 3, 3, 3],
                moved: 3,
            },
            Case {
                name: "c leaves: only its 4 move",
                shards: 12,
                workers: &["a", "b"],
                current: &[
                    ("s0", "a"),
                    ("s1", "a"),
                    ("s2", "a"),
                    ("s3", "a"),
                    ("s4", "b"),
                    ("s5", "b"),
                    ("s6", "b"),
                    ("s7", "b"),
                    ("s8", "c"),
                    ("s9", "c"),
                    ("s10", "c"),
                    ("s11", "c"),
                ],
                counts: &[6, 6],
                moved: 4,
            },
            Case {
                name: "the extra place goes to the worker already holding it",
                shards: 5,
                workers: &["a", "b"],
                current: &[("s0", "b"), ("s1", "b"), ("s2", "b"), ("s3", "a"), ("s4", "a")],
                counts: &[2, 3],
                moved: 0,
            },
            Case {
                name: "more workers than shards",
                shards: 2,
                workers: &["a", "b", "c"],
                current: &[],
                counts: &[1, 1, 0],
                moved: 2,
            },
            Case { name: "no workers", shards: 3, workers: &[], current: &[], counts: &[], moved: 0 },
        ];
        for c in cases {
            let shards = ids("s", c.shards);
            let workers: Vec<String> = c.workers.iter().map(|s| s.to_string()).collect();
            let current: HashMap<String, String> =
                c.current.iter().map(|(s, w)| (s.to_string(), w.to_string())).collect();
            let a = assign(&shards, &workers, &current);
            assert_eq!(counts(&a, &workers), c.counts, "{}: counts", c.name);
            if !workers.is_empty() {
                assert_eq!(a.len(), shards.len(), "{}: every shard assigned", c.name);
            }
            assert_eq!(moved(&a, &current), c.moved, "{}: moves", c.name);
            assert_eq!(minimal_moves(&shards, &workers, &current), c.moved, "{}: the minimum", c.name);
        }
    }

    #[test]
    fn hints_place_free_shards_without_moving_owned_ones() {
        let shards = ids("s", 13);
        let workers = ids("w", 4);
        let (a, b, c, d) = (&workers[0], &workers[1], &workers[2], &workers[3]);
        // b holds 4 (s4..s7), c 3, d 2; a's lease ran out: s0..s3 are free, hinted to a.
        let owners = [(4..8, b), (8..11, c), (11..13, d)];
        let current: HashMap<String, String> =
            owners.iter().flat_map(|(r, w)| r.clone().map(|i| (shards[i].clone(), (*w).clone()))).collect();
        let hints: HashMap<String, String> = (0..4).map(|i| (shards[i].clone(), a.clone())).collect();
        let out = assign_hinted(&shards, &workers, &current, &hints);
        assert_eq!(counts(&out, &workers), vec![3, 4, 3, 3]);
        assert_eq!(moved(&out, &current), minimal_moves(&shards, &workers, &current), "{out:?}");
        for i in 4..13 {
            assert_eq!(out[&shards[i]], current[&shards[i]], "owned shard {i} stays");
        }
        for i in 0..3 {
            assert_eq!(&out[&shards[i]], a, "hinted shard {i} goes back to a");
        }
        // Nobody owns anything (every lease ran out): the hints give the previous assignment
        // back, the extra quota included, where a fresh deal would move most shards.
        let before: HashMap<String, String> =
            (0..13).map(|i| (shards[i].clone(), workers[3 - i % 4].clone())).collect();
        let out = assign_hinted(&shards, &workers, &HashMap::new(), &before);
        assert_eq!(out.into_iter().collect::<HashMap<_, _>>(), before);
        // Hints to workers that are gone are ignored.
        let gone: HashMap<String, String> = (0..13).map(|i| (shards[i].clone(), "x".to_string())).collect();
        assert_eq!(
            assign_hinted(&shards, &workers, &HashMap::new(), &gone),
            assign(&shards, &workers, &HashMap::new())
        );
    }

    /// Random shard sets, worker sets, current owners (some gone, some shards new) and hints:
    /// every shard is assigned once, counts differ by at most one, the moves are the minimum
    /// (hints do not add any), and the result is stable (assigning again moves nothing).
    #[test]
    fn property_balanced_sticky_minimal() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5u64 << 40 | 0x1ce);
        for case in 0..3000 {
            let n = rng.random_range(0..40);
            let w = rng.random_range(1..9);
            let shards = ids("s", n);
            let workers = ids("w", w);
            let mut current = HashMap::new();
            for s in &shards {
                match rng.random_range(0..4) {
                    0 => {} // new shard
                    1 => {
                        current.insert(s.clone(), format!("gone{}", rng.random_range(0..3)));
                    }
                    _ => {
                        current.insert(s.clone(), workers[rng.random_range(0..w)].clone());
                    }
                }
            }
            // Where some shards were, on live or gone workers (odd cases only: even ones keep
            // checking plain `assign`).
            let mut hints = HashMap::new();
            if case % 2 == 1 {
                for s in &shards {
                    if rng.random_range(0..3) == 0 {
                        let to = rng.random_range(0..w + 1);
                        hints.insert(s.clone(), workers.get(to).cloned().unwrap_or_else(|| "gone0".into()));
                    }
                }
            }
            let a = assign_hinted(&shards, &workers, &current, &hints);
            assert_eq!(a.len(), n, "case {case}: every shard once");
            assert!(a.values().all(|o| workers.contains(o)), "case {case}: only live workers");
            let c = counts(&a, &workers);
            let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(hi - lo <= 1, "case {case}: counts {c:?}");
            assert_eq!(moved(&a, &current), minimal_moves(&shards, &workers, &current), "case {case}: minimal moves");
            let again: HashMap<String, String> = a.clone().into_iter().collect();
            assert_eq!(assign(&shards, &workers, &again), a, "case {case}: stable");
        }
    }
}
