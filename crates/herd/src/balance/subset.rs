//! Deterministic subsetting: which of a service's instances one caller connects to, computed by
//! every caller alone from what discovery shows it, with no coordination.
//!
//! Callers and callee instances are each put in one order by a stable hash of their ids (the
//! same on every machine and version), and spaced evenly round a ring: the caller ranked `j` of
//! `C` starts at callee `⌊j·N/C⌋` of `N` and takes the next `size`. Every instance is then in the
//! subsets of the same number of callers, give or take one (the "deterministic aperture" of
//! Twitter's Finagle; the SRE book's deterministic subsetting needs numbered clients instead).
//! Chosen independently at random (gRFC A68's random subsetting, rendezvous hashing), the number
//! per instance would spread like a Poisson draw: 5 to 30 callers where 16 is the mean.
//!
//! A caller's rank comes from the registrations of its own service, which it watches anyway. When
//! callers are too few to cover every instance (`C·size < N`), each takes `⌈N/C⌉` instead, so that
//! no instance is left without traffic. The price of an even spread is that one instance, or one
//! caller, coming or going moves the ring's boundaries: many callers swap one member of their
//! subset (BENCHMARKS.md measures how many).

/// One caller's view of a callee service: the instances in the order it prefers them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subset {
    /// Every callee instance id: the caller's subset first, then the rest in the order it refills
    /// from when members of its subset fail.
    pub order: Vec<String>,
    /// How many of `order`, from the front, make the subset.
    pub size: usize,
}

impl Subset {
    /// The ids of the subset's members.
    pub fn members(&self) -> &[String] {
        &self.order[..self.size]
    }
}

/// The subset of `callees` for the caller `own` among the callers `peers` (its own service's
/// instances; `own` may be among them or not yet), of `size` instances (0: all of them).
pub fn subset<'a>(
    own: &str,
    peers: impl IntoIterator<Item = &'a str>,
    callees: impl IntoIterator<Item = &'a str>,
    size: usize,
) -> Subset {
    let ring = ring(callees);
    let n = ring.len();
    if n == 0 {
        return Subset::default();
    }
    let me = (position(own), own);
    let (mut before, mut callers) = (0usize, 1usize);
    for peer in peers {
        if peer == own {
            continue;
        }
        callers += 1;
        if (position(peer), peer) < me {
            before += 1;
        }
    }
    let size = if size == 0 {
        n
    } else {
        size.max(n.div_ceil(callers)).min(n)
    };
    let start = before * n / callers;
    Subset {
        order: round_from(&ring, start),
        size,
    }
}

/// The subset of `callees` for a caller with no peers to rank among (one outside the mesh): the
/// `size` instances (0: all) that follow its own place on the ring. Callers with random ids land
/// at random places, so many of them spread over every instance, if less evenly than ranked
/// callers do.
pub fn subset_alone<'a>(
    own: &str,
    callees: impl IntoIterator<Item = &'a str>,
    size: usize,
) -> Subset {
    let ring = ring(callees);
    let n = ring.len();
    let me = (position(own), own);
    let start = ring.partition_point(|callee| *callee < me);
    let size = if size == 0 { n } else { size.min(n) };
    Subset {
        order: round_from(&ring, start),
        size,
    }
}

/// The callees in ring order: by [`position`], once each.
fn ring<'a>(callees: impl IntoIterator<Item = &'a str>) -> Vec<(u64, &'a str)> {
    let mut ring: Vec<(u64, &str)> = callees.into_iter().map(|id| (position(id), id)).collect();
    ring.sort_unstable();
    ring.dedup();
    ring
}

/// The ring's ids, starting at `start` and going round once.
fn round_from(ring: &[(u64, &str)], start: usize) -> Vec<String> {
    let n = ring.len();
    (0..n)
        .map(|i| ring[(start + i) % n].1.to_string())
        .collect()
}

