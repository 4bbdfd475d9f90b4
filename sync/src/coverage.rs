//! Which versions of each origin a replica holds: per origin, a set of inclusive ranges of
//! origin db_versions. A replica that covers origin O's versions 1..=10 holds the effect of
//! every write O made in those transactions (or something that supersedes it).
//!
//! Peers exchange coverage instead of pairwise watermarks: "send me what I do not cover" works
//! through relays, and a range learned out of order (a bundle that skips ahead) leaves a gap
//! that a later exchange fills.

use std::collections::BTreeMap;
use std::fmt;

use crate::clock::DbVersion;

/// A replica's 16-byte site id (a random UUIDv4-shaped value, as cr-sqlite's).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(pub [u8; 16]);

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteId({})", &hex::encode(self.0)[..8])
    }
}

/// Sorted, disjoint, non-adjacent inclusive ranges of positive versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<(DbVersion, DbVersion)>);

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        RangeSet(Vec::new())
    }

    /// The union of `ranges` (each inclusive; empty ones are ignored).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (DbVersion, DbVersion)>) -> Self {
        let mut set = RangeSet::new();
        for (a, b) in ranges {
            set.insert(a, b);
        }
        set
    }

    /// The ranges, sorted, disjoint and non-adjacent.
    pub fn ranges(&self) -> &[(DbVersion, DbVersion)] {
        &self.0
    }

    /// Whether the set holds no version.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `start..=end`, merging with overlapping or adjacent ranges.
    pub fn insert(&mut self, start: DbVersion, end: DbVersion) {
        if start > end {
            return;
        }
        // Ranges usually come in order (heads, cover records): append in constant time.
        match self.0.last_mut() {
            None => {
                self.0.push((start, end));
                return;
            }
            Some(last) if last.1.next() < start => {
                self.0.push((start, end));
                return;
            }
            Some(last) if last.0 <= start => {
                last.1 = last.1.max(end);
                return;
            }
            _ => {}
        }
        let (mut s, mut e) = (start, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.0 {
            if b.next() < s {
                out.push((a, b));
            } else if e.next() < a {
                if !placed {
                    out.push((s, e));
                    placed = true;
                }
                out.push((a, b));
            } else {
                s = s.min(a);
                e = e.max(b);
            }
        }
        if !placed {
            out.push((s, e));
        }
        self.0 = out;
    }

    /// Adds every range of `other`, in one pass over both.
    pub fn union(&mut self, other: &RangeSet) {
        if other.0.is_empty() {
            return;
        }
        let mut merged = RangeSet(Vec::with_capacity(self.0.len() + other.0.len()));
        let (mut i, mut j) = (0, 0);
        while i < self.0.len() || j < other.0.len() {
            let next = match (self.0.get(i), other.0.get(j)) {
                (Some(&a), Some(&b)) if a.0 <= b.0 => {
                    i += 1;
                    a
                }
                (_, Some(&b)) => {
                    j += 1;
                    b
                }
                (Some(&a), None) => {
                    i += 1;
                    a
                }
                (None, None) => break,
            };
            merged.insert(next.0, next.1);
        }
        *self = merged;
    }

    /// Whether version `v` is in the set.
    pub fn contains(&self, v: DbVersion) -> bool {
        let idx = self.0.partition_point(|&(_, b)| b < v);
        self.0.get(idx).is_some_and(|&(a, _)| a <= v)
    }

    /// The parts of `self` that `other` lacks.
    pub fn minus(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        for &(a, b) in &self.0 {
            let mut cur = a;
            for &(c, d) in &other.0 {
                if d < cur || c > b {
                    continue;
                }
                if c > cur {
                    out.push((cur, c.prev()));
                }
                cur = d.next();
                if cur > b {
                    break;
                }
            }
            if cur <= b {
                out.push((cur, b));
            }
        }
        RangeSet(out)
    }

    /// The part of `self` within `lo..=hi`.
    pub fn within(&self, lo: DbVersion, hi: DbVersion) -> RangeSet {
        RangeSet(
            self.0
                .iter()
                .filter(|&&(a, b)| b >= lo && a <= hi)
                .map(|&(a, b)| (a.max(lo), b.min(hi)))
                .collect(),
        )
    }

    /// The end of the range that starts at 1 (0 if there is none): everything up to it is held.
    pub fn head(&self) -> DbVersion {
        match self.0.first() {
            Some(&(DbVersion(1), b)) => b,
            _ => DbVersion(0),
        }
    }
}

/// Per-origin coverage of a replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage(pub BTreeMap<SiteId, RangeSet>);

impl Coverage {
    /// The versions held from origin `site`, if any.
    pub fn get(&self, site: &SiteId) -> Option<&RangeSet> {
        self.0.get(site)
    }

    /// Adds `start..=end` of origin `site`.
    pub fn insert(&mut self, site: SiteId, start: DbVersion, end: DbVersion) {
        self.0.entry(site).or_default().insert(start, end);
    }

