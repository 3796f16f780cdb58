//! Retention: which sets a policy keeps. A pure function over set names, times and their
//! verification status, so every rule is unit-tested without a disk.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;

use super::kind::EngineKind;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
    }
}

/// A set as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub time: DateTime<Utc>,
    /// The set verifies. Sets that do not are never counted and never deleted here: an
    /// operator looks at them.
    pub good: bool,
    /// The engines the set holds.
    pub engines: Vec<EngineKind>,
    /// The engines it was taken before migrating (a `pre-migration` set); empty otherwise.
    pub pre_migration: Vec<EngineKind>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Kept, with the rules that keep each one.
    pub keep: Vec<(String, Vec<&'static str>)>,
    pub delete: Vec<String>,
    /// Sets that do not verify: left alone.
    pub untouched: Vec<String>,
}

/// Applies `policy` to `sets` (any order). The newest good set is always kept, whatever the
/// policy, and so is the newest good pre-migration set of each engine until a later good set
/// holds that engine: it is how a migration is undone. An empty policy keeps everything.
pub fn apply(policy: &Policy, sets: &[Candidate]) -> Decision {
    let mut good: Vec<&Candidate> = sets.iter().filter(|c| c.good).collect();
    good.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
    let mut decision = Decision {
        untouched: sets
            .iter()
            .filter(|c| !c.good)
            .map(|c| c.id.clone())
            .collect(),
        ..Decision::default()
    };
    decision.untouched.sort();

    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); good.len()];
    if let Some(first) = reasons.first_mut() {
        first.push("newest");
    }
    if policy.is_empty() {
        for r in &mut reasons {
            r.push("no policy");
        }
    }
    for (i, r) in reasons
        .iter_mut()
        .enumerate()
        .take(policy.keep_last as usize)
    {
        let _ = i;
        r.push("last");
    }
    bucket(&good, &mut reasons, policy.keep_daily, "daily", |t| {
        (t.year(), t.ordinal(), 0)
    });
    bucket(&good, &mut reasons, policy.keep_weekly, "weekly", |t| {
        let w = t.iso_week();
        (w.year(), w.week(), 0)
    });
    bucket(&good, &mut reasons, policy.keep_monthly, "monthly", |t| {
        (t.year(), t.month(), 0)
    });

    for kind in EngineKind::ALL {
        // `good` is newest first: the first pre-migration set of `kind` is its newest.
        let Some(i) = good.iter().position(|c| c.pre_migration.contains(&kind)) else {
            continue;
        };
        let superseded = good[..i].iter().any(|c| c.engines.contains(&kind));
        if !superseded && !reasons[i].contains(&"pre-migration") {
            reasons[i].push("pre-migration");
        }
    }

    for (c, r) in good.iter().zip(reasons) {
        if r.is_empty() {
            decision.delete.push(c.id.clone());
        } else {
            decision.keep.push((c.id.clone(), r));
        }
    }
    decision
}