/// Where an id stands on the ring: FNV-1a over its bytes, then splitmix64's finaliser so that ids
/// that differ in their last characters land far apart. Fixed here rather than std's hasher,
/// whose output may change between Rust releases: every caller must compute the same.
pub(crate) fn position(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The subset of `caller` among `callers` (every one a caller of `callees`).
    fn among(caller: &str, callers: &[String], callees: &[String], size: usize) -> Subset {
        subset(
            caller,
            callers.iter().map(String::as_str),
            callees.iter().map(String::as_str),
            size,
        )
    }

    fn ids(service: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "{service}-{:012x}",
                    position(&format!("{service}{i}")) >> 16
                )
            })
            .collect()
    }

    /// Connections per callee instance when every caller takes its subset.
    fn spread(callers: &[String], callees: &[String], size: usize) -> BTreeMap<String, usize> {
        let mut per: BTreeMap<String, usize> = callees.iter().map(|c| (c.clone(), 0)).collect();
        for caller in callers {
            let s = among(caller, callers, callees, size);
            for m in s.members() {
                *per.entry(m.clone()).or_default() += 1;
            }
        }
        per
    }

    fn ratio(per: &BTreeMap<String, usize>) -> f64 {
        let max = per.values().copied().max().unwrap_or(0);
        let min = per.values().copied().min().unwrap_or(0);
        max as f64 / min.max(1) as f64
    }

    #[test]
    fn a_thousand_callers_spread_evenly_over_a_thousand_instances() {
        let (callers, callees) = (ids("gateway", 1000), ids("pricing", 1000));
        let per = spread(&callers, &callees, 16);
        assert!(
            per.values().all(|&c| c == 16),
            "{:?}",
            per.values().collect::<BTreeSet<_>>()
        );
        assert!(ratio(&per) <= 1.3);
    }

    #[test]
    fn uneven_counts_differ_by_one_at_most() {
        for (c, n, size) in [
            (1000, 100, 16),
            (100, 1000, 16),
            (300, 1000, 16),
            (1000, 300, 16),
            (7, 30, 4),
            (3, 5, 2),
        ] {
            let (callers, callees) = (ids("gateway", c), ids("pricing", n));
            let per = spread(&callers, &callees, size);
            let max = per.values().copied().max().unwrap_or(0);
            let min = per.values().copied().min().unwrap_or(0);
            assert!(
                min >= 1 && max - min <= 1,
                "{c} callers over {n}: {min}..{max}"
            );
        }
    }

    #[test]
    fn every_caller_holds_its_size_and_too_few_callers_still_cover_every_instance() {
        let (callers, callees) = (ids("gateway", 4), ids("pricing", 100));
        for caller in &callers {
            let s = among(caller, &callers, &callees, 16);
            assert_eq!(s.size, 25, "⌈100/4⌉");
            assert_eq!(s.order.len(), 100);
        }
        assert!(spread(&callers, &callees, 16).values().all(|&c| c == 1));
        let (callers, callees) = (ids("gateway", 50), ids("pricing", 100));
        for caller in &callers {
            let s = among(caller, &callers, &callees, 16);
            assert_eq!(s.size, 16);
        }
    }

    #[test]
    fn size_zero_means_all_and_a_caller_not_yet_registered_ranks_as_if_it_were() {
        let (callers, callees) = (ids("gateway", 10), ids("pricing", 40));
        let s = subset(&callers[0], [], callees.iter().map(String::as_str), 0);
        assert_eq!(s.size, 40);
        let with = among(&callers[3], &callers, &callees, 4);
        let without = subset(
            &callers[3],
            callers
                .iter()
                .filter(|c| *c != &callers[3])
                .map(String::as_str),
            callees.iter().map(String::as_str),
            4,
        );
        assert_eq!(with, without);
    }

    #[test]
    fn the_subset_does_not_depend_on_discovery_order() {
        let (callers, mut callees) = (ids("gateway", 20), ids("pricing", 60));
        let a = among(&callers[5], &callers, &callees, 8);
        callees.reverse();
        let reversed: Vec<String> = callers.iter().rev().cloned().collect();
        let b = among(&callers[5], &reversed, &callees, 8);
        assert_eq!(a, b);
    }

    /// How many callers' subsets change, and how many members in all, when `change` is made.
    fn churn(
        callers: &[String],
        callees: &[String],
        after: (&[String], &[String]),
    ) -> (usize, usize) {
        let before = |c: &String| among(c, callers, callees, 16);
        let now = |c: &String| among(c, after.0, after.1, 16);
        let (mut callers_changed, mut members_changed) = (0, 0);
        for c in callers.iter().filter(|c| after.0.contains(c)) {
            let (a, b) = (before(c), now(c));
            let a: BTreeSet<_> = a.members().iter().collect();
            let b: BTreeSet<_> = b.members().iter().collect();
            if a != b {
                callers_changed += 1;
                members_changed += a.difference(&b).count();
            }
        }
        (callers_changed, members_changed)
    }

    #[test]
    fn one_instance_coming_or_going_moves_at_most_one_member_per_caller() {
        let (callers, callees) = (ids("gateway", 300), ids("pricing", 300));
        let mut more = callees.clone();
        more.push("pricing-new".into());
        let fewer = &callees[1..];
        let caller_more = {
            let mut c = callers.clone();
            c.push("gateway-new".into());
            c
        };
        for (what, after) in [
            ("instance added", (&callers[..], &more[..])),
            ("instance removed", (&callers[..], fewer)),
            ("caller added", (&caller_more[..], &callees[..])),
            ("caller removed", (&callers[1..], &callees[..])),
        ] {
            let (changed, members) = churn(&callers, &callees, after);
            // The ring's boundaries move by one place: a caller whose subset changes swaps one
            // member (of 300 callers, 113 to 189 do).
            assert_eq!(members, changed, "{what}");
            assert!(changed < callers.len() * 2 / 3, "{what}: {changed} callers");
        }
    }

    #[test]
    fn a_caller_alone_takes_the_instances_that_follow_it_and_many_cover_all() {
        let callees = ids("pricing", 100);
        let alone =
            |caller: &str, size| subset_alone(caller, callees.iter().map(String::as_str), size);
        let one = alone("caller-0", 16);
        assert_eq!((one.size, one.order.len()), (16, 100));
        // The members follow the caller's place round the ring, in ring order.
        let me = position("caller-0");
        let first = position(&one.order[0]);
        let last = position(&one.order[99]);
        assert!(first >= me || last < me, "starts after the caller's place");
        assert_eq!(alone("caller-0", 0).size, 100, "0 takes all");
        assert_eq!(alone("caller-0", 500).size, 100, "no more than there are");
        assert!(subset_alone("x", std::iter::empty(), 16).order.is_empty());
        // Unlike a ranked caller, one alone does not widen its subset to cover every instance:
        // many of them, with random ids, cover them between them.
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        let callers = ids("caller", 200);
        for caller in &callers {
            let s = alone(caller, 16);
            for m in s.members() {
                *per.entry(callees.iter().find(|c| *c == m).unwrap())
                    .or_default() += 1;
            }
        }
        assert_eq!(per.len(), 100, "every instance is in some caller's subset");
        assert_eq!(per.values().sum::<usize>(), 200 * 16);
    }
}