    /// Adds everything `other` covers.
    pub fn union(&mut self, other: &Coverage) {
        for (site, set) in &other.0 {
            self.0.entry(*site).or_default().union(set);
        }
    }

    /// Whether version `version` of origin `site` is covered.
    pub fn contains(&self, site: &SiteId, version: DbVersion) -> bool {
        self.0.get(site).is_some_and(|s| s.contains(version))
    }

    /// What `self` covers and `other` does not, per origin.
    pub fn minus(&self, other: &Coverage) -> Coverage {
        let empty = RangeSet::new();
        let mut out = BTreeMap::new();
        for (site, set) in &self.0 {
            let rest = set.minus(other.0.get(site).unwrap_or(&empty));
            if !rest.is_empty() {
                out.insert(*site, rest);
            }
        }
        Coverage(out)
    }
}

/// Coverage as the peer protocol carries it: per origin, its ranges in ascending order.
impl From<&Coverage> for fazt_proto::wire::Heads {
    fn from(c: &Coverage) -> Self {
        fazt_proto::wire::Heads(
            c.0.iter()
                .map(|(site, set)| {
                    let ranges = set.ranges().iter().map(|&(a, b)| (a.0, b.0)).collect();
                    (site.0, ranges)
                })
                .collect(),
        )
    }
}

/// Coverage from the peer protocol's heads. Ranges are merged as they are inserted, so heads
/// that overlap or come out of order give the same coverage as sorted ones.
impl From<&fazt_proto::wire::Heads> for Coverage {
    fn from(h: &fazt_proto::wire::Heads) -> Self {
        let mut c = Coverage::default();
        for (site, ranges) in &h.0 {
            for &(start, end) in ranges {
                c.insert(SiteId(*site), DbVersion(start), DbVersion(end));
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(n: i64) -> DbVersion {
        DbVersion(n)
    }

    /// Ranges of plain numbers as ranges of versions.
    fn r(ranges: &[(i64, i64)]) -> Vec<(DbVersion, DbVersion)> {
        ranges.iter().map(|&(a, b)| (v(a), v(b))).collect()
    }

    #[test]
    fn ranges_merge_and_subtract() {
        let mut s = RangeSet::new();
        s.insert(v(5), v(7));
        s.insert(v(1), v(2));
        s.insert(v(3), v(4));
        assert_eq!(s.ranges(), r(&[(1, 7)]));
        s.insert(v(10), v(12));
        assert_eq!(s.head(), v(7));
        assert!(s.contains(v(11)) && !s.contains(v(8)));
        let other = RangeSet::from_ranges(r(&[(2, 3), (11, 20)]));
        assert_eq!(s.minus(&other).ranges(), r(&[(1, 1), (4, 7), (10, 10)]));
    }

    proptest! {
        #[test]
        fn a_set_holds_exactly_what_was_inserted(ranges in proptest::collection::vec((1i64..60, 0i64..6), 0..12), probe in 0i64..70) {
            let set = RangeSet::from_ranges(ranges.iter().map(|&(a, len)| (v(a), v(a + len))));
            let expected = ranges.iter().any(|&(a, len)| probe >= a && probe <= a + len);
            prop_assert_eq!(set.contains(v(probe)), expected);
            for w in set.ranges().windows(2) {
                prop_assert!(w[0].1.next() < w[1].0, "ranges stay sorted, disjoint and apart");
            }
        }

        #[test]
        fn union_holds_exactly_both_sets(a in proptest::collection::vec((1i64..60, 0i64..6), 0..8), b in proptest::collection::vec((1i64..60, 0i64..6), 0..8), probe in 0i64..70) {
            let sa = RangeSet::from_ranges(a.iter().map(|&(x, l)| (v(x), v(x + l))));
            let sb = RangeSet::from_ranges(b.iter().map(|&(x, l)| (v(x), v(x + l))));
            let mut u = sa.clone();
            u.union(&sb);
            prop_assert_eq!(u.contains(v(probe)), sa.contains(v(probe)) || sb.contains(v(probe)));
            for w in u.ranges().windows(2) {
                prop_assert!(w[0].1.next() < w[1].0, "ranges stay sorted, disjoint and apart");
            }
        }

        #[test]
        fn minus_removes_exactly_the_other_set(a in proptest::collection::vec((1i64..60, 0i64..6), 0..8), b in proptest::collection::vec((1i64..60, 0i64..6), 0..8), probe in 0i64..70) {
            let sa = RangeSet::from_ranges(a.iter().map(|&(x, l)| (v(x), v(x + l))));
            let sb = RangeSet::from_ranges(b.iter().map(|&(x, l)| (v(x), v(x + l))));
            prop_assert_eq!(sa.minus(&sb).contains(v(probe)), sa.contains(v(probe)) && !sb.contains(v(probe)));
        }
    }
}