/// Keeps the newest set of each of the `n` newest periods that have a set.
fn bucket<K: Ord + Copy>(
    good: &[&Candidate],
    reasons: &mut [Vec<&'static str>],
    n: u32,
    rule: &'static str,
    key: impl Fn(&DateTime<Utc>) -> K,
) {
    let mut seen = BTreeSet::new();
    for (i, c) in good.iter().enumerate() {
        if seen.len() >= n as usize {
            break;
        }
        if seen.insert(key(&c.time)) {
            reasons[i].push(rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32) -> Candidate {
        let time = Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        Candidate {
            id: crate::repo::set_name(time),
            time,
            good: true,
            engines: vec![EngineKind::Mongodb, EngineKind::Redis],
            pre_migration: Vec::new(),
        }
    }

    fn pre_migration(mut c: Candidate, kind: EngineKind) -> Candidate {
        c.engines = vec![kind];
        c.pre_migration = vec![kind];
        c
    }

    #[test]
    fn the_newest_pre_migration_set_stays_until_a_later_good_set_holds_its_engine() {
        use EngineKind::{Mongodb, Redis};
        let p = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let mut only_redis = at(2026, 1, 4, 2);
        only_redis.engines = vec![Redis];
        let mut sets = vec![
            at(2026, 1, 1, 2),
            pre_migration(at(2026, 1, 2, 2), Mongodb),
            pre_migration(at(2026, 1, 3, 2), Mongodb),
            only_redis,
        ];
        // Jan 3 is MongoDB's newest pre-migration set and no later set holds MongoDB; Jan 2 is
        // an older one, and Jan 1 is plain: the policy decides them.
        let d = apply(&p, &sets);
        assert_eq!(kept(&d), vec!["2026-01-03_02-00-00", "2026-01-04_02-00-00"]);
        assert!(
            d.keep
                .iter()
                .any(|(id, why)| id == "2026-01-03_02-00-00" && why == &vec!["pre-migration"])
        );
        assert_eq!(d.delete.len(), 2);

        // A later set that does not verify does not release it.
        let mut bad = at(2026, 1, 5, 2);
        bad.good = false;
        sets.push(bad);
        assert!(kept(&apply(&p, &sets)).contains(&"2026-01-03_02-00-00".to_owned()));

        // A later good set of MongoDB does.
        sets.push(at(2026, 1, 6, 2));
        let d = apply(&p, &sets);
        assert_eq!(kept(&d), vec!["2026-01-06_02-00-00"]);
    }

    fn kept(d: &Decision) -> Vec<String> {
        let mut k: Vec<String> = d.keep.iter().map(|(id, _)| id.clone()).collect();
        k.sort();
        k
    }

    #[test]
    fn keep_last_keeps_the_newest_n() {
        let sets: Vec<_> = (1..=5).map(|d| at(2026, 1, d, 2)).collect();
        let p = Policy {
            keep_last: 2,
            ..Policy::default()
        };
        let d = apply(&p, &sets);
        assert_eq!(kept(&d), vec!["2026-01-04_02-00-00", "2026-01-05_02-00-00"]);
        assert_eq!(d.delete.len(), 3);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let sets = vec![
            at(2026, 1, 1, 2),
            at(2026, 1, 1, 14),
            at(2026, 1, 2, 2),
            at(2026, 1, 2, 14),
            at(2026, 1, 3, 2),
        ];
        let p = Policy {
            keep_daily: 2,
            ..Policy::default()
        };
        let d = apply(&p, &sets);
        assert_eq!(kept(&d), vec!["2026-01-02_14-00-00", "2026-01-03_02-00-00"]);
        assert_eq!(d.delete.len(), 3);
    }

    #[test]
    fn weekly_and_monthly_buckets() {
        // 2026-01-05 is a Monday; weeks of Jan 5, Jan 12, and two sets in Feb.
        let sets = vec![
            at(2026, 1, 5, 2),
            at(2026, 1, 11, 2),
            at(2026, 1, 12, 2),
            at(2026, 2, 1, 2),
            at(2026, 2, 20, 2),
        ];
        let p = Policy {
            keep_weekly: 2,
            keep_monthly: 2,
            ..Policy::default()
        };
        let d = apply(&p, &sets);
        // weekly: Feb 20 (w8), Feb 1 (w5); monthly: Feb 20, Jan 12.
        assert_eq!(
            kept(&d),
            vec![
                "2026-01-12_02-00-00",
                "2026-02-01_02-00-00",
                "2026-02-20_02-00-00"
            ]
        );
    }

    #[test]
    fn newest_good_set_survives_any_policy_and_bad_sets_are_never_deleted() {
        let mut sets: Vec<_> = (1..=4).map(|d| at(2026, 1, d, 2)).collect();
        // The newest set is corrupt: it neither counts nor gets deleted.
        sets[3].good = false;
        let p = Policy {
            keep_last: 1,
            ..Policy::default()
        };
        let d = apply(&p, &sets);
        assert_eq!(kept(&d), vec!["2026-01-03_02-00-00"]);
        assert_eq!(d.untouched, vec!["2026-01-04_02-00-00"]);
        assert!(!d.delete.contains(&"2026-01-04_02-00-00".to_string()));
        // Even a policy that keeps no day keeps the newest good set.
        let p = Policy {
            keep_monthly: 0,
            keep_weekly: 0,
            keep_daily: 0,
            keep_last: 0,
        };
        let d = apply(&p, &sets);
        assert!(d.delete.is_empty(), "empty policy deletes nothing");
        let only_daily_old = Policy {
            keep_daily: 1,
            ..Policy::default()
        };
        let d = apply(&only_daily_old, &sets);
        assert_eq!(kept(&d), vec!["2026-01-03_02-00-00"]);
    }

    #[test]
    fn all_bad_deletes_nothing() {
        let mut sets: Vec<_> = (1..=3).map(|d| at(2026, 1, d, 2)).collect();
        for s in &mut sets {
            s.good = false;
        }
        let d = apply(
            &Policy {
                keep_last: 1,
                ..Policy::default()
            },
            &sets,
        );
        assert!(d.delete.is_empty());
        assert!(d.keep.is_empty());
        assert_eq!(d.untouched.len(), 3);
    }
}
